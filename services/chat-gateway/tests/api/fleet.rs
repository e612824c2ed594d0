//! End to end through nginx on a local fleet (chat-cluster): the real nginx/nginx.conf in
//! front of gateway processes, Redis and Postgres.

use crate::helpers::*;
use chat_cluster::{Cluster, Options};
use serde_json::json;
use std::collections::BTreeMap;

fn fleet(gateways: usize) -> (Cluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::up(Options {
        gateways,
        gateway_bin: env!("CARGO_BIN_EXE_chat-gateway").into(),
        repo_root: chat_cluster::repo_root(),
        dir: dir.path().to_path_buf(),
        prometheus: false,
        gateway_env: vec![("RUST_LOG".into(), "warn".into())],
    })
    .expect("local fleet starts");
    (cluster, dir)
}

struct Member {
    client: Client,
    token: String,
    gateway: String,
    seen: Vec<u64>,
}

impl Member {
    /// Reads messages until it has seen `upto`.
    async fn catch_up(&mut self, upto: u64) {
        while self.seen.last().copied().unwrap_or(0) < upto {
            let m = self.client.next_message().await;
            self.seen.push(m["seq"].as_u64().unwrap());
        }
    }

    fn assert_complete(&self, upto: u64) {
        assert_eq!(
            self.seen,
            (1..=upto).collect::<Vec<_>>(),
            "{}",
            self.client.user
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_nginx_survives_a_crash_and_grows() {
    let (mut cluster, _dir) = tokio::task::block_in_place(|| fleet(3));
    let port = cluster.nginx_port();
    let room = "lobby";
    let mut members = Vec::new();
    for _ in 0..6 {
        let (user, token) = register(port, "fleet").await;
        let (mut client, gateway) = Client::connect_via(port, &user, &token).await;
        client.join(room).await;
        members.push(Member {
            client,
            token,
            gateway,
            seen: Vec::new(),
        });
    }
    // least_conn spreads the sockets evenly over the three replicas.
    let mut per_gateway: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &members {
        *per_gateway.entry(&m.gateway).or_default() += 1;
    }
    assert_eq!(
        per_gateway.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{per_gateway:?}"
    );

    // Everyone talks; everyone hears everything, in order.
    let mut last = 0;
    for m in &mut members {
        last = m.client.say(room, "hello from my replica").await;
    }
    for m in &mut members {
        m.catch_up(last).await;
        m.assert_complete(last);
    }

    // A replica crashes. Its clients reconnect through nginx and resume from what they hold,
    // while the others keep talking.
    let victim = cluster.gateways()[0].id.clone();
    tokio::task::block_in_place(|| cluster.kill_gateway(0)).unwrap();
    for m in members.iter_mut().filter(|m| m.gateway != victim) {
        last = m.client.say(room, "while they reconnect").await;
    }
    for m in members.iter_mut().filter(|m| m.gateway == victim) {
        m.client.dropped().await;
        let (mut client, gateway) = Client::connect_via(port, &m.client.user, &m.token).await;
        assert_ne!(gateway, victim);
        let since = m.seen.last().copied().unwrap_or(0);
        client
            .send(json!({"type":"join","room":room,"since":since}))
            .await;
        assert_eq!(client.recv_type("joined").await["last_seq"], json!(last));
        m.client = client;
        m.gateway = gateway;
    }
    for m in &mut members {
        last = m.client.say(room, "after the crash").await;
    }
    for m in &mut members {
        m.catch_up(last).await;
        m.assert_complete(last);
    }

    // A replica is added and nginx reloaded: new connections reach it. (A reload restarts
    // nginx's view of who holds how many sockets, so the added replica is not necessarily
    // preferred; least_conn gives it its share as the others fill up.)
    tokio::task::block_in_place(|| cluster.scale(3)).unwrap();
    let newest = cluster.gateways().last().unwrap().id.clone();
    assert_ne!(newest, victim);
    let mut users = Vec::new();
    for _ in 0..9 {
        users.push(register(port, "late").await);
    }
    let mut late = Vec::new();
    for (user, token) in &users {
        late.push(Client::connect_via(port, user, token).await);
    }
    let landed: Vec<String> = late.iter().map(|(_, g)| g.clone()).collect();
    let (mut newcomer, _) = late
        .into_iter()
        .find(|(_, gateway)| *gateway == newest)
        .unwrap_or_else(|| panic!("no new connection reached {newest}: {landed:?}"));
    newcomer
        .send(json!({"type":"join","room":room,"since":0}))
        .await;
    newcomer.recv_type("joined").await;
    let seqs = message_seqs(&mut newcomer, last as usize).await;
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    let seq = newcomer.say(room, "hi, I am on the new replica").await;
    for m in &mut members {
        m.catch_up(seq).await;
        m.assert_complete(seq);
    }
    tokio::task::block_in_place(|| cluster.down());
}
