//! The embedded store: one SQLite file, for a single gateway with nothing else installed.
//!
//! SQLite calls block, so each runs on tokio's blocking pool with the one connection behind a
//! mutex (SQLite serialises writers anyway). WAL with `synchronous=FULL`: an acknowledged
//! message survives a power cut.

use super::migrations::MIGRATIONS;
use super::{
    Committed, NewMessage, Page, Store, StoreError, direct_members, row_message, with_deadline,
};
use crate::clock::unix_ms;
use async_trait::async_trait;
use chat_protocol::api::RoomSummary;
use chat_protocol::{RoomKind, RoomName, StoredMessage, Username};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    deadline: Duration,
}

fn db_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

impl SqliteStore {
    /// Opens (creating) `<dir>/chat.sqlite3` and applies pending migrations.
    pub fn open(dir: &Path, deadline: Duration) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Internal(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("chat.sqlite3");
        let mut conn = Connection::open(&path)
            .map_err(|e| StoreError::Internal(format!("cannot open {}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_error)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_error)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db_error)?;
        conn.busy_timeout(deadline).map_err(db_error)?;
        Self::migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            deadline,
        })
    }

    fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)",
        )
        .map_err(db_error)?;
        let current: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )
            .map_err(db_error)?;
        for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
            let tx = conn.transaction().map_err(db_error)?;
            tx.execute_batch(migration.sqlite).map_err(db_error)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
                params![migration.version, unix_ms()],
            )
            .map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            tracing::info!(version = migration.version, "applied schema migration");
        }
        Ok(())
    }

    /// Runs `work` with the connection on the blocking pool, under the deadline.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call_within(self.deadline, work).await
    }

    async fn call_within<T: Send + 'static>(
        &self,
        deadline: Duration,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        // Cancelled when the caller stops waiting (its deadline passed, and it was told
        // `unavailable`): work still queued for the connection then does nothing, so that an
        // append the caller gave up on is not stored behind its back.
        let abandoned = CancellationToken::new();
        let caller = abandoned.clone().drop_guard();
        with_deadline(deadline, async move {
            let done = tokio::task::spawn_blocking(move || {
                let mut guard = conn
                    .lock()
                    .map_err(|_| StoreError::Internal("store lock poisoned".into()))?;
                if abandoned.is_cancelled() {
                    return Err(StoreError::Unavailable("the caller stopped waiting".into()));
                }
                work(&mut guard)
            })
            .await
            .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?;
            caller.disarm();
            done
        })
        .await
    }
}

fn read_page(
    conn: &Connection,
    sql: &str,
    room: &RoomName,
    bound: i64,
    limit: u32,
) -> Result<(Vec<StoredMessage>, bool), StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let rows = stmt
        .query_map(params![room.as_str(), bound, i64::from(limit) + 1], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .map_err(db_error)?
        .collect::<Result<Vec<(i64, String, String, i64, Option<String>)>, _>>()
        .map_err(db_error)?;
    let has_more = rows.len() > limit as usize;
    let messages = rows
        .into_iter()
        .take(limit as usize)
        .map(|(seq, from, body, ts, cid)| row_message(room, seq, from, body, ts, cid))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((messages, has_more))
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(&self, user: &Username, password_hash: &str) -> Result<(), StoreError> {
        let (user, hash) = (user.to_string(), password_hash.to_string());
        self.call(move |c| {
            let n = c
                .execute(
                    "INSERT INTO users (name, password_hash, created_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO NOTHING",
                    params![user, hash, unix_ms()],
                )
                .map_err(db_error)?;
            if n == 0 {
                Err(StoreError::UsernameTaken)
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn password_hash(&self, user: &Username) -> Result<Option<String>, StoreError> {
        let user = user.to_string();
        self.call(move |c| {
            c.query_row(
                "SELECT password_hash FROM users WHERE name = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_error)
        })
        .await
    }

    async fn ensure_room(&self, room: &RoomName) -> Result<u64, StoreError> {
        let room = room.clone();
        self.call(move |c| {
            let existing: Option<i64> = c
                .query_row(
                    "SELECT last_seq FROM rooms WHERE name = ?1",
                    [room.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_error)?;
            if let Some(seq) = existing {
                return Ok(seq as u64);
            }
            let (kind, a, b) = match (room.kind(), direct_members(&room)) {
                (RoomKind::Direct, Some((a, b))) => {
                    let n: i64 = c
                        .query_row(
                            "SELECT count(*) FROM users WHERE name = ?1 OR name = ?2",
                            [a, b],
                            |r| r.get(0),
                        )
                        .map_err(db_error)?;
                    if n != 2 {
                        return Err(StoreError::NotFound("no such user for this direct room"));
                    }
                    ("direct", Some(a.to_string()), Some(b.to_string()))
                }
                _ => ("public", None, None),
            };
            c.execute(
                "INSERT INTO rooms (name, kind, dm_a, dm_b, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO NOTHING",
                params![room.as_str(), kind, a, b, unix_ms()],
            )
            .map_err(db_error)?;
            Ok(0)
        })
        .await
    }

    async fn last_seq(&self, room: &RoomName) -> Result<Option<u64>, StoreError> {
        let room = room.to_string();
        self.call(move |c| {
            c.query_row("SELECT last_seq FROM rooms WHERE name = ?1", [room], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|o| o.map(|s| s as u64))
            .map_err(db_error)
        })
        .await
    }

    async fn append(&self, message: &NewMessage) -> Result<Committed, StoreError> {
        let m = message.clone();
        self.call(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_error)?;
            let client_id = m.client_id.as_ref().map(|c| c.to_string());
            if let Some(cid) = &client_id {
                let dup: Option<(i64, i64, String)> = tx
                    .query_row(
                        "SELECT seq, ts, body FROM messages
                         WHERE room = ?1 AND sender = ?2 AND client_id = ?3",
                        params![m.room.as_str(), m.from.as_str(), cid],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(db_error)?;
                if let Some((seq, ts, body)) = dup {
                    return Ok(Committed {
                        message: row_message(
                            &m.room,
                            seq,
                            m.from.to_string(),
                            body,
                            ts,
                            client_id,
                        )?,
                        duplicate: true,
                    });
                }
            }
            let seq: Option<i64> = tx
                .query_row(
                    "UPDATE rooms SET last_seq = last_seq + 1 WHERE name = ?1 RETURNING last_seq",
                    [m.room.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_error)?;
            let seq = seq.ok_or(StoreError::NotFound("no such room"))?;
            let ts = unix_ms();
            tx.execute(
                "INSERT INTO messages (room, seq, sender, body, ts, client_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    m.room.as_str(),
                    seq,
                    m.from.as_str(),
                    m.body.as_str(),
                    ts,
                    client_id
                ],
            )
            .map_err(db_error)?;
            tx.commit().map_err(db_error)?;
            Ok(Committed {
                message: StoredMessage {
                    room: m.room,
                    seq: seq as u64,
                    from: m.from,
                    body: m.body.to_string(),
                    ts,
                    client_id,
                },
                duplicate: false,
            })
        })
        .await
    }

    async fn messages_after(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Page, StoreError> {
        let room = room.clone();
        self.call(move |c| {
            let (messages, has_more) = read_page(
                c,
                "SELECT seq, sender, body, ts, client_id FROM messages
                 WHERE room = ?1 AND seq > ?2 ORDER BY seq ASC LIMIT ?3",
                &room,
                after.min(i64::MAX as u64) as i64,
                limit,
            )?;
            Ok(Page { messages, has_more })
        })
        .await
    }

    async fn messages_before(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Page, StoreError> {
        let room = room.clone();
        self.call(move |c| {
            let bound = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
            let (mut messages, has_more) = read_page(
                c,
                "SELECT seq, sender, body, ts, client_id FROM messages
                 WHERE room = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
                &room,
                bound,
                limit,
            )?;
            messages.reverse();
            Ok(Page { messages, has_more })
        })
        .await
    }

    async fn rooms_for(&self, user: &Username, limit: u32) -> Result<Vec<RoomSummary>, StoreError> {
        let user = user.to_string();
        self.call(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT name, last_seq FROM rooms
                     WHERE kind = 'public' OR dm_a = ?1 OR dm_b = ?1 ORDER BY name LIMIT ?2",
                )
                .map_err(db_error)?;
            let rows = stmt
                .query_map(params![user, i64::from(limit)], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(db_error)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_error)?;
            rows.into_iter()
                .map(|(name, seq)| {
                    Ok(RoomSummary {
                        room: RoomName::parse(name).map_err(|_| {
                            StoreError::Internal("stored room name is invalid".into())
                        })?,
                        last_seq: seq as u64,
                    })
                })
                .collect()
        })
        .await
    }

    async fn ping(&self, deadline: Duration) -> Result<(), StoreError> {
        self.call_within(deadline, |c| {
            c.query_row("SELECT 1", [], |_| Ok(())).map_err(db_error)
        })
        .await
    }
}
