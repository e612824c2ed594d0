//! A short run of the load generator against a real gateway (embedded mode, in-process): it
//! connects, publishes, and reports every delivery. Timings are the benchmark's business.

mod common;

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_fanout_run_delivers_everything_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = chat_gateway::Settings::defaults();
    settings.bind = "127.0.0.1:0".parse().unwrap();
    settings.metrics_bind = "127.0.0.1:0".parse().unwrap();
    settings.data_dir = dir.path().to_path_buf();
    settings.rate_per_sec = 1000;
    settings.rate_burst = 1000;
    let app = chat_gateway::Application::build(settings).await.unwrap();
    let port = app.port();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());

    let plot = dir.path().join("plot.svg");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_chat-loadgen"))
            .args(["--url", &format!("http://127.0.0.1:{port}")])
            .args(common::SMALL_FANOUT)
            .arg("--json")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg("--plot")
            .arg(&plot)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = common::report(&output);
    let acked = common::assert_every_message_delivered(&report);
    assert!(report["e2e_latency"]["samples"].as_u64().unwrap() >= acked * 21);
    assert!(report["gateway"]["rss_bytes_end"].as_u64().unwrap() > 0);
    // The machine was busy running this very test: its share is a fraction above zero.
    let machine = &report["machine"];
    let busy = machine["busy_share"].as_f64().unwrap();
    assert!(busy > 0.0 && busy <= 1.0, "{machine}");
    assert!(machine["cores"].as_u64().unwrap() >= 1, "{machine}");
    let svg = std::fs::read_to_string(dir.path().join("plot.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
