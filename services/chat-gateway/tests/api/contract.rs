//! Protocol v1, as a client sees it, in both modes.

use crate::helpers::*;
use serde_json::{Value, json};
use std::time::Duration;

/// Defines a test once per mode.
macro_rules! both_modes {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$body(super::Backend::Embedded).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn clustered() {
                super::$body(super::Backend::Clustered).await;
            }
        }
    };
}

both_modes!(accounts, accounts_body);
async fn accounts_body(backend: Backend) {
    let services = Services::start(backend);
    let gw = services.gateway().await;
    let http = reqwest::Client::new();
    let name = unique("acct");
    let post = |path: &str, body: Value| http.post(gw.http(path)).json(&body).send();
    let r = post(
        "/api/register",
        json!({"username": name, "password": "password123"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["user"], json!(name));
    assert!(body["token"].as_str().unwrap().len() > 20);

    let r = post(
        "/api/register",
        json!({"username": name, "password": "password123"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "username_taken");

    for (user, password) in [
        ("Bad Name", "password123"),
        ("ok_name", "short"),
        ("x", "password123"),
    ] {
        let r = post(
            "/api/register",
            json!({"username": user, "password": password}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 400, "{user}/{password}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request");
    }
    let r = http
        .post(gw.http("/api/register"))
        .body("not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = post(
        "/api/login",
        json!({"username": name, "password": "password123"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post(
        "/api/login",
        json!({"username": name, "password": "wrong-password"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    let r = post(
        "/api/login",
        json!({"username": "nobody_here", "password": "password123"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);

    // The token from login opens a session.
    Client::connect(gw.port, &name, &token).await;
    gw.stop().await;
}

both_modes!(hello_rules, hello_rules_body);
async fn hello_rules_body(backend: Backend) {
    let services = Services::start(backend);
    let mut settings = services.settings();
    settings.hello_timeout_ms = 300;
    let gw = Gateway::start(settings).await;
    let (user, token) = register(gw.port, "hi").await;

    let client = Client::connect(gw.port, &user, &token).await;
    drop(client);

    // A forged token, a frame other than hello, and silence are all refused with 1008.
    let cases = [
        Some(json!({"type": "hello", "token": format!("{token}x"), "ref": 1})),
        Some(json!({"type": "join", "room": "general"})),
        Some(json!({"type": "hello"})),
        None,
    ];
    for case in cases {
        let mut client = Client::connect_raw(gw.port).await;
        if let Some(frame) = &case {
            client.send(frame.clone()).await;
        }
        let error = client.recv().await;
        assert_eq!(error["type"], "error", "{case:?}");
        assert_eq!(error["code"], "unauthorized", "{case:?}");
        if let Some(r) = case.as_ref().and_then(|c| c.get("ref")) {
            assert_eq!(&error["ref"], r);
        }
        assert_eq!(client.closed().await, 1008, "{case:?}");
    }

    // A Ping or Pong before hello is the client's WebSocket library keeping the connection
    // alive: the hello after it is welcomed.
    let mut client = Client::connect_raw(gw.port).await;
    client.send_ping().await;
    client.send(json!({"type": "hello", "token": token})).await;
    assert_eq!(client.recv().await["type"], "welcome");
    gw.stop().await;
}

both_modes!(chat_in_a_room, chat_in_a_room_body);
async fn chat_in_a_room_body(backend: Backend) {
    let services = Services::start(backend);
    let gw = services.gateway().await;
    let (alice, ta) = register(gw.port, "alice").await;
    let (bob, tb) = register(gw.port, "bob").await;
    let room = unique("room");
    let mut a = Client::connect(gw.port, &alice, &ta).await;
    let mut b = Client::connect(gw.port, &bob, &tb).await;
    let joined = a.join(&room).await;
    assert_eq!(joined["last_seq"], 0);
    assert_eq!(joined["online"], json!([alice]));
    let joined = b.join(&room).await;
    let mut online: Vec<String> = serde_json::from_value(joined["online"].clone()).unwrap();
    online.sort();
    let mut expected = vec![alice.clone(), bob.clone()];
    expected.sort();
    assert_eq!(online, expected);
    let presence = a.recv_type("presence").await;
    assert_eq!(
        presence,
        json!({"type":"presence","room":room,"user":bob,"state":"online"})
    );

    a.send(
        json!({"type":"send","room":room,"body":"hello <b>bob</b>","client_id":"c-1","ref":"s1"}),
    )
    .await;
    let sent = a.recv().await;
    assert_eq!(sent["type"], "sent");
    assert_eq!(sent["ref"], "s1");
    assert_eq!(sent["seq"], 1);
    assert_eq!(sent["client_id"], "c-1");
    let ts = sent["ts"].as_i64().unwrap();
    for client in [&mut a, &mut b] {
        let m = client.next_message().await;
        assert_eq!(
            m,
            json!({"type":"message","room":room,"seq":1,"from":alice,"body":"hello <b>bob</b>","ts":ts,"client_id":"c-1"})
        );
    }

    // The same client_id again: the first `sent`, nothing stored, nothing delivered.
    let again = a
        .request(json!({"type":"send","room":room,"body":"hello <b>bob</b>","client_id":"c-1"}))
        .await;
    assert_eq!(
        (
            again["type"].clone(),
            again["seq"].clone(),
            again["ts"].clone()
        ),
        (json!("sent"), json!(1), json!(ts))
    );
    assert_eq!(b.say(&room, "reply").await, 2);
    assert_eq!(b.next_message().await["seq"], 2);
    assert_eq!(
        a.next_message().await["seq"],
        2,
        "the resend must not have been delivered"
    );

    // Typing reaches the others, not the typist.
    a.send(json!({"type":"typing","room":room})).await;
    assert_eq!(
        b.recv().await,
        json!({"type":"typing","room":room,"user":alice})
    );
    let pong = a.request(json!({"type":"ping"})).await;
    assert_eq!(
        pong["type"], "pong",
        "a typist gets no typing notice of its own"
    );

    // Leaving stops delivery and tells the others.
    let left = b.request(json!({"type":"leave","room":room})).await;
    assert_eq!(left["type"], "left");
    assert_eq!(a.recv_type("presence").await["state"], "offline");
    a.say(&room, "after bob left").await;
    assert_eq!(a.next_message().await["seq"], 3);
    b.quiet(Duration::from_millis(200)).await;
    gw.stop().await;
}

both_modes!(history_and_resume, history_and_resume_body);
async fn history_and_resume_body(backend: Backend) {
    let services = Services::start(backend);
    let gw = services.gateway().await;
    let (alice, ta) = register(gw.port, "alice").await;
    let (bob, tb) = register(gw.port, "bob").await;
    let room = unique("hist");
    let mut a = Client::connect(gw.port, &alice, &ta).await;
    a.join(&room).await;
    for i in 1..=5 {
        assert_eq!(a.say(&room, &format!("m{i}")).await, i);
    }
    assert_eq!(message_seqs(&mut a, 5).await, vec![1, 2, 3, 4, 5]);

    let h = a
        .request(json!({"type":"history","room":room,"limit":2}))
        .await;
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!((seqs, h["has_more"].clone()), (vec![4, 5], json!(true)));
    let h = a
        .request(json!({"type":"history","room":room,"before":4,"limit":200}))
        .await;
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!((seqs, h["has_more"].clone()), (vec![1, 2, 3], json!(false)));
    let h = a.request(json!({"type":"history","room":room})).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 5);
    assert_eq!(h["messages"][0]["body"], "m1");

    // Bob resumes from seq 2: gets 3..=5 from history, then live messages, no gap, no dup.
    let mut b = Client::connect(gw.port, &bob, &tb).await;
    b.send(json!({"type":"join","room":room,"since":2,"ref":"j"}))
        .await;
    let joined = b.recv().await;
    assert_eq!(
        (joined["type"].clone(), joined["last_seq"].clone()),
        (json!("joined"), json!(5))
    );
    assert_eq!(message_seqs(&mut b, 3).await, vec![3, 4, 5]);
    a.say(&room, "live").await;
    assert_eq!(b.next_message().await["seq"], 6);

    // HTTP history: bearer required; before/after pages.
    let http = reqwest::Client::new();
    let url = gw.http(&format!("/api/rooms/{room}/messages"));
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&url)
            .bearer_auth("garbage")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let page: Value = http
        .get(format!("{url}?after=4&limit=1"))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (page["messages"][0]["seq"].clone(), page["has_more"].clone()),
        (json!(5), json!(true))
    );
    let page: Value = http
        .get(format!("{url}?before=3"))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    // Past every seq there is: an empty page, in either store.
    let page: Value = http
        .get(format!("{url}?after={}", u64::MAX))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (page["messages"].clone(), page["has_more"].clone()),
        (json!([]), json!(false))
    );
    // A method the path does not take: 405, with the API's error body.
    let r = http.delete(&url).bearer_auth(&tb).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    let r = http
        .get(format!("{url}?limit=500"))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let rooms: Value = http
        .get(gw.http("/api/rooms"))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == json!(room))
        .cloned();
    assert_eq!(listed.unwrap()["last_seq"], 6);
    assert_eq!(
        http.get(gw.http("/api/rooms"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    gw.stop().await;
}

both_modes!(direct_rooms_are_private, direct_rooms_body);
async fn direct_rooms_body(backend: Backend) {
    let services = Services::start(backend);
    let gw = services.gateway().await;
    let (alice, ta) = register(gw.port, "a").await;
    let (bob, tb) = register(gw.port, "b").await;
    let (carol, tc) = register(gw.port, "c").await;
    let (x, y) = if alice < bob {
        (&alice, &bob)
    } else {
        (&bob, &alice)
    };
    let dm = format!("dm:{x}:{y}");
    let mut a = Client::connect(gw.port, &alice, &ta).await;
    let mut b = Client::connect(gw.port, &bob, &tb).await;
    let mut c = Client::connect(gw.port, &carol, &tc).await;
    a.join(&dm).await;
    b.join(&dm).await;
    a.say(&dm, "secret").await;
    assert_eq!(b.next_message().await["body"], "secret");

    for frame in [
        json!({"type":"join","room":dm}),
        json!({"type":"history","room":dm}),
    ] {
        let e = c.request(frame).await;
        assert_eq!(
            (e["type"].clone(), e["code"].clone()),
            (json!("error"), json!("forbidden"))
        );
    }
    let e = c
        .request(json!({"type":"send","room":dm,"body":"hi"}))
        .await;
    assert_eq!(e["code"], "not_joined");
    let http = reqwest::Client::new();
    let r = http
        .get(gw.http(&format!("/api/rooms/{dm}/messages")))
        .bearer_auth(&tc)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .get(gw.http(&format!("/api/rooms/{dm}/messages")))
        .bearer_auth(&ta)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Only the two members see the room in their list.
    let rooms: Value = http
        .get(gw.http("/api/rooms"))
        .bearer_auth(&tc)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!rooms.to_string().contains(&dm));
    let rooms: Value = http
        .get(gw.http("/api/rooms"))
        .bearer_auth(&tb)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(rooms.to_string().contains(&dm));
    // A direct room with a user who does not exist.
    let ghost = if carol.as_str() < "zzz_ghost" {
        format!("dm:{carol}:zzz_ghost")
    } else {
        format!("dm:zzz_ghost:{carol}")
    };
    let e = c.request(json!({"type":"join","room":ghost})).await;
    assert_eq!(e["code"], "not_found");
    gw.stop().await;
}

both_modes!(bad_input_is_answered_and_harmless, bad_input_body);
async fn bad_input_body(backend: Backend) {
    let services = Services::start(backend);
    let mut settings = services.settings();
    settings.rate_per_sec = 1;
    // The rejected send and typing below each take a token too: 2 + 5 sends.
    settings.rate_burst = 7;
    let gw = Gateway::start(settings).await;
    let (user, token) = register(gw.port, "bad").await;
    let mut c = Client::connect(gw.port, &user, &token).await;
    let room = unique("r");
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "bad_request"),
        ("[1,2]".into(), "bad_request"),
        (r#"{"type":"dance","ref":"x"}"#.into(), "bad_request"),
        (r#"{"type":"join","ref":"x"}"#.into(), "bad_request"),
        (
            r#"{"type":"join","room":"No Spaces","ref":"x"}"#.into(),
            "bad_request",
        ),
        (
            r#"{"type":"join","room":"ok","since":"x","ref":"x"}"#.into(),
            "bad_request",
        ),
        (
            format!(r#"{{"type":"send","room":"{room}","body":"hi","ref":"x"}}"#),
            "not_joined",
        ),
        (
            format!(r#"{{"type":"typing","room":"{room}","ref":"x"}}"#),
            "not_joined",
        ),
        (
            format!(r#"{{"type":"leave","room":"{room}","ref":"x"}}"#),
            "not_joined",
        ),
        (
            format!(r#"{{"type":"history","room":"{room}","limit":201,"ref":"x"}}"#),
            "bad_request",
        ),
        (
            r#"{"type":"hello","token":"t","ref":"x"}"#.into(),
            "bad_request",
        ),
    ];
    for (text, code) in cases {
        c.send_text(text.clone()).await;
        let e = c.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{text}"
        );
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        if text.contains(r#""ref":"x""#) {
            assert_eq!(e["ref"], "x", "{text}");
        }
    }
    c.send_binary(b"\x00\x01".to_vec()).await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    c.join(&room).await;
    let e = c
        .request(json!({"type":"send","room":room,"body":"x".repeat(4001)}))
        .await;
    assert_eq!(e["code"], "too_large");
    let e = c
        .request(json!({"type":"send","room":room,"body":""}))
        .await;
    assert_eq!(e["code"], "bad_request");
    // The connection still works, and 4000 characters is fine (5 is this test's burst).
    assert_eq!(c.say(&room, &"é".repeat(4000)).await, 1);
    for _ in 0..4 {
        c.say(&room, "within the burst").await;
    }
    let e = c
        .request(json!({"type":"send","room":room,"body":"one too many"}))
        .await;
    assert_eq!(e["code"], "rate_limited");
    let pong = c.request(json!({"type":"ping"})).await;
    assert_eq!(
        pong["type"], "pong",
        "ping is not rate limited and the socket stays open"
    );
    // Nothing rate limited was stored.
    let h = c.request(json!({"type":"history","room":room})).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 5);

    // A frame over 64 KiB closes the socket with 1009.
    c.send_text(format!(
        r#"{{"type":"send","room":"{room}","body":"{}"}}"#,
        "x".repeat(70_000)
    ))
    .await;
    assert_eq!(c.closed().await, 1009);
    gw.stop().await;
}

both_modes!(health_and_metrics, health_body);
async fn health_body(backend: Backend) {
    let services = Services::start(backend);
    let gw = services.gateway().await;
    assert_eq!(
        reqwest::get(gw.http("/healthz")).await.unwrap().status(),
        200
    );
    // Ready once the bus's first probe came back.
    let mut ready = false;
    for _ in 0..100 {
        if reqwest::get(gw.http("/readyz")).await.unwrap().status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "readyz never 200");
    let metrics = metrics_text(gw.metrics_port).await;
    assert!(metrics.contains("chat_build_info"), "{metrics}");
    let r = reqwest::get(gw.http("/nope")).await.unwrap();
    assert_eq!(r.status(), 404);
    // The web client is served by every gateway, with a policy that forbids foreign scripts.
    let r = reqwest::get(gw.http("/")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(r.text().await.unwrap().contains("<html"));
    gw.stop().await;
}

// A client that stops reading is told to go (4008) rather than buffered for, and it costs the
// gateway at most its outbound queue plus the socket's kernel send buffer
// (CHAT_SOCKET_SEND_BUFFER_BYTES), not the megabytes the kernel's autotuning would grow it to.
both_modes!(slow_consumers_are_disconnected, slow_consumer_body);
async fn slow_consumer_body(backend: Backend) {
    let services = Services::start(backend);
    let send_buffer: usize = 65_536;
    let queue: usize = 8;
    // A process of its own, so that its metrics are its alone.
    let gw = GatewayProcess::start(
        &services,
        &[
            ("CHAT_OUTBOUND_QUEUE", &queue.to_string()),
            ("CHAT_SOCKET_SEND_BUFFER_BYTES", &send_buffer.to_string()),
            ("CHAT_RATE_PER_SEC", "10000"),
            ("CHAT_RATE_BURST", "10000"),
        ],
    )
    .await;
    let (alice, ta) = register(gw.port, "fast").await;
    let (bob, tb) = register(gw.port, "slow").await;
    let room = unique("flood");
    let mut a = Client::connect(gw.port, &alice, &ta).await;
    let mut b = Client::connect_small_buffer(gw.port, &bob, &tb).await;
    a.join(&room).await;
    b.join(&room).await;
    // Bob stops reading; Alice talks and reads her own socket, so she keeps up.
    let body = "y".repeat(4000);
    let mut kicked_after = None;
    for sent in 1..=3000_usize {
        let seq = a.say(&room, &body).await;
        // Alice's own copy: the room has fanned out every earlier message, Bob's copies too.
        while a.next_message().await["seq"] != seq {}
        a.forget_stash();
        if gw.counter("chat_slow_consumers_total").await >= 1.0 {
            kicked_after = Some(sent);
            break;
        }
    }
    let kicked_after = kicked_after.expect("bob was never disconnected");
    // The kernel holds up to twice the setting on the gateway's side (its bookkeeping), and
    // Bob's small receive buffer a little more; the rest waits in his queue. With the kernel's
    // autotuning instead, Bob held about 700 of these messages (2.8 MB).
    let frame = body.len() + 100;
    let most = queue + (2 * send_buffer + 64 * 1024).div_ceil(frame) + 2;
    assert!(
        (queue..=most).contains(&kicked_after),
        "bob was disconnected after {kicked_after} messages, not {queue} to {most}"
    );
    assert_eq!(b.closed_after_backlog().await, 4008);
    // Alice, who kept up, is still connected.
    assert_eq!(a.request(json!({"type":"ping"})).await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_history_survives_a_restart() {
    let services = Services::start(Backend::Embedded);
    let mut settings = services.settings();
    settings.jwt_secret = None; // generated once and kept in the data dir
    let gw = Gateway::start(settings.clone()).await;
    let (user, token) = register(gw.port, "keep").await;
    let mut c = Client::connect(gw.port, &user, &token).await;
    c.join("lobby").await;
    c.say("lobby", "remember me").await;
    drop(c);
    gw.stop().await;
    let gw = Gateway::start(settings).await;
    // The same token still works: the secret was kept.
    let mut c = Client::connect(gw.port, &user, &token).await;
    let joined = c.join("lobby").await;
    assert_eq!(joined["last_seq"], 1);
    let h = c.request(json!({"type":"history","room":"lobby"})).await;
    assert_eq!(h["messages"][0]["body"], "remember me");
    gw.stop().await;
}

both_modes!(connection_limits_hold_at_their_edges, limits_body);
async fn limits_body(backend: Backend) {
    let services = Services::start(backend);
    let mut settings = services.settings();
    settings.max_connections = 2;
    settings.max_rooms_per_connection = 2;
    settings.heartbeat_ms = 200;
    let gw = Gateway::start(settings).await;
    let (user, token) = register(gw.port, "lim").await;
    let mut first = Client::connect(gw.port, &user, &token).await;
    // Rooms: two is the limit; a third is refused and the connection stays usable.
    first.join("r1").await;
    first.join("r2").await;
    let e = first.request(json!({"type":"join","room":"r3"})).await;
    assert_eq!(
        (e["type"].clone(), e["code"].clone()),
        (json!("error"), json!("bad_request"))
    );
    first.request(json!({"type":"leave","room":"r1"})).await;
    first.join("r3").await;
    // Connections: the third upgrade is refused with 503 while two are open.
    let _second = Client::connect(gw.port, &user, &token).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("third connection was not refused: {other:?}"),
    }
    // Heartbeat: a client that answers nothing (not even pings: it reads nothing, so its
    // WebSocket library sends no pong) is closed after 2.5 beats.
    let silent_since = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(first.closed().await, 4001);
    let silent = silent_since.elapsed();
    assert!(
        silent >= Duration::from_millis(500) && silent < Duration::from_secs(3),
        "closed after {silent:?} of silence"
    );
    gw.stop().await;
}

/// Bob, in `room` with Alice, sends `n` long messages while Alice reads nothing; returns once
/// Bob has his own copy of the last one, so Alice's copies are queued for her by then. Bob
/// reads his copies every hundred messages, so that he is never a slow consumer himself.
async fn back_up(bob: &mut Client, room: &str, n: usize, body: &str) {
    let mut sent = 0;
    while sent < n {
        let batch = (n - sent).min(100);
        for _ in 0..batch {
            bob.send(json!({"type": "send", "room": room, "body": body}))
                .await;
        }
        let mut copies = 0;
        while copies < batch {
            let frame = bob.recv().await;
            if frame["type"] == "message" && frame["from"] == json!(bob.user) {
                copies += 1;
            }
        }
        sent += batch;
    }
}

/// Alice's next frames up to and including the first of `kind`: the seqs of the messages before it.
async fn messages_before(alice: &mut Client, kind: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let frame = alice.recv().await;
        match frame["type"].as_str() {
            Some("message") => seqs.push(frame["seq"].as_u64().unwrap()),
            Some(k) if k == kind => return seqs,
            _ => {}
        }
    }
}

/// An embedded gateway where Bob may send fast and many frames may queue for a connection,
/// with Alice, on a socket with a tiny receive buffer, in a room with him.
struct BackedUp {
    _services: Services,
    gw: Gateway,
    alice: Client,
    bob: Client,
    room: String,
}

async fn backed_up(tweak: impl FnOnce(&mut chat_gateway::Settings)) -> BackedUp {
    let (services, gw) = embedded_gateway(|settings| {
        settings.rate_per_sec = 10_000;
        settings.rate_burst = 10_000;
        settings.outbound_queue = 4096;
        tweak(settings);
    })
    .await;
    let (alice_name, alice_token) = register(gw.port, "alice").await;
    let (bob_name, bob_token) = register(gw.port, "bob").await;
    let mut alice = Client::connect_small_buffer(gw.port, &alice_name, &alice_token).await;
    let mut bob = Client::connect(gw.port, &bob_name, &bob_token).await;
    let room = unique("backed");
    alice.join(&room).await;
    bob.join(&room).await;
    BackedUp {
        _services: services,
        gw,
        alice,
        bob,
        room,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_and_left_come_after_the_rooms_queued_messages() {
    let BackedUp {
        _services,
        gw,
        mut alice,
        mut bob,
        room,
    } = backed_up(|_| {}).await;
    // More than the kernel's socket buffers hold (CHAT_SOCKET_SEND_BUFFER_BYTES on the
    // gateway's side), so that the rest waits in the gateway.
    let body = "x".repeat(3900);
    let n = 1500;

    // Alice's socket is full and most of the room's messages wait in her queue when she joins
    // again from the start: they come first, then `joined`, then the whole backlog, once each.
    back_up(&mut bob, &room, n, &body).await;
    alice
        .send(json!({"type": "join", "room": room, "since": 0}))
        .await;
    let in_order = |seqs: &[u64], from: u64| seqs.iter().copied().eq(from..from + n as u64);
    let before = messages_before(&mut alice, "joined").await;
    assert!(
        in_order(&before, 1),
        "{} live messages before joined, not 1..={n}",
        before.len()
    );
    let backlog = message_seqs(&mut alice, n).await;
    assert!(
        in_order(&backlog, 1),
        "the backlog is not 1..={n} once each"
    );

    // The same for a leave: every message queued before it comes before `left`.
    back_up(&mut bob, &room, n, &body).await;
    alice.send(json!({"type": "leave", "room": room})).await;
    let before = messages_before(&mut alice, "left").await;
    assert!(
        in_order(&before, n as u64 + 1),
        "{} messages before left, not {n}",
        before.len()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_of_the_longest_messages_arrives_whole() {
    let (_services, gw) = embedded_gateway(|settings| {
        settings.rate_per_sec = 10_000;
        settings.rate_burst = 10_000;
    })
    .await;
    let (user, token) = register(gw.port, "long").await;
    let mut client = Client::connect(gw.port, &user, &token).await;
    let room = unique("long");
    client.join(&room).await;
    // 4000 three-byte characters: 12 KB a message, a page of 200 is 2.4 MB, far past the
    // largest frame a client may send.
    let body = "語".repeat(4000);
    for _ in 0..200 {
        client.say(&room, &body).await;
    }
    client.forget_stash();
    let page = client
        .request(json!({"type": "history", "room": room, "limit": 200}))
        .await;
    assert_eq!(page["type"], "history", "{}", page["type"]);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 200);
    assert!(messages.iter().all(|m| m["body"] == json!(body)));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smallest_frame_limit_still_takes_the_longest_message() {
    use chat_gateway::config::MIN_FRAME_BYTES;
    let (_services, gw) =
        embedded_gateway(|settings| settings.max_frame_bytes = MIN_FRAME_BYTES).await;
    let (user, token) = register(gw.port, "edge").await;
    let mut c = Client::connect(gw.port, &user, &token).await;
    let room = unique("edge");
    c.join(&room).await;
    // 4000 characters outside the BMP, each escaped as a surrogate pair: 12 bytes apiece.
    let escaped = r"\ud83d\ude00".repeat(4000);
    let frame = |padding: usize| {
        let head = format!(r#"{{"type":"send","room":"{room}","ref":1,"body":"{escaped}""#);
        format!("{head}{}}}", " ".repeat(padding))
    };
    let at_limit = frame(0).len();
    assert!(at_limit <= MIN_FRAME_BYTES);
    c.send_text(frame(MIN_FRAME_BYTES - at_limit)).await;
    let sent = c.recv_type("sent").await;
    assert_eq!(sent["seq"], 1);
    let stored = c.request(json!({"type":"history","room":room})).await;
    assert_eq!(stored["messages"][0]["body"], json!("😀".repeat(4000)));
    // One byte more is a frame over the limit.
    c.send_text(frame(MIN_FRAME_BYTES - at_limit + 1)).await;
    assert_eq!(c.closed().await, 1009);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_limits_hold_at_their_edges() {
    let (_services, gw) = embedded_gateway(|settings| {
        settings.api_body_limit_bytes = 1024;
        settings.rooms_list_limit = 2;
    })
    .await;
    let http = reqwest::Client::new();
    // A request body of exactly the limit is read; one byte more is refused with 413.
    let body = |name: &str, size: usize| {
        let json = json!({"username": name, "password": "password123"}).to_string();
        format!("{json}{}", " ".repeat(size - json.len()))
    };
    let register = |text: String| {
        http.post(gw.http("/api/register"))
            .header("content-type", "application/json")
            .body(text)
            .send()
    };
    let name = unique("edge");
    let r = register(body(&name, 1024)).await.unwrap();
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = register(body(&unique("over"), 1025)).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "too_large"
    );

    // The room list stops at its limit.
    let mut client = Client::connect(gw.port, &name, &token).await;
    for room in ["list-a", "list-b", "list-c"] {
        client.join(room).await;
    }
    let rooms: Value = http
        .get(gw.http("/api/rooms"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rooms["rooms"].as_array().unwrap().len(), 2, "{rooms}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_takes_no_writes_is_closed_after_the_write_timeout() {
    let BackedUp {
        _services,
        gw,
        mut alice,
        mut bob,
        room,
    } = backed_up(|settings| settings.write_timeout_ms = 300).await;
    // Far more than the socket buffers hold, while Alice reads nothing: her socket stops
    // taking writes, and the queue (large enough) never overflows.
    back_up(&mut bob, &room, 1500, &"x".repeat(3900)).await;
    // Alice reads what reached her, then finds the connection gone.
    alice.dropped().await;
    // Bob, who reads, is still served.
    assert_eq!(bob.say(&room, "still here").await, 1501);
    gw.stop().await;
}

#[tokio::test]
async fn metrics_carry_their_descriptions_and_logs_in_a_file_are_plain_text() {
    // A process of its own: the metrics recorder is process-wide, and only the first gateway
    // of a process shows whether descriptions given at start-up reach `/metrics`.
    let s = Services::start(Backend::Embedded);
    let log_path = s.data_dir.path().join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut gw = GatewayProcess::start_with_logs(&s, &[("RUST_LOG", "info")], log).await;
    let metrics = metrics_text(gw.metrics_port).await;
    // Prometheus and Grafana show these texts next to each series.
    for help in [
        "# HELP chat_connections_open ",
        "# HELP chat_ready ",
        "# HELP process_resident_memory_bytes ",
    ] {
        assert!(metrics.contains(help), "no {help:?} in:\n{metrics}");
    }
    gw.signal("TERM");
    assert!(gw.child.wait().unwrap().success());
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(logs.contains("drained"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "terminal colour codes in a log file: {logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_a_long_backlog_is_not_closed_as_silent() {
    // The gateway reads nothing from a socket while it writes a join's backlog, so the client
    // cannot be heard then. A backlog that takes longer to read than the silence limit
    // (2.5 heartbeats, 1.5 s here) or the write timeout (2 s) must not end the connection:
    // the client is reading.
    let (_services, gw) = embedded_gateway(|settings| {
        settings.rate_per_sec = 10_000;
        settings.rate_burst = 10_000;
        settings.heartbeat_ms = 600;
        settings.write_timeout_ms = 2000;
    })
    .await;
    let (alice_name, alice_token) = register(gw.port, "alice").await;
    let (bob_name, bob_token) = register(gw.port, "bob").await;
    let room = unique("replay");
    let mut bob = Client::connect(gw.port, &bob_name, &bob_token).await;
    bob.join(&room).await;
    // About 8 MB: more than the kernel's socket buffers hold, so the gateway is still writing
    // the backlog while Alice reads the first half of it.
    let body = "x".repeat(3900);
    let n = 2000;
    back_up(&mut bob, &room, n, &body).await;
    drop(bob);

    let mut alice = Client::connect_small_buffer(gw.port, &alice_name, &alice_token).await;
    let started = std::time::Instant::now();
    alice
        .send(json!({"type": "join", "room": room, "since": 0}))
        .await;
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        let frame = alice.recv().await;
        if frame["type"] == "message" {
            seqs.push(frame["seq"].as_u64().unwrap());
            // A slow link: a millisecond or more per 3.9 KB message.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let reading = started.elapsed();
    assert!(
        reading > Duration::from_secs(1),
        "the backlog was read in {reading:?}: too fast to test the silence limit"
    );
    assert!(seqs.iter().copied().eq(1..=n as u64), "backlog not 1..={n}");
    assert_eq!(
        alice.request(json!({"type": "ping"})).await["type"],
        "pong",
        "still connected after {reading:?} of reading"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_protocol_error_is_closed_with_1002() {
    let (_services, gw) = embedded_gateway(|_| {}).await;
    let (user, token) = register(gw.port, "proto").await;
    let mut client = Client::connect(gw.port, &user, &token).await;
    client.send_invalid_utf8_text().await;
    assert_eq!(client.closed().await, 1002);
    gw.stop().await;
}
