//! The schema, as an ordered list of migrations shared by both stores.
//!
//! Each store applies the ones it has not recorded yet, inside its own lock (an advisory lock in
//! Postgres, so that replicas starting together do not race; SQLite is single-process).

/// (version, SQL) in order. Never edit a released entry: append a new one.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE rooms (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        dm_a TEXT,
        dm_b TEXT,
        last_seq BIGINT NOT NULL DEFAULT 0,
        created_ms BIGINT NOT NULL
    );
    CREATE INDEX rooms_dm_a ON rooms (dm_a);
    CREATE INDEX rooms_dm_b ON rooms (dm_b);
    CREATE TABLE messages (
        room TEXT NOT NULL REFERENCES rooms (name),
        seq BIGINT NOT NULL,
        sender TEXT NOT NULL,
        body TEXT NOT NULL,
        ts BIGINT NOT NULL,
        client_id TEXT,
        PRIMARY KEY (room, seq)
    );
    CREATE UNIQUE INDEX messages_idempotency ON messages (room, sender, client_id)
        WHERE client_id IS NOT NULL;",
)];
