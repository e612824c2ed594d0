//! Clustered mode only: several gateways over one Postgres and one Redis, and their failures.

use crate::helpers::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn services() -> Services {
    Services::start(Backend::Clustered)
}

/// A proxy in front of the services' Redis, and a gateway that reaches Redis through it.
async fn gateway_behind_a_proxy(s: &Services) -> (crate::proxy::FreezingProxy, Gateway) {
    let proxy = crate::proxy::FreezingProxy::start(s.redis.as_ref().unwrap().port()).await;
    let mut settings = s.settings();
    settings.redis_url = Some(secrecy::SecretString::from(proxy.url()));
    (proxy, Gateway::start(settings).await)
}

/// A proxy in front of the shared Postgres, and the services' database URL rewritten to go
/// through it (taken from `s`, so that nothing else reaches the database directly).
async fn postgres_behind_a_proxy(s: &mut Services) -> (crate::proxy::FreezingProxy, String) {
    let pg = chat_testkit::shared_postgres();
    let proxy = crate::proxy::FreezingProxy::start(pg.port()).await;
    let db = s.database_url.take().unwrap();
    let proxied = proxy.rewrite(&db, pg.port());
    (proxy, proxied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_gateways_chat() {
    let s = services();
    let (g1, g2) = (s.gateway().await, s.gateway().await);
    let (mut a, mut b, room) = pair_in_room(g1.port, g2.port, "x").await;
    let bob = b.user.clone();
    let presence = a.recv_type("presence").await;
    assert_eq!(presence["user"], json!(bob), "presence crosses gateways");
    for i in 1..=20u64 {
        let (sender, body) = if i % 2 == 0 {
            (&mut a, "from a")
        } else {
            (&mut b, "from b")
        };
        assert_eq!(sender.say(&room, body).await, i);
    }
    let want: Vec<u64> = (1..=20).collect();
    assert_eq!(message_seqs(&mut a, 20).await, want);
    assert_eq!(message_seqs(&mut b, 20).await, want);
    b.send(json!({"type":"typing","room":room})).await;
    assert_eq!(
        a.recv().await,
        json!({"type":"typing","room":room,"user":bob})
    );
    drop(b);
    let offline = a.recv_type("presence").await;
    assert_eq!(
        (offline["user"].clone(), offline["state"].clone()),
        (json!(bob), json!("offline"))
    );
    g1.stop().await;
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_clients_resume_elsewhere_without_loss() {
    let s = services();
    let mut doomed = GatewayProcess::start(&s, &[]).await;
    let survivor = GatewayProcess::start(&s, &[]).await;
    let (alice, ta) = register(survivor.port, "alice").await;
    let (bob, tb) = register(survivor.port, "bob").await;
    let (carol, tc) = register(survivor.port, "carol").await;
    let room = unique("kill");
    let mut a = Client::connect(survivor.port, &alice, &ta).await;
    let mut b = Client::connect(doomed.port, &bob, &tb).await;
    a.join(&room).await;
    b.join(&room).await;
    // Carol is on the doomed gateway too, and does not come back.
    let mut c = Client::connect(doomed.port, &carol, &tc).await;
    c.join(&room).await;
    for _ in 0..5 {
        a.say(&room, "before").await;
    }
    let seen = message_seqs(&mut b, 5).await;
    assert_eq!(seen, vec![1, 2, 3, 4, 5]);
    doomed.kill();
    // While bob is away, alice keeps talking.
    for _ in 0..5 {
        a.say(&room, "while bob is away").await;
    }
    let mut b = Client::connect(survivor.port, &bob, &tb).await;
    b.send(json!({"type":"join","room":room,"since":5})).await;
    let joined = b.recv_type("joined").await;
    assert_eq!(joined["last_seq"], 10);
    a.say(&room, "after").await;
    assert_eq!(message_seqs(&mut b, 6).await, (6..=11).collect::<Vec<_>>());
    b.quiet(Duration::from_millis(300)).await;
    // The dead gateway's presence is withdrawn by the survivors' heartbeat (3 s in tests):
    // carol goes offline; bob, back on the survivor, stays online.
    let started = Instant::now();
    loop {
        let frame = a.recv().await;
        let offline = frame["type"] == "presence" && frame["state"] == "offline";
        assert!(
            !(offline && frame["user"] == json!(bob)),
            "bob is back: {frame}"
        );
        if offline && frame["user"] == json!(carol) {
            break;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_message_arrives_in_order_across_a_redis_restart() {
    let mut s = services();
    // Sends do not wait for Redis, so they come faster than the default rate limit allows.
    // The smallest publish queue: while Redis is away it is full, and publishes are refused
    // after the Redis deadline (then retried), which must cost no message.
    let mut settings = s.settings();
    settings.rate_per_sec = 1000;
    settings.rate_burst = 1000;
    settings.publish_queue = 1;
    let g1 = Gateway::start(settings).await;
    let g2 = s.gateway().await;
    let (mut a, mut b, room) = pair_in_room(g1.port, g2.port, "redis").await;
    let mut acked = Vec::new();
    for i in 0..30 {
        if i == 10 {
            s.redis.as_mut().unwrap().stop();
        }
        if i == 20 {
            s.redis.as_mut().unwrap().start_again();
        }
        acked.push(a.say(&room, &format!("m{i}")).await);
    }
    assert_eq!(
        acked,
        (1..=30).collect::<Vec<_>>(),
        "sends commit while redis is down"
    );
    assert_eq!(
        message_seqs(&mut b, 30).await,
        acked,
        "bob on the other gateway got all, in order"
    );
    // And new traffic flows normally afterwards.
    a.say(&room, "after").await;
    assert_eq!(b.next_message().await["seq"], 31);
    g1.stop().await;
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_is_reported_and_recovered() {
    // Its own Postgres: this test stops it.
    let mut pg = chat_testkit::PostgresServer::start();
    let mut s = services();
    s.database_url = Some(pg.create_database());
    let gw = s.gateway().await;
    let (alice, ta) = register(gw.port, "alice").await;
    let room = unique("pg");
    let mut a = Client::connect(gw.port, &alice, &ta).await;
    a.join(&room).await;
    assert_eq!(a.say(&room, "one").await, 1);
    a.next_message().await;
    pg.stop();
    let e = a
        .request(json!({"type":"send","room":room,"body":"two"}))
        .await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("unavailable"))
    );
    assert_eq!(
        reqwest::get(gw.http("/readyz")).await.unwrap().status(),
        503
    );
    pg.start_again();
    let started = Instant::now();
    loop {
        let reply = a
            .request(json!({"type":"send","room":room,"body":"two"}))
            .await;
        if reply["type"] == "sent" {
            assert_eq!(reply["seq"], 2, "the failed send stored nothing");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no recovery: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(a.next_message().await["seq"], 2);
    assert_eq!(
        reqwest::get(gw.http("/readyz")).await.unwrap().status(),
        200
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let s = services();
    let mut gw = GatewayProcess::start(&s, &[("CHAT_GRACE_PERIOD_SECS", "4")]).await;
    let (alice, ta) = register(gw.port, "alice").await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = Client::connect(gw.port, &alice, &ta).await;
        c.join("lobby").await;
        clients.push(c);
    }
    let started = Instant::now();
    gw.signal("TERM");
    // Not ready, and no new sockets, while draining.
    let mut saw_503 = false;
    for _ in 0..20 {
        match reqwest::get(gw.http("/readyz")).await {
            Ok(r) if r.status() == 503 => {
                saw_503 = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(saw_503, "readyz did not turn 503");
    for c in &mut clients {
        assert_eq!(c.closed().await, 1012);
    }
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "drain took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_subscription_is_detected_and_repaired() {
    let s = services();
    // Gateway A reaches Redis through the proxy; gateway B directly.
    let (proxy, a_gw) = gateway_behind_a_proxy(&s).await;
    let b_gw = s.gateway().await;
    let (mut on_a, mut on_b, room) = pair_in_room(a_gw.port, b_gw.port, "silent").await;
    assert_eq!(on_b.say(&room, "before").await, 1);
    assert_eq!(on_a.next_message().await["seq"], 1);

    // A's Redis connections go silent: nothing closes, nothing arrives.
    proxy.freeze_existing();
    for i in 2..=6 {
        assert_eq!(on_b.say(&room, &format!("during {i}")).await, i);
    }
    // A notices through its missing self-probe: not ready until its subscription is healthy...
    let started = Instant::now();
    let mut saw_not_ready = false;
    let mut ready_again = false;
    while started.elapsed() < Duration::from_secs(20) {
        let status = reqwest::get(a_gw.http("/readyz")).await.unwrap().status();
        saw_not_ready |= status == 503;
        if saw_not_ready && status == 200 {
            ready_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(saw_not_ready, "readyz stayed 200 with a dead subscription");
    assert!(ready_again, "gateway A did not recover");
    // ...and then fills what it missed from the store, in order.
    assert_eq!(message_seqs(&mut on_a, 5).await, vec![2, 3, 4, 5, 6]);
    on_b.say(&room, "after").await;
    assert_eq!(on_a.next_message().await["seq"], 7);
    a_gw.stop().await;
    b_gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_costs_one_deadline_not_the_session() {
    let mut s = services();
    let (proxy, proxied) = postgres_behind_a_proxy(&mut s).await;
    let mut settings = s.settings();
    settings.database_url = Some(secrecy::SecretString::from(proxied));
    settings.store_timeout_ms = 1000;
    let gw = Gateway::start(settings).await;
    let (alice, ta) = register(gw.port, "alice").await;
    let room = unique("hang");
    let mut a = Client::connect(gw.port, &alice, &ta).await;
    a.join(&room).await;
    assert_eq!(a.say(&room, "one").await, 1);
    a.next_message().await;

    proxy.freeze_existing();
    let started = Instant::now();
    let e = a
        .request(json!({"type":"send","room":room,"body":"two"}))
        .await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("unavailable"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // The session is not frozen: it answers at once.
    let started = Instant::now();
    assert_eq!(a.request(json!({"type":"ping"})).await["type"], "pong");
    assert!(started.elapsed() < Duration::from_millis(500));
    // Hung connections are discarded, not reused: fresh ones (not frozen) serve the next sends.
    let started = Instant::now();
    loop {
        let reply = a
            .request(json!({"type":"send","room":room,"body":"two"}))
            .await;
        if reply["type"] == "sent" {
            assert_eq!(reply["seq"], 2);
            break;
        }
        assert_eq!(reply["code"], "unavailable");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never recovered"
        );
    }
    assert_eq!(a.next_message().await["seq"], 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_shows_in_the_store_metrics_of_an_idle_gateway() {
    // The Postgres alerts read the store's error counter and call count. On a replica without
    // traffic the readiness probe is the only caller, and it gives up before a session's
    // deadline: that call must be counted too.
    let mut s = services();
    let (proxy, proxied) = postgres_behind_a_proxy(&mut s).await;
    let gw = GatewayProcess::start(
        &s,
        &[
            ("CHAT_DATABASE_URL", &proxied),
            ("CHAT_READY_TIMEOUT_MS", "300"),
            ("CHAT_STORE_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let errors = gw.counter("chat_store_errors_total").await;
    let calls = gw.counter("chat_store_query_duration_seconds_count").await;
    assert_eq!(gw.counter("chat_ready").await, 1.0, "ready from start-up");

    proxy.freeze_existing();
    let started = Instant::now();
    let status = reqwest::get(gw.http("/readyz")).await.unwrap().status();
    assert_eq!(status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(gw.counter("chat_store_errors_total").await - errors, 1.0);
    assert_eq!(
        gw.counter("chat_store_query_duration_seconds_count").await - calls,
        1.0
    );
    // The dashboard's ready count and NoReadyGateways see the probe's answer.
    assert_eq!(gw.counter("chat_ready").await, 0.0);

    // The hung connection is dropped; a new one answers the next probe, and the gauge follows.
    let started = Instant::now();
    gw.wait_ready().await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "ready again only after {:?}",
        started.elapsed()
    );
    assert_eq!(gw.counter("chat_ready").await, 1.0);
}

/// Frames `client` receives up to and including the message with `seq`.
async fn frames_until_message(client: &mut Client, seq: u64) -> Vec<serde_json::Value> {
    let mut frames = Vec::new();
    loop {
        let frame = client.recv().await;
        let done = frame["type"] == "message" && frame["seq"] == json!(seq);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_presence_event_per_change_however_many_gateways_see_it() {
    let s = services();
    let (g1, g2) = (s.gateway().await, s.gateway().await);
    let (carol, tc) = register(g1.port, "carol").await;
    let (bob, tb) = register(g1.port, "bob").await;
    let room = unique("pres");
    let mut watcher = Client::connect(g1.port, &carol, &tc).await;
    watcher.join(&room).await;
    let mut bob1 = Client::connect(g1.port, &bob, &tb).await;
    let mut bob2 = Client::connect(g2.port, &bob, &tb).await;
    bob1.join(&room).await;
    bob2.join(&room).await;
    let seq = bob2.say(&room, "marker").await;
    let presence: Vec<_> = frames_until_message(&mut watcher, seq)
        .await
        .into_iter()
        .filter(|f| f["type"] == "presence")
        .collect();
    assert_eq!(
        presence,
        vec![json!({"type":"presence","room":room,"user":bob,"state":"online"})]
    );

    // Leaving one of two gateways changes nothing; leaving the last is one offline event.
    bob1.request(json!({"type":"leave","room":room})).await;
    let seq = bob2.say(&room, "still here").await;
    let frames = frames_until_message(&mut watcher, seq).await;
    assert!(frames.iter().all(|f| f["type"] != "presence"), "{frames:?}");
    drop(bob2);
    let offline = watcher.recv().await;
    assert_eq!(
        offline,
        json!({"type":"presence","room":room,"user":bob,"state":"offline"})
    );
    watcher.quiet(Duration::from_millis(300)).await;
    g1.stop().await;
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_id_on_two_gateways_at_once_is_stored_once() {
    let s = services();
    let (g1, g2) = (s.gateway().await, s.gateway().await);
    let (bob, tb) = register(g1.port, "bob").await;
    let room = unique("idem");
    let mut on1 = Client::connect(g1.port, &bob, &tb).await;
    let mut on2 = Client::connect(g2.port, &bob, &tb).await;
    on1.join(&room).await;
    on2.join(&room).await;
    for round in 0..10 {
        let frame =
            json!({"type":"send","room":room,"body":"once","client_id":format!("c{round}")});
        let (r1, r2) = tokio::join!(on1.request(frame.clone()), on2.request(frame.clone()));
        assert_eq!(r1["type"], "sent", "{r1}");
        assert_eq!(
            (r1["seq"].clone(), r1["ts"].clone()),
            (r2["seq"].clone(), r2["ts"].clone())
        );
        assert_eq!(r1["seq"], round + 1);
    }
    // Each session saw each message exactly once.
    assert_eq!(
        message_seqs(&mut on1, 10).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        message_seqs(&mut on2, 10).await,
        (1..=10).collect::<Vec<_>>()
    );
    on1.quiet(Duration::from_millis(200)).await;
    g1.stop().await;
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_one_fresh_database_once() {
    let s = services();
    let (g1, g2, g3) = tokio::join!(s.gateway(), s.gateway(), s.gateway());
    let (alice, ta) = register(g1.port, "alice").await;
    let room = unique("mig");
    let mut a = Client::connect(g3.port, &alice, &ta).await;
    a.join(&room).await;
    assert_eq!(a.say(&room, "schema works").await, 1);
    let db = s.database_url.as_ref().unwrap();
    let versions = chat_testkit::shared_postgres().psql(
        db,
        "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
    );
    assert_eq!(versions.trim(), "1,2", "each migration recorded once");
    for g in [g1, g2, g3] {
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_name_the_connection_and_never_hold_secrets() {
    let s = services();
    let log_path = s.data_dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut gw = GatewayProcess::start_with_logs(
        &s,
        &[("RUST_LOG", "trace"), ("CHAT_LOG_FORMAT", "json")],
        log,
    )
    .await;
    let name = unique("logs");
    let password = "hunter2-very-secret-password";
    let r = reqwest::Client::new()
        .post(gw.http("/api/register"))
        .json(&json!({"username": name, "password": password}))
        .send()
        .await
        .unwrap();
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = Client::connect(gw.port, &name, &token).await;
    c.join("logroom").await;
    let body = "a-message-body-that-must-not-be-logged";
    c.say("logroom", body).await;
    c.send_text("{broken".into()).await;
    c.recv().await;
    drop(c);
    gw.signal("TERM");
    assert!(gw.child.wait().unwrap().success());

    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.lines().count() > 5,
        "too few log lines at trace:\n{text}"
    );
    for secret in [password, token.as_str(), body] {
        assert!(!text.contains(secret), "the log holds {secret:?}:\n{text}");
    }
    let mut session_lines = 0;
    for line in text.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if entry["fields"]["message"] == "session started"
            || entry["fields"]["message"] == "session ended"
        {
            session_lines += 1;
            let spans = entry["spans"].to_string();
            assert!(
                spans.contains("\"id\""),
                "a session line without its connection id: {line}"
            );
        }
    }
    assert_eq!(
        session_lines, 2,
        "session start and end are logged:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_change_redis_missed_is_recorded_once_it_answers() {
    let s = services();
    // Bob's gateway reaches Redis through the proxy; Carol's directly.
    let (proxy, bobs_gw) = gateway_behind_a_proxy(&s).await;
    let carols_gw = s.gateway().await;
    let (carol, tc) = register(carols_gw.port, "carol").await;
    let (bob, tb) = register(carols_gw.port, "bob").await;
    let room = unique("ghost");
    let mut watcher = Client::connect(carols_gw.port, &carol, &tc).await;
    watcher.join(&room).await;
    let mut on_bobs = Client::connect(bobs_gw.port, &bob, &tb).await;
    on_bobs.join(&room).await;
    let online = watcher.recv_type("presence").await;
    assert_eq!(online["state"], "online");

    // Bob leaves while his gateway cannot reach Redis: the exit is not recorded there.
    proxy.refuse();
    let left = on_bobs
        .request(json!({"type": "leave", "room": room}))
        .await;
    assert_eq!(left["type"], "left");
    // Once the gateway is through to Redis again, Bob goes offline, and nobody sees him online.
    proxy.accept_again();
    let offline = watcher.recv_type("presence").await;
    assert_eq!(
        offline,
        json!({"type":"presence","room":room,"user":bob,"state":"offline"})
    );
    let (dave, td) = register(carols_gw.port, "dave").await;
    let mut newcomer = Client::connect(carols_gw.port, &dave, &td).await;
    let joined = newcomer.join(&room).await;
    assert!(
        !joined["online"].as_array().unwrap().contains(&json!(bob)),
        "{joined}"
    );
    bobs_gw.stop().await;
    carols_gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_recorded_again_after_redis_restarts_empty() {
    let mut s = services();
    let (g1, g2) = (s.gateway().await, s.gateway().await);
    let (alice, ta) = register(g1.port, "alice").await;
    let (carol, tc) = register(g2.port, "carol").await;
    let room = unique("restart");
    let mut watcher = Client::connect(g2.port, &carol, &tc).await;
    watcher.join(&room).await;
    let mut on_g1 = Client::connect(g1.port, &alice, &ta).await;
    on_g1.join(&room).await;
    assert_eq!(watcher.recv_type("presence").await["state"], "online");

    // Redis comes back with nothing: both gateways record their users again, so Alice is
    // announced online anew, and a newcomer sees her.
    s.redis.as_mut().unwrap().stop();
    s.redis.as_mut().unwrap().start_again();
    let online = watcher.recv_type("presence").await;
    assert_eq!(
        online,
        json!({"type":"presence","room":room,"user":alice,"state":"online"})
    );
    let (dave, td) = register(g2.port, "dave").await;
    let mut newcomer = Client::connect(g2.port, &dave, &td).await;
    let joined = newcomer.join(&room).await;
    let online = joined["online"].as_array().unwrap();
    assert!(
        online.contains(&json!(alice)) && online.contains(&json!(carol)),
        "{joined}"
    );
    g1.stop().await;
    g2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redis_refused_reaches_other_gateways_once_it_answers() {
    let s = services();
    let proxy = crate::proxy::FreezingProxy::start(s.redis.as_ref().unwrap().port()).await;
    // The sender's gateway is a process of its own (its counters are its own) that reaches
    // Redis through the proxy; the reader's gateway reaches Redis directly.
    let mut senders_gw = GatewayProcess::start(&s, &[("CHAT_REDIS_URL", &proxy.url())]).await;
    let readers_gw = s.gateway().await;
    let (mut sender, mut reader, room) =
        pair_in_room(senders_gw.port, readers_gw.port, "refused").await;
    assert_eq!(sender.say(&room, "before").await, 1);
    assert_eq!(reader.next_message().await["seq"], 1);

    // Redis refuses the sender's gateway: the message commits, its publish is given up.
    proxy.refuse();
    assert_eq!(sender.say(&room, "while refused").await, 2);
    let started = Instant::now();
    while senders_gw.counter("chat_publish_failures_total").await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the publish was never given up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The room stays quiet; once Redis answers, the reader gets the message all the same.
    proxy.accept_again();
    let message = reader.next_message().await;
    assert_eq!(
        (message["seq"].clone(), message["body"].clone()),
        (json!(2), json!("while refused"))
    );
    senders_gw.kill();
    readers_gw.stop().await;
}
