//! `broker-load`: a load generator for the broker over real HTTPS.
//!
//! Each flow is what a booting guest does: `POST /v1/challenge`, fresh simulated evidence that
//! binds that nonce and a fresh X25519 key, `POST /v1/attest`; a sample of the sealed secrets
//! is opened to check they are real. With `--protocol kbs` a flow is what a Confidential
//! Containers client does instead: `POST /kbs/v0/auth`, `POST /kbs/v0/attest` with fresh
//! evidence in the `sev` crate's JSON form bound (JCS, SHA-512) to the nonce and a fresh P-256
//! key, and `GET /kbs/v0/resource/<path>` with the session cookie; a sample of the JWEs is
//! decrypted. It reports flows per second, the broker's CPU seconds
//! (from `/proc/<pid>/stat`) and flows per broker CPU-second, latency percentiles, errors by
//! status and the broker's RSS; `floor` measures the crypto floor of one attestation (one
//! ECDSA P-384 verify and one HPKE seal) on the calling thread, to compare in the same run.
//! `handshake` measures what a TLS setup costs the broker: connections per second and per
//! broker CPU-second, and the time to the first answer on a new connection, for a choice of
//! protocol version, key exchange, resumption and client certificate. `hold` measures the
//! broker's memory with many idle keep-alive connections open; `ocsp` measures an OCSP
//! responder (the broker's or OpenSSL's), checking a sample of its answers.
//!
//! ```sh
//! broker-load run --url https://127.0.0.1:8443 --ca DEV/ca.pem --sim-dir DEV/sim \
//!   --mode keepalive --concurrency 16 --duration 10 --broker-pid PID --json
//! broker-load floor --duration 5 --json
//! broker-load hold --url https://127.0.0.1:8443 --ca DEV/ca.pem --connections 1000 --broker-pid PID
//! broker-load ocsp --url https://127.0.0.1:8443/v1/pki/ocsp --ca DEV/ca.pem --issuer CA.pem \
//!   --serials SERIALS --server-pid PID --json
//! broker-load handshake --url https://127.0.0.1:8443 --ca DEV/ca.pem --kx x25519 \
//!   --client-cert DEV/operator.pem --client-key DEV/operator.key --broker-pid PID --json
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use attestation::protocol::{AttestResponse, ChallengeResponse, EphemeralKey, Kem};
use clap::{Parser, Subcommand, ValueEnum};
use e2e::Guest;
use e2e::kbs::{self, KbsClient, TeeKeyPair};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "broker-load",
    about = "Load generator for the key broker (native /v1 flows)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One connection per worker, kept alive across flows.
    Keepalive,
    /// A new TLS connection (full handshake) for every flow.
    NewConn,
    /// A new TCP connection for every flow, resuming the TLS session.
    Resumed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// `/v1/challenge` + `/v1/attest`.
    Native,
    /// `/kbs/v0/auth` + `/kbs/v0/attest` + `/kbs/v0/resource/...`.
    Kbs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kx {
    /// Classical X25519.
    X25519,
    /// The hybrid post-quantum group X25519MLKEM768 (TLS 1.3 only).
    X25519mlkem768,
}

#[derive(Subcommand)]
enum Command {
    /// Runs flows against a broker.
    Run {
        /// The broker's base URL.
        #[arg(long)]
        url: String,
        /// The broker's CA (PEM), pinned.
        #[arg(long)]
        ca: PathBuf,
        /// The simulated AMD hierarchy of the broker's `init --dev` setup (`DIR/sim`).
        #[arg(long)]
        sim_dir: PathBuf,
        /// Connection handling.
        #[arg(long, value_enum, default_value = "keepalive")]
        mode: Mode,
        /// The protocol a flow speaks.
        #[arg(long, value_enum, default_value = "native")]
        protocol: Protocol,
        /// Flows in flight at once (with `--rate`: at most).
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Open loop: start flows at this many per second, evenly spaced, whether or not
        /// earlier ones have finished (up to `--concurrency` in flight), and measure each
        /// flow's latency from when it was due to start, so a broker that falls behind is
        /// charged for the wait. Without it: closed loop, each worker starts its next flow
        /// when the previous one ends.
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// The secret each flow asks for (with `--protocol kbs`, the resource path, e.g.
        /// `default/key/db` for the secret `default.key.db`).
        #[arg(long, default_value = "db-key")]
        secret: String,
        /// The broker's process id, for its CPU time and memory.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Open every Nth released secret (0: none).
        #[arg(long, default_value_t = 16)]
        check_every: u64,
        /// Loopback source addresses to spread the workers over (127.0.0.1 … 127.0.0.N).
        #[arg(long, default_value_t = 16)]
        sources: u8,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measures TLS connection setup against a broker: one new connection (handshake and
    /// one `GET` of `--path`) after another, from each of `--concurrency` workers.
    Handshake {
        /// The broker's base URL.
        #[arg(long)]
        url: String,
        /// The broker's CA (PEM), pinned.
        #[arg(long)]
        ca: PathBuf,
        /// TLS 1.2 instead of TLS 1.3.
        #[arg(long)]
        tls12: bool,
        /// The one key exchange group the client offers.
        #[arg(long, value_enum, default_value = "x25519")]
        kx: Kx,
        /// Resume sessions (TLS 1.3 tickets, TLS 1.2 tickets) after each worker's first.
        #[arg(long)]
        resume: bool,
        /// A client certificate (PEM) to present: mutual TLS, as the admin API uses.
        #[arg(long, requires = "client_key")]
        client_cert: Option<PathBuf>,
        /// Its private key (PEM).
        #[arg(long, requires = "client_cert")]
        client_key: Option<PathBuf>,
        /// The path fetched on each connection.
        #[arg(long, default_value = "/healthz")]
        path: String,
        /// Connections in progress at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// The broker's process id, for its CPU time.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Loopback source addresses to spread the workers over (127.0.0.1 … 127.0.0.N).
        #[arg(long, default_value_t = 16)]
        sources: u8,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measures an OCSP responder (the broker's, or `openssl ocsp -index … -port …`): POSTs
    /// of requests about `--serials` under `--issuer`, one after another per worker; every
    /// `--check-every`th answer is checked (the issuer's or its delegate's signature, this
    /// serial, current) and must say `good`.
    Ocsp {
        /// The responder's URL (http:// or https://).
        #[arg(long)]
        url: String,
        /// The CA to pin for an https:// responder (PEM).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The issuing CA certificate (PEM) the serials are under.
        #[arg(long)]
        issuer: PathBuf,
        /// A file with one serial (hex) per line: the set asked about, round robin.
        #[arg(long)]
        serials: PathBuf,
        /// Keep connections alive (`keepalive`) or open one per request (`new-conn`).
        #[arg(long, value_enum, default_value = "keepalive")]
        mode: Mode,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// The responder's process id, for its CPU time.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Check every Nth answer fully (0: none).
        #[arg(long, default_value_t = 8)]
        check_every: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measures the broker's memory with many open, idle keep-alive connections: opens
    /// `--connections` TLS connections (spread over loopback sources), makes one request on
    /// each, holds them all, and reads the broker's RSS before and while they are open.
    Hold {
        /// The broker's base URL.
        #[arg(long)]
        url: String,
        /// The broker's CA (PEM), pinned.
        #[arg(long)]
        ca: PathBuf,
        /// Connections to hold open.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// The broker's process id.
        #[arg(long)]
        broker_pid: u32,
        /// Loopback source addresses to spread the connections over.
        #[arg(long, default_value_t = 16)]
        sources: u8,
    },
    /// Measures the crypto floor of one attestation on this thread.
    Floor {
        /// Seconds to measure.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// CPU seconds (user + system) and RSS in bytes of a process.
fn process_usage(pid: u32) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks as f64 / clock_ticks(), rss_kb * 1024))
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn tls_config(ca: &PathBuf, resume: bool) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).with_context(|| ca.display().to_string())?;
    for c in attestation::certs::decode_pem_or_der(&pem, "ca")? {
        roots.add(c.into())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

fn client(
    config: &rustls::ClientConfig,
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(config.clone())
        .local_address(source)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// The source address of worker `i`: like guests, the load comes from several addresses
/// (127.0.0.1 … 127.0.0.N when the broker is on IPv4 loopback), so that the broker's
/// per-source connection share is not what is measured.
fn source_for(url: &str, sources: u8, i: usize) -> Option<std::net::IpAddr> {
    let host = url::Url::parse(url).ok()?.host_str()?.to_string();
    let ip: std::net::Ipv4Addr = host.parse().ok()?;
    if !ip.is_loopback() || sources <= 1 {
        return None;
    }
    let last = 1 + u8::try_from(i % usize::from(sources)).ok()?;
    Some(std::net::Ipv4Addr::new(127, 0, 0, last).into())
}

#[derive(Default)]
struct Tally {
    ok: u64,
    checked: u64,
    errors: BTreeMap<u16, u64>,
    latencies: Vec<Duration>,
    /// Open loop: how late the generator's timer started flows that were not due yet.
    timer_late: Vec<Duration>,
}

/// What a flow released, and the key that opens it.
enum Released {
    Native(AttestResponse, EphemeralKey),
    Kbs(Box<kbs_types::Response>, TeeKeyPair),
}

impl Released {
    /// Whether the released secret opens with the flow's key.
    fn opens(&self) -> bool {
        match self {
            Released::Native(body, key) => {
                matches!(body.secrets.first().map(|s| key.open(s)), Some(Ok(_)))
            }
            Released::Kbs(jwe, key) => key.decrypt(jwe).is_ok(),
        }
    }
}

async fn flow(
    http: &reqwest::Client,
    url: &str,
    guest: &Guest,
    secret: &str,
    protocol: Protocol,
) -> Result<Released, u16> {
    match protocol {
        Protocol::Native => native_flow(http, url, guest, secret)
            .await
            .map(|(body, key)| Released::Native(body, key)),
        Protocol::Kbs => kbs_flow(http, url, guest, secret).await,
    }
}

/// One KBS flow: auth, attest, resource.
async fn kbs_flow(
    http: &reqwest::Client,
    url: &str,
    guest: &Guest,
    path: &str,
) -> Result<Released, u16> {
    let mut c = KbsClient::new(http.clone(), url.to_string());
    let request = kbs_types::Request {
        version: "0.4.0".into(),
        tee: kbs_types::Tee::Snp,
        extra_params: json!({"supported-hash-algorithms": ["sha384", "sha512"]}),
    };
    let (status, body) = c
        .auth_raw(&serde_json::to_value(request).map_err(|_| 0u16)?)
        .await;
    if status != 200 {
        return Err(status);
    }
    let nonce = body["nonce"].as_str().ok_or(0u16)?.to_string();
    let key = TeeKeyPair::p256();
    let digest = kbs::runtime_digest("", &nonce, &key.tee_pubkey(), true);
    let report = guest.sign(kbs::report_data(&digest));
    let (vcek, ask) = guest.certificates();
    let primary = kbs::snp_primary_evidence(&report, &[("vcek", vcek), ("ask", ask)]);
    let (status, _) = c
        .attest_raw(&kbs::attestation(&nonce, &key.tee_pubkey(), primary))
        .await;
    if status != 200 {
        return Err(status);
    }
    let (status, body) = c.resource(path).await;
    if status != 200 {
        return Err(status);
    }
    let jwe: kbs_types::Response = serde_json::from_value(body).map_err(|_| 0u16)?;
    Ok(Released::Kbs(Box::new(jwe), key))
}

/// One native flow.
async fn native_flow(
    http: &reqwest::Client,
    url: &str,
    guest: &Guest,
    secret: &str,
) -> Result<(AttestResponse, EphemeralKey), u16> {
    let r = http
        .post(format!("{url}/v1/challenge"))
        .send()
        .await
        .map_err(|_| 0u16)?;
    if !r.status().is_success() {
        return Err(r.status().as_u16());
    }
    let nonce = r.json::<ChallengeResponse>().await.map_err(|_| 0u16)?.nonce;
    let key = EphemeralKey::generate(Kem::X25519);
    let request = guest.request(&nonce, &key, &[secret], None);
    let r = http
        .post(format!("{url}/v1/attest"))
        .json(&request)
        .send()
        .await
        .map_err(|_| 0u16)?;
    if r.status() != 200 {
        return Err(r.status().as_u16());
    }
    let body = r.json::<AttestResponse>().await.map_err(|_| 0u16)?;
    Ok((body, key))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    url: String,
    ca: PathBuf,
    sim_dir: PathBuf,
    mode: Mode,
    protocol: Protocol,
    concurrency: usize,
    rate: Option<f64>,
    duration: Duration,
    secret: String,
    broker_pid: Option<u32>,
    check_every: u64,
    sources: u8,
) -> anyhow::Result<serde_json::Value> {
    if let Some(r) = rate
        && !(r.is_finite() && r > 0.0)
    {
        anyhow::bail!("--rate must be a positive number of flows per second");
    }
    let amd = guest_agent::evidence::load_simulated_amd(&sim_dir, attestation::Product::Genoa)
        .map_err(|e| anyhow::anyhow!("{}: {e}", sim_dir.display()))?;
    let guest = Arc::new(Guest::new(&amd, |_| {}));
    let config = tls_config(&ca, mode != Mode::NewConn)?;
    // A warm-up flow: the broker's chain cache and the policy are loaded before measuring.
    flow(&client(&config, None)?, &url, &guest, &secret, protocol)
        .await
        .map_err(|s| anyhow::anyhow!("warm-up flow failed with status {s}"))?;
    let before = broker_pid.map(process_usage).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    // Open loop: the next flow's slot in the schedule (flow k is due at started + k/rate).
    let next_slot = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..concurrency.max(1) {
        let source = source_for(&url, sources, i);
        let (url, guest, secret, stop, config, next_slot) = (
            url.clone(),
            guest.clone(),
            secret.clone(),
            stop.clone(),
            config.clone(),
            next_slot.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let kept = client(&config, source).ok();
            while !stop.load(Ordering::Relaxed) {
                let fresh;
                let http = match (&mode, &kept) {
                    (Mode::Keepalive, Some(k)) => k,
                    _ => {
                        let Ok(c) = client(&config, source) else {
                            break;
                        };
                        fresh = c;
                        &fresh
                    }
                };
                let t = match rate {
                    None => Instant::now(),
                    Some(rate) => {
                        let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                        let due = started + Duration::from_secs_f64(slot as f64 / rate);
                        if due >= started + duration {
                            break;
                        }
                        if due > Instant::now() {
                            // Early for the slot: the flow starts when the timer wakes us.
                            // The timer's lateness is the generator's, not the broker's: it
                            // is reported on its own (timer_late_ms).
                            tokio::time::sleep_until(due.into()).await;
                            let now = Instant::now();
                            tally.timer_late.push(now - due);
                            now
                        } else {
                            // Late: every worker was busy; the wait is the broker's.
                            due
                        }
                    }
                };
                match flow(http, &url, &guest, &secret, protocol).await {
                    Ok(released) => {
                        tally.latencies.push(t.elapsed());
                        tally.ok += 1;
                        if check_every > 0 && tally.ok % check_every == 0 {
                            if !released.opens() {
                                *tally.errors.entry(1).or_default() += 1;
                            }
                            tally.checked += 1;
                        }
                    }
                    Err(status) => *tally.errors.entry(status).or_default() += 1,
                }
            }
            tally
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for w in workers {
        let t = w.await?;
        total.ok += t.ok;
        total.checked += t.checked;
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.latencies.extend(t.latencies);
        total.timer_late.extend(t.timer_late);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = broker_pid.map(process_usage).transpose()?;
    // Open loop: the flows due before the end that never started (every worker was busy),
    // which the latencies above do not show.
    let missed = rate.map(|r| {
        let due = (duration.as_secs_f64() * r).ceil() as u64;
        due.saturating_sub(next_slot.load(Ordering::Relaxed).min(due))
    });
    total.latencies.sort_unstable();
    total.timer_late.sort_unstable();
    let pct_of = |v: &[Duration], q: f64| -> f64 {
        let n = v.len();
        if n == 0 {
            return 0.0;
        }
        let i = ((n as f64 - 1.0) * q).round() as usize;
        v[i.min(n - 1)].as_secs_f64() * 1000.0
    };
    let pct = |q: f64| pct_of(&total.latencies, q);
    let timer_late = rate.map(|_| {
        json!({ "p50": pct_of(&total.timer_late, 0.5), "p99": pct_of(&total.timer_late, 0.99) })
    });
    let cpu = match (before, after) {
        (Some((a, _)), Some((b, _))) => Some(b - a),
        _ => None,
    };
    let errors: BTreeMap<String, u64> = total
        .errors
        .iter()
        .map(|(k, v)| {
            let label = match k {
                0 => "transport".to_string(),
                1 => "secret_did_not_open".to_string(),
                s => s.to_string(),
            };
            (label, *v)
        })
        .collect();
    Ok(json!({
        "mode": format!("{mode:?}").to_lowercase(),
        "protocol": format!("{protocol:?}").to_lowercase(),
        "concurrency": concurrency,
        "rate": rate,
        "missed": missed,
        "timer_late_ms": timer_late,
        "seconds": elapsed,
        "flows": total.ok,
        "flows_per_second": total.ok as f64 / elapsed,
        "broker_cpu_seconds": cpu,
        "flows_per_broker_cpu_second": cpu.filter(|c| *c > 0.0).map(|c| total.ok as f64 / c),
        "latency_ms": { "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0) },
        "errors": errors,
        "secrets_opened": total.checked,
        "broker_rss_bytes": after.map(|(_, rss)| rss),
    }))
}

/// The TLS client of `handshake`: exactly the version, group, resumption and client
/// certificate asked for.
fn handshake_config(
    ca: &PathBuf,
    tls12: bool,
    kx: Kx,
    resume: bool,
    client: Option<(&PathBuf, &PathBuf)>,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if tls12 && kx == Kx::X25519mlkem768 {
        bail!("X25519MLKEM768 is a TLS 1.3 group");
    }
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).with_context(|| ca.display().to_string())?;
    for c in attestation::certs::decode_pem_or_der(&pem, "ca")? {
        roots.add(c.into())?;
    }
    let mut provider = default_provider();
    provider.kx_groups = vec![match kx {
        Kx::X25519 => kx_group::X25519,
        Kx::X25519mlkem768 => kx_group::X25519MLKEM768,
    }];
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| cert.display().to_string())?
                .collect::<Result<Vec<_>, _>>()?;
            let key =
                PrivateKeyDer::from_pem_file(key).with_context(|| key.display().to_string())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

/// New connections, one after another per worker, for `duration`: the handshake, then one
/// request and the first byte of its answer.
async fn handshakes(
    url: &str,
    config: rustls::ClientConfig,
    path: &str,
    concurrency: usize,
    duration: Duration,
    broker_pid: Option<u32>,
    sources: u8,
) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let parsed = url::Url::parse(url)?;
    let host = parsed.host_str().context("--url: a host")?.to_string();
    let port = parsed.port_or_known_default().context("--url: a port")?;
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    // One connection: (handshake time, time to the first byte of the answer, resumed).
    let connect = {
        let (host, connector, server_name, request) = (
            host.clone(),
            connector.clone(),
            server_name.clone(),
            request.clone(),
        );
        move |source: Option<std::net::IpAddr>| {
            let (host, connector, server_name, request) = (
                host.clone(),
                connector.clone(),
                server_name.clone(),
                request.clone(),
            );
            async move {
                let started = Instant::now();
                let tcp = match source {
                    Some(ip) => {
                        let socket = tokio::net::TcpSocket::new_v4()?;
                        socket.bind(std::net::SocketAddr::new(ip, 0))?;
                        let addr = tokio::net::lookup_host((host.as_str(), port))
                            .await?
                            .next()
                            .context("no address")?;
                        socket.connect(addr).await?
                    }
                    None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
                };
                tcp.set_nodelay(true)?;
                let mut tls = connector.connect(server_name, tcp).await?;
                let handshake = started.elapsed();
                let resumed =
                    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                tls.write_all(request.as_bytes()).await?;
                let mut buf = [0u8; 512];
                let n = tls.read(&mut buf).await?;
                if !buf[..n].starts_with(b"HTTP/1.1 2") {
                    anyhow::bail!("answer: {}", String::from_utf8_lossy(&buf[..n.min(40)]));
                }
                Ok::<_, anyhow::Error>((handshake, started.elapsed(), resumed))
            }
        }
    };
    // Warm-up: the first connection of each worker's session cache, and the broker's.
    connect(None).await.context("first connection")?;
    let before = broker_pid.map(process_usage).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..concurrency.max(1) {
        let source = source_for(url, sources, i);
        let (connect, stop) = (connect.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match connect(source).await {
                    Ok(sample) => samples.push(sample),
                    Err(_) => errors += 1,
                }
            }
            (samples, errors)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut samples, mut errors) = (Vec::new(), 0);
    for w in workers {
        let (s, e) = w.await?;
        samples.extend(s);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = broker_pid.map(process_usage).transpose()?;
    let cpu = match (before, after) {
        (Some((a, _)), Some((b, _))) => Some(b - a),
        _ => None,
    };
    let resumed = samples.iter().filter(|s| s.2).count();
    let n = samples.len();
    let percentile = |mut v: Vec<Duration>, q: f64| -> f64 {
        v.sort_unstable();
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i.min(v.len() - 1)].as_secs_f64() * 1000.0
    };
    let first: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    let shake: Vec<Duration> = samples.iter().map(|s| s.0).collect();
    Ok(json!({
        "connections": n,
        "resumed": resumed,
        "errors": errors,
        "seconds": elapsed,
        "connections_per_second": n as f64 / elapsed,
        "broker_cpu_seconds": cpu,
        "connections_per_broker_cpu_second": cpu.filter(|c| *c > 0.0).map(|c| n as f64 / c),
        "handshake_ms": { "p50": percentile(shake.clone(), 0.5), "p99": percentile(shake, 0.99) },
        "first_answer_ms": { "p50": percentile(first.clone(), 0.5), "p99": percentile(first, 0.99) },
    }))
}

/// OCSP requests against a responder for `duration`; see [`Command::Ocsp`].
#[allow(clippy::too_many_arguments)]
async fn ocsp(
    url: &str,
    ca: Option<&PathBuf>,
    subjects: Vec<attestation::ocsp::status::Subject>,
    mode: Mode,
    concurrency: usize,
    duration: Duration,
    server_pid: Option<u32>,
    check_every: u64,
) -> anyhow::Result<serde_json::Value> {
    let tls = match ca {
        Some(ca) => tls_config(ca, false)?,
        // Plain HTTP (OpenSSL's responder): TLS is configured but trusts nothing.
        None => rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    };
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .tls_backend_preconfigured(tls);
    if mode != Mode::Keepalive {
        builder = builder.pool_max_idle_per_host(0);
    }
    let http = builder.build()?;
    let requests: Vec<Vec<u8>> = subjects
        .iter()
        .map(|s| s.request())
        .collect::<Result<_, _>>()?;
    let subjects = Arc::new(subjects);
    let requests = Arc::new(requests);
    let ask = {
        let (http, url) = (http.clone(), url.to_string());
        move |i: usize, check: bool| {
            let (http, url, requests, subjects) = (
                http.clone(),
                url.clone(),
                requests.clone(),
                subjects.clone(),
            );
            async move {
                let k = i % requests.len();
                let resp = http
                    .post(&url)
                    .header("content-type", "application/ocsp-request")
                    .body(requests[k].clone())
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    bail!("HTTP {}", resp.status());
                }
                let body = resp.bytes().await?;
                if check {
                    let checked = subjects[k].check(&body, std::time::SystemTime::now())?;
                    if checked.status != attestation::ocsp::status::CertificateStatus::Good {
                        bail!("serial {}: {:?}", subjects[k].serial(), checked.status);
                    }
                }
                Ok::<_, anyhow::Error>(())
            }
        }
    };
    // Warm-up: the first request, checked.
    ask(0, true).await.context("first request")?;
    let before = server_pid.map(process_usage).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency.max(1) {
        let (ask, stop) = (ask.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors, mut checked) = (Vec::new(), 0u64, 0u64);
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                let check = check_every > 0 && (n as u64).is_multiple_of(check_every);
                let t = Instant::now();
                match ask(n, check).await {
                    Ok(()) => {
                        latencies.push(t.elapsed());
                        checked += u64::from(check);
                    }
                    Err(_) => errors += 1,
                }
                n += concurrency.max(1);
            }
            (latencies, errors, checked)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut errors, mut checked) = (Vec::new(), 0, 0);
    for w in workers {
        let (l, e, c) = w.await?;
        latencies.extend(l);
        errors += e;
        checked += c;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = server_pid.map(process_usage).transpose()?;
    let cpu = match (before, after) {
        (Some((a, _)), Some((b, _))) => Some(b - a),
        _ => None,
    };
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let n = latencies.len();
    Ok(json!({
        "responses": n,
        "checked": checked,
        "errors": errors,
        "seconds": elapsed,
        "responses_per_second": n as f64 / elapsed,
        "server_cpu_seconds": cpu,
        "responses_per_server_cpu_second": cpu.filter(|c| *c > 0.0).map(|c| n as f64 / c),
        "latency_ms": { "p50": pct(0.5), "p99": pct(0.99) },
        "mode": format!("{mode:?}").to_lowercase(),
    }))
}

/// Opens and holds `connections` keep-alive connections; see [`Command::Hold`].
async fn hold(
    url: &str,
    ca: &PathBuf,
    connections: usize,
    broker_pid: u32,
    sources: u8,
) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let parsed = url::Url::parse(url)?;
    let host = parsed.host_str().context("--url: a host")?.to_string();
    let port = parsed.port_or_known_default().context("--url: a port")?;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .context("no address")?;
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(ca, false)?));
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let (_, rss_before) = process_usage(broker_pid)?;
    let mut held = Vec::with_capacity(connections);
    let mut errors = 0u64;
    for i in 0..connections {
        let opened = async {
            let tcp = match source_for(url, sources, i) {
                Some(ip) => {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind(std::net::SocketAddr::new(ip, 0))?;
                    socket.connect(addr).await?
                }
                None => tokio::net::TcpStream::connect(addr).await?,
            };
            tcp.set_nodelay(true)?;
            let mut tls = connector.connect(server_name.clone(), tcp).await?;
            tls.write_all(request.as_bytes()).await?;
            let mut buf = [0u8; 512];
            let n = tls.read(&mut buf).await?;
            if !buf[..n].starts_with(b"HTTP/1.1 200") {
                bail!("answer: {}", String::from_utf8_lossy(&buf[..n.min(40)]));
            }
            Ok::<_, anyhow::Error>(tls)
        };
        match opened.await {
            Ok(tls) => held.push(tls),
            Err(_) => errors += 1,
        }
    }
    // Let the broker settle (its per-connection buffers are allocated by now).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, rss_held) = process_usage(broker_pid)?;
    let open = held.len();
    drop(held);
    Ok(json!({
        "connections": open,
        "errors": errors,
        "broker_rss_before_bytes": rss_before,
        "broker_rss_held_bytes": rss_held,
    }))
}

/// One ECDSA P-384 verify (the report signature) and one HPKE seal (the release), as many
/// times as fit in `duration` on this thread.
fn floor(duration: Duration) -> anyhow::Result<serde_json::Value> {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P384_SHA384_FIXED, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("key generation"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("key"))?;
    let message = [0x5au8; 0x2a0];
    let signature = pair
        .sign(&rng, &message)
        .map_err(|_| anyhow::anyhow!("sign"))?;
    let public = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, pair.public_key().as_ref());
    let guest_key = EphemeralKey::generate(Kem::X25519);
    let public_key = guest_key.public_key();
    let secret = [7u8; 32];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        public
            .verify(&message, signature.as_ref())
            .map_err(|_| anyhow::anyhow!("verify"))?;
        attestation::protocol::seal(&public_key, "db-key", 1, "data-key", &secret)?;
        n += 1;
    }
    let per_second = n as f64 / started.elapsed().as_secs_f64();
    Ok(json!({ "floor_per_second": per_second, "iterations": n }))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let out = match cli.command {
        Command::Floor { duration, json } => {
            let v = floor(Duration::from_secs(duration.max(1)))?;
            if !json {
                #[allow(clippy::print_stdout)]
                {
                    println!(
                        "crypto floor (ECDSA P-384 verify + HPKE seal): {:.0}/s on one core",
                        v["floor_per_second"].as_f64().unwrap_or(0.0)
                    );
                }
                return Ok(());
            }
            v
        }
        Command::Hold {
            url,
            ca,
            connections,
            broker_pid,
            sources,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(hold(&url, &ca, connections, broker_pid, sources))?
        }
        Command::Ocsp {
            url,
            ca,
            issuer,
            serials,
            mode,
            concurrency,
            duration,
            server_pid,
            check_every,
            json,
        } => {
            let issuer_pem =
                std::fs::read(&issuer).with_context(|| issuer.display().to_string())?;
            let issuer_der = attestation::certs::decode_pem_or_der(&issuer_pem, "issuer")?
                .into_iter()
                .next()
                .context("--issuer: no certificate")?;
            let subjects = std::fs::read_to_string(&serials)
                .with_context(|| serials.display().to_string())?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| -> anyhow::Result<_> {
                    let mut hex_serial = l.to_ascii_lowercase();
                    if hex_serial.len() % 2 == 1 {
                        hex_serial.insert(0, '0');
                    }
                    let bytes = hex::decode(&hex_serial).context("--serials: hex")?;
                    Ok(attestation::ocsp::status::Subject::for_serial(
                        &issuer_der,
                        &bytes,
                    )?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if subjects.is_empty() {
                bail!("--serials: no serial");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let v = rt.block_on(ocsp(
                &url,
                ca.as_ref(),
                subjects,
                mode,
                concurrency,
                Duration::from_secs(duration.max(1)),
                server_pid,
                check_every,
            ))?;
            if !json {
                #[allow(clippy::print_stdout)]
                {
                    println!(
                        "{} responses ({} checked, {} errors): {:.0}/s, {} per server CPU-second; p50 {:.2} ms p99 {:.2} ms",
                        v["responses"],
                        v["checked"],
                        v["errors"],
                        v["responses_per_second"].as_f64().unwrap_or(0.0),
                        v["responses_per_server_cpu_second"],
                        v["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                        v["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
                    );
                }
                return Ok(());
            }
            v
        }
        Command::Handshake {
            url,
            ca,
            tls12,
            kx,
            resume,
            client_cert,
            client_key,
            path,
            concurrency,
            duration,
            broker_pid,
            sources,
            json,
        } => {
            if !url.starts_with("https://") {
                bail!("--url: https://");
            }
            let client = client_cert.as_ref().zip(client_key.as_ref());
            let config = handshake_config(&ca, tls12, kx, resume, client)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let mut v = rt.block_on(handshakes(
                &url,
                config,
                &path,
                concurrency,
                Duration::from_secs(duration.max(1)),
                broker_pid,
                sources,
            ))?;
            v["setup"] = json!({
                "version": if tls12 { "1.2" } else { "1.3" },
                "kx": format!("{kx:?}").to_lowercase(),
                "resume": resume,
                "client_certificate": client.is_some(),
            });
            if !json {
                #[allow(clippy::print_stdout)]
                {
                    println!(
                        "{} connections ({} resumed, {} errors): {:.0}/s, {} per broker CPU-second; \
                         handshake p50 {:.2} ms, first answer p50 {:.2} ms p99 {:.2} ms",
                        v["connections"],
                        v["resumed"],
                        v["errors"],
                        v["connections_per_second"].as_f64().unwrap_or(0.0),
                        v["connections_per_broker_cpu_second"],
                        v["handshake_ms"]["p50"].as_f64().unwrap_or(0.0),
                        v["first_answer_ms"]["p50"].as_f64().unwrap_or(0.0),
                        v["first_answer_ms"]["p99"].as_f64().unwrap_or(0.0),
                    );
                }
                return Ok(());
            }
            v
        }
        Command::Run {
            url,
            ca,
            sim_dir,
            mode,
            protocol,
            concurrency,
            rate,
            duration,
            secret,
            broker_pid,
            check_every,
            sources,
            json,
        } => {
            if !url.starts_with("https://") {
                bail!("--url: https://");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let v = rt.block_on(run(
                url.trim_end_matches('/').to_string(),
                ca,
                sim_dir,
                mode,
                protocol,
                concurrency,
                rate,
                Duration::from_secs(duration.max(1)),
                secret,
                broker_pid,
                check_every,
                sources,
            ))?;
            if !json {
                #[allow(clippy::print_stdout)]
                {
                    println!(
                        "{} flows in {:.1} s: {:.1} flows/s; broker CPU {} s ({} flows per broker CPU-second); \
                         p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; errors {}; broker RSS {} MiB",
                        v["flows"],
                        v["seconds"].as_f64().unwrap_or(0.0),
                        v["flows_per_second"].as_f64().unwrap_or(0.0),
                        v["broker_cpu_seconds"],
                        v["flows_per_broker_cpu_second"],
                        v["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
                        v["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
                        v["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
                        v["latency_ms"]["max"].as_f64().unwrap_or(0.0),
                        v["errors"],
                        v["broker_rss_bytes"].as_u64().unwrap_or(0) / (1024 * 1024),
                    );
                }
                return Ok(());
            }
            v
        }
    };
    #[allow(clippy::print_stdout)]
    {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
