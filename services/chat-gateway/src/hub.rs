//! Local fan-out: one task per room that has local sessions, delivering that room's events to
//! them in seq order with no gap and no duplicate.
//!
//! A room task is the only writer to its sessions for that room. It delivers seq N only after
//! N-1: an event that arrives early waits (briefly) for the missing ones, then they are read
//! from the store. Each event's frame is encoded once per gateway and every session gets the
//! same bytes (a reference-counted clone, no per-recipient allocation).
//!
//! A session joins in two steps: it reads the backlog it asked for (`since`) from the store at
//! its own pace, then `attach`es with the last seq it has. The room task sends anything newer
//! from its small ring of recent frames, or asks for more backlog when the ring does not reach
//! back that far.

use crate::bus::{Bus, BusEvent, BusListener, decode};
use crate::clock;
use crate::presence::Presence;
use crate::queue;
use crate::store::Store;
use crate::telemetry::hot;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use chat_protocol::{RoomName, ServerFrame, StoredMessage, Username};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Recent frames a room keeps for sessions that attach slightly behind.
const RING: usize = 128;
/// Early events held while waiting for a missing seq; past this, the store fills the gap now.
const MAX_PENDING: usize = 1024;
/// Rows per store read when filling gaps.
const FILL_PAGE: u32 = 200;

/// The part of a session that room tasks write to.
#[derive(Clone)]
pub struct Outbox {
    pub session: u64,
    /// The session's user: presence events about this user are not sent back to them.
    pub user: Username,
    /// Overflowing it disconnects the session: it could not keep up.
    pub fanout: queue::Sender<Utf8Bytes>,
}

impl Outbox {
    /// Queues a frame; a full queue marks the session as a slow consumer.
    fn offer(&self, frame: &Utf8Bytes) -> bool {
        match self.fanout.try_send(frame.clone()) {
            Ok(()) => true,
            Err(queue::TrySendError::Full(_)) => {
                if self.fanout.overflow() {
                    metrics::counter!("chat_slow_consumers_total").increment(1);
                }
                false
            }
            Err(queue::TrySendError::Closed(_)) => false,
        }
    }
}

enum RoomCmd {
    Message {
        seq: u64,
        committed_us: u64,
        frame: Utf8Bytes,
        /// Told once the room task has taken the message (delivered it, or held it for a gap).
        taken: Option<oneshot::Sender<()>>,
    },
    Typing {
        exclude: Option<u64>,
        frame: Utf8Bytes,
    },
    Presence {
        user: Username,
        frame: Utf8Bytes,
    },
    Attach {
        outbox: Outbox,
        cursor: u64,
        reply: oneshot::Sender<Attach>,
    },
    Detach {
        session: u64,
        /// Told once the session is detached: no more of the room's events will reach it.
        detached: Option<oneshot::Sender<()>>,
    },
    Ready {
        reply: oneshot::Sender<()>,
    },
    Resync,
    Shutdown,
}

/// The answer to an attach request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Attached: the session gets every message after its cursor.
    Done,
    /// The session must first read the backlog up to this seq from the store.
    NeedBacklogTo(u64),
}

#[derive(Debug, thiserror::Error)]
#[error("room is not available right now")]
pub struct RoomUnavailable;

/// A session's membership of one room; `Hub::exit` ends it.
#[derive(Clone)]
pub struct RoomRef {
    room: RoomName,
    tx: mpsc::Sender<RoomCmd>,
}

impl RoomRef {
    pub fn room(&self) -> &RoomName {
        &self.room
    }
}

struct RoomEntry {
    tx: mpsc::Sender<RoomCmd>,
    members: usize,
    overflowed: Arc<AtomicBool>,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

struct Shared {
    gateway: String,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    rooms: Mutex<HashMap<RoomName, RoomEntry>>,
    presence: Presence,
    room_queue: usize,
    /// Longest a leave or re-join waits for the room task to detach the session.
    settle_wait: Duration,
    gap_wait: Duration,
    tasks: TaskTracker,
}

impl Hub {
    pub fn new(
        gateway: String,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        room_queue: usize,
        settle_wait: Duration,
        tasks: TaskTracker,
    ) -> Self {
        let presence = Presence::new(bus.clone());
        Hub {
            shared: Arc::new(Shared {
                gateway,
                store,
                bus,
                rooms: Mutex::new(HashMap::new()),
                presence,
                room_queue,
                settle_wait,
                gap_wait: Duration::from_millis(50),
                tasks,
            }),
        }
    }

    pub fn gateway(&self) -> &str {
        &self.shared.gateway
    }

    /// Becomes a member of the room's local fan-out, starting its task if needed.
    pub fn enter(&self, room: &RoomName) -> RoomRef {
        let mut rooms = self.shared.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let entry = rooms.entry(room.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.shared.room_queue);
            let overflowed = Arc::new(AtomicBool::new(false));
            let task = RoomTask {
                room: room.clone(),
                shared: self.shared.clone(),
                overflowed: overflowed.clone(),
                subscribers: Vec::new(),
                delivered: 0,
                ring: VecDeque::with_capacity(RING),
                pending: BTreeMap::new(),
                gap_deadline: None,
            };
            self.shared.tasks.spawn(task.run(rx));
            metrics::gauge!("chat_rooms_active").increment(1.0);
            RoomEntry {
                tx,
                members: 0,
                overflowed,
            }
        });
        entry.members += 1;
        RoomRef {
            room: room.clone(),
            tx: entry.tx.clone(),
        }
    }

    /// Ends a membership; the room's task stops with its last member.
    pub async fn exit(&self, membership: RoomRef, session: u64) {
        self.detach(membership, session, None).await;
    }

    /// Leaves like `exit`, and returns once the room task has stopped queueing the room's events
    /// for this session (or could not be waited for within the store deadline), so that what the
    /// session queues next comes after the last of them.
    pub async fn exit_and_settle(&self, membership: RoomRef, session: u64) {
        let (detached, settled) = oneshot::channel();
        self.detach(membership, session, Some(detached)).await;
        let _ = tokio::time::timeout(self.shared.settle_wait, settled).await;
    }

    async fn detach(
        &self,
        membership: RoomRef,
        session: u64,
        detached: Option<oneshot::Sender<()>>,
    ) {
        let last = {
            let mut rooms = self.shared.rooms.lock().unwrap_or_else(|e| e.into_inner());
            match rooms.get_mut(&membership.room) {
                Some(entry) if entry.tx.same_channel(&membership.tx) => {
                    entry.members -= 1;
                    if entry.members == 0 {
                        rooms.remove(&membership.room);
                        true
                    } else {
                        false
                    }
                }
                _ => false,
            }
        };
        let _ = membership
            .tx
            .send(RoomCmd::Detach { session, detached })
            .await;
        if last {
            let _ = membership.tx.send(RoomCmd::Shutdown).await;
        }
    }

    /// Asks to receive the room's messages after `cursor`.
    pub async fn attach(
        &self,
        membership: &RoomRef,
        outbox: Outbox,
        cursor: u64,
    ) -> Result<Attach, RoomUnavailable> {
        let (reply, answer) = oneshot::channel();
        membership
            .tx
            .send(RoomCmd::Attach {
                outbox,
                cursor,
                reply,
            })
            .await
            .map_err(|_| RoomUnavailable)?;
        answer.await.map_err(|_| RoomUnavailable)
    }

    /// Resolves once the room's task receives the room's events from the bus (so that nothing
    /// published from now on is missed).
    pub async fn ready(&self, membership: &RoomRef) -> Result<(), RoomUnavailable> {
        let (reply, answer) = oneshot::channel();
        membership
            .tx
            .send(RoomCmd::Ready { reply })
            .await
            .map_err(|_| RoomUnavailable)?;
        answer.await.map_err(|_| RoomUnavailable)
    }

    /// Delivers a message committed by a local session to the room's local sessions. The
    /// answer resolves once the room task has taken the message: by then the sender's own
    /// copy is in its queue (unless the message waits behind a gap). `None`: the room task
    /// has ended.
    pub async fn deliver_local(
        &self,
        membership: &RoomRef,
        seq: u64,
        committed_us: u64,
        frame: Utf8Bytes,
    ) -> Option<oneshot::Receiver<()>> {
        let (taken, is_taken) = oneshot::channel();
        let cmd = RoomCmd::Message {
            seq,
            committed_us,
            frame,
            taken: Some(taken),
        };
        membership.tx.send(cmd).await.ok().map(|()| is_taken)
    }

    /// Delivers a typing notice to the room's other local sessions.
    pub async fn typing_local(&self, membership: &RoomRef, session: u64, frame: Utf8Bytes) {
        let _ = membership
            .tx
            .send(RoomCmd::Typing {
                exclude: Some(session),
                frame,
            })
            .await;
    }

    /// Counts a local session of `user` in `room`; the cluster hears of the first one.
    /// Returns who is online.
    pub async fn presence_enter(
        &self,
        room: &RoomName,
        user: &Username,
    ) -> Result<Vec<Username>, crate::bus::BusError> {
        self.shared.presence.enter(room, user).await
    }

    /// Records again a session that is counted already (a re-join); returns who is online.
    pub async fn presence_announce(
        &self,
        room: &RoomName,
        user: &Username,
    ) -> Result<Vec<Username>, crate::bus::BusError> {
        self.shared.presence.announce(room, user).await
    }

    pub async fn presence_exit(&self, room: &RoomName, user: &Username) {
        self.shared.presence.exit(room, user).await;
    }

    fn route(&self, room: &str, cmd: RoomCmd) {
        let rooms = self.shared.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = rooms.get(room)
            && entry.tx.try_send(cmd).is_err()
        {
            // The room task is behind: it will re-read the store instead of these events.
            entry.overflowed.store(true, Ordering::Release);
            metrics::counter!("chat_room_queue_overflows_total").increment(1);
        }
    }
}

impl BusListener for Hub {
    fn on_presence_lost(&self) {
        tracing::info!("the bus lost this gateway's presence; recording it again");
        self.shared.presence.rewrite_all();
    }

    fn on_room_event(&self, room: &str, event: Bytes) {
        let Some(decoded) = decode(&event) else {
            metrics::counter!("chat_bus_events_unreadable_total").increment(1);
            return;
        };
        let cmd = match decoded {
            // Our own messages and typing notices were delivered locally already.
            BusEvent::Message { origin, .. } | BusEvent::Typing { origin, .. }
                if origin == self.shared.gateway =>
            {
                return;
            }
            BusEvent::Message {
                seq,
                committed_us,
                frame,
                ..
            } => match Utf8Bytes::try_from(frame) {
                Ok(frame) => RoomCmd::Message {
                    seq,
                    committed_us,
                    frame,
                    taken: None,
                },
                Err(_) => return,
            },
            BusEvent::Typing { frame, .. } => match Utf8Bytes::try_from(frame) {
                Ok(frame) => RoomCmd::Typing {
                    exclude: None,
                    frame,
                },
                Err(_) => return,
            },
            BusEvent::Presence { frame } => {
                let Ok(frame) = Utf8Bytes::try_from(frame) else {
                    return;
                };
                match chat_protocol::frames::parse_server_frame(frame.as_str()) {
                    Ok(envelope) => match envelope.frame {
                        ServerFrame::Presence { user, .. } => RoomCmd::Presence { user, frame },
                        _ => return,
                    },
                    Err(_) => return,
                }
            }
        };
        self.route(room, cmd);
    }

    fn on_resubscribed(&self) {
        metrics::counter!("chat_resyncs_total").increment(1);
        {
            let rooms = self.shared.rooms.lock().unwrap_or_else(|e| e.into_inner());
            for entry in rooms.values() {
                if entry.tx.try_send(RoomCmd::Resync).is_err() {
                    entry.overflowed.store(true, Ordering::Release);
                }
            }
        }
        // Redis may have lost our presence entries (a restart): record them again.
        self.shared.presence.rewrite_all();
    }
}

struct Subscriber {
    outbox: Outbox,
    /// Messages up to this seq were sent by other means (backlog); skip them.
    cursor: u64,
}

struct RoomTask {
    room: RoomName,
    shared: Arc<Shared>,
    overflowed: Arc<AtomicBool>,
    subscribers: Vec<Subscriber>,
    /// The highest seq delivered to this room's local sessions.
    delivered: u64,
    ring: VecDeque<(u64, Utf8Bytes)>,
    /// Events that arrived ahead of a missing seq.
    pending: BTreeMap<u64, (u64, Utf8Bytes)>,
    gap_deadline: Option<Instant>,
}

impl RoomTask {
    async fn run(mut self, rx: mpsc::Receiver<RoomCmd>) {
        self.serve(rx).await;
        // Whichever way serving ended: a room whose baseline never came must not stay
        // subscribed, nor counted.
        self.shared.bus.unsubscribe(&self.room);
        metrics::gauge!("chat_rooms_active").decrement(1.0);
    }

    async fn serve(&mut self, mut rx: mpsc::Receiver<RoomCmd>) {
        if let Err(e) = self.shared.bus.subscribe(&self.room).await {
            tracing::warn!(room = %self.room, error = %e, "subscribing late");
        }
        // Subscribed first, then read the baseline: anything committed after it is published
        // after the subscription is live, so nothing falls between the two.
        let mut retry = Duration::from_millis(50);
        self.delivered = loop {
            match self.shared.store.last_seq(&self.room).await {
                Ok(seq) => break seq.unwrap_or(0),
                Err(e) => {
                    tracing::warn!(room = %self.room, error = %e, "room baseline unavailable");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(2));
                    if rx.is_closed() {
                        return;
                    }
                }
            }
        };
        loop {
            let cmd = match self.gap_deadline {
                Some(deadline) => tokio::select! {
                    cmd = rx.recv() => cmd,
                    _ = tokio::time::sleep_until(deadline) => {
                        self.fill_from_store().await;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            let Some(cmd) = cmd else { break };
            match cmd {
                RoomCmd::Message {
                    seq,
                    committed_us,
                    frame,
                    taken,
                } => {
                    self.on_message(seq, committed_us, frame);
                    if let Some(taken) = taken {
                        let _ = taken.send(());
                    }
                }
                RoomCmd::Typing { exclude, frame } => {
                    for sub in &self.subscribers {
                        if Some(sub.outbox.session) != exclude {
                            sub.outbox.offer(&frame);
                        }
                    }
                }
                RoomCmd::Presence { user, frame } => {
                    for sub in &self.subscribers {
                        if sub.outbox.user != user {
                            sub.outbox.offer(&frame);
                        }
                    }
                }
                RoomCmd::Attach {
                    outbox,
                    cursor,
                    reply,
                } => {
                    let answer = self.attach(outbox, cursor);
                    let _ = reply.send(answer);
                }
                RoomCmd::Detach { session, detached } => {
                    self.subscribers.retain(|s| s.outbox.session != session);
                    if let Some(detached) = detached {
                        let _ = detached.send(());
                    }
                }
                RoomCmd::Ready { reply } => {
                    let _ = reply.send(());
                }
                RoomCmd::Resync => self.fill_from_store().await,
                RoomCmd::Shutdown => break,
            }
            if self.overflowed.swap(false, Ordering::AcqRel) {
                self.fill_from_store().await;
            }
        }
    }

    fn attach(&mut self, outbox: Outbox, cursor: u64) -> Attach {
        if cursor < self.delivered {
            let reaches = self
                .ring
                .front()
                .is_some_and(|(first, _)| *first <= cursor + 1);
            if !reaches {
                return Attach::NeedBacklogTo(self.delivered);
            }
            for (seq, frame) in &self.ring {
                if *seq > cursor && !outbox.offer(frame) {
                    break;
                }
            }
        }
        self.subscribers.push(Subscriber {
            outbox,
            cursor: cursor.max(self.delivered),
        });
        Attach::Done
    }

    fn on_message(&mut self, seq: u64, committed_us: u64, frame: Utf8Bytes) {
        if seq <= self.delivered {
            return;
        }
        if seq == self.delivered + 1 {
            self.deliver(seq, committed_us, frame);
            self.flush_pending();
            return;
        }
        self.pending.insert(seq, (committed_us, frame));
        metrics::counter!("chat_gaps_detected_total").increment(1);
        if self.pending.len() > MAX_PENDING {
            self.gap_deadline = Some(Instant::now());
        } else if self.gap_deadline.is_none() {
            self.gap_deadline = Some(Instant::now() + self.shared.gap_wait);
        }
    }

    fn deliver(&mut self, seq: u64, committed_us: u64, frame: Utf8Bytes) {
        let mut delivered = 0u64;
        self.subscribers.retain(|sub| {
            if seq <= sub.cursor {
                return true;
            }
            let ok = sub.outbox.offer(&frame);
            delivered += u64::from(ok);
            ok || !sub.outbox.fanout.is_closed()
        });
        hot::MESSAGES_DELIVERED.increment(delivered);
        // Once per message per gateway: commit -> queued to every local socket.
        let latency_us = clock::unix_us().saturating_sub(committed_us);
        hot::FANOUT_LATENCY_SECONDS.record(latency_us as f64 / 1e6);
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back((seq, frame));
        self.delivered = seq;
    }

    fn flush_pending(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            let seq = *entry.key();
            if seq <= self.delivered {
                entry.remove();
            } else if seq == self.delivered + 1 {
                let (committed_us, frame) = entry.remove();
                self.deliver(seq, committed_us, frame);
            } else {
                break;
            }
        }
        if self.pending.is_empty() {
            self.gap_deadline = None;
        }
    }

    /// Reads every message after `delivered` from the store and delivers it.
    async fn fill_from_store(&mut self) {
        metrics::counter!("chat_gap_fills_total").increment(1);
        loop {
            match self
                .shared
                .store
                .messages_after(&self.room, self.delivered, FILL_PAGE)
                .await
            {
                Ok(page) => {
                    for message in page.messages {
                        if message.seq != self.delivered + 1 {
                            continue;
                        }
                        let (committed_us, frame) = match self.pending.remove(&message.seq) {
                            Some(pending) => pending,
                            None => ((message.ts.max(0) as u64) * 1000, encode_message(&message)),
                        };
                        self.deliver(message.seq, committed_us, frame);
                    }
                    if !page.has_more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(room = %self.room, error = %e, "gap fill failed; retrying");
                    self.gap_deadline = Some(Instant::now() + Duration::from_secs(1));
                    return;
                }
            }
        }
        self.flush_pending();
        if !self.pending.is_empty() && self.gap_deadline.is_none() {
            self.gap_deadline = Some(Instant::now() + self.shared.gap_wait);
        }
    }
}

/// The `message` frame of a committed message: the one encoding every session receives.
pub fn encode_message(message: &StoredMessage) -> Utf8Bytes {
    Utf8Bytes::from(ServerFrame::encode_message(message))
}
