//! The broker staples an OCSP response for its own server certificate. When the certificate
//! names an OCSP responder (AuthorityInfoAccess: the broker's own CA's, an operator CA's, a
//! public CA's) and its issuer is in the certificate file, a background task asks the
//! responder, checks the answer (`attestation::ocsp::status`: the issuer's signature or its
//! delegated responder's, this certificate, current, `good`) and staples it from the next
//! handshake on; handshakes never wait for it. It refreshes half way through the response's
//! validity, retries with exponential backoff, keeps serving the last good response until its
//! nextUpdate and then staples nothing rather than something stale. A revoked or unknown
//! answer is never stapled. A new certificate (the files reloaded) starts over.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation::ocsp::status::{self, CertificateStatus, Checked, Subject};
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::CertificateDer;

use super::tls::TlsState;

/// First retry after a failed fetch; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: u64 = 5;
/// Longest wait between retries.
const MAX_BACKOFF: u64 = 600;
/// Shortest wait between two fetches after a success (a responder whose responses are
/// barely valid is not asked in a loop).
const MIN_REFRESH: u64 = 10;
/// Longest sleep: the task looks at the certificate at least this often.
const MAX_SLEEP: u64 = 3600;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The wait after `failures` consecutive failures.
pub fn backoff(failures: u32) -> u64 {
    FIRST_BACKOFF
        .saturating_mul(1u64 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// When to fetch again after a good response `checked` at `now`: half way through its
/// validity; for a response already past that (a responder that caches), a quarter of what is
/// left, and never sooner than [`MIN_REFRESH`].
pub fn refresh_after(checked: &Checked, now: u64) -> u64 {
    let half = checked.refresh_at();
    if half > now {
        return half.max(now + MIN_REFRESH);
    }
    now + (checked.next_update.saturating_sub(now) / 4).max(MIN_REFRESH)
}

/// Whether the stapled response (valid until `next_update`) must be withdrawn at `now`.
pub fn expired(next_update: u64, now: u64) -> bool {
    now >= next_update
}

/// What the server certificate allows: where to ask and about what.
struct Target {
    url: String,
    subject: Subject,
}

/// The responder and the certificate-with-issuer for `chain`, or why there is none.
fn target(chain: &[CertificateDer<'static>]) -> Result<Target, String> {
    let leaf = chain.first().ok_or("no certificate")?;
    let url = status::responder_url(leaf)
        .map_err(|e| e.to_string())?
        .ok_or("the server certificate names no OCSP responder")?;
    let candidates: Vec<Vec<u8>> = chain[1..].iter().map(|c| c.to_vec()).collect();
    let issuer = status::find_issuer(leaf, &candidates).ok_or(
        "the server certificate's issuer is not in tls.cert (append the issuing CA certificate to staple OCSP)",
    )?;
    let subject = Subject::new(leaf, issuer).map_err(|e| e.to_string())?;
    Ok(Target { url, subject })
}

/// An HTTP client for responders: Mozilla's roots and the CA certificates of the server's
/// own chain (for an https responder of the CA that issued it). The response is signed; TLS
/// only carries it.
fn client(chain: &[CertificateDer<'static>]) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for ca in &chain[1..] {
        // A certificate that cannot be an anchor is only skipped.
        let _ = roots.add(ca.clone());
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .user_agent(concat!("snp-key-broker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// Asks the responder (POST) and checks the answer at the current time.
async fn fetch(http: &reqwest::Client, target: &Target) -> Result<(Vec<u8>, Checked), String> {
    let request = target.subject.request().map_err(|e| e.to_string())?;
    let mut resp = http
        .post(&target.url)
        .header(reqwest::header::CONTENT_TYPE, "application/ocsp-request")
        .body(request)
        .send()
        .await
        .map_err(|e| format!("{}: {e}", target.url))?;
    if !resp.status().is_success() {
        return Err(format!("{}: HTTP {}", target.url, resp.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("{}: {e}", target.url))?
    {
        if body.len() + chunk.len() > status::MAX_RESPONSE_BYTES {
            return Err(format!("{}: response too large", target.url));
        }
        body.extend_from_slice(&chunk);
    }
    let checked = target
        .subject
        .check(&body, SystemTime::now())
        .map_err(|e| e.to_string())?;
    Ok((body, checked))
}

/// Keeps the server certificate's OCSP response stapled while the broker runs. `expiry`
/// shows the stapled response's nextUpdate (seconds since the epoch; 0: nothing stapled).
pub async fn run(tls: Arc<TlsState>, expiry: Gauge) {
    let mut leaf: Option<CertificateDer<'static>> = None;
    let mut plan: Option<(Target, reqwest::Client)> = None;
    let mut held: Option<u64> = None;
    let mut failures: u32 = 0;
    let mut next_fetch: u64 = 0;
    loop {
        let chain = tls.chain();
        let now = unix(SystemTime::now());
        if chain.first() != leaf.as_ref() {
            // A new certificate (or the first): nothing stapled for it yet; ask now.
            leaf = chain.first().cloned();
            held = None;
            failures = 0;
            next_fetch = now;
            expiry.set(0);
            plan = match target(&chain).and_then(|t| Ok((t, client(&chain)?))) {
                Ok(p) => {
                    tracing::info!(responder = %p.0.url, serial = p.0.subject.serial(), "stapling OCSP for the server certificate");
                    Some(p)
                }
                Err(why) => {
                    tracing::info!("not stapling OCSP: {why}");
                    None
                }
            };
        }
        let Some(current_leaf) = leaf.clone() else {
            tls.reloaded().await;
            continue;
        };
        if let Some(next_update) = held
            && expired(next_update, now)
        {
            tls.set_staple(&current_leaf, None);
            held = None;
            expiry.set(0);
            tracing::warn!(
                "the stapled OCSP response expired without a fresh one: stapling nothing until the responder answers"
            );
        }
        if let Some((target, http)) = &plan
            && now >= next_fetch
        {
            match fetch(http, target).await {
                Ok((response, checked)) if checked.status == CertificateStatus::Good => {
                    if tls.set_staple(&current_leaf, Some(response)) {
                        held = Some(checked.next_update);
                        expiry.set(i64::try_from(checked.next_update).unwrap_or(0));
                        tracing::debug!(next_update = checked.next_update, "OCSP response stapled");
                    }
                    failures = 0;
                    next_fetch = refresh_after(&checked, unix(SystemTime::now()));
                }
                Ok((_, checked)) => {
                    tls.set_staple(&current_leaf, None);
                    held = None;
                    expiry.set(0);
                    failures = failures.saturating_add(1);
                    next_fetch = unix(SystemTime::now()) + backoff(failures);
                    tracing::error!(status = ?checked.status, "the OCSP responder does not vouch for the server certificate: stapling nothing");
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    next_fetch = unix(SystemTime::now()) + backoff(failures);
                    tracing::warn!(error = %e, retry_in_secs = backoff(failures), "OCSP fetch failed");
                }
            }
        }
        let now = unix(SystemTime::now());
        let mut wake = now + MAX_SLEEP;
        if plan.is_some() {
            wake = wake.min(next_fetch);
        }
        if let Some(next_update) = held {
            wake = wake.min(next_update);
        }
        let sleep = Duration::from_secs(wake.saturating_sub(now).max(1));
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = tls.reloaded() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_to_ten_minutes() {
        let waits: Vec<u64> = (1..=10).map(backoff).collect();
        assert_eq!(waits, vec![5, 10, 20, 40, 80, 160, 320, 600, 600, 600]);
        assert_eq!(backoff(u32::MAX), 600);
    }

    #[test]
    fn refresh_half_way_but_not_in_a_loop() {
        let checked = Checked {
            status: CertificateStatus::Good,
            this_update: 1000,
            next_update: 1000 + 3600,
        };
        assert_eq!(refresh_after(&checked, 1001), 2800);
        assert_eq!(refresh_after(&checked, 2795), 2795 + MIN_REFRESH);
        // A response fetched late in its validity (a responder that caches): a quarter of
        // what is left, not every MIN_REFRESH.
        assert_eq!(refresh_after(&checked, 3000), 3000 + 400);
        assert_eq!(refresh_after(&checked, 4590), 4590 + MIN_REFRESH);
    }

    #[test]
    fn a_response_is_withdrawn_at_its_next_update() {
        assert!(!expired(2000, 1999));
        assert!(expired(2000, 2000));
    }
}
