//! The broker staples OCSP for its own server certificate, against a responder nobody here
//! wrote: `openssl ocsp -index … -port …` answering for an OpenSSL CA whose server
//! certificate names it in AuthorityInfoAccess. Checked with `openssl s_client -status`:
//! nothing stapled while the responder is down (and the broker serves all the same), a good
//! response once it answers, kept across a reload of the same certificate and after the
//! responder goes away, and nothing stapled once that response's nextUpdate has passed. About 70 seconds: OpenSSL's shortest response
//! validity is one minute.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{Broker, arg as p, free_port, ok, openssl, openssl_ec_req};

/// An OpenSSL CA, and a server certificate from it for 127.0.0.1 naming the responder at
/// `ocsp_port`, written over the dev setup's server certificate (leaf, then the CA).
fn server_certificate(dir: &Path, work: &Path, ocsp_port: u16) {
    let ca_key = work.join("ca.key");
    let ca = work.join("ca.pem");
    openssl_ec_req(
        "P-256",
        &ca_key,
        &ca,
        "/CN=Stapling Test CA",
        &[
            "-x509",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let csr = work.join("server.csr");
    let key = dir.join("server.key");
    openssl_ec_req("P-256", &key, &csr, "/CN=broker", &[]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ext = work.join("ext.cnf");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n\
             authorityInfoAccess=OCSP;URI:http://127.0.0.1:{ocsp_port}/\n"
        ),
    )
    .unwrap();
    let leaf = work.join("leaf.pem");
    ok(&openssl(&[
        "x509",
        "-req",
        "-in",
        p(&csr),
        "-CA",
        p(&ca),
        "-CAkey",
        p(&ca_key),
        "-set_serial",
        "0x5A17",
        "-days",
        "2",
        "-extfile",
        p(&ext),
        "-out",
        p(&leaf),
    ]));
    let chain = std::fs::read_to_string(&leaf).unwrap() + &std::fs::read_to_string(&ca).unwrap();
    std::fs::write(dir.join("server.pem"), chain).unwrap();
    // OpenSSL's responder database: serial 5A17, valid.
    std::fs::write(
        work.join("index.txt"),
        "V\t301231000000Z\t\t5A17\tunknown\t/CN=broker\n",
    )
    .unwrap();
}

/// `openssl ocsp` answering on `port`, signing with the CA, responses valid one minute. Ready
/// once it says so on standard error (a bare probe connection would wedge it: it serves one
/// connection at a time and waits for that one's request).
fn responder(work: &Path, port: u16) -> Child {
    let mut child = Command::new("openssl")
        .args([
            "ocsp",
            "-index",
            p(&work.join("index.txt")),
            "-port",
            &port.to_string(),
        ])
        .args([
            "-rsigner",
            p(&work.join("ca.pem")),
            "-rkey",
            p(&work.join("ca.key")),
        ])
        .args(["-CA", p(&work.join("ca.pem")), "-nmin", "1", "-ignore_err"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("waiting for OCSP client connections") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("openssl ocsp did not start");
    child
}

/// What `openssl s_client -status` shows of the stapled response (the server verified to
/// the test CA).
fn stapled(b: &Broker, work: &Path) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", b.port),
            "-status",
        ])
        .args(["-CAfile", p(&work.join("ca.pem")), "-verify_return_error"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    text
}

fn wait_for(b: &Broker, what: &str, limit: Duration, mut probe: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !probe() {
        if start.elapsed() >= limit {
            let log = b.log_text();
            let stapler: Vec<&str> = log.lines().filter(|l| l.contains("OCSP")).collect();
            panic!(
                "{what}: not within {limit:?}; the broker's OCSP log:\n{}",
                stapler.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    start.elapsed()
}

/// The "Next Update" OpenSSL prints, as Unix seconds.
fn next_update(text: &str) -> u64 {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Next Update: "))
        .unwrap_or_else(|| panic!("no Next Update in {text}"));
    let out = Command::new("date")
        .args(["-u", "-d", line, "+%s"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn the_broker_staples_what_the_responder_says_until_it_expires() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let ocsp_port = free_port();
    let b = Broker::start_configured(None, |dir, text| {
        server_certificate(dir, w, ocsp_port);
        text
    });

    // The responder is down: the broker serves, and staples nothing.
    let first = stapled(&b, w);
    assert!(first.contains("OCSP response: no response sent"), "{first}");

    // It answers: the next retry (5 s after the first failure) staples a good response.
    let mut ocsp = responder(w, ocsp_port);
    let mut text = String::new();
    wait_for(
        &b,
        "a good stapled response",
        Duration::from_secs(30),
        || {
            text = stapled(&b, w);
            text.contains("Cert Status: good")
        },
    );
    assert!(text.contains("OCSP Response Status: successful"), "{text}");
    let expires = next_update(&text);
    let metrics = Command::new("curl")
        .args(["-sS", "--cacert", p(&w.join("ca.pem"))])
        .arg(b.url("/metrics"))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(&format!(
            "broker_tls_ocsp_staple_expiry_timestamp_seconds {expires}"
        )),
        "{metrics}"
    );

    // The same certificate reloaded (its file touched): the staple stays (the stapler would
    // not ask again before half the response's validity, 30 s away).
    let cert = b.dir.join("server.pem");
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    std::fs::File::options()
        .append(true)
        .open(&cert)
        .unwrap()
        .set_modified(later)
        .unwrap();
    wait_for(
        &b,
        "the certificate reloaded",
        Duration::from_secs(25),
        || b.log_text().contains("TLS certificate reloaded"),
    );
    let reloaded = stapled(&b, w);
    assert!(reloaded.contains("Cert Status: good"), "{reloaded}");

    // It goes away: the response is kept while it is current, then withdrawn.
    let _ = ocsp.kill();
    let _ = ocsp.wait();
    let kept = stapled(&b, w);
    if unix_now() < expires {
        assert!(kept.contains("Cert Status: good"), "{kept}");
    }
    wait_for(
        &b,
        "the stapled response withdrawn",
        Duration::from_secs(90),
        || stapled(&b, w).contains("OCSP response: no response sent"),
    );
    assert!(unix_now() >= expires, "withdrawn before its nextUpdate");
    assert!(b.log_text().contains("the stapled OCSP response expired"));
}
