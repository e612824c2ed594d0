//! The schema, as an ordered list of migrations shared by both stores.
//!
//! Each store applies the ones it has not recorded yet, inside its own lock (an advisory lock in
//! Postgres, so that replicas starting together do not race; SQLite is single-process). A
//! migration may differ between the two dialects; both stores record every version, so their
//! version numbers stay aligned.

/// One schema change, in each store's dialect.
pub(crate) struct Migration {
    pub version: i64,
    pub postgres: &'static str,
    pub sqlite: &'static str,
}

const TABLES: &str = "CREATE TABLE users (
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
        WHERE client_id IS NOT NULL;";

/// In order. Never edit a released entry: append a new one.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        postgres: TABLES,
        sqlite: TABLES,
    },
    // Postgres checked the foreign key from `messages` to `rooms` with a query per inserted
    // row, a fifth of its CPU time per message. Only the append statement writes `messages`,
    // and it numbers each message from its room's locked row, so every message has a room
    // without the check (ARCHITECTURE.md, "Every message has a room"). SQLite cannot drop a
    // constraint without rebuilding the table, and its check is an index probe in-process.
    Migration {
        version: 2,
        postgres: "ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_room_fkey",
        sqlite: "",
    },
];
