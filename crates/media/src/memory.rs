//! A medium held in memory: for tests, benchmarks and simulations of many
//! terminals. It keeps the [`Medium`] contract (numbered keys, each handed out
//! once, in order) but nothing is durable: the keys are gone with the value.
//! `Clone` makes a *copy of the medium* — which is what a cloned SIM would be,
//! and what tests of the key service's defences against one need.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::error::{MediaError, Result};
use crate::medium::{ChargeEntry, ChargeRecord, Key256, Medium, MediumStatus};

/// A medium in memory.
#[derive(Clone)]
pub struct MemoryMedium {
    id: Uuid,
    owner: String,
    capacity: u64,
    next: u64,
    keys: VecDeque<Key256>,
    charges: Vec<ChargeEntry>,
}

impl core::fmt::Debug for MemoryMedium {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemoryMedium")
            .field("id", &self.id)
            .field("next", &self.next)
            .field("remaining", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl MemoryMedium {
    /// An empty medium.
    pub fn new(id: Uuid, owner: impl Into<String>, capacity: u64) -> Self {
        Self {
            id,
            owner: owner.into(),
            capacity,
            next: 0,
            keys: VecDeque::new(),
            charges: Vec::new(),
        }
    }
}

impl Medium for MemoryMedium {
    fn id(&self) -> Uuid {
        self.id
    }

    fn owner(&self) -> &str {
        &self.owner
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn status(&self) -> Result<MediumStatus> {
        let remaining = self.keys.len() as u64;
        Ok(MediumStatus {
            id: self.id,
            owner: self.owner.clone(),
            capacity: self.capacity,
            charged: self.next + remaining,
            used: self.next,
            remaining,
            free: self.capacity - remaining,
            charges: self.charges.clone(),
        })
    }

    fn charge(&mut self, keys: &[Key256], record: ChargeRecord) -> Result<ChargeEntry> {
        let remaining = self.keys.len() as u64;
        let count = keys.len() as u64;
        if count > self.capacity - remaining {
            return Err(MediaError::CapacityExceeded {
                requested: count,
                free: self.capacity - remaining,
            });
        }
        let first = self.next + remaining;
        self.keys.extend(keys.iter().cloned());
        let entry = ChargeEntry {
            record,
            count,
            first,
            last: first + count.saturating_sub(1),
        };
        self.charges.push(entry.clone());
        Ok(entry)
    }

    fn take_next(&mut self) -> Result<(u64, Key256)> {
        let key = self.keys.pop_front().ok_or(MediaError::Exhausted)?;
        let i = self.next;
        self.next += 1;
        Ok((i, key))
    }
}
