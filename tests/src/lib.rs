//! Helpers for the end-to-end tests: locating the workspace's built binaries and test data.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Real evidence shipped with the attestation crate.
pub fn vectors() -> PathBuf {
    workspace().join("attestation/tests/data")
}

/// Path of a binary built from this workspace, next to the running test executable's
/// directory (`target/<profile>/`). `make test` builds every binary before the tests run;
/// run `cargo build --workspace --bins` first when calling `cargo test` directly.
pub fn binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| "test executable has no profile directory".to_string())?;
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not built: run `cargo build --workspace --bins` (make test does)",
            path.display()
        ))
    }
}
