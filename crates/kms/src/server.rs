//! The HTTPS server: ETSI GS QKD 014 routes, the KME-to-KME routes, the OpenAPI
//! document, and mutual-TLS connection handling.
//!
//! Identity is a property of the *connection*, established once by the TLS
//! handshake, so the accept loop verifies the client certificate (rustls), reads
//! the `sae:`/`kme:` identity from it, and attaches it to every request of that
//! connection as an [`Identity`] extension; handlers never look at headers for
//! identity. A connection without a valid client certificate never gets past the
//! handshake, and one whose certificate names no identity is closed. Handlers read
//! bodies themselves with a size limit and decode them with the pure decoders of
//! [`crate::etsi`], so every failure — including a too-large or malformed body, an
//! unknown route or a wrong method — is answered with the JSON error object.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/v1/keys/{slave_SAE_ID}/status` | ETSI 014 Get status |
//! | GET, POST | `/api/v1/keys/{slave_SAE_ID}/enc_keys` | ETSI 014 Get key |
//! | GET, POST | `/api/v1/keys/{master_SAE_ID}/dec_keys` | ETSI 014 Get key with key IDs |
//! | GET | `/api/v1/openapi.json` | OpenAPI 3.1 document of the ETSI API, generated from this code |
//! | POST | `/api/v1/kme/ext_keys`, `/api/v1/kme/ext_keys/void` | KME-to-KME ([`crate::peer`]) |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use utoipa::OpenApi;

use crate::api_error::{ApiError, json_error};
use crate::error::KmsError;
use crate::etsi::{
    self, ErrorBody, KeyContainer, KeyEntry, KeyIdEntry, KeyIds, KeyRequest, Status,
    parse_dec_query, parse_enc_query, validate_ids,
};
use crate::identity::{Identity, identity_from_cert};
use crate::peer::{EXT_KEYS_PATH, EXT_KEYS_VOID_PATH, ExtKeysAck, ExtKeysReserve, ExtKeysVoid};
use crate::relay::{LSDB_PATH, RELAY_PATH, RELAY_VOID_PATH, RelayAck, RelayForward, RelayVoid};
use crate::service::Kme;

/// Path of the OpenAPI document.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// Longest time a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    kme: Arc<Kme>,
}

type Caller = Extension<Identity>;

fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|_| ApiError(KmsError::BadRequest("invalid path parameter".into())))
}

async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError(KmsError::BadRequest(
                "Content-Type shall be application/json".into(),
            )));
        }
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError(KmsError::BadRequest(format!(
            "request body unreadable or larger than {limit} bytes"
        )))
    })
}

/// Reads a KME-to-KME JSON body of at most `limit` bytes; a malformed one is a
/// 400 naming `what`.
async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError(KmsError::BadRequest(format!("malformed {what}: {e}"))))
}

fn ok_json<T: serde::Serialize>(v: &T) -> Response {
    (StatusCode::OK, Json(v)).into_response()
}

/// Get status of keys available to the calling master SAE for `slave_SAE_ID`.
#[utoipa::path(get, path = "/api/v1/keys/{slave_SAE_ID}/status",
    params(("slave_SAE_ID" = String, Path, description = "SAE ID of the slave SAE")),
    responses((status = 200, body = Status), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn status(
    State(s): State<AppState>,
    Extension(who): Caller,
    p: Result<Path<String>, PathRejection>,
) -> Response {
    let r = async {
        let slave = path_id(p)?;
        Ok::<_, ApiError>(ok_json(&s.kme.status(&who, &slave).await?))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn enc_keys(
    s: &AppState,
    who: &Identity,
    slave: String,
    req: KeyRequest,
) -> Result<Response, ApiError> {
    let valid = req.validate(s.kme.limits())?;
    // Run the reservation to its end in its own task: hyper drops a handler's future
    // when the client disconnects, and a reservation abandoned between "reserved"
    // and "acknowledged by the peer" would stay pending until the next restart.
    let (kme, who) = (s.kme.clone(), who.clone());
    let keys = tokio::spawn(async move { kme.enc_keys(&who, &slave, valid).await })
        .await
        .map_err(|_| ApiError(KmsError::PeerUnavailable("enc_keys task failed".into())))??;
    Ok(ok_json(&keys))
}

/// Get key: `number` keys of `size` bits for the calling master SAE and `slave_SAE_ID` (query form).
#[utoipa::path(get, path = "/api/v1/keys/{slave_SAE_ID}/enc_keys",
    params(("slave_SAE_ID" = String, Path, description = "SAE ID of the slave SAE"),
           ("number" = Option<u64>, Query, description = "number of keys (default 1)"),
           ("size" = Option<u64>, Query, description = "key size in bits (default key_size)")),
    responses((status = 200, body = KeyContainer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn enc_keys_get(
    State(s): State<AppState>,
    Extension(who): Caller,
    p: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let slave = path_id(p)?;
        let req = parse_enc_query(q.as_deref())?;
        enc_keys(&s, &who, slave, req).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// Get key (JSON key request form).
#[utoipa::path(post, path = "/api/v1/keys/{slave_SAE_ID}/enc_keys",
    params(("slave_SAE_ID" = String, Path, description = "SAE ID of the slave SAE")),
    request_body = KeyRequest,
    responses((status = 200, body = KeyContainer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn enc_keys_post(
    State(s): State<AppState>,
    Extension(who): Caller,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let slave = path_id(p)?;
        let bytes = read_body(&headers, body, s.kme.limits().max_body_bytes).await?;
        let req = etsi::decode_key_request(&bytes)?;
        enc_keys(&s, &who, slave, req).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// Get key with key ID (query form, a single key).
#[utoipa::path(get, path = "/api/v1/keys/{master_SAE_ID}/dec_keys",
    params(("master_SAE_ID" = String, Path, description = "SAE ID of the master SAE"),
           ("key_ID" = String, Query, description = "the key ID (UUID)")),
    responses((status = 200, body = KeyContainer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn dec_keys_get(
    State(s): State<AppState>,
    Extension(who): Caller,
    p: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let master = path_id(p)?;
        let id = parse_dec_query(q.as_deref())?;
        let ids = validate_ids(std::iter::once(id.as_str()), 1, s.kme.limits())?;
        Ok::<_, ApiError>(ok_json(&s.kme.dec_keys(&who, &master, ids).await?))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// Get key with key IDs (JSON form).
#[utoipa::path(post, path = "/api/v1/keys/{master_SAE_ID}/dec_keys",
    params(("master_SAE_ID" = String, Path, description = "SAE ID of the master SAE")),
    request_body = KeyIds,
    responses((status = 200, body = KeyContainer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn dec_keys_post(
    State(s): State<AppState>,
    Extension(who): Caller,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let master = path_id(p)?;
        let bytes = read_body(&headers, body, s.kme.limits().max_body_bytes).await?;
        let ids = etsi::decode_key_ids(&bytes)?.validate(s.kme.limits())?;
        Ok::<_, ApiError>(ok_json(&s.kme.dec_keys(&who, &master, ids).await?))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// Largest KME-to-KME request body: a full reservation of maximum-size keys.
fn peer_body_limit(kme: &Kme) -> usize {
    let l = kme.limits();
    let units = crate::block::units_for_bits(l.max_key_size) as usize;
    (l.max_key_per_request as usize)
        .saturating_mul(64 + units * 40)
        .saturating_add(4096)
}

async fn ext_keys(
    State(s): State<AppState>,
    Extension(who): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let msg: ExtKeysReserve =
            read_json(&headers, body, peer_body_limit(&s.kme), "reservation").await?;
        let request_id = msg.request_ID;
        s.kme.peer_reserve(&who, msg).await?;
        Ok::<_, ApiError>(ok_json(&ExtKeysAck {
            request_ID: request_id,
            status: "ack".into(),
        }))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn ext_keys_void(
    State(s): State<AppState>,
    Extension(who): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let msg: ExtKeysVoid = read_json(&headers, body, 4096, "void").await?;
        Ok::<_, ApiError>(ok_json(&s.kme.peer_void(&who, msg.request_ID).await?))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// Largest relay body: per key two layouts and a base64 ciphertext, route of
/// at most MAX_ROUTE_LEN IDs.
fn relay_body_limit(kme: &Kme) -> usize {
    let l = kme.limits();
    let units = crate::block::units_for_bits(l.max_key_size) as usize;
    (l.max_key_per_request as usize)
        .saturating_mul(256 + units * 80 + (l.max_key_size as usize / 8) * 4 / 3)
        .saturating_add(crate::relay::MAX_ROUTE_LEN * 70 + 4096)
}

async fn relay(
    State(s): State<AppState>,
    Extension(who): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let msg: RelayForward =
            read_json(&headers, body, relay_body_limit(&s.kme), "relay").await?;
        let request_id = msg.request_ID;
        // Run to the end even if the caller goes away (as for enc_keys): a hop
        // abandoned halfway would leave its reservation pending until a restart.
        let kme = s.kme.clone();
        tokio::spawn(async move { kme.peer_relay(&who, msg).await })
            .await
            .map_err(|_| ApiError(KmsError::PeerUnavailable("relay task failed".into())))??;
        Ok::<_, ApiError>(ok_json(&RelayAck {
            request_ID: request_id,
            status: "ack".into(),
        }))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn relay_void(
    State(s): State<AppState>,
    Extension(who): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let limit = crate::relay::MAX_ROUTE_LEN * 70 + 4096;
        let msg: RelayVoid = read_json(&headers, body, limit, "relay void").await?;
        Ok::<_, ApiError>(ok_json(&s.kme.peer_relay_void(&who, msg).await?))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn link_state(State(s): State<AppState>, Extension(who): Caller) -> Response {
    match s.kme.link_state(&who).await {
        Ok(v) => ok_json(&v),
        Err(e) => ApiError(e).into_response(),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "qkdnet KME: ETSI GS QKD 014 V1.1.1 key delivery API",
        version = "1.1.1",
        description = "Mutual TLS; the caller's SAE ID is the `sae:ID` URI SAN of its client certificate. Errors: 400, 401, 503 with {\"message\": ...}."
    ),
    paths(status, enc_keys_get, enc_keys_post, dec_keys_get, dec_keys_post),
    components(schemas(
        Status,
        KeyRequest,
        KeyContainer,
        KeyEntry,
        KeyIds,
        KeyIdEntry,
        ErrorBody
    ))
)]
struct ApiDoc;

/// The OpenAPI document of the ETSI API, as JSON text.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such resource")
}

async fn bad_method() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this resource",
    )
}

/// The router (without TLS). Requests must carry an [`Identity`] extension.
pub fn router(kme: Arc<Kme>) -> Router {
    Router::new()
        .route("/api/v1/keys/{slave}/status", get(status))
        .route(
            "/api/v1/keys/{slave}/enc_keys",
            get(enc_keys_get).post(enc_keys_post),
        )
        .route(
            "/api/v1/keys/{master}/dec_keys",
            get(dec_keys_get).post(dec_keys_post),
        )
        .route(OPENAPI_PATH, get(openapi))
        .route(EXT_KEYS_PATH, post(ext_keys))
        .route(EXT_KEYS_VOID_PATH, post(ext_keys_void))
        .route(RELAY_PATH, post(relay))
        .route(RELAY_VOID_PATH, post(relay_void))
        .route(LSDB_PATH, get(link_state))
        .fallback(not_found)
        .method_not_allowed_fallback(bad_method)
        .with_state(AppState { kme })
}

/// A running HTTPS server. Dropping it (or [`ServerHandle::shutdown`]) stops the
/// accept loop and closes every connection.
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes connections and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Serves `kme` on `listener` with mutual TLS `tls`.
pub fn serve(
    kme: Arc<Kme>,
    tls: Arc<ServerConfig>,
    listener: TcpListener,
) -> Result<ServerHandle, KmsError> {
    let local_addr = listener.local_addr()?;
    let app = router(kme);
    let acceptor = TlsAcceptor::from(tls);
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                r = listener.accept() => {
                    let (tcp, _) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(connection(acceptor.clone(), tcp, app.clone()));
                    while conns.try_join_next().is_some() {}
                }
            }
        }
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    });
    Ok(ServerHandle {
        local_addr,
        stop: Some(stop),
        task: Some(task),
    })
}

async fn connection(acceptor: TlsAcceptor, tcp: tokio::net::TcpStream, app: Router) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let identity = {
        let (_, conn) = tls.get_ref();
        conn.peer_certificates()
            .and_then(|c| c.first())
            .map(|c| identity_from_cert(c))
    };
    let identity = match identity {
        Some(Ok(id)) => id,
        Some(Err(e)) => {
            tracing::info!(error = %e, "client certificate names no SAE or KME; closing");
            return;
        }
        None => return,
    };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(identity.clone());
        app.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
