//! A real `redis-server` child process on a free 127.0.0.1 port, without
//! persistence, killed by PID on `stop` and on drop.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::StartError;
use crate::tempdir::TempDir;
use crate::{binaries, port, process};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `redis-server`, owned by the test that started it.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers
    /// `PING`. Panics, naming what is missing, if it cannot.
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir: TempDir::new(),
        };
        // If the port is taken before redis binds it, redis exits at once
        // and a new port is tried.
        let started = process::retry_start(3, Duration::ZERO, || {
            server.port = port::free_port();
            server.launch()
        });
        if let Err(e) = started {
            panic!("chat-testkit: redis-server did not start: {e}");
        }
        server
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `PING` and returns whether the answer was `+PONG`.
    pub fn ping(&self) -> bool {
        command(self.port, "PING").is_ok_and(|reply| reply == "+PONG")
    }

    /// Kills the server with SIGKILL and reaps it. Data is lost (nothing is
    /// persisted). Does nothing if it is already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::stop_child(&mut child, libc::SIGKILL, Duration::ZERO);
        }
    }

    /// Starts the server again on the SAME port (stopping it first if it is
    /// running) and waits until it answers `PING`.
    pub fn start_again(&mut self) {
        self.stop();
        // The port may be held for a moment by another socket: retry a while.
        if let Err(e) = process::retry_start(10, Duration::from_millis(300), || self.launch()) {
            panic!(
                "chat-testkit: redis-server did not start again on port {}: {e}",
                self.port
            );
        }
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
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
        let mut command = Command::new(binaries::redis_server());
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(["--logfile", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child = process::spawn(command)
            .map_err(|e| StartError::Failed(format!("cannot run redis-server: {e}")))?;
        self.child = Some(child);
        self.wait_ready().inspect_err(|_| self.stop())
    }

    /// Ready = `PING` answers `+PONG` and `INFO server` reports our pid (so
    /// we are not talking to some other server that took the port).
    fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid = self.pid().unwrap_or_default();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(StartError::Exited(format!(
                    "redis-server exited with {status}; {}",
                    self.log()
                )));
            }
            if self.ping() {
                let info = command(self.port, "INFO server").unwrap_or_default();
                if info
                    .lines()
                    .any(|l| l.trim() == format!("process_id:{pid}"))
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "no PONG from our pid {pid} on 127.0.0.1:{} within {START_TIMEOUT:?}; {}",
                    self.port,
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        format!("log {}:\n{text}", self.log_path().display())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends one inline command and returns the reply: a status/error line as
/// is (`+PONG`), a bulk string as its contents.
fn command(port: u16, line: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{line}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let first = first.trim_end().to_string();
    match first.strip_prefix('$').map(str::parse::<usize>) {
        Some(Ok(len)) => {
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
        _ => Ok(first),
    }
}
