//! The Postgres store's group commit against a real server: many appends at once, from two
//! replicas' stores, land as gapless per-room sequences with every resend stored once.

use chat_gateway::store::group_commit::CommitLimits;
use chat_gateway::store::postgres::PostgresStore;
use chat_gateway::store::{Committed, NewMessage, Store, StoreError};
use chat_protocol::{ClientId, MessageBody, RoomName, Username};
use chat_testkit::shared_postgres;
use futures_util::future::join_all;
use secrecy::SecretString;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn store(url: &str, limits: CommitLimits) -> Arc<PostgresStore> {
    let store = PostgresStore::connect(
        &SecretString::from(url.to_string()),
        8,
        limits,
        Duration::from_secs(10),
    )
    .await
    .expect("store connects");
    Arc::new(store)
}

fn message(room: &str, from: &str, body: String, client_id: Option<String>) -> NewMessage {
    NewMessage {
        room: RoomName::parse(room).unwrap(),
        from: Username::parse(from).unwrap(),
        body: MessageBody::parse(body).unwrap(),
        client_id: client_id.map(|c| ClientId::parse(c).unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_two_replicas_get_gapless_seqs_and_resends_are_stored_once() {
    let url = shared_postgres().create_database();
    // Small batches and several in flight on each replica, so that transactions sharing rooms
    // overlap (in either lock order, were the rooms not locked in name order).
    let limits = CommitLimits {
        max_batch: 16,
        in_flight: 3,
    };
    let stores = [store(&url, limits).await, store(&url, limits).await];
    let rooms = ["alpha", "bravo", "charlie", "delta"];
    for room in rooms {
        stores[0]
            .ensure_room(&RoomName::parse(room).unwrap())
            .await
            .unwrap();
    }

    // 400 distinct messages, each of the first 50 sent twice (once to each replica), and one
    // message to a room that does not exist in the middle of it all.
    let mut sends = Vec::new();
    for i in 0..400usize {
        let room = rooms[(i * 7) % rooms.len()];
        let from = format!("user{}", i % 13);
        let client_id = (i % 3 != 0).then(|| format!("c{i}"));
        let body = format!("message {i}");
        sends.push((i % 2, message(room, &from, body.clone(), client_id.clone())));
        if i < 50 && client_id.is_some() {
            sends.push(((i + 1) % 2, message(room, &from, body, client_id)));
        }
        if i == 200 {
            sends.push((0, message("nowhere", "user1", "lost".into(), None)));
        }
    }
    let outcomes: Vec<Result<Committed, StoreError>> =
        join_all(sends.iter().map(|(replica, m)| {
            let store = stores[*replica].clone();
            async move { store.append(m).await }
        }))
        .await;

    let mut stored_per_room: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut by_client_id: HashMap<(String, String), Vec<(u64, bool)>> = HashMap::new();
    for ((_, sent), outcome) in sends.iter().zip(&outcomes) {
        if sent.room.as_str() == "nowhere" {
            assert!(
                matches!(outcome, Err(StoreError::NotFound(_))),
                "a missing room: {outcome:?}"
            );
            continue;
        }
        let committed = outcome.as_ref().expect("every append commits");
        assert_eq!(committed.message.body, sent.body.as_str());
        if !committed.duplicate {
            stored_per_room
                .entry(sent.room.to_string())
                .or_default()
                .push(committed.message.seq);
        }
        if let Some(id) = &sent.client_id {
            by_client_id
                .entry((sent.room.to_string(), id.to_string()))
                .or_default()
                .push((committed.message.seq, committed.duplicate));
        }
    }
    for (id, answers) in &by_client_id {
        let fresh = answers.iter().filter(|(_, dup)| !dup).count();
        assert_eq!(fresh, 1, "{id:?} stored once: {answers:?}");
        assert!(
            answers.iter().all(|(seq, _)| *seq == answers[0].0),
            "{id:?}: {answers:?}"
        );
    }
    let mut total = 0;
    for (room, mut seqs) in stored_per_room {
        seqs.sort_unstable();
        let n = seqs.len() as u64;
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "{room}: gapless, no seq twice"
        );
        let room = RoomName::parse(room).unwrap();
        assert_eq!(stores[1].last_seq(&room).await.unwrap(), Some(n));
        let page = stores[1].messages_after(&room, 0, 200).await.unwrap();
        assert_eq!(
            page.messages.len() as u64,
            n,
            "history holds every message once"
        );
        total += n;
    }
    assert_eq!(total, 400);
}

/// A new deployment starts with empty tables, and the append is planned once per connection.
/// Postgres would read a small table whole, and keep that plan until its next `ANALYZE`; the
/// append must find rooms and resends through their indexes from the first message on, or
/// every batch reads the history written so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_to_a_new_database_never_read_the_whole_history() {
    let url = shared_postgres().create_database();
    let limits = CommitLimits {
        max_batch: 64,
        in_flight: 2,
    };
    let store = store(&url, limits).await;
    let rooms: Vec<String> = (0..20).map(|r| format!("room{r}")).collect();
    for room in &rooms {
        store
            .ensure_room(&RoomName::parse(room).unwrap())
            .await
            .unwrap();
    }
    // Rounds of 1 to 120 appends at once: batches of every size, each round with a resend of a
    // message of the round before.
    let mut stored = 0u64;
    for round in 1..=12usize {
        let count = round * 10;
        let mut sends: Vec<NewMessage> = (0..count)
            .map(|i| {
                let room = &rooms[(round + i) % rooms.len()];
                let id = format!("r{round}-{i}");
                message(room, "writer", format!("message {id}"), Some(id))
            })
            .collect();
        if round > 1 {
            let id = format!("r{}-0", round - 1);
            let room = &rooms[(round - 1) % rooms.len()];
            sends.push(message(room, "writer", format!("message {id}"), Some(id)));
        }
        let outcomes = join_all(sends.iter().map(|m| store.append(m))).await;
        for outcome in outcomes {
            let committed = outcome.expect("every append commits");
            stored += u64::from(!committed.duplicate);
        }
    }
    assert_eq!(stored, (1..=12).map(|r| r * 10).sum::<u64>());

    // A backend reports its table statistics when it exits: close the store's connections and
    // wait for them to be gone.
    drop(store);
    let postgres = shared_postgres();
    let others = "SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND backend_type = 'client backend'
          AND pid <> pg_backend_pid()";
    let deadline = Instant::now() + Duration::from_secs(20);
    while postgres.psql(&url, others) != "0" {
        assert!(
            Instant::now() < deadline,
            "the store's connections close within 20 s of dropping it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (Creating the table's indexes read it whole too, while it was empty: hence rows read,
    // not scans counted.)
    let stats = |table: &str| -> Vec<i64> {
        let sql = format!(
            "SELECT n_live_tup, seq_tup_read, idx_scan FROM pg_stat_user_tables
            WHERE relname = '{table}'"
        );
        let row = postgres.psql(&url, &sql);
        row.split('|').map(|n| n.parse().unwrap()).collect()
    };
    let [live, read_whole, index_scans] = stats("messages")[..] else {
        panic!("no statistics for `messages`");
    };
    // A batch holding a resend is refused once, and its inserts rolled back: they count as
    // dead rows, not live ones.
    assert_eq!(
        live as u64, stored,
        "the statistics count every stored message"
    );
    assert!(index_scans > 0, "resends are looked up by index");
    assert_eq!(read_whole, 0, "rows of `messages` read by sequential scans");
    let rooms_read_whole = stats("rooms")[1];
    assert_eq!(
        rooms_read_whole, 0,
        "rows of `rooms` read by sequential scans"
    );
    let roomless = postgres.psql(
        &url,
        "SELECT count(*) FROM messages m WHERE NOT EXISTS (SELECT 1 FROM rooms r WHERE r.name = m.room)",
    );
    assert_eq!(roomless, "0", "every stored message has its room");
}
