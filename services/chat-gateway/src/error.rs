//! The one place where module errors become protocol error codes (WebSocket) and HTTP
//! responses.

use crate::auth::AuthError;
use crate::bus::BusError;
use crate::hub::RoomUnavailable;
use crate::store::StoreError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chat_protocol::ErrorCode;
use chat_protocol::api::{ErrorBody, ErrorResponse};

/// A failed request: its protocol code and a message for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Failure::new(
                ErrorCode::Unavailable,
                "history store unavailable, retry later",
            ),
            StoreError::UsernameTaken => Failure::new(ErrorCode::UsernameTaken, e.to_string()),
            StoreError::NotFound(what) => Failure::new(ErrorCode::NotFound, what),
            StoreError::Internal(detail) => {
                tracing::error!(%detail, "store error");
                Failure::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

impl From<BusError> for Failure {
    fn from(_: BusError) -> Self {
        Failure::new(
            ErrorCode::Unavailable,
            "message bus unavailable, retry later",
        )
    }
}

impl From<RoomUnavailable> for Failure {
    fn from(e: RoomUnavailable) -> Self {
        Failure::new(ErrorCode::Unavailable, e.to_string())
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::BadCredentials | AuthError::BadToken => {
                Failure::new(ErrorCode::Unauthorized, e.to_string())
            }
            AuthError::UsernameTaken => Failure::new(ErrorCode::UsernameTaken, e.to_string()),
            AuthError::Store(e) => e.into(),
            AuthError::Hashing(detail) => {
                tracing::error!(%detail, "password hashing failed");
                Failure::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotJoined => StatusCode::CONFLICT,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::UsernameTaken => StatusCode::CONFLICT,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        metrics::counter!("chat_http_errors_total", "code" => self.code.as_str()).increment(1);
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.code,
                message: self.message,
            },
        };
        (status(self.code), Json(body)).into_response()
    }
}
