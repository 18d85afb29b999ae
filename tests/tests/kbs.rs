//! Confidential Containers KBS clients against a real `broker serve`: a client written from
//! the facts file and `kbs-types` (tests/src/kbs.rs) runs the whole handshake with simulated
//! SNP and Azure vTPM evidence and opens the JWEs with RustCrypto, and every broken twin is
//! refused with the status the real client acts on (401 new handshake, 403 stop, 404).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use attestation::sim::SimulatedVtpm;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use e2e::kbs::{
    KbsClient, TeeKeyPair, attestation, report_data, runtime_digest, snp_primary_evidence,
};
use e2e::{Broker, Guest, stderr};
use kbs_types::Tee;
use serde_json::{Value, json};
use std::process::Command;

const DB_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A broker with the KBS front end (on in dev setups), an alias, a bundle of the simulated
/// ARK and ASK (Azure evidence carries only the VCEK), and `edit` applied to its config.
fn kbs_broker(edit: impl FnOnce(String) -> String) -> Broker {
    kbs_broker_on(None, edit)
}

/// [`kbs_broker`] on the PostgreSQL database at `postgres` (or SQLite).
fn kbs_broker_on(postgres: Option<&str>, edit: impl FnOnce(String) -> String) -> Broker {
    Broker::start_configured(postgres, |dir, c| {
        let sim = dir.join("sim");
        let bundle = [
            std::fs::read_to_string(sim.join("ark.pem")).unwrap(),
            std::fs::read_to_string(sim.join("ask.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(sim.join("anchors.pem"), bundle).unwrap();
        let c = c.replace(
            "dangerous_trust_simulated_root = \"sim/ark.pem\"",
            "dangerous_trust_simulated_root = \"sim/anchors.pem\"",
        );
        edit(format!(
            "{c}\n[kbs.resources]\n\"default/tls/web\" = \"web-tls\"\n"
        ))
    })
}

fn provision(b: &Broker) {
    let measurement =
        hex::encode(attestation::sim::ReportFields::new(attestation::Product::Genoa).measurement);
    let policy = json!({
        "rules": {
            "sim-genoa": { "allOf": [
                { "claim": "root", "equals": "simulated" },
                { "claim": "measurement", "equals": measurement }
            ] },
            "never": { "allOf": [ { "claim": "measurement", "equals": "00".repeat(48) } ] }
        },
        "secrets": {
            "default.key.db": ["sim-genoa"],
            "web-tls": ["sim-genoa"],
            "default.key.refused": ["never"]
        }
    });
    let policy_path = b.dir.join("kbs-policy.json");
    std::fs::write(&policy_path, policy.to_string()).unwrap();
    let db = b.dir.join("db.key");
    std::fs::write(&db, DB_KEY).unwrap();
    let web = b.dir.join("web-tls.pem");
    for args in [
        vec![
            "secret",
            "put",
            "default.key.db",
            "--file",
            db.to_str().unwrap(),
            "--kind",
            "opaque",
        ],
        vec![
            "secret",
            "put",
            "default.key.refused",
            "--file",
            db.to_str().unwrap(),
            "--kind",
            "opaque",
        ],
        vec![
            "secret",
            "put",
            "web-tls",
            "--file",
            web.to_str().unwrap(),
            "--kind",
            "tls-key",
        ],
        vec!["policy", "set", policy_path.to_str().unwrap()],
    ] {
        let out = b.cli(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
}

fn client(b: &Broker) -> KbsClient {
    KbsClient::new(b.guest_client(None), b.url(""))
}

/// SNP evidence for `key`, bound with SHA-512 (or SHA-384 when `sha512` is false) to
/// `nonce`, in the client's JSON form.
fn snp_body(
    guest: &Guest,
    nonce: &str,
    bound_key: &TeeKeyPair,
    sent_key: &TeeKeyPair,
    sha512: bool,
) -> Value {
    let digest = runtime_digest("", nonce, &bound_key.tee_pubkey(), sha512);
    let report = guest.sign(report_data(&digest));
    let (vcek, ask) = guest.certificates();
    let primary = snp_primary_evidence(&report, &[("vcek", vcek), ("ask", ask)]);
    attestation(nonce, &sent_key.tee_pubkey(), primary)
}

fn open(key: &TeeKeyPair, answer: &(u16, Value)) -> Vec<u8> {
    assert_eq!(answer.0, 200, "{}", answer.1);
    let jwe: kbs_types::Response = serde_json::from_value(answer.1.clone()).unwrap();
    key.decrypt(&jwe).unwrap()
}

fn assert_error(answer: &(u16, Value), status: u16, text: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    // The client reads {type, detail}.
    let info: kbs_types::ErrorInformation =
        serde_json::from_value(answer.1.clone()).unwrap_or_else(|e| panic!("{e}: {}", answer.1));
    assert!(
        info.detail.contains(text) || answer.1.to_string().contains(text),
        "expected {text:?} in {}",
        answer.1
    );
}

async fn native_nonce(b: &Broker) -> String {
    b.guest_client(None)
        .post(b.url("/v1/challenge"))
        .send()
        .await
        .unwrap()
        .json::<attestation::protocol::ChallengeResponse>()
        .await
        .unwrap()
        .nonce
}

async fn fetch_jwks(b: &Broker) -> Value {
    b.guest_client(None)
        .get(b.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn audit(b: &Broker, action: &str) -> Vec<Value> {
    let out = b.cli(&["audit", "--action", action, "--json", "--limit", "1000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["records"].as_array().unwrap().clone()
}

/// The session cookie is sealed under the current data key: a handshake begun before
/// `broker keys rotate` finishes after it on a replica that has the new key, and a cookie
/// that replica seals under the new key is served by one that has not loaded it yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kbs_sessions_cross_a_data_key_rotation_and_replicas() {
    let mut pg = e2e::postgres::PgServer::start();
    let url = pg.create_database("kbs_rotation");
    let mut b = kbs_broker_on(Some(&url), |c| c);
    assert_eq!(b.add_replica(), 1);
    provision(&b);
    let guest = Guest::new(&b.simulated_amd(), |_| {});
    let mut before = KbsClient::new(b.guest_client(None), b.replica_url(1, ""));
    let challenge = before.auth(Tee::Snp).await;

    let out = Command::new(e2e::binary("broker").unwrap())
        .args(["keys", "rotate", "--config"])
        .arg(b.dir.join("broker.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let rotation: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rotation["version"], 2, "{rotation}");
    // Replica 0 starts again with the new data key current; replica 1 has not loaded it.
    b.serve();
    let on = |replica: usize, cookie: Option<String>| {
        let mut c = KbsClient::new(b.guest_client(None), b.replica_url(replica, ""));
        c.cookie = cookie;
        c
    };

    let key = TeeKeyPair::p256();
    let mut after = on(0, before.cookie.clone());
    let (status, body) = after
        .attest_raw(&snp_body(&guest, &challenge.nonce, &key, &key, true))
        .await;
    assert_eq!(
        status, 200,
        "a challenge sealed under the old data key: {body}"
    );
    let mut elsewhere = on(1, after.cookie.clone());
    assert_eq!(
        open(&key, &elsewhere.resource("default/key/db").await),
        DB_KEY,
        "a session sealed under the new data key, at a replica that had not loaded it"
    );
    // A cookie no replica sealed is still no session, after the reload.
    let mut forged = on(1, Some(B64URL.encode([7u8; 64])));
    assert_error(
        &forged.resource("default/key/db").await,
        401,
        "not one of this broker's",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kbs_client_gets_its_resources_with_snp_evidence() {
    let b = kbs_broker(|c| c);
    provision(&b);
    let guest = Guest::new(&b.simulated_amd(), |_| {});
    let mut c = client(&b);

    // The client's first request carries no cookie and must get 401 to start a handshake.
    assert_error(&c.resource("default/key/db").await, 401, "no session");

    let challenge = c.auth(Tee::Snp).await;
    assert_eq!(
        challenge.extra_params,
        json!({"selected-hash-algorithm": "sha512"})
    );
    let auth_cookie = c.cookie.clone().expect("a session cookie");
    // Before attesting, the session is not enough.
    assert_error(&c.resource("default/key/db").await, 401, "not attested");

    let key = TeeKeyPair::p256();
    let (status, body) = c
        .attest_raw(&snp_body(&guest, &challenge.nonce, &key, &key, true))
        .await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    assert_ne!(
        c.cookie.as_ref(),
        Some(&auth_cookie),
        "/attest replaces the cookie"
    );

    // Cookie mode: the resource decrypts with the client's own AAD reconstruction.
    assert_eq!(open(&key, &c.resource("default/key/db").await), DB_KEY);
    let pem = std::fs::read(b.dir.join("web-tls.pem")).unwrap();
    assert_eq!(open(&key, &c.resource("default/tls/web").await), pem);
    assert_error(
        &c.resource("default/key/refused").await,
        403,
        "default.key.refused",
    );
    assert_error(
        &c.resource("default/key/nope").await,
        404,
        "default.key.nope",
    );
    assert_error(&c.resource("default/key/a.b").await, 404, "no resource");

    // Passport mode: the token alone, on a client with no cookie.
    let mut passport = client(&b);
    passport.bearer = Some(token.clone());
    assert_eq!(
        open(&key, &passport.resource("default/key/db").await),
        DB_KEY
    );
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut claims: Value = serde_json::from_slice(&B64URL.decode(&parts[1]).unwrap()).unwrap();
    claims["submods"]["cpu0"]["ear_verifier_claims"]["tee-pubkey"] =
        serde_json::to_value(TeeKeyPair::p256().tee_pubkey()).unwrap();
    parts[1] = B64URL.encode(claims.to_string());
    passport.bearer = Some(parts.join("."));
    assert_error(&passport.resource("default/key/db").await, 401, "signature");

    // The token: an EAR with the TEE key and the claims digest, signed ES256 by a key the
    // JWKS publishes (checked here with RustCrypto's p256).
    let claims: Value =
        serde_json::from_slice(&B64URL.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert_eq!(claims["eat_profile"], "tag:ietf.org,2026:rats/ear#04");
    let sub = &claims["submods"]["cpu0"];
    assert_eq!(sub["ear_status"], "affirming");
    assert_eq!(
        sub["ear_verifier_claims"]["tee-pubkey"],
        serde_json::to_value(key.tee_pubkey()).unwrap()
    );
    assert_eq!(sub["ear_verifier_claims"]["rules"], json!(["sim-genoa"]));
    assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap());
    let jwks = fetch_jwks(&b).await;
    let header: Value =
        serde_json::from_slice(&B64URL.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the token's key is published");
    let mut point = vec![4u8];
    point.extend(B64URL.decode(jwk["x"].as_str().unwrap()).unwrap());
    point.extend(B64URL.decode(jwk["y"].as_str().unwrap()).unwrap());
    use p256::ecdsa::signature::Verifier;
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&B64URL.decode(sig).unwrap()).unwrap();
    vk.verify(signed.as_bytes(), &sig).unwrap();

    // Offline verification with the CLI, against the published key set.
    let jwks_file = b.dir.join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let jwks_arg = jwks_file.to_str().unwrap();
    let ok = b.cli(&["token", "verify", &token, "--jwks", jwks_arg]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let printed: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(printed["submods"]["cpu0"]["ear_status"], "affirming");
    let late = b.cli(&[
        "token",
        "verify",
        &token,
        "--jwks",
        jwks_arg,
        "--at",
        "2100-01-01T00:00:00Z",
    ]);
    assert_eq!(late.status.code(), Some(1));
    assert!(stderr(&late).contains("expired"), "{}", stderr(&late));
    let forged = format!("{}x", &token[..token.len() - 1]);
    let bad = b.cli(&["token", "verify", &forged, "--jwks", jwks_arg]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));

    // Rotating the signing key: new tokens name the new key, the old token still works in
    // passport mode and verifies against the new key set.
    let rotated = b.cli(&["token", "rotate-key"]);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    let v: Value = serde_json::from_slice(&rotated.stdout).unwrap();
    assert_eq!(v["version"], 2);
    let mut again = client(&b);
    let ch = again.auth(Tee::Snp).await;
    let (status, body) = again
        .attest_raw(&snp_body(&guest, &ch.nonce, &key, &key, true))
        .await;
    assert_eq!(status, 200, "{body}");
    let new_token = body["token"].as_str().unwrap();
    let kid = |t: &str| -> Value {
        serde_json::from_slice::<Value>(&B64URL.decode(t.split('.').next().unwrap()).unwrap())
            .unwrap()["kid"]
            .clone()
    };
    assert_ne!(kid(new_token), kid(&token));
    passport.bearer = Some(token.clone());
    assert_eq!(
        open(&key, &passport.resource("default/key/db").await),
        DB_KEY
    );
    let jwks = fetch_jwks(&b).await;
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    for t in [&token, new_token] {
        let ok = b.cli(&["token", "verify", t, "--jwks", jwks_arg]);
        assert!(ok.status.success(), "{}", stderr(&ok));
    }

    // The same token for native evidence: POST /v1/token appraises and releases nothing;
    // the token names the native key the evidence bound.
    let http = b.guest_client(None);
    let nonce = native_nonce(&b).await;
    let native_key =
        attestation::protocol::EphemeralKey::generate(attestation::protocol::Kem::X25519);
    let request = guest.request(&nonce, &native_key, &[], None);
    let token_request = attestation::protocol::TokenRequest {
        nonce: request.nonce.clone(),
        evidence: request.evidence.clone(),
        public_key: request.public_key.clone(),
    };
    let r = http
        .post(b.url("/v1/token"))
        .json(&token_request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: attestation::protocol::TokenResponse = r.json().await.unwrap();
    let native_claims: Value = serde_json::from_slice(
        &B64URL
            .decode(answer.token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let sub = &native_claims["submods"]["cpu0"];
    assert_eq!(sub["ear_status"], "affirming");
    assert_eq!(
        sub["ear_verifier_claims"]["tee-pubkey"],
        serde_json::to_value(native_key.public_key()).unwrap()
    );
    assert_eq!(sub["ear_attester_claims"], answer.claims);
    let ok = b.cli(&["token", "verify", &answer.token, "--jwks", jwks_arg]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Spent: the same request again is a replay; a native token is no KBS passport.
    let r = http
        .post(b.url("/v1/token"))
        .json(&token_request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    passport.bearer = Some(answer.token.clone());
    assert_error(
        &passport.resource("default/key/db").await,
        401,
        "do not check out",
    );
    // Evidence bound to another key than the one named: refused for the binding.
    let nonce = native_nonce(&b).await;
    let other = attestation::protocol::EphemeralKey::generate(attestation::protocol::Kem::X25519);
    let request = guest.request(&nonce, &native_key, &[], Some(&other));
    let r = http
        .post(b.url("/v1/token"))
        .json(&attestation::protocol::TokenRequest {
            nonce: request.nonce,
            evidence: request.evidence,
            public_key: request.public_key,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["check"], "binding");

    // Audited like native releases, naming the front end and the binding.
    let attests = audit(&b, "attest");
    assert!(
        attests.iter().any(|r| r["outcome"] == "appraised"
            && r["detail"]["front_end"] == "kbs"
            && r["detail"]["binding"] == "sha512"),
        "{attests:?}"
    );
    let resources = audit(&b, "attest.resource");
    for (outcome, secret) in [
        ("released", "default.key.db"),
        ("released", "web-tls"),
        ("refused", "default.key.refused"),
    ] {
        assert!(
            resources.iter().any(|r| r["outcome"] == outcome
                && r["detail"]["front_end"] == "kbs"
                && r["detail"]["secrets"].to_string().contains(secret)),
            "{outcome} {secret}: {resources:?}"
        );
    }
    assert!(resources.iter().any(|r| r["detail"]["session"] == "token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kbs_key_kinds_azure_evidence_and_broken_twins() {
    let b = kbs_broker(|c| c.replace("nonce_ttl_secs = 60", "nonce_ttl_secs = 5"));
    provision(&b);
    let amd = b.simulated_amd();
    let guest = Guest::new(&amd, |_| {});

    // P-521 and RSA-OAEP-256 keys.
    for key in [TeeKeyPair::p521(), TeeKeyPair::rsa()] {
        let mut c = client(&b);
        let ch = c.auth(Tee::Snp).await;
        let (status, body) = c
            .attest_raw(&snp_body(&guest, &ch.nonce, &key, &key, true))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(open(&key, &c.resource("default/key/db").await), DB_KEY);
    }

    // A client that ignores the selected SHA-512 and binds with padded SHA-384: accepted,
    // and the audit says so.
    let key = TeeKeyPair::p256();
    let mut c = client(&b);
    let ch = c.auth(Tee::Snp).await;
    let (status, body) = c
        .attest_raw(&snp_body(&guest, &ch.nonce, &key, &key, false))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(audit(&b, "attest").iter().any(|r| {
        r["detail"]["binding"]
            .as_str()
            .is_some_and(|s| s.starts_with("sha384"))
    }));

    // Azure vTPM evidence (version 2): the digest is the quote's qualifying data and the
    // HCL user data.
    let vtpm = SimulatedVtpm::generate().unwrap();
    let mut c = client(&b);
    let ch = c.auth(Tee::AzSnpVtpm).await;
    let digest = runtime_digest("", &ch.nonce, &key.tee_pubkey(), true);
    let hcl = vtpm
        .hcl_report(guest.vcek(), &guest.fields, &digest)
        .unwrap();
    let quote = vtpm.quote(&digest).unwrap();
    let primary = json!({
        "version": 2,
        "tpm_quote": {
            "signature": hex::encode(&quote.signature),
            "message": hex::encode(&quote.message),
            "pcrs": quote.pcrs.iter().map(hex::encode).collect::<Vec<_>>(),
        },
        "hcl_report": B64URL.encode(&hcl),
        "vcek": B64URL.encode(guest.certificates().0),
    });
    let (status, body) = c
        .attest_raw(&attestation(&ch.nonce, &key.tee_pubkey(), primary.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(open(&key, &c.resource("default/key/db").await), DB_KEY);
    // The same evidence under a new nonce is not bound to it.
    let mut c = client(&b);
    let ch = c.auth(Tee::AzSnpVtpm).await;
    let r = c
        .attest_raw(&attestation(&ch.nonce, &key.tee_pubkey(), primary))
        .await;
    assert_error(&r, 403, "qualifying data");

    // /auth: wrong protocol version, unsupported TEE kinds (sample included), no hash.
    let mut c = client(&b);
    for (body, text) in [
        (
            json!({"version": "0.3.0", "tee": "snp", "extra-params": {}}),
            "version",
        ),
        (
            json!({"version": "0.4.0", "tee": "sample", "extra-params": {}}),
            "sample",
        ),
        (
            json!({"version": "0.4.0", "tee": "tdx", "extra-params": {}}),
            "tdx",
        ),
        (
            json!({"version": "0.4.0", "tee": "snp", "extra-params": {"supported-hash-algorithms": ["sm3"]}}),
            "sm3",
        ),
    ] {
        assert_error(&c.auth_raw(&body).await, 400, text);
    }

    // /attest without a session, with a cookie that is not this broker's, and with one
    // from another broker.
    let mut c = client(&b);
    let ch = c.auth(Tee::Snp).await;
    let body = snp_body(&guest, &ch.nonce, &key, &key, true);
    let good_cookie = c.cookie.clone();
    c.cookie = None;
    assert_error(&c.attest_raw(&body).await, 401, "no session");
    c.cookie = Some(B64URL.encode([7u8; 64]));
    assert_error(&c.attest_raw(&body).await, 401, "not one of this broker's");
    let other = Broker::start();
    let mut o = KbsClient::new(other.guest_client(None), other.url(""));
    o.auth(Tee::Snp).await;
    c.cookie = o.cookie.clone();
    assert_error(&c.attest_raw(&body).await, 401, "not one of this broker's");
    drop(other);

    // Evidence bound to another nonce, or to another key than the one sent (a JWK the
    // binding does not cover): refused (403) for the binding.
    c.cookie = good_cookie.clone();
    let other_nonce = snp_body(&guest, "another-nonce", &key, &key, true);
    let mut wrong = other_nonce.clone();
    wrong["runtime-data"]["nonce"] = json!(ch.nonce);
    assert_error(&c.attest_raw(&wrong).await, 403, "binding");
    c.cookie = good_cookie.clone();
    let swapped = snp_body(&guest, &ch.nonce, &TeeKeyPair::p256(), &key, true);
    assert_error(&c.attest_raw(&swapped).await, 403, "binding");
    // The runtime data names another nonce than the session's: a new handshake.
    c.cookie = good_cookie.clone();
    assert_error(&c.attest_raw(&other_nonce).await, 401, "nonce");
    // Malformed evidence (an unknown member), init data, an unusable key: 400.
    let mut extra = body.clone();
    extra["tee-evidence"]["primary_evidence"]["attestation_report"]["extra"] = json!(1);
    assert_error(&c.attest_raw(&extra).await, 400, "unknown field `extra`");
    let mut bad_key = body.clone();
    bad_key["runtime-data"]["tee-pubkey"]["crv"] = json!("P-384");
    assert_error(&c.attest_raw(&bad_key).await, 400, "P-384");
    // Refused before verification, and still audited (through the sampler's budget).
    let refused = audit(&b, "attest");
    for reason in ["kbs_evidence", "kbs_tee_pubkey"] {
        assert!(
            refused.iter().any(|r| r["outcome"] == "refused"
                && r["detail"]["front_end"] == "kbs"
                && r["detail"]["reason"] == reason),
            "{reason}: {refused:?}"
        );
    }
    // A report that fails verification: a measurement the VCEK did not sign.
    let mut forged = body.clone();
    forged["tee-evidence"]["primary_evidence"]["attestation_report"]["measurement"][0] = json!(1);
    assert_error(&c.attest_raw(&forged).await, 403, "signature");
    // The good body works once (init data is carried, not interpreted: the token says so);
    // its replay needs a new handshake.
    c.cookie = good_cookie.clone();
    let mut init = body.clone();
    init["init-data"] = json!({"format": "toml", "body": "version = \"0.1.0\""});
    let (status, answer) = c.attest_raw(&init).await;
    assert_eq!(status, 200, "{answer}");
    let token = answer["token"].as_str().unwrap();
    let claims: Value =
        serde_json::from_slice(&B64URL.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert!(
        claims["submods"]["cpu0"]["ear_verifier_claims"]["init_data"]
            .as_str()
            .unwrap()
            .contains("not verified")
    );
    c.cookie = good_cookie.clone();
    assert_error(&c.attest_raw(&init).await, 401, "used");

    // An expired session (nonces live 5 s here).
    let mut c = client(&b);
    let ch = c.auth(Tee::Snp).await;
    let body = snp_body(&guest, &ch.nonce, &key, &key, true);
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    assert_error(&c.attest_raw(&body).await, 401, "expired");
}
