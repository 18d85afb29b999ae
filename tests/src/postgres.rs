//! A real PostgreSQL server for the tests: `initdb` and `pg_ctl` from the `postgresql` Debian
//! package, a cluster in a temporary directory, listening on a free loopback port (and a unix
//! socket in that directory). PostgreSQL refuses to run as root: when the tests do, the server
//! runs as the `postgres` system user the package creates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A PostgreSQL cluster of the tests' own. Stopped (immediately) when dropped.
pub struct PgServer {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    fsync: bool,
    tls: Option<(PathBuf, PathBuf)>,
}

/// The newest installed PostgreSQL's binary directory.
fn bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("pg_ctl").is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().expect(
        "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/pg_ctl): \
         apt-get install postgresql (make test does)",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    /// Creates and starts a cluster with a superuser `kb` (trust authentication, loopback
    /// only) and a database `kb`, with `fsync` off (crash tests stop the server, not the
    /// machine: the page cache survives).
    pub fn start() -> PgServer {
        PgServer::start_with(false)
    }

    /// The same with `fsync` on, as in production: for measurements.
    pub fn start_durable() -> PgServer {
        PgServer::start_with(true)
    }

    /// The same serving TLS with `cert_pem` and `key_pem` (as well as plain connections).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> PgServer {
        PgServer::start_full(false, Some((cert_pem, key_pem)))
    }

    fn start_with(fsync: bool) -> PgServer {
        PgServer::start_full(fsync, None)
    }

    fn start_full(fsync: bool, tls: Option<(&str, &str)>) -> PgServer {
        let tmp = tempfile::tempdir().unwrap();
        let root = is_root();
        let data = tmp.path().join("data");
        let log = tmp.path().join("postgres.log");
        if root {
            // The server's user must reach its directory and own its data.
            std::fs::create_dir(&data).unwrap();
            chmod(tmp.path(), "0755");
            run(Command::new("chown").args(["postgres:postgres"]).arg(&data));
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(tmp.path()));
        }
        let bin = bindir();
        let port = crate::free_port();
        let tls = tls.map(|(cert, key)| {
            let (c, k) = (tmp.path().join("server.crt"), tmp.path().join("server.key"));
            std::fs::write(&c, cert).unwrap();
            std::fs::write(&k, key).unwrap();
            chmod(&k, "0600");
            if root {
                run(Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&c)
                    .arg(&k));
            }
            (c, k)
        });
        let mut server = PgServer {
            _tmp: tmp,
            data,
            log,
            bin,
            port,
            fsync,
            tls,
        };
        let data_dir = server.data.to_str().unwrap().to_string();
        server.pg(
            "initdb",
            &[
                "-D",
                &data_dir,
                "-U",
                "kb",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        server.start_again();
        server.create_database("kb");
        server
    }

    /// Runs a PostgreSQL binary (as `postgres` when the tests run as root).
    fn pg(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let out = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .output()
                .unwrap()
        } else {
            Command::new(&exe).args(args).output().unwrap()
        };
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start_again(&mut self) {
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync={} -c max_connections=200",
            self.port,
            self.data.display(),
            if self.fsync { "on" } else { "off" }
        );
        if let Some((cert, key)) = &self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            ));
        }
        let (data, log) = (
            self.data.to_str().unwrap().to_string(),
            self.log.to_str().unwrap().to_string(),
        );
        self.pg(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        );
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: no shutdown checkpoint, as a
    /// crash).
    pub fn stop_immediate(&mut self) {
        let data = self.data.to_str().unwrap().to_string();
        self.pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&mut self, name: &str) -> String {
        let port = self.port.to_string();
        self.pg(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "kb", name],
        );
        self.url(name)
    }

    /// `pg_dump --format=custom` of database `name`; returns the dump file's path.
    pub fn dump(&self, name: &str) -> PathBuf {
        let file = self._tmp.path().join(format!("{name}.dump"));
        let port = self.port.to_string();
        self.pg(
            "pg_dump",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "kb",
                "--format=custom",
                "--file",
                file.to_str().unwrap(),
                name,
            ],
        );
        file
    }

    /// `pg_restore` of `dump` into the new database `name`; returns its URL.
    pub fn restore(&mut self, dump: &Path, name: &str) -> String {
        let url = self.create_database(name);
        let port = self.port.to_string();
        self.pg(
            "pg_restore",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "kb",
                "--exit-on-error",
                "-d",
                name,
                dump.to_str().unwrap(),
            ],
        );
        url
    }

    /// The URL of database `name` over TCP on loopback.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://kb@127.0.0.1:{}/{name}", self.port)
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data.clone();
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        let _ = cmd
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn chmod(path: &Path, mode: &str) {
    run(Command::new("chmod").arg(mode).arg(path));
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
