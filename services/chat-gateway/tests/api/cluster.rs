//! Clustered mode only: several gateways over one Postgres and one Redis, and their failures.

use crate::helpers::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn services() -> Services {
    Services::start(Backend::Clustered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_gateways_chat() {
    let s = services();
    let (g1, g2) = (s.gateway().await, s.gateway().await);
    let (alice, ta) = register(g1.port, "alice").await;
    let (bob, tb) = register(g2.port, "bob").await;
    let room = unique("x");
    let mut a = Client::connect(g1.port, &alice, &ta).await;
    let mut b = Client::connect(g2.port, &bob, &tb).await;
    a.join(&room).await;
    b.join(&room).await;
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
    let (g1, g2) = (s.gateway().await, s.gateway().await);
    let (alice, ta) = register(g1.port, "alice").await;
    let (bob, tb) = register(g1.port, "bob").await;
    let room = unique("redis");
    let mut a = Client::connect(g1.port, &alice, &ta).await;
    let mut b = Client::connect(g2.port, &bob, &tb).await;
    a.join(&room).await;
    b.join(&room).await;
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
        match reqwest::get(format!("http://127.0.0.1:{}/readyz", gw.port)).await {
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
