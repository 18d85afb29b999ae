//! RFC 9457 problem details: a stable `type` per refusal class, brief text for the caller,
//! details in the log.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::release::Refusal;

/// A problem response.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `urn:snp-key-broker:problem:<class>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the class.
    pub title: &'static str,
    /// HTTP status.
    pub status: u16,
    /// What happened, for the caller (never secret contents).
    pub detail: String,
    /// The failed check or rule, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// Seconds to wait before retrying (429, 503).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem of class `class`.
    pub fn new(
        status: StatusCode,
        class: &str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            kind: format!("urn:snp-key-broker:problem:{class}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            check: None,
            retry_after: None,
        }
    }

    /// Adds the failed check.
    pub fn with_check(mut self, check: impl Into<String>) -> Problem {
        self.check = Some(check.into());
        self
    }

    /// 400 malformed request.
    pub fn malformed(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "Malformed request",
            detail,
        )
    }

    /// 503: a dependency is unavailable.
    pub fn unavailable(detail: impl Into<String>) -> Problem {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        );
        p.retry_after = Some(2);
        p
    }

    /// 500, with the details kept for the log.
    pub fn internal() -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the broker could not complete the request; see its log",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        response
    }
}

impl From<&Refusal> for Problem {
    fn from(r: &Refusal) -> Problem {
        use StatusCode as S;
        match r {
            Refusal::Malformed(d) => Problem::malformed(d.clone()),
            Refusal::Nonce(e) => Problem::new(
                S::FORBIDDEN,
                "nonce-refused",
                "Nonce refused",
                e.to_string(),
            )
            .with_check(r.reason()),
            Refusal::NonceReplay => Problem::new(
                S::CONFLICT,
                "nonce-replay",
                "Nonce already used",
                "this nonce was used before; ask for a new challenge",
            ),
            Refusal::Verification(e) => Problem::new(
                S::FORBIDDEN,
                "verification-refused",
                "Evidence refused",
                e.to_string(),
            )
            .with_check(e.check()),
            Refusal::NoPolicy => Problem::new(
                S::FORBIDDEN,
                "policy-refused",
                "Release refused by policy",
                "no release policy is set",
            )
            .with_check("no_policy"),
            Refusal::Policy { secret, reason } => Problem::new(
                S::FORBIDDEN,
                "policy-refused",
                "Release refused by policy",
                format!("{secret}: {reason}"),
            )
            .with_check("policy"),
            Refusal::Certificate { profile, reason } => Problem::new(
                S::FORBIDDEN,
                "certificate-refused",
                "Certificate refused",
                format!("certificate {profile}: {reason}"),
            )
            .with_check("certificate"),
            Refusal::UnknownSecret(name) => Problem::new(
                S::NOT_FOUND,
                "unknown-secret",
                "Unknown secret",
                format!("no secret named {name}"),
            ),
            Refusal::Store(_) => Problem::unavailable("the store is unavailable"),
            Refusal::Kds(_) => {
                Problem::unavailable("AMD's key distribution service is unavailable")
            }
            Refusal::Busy(d) => {
                let mut p = Problem::new(
                    S::TOO_MANY_REQUESTS,
                    "rate-limited",
                    "Too many attestations in flight",
                    d.clone(),
                );
                p.retry_after = Some(1);
                p
            }
            Refusal::Internal(_) => Problem::internal(),
        }
    }
}
