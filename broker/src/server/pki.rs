//! The private CA's routes (docs/pki.md): the admin API's `/v1/admin/pki/…` and the public
//! trust bundle `GET /v1/pki/ca`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::problem::Problem;
use super::{AppState, Operator, ProblemJson, body_problem};
use crate::pki::authority::Authority;
use crate::pki::revoke::Reason;
use crate::pki::{self, NewCa, ocsp};
use crate::store::Store;

/// Routes under `/v1/admin`.
pub(super) fn admin_routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        .route("/pki/ca", get(show::<S>).post(create::<S>))
        .route("/pki/ca/rotate", post(rotate::<S>))
        .route("/pki/ca/certificate", put(import::<S>))
        .route("/pki/certificates", get(list_issued::<S>))
        .route("/pki/certificates/{serial}/revoke", post(revoke::<S>))
}

/// Public routes.
pub(super) fn public_routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        .route("/v1/pki/ca", get(bundle::<S>))
        .route("/v1/pki/ca/{file}", get(ca_certificate::<S>))
        .route("/v1/pki/crl", get(newest_crl::<S>))
        .route("/v1/pki/crl/{version}", get(crl::<S>))
        .route("/v1/pki/ocsp", post(ocsp_post::<S>))
        .route("/v1/pki/ocsp/{*request}", get(ocsp_get::<S>))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    reason: Option<String>,
}

async fn revoke<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    Path(serial): Path<String>,
    ProblemJson(body): ProblemJson<RevokeBody>,
) -> Result<Response, Problem> {
    let reason_text = body.reason.unwrap_or_else(|| "unspecified".into());
    let reason = Reason::parse(&reason_text).ok_or_else(|| {
        Problem::malformed(format!(
            "reason {reason_text:?}: one of {}",
            Reason::ALL.map(|(_, n)| n).join(", ")
        ))
    })?;
    let record = pki::revoke::revoke(
        state.broker.store(),
        &serial,
        reason,
        &op,
        SystemTime::now(),
    )
    .await?;
    Ok(Json(record).into_response())
}

fn not_found(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
}

/// `GET /v1/pki/ca/<version>.der`: a CA version's certificate (what issued certificates
/// name as their CA issuer).
async fn ca_certificate<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Path(file): Path<String>,
) -> Result<Response, Problem> {
    let version = file
        .strip_suffix(".der")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| not_found("CA certificates are at /v1/pki/ca/<version>.der"))?;
    let signers = state
        .broker
        .pki()
        .active(state.broker.store(), state.broker.keyring())
        .await?;
    let signer = signers
        .iter()
        .find(|s| s.version == version)
        .ok_or_else(|| not_found(format!("no active CA version {version}")))?;
    Ok((
        [(header::CONTENT_TYPE, "application/pkix-cert")],
        signer.ca_der.clone(),
    )
        .into_response())
}

fn crl_response(der: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/pkix-crl")], der).into_response()
}

/// `GET /v1/pki/crl`: the newest active CA version's CRL.
async fn newest_crl<S: Store>(State(state): State<Arc<AppState<S>>>) -> Result<Response, Problem> {
    let signers = state
        .broker
        .pki()
        .active(state.broker.store(), state.broker.keyring())
        .await?;
    let version = signers
        .first()
        .map(|s| s.version)
        .ok_or_else(|| not_found("this broker has no CA (broker ca init)"))?;
    crl_of(&state, version).await
}

/// `GET /v1/pki/crl/<version>`: that CA version's CRL.
async fn crl<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Path(version): Path<String>,
) -> Result<Response, Problem> {
    let version = version
        .parse::<u64>()
        .map_err(|_| not_found("CRLs are at /v1/pki/crl/<version>"))?;
    crl_of(&state, version).await
}

async fn crl_of<S: Store>(state: &AppState<S>, version: u64) -> Result<Response, Problem> {
    let der = state
        .broker
        .pki()
        .crl(
            state.broker.store(),
            state.broker.keyring(),
            version,
            SystemTime::now(),
        )
        .await?
        .ok_or_else(|| not_found(format!("no active CA version {version}")))?;
    Ok(crl_response(der))
}

fn ocsp_response(status: StatusCode, der: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/ocsp-response")],
        der,
    )
        .into_response()
}

/// `POST /v1/pki/ocsp` with a DER request.
async fn ocsp_post<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match body {
        Ok(der) => ocsp_answer(&state, &der).await,
        Err(_) => ocsp_response(StatusCode::BAD_REQUEST, ocsp::malformed()),
    }
}

/// `GET /v1/pki/ocsp/<base64 of the DER request, URL-encoded>` (RFC 6960 A.1).
async fn ocsp_get<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Path(request): Path<String>,
) -> Response {
    use base64::Engine;
    let text: String = request.split_whitespace().collect();
    match base64::engine::general_purpose::STANDARD.decode(text.as_bytes()) {
        Ok(der) => ocsp_answer(&state, &der).await,
        Err(_) => ocsp_response(StatusCode::BAD_REQUEST, ocsp::malformed()),
    }
}

/// Answers an OCSP request for the CA versions this broker holds: signed by the delegated
/// responder of the CA the first request names; `unknown` for a serial that CA never issued
/// (or a CertID of another CA in the same request); `unauthorized` when it names none of
/// them; 400 with `malformedRequest` for what does not parse.
async fn ocsp_answer<S: Store>(state: &AppState<S>, der: &[u8]) -> Response {
    let query = match ocsp::parse(der) {
        Ok(q) => q,
        Err(ocsp::Malformed(reason)) => {
            tracing::debug!(%reason, "malformed OCSP request");
            return ocsp_response(StatusCode::BAD_REQUEST, ocsp::malformed());
        }
    };
    match ocsp_statuses(state, &query).await {
        Ok(Some(der)) => ocsp_response(StatusCode::OK, der),
        Ok(None) => ocsp_response(StatusCode::OK, ocsp::unauthorized()),
        Err(e) => {
            tracing::error!(error = %e, "OCSP request failed");
            ocsp_response(StatusCode::INTERNAL_SERVER_ERROR, ocsp::internal_error())
        }
    }
}

/// The signed answer, or `None` when the request is not one this broker may answer: it
/// names none of its CA versions, several of them (each signs only for itself), or one whose
/// certificate has expired.
async fn ocsp_statuses<S: Store>(
    state: &AppState<S>,
    query: &ocsp::Query,
) -> Result<Option<Vec<u8>>, crate::Error> {
    let now = SystemTime::now();
    let pki = state.broker.pki();
    let signers = pki
        .active(state.broker.store(), state.broker.keyring())
        .await?;
    let hashes = Authority::hashes(&signers);
    let which = query.issuers(&hashes);
    let Some(first) = which.iter().flatten().next().copied() else {
        return Ok(None);
    };
    if which.iter().flatten().any(|i| *i != first) {
        return Ok(None);
    }
    let signer = &signers[first];
    if signer.end() <= now {
        return Ok(None);
    }
    let responder = pki.responder(signer, now)?;
    let mut statuses = Vec::new();
    for (serial, ca) in query.serials().iter().zip(&which) {
        let status = match ca {
            Some(i) if *i == first => {
                match state.broker.store().issued_certificate(serial).await? {
                    Some(r) if r.ca_version == signer.version => match r.revoked_at {
                        Some(at) => ocsp::Status::Revoked(
                            at,
                            r.revocation_reason
                                .as_deref()
                                .and_then(Reason::parse)
                                .unwrap_or(Reason::Unspecified)
                                .code(),
                        ),
                        None => ocsp::Status::Good,
                    },
                    _ => ocsp::Status::Unknown,
                }
            }
            _ => ocsp::Status::Unknown,
        };
        statuses.push(status);
    }
    responder
        .answer(query, &statuses, now)
        .map(Some)
        .map_err(|e| crate::Error::Crypto(format!("OCSP response: {e}")))
}

async fn show<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(_op): Operator,
) -> Result<Response, Problem> {
    let versions = pki::ca::list(state.broker.store()).await?;
    Ok(Json(versions).into_response())
}

async fn create<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    ProblemJson(new): ProblemJson<NewCa>,
) -> Result<Response, Problem> {
    make(state, op, new, false).await
}

async fn rotate<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    ProblemJson(new): ProblemJson<NewCa>,
) -> Result<Response, Problem> {
    make(state, op, new, true).await
}

async fn make<S: Store>(
    state: Arc<AppState<S>>,
    op: String,
    new: NewCa,
    rotate: bool,
) -> Result<Response, Problem> {
    let info = pki::ca::create(
        state.broker.store(),
        state.broker.keyring(),
        &new,
        rotate,
        &op,
        SystemTime::now(),
    )
    .await?;
    state.broker.pki().invalidate();
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn import<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<Response, Problem> {
    let body = body.map_err(|r| body_problem(r.status(), r.body_text()))?;
    let info = pki::ca::import(
        state.broker.store(),
        state.broker.keyring(),
        body.as_bytes(),
        &op,
        SystemTime::now(),
    )
    .await?;
    state.broker.pki().invalidate();
    Ok(Json(info).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
}

/// The certificates the CA issued, newest first (metadata; `limit` 1 to 1000, default 100).
async fn list_issued<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(_op): Operator,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let axum::extract::Query(query) = query.map_err(|r| body_problem(r.status(), r.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let records = state
        .broker
        .store()
        .issued_certificates(limit)
        .await
        .map_err(crate::Error::from)?;
    Ok(Json(serde_json::json!({ "certificates": records })).into_response())
}

/// Every unexpired CA certificate with its chain (PEM): what relying services trust.
async fn bundle<S: Store>(State(state): State<Arc<AppState<S>>>) -> Result<Response, Problem> {
    let pem = pki::ca::bundle(state.broker.store(), SystemTime::now()).await?;
    if pem.is_empty() {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "this broker has no CA (broker ca init)",
        ));
    }
    Ok((
        [(header::CONTENT_TYPE, "application/pem-certificate-chain")],
        pem,
    )
        .into_response())
}
