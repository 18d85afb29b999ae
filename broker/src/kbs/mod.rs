//! The Confidential Containers KBS front end (`/kbs/v0`): unmodified KBS clients (the
//! attestation agent, the confidential data hub, `kbs-client`) get their resources from the
//! broker's own release engine.
//!
//! It is a translation, not a second path: `/auth` hands out a broker nonce; `/attest`
//! decodes the KBS evidence into the broker's evidence ([`attestation::kbs`]), computes the
//! KBS binding and hands both to [`Broker::check_attempt`] and [`Broker::appraise`] (the same
//! parse → endorse → verify → policy steps, the nonce spent and audited in the same group
//! commit); `/resource/<repo>/<type>/<tag>` releases one secret through
//! [`Broker::release_vouched`] on the claims the session carries, encrypted to the TEE key as
//! a JWE. Sessions are sealed cookies ([`session`]); the attestation result is an EAR token
//! ([`token`]) that also works as a bearer credential ("passport mode").
//!
//! Status codes are what the clients act on: 401 only when the session is missing, expired
//! or not this broker's (the client starts a new handshake), 403 for refusals (the client
//! stops without retrying), 404 for resources that do not exist.

pub mod jwe;
pub mod session;
pub mod token;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use attestation::kbs::{self as wire, HashAlgorithm};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::KbsSettings;
use crate::release::{Appraisal, Attempt, Binding, ExpectedBinding, FrontEnd, Refusal, Vouched};
use crate::server::{AppState, Peer, Problem, ProblemJson};
use crate::store::Store;
use jwe::TeeKey;
use session::{Session, SessionError, Sessions};
use token::TokenKeys;

/// The KBS front end's state: session sealing, token keys, settings.
#[derive(Debug)]
pub struct Kbs {
    sessions: Sessions,
    tokens: TokenKeys,
    settings: KbsSettings,
}

impl Kbs {
    /// The front end with these parts.
    pub fn new(sessions: Sessions, tokens: TokenKeys, settings: KbsSettings) -> Kbs {
        Kbs {
            sessions,
            tokens,
            settings,
        }
    }

    /// The token keys (for the JWKS and rotation).
    pub fn tokens(&self) -> &TokenKeys {
        &self.tokens
    }

    /// The session a cookie carries. One this replica cannot open may be sealed under a data
    /// key another replica made since this one last loaded them: reload (rate-limited) and
    /// try again.
    async fn session<S: Store>(
        &self,
        state: &AppState<S>,
        cookie: Option<&str>,
        now: u64,
    ) -> Result<Session, SessionError> {
        match self.sessions.open(cookie, now) {
            Err(SessionError::Invalid)
                if state
                    .broker
                    .keyring()
                    .refresh_prompted(state.broker.store())
                    .await
                    .unwrap_or(false) =>
            {
                self.sessions.open(cookie, now)
            }
            other => other,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The secret a resource path names, by the default rule: `<repo>/<type>/<tag>` is the secret
/// `<repo>.<type>.<tag>`, each part 1 to 42 letters, digits, `_` or `-`. `None` for a path
/// that is not one.
pub fn resource_path(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').collect();
    let valid = |p: &&str| {
        (1..=42).contains(&p.len())
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    (parts.len() == 3 && parts.iter().all(valid)).then(|| parts.join("."))
}

/// The routes under `/kbs/v0`.
pub fn routes<S: Store>() -> Router<Arc<AppState<S>>> {
    Router::new()
        .route("/auth", post(auth::<S>))
        .route("/attest", post(attest::<S>))
        .route("/resource/{repo}/{kind}/{tag}", get(resource::<S>))
}

/// `GET /.well-known/jwks.json`: the token keys.
pub async fn jwks<S: Store>(State(state): State<Arc<AppState<S>>>) -> Response {
    match &state.kbs {
        Some(kbs) => axum::Json(kbs.tokens.jwks()).into_response(),
        None => not_enabled(),
    }
}

fn not_enabled() -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "the KBS front end is not enabled ([kbs] enabled = true)",
    )
    .into_response()
}

fn no_session(e: SessionError) -> Response {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "kbs-session",
        "No KBS session",
        e.to_string(),
    )
    .into_response()
}

fn peer_addr(peer: Option<axum::Extension<Peer>>) -> String {
    peer.map(|p| p.addr.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthRequest {
    version: String,
    tee: String,
    #[serde(rename = "extra-params", default)]
    extra_params: Value,
}

/// The TEE kinds whose evidence the broker verifies.
const TEES: [&str; 2] = ["snp", "az-snp-vtpm"];

/// The hash to select from what the client supports: SHA-512 (the whole REPORT_DATA)
/// whenever possible.
fn select_hash(extra: &Value) -> Result<HashAlgorithm, String> {
    let Some(list) = extra.get("supported-hash-algorithms") else {
        // Clients that list nothing bind with SHA-384 unless told otherwise; ask for
        // SHA-512 and accept the SHA-384 fallback (audited).
        return Ok(HashAlgorithm::Sha512);
    };
    let names: Vec<&str> = list
        .as_array()
        .ok_or("extra-params.supported-hash-algorithms is a list")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if names.contains(&"sha512") {
        Ok(HashAlgorithm::Sha512)
    } else if names.contains(&"sha384") {
        Ok(HashAlgorithm::Sha384)
    } else {
        Err(format!(
            "none of the supported hash algorithms {names:?} is sha512 or sha384"
        ))
    }
}

async fn auth<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    body: Result<ProblemJson<AuthRequest>, Problem>,
) -> Response {
    let Some(kbs) = &state.kbs else {
        return not_enabled();
    };
    let request = match body {
        Ok(ProblemJson(r)) => r,
        Err(p) => return p.into_response(),
    };
    if request.version != wire::PROTOCOL_VERSION {
        return Problem::malformed(format!(
            "KBS protocol version {:?} is not supported (only {})",
            request.version,
            wire::PROTOCOL_VERSION
        ))
        .with_check("kbs_version")
        .into_response();
    }
    if !TEES.contains(&request.tee.as_str()) {
        return Problem::malformed(format!(
            "TEE kind {:?} is not supported: this broker verifies snp and az-snp-vtpm evidence only",
            request.tee
        ))
        .with_check("kbs_tee")
        .into_response();
    }
    let hash = match select_hash(&request.extra_params) {
        Ok(h) => h,
        Err(e) => return Problem::malformed(e).into_response(),
    };
    let challenge = match state.broker.challenge(SystemTime::now()) {
        Ok(c) => c,
        Err(e) => return Problem::from(e).into_response(),
    };
    let session = Session::Challenge {
        exp: unix_now() + state.broker.nonce_ttl().as_secs(),
        nonce: challenge.nonce.clone(),
        tee: request.tee,
        hash: hash.name().into(),
    };
    let cookie = match kbs.sessions.seal(&session) {
        Ok(c) => c,
        Err(e) => return Problem::from(e).into_response(),
    };
    with_cookie(
        axum::Json(json!({
            "nonce": challenge.nonce,
            "extra-params": { "selected-hash-algorithm": hash.name() },
        }))
        .into_response(),
        &cookie,
    )
}

fn with_cookie(mut response: Response, value: &str) -> Response {
    // The attributes the clients were observed to keep and replay.
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{}={value}; Path=/kbs/v0; HttpOnly",
        session::COOKIE
    )) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeData {
    nonce: String,
    #[serde(rename = "tee-pubkey")]
    tee_pubkey: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeeEvidence {
    primary_evidence: Box<serde_json::value::RawValue>,
    additional_evidence: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AttestBody {
    #[serde(default)]
    init_data: Option<Value>,
    runtime_data: RuntimeData,
    tee_evidence: TeeEvidence,
}

/// What `/attest` checked before the broker takes over.
struct Translated {
    attempt: Attempt,
    tee_pubkey: Value,
    init_data: bool,
}

/// From the challenge session and the KBS body to the broker's attempt: the TEE key checked,
/// the evidence decoded, the binding computed. Refusals are problems to answer as they are.
fn translate(session: Session, body: AttestBody) -> Result<Translated, Problem> {
    let Session::Challenge {
        nonce, tee, hash, ..
    } = session
    else {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "kbs-session",
            "No KBS session",
            "this session has attested already: start again with /kbs/v0/auth",
        ));
    };
    if body.runtime_data.nonce != nonce {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "kbs-session",
            "No KBS session",
            "runtime-data.nonce is not this session's nonce: start again with /kbs/v0/auth",
        ));
    }
    // Init data (the pod's initdata document) is not interpreted: nothing is decided on
    // it. What vouches for it is HOST_DATA, which the runtime sets to its digest and the
    // policy can pin; the token says that it was not verified here.
    let init_data = body.init_data.as_ref().is_some_and(|v| !v.is_null());
    TeeKey::from_jwk(&body.runtime_data.tee_pubkey)
        .map_err(|e| Problem::malformed(e.to_string()).with_check("kbs_tee_pubkey"))?;
    let evidence = match tee.as_str() {
        "snp" => wire::snp_evidence(body.tee_evidence.primary_evidence.get()),
        _ => wire::az_snp_vtpm_evidence(body.tee_evidence.primary_evidence.get()),
    }
    .map_err(|e| Problem::malformed(e.to_string()).with_check(e.check()))?;
    let runtime_data = wire::runtime_data(
        &body.tee_evidence.additional_evidence,
        &nonce,
        &body.runtime_data.tee_pubkey,
    )
    .map_err(|e| Problem::malformed(e.to_string()))?;
    let digest = |alg: HashAlgorithm| alg.digest(&runtime_data);
    let expected = |d: Vec<u8>, label| ExpectedBinding {
        report_data: wire::report_data(&d),
        qualifying: d,
        label,
    };
    let mut bindings = Vec::new();
    if hash == HashAlgorithm::Sha512.name() {
        bindings.push(expected(digest(HashAlgorithm::Sha512), "sha512"));
        // A client that did not honour the selection binds with SHA-384 (zero-padded).
        bindings.push(expected(
            digest(HashAlgorithm::Sha384),
            "sha384 (the client ignored the selected sha512)",
        ));
    } else {
        bindings.push(expected(digest(HashAlgorithm::Sha384), "sha384"));
    }
    Ok(Translated {
        attempt: Attempt {
            front_end: FrontEnd::Kbs,
            nonce,
            evidence,
            binding: Binding::Digests(bindings),
            secrets: Vec::new(),
            certificates: Vec::new(),
            appraise_only: true,
        },
        tee_pubkey: body.runtime_data.tee_pubkey,
        init_data,
    })
}

/// A refusal as the KBS clients need it: a nonce problem means a new handshake (401).
fn kbs_problem(refusal: &Refusal) -> Problem {
    match refusal {
        Refusal::Nonce(_) | Refusal::NonceReplay => {
            let mut p = Problem::from(refusal);
            p.status = StatusCode::UNAUTHORIZED.as_u16();
            p
        }
        other => Problem::from(other),
    }
}

async fn attest<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
    body: Result<ProblemJson<AttestBody>, Problem>,
) -> Response {
    let Some(kbs) = state.kbs.clone() else {
        return not_enabled();
    };
    let addr = peer_addr(peer);
    let cookie = session::cookie_value(&headers);
    let session = match kbs.session(&state, cookie.as_deref(), unix_now()).await {
        Ok(s) => s,
        Err(e) => return no_session(e),
    };
    let translated = match body.and_then(|ProblemJson(b)| translate(session, b)) {
        Ok(t) => t,
        Err(problem) => {
            // Refused before verification: audited like the native protocol's malformed
            // requests, through the sampler's budget for unauthenticated refusals.
            let reason = problem.check.clone().unwrap_or_else(|| "malformed".into());
            state.metrics.outcome("refused", &reason);
            let record = crate::store::AuditRecord {
                id: 0,
                at: i64::try_from(unix_now()).unwrap_or(i64::MAX),
                actor: format!("guest {addr}"),
                action: "attest".into(),
                outcome: "refused".into(),
                detail: json!({
                    "front_end": "kbs",
                    "reason": reason,
                    "status": problem.status,
                    "detail": crate::audit::truncate(&problem.detail),
                }),
            };
            state
                .broker
                .audit_unauthenticated(
                    crate::audit::Class::Anonymous,
                    &addr,
                    &format!("attest/{reason}"),
                    &record,
                )
                .await;
            return problem.into_response();
        }
    };
    let Ok(slot) = state.attest_slots.clone().try_acquire_owned() else {
        state.metrics.outcome("refused", "rate_limited");
        return crate::server::too_many_attestations().into_response();
    };
    let nonce = translated.attempt.nonce.clone();
    let appraisal = match crate::server::appraise_to_completion(
        &state,
        translated.attempt,
        &addr,
        slot,
    )
    .await
    {
        Ok(a) => a,
        Err(refusal) => return kbs_problem(&refusal).into_response(),
    };
    match issue(
        &kbs,
        &appraisal,
        translated.tee_pubkey,
        &nonce,
        translated.init_data,
    ) {
        Ok((token, cookie)) => {
            tracing::info!(peer = %addr, rules = ?appraisal.rules, "KBS attestation appraised");
            with_cookie(
                axum::Json(json!({ "token": token })).into_response(),
                &cookie,
            )
        }
        Err(e) => Problem::from(e).into_response(),
    }
}

fn log_refusal(addr: &str, refusal: &Refusal) {
    match refusal {
        Refusal::Internal(d) => tracing::error!(peer = %addr, detail = %d, "KBS request failed"),
        Refusal::Store(e) => tracing::error!(peer = %addr, error = %e, "KBS request failed"),
        r => tracing::info!(peer = %addr, reason = %r.reason(), "KBS request refused"),
    }
}

/// The EAR token and the attested session cookie for an appraisal.
fn issue(
    kbs: &Kbs,
    appraisal: &Appraisal,
    tee_pubkey: Value,
    nonce: &str,
    init_data: bool,
) -> Result<(String, String), crate::Error> {
    let (token, exp) = kbs.ear_token(appraisal, &tee_pubkey, nonce, init_data)?;
    let cookie = kbs.sessions.seal(&Session::Attested {
        exp,
        tee_pubkey,
        claims: appraisal.claims_json.clone(),
        claims_sha256: appraisal.claims_digest.clone(),
    })?;
    Ok((token, cookie))
}

impl Kbs {
    /// An EAR token for an appraisal whose evidence bound `tee_pubkey` (a JWK for KBS
    /// clients, the native HPKE key for `/v1/token`); and its expiry.
    pub fn ear_token(
        &self,
        appraisal: &Appraisal,
        tee_pubkey: &Value,
        nonce: &str,
        init_data: bool,
    ) -> Result<(String, u64), crate::Error> {
        let kbs = self;
        let now = unix_now();
        let exp = now + kbs.settings.token_ttl.as_secs();
        let status = if appraisal.rules.is_empty() {
            "contraindicated"
        } else {
            "affirming"
        };
        let mut claims = json!({
            "eat_profile": token::EAR_PROFILE,
            "iat": now,
            "exp": exp,
            "iss": kbs.settings.issuer,
            "eat_nonce": nonce,
            "ear_verifier_id": {
                "developer": "snp-key-broker",
                "build": concat!("broker ", env!("CARGO_PKG_VERSION")),
            },
            "submods": { "cpu0": {
                "ear_status": status,
                "ear_appraisal_policy_ids": [format!("policy:v{}", appraisal.policy_version)],
                "ear_attester_claims": appraisal.claims_json,
                "ear_verifier_claims": {
                    "tee-pubkey": tee_pubkey,
                    "claims_sha256": appraisal.claims_digest,
                    "rules": appraisal.rules,
                    "evidence": appraisal.evidence,
                    "binding": appraisal.bound_by,
                },
            }},
        });
        if init_data {
            claims["submods"]["cpu0"]["ear_verifier_claims"]["init_data"] =
                json!("present, not verified by the broker: pin host_data in the policy");
        }
        Ok((kbs.tokens.sign(&claims)?, exp))
    }
}

/// The claims and TEE key a resource request is authorized by: a bearer EAR token
/// (passport mode) or the attested session cookie.
async fn authorize<S: Store>(
    state: &AppState<S>,
    kbs: &Kbs,
    headers: &HeaderMap,
    peer: &str,
) -> Result<(Vouched, TeeKey), Response> {
    let now = unix_now();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let (claims, digest, jwk, session) = if let Some(t) = bearer {
        if let Some(kid) = token::token_kid(t)
            && !kbs.tokens.knows(&kid)
        {
            // Another replica may have rotated the key since this one loaded it.
            if let Err(e) = kbs
                .tokens
                .reload_prompted(state.broker.store(), state.broker.keyring())
                .await
            {
                tracing::warn!(error = %e, "token keys could not be reloaded");
            }
        }
        let claims = kbs.tokens.verify(t, now).map_err(|e| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "kbs-token",
                "Attestation token refused",
                e.to_string(),
            )
            .into_response()
        })?;
        let sub = &claims["submods"]["cpu0"];
        (
            sub["ear_attester_claims"].clone(),
            sub["ear_verifier_claims"]["claims_sha256"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            sub["ear_verifier_claims"]["tee-pubkey"].clone(),
            "token",
        )
    } else {
        let cookie = session::cookie_value(headers);
        match kbs.session(state, cookie.as_deref(), now).await {
            Ok(Session::Attested {
                tee_pubkey,
                claims,
                claims_sha256,
                ..
            }) => (claims, claims_sha256, tee_pubkey, "cookie"),
            Ok(Session::Challenge { .. }) => {
                return Err(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "kbs-session",
                    "No KBS session",
                    "this session has not attested: POST /kbs/v0/attest first",
                )
                .into_response());
            }
            Err(e) => return Err(no_session(e)),
        }
    };
    // Both are the broker's own (sealed or signed), so the claims and digest are as issued;
    // the key is parsed again for encryption (a native token's key is no JWK: refused).
    let Ok(key) = TeeKey::from_jwk(&jwk) else {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "kbs-session",
            "No KBS session",
            "the session's claims or key do not check out: start again with /kbs/v0/auth",
        )
        .into_response());
    };
    Ok((
        Vouched {
            front_end: FrontEnd::Kbs,
            session,
            claims_json: claims,
            claims_digest: digest,
            peer: peer.to_string(),
        },
        key,
    ))
}

async fn resource<S: Store>(
    State(state): State<Arc<AppState<S>>>,
    peer: Option<axum::Extension<Peer>>,
    headers: HeaderMap,
    Path((repo, kind, tag)): Path<(String, String, String)>,
) -> Response {
    let Some(kbs) = state.kbs.clone() else {
        return not_enabled();
    };
    let addr = peer_addr(peer);
    // The session first: without one, every path is 401 (the clients' first request).
    let (vouched, key) = match authorize(&state, &kbs, &headers, &addr).await {
        Ok(v) => v,
        Err(response) => return response,
    };
    let path = format!("{repo}/{kind}/{tag}");
    let Some(secret) = kbs
        .settings
        .resources
        .get(&path)
        .cloned()
        .or_else(|| resource_path(&path))
    else {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-secret",
            "Unknown secret",
            format!("no resource {path}"),
        )
        .into_response();
    };
    let result = {
        let state = state.clone();
        let secret = secret.clone();
        // Audited once decided: runs to completion even if the client goes away.
        tokio::spawn(async move {
            state
                .broker
                .release_vouched(&vouched, &secret, SystemTime::now())
                .await
        })
        .await
        .unwrap_or_else(|e| Err(Refusal::Internal(format!("release task failed: {e}"))))
    };
    match result.map(|plaintext| key.encrypt(&plaintext)) {
        Ok(Ok(jwe)) => {
            state.metrics.outcome("released", "ok");
            tracing::info!(peer = %addr, %secret, "KBS resource released");
            axum::Json(jwe).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(peer = %addr, error = %e, "JWE encryption failed");
            Problem::internal().into_response()
        }
        Err(refusal) => {
            state.metrics.outcome("refused", &refusal.reason());
            log_refusal(&addr, &refusal);
            kbs_problem(&refusal).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths_map_to_secret_names() {
        assert_eq!(
            resource_path("default/web/tls-key").as_deref(),
            Some("default.web.tls-key")
        );
        for bad in [
            "default/web",
            "a/b/c/d",
            "default/web/key.pem",
            "default//x",
            "../x/y",
            &format!("a/b/{}", "c".repeat(43)),
        ] {
            assert_eq!(resource_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn sha512_is_selected_when_the_client_can() {
        let sel = |v: Value| select_hash(&v);
        assert_eq!(
            sel(json!({"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]})),
            Ok(HashAlgorithm::Sha512)
        );
        assert_eq!(
            sel(json!({"supported-hash-algorithms": ["sha384"]})),
            Ok(HashAlgorithm::Sha384)
        );
        assert_eq!(sel(json!({})), Ok(HashAlgorithm::Sha512));
        assert!(sel(json!({"supported-hash-algorithms": ["sm3"]})).is_err());
        assert!(sel(json!({"supported-hash-algorithms": "sha512"})).is_err());
    }
}
