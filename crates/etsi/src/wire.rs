//! ETSI GS QKD 014 V1.1.1 JSON objects and their decoders.
//!
//! Field names are the specification's, letter for letter (`key_ID`,
//! `slave_SAE_ID`, …), so the Rust fields carry `serde` renames rather than the
//! wire names leaking into the code. Decoding is split in two steps, both pure and
//! fuzzed: `decode_*` turns untrusted bytes into the wire structs (any JSON
//! structure error is a 400), and `validate` turns a wire struct into a request
//! that is known to be within this KME's advertised limits ("parse, don't
//! validate"): the service layer only ever sees [`ValidKeyRequest`] and
//! [`ValidKeyIds`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::EtsiError;

/// Limits a KME advertises in its Status object and enforces on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Default key size in bits (`key_size`).
    pub key_size: u32,
    /// Smallest key size in bits (`min_key_size`).
    pub min_key_size: u32,
    /// Largest key size in bits (`max_key_size`).
    pub max_key_size: u32,
    /// Most keys per request (`max_key_per_request`).
    pub max_key_per_request: u32,
    /// Most keys of default size the pool for one peer may hold for this KME's
    /// master SAEs (`max_key_count`).
    pub max_key_count: u64,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            key_size: 256,
            min_key_size: 8,
            max_key_size: 8192,
            max_key_per_request: 1024,
            max_key_count: 1_000_000,
            max_body_bytes: 256 * 1024,
        }
    }
}

impl Limits {
    /// Checks that the limits are consistent with each other.
    pub fn check(&self) -> Result<(), EtsiError> {
        let ok = self.min_key_size >= 8
            && self.min_key_size.is_multiple_of(8)
            && self.max_key_size.is_multiple_of(8)
            && self.key_size.is_multiple_of(8)
            && self.min_key_size <= self.key_size
            && self.key_size <= self.max_key_size
            && self.max_key_size <= 1 << 20
            && (1..=100_000).contains(&self.max_key_per_request)
            && self.max_key_count >= 1
            && self.max_body_bytes >= 1024;
        if ok {
            Ok(())
        } else {
            Err(EtsiError::Config(
                "limits: need 8 <= min_key_size <= key_size <= max_key_size <= 2^20 (multiples of 8), \
                 1 <= max_key_per_request <= 100000, max_key_count >= 1, max_body_bytes >= 1024"
                    .into(),
            ))
        }
    }
}

/// Status object (ETSI GS QKD 014 §6.1, Table 6).
#[allow(non_snake_case)] // wire names are the specification's
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    /// KME ID of the KME answering.
    pub source_KME_ID: String,
    /// KME ID of the slave SAE's KME.
    pub target_KME_ID: String,
    /// SAE ID of the calling master SAE.
    pub master_SAE_ID: String,
    /// SAE ID of the slave SAE.
    pub slave_SAE_ID: String,
    /// Default key size in bits.
    pub key_size: u32,
    /// Keys of default size available for this master/slave pair.
    pub stored_key_count: u64,
    /// Most keys of default size the KME can store for the pair.
    pub max_key_count: u64,
    /// Most keys per request.
    pub max_key_per_request: u32,
    /// Largest key size in bits.
    pub max_key_size: u32,
    /// Smallest key size in bits.
    pub min_key_size: u32,
    /// Most additional slave SAEs per request (0: no multicast).
    pub max_SAE_ID_count: u32,
    /// Status extension (not used by qkdnet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_extension: Option<Map<String, Value>>,
}

/// Key request (body of POST enc_keys, ETSI GS QKD 014 §6.2, Table 8). Every
/// field is optional.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyRequest {
    /// Number of keys (default 1).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integral"
    )]
    pub number: Option<u64>,
    /// Key size in bits (default `key_size`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integral"
    )]
    pub size: Option<u64>,
    /// Additional slave SAEs (multicast); qkdnet advertises `max_SAE_ID_count: 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_slave_SAE_IDs: Option<Vec<String>>,
    /// Extensions the KME must support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<Object>>))]
    pub extension_mandatory: Option<Vec<Map<String, Value>>>,
    /// Extensions the KME may ignore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<Object>>))]
    pub extension_optional: Option<Vec<Map<String, Value>>>,
}

/// An optional non-negative integer as JSON Schema and ETSI's OpenAPI mean
/// "integer": `2400` and `2400.0` alike (a number whose fraction is zero), but not
/// `2400.5`, a negative number, a string, or anything beyond `u64`.
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    let v = Option::<serde_json::Number>::deserialize(d)?;
    let Some(n) = v else { return Ok(None) };
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    match n.as_f64() {
        // 2^64 as f64 is exact; anything below it with no fraction fits a u64.
        Some(f) if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) => {
            Ok(Some(f as u64))
        }
        _ => Err(D::Error::custom(format!(
            "invalid value {n}, expected a non-negative integer"
        ))),
    }
}

/// One key in a key container (ETSI GS QKD 014 Table 11).
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyEntry {
    /// Key ID (UUID).
    pub key_ID: String,
    /// Key ID extension (not used by qkdnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ID_extension: Option<Map<String, Value>>,
    /// The key, base64 (RFC 4648, with padding).
    pub key: String,
    /// Key extension (not used by qkdnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_extension: Option<Map<String, Value>>,
}

/// Key container (response of enc_keys and dec_keys, ETSI GS QKD 014 Table 11).
/// The specification's table spells `Keys`, its example `keys`; qkdnet uses `keys`.
///
/// No `Debug`: it holds key material.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyContainer {
    /// The keys.
    pub keys: Vec<KeyEntry>,
    /// Container extension (not used by qkdnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_container_extension: Option<Map<String, Value>>,
}

impl Drop for KeyContainer {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for k in &mut self.keys {
            k.key.zeroize();
        }
    }
}

/// One key ID in a dec_keys request (ETSI GS QKD 014 Table 12).
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyIdEntry {
    /// Key ID (UUID).
    pub key_ID: String,
    /// Key ID extension (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ID_extension: Option<Map<String, Value>>,
}

/// Key IDs (body of POST dec_keys, ETSI GS QKD 014 §6.3, Table 12).
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyIds {
    /// The key IDs.
    pub key_IDs: Vec<KeyIdEntry>,
    /// Extension (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_IDs_extension: Option<Map<String, Value>>,
}

/// Error object (ETSI GS QKD 014 Table 13), sent with every non-200 answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub message: String,
    /// Further details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<Object>>))]
    pub details: Option<Vec<Map<String, Value>>>,
}

/// A key request known to be within the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidKeyRequest {
    /// Number of keys, `1..=max_key_per_request`.
    pub number: u32,
    /// Key size in bits, a multiple of 8 in `min_key_size..=max_key_size`.
    pub size_bits: u32,
    /// Relay over node-disjoint paths (the `qkdnet_multipath` extension).
    pub multipath: Multipath,
    /// The client's idempotency key (the `qkdnet_request_id` extension).
    pub request_id: Option<ClientRequestId>,
}

/// Name of qkdnet's idempotency extension: `{"qkdnet_request_id": "<UUID>"}`.
/// ETSI GS QKD 014 has no delivery acknowledgement, so an SAE whose enc_keys
/// answer was lost (connection cut, KME restarted after committing) cannot tell
/// whether keys were delivered. With this extension the SAE names the request;
/// a retry with the same ID (same slave, number and size) within the KME's
/// replay window returns the same keys, once. In `extension_mandatory` a KME
/// that cannot honour it refuses the request; in `extension_optional` it may
/// ignore it.
pub const REQUEST_ID_EXTENSION: &str = "qkdnet_request_id";

/// An SAE's idempotency key for one enc_keys request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRequestId {
    /// The SAE's request ID.
    pub id: Uuid,
    /// From `extension_mandatory`: refuse rather than ignore.
    pub mandatory: bool,
}

/// Name of qkdnet's extension parameter selecting multipath relay:
/// `{"qkdnet_multipath": 2}` in `extension_mandatory` (refuse rather than
/// relay over one path) or `extension_optional` (one path if two disjoint
/// ones do not exist). The key is split into two XOR shares relayed over
/// node-disjoint routes, so that no single trusted node sees it.
pub const MULTIPATH_EXTENSION: &str = "qkdnet_multipath";

/// How a relayed key travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Multipath {
    /// One route (the default).
    #[default]
    Single,
    /// Two node-disjoint routes, one XOR share each.
    Disjoint {
        /// From `extension_mandatory`: no single-route fallback.
        mandatory: bool,
    },
}

/// Key IDs of a dec_keys request, known to be distinct UUIDs within the limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidKeyIds(pub Vec<Uuid>);

fn malformed(what: &str, e: serde_json::Error) -> EtsiError {
    // serde_json's messages name the field and position, never echo values at length.
    EtsiError::BadRequest(format!("malformed {what}: {e}"))
}

/// The specification's bodies are JSON objects; serde would also accept a JSON
/// array for a struct, so anything not starting with `{` is refused first.
fn require_object(body: &[u8], what: &str) -> Result<(), EtsiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => Err(EtsiError::BadRequest(format!(
            "malformed {what}: expected a JSON object"
        ))),
    }
}

/// Decodes the body of POST enc_keys. An empty body means all defaults.
pub fn decode_key_request(body: &[u8]) -> Result<KeyRequest, EtsiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(KeyRequest::default());
    }
    require_object(body, "key request")?;
    serde_json::from_slice(body).map_err(|e| malformed("key request", e))
}

/// Decodes the body of POST dec_keys.
pub fn decode_key_ids(body: &[u8]) -> Result<KeyIds, EtsiError> {
    require_object(body, "key IDs")?;
    serde_json::from_slice(body).map_err(|e| malformed("key IDs", e))
}

/// Parses a key ID: the canonical 36-character hyphenated UUID form only.
pub fn parse_key_id(s: &str) -> Result<Uuid, EtsiError> {
    if s.len() != 36 {
        return Err(EtsiError::BadRequest("key_ID is not a UUID".into()));
    }
    Uuid::try_parse(s).map_err(|_| EtsiError::BadRequest("key_ID is not a UUID".into()))
}

/// Formats a key ID (lower-case hyphenated).
pub fn format_key_id(id: &Uuid) -> String {
    id.hyphenated().to_string()
}

impl KeyRequest {
    /// Applies defaults and checks every field against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<ValidKeyRequest, EtsiError> {
        let mut multipath = Multipath::Single;
        let mut request_id: Option<ClientRequestId> = None;
        for (list, mandatory) in [
            (&self.extension_mandatory, true),
            (&self.extension_optional, false),
        ] {
            for (name, value) in list.iter().flatten().flatten() {
                if name == REQUEST_ID_EXTENSION {
                    let id = value
                        .as_str()
                        .and_then(|s| parse_key_id(s).ok())
                        .ok_or_else(|| {
                            EtsiError::BadRequest(format!(
                                "{REQUEST_ID_EXTENSION} shall be a UUID string"
                            ))
                        })?;
                    match request_id {
                        Some(r) if r.id != id => {
                            return Err(EtsiError::BadRequest(format!(
                                "two different {REQUEST_ID_EXTENSION} values"
                            )));
                        }
                        Some(r) if r.mandatory => {}
                        _ => request_id = Some(ClientRequestId { id, mandatory }),
                    }
                    continue;
                }
                if name != MULTIPATH_EXTENSION {
                    if mandatory {
                        return Err(EtsiError::UnsupportedMandatoryExtension);
                    }
                    continue;
                }
                match value.as_u64() {
                    Some(1) => {}
                    Some(2) => {
                        if multipath == Multipath::Single || mandatory {
                            multipath = Multipath::Disjoint { mandatory };
                        }
                    }
                    _ => {
                        return Err(EtsiError::BadRequest(format!(
                            "{MULTIPATH_EXTENSION} shall be 1 or 2"
                        )));
                    }
                }
            }
        }
        if self
            .additional_slave_SAE_IDs
            .as_ref()
            .is_some_and(|v| !v.is_empty())
        {
            return Err(EtsiError::BadRequest(
                "additional_slave_SAE_IDs is not supported (max_SAE_ID_count is 0)".into(),
            ));
        }
        let number = self.number.unwrap_or(1);
        if number == 0 {
            return Err(EtsiError::BadRequest("number shall be at least 1".into()));
        }
        if number > u64::from(limits.max_key_per_request) {
            return Err(EtsiError::BadRequest(format!(
                "number exceeds max_key_per_request ({})",
                limits.max_key_per_request
            )));
        }
        let size = self.size.unwrap_or(u64::from(limits.key_size));
        if !size.is_multiple_of(8) {
            return Err(EtsiError::SizeNotMultipleOf8);
        }
        if size < u64::from(limits.min_key_size) || size > u64::from(limits.max_key_size) {
            return Err(EtsiError::BadRequest(format!(
                "size shall be between min_key_size ({}) and max_key_size ({})",
                limits.min_key_size, limits.max_key_size
            )));
        }
        // Both bounded by u32 limits above.
        Ok(ValidKeyRequest {
            number: number as u32,
            size_bits: size as u32,
            multipath,
            request_id,
        })
    }
}

impl KeyIds {
    /// Checks the key IDs: at least one, at most `max_key_per_request`, UUIDs, distinct.
    pub fn validate(&self, limits: &Limits) -> Result<ValidKeyIds, EtsiError> {
        validate_ids(
            self.key_IDs.iter().map(|k| k.key_ID.as_str()),
            self.key_IDs.len(),
            limits,
        )
    }
}

/// Checks a list of key ID strings (shared by the POST body and the GET query).
pub fn validate_ids<'a>(
    ids: impl Iterator<Item = &'a str>,
    count: usize,
    limits: &Limits,
) -> Result<ValidKeyIds, EtsiError> {
    if count == 0 {
        return Err(EtsiError::BadRequest("key_IDs shall not be empty".into()));
    }
    if count > limits.max_key_per_request as usize {
        return Err(EtsiError::BadRequest(format!(
            "more key_IDs than max_key_per_request ({})",
            limits.max_key_per_request
        )));
    }
    let mut out = Vec::with_capacity(count);
    let mut seen = std::collections::HashSet::with_capacity(count);
    for s in ids {
        let id = parse_key_id(s)?;
        if !seen.insert(id) {
            return Err(EtsiError::BadRequest("key_IDs contains a duplicate".into()));
        }
        out.push(id);
    }
    Ok(ValidKeyIds(out))
}

/// The query of GET enc_keys: only `number` and `size`, each at most once, decimal.
pub fn parse_enc_query(query: Option<&str>) -> Result<KeyRequest, EtsiError> {
    let mut req = KeyRequest::default();
    for (name, value) in query_pairs(query)? {
        let slot = match name {
            "number" => &mut req.number,
            "size" => &mut req.size,
            _ => {
                return Err(EtsiError::BadRequest(format!(
                    "unknown query parameter for enc_keys: {}",
                    clip(name)
                )));
            }
        };
        if slot.is_some() {
            return Err(EtsiError::BadRequest(format!(
                "query parameter {name} given twice"
            )));
        }
        let v: u64 = value.parse().map_err(|_| {
            EtsiError::BadRequest(format!(
                "query parameter {name} is not a non-negative integer"
            ))
        })?;
        *slot = Some(v);
    }
    Ok(req)
}

/// The query of GET dec_keys: exactly one `key_ID`.
pub fn parse_dec_query(query: Option<&str>) -> Result<String, EtsiError> {
    let mut id = None;
    for (name, value) in query_pairs(query)? {
        if name != "key_ID" {
            return Err(EtsiError::BadRequest(format!(
                "unknown query parameter for dec_keys: {}",
                clip(name)
            )));
        }
        if id.replace(value.to_owned()).is_some() {
            return Err(EtsiError::BadRequest(
                "GET dec_keys takes a single key_ID".into(),
            ));
        }
    }
    id.ok_or_else(|| EtsiError::BadRequest("GET dec_keys needs ?key_ID=".into()))
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Splits a query string into pairs. Values this API accepts (integers, UUIDs)
/// never need percent-encoding, so a `%` is refused rather than decoded.
fn query_pairs(query: Option<&str>) -> Result<Vec<(&str, &str)>, EtsiError> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| EtsiError::BadRequest("query parameter without a value".into()))?;
        if value.contains('%') || name.contains('%') {
            return Err(EtsiError::BadRequest(
                "percent-encoded query values are not accepted".into(),
            ));
        }
        out.push((name, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_limits() {
        let l = Limits::default();
        let r = decode_key_request(b"")
            .expect("empty body is all defaults")
            .validate(&l)
            .expect("valid");
        assert_eq!(
            r,
            ValidKeyRequest {
                number: 1,
                size_bits: 256,
                multipath: Multipath::Single,
                request_id: None,
            }
        );
        let r = decode_key_request(br#"{"number":3,"size":512}"#)
            .expect("json")
            .validate(&l)
            .expect("valid");
        assert_eq!(
            r,
            ValidKeyRequest {
                number: 3,
                size_bits: 512,
                multipath: Multipath::Single,
                request_id: None,
            }
        );
        let e = decode_key_request(br#"{"size":16384}"#)
            .expect("json")
            .validate(&l)
            .unwrap_err();
        assert!(matches!(e, EtsiError::BadRequest(_)), "{e}");
    }

    #[test]
    fn integral_floats_are_integers() {
        let r = decode_key_request(br#"{"number":2.0,"size":2400.0}"#).expect("integers");
        assert_eq!((r.number, r.size), (Some(2), Some(2400)));
        let r = decode_key_request(br#"{"number":null}"#).expect("null is absent");
        assert_eq!(r.number, None);
    }

    #[test]
    fn size_not_multiple_of_8() {
        let l = Limits::default();
        let e = decode_key_request(br#"{"size":260}"#)
            .expect("json")
            .validate(&l)
            .unwrap_err();
        assert!(matches!(e, EtsiError::SizeNotMultipleOf8));
        assert_eq!(e.to_string(), "size shall be a multiple of 8");
    }

    #[test]
    fn number_bounds() {
        let l = Limits::default();
        for n in [0u64, u64::from(l.max_key_per_request) + 1, u64::MAX] {
            let e = KeyRequest {
                number: Some(n),
                ..Default::default()
            }
            .validate(&l)
            .unwrap_err();
            assert!(matches!(e, EtsiError::BadRequest(_)));
        }
    }

    #[test]
    fn mandatory_extensions_are_refused_optional_ignored() {
        let l = Limits::default();
        let r = decode_key_request(br#"{"extension_mandatory":[{"abc_route_type":"direct"}]}"#)
            .expect("json");
        assert!(matches!(
            r.validate(&l),
            Err(EtsiError::UnsupportedMandatoryExtension)
        ));
        let r = decode_key_request(br#"{"extension_optional":[{"abc_x":1}]}"#).expect("json");
        assert!(r.validate(&l).is_ok());
    }

    #[test]
    fn the_request_id_extension_is_understood() {
        let l = Limits::default();
        let id = "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f506";
        let rid = |body: String| {
            decode_key_request(body.as_bytes())
                .expect("json")
                .validate(&l)
        };
        let want = Uuid::try_parse(id).expect("uuid");
        assert_eq!(
            rid(format!(
                r#"{{"extension_mandatory":[{{"qkdnet_request_id":"{id}"}}]}}"#
            ))
            .expect("valid")
            .request_id,
            Some(ClientRequestId {
                id: want,
                mandatory: true
            })
        );
        assert_eq!(
            rid(format!(
                r#"{{"extension_optional":[{{"qkdnet_request_id":"{id}"}}]}}"#
            ))
            .expect("valid")
            .request_id,
            Some(ClientRequestId {
                id: want,
                mandatory: false
            })
        );
        // Named in both lists: mandatory wins; two different IDs: refused.
        assert_eq!(
            rid(format!(
                r#"{{"extension_mandatory":[{{"qkdnet_request_id":"{id}"}}],"extension_optional":[{{"qkdnet_request_id":"{id}"}}]}}"#
            ))
            .expect("valid")
            .request_id
            .map(|r| r.mandatory),
            Some(true)
        );
        let other = "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f507";
        assert!(rid(format!(
            r#"{{"extension_mandatory":[{{"qkdnet_request_id":"{id}"}}],"extension_optional":[{{"qkdnet_request_id":"{other}"}}]}}"#
        ))
        .is_err());
        for bad in [r#""not-a-uuid""#, "7", "null", r#"["x"]"#] {
            assert!(
                rid(format!(
                    r#"{{"extension_optional":[{{"qkdnet_request_id":{bad}}}]}}"#
                ))
                .is_err(),
                "{bad}"
            );
        }
        assert_eq!(rid("{}".into()).expect("valid").request_id, None);
    }

    #[test]
    fn the_multipath_extension_is_understood() {
        let l = Limits::default();
        let mp = |body: &[u8]| decode_key_request(body).expect("json").validate(&l);
        assert_eq!(
            mp(br#"{"extension_mandatory":[{"qkdnet_multipath":2}]}"#)
                .ok()
                .map(|r| r.multipath),
            Some(Multipath::Disjoint { mandatory: true })
        );
        assert_eq!(
            mp(br#"{"extension_optional":[{"qkdnet_multipath":2,"abc_x":1}]}"#)
                .ok()
                .map(|r| r.multipath),
            Some(Multipath::Disjoint { mandatory: false })
        );
        assert_eq!(
            mp(br#"{"extension_optional":[{"qkdnet_multipath":1}]}"#)
                .ok()
                .map(|r| r.multipath),
            Some(Multipath::Single)
        );
        for bad in [
            &br#"{"extension_mandatory":[{"qkdnet_multipath":3}]}"#[..],
            br#"{"extension_optional":[{"qkdnet_multipath":"two"}]}"#,
        ] {
            assert!(matches!(mp(bad), Err(EtsiError::BadRequest(_))));
        }
        assert!(matches!(
            mp(br#"{"extension_mandatory":[{"qkdnet_multipath":2,"abc_x":1}]}"#),
            Err(EtsiError::UnsupportedMandatoryExtension)
        ));
    }

    #[test]
    fn malformed_json_is_bad_request() {
        for b in [
            &b"{"[..],
            b"[]",
            br#"{"number":-1}"#,
            br#"{"number":1.5}"#,
            br#"{"number":-1.0}"#,
            br#"{"number":1e300}"#,
            br#"{"number":"1"}"#,
        ] {
            assert!(
                matches!(decode_key_request(b), Err(EtsiError::BadRequest(_))),
                "{:?}",
                b
            );
        }
        assert!(decode_key_ids(b"{}").is_err());
    }

    #[test]
    fn key_ids() {
        let l = Limits::default();
        let id = "5a4b9c1e-6b1f-4f43-9d6a-3c2b1a0f9e8d";
        let ok = decode_key_ids(format!(r#"{{"key_IDs":[{{"key_ID":"{id}"}}]}}"#).as_bytes())
            .expect("json");
        assert_eq!(ok.validate(&l).expect("valid").0.len(), 1);
        let dup = decode_key_ids(
            format!(r#"{{"key_IDs":[{{"key_ID":"{id}"}},{{"key_ID":"{id}"}}]}}"#).as_bytes(),
        )
        .expect("json");
        assert!(dup.validate(&l).is_err());
        let empty = decode_key_ids(br#"{"key_IDs":[]}"#).expect("json");
        assert!(empty.validate(&l).is_err());
        assert!(parse_key_id("5a4b9c1e6b1f4f439d6a3c2b1a0f9e8d").is_err());
    }

    #[test]
    fn queries() {
        assert_eq!(
            parse_enc_query(Some("number=2&size=128")).expect("valid"),
            KeyRequest {
                number: Some(2),
                size: Some(128),
                ..Default::default()
            }
        );
        assert!(parse_enc_query(Some("number=2&number=3")).is_err());
        assert!(parse_enc_query(Some("foo=1")).is_err());
        assert!(parse_enc_query(Some("number=-1")).is_err());
        assert_eq!(parse_enc_query(None).expect("valid"), KeyRequest::default());
        assert_eq!(parse_dec_query(Some("key_ID=abc")).expect("valid"), "abc");
        assert!(parse_dec_query(Some("key_ID=a&key_ID=b")).is_err());
        assert!(parse_dec_query(None).is_err());
    }

    #[test]
    fn status_field_names_are_the_specs() {
        let s = Status {
            source_KME_ID: "A".into(),
            target_KME_ID: "B".into(),
            master_SAE_ID: "a".into(),
            slave_SAE_ID: "b".into(),
            key_size: 256,
            stored_key_count: 1,
            max_key_count: 2,
            max_key_per_request: 3,
            max_key_size: 4,
            min_key_size: 5,
            max_SAE_ID_count: 0,
            status_extension: None,
        };
        let v = serde_json::to_value(&s).expect("serialises");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        for k in [
            "source_KME_ID",
            "target_KME_ID",
            "master_SAE_ID",
            "slave_SAE_ID",
            "key_size",
            "stored_key_count",
            "max_key_count",
            "max_key_per_request",
            "max_key_size",
            "min_key_size",
            "max_SAE_ID_count",
        ] {
            assert!(keys.contains(&k), "{k}");
        }
    }
}
