//! Durable state: users, rooms and the per-room message log with its gapless `seq`.
//!
//! `Store` is the one interface the rest of the gateway uses; `postgres` (clustered) and
//! `sqlite` (embedded) each implement it once. Only this module talks to a database.

pub mod group_commit;
mod migrations;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chat_protocol::api::RoomSummary;
use chat_protocol::{ClientId, MessageBody, RoomName, StoredMessage, Username};
use std::future::Future;
use std::time::Duration;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, overloaded or did not answer before the deadline.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    #[error("username is taken")]
    UsernameTaken,
    #[error("{0}")]
    NotFound(&'static str),
    #[error("history store error: {0}")]
    Internal(String),
}

/// A message to commit.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room: RoomName,
    pub from: Username,
    pub body: MessageBody,
    pub client_id: Option<ClientId>,
}

/// The outcome of `append`: the committed message, and whether it had been committed before
/// (an idempotent resend, which stored nothing new).
#[derive(Debug, Clone)]
pub struct Committed {
    pub message: StoredMessage,
    pub duplicate: bool,
}

/// A page of history in ascending order.
#[derive(Debug, Clone)]
pub struct Page {
    pub messages: Vec<StoredMessage>,
    pub has_more: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a user; `UsernameTaken` when the name exists.
    async fn create_user(&self, user: &Username, password_hash: &str) -> Result<(), StoreError>;
    /// The stored password hash of a user, if the user exists.
    async fn password_hash(&self, user: &Username) -> Result<Option<String>, StoreError>;
    /// Creates the room if needed and returns its last seq. A direct room needs both users to
    /// exist (`NotFound` otherwise).
    async fn ensure_room(&self, room: &RoomName) -> Result<u64, StoreError>;
    /// The last seq of a room, `None` if it does not exist.
    async fn last_seq(&self, room: &RoomName) -> Result<Option<u64>, StoreError>;
    /// Commits a message with the next seq of its room. The same (from, room, client_id)
    /// committed before returns that message with `duplicate: true` and stores nothing.
    async fn append(&self, message: &NewMessage) -> Result<Committed, StoreError>;
    /// Messages with seq > `after`, ascending, at most `limit`.
    async fn messages_after(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Page, StoreError>;
    /// Messages with seq < `before` (or the newest), returned ascending, at most `limit`.
    async fn messages_before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Page, StoreError>;
    /// The rooms a user can see: public rooms and the user's own direct rooms.
    async fn rooms_for(&self, user: &Username, limit: u32) -> Result<Vec<RoomSummary>, StoreError>;
    /// Answers when the store is usable, within `deadline` (the readiness probe's, shorter than
    /// a session's call: the call is counted like any other, so a hung database shows in the
    /// store metrics even on a replica with no traffic).
    async fn ping(&self, deadline: Duration) -> Result<(), StoreError>;
    /// Sets the connection-pool gauges (called when metrics are scraped).
    fn record_pool_metrics(&self) {}
}

/// Runs a store call under the configured deadline, so a hung database cannot freeze a session.
pub(crate) async fn with_deadline<T>(
    deadline: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = std::time::Instant::now();
    let outcome = match tokio::time::timeout(deadline, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {} ms",
            deadline.as_millis()
        ))),
    };
    crate::telemetry::hot::STORE_QUERY_SECONDS.record(started.elapsed());
    // Only the store's own failures: a taken name or an unknown user is the client's mistake,
    // and must not feed the alerts that page an operator.
    if matches!(
        outcome,
        Err(StoreError::Unavailable(_) | StoreError::Internal(_))
    ) {
        metrics::counter!("chat_store_errors_total").increment(1);
    }
    outcome
}

/// Parses names read back from the database; a row that fails was not written by us.
pub(crate) fn row_message(
    room: &RoomName,
    seq: i64,
    from: String,
    body: String,
    ts: i64,
    client_id: Option<String>,
) -> Result<StoredMessage, StoreError> {
    let from = Username::parse(from)
        .map_err(|_| StoreError::Internal("stored sender name is invalid".into()))?;
    Ok(StoredMessage {
        room: room.clone(),
        seq: seq as u64,
        from,
        body,
        ts,
        client_id,
    })
}

/// Direct-room members, for the `NotFound` check in `ensure_room`.
pub(crate) fn direct_members(room: &RoomName) -> Option<(&str, &str)> {
    room.as_str().strip_prefix("dm:")?.split_once(':')
}
