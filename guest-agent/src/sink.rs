//! Writing secrets: atomically (temporary file in the same directory, fsync, rename, fsync the
//! directory), with the configured owner, group and mode, into a directory created 0700.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::AgentError;
use crate::config::{CertificateSpec, SecretSpec};

/// Looks a user or group up in `/etc/passwd` or `/etc/group` (or takes a number). Users
/// only known to NSS services (LDAP, …) must be given numerically.
pub fn resolve_id(name: &str, database: &Path) -> Result<u32, AgentError> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let text = std::fs::read_to_string(database)
        .map_err(|e| AgentError::Config(format!("{}: {e}", database.display())))?;
    for line in text.lines() {
        let mut fields = line.split(':');
        if fields.next() == Some(name)
            && let Some(id) = fields.nth(1).and_then(|f| f.parse::<u32>().ok())
        {
            return Ok(id);
        }
    }
    Err(AgentError::Config(format!(
        "{name:?} is not in {}; give a numeric id",
        database.display()
    )))
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> AgentError {
    let p = path.display().to_string();
    let what = what.to_string();
    move |e| AgentError::Write(format!("{what} {p}: {e}"))
}

/// Creates `dir` with mode 0700 if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> Result<(), AgentError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir, "cannot create"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(dir, "cannot chmod"))
}

/// Writes one secret atomically with its owner and mode.
pub fn write_secret(spec: &SecretSpec, value: &[u8]) -> Result<(), AgentError> {
    write_file(
        &spec.path,
        spec.owner.as_deref(),
        spec.group.as_deref(),
        spec.mode,
        value,
    )
}

/// Writes a certificate from the broker's CA: its key (`key_mode`), then the certificate
/// with the CA certificates below the root, then the CA chain with its root (0644), each
/// atomically. The three are not replaced as one: a crash between the key and the
/// certificate leaves a key that does not match the certificate beside it (the next run of
/// the agent writes both again).
pub fn write_certificate(
    spec: &CertificateSpec,
    key_pem: &[u8],
    certificate_pem: &str,
    ca_pem: &str,
) -> Result<(), AgentError> {
    let (owner, group) = (spec.owner.as_deref(), spec.group.as_deref());
    write_file(&spec.key_path(), owner, group, spec.key_mode, key_pem)?;
    write_file(
        &spec.cert_path(),
        owner,
        group,
        0o644,
        certificate_pem.as_bytes(),
    )?;
    write_file(&spec.ca_path(), owner, group, 0o644, ca_pem.as_bytes())
}

/// Writes `value` to `path` atomically (a temporary file renamed over it, both synced) with
/// its owner, group and mode, in a private directory.
pub fn write_file(
    path: &Path,
    owner: Option<&str>,
    group: Option<&str>,
    mode: u32,
    value: &[u8],
) -> Result<(), AgentError> {
    let dir = path
        .parent()
        .ok_or_else(|| AgentError::Write(format!("{} has no directory", path.display())))?;
    ensure_private_dir(dir)?;
    let uid = owner
        .map(|o| resolve_id(o, Path::new("/etc/passwd")))
        .transpose()?;
    let gid = group
        .map(|g| resolve_id(g, Path::new("/etc/group")))
        .transpose()?;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| AgentError::Write(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp, "cannot create"))?;
        f.write_all(value).map_err(io(&tmp, "cannot write"))?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&f, uid, gid).map_err(io(&tmp, "cannot chown"))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io(&tmp, "cannot chmod"))?;
        f.sync_all().map_err(io(&tmp, "cannot fsync"))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path, "cannot rename into"))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir, "cannot fsync directory"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn writes_atomically_with_mode_and_private_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("credstore");
        let spec = SecretSpec {
            name: "db".into(),
            path: dir.join("db"),
            owner: Some("0".into()),
            group: None,
            mode: 0o440,
            required: true,
        };
        write_secret(&spec, b"first").unwrap();
        write_secret(&spec, b"second").unwrap();
        assert_eq!(std::fs::read(&spec.path).unwrap(), b"second");
        let mode = std::fs::metadata(&spec.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o440);
        let dmode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn ids_from_files_or_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let passwd = tmp.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n",
        )
        .unwrap();
        assert_eq!(resolve_id("www-data", &passwd).unwrap(), 33);
        assert_eq!(resolve_id("1234", &passwd).unwrap(), 1234);
        assert!(resolve_id("nobody-here", &passwd).is_err());
        assert!(resolve_id("x", &PathBuf::from("/nonexistent")).is_err());
    }
}
