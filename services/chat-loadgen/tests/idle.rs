//! The idle scenario against an embedded gateway in this test's process. It is a test binary of
//! its own: the load generator samples this process's memory, and another test running beside
//! it in the same process would move that memory by megabytes.

mod common;
mod inprocess;

use inprocess::{gateway, loadgen};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_run_shows_how_memory_grows_with_the_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (port, shutdown, server) = gateway(dir.path()).await;
    let plot = dir.path().join("memory.svg");
    let args = format!(
        "--scenario idle --clients 400 --duration 1 --json --pid {} --plot {}",
        std::process::id(),
        plot.display()
    );
    let output = loadgen(port, args.split(' ').map(String::from).collect())
        .await
        .unwrap();
    let report = common::report(&output);
    assert_eq!(report["connections"]["made"], 400, "{report}");
    let memory = &report["idle_memory"];
    let points = memory["points"].as_array().unwrap();
    // Before the first connection, every twentieth of the 400 on the way, and all of them open.
    assert_eq!(points.len(), 21, "{memory}");
    assert_eq!(points[0]["connections"], 0, "{memory}");
    assert_eq!(points[20]["connections"], 400, "{memory}");
    let counts: Vec<u64> = points
        .iter()
        .map(|p| p["connections"].as_u64().unwrap())
        .collect();
    assert!(counts.is_sorted(), "{counts:?}");
    // The gateway runs in this process: its memory grew with the connections.
    let slope = memory["bytes_per_connection_fit"].as_f64().unwrap();
    assert!(slope > 0.0, "{memory}");
    let r_squared = memory["r_squared"].as_f64().unwrap();
    assert!(r_squared <= 1.0, "{memory}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.contains("<circle") && svg.contains("connections"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
