//! The WebSocket edge: admission, the `hello` handshake, the read loop with its heartbeat, and
//! the writer task that batches queued frames into one flush.

use crate::context::{SessionSlot, SharedContext};
use crate::error::Failure;
use crate::hub::Outbox;
use crate::session::{Outbound, Session};
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use chat_protocol::frames::Ref;
use chat_protocol::{
    CLOSE_HEARTBEAT_TIMEOUT, CLOSE_POLICY, CLOSE_SERVICE_RESTART, CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG, ClientFrame, ErrorCode, ServerFrame, Username, parse_client_frame,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Replies queued for one client (answers to its own frames, backlog pages).
const REPLY_QUEUE: usize = 256;
/// Most frames written before one flush.
const WRITE_BATCH: usize = 64;
/// Socket buffers: small, so that idle connections stay cheap; they grow for large frames.
/// Measured with 2,000 idle joined connections on the release build: ~11 KiB of gateway RSS
/// each with a 1 KiB read buffer, ~13.5 KiB with 4 KiB (tungstenite's default is 128 KiB).
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 4096;
/// How long a closed socket is read for the client's answering close frame.
const LINGER: Duration = Duration::from_secs(1);
/// A socket that does not take a flush within this time is treated as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max)
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

async fn refuse(
    mut sink: SplitSink<WebSocket, Message>,
    reference: Option<Ref>,
    code: u16,
    error: ErrorCode,
    message: &str,
) {
    metrics::counter!("chat_connections_closed_total", "reason" => "unauthorized").increment(1);
    let frame = ServerFrame::error(error, message).encode(reference);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        sink.send(Message::Text(frame.into())).await?;
        sink.send(close_message(code, "unauthorized")).await
    })
    .await;
}

/// Waits for `hello` and checks its token.
async fn handshake(
    ctx: &SharedContext,
    stream: &mut SplitStream<WebSocket>,
    slot: &SessionSlot,
) -> Result<(Username, Option<Ref>), (Option<Ref>, u16, ErrorCode, &'static str)> {
    let unauthorized = |r| {
        (
            r,
            CLOSE_POLICY,
            ErrorCode::Unauthorized,
            "first frame must be hello with a valid token",
        )
    };
    let first = tokio::select! {
        first = tokio::time::timeout(ctx.settings.hello_timeout(), stream.next()) => first,
        _ = slot.close.cancelled() => {
            return Err((None, CLOSE_SERVICE_RESTART, ErrorCode::Unavailable, "gateway is draining"));
        }
    };
    let text = match first {
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Err(e))) if is_too_big(&e) => {
            return Err((None, CLOSE_TOO_BIG, ErrorCode::TooLarge, "frame too large"));
        }
        Err(_) => {
            return Err((
                None,
                CLOSE_POLICY,
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
                CLOSE_POLICY,
                ErrorCode::Unauthorized,
                "invalid or expired token",
            )),
        },
        Ok((reference, _)) => Err(unauthorized(reference)),
        Err(e) => Err(unauthorized(e.reference)),
    }
}

async fn serve(socket: WebSocket, ctx: SharedContext, slot: SessionSlot) {
    let (sink, mut stream) = socket.split();
    let (user, reference) = match handshake(&ctx, &mut stream, &slot).await {
        Ok(ok) => ok,
        Err((reference, code, error, message)) => {
            refuse(sink, reference, code, error, message).await;
            linger(&mut stream).await;
            return;
        }
    };
    let connection = slot.id;
    tracing::Span::current().record("user", tracing::field::display(&user));
    tracing::debug!("session started");

    let (reply_tx, reply_rx) = mpsc::channel(REPLY_QUEUE);
    let (fanout_tx, fanout_rx) = mpsc::channel(ctx.settings.outbound_queue);
    let kick = CancellationToken::new();
    let outbox = Outbox {
        session: connection,
        user: user.clone(),
        fanout: fanout_tx,
        kick: kick.clone(),
    };
    let writer = ctx
        .tasks
        .spawn(write_loop(sink, reply_rx, fanout_rx, kick.clone()));

    let welcome = ServerFrame::Welcome {
        user: user.clone(),
        session: format!("{}-{connection}", ctx.gateway),
        gateway: ctx.gateway.clone(),
        heartbeat_ms: ctx.settings.heartbeat_ms,
    }
    .encode(reference);
    let mut session = Session::new(ctx.clone(), connection, user, outbox, reply_tx.clone());
    let reason = if reply_tx
        .send(Outbound::Frame(welcome.into()))
        .await
        .is_err()
    {
        "gone"
    } else {
        read_loop(&ctx, &mut session, &mut stream, &reply_tx, &slot, &kick).await
    };
    metrics::counter!("chat_connections_closed_total", "reason" => reason).increment(1);
    tracing::debug!(reason, "session ended");
    session.close().await;
    drop(reply_tx);
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        tracing::debug!("writer did not finish in time");
    }
    if reason != "client_closed" {
        linger(&mut stream).await;
    }
}

/// After the server's close frame: keep reading briefly so the client can read that frame and
/// answer it (the closing handshake), instead of meeting a reset connection.
async fn linger(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Close(_) = message {
                break;
            }
        }
    })
    .await;
}

/// Reads frames until the socket ends; returns why it ended (a metrics label).
async fn read_loop(
    ctx: &SharedContext,
    session: &mut Session,
    stream: &mut SplitStream<WebSocket>,
    replies: &mpsc::Sender<Outbound>,
    slot: &SessionSlot,
    kick: &CancellationToken,
) -> &'static str {
    let heartbeat = ctx.settings.heartbeat();
    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let mut last_seen = Instant::now();
    let (reason, close) = loop {
        tokio::select! {
            biased;
            _ = slot.close.cancelled() => break ("drain", Some((CLOSE_SERVICE_RESTART, "gateway restarting"))),
            _ = kick.cancelled() => break ("slow_consumer", None),
            _ = ticker.tick() => {
                if last_seen.elapsed() > heartbeat * 5 / 2 {
                    break ("heartbeat_timeout", Some((CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")));
                }
                if replies.send(Outbound::Ping).await.is_err() {
                    break ("gone", None);
                }
            }
            incoming = stream.next() => {
                last_seen = Instant::now();
                match incoming {
                    None | Some(Ok(Message::Close(_))) => break ("client_closed", None),
                    Some(Err(e)) if is_too_big(&e) => {
                        break ("too_large", Some((CLOSE_TOO_BIG, "frame too large")));
                    }
                    Some(Err(_)) => break ("error", None),
                    Some(Ok(Message::Text(text))) => {
                        if session.handle_text(&text).await.is_err() {
                            break ("gone", None);
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        if session.reject_binary().await.is_err() {
                            break ("gone", None);
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                }
            }
        }
    };
    if let Some((code, text)) = close {
        let _ = replies.send(Outbound::Close(code, text)).await;
    }
    reason
}

/// Writes what is queued, replies first, flushing once per batch.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut replies: mpsc::Receiver<Outbound>,
    mut fanout: mpsc::Receiver<Utf8Bytes>,
    kick: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = kick.cancelled() => break,
            reply = replies.recv() => match reply {
                Some(item) => item,
                None => {
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
                    return;
                }
            },
            Some(frame) = fanout.recv() => Outbound::Frame(frame),
        };
        // A client that stops reading blocks the write; the kick must still get through.
        let batch = write_batch(&mut sink, first, &mut replies, &mut fanout);
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(WRITE_TIMEOUT, batch) => outcome,
            _ = kick.cancelled() => break,
        };
        match outcome {
            Ok(Ok(Batch::More)) => continue,
            Ok(Ok(Batch::Closed)) | Ok(Err(_)) | Err(_) => return,
        }
    }
    // Kicked as a slow consumer: say so, if the client reads again within the write timeout.
    let closing = sink.send(close_message(
        CLOSE_SLOW_CONSUMER,
        "slow consumer: reconnect and resume",
    ));
    let _ = tokio::time::timeout(WRITE_TIMEOUT, closing).await;
}

enum Batch {
    More,
    Closed,
}

/// Feeds `first` and whatever else is queued (up to a batch), then flushes once.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Outbound,
    replies: &mut mpsc::Receiver<Outbound>,
    fanout: &mut mpsc::Receiver<Utf8Bytes>,
) -> Result<Batch, axum::Error> {
    let mut frames = 0u64;
    let mut next = Some(first);
    let mut closing = false;
    while let Some(item) = next.take() {
        let message = match item {
            Outbound::Frame(text) => {
                frames += 1;
                Message::Text(text)
            }
            Outbound::Ping => Message::Ping(bytes::Bytes::new()),
            Outbound::Close(code, reason) => {
                closing = true;
                close_message(code, reason)
            }
        };
        sink.feed(message).await?;
        if closing || frames >= WRITE_BATCH as u64 {
            break;
        }
        next = match replies.try_recv() {
            Ok(item) => Some(item),
            Err(_) => fanout.try_recv().ok().map(Outbound::Frame),
        };
    }
    sink.flush().await?;
    metrics::counter!("chat_frames_written_total").increment(frames);
    Ok(if closing { Batch::Closed } else { Batch::More })
}
