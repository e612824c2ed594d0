//! A local chat fleet without containers: Redis, Postgres, N gateways, nginx (the real
//! `nginx/nginx.conf`, rewritten for loopback) and optionally Prometheus, all from locally
//! installed binaries on free 127.0.0.1 ports.
//!
//! Every process is spawned tied to this one (chat-testkit's spawner: it dies with us), so
//! whoever holds a `Cluster` — a test, or the `chat-cluster supervise` daemon — stops exactly
//! what it started, even when it is killed.

pub mod nginx;

use chat_testkit::{PostgresServer, RedisServer, free_port, send_signal, spawn_tied, stop_child};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClusterError(pub String);

fn fail(message: impl Into<String>) -> ClusterError {
    ClusterError(message.into())
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    pub gateways: usize,
    /// The `chat-gateway` binary to run.
    pub gateway_bin: PathBuf,
    /// The repository root: `nginx/nginx.conf` and `deploy/prometheus/alerts.yml` are read
    /// from it.
    pub repo_root: PathBuf,
    /// Where configs, logs and data go.
    pub dir: PathBuf,
    pub prometheus: bool,
    /// Postgres with fsync and synchronous commit on (benchmarks); off is faster (tests).
    pub durable_postgres: bool,
    /// Extra `CHAT_*` settings for every gateway.
    pub gateway_env: Vec<(String, String)>,
}

/// One gateway process.
pub struct Gateway {
    pub id: String,
    pub port: u16,
    pub metrics_port: u16,
    child: Child,
}

impl Gateway {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub struct Cluster {
    options: Options,
    redis: RedisServer,
    _postgres: PostgresServer,
    database_url: String,
    jwt_secret: String,
    gateways: Vec<Gateway>,
    next_index: usize,
    nginx: Option<Child>,
    nginx_port: u16,
    prometheus: Option<(Child, u16)>,
}

/// What `chat-cluster status` prints and the state file holds.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub nginx: String,
    pub prometheus: Option<String>,
    pub redis: String,
    pub postgres: String,
    pub gateways: Vec<GatewaySummary>,
}

#[derive(Debug, Serialize)]
pub struct GatewaySummary {
    pub id: String,
    pub url: String,
    pub metrics: String,
    pub pid: u32,
}

/// The HTTP status of `GET path` on 127.0.0.1:`port`, if anything answered.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let text = std::str::from_utf8(&head[..n]).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), ClusterError> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(fail(format!("{what} not ready within {timeout:?}")))
}

fn find_binary(name: &str, hint: &str) -> Result<PathBuf, ClusterError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| fail(format!("{name} not found: {hint}")))
}

/// The worker processes of an nginx master (from /proc).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl Cluster {
    /// Starts everything and waits until each part answers.
    pub fn up(options: Options) -> Result<Cluster, ClusterError> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir.join("tmp"))
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        if !options.gateway_bin.is_file() {
            return Err(fail(format!(
                "gateway binary {} not found: build it with `cargo build --release -p chat-gateway`",
                options.gateway_bin.display()
            )));
        }
        let redis = RedisServer::start();
        let postgres = if options.durable_postgres {
            PostgresServer::start_durable()
        } else {
            PostgresServer::start()
        };
        let database_url = postgres.create_database();
        let jwt_secret: String = format!(
            "local-cluster-secret-{:016x}-{:016x}",
            free_port(),
            std::process::id()
        );
        let mut cluster = Cluster {
            redis,
            _postgres: postgres,
            database_url,
            jwt_secret,
            gateways: Vec::new(),
            next_index: 1,
            nginx: None,
            nginx_port: free_port(),
            prometheus: None,
            options,
        };
        for _ in 0..cluster.options.gateways {
            cluster.start_gateway()?;
        }
        cluster.start_nginx()?;
        if cluster.options.prometheus {
            cluster.start_prometheus()?;
        }
        cluster.write_state()?;
        Ok(cluster)
    }

    pub fn nginx_port(&self) -> u16 {
        self.nginx_port
    }

    pub fn nginx_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.nginx_port)
    }

    pub fn prometheus_url(&self) -> Option<String> {
        self.prometheus
            .as_ref()
            .map(|(_, port)| format!("http://127.0.0.1:{port}"))
    }

    pub fn gateways(&self) -> &[Gateway] {
        &self.gateways
    }

    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    pub fn jwt_secret(&self) -> &str {
        &self.jwt_secret
    }

    pub fn summary(&self) -> Summary {
        Summary {
            nginx: self.nginx_url(),
            prometheus: self.prometheus_url(),
            redis: self.redis.url(),
            postgres: self.database_url.clone(),
            gateways: self
                .gateways
                .iter()
                .map(|g| GatewaySummary {
                    id: g.id.clone(),
                    url: g.url(),
                    metrics: format!("http://127.0.0.1:{}/metrics", g.metrics_port),
                    pid: g.pid(),
                })
                .collect(),
        }
    }

    fn start_gateway(&mut self) -> Result<(), ClusterError> {
        let index = self.next_index;
        self.next_index += 1;
        let id = format!("gw-{index}");
        let (port, metrics_port) = (free_port(), free_port());
        let log = std::fs::File::create(self.options.dir.join(format!("{id}.log")))
            .map_err(|e| fail(format!("gateway log: {e}")))?;
        let mut cmd = Command::new(&self.options.gateway_bin);
        cmd.env("CHAT_BIND", format!("127.0.0.1:{port}"))
            .env("CHAT_METRICS_BIND", format!("127.0.0.1:{metrics_port}"))
            .env("CHAT_DATABASE_URL", &self.database_url)
            .env("CHAT_REDIS_URL", self.redis.url())
            .env("CHAT_JWT_SECRET", &self.jwt_secret)
            .env("CHAT_GATEWAY_ID", &id)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| fail(e.to_string()))?)
            .stderr(log);
        for (key, value) in &self.options.gateway_env {
            cmd.env(key, value);
        }
        let child = spawn_tied(cmd).map_err(|e| fail(format!("starting {id}: {e}")))?;
        let mut gateway = Gateway {
            id: id.clone(),
            port,
            metrics_port,
            child,
        };
        let ready = wait_for(&id, Duration::from_secs(60), || {
            http_status(port, "/readyz") == Some(200)
                || matches!(gateway.child.try_wait(), Ok(Some(_)))
        });
        if let Ok(Some(status)) = gateway.child.try_wait() {
            return Err(fail(format!(
                "{id} exited ({status}); see {}",
                self.options.dir.join(format!("{id}.log")).display()
            )));
        }
        ready?;
        self.gateways.push(gateway);
        Ok(())
    }

    fn nginx_config(&self) -> Result<String, ClusterError> {
        let path = self.options.repo_root.join("nginx/nginx.conf");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        let ports: Vec<u16> = self.gateways.iter().map(|g| g.port).collect();
        nginx::rewrite(&text, &ports, self.nginx_port, &self.options.dir)
    }

    fn write_nginx_config(&self) -> Result<PathBuf, ClusterError> {
        let path = self.options.dir.join("nginx.conf");
        std::fs::write(&path, self.nginx_config()?).map_err(|e| fail(e.to_string()))?;
        Ok(path)
    }

    fn start_nginx(&mut self) -> Result<(), ClusterError> {
        let nginx = find_binary("nginx", "install Debian package nginx (scripts/test does)")?;
        let config = self.write_nginx_config()?;
        let dir = &self.options.dir;
        for sub in ["tmp/body", "tmp/proxy"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| fail(e.to_string()))?;
        }
        // Workers may run as another user (nobody) when started as root.
        let _ = Command::new("chmod")
            .args(["-R", "a+rwX"])
            .arg(dir.join("tmp"))
            .status();
        let mut cmd = Command::new(nginx);
        cmd.arg("-c")
            .arg(&config)
            .arg("-p")
            .arg(dir)
            .arg("-g")
            .arg(format!("daemon off; pid {}/nginx.pid;", dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("nginx.stderr")).map_err(|e| fail(e.to_string()))?,
            );
        self.nginx = Some(spawn_tied(cmd).map_err(|e| fail(format!("starting nginx: {e}")))?);
        let port = self.nginx_port;
        let started = wait_for("nginx", Duration::from_secs(15), || {
            http_status(port, "/nginx-health") == Some(200)
        });
        if started.is_err() {
            let stderr = std::fs::read_to_string(dir.join("nginx.stderr")).unwrap_or_default();
            return Err(fail(format!("nginx did not start: {stderr}")));
        }
        Ok(())
    }

    /// Rewrites the upstreams and reloads nginx; returns once a new worker serves.
    fn reload_nginx(&mut self) -> Result<(), ClusterError> {
        self.write_nginx_config()?;
        let master = self
            .nginx
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| fail("nginx is not running"))?;
        let before = children(master);
        send_signal(master, libc::SIGHUP);
        wait_for("nginx reload", Duration::from_secs(15), || {
            children(master).iter().any(|pid| !before.contains(pid))
        })
    }

    fn prometheus_targets(&self) -> Result<(), ClusterError> {
        let targets: Vec<String> = self
            .gateways
            .iter()
            .map(|g| format!("127.0.0.1:{}", g.metrics_port))
            .collect();
        let json = serde_json::json!([{ "targets": targets }]);
        let tmp = self.options.dir.join("targets.json.tmp");
        std::fs::write(&tmp, json.to_string()).map_err(|e| fail(e.to_string()))?;
        // Prometheus watches the file: replace it whole.
        std::fs::rename(&tmp, self.options.dir.join("targets.json"))
            .map_err(|e| fail(e.to_string()))
    }

    fn start_prometheus(&mut self) -> Result<(), ClusterError> {
        let binary = find_binary(
            "prometheus",
            "install Debian package prometheus (scripts/test does)",
        )?;
        let dir = &self.options.dir;
        self.prometheus_targets()?;
        let rules = self.options.repo_root.join("deploy/prometheus/alerts.yml");
        let rule_files = if rules.is_file() {
            format!("rule_files:\n  - {}\n", rules.display())
        } else {
            String::new()
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: chat-gateway\n    file_sd_configs:\n      - files: ['{}/targets.json']\n        refresh_interval: 1s\n",
            dir.display()
        );
        std::fs::write(dir.join("prometheus.yml"), config).map_err(|e| fail(e.to_string()))?;
        let port = free_port();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}/prometheus.yml", dir.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--storage.tsdb.path={}/prometheus-data",
                dir.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("prometheus.log"))
                    .map_err(|e| fail(e.to_string()))?,
            );
        let child = spawn_tied(cmd).map_err(|e| fail(format!("starting prometheus: {e}")))?;
        self.prometheus = Some((child, port));
        wait_for("prometheus", Duration::from_secs(30), || {
            http_status(port, "/-/ready") == Some(200)
        })
    }

    /// Adds or removes gateways until `n` run. Removed ones drain (SIGTERM) after nginx stops
    /// sending them new connections; their clients reconnect through nginx to the others.
    pub fn scale(&mut self, n: usize) -> Result<(), ClusterError> {
        while self.gateways.len() < n {
            self.start_gateway()?;
        }
        let removed: Vec<Gateway> = if self.gateways.len() > n {
            self.gateways.drain(n..).collect()
        } else {
            Vec::new()
        };
        self.reload_nginx()?;
        if self.prometheus.is_some() {
            self.prometheus_targets()?;
        }
        for mut gateway in removed {
            stop_child(&mut gateway.child, libc::SIGTERM, Duration::from_secs(30));
        }
        self.write_state()
    }

    /// SIGKILLs the gateway at `index` (a crash). nginx still lists it; its passive health
    /// check skips it.
    pub fn kill_gateway(&mut self, index: usize) -> Result<Gateway, ClusterError> {
        if index >= self.gateways.len() {
            return Err(fail(format!("no gateway at index {index}")));
        }
        let mut gateway = self.gateways.remove(index);
        stop_child(&mut gateway.child, libc::SIGKILL, Duration::from_secs(5));
        self.write_state()?;
        Ok(gateway)
    }

    fn write_state(&self) -> Result<(), ClusterError> {
        let text =
            serde_json::to_string_pretty(&self.summary()).map_err(|e| fail(e.to_string()))?;
        std::fs::write(self.options.dir.join("cluster.json"), text).map_err(|e| fail(e.to_string()))
    }

    /// Stops everything it started: gateways drain, then nginx and Prometheus stop.
    pub fn down(mut self) {
        for gateway in &mut self.gateways {
            send_signal(gateway.child.id(), libc::SIGTERM);
        }
        for gateway in &mut self.gateways {
            stop_child(&mut gateway.child, libc::SIGTERM, Duration::from_secs(30));
        }
        if let Some(nginx) = &mut self.nginx {
            stop_child(nginx, libc::SIGQUIT, Duration::from_secs(5));
        }
        if let Some((child, _)) = &mut self.prometheus {
            stop_child(child, libc::SIGTERM, Duration::from_secs(10));
        }
        // Redis and Postgres stop when dropped.
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for gateway in &mut self.gateways {
            let _ = gateway.child.kill();
            let _ = gateway.child.wait();
        }
        // Not SIGKILL: nginx's workers would outlive a killed master. SIGTERM makes the
        // master stop them first.
        if let Some(nginx) = &mut self.nginx {
            stop_child(nginx, libc::SIGTERM, Duration::from_secs(5));
        }
        if let Some((child, _)) = &mut self.prometheus {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The repository root, found from this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
