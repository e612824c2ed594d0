//! One Redis and one PostgreSQL server shared by every test of a test binary,
//! started lazily on first use.
//!
//! Statics are never dropped, so these servers are not stopped by `Drop`:
//! they die with the test binary through `PR_SET_PDEATHSIG` (see
//! `process.rs`), and their temp dirs are removed by the next test binary.
//! Tests must not stop them; give each test its own database with
//! [`PostgresServer::create_database`] and its own key prefix in Redis.

use std::sync::OnceLock;

use crate::{PostgresServer, RedisServer};

/// The test binary's shared Redis server, started on first call.
pub fn shared_redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(RedisServer::start)
}

/// The test binary's shared PostgreSQL server, started on first call.
pub fn shared_postgres() -> &'static PostgresServer {
    static POSTGRES: OnceLock<PostgresServer> = OnceLock::new();
    POSTGRES.get_or_init(PostgresServer::start)
}
