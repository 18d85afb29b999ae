//! The HTTPS service: guest protocol (`/v1/challenge`, `/v1/attest`), admin API over mutual
//! TLS (`/v1/admin/…`), health and metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use attestation::protocol::AttestRequest;
use attestation::{TrustAnchors, Verifier};
use axum::extract::rejection::JsonRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State,
};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::Error;
use crate::audit;
use crate::config::Settings;
use crate::keyring::Keyring;
use crate::release::{Broker, Refusal};
use crate::secrets::SecretKind;
use crate::store::sql::now as now_i64;
use crate::store::{AnyStore, AuditQuery, AuditRecord, Store};

pub mod conn;
mod drain;
pub mod metrics;
mod pki;
pub mod problem;
pub mod stapler;
pub mod tls;

pub use problem::Problem;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// TCP peer address.
    pub addr: SocketAddr,
    /// Client certificate chain presented in the handshake (not yet checked).
    pub client_chain: Vec<CertificateDer<'static>>,
}

/// Shared state of the service.
pub struct AppState<S: Store> {
    /// The release engine.
    pub broker: Broker<S>,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Operator CA verifier for the admin API.
    pub operator: Arc<tls::OperatorVerifier>,
    /// Attestations allowed in flight before 429.
    pub attest_slots: Arc<Semaphore>,
    /// Whether a simulated AMD root is trusted (said in `/readyz`).
    pub simulated_root: bool,
    /// The KBS front end, when enabled.
    pub kbs: Option<Arc<crate::kbs::Kbs>>,
    /// The last readiness probe: when, and what it found.
    pub readiness: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    /// The broker's own evidence, when `[platform] publish_evidence`.
    pub own_evidence: Option<Arc<OwnEvidence>>,
}

/// What serves the broker's own evidence: its platform, the TLS key it binds, and a bound on
/// reports in flight (the endpoint is unauthenticated).
pub struct OwnEvidence {
    platform: Box<dyn crate::platform::Platform>,
    tls: Arc<tls::TlsState>,
    slots: Semaphore,
}

/// The broker's evidence with its VCEK: from the host's certificate table, else from AMD's
/// KDS (as for guests), so that callers verify it offline.
async fn with_vcek<S: Store>(
    broker: &Broker<S>,
    mut evidence: crate::attested::BrokerEvidence,
) -> Result<crate::attested::BrokerEvidence, Error> {
    use base64::Engine;
    let attestation::protocol::Evidence::Snp {
        report,
        certificates,
    } = &mut evidence.evidence
    else {
        return Ok(evidence);
    };
    if certificates
        .iter()
        .any(|c| c.kind == "vcek" || c.kind == "vlek")
    {
        return Ok(evidence);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw = b64
        .decode(report.as_bytes())
        .map_err(|e| Error::Crypto(format!("own report: {e}")))?;
    let vcek = broker.vcek_for(&raw).await?;
    certificates.push(attestation::protocol::CertificateEntry {
        kind: "vcek".into(),
        der: b64.encode(vcek),
    });
    Ok(evidence)
}

/// Reports of the broker's own VM in flight at once.
const OWN_EVIDENCE_SLOTS: usize = 4;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EvidenceQuery {
    nonce: String,
}

/// `GET /v1/broker/evidence?nonce=<64 hex digits>`: this broker's attestation report, bound
/// to its TLS server key and the caller's nonce (docs/protocol.md).
async fn own_evidence<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    query: Result<axum::extract::Query<EvidenceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(own) = state.own_evidence.clone() else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "this broker does not publish its own evidence ([platform] publish_evidence)",
        )
        .into_response();
    };
    let bad = |detail: &str| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            "Malformed request",
            detail,
        )
        .into_response()
    };
    let Ok(axum::extract::Query(query)) = query else {
        return bad("one query parameter: nonce, 64 hex digits");
    };
    let mut nonce = [0u8; 32];
    if hex::decode_to_slice(query.nonce.trim(), &mut nonce).is_err() {
        return bad("nonce: 64 hex digits");
    }
    let Ok(_slot) = own.slots.try_acquire() else {
        return too_many_attestations().into_response();
    };
    let own = own.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let leaf = own
            .tls
            .leaf()
            .ok_or_else(|| Error::Config("no server certificate".into()))?;
        let spki = crate::attested::spki_of(&leaf)?;
        crate::attested::make_evidence(&*own.platform, &spki, &nonce)
    })
    .await;
    let evidence = match result {
        Ok(Ok(evidence)) => with_vcek(&state.broker, evidence).await,
        Ok(Err(e)) => Err(e),
        Err(e) => {
            tracing::error!(error = %e, "the broker's own evidence task failed");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    match evidence {
        Ok(evidence) => axum::Json(evidence).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "the broker's own evidence failed");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Evidence unavailable",
                "the broker could not obtain its own report",
            )
            .into_response()
        }
    }
}

impl<S: Store> AppState<S> {
    fn attest_slots_owned(self: Arc<Self>) -> Arc<Semaphore> {
        self.attest_slots.clone()
    }
}

impl<S: Store> std::fmt::Debug for AppState<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// A JSON body whose rejections become problem details (400, 413, 415).
pub struct ProblemJson<T>(pub T);

impl<S, T> FromRequest<S> for ProblemJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ProblemJson(v)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    body_problem(rejection.status(), rejection.body_text())
}

/// A body extractor's rejection as a problem: 413 for the size limit, otherwise malformed.
fn body_problem(status: StatusCode, text: String) -> Problem {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            status,
            "too-large",
            "Request too large",
            "the request body is too large",
        )
    } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        let mut p = Problem::malformed(audit::truncate(&text));
        p.status = status.as_u16();
        p
    } else {
        // Syntax and shape errors alike are 400 (axum says 422 for the latter). The text can
        // echo the input (an unknown field's name): it is truncated.
        Problem::malformed(audit::truncate(&text))
    }
}

/// An operator authenticated by a client certificate from the operator CA that is explicitly
/// an operator certificate (see [`tls::OperatorVerifier`]). Refusals are audited with the
/// peer address and the presented certificate's fingerprint.
pub struct Operator(pub String);

impl<S: Store> FromRequestParts<Arc<AppState<S>>> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState<S>>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<Peer>().cloned();
        let chain = peer
            .as_ref()
            .map(|p| p.client_chain.as_slice())
            .unwrap_or_default();
        let denied = match state.operator.authorize(chain, SystemTime::now()) {
            Ok(name) => return Ok(Operator(format!("operator {name}"))),
            Err(denied) => denied,
        };
        let route = parts
            .extensions
            .get::<axum::extract::OriginalUri>()
            .map(|u| u.0.path().to_string())
            .unwrap_or_else(|| parts.uri.path().to_string());
        let addr = peer
            .as_ref()
            .map(|p| p.addr.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        let mut detail = json!({
            "route": audit::truncate(&route),
            "method": parts.method.as_str(),
            "reason": denied.reason(),
            "peer": addr,
        });
        if let Some(leaf) = chain.first() {
            detail["certificate_sha256"] = tls::fingerprint(leaf).into();
            detail["presented_subject"] = audit::truncate(&tls::subject(leaf)).into();
        }
        let record = AuditRecord {
            id: 0,
            at: now_i64(),
            actor: format!("unauthenticated {addr}"),
            action: "admin.denied".into(),
            outcome: "refused".into(),
            detail,
        };
        // A certificate the operator CA issued (refused for its usage, its name or the
        // allow-list) is recorded every time; anything else is anonymous and sampled.
        let from_operator_ca = matches!(
            denied,
            tls::OperatorDenied::NoClientAuth
                | tls::OperatorDenied::NotOperator
                | tls::OperatorDenied::NotAllowed(_)
        );
        if from_operator_ca {
            if let Err(e) = state.broker.store().append_audit(&record).await {
                tracing::error!(error = %e, "audit append failed");
            }
        } else {
            state
                .broker
                .audit_unauthenticated(
                    audit::Class::Anonymous,
                    &addr,
                    &format!("admin/{}", denied.reason()),
                    &record,
                )
                .await;
        }
        tracing::warn!(peer = %addr, %route, reason = %denied, "admin request refused");
        Err(if denied == tls::OperatorDenied::NoCertificate {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "client-certificate-required",
                "Client certificate required",
                "admin routes need an operator certificate issued by the operator CA",
            )
        } else {
            Problem::new(
                StatusCode::FORBIDDEN,
                "client-certificate-refused",
                "Client certificate refused",
                format!(
                    "the client certificate is not an operator certificate: {}",
                    denied.reason()
                ),
            )
        })
    }
}

impl From<Error> for Problem {
    fn from(e: Error) -> Problem {
        match e {
            Error::Input(d) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid", "Invalid request", d)
            }
            Error::Conflict(d) => Problem::new(StatusCode::CONFLICT, "conflict", "Conflict", d),
            Error::NotFound(d) => Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                format!("{d} not found"),
            ),
            Error::Store(e) => {
                tracing::error!(error = %e, "store error");
                Problem::unavailable("the store is unavailable")
            }
            other => {
                tracing::error!(error = %other, "request failed");
                Problem::internal()
            }
        }
    }
}

/// The service's routes.
pub fn router<S: Store>(state: Arc<AppState<S>>, body_limit: usize) -> Router {
    let admin = Router::new()
        .route("/secrets", get(list_secrets::<S>))
        .route(
            "/secrets/{name}",
            put(put_secret::<S>).delete(delete_secret::<S>),
        )
        .route("/secrets/{name}/generate", post(generate_secret::<S>))
        .route("/secrets/{name}/rotate", post(rotate_secret::<S>))
        .route(
            "/policy",
            get(get_policy::<S>)
                .put(set_policy::<S>)
                .layer(DefaultBodyLimit::max(
                    attestation::policy::MAX_POLICY_BYTES.max(body_limit),
                )),
        )
        .route("/policy/history", get(policy_history::<S>))
        .route("/tokens/rotate-key", post(rotate_token_key::<S>))
        .route("/audit", get(audit_query::<S>).delete(audit_prune::<S>))
        .merge(pki::admin_routes::<S>());
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready::<S>))
        .route("/metrics", get(metrics_text::<S>))
        .route("/v1/challenge", post(challenge::<S>))
        .route("/v1/attest", post(attest::<S>))
        .route("/v1/token", post(token::<S>))
        .route(attestation::broker_evidence::PATH, get(own_evidence::<S>))
        .route("/.well-known/jwks.json", get(crate::kbs::jwks::<S>))
        .nest("/kbs/v0", crate::kbs::routes::<S>())
        .merge(pki::public_routes::<S>())
        .nest("/v1/admin", admin)
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "no such route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), count::<S>))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(drain::drain_unread))
        .with_state(state)
}

async fn count<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(req).await;
    state.metrics.request(&route, response.status().as_u16());
    response
}

async fn ready<S: Store>(State(state): State<Arc<AppState<S>>>) -> Response {
    // One probe at a time, its answer reused for a second: probes are anonymous, and each is
    // a committed write.
    let ping = {
        let mut last = state.readiness.lock().await;
        match last.as_ref() {
            Some((at, result)) if at.elapsed() < std::time::Duration::from_secs(1) => {
                result.clone()
            }
            _ => {
                let result = tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    state.broker.store().ping(),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(crate::store::StoreError::Unavailable(
                        "no write committed within 3 s".into(),
                    ))
                })
                .map_err(|e| e.to_string());
                *last = Some((Instant::now(), result.clone()));
                result
            }
        }
    };
    match ping {
        Ok(()) if state.simulated_root => {
            "ready (DANGER: trusts a SIMULATED AMD root; never in production)\n".into_response()
        }
        Ok(()) => "ready\n".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            Problem::unavailable("the store is unavailable").into_response()
        }
    }
}

async fn metrics_text<S: Store>(State(state): State<Arc<AppState<S>>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn challenge<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, Problem> {
    // The request needs no body; one that is sent (`{}`) is read to its end within the body
    // limit, so that an HTTP/2 stream ends cleanly after the answer.
    body.map_err(|r| body_problem(r.status(), r.body_text()))?;
    let c = state.broker.challenge(SystemTime::now())?;
    Ok(Json(c).into_response())
}

async fn attest<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    peer: Option<axum::Extension<Peer>>,
    body: Result<ProblemJson<AttestRequest>, Problem>,
) -> Response {
    let addr = peer
        .map(|p| p.addr.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let request = match body {
        Ok(ProblemJson(r)) => r,
        Err(problem) => {
            // Malformed requests release nothing and are audited like any refusal.
            let reason = if problem.status == 413 {
                "too_large"
            } else {
                "malformed"
            };
            state.metrics.outcome("refused", reason);
            let record = AuditRecord {
                id: 0,
                at: now_i64(),
                actor: format!("guest {addr}"),
                action: "attest".into(),
                outcome: "refused".into(),
                detail: json!({ "reason": reason, "detail": crate::audit::truncate(&problem.detail) }),
            };
            state
                .broker
                .audit_unauthenticated(
                    audit::Class::Anonymous,
                    &addr,
                    &format!("attest/{reason}"),
                    &record,
                )
                .await;
            return problem.into_response();
        }
    };
    let Ok(slot) = state.clone().attest_slots_owned().try_acquire_owned() else {
        state.metrics.outcome("refused", "rate_limited");
        let record = AuditRecord {
            id: 0,
            at: now_i64(),
            actor: format!("guest {addr}"),
            action: "attest".into(),
            outcome: "refused".into(),
            detail: json!({ "reason": "rate_limited", "secrets": crate::audit::names(&request.secrets) }),
        };
        state
            .broker
            .audit_unauthenticated(
                audit::Class::Anonymous,
                &addr,
                "attest/rate_limited",
                &record,
            )
            .await;
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many attestations in flight",
            "retry after the indicated time",
        );
        p.retry_after = Some(1);
        return p.into_response();
    };
    let started = Instant::now();
    // Checking (nonce, evidence, chain, report, binding) happens in this future: a client that
    // goes away (a reset HTTP/2 stream, a closed connection) cancels it, and nothing was
    // spent. Once the nonce is to be spent, the release runs to completion in its own task
    // even if the client goes away or the request times out: its outcome must be audited.
    let result = match state.broker.check(request, &addr, SystemTime::now()).await {
        Err(refusal) => Err(refusal),
        Ok(checked) => {
            to_completion(state.clone(), slot, |state| async move {
                state.broker.release(checked, SystemTime::now()).await
            })
            .await
        }
    };
    state.metrics.attest_latency(started.elapsed());
    match result {
        Ok(response) => {
            state.metrics.outcome("released", "ok");
            tracing::info!(peer = %addr, secrets = response.secrets.len(), "released");
            Json(response).into_response()
        }
        Err(refusal) => {
            state.metrics.outcome("refused", &refusal.reason());
            match &refusal {
                Refusal::Internal(d) => {
                    tracing::error!(peer = %addr, detail = %d, "attestation failed")
                }
                Refusal::Store(e) => {
                    tracing::error!(peer = %addr, error = %e, "attestation failed")
                }
                r => tracing::info!(peer = %addr, reason = %r.reason(), "refused"),
            }
            Problem::from(&refusal).into_response()
        }
    }
}

/// Runs the step that spends a nonce in its own task, holding `slot`, so that it completes
/// (and its outcome is audited) even if the client goes away or the request times out.
async fn to_completion<S, T, F, Fut>(
    state: Arc<AppState<S>>,
    slot: tokio::sync::OwnedSemaphorePermit,
    step: F,
) -> Result<T, Refusal>
where
    S: Store,
    T: Send + 'static,
    F: FnOnce(Arc<AppState<S>>) -> Fut,
    Fut: Future<Output = Result<T, Refusal>> + Send + 'static,
{
    let work = step(state);
    let task = tokio::spawn(async move {
        let _slot = slot;
        work.await
    });
    match task.await {
        Ok(r) => r,
        Err(e) => Err(Refusal::Internal(format!("attestation task failed: {e}"))),
    }
}

/// Checks an appraise-only attempt (KBS attestations, native token requests) and, once its
/// nonce is to be spent, appraises it to completion in its own task (its outcome is audited
/// even if the client goes away), holding `slot` until then.
pub(crate) async fn appraise_to_completion<S: Store>(
    state: &Arc<AppState<S>>,
    attempt: crate::release::Attempt,
    addr: &str,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Result<crate::release::Appraisal, Refusal> {
    let started = Instant::now();
    let checked = state
        .broker
        .check_attempt(attempt, addr, SystemTime::now())
        .await;
    let result = match checked {
        Err(refusal) => Err(refusal),
        Ok(checked) => {
            to_completion(state.clone(), slot, |state| async move {
                state.broker.appraise(checked, SystemTime::now()).await
            })
            .await
        }
    };
    state.metrics.attest_latency(started.elapsed());
    match &result {
        Ok(_) => state.metrics.outcome("appraised", "ok"),
        Err(refusal) => {
            state.metrics.outcome("refused", &refusal.reason());
            match refusal {
                Refusal::Internal(d) => {
                    tracing::error!(peer = %addr, detail = %d, "appraisal failed")
                }
                Refusal::Store(e) => tracing::error!(peer = %addr, error = %e, "appraisal failed"),
                r => tracing::info!(peer = %addr, reason = %r.reason(), "refused"),
            }
        }
    }
    result
}

/// A 429 for an attestation beyond the in-flight limit.
pub(crate) fn too_many_attestations() -> Problem {
    let mut p = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "Too many attestations in flight",
        "retry after the indicated time",
    );
    p.retry_after = Some(1);
    p
}

/// `POST /v1/token`: native evidence appraised into a signed attestation result (EAR),
/// nothing released. Tokens are issued when the token key exists (`[kbs] enabled`).
async fn token<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    peer: Option<axum::Extension<Peer>>,
    body: Result<ProblemJson<attestation::protocol::TokenRequest>, Problem>,
) -> Response {
    let Some(kbs) = state.kbs.clone() else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "attestation tokens are issued only with [kbs] enabled",
        )
        .into_response();
    };
    let addr = peer
        .map(|p| p.addr.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let request = match body {
        Ok(ProblemJson(r)) => r,
        Err(problem) => {
            state.metrics.outcome("refused", "malformed");
            return problem.into_response();
        }
    };
    let Ok(slot) = state.attest_slots.clone().try_acquire_owned() else {
        state.metrics.outcome("refused", "rate_limited");
        return too_many_attestations().into_response();
    };
    let nonce = request.nonce.clone();
    let public_key = match serde_json::to_value(&request.public_key) {
        Ok(v) => v,
        Err(e) => return Problem::malformed(e.to_string()).into_response(),
    };
    let attempt = crate::release::Attempt::native_token(request);
    match appraise_to_completion(&state, attempt, &addr, slot).await {
        Ok(appraisal) => match kbs.ear_token(&appraisal, &public_key, &nonce, false) {
            Ok((token, _)) => Json(attestation::protocol::TokenResponse {
                token,
                claims: appraisal.claims_json,
            })
            .into_response(),
            Err(e) => Problem::from(e).into_response(),
        },
        Err(refusal) => Problem::from(&refusal).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutSecret {
    kind: String,
    /// Base64; zeroized when the request is done.
    value: String,
}

impl Drop for PutSecret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.value);
    }
}

async fn put_secret<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    Path(name): Path<String>,
    ProblemJson(body): ProblemJson<PutSecret>,
) -> Result<Response, Problem> {
    let kind = SecretKind::parse(&body.kind)
        .filter(|k| *k != SecretKind::DataKey)
        .ok_or_else(|| Problem::malformed("kind is tls-key or opaque (data keys are generated)"))?;
    let value = zeroize::Zeroizing::new(
        attestation::protocol::decode_b64(&body.value, "value")
            .map_err(|e| Problem::malformed(e.to_string()))?,
    );
    if kind == SecretKind::TlsKey
        && state.operator.accepts(
            &crate::secrets::certificate_chain(&value),
            SystemTime::now(),
        )
    {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "Invalid request",
            "this certificate would be accepted as an operator certificate by the admin API \
             (operator CA, clientAuth and an operator URI SAN): a guest that receives it could \
             administer the broker; issue workload certificates from another CA",
        ));
    }
    let version = state
        .broker
        .put_secret(&name, kind, &value, &op, SystemTime::now())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": name, "version": version })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Generate {
    bytes: Option<usize>,
}

async fn generate_secret<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    Path(name): Path<String>,
    ProblemJson(body): ProblemJson<Generate>,
) -> Result<Response, Problem> {
    let version = state
        .broker
        .generate_secret(&name, body.bytes.unwrap_or(32), &op, SystemTime::now())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": name, "version": version })),
    )
        .into_response())
}

async fn rotate_token_key<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
) -> Result<Response, Problem> {
    let Some(kbs) = &state.kbs else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "attestation tokens are issued only with [kbs] enabled",
        ));
    };
    let version = kbs
        .tokens()
        .rotate(state.broker.store(), state.broker.keyring(), &op, now_i64())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "purpose": crate::kbs::token::PURPOSE, "version": version })),
    )
        .into_response())
}

async fn rotate_secret<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    let version = state
        .broker
        .rotate_secret(&name, &op, SystemTime::now())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": name, "version": version })),
    )
        .into_response())
}

async fn delete_secret<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    state
        .broker
        .delete_secret(&name, &op, SystemTime::now())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_secrets<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(_op): Operator,
) -> Result<Response, Problem> {
    let list = state
        .broker
        .store()
        .list_secrets()
        .await
        .map_err(Error::from)?;
    Ok(Json(json!({ "secrets": list })).into_response())
}

async fn set_policy<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    body: Result<String, axum::extract::rejection::StringRejection>,
) -> Result<Response, Problem> {
    let body = body.map_err(|r| body_problem(r.status(), r.body_text()))?;
    let set = state
        .broker
        .set_policy_revoking(&body, &op, SystemTime::now())
        .await?;
    Ok((StatusCode::CREATED, Json(set)).into_response())
}

async fn get_policy<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(_op): Operator,
) -> Result<Response, Problem> {
    match state
        .broker
        .store()
        .active_policy()
        .await
        .map_err(Error::from)?
    {
        Some(p) => Ok(Json(p).into_response()),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "no policy is set",
        )),
    }
}

async fn policy_history<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(_op): Operator,
) -> Result<Response, Problem> {
    let h = state
        .broker
        .store()
        .policy_history()
        .await
        .map_err(Error::from)?;
    Ok(Json(json!({ "versions": h })).into_response())
}

async fn audit_query<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(_op): Operator,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|e| Problem::malformed(audit::truncate(&e.body_text())))?;
    let records = state
        .broker
        .store()
        .query_audit(&q)
        .await
        .map_err(Error::from)?;
    // A full page may have older records behind it: say where the next page starts.
    let limit = usize::try_from(q.limit.unwrap_or(100).clamp(1, 1000)).unwrap_or(100);
    let next = if records.len() == limit {
        records.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(json!({ "records": records, "next_before_id": next })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneQuery {
    /// Seconds since the epoch: records before this are deleted.
    before: i64,
}

async fn audit_prune<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(op): Operator,
    query: Result<Query<PruneQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|e| Problem::malformed(audit::truncate(&e.body_text())))?;
    let before = u64::try_from(q.before)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .ok_or_else(|| Problem::malformed("before is seconds since the epoch"))?;
    let deleted = state
        .broker
        .prune_audit(before, &op, SystemTime::now())
        .await?;
    Ok(Json(json!({ "deleted": deleted })).into_response())
}

/// Builds the service state from settings: store, master key, verifier, TLS.
pub async fn build(
    settings: &Settings,
) -> Result<(Arc<AppState<AnyStore>>, Arc<tls::TlsState>), Error> {
    let store = AnyStore::open(&settings.store).await?;
    let master = crate::keys::open_master_key(&settings.master_key, &store, now_i64()).await?;
    let mut anchors = TrustAnchors::amd()?;
    if let Some(root) = &settings.dangerous_trust_simulated_root {
        // The first certificate is the simulated ARK; any others are intermediates (its ASK,
        // ASVK) for evidence that carries only the VCEK, as Azure's does.
        anchors = crate::evidence::trust_simulated_root(
            anchors,
            root,
            "attestation.dangerous_trust_simulated_root",
        )?;
        // On standard error whatever the log filter, and in /metrics and /readyz.
        let banner = "!".repeat(78);
        let warning = format!(
            "DANGER: this broker trusts a SIMULATED AMD root ({}, attestation.dangerous_trust_simulated_root). \
             Evidence from a simulated platform will be accepted as genuine. Never use this in production.",
            root.display()
        );
        #[allow(clippy::print_stderr)]
        {
            eprintln!("{banner}\n{warning}\n{banner}");
        }
        tracing::warn!("{warning}");
    }
    let tls_state = Arc::new(tls::TlsState::load(&settings.tls)?);
    let keyring = Arc::new(Keyring::load(master, &store, settings.nonce_ttl).await?);
    let broker = Broker::new(store, Verifier::new(anchors), keyring, settings.nonce_ttl)
        .with_kds(crate::kds::Kds::new(&settings.kds)?)
        .with_audit_budget(settings.audit.budget)
        .with_pki_urls(settings.pki_base_url.clone());
    let mut metrics = metrics::Metrics::new();
    metrics.register_store(broker.store().commit_metrics());
    metrics.set_simulated_root(settings.dangerous_trust_simulated_root.is_some());
    // No released certificate may be an admin credential (docs/threat-model.md).
    for (name, chain) in broker.tls_key_chains().await? {
        if tls_state.operator().accepts(&chain, SystemTime::now()) {
            return Err(Error::Config(format!(
                "secret {name}: its certificate would be accepted as an operator certificate \
                 (operator CA, clientAuth and an operator URI SAN), so a guest that receives it \
                 could administer the broker; delete it (broker secret delete {name}) or \
                 reissue it from another CA before starting"
            )));
        }
    }
    let kbs = if settings.kbs.enabled {
        let tokens =
            crate::kbs::token::TokenKeys::load(broker.store(), broker.keyring(), now_i64()).await?;
        Some(Arc::new(crate::kbs::Kbs::new(
            crate::kbs::session::Sessions::new(
                broker.keyring().clone(),
                settings.nonce_ttl.max(settings.kbs.token_ttl),
            ),
            tokens,
            settings.kbs.clone(),
        )))
    } else {
        None
    };
    let own_evidence = if settings.platform.publish_evidence {
        Some(Arc::new(OwnEvidence {
            platform: settings.platform.choice.open()?,
            tls: tls_state.clone(),
            slots: Semaphore::new(OWN_EVIDENCE_SLOTS),
        }))
    } else {
        None
    };
    let state = Arc::new(AppState {
        own_evidence,
        kbs,
        broker,
        metrics,
        simulated_root: settings.dangerous_trust_simulated_root.is_some(),
        readiness: tokio::sync::Mutex::new(None),
        operator: tls_state.operator(),
        attest_slots: Arc::new(Semaphore::new(settings.limits.max_inflight_attestations)),
    });
    Ok((state, tls_state))
}

/// Runs the service on `listener` until `shutdown` completes, then drains connections.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (state, tls_state) = build(&settings).await?;
    serve(listener, settings, state, tls_state, shutdown).await
}

/// Serves a built state (split from [`run`] for tests that need the state).
pub async fn serve<S: Store>(
    listener: TcpListener,
    settings: Settings,
    state: Arc<AppState<S>>,
    tls_state: Arc<tls::TlsState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let app = router(state.clone(), settings.limits.body_bytes).layer(
        tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.limits.request_timeout,
        ),
    );
    let connections = Arc::new(Semaphore::new(settings.limits.max_connections));
    let sources = conn::KeyLimiter::new(settings.limits.max_connections_per_source);
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.limits.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .keep_alive_interval(Some(settings.limits.idle_timeout / 2))
        .keep_alive_timeout(settings.limits.idle_timeout / 2);

    // Background work: TLS reload and used-nonce purge.
    let reload = {
        let tls_state = tls_state.clone();
        let every = settings.tls.reload_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match tls_state.reload_if_changed() {
                    Ok(true) => tracing::info!("TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "TLS reload failed; keeping the current certificate")
                    }
                }
            }
        })
    };
    // The server certificate's OCSP response, fetched and stapled in the background.
    let stapler = tls_state.staples_itself().then(|| {
        tokio::spawn(stapler::run(
            tls_state.clone(),
            state.metrics.ocsp_staple_expiry(),
        ))
    });
    // Data keys: pick up a rotation another replica or `broker keys rotate` began, so that new
    // records and nonces move to the new key and superseded nonce keys age out.
    let refresh_keys = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::keyring::REFRESH_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let broker = &state.broker;
                if let Err(e) = broker.keyring().refresh(broker.store()).await {
                    tracing::warn!(error = %e, "data key refresh failed");
                }
            }
        })
    };
    let purge = {
        let state = state.clone();
        let retention = settings.audit.retention;
        let mut last_retention: Option<Instant> = None;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            tick.tick().await;
            loop {
                tick.tick().await;
                // Ten minutes of grace past expiry: longer than any request may take, so a
                // nonce is never forgotten while a request holding it is still in flight.
                if let Err(e) = state.broker.store().purge_nonces(now_i64() - 600).await {
                    tracing::warn!(error = %e, "nonce purge failed");
                }
                state
                    .broker
                    .flush_audit_summary(SystemTime::now(), std::time::Duration::from_secs(60))
                    .await;
                if let Some(retention) = retention
                    && last_retention.is_none_or(|t: Instant| {
                        t.elapsed() >= std::time::Duration::from_secs(86_400)
                    })
                {
                    last_retention = Some(Instant::now());
                    let now = SystemTime::now();
                    let before = now.checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
                    match state
                        .broker
                        .prune_audit(before, "broker (audit.retention_days)", now)
                        .await
                    {
                        Ok(n) => tracing::info!(deleted = n, "audit retention applied"),
                        Err(e) => tracing::warn!(error = %e, "audit retention failed"),
                    }
                }
            }
        })
    };

    tracing::info!(addr = %listener.local_addr().map_err(|e| Error::Config(e.to_string()))?, "broker listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(source) = sources.acquire(conn::source_key(addr.ip())) else {
            tracing::debug!(%addr, "this source has its share of connections; closing");
            state.metrics.connection_refused("per_source");
            drop(stream);
            continue;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%addr, "connection limit reached; closing connection");
            state.metrics.connection_refused("limit");
            drop(stream);
            continue;
        };
        let Some(config) = tls_state.config() else {
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%addr, error = %e, "TCP_NODELAY");
        }
        let connection = Connection {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            app: app.clone(),
            builder: builder.clone(),
            header_timeout: settings.limits.header_timeout,
            idle_timeout: settings.limits.idle_timeout,
            max_age: settings.limits.max_connection_age,
            shutdown: shutdown_rx.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            let _source = source;
            connection.serve(stream, addr).await;
        });
    }
    tracing::info!("shutting down: draining connections");
    reload.abort();
    purge.abort();
    refresh_keys.abort();
    if let Some(stapler) = stapler {
        stapler.abort();
    }
    drop(listener);
    let _ = shutdown_tx.send(true);
    let all = u32::try_from(settings.limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(
        std::time::Duration::from_secs(10),
        connections.acquire_many(all),
    )
    .await
    .is_err()
    {
        tracing::warn!("connections did not drain within 10 s");
    }
    // Releases run in tasks of their own, to completion: wait for those still running (a
    // spent nonce's outcome is audited before the process exits).
    let inflight = u32::try_from(settings.limits.max_inflight_attestations).unwrap_or(u32::MAX);
    if tokio::time::timeout(
        settings.limits.request_timeout,
        state.attest_slots.acquire_many(inflight),
    )
    .await
    .is_err()
    {
        tracing::warn!("attestations still running at shutdown");
    }
    state
        .broker
        .flush_audit_summary(SystemTime::now(), std::time::Duration::from_secs(60))
        .await;
    Ok(())
}

/// One accepted TCP connection: TLS handshake, then HTTP/1.1 or HTTP/2 as ALPN chose (no
/// sniffing of the first bytes), watched by [`conn::Activity`] deadlines.
struct Connection {
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    builder: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    header_timeout: std::time::Duration,
    idle_timeout: std::time::Duration,
    max_age: std::time::Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Connection {
    async fn serve(mut self, stream: tokio::net::TcpStream, addr: SocketAddr) {
        use hyper_util::rt::TokioIo;
        use hyper_util::service::TowerToHyperService;
        use tower::ServiceExt;

        // The deadline for a first complete request starts now: the handshake counts.
        let activity = conn::Activity::new();
        let retire_at = tokio::time::Instant::now() + self.max_age;
        let tls =
            match tokio::time::timeout(self.header_timeout, self.acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "TLS handshake timed out");
                    return;
                }
            };
        let session = tls.get_ref().1;
        let h2 = session.alpn_protocol() == Some(b"h2".as_slice());
        let client_chain = session
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
            .unwrap_or_default();
        let peer = Peer { addr, client_chain };
        let svc = self
            .app
            .map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
        let svc = conn::Tracked::new(svc, activity.clone());
        let builder = if h2 {
            self.builder.http2_only()
        } else {
            self.builder.http1_only()
        };
        let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
        tokio::pin!(conn);
        let mut draining = *self.shutdown.borrow();
        if draining {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            let deadline = activity.deadline(self.header_timeout, self.idle_timeout);
            let wake =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + self.header_timeout);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%addr, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(wake) => {
                    if !draining && tokio::time::Instant::now() >= retire_at {
                        // Old enough: finish what is in flight, then close (HTTP/2 GOAWAY).
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                        continue;
                    }
                    let due = activity
                        .deadline(self.header_timeout, self.idle_timeout)
                        .is_some_and(|d| d <= tokio::time::Instant::now());
                    if due {
                        tracing::debug!(%addr, "closing a connection without a request in flight");
                        conn.as_mut().graceful_shutdown();
                        // A polite close (HTTP/2 GOAWAY) if the peer reads it; then it goes.
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn.as_mut()).await;
                        return;
                    }
                }
                changed = self.shutdown.changed(), if !draining => {
                    if changed.is_err() || *self.shutdown.borrow() {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}
