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
use crate::config::{Settings, StoreSettings};
use crate::keys::MasterKey;
use crate::nonce::NonceAuthority;
use crate::release::{Broker, Refusal};
use crate::secrets::SecretKind;
use crate::store::{AuditQuery, AuditRecord, SqliteStore, Store};

pub mod metrics;
pub mod problem;
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
    } else {
        let mut p = Problem::malformed(text);
        p.status = status.as_u16();
        p
    }
}

/// An operator authenticated by a client certificate from the operator CA. Refusals are
/// audited.
pub struct Operator(pub String);

impl<S: Store> FromRequestParts<Arc<AppState<S>>> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState<S>>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<Peer>().cloned();
        let route = parts
            .extensions
            .get::<axum::extract::OriginalUri>()
            .map(|u| u.0.path().to_string())
            .unwrap_or_else(|| parts.uri.path().to_string());
        let (actor, result) = match &peer {
            None => (
                "unknown".to_string(),
                Err("no client certificate".to_string()),
            ),
            Some(p) if p.client_chain.is_empty() => (
                format!("anonymous {}", p.addr.ip()),
                Err("no client certificate".to_string()),
            ),
            Some(p) => {
                let subject = p.client_chain.first().map(tls::subject).unwrap_or_default();
                let verified = state
                    .operator
                    .verify_chain(&p.client_chain, SystemTime::now());
                (subject, verified)
            }
        };
        match result {
            Ok(()) => Ok(Operator(actor)),
            Err(reason) => {
                let no_cert = reason == "no client certificate";
                let record = AuditRecord {
                    id: 0,
                    at: now_i64(),
                    actor: actor.clone(),
                    action: "admin.denied".into(),
                    outcome: "refused".into(),
                    detail: json!({ "route": route, "method": parts.method.as_str(), "reason": reason }),
                };
                if let Err(e) = state.broker.store().append_audit(&record).await {
                    tracing::error!(error = %e, "audit append failed");
                }
                tracing::warn!(%actor, %route, %reason, "admin request refused");
                Err(if no_cert {
                    Problem::new(
                        StatusCode::UNAUTHORIZED,
                        "client-certificate-required",
                        "Client certificate required",
                        "admin routes need a client certificate issued by the operator CA",
                    )
                } else {
                    Problem::new(
                        StatusCode::FORBIDDEN,
                        "client-certificate-refused",
                        "Client certificate refused",
                        "the client certificate is not issued by the operator CA",
                    )
                })
            }
        }
    }
}

fn now_i64() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl From<Error> for Problem {
    fn from(e: Error) -> Problem {
        match e {
            Error::Input(d) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid", "Invalid request", d)
            }
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
        .route("/policy", get(get_policy::<S>).put(set_policy::<S>))
        .route("/policy/history", get(policy_history::<S>))
        .route("/audit", get(audit::<S>));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready::<S>))
        .route("/metrics", get(metrics_text::<S>))
        .route("/v1/challenge", post(challenge::<S>))
        .route("/v1/attest", post(attest::<S>))
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
    match state.broker.store().ping().await {
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

async fn challenge<S: Store>(State(state): State<Arc<AppState<S>>>) -> Result<Response, Problem> {
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
            state.metrics.outcome(
                "refused",
                if problem.status == 413 {
                    "too_large"
                } else {
                    "malformed"
                },
            );
            let record = AuditRecord {
                id: 0,
                at: now_i64(),
                actor: format!("guest {addr}"),
                action: "attest".into(),
                outcome: "refused".into(),
                detail: json!({ "reason": if problem.status == 413 { "too_large" } else { "malformed" }, "detail": problem.detail }),
            };
            if let Err(e) = state.broker.store().append_audit(&record).await {
                tracing::error!(error = %e, "audit append failed");
            }
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
            detail: json!({ "reason": "rate_limited", "secrets": request.secrets }),
        };
        if let Err(e) = state.broker.store().append_audit(&record).await {
            tracing::error!(error = %e, "audit append failed");
        }
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
    // Run to completion even if the client goes away or the request times out: once a nonce
    // is spent, the outcome must be audited.
    let task = {
        let state = state.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            let _slot = slot;
            state.broker.attest(request, &addr, SystemTime::now()).await
        })
    };
    let result = match task.await {
        Ok(r) => r,
        Err(e) => Err(Refusal::Internal(format!("attestation task failed: {e}"))),
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
    let version = state
        .broker
        .set_policy(&body, &op, SystemTime::now())
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "version": version }))).into_response())
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

async fn audit<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    Operator(_op): Operator,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|e| Problem::malformed(e.body_text()))?;
    let records = state
        .broker
        .store()
        .query_audit(&q)
        .await
        .map_err(Error::from)?;
    Ok(Json(json!({ "records": records })).into_response())
}

/// Builds the service state from settings: store, master key, verifier, TLS.
pub async fn build(
    settings: &Settings,
) -> Result<(Arc<AppState<SqliteStore>>, Arc<tls::TlsState>), Error> {
    let master = MasterKey::load(&settings.master_key)?;
    let store = match &settings.store {
        StoreSettings::Sqlite(path) => SqliteStore::open(path).await?,
    };
    let mut anchors = TrustAnchors::amd()?;
    if let Some(root) = &settings.dangerous_trust_simulated_root {
        let der = crate::evidence::read_certificates(root)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Config(format!("{}: no certificate", root.display())))?;
        anchors = anchors.dangerous_trust_simulated_root(&der)?;
        let banner = "!".repeat(78);
        tracing::warn!("{banner}");
        tracing::warn!(
            root = %root.display(),
            "DANGER: this broker trusts a SIMULATED AMD root (attestation.dangerous_trust_simulated_root). \
             Evidence from a simulated platform will be accepted as genuine. Never use this in production."
        );
        tracing::warn!("{banner}");
    }
    let tls_state = Arc::new(tls::TlsState::load(&settings.tls)?);
    let broker = Broker::new(
        store,
        Verifier::new(anchors),
        NonceAuthority::new(master.nonce_key()?),
        master.record_cipher()?,
        settings.nonce_ttl,
    )
    .with_kds(crate::kds::Kds::new(&settings.kds)?);
    let state = Arc::new(AppState {
        broker,
        metrics: metrics::Metrics::new(),
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
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let app = router(state.clone(), settings.limits.body_bytes).layer(
        tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.limits.request_timeout,
        ),
    );
    let connections = Arc::new(Semaphore::new(settings.limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
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
    let purge = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                // Ten minutes of grace past expiry: longer than any request may take, so a
                // nonce is never forgotten while a request holding it is still in flight.
                if let Err(e) = state.broker.store().purge_nonces(now_i64() - 600).await {
                    tracing::warn!(error = %e, "nonce purge failed");
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%addr, "connection limit reached; closing connection");
            drop(stream);
            continue;
        };
        let Some(config) = tls_state.config() else {
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = settings.limits.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
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
            let client_chain = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                .unwrap_or_default();
            let peer = Peer { addr, client_chain };
            let svc = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(svc));
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: draining connections");
    reload.abort();
    purge.abort();
    drop(listener);
    if tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections did not drain within 10 s");
    }
    Ok(())
}
