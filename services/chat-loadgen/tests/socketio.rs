//! The load generator against Socket.IO with its Redis adapter (`bench/socketio/server.js`, a
//! real Node process on a real Redis), as `scripts/bench` runs it for the comparison table:
//! it connects, joins, publishes, gets its acks and counts every delivery.

mod common;
mod small_fanout;

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
        .args(small_fanout::SMALL_FANOUT)
        .args(["--json", "--quiet", "--pid", &server.id().to_string()])
        .output()
        .unwrap();
    let status = chat_testkit::stop_child(&mut server, libc::SIGTERM, Duration::from_secs(5));
    let report = common::report(&output);
    assert_eq!(report["plan"]["protocol"], "socketio");
    small_fanout::assert_every_message_delivered(&report);
    assert_eq!(report["send_errors"], 0, "{report}");
    assert!(
        report["gateway"]["cpu_seconds"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        status.success(),
        "Socket.IO did not stop cleanly: {status:?}"
    );
}
