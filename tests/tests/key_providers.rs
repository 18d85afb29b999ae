//! The master key's providers against a real PKCS#11 token (SoftHSM2): a broker whose store
//! holds its master key only wrapped by a non-extractable AES key in the token serves
//! releases and restarts; a store written with a key file moves under the token with
//! `broker keys wrap` and keeps every secret; and each way the set-up can be wrong (a wrong
//! PIN, a missing or extractable key, the old key file, another key file) is refused at start
//! with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::softhsm::{MODULE, SoftHsm};
use e2e::{Broker, binary, stderr};

/// `broker.toml` with its `[master_key]` section replaced by `section`.
fn with_master_key(config: &str, section: &str) -> String {
    let start = config.find("[master_key]").unwrap();
    let end = config[start + 1..]
        .find("\n[")
        .map(|i| start + 1 + i + 1)
        .unwrap_or(config.len());
    format!("{}{}\n{}", &config[..start], section, &config[end..])
}

/// Runs `broker serve --config config` expecting it to refuse to start; its standard error.
fn refused_start(config: &Path, env: &[(String, PathBuf)]) -> String {
    let mut child = Command::new(binary("broker").unwrap())
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            let mut text = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut text).unwrap();
            return text;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("broker serve did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn provision(b: &Broker) {
    b.provision(&b.dir.join("policy.json"));
}

fn hsm_env(hsm: &SoftHsm) -> Vec<(String, PathBuf)> {
    vec![("SOFTHSM2_CONF".into(), hsm.conf.clone())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_master_key_is_wrapped_by_the_token() {
    let hsm = SoftHsm::new("broker", "user-pin-1");
    let env = hsm_env(&hsm);
    let mut b = Broker::start_with_env(None, env.clone(), |dir, c| {
        let c = with_master_key(&c, &hsm.master_key_config("broker-kek", &hsm.pin_file));
        let config = dir.join("broker.toml");
        std::fs::write(&config, &c).unwrap();
        // The development key file is not used: gone, so nothing can fall back to it.
        std::fs::remove_file(dir.join("master.key")).unwrap();
        let out = Command::new(binary("broker").unwrap())
            .args(["keys", "create-kek", "--config"])
            .arg(&config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        // A second key under the same label is refused.
        let again = Command::new(binary("broker").unwrap())
            .args(["keys", "create-kek", "--config"])
            .arg(&config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert!(
            stderr(&again).contains("already has a key labelled"),
            "{}",
            stderr(&again)
        );
        c
    });
    provision(&b);
    let first = b.attest_once("db-key").await.unwrap();
    assert_eq!(first.len(), 32);

    let status = b.cli(&[
        "keys",
        "status",
        "--config",
        b.dir.join("broker.toml").to_str().unwrap(),
    ]);
    assert!(status.status.success(), "{}", stderr(&status));
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["recorded"], "pkcs11");
    assert!(v["sealed_records"].as_u64().unwrap() >= 3, "{v}");

    // A restart unwraps the same key: the same secret comes back.
    b.serve();
    assert_eq!(b.attest_once("db-key").await.unwrap(), first);

    // Broken set-ups, each refused at start with its reason.
    b.stop();
    let config = std::fs::read_to_string(b.dir.join("broker.toml")).unwrap();
    let write = |name: &str, text: String| {
        let p = b.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // Starts on `config` with its [master_key] replaced by `section`, expecting a refusal.
    let refused_with = |name: &str, section: &str| {
        refused_start(&write(name, with_master_key(&config, section)), &env)
    };
    let wrong_pin = b.dir.join("wrong.pin");
    std::fs::write(&wrong_pin, "not-the-pin\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong_pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = refused_with(
        "bad-pin.toml",
        &hsm.master_key_config("broker-kek", &wrong_pin),
    );
    assert!(e.contains("logging in to token"), "{e}");
    let e = refused_with(
        "no-key.toml",
        &hsm.master_key_config("no-such-key", &hsm.pin_file),
    );
    assert!(
        e.contains("has no secret key labelled \"no-such-key\""),
        "{e}"
    );
    // A key that can leave the token protects nothing.
    make_extractable_key(&hsm, "loose-key");
    let e = refused_with(
        "loose.toml",
        &hsm.master_key_config("loose-key", &hsm.pin_file),
    );
    assert!(e.contains("must be sensitive and never extractable"), "{e}");
    // A PIN file others can read.
    std::fs::set_permissions(&hsm.pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = refused_start(&b.dir.join("broker.toml"), &env);
    assert!(e.contains("0600"), "{e}");
    std::fs::set_permissions(&hsm.pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A key file no longer opens this store.
    let key_file = b.dir.join("other.key");
    std::fs::write(&key_file, format!("{}\n", "ab".repeat(31) + "cd")).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = refused_with(
        "file.toml",
        &format!("[master_key]\nfile = \"{}\"\n", key_file.display()),
    );
    assert!(e.contains("wrapped by the pkcs11 provider"), "{e}");
    // A PIN on the command line or in the environment is not an option: only a file or a
    // systemd credential (without $CREDENTIALS_DIRECTORY, the credential is refused).
    let e = refused_with(
        "cred.toml",
        &format!(
            "[master_key]\npkcs11_module = \"{MODULE}\"\npkcs11_token = \"broker\"\npkcs11_key = \"broker-kek\"\npkcs11_pin_credential = \"hsm-pin\"\n"
        ),
    );
    assert!(e.contains("CREDENTIALS_DIRECTORY"), "{e}");

    // The audit names each key event.
    b.serve();
    let out = b.cli(&["audit", "--action", "master-key.create", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("pkcs11"));
}

/// An AES key the token lets out (extractable, not sensitive), made with cryptoki directly.
fn make_extractable_key(hsm: &SoftHsm, label: &str) {
    // SoftHSM2 reads its configuration from the environment of the process that loads it:
    // do this in a child process (this test binary, running the ignored test below) that has it.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "make_extractable_key_child",
            "--nocapture",
            "--include-ignored",
        ])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env("E2E_LOOSE_KEY_LABEL", label)
        .env("E2E_TOKEN_LABEL", &hsm.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Run by [`make_extractable_key`] in a child process (ignored otherwise).
#[test]
#[ignore = "run as a child of a_broker_whose_master_key_is_wrapped_by_the_token"]
fn make_extractable_key_child() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let label = std::env::var("E2E_LOOSE_KEY_LABEL").unwrap();
    let token = std::env::var("E2E_TOKEN_LABEL").unwrap();
    let ctx = Pkcs11::new(MODULE).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token)
        .unwrap();
    let session = ctx.open_rw_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::new("user-pin-1".into())))
        .unwrap();
    session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(label.into_bytes()),
            ],
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_store_moves_under_the_token_and_keeps_its_secrets() {
    let hsm = SoftHsm::new("broker", "user-pin-1");
    let env = hsm_env(&hsm);
    // Today's development broker: the master key in a file.
    let mut b = Broker::start_with_env(None, env.clone(), |_, c| c);
    provision(&b);
    let before = b.attest_once("db-key").await.unwrap();
    b.stop();

    let file_config = std::fs::read_to_string(b.dir.join("broker.toml")).unwrap();
    let pkcs11 = with_master_key(
        &file_config,
        &hsm.master_key_config("broker-kek", &hsm.pin_file),
    );
    let pkcs11_path = b.dir.join("broker-pkcs11.toml");
    std::fs::write(&pkcs11_path, &pkcs11).unwrap();
    let pkcs11_arg = pkcs11_path.to_str().unwrap();
    // Started on the token before the key is moved: refused, with the command to run.
    let out = b.cli(&["keys", "create-kek", "--config", pkcs11_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = refused_start(&pkcs11_path, &env);
    assert!(e.contains("broker keys wrap"), "{e}");
    // Another key file than the store's: refused, nothing changed.
    let other = b.dir.join("other.key");
    std::fs::write(&other, format!("{}\n", "12".repeat(31) + "34")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = b.cli(&[
        "keys",
        "wrap",
        "--config",
        pkcs11_arg,
        "--from-file",
        other.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not this store's"),
        "{}",
        stderr(&out)
    );
    // The store's own key file: moved under the token.
    let key_file = b.dir.join("master.key");
    let out = b.cli(&[
        "keys",
        "wrap",
        "--config",
        pkcs11_arg,
        "--from-file",
        key_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_file(&key_file).unwrap();
    std::fs::write(b.dir.join("broker.toml"), &pkcs11).unwrap();
    b.serve();
    assert_eq!(b.attest_once("db-key").await.unwrap(), before);
    let out = b.cli(&["audit", "--action", "master-key.wrap", "--json"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pkcs11"),
        "{}",
        stderr(&out)
    );
}

/// `broker keys rotate --from-config`: a key-file store moves to a new random master key made
/// and wrapped in the token (not the file's key, as `keys wrap` keeps), then every record is
/// re-encrypted under a new data key; afterwards the old key file and the database together
/// open nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_moves_a_key_file_store_to_a_new_key_in_the_token() {
    let hsm = SoftHsm::new("broker", "user-pin-2");
    let env = hsm_env(&hsm);
    let mut b = Broker::start_with_env(None, env.clone(), |_, c| c);
    provision(&b);
    let before = b.attest_once("db-key").await.unwrap();
    let file_path = b.dir.join("broker-file.toml");
    let file_config = std::fs::read_to_string(b.dir.join("broker.toml")).unwrap();
    std::fs::write(&file_path, &file_config).unwrap();
    let pkcs11 = with_master_key(
        &file_config,
        &hsm.master_key_config("broker-kek", &hsm.pin_file),
    );
    let pkcs11_path = b.dir.join("broker-pkcs11.toml");
    std::fs::write(&pkcs11_path, &pkcs11).unwrap();
    let pkcs11_arg = pkcs11_path.to_str().unwrap();
    let out = b.cli(&["keys", "create-kek", "--config", pkcs11_arg]);
    assert!(out.status.success(), "{}", stderr(&out));

    // From the key file to the same key file: nothing to move.
    let file_arg = file_path.to_str().unwrap();
    let out = b.cli(&[
        "keys",
        "rotate",
        "--config",
        file_arg,
        "--from-config",
        file_arg,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nothing to move"), "{}", stderr(&out));

    // Step 1, while the file-configured broker keeps serving: the data keys re-wrapped.
    let out = b.cli(&[
        "keys",
        "rotate",
        "--config",
        pkcs11_arg,
        "--from-config",
        file_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let moved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(moved["from"], "file");
    assert_eq!(moved["to"], "pkcs11");
    assert_eq!(moved["rewrapped"], serde_json::json!([1]));
    assert!(
        stderr(&out).contains("restart every replica"),
        "{}",
        stderr(&out)
    );
    assert_eq!(b.attest_once("db-key").await.unwrap(), before);

    // Step 2: restarted on the token, then every record re-encrypted.
    b.stop();
    let e = refused_start(&file_path, &env);
    assert!(e.contains("wrapped by the pkcs11 provider"), "{e}");
    std::fs::write(b.dir.join("broker.toml"), &pkcs11).unwrap();
    b.serve();
    assert_eq!(b.attest_once("db-key").await.unwrap(), before);
    let out = b.cli(&["keys", "rotate", "--config", pkcs11_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rotation: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rotation["version"], 2, "{rotation}");
    assert_eq!(b.attest_once("db-key").await.unwrap(), before);

    // The old key file with the database: every data key is wrapped under the token's
    // master key now, so it unwraps none of them.
    let settings = broker::config::Settings::load(&file_path).unwrap();
    let store = broker::store::AnyStore::open(&settings.store)
        .await
        .unwrap();
    let old = broker::keys::MasterKey::load(&settings.master_key).unwrap();
    let e = broker::keyring::Keyring::load(old, &store, std::time::Duration::from_secs(60))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not unwrap"), "{e}");
    use broker::store::Store;
    assert!(
        store
            .records_under_old_keys(2, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let out = b.cli(&["audit", "--action", "master-key.rekey", "--json"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pkcs11"),
        "{}",
        stderr(&out)
    );
}

/// `broker.toml` with its master key sealed to the simulated VM (the simulator's default
/// measurement), `[platform]` its last section.
fn sealed_config(config: &str) -> String {
    let mut text = with_master_key(
        config,
        "[master_key]\nsnp_sealed = [\"measurement\", \"policy\"]\n",
    );
    text.push_str("\n[platform]\ndangerous_simulated = \"sim\"\n");
    text
}
/// The `snp-sealed` provider on the simulated platform: the store holds the master key only
/// sealed to the broker's VM; the same VM opens it again, an upgraded image (another
/// measurement) or another selection of fields does not; the upgrade path moves the key
/// through a key file to the new image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_sealed_to_the_brokers_vm() {
    let mut b = Broker::start_configured(None, |_, c| sealed_config(&c));
    provision(&b);
    let before = b.attest_once("db-key").await.unwrap();
    let out = b.cli(&["audit", "--action", "master-key.create", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("snp-sealed"));
    b.serve();
    assert_eq!(b.attest_once("db-key").await.unwrap(), before);
    b.stop();

    let config_path = b.dir.join("broker.toml");
    let sealed = std::fs::read_to_string(&config_path).unwrap();
    // An upgraded broker image: another measurement (the simulator's default is 5a…)
    // derives another key.
    let upgraded_path = b.dir.join("broker-upgraded.toml");
    // ([platform] is the configuration's last section.)
    let upgraded = format!("{sealed}simulated_measurement = \"{}\"\n", "a5".repeat(48));
    std::fs::write(&upgraded_path, &upgraded).unwrap();
    let e = refused_start(&upgraded_path, &[]);
    assert!(e.contains("does not open the store's master key"), "{e}");
    assert!(
        e.contains("measurement, policy") || e.contains("policy, measurement"),
        "{e}"
    );
    // Another selection of fields than the key was sealed with: said before deriving.
    let other_fields = b.dir.join("broker-fields.toml");
    std::fs::write(
        &other_fields,
        sealed.replace(
            "snp_sealed = [\"measurement\", \"policy\"]",
            "snp_sealed = [\"measurement\"]",
        ),
    )
    .unwrap();
    let e = refused_start(&other_fields, &[]);
    assert!(e.contains("sealed to fields [policy, measurement]"), "{e}");

    // The upgrade: the old VM moves the key to a recovery key file, the new VM seals it.
    let recovery_key = b.dir.join("recovery.key");
    std::fs::write(&recovery_key, format!("{}\n", "3c".repeat(31) + "c3")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&recovery_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let recovery_path = b.dir.join("broker-recovery.toml");
    std::fs::write(
        &recovery_path,
        with_master_key(
            &sealed,
            &format!(
                "[master_key]\nfile = {:?}\n",
                recovery_key.display().to_string()
            ),
        ),
    )
    .unwrap();
    let config = |p: &Path| p.to_str().unwrap().to_string();
    for (to, from) in [
        (&recovery_path, &config_path),
        (&upgraded_path, &recovery_path),
    ] {
        let out = b.cli(&[
            "keys",
            "rotate",
            "--config",
            &config(to),
            "--from-config",
            &config(from),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = b.cli(&["keys", "rotate", "--config", &config(&upgraded_path)]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(&config_path, &upgraded).unwrap();
    b.serve();
    assert_eq!(b.attest_once("db-key").await.unwrap(), before);
    // The old image's configuration no longer opens the store.
    b.stop();
    std::fs::write(b.dir.join("broker-old.toml"), &sealed).unwrap();
    let e = refused_start(&b.dir.join("broker-old.toml"), &[]);
    assert!(e.contains("does not open the store's master key"), "{e}");
}
