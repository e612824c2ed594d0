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
        durable_postgres: false,
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

/// Every PromQL expression of a dashboard panel (rows' nested panels included).
fn panel_exprs(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.clone(), expr.to_string()));
            }
        }
        panel_exprs(&panel["panels"], out);
    }
}

/// Grafana's variables, as a dashboard viewer with "All" selected would send them.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("${gateway:regex}", ".*")
        .replace("${gateway}", ".*")
        .replace("$gateway", ".*")
}

async fn prom_query(prometheus: &str, expr: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .expect("prometheus answers")
        .json()
        .await
        .expect("prometheus answers JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_answers_on_a_live_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = tokio::task::block_in_place(|| {
        Cluster::up(Options {
            gateways: 2,
            gateway_bin: env!("CARGO_BIN_EXE_chat-gateway").into(),
            repo_root: chat_cluster::repo_root(),
            dir: dir.path().to_path_buf(),
            prometheus: true,
            durable_postgres: false,
            gateway_env: vec![("RUST_LOG".into(), "warn".into())],
        })
    })
    .expect("local fleet with prometheus starts");
    let prometheus = cluster.prometheus_url().unwrap();
    let port = cluster.nginx_port();

    // Traffic through nginx: sessions on both replicas, messages, typing, an error.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (user, token) = register(port, "obs").await;
        let (mut client, _) = Client::connect_via(port, &user, &token).await;
        client.join("observed").await;
        clients.push(client);
    }
    let mut committed = 0;
    for round in 0..5 {
        for client in &mut clients {
            client.say("observed", &format!("round {round}")).await;
            committed += 1;
        }
    }
    clients[0].send_text("{not json".into()).await;
    clients[0]
        .send(json!({"type":"typing","room":"observed"}))
        .await;

    // Wait until Prometheus has scraped both replicas after the traffic, twice (rates).
    let started = std::time::Instant::now();
    let mut scraped = 0;
    while scraped < 2 {
        let r = prom_query(&prometheus, "sum(chat_messages_committed_total)").await;
        let value = r["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let up = prom_query(&prometheus, "count(up{job=\"chat-gateway\"} == 1)").await;
        let replicas = up["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap_or("0")
            .to_string();
        if value >= committed as f64 && replicas == "2" {
            scraped += 1;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "prometheus never scraped the traffic: {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }

    let mut problems = Vec::new();
    // The dashboard: every panel query parses and returns at least one series.
    let dashboard_path = chat_cluster::repo_root().join("deploy/grafana/dashboards/chat.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    panel_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 10, "only {} panel queries", exprs.len());
    for (title, expr) in &exprs {
        let r = prom_query(&prometheus, &expand(expr)).await;
        if r["status"] != "success" {
            problems.push(format!("panel {title:?}: {expr}: {}", r["error"]));
        } else if r["data"]["result"].as_array().is_none_or(|a| a.is_empty()) {
            problems.push(format!("panel {title:?}: {expr}: no series"));
        }
    }
    // The template variable's values.
    let r = prom_query(&prometheus, "count(chat_build_info)").await;
    assert_eq!(r["data"]["result"][0]["value"][1], "2", "{r}");

    // The alert rules Prometheus loaded from deploy/prometheus/alerts.yml: each parses.
    let rules: serde_json::Value = reqwest::get(format!("{prometheus}/api/v1/rules"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("?").to_string(),
                r["query"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let alerts_file =
        std::fs::read_to_string(chat_cluster::repo_root().join("deploy/prometheus/alerts.yml"))
            .unwrap();
    let declared = alerts_file.matches("- alert:").count();
    assert_eq!(loaded.len(), declared, "prometheus loaded {loaded:?}");
    for (name, query) in &loaded {
        let r = prom_query(&prometheus, query).await;
        if r["status"] != "success" {
            problems.push(format!("alert {name}: {query}: {}", r["error"]));
        }
        let health = rules.to_string();
        if health.contains("\"health\":\"err\"") {
            problems.push(format!("a rule failed to evaluate: {health}"));
            break;
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    drop(clients);
    tokio::task::block_in_place(|| cluster.down());
}
