//! One connection to the gateway that outlives its WebSocket: it says `hello`, joins rooms, sends
//! with a `client_id`, and when the socket drops (restart 1012, slow consumer 4008, crash) it
//! reconnects with backoff and jitter, re-joins every room with `since` = the highest seq it holds,
//! and re-sends every unacknowledged message with its original `client_id`. So each message is
//! delivered to the caller exactly once and in seq order, and each send is stored once.
//!
//! The connection is a task; [`Connection`] sends it commands and [`Event`]s come back on a
//! bounded channel (a caller that stops reading eventually stops the socket being read, and the
//! gateway then drops it as a slow consumer, after which it resumes like after any drop).

use crate::api::{root_cause, ws_url};
use chat_protocol::frames::{
    PresenceState, ServerEnvelope, ServerFrame, StoredMessage, parse_server_frame,
};
use chat_protocol::{
    CLOSE_HEARTBEAT_TIMEOUT, CLOSE_POLICY, CLOSE_SERVICE_RESTART, CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG, ClientFrame, ClientId, ErrorCode, MessageBody, RoomName, Username,
};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for the TCP + WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for `welcome` after `hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(5);
/// A session shorter than this counts as a failed attempt for the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(2);
/// Longest pause between two reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Pause before re-sending a message the gateway refused for a passing reason.
const RESEND_DELAY: Duration = Duration::from_secs(1);
/// How often a message refused for a passing reason is tried before giving up on it.
const MAX_SEND_ATTEMPTS: u32 = 10;
/// Events waiting for the caller.
const EVENT_QUEUE: usize = 1024;

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gateway's base URL, `http://host:port`.
    pub server: String,
    pub token: String,
}

/// What a command or error was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum About {
    Join(RoomName),
    Send {
        room: RoomName,
        client_id: ClientId,
    },
    Older(RoomName),
    /// An error frame that answers no request of ours.
    Connection,
}

/// What the connection reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `welcome` arrived; `reconnect` if this is not the first socket.
    Connected {
        user: Username,
        gateway: String,
        reconnect: bool,
    },
    /// The socket is gone; the next attempt starts after `retry_in`.
    Disconnected {
        reason: String,
        retry_in: Duration,
    },
    /// A room was joined (`resumed`: re-joined after a reconnect).
    Joined {
        room: RoomName,
        online: Vec<Username>,
        resumed: bool,
    },
    Left {
        room: RoomName,
    },
    /// A message not delivered before: in seq order per room, each once. The first join of a
    /// room with a backlog delivers its newest messages this way too.
    Message(StoredMessage),
    /// Older messages asked for with [`Connection::older`], in ascending seq order.
    Older {
        room: RoomName,
        messages: Vec<StoredMessage>,
        has_more: bool,
    },
    /// A send waits for the connection (or the room's join); it goes out with its `client_id`.
    Queued {
        room: RoomName,
        client_id: ClientId,
    },
    /// The gateway committed a send.
    Sent {
        room: RoomName,
        seq: u64,
        client_id: ClientId,
    },
    /// A request was refused for good.
    Failed {
        about: About,
        code: ErrorCode,
        message: String,
    },
    Presence {
        room: RoomName,
        user: Username,
        state: PresenceState,
    },
    Typing {
        room: RoomName,
        user: Username,
    },
    /// The connection gave up (the token was refused); no more events follow.
    Fatal {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug)]
enum Command {
    Join { room: RoomName, backlog: u32 },
    Leave { room: RoomName },
    Send(Outgoing),
    Older { room: RoomName, limit: u32 },
    Typing { room: RoomName },
}

/// The caller's end. Dropping it closes the socket and ends the task.
pub struct Connection {
    commands: mpsc::UnboundedSender<Command>,
}

/// Starts connecting (in a task on the current runtime).
pub fn connect(config: Config) -> (Connection, mpsc::Receiver<Event>) {
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
    let actor = Actor {
        ws_url: ws_url(&config.server),
        token: config.token,
        commands,
        events,
        rooms: BTreeMap::new(),
        outbox: Vec::new(),
        pending: HashMap::new(),
        next_ref: 1,
        resend_at: None,
        connected_before: false,
    };
    tokio::spawn(actor.run());
    (
        Connection {
            commands: commands_tx,
        },
        events_rx,
    )
}

/// A fresh idempotency key for one message.
pub fn new_client_id() -> ClientId {
    let mut rng = rand::rng();
    let id = format!(
        "cli-{:016x}{:016x}",
        rng.random::<u64>(),
        rng.random::<u64>()
    );
    ClientId::parse(id).unwrap_or_else(|_| unreachable!("36 bytes is a valid client_id"))
}

impl Connection {
    /// Joins `room` (and re-joins it after every reconnect). On the first join, the newest
    /// `backlog` messages are delivered first (0: only messages after the join).
    pub fn join(&self, room: RoomName, backlog: u32) {
        self.command(Command::Join { room, backlog });
    }

    pub fn leave(&self, room: RoomName) {
        self.command(Command::Leave { room });
    }

    /// Sends `body` to a room this connection joined; returns the message's `client_id`.
    pub fn send(&self, room: RoomName, body: MessageBody) -> ClientId {
        self.send_as(room, body, new_client_id())
    }

    /// Sends with the caller's `client_id` (a retry of an earlier attempt).
    pub fn send_as(&self, room: RoomName, body: MessageBody, client_id: ClientId) -> ClientId {
        self.command(Command::Send(Outgoing {
            room,
            body,
            client_id: client_id.clone(),
            in_flight: false,
            attempts: 0,
        }));
        client_id
    }

    /// Asks for up to `limit` messages older than the oldest one delivered so far.
    pub fn older(&self, room: RoomName, limit: u32) {
        self.command(Command::Older { room, limit });
    }

    pub fn typing(&self, room: RoomName) {
        self.command(Command::Typing { room });
    }

    fn command(&self, command: Command) {
        // The task only ends when this handle is dropped or after `Fatal`; then there is
        // nothing left to do with a command.
        let _ = self.commands.send(command);
    }
}

#[derive(Debug)]
struct Outgoing {
    room: RoomName,
    body: MessageBody,
    client_id: ClientId,
    /// Sent on the current socket, no answer yet.
    in_flight: bool,
    /// Refusals for a passing reason (rate limit, store unavailable).
    attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not yet asked on this socket.
    Waiting,
    /// First join with a backlog: the newest page was asked for; the join follows.
    History,
    Joining,
    Joined,
}

#[derive(Debug)]
struct Room {
    /// The highest seq delivered (`None` until the first history page or join answered).
    last_seq: Option<u64>,
    /// The lowest seq delivered, for [`Connection::older`].
    oldest: Option<u64>,
    backlog: u32,
    phase: Phase,
    joined_before: bool,
}

/// What a request in flight on the current socket was, by its `ref`.
#[derive(Debug)]
enum Pending {
    History(RoomName),
    Join(RoomName),
    Leave,
    Send(ClientId),
    Older(RoomName),
}

enum Opened {
    Socket(Box<Ws>, Username, String, Duration),
    Failed(String),
    Fatal(ErrorCode, String),
}

enum End {
    Quit,
    Lost(String),
    Fatal(ErrorCode, String),
}

struct Actor {
    ws_url: String,
    token: String,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<Event>,
    /// The rooms the caller wants to be in, joined or not yet.
    rooms: BTreeMap<RoomName, Room>,
    /// Sends not yet acknowledged, in the order they were asked for.
    outbox: Vec<Outgoing>,
    pending: HashMap<u64, Pending>,
    next_ref: u64,
    resend_at: Option<Instant>,
    connected_before: bool,
}

impl Actor {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let (reason, healthy) = match self.open().await {
                Opened::Socket(mut ws, user, gateway, heartbeat) => {
                    let reconnect = std::mem::replace(&mut self.connected_before, true);
                    self.emit(Event::Connected {
                        user,
                        gateway,
                        reconnect,
                    })
                    .await;
                    let started = Instant::now();
                    match self.serve(&mut ws, heartbeat).await {
                        End::Quit => return,
                        End::Fatal(code, message) => {
                            self.emit(Event::Fatal { code, message }).await;
                            return;
                        }
                        End::Lost(reason) => (reason, started.elapsed() >= HEALTHY_SESSION),
                    }
                }
                Opened::Failed(reason) => (reason, false),
                Opened::Fatal(code, message) => {
                    self.emit(Event::Fatal { code, message }).await;
                    return;
                }
            };
            if healthy {
                failures = 0;
            }
            let retry_in = backoff(failures);
            failures = failures.saturating_add(1);
            self.emit(Event::Disconnected { reason, retry_in }).await;
            if !self.wait_offline(retry_in).await {
                return;
            }
        }
    }

    async fn emit(&self, event: Event) {
        // A caller that dropped its receiver no longer cares.
        let _ = self.events.send(event).await;
    }

    /// Connects and completes the `hello` handshake.
    async fn open(&mut self) -> Opened {
        let connecting =
            tokio_tungstenite::connect_async_with_config(self.ws_url.as_str(), None, true);
        let mut ws = match timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => return Opened::Failed(format!("{}: connect timed out", self.ws_url)),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                return Opened::Failed(format!(
                    "{} refused the connection ({}; draining or full)",
                    self.ws_url,
                    response.status()
                ));
            }
            Ok(Err(e)) => return Opened::Failed(format!("{}: {}", self.ws_url, root_cause(&e))),
            Ok(Ok((ws, _))) => ws,
        };
        let hello = ClientFrame::Hello {
            token: self.token.clone(),
        }
        .encode(None);
        if let Err(e) = ws.send(Message::text(hello)).await {
            return Opened::Failed(format!("sending hello: {}", root_cause(&e)));
        }
        let deadline = Instant::now() + WELCOME_TIMEOUT;
        loop {
            let Ok(next) = timeout_at(deadline, ws.next()).await else {
                return Opened::Failed("no welcome from the gateway".into());
            };
            match next {
                Some(Ok(Message::Text(text))) => match parse_server_frame(&text) {
                    Ok(ServerEnvelope {
                        frame:
                            ServerFrame::Welcome {
                                user,
                                gateway,
                                heartbeat_ms,
                                ..
                            },
                        ..
                    }) => {
                        let heartbeat = Duration::from_millis(heartbeat_ms.max(1));
                        return Opened::Socket(Box::new(ws), user, gateway, heartbeat);
                    }
                    Ok(ServerEnvelope {
                        frame: ServerFrame::Error { code, message },
                        ..
                    }) if code == ErrorCode::Unauthorized => {
                        return Opened::Fatal(
                            code,
                            format!("{message}: log in again with `chat login USERNAME`"),
                        );
                    }
                    Ok(ServerEnvelope {
                        frame: ServerFrame::Error { code, message },
                        ..
                    }) => return Opened::Failed(format!("hello refused: {code}: {message}")),
                    _ => {}
                },
                Some(Ok(Message::Close(frame))) => return Opened::Failed(close_reason(frame)),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Opened::Failed(format!("connection lost: {}", root_cause(&e)));
                }
                None => return Opened::Failed("connection closed before welcome".into()),
            }
        }
    }

    /// Runs one socket until it ends.
    async fn serve(&mut self, ws: &mut Ws, heartbeat: Duration) -> End {
        self.pending.clear();
        self.resend_at = None;
        for room in self.rooms.values_mut() {
            room.phase = Phase::Waiting;
        }
        for outgoing in &mut self.outbox {
            outgoing.in_flight = false;
        }
        let rooms: Vec<RoomName> = self.rooms.keys().cloned().collect();
        for room in rooms {
            if let Err(reason) = self.start_room(ws, &room).await {
                return End::Lost(reason);
            }
        }
        // The gateway pings every `heartbeat`; much longer silence means a dead peer.
        let silence = heartbeat.mul_f64(2.5).max(Duration::from_secs(5));
        // Moved only by what the gateway sends: typing (a command) must not keep a silently
        // dead connection looking alive.
        let mut heard_by = Instant::now() + silence;
        loop {
            let resend_at = self.resend_at;
            tokio::select! {
                next = timeout_at(heard_by, ws.next()) => {
                    let Ok(next) = next else {
                        return End::Lost(format!("nothing heard from the gateway for {silence:?}"));
                    };
                    heard_by = Instant::now() + silence;
                    match next {
                        Some(Ok(Message::Text(text))) => {
                            if let Err(end) = self.on_frame(ws, &text).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            if frame.as_ref().is_some_and(|f| u16::from(f.code) == CLOSE_POLICY) {
                                return End::Fatal(ErrorCode::Unauthorized, close_reason(frame));
                            }
                            return End::Lost(close_reason(frame));
                        }
                        // Pings are answered by the WebSocket library as it reads.
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            return End::Lost(format!("connection lost: {}", root_cause(&e)));
                        }
                        None => return End::Lost("connection closed".into()),
                    }
                }
                command = self.commands.recv() => match command {
                    None => {
                        let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                        return End::Quit;
                    }
                    Some(command) => {
                        if let Err(reason) = self.command(Some(&mut *ws), command).await {
                            return End::Lost(reason);
                        }
                    }
                },
                () = sleep_until(resend_at.unwrap_or_else(Instant::now)), if resend_at.is_some() => {
                    self.resend_at = None;
                    if let Err(reason) = self.flush_outbox(ws, None).await {
                        return End::Lost(reason);
                    }
                }
            }
        }
    }

    /// Waits out a backoff pause, still taking commands (sends are queued).
    async fn wait_offline(&mut self, pause: Duration) -> bool {
        let deadline = Instant::now() + pause;
        loop {
            tokio::select! {
                () = sleep_until(deadline) => return true,
                command = self.commands.recv() => match command {
                    None => return false,
                    Some(command) => {
                        // Without a socket nothing can fail on the wire.
                        let _ = self.command(None, command).await;
                    }
                },
            }
        }
    }

    async fn command(&mut self, ws: Option<&mut Ws>, command: Command) -> Result<(), String> {
        match command {
            Command::Join { room, backlog } => {
                if self.rooms.contains_key(&room) {
                    return Ok(());
                }
                self.rooms.insert(
                    room.clone(),
                    Room {
                        last_seq: None,
                        oldest: None,
                        backlog: backlog.min(chat_protocol::frames::HISTORY_MAX_LIMIT),
                        phase: Phase::Waiting,
                        joined_before: false,
                    },
                );
                if let Some(ws) = ws {
                    self.start_room(ws, &room).await?;
                }
            }
            Command::Leave { room } => {
                let Some(left) = self.rooms.remove(&room) else {
                    return Ok(());
                };
                self.fail_sends_to(
                    &room,
                    ErrorCode::NotJoined,
                    "left the room before it was sent",
                )
                .await;
                if let Some(ws) = ws
                    && left.phase != Phase::Waiting
                {
                    let frame = ClientFrame::Leave { room: room.clone() };
                    self.request(ws, frame, Pending::Leave).await?;
                }
                self.emit(Event::Left { room }).await;
            }
            Command::Send(outgoing) => {
                let room = outgoing.room.clone();
                let Some(state) = self.rooms.get(&room) else {
                    let about = About::Send {
                        room,
                        client_id: outgoing.client_id,
                    };
                    self.emit(Event::Failed {
                        about,
                        code: ErrorCode::NotJoined,
                        message: "join the room first".into(),
                    })
                    .await;
                    return Ok(());
                };
                let ready = state.phase == Phase::Joined && ws.is_some();
                let client_id = outgoing.client_id.clone();
                self.outbox.push(outgoing);
                match ws {
                    Some(ws) if ready => self.flush_outbox(ws, Some(&room)).await?,
                    _ => self.emit(Event::Queued { room, client_id }).await,
                }
            }
            Command::Older { room, limit } => {
                let oldest = self.rooms.get(&room).map(|r| (r.oldest, r.last_seq));
                let before = match (oldest, ws.is_some()) {
                    (None, _) => {
                        let about = About::Older(room);
                        let message = "not in this room".to_string();
                        self.emit(Event::Failed {
                            about,
                            code: ErrorCode::NotJoined,
                            message,
                        })
                        .await;
                        return Ok(());
                    }
                    (Some(_), false) => {
                        let about = About::Older(room);
                        let message = "not connected; try again when reconnected".to_string();
                        self.emit(Event::Failed {
                            about,
                            code: ErrorCode::Unavailable,
                            message,
                        })
                        .await;
                        return Ok(());
                    }
                    (Some((Some(oldest), _)), true) => Some(oldest),
                    // Nothing delivered yet: older than everything after the join point.
                    (Some((None, last)), true) => last.map(|l| l + 1),
                };
                if before.is_some_and(|b| b <= 1) {
                    let event = Event::Older {
                        room,
                        messages: Vec::new(),
                        has_more: false,
                    };
                    self.emit(event).await;
                    return Ok(());
                }
                if let Some(ws) = ws {
                    let limit = limit.clamp(1, chat_protocol::frames::HISTORY_MAX_LIMIT);
                    let frame = ClientFrame::History {
                        room: room.clone(),
                        before,
                        limit,
                    };
                    self.request(ws, frame, Pending::Older(room)).await?;
                }
            }
            Command::Typing { room } => {
                let joined = self
                    .rooms
                    .get(&room)
                    .is_some_and(|r| r.phase == Phase::Joined);
                if let Some(ws) = ws
                    && joined
                {
                    send_text(ws, ClientFrame::Typing { room }.encode(None)).await?;
                }
            }
        }
        Ok(())
    }

    /// Asks for a room on this socket: the backlog page first if one is wanted and nothing is
    /// held yet, otherwise the join with `since`.
    async fn start_room(&mut self, ws: &mut Ws, room: &RoomName) -> Result<(), String> {
        let Some(state) = self.rooms.get_mut(room) else {
            return Ok(());
        };
        if state.last_seq.is_none() && state.backlog > 0 {
            state.phase = Phase::History;
            let frame = ClientFrame::History {
                room: room.clone(),
                before: None,
                limit: state.backlog,
            };
            self.request(ws, frame, Pending::History(room.clone()))
                .await
        } else {
            state.phase = Phase::Joining;
            let frame = ClientFrame::Join {
                room: room.clone(),
                since: state.last_seq,
            };
            self.request(ws, frame, Pending::Join(room.clone())).await
        }
    }

    async fn request(
        &mut self,
        ws: &mut Ws,
        frame: ClientFrame,
        pending: Pending,
    ) -> Result<(), String> {
        let reference = self.next_ref;
        self.next_ref += 1;
        self.pending.insert(reference, pending);
        send_text(ws, frame.encode(Some(&Value::from(reference)))).await
    }

    /// Sends the oldest queued message of every joined room (only `room`'s, if given). One
    /// send per room is in flight at a time, and the next goes when it is acked: a send that is
    /// refused for now (rate limited) and tried again must not land after later ones.
    async fn flush_outbox(&mut self, ws: &mut Ws, room: Option<&RoomName>) -> Result<(), String> {
        let mut frames = Vec::new();
        let mut waiting: Vec<&RoomName> = Vec::new();
        for outgoing in &mut self.outbox {
            if waiting.contains(&&outgoing.room) {
                continue;
            }
            waiting.push(&outgoing.room);
            let ready = self
                .rooms
                .get(&outgoing.room)
                .is_some_and(|r| r.phase == Phase::Joined);
            if outgoing.in_flight || !ready || room.is_some_and(|r| *r != outgoing.room) {
                continue;
            }
            outgoing.in_flight = true;
            frames.push((
                ClientFrame::Send {
                    room: outgoing.room.clone(),
                    body: outgoing.body.clone(),
                    client_id: Some(outgoing.client_id.clone()),
                },
                outgoing.client_id.clone(),
            ));
        }
        for (frame, client_id) in frames {
            self.request(ws, frame, Pending::Send(client_id)).await?;
        }
        Ok(())
    }

    async fn fail_sends_to(&mut self, room: &RoomName, code: ErrorCode, message: &str) {
        let (failed, kept) = std::mem::take(&mut self.outbox)
            .into_iter()
            .partition(|o| o.room == *room);
        self.outbox = kept;
        for outgoing in failed {
            let about = About::Send {
                room: outgoing.room,
                client_id: outgoing.client_id,
            };
            let message = message.to_string();
            self.emit(Event::Failed {
                about,
                code,
                message,
            })
            .await;
        }
    }

    /// Handles one frame; `Err` ends the socket.
    async fn on_frame(&mut self, ws: &mut Ws, text: &str) -> Result<(), End> {
        // Frames of a newer protocol are ignored rather than fatal.
        let Ok(envelope) = parse_server_frame(text) else {
            return Ok(());
        };
        let pending = envelope
            .reference
            .as_ref()
            .and_then(Value::as_u64)
            .and_then(|r| self.pending.remove(&r));
        match envelope.frame {
            ServerFrame::Message(message) => self.on_message(message).await,
            ServerFrame::History {
                room,
                messages,
                has_more,
            } => match pending {
                Some(Pending::History(_)) => self
                    .on_backlog(ws, room, messages)
                    .await
                    .map_err(End::Lost)?,
                Some(Pending::Older(_)) => {
                    if let Some(state) = self.rooms.get_mut(&room)
                        && let Some(first) = messages.first()
                    {
                        state.oldest = Some(state.oldest.map_or(first.seq, |o| o.min(first.seq)));
                    }
                    let event = Event::Older {
                        room,
                        messages,
                        has_more,
                    };
                    self.emit(event).await;
                }
                _ => {}
            },
            ServerFrame::Joined {
                room,
                last_seq,
                online,
            } => {
                let Some(state) = self.rooms.get_mut(&room) else {
                    return Ok(());
                };
                if !matches!(pending, Some(Pending::Join(_))) || state.phase != Phase::Joining {
                    return Ok(());
                }
                state.phase = Phase::Joined;
                state.last_seq.get_or_insert(last_seq);
                let resumed = std::mem::replace(&mut state.joined_before, true);
                self.emit(Event::Joined {
                    room: room.clone(),
                    online,
                    resumed,
                })
                .await;
                self.flush_outbox(ws, Some(&room))
                    .await
                    .map_err(End::Lost)?;
            }
            ServerFrame::Sent { room, seq, .. } => {
                if let Some(Pending::Send(client_id)) = pending {
                    self.outbox.retain(|o| o.client_id != client_id);
                    self.emit(Event::Sent {
                        room: room.clone(),
                        seq,
                        client_id,
                    })
                    .await;
                    self.flush_outbox(ws, Some(&room))
                        .await
                        .map_err(End::Lost)?;
                }
            }
            ServerFrame::Typing { room, user } => {
                if self.rooms.contains_key(&room) {
                    self.emit(Event::Typing { room, user }).await;
                }
            }
            ServerFrame::Presence { room, user, state } => {
                if self.rooms.contains_key(&room) {
                    self.emit(Event::Presence { room, user, state }).await;
                }
            }
            ServerFrame::Error { code, message } => {
                self.on_error(ws, pending, code, message).await?;
            }
            ServerFrame::Left { .. } | ServerFrame::Pong | ServerFrame::Welcome { .. } => {}
        }
        Ok(())
    }

    /// Delivers a live or backlog message unless it was delivered before.
    async fn on_message(&mut self, message: StoredMessage) {
        let Some(state) = self.rooms.get_mut(&message.room) else {
            return;
        };
        let Some(last) = state.last_seq else {
            return;
        };
        if message.seq <= last {
            return;
        }
        state.last_seq = Some(message.seq);
        state.oldest.get_or_insert(message.seq);
        self.emit(Event::Message(message)).await;
    }

    /// The newest page of a room joined for the first time: delivered, then the join follows
    /// with `since` = its last seq, so nothing between the page and the join is lost.
    async fn on_backlog(
        &mut self,
        ws: &mut Ws,
        room: RoomName,
        messages: Vec<StoredMessage>,
    ) -> Result<(), String> {
        let Some(state) = self.rooms.get_mut(&room) else {
            return Ok(());
        };
        if state.phase != Phase::History {
            return Ok(());
        }
        let last = state.last_seq.unwrap_or(0);
        let newest = messages.last().map_or(last, |m| m.seq.max(last));
        state.last_seq = Some(newest);
        if let Some(first) = messages.first() {
            state.oldest = Some(state.oldest.map_or(first.seq, |o| o.min(first.seq)));
        }
        for message in messages.into_iter().filter(|m| m.seq > last) {
            self.emit(Event::Message(message)).await;
        }
        if let Some(state) = self.rooms.get_mut(&room) {
            state.phase = Phase::Joining;
        }
        let frame = ClientFrame::Join {
            room: room.clone(),
            since: Some(newest),
        };
        self.request(ws, frame, Pending::Join(room)).await
    }

    async fn on_error(
        &mut self,
        ws: &mut Ws,
        pending: Option<Pending>,
        code: ErrorCode,
        message: String,
    ) -> Result<(), End> {
        let passing = matches!(
            code,
            ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::RateLimited
        );
        match pending {
            Some(Pending::Join(room) | Pending::History(room)) => {
                if passing {
                    return Err(End::Lost(format!("joining {room}: {code}: {message}")));
                }
                self.rooms.remove(&room);
                self.fail_sends_to(&room, code, &message).await;
                let about = About::Join(room);
                self.emit(Event::Failed {
                    about,
                    code,
                    message,
                })
                .await;
            }
            Some(Pending::Send(client_id)) => {
                let Some(index) = self.outbox.iter().position(|o| o.client_id == client_id) else {
                    return Ok(());
                };
                let outgoing = &mut self.outbox[index];
                outgoing.in_flight = false;
                outgoing.attempts += 1;
                if passing && outgoing.attempts < MAX_SEND_ATTEMPTS {
                    self.resend_at = Some(Instant::now() + RESEND_DELAY);
                } else if code == ErrorCode::NotJoined && outgoing.attempts < MAX_SEND_ATTEMPTS {
                    // The gateway lost track of the join: join again; the send follows it.
                    let room = outgoing.room.clone();
                    self.start_room(ws, &room).await.map_err(End::Lost)?;
                } else {
                    let outgoing = self.outbox.remove(index);
                    let about = About::Send {
                        room: outgoing.room,
                        client_id: outgoing.client_id,
                    };
                    self.emit(Event::Failed {
                        about,
                        code,
                        message,
                    })
                    .await;
                }
            }
            Some(Pending::Older(room)) => {
                let about = About::Older(room);
                self.emit(Event::Failed {
                    about,
                    code,
                    message,
                })
                .await;
            }
            Some(Pending::Leave) => {}
            None if code == ErrorCode::Unauthorized => return Err(End::Fatal(code, message)),
            None => {
                let about = About::Connection;
                self.emit(Event::Failed {
                    about,
                    code,
                    message,
                })
                .await;
            }
        }
        Ok(())
    }
}

async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("connection lost while sending: {}", root_cause(&e)))
}

/// The pause before reconnect attempt `failures` (0: right after a healthy session): random in
/// the upper half of an exponential ceiling, so that clients dropped together (a gateway
/// restart) do not come back together.
fn backoff(failures: u32) -> Duration {
    let mut rng = rand::rng();
    if failures == 0 {
        return Duration::from_millis(rng.random_range(0..=250));
    }
    let ceiling = (500u64 << (failures - 1).min(8)).min(MAX_BACKOFF.as_millis() as u64);
    Duration::from_millis(rng.random_range(ceiling / 2..=ceiling))
}

/// Why the gateway closed, in words.
fn close_reason(frame: Option<CloseFrame>) -> String {
    let Some(frame) = frame else {
        return "the gateway closed the connection".into();
    };
    let code = u16::from(frame.code);
    let what = match code {
        CLOSE_SERVICE_RESTART => "the gateway is restarting",
        CLOSE_SLOW_CONSUMER => "this client fell behind and was dropped as a slow consumer",
        CLOSE_HEARTBEAT_TIMEOUT => "heartbeat timeout",
        CLOSE_TOO_BIG => "a frame was too large",
        CLOSE_POLICY => "the gateway refused the session (log in again)",
        1001 => "the gateway is going away",
        _ if frame.reason.is_empty() => {
            return format!("the gateway closed the connection ({code})");
        }
        _ => {
            return format!(
                "the gateway closed the connection ({code}: {})",
                frame.reason
            );
        }
    };
    format!("{what} ({code})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_bounded() {
        for _ in 0..100 {
            assert!(backoff(0) <= Duration::from_millis(250));
            let first = backoff(1);
            assert!((Duration::from_millis(250)..=Duration::from_millis(500)).contains(&first));
            let third = backoff(3);
            assert!((Duration::from_millis(1000)..=Duration::from_millis(2000)).contains(&third));
            assert!(backoff(40) <= MAX_BACKOFF);
            assert!(backoff(40) >= MAX_BACKOFF / 2);
        }
    }

    #[test]
    fn client_ids_are_fresh_and_valid() {
        let (a, b) = (new_client_id(), new_client_id());
        assert_ne!(a, b);
        assert!(a.as_str().len() <= chat_protocol::names::MAX_CLIENT_ID_BYTES);
    }
}
