//! KME-to-KME protocol, modelled on ETSI GS QKD 020 `ext_keys` with ack and void.
//!
//! When a master SAE takes keys at KME A, A must be sure that KME B will hand the
//! very same keys to the named slave SAE, and to nobody else, before A releases
//! them. So A reserves the units in its store, sends B the reservation (request ID,
//! SAE pair, and for each key its ID, size and unit list), and releases the keys
//! only when B answers `ack` — which B does only after committing the reservation
//! to its own store. Every message is idempotent by request ID: a retried
//! reservation is acked again, a void is answered with the same outcome, and a
//! reservation arriving after its void is refused (B keeps a tombstone). If A
//! cannot get an answer it voids the request, in the background and after restarts,
//! until B answers; only then do the units return to A's pool.
//!
//! Endpoints (mutual TLS; the caller must present a `kme:ID` certificate of a
//! configured peer):
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | `/api/v1/kme/ext_keys` | [`ExtKeysReserve`] | 200 [`ExtKeysAck`]; 409 with the unavailable unit IDs; 400; 401 |
//! | POST | `/api/v1/kme/ext_keys/void` | [`ExtKeysVoid`] | 200 [`ExtKeysVoidReply`] |

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api_error::PeerErrorBody;
use crate::error::KmsError;
use crate::ids::KmeId;
use crate::kme_wire::{
    EXT_KEYS_PATH, EXT_KEYS_VOID_PATH, ExtKeysAck, ExtKeysReserve, ExtKeysVoid, ExtKeysVoidReply,
    RELAY_PATH, RELAY_VOID_PATH, RelayAck, RelayForward, RelayVoid,
};
use crate::tls::{KeyExchange, TlsMaterial, client_config};
use qkdnet_etsi::https::HttpsClient;

/// Largest peer answer read, in bytes.
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// How a call to a peer failed.
#[derive(Debug)]
pub enum PeerCallError {
    /// No answer (connection, TLS, timeout, 5xx): the outcome is unknown.
    Unavailable(String),
    /// A key relay failed on a link of its route (the answer named the link).
    Relay {
        /// The peer's message.
        message: String,
        /// (from, to) of the link that failed.
        failed_link: (KmeId, KmeId),
    },
    /// A definitive refusal (4xx), with the units the peer lacks if it said so.
    Rejected {
        /// HTTP status.
        status: StatusCode,
        /// The peer's message.
        message: String,
        /// Units the peer does not hold as available.
        unavailable_units: Vec<Uuid>,
    },
}

impl From<PeerCallError> for KmsError {
    fn from(e: PeerCallError) -> Self {
        match e {
            PeerCallError::Unavailable(m) => KmsError::PeerUnavailable(m),
            PeerCallError::Rejected {
                status, message, ..
            } => KmsError::PeerRejected(format!("{status}: {message}")),
            PeerCallError::Relay {
                message,
                failed_link,
            } => KmsError::RelayFailed {
                link: failed_link,
                reason: message,
            },
        }
    }
}

/// An HTTPS client to one peer KME (connection pooling, mutual TLS, the peer must
/// prove its `kme:ID`).
#[derive(Clone)]
pub struct PeerClient {
    peer: KmeId,
    http: HttpsClient,
}

impl PeerClient {
    /// A client for `peer` at `base_url` (`https://host:port`).
    pub fn new(
        peer: KmeId,
        base_url: &str,
        tls: &TlsMaterial,
        timeout: Duration,
    ) -> Result<Self, KmsError> {
        let cfg = client_config(tls, peer.clone(), KeyExchange::HybridOnly)?;
        let http = HttpsClient::new(
            &format!("peer {peer}"),
            base_url,
            cfg,
            timeout,
            MAX_ANSWER_BYTES,
        )?;
        Ok(Self { peer, http })
    }

    /// The peer's ID.
    pub fn peer(&self) -> &KmeId {
        &self.peer
    }

    async fn post<T: Serialize, R: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, PeerCallError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| PeerCallError::Unavailable(format!("encode: {e}")))?;
        self.call(Method::POST, path, Some(bytes)).await
    }

    pub(crate) async fn get<R: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
    ) -> Result<R, PeerCallError> {
        self.call(Method::GET, path, None).await
    }

    async fn call<R: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<R, PeerCallError> {
        let (status, body) = self
            .http
            .call(method, path, body)
            .await
            .map_err(|e| PeerCallError::Unavailable(e.0))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| PeerCallError::Unavailable(format!("malformed answer: {e}")));
        }
        let parsed = serde_json::from_slice::<PeerErrorBody>(&body).ok();
        match parsed {
            Some(PeerErrorBody {
                message,
                failed_link: Some([from, to]),
                ..
            }) => Err(PeerCallError::Relay {
                message,
                failed_link: (from, to),
            }),
            parsed if status.is_client_error() => {
                let (message, unavailable_units) = match parsed {
                    Some(b) => (b.message, b.unavailable_unit_IDs),
                    None => ("(no JSON error body)".to_owned(), Vec::new()),
                };
                Err(PeerCallError::Rejected {
                    status,
                    message,
                    unavailable_units,
                })
            }
            _ => Err(PeerCallError::Unavailable(format!(
                "peer answered {status}"
            ))),
        }
    }

    /// Sends a reservation; `Ok` once the peer acknowledged it.
    pub async fn reserve(&self, msg: &ExtKeysReserve) -> Result<(), PeerCallError> {
        let ack: ExtKeysAck = self.post(EXT_KEYS_PATH, msg).await?;
        if ack.request_ID == msg.request_ID && ack.status == "ack" {
            Ok(())
        } else {
            Err(PeerCallError::Unavailable(
                "acknowledgement for another request".into(),
            ))
        }
    }

    /// Sends a relay hop; `Ok` once the rest of the route acknowledged it.
    pub async fn relay(&self, msg: &RelayForward) -> Result<(), PeerCallError> {
        let ack: RelayAck = self.post(RELAY_PATH, msg).await?;
        if ack.request_ID == msg.request_ID && ack.status == "ack" {
            Ok(())
        } else {
            Err(PeerCallError::Unavailable(
                "acknowledgement for another request".into(),
            ))
        }
    }

    /// Voids a relay hop (the peer passes the void on along the route).
    pub async fn relay_void(&self, msg: &RelayVoid) -> Result<ExtKeysVoidReply, PeerCallError> {
        let r: ExtKeysVoidReply = self.post(RELAY_VOID_PATH, msg).await?;
        if r.request_ID == msg.request_ID {
            Ok(r)
        } else {
            Err(PeerCallError::Unavailable(
                "void reply for another request".into(),
            ))
        }
    }

    /// Voids a reservation.
    pub async fn void(&self, request_id: Uuid) -> Result<ExtKeysVoidReply, PeerCallError> {
        let r: ExtKeysVoidReply = self
            .post(
                EXT_KEYS_VOID_PATH,
                &ExtKeysVoid {
                    request_ID: request_id,
                },
            )
            .await?;
        if r.request_ID == request_id {
            Ok(r)
        } else {
            Err(PeerCallError::Unavailable(
                "void reply for another request".into(),
            ))
        }
    }
}
