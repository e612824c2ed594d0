//! The one error type of the client: a protocol error code (or a local one) and a message.

use chat_protocol::ErrorCode;
use std::fmt;

/// Why a command failed. `code` is the server's error code (`forbidden`, `too_large`, ...) or one
/// of the client's own: `not_logged_in`, `timeout`, `unavailable` (cannot reach the gateway),
/// `bad_request` (refused before sending), `io`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

impl Failure {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Failure {
            code: code.into(),
            message: message.into(),
        }
    }

    /// An error the server reported.
    pub fn server(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure::new(code.as_str(), message)
    }

    pub fn not_logged_in() -> Self {
        Failure::new(
            "not_logged_in",
            "not logged in: run `chat login USERNAME` (or `chat register USERNAME`)",
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Failure {}

impl From<chat_protocol::NameError> for Failure {
    fn from(e: chat_protocol::NameError) -> Self {
        match e {
            chat_protocol::NameError::Invalid(m) => Failure::server(ErrorCode::BadRequest, m),
            chat_protocol::NameError::TooLarge(m) => Failure::server(ErrorCode::TooLarge, m),
        }
    }
}
