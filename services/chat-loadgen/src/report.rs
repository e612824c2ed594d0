//! The run's results: a text summary, JSON (`--json`), and a plot (`--plot`).

use crate::Outcome;
use crate::stats::{Percentiles, Shared};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::Ordering;

#[derive(Debug, Serialize)]
pub struct Connections {
    pub made: u64,
    pub failed: u64,
    pub reconnects: u64,
    /// Connections made that were not open at the end (never came back after a drop).
    pub not_connected_at_end: u64,
}

#[derive(Debug, Serialize)]
pub struct Deliveries {
    pub expected: u64,
    pub unique: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// 1.0 only when every expected delivery arrived exactly once.
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct Second {
    pub second: u64,
    pub deliveries: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct GatewayUse {
    pub pids: Vec<u32>,
    /// CPU seconds the gateways used from the end of connecting to the end of the run.
    pub cpu_seconds: f64,
    /// CPU seconds this load generator used over the same time, on the same machine.
    pub load_generator_cpu_seconds: f64,
    pub rss_bytes_before: u64,
    pub rss_bytes_connected: u64,
    pub rss_bytes_end: u64,
    pub deliveries_per_cpu_second: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub rate: f64,
    pub seconds: f64,
    pub deliveries_per_sec: f64,
    pub acked_per_sec: f64,
    pub p99_ms: Option<f64>,
    pub gateway_cpu_seconds: f64,
    pub load_generator_cpu_seconds: f64,
    pub deliveries_per_cpu_second: Option<f64>,
    pub machine: Option<crate::procstat::MachineUse>,
}

#[derive(Serialize)]
struct Json<'a> {
    plan: &'a crate::Plan,
    connections: &'a Connections,
    messages_acked: u64,
    send_errors: u64,
    /// Sends with neither a `sent` nor an error by the end of the run.
    unanswered: u64,
    deliveries: &'a Deliveries,
    /// Unique deliveries over `delivery_seconds`.
    deliveries_per_sec: f64,
    publish_seconds: f64,
    /// From the first send to the end of the second of the last delivery.
    delivery_seconds: f64,
    ack_latency: Percentiles,
    e2e_latency: Percentiles,
    /// How late each scheduled send left: the latencies above start at the actual send, so
    /// a load generator behind its schedule would understate them by up to this.
    send_lag: Percentiles,
    gateway: &'a GatewayUse,
    idle_bytes_per_connection: Option<f64>,
    /// The idle scenario's memory samples while connecting, and the line through them.
    idle_memory: Option<&'a crate::idle::IdleMemory>,
    recovery_seconds: Option<f64>,
    steps: &'a [Step],
    per_second: &'a [Second],
    /// The whole machine (the load generator, the fleet and anything else on it), from the end
    /// of connecting to the end of the run.
    machine: Option<crate::procstat::MachineUse>,
}

pub fn print(o: &Outcome, json: bool) {
    let deliveries_per_sec = o.deliveries.unique as f64 / o.delivery_seconds.max(1e-9);
    if json {
        let report = Json {
            plan: &o.plan,
            connections: &o.connections,
            messages_acked: o.acked,
            send_errors: o.send_errors,
            unanswered: o.unanswered,
            deliveries: &o.deliveries,
            deliveries_per_sec,
            publish_seconds: o.publish_seconds,
            delivery_seconds: o.delivery_seconds,
            ack_latency: Percentiles::of(&o.ack),
            e2e_latency: Percentiles::of(&o.e2e),
            send_lag: Percentiles::of(&o.send_lag),
            gateway: &o.gateway,
            idle_bytes_per_connection: o.idle_bytes_per_connection,
            idle_memory: o.idle_memory.as_ref(),
            recovery_seconds: o.recovery_seconds,
            steps: &o.steps,
            per_second: &o.per_second,
            machine: o.machine,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return;
    }
    let p = &o.plan;
    let rates = if p.steps.len() > 1 {
        format!(
            "steps of {} msg/s",
            p.steps
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!("{} msg/s", p.rate)
    };
    println!(
        "scenario {:?}: {} clients, {} rooms, {} publishers, {rates}, {} s{}, {}-byte bodies, via {}",
        p.scenario,
        p.clients,
        p.rooms,
        p.publishers,
        p.duration_s,
        if p.steps.len() > 1 { " each" } else { "" },
        p.body_bytes,
        p.urls.join(", ")
    );
    let c = &o.connections;
    println!(
        "connections: {} made, {} failed, {} reconnects, {} not connected at the end",
        c.made, c.failed, c.reconnects, c.not_connected_at_end
    );
    let d = &o.deliveries;
    println!(
        "messages acked: {} ({} send errors, {} never answered); deliveries {} of {} expected, {} missing, {} duplicated: ratio {:.6}",
        o.acked,
        o.send_errors,
        o.unanswered,
        d.unique,
        d.expected,
        d.missing,
        d.duplicates,
        d.ratio
    );
    println!(
        "deliveries/s: {deliveries_per_sec:.0} (over {:.1} s: {:.1} s of publishing and the last deliveries)",
        o.delivery_seconds, o.publish_seconds
    );
    for (name, h) in [
        ("send->ack", &o.ack),
        ("end-to-end", &o.e2e),
        // Latencies start at the actual send: this is how much a late send could hide.
        ("send lag", &o.send_lag),
    ] {
        let q = Percentiles::of(h);
        println!(
            "{name:>10} ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  ({} samples)",
            q.p50_ms, q.p90_ms, q.p99_ms, q.p999_ms, q.max_ms, q.samples
        );
    }
    let g = &o.gateway;
    if !g.pids.is_empty() {
        println!(
            "gateways {:?}: {:.2} CPU s, RSS {:.1} MiB -> {:.1} MiB connected -> {:.1} MiB end{}",
            g.pids,
            g.cpu_seconds,
            g.rss_bytes_before as f64 / 1048576.0,
            g.rss_bytes_connected as f64 / 1048576.0,
            g.rss_bytes_end as f64 / 1048576.0,
            g.deliveries_per_cpu_second
                .map(|v| format!(", {v:.0} deliveries per CPU second"))
                .unwrap_or_default()
        );
    }
    if let Some(m) = o.machine {
        println!(
            "machine: {} cores, {:.0} % busy, {:.1} % stolen by the hypervisor (everything on it, from connected to the end); the load generator itself used {:.2} CPU s",
            m.cores,
            100.0 * m.busy_share,
            100.0 * m.steal_share,
            g.load_generator_cpu_seconds
        );
    }
    if let Some(bytes) = o.idle_bytes_per_connection {
        println!(
            "idle: {:.1} KiB of gateway RSS per connection",
            bytes / 1024.0
        );
    }
    if let Some(m) = &o.idle_memory {
        println!(
            "idle: {:.1} KiB more RSS per added connection (straight line through {} samples while connecting, R² {:.4})",
            m.bytes_per_connection_fit / 1024.0,
            m.points.len(),
            m.r_squared
        );
    }
    match (o.recovery_seconds, o.killed) {
        (Some(s), _) => println!("reconnect storm: every client back after {s:.2} s"),
        (None, true) => println!("reconnect storm: NOT every client came back"),
        (None, false) => {}
    }
    for s in &o.steps {
        println!(
            "step {:>8.0} msg/s: {:>7.0} acked/s, {:>9.0} deliveries/s, p99 {}, {:.2} CPU s{}{}",
            s.rate,
            s.acked_per_sec,
            s.deliveries_per_sec,
            s.p99_ms.map(|v| format!("{v:.2} ms")).unwrap_or("-".into()),
            s.gateway_cpu_seconds,
            s.deliveries_per_cpu_second
                .map(|v| format!(", {v:.0} deliveries/CPU s"))
                .unwrap_or_default(),
            s.machine
                .map(|m| format!(", machine {:.0} % busy", 100.0 * m.busy_share))
                .unwrap_or_default()
        );
    }
}

/// Deliveries per second and end-to-end p50/p99 over time; for the idle scenario, the
/// gateways' memory against the connections open.
pub fn plot(o: &Outcome, path: &Path) -> anyhow::Result<()> {
    if let Some(memory) = &o.idle_memory {
        return plot_memory(memory, path);
    }
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(300);
    let seconds = o.per_second.len().max(2) as u64;
    let max_deliveries = o
        .per_second
        .iter()
        .map(|s| s.deliveries)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = chart_on(&top, "deliveries per second")
        .build_cartesian_2d(0..seconds, 0..max_deliveries + max_deliveries / 10)?;
    chart.configure_mesh().x_desc("s").draw()?;
    chart.draw_series(LineSeries::new(
        o.per_second.iter().map(|s| (s.second, s.deliveries)),
        &BLUE,
    ))?;
    let max_ms = o
        .per_second
        .iter()
        .filter_map(|s| s.p99_ms)
        .fold(1.0f64, f64::max);
    // A log scale: past saturation the latency grows to seconds, and a linear axis would then
    // flatten the milliseconds before it to nothing.
    let floor_ms = 0.1;
    let mut chart = chart_on(
        &bottom,
        "end-to-end latency (ms, log scale): p50 green, p99 red",
    )
    .build_cartesian_2d(0..seconds, (floor_ms..max_ms * 1.5).log_scale())?;
    chart.configure_mesh().x_desc("s").draw()?;
    chart.draw_series(LineSeries::new(
        o.per_second
            .iter()
            .filter_map(|s| Some((s.second, s.p50_ms?.max(floor_ms)))),
        &GREEN,
    ))?;
    chart.draw_series(LineSeries::new(
        o.per_second
            .iter()
            .filter_map(|s| Some((s.second, s.p99_ms?.max(floor_ms)))),
        &RED,
    ))?;
    root.present()?;
    Ok(())
}

/// Every chart's frame: its caption, margin and axis label room.
fn chart_on<'a, 'b, DB: plotters::prelude::DrawingBackend>(
    area: &'a plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
) -> plotters::prelude::ChartBuilder<'a, 'b, DB> {
    let mut builder = plotters::prelude::ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70);
    builder
}

/// Resident memory (MiB) against open connections: the samples, and the fitted line.
fn plot_memory(m: &crate::idle::IdleMemory, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mib = |bytes: f64| bytes / 1048576.0;
    let max_connections = m
        .points
        .iter()
        .map(|p| p.connections)
        .max()
        .unwrap_or(1)
        .max(1);
    let max_mib = m
        .points
        .iter()
        .map(|p| mib(p.rss_bytes as f64))
        .fold(1.0f64, f64::max);
    let caption = format!(
        "gateway memory while idle connections open: {:.1} KiB each (line, R² {:.4})",
        m.bytes_per_connection_fit / 1024.0,
        m.r_squared
    );
    let mut chart = chart_on(&root, &caption).build_cartesian_2d(
        0..max_connections + max_connections / 20,
        0.0..max_mib * 1.1,
    )?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("RSS (MiB)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        [0, max_connections].map(|c| {
            (
                c,
                mib(m.rss_bytes_at_zero_fit + m.bytes_per_connection_fit * c as f64),
            )
        }),
        &RED,
    ))?;
    chart.draw_series(
        m.points
            .iter()
            .map(|p| Circle::new((p.connections, mib(p.rss_bytes as f64)), 3, BLUE.filled())),
    )?;
    root.present()?;
    Ok(())
}

/// A one-line progress bar on a terminal (nothing otherwise).
pub struct Progress(Option<ProgressBar>);

impl Progress {
    pub fn new(quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        Progress(Some(bar))
    }

    pub fn update(&self, shared: &Shared, phase: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(format!(
                "{phase}: {} connected, {} acked, {} delivered",
                shared.connected.load(Ordering::Relaxed),
                shared.acked.load(Ordering::Relaxed),
                shared.received.load(Ordering::Relaxed)
            ));
            bar.tick();
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
