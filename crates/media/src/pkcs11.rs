//! The PKCS#11 backend: a medium kept in a token (a smart card, a secure
//! element, an HSM, or SoftHSM2 for tests), the I/O around [`crate::token`].
//!
//! PKCS#11 is the standard interface of secure elements, so a medium behind it
//! can move from SoftHSM2 to hardware without a line of this crate changing.
//! This module decides nothing about the objects; it lists, reads, creates and
//! destroys what [`crate::token`] describes, in the order that makes a crash
//! harmless.
//!
//! # What the token holds, and why as data objects
//!
//! Every object is a private token object (`CKO_DATA`, `CKA_TOKEN`,
//! `CKA_PRIVATE`): the token shows and hands it only to a session logged in
//! with the user PIN. Keys are packed 1,024 to a *key group* object, 32 bytes
//! each in its `CKA_VALUE`; the counter, the charges and the medium's identity
//! are the labels of small objects ([`crate::token`] has the layout and the
//! measurements that ruled out one object per key).
//!
//! Keys could instead be secret-key objects (`CKO_SECRET_KEY`,
//! `CKK_GENERIC_SECRET`). A *sensitive* secret key is what a token protects
//! best, but its value can never be read (`CKR_ATTRIBUTE_SENSITIVE`), and the
//! terminal needs the bytes: it computes HMAC-SM3 and SM4-GCM with each key,
//! which few tokens implement. A secret key made readable (not sensitive,
//! extractable) is protected no better than a private data object, costs one
//! object per key, and misstates what it is. So the keys are data, and the
//! token's part is to keep them behind the PIN, to destroy a used key before
//! it is handed out, and to hold the counter.
//!
//! **What SoftHSM2 protects, and what it does not.** SoftHSM2 is a library in
//! the terminal's process that keeps each object in a file. It encrypts every
//! byte-string attribute of a private object (value, label, application) with
//! AES-256 under the token key, which is wrapped under a key derived from the
//! user PIN (an iterated salted hash, about 1,500 SHA-256 rounds): a copy of
//! the token directory shows neither keys nor labels without the PIN, but a
//! short PIN can be guessed offline. It does not protect integrity (no MAC; a
//! writer of the directory can corrupt or delete objects), nor against
//! rollback (a copy of the directory restored over it brings used keys back,
//! as for the file medium), nor against anyone who can read the process's
//! memory (the token key and the keys taken are there), and it does not
//! `fsync`: its writes survive a killed process, not a power failure. A
//! hardware token keeps the objects and the counter in its own non-volatile
//! memory, commits before it answers and cannot be copied back; that is what
//! this backend is for.
//!
//! SoftHSM2's file store has three more limits that show in the tests. It
//! rewrites an object's file in place (truncate, then write), so a process
//! killed in that instant leaves an empty file: an invalid object that no
//! PKCS#11 call can list or destroy, left in the token directory for good
//! (harmless here: the medium's state objects come in pairs and a copy of a
//! key group is made before the old one goes; the tests' token collects a
//! few such files per run). It rewrites its token file the same way at each
//! log-in, so a process killed while logging in can break the whole token.
//! And its `fcntl` locks lapse whenever a thread of the process closes any
//! descriptor of the file, so two processes using one token at once can read
//! each other's half-written files; the reader then takes the object (or the
//! token) for invalid until it changes again. The medium survives that (an
//! object it cannot see only makes keys go missing, [`MediaError::KeyMissing`],
//! never come out twice), but one token should be used by one process at a
//! time. The keys themselves must leave any token, to be used:
//! `take_next` returns them in [`Key256`], zeroized on drop, and this module
//! zeroizes the buffers it owns; the `cryptoki` crate's own temporary copies
//! of an attribute value are freed without being zeroized.
//!
//! # Order of operations
//!
//! - **Taking key `i`:** read its group's value, write the counter (`next =
//!   i + 1`) to the state object that does not hold the current state, then
//!   erase: create the group's copy without key `i` and destroy the old group
//!   (or only destroy it, if `i` was its last key), and only then return the
//!   key. SoftHSM2 writes an object's file before `C_SetAttributeValue`
//!   returns. A crash before the counter write leaves the key unused; after it,
//!   the key is gone for good, and opening the medium finishes the erasure.
//! - **Charging:** create the key groups and the charge record, tagged with the
//!   new charge number, then write the state that makes them live. A charge
//!   that fails or is cut short leaves objects that the next charge (or the
//!   next open) destroys; none of their keys is ever handed out.
//! - **Opening:** a search for the token's media and, under the medium's
//!   lock, another for its objects, reading one label per object (no key
//!   bytes); then the repairs of [`crate::token`]'s table, before anything is
//!   handed out.
//!
//! # Log-in, sharing, exclusion
//!
//! The module is loaded from the path given (loading a PKCS#11 module runs its
//! code in the process) and initialised once per process, then kept, so that
//! several media and other users in one process share it. PKCS#11 log-in is
//! per process and token: while any session of the process is logged in, the
//! token accepts the next log-in without checking its PIN. This module keeps,
//! for each token it logged in to, an HMAC-SM3 of the PIN the token accepted
//! (under a key drawn at random for the process) and refuses a different PIN
//! with [`MediaError::PinIncorrect`] in that case; on a token that another
//! part of the process logged in to, with cryptoki directly, no PIN is checked,
//! as the token itself checks none. The PIN is handed to the token in a buffer
//! that is zeroized afterwards and appears in no error.
//!
//! Two handles on one medium would hand out the same key twice, and PKCS#11
//! has no lock. While open, a medium holds an exclusive `flock` on
//! `qkdnet-media-<id>.lock` in the temporary directory (`TMPDIR`), so a second
//! open, in this process or another that shares the directory, fails with
//! [`MediaError::Busy`] after a short wait; the lock dies with the process.
//!
//! # Cost
//!
//! Measured on SoftHSM2 2.6.1 on the project's machine (BENCHMARKS.md has the
//! figures): opening reads a label per object and is quick; charging costs two
//! objects and a label write per charge plus one object per 1,024 keys; taking
//! a key costs a label write, an object created and one destroyed, a few to
//! tens of milliseconds, most of it waiting for the disk as SoftHSM2
//! truncates and rewrites files. A terminal spends a key per call or session,
//! so that is enough; the file medium is the fast one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use qkdnet_crypto::secret::SecretBytes;
use qkdnet_crypto::sm3::HmacSm3;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{MediaError, Result};
use crate::format::MediumSpec;
use crate::medium::{ChargeEntry, ChargeRecord, KEY_LEN, Key256, Medium, MediumStatus};
use crate::token::{APPLICATION, Charge, Group, Header, Label, Role, State, plan_charge, survey};

/// A medium kept in a PKCS#11 token, open in a logged-in session.
pub struct Pkcs11Medium {
    session: Session,
    token: String,
    id: Uuid,
    header: Header,
    state: State,
    /// The object holding `state`, and the other one (written next).
    state_objects: (ObjectHandle, ObjectHandle),
    /// Live key groups in key order; none holds a key below `state.next`.
    groups: Vec<(ObjectHandle, Group)>,
    /// Charges with unused keys, in key order.
    charges: Vec<(ObjectHandle, Charge)>,
    /// Objects to destroy before the next take or charge (an erasure or a
    /// cleanup the token refused the first time).
    stale: Vec<ObjectHandle>,
    lock: (File, PathBuf),
}

impl core::fmt::Debug for Pkcs11Medium {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Pkcs11Medium")
            .field("token", &self.token)
            .field("id", &self.id)
            .field("state", &self.state)
            .field("key_groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

impl Pkcs11Medium {
    /// Creates a new, empty medium described by `spec` in the token labelled
    /// `token_label` of the PKCS#11 module at `module`, logging in with `pin`,
    /// and returns it open. The token may hold other media; one with the same
    /// ID is refused ([`MediaError::MediumExists`]). `spec.kdf` is not used: the
    /// token checks its own PIN.
    pub fn create(
        module: &Path,
        token_label: &str,
        pin: &SecretBytes,
        spec: &MediumSpec,
    ) -> Result<Self> {
        let header = Header::from_spec(spec)?;
        let session = connect(module, token_label, pin)?;
        let id = spec.id;
        let lock = lock_medium(id)?;
        let mut leftovers = Vec::new();
        for (h, label) in objects(&session)? {
            match label.role {
                _ if label.id != id => {}
                Role::Header(_) => return Err(MediaError::MediumExists(id)),
                // Objects of a creation cut short, before its header: nothing live.
                _ => leftovers.push(h),
            }
        }
        for h in leftovers {
            destroy_object(&session, h)?;
        }
        let first = State::default();
        let second = first.successor()?;
        let label = |role| Label { id, role };
        let a = create_object(&session, &label(Role::State(first)), None, true)?;
        let b = create_object(&session, &label(Role::State(second)), None, true)?;
        // The header last: the medium exists once it does.
        create_object(&session, &label(Role::Header(header.clone())), None, false)?;
        Ok(Self {
            session,
            token: token_label.to_owned(),
            id,
            header,
            state: second,
            state_objects: (b, a),
            groups: Vec::new(),
            charges: Vec::new(),
            stale: Vec::new(),
            lock,
        })
    }

    /// Opens medium `medium_id` (or the only medium, if `None`) in the token
    /// labelled `token_label`, logging in with `pin`, and finishes whatever a
    /// crash left half done (see [`crate::token`]). Fails with
    /// [`MediaError::PinIncorrect`] for a PIN the token refuses (nothing is
    /// read or changed), [`MediaError::NoMedium`] or
    /// [`MediaError::SeveralMedia`] if the medium is not identified, and
    /// [`MediaError::Busy`] if the medium is open elsewhere.
    pub fn open(
        module: &Path,
        token_label: &str,
        pin: &SecretBytes,
        medium_id: Option<Uuid>,
    ) -> Result<Self> {
        let session = connect(module, token_label, pin)?;
        // The media on the token (before the lock, so that no lock file is
        // made for a medium that is not there).
        let mut ids: Vec<Uuid> = objects(&session)?
            .into_iter()
            .filter(|(_, l)| matches!(l.role, Role::Header(_)))
            .map(|(_, l)| l.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let id = match (medium_id, &ids[..]) {
            (Some(id), _) if ids.contains(&id) => id,
            (Some(id), _) => return Err(MediaError::NoMedium { id: Some(id) }),
            (None, []) => return Err(MediaError::NoMedium { id: None }),
            (None, [id]) => *id,
            (None, _) => return Err(MediaError::SeveralMedia { ids }),
        };
        let lock = lock_medium(id)?;
        // Surveyed under the lock: no one else changes the medium from here on.
        let found = survey(id, &objects(&session)?)?;
        let (current, other) = found.state_objects;
        let mut medium = Self {
            session,
            token: token_label.to_owned(),
            id,
            header: found.header.1,
            state: found.state,
            state_objects: (current, other.unwrap_or(current)),
            groups: found.groups,
            charges: found.charges,
            stale: found.destroy,
            lock,
        };
        medium.purge_stale()?;
        if other.is_none() {
            // The other state object was torn by a crash: make a new one,
            // holding the current state as its successor.
            let next = medium.state.successor()?;
            let h = create_object(
                &medium.session,
                &medium.label(Role::State(next)),
                None,
                true,
            )?;
            medium.state_objects = (h, current);
            medium.state = next;
        }
        medium.erase_below(medium.state.next)?;
        Ok(medium)
    }

    /// Destroys the medium: every key group first, then its records, header
    /// and state. Its keys are gone for good. A crash part way leaves a medium
    /// that is missing keys or, past the header, objects that no open sees.
    pub fn destroy(mut self) -> Result<()> {
        self.purge_stale()?;
        let mut mine: Vec<(ObjectHandle, Label)> = objects(&self.session)?
            .into_iter()
            .filter(|(_, l)| l.id == self.id)
            .collect();
        mine.sort_by_key(|(_, l)| match l.role {
            Role::Keys(_) => 0,
            Role::Charge(_) => 1,
            Role::Header(_) => 2,
            Role::State(_) => 3,
        });
        for (h, _) in mine {
            destroy_object(&self.session, h)?;
        }
        // Still held: whoever opens it next finds no medium.
        let _ = std::fs::remove_file(&self.lock.1);
        Ok(())
    }

    /// The label of the token the medium is in.
    pub fn token_label(&self) -> &str {
        &self.token
    }

    fn label(&self, role: Role) -> Label {
        Label { id: self.id, role }
    }

    /// Writes `state` to the state object not holding the current one; only
    /// then is it the state in memory.
    fn write_state(&mut self, state: State) -> Result<()> {
        let label = self.label(Role::State(state)).encode();
        self.session
            .update_attributes(self.state_objects.1, &[Attribute::Label(label)])
            .map_err(ck("writing the medium's counter"))?;
        self.state_objects = (self.state_objects.1, self.state_objects.0);
        self.state = state;
        Ok(())
    }

    /// Destroys the objects a previous step could not.
    fn purge_stale(&mut self) -> Result<()> {
        while let Some(&h) = self.stale.last() {
            destroy_object(&self.session, h)?;
            self.stale.pop();
        }
        Ok(())
    }

    /// Erases every key below `from` from the first key group (the only one
    /// that can hold such keys): destroys the group if nothing is left of it,
    /// else replaces it by a copy holding its keys from `from` on.
    fn erase_below(&mut self, from: u64) -> Result<()> {
        let Some(&(old, group)) = self.groups.first() else {
            return Ok(());
        };
        if group.first >= from {
            return Ok(());
        }
        let rest = match group.from(from) {
            Some(rest) => {
                let value = read_value(&self.session, old)?;
                // A value that does not hold what its label says cannot be
                // trusted with any key: then the whole group goes.
                (value.len() == group.value_len()).then(|| {
                    let start = (rest.first - group.first) as usize * KEY_LEN;
                    (rest, Zeroizing::new(value[start..].to_vec()))
                })
            }
            None => None,
        };
        match rest {
            Some((rest, kept)) => {
                let label = self.label(Role::Keys(rest));
                let h = create_object(&self.session, &label, Some(kept), false)?;
                self.groups[0] = (h, rest);
            }
            None => {
                self.groups.remove(0);
            }
        }
        if let Err(e) = destroy_object(&self.session, old) {
            self.stale.push(old);
            return Err(e);
        }
        Ok(())
    }

    /// Forgets the charges whose keys are all used (destroys their records).
    /// A record the token does not destroy now is destroyed later.
    fn forget_used_charges(&mut self) {
        let used = self
            .charges
            .iter()
            .take_while(|(_, c)| c.end() <= self.state.next)
            .count();
        for (h, _) in self.charges.drain(..used) {
            if destroy_object(&self.session, h).is_err() {
                self.stale.push(h);
            }
        }
    }

    /// Creates the objects of a charge; pushes each handle to `created`.
    fn create_charge(
        &mut self,
        plan: &crate::token::ChargePlan,
        keys: &[Key256],
        created: &mut Vec<ObjectHandle>,
    ) -> Result<()> {
        for g in &plan.groups {
            let from = (g.first - plan.charge.first) as usize;
            let mut value = Zeroizing::new(Vec::with_capacity(g.value_len()));
            for k in &keys[from..from + g.count as usize] {
                value.extend_from_slice(k.expose_secret());
            }
            created.push(create_object(
                &self.session,
                &self.label(Role::Keys(*g)),
                Some(value),
                false,
            )?);
        }
        created.push(create_object(
            &self.session,
            &self.label(Role::Charge(plan.charge.clone())),
            None,
            false,
        )?);
        self.write_state(plan.commit)
    }
}

impl Medium for Pkcs11Medium {
    fn id(&self) -> Uuid {
        self.id
    }

    fn owner(&self) -> &str {
        &self.header.owner
    }

    fn capacity(&self) -> u64 {
        self.header.capacity
    }

    fn status(&self) -> Result<MediumStatus> {
        let s = &self.state;
        let remaining = s.end - s.next;
        Ok(MediumStatus {
            id: self.id,
            owner: self.header.owner.clone(),
            capacity: self.header.capacity,
            charged: s.end,
            used: s.next,
            remaining,
            free: self.header.capacity - remaining,
            charges: self.charges.iter().map(|(_, c)| c.entry()).collect(),
        })
    }

    fn charge(&mut self, keys: &[Key256], record: ChargeRecord) -> Result<ChargeEntry> {
        let plan = plan_charge(
            &self.header,
            &self.state,
            self.charges.len(),
            keys.len(),
            record,
        )?;
        self.purge_stale()?;
        let mut created = Vec::with_capacity(plan.groups.len() + 1);
        if let Err(e) = self.create_charge(&plan, keys, &mut created) {
            // Not live (or, if the state write failed after all, live with its
            // keys missing): either way its objects go.
            self.stale.extend(created);
            let _ = self.purge_stale();
            return Err(e);
        }
        self.groups
            .extend(created.iter().copied().zip(plan.groups.iter().copied()));
        let record = *created
            .last()
            .expect("invariant: the record was created last");
        self.charges.push((record, plan.charge.clone()));
        Ok(plan.charge.entry())
    }

    fn take_next(&mut self) -> Result<(u64, Key256)> {
        self.purge_stale()?;
        let index = self.state.next;
        if index == self.state.end {
            return Err(MediaError::Exhausted);
        }
        let key = match self.groups.first() {
            Some(&(h, g)) if g.key_range(index).is_some() => {
                let value = read_value(&self.session, h)?;
                match g.key_range(index).filter(|_| value.len() == g.value_len()) {
                    Some(r) => Ok(Key256::from_slice(&value[r]).expect("invariant: 32 bytes")),
                    None => Err(MediaError::CorruptSlot { index }),
                }
            }
            _ => Err(MediaError::KeyMissing { index }),
        };
        let mut advanced = self.state.successor()?;
        advanced.next = index + 1;
        // Write-ahead: the counter is durable before the key leaves (or, for a
        // missing or damaged key, before the error does, so the medium moves on),
        // and the key is erased from the token before it leaves.
        self.write_state(advanced)?;
        self.erase_below(index + 1)?;
        self.forget_used_charges();
        key.map(|k| (index, k))
    }
}

/// Wraps a PKCS#11 error with what was being done.
fn ck(op: &'static str) -> impl FnOnce(CkError) -> MediaError {
    move |e| MediaError::Pkcs11 {
        op,
        rv: describe(&e),
    }
}

/// A PKCS#11 error in a few words: the call and its `CKR_…` code.
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("C_{function:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// The process-wide context of the PKCS#11 module at `path`: loaded and
/// initialised on first use, then kept (never finalised) for every user in the
/// process.
fn context(path: &Path) -> Result<Pkcs11> {
    static MODULES: Mutex<Option<HashMap<PathBuf, Pkcs11>>> = Mutex::new(None);
    let mut modules = MODULES.lock().unwrap_or_else(PoisonError::into_inner);
    let modules = modules.get_or_insert_with(HashMap::new);
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    let fail = |reason: String| MediaError::Pkcs11Module {
        module: path.to_owned(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(fail("not a file".into())),
        Err(e) => return Err(fail(e.to_string())),
    }
    let ctx = Pkcs11::new(path).map_err(|e| fail(format!("cannot load it: {}", describe(&e))))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(fail(format!("cannot initialise it: {}", describe(&e)))),
    }
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// The slot whose token carries `label` (exactly one, PIN not locked).
fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot> {
    let fail = |reason: String| MediaError::TokenUnavailable {
        label: label.to_owned(),
        reason,
    };
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| fail(format!("cannot list the tokens: {}", describe(&e))))?;
    let mut found = Vec::new();
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(|e| {
            fail(format!(
                "cannot read a token's information: {}",
                describe(&e)
            ))
        })?;
        if info.label().trim_end_matches([' ', '\0']) == label {
            found.push((slot, info.user_pin_locked()));
        }
    }
    match found[..] {
        [(_, true)] => Err(MediaError::PinLocked),
        [(slot, false)] => Ok(slot),
        [] => Err(fail("no token with this label".into())),
        _ => Err(fail("several tokens carry this label".into())),
    }
}

/// A read-write session with the token, logged in as the user.
fn connect(module: &Path, token: &str, pin: &SecretBytes) -> Result<Session> {
    if pin.is_empty() {
        return Err(MediaError::EmptyPin);
    }
    let ctx = context(module)?;
    let slot = find_token(&ctx, token)?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(ck("opening a session with the token"))?;
    log_in(&session, module, slot, pin)?;
    Ok(session)
}

/// What this process knows about the PINs its tokens accepted.
struct Logins {
    /// Drawn at random once per process.
    key: Zeroizing<[u8; 32]>,
    /// HMAC-SM3 of the PIN each token (module, slot) last accepted.
    accepted: HashMap<(PathBuf, u64), [u8; 32]>,
}

impl Logins {
    fn mac(&self, module: &Path, slot: Slot, pin: &SecretBytes) -> HmacSm3 {
        let mut m = HmacSm3::new(&self.key[..]);
        m.update(module.as_os_str().as_encoded_bytes());
        m.update(&[0]);
        m.update(&slot.id().to_be_bytes());
        m.update(pin.expose_secret());
        m
    }
}

/// Logs the session in; see the [module](self) documentation for a token the
/// process is logged in to already.
fn log_in(session: &Session, module: &Path, slot: Slot, pin: &SecretBytes) -> Result<()> {
    static LOGINS: Mutex<Option<Logins>> = Mutex::new(None);
    // Held across the log-in, so that another thread's log-in and its record
    // cannot come between.
    let mut guard = LOGINS.lock().unwrap_or_else(PoisonError::into_inner);
    let logins = match &mut *guard {
        Some(l) => l,
        None => {
            let mut key = Zeroizing::new([0u8; 32]);
            getrandom::fill(&mut key[..]).map_err(|e| MediaError::Randomness(e.to_string()))?;
            guard.insert(Logins {
                key,
                accepted: HashMap::new(),
            })
        }
    };
    let token = (module.to_owned(), slot.id());
    // The Vec moves into the box as it is; the box zeroizes it when dropped.
    let raw = RawAuthPin::new(Box::new(pin.expose_secret().to_vec()));
    match session.login_with_raw(UserType::User, &raw) {
        Ok(()) => {
            let tag = logins.mac(module, slot, pin).finalize();
            logins.accepted.insert(token, tag);
            Ok(())
        }
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
            match logins.accepted.get(&token) {
                Some(tag) => logins
                    .mac(module, slot, pin)
                    .verify(tag)
                    .map_err(|_| MediaError::PinIncorrect),
                // Logged in by another part of the process, with a PIN the
                // token checked then.
                None => Ok(()),
            }
        }
        Err(CkError::Pkcs11(
            RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
            _,
        )) => Err(MediaError::PinIncorrect),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(MediaError::PinLocked),
        Err(e) => Err(ck("logging in to the token")(e)),
    }
}

/// Takes the exclusive lock of medium `id` (see the [module](self)
/// documentation).
fn lock_medium(id: Uuid) -> Result<(File, PathBuf)> {
    let path = std::env::temp_dir().join(format!("qkdnet-media-{}.lock", id.hyphenated()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(MediaError::io("opening the medium's lock file"))?;
    crate::file::lock(&file)?;
    Ok((file, path))
}

/// Every object of every medium on the token with its decoded label. Objects
/// whose label does not decode are left out (and left alone): they are not
/// this version's to judge.
fn objects(session: &Session) -> Result<Vec<(ObjectHandle, Label)>> {
    let handles = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Application(APPLICATION.to_vec()),
        ])
        .map_err(ck("searching the token for media"))?;
    let mut found = Vec::with_capacity(handles.len());
    for h in handles {
        let attrs = match session.get_attributes(h, &[AttributeType::Label]) {
            Ok(a) => a,
            // Destroyed since the search (by another process).
            Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
            Err(e) => return Err(ck("reading an object's label")(e)),
        };
        let label = attrs.iter().find_map(|a| match a {
            Attribute::Label(bytes) => Label::decode(bytes).ok(),
            _ => None,
        });
        found.extend(label.map(|l| (h, l)));
    }
    Ok(found)
}

/// An object template whose value is zeroized when it is dropped.
struct Template(Vec<Attribute>);

impl Drop for Template {
    fn drop(&mut self) {
        for a in &mut self.0 {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
    }
}

/// Creates a private token data object of this crate with `label` and `value`.
fn create_object(
    session: &Session,
    label: &Label,
    value: Option<Zeroizing<Vec<u8>>>,
    modifiable: bool,
) -> Result<ObjectHandle> {
    let mut template = Template(vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Modifiable(modifiable),
        Attribute::Application(APPLICATION.to_vec()),
        Attribute::Label(label.encode()),
    ]);
    if let Some(mut v) = value {
        // Moves the buffer (no copy) into the template, which zeroizes it.
        template.0.push(Attribute::Value(core::mem::take(&mut *v)));
    }
    session
        .create_object(&template.0)
        .map_err(ck("creating an object in the token"))
}

/// Destroys an object; one that is gone already counts as destroyed.
fn destroy_object(session: &Session, h: ObjectHandle) -> Result<()> {
    match session.destroy_object(h) {
        Ok(()) | Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => Ok(()),
        Err(e) => Err(ck("destroying an object in the token")(e)),
    }
}

/// A key group's value (empty if the token does not give it).
fn read_value(session: &Session, h: ObjectHandle) -> Result<Zeroizing<Vec<u8>>> {
    let attrs = session
        .get_attributes(h, &[AttributeType::Value])
        .map_err(ck("reading a key group"))?;
    let mut value = Zeroizing::new(Vec::new());
    for a in attrs {
        if let Attribute::Value(v) = a {
            *value = v;
        }
    }
    Ok(value)
}
