//! The load generator against Socket.IO with its Redis adapter (`bench/socketio/server.js`, a
//! real Node process on a real Redis), as `scripts/bench` runs it for the comparison table:
//! it connects, joins, publishes, gets its acks and counts every delivery.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_short_fanout_run_against_socketio_delivers_everything() {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/socketio");
    assert!(
        bench.join("node_modules/socket.io").is_dir(),
        "Socket.IO is not installed in {}: run `npm ci` there (scripts/test does; it needs \
         the Debian packages nodejs and npm)",
        bench.display()
    );
    let redis = chat_testkit::RedisServer::start();
    let port = chat_testkit::free_port();
    let mut node = Command::new("node");
    node.arg(bench.join("server.js"))
        .env("PORT", port.to_string())
        .env("REDIS_URL", redis.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut server = chat_testkit::spawn_tied(node)
        .unwrap_or_else(|e| panic!("cannot start node (Debian package nodejs): {e}"));
    // The server prints one line once it listens.
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("listening"),
        "Socket.IO did not start: {line:?}"
    );

    let output = Command::new(env!("CARGO_BIN_EXE_chat-loadgen"))
        .args(["--protocol", "socketio"])
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(["--scenario", "fanout", "--clients", "40", "--rooms", "2"])
        .args(["--publishers", "2", "--rate", "20", "--duration", "2"])
        .args(["--json", "--quiet", "--pid", &server.id().to_string()])
        .output()
        .unwrap();
    let status = chat_testkit::stop_child(&mut server, libc::SIGTERM, Duration::from_secs(5));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["plan"]["protocol"], "socketio");
    assert_eq!(report["connections"]["made"], 42);
    assert_eq!(report["connections"]["failed"], 0);
    let acked = report["messages_acked"].as_u64().unwrap();
    assert!(acked >= 20, "{report}");
    assert_eq!(report["send_errors"], 0, "{report}");
    // 40 receivers + 2 publishers over 2 rooms: each message reaches 21 sockets.
    assert_eq!(
        report["deliveries"]["expected"].as_u64().unwrap(),
        acked * 21
    );
    assert_eq!(report["deliveries"]["ratio"], 1.0);
    assert_eq!(report["deliveries"]["duplicates"], 0);
    assert!(
        report["gateway"]["cpu_seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        status.success(),
        "Socket.IO did not stop cleanly: {status:?}"
    );
}
