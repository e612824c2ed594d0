//! Bodies of the HTTP API (`/api/...`).

use crate::codes::ErrorCode;
use crate::frames::StoredMessage;
use crate::names::{RoomName, Username};
use serde::{Deserialize, Serialize};

/// `POST /api/register` and `POST /api/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Answer to a successful register or login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub token: String,
    pub user: Username,
}

/// One entry of `GET /api/rooms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomSummary {
    pub room: RoomName,
    pub last_seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomsResponse {
    pub rooms: Vec<RoomSummary>,
}

/// The query of `GET /api/rooms/{room}/messages`: `before` or `after` a seq, at most `limit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MessagesQuery {
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: Option<u32>,
}

/// `GET /api/rooms/{room}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessagesResponse {
    pub room: RoomName,
    pub messages: Vec<StoredMessage>,
    pub has_more: bool,
}

/// Every HTTP error body: `{"error":{"code","message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}
