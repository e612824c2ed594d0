//! Integration tests of the gateway over real services: SQLite (embedded), and Postgres + Redis
//! started by chat-testkit (clustered). The contract tests run against both modes.

mod cluster;
mod contract;
mod fleet;
mod helpers;
mod proxy;
mod store;
