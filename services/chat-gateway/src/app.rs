//! Start-up and shutdown: builds the store, the bus and the hub from the settings, binds the
//! listeners, and runs until told to stop; then drains (the one place shutdown is wired).

use crate::auth::Auth;
use crate::bus::local::LocalBus;
use crate::bus::redis::{RedisBus, RedisBusConfig};
use crate::bus::{Bus, BusListener};
use crate::config::{Mode, Settings, SettingsError};
use crate::context::{Context, SessionRegistry, SharedContext};
use crate::hub::Hub;
use crate::store::group_commit::CommitLimits;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use crate::{http, telemetry, web, ws};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long start-up waits for the database before giving up.
const STARTUP_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("history store: {0}")]
    Store(#[from] StoreError),
    #[error("message bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("JWT secret: {0}")]
    Secret(std::io::Error),
    #[error("server: {0}")]
    Serve(std::io::Error),
}

pub struct Application {
    ctx: SharedContext,
    listener: TcpListener,
    metrics_listener: TcpListener,
    metrics: telemetry::Exporter,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let mode = settings.validate()?;
        let gateway = settings.resolved_gateway_id();
        let metrics = telemetry::Exporter::new();
        let (store, bus, secret): (Arc<dyn Store>, Arc<dyn Bus>, SecretString) = match &mode {
            Mode::Embedded { data_dir } => {
                let store = SqliteStore::open(data_dir, settings.store_timeout())?;
                let secret = match &settings.jwt_secret {
                    Some(secret) => secret.clone(),
                    None => Auth::load_or_create_secret(data_dir).map_err(StartError::Secret)?,
                };
                (Arc::new(store), Arc::new(LocalBus::new()), secret)
            }
            Mode::Clustered {
                database_url,
                redis_url,
            } => {
                let store = connect_postgres(&settings, database_url).await?;
                let bus = RedisBus::new(
                    redis_url.expose_secret(),
                    RedisBusConfig {
                        gateway: gateway.clone(),
                        timeout: settings.redis_timeout(),
                        publish_queue: settings.publish_queue,
                        probe_interval: settings.probe_interval(),
                        presence_timeout: Duration::from_secs(settings.presence_timeout_secs),
                    },
                )?;
                let secret = settings.jwt_secret.clone().ok_or_else(|| {
                    SettingsError("CHAT_JWT_SECRET is required in clustered mode".into())
                })?;
                (Arc::new(store), Arc::new(bus), secret)
            }
        };
        // The store opened (and migrated), so it answered: ready until a readiness check or
        // the drain says otherwise.
        metrics::gauge!("chat_ready").set(1.0);
        let tasks = TaskTracker::new();
        let hub = Hub::new(
            gateway.clone(),
            store.clone(),
            bus.clone(),
            settings.room_queue,
            settings.store_timeout(),
            tasks.clone(),
        );
        let auth = Auth::new(
            &secret,
            Duration::from_secs(settings.token_ttl_hours * 3600),
            settings.hash_concurrency,
        );
        let listener = bind(settings.bind, settings.socket_send_buffer_bytes)?;
        let metrics_listener = bind(settings.metrics_bind, 0)?;
        let ctx = Arc::new(Context {
            settings,
            gateway,
            store,
            bus: bus.clone(),
            hub: hub.clone(),
            auth,
            draining: CancellationToken::new(),
            sessions: Arc::new(SessionRegistry::default()),
            tasks,
        });
        bus.start(Arc::new(hub) as Arc<dyn BusListener>).await;
        telemetry::register_series(&ctx.gateway);
        tracing::info!(
            gateway = %ctx.gateway,
            mode = match mode { Mode::Embedded { .. } => "embedded", Mode::Clustered { .. } => "clustered" },
            "gateway ready"
        );
        Ok(Application {
            ctx,
            listener,
            metrics_listener,
            metrics,
            shutdown: CancellationToken::new(),
        })
    }

    /// The public port (useful with port 0 in tests).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(0)
    }

    pub fn gateway_id(&self) -> &str {
        &self.ctx.gateway
    }

    /// Cancelling this token starts the drain (what SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    fn router(ctx: SharedContext) -> Router {
        Router::new()
            .route("/ws", get(ws::upgrade))
            .route("/api/register", post(http::register))
            .route("/api/login", post(http::login))
            .route("/api/rooms", get(http::rooms))
            .route("/api/rooms/{room}/messages", get(http::messages))
            .route("/healthz", get(http::healthz))
            .route("/readyz", get(http::readyz))
            .fallback(web::asset)
            .method_not_allowed_fallback(http::method_not_allowed)
            .layer(DefaultBodyLimit::max(ctx.settings.api_body_limit_bytes))
            .with_state(ctx)
    }

    /// Serves until the shutdown token is cancelled, then drains and returns.
    pub async fn run_until_stopped(self) -> Result<(), StartError> {
        let Application {
            ctx,
            listener,
            metrics_listener,
            metrics,
            shutdown,
        } = self;
        let stopped = CancellationToken::new();
        let public = {
            let stopped = stopped.clone();
            let app = Self::router(ctx.clone());
            // Chat frames are small and latency-bound: never let Nagle hold one back.
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
            });
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped.cancelled_owned())
                    .await
            })
        };
        let metrics_server = {
            let stopped = stopped.clone();
            let store = ctx.store.clone();
            let app = Router::new().route(
                "/metrics",
                get(move || {
                    let (metrics, store) = (metrics.clone(), store.clone());
                    async move { metrics.render(store.as_ref()) }
                }),
            );
            tokio::spawn(async move {
                axum::serve(metrics_listener, app)
                    .with_graceful_shutdown(stopped.cancelled_owned())
                    .await
            })
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            result = wait_server(public) => {
                ctx.bus.stop();
                return result;
            }
        }
        drain(&ctx).await;
        stopped.cancel();
        let _ = metrics_server.await;
        ctx.bus.stop();
        Ok(())
    }
}

async fn wait_server(
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<(), StartError> {
    match handle.await {
        Ok(result) => result.map_err(StartError::Serve),
        Err(e) => Err(StartError::Serve(std::io::Error::other(e))),
    }
}

/// SIGTERM: stop being ready, refuse new sockets, withdraw presence, close the open sockets
/// with 1012 in batches over half the grace period, and wait for the sessions to end.
async fn drain(ctx: &SharedContext) {
    let started = Instant::now();
    let grace = ctx.settings.grace_period();
    ctx.draining.cancel();
    metrics::gauge!("chat_draining").set(1.0);
    metrics::gauge!("chat_ready").set(0.0);
    tracing::info!(open = ctx.sessions.open(), "draining");
    if let Err(e) = ctx.bus.withdraw_presence().await {
        tracing::warn!(error = %e, "could not withdraw presence; it expires by heartbeat");
    }
    let closers = ctx.sessions.closers();
    if !closers.is_empty() {
        let spread = grace / 2;
        let step = Duration::from_millis(100);
        let batches = ((spread.as_millis() / step.as_millis()).max(1) as usize).min(closers.len());
        let per_batch = closers.len().div_ceil(batches);
        for batch in closers.chunks(per_batch) {
            for closer in batch {
                closer.cancel();
            }
            tokio::time::sleep(step).await;
        }
    }
    ctx.tasks.close();
    let left = grace.saturating_sub(started.elapsed());
    if tokio::time::timeout(left, ctx.tasks.wait()).await.is_err() {
        tracing::warn!("grace period over with sessions still open; exiting");
    }
    tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
}

/// Pending connections the kernel holds for `accept` (a reconnect storm arrives at once).
const ACCEPT_BACKLOG: u32 = 1024;

/// Binds a listener. A `send_buffer` of more than 0 bytes fixes the kernel send buffer of
/// every socket it accepts (they inherit it from the listener, before the handshake), which
/// also ends the kernel's autotuning for them; 0 leaves both to the kernel.
fn bind(addr: std::net::SocketAddr, send_buffer: u32) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    if send_buffer > 0 {
        socket.set_send_buffer_size(send_buffer).map_err(err)?;
        // Linux doubles the request for its bookkeeping and caps it at net.core.wmem_max.
        let granted = socket.send_buffer_size().map_err(err)?;
        if granted < send_buffer.saturating_mul(2) {
            tracing::warn!(
                requested = send_buffer,
                granted,
                "CHAT_SOCKET_SEND_BUFFER_BYTES is above what the kernel allows (net.core.wmem_max); sockets get the kernel's maximum"
            );
        }
    }
    socket.bind(addr).map_err(err)?;
    socket.listen(ACCEPT_BACKLOG).map_err(err)
}

/// Postgres may still be starting (compose, Kubernetes): retry for a while, then give up.
async fn connect_postgres(
    settings: &Settings,
    url: &SecretString,
) -> Result<PostgresStore, StoreError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let commits = CommitLimits {
            max_batch: settings.db_commit_batch,
            in_flight: settings.db_commits_in_flight,
        };
        match PostgresStore::connect(
            url,
            settings.db_pool_size,
            commits,
            settings.store_timeout(),
        )
        .await
        {
            Ok(store) => return Ok(store),
            Err(StoreError::Unavailable(e)) if started.elapsed() < STARTUP_WAIT => {
                tracing::warn!(error = %e, "postgres not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}
