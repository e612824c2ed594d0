//! An embedded gateway in the test's own process, and the load generator run against it as
//! a child process.

use std::process::Command;

/// Runs the load generator against the gateway on `port` (on a blocking thread, as it can
/// take a while).
pub fn loadgen(port: u16, args: Vec<String>) -> tokio::task::JoinHandle<std::process::Output> {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_chat-loadgen"))
            .args(["--url", &format!("http://127.0.0.1:{port}")])
            .args(args)
            .output()
            .unwrap()
    })
}

/// An in-process embedded gateway for one test, with the send limit raised for load.
pub async fn gateway(
    dir: &std::path::Path,
) -> (
    u16,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), chat_gateway::StartError>>,
) {
    let mut settings = chat_gateway::Settings::defaults();
    settings.bind = "127.0.0.1:0".parse().unwrap();
    settings.metrics_bind = "127.0.0.1:0".parse().unwrap();
    settings.data_dir = dir.to_path_buf();
    settings.rate_per_sec = 1000;
    settings.rate_burst = 1000;
    settings.grace_period_secs = 1;
    let app = chat_gateway::Application::build(settings).await.unwrap();
    let port = app.port();
    let shutdown = app.shutdown_token();
    (port, shutdown, tokio::spawn(app.run_until_stopped()))
}
