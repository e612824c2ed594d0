//! Test harness: gateways (in-process or as processes) over real Redis/Postgres/SQLite, and a
//! WebSocket client that speaks protocol v1.

use chat_gateway::{Application, Settings};
use chat_testkit::{RedisServer, shared_postgres};
use futures_util::{SinkExt, StreamExt};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";
/// How long a test waits for an expected frame before failing.
pub const WAIT: Duration = Duration::from_secs(10);

static NEXT: AtomicU64 = AtomicU64::new(1);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}_{}",
        std::process::id() % 1000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Clustered,
}

/// Settings every test gateway starts from: loopback, port 0, quick probes and heartbeats.
pub fn base_settings() -> Settings {
    let mut s = Settings::defaults();
    s.bind = "127.0.0.1:0".parse().unwrap();
    s.metrics_bind = "127.0.0.1:0".parse().unwrap();
    s.jwt_secret = Some(SecretString::from(SECRET));
    s.gateway_id = Some(unique("gw"));
    s.probe_interval_ms = 200;
    s.presence_timeout_secs = 3;
    s.grace_period_secs = 3;
    s.redis_timeout_ms = 1000;
    s.store_timeout_ms = 2000;
    s.db_pool_size = 8;
    s
}

/// The services one test's gateways share.
pub struct Services {
    pub redis: Option<RedisServer>,
    pub database_url: Option<String>,
    pub data_dir: tempfile::TempDir,
}

impl Services {
    pub fn start(backend: Backend) -> Services {
        let data_dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Embedded => Services {
                redis: None,
                database_url: None,
                data_dir,
            },
            Backend::Clustered => Services {
                redis: Some(RedisServer::start()),
                database_url: Some(shared_postgres().create_database()),
                data_dir,
            },
        }
    }

    pub fn settings(&self) -> Settings {
        let mut s = base_settings();
        s.data_dir = self.data_dir.path().to_path_buf();
        if let Some(redis) = &self.redis {
            s.redis_url = Some(SecretString::from(redis.url()));
        }
        if let Some(db) = &self.database_url {
            s.database_url = Some(SecretString::from(db.clone()));
        }
        s
    }

    pub async fn gateway(&self) -> Gateway {
        Gateway::start(self.settings()).await
    }
}

/// An embedded gateway on the test settings changed by `tweak`. The services hold its data
/// folder: keep them as long as the gateway.
pub async fn embedded_gateway(tweak: impl FnOnce(&mut Settings)) -> (Services, Gateway) {
    let services = Services::start(Backend::Embedded);
    let mut settings = services.settings();
    tweak(&mut settings);
    let gateway = Gateway::start(settings).await;
    (services, gateway)
}

/// An in-process gateway.
pub struct Gateway {
    pub port: u16,
    pub metrics_port: u16,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), chat_gateway::StartError>>>,
}

impl Gateway {
    pub async fn start(settings: Settings) -> Gateway {
        let app = Application::build(settings).await.expect("gateway starts");
        let (port, metrics_port) = (app.port(), app.metrics_port());
        let shutdown = app.shutdown_token();
        let handle = tokio::spawn(app.run_until_stopped());
        Gateway {
            port,
            metrics_port,
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Drains and waits for the gateway to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.expect("join").expect("clean stop");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A gateway as a separate process, so that it can be killed with SIGKILL or sent SIGTERM.
pub struct GatewayProcess {
    pub port: u16,
    pub metrics_port: u16,
    pub child: Child,
}

impl GatewayProcess {
    pub async fn start(services: &Services, extra: &[(&str, &str)]) -> GatewayProcess {
        Self::start_with_logs(services, extra, Stdio::null()).await
    }

    /// Starts with the process's logs (its standard output) going to `logs`.
    pub async fn start_with_logs(
        services: &Services,
        extra: &[(&str, &str)],
        logs: impl Into<Stdio>,
    ) -> GatewayProcess {
        let port = chat_testkit::free_port();
        let metrics_port = chat_testkit::free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-gateway"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CHAT_BIND", format!("127.0.0.1:{port}"))
            .env("CHAT_METRICS_BIND", format!("127.0.0.1:{metrics_port}"))
            .env("CHAT_JWT_SECRET", SECRET)
            .env("CHAT_GATEWAY_ID", unique("proc"))
            .env("CHAT_PROBE_INTERVAL_MS", "200")
            .env("CHAT_PRESENCE_TIMEOUT_SECS", "3")
            .env("CHAT_DATA_DIR", services.data_dir.path())
            .env("RUST_LOG", "warn")
            .stdout(logs)
            .stderr(Stdio::inherit());
        if let Some(redis) = &services.redis {
            cmd.env("CHAT_REDIS_URL", redis.url());
        }
        if let Some(db) = &services.database_url {
            cmd.env("CHAT_DATABASE_URL", db);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("chat-gateway binary starts");
        let process = GatewayProcess {
            port,
            metrics_port,
            child,
        };
        process.wait_ready().await;
        process
    }

    /// Waits (30 s at most) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let url = self.http("/readyz");
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(r) = reqwest::get(&url).await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway process on port {} never became ready", self.port);
    }

    /// The URL of `path` on this process's public listener.
    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The value of a counter on this process's metrics listener (0 if not yet exported).
    pub async fn counter(&self, name: &str) -> f64 {
        let text = metrics_text(self.metrics_port).await;
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends a signal by name (TERM, KILL) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.child.id());
    }

    pub fn kill(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registers a fresh user; returns (name, token).
pub async fn register(port: u16, prefix: &str) -> (String, String) {
    let name = unique(prefix);
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/register"))
        .json(&json!({"username": name, "password": "password123"}))
        .send()
        .await
        .expect("register request");
    assert_eq!(response.status(), 201, "register {name}");
    let body: Value = response.json().await.unwrap();
    (name, body["token"].as_str().unwrap().to_string())
}

/// Two fresh users, the first connected to `port_a` and the second to `port_b`, both joined to a
/// fresh room (the first joins first); returns (first, second, room).
pub async fn pair_in_room(port_a: u16, port_b: u16, prefix: &str) -> (Client, Client, String) {
    let (alice, ta) = register(port_a, "alice").await;
    let (bob, tb) = register(port_b, "bob").await;
    let room = unique(prefix);
    let mut a = Client::connect(port_a, &alice, &ta).await;
    let mut b = Client::connect(port_b, &bob, &tb).await;
    a.join(&room).await;
    b.join(&room).await;
    (a, b, room)
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol v1 client.
pub struct Client {
    ws: Ws,
    pub user: String,
    /// Frames read while waiting for a reply, handed out by `recv` in arrival order.
    stash: std::collections::VecDeque<Value>,
}

pub async fn raw_ws(port: u16) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://127.0.0.1:{port}/ws"),
        None,
        true,
    )
    .await
    .expect("websocket connects");
    ws
}

impl Client {
    fn over(ws: Ws, user: &str) -> Client {
        Client {
            ws,
            user: user.to_string(),
            stash: Default::default(),
        }
    }

    /// Sends hello and returns the welcome.
    async fn hello(&mut self, token: &str) -> Value {
        self.send(json!({"type": "hello", "token": token})).await;
        let welcome = self.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        welcome
    }

    /// Connects and completes the hello handshake; returns the client and its gateway's id.
    pub async fn connect_via(port: u16, user: &str, token: &str) -> (Client, String) {
        let mut client = Client::over(raw_ws(port).await, user);
        let welcome = client.hello(token).await;
        let gateway = welcome["gateway"].as_str().unwrap().to_string();
        (client, gateway)
    }

    /// Connects and completes the hello handshake.
    pub async fn connect(port: u16, user: &str, token: &str) -> Client {
        let mut client = Client::over(raw_ws(port).await, user);
        let welcome = client.hello(token).await;
        assert_eq!(welcome["user"], user);
        client
    }

    /// Connects with a tiny socket receive buffer, so that not reading backs up quickly.
    pub async fn connect_small_buffer(port: u16, user: &str, token: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("tcp connects");
        tcp.set_nodelay(true).unwrap();
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://127.0.0.1:{port}/ws"),
            MaybeTlsStream::Plain(tcp),
        )
        .await
        .expect("websocket connects");
        let mut client = Client::over(ws, user);
        client.hello(token).await;
        client
    }

    /// Connects without a hello.
    pub async fn connect_raw(port: u16) -> Client {
        Client::over(raw_ws(port).await, "(raw)")
    }

    /// Waits until the connection ends however it ends (a crashed gateway sends no close).
    pub async fn dropped(&mut self) {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => self
                    .stash
                    .push_back(serde_json::from_str(&t).expect("json frame")),
                Ok(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => return,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("{}: connection still open after {WAIT:?}", self.user),
            }
        }
    }

    /// Reads whatever was queued before the close, then returns the close code.
    pub async fn closed_after_backlog(&mut self) -> u16 {
        let started = std::time::Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_secs(30) {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(frame))))) => return frame.code.into(),
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) => return 1005,
                Ok(Some(Ok(_))) => {
                    n += 1;
                    continue;
                }
                Ok(Some(Err(e))) => panic!("{}: socket error before close: {e}", self.user),
                Err(_) => break,
            }
        }
        panic!("{}: not closed after {n} frames", self.user);
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("send frame");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws
            .send(Message::binary(data))
            .await
            .expect("send frame");
    }

    pub async fn send_ping(&mut self) {
        self.ws
            .send(Message::Ping(Default::default()))
            .await
            .expect("send ping");
    }

    /// Sends a text frame whose payload is not UTF-8: a WebSocket protocol error.
    pub async fn send_invalid_utf8_text(&mut self) {
        use tokio_tungstenite::tungstenite::protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        };
        let frame = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
        self.ws
            .send(Message::Frame(frame))
            .await
            .expect("send frame");
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send frame");
    }

    /// The next text frame as JSON (control frames are skipped).
    pub async fn recv(&mut self) -> Value {
        if let Some(frame) = self.stash.pop_front() {
            return frame;
        }
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {WAIT:?}", self.user));
            match next {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("json frame"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{}: expected a text frame, got {other:?}", self.user),
            }
        }
    }

    /// The next frame of `kind`, skipping presence and typing notices on the way.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
            let skippable = frame["type"] == "presence" || frame["type"] == "typing";
            assert!(skippable, "{}: expected {kind}, got {frame}", self.user);
        }
    }

    /// Sends a frame and returns the reply carrying its ref.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let reference = unique("r");
        frame["ref"] = json!(reference);
        self.send(frame).await;
        loop {
            let reply = self.recv_socket().await;
            if reply["ref"] == json!(reference) {
                return reply;
            }
            let expected = matches!(
                reply["type"].as_str(),
                Some("presence" | "typing" | "message")
            );
            assert!(expected, "{}: unexpected {reply}", self.user);
            self.stash.push_back(reply);
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        let joined = self.request(json!({"type": "join", "room": room})).await;
        assert_eq!(joined["type"], "joined", "{joined}");
        joined
    }

    /// Sends a message; returns its seq from `sent`.
    pub async fn say(&mut self, room: &str, body: &str) -> u64 {
        let sent = self
            .request(json!({"type": "send", "room": room, "body": body}))
            .await;
        assert_eq!(sent["type"], "sent", "{sent}");
        sent["seq"].as_u64().unwrap()
    }

    /// The next text frame from the socket itself, past the stash.
    async fn recv_socket(&mut self) -> Value {
        let stash = std::mem::take(&mut self.stash);
        let frame = self.recv().await;
        let read = std::mem::replace(&mut self.stash, stash);
        debug_assert!(read.is_empty());
        frame
    }

    /// Drops frames read while waiting for replies.
    pub fn forget_stash(&mut self) {
        self.stash.clear();
    }

    /// The next `message` frame.
    pub async fn next_message(&mut self) -> Value {
        self.recv_type("message").await
    }

    /// Waits for the server to close; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: not closed within {WAIT:?}", self.user));
            match next {
                Some(Ok(Message::Close(Some(frame)))) => return frame.code.into(),
                Some(Ok(Message::Close(None))) | None => return 1005,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("{}: socket error before close: {e}", self.user),
            }
        }
    }

    /// Asserts nothing but control frames arrives for a short while.
    pub async fn quiet(&mut self, for_: Duration) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(for_, self.ws.next()).await {
            panic!("{}: expected silence, got {t}", self.user);
        }
    }
}

/// The seqs of `n` consecutive message frames.
pub async fn message_seqs(client: &mut Client, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        seqs.push(client.next_message().await["seq"].as_u64().unwrap());
    }
    seqs
}

/// The `/metrics` page of the gateway whose metrics listener is on `metrics_port`.
pub async fn metrics_text(metrics_port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .unwrap()
}
