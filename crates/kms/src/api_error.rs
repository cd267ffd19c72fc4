//! The one mapping from domain errors to HTTP status codes and JSON bodies.
//!
//! ETSI GS QKD 014 knows three error codes: 400 (bad request), 401 (unauthorized)
//! and 503 (error of server side), each with a JSON body `{"message": …}` — sent on
//! 401 too, because some clients parse every non-200 body as JSON. Keeping the whole
//! mapping here means a reviewer can check every status code of the API in one
//! screen, and the handlers cannot drift apart. The KME-to-KME API (ours, modelled
//! on ETSI GS QKD 020) additionally uses 409 for a reservation the peer cannot
//! honour, with the unit IDs it lacks, so the reserving KME can tell "retry later"
//! (5xx, transport errors) from "never" (4xx).
//!
//! Messages never contain key material; store back-end details are logged, not sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::KmsError;
use crate::etsi::ErrorBody;
use crate::ids::KmeId;
use crate::store::StoreError;

/// A domain error on its way to an HTTP client.
#[derive(Debug)]
pub struct ApiError(pub KmsError);

impl From<KmsError> for ApiError {
    fn from(e: KmsError) -> Self {
        ApiError(e)
    }
}

impl From<qkdnet_etsi::EtsiError> for ApiError {
    fn from(e: qkdnet_etsi::EtsiError) -> Self {
        ApiError(e.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(KmsError::Store(e))
    }
}

/// Body of a KME-to-KME error: the ETSI error object plus, for 409, the units the
/// answering KME does not hold as available.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerErrorBody {
    /// What went wrong.
    pub message: String,
    /// Units unknown or unavailable at the answering KME.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable_unit_IDs: Vec<Uuid>,
    /// A key relay failed on this link (from KME, to KME): the origin KME
    /// routes around it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_link: Option<[KmeId; 2]>,
}

/// Status code and message for a domain error.
pub fn status_and_message(e: &KmsError) -> (StatusCode, String) {
    use StatusCode as S;
    match e {
        KmsError::InvalidId { what } => (S::BAD_REQUEST, format!("invalid {what} ID")),
        KmsError::BadRequest(m) => (S::BAD_REQUEST, m.clone()),
        KmsError::SizeNotMultipleOf8
        | KmsError::UnsupportedMandatoryExtension
        | KmsError::KeysNotFound => (S::BAD_REQUEST, e.to_string()),
        KmsError::Unauthorized(why) => (S::UNAUTHORIZED, format!("unauthorized: {why}")),
        KmsError::Exhausted { .. } => (S::SERVICE_UNAVAILABLE, e.to_string()),
        KmsError::NoRoute(m) | KmsError::RetryLater(m) => (S::SERVICE_UNAVAILABLE, m.clone()),
        KmsError::RelayFailed { link, reason } => (
            S::SERVICE_UNAVAILABLE,
            format!("key relay failed on link {}-{}: {reason}", link.0, link.1),
        ),
        KmsError::PeerUnavailable(_) | KmsError::PeerRejected(_) => (
            S::SERVICE_UNAVAILABLE,
            "the peer KME could not confirm the keys; try again".into(),
        ),
        KmsError::Store(s) => match s {
            // Keys of another SAE pair are answered exactly like unknown keys:
            // a different answer would tell any SAE which key IDs exist.
            StoreError::KeysNotFound | StoreError::NotAuthorized => {
                (S::BAD_REQUEST, KmsError::KeysNotFound.to_string())
            }
            StoreError::Exhausted { .. } => (S::SERVICE_UNAVAILABLE, s.to_string()),
            StoreError::UnitsUnavailable(_)
            | StoreError::RequestVoided
            | StoreError::RequestConflict => (S::CONFLICT, s.to_string()),
            StoreError::InvalidLayout(_) => (S::BAD_REQUEST, s.to_string()),
            StoreError::DuplicateBlock | StoreError::PoolFull { .. } => {
                (S::SERVICE_UNAVAILABLE, s.to_string())
            }
            _ => (S::SERVICE_UNAVAILABLE, "key store unavailable".into()),
        },
        _ => (S::SERVICE_UNAVAILABLE, "internal error of the KME".into()),
    }
}

/// A JSON error response with the ETSI error object.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ErrorBody {
            message: message.into(),
            details: None,
        }),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = status_and_message(&self.0);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = %self.0, "request failed on the server side");
        }
        if let KmsError::Store(StoreError::UnitsUnavailable(ids)) = &self.0 {
            let body = PeerErrorBody {
                message,
                unavailable_unit_IDs: ids.clone(),
                failed_link: None,
            };
            return (status, axum::Json(body)).into_response();
        }
        if let KmsError::RelayFailed { link, .. } = &self.0 {
            let body = PeerErrorBody {
                message,
                unavailable_unit_IDs: Vec::new(),
                failed_link: Some([link.0.clone(), link.1.clone()]),
            };
            return (status, axum::Json(body)).into_response();
        }
        json_error(status, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etsi_codes() {
        let c = |e: KmsError| status_and_message(&e).0.as_u16();
        assert_eq!(c(KmsError::SizeNotMultipleOf8), 400);
        assert_eq!(c(KmsError::KeysNotFound), 400);
        assert_eq!(c(KmsError::Store(StoreError::KeysNotFound)), 400);
        assert_eq!(c(KmsError::Unauthorized("x")), 401);
        assert_eq!(c(KmsError::Store(StoreError::NotAuthorized)), 400);
        assert_eq!(
            c(KmsError::Exhausted {
                available: 0,
                requested: 1
            }),
            503
        );
        assert_eq!(
            c(KmsError::Store(StoreError::Exhausted {
                available: 0,
                requested: 1
            })),
            503
        );
        assert_eq!(c(KmsError::PeerUnavailable("x".into())), 503);
        assert_eq!(c(KmsError::Store(StoreError::Backend("disk".into()))), 503);
        let (_, m) =
            status_and_message(&KmsError::Store(StoreError::Backend("secret path".into())));
        assert!(!m.contains("secret path"));
        assert_eq!(
            status_and_message(&KmsError::UnsupportedMandatoryExtension).1,
            "not all extension_mandatory parameters are supported"
        );
        assert_eq!(
            status_and_message(&KmsError::KeysNotFound).1,
            "one or more keys specified are not found on KME"
        );
    }
}
