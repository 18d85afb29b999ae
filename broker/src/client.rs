//! The operator CLI's client for the admin API: mutual TLS with the operator's certificate,
//! the broker's CA pinned; with [`AdminClient::require_attested_broker`], nothing is sent
//! before the broker proved itself (`crate::attested`), and afterwards only its TLS key is
//! accepted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::Value;

use crate::Error;

/// The environment variable naming the admin configuration file.
pub const ADMIN_CONFIG_ENV: &str = "BROKER_ADMIN_CONFIG";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    url: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A client of the admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
    server: Arc<PinnedServer>,
    require: Option<Arc<crate::attested::BrokerPolicy>>,
    attested: Arc<tokio::sync::OnceCell<()>>,
}

/// The server certificate check: the broker's CA, and once the broker proved itself, its TLS
/// key and no other.
#[derive(Debug)]
struct PinnedServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    /// The attested SubjectPublicKeyInfo (DER).
    pinned: std::sync::RwLock<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let pinned = self
            .pinned
            .read()
            .map_err(|_| rustls::Error::General("pin lock poisoned".into()))?;
        if let Some(pin) = pinned.as_ref() {
            let spki = crate::attested::spki_of(end_entity)
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            if aws_lc_rs::constant_time::verify_slices_are_equal(&spki, pin).is_err() {
                return Err(rustls::Error::General(
                    "the server's key is not the attested broker's".into(),
                ));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn resolve(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

impl AdminClient {
    /// Finds the admin configuration: `--config`, else `$BROKER_ADMIN_CONFIG`.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, Error> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        std::env::var_os(ADMIN_CONFIG_ENV)
            .map(PathBuf::from)
            .ok_or_else(|| {
                Error::Config(format!(
                    "no admin configuration: pass --config FILE or set {ADMIN_CONFIG_ENV}"
                ))
            })
    }

    /// Loads an admin configuration file (url, ca, cert, key; paths relative to the file).
    pub fn from_config(path: &Path) -> Result<AdminClient, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawAdmin =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        if !raw.url.starts_with("https://") {
            return Err(Error::Config(format!(
                "{}: url must be https",
                path.display()
            )));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let cfg =
            |p: &Path, e: &dyn std::fmt::Display| Error::Config(format!("{}: {e}", p.display()));
        let ca = resolve(base, raw.ca);
        let cert = resolve(base, raw.cert);
        let key = resolve(base, raw.key);
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca).map_err(|e| cfg(&ca, &e))? {
            roots
                .add(c.map_err(|e| cfg(&ca, &e))?)
                .map_err(|e| cfg(&ca, &e))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .map_err(|e| cfg(&cert, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| cfg(&cert, &e))?;
        crate::keys::check_private_file(&key)?;
        let key_der = PrivateKeyDer::from_pem_file(&key).map_err(|e| cfg(&key, &e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = Arc::new(PinnedServer {
            inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| cfg(&ca, &e))?,
            pinned: std::sync::RwLock::new(None),
        });
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(server.clone())
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| Error::Config(format!("client certificate: {e}")))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .tls_info(true)
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(AdminClient {
            base: raw.url.trim_end_matches('/').to_string(),
            http,
            server,
            require: None,
            attested: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// Before its first call, the client verifies the broker's own evidence against
    /// `policy` and its binding to the TLS key of the connection, and refuses to send
    /// anything otherwise; afterwards it accepts no other server key.
    pub fn require_attested_broker(mut self, policy: crate::attested::BrokerPolicy) -> Self {
        self.require = Some(Arc::new(policy));
        self
    }

    /// Fetches and verifies the broker's evidence; pins its key.
    async fn attest_broker(&self, policy: &crate::attested::BrokerPolicy) -> Result<(), Error> {
        use aws_lc_rs::rand::{SecureRandom, SystemRandom};
        let untrusted = Error::UntrustedBroker;
        let mut nonce = [0u8; 32];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Crypto("no randomness".into()))?;
        let url = format!(
            "{}/v1/broker/evidence?nonce={}",
            self.base,
            hex::encode(nonce)
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| Error::Remote(format!("{url}: {e}")))?;
        // The key of the very connection the evidence came over.
        let leaf = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .map(<[u8]>::to_vec)
            .ok_or_else(|| untrusted("no server certificate seen on the connection".into()))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Remote(format!("{url}: {e}")))?;
        if !status.is_success() {
            return Err(untrusted(format!(
                "it serves no evidence ({} {})",
                status.as_u16(),
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        }
        let evidence: crate::attested::BrokerEvidence = serde_json::from_slice(&bytes)
            .map_err(|e| untrusted(format!("its evidence is malformed: {e}")))?;
        let spki = crate::attested::spki_of(&leaf)?;
        let claims = policy.verify(&evidence, &spki, &nonce, std::time::SystemTime::now())?;
        *self
            .server
            .pinned
            .write()
            .map_err(|_| Error::Crypto("pin lock poisoned".into()))? = Some(spki);
        tracing::info!(
            measurement = %claims.measurement,
            chip_id = %claims.chip_id,
            "the broker proved itself: its evidence verified and satisfies the policy"
        );
        Ok(())
    }

    async fn call(&self, method: Method, path: &str, body: Option<Body>) -> Result<Value, Error> {
        if let Some(policy) = &self.require {
            self.attested
                .get_or_try_init(|| self.attest_broker(policy))
                .await?;
        }
        let url = format!("{}/v1/admin{path}", self.base);
        let mut req = self.http.request(method, &url);
        match body {
            Some(Body::Json(v)) => req = req.json(&v),
            Some(Body::Text(t)) => {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(t)
            }
            None => {}
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Remote(format!("{url}: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Remote(format!("{url}: {e}")))?;
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            let detail = value["detail"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            Err(Error::Remote(format!("{} {}", status.as_u16(), detail)))
        }
    }

    /// Uploads a new version of a `tls-key` or `opaque` secret.
    pub async fn put_secret(&self, name: &str, kind: &str, value: &[u8]) -> Result<Value, Error> {
        let body = serde_json::json!({
            "kind": kind,
            "value": attestation::protocol::encode_b64(value),
        });
        self.call(
            Method::PUT,
            &format!("/secrets/{}", segment(name)?),
            Some(Body::Json(body)),
        )
        .await
    }
    /// Generates a data key.
    pub async fn generate_secret(&self, name: &str, bytes: Option<usize>) -> Result<Value, Error> {
        let body = serde_json::json!({ "bytes": bytes });
        self.call(
            Method::POST,
            &format!("/secrets/{}/generate", segment(name)?),
            Some(Body::Json(body)),
        )
        .await
    }
    /// Rotates a data key.
    pub async fn rotate_secret(&self, name: &str) -> Result<Value, Error> {
        self.call(
            Method::POST,
            &format!("/secrets/{}/rotate", segment(name)?),
            None,
        )
        .await
    }
    /// Deletes a secret.
    pub async fn delete_secret(&self, name: &str) -> Result<Value, Error> {
        self.call(
            Method::DELETE,
            &format!("/secrets/{}", segment(name)?),
            None,
        )
        .await
    }
    /// Makes a new version of the attestation-token signing key.
    pub async fn rotate_token_key(&self) -> Result<Value, Error> {
        self.call(Method::POST, "/tokens/rotate-key", None).await
    }
    /// Revokes the certificate `serial` for `reason` (an RFC 5280 keyword).
    pub async fn revoke_certificate(&self, serial: &str, reason: &str) -> Result<Value, Error> {
        self.call(
            Method::POST,
            &format!("/pki/certificates/{}/revoke", segment(serial)?),
            Some(Body::Json(serde_json::json!({ "reason": reason }))),
        )
        .await
    }
    /// The certificates the private CA issued, newest first (at most `limit`).
    pub async fn issued_certificates(&self, limit: u32) -> Result<Value, Error> {
        self.call(
            Method::GET,
            &format!("/pki/certificates?limit={limit}"),
            None,
        )
        .await
    }
    /// The private CA's versions (certificates and pending requests; never keys).
    pub async fn ca_show(&self) -> Result<Value, Error> {
        self.call(Method::GET, "/pki/ca", None).await
    }
    /// Makes the private CA (`rotate` false) or its next issuing key (`rotate` true);
    /// `request` is a [`crate::pki::NewCa`] as JSON.
    pub async fn ca_create(&self, request: Value, rotate: bool) -> Result<Value, Error> {
        let path = if rotate { "/pki/ca/rotate" } else { "/pki/ca" };
        self.call(Method::POST, path, Some(Body::Json(request)))
            .await
    }
    /// Installs the certificate (and chain, root last; PEM) of the pending CA request.
    pub async fn ca_import(&self, pem: String) -> Result<Value, Error> {
        self.call(Method::PUT, "/pki/ca/certificate", Some(Body::Text(pem)))
            .await
    }
    /// Lists secrets (metadata only).
    pub async fn list_secrets(&self) -> Result<Value, Error> {
        self.call(Method::GET, "/secrets", None).await
    }
    /// Sets the policy.
    pub async fn set_policy(&self, document: String) -> Result<Value, Error> {
        self.call(Method::PUT, "/policy", Some(Body::Text(document)))
            .await
    }
    /// The active policy.
    pub async fn get_policy(&self) -> Result<Value, Error> {
        self.call(Method::GET, "/policy", None).await
    }
    /// Policy history.
    pub async fn policy_history(&self) -> Result<Value, Error> {
        self.call(Method::GET, "/policy/history", None).await
    }
    /// Deletes audit records before `before` (seconds since the epoch); the broker records
    /// the deletion.
    pub async fn prune_audit(&self, before: i64) -> Result<Value, Error> {
        self.call(Method::DELETE, &format!("/audit?before={before}"), None)
            .await
    }
    /// Audit records.
    pub async fn audit(&self, query: &[(&str, String)]) -> Result<Value, Error> {
        let qs: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect();
        let path = if qs.is_empty() {
            "/audit".to_string()
        } else {
            format!("/audit?{}", qs.join("&"))
        };
        self.call(Method::GET, &path, None).await
    }
}

enum Body {
    Json(Value),
    Text(String),
}

/// Characters left as they are in a query value or path segment: RFC 3986 unreserved.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// A secret name as one URL path segment: checked first (a name such as `..` or `a/../b`
/// would address another resource once the URL is normalised), then percent-encoded.
fn segment(name: &str) -> Result<String, Error> {
    if !attestation::policy::valid_name(name) {
        return Err(Error::Input(format!(
            "{:?} is not a secret name: letters, digits, '.', '_', '-' (1 to 128, not '.' or '..')",
            crate::audit::truncate(name)
        )));
    }
    Ok(urlencode(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_address_another_secret_are_refused() {
        for bad in [
            "nope/../db-key",
            "..",
            ".",
            "a/b",
            "a?b",
            "a#b",
            "%2e%2e",
            "",
        ] {
            assert!(segment(bad).is_err(), "{bad}");
        }
        assert_eq!(segment("db-key.v2_x").unwrap(), "db-key.v2_x");
        assert_eq!(urlencode("a b/c"), "a%20b%2Fc");
    }
}
