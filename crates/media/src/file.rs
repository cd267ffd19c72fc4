//! The file backend: a medium in one file, the I/O around [`crate::format`].
//!
//! This module decides nothing about bytes; it reads the regions the format
//! describes, hands them to the pure decoders, and writes what the pure planners
//! return, in the order that makes a crash harmless:
//!
//! - **Taking a key:** read and verify the key's slot, write the counter record
//!   with `next` advanced to the copy not holding the current one, `fdatasync`,
//!   erase (zero) the slot, and only then return the key. A crash before the sync
//!   leaves the old counter in force and the key never left; after it, the key is
//!   gone for good, handed out or not. A slot that fails its check is passed over
//!   the same way (counter advanced, slot erased) and reported, so one bad slot
//!   cannot block the medium and is never mistaken for a key. The erase is not
//!   synced on its own: the next key's sync, or closing the medium, flushes it, and
//!   opening erases the last used slot again in case power failed in between.
//! - **Charging:** write the counter record with a new epoch (and, if the log is
//!   full, the oldest fully used charge dropped), sync; seal every key into one
//!   buffer and write it in at most two runs (the slot ring may wrap), write the
//!   charge record, sync; write the counter record that makes the charge live,
//!   sync. Three syncs per charge, whatever its size. A crash anywhere leaves either
//!   the old keys or the old keys plus the whole charge.
//!
//! The file is created with mode 0600 and never overwritten; while open it is
//! held with an exclusive `flock`, so two processes cannot take keys from one
//! medium (a second open fails with [`MediaError::Busy`] after a short wait); the lock dies with the
//! process, so a medium whose holder was killed opens again at once.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use qkdnet_crypto::secret::SecretBytes;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{MediaError, Result};
use crate::format::{
    HEADER_LEN, Header, Layout, MediumKeys, MediumSpec, Record, SALT_LEN, SLOT_LEN, STATE_OFFSETS,
    State, open_slot, plan_charge, record_for, seal_slot, unlock_metadata,
};
use crate::medium::{ChargeEntry, ChargeRecord, KEY_LEN, Key256, Medium, MediumStatus};

/// A medium kept in a file, unlocked with a PIN.
pub struct FileMedium {
    file: File,
    path: PathBuf,
    header: Header,
    layout: Layout,
    keys: MediumKeys,
    state: State,
    records: Vec<Record>,
}

impl core::fmt::Debug for FileMedium {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FileMedium")
            .field("path", &self.path)
            .field("id", &self.header.spec.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// How long [`lock`] waits for a lock held by someone else.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

/// Takes the exclusive lock on the medium file. A lock is also held, for an
/// instant, by a child process that another thread of this process forks while it
/// has the medium open (the child shares the open file until it execs), so a
/// held lock is retried for a short while before the medium is reported busy.
pub(crate) fn lock(file: &File) -> Result<()> {
    use rustix::fs::{FlockOperation, flock};
    let start = std::time::Instant::now();
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                if start.elapsed() >= LOCK_PATIENCE {
                    return Err(MediaError::Busy);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                return Err(MediaError::Io {
                    op: "locking the medium file",
                    error: e.into(),
                });
            }
        }
    }
}

fn read_at(file: &File, offset: u64, len: u64) -> Result<Vec<u8>> {
    // Callers bound `len` by the header's checked sizes (at most 8.4 MB of metadata).
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(MediaError::io("reading the medium file"))?;
    Ok(buf)
}

fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(MediaError::io("syncing the medium's directory"))
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    let mut b = Zeroizing::new([0u8; N]);
    getrandom::fill(&mut b[..]).map_err(|e| MediaError::Randomness(e.to_string()))?;
    Ok(b)
}

impl FileMedium {
    /// Creates a new, empty medium at `path` (which must not exist) protected by
    /// `pin`, and returns it open.
    pub fn create(path: &Path, spec: &MediumSpec, pin: &SecretBytes) -> Result<Self> {
        let salt = random::<SALT_LEN>()?;
        let master = random::<KEY_LEN>()?;
        let master = Key256::from_slice(&master[..]).expect("invariant: 32 bytes");
        let (page, header, keys) = Header::create(spec, pin, *salt, &master)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(MediaError::io("creating the medium file"))?;
        let layout = header.layout();
        let state = State::default();
        let written = lock(&file).and_then(|()| {
            let io = MediaError::io;
            file.write_all_at(&page, 0)
                .map_err(io("writing the medium header"))?;
            file.write_all_at(&state.encode(&keys, &spec.id), STATE_OFFSETS[state.copy()])
                .map_err(io("writing the counter record"))?;
            file.set_len(layout.slots_offset())
                .map_err(io("sizing the medium file"))?;
            file.sync_all().map_err(io("syncing the medium file"))?;
            sync_parent(path)
        });
        if let Err(e) = written {
            // Nothing in it is usable: do not leave a half-made medium behind.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            header,
            layout,
            keys,
            state,
            records: Vec::new(),
        })
    }

    /// Opens the medium at `path` with `pin`. Fails with [`MediaError::WrongPin`]
    /// for a wrong PIN, [`MediaError::Busy`] if another process has it open, and a
    /// typed error naming the damaged part for a damaged file.
    pub fn open(path: &Path, pin: &SecretBytes) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(MediaError::io("opening the medium file"))?;
        lock(&file)?;
        let len = file
            .metadata()
            .map_err(MediaError::io("reading the medium file's size"))?
            .len();
        let page = read_at(&file, 0, len.min(HEADER_LEN as u64))?;
        let layout = Header::decode(&page)?.layout();
        let meta = read_at(&file, 0, len.min(layout.slots_offset()))?;
        let unlocked = unlock_metadata(&meta, pin)?;
        let needed = layout.min_len(unlocked.state.end);
        if len < needed {
            return Err(MediaError::Truncated {
                what: "the key slots",
                needed,
                got: len,
            });
        }
        let mut medium = Self {
            file,
            path: path.to_owned(),
            header: unlocked.header,
            layout,
            keys: unlocked.keys,
            state: unlocked.state,
            records: unlocked.records,
        };
        medium.erase_last_used()?;
        Ok(medium)
    }

    /// The medium's description: ID, owner, sizes, PIN parameters.
    pub fn spec(&self) -> &MediumSpec {
        &self.header.spec
    }

    /// Where the medium lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `state` to its copy and syncs; only then is it the state in memory.
    fn write_state(&mut self, state: &State) -> Result<()> {
        let bytes = state.encode(&self.keys, &self.header.spec.id);
        self.file
            .write_all_at(&bytes, STATE_OFFSETS[state.copy()])
            .map_err(MediaError::io("writing the counter record"))?;
        self.file
            .sync_data()
            .map_err(MediaError::io("syncing the counter record"))?;
        self.state = *state;
        Ok(())
    }

    fn erase_slot(&self, index: u64) -> Result<()> {
        self.file
            .write_all_at(&[0u8; SLOT_LEN], self.layout.slot_offset(index))
            .map_err(MediaError::io("erasing a used key slot"))
    }

    /// Erases the last used key's slot if a power failure kept its erasure from
    /// the disk, unless a later charge has since put a live key there.
    fn erase_last_used(&mut self) -> Result<()> {
        let s = self.state;
        let Some(last) = s.next.checked_sub(1) else {
            return Ok(());
        };
        if last + self.header.spec.capacity < s.end {
            return Ok(());
        }
        let at = self.layout.slot_offset(last);
        let mut slot = [0u8; SLOT_LEN];
        if self.file.read_exact_at(&mut slot, at).is_err() || slot == [0u8; SLOT_LEN] {
            return Ok(());
        }
        self.erase_slot(last)?;
        self.file
            .sync_data()
            .map_err(MediaError::io("syncing an erased key slot"))
    }
}

impl Drop for FileMedium {
    fn drop(&mut self) {
        // Flushes the last used slot's erasure; the counter is already durable.
        let _ = self.file.sync_data();
    }
}

impl Medium for FileMedium {
    fn id(&self) -> Uuid {
        self.header.spec.id
    }

    fn owner(&self) -> &str {
        &self.header.spec.owner
    }

    fn capacity(&self) -> u64 {
        self.header.spec.capacity
    }

    fn status(&self) -> Result<MediumStatus> {
        let s = &self.state;
        let spec = &self.header.spec;
        let remaining = s.end - s.next;
        Ok(MediumStatus {
            id: spec.id,
            owner: spec.owner.clone(),
            capacity: spec.capacity,
            charged: s.end,
            used: s.next,
            remaining,
            free: spec.capacity - remaining,
            charges: self.records.iter().map(Record::entry).collect(),
        })
    }

    fn charge(&mut self, keys: &[Key256], record: ChargeRecord) -> Result<ChargeEntry> {
        let plan = plan_charge(&self.header, &self.state, &self.records, keys.len(), record)?;
        self.write_state(&plan.begin)?;
        if plan.drops_oldest {
            self.records.remove(0);
        }
        let id = self.header.spec.id;
        let first = plan.record.first;
        let mut sealed = Vec::with_capacity(keys.len() * SLOT_LEN);
        for (index, key) in (first..).zip(keys) {
            sealed.extend_from_slice(&seal_slot(&self.keys, &id, plan.begin.epoch, index, key));
        }
        // The slots from `first` to the end of the ring, then from its start.
        let capacity = self.header.spec.capacity;
        let to_ring_end = (capacity - first % capacity).min(keys.len() as u64) as usize;
        let (a, b) = sealed.split_at(to_ring_end * SLOT_LEN);
        let io = MediaError::io;
        self.file
            .write_all_at(a, self.layout.slot_offset(first))
            .map_err(io("writing key slots"))?;
        if !b.is_empty() {
            self.file
                .write_all_at(b, self.layout.slots_offset())
                .map_err(io("writing key slots"))?;
        }
        self.file
            .write_all_at(
                &plan.record.encode(&self.keys, &id),
                self.layout.record_offset(plan.record.number),
            )
            .map_err(io("writing the charge record"))?;
        self.file
            .sync_data()
            .map_err(io("syncing the charged keys"))?;
        self.write_state(&plan.commit)?;
        let entry = plan.record.entry();
        self.records.push(plan.record);
        Ok(entry)
    }

    fn take_next(&mut self) -> Result<(u64, Key256)> {
        let index = self.state.next;
        if index == self.state.end {
            return Err(MediaError::Exhausted);
        }
        let epoch = record_for(&self.records, index)
            .ok_or(MediaError::Inconsistent(
                "an unused key has no charge record",
            ))?
            .epoch;
        let mut slot = [0u8; SLOT_LEN];
        self.file
            .read_exact_at(&mut slot, self.layout.slot_offset(index))
            .map_err(MediaError::io("reading a key slot"))?;
        let key = open_slot(&self.keys, &self.header.spec.id, epoch, index, &slot);
        let mut advanced = self.state.successor()?;
        advanced.next = index + 1;
        // Write-ahead: the counter is durable before the key leaves (or, for a bad
        // slot, before the error does, so the medium moves on).
        self.write_state(&advanced)?;
        self.erase_slot(index)?;
        key.map(|k| (index, k))
    }
}
