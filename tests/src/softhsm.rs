//! A real PKCS#11 token for tests: SoftHSM2 (the `softhsm2` Debian package) with its own
//! token directory and configuration, initialised with `softhsm2-util`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The SoftHSM2 module Debian installs.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 set-up in a temporary directory, with one token.
pub struct SoftHsm {
    /// The configuration file (`SOFTHSM2_CONF`).
    pub conf: PathBuf,
    /// The token's label.
    pub token: String,
    /// A file holding the user PIN (mode 0600).
    pub pin_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl SoftHsm {
    /// A fresh token labelled `token` with user PIN `pin`.
    pub fn new(token: &str, pin: &str) -> SoftHsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: install the softhsm2 package (make test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                token,
                "--pin",
                pin,
                "--so-pin",
                "so-secret-1",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.path().join("hsm.pin");
        std::fs::write(&pin_file, format!("{pin}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        SoftHsm {
            conf,
            token: token.into(),
            pin_file,
            _dir: dir,
        }
    }

    /// The `[master_key]` lines of a broker using this token's key `key`.
    pub fn master_key_config(&self, key: &str, pin_file: &Path) -> String {
        format!(
            "[master_key]\npkcs11_module = \"{MODULE}\"\npkcs11_token = \"{}\"\npkcs11_key = \"{key}\"\npkcs11_pin_file = \"{}\"\n",
            self.token,
            pin_file.display()
        )
    }
}
