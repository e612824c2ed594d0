//! One authenticated client's conversation: frames in, replies and events out.
//!
//! A `Session` knows nothing of sockets: it reads text frames and writes to two queues, so it
//! can be driven directly in tests. `replies` carries answers to this client's own frames (the
//! session waits for room in it: a client that does not read slows only itself); the outbox's
//! `fanout` carries room events (never waited on: a client that cannot keep up is kicked).

use crate::bus;
use crate::clock;
use crate::context::SharedContext;
use crate::error::Failure;
use crate::hub::{Attach, Outbox, RoomRef, encode_message};
use crate::queue;
use crate::store::NewMessage;
use crate::telemetry::hot;
use axum::extract::ws::Utf8Bytes;
use chat_protocol::frames::Ref;
use chat_protocol::{
    ClientFrame, ClientId, ErrorCode, MessageBody, RoomName, ServerFrame, Username,
    parse_client_frame,
};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

/// The client stopped reading its replies (the socket is gone).
#[derive(Debug)]
pub struct Gone;

/// A frame answering the client, and how many of its fanout frames must be written before it.
pub struct Reply {
    pub text: Utf8Bytes,
    /// The fanout queue's `mark` when a `joined` or `left` was queued: every room event of the
    /// membership it ends was queued by then, and goes out first. 0 for other replies.
    pub after_fanout: u64,
}

/// Rows per store read while replaying a backlog.
const BACKLOG_PAGE: u32 = 200;
/// Longest an ack is held back to leave with the sender's own copy of the message.
const ACK_CORK_LIMIT: Duration = Duration::from_millis(5);

pub struct Session {
    ctx: SharedContext,
    id: u64,
    user: Username,
    outbox: Outbox,
    replies: queue::Sender<Reply>,
    /// A list, not a map: a connection is in a few rooms (at most
    /// `max_rooms_per_connection`), and an idle one should not carry a hash table.
    rooms: Vec<RoomRef>,
    message_limit: DefaultDirectRateLimiter,
    frame_limit: DefaultDirectRateLimiter,
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    let per_sec = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_sec).allow_burst(burst)
}

impl Session {
    pub fn new(
        ctx: SharedContext,
        id: u64,
        user: Username,
        outbox: Outbox,
        replies: queue::Sender<Reply>,
    ) -> Self {
        let s = &ctx.settings;
        let message_limit = RateLimiter::direct(quota(s.rate_per_sec, s.rate_burst));
        let frame_limit = RateLimiter::direct(quota(s.frame_rate_per_sec, s.frame_rate_burst));
        Session {
            ctx,
            id,
            user,
            outbox,
            replies,
            rooms: Vec::new(),
            message_limit,
            frame_limit,
        }
    }

    pub fn user(&self) -> &Username {
        &self.user
    }

    fn membership(&self, room: &RoomName) -> Option<&RoomRef> {
        self.rooms.iter().find(|m| m.room() == room)
    }

    fn take_membership(&mut self, room: &RoomName) -> Option<RoomRef> {
        let at = self.rooms.iter().position(|m| m.room() == room)?;
        Some(self.rooms.swap_remove(at))
    }

    async fn send(&self, frame: ServerFrame, reference: Option<Ref>) -> Result<(), Gone> {
        self.push(Utf8Bytes::from(frame.encode(reference))).await
    }

    async fn push(&self, text: Utf8Bytes) -> Result<(), Gone> {
        self.queue_reply(text, 0).await
    }

    /// Queues a `joined` or `left`, after the room events of the membership it ends (the room
    /// task has detached this session: no more of them can come).
    async fn send_after_fanout(
        &self,
        frame: ServerFrame,
        reference: Option<Ref>,
    ) -> Result<(), Gone> {
        let text = Utf8Bytes::from(frame.encode(reference));
        self.queue_reply(text, self.outbox.fanout.mark()).await
    }

    async fn queue_reply(&self, text: Utf8Bytes, after_fanout: u64) -> Result<(), Gone> {
        let reply = Reply { text, after_fanout };
        self.replies.send(reply).await.map_err(|_| Gone)
    }

    async fn fail(&self, failure: Failure, reference: Option<Ref>) -> Result<(), Gone> {
        metrics::counter!("chat_errors_sent_total", "code" => failure.code.as_str()).increment(1);
        self.send(ServerFrame::error(failure.code, failure.message), reference)
            .await
    }

    /// Answers a binary frame: the protocol is JSON text only.
    pub async fn reject_binary(&mut self) -> Result<(), Gone> {
        metrics::counter!("chat_frames_received_total", "type" => "binary").increment(1);
        let failure = Failure::new(
            ErrorCode::BadRequest,
            "binary frames are not supported; send JSON text frames",
        );
        self.fail(failure, None).await
    }

    /// Handles one text frame from the client.
    pub async fn handle_text(&mut self, text: &str) -> Result<(), Gone> {
        let (reference, frame) = match parse_client_frame(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                metrics::counter!("chat_frames_received_total", "type" => "invalid").increment(1);
                return self
                    .fail(Failure::new(e.code, e.message), e.reference)
                    .await;
            }
        };
        hot::frame_received(frame.kind());
        let limiter = match frame {
            ClientFrame::Send { .. } | ClientFrame::Typing { .. } => Some(&self.message_limit),
            ClientFrame::Ping => None,
            _ => Some(&self.frame_limit),
        };
        if let Some(limiter) = limiter
            && limiter.check().is_err()
        {
            metrics::counter!("chat_rate_limited_total").increment(1);
            return self
                .fail(
                    Failure::new(ErrorCode::RateLimited, "too many frames; slow down"),
                    reference,
                )
                .await;
        }
        match self.dispatch(frame, reference.clone()).await {
            Ok(()) => Ok(()),
            Err(Handled::Failed(failure)) => self.fail(failure, reference).await,
            Err(Handled::Gone) => Err(Gone),
        }
    }

    async fn dispatch(
        &mut self,
        frame: ClientFrame,
        reference: Option<Ref>,
    ) -> Result<(), Handled> {
        match frame {
            ClientFrame::Hello { .. } => Err(Failure::new(
                ErrorCode::BadRequest,
                "already authenticated: hello is only the first frame",
            ))?,
            ClientFrame::Join { room, since } => self.join(room, since, reference).await,
            ClientFrame::Leave { room } => {
                let membership = self.take_membership(&room).ok_or_else(not_joined)?;
                self.ctx.hub.exit_and_settle(membership, self.id).await;
                self.ctx.hub.presence_exit(&room, &self.user).await;
                let left = ServerFrame::Left { room };
                Ok(self.send_after_fanout(left, reference).await?)
            }
            ClientFrame::Send {
                room,
                body,
                client_id,
            } => self.send_message(room, body, client_id, reference).await,
            ClientFrame::History {
                room,
                before,
                limit,
            } => {
                if !room.admits(&self.user) {
                    Err(forbidden())?;
                }
                let page = self
                    .ctx
                    .store
                    .messages_before(&room, before, limit)
                    .await
                    .map_err(Failure::from)?;
                let frame = ServerFrame::History {
                    room,
                    messages: page.messages,
                    has_more: page.has_more,
                };
                Ok(self.send(frame, reference).await?)
            }
            ClientFrame::Typing { room } => {
                let membership = self.membership(&room).ok_or_else(not_joined)?;
                let frame = ServerFrame::Typing {
                    room: room.clone(),
                    user: self.user.clone(),
                }
                .encode(None);
                self.ctx
                    .hub
                    .typing_local(membership, self.id, Utf8Bytes::from(frame.as_str()))
                    .await;
                let event = bus::encode_typing(&self.ctx.gateway, &frame);
                if let Err(e) = self.ctx.bus.publish(&room, event).await {
                    tracing::debug!(error = %e, "typing notice not published");
                }
                Ok(())
            }
            ClientFrame::Ping => Ok(self.send(ServerFrame::Pong, reference).await?),
        }
    }

    async fn join(
        &mut self,
        room: RoomName,
        since: Option<u64>,
        reference: Option<Ref>,
    ) -> Result<(), Handled> {
        if !room.admits(&self.user) {
            Err(forbidden())?;
        }
        let rejoin = self.take_membership(&room);
        if rejoin.is_none() && self.rooms.len() >= self.ctx.settings.max_rooms_per_connection {
            Err(Failure::new(
                ErrorCode::BadRequest,
                format!(
                    "a connection may be in at most {} rooms; leave one first",
                    self.ctx.settings.max_rooms_per_connection
                ),
            ))?;
        }
        let already_present = match rejoin {
            Some(membership) => {
                self.ctx.hub.exit_and_settle(membership, self.id).await;
                true
            }
            None => false,
        };
        let last_seq = match self.ctx.store.ensure_room(&room).await {
            Ok(seq) => seq,
            Err(e) => {
                if already_present {
                    self.ctx.hub.presence_exit(&room, &self.user).await;
                }
                Err(Failure::from(e))?
            }
        };
        // Receive the room's events before reading who is online, so that no presence change
        // after the list is missed.
        let membership = self.ctx.hub.enter(&room);
        let deadline = self.ctx.settings.store_timeout();
        let ready = tokio::time::timeout(deadline, self.ctx.hub.ready(&membership)).await;
        if !matches!(ready, Ok(Ok(()))) {
            self.ctx.hub.exit(membership, self.id).await;
            if already_present {
                self.ctx.hub.presence_exit(&room, &self.user).await;
            }
            let failure = Failure::new(ErrorCode::Unavailable, "room is not available right now");
            return Err(failure.into());
        }
        let online = if already_present {
            // This session's presence is counted already; only ask who is there.
            self.ctx.hub.presence_announce(&room, &self.user).await
        } else {
            self.ctx.hub.presence_enter(&room, &self.user).await
        };
        let online = online.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "presence unavailable; joining without it");
            vec![self.user.clone()]
        });
        let joined = ServerFrame::Joined {
            room: room.clone(),
            last_seq,
            online,
        };
        if let Err(gone) = self.send_after_fanout(joined, reference).await {
            self.ctx.hub.exit(membership, self.id).await;
            self.ctx.hub.presence_exit(&room, &self.user).await;
            return Err(gone.into());
        }
        let cursor = since.map_or(last_seq, |s| s.min(last_seq));
        match self
            .replay_and_attach(&room, &membership, cursor, since.is_some())
            .await
        {
            Ok(()) => {
                // Grown one at a time: most connections are in one room.
                self.rooms.reserve_exact(1);
                self.rooms.push(membership);
                Ok(())
            }
            Err(e) => {
                self.ctx.hub.exit(membership, self.id).await;
                self.ctx.hub.presence_exit(&room, &self.user).await;
                Err(e)
            }
        }
    }

    /// Sends the backlog after `cursor` (when asked), then hands over to live delivery.
    async fn replay_and_attach(
        &self,
        room: &RoomName,
        membership: &RoomRef,
        mut cursor: u64,
        replay_first: bool,
    ) -> Result<(), Handled> {
        let deadline = self.ctx.settings.store_timeout();
        let mut target = if replay_first { Some(u64::MAX) } else { None };
        loop {
            if let Some(target) = target {
                cursor = self.replay(room, cursor, target).await?;
            }
            let attached = tokio::time::timeout(
                deadline,
                self.ctx.hub.attach(membership, self.outbox.clone(), cursor),
            )
            .await
            .map_err(|_| Failure::new(ErrorCode::Unavailable, "room is not available right now"))?
            .map_err(Failure::from)?;
            match attached {
                Attach::Done => return Ok(()),
                Attach::NeedBacklogTo(seq) => target = Some(seq),
            }
        }
    }

    /// Sends stored messages after `cursor` up to `target` (or the end); returns the new cursor.
    async fn replay(&self, room: &RoomName, mut cursor: u64, target: u64) -> Result<u64, Handled> {
        while cursor < target {
            let page = self
                .ctx
                .store
                .messages_after(room, cursor, BACKLOG_PAGE)
                .await
                .map_err(Failure::from)?;
            for message in &page.messages {
                self.push(encode_message(message)).await?;
                cursor = message.seq;
            }
            if !page.has_more {
                break;
            }
        }
        Ok(cursor)
    }

    async fn send_message(
        &mut self,
        room: RoomName,
        body: MessageBody,
        client_id: Option<ClientId>,
        reference: Option<Ref>,
    ) -> Result<(), Handled> {
        let membership = self.membership(&room).ok_or_else(not_joined)?.clone();
        let started = Instant::now();
        let committed = self
            .ctx
            .store
            .append(&NewMessage {
                room: room.clone(),
                from: self.user.clone(),
                body,
                client_id,
            })
            .await
            .map_err(Failure::from)?;
        let message = committed.message;
        let sent = ServerFrame::Sent {
            room: room.clone(),
            seq: message.seq,
            ts: message.ts,
            client_id: message.client_id.clone(),
        };
        let acked = self.send(sent, reference).await;
        if acked.is_ok() {
            hot::SEND_ACK_SECONDS.record(started.elapsed());
        }
        if !committed.duplicate {
            hot::MESSAGES_COMMITTED.increment(1);
        }
        // Once committed, a message is always handed on, even when its ack cannot be (the
        // client is gone) and even when it is a resend's duplicate: the first attempt may have
        // committed after its caller stopped waiting, and then nobody delivered it. Rooms drop a
        // seq they have delivered already, so handing it on twice costs no duplicate.
        let frame = encode_message(&message);
        let committed_us = clock::unix_us();
        let event =
            bus::encode_message(message.seq, &self.ctx.gateway, committed_us, frame.as_str());
        let taken = self
            .ctx
            .hub
            .deliver_local(&membership, message.seq, committed_us, frame)
            .await;
        // The bus keeps one caller's events in order, so this session's messages leave in seq
        // order; only a publish the bus could not even queue is retried in the background.
        if self.ctx.bus.publish(&room, event.clone()).await.is_err() {
            self.retry_publish(room, event);
        }
        if acked.is_ok()
            && let Some(taken) = taken
        {
            // The ack waits, corked, until the room task has queued the sender's own copy too:
            // then the connection writes both at once, one send instead of two, ack first. Not
            // for long, though: a room task busy reading the store must not hold this
            // connection's other frames back. (The other gateways are not kept waiting: the
            // event is on its way to the bus already.)
            let _corked = self.replies.cork();
            let _ = tokio::time::timeout(ACK_CORK_LIMIT, taken).await;
        }
        Ok(acked?)
    }

    /// Retries a publish the bus refused (its queue stayed full). Receivers would also repair
    /// the loss from the store (gap detection, resync after a reconnect), but a prompt retry
    /// spares them the wait.
    fn retry_publish(&self, room: RoomName, event: bytes::Bytes) {
        let bus = self.ctx.bus.clone();
        self.ctx.tasks.spawn(async move {
            let mut delay = Duration::from_millis(100);
            for _ in 0..3 {
                tokio::time::sleep(delay).await;
                if bus.publish(&room, event.clone()).await.is_ok() {
                    return;
                }
                delay *= 2;
            }
            metrics::counter!("chat_publish_failures_total").increment(1);
            tracing::warn!("publish failed; receivers will fill the gap from the store");
        });
    }

    /// Leaves every room (the socket closed).
    pub async fn close(mut self) {
        for membership in std::mem::take(&mut self.rooms) {
            let room = membership.room().clone();
            self.ctx.hub.exit(membership, self.id).await;
            self.ctx.hub.presence_exit(&room, &self.user).await;
        }
    }
}

/// Why a frame was not handled: the client was told (Failed), or is gone.
enum Handled {
    Failed(Failure),
    Gone,
}

impl From<Failure> for Handled {
    fn from(f: Failure) -> Self {
        Handled::Failed(f)
    }
}

impl From<Gone> for Handled {
    fn from(_: Gone) -> Self {
        Handled::Gone
    }
}

fn not_joined() -> Failure {
    Failure::new(ErrorCode::NotJoined, "join the room first")
}

fn forbidden() -> Failure {
    Failure::new(
        ErrorCode::Forbidden,
        "this direct room belongs to other users",
    )
}

#[cfg(test)]
mod tests {
    //! The session driven directly, with no socket: frames in, queues out.

    use super::*;
    use crate::auth::Auth;
    use crate::bus::Bus;
    use crate::bus::local::LocalBus;
    use crate::config::Settings;
    use crate::context::{Context, SessionRegistry};
    use crate::hub::Hub;
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;
    use secrecy::SecretString;
    use serde_json::{Value, json};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    async fn context(dir: &std::path::Path) -> SharedContext {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir, Duration::from_secs(5)).unwrap());
        let bus = Arc::new(LocalBus::new());
        let tasks = TaskTracker::new();
        let hub = Hub::new(
            "unit".into(),
            store.clone(),
            bus.clone(),
            64,
            Duration::from_secs(5),
            tasks.clone(),
        );
        bus.start(Arc::new(hub.clone())).await;
        Arc::new(Context {
            settings: Settings::defaults(),
            gateway: "unit".into(),
            store,
            bus,
            hub,
            auth: Auth::new(
                &SecretString::from("k".repeat(32)),
                Duration::from_secs(60),
                1,
            ),
            draining: CancellationToken::new(),
            sessions: Arc::new(SessionRegistry::default()),
            tasks,
        })
    }

    struct Driven {
        session: Session,
        replies: queue::Receiver<Reply>,
        fanout: queue::Receiver<Utf8Bytes>,
    }

    fn session(ctx: &SharedContext, id: u64, user: &str) -> Driven {
        let (reply_tx, replies) = queue::bounded(64);
        let (fanout_tx, fanout) = queue::bounded(64);
        let user = Username::parse(user).unwrap();
        let outbox = Outbox {
            session: id,
            user: user.clone(),
            fanout: fanout_tx,
        };
        Driven {
            session: Session::new(ctx.clone(), id, user, outbox, reply_tx),
            replies,
            fanout,
        }
    }

    fn json_of(text: Utf8Bytes) -> Value {
        serde_json::from_str(text.as_str()).unwrap()
    }

    impl Driven {
        /// Handles one client frame and returns the first reply it queued.
        async fn ask(&mut self, frame: &str) -> Value {
            self.session.handle_text(frame).await.unwrap();
            json_of(self.replies.recv().await.unwrap().text)
        }

        async fn next_fanout(&mut self) -> Value {
            let next = tokio::time::timeout(Duration::from_secs(5), self.fanout.recv()).await;
            json_of(next.expect("a room event within 5 s").unwrap())
        }
    }

    #[tokio::test]
    async fn join_send_and_receive_without_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path()).await;
        ctx.store
            .create_user(&Username::parse("ann").unwrap(), "x")
            .await
            .unwrap();
        let mut ann = session(&ctx, 1, "ann");
        let mut ben = session(&ctx, 2, "ben");

        let joined = ann.ask(r#"{"type":"join","room":"lab","ref":1}"#).await;
        assert_eq!(
            joined,
            json!({"ref":1,"type":"joined","room":"lab","last_seq":0,"online":["ann"]})
        );
        ben.ask(r#"{"type":"join","room":"lab"}"#).await;
        let presence = ann.next_fanout().await;
        assert_eq!(presence["user"], "ben");

        let sent = ann
            .ask(r#"{"type":"send","room":"lab","body":"hi","ref":"s"}"#)
            .await;
        assert_eq!(
            (sent["type"].clone(), sent["seq"].clone()),
            (json!("sent"), json!(1))
        );
        for driven in [&mut ann, &mut ben] {
            let message = driven.next_fanout().await;
            assert_eq!(
                (message["seq"].clone(), message["body"].clone()),
                (json!(1), json!("hi"))
            );
        }

        // A frame for a room it is not in: an error, and the session carries on.
        let error = ben.ask(r#"{"type":"typing","room":"other","ref":2}"#).await;
        assert_eq!(
            (error["code"].clone(), error["ref"].clone()),
            (json!("not_joined"), json!(2))
        );
        ann.session.close().await;
        ben.session.close().await;
    }

    #[tokio::test]
    async fn the_ack_is_released_with_the_senders_own_copy() {
        // So that the connection writes both in one flush: when the handler is done, the
        // room task has queued the message as well as the session its ack.
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path()).await;
        let mut ann = session(&ctx, 1, "ann");
        ann.ask(r#"{"type":"join","room":"lab","ref":1}"#).await;
        for n in 1..=3 {
            let sent = ann
                .ask(&format!(
                    r#"{{"type":"send","room":"lab","body":"m{n}","ref":{n}}}"#
                ))
                .await;
            assert_eq!(
                (sent["type"].clone(), sent["seq"].clone()),
                (json!("sent"), json!(n))
            );
            let own = ann.fanout.try_recv().map(json_of);
            assert_eq!(
                own.map(|m| (m["seq"].clone(), m["body"].clone())),
                Some((json!(n), json!(format!("m{n}"))))
            );
        }
        ann.session.close().await;
    }

    /// Ann and Ben in `lab`, with Ben's presence notice read by Ann.
    async fn two_in_lab(ctx: &SharedContext) -> (Driven, Driven) {
        let mut ann = session(ctx, 1, "ann");
        let mut ben = session(ctx, 2, "ben");
        ann.ask(r#"{"type":"join","room":"lab","ref":1}"#).await;
        ben.ask(r#"{"type":"join","room":"lab","ref":1}"#).await;
        assert_eq!(ann.next_fanout().await["type"], "presence");
        (ann, ben)
    }

    #[tokio::test]
    async fn a_resend_delivers_what_an_abandoned_attempt_committed() {
        // The first attempt committed after its caller stopped waiting (the store deadline), so
        // nobody handed it on; the client's resend is a duplicate and must deliver it.
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path()).await;
        let (mut ann, mut ben) = two_in_lab(&ctx).await;
        ctx.store
            .append(&crate::store::NewMessage {
                room: RoomName::parse("lab").unwrap(),
                from: Username::parse("ann").unwrap(),
                body: MessageBody::parse("first try").unwrap(),
                client_id: Some(ClientId::parse("c-1").unwrap()),
            })
            .await
            .unwrap();
        let sent = ann
            .ask(r#"{"type":"send","room":"lab","body":"first try","client_id":"c-1","ref":2}"#)
            .await;
        assert_eq!(
            (sent["type"].clone(), sent["seq"].clone()),
            (json!("sent"), json!(1))
        );
        for driven in [&mut ann, &mut ben] {
            assert_eq!(driven.next_fanout().await["body"], "first try");
        }
        // A second resend delivers nothing twice.
        ann.ask(r#"{"type":"send","room":"lab","body":"first try","client_id":"c-1"}"#)
            .await;
        ben.ask(r#"{"type":"send","room":"lab","body":"next"}"#)
            .await;
        assert_eq!(ben.next_fanout().await["seq"], 2);
    }

    #[tokio::test]
    async fn a_message_is_delivered_when_its_sender_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path()).await;
        let (mut ann, mut ben) = two_in_lab(&ctx).await;
        // Ann's socket broke while her send was being committed: the link closed her replies.
        ann.replies.close();
        let handled = ann
            .session
            .handle_text(r#"{"type":"send","room":"lab","body":"bye","ref":2}"#)
            .await;
        assert!(
            handled.is_err(),
            "the session learns that its client is gone"
        );
        assert_eq!(ben.next_fanout().await["body"], "bye");
    }
}
