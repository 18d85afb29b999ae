//! Connection-level attacks on a real TLS socket on loopback: connections that send nothing
//! (or a byte, or part of a request line or of the HTTP/2 preface), HTTP/2 connections that
//! only answer pings, one source holding every slot, HTTP/2 request bodies the broker does not
//! need or refuses, and HTTP/2 rapid reset of attestations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HEADER_TIMEOUT: u64 = 2;
const IDLE_TIMEOUT: u64 = 3;
const PER_SOURCE: usize = 4;
/// Generous: these machines are shared. A connection the broker never closes fails anyway.
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

struct Server {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), broker::Error>>>,
}

impl Server {
    async fn start(extra: &str) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let setup = broker::init::dev(&dir, &format!("127.0.0.1:{port}")).unwrap();
        let mut config = std::fs::read_to_string(&setup.config).unwrap();
        config.push_str(&format!(
            "\n[limits]\nheader_timeout_secs = {HEADER_TIMEOUT}\nidle_timeout_secs = {IDLE_TIMEOUT}\n\
             max_connections = 16\nmax_connections_per_source = {PER_SOURCE}\n{extra}"
        ));
        std::fs::write(&setup.config, config).unwrap();
        let settings = broker::config::Settings::load(&setup.config).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(broker::server::run(listener, settings, async move {
            let _ = rx.await;
        }));
        Server {
            _tmp: tmp,
            dir,
            port,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn tls(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.dir.join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    async fn connect_from(
        &self,
        source: [u8; 4],
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let tcp = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], self.port)))
            .await?;
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(self.tls(alpn))
                .connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured((*self.tls(&[b"h2"])).clone())
            .http2_prior_knowledge()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
    }
}

/// Whether the other end closes `stream` (end of stream or an error) within `within`; what it
/// sends meanwhile is discarded.
async fn closed_within(mut stream: impl tokio::io::AsyncRead + Unpin, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

async fn closed_by_server(tls: tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    closed_within(tls, CLOSE_WITHIN).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_complete_a_request_are_closed() {
    let server = Server::start("").await;
    type Case = (&'static str, &'static [&'static [u8]], &'static [u8]);
    let cases: [Case; 7] = [
        ("h2, nothing", &[b"h2"], b""),
        ("h2, one byte", &[b"h2"], b"P"),
        ("h2, part of the preface", &[b"h2"], b"PRI * HTTP/2.0\r\n"),
        ("http/1.1, nothing", &[b"http/1.1"], b""),
        ("http/1.1, one byte", &[b"http/1.1"], b"G"),
        ("no ALPN, nothing", &[], b""),
        (
            "http/1.1, part of a request line",
            &[b"http/1.1"],
            b"GET /healthz HT",
        ),
    ];
    let mut waits = Vec::new();
    for (i, (label, alpn, send)) in cases.into_iter().enumerate() {
        // Each from its own source: one source may hold only its share of connections.
        let source = [127, 0, 0, 10 + u8::try_from(i).unwrap()];
        let mut tls = server.connect_from(source, alpn).await.unwrap();
        if !send.is_empty() {
            tls.write_all(send).await.unwrap();
            tls.flush().await.unwrap();
        }
        waits.push(tokio::spawn(
            async move { (label, closed_by_server(tls).await) },
        ));
    }
    for w in waits {
        let (label, closed) = w.await.unwrap();
        assert!(closed, "{label}: still open after {CLOSE_WITHIN:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_that_only_answer_pings_are_closed() {
    let server = Server::start("").await;
    let tls = server.connect_from([127, 0, 0, 1], &[b"h2"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    // The client's connection task answers the server's pings, as h2 clients do.
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(server.url("/healthz"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    // Then it opens no stream: the broker ends the connection after the idle timeout.
    let ended = tokio::time::timeout(CLOSE_WITHIN, conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept open");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_slot() {
    let server = Arc::new(Server::start("").await);
    // An attacker on 127.0.0.2 holds its share of silent connections...
    let mut held = Vec::new();
    for _ in 0..PER_SOURCE {
        held.push(server.connect_from([127, 0, 0, 2], &[b"h2"]).await.unwrap());
    }
    // ...and gets no more.
    let extra = server.connect_from([127, 0, 0, 2], &[b"h2"]).await;
    assert!(extra.is_err(), "a source got more than its share");

    // Meanwhile it reconnects as fast as it can, and a guest on 127.0.0.1 is still served.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let server = server.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut attempts = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && attempts < 5_000 {
                attempts += 1;
                let _ = server.connect_from([127, 0, 0, 2], &[b"h2"]).await;
            }
            attempts
        })
    };
    let guest = server.client();
    for _ in 0..20 {
        let r = guest
            .post(server.url("/v1/challenge"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let attempts = attacker.await.unwrap();
    assert!(attempts > 0);
    drop(held);
    let m = guest
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("broker_connections_refused_total{reason=\"per_source\"}"),
        "{m}"
    );
    if let Ok(server) = Arc::try_unwrap(server) {
        server.shutdown().await;
    }
}

/// `curl --http2` (a client nobody here wrote): its exit status and the status it got.
async fn curl(server: &Server, path: &str, body: std::path::PathBuf) -> (i32, String) {
    let args = vec![
        "-s".to_string(),
        "--http2".into(),
        "--cacert".into(),
        server.dir.join("ca.pem").display().to_string(),
        "-X".into(),
        "POST".into(),
        "-H".into(),
        "content-type: application/json".into(),
        "--data-binary".into(),
        format!("@{}", body.display()),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code} %{http_version}".into(),
        "--max-time".into(),
        "20".into(),
        server.url(path),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_bodies_get_answers_not_stream_resets() {
    let server = Server::start("").await;
    let empty = server.dir.join("empty.json");
    std::fs::write(&empty, "{}").unwrap();
    let big = server.dir.join("big.json");
    std::fs::write(&big, vec![b'x'; 3 * 1024 * 1024]).unwrap();
    // A challenge with a body it does not need: answered, every time (curl exit 0, not 92).
    for _ in 0..20 {
        assert_eq!(
            curl(&server, "/v1/challenge", empty.clone()).await,
            (0, "200 2".to_string())
        );
    }
    // An attestation far over the body limit: the 413 HTTP/1.1 clients get.
    for _ in 0..3 {
        assert_eq!(
            curl(&server, "/v1/attest", big.clone()).await,
            (0, "413 2".to_string())
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_attestation_stops_before_verification() {
    // A "KDS" that accepts connections and never answers: a guest without certificates makes
    // the broker wait on it.
    let kds = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let kds_port = kds.local_addr().unwrap().port();
    let server = Server::start(&format!(
        "[kds]\nbase_url = \"http://127.0.0.1:{kds_port}\"\n"
    ))
    .await;
    let client = server.client();
    let nonce: serde_json::Value = client
        .post(server.url("/v1/challenge"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // A well-formed report with no certificates (its signature is never reached).
    let report = attestation::sim::SimulatedAmd::generate(
        attestation::Product::Genoa,
        std::time::SystemTime::now(),
    )
    .unwrap();
    let fields = attestation::sim::ReportFields::new(attestation::Product::Genoa);
    let vcek = report
        .issue_vcek(&fields.chip_id, fields.tcb, std::time::SystemTime::now())
        .unwrap();
    let raw = vcek.sign_report(&fields).unwrap();
    let key = attestation::protocol::EphemeralKey::generate(attestation::protocol::Kem::X25519);
    let body = serde_json::json!({
        "nonce": nonce["nonce"],
        "evidence": { "kind": "snp", "report": attestation::protocol::encode_b64(&raw) },
        "public_key": key.public_key(),
        "secrets": ["db-key"],
    });
    let request = client.post(server.url("/v1/attest")).json(&body).send();
    // The broker's lookup reaches the KDS...
    let (lookup, _) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::select! {
            a = kds.accept() => a.unwrap(),
            _ = request => panic!("answered before asking the KDS"),
        }
    })
    .await
    .unwrap();
    // ...and the client resets its stream (the request future above was dropped). The
    // broker abandons the attestation: its KDS connection closes, long before the KDS
    // client's own 10 s timeout, and nothing is audited.
    assert!(
        closed_within(lookup, Duration::from_secs(8)).await,
        "the cancelled attestation kept running"
    );
    let store = broker::store::SqliteStore::open(&server.dir.join("broker.db"))
        .await
        .unwrap();
    use broker::store::Store;
    let attests = store
        .query_audit(&broker::store::AuditQuery {
            action: Some("attest".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(attests.is_empty(), "{attests:?}");
    server.shutdown().await;
}

/// The first answer on a fresh connection is not held back: the broker sets TCP_NODELAY, so a
/// response does not wait (Nagle) behind the TLS session tickets for the client's delayed ACK
/// (~40 ms on Linux). Measured against the same server's keep-alive answers in the same run:
/// the least of ten fresh first answers must be within 30 ms of the least keep-alive one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_response_on_a_fresh_connection_is_not_delayed() {
    let server = Server::start("").await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // Time from sending a request to the first byte of its answer.
    async fn answer_time(
        tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
        request: &[u8],
    ) -> Duration {
        let started = std::time::Instant::now();
        tls.write_all(request).await.unwrap();
        tls.flush().await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tls.read(&mut buf).await.unwrap();
        let elapsed = started.elapsed();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        // The rest of the (small) answer, so the next request starts clean.
        if !buf[..n].ends_with(b"ok\n") {
            let _ = tokio::time::timeout(Duration::from_millis(50), tls.read(&mut buf)).await;
        }
        elapsed
    }
    let connect = || async {
        let tls = server
            .connect_from([127, 0, 0, 1], &[b"http/1.1"])
            .await
            .unwrap();
        // The client side without Nagle too: only the server's writes are under test.
        tls.get_ref().0.set_nodelay(true).unwrap();
        tls
    };
    let mut fresh = Vec::new();
    for _ in 0..10 {
        let mut tls = connect().await;
        fresh.push(answer_time(&mut tls, request).await);
    }
    let mut tls = connect().await;
    answer_time(&mut tls, request).await;
    let mut kept = Vec::new();
    for _ in 0..10 {
        kept.push(answer_time(&mut tls, request).await);
    }
    let (least_fresh, least_kept) = (*fresh.iter().min().unwrap(), *kept.iter().min().unwrap());
    assert!(
        least_fresh < least_kept + Duration::from_millis(30),
        "first answers on fresh connections {fresh:?}, keep-alive answers {kept:?}: TCP_NODELAY lost?"
    );
    server.shutdown().await;
}
