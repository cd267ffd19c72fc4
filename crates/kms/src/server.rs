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
use crate::kme_wire::{
    EXT_KEYS_PATH, EXT_KEYS_VOID_PATH, ExtKeysAck, ExtKeysReserve, ExtKeysVoid, LSDB_PATH,
    MAX_ROUTE_LEN, RELAY_PATH, RELAY_VOID_PATH, RelayAck, RelayForward, RelayVoid,
};
use crate::service::Kme;

/// Path of the OpenAPI document.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

/// Longest time a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on what clients may hold of a KME: connections and time.
///
/// A client that trickles its request, or simply keeps connections open, must not
/// exhaust the KME for everyone else. Every connection counts against
/// `max_connections` from accept; once its TLS handshake names the caller, also
/// against that caller's `max_connections_per_sae` (SAEs) or
/// `max_connections_per_kme` (peer KMEs, which multiplex relays). A connection
/// over the global limit is closed at once; one over its caller's limit is
/// answered 503 ("too many connections") and closed, so that the client learns
/// why. A request body must arrive whole within
/// `body_timeout_ms` (answered 400 otherwise), request headers within 10 s, and a
/// connection with no traffic for `idle_timeout_ms` is closed (after any request
/// in progress is answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Open connections, all callers together.
    pub max_connections: usize,
    /// Open connections of one SAE.
    pub max_connections_per_sae: usize,
    /// Open connections of one peer KME.
    pub max_connections_per_kme: usize,
    /// Time to receive a whole request body, ms.
    pub body_timeout_ms: u64,
    /// Time without any traffic after which a connection is closed, ms.
    pub idle_timeout_ms: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_sae: 64,
            max_connections_per_kme: 512,
            body_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
        }
    }
}

impl ConnectionLimits {
    /// Checks that every limit is usable.
    pub fn check(&self) -> Result<(), KmsError> {
        if self.max_connections == 0
            || self.max_connections_per_sae == 0
            || self.max_connections_per_kme == 0
            || self.body_timeout_ms == 0
            || self.idle_timeout_ms == 0
        {
            return Err(KmsError::Config(
                "connections: every limit and timeout must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    kme: Arc<Kme>,
    body_timeout: Duration,
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
    timeout: Duration,
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
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(ApiError(KmsError::BadRequest(format!(
            "request body unreadable or larger than {limit} bytes"
        )))),
        Err(_) => Err(ApiError(KmsError::BadRequest(format!(
            "request body not received within {} ms",
            timeout.as_millis()
        )))),
    }
}

/// Reads a KME-to-KME JSON body of at most `limit` bytes; a malformed one is a
/// 400 naming `what`.
async fn read_json<T: serde::de::DeserializeOwned>(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, limit, s.body_timeout).await?;
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
        let bytes = read_body(
            &headers,
            body,
            s.kme.limits().max_body_bytes,
            s.body_timeout,
        )
        .await?;
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
        let bytes = read_body(
            &headers,
            body,
            s.kme.limits().max_body_bytes,
            s.body_timeout,
        )
        .await?;
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
            read_json(&s, &headers, body, peer_body_limit(&s.kme), "reservation").await?;
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
        let msg: ExtKeysVoid = read_json(&s, &headers, body, 4096, "void").await?;
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
        .saturating_add(MAX_ROUTE_LEN * 70 + 4096)
}

async fn relay(
    State(s): State<AppState>,
    Extension(who): Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let msg: RelayForward =
            read_json(&s, &headers, body, relay_body_limit(&s.kme), "relay").await?;
        let request_id = msg.request_ID;
        // Run to the end even if the caller goes away (as for enc_keys): a hop
        // abandoned halfway would leave its reservation pending until a restart.
        let kme = s.kme.clone();
        tokio::spawn(async move { kme.relay().peer_relay(&who, msg).await })
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
        let limit = MAX_ROUTE_LEN * 70 + 4096;
        let msg: RelayVoid = read_json(&s, &headers, body, limit, "relay void").await?;
        Ok::<_, ApiError>(ok_json(&s.kme.relay().peer_relay_void(&who, msg).await?))
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn link_state(State(s): State<AppState>, Extension(who): Caller) -> Response {
    match s.kme.relay().link_state(&who).await {
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

/// The OpenAPI document of the ETSI API for a KME with `limits`, as JSON text.
///
/// utoipa derives the structure from the code; the bounds that depend on the
/// KME's configured limits, and the formats serde cannot express (UUIDs, the ID
/// alphabet, base64), are then written in, so that the document accepts exactly
/// what the server accepts: a schema-driven client (schemathesis, in the test
/// suite) finds no request the document allows and the server refuses, nor the
/// reverse.
pub fn openapi_json(limits: &etsi::Limits) -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    tighten(&mut doc, limits);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".to_owned())
}

/// Writes the limits and formats into the generated document (see
/// [`openapi_json`]).
fn tighten(doc: &mut serde_json::Value, l: &etsi::Limits) {
    use serde_json::json;
    let number = json!({"minimum": 1, "maximum": l.max_key_per_request});
    let size = json!({"minimum": l.min_key_size, "maximum": l.max_key_size, "multipleOf": 8});
    let uuid = json!({"format": "uuid", "minLength": 36, "maxLength": 36});
    let id = json!({"pattern": "^[A-Za-z0-9._-]{1,64}$", "minLength": 1, "maxLength": crate::ids::MAX_ID_LEN});
    // `{"qkdnet_multipath": 1|2}`, the one extension this KME understands.
    let multipath = json!({"type": "integer", "enum": [1, 2]});
    let merge = |v: &mut serde_json::Value, extra: &serde_json::Value| {
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
    };
    let schemas = &mut doc["components"]["schemas"];
    let kr = &mut schemas["KeyRequest"]["properties"];
    merge(&mut kr["number"], &number);
    merge(&mut kr["size"], &size);
    merge(&mut kr["additional_slave_SAE_IDs"], &json!({"maxItems": 0}));
    kr["extension_mandatory"]["items"] = json!({
        "type": "object",
        "properties": {"qkdnet_multipath": multipath},
        "additionalProperties": false
    });
    kr["extension_optional"]["items"] = json!({
        "type": "object",
        "properties": {"qkdnet_multipath": multipath}
    });
    merge(
        &mut schemas["KeyIds"]["properties"]["key_IDs"],
        &json!({"minItems": 1, "maxItems": l.max_key_per_request}),
    );
    merge(&mut schemas["KeyIdEntry"]["properties"]["key_ID"], &uuid);
    merge(&mut schemas["KeyEntry"]["properties"]["key_ID"], &uuid);
    merge(
        &mut schemas["KeyEntry"]["properties"]["key"],
        &json!({"contentEncoding": "base64"}),
    );
    for f in [
        "source_KME_ID",
        "target_KME_ID",
        "master_SAE_ID",
        "slave_SAE_ID",
    ] {
        merge(&mut schemas["Status"]["properties"][f], &id);
    }
    // An empty POST enc_keys body means "all defaults" (every field of the key
    // request is optional).
    let enc = &mut doc["paths"]["/api/v1/keys/{slave_SAE_ID}/enc_keys"]["post"]["requestBody"];
    if enc.is_object() {
        enc["required"] = json!(false);
    }
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for op in paths.values_mut().filter_map(|p| p.as_object_mut()) {
        for m in op.values_mut() {
            let Some(params) = m["parameters"].as_array_mut() else {
                continue;
            };
            for p in params {
                let extra = match (p["in"].as_str(), p["name"].as_str()) {
                    (Some("path"), _) => &id,
                    (Some("query"), Some("number")) => &number,
                    (Some("query"), Some("size")) => &size,
                    (Some("query"), Some("key_ID")) => &uuid,
                    _ => continue,
                };
                merge(&mut p["schema"], extra);
            }
        }
    }
}

async fn openapi(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi_json(s.kme.limits()),
    )
        .into_response()
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
    router_with(
        kme,
        Duration::from_millis(ConnectionLimits::default().body_timeout_ms),
    )
}

fn router_with(kme: Arc<Kme>, body_timeout: Duration) -> Router {
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
        .with_state(AppState { kme, body_timeout })
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

/// Serves `kme` on `listener` with mutual TLS `tls` and the default
/// [`ConnectionLimits`].
pub fn serve(
    kme: Arc<Kme>,
    tls: Arc<ServerConfig>,
    listener: TcpListener,
) -> Result<ServerHandle, KmsError> {
    serve_with(kme, tls, listener, ConnectionLimits::default())
}

/// Open connections: all together and per caller.
struct Gate {
    limits: ConnectionLimits,
    open: std::sync::atomic::AtomicUsize,
    per_caller: std::sync::Mutex<std::collections::HashMap<Identity, usize>>,
    refusals: std::sync::atomic::AtomicU64,
}

/// One connection's place in the [`Gate`]; given back on drop.
struct Ticket {
    gate: Arc<Gate>,
    caller: Option<Identity>,
}

impl Gate {
    fn enter(self: &Arc<Self>) -> Option<Ticket> {
        use std::sync::atomic::Ordering::SeqCst;
        let prev = self.open.fetch_add(1, SeqCst);
        let t = Ticket {
            gate: self.clone(),
            caller: None,
        };
        (prev < self.limits.max_connections).then_some(t)
    }

    /// Counts the connection against `caller`'s own limit.
    fn admit(&self, t: &mut Ticket, caller: &Identity) -> bool {
        let cap = match caller {
            Identity::Sae(_) => self.limits.max_connections_per_sae,
            Identity::Kme(_) => self.limits.max_connections_per_kme,
        };
        let Ok(mut m) = self.per_caller.lock() else {
            return false;
        };
        let n = m.entry(caller.clone()).or_insert(0);
        if *n >= cap {
            return false;
        }
        *n += 1;
        t.caller = Some(caller.clone());
        true
    }

    /// Logs refusals sparsely (1st, 2nd, 4th, 8th…): a flood must not flood the log.
    fn refused(&self, why: &str, caller: Option<&Identity>) {
        let n = self
            .refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n.is_power_of_two() {
            tracing::warn!(refusals = n, ?caller, "connection closed: {why}");
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(c) = self.caller.take() {
            if let Ok(mut m) = self.gate.per_caller.lock() {
                if let Some(n) = m.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&c);
                    }
                }
            }
        }
    }
}

/// Serves `kme` on `listener` with mutual TLS `tls` within `limits`.
pub fn serve_with(
    kme: Arc<Kme>,
    tls: Arc<ServerConfig>,
    listener: TcpListener,
    limits: ConnectionLimits,
) -> Result<ServerHandle, KmsError> {
    limits.check()?;
    let local_addr = listener.local_addr()?;
    let app = router_with(kme, Duration::from_millis(limits.body_timeout_ms));
    let acceptor = TlsAcceptor::from(tls);
    let gate = Arc::new(Gate {
        limits,
        open: std::sync::atomic::AtomicUsize::new(0),
        per_caller: std::sync::Mutex::new(std::collections::HashMap::new()),
        refusals: std::sync::atomic::AtomicU64::new(0),
    });
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
                    let Some(ticket) = gate.enter() else {
                        gate.refused("too many connections", None);
                        drop(tcp);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(connection(acceptor.clone(), tcp, app.clone(), ticket));
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

async fn connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    app: Router,
    mut ticket: Ticket,
) {
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
    let gate = ticket.gate.clone();
    if !gate.admit(&mut ticket, &identity) {
        gate.refused("too many connections of this caller", Some(&identity));
        let busy =
            hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                let mut r = json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many connections from this caller; reuse or close one",
                );
                r.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                Ok::<_, std::convert::Infallible>(r)
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(false)
            .serve_connection(TokioIo::new(tls), busy);
        let _ = tokio::time::timeout(HEADER_TIMEOUT, conn).await;
        return;
    }
    let idle = Duration::from_millis(gate.limits.idle_timeout_ms);
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(identity.clone());
        app.clone().oneshot(req)
    });
    let (io, last) = Activity::wrap(tls);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // Close a connection that has been silent for `idle` (graceful: a request
    // being served is answered first).
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep(idle / 4), if !closing => {
                if last.elapsed() >= idle {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    drop(ticket);
}

/// An I/O stream that records when bytes last moved in either direction.
struct Activity<T> {
    inner: T,
    last: Arc<LastActivity>,
}

/// Time of the last read or write, in ms since the connection began.
struct LastActivity {
    start: std::time::Instant,
    ms: std::sync::atomic::AtomicU64,
}

impl LastActivity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn elapsed(&self) -> Duration {
        let at = self.ms.load(std::sync::atomic::Ordering::Relaxed);
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(at))
    }
}

impl<T> Activity<T> {
    fn wrap(inner: T) -> (Self, Arc<LastActivity>) {
        let last = Arc::new(LastActivity {
            start: std::time::Instant::now(),
            ms: std::sync::atomic::AtomicU64::new(0),
        });
        (
            Self {
                inner,
                last: last.clone(),
            },
            last,
        )
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Activity<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
