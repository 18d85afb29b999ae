//! TLS operations on a real socket: ALPN, TLS 1.3 resumption, OCSP stapling, certificate
//! reload without dropping open connections, graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Delegates to webpki and remembers the stapled OCSP response and the leaf.
#[derive(Debug)]
struct Recorder {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    ocsp: Mutex<Vec<u8>>,
    leaf: Mutex<Vec<u8>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.ocsp.lock().unwrap() = ocsp.to_vec();
        *self.leaf.lock().unwrap() = end_entity.to_vec();
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, &[], now)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

async fn connect(
    config: &Arc<ClientConfig>,
    port: u16,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

async fn healthz(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_resumption_ocsp_reload_and_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let setup = broker::init::dev(&dir, &format!("127.0.0.1:{port}")).unwrap();
    // Staple an OCSP response and reload every second.
    std::fs::write(dir.join("ocsp.der"), b"stapled-ocsp-v1").unwrap();
    let mut config = std::fs::read_to_string(&setup.config).unwrap();
    config = config.replace(
        "operator_ca = \"operator-ca.pem\"",
        "operator_ca = \"operator-ca.pem\"\nocsp = \"ocsp.der\"\nreload_interval_secs = 1",
    );
    std::fs::write(&setup.config, config).unwrap();
    let settings = broker::config::Settings::load(&setup.config).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(broker::server::run(listener, settings, async move {
        let _ = stop_rx.await;
    }));

    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let recorder = Arc::new(Recorder {
        inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap(),
        ocsp: Mutex::new(Vec::new()),
        leaf: Mutex::new(Vec::new()),
    });
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = Arc::new(client);

    // ALPN and a full handshake, with the OCSP response stapled.
    let mut first = connect(&client, port).await;
    assert_eq!(first.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    assert_eq!(&recorder.ocsp.lock().unwrap()[..], b"stapled-ocsp-v1");
    assert!(healthz(&mut first).await.starts_with("HTTP/1.1 200"));
    let old_leaf = recorder.leaf.lock().unwrap().clone();

    // The same client resumes.
    let mut again = connect(&client, port).await;
    assert!(healthz(&mut again).await.starts_with("HTTP/1.1 200"));
    assert_eq!(
        again.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );

    // h2 is offered too.
    let mut h2 = (*client).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let h2 = Arc::new(h2);
    let s = connect(&h2, port).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Replace certificate, key and OCSP response: new connections see them, the open one
    // keeps working.
    let new_key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    // Re-issue under the dev CA: init wrote no CA key, so issue with a fresh self-signed
    // certificate trusted through a new client root instead.
    let cert = params.self_signed(&new_key).unwrap();
    std::fs::remove_file(dir.join("server.key")).unwrap();
    broker::keys::write_private_file(&dir.join("server.key"), new_key.serialize_pem().as_bytes())
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("ocsp.der"), b"stapled-ocsp-v2").unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let recorder2 = Arc::new(Recorder {
        inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap(),
        ocsp: Mutex::new(Vec::new()),
        leaf: Mutex::new(Vec::new()),
    });
    let client2 = Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(recorder2.clone())
            .with_no_client_auth(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let ok = tokio_rustls::TlsConnector::from(client2.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .is_ok();
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "certificate was not reloaded"
        );
    }
    assert_ne!(*recorder2.leaf.lock().unwrap(), old_leaf);
    assert_eq!(&recorder2.ocsp.lock().unwrap()[..], b"stapled-ocsp-v2");
    // The connection opened before the reload still serves requests.
    assert!(healthz(&mut first).await.starts_with("HTTP/1.1 200"));

    // Graceful shutdown: run() returns.
    drop(first);
    drop(again);
    drop(s);
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}
