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
    /// only) and a database `kb`.
    pub fn start() -> PgServer {
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
        let mut server = PgServer {
            _tmp: tmp,
            data,
            log,
            bin,
            port,
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
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.data.display()
        );
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
