//! `chat-gateway`: parses settings, starts the application, drains on SIGTERM or Ctrl-C.

use chat_gateway::{Application, Settings, telemetry};
use clap::Parser;

/// mimalloc rather than glibc's malloc: under load glibc's arena locks and chunk consolidation
/// took about a fifth of the gateway's CPU (measured with perf in the durable benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    return_freed_memory_to_the_system();
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

/// Freed memory goes back to the system at once. mimalloc otherwise returns it after a delay,
/// but only when the thread that freed it allocates again: argon2 takes 19 MiB per password
/// hash on a blocking thread that then sits idle, and a gateway that had registered 16 users
/// stayed at 82 MiB of resident memory instead of 20. Measured cost on the hot path: within
/// run-to-run noise (about 3 % of the gateway's CPU at most, in the fanout benchmark).
#[allow(unsafe_code)]
fn return_freed_memory_to_the_system() {
    /// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h`; libmimalloc-sys names no
    /// constant for it.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an allocator tunable by its index; mimalloc validates the index.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

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
