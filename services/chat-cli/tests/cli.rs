//! End-to-end tests of the `chat` binary against real gateways started in-process in embedded
//! mode (SQLite in a temp data dir). Every wait is bounded; nothing sleeps hoping for the best.

use chat_gateway::{Application, Settings, StartError};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PASSWORD: &str = "password123";
/// Longest wait for one expected line of the interactive client.
const WAIT: Duration = Duration::from_secs(15);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A gateway running on `runtime` until `stop` (or drop).
struct Gateway {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), StartError>>>,
}

impl Gateway {
    /// Starts an embedded-mode gateway on `port` (0: any), retrying briefly while the port is
    /// still held by a gateway that just stopped.
    fn start(runtime: &tokio::runtime::Runtime, data_dir: &Path, port: u16) -> Gateway {
        Gateway::start_with(runtime, data_dir, port, |_| {})
    }

    fn start_with(
        runtime: &tokio::runtime::Runtime,
        data_dir: &Path,
        port: u16,
        tweak: impl Fn(&mut Settings),
    ) -> Gateway {
        let deadline = Instant::now() + Duration::from_secs(10);
        let app = loop {
            let mut settings = Settings::defaults();
            settings.bind = SocketAddr::from(([127, 0, 0, 1], port));
            settings.metrics_bind = SocketAddr::from(([127, 0, 0, 1], 0));
            settings.data_dir = data_dir.to_path_buf();
            settings.database_url = None;
            settings.redis_url = None;
            settings.jwt_secret = None;
            settings.gateway_id = Some(format!("cli-test-{port}"));
            settings.grace_period_secs = 3;
            tweak(&mut settings);
            match runtime.block_on(Application::build(settings)) {
                Ok(app) => break app,
                Err(StartError::Bind { .. }) if port != 0 && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("gateway does not start: {e}"),
            }
        };
        let port = app.port();
        let token = app.shutdown_token();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Sending or dropping `stop` starts the drain (what SIGTERM does).
        runtime.spawn(async move {
            let _ = stopped.await;
            token.cancel();
        });
        let handle = runtime.spawn(app.run_until_stopped());
        Gateway {
            port,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    fn server(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drains (open sockets are closed with 1012) and waits until the gateway has stopped.
    fn stop(mut self, runtime: &tokio::runtime::Runtime) {
        drop(self.stop.take());
        if let Some(handle) = self.handle.take() {
            runtime
                .block_on(handle)
                .expect("gateway task")
                .expect("clean stop");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}

/// A user of the CLI: their own config dir, so their own session.
struct User {
    config: tempfile::TempDir,
}

impl User {
    fn new() -> User {
        User {
            config: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_chat"));
        command
            .args(args)
            .env("CHAT_CONFIG_DIR", self.config.path())
            .env("CHAT_PASSWORD", PASSWORD)
            .env_remove("CHAT_SERVER")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("chat runs")
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "chat {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// Runs a command that must fail; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            !output.status.success(),
            "chat {args:?} succeeded: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stderr).expect("utf-8 output")
    }

    fn register(name: &str, server: &str) -> User {
        let user = User::new();
        user.ok(&["register", "--server", server, name]);
        user
    }

    /// `chat send`; the seq it printed.
    fn send(&self, room: &str, text: &str) -> u64 {
        let out = self.ok(&["send", room, text]);
        out.trim().parse().expect("send prints the seq")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

/// `chat ROOM` with piped standard streams, read by threads.
struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Stream, String)>,
    transcript: Vec<(Stream, String)>,
    /// Per stream (stdout, stderr): the transcript index after the last line `expect` matched.
    /// The two pipes are read by two threads, so only the order within one stream is known.
    cursor: [usize; 2],
}

impl Interactive {
    fn start(user: &User, room: &str) -> Interactive {
        let mut child = user
            .command(&[room])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chat starts");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for (stream, reader) in [
            (Stream::Out, Box::new(out) as Box<dyn std::io::Read + Send>),
            (Stream::Err, Box::new(err)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Interactive {
            child,
            stdin,
            lines,
            transcript: Vec::new(),
            cursor: [0, 0],
        }
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write to chat's stdin");
        stdin.flush().expect("flush");
    }

    /// Closes standard input (end of input: the client quits) and waits for the exit.
    fn end_input(&mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for chat") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "chat did not exit at end of input"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The next line on `stream` (after the one last matched there) that contains `needle`,
    /// reading more lines as needed; panics with the transcript after `WAIT`.
    fn expect(&mut self, stream: Stream, needle: &str) -> String {
        let slot = stream as usize;
        let deadline = Instant::now() + WAIT;
        let mut index = self.cursor[slot];
        loop {
            while index < self.transcript.len() {
                let (s, line) = &self.transcript[index];
                index += 1;
                if *s == stream && line.contains(needle) {
                    self.cursor[slot] = index;
                    return line.clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.transcript.push(line),
                Err(_) => panic!(
                    "no {stream:?} line containing {needle:?} within {WAIT:?}; transcript:\n{}",
                    self.dump()
                ),
            }
        }
    }

    fn dump(&self) -> String {
        self.transcript
            .iter()
            .map(|(s, l)| format!("{s:?}: {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The `[seq] HH:MM user: body` lines printed so far, as (seq, "user: body").
    fn messages(&self) -> Vec<(u64, String)> {
        self.transcript
            .iter()
            .filter(|(s, _)| *s == Stream::Out)
            .map(|(_, line)| parse_message(line).unwrap_or_else(|| panic!("not a message: {line}")))
            .collect()
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[seq] HH:MM user: body` as (seq, "user: body").
fn parse_message(line: &str) -> Option<(u64, String)> {
    let (seq, rest) = line.strip_prefix('[')?.split_once("] ")?;
    let (time, text) = rest.split_once(' ')?;
    if time.len() != 5 || time.as_bytes()[2] != b':' {
        return None;
    }
    Some((seq.parse().ok()?, text.to_string()))
}

#[test]
fn accounts_and_one_shot_commands() {
    let runtime = runtime();
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&runtime, data.path(), 0);
    let server = gateway.server();

    let alice = User::register("alice", &server);
    let session = alice.config.path().join("session.json");
    let mode = std::fs::metadata(&session).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "session.json must be private");
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&session).unwrap()).unwrap();
    assert_eq!(stored["server"], server.as_str());
    assert_eq!(stored["user"], "alice");
    assert!(stored["token"].as_str().is_some_and(|t| !t.is_empty()));

    // A taken name, a wrong password, then the right one (from stdin, as scripts do).
    let err = alice.fails(&["register", "--server", &server, "alice"]);
    assert!(err.contains("username_taken"), "{err}");
    let wrong = alice
        .command(&["login", "--server", &server, "alice"])
        .env("CHAT_PASSWORD", "not-the-password")
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("unauthorized"));
    let mut login = alice
        .command(&["login", "--server", &server, "--password-stdin", "alice"])
        .env_remove("CHAT_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(login.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    assert!(login.wait().unwrap().success());

    // send prints the seq; rooms and history show the message.
    assert_eq!(alice.send("general", "hello from the cli"), 1);
    assert_eq!(alice.ok(&["send", "general", "two", "words"]).trim(), "2");
    // A retry with the same client id stores nothing new: it answers the first seq.
    for _ in 0..2 {
        let seq = alice.ok(&["send", "--client-id", "retry-1", "general", "once"]);
        assert_eq!(seq.trim(), "3");
    }
    let rooms = alice.ok(&["rooms"]);
    assert!(rooms.lines().any(|l| l.starts_with("general")), "{rooms}");
    let history = alice.ok(&["history", "general"]);
    let lines: Vec<_> = history.lines().map(|l| parse_message(l).unwrap()).collect();
    assert_eq!(
        lines,
        [
            (1, "alice: hello from the cli".to_string()),
            (2, "alice: two words".to_string()),
            (3, "alice: once".to_string())
        ]
    );
    let page = alice.ok(&["history", "general", "--limit", "1", "--before", "2"]);
    assert_eq!(parse_message(page.trim()).unwrap().0, 1, "{page}");

    // Refusals exit non-zero with the error code on stderr.
    let err = alice.fails(&["send", "dm:bob:carol", "psst"]);
    assert!(err.contains("forbidden"), "{err}");
    let err = alice.fails(&["send", "general", &"x".repeat(4001)]);
    assert!(err.contains("too_large"), "{err}");
    let err = alice.fails(&["history", "dm:bob:carol"]);
    assert!(err.contains("forbidden"), "{err}");
    let err = alice.fails(&["send", "Not A Room", "hi"]);
    assert!(err.contains("bad_request"), "{err}");

    // A direct room works once both users exist.
    let bob = User::register("bob", &server);
    assert_eq!(bob.send("dm:alice:bob", "hi alice"), 1);
    let dm = alice.ok(&["history", "dm:alice:bob"]);
    assert!(dm.contains("bob: hi alice"), "{dm}");

    alice.ok(&["logout"]);
    assert!(!session.exists());
    let err = alice.fails(&["send", "general", "hello?"]);
    assert!(err.contains("not_logged_in"), "{err}");
    let err = alice.fails(&["rooms"]);
    assert!(err.contains("not_logged_in"), "{err}");

    gateway.stop(&runtime);
    // With no gateway at all, send gives up with `unavailable`.
    let err = bob.fails(&["send", "--timeout", "1", "general", "anyone?"]);
    assert!(err.contains("unavailable"), "{err}");
    assert!(
        err.contains("chat send --client-id "),
        "names the id to retry with: {err}"
    );
}

#[test]
fn interactive_client_survives_a_gateway_restart() {
    let runtime = runtime();
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&runtime, data.path(), 0);
    let (port, server) = (gateway.port, gateway.server());
    let alice = User::register("alice", &server);
    let bob = User::register("bob", &server);
    bob.send("general", "before alice came");

    let mut live = Interactive::start(&alice, "general");
    // The backlog first, then the join.
    live.expect(Stream::Out, "bob: before alice came");
    live.expect(Stream::Err, "joined general");
    live.type_line("hello from alice");
    live.expect(Stream::Out, "alice: hello from alice");
    bob.send("general", "one from bob");
    bob.send("general", "two from bob");
    live.expect(Stream::Out, "bob: two from bob");

    // Drain: the client is closed with 1012 and keeps retrying.
    gateway.stop(&runtime);
    live.expect(Stream::Err, "1012");
    live.type_line("typed while offline");
    live.expect(Stream::Err, "queued");
    // A scripted send while the gateway is down retries until it is back.
    let mut offline_send = bob
        .command(&["send", "general", "three from bob"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let gateway = Gateway::start(&runtime, data.path(), port);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = offline_send.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "send while down never finished");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "send across the restart failed");
    bob.send("general", "four from bob");

    live.expect(Stream::Err, "reconnected");
    live.expect(Stream::Err, "rejoined general");
    for text in ["typed while offline", "three from bob", "four from bob"] {
        if !live.messages().iter().any(|(_, m)| m.ends_with(text)) {
            live.expect(Stream::Out, text);
        }
    }
    // One more round trip: a replayed duplicate would have been printed before it.
    bob.send("general", "five from bob");
    live.expect(Stream::Out, "bob: five from bob");

    let seen = live.messages();
    let seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs,
        expected,
        "every message once, in order:\n{}",
        live.dump()
    );
    let bodies: Vec<&str> = seen.iter().map(|(_, m)| m.as_str()).collect();
    for text in [
        "bob: before alice came",
        "alice: hello from alice",
        "bob: one from bob",
        "bob: two from bob",
        "alice: typed while offline",
        "bob: three from bob",
        "bob: four from bob",
        "bob: five from bob",
    ] {
        assert_eq!(
            bodies.iter().filter(|b| **b == text).count(),
            1,
            "{text:?} printed once:\n{}",
            live.dump()
        );
    }
    assert_eq!(bodies.len(), 8, "{}", live.dump());

    // The line typed while offline was stored exactly once.
    let history = alice.ok(&["history", "general", "--limit", "200"]);
    let stored: Vec<_> = history.lines().filter_map(parse_message).collect();
    assert_eq!(stored.len(), 8, "{history}");
    assert_eq!(
        stored
            .iter()
            .filter(|(_, m)| m == "alice: typed while offline")
            .count(),
        1,
        "{history}"
    );
    assert_eq!(stored, seen, "the client printed what the server stored");

    if std::env::var_os("CHAT_CLI_TEST_TRANSCRIPT").is_some() {
        eprintln!("{}", live.dump());
    }
    drop(live);
    gateway.stop(&runtime);
}

#[test]
fn interactive_commands() {
    let runtime = runtime();
    let data = tempfile::tempdir().unwrap();
    // Server pings every 200 ms: a client that did not answer would be closed (4001) within 0.5 s.
    let gateway = Gateway::start_with(&runtime, data.path(), 0, |s| s.heartbeat_ms = 200);
    let server = gateway.server();
    let alice = User::register("alice", &server);
    let bob = User::register("bob", &server);
    for i in 1..=25 {
        assert_eq!(bob.send("lobby", &format!("old {i}")), i);
    }

    let mut live = Interactive::start(&alice, "lobby");
    live.expect(Stream::Err, "joined lobby");
    // Opening a room shows its newest 20 messages. (Notices go to stderr, a separate pipe: wait
    // for the stdout lines themselves, not for a notice printed after them.)
    live.expect(Stream::Out, "bob: old 25");
    let seqs: Vec<u64> = live.messages().iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (6..=25).collect::<Vec<_>>(), "{}", live.dump());

    live.type_line("/history 3");
    live.expect(Stream::Err, "end of earlier messages (/history for more)");
    live.expect(Stream::Out, "bob: old 5");
    let older: Vec<u64> = live.messages()[20..].iter().map(|(s, _)| *s).collect();
    assert_eq!(older, [3, 4, 5], "{}", live.dump());

    live.type_line("/who");
    live.expect(Stream::Err, "online in lobby: alice");

    // A direct room becomes the current room; other rooms' messages are marked.
    live.type_line("/dm bob");
    live.expect(Stream::Err, "joined dm:alice:bob");
    live.type_line("psst");
    let line = live.expect(Stream::Out, "alice: psst");
    assert!(line.starts_with("[1] "), "{line}");
    bob.send("lobby", "back in the lobby");
    let line = live.expect(Stream::Out, "bob: back in the lobby");
    assert!(line.starts_with("(lobby) [26] "), "{line}");

    live.type_line("/nope");
    live.expect(Stream::Err, "unknown command /nope");
    live.type_line("/leave lobby");
    live.expect(Stream::Err, "left lobby");

    // A line typed just before the end of input is still delivered before the client exits.
    live.type_line("last words");
    assert!(live.end_input().success(), "{}", live.dump());
    let dropped = live
        .transcript
        .iter()
        .any(|(_, l)| l.contains("disconnected"));
    assert!(!dropped, "heartbeats unanswered:\n{}", live.dump());
    let dm = alice.ok(&["history", "dm:alice:bob"]);
    assert!(dm.contains("alice: last words"), "{dm}");

    gateway.stop(&runtime);
}

#[test]
fn piped_lines_arrive_in_order_through_the_rate_limit_and_a_refused_one_fails_the_run() {
    let runtime = runtime();
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start_with(&runtime, data.path(), 0, |s| {
        s.rate_per_sec = 2;
        s.rate_burst = 2;
    });
    let alice = User::register("alice", &gateway.server());
    let mut live = Interactive::start(&alice, "queue");
    live.expect(Stream::Err, "joined queue");
    // Three times the burst at once: some are refused for now and sent again, and all arrive,
    // in the order typed.
    for i in 1..=6 {
        live.type_line(&format!("line {i}"));
    }
    live.expect(Stream::Out, "alice: line 6");
    let lines: Vec<String> = live.messages().into_iter().map(|(_, m)| m).collect();
    let typed: Vec<String> = (1..=6).map(|i| format!("alice: line {i}")).collect();
    assert_eq!(lines, typed, "{}", live.dump());
    // A line that cannot be sent: the run ends with status 1, saying so.
    live.type_line(&"x".repeat(4001));
    live.expect(Stream::Err, "not sent");
    let status = live.end_input();
    assert_eq!(status.code(), Some(1), "{}", live.dump());
    live.expect(Stream::Err, "not_sent: 1 message(s) were not sent");
    gateway.stop(&runtime);
}
