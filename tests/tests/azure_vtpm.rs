//! Azure confidential VMs end to end: the real `guest-agent` on an emulated Azure vTPM (swtpm
//! with an HCL report, a paravisor and THIM) receives its secrets from a real `broker` over
//! TLS; a wrong PCR, a quote signed by a key the HCL report does not vouch for, tampered
//! variable data, a stale nonce and replays are each refused with their reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use attestation::binding;
use attestation::protocol::{AttestRequest, ChallengeResponse, EphemeralKey, Kem, TpmQuote};
use base64::Engine;
use e2e::azure::{AzureCvm, Faults, Options, measurement};
use e2e::{Broker, agent, stderr};
use guest_agent::evidence::EvidenceSource;
use serde_json::{Value, json};

/// The value of a PCR extended once from zero with `digest`.
fn extended_once(digest: [u8; 32]) -> String {
    let mut input = [0u8; 64];
    input[32..].copy_from_slice(&digest);
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &input,
    ))
}

/// Provisions secrets and an Azure policy: the simulated measurement, secure boot, and the
/// boot loader's PCR 7.
fn provision(b: &Broker) {
    let fields = attestation::sim::ReportFields::new(attestation::Product::Genoa);
    let policy = json!({
        "rules": {
            "azure-guest": { "allOf": [
                { "claim": "root", "equals": "simulated" },
                { "claim": "measurement", "equals": hex::encode(fields.measurement) },
                { "claim": "azure.secure_boot", "equals": true },
                { "claim": "azure.console_enabled", "equals": false },
                { "claim": "tpm.pcr.7", "equals": extended_once(measurement("emulated firmware stage 7")) }
            ] }
        },
        "secrets": { "web-tls": ["azure-guest"], "db-key": ["azure-guest"] }
    });
    let policy_path = b.dir.join("azure-policy.json");
    std::fs::write(&policy_path, policy.to_string()).unwrap();
    b.provision(&policy_path);
}

fn agent_config(b: &Broker, cvm: &AzureCvm, out: &Path) -> PathBuf {
    let cfg = out.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"broker_url = "https://127.0.0.1:{port}"
broker_ca = "{ca}"
platform = "azure-vtpm"
deadline_secs = 30
secrets_dir = "{dir}"

[retry]
initial_ms = 100
max_ms = 500

[[secrets]]
name = "web-tls"

[[secrets]]
name = "db-key"

[azure]
tcti = "{tcti}"
thim_url = "{thim}"
report_timeout_ms = 10000
"#,
            port = b.port,
            ca = b.dir.join("ca.pem").display(),
            dir = out.join("credstore").display(),
            tcti = cvm.tcti(),
            thim = cvm.thim_url(),
        ),
    )
    .unwrap();
    cfg
}

fn cvm(b: &Broker, options: Options) -> AzureCvm {
    assert!(
        e2e::azure::swtpm_available(),
        "swtpm is not installed: run `make deps`"
    );
    AzureCvm::start(&b.simulated_amd(), options).unwrap()
}

/// Runs the agent on `cvm` and expects a final refusal naming `check`.
fn expect_refused(b: &Broker, cvm: &AzureCvm, check: &str, why: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = agent_config(b, cvm, dir.path());
    let out = agent(&cfg, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{check}: {err}");
    assert!(err.contains("refused: attest: HTTP 403"), "{check}: {err}");
    assert!(err.contains(&format!("[{check}]")), "{check}: {err}");
    assert!(err.contains(why), "{check}: {err}");
    assert!(!dir.path().join("credstore/web-tls").exists());
}

#[test]
fn azure_guest_gets_its_secrets_and_tampered_vms_get_nothing() {
    let b = Broker::start();
    provision(&b);
    let good = cvm(&b, Options::default());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = agent_config(&b, &good, tmp.path());

    let out = agent(&cfg, &[]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), good.log());
    assert_eq!(
        std::fs::read(tmp.path().join("credstore/web-tls")).unwrap(),
        std::fs::read(b.dir.join("web-tls.pem")).unwrap()
    );
    assert_eq!(
        std::fs::read(tmp.path().join("credstore/db-key"))
            .unwrap()
            .len(),
        32
    );
    assert!(
        good.regenerations() >= 1,
        "the paravisor regenerated the HCL report"
    );
    // The operator's view: `guest-agent report` saves the HCL report, its quote and THIM's
    // certificates; `broker verify` checks them all and shows the PCRs; `policy suggest`
    // drafts an Azure policy that pins them.
    let saved = tmp.path().join("evidence.bin");
    let out = agent(&cfg, &["report", "--out", saved.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let certs = format!("{}.certs.pem", saved.display());
    let quote = format!("{}.quote.json", saved.display());
    let ark = b.dir.join("sim/ark.pem");
    let evidence_args = |quote: &str| {
        vec![
            "--report".to_string(),
            saved.display().to_string(),
            "--vek".into(),
            certs.clone(),
            "--quote".into(),
            quote.to_string(),
            "--dangerous-trust-simulated-root".into(),
            ark.display().to_string(),
        ]
    };
    let run = |cmd: &[&str], quote: &str| {
        let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        args.extend(evidence_args(quote));
        b.cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let pcr7 = extended_once(measurement("emulated firmware stage 7"));
    let out = run(&["verify"], &quote);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("vTPM quote    verified"), "{text}");
    assert!(text.contains(&format!("pcr 7         {pcr7}")), "{text}");
    let out = run(&["policy", "suggest", "--secret", "db-key"], &quote);
    assert!(out.status.success(), "{}", stderr(&out));
    let draft: Value = serde_json::from_slice(&out.stdout).unwrap();
    let conditions = draft["rules"]["suggested"]["allOf"].as_array().unwrap();
    assert!(conditions.contains(&json!({ "claim": "tpm.pcr.7", "equals": pcr7 })));
    assert!(conditions.contains(&json!({ "claim": "azure.secure_boot", "equals": true })));
    assert!(conditions.contains(
        &json!({ "claim": "azure.vm_id", "in": ["00000000-5349-4d55-4c41-544544000001"] })
    ));
    assert!(
        draft["description"]
            .as_str()
            .unwrap()
            .contains("pins this VM")
    );
    // A quote file whose PCR values were edited is refused, with the reason.
    let mut doctored: Value = serde_json::from_slice(&std::fs::read(&quote).unwrap()).unwrap();
    doctored["pcrs"][7] = json!("11".repeat(32));
    let doctored_path = tmp.path().join("doctored.quote.json");
    std::fs::write(&doctored_path, doctored.to_string()).unwrap();
    let out = run(&["verify", "--json"], doctored_path.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let refusal: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(refusal["check"], "tpm_pcr_digest");

    // `auto` recognises the Azure vTPM by its HCL report index.
    let auto = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("platform = \"azure-vtpm\"", "platform = \"auto\"");
    std::fs::write(&cfg, auto).unwrap();
    let out = agent(&cfg, &["check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("Azure CVM"), "{}", stderr(&out));

    // A VM whose boot loader measured something else: PCR 7 differs.
    let wrong_pcr = Options {
        extend: vec![(7, measurement("an unexpected boot loader"))],
        ..Options::default()
    };
    expect_refused(&b, &cvm(&b, wrong_pcr), "policy", "tpm.pcr.7 ==");

    // The HCL report vouches for one key, the quote is signed by another.
    let foreign = Options {
        faults: Faults {
            foreign_attestation_key: true,
            ..Faults::default()
        },
        ..Options::default()
    };
    expect_refused(
        &b,
        &cvm(&b, foreign),
        "tpm_quote_signature",
        "TPM quote signature does not verify",
    );

    // The variable data was changed after the SNP report was signed over it.
    let tampered = Options {
        faults: Faults {
            tamper_var_data: true,
            ..Faults::default()
        },
        ..Options::default()
    };
    expect_refused(
        &b,
        &cvm(&b, tampered),
        "hcl_var_data_digest",
        "HCL variable data does not match REPORT_DATA",
    );

    // Each outcome is audited with its evidence kind and reason.
    let audit = b.cli(&["audit", "--action", "attest", "--json"]);
    assert!(audit.status.success(), "{}", stderr(&audit));
    let text = String::from_utf8_lossy(&audit.stdout);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let records = doc["records"].as_array().unwrap();
    for (outcome, reason) in [
        ("released", None),
        ("refused", Some("policy")),
        ("refused", Some("tpm_quote_signature")),
        ("refused", Some("hcl_var_data_digest")),
    ] {
        assert!(
            records.iter().any(|r| r["outcome"] == outcome
                && r["detail"]["evidence"] == "az-snp-vtpm"
                && reason.is_none_or(|w| r["detail"]["reason"] == w)),
            "{outcome} {reason:?} not audited: {text}"
        );
    }
}

/// Evidence from the emulated vTPM for a fresh challenge, built with the agent's own source.
async fn request(
    b: &Broker,
    http: &reqwest::Client,
    cvm: &AzureCvm,
) -> (AttestRequest, EphemeralKey) {
    let challenge: ChallengeResponse = http
        .post(b.url("/v1/challenge"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&challenge.nonce)
        .unwrap();
    let key = EphemeralKey::generate(Kem::X25519);
    let rd = binding::report_data(&nonce, &key.public_key().binding_bytes().unwrap());
    let source = guest_agent::azure::AzureVtpm::new(cvm.tcti(), Duration::from_secs(10));
    let tcti_source = tokio::task::spawn_blocking(move || source.report(rd))
        .await
        .unwrap()
        .unwrap();
    let mut evidence = tcti_source;
    evidence.certificates =
        guest_agent::azure::thim_certificates(&cvm.thim_url(), &evidence.report).await;
    assert_eq!(
        evidence.certificates.len(),
        3,
        "VCEK, ASK and ARK from THIM"
    );
    (
        AttestRequest {
            nonce: challenge.nonce,
            evidence: evidence.into_wire(),
            public_key: key.public_key(),
            secrets: vec!["db-key".into()],
            certificates: Vec::new(),
        },
        key,
    )
}

async fn post(http: &reqwest::Client, b: &Broker, body: &AttestRequest) -> (u16, Value) {
    let r = http
        .post(b.url("/v1/attest"))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn quote_of(r: &mut AttestRequest) -> &mut TpmQuote {
    match &mut r.evidence {
        attestation::protocol::Evidence::AzSnpVtpm { quote, .. } => quote,
        other => panic!("not Azure evidence: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_stale_and_doctored_azure_evidence_is_refused() {
    let mut b = Broker::start();
    // Short-lived nonces, so that one can go stale within the test (10 s leaves room for
    // collecting evidence on a loaded machine).
    let cfg = b.dir.join("broker.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("nonce_ttl_secs = 60", "nonce_ttl_secs = 10");
    std::fs::write(&cfg, text).unwrap();
    b.serve();
    provision(&b);
    let vm = cvm(&b, Options::default());
    let http = b.guest_client(None);

    // Good evidence releases; the same request again is a replay.
    let (good, key) = request(&b, &http, &vm).await;
    let (status, body) = post(&http, &b, &good).await;
    assert_eq!(status, 200, "{body}");
    let sealed: attestation::protocol::AttestResponse =
        serde_json::from_value(body.clone()).unwrap();
    assert_eq!(key.open(&sealed.secrets[0]).unwrap().len(), 32);
    assert_eq!(
        body["claims"]["tpm"]["pcr"]["7"],
        extended_once(measurement("emulated firmware stage 7"))
    );
    let (status, body) = post(&http, &b, &good).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["type"], "urn:snp-key-broker:problem:nonce-replay");

    // PCR values that the quote does not cover.
    let (mut lie, _) = request(&b, &http, &vm).await;
    quote_of(&mut lie).pcrs[7] = "00".repeat(32);
    let (status, body) = post(&http, &b, &lie).await;
    assert_eq!(
        (status, body["check"].as_str()),
        (403, Some("tpm_pcr_digest")),
        "{body}"
    );

    // A quote and HCL report from an earlier challenge, sent with a fresh nonce.
    let (old, _) = request(&b, &http, &vm).await;
    let (mut fresh, _) = request(&b, &http, &vm).await;
    fresh.evidence = old.evidence;
    let (status, body) = post(&http, &b, &fresh).await;
    assert_eq!(
        (status, body["check"].as_str()),
        (403, Some("tpm_quote_binding")),
        "{body}"
    );

    // Evidence for a nonce that expired before it was sent.
    let (stale, _) = request(&b, &http, &vm).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (status, body) = post(&http, &b, &stale).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["type"], "urn:snp-key-broker:problem:nonce-refused");
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
}
