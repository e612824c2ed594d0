//! Settings: parsed once from flags or `CHAT_*` environment variables into typed values.
//!
//! Every limit the gateway enforces is here, with its default, so that `--help` is the
//! complete list of what an operator can tune.

use chat_protocol::names::MAX_BODY_CHARS;
use clap::{Parser, ValueEnum};
use secrecy::{ExposeSecret, SecretString};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The chat gateway: WebSocket chat with durable history and cluster-wide fan-out.
///
/// With CHAT_DATABASE_URL and CHAT_REDIS_URL set it runs clustered (Postgres history, Redis
/// Pub/Sub fan-out, any number of identical replicas). With neither, it runs embedded: SQLite
/// under CHAT_DATA_DIR and an in-process bus, a single node.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-gateway", version, about, long_about)]
pub struct Settings {
    /// Address of the public listener (WebSocket, HTTP API).
    #[arg(long, env = "CHAT_BIND", default_value = "0.0.0.0:8080")]
    pub bind: SocketAddr,

    /// Address of the Prometheus metrics listener (keep it off the public network).
    #[arg(long, env = "CHAT_METRICS_BIND", default_value = "0.0.0.0:9100")]
    pub metrics_bind: SocketAddr,

    /// Postgres URL (clustered mode), e.g. postgres://chat:secret@db:5432/chat.
    #[arg(long, env = "CHAT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretString>,

    /// Redis URL (clustered mode), e.g. redis://redis:6379/.
    #[arg(long, env = "CHAT_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<SecretString>,

    /// Secret that signs session tokens, at least 32 bytes, the same on every replica.
    /// Required when clustered; embedded mode generates one under the data dir.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<SecretString>,

    /// This replica's name in logs, metrics and `welcome` (defaults to the host name).
    #[arg(long, env = "CHAT_GATEWAY_ID")]
    pub gateway_id: Option<String>,

    /// Folder of the embedded mode's SQLite history and generated secret.
    #[arg(long, env = "CHAT_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Seconds a SIGTERM drain may take before the process exits.
    #[arg(long, env = "CHAT_GRACE_PERIOD_SECS", default_value_t = 10)]
    pub grace_period_secs: u64,

    /// Milliseconds between server pings; a client silent for 2.5 times this is disconnected.
    #[arg(long, env = "CHAT_HEARTBEAT_MS", default_value_t = 25_000)]
    pub heartbeat_ms: u64,

    /// Milliseconds a new socket has to send its `hello`.
    #[arg(long, env = "CHAT_HELLO_TIMEOUT_MS", default_value_t = 10_000)]
    pub hello_timeout_ms: u64,

    /// Messages (send and typing) a connection may send per second, on average.
    #[arg(long, env = "CHAT_RATE_PER_SEC", default_value_t = 10)]
    pub rate_per_sec: u32,

    /// Messages a connection may send in a burst above the average rate.
    #[arg(long, env = "CHAT_RATE_BURST", default_value_t = 20)]
    pub rate_burst: u32,

    /// Other frames (join, leave, history; ping is free) a connection may send per second.
    #[arg(long, env = "CHAT_FRAME_RATE_PER_SEC", default_value_t = 50)]
    pub frame_rate_per_sec: u32,

    /// Burst of other frames above their average rate.
    #[arg(long, env = "CHAT_FRAME_RATE_BURST", default_value_t = 100)]
    pub frame_rate_burst: u32,

    /// Largest WebSocket frame or message a client may send, in bytes (larger: close 1009).
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,

    /// Frames queued for one connection before it counts as a slow consumer and is disconnected.
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Replies (answers to a connection's own frames, backlog pages) queued for one connection;
    /// while it is full, the connection's next frame is not read.
    #[arg(long, env = "CHAT_REPLY_QUEUE", default_value_t = 256)]
    pub reply_queue: usize,

    /// Milliseconds a socket may go without accepting any of the frames queued for it before
    /// it is treated as dead (a client that keeps reading is never cut off, however long its
    /// backlog).
    #[arg(long, env = "CHAT_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,

    /// Kernel send buffer of each client socket, in bytes (SO_SNDBUF; Linux doubles it for its
    /// bookkeeping and caps it at net.core.wmem_max). With the outbound queue it bounds what a
    /// client that stops reading holds before it is closed as a slow consumer. 0: the kernel's
    /// autotuning, which lets each socket grow to net.ipv4.tcp_wmem's maximum (4 MiB by default).
    #[arg(long, env = "CHAT_SOCKET_SEND_BUFFER_BYTES", default_value_t = 131_072)]
    pub socket_send_buffer_bytes: u32,

    /// Events queued for one room's task on this replica; past this, the room drops them and
    /// reads the store instead.
    #[arg(long, env = "CHAT_ROOM_QUEUE", default_value_t = 4096)]
    pub room_queue: usize,

    /// Largest HTTP API request body (register, login), in bytes (larger: 413).
    #[arg(long, env = "CHAT_API_BODY_LIMIT_BYTES", default_value_t = 16 * 1024)]
    pub api_body_limit_bytes: usize,

    /// Rooms `GET /api/rooms` lists at most.
    #[arg(long, env = "CHAT_ROOMS_LIST_LIMIT", default_value_t = 500)]
    pub rooms_list_limit: u32,

    /// Milliseconds `/readyz` waits for the history store to answer before reporting 503.
    #[arg(long, env = "CHAT_READY_TIMEOUT_MS", default_value_t = 2_000)]
    pub ready_timeout_ms: u64,

    /// Rooms one connection may be joined to at once.
    #[arg(long, env = "CHAT_MAX_ROOMS_PER_CONNECTION", default_value_t = 100)]
    pub max_rooms_per_connection: usize,

    /// Open WebSocket connections this replica accepts; further upgrades get 503.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", default_value_t = 18_000)]
    pub max_connections: usize,

    /// Deadline of every Postgres/SQLite call, in milliseconds (then: `unavailable`).
    #[arg(long, env = "CHAT_STORE_TIMEOUT_MS", default_value_t = 5_000)]
    pub store_timeout_ms: u64,

    /// Deadline of every Redis call, in milliseconds.
    #[arg(long, env = "CHAT_REDIS_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_timeout_ms: u64,

    /// Postgres connections in this replica's pool.
    #[arg(long, env = "CHAT_DB_POOL_SIZE", default_value_t = 32)]
    pub db_pool_size: usize,

    /// Most messages committed in one Postgres transaction. Messages sent while earlier commits
    /// are in flight are gathered and committed together (group commit).
    #[arg(long, env = "CHAT_DB_COMMIT_BATCH", default_value_t = 256)]
    pub db_commit_batch: usize,

    /// Postgres transactions committing messages at once, each on a pooled connection; must be
    /// smaller than CHAT_DB_POOL_SIZE so that history reads always find a connection.
    #[arg(long, env = "CHAT_DB_COMMITS_IN_FLIGHT", default_value_t = 2)]
    pub db_commits_in_flight: usize,

    /// Room events queued for Redis on this replica (sent as pipelines by one task). When it is
    /// full for CHAT_REDIS_TIMEOUT_MS, a publish fails and is retried later; receivers fill any
    /// gap from the store.
    #[arg(long, env = "CHAT_PUBLISH_QUEUE", default_value_t = 4096)]
    pub publish_queue: usize,

    /// Milliseconds between the Pub/Sub self-probes that detect a silently dead subscription.
    #[arg(long, env = "CHAT_PROBE_INTERVAL_MS", default_value_t = 2_000)]
    pub probe_interval_ms: u64,

    /// Seconds after its last heartbeat that a vanished replica's users are reported offline.
    #[arg(long, env = "CHAT_PRESENCE_TIMEOUT_SECS", default_value_t = 20)]
    pub presence_timeout_secs: u64,

    /// Password hashes (register, login) computed at once; more wait. Each takes one core for
    /// tens of milliseconds, so this bounds what a flood of logins can take from chat.
    #[arg(long, env = "CHAT_HASH_CONCURRENCY", default_value_t = 2)]
    pub hash_concurrency: usize,

    /// Hours a session token stays valid.
    #[arg(long, env = "CHAT_TOKEN_TTL_HOURS", default_value_t = 24 * 7)]
    pub token_ttl_hours: u64,

    /// Log format.
    #[arg(long, env = "CHAT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The smallest frame limit that admits every valid message: a body of `MAX_BODY_CHARS`
/// characters, each up to 12 bytes as JSON (a character outside the BMP written as two
/// `\uXXXX` escapes), and 1 KiB for the rest of the frame (room, client id, ref).
pub const MIN_FRAME_BYTES: usize = MAX_BODY_CHARS * 12 + 1024;

/// The smallest socket send buffer accepted: below it Linux would silently round up anyway.
pub const MIN_SOCKET_SEND_BUFFER_BYTES: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where history lives and how gateways talk: decided by which URLs are set.
#[derive(Debug, Clone)]
pub enum Mode {
    Embedded {
        data_dir: PathBuf,
    },
    Clustered {
        database_url: SecretString,
        redis_url: SecretString,
    },
}

/// A setting that stops start-up, with the one line that says which and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

/// The shortest accepted JWT secret, in bytes.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

impl Settings {
    /// Settings for tests and embedding: every default, nothing read from the environment.
    pub fn defaults() -> Self {
        Settings::parse_from(["chat-gateway"])
    }

    /// Checks the combination of settings and decides the mode.
    pub fn mode(&self) -> Result<Mode, SettingsError> {
        let err = |s: &str| Err(SettingsError(s.to_string()));
        match (&self.database_url, &self.redis_url) {
            (None, None) => Ok(Mode::Embedded {
                data_dir: self.data_dir.clone(),
            }),
            (Some(_), None) => err(
                "CHAT_DATABASE_URL is set but CHAT_REDIS_URL is not: clustered mode needs both (set neither for embedded mode)",
            ),
            (None, Some(_)) => err(
                "CHAT_REDIS_URL is set but CHAT_DATABASE_URL is not: clustered mode needs both (set neither for embedded mode)",
            ),
            (Some(db), Some(redis)) => {
                let db_str = db.expose_secret();
                if !(db_str.starts_with("postgres://") || db_str.starts_with("postgresql://")) {
                    return err("CHAT_DATABASE_URL must start with postgres:// or postgresql://");
                }
                let redis_str = redis.expose_secret();
                if redis_str.starts_with("rediss://") {
                    return err(
                        "CHAT_REDIS_URL: rediss:// (TLS) is not supported, because this build has no TLS; use redis:// on a private network",
                    );
                }
                if !redis_str.starts_with("redis://") {
                    return err("CHAT_REDIS_URL must start with redis://");
                }
                if self.jwt_secret.is_none() {
                    return err(
                        "CHAT_JWT_SECRET is required in clustered mode (at least 32 bytes, the same on every replica)",
                    );
                }
                Ok(Mode::Clustered {
                    database_url: db.clone(),
                    redis_url: redis.clone(),
                })
            }
        }
    }

    /// Checks every value whose type alone does not say it is sensible.
    pub fn validate(&self) -> Result<Mode, SettingsError> {
        let err = |s: String| Err(SettingsError(s));
        if let Some(secret) = &self.jwt_secret {
            let len = secret.expose_secret().len();
            if len < MIN_JWT_SECRET_BYTES {
                return err(format!(
                    "CHAT_JWT_SECRET is {len} bytes: it must be at least {MIN_JWT_SECRET_BYTES}"
                ));
            }
        }
        let positive = [
            ("CHAT_GRACE_PERIOD_SECS", self.grace_period_secs),
            ("CHAT_HEARTBEAT_MS", self.heartbeat_ms),
            ("CHAT_HELLO_TIMEOUT_MS", self.hello_timeout_ms),
            ("CHAT_RATE_PER_SEC", u64::from(self.rate_per_sec)),
            ("CHAT_RATE_BURST", u64::from(self.rate_burst)),
            (
                "CHAT_FRAME_RATE_PER_SEC",
                u64::from(self.frame_rate_per_sec),
            ),
            ("CHAT_FRAME_RATE_BURST", u64::from(self.frame_rate_burst)),
            ("CHAT_MAX_FRAME_BYTES", self.max_frame_bytes as u64),
            ("CHAT_OUTBOUND_QUEUE", self.outbound_queue as u64),
            ("CHAT_REPLY_QUEUE", self.reply_queue as u64),
            ("CHAT_WRITE_TIMEOUT_MS", self.write_timeout_ms),
            ("CHAT_ROOM_QUEUE", self.room_queue as u64),
            (
                "CHAT_API_BODY_LIMIT_BYTES",
                self.api_body_limit_bytes as u64,
            ),
            ("CHAT_ROOMS_LIST_LIMIT", u64::from(self.rooms_list_limit)),
            ("CHAT_READY_TIMEOUT_MS", self.ready_timeout_ms),
            (
                "CHAT_MAX_ROOMS_PER_CONNECTION",
                self.max_rooms_per_connection as u64,
            ),
            ("CHAT_MAX_CONNECTIONS", self.max_connections as u64),
            ("CHAT_STORE_TIMEOUT_MS", self.store_timeout_ms),
            ("CHAT_REDIS_TIMEOUT_MS", self.redis_timeout_ms),
            ("CHAT_DB_POOL_SIZE", self.db_pool_size as u64),
            ("CHAT_DB_COMMIT_BATCH", self.db_commit_batch as u64),
            (
                "CHAT_DB_COMMITS_IN_FLIGHT",
                self.db_commits_in_flight as u64,
            ),
            ("CHAT_PUBLISH_QUEUE", self.publish_queue as u64),
            ("CHAT_PROBE_INTERVAL_MS", self.probe_interval_ms),
            ("CHAT_PRESENCE_TIMEOUT_SECS", self.presence_timeout_secs),
            ("CHAT_TOKEN_TTL_HOURS", self.token_ttl_hours),
            ("CHAT_HASH_CONCURRENCY", self.hash_concurrency as u64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return err(format!("{name} must be greater than 0"));
        }
        if self.db_commits_in_flight >= self.db_pool_size {
            return err(format!(
                "CHAT_DB_COMMITS_IN_FLIGHT ({}) must be smaller than CHAT_DB_POOL_SIZE ({}): history reads need connections too",
                self.db_commits_in_flight, self.db_pool_size
            ));
        }
        if self.max_frame_bytes < MIN_FRAME_BYTES {
            return err(format!(
                "CHAT_MAX_FRAME_BYTES must be at least {MIN_FRAME_BYTES}: a send frame with a {MAX_BODY_CHARS}-character body must fit however its client encodes it"
            ));
        }
        if self.socket_send_buffer_bytes != 0
            && self.socket_send_buffer_bytes < MIN_SOCKET_SEND_BUFFER_BYTES
        {
            return err(format!(
                "CHAT_SOCKET_SEND_BUFFER_BYTES must be 0 (the kernel's autotuning) or at least {MIN_SOCKET_SEND_BUFFER_BYTES}"
            ));
        }
        if let Some(id) = &self.gateway_id {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !ok {
                return err(format!(
                    "CHAT_GATEWAY_ID {id:?} must be 1 to 64 characters of letters, digits, '-', '_' and '.'"
                ));
            }
        }
        self.mode()
    }

    /// This replica's id: the configured one, else the host name.
    pub fn resolved_gateway_id(&self) -> String {
        if let Some(id) = &self.gateway_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(64)
            .collect();
        if host.is_empty() {
            "gateway".to_string()
        } else {
            host
        }
    }

    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
    pub fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_millis(self.ready_timeout_ms)
    }
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
    pub fn probe_interval(&self) -> Duration {
        Duration::from_millis(self.probe_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Settings {
        let mut all = vec!["chat-gateway"];
        all.extend_from_slice(args);
        Settings::try_parse_from(all).expect("flags parse")
    }

    #[test]
    fn no_urls_means_embedded() {
        assert!(matches!(parse(&[]).validate(), Ok(Mode::Embedded { .. })));
    }

    #[test]
    fn clustered_needs_both_urls_and_a_long_secret() {
        let e = parse(&["--database-url", "postgres://x/y"])
            .validate()
            .unwrap_err();
        assert!(e.0.contains("CHAT_REDIS_URL"), "{e}");
        let e = parse(&[
            "--database-url",
            "postgres://x/y",
            "--redis-url",
            "redis://r/",
        ])
        .validate()
        .unwrap_err();
        assert!(e.0.contains("CHAT_JWT_SECRET is required"), "{e}");
        let e = parse(&[
            "--database-url",
            "postgres://x/y",
            "--redis-url",
            "redis://r/",
            "--jwt-secret",
            "short",
        ])
        .validate()
        .unwrap_err();
        assert!(e.0.contains("at least 32"), "{e}");
        let secret = "s".repeat(32);
        let ok = parse(&[
            "--database-url",
            "postgres://x/y",
            "--redis-url",
            "redis://r/",
            "--jwt-secret",
            &secret,
        ])
        .validate();
        assert!(matches!(ok, Ok(Mode::Clustered { .. })));
        let e = parse(&[
            "--database-url",
            "mysql://x/y",
            "--redis-url",
            "redis://r/",
            "--jwt-secret",
            &secret,
        ])
        .validate()
        .unwrap_err();
        assert!(e.0.contains("CHAT_DATABASE_URL must start"), "{e}");
        let e = parse(&[
            "--database-url",
            "postgres://x/y",
            "--redis-url",
            "rediss://r/",
            "--jwt-secret",
            &secret,
        ])
        .validate()
        .unwrap_err();
        assert!(e.0.contains("rediss:// (TLS) is not supported"), "{e}");
    }

    #[test]
    fn zero_limits_and_bad_ids_are_refused() {
        let e = parse(&["--outbound-queue", "0"]).validate().unwrap_err();
        assert!(e.0.contains("CHAT_OUTBOUND_QUEUE"), "{e}");
        // The frame limit's edge: the longest body, escaped character by character, fits.
        let edge = MIN_FRAME_BYTES.to_string();
        assert!(parse(&["--max-frame-bytes", &edge]).validate().is_ok());
        let below = (MIN_FRAME_BYTES - 1).to_string();
        let e = parse(&["--max-frame-bytes", &below])
            .validate()
            .unwrap_err();
        assert!(e.0.contains("CHAT_MAX_FRAME_BYTES"), "{e}");
        let longest = serde_json::json!({
            "type": "send",
            "room": "r".repeat(64),
            "body": "\u{1F600}".repeat(MAX_BODY_CHARS),
            "client_id": "c".repeat(64),
            "ref": u64::MAX,
        })
        .to_string()
        .replace('\u{1F600}', "\\ud83d\\ude00");
        assert!(longest.len() <= MIN_FRAME_BYTES, "{} bytes", longest.len());
        // The socket send buffer: 0 (autotuning) or at least the edge.
        for ok in ["0", &MIN_SOCKET_SEND_BUFFER_BYTES.to_string()] {
            let settings = parse(&["--socket-send-buffer-bytes", ok]);
            assert!(settings.validate().is_ok(), "{ok}");
        }
        let below = (MIN_SOCKET_SEND_BUFFER_BYTES - 1).to_string();
        let e = parse(&["--socket-send-buffer-bytes", &below])
            .validate()
            .unwrap_err();
        assert!(e.0.contains("CHAT_SOCKET_SEND_BUFFER_BYTES"), "{e}");
        let e = parse(&["--gateway-id", "a b"]).validate().unwrap_err();
        assert!(e.0.contains("CHAT_GATEWAY_ID"), "{e}");
    }
}
