//! The private CA's routes (docs/pki.md): the admin API's `/v1/admin/pki/…` and the public
//! trust bundle `GET /v1/pki/ca`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::problem::Problem;
use super::{AppState, Operator, ProblemJson, body_problem};
use crate::pki::{self, NewCa};
use crate::store::Store;

/// Routes under `/v1/admin`.
pub(super) fn admin_routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        .route("/pki/ca", get(show::<S>).post(create::<S>))
        .route("/pki/ca/rotate", post(rotate::<S>))
        .route("/pki/ca/certificate", put(import::<S>))
        .route("/pki/certificates", get(list_issued::<S>))
}

/// Public routes.
pub(super) fn public_routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new().route("/v1/pki/ca", get(bundle::<S>))
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
