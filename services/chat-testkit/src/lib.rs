//! Test kit for the chat backend: starts REAL Redis and PostgreSQL servers
//! for integration tests, on free `127.0.0.1` ports, and stops them by PID.
//!
//! There are no mocks. Every failure to find a binary or start a server
//! panics with a message naming what is missing and how to install it, so a
//! test can never pass because a server was absent.
//!
//! - [`RedisServer`] / [`PostgresServer`]: one server owned by a test, killed on drop.
//! - [`shared_redis`] / [`shared_postgres`]: one server per test binary, started lazily.
//!   Give each test its own database with [`PostgresServer::create_database`].
//!
//! Every server child is spawned from one long-lived thread with
//! `PR_SET_PDEATHSIG = SIGKILL`, so no server outlives the test binary, even
//! the shared ones (Rust never drops statics). Linux only.

mod binaries;
mod port;
mod postgres;
mod process;
mod redis;
mod shared;
mod tempdir;

pub use port::free_port;
pub use postgres::PostgresServer;
/// Spawning any process tied to this one (it dies with it), and signalling it by PID.
pub use process::{send_signal, spawn as spawn_tied, stop_child};
pub use redis::RedisServer;
pub use shared::{shared_postgres, shared_redis};
