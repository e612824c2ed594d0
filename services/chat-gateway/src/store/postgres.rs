//! The clustered store: Postgres through a deadpool connection pool.
//!
//! `seq` is assigned by bumping `rooms.last_seq` in the same transaction that inserts the
//! messages: the room's row lock serialises writers of one room, so seq N+1 never commits before
//! seq N. Appends go through the group-commit queue, which writes many in one transaction.

use super::group_commit::{BatchOutcome, CommitLimits, CommitQueue};
use super::migrations::MIGRATIONS;
use super::{
    Committed, NewMessage, Page, Store, StoreError, direct_members, row_message, with_deadline,
};
use crate::clock::unix_ms;
use async_trait::async_trait;
use chat_protocol::api::RoomSummary;
use chat_protocol::{RoomKind, RoomName, Username};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

/// Any number; it only has to be the same on every replica.
const MIGRATION_LOCK_KEY: i64 = 0x6368_6174; // "chat"

pub struct PostgresStore {
    pool: Pool,
    commits: CommitQueue,
    deadline: Duration,
}

impl PostgresStore {
    /// Connects, and applies pending migrations under an advisory lock.
    pub async fn connect(
        url: &SecretString,
        pool_size: usize,
        commit_limits: CommitLimits,
        deadline: Duration,
    ) -> Result<Self, StoreError> {
        let mut pg = tokio_postgres::Config::from_str(url.expose_secret())
            .map_err(|e| StoreError::Internal(format!("CHAT_DATABASE_URL is invalid: {e}")))?;
        pg.connect_timeout(deadline);
        pg.keepalives_idle(Duration::from_secs(30));
        if pg.get_application_name().is_none() {
            pg.application_name("chat-gateway");
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(deadline))
            .create_timeout(Some(deadline))
            .recycle_timeout(Some(deadline))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(format!("building the Postgres pool: {e}")))?;
        let batch_pool = pool.clone();
        let commits = CommitQueue::start(commit_limits, move |batch| {
            commit_batch(batch_pool.clone(), deadline, batch)
        });
        let store = PostgresStore {
            pool,
            commits,
            deadline,
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        const MIGRATION_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";
        // Migrations may take longer than a query; the lock wait is bounded by the other
        // replica's migration, itself bounded by this deadline.
        let deadline = self.deadline.max(Duration::from_secs(30));
        with_deadline(deadline, async {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            client
                .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
                .await
                .map_err(pg_error)?;
            let result = async {
                client
                    .batch_execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (
                            version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
                    )
                    .await
                    .map_err(pg_error)?;
                let row = client
                    .query_one(
                        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                        &[],
                    )
                    .await
                    .map_err(pg_error)?;
                let current: i64 = row.get(0);
                for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
                    let version = migration.version;
                    let tx = client.transaction().await.map_err(pg_error)?;
                    // A migration that alters a table waits for every reader of it, and while
                    // it waits, every later query on the table queues behind it: the whole
                    // fleet would stall behind one long read. Give up instead, and let the
                    // start-up retry.
                    tx.batch_execute(MIGRATION_LOCK_TIMEOUT)
                        .await
                        .map_err(pg_error)?;
                    tx.batch_execute(migration.postgres).await.map_err(|e| {
                        if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
                            StoreError::Unavailable(format!(
                                "schema migration {version} is waiting for a table lock: {e}"
                            ))
                        } else {
                            pg_error(e)
                        }
                    })?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                        &[&version, &unix_ms()],
                    )
                    .await
                    .map_err(pg_error)?;
                    tx.commit().await.map_err(pg_error)?;
                    tracing::info!(version, "applied schema migration");
                }
                Ok::<(), StoreError>(())
            }
            .await;
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
                .await
                .map_err(pg_error)?;
            result
        })
        .await
    }

    /// Runs `call` on a pooled connection under the store's deadline.
    async fn with_connection<T>(
        &self,
        call: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        with_deadline(self.deadline, on_connection(&self.pool, call)).await
    }
}

/// Checks a connection out, runs `call` on it, and returns it to the pool only if `call`
/// finished: a call abandoned at its deadline leaves the connection to be discarded
/// (`Checkout`).
async fn on_connection<T>(
    pool: &Pool,
    call: impl AsyncFnOnce(&deadpool_postgres::Object) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let client = Checkout {
        object: Some(pool.get().await.map_err(pool_error)?),
        settled: false,
    };
    let result = call(&client).await;
    client.settle();
    result
}

/// Locks the rooms of a batch in name order, so that two transactions sharing rooms queue
/// behind each other instead of deadlocking. It also makes the resend lookup of
/// `APPEND_WITH_RESENDS` exact: an earlier message with the same client id committed before
/// this lock was granted, so the next statement's snapshot sees it.
const LOCK_ROOMS: &str =
    "SELECT 1 FROM rooms WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE";

/// A CTE named `$name` holding the batch's bound columns, with `ord` counting from 1 in batch
/// order. (A macro rather than a `const` so that `concat!` can build both statements from it.)
macro_rules! batch_cte {
    ($name:literal) => {
        concat!(
            $name,
            " AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
            WITH ORDINALITY AS t(room, sender, body, client_id, ord)
    )"
        )
    };
}

/// The rest of both append statements: the messages of the CTE `fresh` take consecutive seqs
/// per room, in batch order, with one `UPDATE` per room, and are inserted; each returns
/// `(ord, seq, ts, NULL, false)`. A message for a room that does not exist returns no row.
macro_rules! number_and_insert_fresh {
    () => {
        "counts AS (
        SELECT room, count(*) AS n FROM fresh GROUP BY room
    ), bumped AS (
        UPDATE rooms SET last_seq = rooms.last_seq + counts.n
        FROM counts WHERE rooms.name = counts.room
        RETURNING rooms.name, rooms.last_seq - counts.n AS base
    ), numbered AS (
        SELECT f.ord, f.room, f.sender, f.body, f.client_id,
               b.base + row_number() OVER (PARTITION BY f.room ORDER BY f.ord) AS seq,
               (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ts
        FROM fresh f JOIN bumped b ON b.name = f.room
    ), inserted AS (
        INSERT INTO messages (room, seq, sender, body, ts, client_id)
        SELECT room, seq, sender, body, ts, client_id FROM numbered
    )
    SELECT ord, seq, ts, NULL::text, false FROM numbered"
    };
}

/// Appends a batch that holds no resend, in one statement. A resend (same room, sender and
/// client id as a stored message) breaks the idempotency index, which aborts the transaction,
/// and the batch is committed again with `APPEND_WITH_RESENDS`. Resends are rare (a client
/// resends what was not acked before it reconnected), and looking every message up first cost
/// a third of Postgres's CPU time per message.
const APPEND_FRESH: &str = concat!(
    "WITH ",
    batch_cte!("fresh"),
    ", ",
    number_and_insert_fresh!()
);

/// `APPEND_FRESH` for a batch that holds a resend: resends return the stored message, and
/// only the others are numbered and stored. The resend lookup is a `LATERAL … LIMIT 1` so
/// that, with sequential scans off (see `BEGIN_APPEND`), it can only be one index probe per
/// message, never a scan of `messages`.
const APPEND_WITH_RESENDS: &str = concat!(
    "WITH ",
    batch_cte!("input"),
    ", dup AS (
        SELECT i.ord, m.seq, m.ts, m.body
        FROM input i
        CROSS JOIN LATERAL (
            SELECT m.seq, m.ts, m.body FROM messages m
            WHERE m.room = i.room AND m.sender = i.sender AND m.client_id = i.client_id
            LIMIT 1
        ) m
    ), fresh AS (
        SELECT i.* FROM input i WHERE NOT EXISTS (SELECT 1 FROM dup WHERE dup.ord = i.ord)
    ), ",
    number_and_insert_fresh!(),
    "
    UNION ALL
    SELECT ord, seq, ts, body, true FROM dup"
);

/// Opens an append transaction. Its statements are planned once per connection (a generic
/// plan) instead of for every batch: for batches of a few messages, planning anew was about a
/// third of Postgres's CPU time per transaction. A generic plan cannot see the batch's size or
/// how big the tables are, and one made while they are small (a new deployment, a benchmark's
/// first minute) would scan them until the next `ANALYZE`; with sequential scans off, the plan
/// finds every room and resend through its primary or idempotency index, which is the right
/// plan at any size. `SET LOCAL` keeps both settings to this transaction (and behind a
/// transaction-pooling proxy).
const BEGIN_APPEND: &str = "BEGIN;
    SET LOCAL plan_cache_mode = force_generic_plan;
    SET LOCAL enable_seqscan = off";

/// Commits one batch of the group-commit queue in one transaction, within `deadline`.
async fn commit_batch(pool: Pool, deadline: Duration, batch: Arc<Vec<NewMessage>>) -> BatchOutcome {
    let commit = on_connection(&pool, async |client| {
        write_batch(client, &batch).await.map_err(pg_error)
    });
    let outcome = tokio::time::timeout(deadline, commit).await;
    outcome.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "commit did not finish within {} ms",
            deadline.as_millis()
        )))
    })
}

async fn write_batch(
    client: &deadpool_postgres::Object,
    batch: &[NewMessage],
) -> Result<Vec<Result<Committed, StoreError>>, tokio_postgres::Error> {
    let column = |f: fn(&NewMessage) -> &str| batch.iter().map(f).collect::<Vec<_>>();
    let rooms = column(|m| m.room.as_str());
    let senders = column(|m| m.from.as_str());
    let bodies = column(|m| m.body.as_str());
    let client_ids: Vec<Option<&str>> = batch
        .iter()
        .map(|m| m.client_id.as_ref().map(|c| c.as_str()))
        .collect();
    let mut locked = rooms.clone();
    locked.sort_unstable();
    locked.dedup();

    let append_params: [&(dyn ToSql + Sync); 4] = [&rooms, &senders, &bodies, &client_ids];
    let rows = match append_in_transaction(client, APPEND_FRESH, &locked, &append_params).await {
        Err(e) if is_resend(&e) => {
            metrics::counter!("chat_store_resend_batches_total").increment(1);
            append_in_transaction(client, APPEND_WITH_RESENDS, &locked, &append_params).await?
        }
        outcome => outcome?,
    };

    let mut results: Vec<Result<Committed, StoreError>> =
        vec![Err(StoreError::NotFound("no such room")); batch.len()];
    for row in rows {
        // `ord` counts from 1, in batch order.
        let ord: i64 = row.get(0);
        let Some(index) = usize::try_from(ord - 1).ok().filter(|&i| i < batch.len()) else {
            continue;
        };
        let m = &batch[index];
        let seq: i64 = row.get(1);
        let stored_body: Option<String> = row.get(3);
        results[index] = Ok(Committed {
            message: chat_protocol::StoredMessage {
                room: m.room.clone(),
                seq: seq as u64,
                from: m.from.clone(),
                body: stored_body.unwrap_or_else(|| m.body.as_str().to_string()),
                ts: row.get(2),
                client_id: m.client_id.as_ref().map(|c| c.as_str().to_string()),
            },
            duplicate: row.get(4),
        });
    }
    Ok(results)
}

/// Runs one append statement in its own transaction, after locking the batch's rooms.
async fn append_in_transaction(
    client: &deadpool_postgres::Object,
    statement: &str,
    locked: &[&str],
    append_params: &[&(dyn ToSql + Sync); 4],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let lock = client.prepare_cached(LOCK_ROOMS).await?;
    let append = client.prepare_cached(statement).await?;
    let lock_params: [&(dyn ToSql + Sync); 1] = [&locked];
    // The whole transaction goes out in one write and costs one round trip: the server runs
    // the statements in order. If one fails, the transaction is aborted and COMMIT rolls it
    // back, so the connection always ends outside a transaction.
    let (begin, locking, rows, commit) = tokio::join!(
        client.batch_execute(BEGIN_APPEND),
        client.execute(&lock, &lock_params),
        client.query(&append, append_params),
        client.batch_execute("COMMIT"),
    );
    begin?;
    locking?;
    let rows = rows?;
    commit?;
    Ok(rows)
}

/// Whether an append failed because the batch holds a resend: the idempotency index refused
/// a second message with the same room, sender and client id.
fn is_resend(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some("messages_idempotency")
    })
}

/// A pooled connection that is thrown away instead of returned if the call using it is
/// abandoned at its deadline: a connection stuck on a hung peer must not serve the next call.
struct Checkout {
    object: Option<deadpool_postgres::Object>,
    settled: bool,
}

impl Checkout {
    /// The call finished (well or not): the connection may go back to the pool.
    fn settle(mut self) {
        self.settled = true;
    }
}

impl std::ops::Deref for Checkout {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        // `object` is only taken in `drop`.
        self.object.as_ref().expect("checked-out connection")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if !self.settled
            && let Some(object) = self.object.take()
        {
            metrics::counter!("chat_store_connections_discarded_total").increment(1);
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// A room's last seq, or `None` when there is no such room.
async fn room_last_seq(
    client: &deadpool_postgres::Object,
    room: &RoomName,
) -> Result<Option<u64>, StoreError> {
    let select = client
        .prepare_cached("SELECT last_seq FROM rooms WHERE name = $1")
        .await
        .map_err(pg_error)?;
    let row = client
        .query_opt(&select, &[&room.as_str()])
        .await
        .map_err(pg_error)?;
    Ok(row.map(|r| r.get::<_, i64>(0) as u64))
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => {
            StoreError::Internal("unexpected duplicate key".into())
        }
        Some(code) => {
            let class = &code.code()[..2];
            // 08: connection, 53: resources, 57: operator intervention (shutdown), 40: retryable.
            if matches!(class, "08" | "53" | "57" | "40") {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Internal(e.to_string())
            }
        }
        None => StoreError::Unavailable(e.to_string()),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_user(&self, user: &Username, password_hash: &str) -> Result<(), StoreError> {
        self.with_connection(async |client| {
            let inserted = client
                .execute(
                    "INSERT INTO users (name, password_hash, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                    &[&user.as_str(), &password_hash, &unix_ms()],
                )
                .await
                .map_err(pg_error)?;
            if inserted == 0 {
                Err(StoreError::UsernameTaken)
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn password_hash(&self, user: &Username) -> Result<Option<String>, StoreError> {
        self.with_connection(async |client| {
            let row = client
                .query_opt(
                    "SELECT password_hash FROM users WHERE name = $1",
                    &[&user.as_str()],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    async fn ensure_room(&self, room: &RoomName) -> Result<u64, StoreError> {
        self.with_connection(async |client| {
            if let Some(last_seq) = room_last_seq(client, room).await? {
                return Ok(last_seq);
            }
            let (kind, a, b) = match (room.kind(), direct_members(room)) {
                (RoomKind::Direct, Some((a, b))) => {
                    let row = client
                        .query_one(
                            "SELECT count(*) FROM users WHERE name = $1 OR name = $2",
                            &[&a, &b],
                        )
                        .await
                        .map_err(pg_error)?;
                    if row.get::<_, i64>(0) != 2 {
                        return Err(StoreError::NotFound("no such user for this direct room"));
                    }
                    ("direct", Some(a), Some(b))
                }
                _ => ("public", None, None),
            };
            client
                .execute(
                    "INSERT INTO rooms (name, kind, dm_a, dm_b, created_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING",
                    &[&room.as_str(), &kind, &a, &b, &unix_ms()],
                )
                .await
                .map_err(pg_error)?;
            // Rooms are never deleted: the row is there, inserted now or by a racing call.
            room_last_seq(client, room).await?.ok_or_else(|| {
                StoreError::Unavailable("the room was not found after insert".into())
            })
        })
        .await
    }

    async fn last_seq(&self, room: &RoomName) -> Result<Option<u64>, StoreError> {
        self.with_connection(async |client| room_last_seq(client, room).await)
            .await
    }

    async fn append(&self, message: &NewMessage) -> Result<Committed, StoreError> {
        with_deadline(self.deadline, self.commits.append(message.clone())).await
    }

    async fn messages_after(
        &self,
        room: &RoomName,
        after: u64,
        limit: u32,
    ) -> Result<Page, StoreError> {
        self.with_connection(async |client| {
            let stmt = client
                .prepare_cached(
                    "SELECT seq, sender, body, ts, client_id FROM messages
                 WHERE room = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3",
                )
                .await
                .map_err(pg_error)?;
            let rows = client
                .query(
                    &stmt,
                    &[
                        &room.as_str(),
                        &(after.min(i64::MAX as u64) as i64),
                        &(i64::from(limit) + 1),
                    ],
                )
                .await
                .map_err(pg_error)?;
            let has_more = rows.len() > limit as usize;
            let messages = rows
                .into_iter()
                .take(limit as usize)
                .map(|r| row_message(room, r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect::<Result<_, _>>()?;
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
        self.with_connection(async |client| {
            let stmt = client
                .prepare_cached(
                    "SELECT seq, sender, body, ts, client_id FROM messages
                 WHERE room = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                )
                .await
                .map_err(pg_error)?;
            let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
            let rows = client
                .query(&stmt, &[&room.as_str(), &before, &(i64::from(limit) + 1)])
                .await
                .map_err(pg_error)?;
            let has_more = rows.len() > limit as usize;
            let mut messages = rows
                .into_iter()
                .take(limit as usize)
                .map(|r| row_message(room, r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
                .collect::<Result<Vec<_>, _>>()?;
            messages.reverse();
            Ok(Page { messages, has_more })
        })
        .await
    }

    async fn rooms_for(&self, user: &Username, limit: u32) -> Result<Vec<RoomSummary>, StoreError> {
        self.with_connection(async |client| {
            let rows = client
                .query(
                    "SELECT name, last_seq FROM rooms
                 WHERE kind = 'public' OR dm_a = $1 OR dm_b = $1
                 ORDER BY name LIMIT $2",
                    &[&user.as_str(), &i64::from(limit)],
                )
                .await
                .map_err(pg_error)?;
            rows.into_iter()
                .map(|r| {
                    let name: String = r.get(0);
                    Ok(RoomSummary {
                        room: RoomName::parse(name).map_err(|_| {
                            StoreError::Internal("stored room name is invalid".into())
                        })?,
                        last_seq: r.get::<_, i64>(1) as u64,
                    })
                })
                .collect()
        })
        .await
    }

    fn record_pool_metrics(&self) {
        let status = self.pool.status();
        metrics::gauge!("chat_db_pool_max_connections").set(status.max_size as f64);
        metrics::gauge!("chat_db_pool_connections").set(status.size as f64);
        metrics::gauge!("chat_db_pool_idle_connections").set(status.available as f64);
        metrics::gauge!("chat_db_pool_waiting").set(status.waiting as f64);
    }

    async fn ping(&self, deadline: Duration) -> Result<(), StoreError> {
        let call = on_connection(&self.pool, async |client| {
            client.simple_query("SELECT 1").await.map_err(pg_error)?;
            Ok(())
        });
        with_deadline(deadline, call).await
    }
}
