//! `chat-gateway`: parses settings, starts the application, drains on SIGTERM or Ctrl-C.

use chat_gateway::{Application, Settings, telemetry};
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::parse();
    telemetry::init_logs(settings.log_format);
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("chat-gateway: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(
        gateway = app.gateway_id(),
        port = app.port(),
        metrics_port = app.metrics_port(),
        "listening"
    );
    let shutdown = app.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
    });
    match app.run_until_stopped().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-gateway: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
