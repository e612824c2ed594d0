//! A real PostgreSQL server on a free 127.0.0.1 port: `initdb` into a fresh
//! temp dir, then the `postgres` binary run DIRECTLY as a child process (not
//! `pg_ctl`, which daemonizes and escapes PID tracking), stopped by PID.
//!
//! Durability is switched off (`fsync=off`, `synchronous_commit=off`,
//! `full_page_writes=off`, `initdb --no-sync`) purely for test speed: a crash
//! of the machine may corrupt the cluster, which does not matter for a
//! throwaway test database. A clean `stop` + `start_again` keeps all data.
//!
//! initdb and postgres refuse to run as root, so when the tests run as root
//! both are run as the `postgres` OS user (which the Debian package creates),
//! with the data directory chowned to it.

use std::fs::{self, File};
use std::hash::{BuildHasher, RandomState};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::StartError;
use crate::tempdir::{TempDir, set_mode};
use crate::{binaries, port, process};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running PostgreSQL server with superuser `postgres` (trust auth),
/// owned by the test that started it. Dropping it stops the server and
/// removes its data directory.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    bindir: PathBuf,
    /// uid/gid to run initdb/postgres as: `Some` when the tests run as root.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
    /// Postgres' own durable defaults (fsync, synchronous commit) instead of test speed.
    durable: bool,
    // Declared last: dropped after `Drop::drop` has stopped the server.
    dir: TempDir,
}

impl PostgresServer {
    /// Runs `initdb` into a fresh temp dir, starts `postgres` on a free port
    /// and waits (up to 30 s) until `psql` can query it. Panics, with the
    /// server log, if it cannot.
    pub fn start() -> PostgresServer {
        Self::start_with(false)
    }

    /// Like `start`, but with Postgres' durable defaults (fsync and synchronous commit on),
    /// for benchmarks that must measure real commits.
    pub fn start_durable() -> PostgresServer {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> PostgresServer {
        let bindir = binaries::postgres_bindir();
        let run_as = process::is_root().then(binaries::postgres_user);
        let dir = TempDir::new();
        let mut server = PostgresServer {
            port: 0,
            bindir,
            run_as,
            child: None,
            durable,
            dir,
        };
        server.initdb();
        // If the port is taken before postgres binds it, postgres exits at
        // once and a new port is tried.
        let started = process::retry_start(3, Duration::ZERO, || {
            server.port = port::free_port();
            server.launch()
        });
        if let Err(e) = started {
            panic!("chat-testkit: postgres did not start: {e}");
        }
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's pid, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Creates a fresh, uniquely named, empty database (`t_<n>_<random>`)
    /// and returns its URL, so each test gets its own database on a shared
    /// server.
    pub fn create_database(&self) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let random = RandomState::new().hash_one((std::process::id(), n, Instant::now())) as u32;
        let name = format!("t_{n}_{random:08x}");
        self.psql(&self.url(), &format!("CREATE DATABASE \"{name}\""));
        self.database_url(&name)
    }

    /// Runs `sql` with `psql` against `database_url` (any URL this server
    /// handed out) and returns its unaligned, tuples-only output, e.g. `"1"`
    /// for `select 1`. Panics with psql's error if it fails.
    pub fn psql(&self, database_url: &str, sql: &str) -> String {
        self.try_psql(database_url, sql).unwrap_or_else(|e| {
            panic!("chat-testkit: psql failed on {database_url} running {sql:?}: {e}")
        })
    }

    /// Fast shutdown: SIGINT to the postmaster pid, then wait for it; SIGKILL
    /// if it has not exited after 10 s. Does nothing if already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::stop_child(&mut child, libc::SIGINT, STOP_GRACE);
        }
    }

    /// Starts the server again on the same data directory and the SAME port
    /// (stopping it first if it is running) and waits until it is ready.
    pub fn start_again(&mut self) {
        self.stop();
        // The port may be held for a moment by another socket: retry a while.
        if let Err(e) = process::retry_start(10, Duration::from_millis(300), || self.launch()) {
            panic!(
                "chat-testkit: postgres did not start again on port {}: {e}",
                self.port
            );
        }
    }

    fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for a server binary, run as the `postgres` user when root.
    fn server_command(&self, binary: &str) -> Command {
        let mut command = Command::new(self.bindir.join(binary));
        command.current_dir(self.dir.path()).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn make_owned_dir(&self, path: &Path, mode: u32) {
        fs::create_dir(path)
            .unwrap_or_else(|e| panic!("chat-testkit: cannot create {}: {e}", path.display()));
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| {
                panic!(
                    "chat-testkit: cannot chown {} to the postgres user: {e}",
                    path.display()
                )
            });
        }
        set_mode(path, mode);
    }

    fn initdb(&self) {
        self.make_owned_dir(&self.data_dir(), 0o700);
        self.make_owned_dir(&self.socket_dir(), 0o755);
        let mut command = self.server_command("initdb");
        command.arg("-D").arg(self.data_dir()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        let output = process::output(command).unwrap_or_else(|e| {
            panic!(
                "chat-testkit: cannot run {}/initdb: {e}",
                self.bindir.display()
            )
        });
        if !output.status.success() {
            panic!(
                "chat-testkit: initdb -D {} failed with {}:\n{}\n{}",
                self.data_dir().display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    fn launch(&mut self) -> Result<(), StartError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| {
                StartError::Failed(format!("cannot create {}: {e}", self.log_path().display()))
            })?;
        let stderr = log
            .try_clone()
            .map_err(|e| StartError::Failed(e.to_string()))?;
        let mut command = self.server_command("postgres");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.socket_dir())
            .args(["-c", "max_connections=300"]);
        if !self.durable {
            // Test speed only; see the module docs.
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        command.stdin(Stdio::null()).stdout(log).stderr(stderr);
        let child = process::spawn(command).map_err(|e| {
            StartError::Failed(format!(
                "cannot run {}/postgres: {e}",
                self.bindir.display()
            ))
        })?;
        self.child = Some(child);
        self.wait_ready().inspect_err(|_| self.stop())
    }

    /// Ready = psql can connect over TCP and the server reports OUR data
    /// directory (so we are not talking to another server that took the port).
    fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let data_dir = self.data_dir();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(StartError::Exited(format!(
                    "postgres exited with {status}; {}",
                    self.log()
                )));
            }
            let last = match self.try_psql(&self.url(), "SHOW data_directory") {
                Ok(shown) if Path::new(&shown) == data_dir => return Ok(()),
                Ok(shown) => format!(
                    "port {} is served from {shown}, not from our {}",
                    self.port,
                    data_dir.display()
                ),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "not ready on 127.0.0.1:{} within {START_TIMEOUT:?}; last psql error: {last}; {}",
                    self.port,
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_psql(&self, database_url: &str, sql: &str) -> Result<String, String> {
        let mut command = Command::new(self.bindir.join("psql"));
        command
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                database_url,
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS");
        let output = process::output(command)
            .map_err(|e| format!("cannot run {}/psql: {e}", self.bindir.display()))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout)
                .trim_end()
                .to_string())
        } else {
            Err(format!(
                "psql exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    fn log(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        format!("server log {}:\n{text}", self.log_path().display())
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}
