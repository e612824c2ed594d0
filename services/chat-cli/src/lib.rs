//! `chat`, the terminal client of the chat backend, as a library: the binary (`main.rs`) parses
//! the command line and calls into `commands`.
//!
//! - `session`: the stored `{server, user, token}` (`session.json`).
//! - `api`: the HTTP API (`/api/register`, `/api/login`, `/api/rooms`, `/api/rooms/{room}/messages`).
//! - `conn`: one WebSocket connection that reconnects and resumes by itself.
//! - `interactive`: the room view (`chat ROOM`).
//! - `format`: how messages are printed.

pub mod api;
pub mod commands;
pub mod conn;
pub mod error;
pub mod format;
pub mod interactive;
pub mod session;

pub use error::Failure;
