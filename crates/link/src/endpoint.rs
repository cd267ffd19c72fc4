//! One end of a link: many blocks in flight over one authenticated channel.
//!
//! The endpoint is sans-IO, as in quinn-proto: frames in through
//! [`Endpoint::handle_frame`], frames out through [`Endpoint::poll_transmit`],
//! finished blocks through [`Endpoint::poll_output`]. It never blocks, reads no
//! clock and gets its randomness from the generator it was built with, so a
//! test can step Alice, Bob and a man in the middle deterministically.
//!
//! Messages queued between two `poll_transmit` calls travel in one frame, so
//! the blocks in flight share each frame and each tag; Cascade's parity
//! rounds travel in provisional frames covered by the next tag (see
//! [`crate::auth`]). Authentication keys are refilled from each distilled
//! block before the key is released: per direction, 16 bytes for every
//! message of that block that forces a tag (all but the parity rounds; an
//! upper bound on its share of the pads) plus 32 bytes of headroom, which
//! also covers the rare tag forced by a long provisional run, so the pools
//! do not shrink while the link produces key. Both ends count the same
//! messages when they are queued or delivered, so they take the same bytes.

use std::collections::{BTreeMap, VecDeque};

use qkdnet_optics::record::{AliceRecord, Detection};
use qkdnet_postproc::bits::BitVec;
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

use crate::LinkError;
use crate::auth::{AuthChannel, Received, Role, may_travel_provisionally};
use crate::block::{AliceBlock, AliceSource, BobBlock, DistilledKey, Outcome, ProtocolConfig};
use crate::msg::Msg;

enum Side {
    Alice {
        blocks: BTreeMap<u64, AliceBlock>,
        record: Option<AliceRecord>,
        offline: BTreeMap<u64, BitVec>,
    },
    Bob {
        blocks: BTreeMap<u64, BobBlock>,
    },
}

/// A finished block as the endpoint reports it.
#[derive(Debug)]
pub enum Event {
    /// Key distilled; the authentication refill has already been taken out.
    Key {
        /// The key handed on.
        key: DistilledKey,
        /// What happened.
        report: crate::block::BlockReport,
        /// Bits of this block's key that went back into the authentication pools.
        auth_refill_bits: u64,
    },
    /// The block ended without key.
    Aborted {
        /// Block number.
        block: u64,
        /// Why.
        reason: String,
        /// What was measured.
        report: crate::block::BlockReport,
    },
}

/// One end of a QKD link's classical protocol.
pub struct Endpoint {
    role: Role,
    cfg: ProtocolConfig,
    auth: AuthChannel,
    rng: Xoshiro256PlusPlus,
    side: Side,
    outbox: VecDeque<Vec<u8>>,
    pending: Vec<Msg>,
    events: VecDeque<Event>,
    /// Messages that force a tag, per block: (sent by Alice, sent by Bob).
    frames: BTreeMap<u64, (u64, u64)>,
    failed: Option<String>,
    /// Alice: the seed of every block's reconciliation structure (see
    /// [`AliceBlock::new`]).
    reconcile_seed: u64,
}

impl Endpoint {
    /// Alice's endpoint. `record` for record mode; offline blocks are added with [`Endpoint::add_offline_block`].
    pub fn alice(
        cfg: ProtocolConfig,
        preshared: &[u8],
        seed: u64,
        record: Option<AliceRecord>,
    ) -> Result<Endpoint, LinkError> {
        Self::new(
            Role::Alice,
            cfg,
            preshared,
            seed,
            Side::Alice {
                blocks: BTreeMap::new(),
                record,
                offline: BTreeMap::new(),
            },
        )
    }

    /// Bob's endpoint.
    pub fn bob(cfg: ProtocolConfig, preshared: &[u8], seed: u64) -> Result<Endpoint, LinkError> {
        Self::new(
            Role::Bob,
            cfg,
            preshared,
            seed,
            Side::Bob {
                blocks: BTreeMap::new(),
            },
        )
    }

    fn new(
        role: Role,
        cfg: ProtocolConfig,
        preshared: &[u8],
        seed: u64,
        side: Side,
    ) -> Result<Endpoint, LinkError> {
        if !(cfg.eps_sec > 0.0 && cfg.eps_sec < 1.0 && cfg.eps_cor > 0.0 && cfg.eps_cor < 1.0) {
            return Err(LinkError::Usage("ε_sec and ε_cor must be in (0, 1)".into()));
        }
        if !(cfg.max_qber > 0.0 && cfg.max_qber < 0.5) {
            return Err(LinkError::Usage(
                "the abort threshold must be a QBER in (0, 0.5)".into(),
            ));
        }
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        Ok(Endpoint {
            role,
            auth: AuthChannel::from_preshared(role, preshared)?,
            cfg,
            reconcile_seed: rng.next_u64(),
            rng,
            side,
            outbox: VecDeque::new(),
            pending: Vec::new(),
            events: VecDeque::new(),
            frames: BTreeMap::new(),
            failed: None,
        })
    }

    /// Alice (offline mode): her sifted bits for `block`, before Bob's Start arrives.
    pub fn add_offline_block(&mut self, block: u64, bits: BitVec) -> Result<(), LinkError> {
        match &mut self.side {
            Side::Alice { offline, .. } => {
                offline.insert(block, bits);
                Ok(())
            }
            Side::Bob { .. } => Err(LinkError::Usage(
                "only Alice adds offline blocks this way".into(),
            )),
        }
    }

    /// Bob (record mode): starts a block from his detections.
    pub fn start_record_block(
        &mut self,
        block: u64,
        dets: Vec<Detection>,
    ) -> Result<(), LinkError> {
        let Side::Bob { blocks } = &mut self.side else {
            return Err(LinkError::Usage("only Bob starts blocks".into()));
        };
        if blocks.contains_key(&block) {
            return Err(LinkError::Usage(format!("block {block} already started")));
        }
        let (b, m) = BobBlock::start_record(block, dets, &mut self.rng);
        blocks.insert(block, b);
        self.send(vec![m])
    }

    /// Bob (offline mode): starts a block from his sifted bits.
    pub fn start_offline_block(&mut self, block: u64, bits: &BitVec) -> Result<(), LinkError> {
        let Side::Bob { blocks } = &mut self.side else {
            return Err(LinkError::Usage("only Bob starts blocks".into()));
        };
        let (b, msgs) = BobBlock::start_offline(block, bits, &self.cfg, &mut self.rng);
        blocks.insert(block, b);
        self.send(msgs)
    }

    /// Blocks still in progress.
    pub fn in_flight(&self) -> usize {
        match &self.side {
            Side::Alice { blocks, .. } => blocks.len(),
            Side::Bob { blocks } => blocks.len(),
        }
    }

    /// Key bits consumed by authentication so far.
    pub fn auth_key_bits_used(&self) -> u64 {
        self.auth.used_bits()
    }

    /// Set once the channel failed (authentication or a malformed frame); nothing more is accepted.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn send(&mut self, msgs: Vec<Msg>) -> Result<(), LinkError> {
        for m in msgs {
            self.count(self.role, &m);
            self.pending.push(m);
        }
        Ok(())
    }

    /// Counts a message sent by `from` against its block if it forces a tag.
    fn count(&mut self, from: Role, m: &Msg) {
        if may_travel_provisionally(m) {
            return;
        }
        let e = self.frames.entry(m.block()).or_default();
        match from {
            Role::Alice => e.0 += 1,
            Role::Bob => e.1 += 1,
        }
    }

    /// Seals everything queued since the last call into one frame.
    fn seal_pending(&mut self) -> Result<(), LinkError> {
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            for chunk in batch.chunks(crate::auth::MAX_BATCH) {
                let (frame, _) = self.auth.seal(chunk)?;
                self.outbox.push_back(frame);
            }
        }
        Ok(())
    }

    /// Handles one frame from the peer. An error means the channel is no longer
    /// trustworthy (bad tag, replay, malformed frame): close the connection.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        if let Some(f) = &self.failed {
            return Err(LinkError::Authentication(format!(
                "channel already failed: {f}"
            )));
        }
        let opened = match self.auth.open(frame) {
            Ok(o) => o,
            Err(e) => {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        for m in opened.msgs {
            self.count(self.role.peer(), m.msg());
            self.dispatch(m)?;
        }
        // A late message for a finished block (or one for a block that was
        // refused at once) left a counter no refill will read.
        let side = &self.side;
        self.frames.retain(|b, _| match side {
            Side::Alice { blocks, .. } => blocks.contains_key(b),
            Side::Bob { blocks } => blocks.contains_key(b),
        });
        Ok(())
    }

    fn dispatch(&mut self, m: Received) -> Result<(), LinkError> {
        let block = m.msg().block();
        let (out, outcome) = match &mut self.side {
            Side::Alice {
                blocks,
                record,
                offline,
            } => {
                let b = blocks
                    .entry(block)
                    .or_insert_with(|| AliceBlock::new(block, self.reconcile_seed));
                let src = match (record.as_ref(), offline.get(&block)) {
                    (_, Some(bits)) => AliceSource::Offline(bits),
                    (Some(r), None) => AliceSource::Record(r),
                    (None, None) => {
                        blocks.remove(&block);
                        self.send(vec![Msg::Abort {
                            block,
                            reason: "Alice has no bits for this block".into(),
                        }])?;
                        return Ok(());
                    }
                };
                b.handle(m, &src, &self.cfg, &mut self.rng)
            }
            Side::Bob { blocks } => match blocks.get_mut(&block) {
                Some(b) => b.handle(m, &self.cfg, &mut self.rng),
                None if matches!(m.msg(), Msg::Abort { .. }) => (vec![], None),
                None => {
                    return Err(LinkError::Protocol(format!(
                        "Alice sent {} for unknown block {block}",
                        m.msg().name()
                    )));
                }
            },
        };
        self.send(out)?;
        if let Some(o) = outcome {
            self.finish(block, o);
        }
        Ok(())
    }

    fn finish(&mut self, block: u64, o: Outcome) {
        match &mut self.side {
            Side::Alice {
                blocks, offline, ..
            } => {
                blocks.remove(&block);
                offline.remove(&block);
            }
            Side::Bob { blocks } => {
                blocks.remove(&block);
            }
        }
        let (ab, ba) = self.frames.remove(&block).unwrap_or_default();
        match o {
            Outcome::Key(mut key, report) => {
                let (na, nb) = (16 * ab as usize + 32, 16 * ba as usize + 32);
                let a = key.take_front(na);
                let b = key.take_front(nb);
                self.auth.refill(&a, &b);
                self.events.push_back(Event::Key {
                    auth_refill_bits: 8 * (a.len() + b.len()) as u64,
                    key,
                    report,
                });
            }
            Outcome::Aborted {
                block,
                reason,
                report,
            } => self.events.push_back(Event::Aborted {
                block,
                reason,
                report,
            }),
        }
    }

    /// The next frame to send to the peer: everything queued so far, in one
    /// authenticated batch. An error means the authentication pool ran dry.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.outbox.is_empty() {
            if let Err(e) = self.seal_pending() {
                self.failed = Some(e.to_string());
                return None;
            }
        }
        self.outbox.pop_front()
    }

    /// The next finished block.
    pub fn poll_output(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}
