//! A short run of the load generator against a real gateway (embedded mode, in-process): it
//! connects, publishes, and reports every delivery. Timings are the benchmark's business.

mod common;
mod inprocess;
mod small_fanout;

use inprocess::{gateway, loadgen};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_fanout_run_delivers_everything_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let (port, shutdown, server) = gateway(dir.path()).await;

    let plot = dir.path().join("plot.svg");
    let mut args: Vec<String> = small_fanout::SMALL_FANOUT.map(String::from).into();
    args.extend([
        "--json".into(),
        "--pid".into(),
        std::process::id().to_string(),
    ]);
    args.extend(["--plot".into(), plot.display().to_string()]);
    let output = loadgen(port, args).await.unwrap();
    let report = common::report(&output);
    let acked = small_fanout::assert_every_message_delivered(&report);
    assert!(report["e2e_latency"]["samples"].as_u64().unwrap() >= acked * 21);
    // Every scheduled send says how late it left (none was refused, so each was acked).
    assert_eq!(report["send_lag"]["samples"].as_u64(), Some(acked));
    assert!(report["gateway"]["rss_bytes_end"].as_u64().unwrap() > 0);
    // It read thousands of frames: its own CPU time shows.
    let own_cpu = report["gateway"]["load_generator_cpu_seconds"].as_f64();
    assert!(own_cpu.is_some_and(|s| s > 0.0), "{}", report["gateway"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_publishers_in_one_room_count_no_false_loss() {
    // Each publisher receives its room too. One that joined after another's first message
    // would not get it (it starts from the room's seq at its join), and was once counted as
    // a lost delivery: all of them now join before the first message.
    let dir = tempfile::tempdir().unwrap();
    let (port, shutdown, server) = gateway(dir.path()).await;
    let args = "--clients 5 --rooms 1 --publishers 20 --rate 400 --duration 2 --json";
    let output = loadgen(port, args.split(' ').map(String::from).collect())
        .await
        .unwrap();
    let report = common::report(&output);
    let acked = report["messages_acked"].as_u64().unwrap();
    assert!(acked >= 400, "{report}");
    assert_eq!(
        report["deliveries"]["expected"].as_u64().unwrap(),
        acked * 25
    );
    assert_eq!(
        report["deliveries"]["ratio"], 1.0,
        "{}",
        report["deliveries"]
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_goes_away_for_good_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (port, shutdown, server) = gateway(dir.path()).await;
    // SMALL_FANOUT's layout without its duration, for longer.
    let mut args: Vec<String> = small_fanout::SMALL_FANOUT[..10]
        .iter()
        .map(|a| a.to_string())
        .collect();
    // The load generator itself says when it is 1 s into publishing: its --kill-cmd leaves a
    // file, and the test stops the gateway then. (Counting connections to the gateway could
    // not tell publishers from registrations kept alive, and stopped it while clients were
    // still connecting.)
    let publishing = dir.path().join("publishing");
    let kill_cmd = format!("touch '{}'", publishing.display());
    let late = [
        "--duration",
        "6",
        "--json",
        "--kill-after",
        "1",
        "--kill-cmd",
        kill_cmd.as_str(),
    ];
    args.extend(late.map(String::from));
    let run = loadgen(port, args);
    // Stopped in the middle of publishing, and not started again: the clients cannot come
    // back.
    let started = std::time::Instant::now();
    while !publishing.exists() {
        assert!(
            !run.is_finished(),
            "the load generator ended before publishing"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the load generator never got to publishing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
    let output = run.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert!(
        report["connections"]["not_connected_at_end"]
            .as_u64()
            .unwrap()
            > 0,
        "{}",
        report["connections"]
    );
}
