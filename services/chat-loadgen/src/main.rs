//! `chat-loadgen`: opens many connections to a gateway (or through nginx), spreads them over
//! rooms, publishes at a controlled rate, and measures what every receiver got: a delivery
//! ratio that counts each missing or duplicated message, send-to-ack and end-to-end latency
//! percentiles (HDR histograms), throughput, the gateway processes' CPU and memory (in the
//! idle scenario, how the memory grows with the connections), its own CPU, how busy the whole
//! machine was, and how far its own sends fell behind their schedule.

mod client;
mod idle;
mod procstat;
mod report;
mod stats;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use stats::{Receiver, Shared};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Load generator for the chat gateway.
///
/// Scenarios (defaults, each settable by the flags below):
///   fanout           2,000 clients in 4 rooms, 8 publishers, 200 msg/s, 100-byte bodies
///   many-rooms       4,000 clients in 400 rooms, 100 publishers, 2,000 msg/s
///   big-room         10,000 clients in 1 room, 2 publishers, 10 msg/s
///   idle             19,000 idle clients in 100 rooms, no publishers: memory per connection,
///                    sampled 20 times while connecting to show how it grows (the gateway
///                    must allow that many: CHAT_MAX_CONNECTIONS=19000, as scripts/bench sets)
///   reconnect-storm  6,000 clients in 60 rooms, 6 publishers, 60 msg/s; runs --kill-cmd
///                    after --kill-after seconds and reports the time until all are back
/// Publishers send faster than the gateway's default per-connection limit (10 msg/s): run
/// the gateways with CHAT_RATE_PER_SEC and CHAT_RATE_BURST raised (scripts/bench does).
/// With --protocol socketio it loads bench/socketio/server.js (Socket.IO with its Redis
/// adapter) the same way, for comparison; pass that process's --pid.
///
/// Every connection joins its room before the first message, and each is expected to get
/// every acked message of its room exactly once. The exit status is 2 when the run was not
/// clean: a delivery missing or doubled (ratio below 1), a connection that failed or was not
/// open at the end, or a send never answered. Deliveries/s count from the first send to the
/// last delivery; each step's figures come from exactly its own seconds. Latencies are timed
/// from the actual send; `send lag` shows how late sends left against the schedule (a busy
/// machine can delay the load generator itself, and hide that much latency).
#[derive(Parser, Debug, Clone)]
#[command(name = "chat-loadgen", version, about, verbatim_doc_comment)]
pub struct Cli {
    /// Base URL of a gateway or of nginx. Repeat it to spread the connections over several
    /// servers, in turn (accounts are registered through the first).
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    urls: Vec<String>,
    #[arg(long, value_enum, default_value_t = Scenario::Fanout)]
    scenario: Scenario,
    /// The server's protocol: the gateway's, or Socket.IO's (bench/socketio/server.js; no
    /// accounts, no resume after a reconnect).
    #[arg(long, value_enum, default_value_t = client::Protocol::Chat)]
    protocol: client::Protocol,
    /// Receiving clients (connections).
    #[arg(long)]
    clients: Option<usize>,
    /// Rooms the clients are spread over.
    #[arg(long)]
    rooms: Option<usize>,
    /// Publishing connections (each also receives its room).
    #[arg(long)]
    publishers: Option<usize>,
    /// Total publish rate, messages per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of publishing (per step with --steps).
    #[arg(long)]
    duration: Option<u64>,
    /// New connections per second while connecting.
    #[arg(long)]
    connect_rate: Option<u64>,
    /// Message body size in bytes.
    #[arg(long)]
    body_bytes: Option<usize>,
    /// Accounts the connections log in as (connections share them).
    #[arg(long)]
    users: Option<usize>,
    /// Stepped rate to find saturation: START:STEP:COUNT (msg/s), each step --duration long.
    #[arg(long)]
    steps: Option<String>,
    /// Gateway process ids to sample CPU and memory from (repeatable; each must be running at
    /// the start, and one that exits keeps the CPU time it used).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// A chat-cluster state directory: sample its gateways (read again at each sample, so a
    /// gateway restarted during the run is counted too).
    #[arg(long)]
    cluster_state: Option<PathBuf>,
    /// Seconds after publishing starts to run --kill-cmd (reconnect-storm); within the run.
    #[arg(long)]
    kill_after: Option<u64>,
    /// Shell command that kills a gateway, e.g. "scripts/cluster kill 0" (with --kill-after).
    #[arg(long)]
    kill_cmd: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Write a plot of throughput and latency over time to this file (SVG; name it *.svg).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Spread connections over this many loopback source addresses (127.0.0.1, .2, ...), so
    /// that nginx's per-address limits see many clients, as in production.
    #[arg(long, default_value_t = 0)]
    source_ips: u32,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Worker threads of the load generator [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Fanout,
    ManyRooms,
    BigRoom,
    Idle,
    ReconnectStorm,
}

/// A resolved run: scenario defaults with the flags applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub scenario: Scenario,
    pub protocol: client::Protocol,
    pub urls: Vec<String>,
    pub clients: usize,
    pub rooms: usize,
    pub publishers: usize,
    pub rate: f64,
    pub duration_s: u64,
    pub connect_rate: u64,
    pub body_bytes: usize,
    pub users: usize,
    pub steps: Vec<f64>,
    pub reconnect: bool,
    pub source_ips: u32,
}

impl Plan {
    fn from(cli: &Cli) -> anyhow::Result<Plan> {
        // (clients, rooms, publishers, rate, duration)
        let (clients, rooms, publishers, rate, duration) = match cli.scenario {
            Scenario::Fanout => (2_000, 4, 8, 200.0, 30),
            Scenario::ManyRooms => (4_000, 400, 100, 2_000.0, 30),
            Scenario::BigRoom => (10_000, 1, 2, 10.0, 30),
            Scenario::Idle => (19_000, 100, 0, 0.0, 10),
            Scenario::ReconnectStorm => (6_000, 60, 6, 60.0, 40),
        };
        let rate = cli.rate.unwrap_or(rate);
        let duration_s = cli.duration.unwrap_or(duration);
        let publishers = cli.publishers.unwrap_or(publishers);
        let steps = match &cli.steps {
            None => vec![rate],
            Some(spec) => {
                let parts: Vec<f64> = spec
                    .split(':')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--steps is START:STEP:COUNT")?;
                let [start, step, count] = parts[..] else {
                    anyhow::bail!("--steps is START:STEP:COUNT");
                };
                anyhow::ensure!(
                    count.fract() == 0.0 && (1.0..=1000.0).contains(&count),
                    "--steps: COUNT is a whole number of steps, 1 to 1000"
                );
                (0..count as usize)
                    .map(|i| start + step * i as f64)
                    .collect()
            }
        };
        if publishers > 0 {
            anyhow::ensure!(
                steps.iter().all(|r| r.is_finite() && *r > 0.0),
                "the publish rate must be above 0 msg/s in every step (got {steps:?})"
            );
        }
        anyhow::ensure!(duration_s > 0, "--duration must be at least 1 s");
        anyhow::ensure!(cli.rooms != Some(0), "--rooms must be at least 1");
        anyhow::ensure!(cli.users != Some(0), "--users must be at least 1");
        match (cli.kill_after, &cli.kill_cmd) {
            (Some(after), Some(_)) => anyhow::ensure!(
                after < duration_s * steps.len() as u64,
                "--kill-after {after} s is not within the {} s of publishing",
                duration_s * steps.len() as u64
            ),
            (None, None) => {}
            _ => anyhow::bail!("--kill-after and --kill-cmd go together"),
        }
        if let Some(plot) = &cli.plot {
            // Checked now, not after a run that may take minutes.
            anyhow::ensure!(
                plot.extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("svg")),
                "--plot writes an SVG file: name it *.svg (got {})",
                plot.display()
            );
            let dir = plot.parent().filter(|d| !d.as_os_str().is_empty());
            anyhow::ensure!(
                dir.is_none_or(Path::is_dir),
                "--plot: directory {} does not exist",
                dir.unwrap_or(Path::new(".")).display()
            );
        }
        let clients = cli.clients.unwrap_or(clients);
        Ok(Plan {
            scenario: cli.scenario,
            protocol: cli.protocol,
            urls: cli
                .urls
                .iter()
                .map(|url| url.trim_end_matches('/').to_string())
                .collect(),
            clients,
            rooms: cli.rooms.unwrap_or(rooms),
            publishers,
            // With --steps, the first step's (the header lists the steps).
            rate: steps[0],
            duration_s,
            connect_rate: cli.connect_rate.unwrap_or(1_000).max(1),
            body_bytes: cli.body_bytes.unwrap_or(100).max(24),
            users: cli.users.unwrap_or(clients.clamp(1, 32)),
            steps,
            reconnect: true,
            source_ips: cli.source_ips,
        })
    }
}

/// Shards of the end-to-end latency histograms (`stats::Latencies`): a few per worker thread
/// on a small machine, so that two threads rarely want the same one at once.
const LATENCY_SHARDS: usize = 8;

/// What every task shares.
struct Ctx {
    plan: Plan,
    /// One per `--url`; connection `i` uses `ws_urls[i % len]`.
    ws_urls: Vec<String>,
    shared: Shared,
    latencies: stats::Latencies,
    /// How late each scheduled send left (the load generator's own lag behind its schedule):
    /// latencies are measured from the actual send, so this shows how much they can hide.
    send_lag: stats::Latencies,
    /// Acknowledged messages per room.
    acked: Vec<AtomicU64>,
    /// Connections in each room that joined it (receivers and publishers whose first connect
    /// worked): each should get every message acked in the room, since all of them joined
    /// before publishing started.
    members: Vec<AtomicU64>,
    /// Current total publish rate (msg/s × 1000).
    rate_milli: AtomicU64,
    start: Instant,
    stop_publishing: CancellationToken,
    stop: CancellationToken,
    run_id: String,
}

impl Ctx {
    fn room(&self, i: usize) -> String {
        format!("lg{}-{}", self.run_id, i % self.plan.rooms)
    }
    /// The source address of connection `i`, when spreading over several.
    fn source(&self, i: usize) -> Option<std::net::IpAddr> {
        let n = self.plan.source_ips;
        (n > 0).then(|| {
            let k = (i as u32 % n) + 1;
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                127,
                0,
                (k >> 8) as u8,
                (k & 0xff) as u8,
            ))
        })
    }

    fn second(&self) -> usize {
        self.start.elapsed().as_secs() as usize
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let plan = Plan::from(&cli)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.enable_all().build()?;
    let outcome = runtime.block_on(run(cli.clone(), plan))?;
    report::print(&outcome, cli.json);
    if let Some(path) = &cli.plot {
        report::plot(&outcome, path)?;
    }
    if outcome.deliveries.ratio < 1.0
        || outcome.connections.failed > 0
        || outcome.connections.not_connected_at_end > 0
        || outcome.unanswered > 0
    {
        std::process::exit(2);
    }
    Ok(())
}

async fn register_users(plan: &Plan, run_id: &str) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::new();
    let limit = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..plan.users {
        let (http, url, limit) = (http.clone(), plan.urls[0].clone(), limit.clone());
        let name = format!("lg{run_id}_{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await?;
            let body = serde_json::json!({"username": name, "password": "loadgen-password"});
            let r = http
                .post(format!("{url}/api/register"))
                .json(&body)
                .send()
                .await?;
            let r = if r.status() == 409 {
                http.post(format!("{url}/api/login"))
                    .json(&body)
                    .send()
                    .await?
            } else {
                r
            };
            anyhow::ensure!(r.status().is_success(), "register {name}: {}", r.status());
            let v: serde_json::Value = r.json().await?;
            v["token"]
                .as_str()
                .map(str::to_string)
                .context("no token in the answer")
        }));
    }
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await??);
    }
    Ok(tokens)
}

pub struct Outcome {
    pub plan: Plan,
    pub connections: report::Connections,
    pub acked: u64,
    pub send_errors: u64,
    /// Sends never answered (no `sent`, no error) by the end of the run.
    pub unanswered: u64,
    pub deliveries: report::Deliveries,
    pub publish_seconds: f64,
    /// From the first send to the end of the second of the last delivery.
    pub delivery_seconds: f64,
    pub ack: Histogram<u64>,
    pub e2e: Histogram<u64>,
    /// How late the scheduled sends left.
    pub send_lag: Histogram<u64>,
    pub per_second: Vec<report::Second>,
    pub gateway: report::GatewayUse,
    pub idle_bytes_per_connection: Option<f64>,
    /// The idle scenario's memory samples and the line through them.
    pub idle_memory: Option<idle::IdleMemory>,
    pub recovery_seconds: Option<f64>,
    /// --kill-cmd ran.
    pub killed: bool,
    pub steps: Vec<report::Step>,
    /// How busy the whole machine was from the end of connecting to the end of the run.
    pub machine: Option<procstat::MachineUse>,
}

async fn run(cli: Cli, plan: Plan) -> anyhow::Result<Outcome> {
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut sampler = procstat::Sampler::new(&cli.pids, cli.cluster_state.as_deref())?;
    let tokens = match plan.protocol {
        client::Protocol::Chat => register_users(&plan, &run_id).await?,
        client::Protocol::Socketio => vec![String::new()],
    };
    let seconds = (plan.duration_s as usize) * plan.steps.len() + 600;
    let ctx = Arc::new(Ctx {
        ws_urls: plan
            .urls
            .iter()
            .map(|url| client::ws_url(plan.protocol, url))
            .collect(),
        shared: Shared::new(seconds),
        latencies: stats::Latencies::new(LATENCY_SHARDS),
        send_lag: stats::Latencies::new(LATENCY_SHARDS),
        acked: (0..plan.rooms).map(|_| AtomicU64::new(0)).collect(),
        members: (0..plan.rooms).map(|_| AtomicU64::new(0)).collect(),
        rate_milli: AtomicU64::new((plan.steps[0] * 1000.0) as u64),
        start: Instant::now(),
        stop_publishing: CancellationToken::new(),
        stop: CancellationToken::new(),
        run_id,
        plan: plan.clone(),
    });
    let progress = report::Progress::new(cli.quiet);
    let before_connect = sampler.sample();

    // Receivers, at the connect rate. In the idle scenario the gateways' memory is sampled
    // 20 times on the way, to show how it grows with the connections.
    let measure_idle = plan.scenario == Scenario::Idle && !sampler.pids().is_empty();
    let mut memory = vec![idle::MemoryPoint {
        connections: 0,
        rss_bytes: before_connect.rss_bytes,
    }];
    let sample_every = (plan.clients / 20).max(1);
    let mut receivers = Vec::with_capacity(plan.clients);
    let gap = Duration::from_secs_f64(1.0 / plan.connect_rate as f64);
    let mut next = tokio::time::Instant::now();
    for i in 0..plan.clients {
        tokio::time::sleep_until(next).await;
        next += gap;
        let token = tokens[i % tokens.len()].clone();
        receivers.push(tokio::spawn(receive(ctx.clone(), i, token)));
        if i % 200 == 0 {
            progress.update(&ctx.shared, "connecting");
        }
        if measure_idle && (i + 1) % sample_every == 0 && i + 1 < plan.clients {
            memory.push(idle::MemoryPoint {
                connections: ctx.shared.connected.load(Ordering::Relaxed),
                rss_bytes: sampler.sample().rss_bytes,
            });
        }
    }
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    while ctx.shared.connected.load(Ordering::Relaxed)
        + ctx.shared.connect_failures.load(Ordering::Relaxed)
        < plan.clients as u64
    {
        anyhow::ensure!(
            Instant::now() < connect_deadline,
            "clients did not connect within 2 minutes"
        );
        progress.update(&ctx.shared, "connecting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connected_at = sampler.sample();
    let idle_bytes_per_connection = measure_idle.then(|| {
        (connected_at.rss_bytes as f64 - before_connect.rss_bytes as f64)
            / plan.clients.max(1) as f64
    });
    let idle_memory = measure_idle
        .then(|| {
            memory.push(idle::MemoryPoint {
                connections: ctx.shared.connected.load(Ordering::Relaxed),
                rss_bytes: connected_at.rss_bytes,
            });
            idle::IdleMemory::fit(memory)
        })
        .flatten();

    // Publishers. They all join before the first message, or one that joined late would not
    // get the messages sent before (it starts from the room's seq at its join).
    let mut publishers = Vec::new();
    let (epoch_tx, epoch_rx) = tokio::sync::watch::channel(None);
    for p in 0..plan.publishers {
        let token = tokens[p % tokens.len()].clone();
        publishers.push(tokio::spawn(publish(
            ctx.clone(),
            p,
            token,
            epoch_rx.clone(),
        )));
    }
    let everyone = (plan.clients + plan.publishers) as u64;
    while ctx.shared.opened.load(Ordering::Relaxed)
        + ctx.shared.connect_failures.load(Ordering::Relaxed)
        < everyone
    {
        anyhow::ensure!(
            Instant::now() < connect_deadline + Duration::from_secs(60),
            "publishers did not connect within a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let receivers_up = ctx.shared.receivers_connected.load(Ordering::Relaxed);
    // Steps start on the run clock's whole seconds, so that each step's window of per-second
    // counts is exactly the step.
    let first_second = ctx.second() + 1;
    tokio::time::sleep_until((ctx.start + Duration::from_secs(first_second as u64)).into()).await;
    let publish_started = Instant::now();
    let _ = epoch_tx.send(Some(publish_started));
    let mut steps = Vec::new();
    let mut storm = Storm::default();
    for (i, rate) in plan.steps.iter().enumerate() {
        ctx.rate_milli
            .store((rate * 1000.0) as u64, Ordering::Relaxed);
        let step_from = first_second + i * plan.duration_s as usize;
        let step_start = (step_from, sampler.sample(), Instant::now());
        let step_end = ctx.start + Duration::from_secs((step_from as u64) + plan.duration_s);
        while Instant::now() < step_end {
            tokio::time::sleep(Duration::from_millis(250)).await;
            progress.update(
                &ctx.shared,
                &format!("step {}/{} at {rate} msg/s", i + 1, plan.steps.len()),
            );
            if let (Some(after), Some(cmd), None) = (cli.kill_after, &cli.kill_cmd, storm.killed_at)
                && publish_started.elapsed() >= Duration::from_secs(after)
            {
                let status = std::process::Command::new("sh")
                    .stdout(std::process::Stdio::null())
                    .arg("-c")
                    .arg(cmd)
                    .status()?;
                anyhow::ensure!(status.success(), "--kill-cmd failed: {status}");
                storm.killed_at = Some(Instant::now());
            }
            storm.check(&ctx.shared, receivers_up);
        }
        let (from_second, from_proc, from_instant) = step_start;
        steps.push((
            *rate,
            from_second,
            from_second + plan.duration_s as usize,
            from_proc,
            sampler.sample(),
            from_instant.elapsed(),
        ));
    }
    let publish_seconds = publish_started.elapsed().as_secs_f64();
    ctx.stop_publishing.cancel();
    // Let the last messages arrive: wait until every expected delivery came, or 15 s. Acks of
    // the last sends may still be arriving, so `expected` is recounted each time.
    let expected = || -> u64 {
        ctx.acked
            .iter()
            .zip(&ctx.members)
            .map(|(acked, members)| acked.load(Ordering::Relaxed) * members.load(Ordering::Relaxed))
            .sum()
    };
    // Under overload the backlog can take long to arrive: wait while deliveries still
    // progress (up to 3 minutes), and stop once nothing moved for 10 s.
    let settled = || {
        let answered = ctx.shared.acked.load(Ordering::Relaxed)
            + ctx.shared.send_errors.load(Ordering::Relaxed);
        answered >= ctx.shared.sent.load(Ordering::Relaxed)
            && ctx.shared.unique.load(Ordering::Relaxed) >= expected()
    };
    let drain_deadline = Instant::now() + Duration::from_secs(180);
    let mut last_progress = (Instant::now(), ctx.shared.received.load(Ordering::Relaxed));
    while !(settled() && storm.settled()) && Instant::now() < drain_deadline {
        progress.update(&ctx.shared, "draining");
        tokio::time::sleep(Duration::from_millis(100)).await;
        storm.check(&ctx.shared, receivers_up);
        let received = ctx.shared.received.load(Ordering::Relaxed);
        if received != last_progress.1 {
            last_progress = (Instant::now(), received);
        } else if last_progress.0.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let expected = expected();
    let end = sampler.sample();
    // What a dead gateway leaves: sends never answered, and clients that never came back.
    let unanswered = ctx.shared.sent.load(Ordering::Relaxed).saturating_sub(
        ctx.shared.acked.load(Ordering::Relaxed) + ctx.shared.send_errors.load(Ordering::Relaxed),
    );
    let disconnected = ctx
        .shared
        .opened
        .load(Ordering::Relaxed)
        .saturating_sub(ctx.shared.connected.load(Ordering::Relaxed));
    ctx.stop.cancel();
    let mut ack = stats::histogram();
    let mut recorders = Vec::new();
    for task in publishers {
        let (recorder, acks) = task.await?;
        ack.add(&acks)?;
        recorders.push(recorder);
    }
    for task in receivers {
        recorders.push(task.await?);
    }
    progress.finish();

    let unique = recorders.iter().map(|r| r.unique).sum();
    let duplicates = recorders.iter().map(|r| r.duplicates).sum();
    let (e2e, per_second_latency) = ctx.latencies.merged();
    let last_second = ctx.second();
    let per_second: Vec<report::Second> = (0..=last_second)
        .map(|s| {
            let latency = per_second_latency.get(s).filter(|h| !h.is_empty());
            report::Second {
                second: s as u64,
                deliveries: ctx
                    .shared
                    .per_second
                    .get(s)
                    .map_or(0, |c| c.load(Ordering::Relaxed)),
                p50_ms: latency.map(|h| h.value_at_quantile(0.5) as f64 / 1000.0),
                p99_ms: latency.map(|h| h.value_at_quantile(0.99) as f64 / 1000.0),
            }
        })
        .collect();
    let steps = steps
        .into_iter()
        .map(|(rate, from, to, from_proc, to_proc, elapsed)| {
            let window = from.min(per_second.len())..to.min(per_second.len());
            let deliveries: u64 = per_second[window.clone()]
                .iter()
                .map(|s| s.deliveries)
                .sum();
            let acked: u64 = ctx.shared.acked_per_second[window]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum();
            let mut latency = stats::histogram();
            for h in per_second_latency
                .get(from..to.min(per_second_latency.len()))
                .into_iter()
                .flatten()
            {
                let _ = latency.add(h);
            }
            let cpu = to_proc.cpu_seconds - from_proc.cpu_seconds;
            let own_cpu = to_proc.own_cpu_seconds - from_proc.own_cpu_seconds;
            let seconds = (to - from).max(1) as f64;
            report::Step {
                rate,
                seconds: elapsed.as_secs_f64(),
                deliveries_per_sec: deliveries as f64 / seconds,
                acked_per_sec: acked as f64 / seconds,
                p99_ms: (!latency.is_empty())
                    .then(|| latency.value_at_quantile(0.99) as f64 / 1000.0),
                gateway_cpu_seconds: cpu,
                load_generator_cpu_seconds: own_cpu,
                deliveries_per_cpu_second: (cpu > 0.0).then(|| deliveries as f64 / cpu),
                machine: to_proc.machine.since(&from_proc.machine),
            }
        })
        .collect();
    let cpu = end.cpu_seconds - connected_at.cpu_seconds;
    let received = ctx.shared.received.load(Ordering::Relaxed);
    // Deliveries/s over the time they took: from the first send to the last delivery.
    let publish_from = (publish_started - ctx.start).as_secs_f64();
    let last_delivery_second = per_second.iter().rposition(|s| s.deliveries > 0);
    let delivery_seconds = last_delivery_second
        .map_or(0.0, |s| (s + 1) as f64 - publish_from)
        .max(publish_seconds);
    Ok(Outcome {
        connections: report::Connections {
            made: ctx.shared.opened.load(Ordering::Relaxed),
            failed: ctx.shared.connect_failures.load(Ordering::Relaxed),
            reconnects: ctx.shared.reconnects.load(Ordering::Relaxed),
            not_connected_at_end: disconnected,
        },
        acked: ctx.shared.acked.load(Ordering::Relaxed),
        send_errors: ctx.shared.send_errors.load(Ordering::Relaxed),
        unanswered,
        delivery_seconds,
        deliveries: report::Deliveries {
            expected,
            unique,
            missing: expected.saturating_sub(unique),
            duplicates,
            ratio: if expected == 0 {
                1.0
            } else if duplicates > 0 {
                // A duplicate is as wrong as a loss: the ratio is 1.0 only when exact.
                (unique.min(expected) as f64 - duplicates as f64) / expected as f64
            } else {
                unique as f64 / expected as f64
            },
        },
        publish_seconds,
        ack,
        e2e,
        send_lag: ctx.send_lag.merged().0,
        per_second,
        gateway: report::GatewayUse {
            pids: sampler.pids().to_vec(),
            cpu_seconds: cpu,
            load_generator_cpu_seconds: end.own_cpu_seconds - connected_at.own_cpu_seconds,
            rss_bytes_before: before_connect.rss_bytes,
            rss_bytes_connected: connected_at.rss_bytes,
            rss_bytes_end: end.rss_bytes,
            deliveries_per_cpu_second: (cpu > 0.0).then(|| received as f64 / cpu),
        },
        idle_bytes_per_connection,
        idle_memory,
        recovery_seconds: storm.recovered,
        killed: storm.killed_at.is_some(),
        steps,
        machine: end.machine.since(&connected_at.machine),
        plan,
    })
}

/// The reconnect storm: when the gateway was killed, and when every receiver was back.
#[derive(Default)]
struct Storm {
    killed_at: Option<Instant>,
    /// Some receivers were seen disconnected after the kill.
    seen_down: bool,
    recovered: Option<f64>,
}

impl Storm {
    /// Called every 100–250 ms: all are back once every receiver that connected at the start
    /// is connected again, after some were seen gone.
    fn check(&mut self, shared: &Shared, receivers: u64) {
        let Some(at) = self.killed_at else { return };
        let up = shared.receivers_connected.load(Ordering::Relaxed);
        if up < receivers {
            self.seen_down = true;
        } else if self.seen_down && self.recovered.is_none() {
            self.recovered = Some(at.elapsed().as_secs_f64());
        }
    }

    /// Nothing left to wait for: no kill (a --kill-after is always within the run, so it has
    /// happened by the time this is asked), or everyone back.
    fn settled(&self) -> bool {
        self.killed_at.is_none() || self.recovered.is_some()
    }
}

/// Reads one room's messages until told to stop, reconnecting and resuming with `since`.
async fn receive(ctx: Arc<Ctx>, index: usize, token: String) -> Receiver {
    let room = ctx.room(index);
    let mut recorder = Receiver::new(index);
    let mut first = true;
    loop {
        let Some(mut ws) = connect(&ctx, index, &token, &room, &mut recorder, first).await else {
            return recorder;
        };
        if first {
            ctx.members[index % ctx.plan.rooms].fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        ctx.shared
            .receivers_connected
            .fetch_add(1, Ordering::Relaxed);
        let ended = read_until_closed(&ctx, &mut ws, &mut recorder).await;
        ctx.shared
            .receivers_connected
            .fetch_sub(1, Ordering::Relaxed);
        ctx.shared.connected.fetch_sub(1, Ordering::Relaxed);
        if ended == Ended::Stopped || !ctx.plan.reconnect {
            let _ = ws.close(None).await;
            return recorder;
        }
    }
}

/// Connects and joins `room` (resuming with `since` after the first time), and counts the
/// connection. After the first connection it retries with jittered backoff (100 ms doubling
/// to 2 s) until it succeeds; `None` when the first attempt failed or the run stopped.
async fn connect(
    ctx: &Ctx,
    index: usize,
    token: &str,
    room: &str,
    recorder: &mut Receiver,
    first: bool,
) -> Option<client::Ws> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect_and_join(ctx, index, token, room, recorder, first).await {
            Ok(ws) => {
                let counter = if first {
                    &ctx.shared.opened
                } else {
                    &ctx.shared.reconnects
                };
                counter.fetch_add(1, Ordering::Relaxed);
                ctx.shared.connected.fetch_add(1, Ordering::Relaxed);
                return Some(ws);
            }
            Err(_) if first => {
                ctx.shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(_) => {
                let jitter =
                    Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64));
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = ctx.stop.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn connect_and_join(
    ctx: &Ctx,
    index: usize,
    token: &str,
    room: &str,
    recorder: &mut Receiver,
    first: bool,
) -> anyhow::Result<client::Ws> {
    let protocol = ctx.plan.protocol;
    let ws_url = &ctx.ws_urls[index % ctx.ws_urls.len()];
    let mut ws = client::open(protocol, ws_url, token, ctx.source(index)).await?;
    let since = (!first).then_some(recorder.last_seq);
    let last_seq = client::join(protocol, &mut ws, room, since).await?;
    if first {
        recorder.last_seq = last_seq;
    }
    Ok(ws)
}

#[derive(PartialEq, Eq)]
enum Ended {
    Stopped,
    Dropped,
}

/// A publisher's sends awaiting their `sent`: ref -> (first send time, frame text).
type Pending = Arc<std::sync::Mutex<std::collections::HashMap<u64, (Instant, String)>>>;

/// What a publisher's reader needs to match acks to sends, and to ask for a resend.
struct Acks {
    pending: Pending,
    retry: tokio::sync::mpsc::UnboundedSender<u64>,
    latency: Histogram<u64>,
    room: usize,
}

/// Counts a `message` frame.
fn on_message(ctx: &Ctx, frame: &client::Incoming<'_>, recorder: &mut Receiver) {
    let Some(seq) = frame.seq else { return };
    let second = ctx.second();
    if recorder.message(seq) {
        ctx.shared.unique.fetch_add(1, Ordering::Relaxed);
        if let Some(sent) = frame.body.as_deref().and_then(client::sent_at_us) {
            let latency = client::now_us().saturating_sub(sent);
            ctx.latencies.record(recorder.id, latency, second);
        }
    }
    ctx.shared.delivered(second);
}

async fn read_until_closed(ctx: &Ctx, ws: &mut client::Ws, recorder: &mut Receiver) -> Ended {
    // Made once: every receiver shares `stop`, and a fresh wait per frame would take its lock.
    let stop = ctx.stop.cancelled();
    tokio::pin!(stop);
    loop {
        let next = tokio::select! {
            next = ws.next() => next,
            _ = &mut stop => return Ended::Stopped,
        };
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Ended::Dropped,
            Some(Ok(_)) => continue,
        };
        let text = match client::unframe(ctx.plan.protocol, ws, &text).await {
            Ok(Some(frame)) => frame,
            Ok(None) => continue,
            Err(_) => return Ended::Dropped,
        };
        if let Ok(frame) = serde_json::from_str::<client::Incoming<'_>>(text)
            && frame.kind == "message"
        {
            on_message(ctx, &frame, recorder);
        }
    }
}

/// Publishes to its room at its share of the current rate; also receives the room. When the
/// connection drops it reconnects like a receiver, resumes the room with `since`, and sends again
/// what was not answered (same client_id: the gateway stores each message at most once).
async fn publish(
    ctx: Arc<Ctx>,
    index: usize,
    token: String,
    epoch: tokio::sync::watch::Receiver<Option<Instant>>,
) -> (Receiver, Histogram<u64>) {
    let room = ctx.room(index);
    let mut recorder = Receiver::new(index);
    let pending: Pending = Arc::default();
    let (retry_tx, retry_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut retry_rx = Some(retry_rx);
    let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut acks = Acks {
        pending: pending.clone(),
        retry: retry_tx,
        latency: stats::histogram(),
        room: index % ctx.plan.rooms,
    };
    let mut schedule = None;
    let mut first = true;
    loop {
        let connection = connect(
            &ctx,
            ctx.plan.clients + index,
            &token,
            &room,
            &mut recorder,
            first,
        )
        .await;
        let Some(ws) = connection else { break };
        if first {
            ctx.members[index % ctx.plan.rooms].fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        // Frames queued while disconnected are all in `pending`: send that instead, in order.
        while frames.try_recv().is_ok() {}
        let mut unanswered: Vec<(u64, String)> = pending
            .lock()
            .map(|p| {
                p.iter()
                    .map(|(n, (_, frame))| (*n, frame.clone()))
                    .collect()
            })
            .unwrap_or_default();
        unanswered.sort_unstable_by_key(|(n, _)| *n);
        if let Some(retry_rx) = retry_rx.take() {
            schedule = Some(tokio::spawn(publish_on_schedule(
                ctx.clone(),
                index,
                epoch.clone(),
                pending.clone(),
                retry_rx,
                frames_tx.clone(),
            )));
        }
        let ended =
            publisher_link(&ctx, ws, &mut frames, unanswered, &mut recorder, &mut acks).await;
        ctx.shared.connected.fetch_sub(1, Ordering::Relaxed);
        if ended == Ended::Stopped || !ctx.plan.reconnect {
            break;
        }
    }
    if let Some(schedule) = schedule {
        schedule.abort();
    }
    (recorder, acks.latency)
}

/// Makes this publisher's frames on its turns (publishers take turns on one schedule:
/// publisher `index` of P sends at `epoch + (index + k·P) / rate`, so the total rate arrives
/// evenly spread; each on its own clock, they would start together and send in step, bursts of
/// P messages that measure the burst, not the rate), and frames to send again.
async fn publish_on_schedule(
    ctx: Arc<Ctx>,
    index: usize,
    mut epoch: tokio::sync::watch::Receiver<Option<Instant>>,
    pending: Pending,
    mut retry: tokio::sync::mpsc::UnboundedReceiver<u64>,
    frames: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let room = ctx.room(index);
    let padding = "x".repeat(ctx.plan.body_bytes);
    let resend = |n: u64| {
        pending
            .lock()
            .ok()
            .and_then(|p| p.get(&n).map(|(_, frame)| frame.clone()))
    };
    let publishers = ctx.plan.publishers.max(1);
    let rate = || (ctx.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0).max(1e-3);
    // Set once every publisher has joined its room.
    let epoch = tokio::select! {
        _ = ctx.stop.cancelled() => return,
        epoch = epoch.wait_for(Option::is_some) => match epoch {
            Ok(epoch) => epoch.unwrap_or_else(Instant::now),
            Err(_) => return,
        },
    };
    let mut next = first_turn(epoch, index, publishers, rate(), Instant::now());
    let mut n = 0u64;
    loop {
        // A send the gateway could not confirm (unavailable) is sent again with the same
        // client_id, as a real client would: it is stored at most once. After publishing
        // stops, only resends go out.
        let frame = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return,
            Some(again) = retry.recv() => match resend(again) {
                Some(frame) => frame,
                None => continue,
            },
            _ = tokio::time::sleep_until(next.into()), if !ctx.stop_publishing.is_cancelled() => {
                let lag = Instant::now().saturating_duration_since(next);
                ctx.send_lag.record(index, lag.as_micros() as u64, ctx.second());
                next += turn_interval(publishers, rate());
                n += 1;
                let head = format!("t{} p{index} n{n} ", client::now_us());
                let body = format!(
                    "{head}{}",
                    &padding[..ctx.plan.body_bytes.saturating_sub(head.len())]
                );
                let client_id = format!("{}-{index}-{n}", ctx.run_id);
                let frame = serde_json::json!({
                    "type": "send", "room": room, "body": body, "ref": n, "client_id": client_id
                })
                .to_string();
                if let Ok(mut pending) = pending.lock() {
                    pending.insert(n, (Instant::now(), frame.clone()));
                }
                ctx.shared.sent.fetch_add(1, Ordering::Relaxed);
                frame
            }
            _ = ctx.stop_publishing.cancelled(), if !ctx.stop_publishing.is_cancelled() => continue,
        };
        if frames.send(frame).is_err() {
            return;
        }
    }
}

/// One connection of a publisher: sends `unanswered` again, then the schedule's frames, and
/// reads acks and its room's messages until the socket drops or the run stops.
async fn publisher_link(
    ctx: &Ctx,
    mut ws: client::Ws,
    frames: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    unanswered: Vec<(u64, String)>,
    recorder: &mut Receiver,
    acks: &mut Acks,
) -> Ended {
    let protocol = ctx.plan.protocol;
    for (_, frame) in unanswered {
        if ws
            .send(Message::text(client::outbound(protocol, frame)))
            .await
            .is_err()
        {
            return Ended::Dropped;
        }
    }
    let stop = ctx.stop.cancelled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => {
                let _ = ws.close(None).await;
                return Ended::Stopped;
            }
            Some(frame) = frames.recv() => {
                if ws.send(Message::text(client::outbound(protocol, frame))).await.is_err() {
                    return Ended::Dropped;
                }
            }
            next = ws.next() => match next {
                Some(Ok(Message::Text(text))) => match client::unframe(protocol, &mut ws, &text).await {
                    Ok(Some(frame)) => handle_publisher_frame(ctx, frame, recorder, acks),
                    Ok(None) => {}
                    Err(_) => return Ended::Dropped,
                },
                Some(Ok(_)) => {}
                _ => return Ended::Dropped,
            },
        }
    }
}

/// Time between one publisher's turns when `publishers` share `rate` messages per second.
fn turn_interval(publishers: usize, rate: f64) -> Duration {
    Duration::from_secs_f64(publishers as f64 / rate)
}

/// Publisher `index`'s first turn at or after `now`: its slot `epoch + index / rate`, moved on
/// by whole intervals past the turns that went by while it connected.
fn first_turn(epoch: Instant, index: usize, publishers: usize, rate: f64, now: Instant) -> Instant {
    let mut turn = epoch + Duration::from_secs_f64(index as f64 / rate);
    while turn < now {
        turn += turn_interval(publishers, rate);
    }
    turn
}

fn handle_publisher_frame(ctx: &Ctx, text: &str, recorder: &mut Receiver, acks: &mut Acks) {
    let Ok(frame) = serde_json::from_str::<client::Incoming<'_>>(text) else {
        return;
    };
    match frame.kind.as_ref() {
        "message" => on_message(ctx, &frame, recorder),
        "sent" | "error" => {
            let Some(reference) = frame.reference else {
                ctx.shared.send_errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let retryable = frame.kind == "error"
                && matches!(frame.code.as_deref(), Some("unavailable" | "internal"));
            if retryable {
                let _ = acks.retry.send(reference);
                return;
            }
            let Some((at, _)) = acks
                .pending
                .lock()
                .ok()
                .and_then(|mut p| p.remove(&reference))
            else {
                return;
            };
            if frame.kind == "sent" {
                let _ = acks
                    .latency
                    .record((at.elapsed().as_micros() as u64).max(1));
                ctx.shared.acknowledged(ctx.second());
                ctx.acked[acks.room].fetch_add(1, Ordering::Relaxed);
            } else {
                ctx.shared.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> anyhow::Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("chat-loadgen").chain(args.iter().copied()))?;
        Plan::from(&cli)
    }

    #[track_caller]
    fn refused(args: &[&str], says: &str) {
        match plan(args) {
            Ok(_) => panic!("{args:?} was accepted"),
            Err(e) => assert!(format!("{e:#}").contains(says), "{args:?}: {e:#}"),
        }
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_runs() {
        refused(&["--users", "0"], "--users must be at least 1");
        refused(&["--rooms", "0"], "--rooms must be at least 1");
        refused(&["--duration", "0"], "--duration must be at least 1 s");
        refused(&["--rate", "0"], "above 0 msg/s");
        refused(&["--steps", "a:b:0"], "START:STEP:COUNT");
        refused(&["--steps", "100:100"], "START:STEP:COUNT");
        refused(&["--steps", "100:100:0"], "COUNT is a whole number");
        refused(&["--steps", "100:100:1001"], "COUNT is a whole number");
        refused(&["--steps", "100:-100:3"], "above 0 msg/s");
        refused(&["--kill-cmd", "true"], "go together");
        refused(&["--kill-after", "5"], "go together");
        refused(
            &[
                "--duration",
                "10",
                "--kill-after",
                "10",
                "--kill-cmd",
                "true",
            ],
            "not within the 10 s",
        );
        refused(&["--plot", "out.png"], "name it *.svg");
        refused(&["--plot", "out"], "name it *.svg");
        refused(&["--plot", "/no/such/dir/out.svg"], "does not exist");
    }

    #[test]
    fn the_edges_of_the_arguments_are_accepted() {
        let p = plan(&["--steps", "100:100:1000", "--duration", "1"]).unwrap();
        assert_eq!((p.steps.len(), p.steps[999]), (1000, 100_000.0));
        let p = plan(&[
            "--duration",
            "10",
            "--kill-after",
            "9",
            "--kill-cmd",
            "true",
        ])
        .unwrap();
        assert_eq!(p.duration_s, 10);
        plan(&["--users", "1", "--rooms", "1", "--plot", "OUT.SVG"]).unwrap();
        // An idle run has no publishers, so no rate to check.
        plan(&["--scenario", "idle", "--rate", "0"]).unwrap();
    }

    #[test]
    fn publishers_take_evenly_spread_turns() {
        let epoch = Instant::now();
        // 4 publishers sharing 200 msg/s: one message every 5 ms, each publisher every 20 ms.
        let turns: Vec<Duration> = (0..4)
            .map(|p| first_turn(epoch, p, 4, 200.0, epoch) - epoch)
            .collect();
        let ms = |t: Duration| (t.as_secs_f64() * 1000.0).round() as u64;
        assert_eq!(
            turns.iter().map(|&t| ms(t)).collect::<Vec<_>>(),
            [0, 5, 10, 15]
        );
        // Publisher 1 connected 47 ms late: it keeps its slot (5 ms past each 20 ms).
        let late = first_turn(epoch, 1, 4, 200.0, epoch + Duration::from_millis(47));
        assert_eq!(ms(late - epoch), 65);
        assert_eq!(ms(turn_interval(4, 200.0)), 20);
    }
}
