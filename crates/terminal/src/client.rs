//! The two clients of the key service: a terminal spending its medium's keys
//! for session keys, and a charging point filling a medium with keys from the
//! QKD network.

use std::time::Duration;

use qkdnet_etsi::client::EtsiClient;
use qkdnet_media::proto::{AuthRequest, RefuseReason};
use qkdnet_media::proto::{
    Challenge, ChargeOffer, ChargeTerms, GrantExpect, Identity, MAX_CHARGE_KEYS, Message, Request,
    SESSION_ID_LEN, SessionKey, open_grant,
};
use qkdnet_media::{ChargeRecord, Key256, MediaError, Medium};
use tokio::net::TcpStream;

use crate::error::{Result, TerminalError};
use crate::wire::{read_message, write_messages};

/// A connection to the key service, with the challenge it last sent.
#[derive(Debug)]
pub struct Connection {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    stream: tokio::net::tcp::OwnedWriteHalf,
    challenge: Challenge,
    timeout: Duration,
}

impl Connection {
    /// Connects to the service at `addr` (`host:port`) and reads its challenge.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Self> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                TerminalError::Net(format!(
                    "{addr}: no connection within {} s",
                    timeout.as_secs()
                ))
            })?
            .map_err(|e| TerminalError::Net(format!("{addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (reader, stream) = stream.into_split();
        let mut c = Self {
            reader: tokio::io::BufReader::new(reader),
            stream,
            challenge: Challenge { challenge: [0; 32] },
            timeout,
        };
        c.challenge = match c.read().await? {
            Message::Challenge(ch) => ch,
            other => return Err(unexpected(&other)),
        };
        Ok(c)
    }

    async fn read(&mut self) -> Result<Message> {
        read_message(&mut self.reader, self.timeout)
            .await?
            .ok_or_else(|| TerminalError::Net("the key service closed the connection".into()))
    }

    /// Sends `msg` and returns the answer, keeping the next challenge.
    async fn exchange(&mut self, msg: Message) -> Result<Message> {
        write_messages(&mut self.stream, &[msg]).await?;
        let answer = self.read().await?;
        if let Message::Refused(RefuseReason::Malformed) = answer {
            return Err(TerminalError::Refused(RefuseReason::Malformed));
        }
        self.challenge = match self.read().await? {
            Message::Challenge(ch) => ch,
            other => return Err(unexpected(&other)),
        };
        Ok(answer)
    }

    /// The challenge the next request must answer.
    pub fn challenge(&self) -> &Challenge {
        &self.challenge
    }

    /// Sends a signed request and returns the answer (grant or refusal).
    pub async fn request(&mut self, req: AuthRequest) -> Result<Message> {
        self.exchange(Message::AuthRequest(req)).await
    }
}

fn unexpected(m: &Message) -> TerminalError {
    let what = match m {
        Message::Challenge(_) => "a challenge",
        Message::AuthRequest(_) => "a request",
        Message::SessionKeyGrant(_) => "a grant",
        Message::Refused(_) => "a refusal",
        Message::ChargeOffer(_) => "a charge offer",
        Message::ChargeAck(_) => "a charge acknowledgement",
        _ => "an unknown message",
    };
    TerminalError::Net(format!("the key service sent {what} out of turn"))
}

/// Takes two consecutive keys from the medium (the request's tag key and its
/// wrap key). A medium that passed over a bad slot gives a gap; the lone key
/// before it is abandoned and the pair taken again.
fn take_pair(medium: &mut (dyn Medium + Send)) -> Result<(u64, Key256, Key256)> {
    let exhausted = || TerminalError::Refused(RefuseReason::Exhausted);
    let status = medium.status()?;
    if status.remaining < 2 {
        return Err(exhausted());
    }
    let (mut i, mut ki) = medium.take_next().map_err(map_exhausted)?;
    loop {
        let (j, kj) = medium.take_next().map_err(map_exhausted)?;
        if j == i + 1 {
            return Ok((i, ki, kj));
        }
        (i, ki) = (j, kj);
    }
}

fn map_exhausted(e: MediaError) -> TerminalError {
    match e {
        MediaError::Exhausted => TerminalError::Refused(RefuseReason::Exhausted),
        e => TerminalError::Medium(e),
    }
}

/// A terminal: a medium and its owner's identity.
pub struct Terminal<'m> {
    medium: &'m mut (dyn Medium + Send),
    identity: Identity,
}

impl core::fmt::Debug for Terminal<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Terminal")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl<'m> Terminal<'m> {
    /// The terminal of `medium`, whose owner is the subscriber's identity.
    pub fn new(medium: &'m mut (dyn Medium + Send)) -> Result<Self> {
        let identity = Identity::new(medium.owner().to_owned()).map_err(|e| {
            TerminalError::Config(format!("the medium's owner is not an identity: {e}"))
        })?;
        Ok(Self { medium, identity })
    }

    /// Opens session `session_id` with `peer`: the session key, wrapped for this
    /// terminal. The peer joins with [`Terminal::join`].
    pub async fn open(
        &mut self,
        conn: &mut Connection,
        peer: &Identity,
        session_id: [u8; SESSION_ID_LEN],
    ) -> Result<SessionKey> {
        self.ask(
            conn,
            Request::SessionKey {
                session_id,
                peer: peer.clone(),
            },
        )
        .await
    }

    /// Joins session `session_id` that a peer opened naming this terminal.
    pub async fn join(
        &mut self,
        conn: &mut Connection,
        session_id: [u8; SESSION_ID_LEN],
    ) -> Result<SessionKey> {
        self.ask(conn, Request::JoinSession { session_id }).await
    }

    async fn ask(&mut self, conn: &mut Connection, request: Request) -> Result<SessionKey> {
        let session_id = request.session_id();
        // Both keys are gone from the medium before anything is sent.
        let (i, auth_key, wrap_key) = take_pair(self.medium)?;
        let req = AuthRequest::sign(self.medium.id(), i, &auth_key, conn.challenge(), request);
        match conn.request(req).await? {
            Message::SessionKeyGrant(g) => Ok(open_grant(
                &g,
                &GrantExpect {
                    medium_id: self.medium.id(),
                    me: &self.identity,
                    session_id,
                },
                i + 1,
                &wrap_key,
            )?),
            Message::Refused(r) => Err(TerminalError::Refused(r)),
            other => Err(unexpected(&other)),
        }
    }
}

/// What a charge did.
#[derive(Clone, Debug, PartialEq)]
pub struct ChargeReport {
    /// Keys written into the medium.
    pub charged: u64,
    /// The medium's charged count before.
    pub first_index: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// A charging point: an SAE of the QKD network with a connection to the key
/// service.
#[derive(Debug)]
pub struct Charger<'a> {
    /// The charger's SAE client to its KME.
    pub kme: &'a EtsiClient,
    /// The charger's SAE ID.
    pub charger_sae: &'a str,
    /// The key service's SAE ID (the slave of the charger's enc_keys).
    pub service_sae: &'a str,
    /// Keys per offer (1..=[`MAX_CHARGE_KEYS`]).
    pub batch: usize,
    /// Longest time to wait for the QKD network to have key for the service
    /// (charging runs as fast as the link supplies key) before giving up.
    pub max_wait: Duration,
}

impl Charger<'_> {
    /// `want` keys plus the authentication key; when the KME cannot supply that
    /// many yet (503), as many as it holds for the service (at least two), or
    /// waits for key (up to `max_wait`): charging runs at the link's key rate.
    async fn next_keys(&self, want: u64) -> Result<Vec<qkdnet_etsi::client::Key>> {
        use qkdnet_etsi::client::ClientError;
        let start = std::time::Instant::now();
        let kme = |e: ClientError| TerminalError::Kme(e.to_string());
        let mut ask = want;
        loop {
            match self
                .kme
                .enc_keys(self.service_sae, ask + 1, Some(256))
                .await
            {
                Ok(keys) => return Ok(keys),
                Err(ClientError::Api { status: 503, .. }) => {}
                Err(e) => return Err(kme(e)),
            }
            let held = self
                .kme
                .status(self.service_sae)
                .await
                .map_err(kme)?
                .stored_key_count;
            if held >= 2 && held - 1 < ask {
                ask = want.min(held - 1);
                continue;
            }
            if start.elapsed() >= self.max_wait {
                return Err(TerminalError::Kme(format!(
                    "the KME had no key for {} for {} s (is the link up?)",
                    self.service_sae,
                    self.max_wait.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            ask = want;
        }
    }

    /// Charges `count` keys into `medium`: for each batch, keys from the KME
    /// (shared with the key service), an authenticated offer to the service,
    /// its acknowledgement (the service stored them), then the medium. `progress`
    /// is told the keys charged so far.
    pub async fn charge(
        &self,
        conn: &mut Connection,
        medium: &mut (dyn Medium + Send),
        count: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<ChargeReport> {
        let start = std::time::Instant::now();
        let status = medium.status()?;
        if status.free < count {
            return Err(TerminalError::Medium(MediaError::CapacityExceeded {
                requested: count,
                free: status.free,
            }));
        }
        let owner = Identity::new(medium.owner().to_owned()).map_err(|e| {
            TerminalError::Config(format!("the medium's owner is not an identity: {e}"))
        })?;
        let batch = self.batch.clamp(1, MAX_CHARGE_KEYS) as u64;
        let mut done = 0u64;
        while done < count {
            let keys = self.next_keys(batch.min(count - done)).await?;
            let n = keys.len() as u64 - 1;
            let mut ids = Vec::with_capacity(keys.len());
            let mut material = Vec::with_capacity(keys.len());
            for k in &keys {
                ids.push(k.id);
                material.push(Key256::from_slice(&k.material).map_err(|_| {
                    TerminalError::Kme("the KME gave a key that is not 256 bits".into())
                })?);
            }
            let auth_key = material.remove(0);
            let auth_key_id = ids.remove(0);
            let first_index = medium.status()?.charged;
            let challenge = *conn.challenge();
            let offer = ChargeOffer::sign(
                ChargeTerms {
                    medium_id: medium.id(),
                    owner: owner.clone(),
                    charger: self.charger_sae.to_owned(),
                    first_index,
                    auth_key_id,
                    key_ids: ids,
                },
                &challenge,
                &auth_key,
            )?;
            match conn.exchange(Message::ChargeOffer(offer.clone())).await? {
                Message::ChargeAck(ack) => ack.verify(&offer, &challenge, &auth_key)?,
                Message::Refused(r) => return Err(TerminalError::Refused(r)),
                other => return Err(unexpected(&other)),
            }
            let record = ChargeRecord::new(self.charger_sae, unix_now())?;
            medium.charge(&material, record)?;
            done += n;
            progress(done);
        }
        Ok(ChargeReport {
            charged: done,
            first_index: status.charged,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
