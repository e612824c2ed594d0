//! The chat gateway as a library: `Application::build(settings)` then `run_until_stopped()`.
//! The binary is a thin `main` over this; tests start gateways in-process the same way.

pub mod app;
pub mod auth;
pub mod bus;
pub mod clock;
pub mod config;
pub mod context;
pub mod error;
pub mod http;
pub mod hub;
pub mod presence;
pub mod queue;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod web;
pub mod ws;

pub use app::{Application, StartError};
pub use config::Settings;
