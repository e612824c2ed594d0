//! `chat-cluster`: a local chat fleet for development, end-to-end tests and benchmarks.
//!
//! `up` starts a supervisor in the background that owns every process (they die with it),
//! and returns once the fleet answers; `down` stops the supervisor and so exactly what it
//! started; `scale` and `kill` talk to it over a Unix socket in the state directory.

use anyhow::{Context, bail};
use chat_cluster::{Cluster, Options, repo_root};
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A local chat fleet without containers: Redis, Postgres, N gateways, nginx (the real
/// nginx/nginx.conf, rewritten for loopback) and Prometheus, on free 127.0.0.1 ports.
#[derive(Parser)]
#[command(name = "chat-cluster", version, about)]
struct Cli {
    /// Folder for the fleet's configs, logs, data and control socket.
    #[arg(long, global = true, default_value_os_t = repo_root().join("target/cluster"))]
    state: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the fleet in the background and print its URLs.
    Up(UpArgs),
    /// Stop everything `up` started.
    Down,
    /// Run exactly N gateways (added ones join nginx; removed ones drain first).
    Scale {
        /// Number of gateways.
        n: usize,
    },
    /// Kill one gateway with SIGKILL (a crash), by its position in `status`.
    Kill {
        /// Position in the gateway list, from 0.
        index: usize,
    },
    /// Print the fleet's URLs and processes (JSON).
    Status,
    /// Run the fleet in the foreground (what `up` starts in the background).
    #[command(hide = true)]
    Supervise(UpArgs),
}

#[derive(Args, Clone)]
struct UpArgs {
    /// Number of gateways.
    #[arg(long, default_value_t = 3)]
    gateways: usize,
    /// The gateway binary.
    #[arg(long, default_value_os_t = repo_root().join("target/release/chat-gateway"))]
    gateway_bin: PathBuf,
    /// Do not start Prometheus.
    #[arg(long)]
    no_prometheus: bool,
    /// Run Postgres with fsync and synchronous commit off (faster, not crash-safe).
    #[arg(long)]
    fast_postgres: bool,
    /// Extra gateway setting, KEY=VALUE (repeatable), e.g. CHAT_OUTBOUND_QUEUE=4096.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
}

fn parse_env(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{raw:?} is not KEY=VALUE"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Absolute: nginx resolves relative paths against its prefix, not our directory.
    let state = std::path::absolute(&cli.state)
        .with_context(|| format!("state directory {}", cli.state.display()))?;
    match cli.command {
        Cmd::Up(args) => up(&state, args),
        Cmd::Down => down(&state),
        Cmd::Scale { n } => print_reply(&state, &format!("scale {n}")),
        Cmd::Kill { index } => print_reply(&state, &format!("kill {index}")),
        Cmd::Status => print_reply(&state, "status"),
        Cmd::Supervise(args) => supervise(&state, args),
    }
}

fn pid_file(state: &Path) -> PathBuf {
    state.join("supervisor.pid")
}

fn running_supervisor(state: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(state))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn up(state: &Path, args: UpArgs) -> anyhow::Result<()> {
    if let Some(pid) = running_supervisor(state) {
        bail!("a cluster is already up (supervisor pid {pid}); `chat-cluster down` first");
    }
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    let _ = std::fs::remove_file(state.join("cluster.json"));
    let log = std::fs::File::create(state.join("supervisor.log"))?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--state").arg(state).arg("supervise");
    cmd.arg("--gateways").arg(args.gateways.to_string());
    cmd.arg("--gateway-bin").arg(&args.gateway_bin);
    if args.no_prometheus {
        cmd.arg("--no-prometheus");
    }
    if args.fast_postgres {
        cmd.arg("--fast-postgres");
    }
    for (k, v) in &args.env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    // Its own process group: the supervisor outlives this command and the terminal's ^C.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(180) {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(state.join("supervisor.log")).unwrap_or_default();
            bail!("the cluster failed to start ({status}):\n{log}");
        }
        if state.join("control.sock").exists()
            && let Ok(summary) = std::fs::read_to_string(state.join("cluster.json"))
        {
            println!("{summary}");
            println!(
                "chat through nginx: {}  (stop with `chat-cluster down`)",
                nginx_url(&summary)
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "the cluster did not start within 3 minutes; see {}",
        state.join("supervisor.log").display()
    )
}

fn nginx_url(summary: &str) -> String {
    serde_json::from_str::<serde_json::Value>(summary)
        .ok()
        .and_then(|v| v["nginx"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn down(state: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_supervisor(state) else {
        println!("no cluster is up in {}", state.display());
        return Ok(());
    };
    chat_testkit::send_signal(pid, libc::SIGTERM);
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        if started.elapsed() > Duration::from_secs(90) {
            bail!("supervisor {pid} did not stop within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("cluster stopped");
    Ok(())
}

fn print_reply(state: &Path, request: &str) -> anyhow::Result<()> {
    let mut stream = UnixStream::connect(state.join("control.sock")).with_context(|| {
        format!(
            "no cluster is up in {} (`chat-cluster up`)",
            state.display()
        )
    })?;
    writeln!(stream, "{request}")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    match reply.strip_prefix("error: ") {
        Some(e) => bail!("{}", e.trim()),
        None => {
            let value: serde_json::Value = serde_json::from_str(&reply)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
    }
}

fn supervise(state: &Path, args: UpArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut cluster = Cluster::up(Options {
        gateways: args.gateways,
        gateway_bin: args.gateway_bin,
        repo_root: repo_root(),
        dir: state.to_path_buf(),
        prometheus: !args.no_prometheus,
        durable_postgres: !args.fast_postgres,
        gateway_env: args.env,
    })?;
    std::fs::write(pid_file(state), std::process::id().to_string())?;
    let socket = state.join("control.sock");
    let _ = std::fs::remove_file(&socket);
    runtime.block_on(async {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(&socket)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (read, mut write) = stream.into_split();
                    let mut line = String::new();
                    let mut reader = tokio::io::BufReader::new(read);
                    if reader.read_line(&mut line).await.is_err() {
                        continue;
                    }
                    // Commands run one at a time: each is a short, blocking change of the fleet.
                    let reply = handle(&mut cluster, line.trim());
                    let _ = write.write_all(reply.as_bytes()).await;
                }
            }
        }
        anyhow::Ok(())
    })?;
    cluster.down();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(pid_file(state));
    Ok(())
}

fn handle(cluster: &mut Cluster, request: &str) -> String {
    let result = match request.split_once(' ') {
        Some(("scale", n)) => match n.parse() {
            Ok(n) => cluster.scale(n).map_err(|e| e.to_string()),
            Err(_) => Err(format!("scale takes a number, not {n:?}")),
        },
        Some(("kill", i)) => match i.parse() {
            Ok(i) => cluster
                .kill_gateway(i)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(_) => Err(format!("kill takes a number, not {i:?}")),
        },
        None if request == "status" => Ok(()),
        _ => Err(format!("unknown request {request:?}")),
    };
    match result {
        Ok(()) => format!(
            "{}\n",
            serde_json::to_string(&cluster.summary()).unwrap_or_default()
        ),
        Err(e) => format!("error: {e}\n"),
    }
}
