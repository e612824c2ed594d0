//! `chat-gateway`: parses settings, starts the application, drains on SIGTERM or Ctrl-C.

use chat_gateway::{Application, Settings, telemetry};
use clap::Parser;

fn main() -> std::process::ExitCode {
    return_large_allocations_to_the_system();
    let settings = Settings::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("chat-gateway: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(settings))
}

/// Large allocations (argon2 takes 19 MiB per password hash) go straight to mmap and back
/// to the system when freed. Otherwise glibc raises its mmap threshold after the first such
/// free and serves them from heaps it rarely shrinks: a gateway that had checked a few
/// passwords sat at 160 MiB of resident memory instead of 10.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_large_allocations_to_the_system() {
    // SAFETY: mallopt only sets an allocator tunable; it runs first thing, on one thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_allocations_to_the_system() {}

async fn serve(settings: Settings) -> std::process::ExitCode {
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
