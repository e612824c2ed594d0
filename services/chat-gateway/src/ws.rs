//! The WebSocket edge: admission, the `hello` handshake, then one task per connection that
//! both reads the client's frames (with the heartbeat) and writes what the session queued,
//! batching queued frames into one flush.

use crate::config::Settings;
use crate::context::{SessionSlot, SharedContext};
use crate::error::Failure;
use crate::hub::Outbox;
use crate::queue;
use crate::session::{Gone, Reply, Session};
use crate::telemetry::hot;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use chat_protocol::frames::Ref;
use chat_protocol::{
    CLOSE_HEARTBEAT_TIMEOUT, CLOSE_POLICY, CLOSE_PROTOCOL_ERROR, CLOSE_SERVICE_RESTART,
    CLOSE_SLOW_CONSUMER, CLOSE_TOO_BIG, ClientFrame, ErrorCode, ServerFrame, Username,
    parse_client_frame,
};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

/// Most frames written before one flush.
const WRITE_BATCH: usize = 64;
/// Socket buffers: small, so that idle connections stay cheap; they grow for large frames.
/// Measured with 15,000 idle joined connections on the release build: ~4.5 KiB of gateway
/// RSS each with a 1 KiB read buffer, ~7.7 KiB with 4 KiB (tungstenite's default is 128 KiB).
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 4096;
/// How long a closed socket is read for the client's answering close frame.
const LINGER: Duration = Duration::from_secs(1);

pub async fn upgrade(State(ctx): State<SharedContext>, ws: WebSocketUpgrade) -> Response {
    if ctx.draining.is_cancelled() {
        return Failure::new(
            ErrorCode::Unavailable,
            "gateway is draining; connect to another",
        )
        .into_response();
    }
    let Some(slot) = ctx.sessions.admit(ctx.settings.max_connections) else {
        metrics::counter!("chat_connections_refused_total").increment(1);
        return Failure::new(
            ErrorCode::Unavailable,
            "connection limit reached; try another",
        )
        .into_response();
    };
    metrics::counter!("chat_connections_opened_total").increment(1);
    let max = ctx.settings.max_frame_bytes;
    let tracked = ctx.tasks.clone();
    let span = tracing::info_span!("conn", id = slot.id, user = tracing::field::Empty);
    // No cap on the write buffer (tungstenite's default): the link flushes before it feeds
    // more, so the buffer holds at most one frame past WRITE_BUFFER, and a server frame can be
    // far larger than the client's limit (a history page of 200 long messages).
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| tracked.track_future(serve(socket, ctx, slot).instrument(span)))
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

fn is_too_big(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Answers a failed handshake: an `error` frame, then the close frame of `end`.
async fn refuse(
    socket: &mut WebSocket,
    reference: Option<Ref>,
    end: End,
    error: ErrorCode,
    message: &str,
) {
    metrics::counter!("chat_connections_closed_total", "reason" => end.label()).increment(1);
    metrics::counter!("chat_errors_sent_total", "code" => error.as_str()).increment(1);
    let frame = ServerFrame::error(error, message).encode(reference);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        socket.send(Message::Text(frame.into())).await?;
        if let Some((code, reason)) = end.close_frame() {
            socket.send(close_message(code, reason)).await?;
        }
        Ok::<(), axum::Error>(())
    })
    .await;
}

/// Why a handshake failed: the reply's ref, how the connection ends, and the error to send.
type Refusal = (Option<Ref>, End, ErrorCode, &'static str);

/// Waits for `hello` and checks its token.
async fn handshake(
    ctx: &SharedContext,
    socket: &mut WebSocket,
    slot: &SessionSlot,
) -> Result<(Username, Option<Ref>), Refusal> {
    let unauthorized = |r| {
        (
            r,
            End::Unauthorized,
            ErrorCode::Unauthorized,
            "first frame must be hello with a valid token",
        )
    };
    let first = tokio::select! {
        first = tokio::time::timeout(ctx.settings.hello_timeout(), first_data_frame(socket)) => first,
        _ = slot.close.cancelled() => {
            return Err((None, End::Drain, ErrorCode::Unavailable, "gateway is draining"));
        }
    };
    let text = match first {
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Err(e))) if is_too_big(&e) => {
            return Err((None, End::TooLarge, ErrorCode::TooLarge, "frame too large"));
        }
        Err(_) => {
            return Err((
                None,
                End::Unauthorized,
                ErrorCode::Unauthorized,
                "no hello within the timeout",
            ));
        }
        _ => return Err(unauthorized(None)),
    };
    match parse_client_frame(&text) {
        Ok((reference, ClientFrame::Hello { token })) => match ctx.auth.verify(&token) {
            Ok(user) => Ok((user, reference)),
            Err(_) => Err((
                reference,
                End::Unauthorized,
                ErrorCode::Unauthorized,
                "invalid or expired token",
            )),
        },
        Ok((reference, _)) => Err(unauthorized(reference)),
        Err(e) => Err(unauthorized(e.reference)),
    }
}

/// The first frame that is not a Ping or a Pong: those are the client's WebSocket library
/// keeping the connection alive, not its first word. The hello timeout bounds the wait.
async fn first_data_frame(socket: &mut WebSocket) -> Option<Result<Message, axum::Error>> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return other,
        }
    }
}

/// Serves one socket, from `hello` to close.
///
/// Not an `async fn`: that would keep its arguments in the task twice (as arguments, then as
/// locals), and the socket a third time once moved into the link. The connection is built
/// here, before the first await, and used in place.
fn serve(
    socket: WebSocket,
    ctx: SharedContext,
    slot: SessionSlot,
) -> impl Future<Output = ()> + Send {
    let mut connection = Connection {
        link: Link::new(socket, &ctx.settings),
        session: None,
        ctx,
        slot,
    };
    async move { connection.run().await }
}

/// What one connection keeps for its whole life.
struct Connection {
    ctx: SharedContext,
    slot: SessionSlot,
    link: Link,
    /// Set after `hello`; lent to the frame being handled.
    session: Option<Session>,
}

impl Connection {
    async fn run(&mut self) {
        let socket = &mut self.link.socket;
        let (user, reference) = match handshake(&self.ctx, socket, &self.slot).await {
            Ok(ok) => ok,
            Err((reference, end, error, message)) => {
                refuse(socket, reference, end, error, message).await;
                linger(socket).await;
                return;
            }
        };
        let id = self.slot.id;
        tracing::Span::current().record("user", tracing::field::display(&user));
        tracing::debug!("session started");
        let outbox = Outbox {
            session: id,
            user: user.clone(),
            fanout: self.link.fanout.sender(),
        };
        let replies = self.link.replies.sender();
        let welcome = ServerFrame::Welcome {
            user: user.clone(),
            session: format!("{}-{id}", self.ctx.gateway),
            gateway: self.ctx.gateway.clone(),
            heartbeat_ms: self.ctx.settings.heartbeat_ms,
        }
        .encode(reference);
        // The queue is new and empty: the welcome fits.
        let _ = replies.try_send(Reply {
            text: welcome.into(),
            after_fanout: 0,
        });
        self.session = Some(Session::new(self.ctx.clone(), id, user, outbox, replies));
        let end = self.converse().await;
        metrics::counter!("chat_connections_closed_total", "reason" => end.label()).increment(1);
        tracing::debug!(reason = end.label(), "session ended");
        // Boxed: this state exists only while closing; inline, it would make every idle
        // connection's task as large.
        Box::pin(self.close(end)).await;
    }

    /// Leaves the rooms and closes the socket, side by side: neither waits for the other (a
    /// client that stopped reading must not delay leaving the rooms).
    async fn close(&mut self, end: End) {
        let Some(session) = self.session.take() else {
            return;
        };
        let closing = tokio::time::timeout(self.link.write_timeout, self.link.close(end));
        let (_, closed) = tokio::join!(session.close(), closing);
        if !matches!(closed, Ok(Ok(()))) {
            tracing::debug!("close frame not delivered");
        }
        if end != End::ClientClosed {
            linger(&mut self.link.socket).await;
        }
    }

    /// Reads and answers the client's frames until the conversation ends; returns why.
    ///
    /// One frame is handled at a time, and the socket is not read meanwhile (the client waits
    /// for its answers), but writing goes on: a handler may be waiting for room in the replies
    /// queue. The handler's future is boxed, so that an idle connection does not carry the
    /// largest handler's state. Drain and kick are noticed whatever the socket is doing; a frame
    /// already being handled is finished first, because a session is not cancel-safe (a join
    /// half done would leave a membership behind). That wait is bounded: store calls have
    /// deadlines, and a handler waiting for room in the replies queue is released when the
    /// queue closes (a kick, or a write that failed or timed out).
    async fn converse(&mut self) -> End {
        let link = &mut self.link;
        let heartbeat = self.ctx.settings.heartbeat();
        let silence_limit = heartbeat * 5 / 2;
        let mut last_seen = Instant::now();
        let mut next_ping = last_seen + heartbeat;
        // Wakes for the next ping or when the silence limit would be reached, whichever is
        // first: a silent client is closed on time, and reading a frame costs no timer reset.
        let beat = tokio::time::sleep_until(next_ping);
        tokio::pin!(beat);
        let deadline = tokio::time::sleep(link.write_timeout);
        tokio::pin!(deadline);
        let mut handling: Option<Handling> = None;
        let mut end: Option<End> = None;
        // Made once: a fresh one per turn would lock the token and join its waiter list on
        // every frame written.
        let drain = self.slot.close.cancelled();
        tokio::pin!(drain);
        loop {
            if let Some(end) = end
                && handling.is_none()
            {
                return end;
            }
            let reading = end.is_none() && handling.is_none();
            tokio::select! {
                biased;
                _ = &mut drain, if end.is_none() => end = Some(End::Drain),
                _ = &mut beat, if end.is_none() => {
                    let now = Instant::now();
                    if handling.is_some() || link.armed {
                        // The socket is not read while a frame is handled (a join may write
                        // a long backlog), and a ping waits behind the frames the client
                        // has yet to read: a client busy reading cannot be heard, and that
                        // is not silence. One that stops reading meets the write deadline.
                        last_seen = now;
                    }
                    if now >= last_seen + silence_limit {
                        end = Some(End::HeartbeatTimeout);
                    } else {
                        if now >= next_ping {
                            link.ping = true;
                            next_ping = now + heartbeat;
                        }
                        beat.as_mut().reset(next_ping.min(last_seen + silence_limit));
                    }
                }
                (session, handled) = async { handling.as_mut().expect("guarded").await },
                    if handling.is_some() =>
                {
                    handling = None;
                    last_seen = Instant::now();
                    self.session = Some(session);
                    if handled.is_err() {
                        end.get_or_insert(End::Gone);
                    }
                }
                event = std::future::poll_fn(|cx| link.poll(cx, deadline.as_mut(), reading)),
                    if !link.broken =>
                {
                    match event {
                        Event::Kicked => {
                            end.get_or_insert(End::SlowConsumer);
                        }
                        Event::Broken => {
                            end.get_or_insert(End::Gone);
                        }
                        Event::Incoming(incoming) => {
                            last_seen = Instant::now();
                            let mut session =
                                self.session.take().expect("read only while no frame is handled");
                            match incoming {
                                None | Some(Ok(Message::Close(_))) => {
                                    end = Some(End::ClientClosed);
                                }
                                Some(Err(e)) if is_too_big(&e) => end = Some(End::TooLarge),
                                Some(Err(_)) => end = Some(End::Error),
                                Some(Ok(Message::Text(text))) => {
                                    handling = Some(Box::pin(async move {
                                        let handled = session.handle_text(&text).await;
                                        (session, handled)
                                    }));
                                    continue;
                                }
                                Some(Ok(Message::Binary(_))) => {
                                    handling = Some(Box::pin(async move {
                                        let handled = session.reject_binary().await;
                                        (session, handled)
                                    }));
                                    continue;
                                }
                                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                            }
                            self.session = Some(session);
                        }
                    }
                }
            }
        }
    }
}

/// After the server's close frame: keep reading briefly so the client can read that frame and
/// answer it (the closing handshake), instead of meeting a reset connection.
async fn linger(socket: &mut WebSocket) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Close(_) = message {
                break;
            }
        }
    })
    .await;
}

/// Every `reason` label of `chat_connections_closed_total`.
pub(crate) fn close_reasons() -> impl Iterator<Item = &'static str> {
    End::ALL.into_iter().map(End::label)
}

/// Why a conversation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Drain,
    SlowConsumer,
    HeartbeatTimeout,
    ClientClosed,
    TooLarge,
    Error,
    /// The socket stopped taking writes (failed, or no flush within the write timeout).
    Gone,
    /// No valid `hello` (the handshake only).
    Unauthorized,
}

impl End {
    /// Every end, for the counters registered at start-up (a unit test checks it is complete).
    const ALL: [End; 8] = [
        End::Drain,
        End::SlowConsumer,
        End::HeartbeatTimeout,
        End::ClientClosed,
        End::TooLarge,
        End::Error,
        End::Gone,
        End::Unauthorized,
    ];

    /// The metrics label.
    const fn label(self) -> &'static str {
        match self {
            End::Drain => "drain",
            End::SlowConsumer => "slow_consumer",
            End::HeartbeatTimeout => "heartbeat_timeout",
            End::ClientClosed => "client_closed",
            End::TooLarge => "too_large",
            End::Error => "error",
            End::Gone => "gone",
            End::Unauthorized => "unauthorized",
        }
    }

    /// The close frame the server sends for it, if it sends its own (a client's close is
    /// answered instead, a dead socket just closed, and a slow consumer's is sent when kicked).
    fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            End::Drain => Some((CLOSE_SERVICE_RESTART, "gateway restarting")),
            End::HeartbeatTimeout => Some((CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")),
            End::TooLarge => Some((CLOSE_TOO_BIG, "frame too large")),
            End::Unauthorized => Some((CLOSE_POLICY, "unauthorized")),
            // Also tried when the socket itself failed; that write then fails unseen.
            End::Error => Some((CLOSE_PROTOCOL_ERROR, "websocket protocol error")),
            End::ClientClosed | End::Gone | End::SlowConsumer => None,
        }
    }
}

/// A frame being handled: the session is lent to it and comes back with the outcome.
type Handling = Pin<Box<dyn Future<Output = (Session, Result<(), Gone>)> + Send>>;

/// What the socket side has to report.
enum Event {
    Incoming(Option<Result<Message, axum::Error>>),
    /// The session fell behind: its fanout queue overflowed.
    Kicked,
    /// A write failed, or did not finish within the write timeout.
    Broken,
}

/// One connection's socket and the queues it writes from.
struct Link {
    socket: WebSocket,
    replies: queue::Receiver<Reply>,
    fanout: queue::Receiver<Utf8Bytes>,
    /// A ping is owed to the client.
    ping: bool,
    /// The socket is not ready for the next frame.
    stalled: bool,
    /// Frames fed since the last flush, and how many of them were text.
    fed: usize,
    texts: u64,
    flushing: bool,
    /// The write timeout is running.
    armed: bool,
    /// When a flush last finished: the client took what it was sent. The write timeout
    /// counts from here, not from when writing began, so a client that keeps reading a long
    /// backlog is not taken for dead.
    last_flush: Instant,
    /// A socket that does not take a flush within this time is treated as dead
    /// (`CHAT_WRITE_TIMEOUT_MS`).
    write_timeout: Duration,
    /// Kicked as a slow consumer: nothing queued is written any more.
    kicked: bool,
    broken: bool,
}

impl Link {
    fn new(socket: WebSocket, settings: &Settings) -> Self {
        Link {
            socket,
            replies: queue::Receiver::new(settings.reply_queue),
            fanout: queue::Receiver::new(settings.outbound_queue),
            write_timeout: settings.write_timeout(),
            ping: false,
            stalled: false,
            fed: 0,
            texts: 0,
            flushing: false,
            armed: false,
            last_flush: Instant::now(),
            kicked: false,
            broken: false,
        }
    }

    /// Writes what it can, and reads one frame if `reading`. Ready with the first thing that
    /// needs the caller; every waker it depends on is registered when it is pending.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut deadline: Pin<&mut Sleep>,
        reading: bool,
    ) -> Poll<Event> {
        if !self.kicked && self.fanout.poll_overflowed(cx).is_ready() {
            self.kicked = true;
            // A handler waiting for room in the replies queue learns that the client is gone.
            self.replies.close();
            return Poll::Ready(Event::Kicked);
        }
        if !self.kicked {
            if self.poll_write(cx).is_err() {
                return self.broke();
            }
            let writing = self.stalled || self.fed > 0;
            if writing && !self.armed {
                deadline.as_mut().reset(Instant::now() + self.write_timeout);
                self.armed = true;
            } else if !writing {
                self.armed = false;
            }
            // The deadline is set when writing begins and moved only when it fires (a timer
            // reset per flush would cost every delivery a timer-wheel update).
            while self.armed && deadline.as_mut().poll(cx).is_ready() {
                let due = self.last_flush + self.write_timeout;
                if due <= Instant::now() {
                    return self.broke();
                }
                deadline.as_mut().reset(due);
            }
        }
        if reading && let Poll::Ready(incoming) = Pin::new(&mut self.socket).poll_next(cx) {
            return Poll::Ready(Event::Incoming(incoming));
        }
        Poll::Pending
    }

    fn broke(&mut self) -> Poll<Event> {
        self.broken = true;
        self.replies.close();
        Poll::Ready(Event::Broken)
    }

    /// Feeds queued frames to the socket, replies first, up to a batch, then flushes the
    /// batch before taking more.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(), axum::Error> {
        loop {
            if !self.flushing {
                while self.fed < WRITE_BATCH {
                    // Ready before taking: a frame leaves its queue only when the socket can
                    // take it, so nothing is held aside.
                    self.stalled = Pin::new(&mut self.socket).poll_ready(cx)?.is_pending();
                    if self.stalled {
                        return Ok(());
                    }
                    let Some(message) = self.next_queued(cx) else {
                        break;
                    };
                    self.texts += u64::from(matches!(message, Message::Text(_)));
                    Pin::new(&mut self.socket).start_send(message)?;
                    self.fed += 1;
                }
                if self.fed == 0 {
                    return Ok(());
                }
                self.flushing = true;
            }
            match Pin::new(&mut self.socket).poll_flush(cx) {
                Poll::Ready(flushed) => flushed?,
                Poll::Pending => return Ok(()),
            }
            hot::FRAMES_WRITTEN.increment(self.texts);
            self.last_flush = Instant::now();
            self.flushing = false;
            self.fed = 0;
            self.texts = 0;
        }
    }

    fn next_queued(&mut self, cx: &mut Context<'_>) -> Option<Message> {
        // A `joined` or `left` waits for the room events queued before it.
        let fanout_taken = self.fanout.taken();
        let after_earlier_fanout = |reply: &Reply| reply.after_fanout <= fanout_taken;
        if let Poll::Ready(Some(reply)) = self.replies.poll_recv_when(cx, after_earlier_fanout) {
            return Some(Message::Text(reply.text));
        }
        // The session corks its replies while what it answers is still on its way to the
        // fanout queue: nothing is written until both can go in one flush, in order.
        if self.replies.is_corked() {
            return None;
        }
        if std::mem::take(&mut self.ping) {
            return Some(Message::Ping(bytes::Bytes::new()));
        }
        if let Poll::Ready(Some(text)) = self.fanout.poll_recv(cx) {
            return Some(Message::Text(text));
        }
        None
    }

    /// Ends the socket's side of the conversation.
    async fn close(&mut self, end: End) -> Result<(), axum::Error> {
        if self.broken {
            return Ok(());
        }
        if self.kicked {
            // Whatever was fed goes out first; what is still queued is dropped.
            return self
                .socket
                .send(close_message(
                    CLOSE_SLOW_CONSUMER,
                    "slow consumer: reconnect and resume",
                ))
                .await;
        }
        let Some((code, reason)) = end.close_frame() else {
            // The client's close is answered, or the socket is closed.
            return self.socket.close().await;
        };
        // The replies queued before the close frame go out first; room events do not.
        while let Some(reply) = self.replies.try_recv() {
            self.socket.feed(Message::Text(reply.text)).await?;
        }
        self.socket.send(close_message(code, reason)).await
    }
}

#[cfg(test)]
mod tests {
    use super::End;

    #[test]
    fn every_end_has_its_counter_registered() {
        // No wildcard: a new variant stops this compiling until it gets the next number, and
        // the comparison then fails until `End::ALL` lists it.
        let number = |end: End| match end {
            End::Drain => 0,
            End::SlowConsumer => 1,
            End::HeartbeatTimeout => 2,
            End::ClientClosed => 3,
            End::TooLarge => 4,
            End::Error => 5,
            End::Gone => 6,
            End::Unauthorized => 7,
        };
        assert_eq!(End::ALL.map(number), [0, 1, 2, 3, 4, 5, 6, 7]);
        let labels: std::collections::HashSet<_> = super::close_reasons().collect();
        assert_eq!(labels.len(), End::ALL.len(), "labels are distinct");
    }
}
