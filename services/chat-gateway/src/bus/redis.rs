//! The clustered bus: Redis Pub/Sub for fan-out, Redis hashes and Lua scripts for presence.
//!
//! - One Pub/Sub connection per gateway, subscribed to `chat:room:<room>` only while a local
//!   session is in the room, plus `chat:probe:<gateway>`. A probe is published to it every
//!   `probe_interval`; when probes stop arriving the connection is presumed silently dead and
//!   replaced, and the gateway refills its rooms from the store (`on_resubscribed`).
//! - Commands (presence scripts, probes) go through a reconnecting `ConnectionManager`, each
//!   under a deadline. Room events go through one publisher task: `publish` only queues (a
//!   bounded queue, `publish_queue`), and the task sends what has queued as one pipeline, in
//!   queue order. Senders thus never wait for a Redis round trip, each of a session's events
//!   leaves in the order it was published, and many publishes share one write.
//! - Presence: `chat:presence:<room>` maps user -> number of gateways where the user is in the
//!   room; `chat:gw:<gateway>:presence` is the set of this gateway's entries; `chat:gateways`
//!   scores every gateway by its last heartbeat. The scripts change a count and publish the
//!   resulting `presence` event in one atomic step, so an event is published exactly once
//!   however many gateways see the change. A gateway whose heartbeat stops is withdrawn by
//!   the next live gateway's heartbeat: its users go offline within `presence_timeout` plus one
//!   heartbeat.

use super::{Bus, BusError, BusListener};
use async_trait::async_trait;
use bytes::Bytes;
use chat_protocol::{RoomName, Username};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

const ROOM_PREFIX: &str = "chat:room:";

// The presence event JSON built in Lua matches `super::presence_frame`; names need no escaping.
const LUA_EVENT: &str = r#"
local function event(room, user, state)
  return 'p\n{"type":"presence","room":"' .. room .. '","user":"' .. user .. '","state":"' .. state .. '"}'
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function withdraw(gw)
  local set = 'chat:gw:' .. gw .. ':presence'
  for _, member in ipairs(redis.call('SMEMBERS', set)) do
    local sp = string.find(member, ' ', 1, true)
    local room = string.sub(member, 1, sp - 1)
    local user = string.sub(member, sp + 1)
    local key = 'chat:presence:' .. room
    if redis.call('HINCRBY', key, user, -1) <= 0 then
      redis.call('HDEL', key, user)
      redis.call('PUBLISH', 'chat:room:' .. room, event(room, user, 'offline'))
    end
  end
  redis.call('DEL', set, 'chat:gw:' .. gw .. ':known')
  redis.call('ZREM', 'chat:gateways', gw)
end
"#;

/// ARGV: gateway, room, user. Returns the users online in the room.
const ENTER: &str = r#"
local gw, room, user = ARGV[1], ARGV[2], ARGV[3]
redis.call('ZADD', 'chat:gateways', now_ms(), gw)
if redis.call('SADD', 'chat:gw:' .. gw .. ':presence', room .. ' ' .. user) == 1 then
  if redis.call('HINCRBY', 'chat:presence:' .. room, user, 1) == 1 then
    redis.call('PUBLISH', 'chat:room:' .. room, event(room, user, 'online'))
  end
end
return redis.call('HKEYS', 'chat:presence:' .. room)
"#;

/// ARGV: gateway, room, user.
const EXIT: &str = r#"
local gw, room, user = ARGV[1], ARGV[2], ARGV[3]
if redis.call('SREM', 'chat:gw:' .. gw .. ':presence', room .. ' ' .. user) == 1 then
  local key = 'chat:presence:' .. room
  if redis.call('HINCRBY', key, user, -1) <= 0 then
    redis.call('HDEL', key, user)
    redis.call('PUBLISH', 'chat:room:' .. room, event(room, user, 'offline'))
  end
end
return 1
"#;

/// ARGV: gateway. Withdraws this gateway's presence (drain, or a restart under the same id).
const WITHDRAW: &str = r#"
withdraw(ARGV[1])
return 1
"#;

/// ARGV: gateway, timeout ms. Heartbeat, then withdraw every gateway silent for the timeout.
/// Returns {1 if this gateway's `known` mark was missing (its presence entries are gone:
/// Redis restarted empty, or the gateway was withdrawn), gateways withdrawn}. Only the
/// heartbeat sets the mark and only `withdraw` clears it, so a join cannot hide a loss.
const HEARTBEAT: &str = r#"
local now = now_ms()
redis.call('ZADD', 'chat:gateways', now, ARGV[1])
local unknown = redis.call('SET', 'chat:gw:' .. ARGV[1] .. ':known', '1', 'NX') and 1 or 0
local dead = redis.call('ZRANGEBYSCORE', 'chat:gateways', '-inf', now - tonumber(ARGV[2]))
for _, gw in ipairs(dead) do withdraw(gw) end
return {unknown, #dead}
"#;

/// A room event waiting for the publisher task: (channel, event).
type Outgoing = (String, Bytes);

/// Most events in one pipeline.
const PUBLISH_BATCH: usize = 256;
/// Tries of a failed pipeline before its events are given up (receivers then fill the gap
/// from the store).
const PUBLISH_ATTEMPTS: u32 = 4;

/// The newest message event of each room whose pipeline was given up, to publish again.
/// At most one per room this gateway published to while Redis failed.
#[derive(Default)]
struct Unsent {
    /// channel -> (seq, event)
    newest: HashMap<String, (u64, Bytes)>,
    retry: Duration,
    due: Option<tokio::time::Instant>,
}

impl Unsent {
    const FIRST_RETRY: Duration = Duration::from_millis(500);
    const LAST_RETRY: Duration = Duration::from_secs(5);

    fn keep(&mut self, batch: &[Outgoing]) {
        for (channel, event) in batch {
            if let Some(super::BusEvent::Message { seq, .. }) = super::decode(event) {
                let newest = self
                    .newest
                    .entry(channel.clone())
                    .or_insert_with(|| (seq, event.clone()));
                if seq > newest.0 {
                    *newest = (seq, event.clone());
                }
            }
        }
        if !self.newest.is_empty() && self.due.is_none() {
            self.retry = Self::FIRST_RETRY;
            self.due = Some(tokio::time::Instant::now() + self.retry);
        }
    }

    fn is_empty(&self) -> bool {
        self.newest.is_empty()
    }

    fn due(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    fn events(&self) -> Vec<Outgoing> {
        self.newest
            .iter()
            .map(|(channel, (_, event))| (channel.clone(), event.clone()))
            .collect()
    }

    fn back_off(&mut self) {
        self.retry = (self.retry * 2).min(Self::LAST_RETRY);
        self.due = Some(tokio::time::Instant::now() + self.retry);
    }

    fn clear(&mut self) {
        self.newest.clear();
        self.due = None;
    }
}

enum Control {
    Subscribe(String, oneshot::Sender<()>),
    Unsubscribe(String),
}

struct Scripts {
    enter: redis::Script,
    exit: redis::Script,
    withdraw: redis::Script,
    heartbeat: redis::Script,
}

pub struct RedisBusConfig {
    pub gateway: String,
    pub timeout: Duration,
    /// Room events waiting for the publisher task; `publish` waits up to `timeout` for room.
    pub publish_queue: usize,
    pub probe_interval: Duration,
    pub presence_timeout: Duration,
}

pub struct RedisBus {
    shared: Arc<Shared>,
}

struct Shared {
    config: RedisBusConfig,
    client: redis::Client,
    commands: ConnectionManager,
    scripts: Scripts,
    /// Channel -> number of local users; a channel is subscribed while its count is > 0.
    wanted: Mutex<HashMap<String, usize>>,
    /// Unbounded so that a change can be queued under the `wanted` lock, keeping Redis in the
    /// order of the counts; it holds at most one entry per room change.
    control_tx: mpsc::UnboundedSender<Control>,
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<Control>>>,
    outgoing_tx: mpsc::Sender<Outgoing>,
    outgoing_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    connected: AtomicBool,
    /// Milliseconds since `epoch` when the last probe came back.
    last_probe_ms: AtomicU64,
    epoch: Instant,
    reconnect: Notify,
    listener: OnceLock<Arc<dyn BusListener>>,
    stop: CancellationToken,
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl RedisBus {
    pub fn new(url: &str, config: RedisBusConfig) -> Result<Self, BusError> {
        let client =
            redis::Client::open(url).map_err(|e| unavailable(format!("CHAT_REDIS_URL: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(unavailable)?;
        let with_lib = |body: &str| redis::Script::new(&format!("{LUA_EVENT}\n{body}"));
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (outgoing_tx, outgoing_rx) = mpsc::channel(config.publish_queue.max(1));
        metrics::gauge!("chat_redis_connected").set(0.0);
        metrics::gauge!("chat_subscribed_rooms").set(0.0);
        Ok(RedisBus {
            shared: Arc::new(Shared {
                config,
                client,
                commands,
                scripts: Scripts {
                    enter: with_lib(ENTER),
                    exit: with_lib(EXIT),
                    withdraw: with_lib(WITHDRAW),
                    heartbeat: with_lib(HEARTBEAT),
                },
                wanted: Mutex::new(HashMap::new()),
                control_tx,
                control_rx: Mutex::new(Some(control_rx)),
                outgoing_tx,
                outgoing_rx: Mutex::new(Some(outgoing_rx)),
                connected: AtomicBool::new(false),
                last_probe_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                reconnect: Notify::new(),
                listener: OnceLock::new(),
                stop: CancellationToken::new(),
            }),
        })
    }
}

impl Shared {
    fn probe_channel(&self) -> String {
        format!("chat:probe:{}", self.config.gateway)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Healthy while connected and the last probe came back within three intervals.
    fn healthy(&self) -> bool {
        let allowed = 3 * self.config.probe_interval.as_millis() as u64;
        self.connected.load(Ordering::Acquire)
            && self
                .now_ms()
                .saturating_sub(self.last_probe_ms.load(Ordering::Acquire))
                <= allowed
    }

    /// Waits for a Redis call up to the deadline.
    async fn within_deadline<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BusError> {
        match tokio::time::timeout(self.config.timeout, call).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(BusError::Unavailable("redis did not answer in time".into())),
        }
    }

    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BusError> {
        let mut conn = self.commands.clone();
        self.within_deadline(cmd.query_async::<T>(&mut conn)).await
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        args: &[&str],
    ) -> Result<T, BusError> {
        let mut invocation = script.prepare_invoke();
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.commands.clone();
        self.within_deadline(invocation.invoke_async::<T>(&mut conn))
            .await
    }

    /// Sends queued room events as pipelines, in queue order, retrying a failed pipeline with
    /// backoff. A retried pipeline may publish an event twice; receivers drop a seq they have.
    ///
    /// A pipeline given up is not forgotten: the newest message event of each of its rooms is
    /// kept (`Unsent`) and published again once Redis answers, even if the room stays quiet.
    /// A receiver that missed messages then sees a seq past its last, and fills the gap from
    /// the store; one that has them drops it.
    async fn run_publisher(self: Arc<Self>, mut outgoing: mpsc::Receiver<Outgoing>) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        let mut unsent = Unsent::default();
        loop {
            let resend_at = unsent.due();
            let received = tokio::select! {
                received = outgoing.recv_many(&mut batch, PUBLISH_BATCH) => received,
                _ = tokio::time::sleep_until(resend_at.unwrap_or_else(tokio::time::Instant::now)),
                    if resend_at.is_some() =>
                {
                    self.resend(&mut unsent).await;
                    continue;
                }
                _ = self.stop.cancelled() => {
                    // Stopping after the sessions ended: send what they left, once.
                    while batch.len() < PUBLISH_BATCH && let Ok(item) = outgoing.try_recv() {
                        batch.push(item);
                    }
                    if !batch.is_empty()
                        && let Err(e) = self.send_pipeline(&batch).await
                    {
                        metrics::counter!("chat_publish_failures_total")
                            .increment(batch.len() as u64);
                        tracing::warn!(error = %e, events = batch.len(),
                            "publish failed while stopping; receivers will fill the gap from the store");
                    }
                    return;
                }
            };
            if received == 0 {
                return;
            }
            let mut delay = Duration::from_millis(100);
            for attempt in 1..=PUBLISH_ATTEMPTS {
                match self.send_pipeline(&batch).await {
                    Ok(()) => {
                        if !unsent.is_empty() {
                            self.resend(&mut unsent).await;
                        }
                        break;
                    }
                    Err(e) if attempt == PUBLISH_ATTEMPTS || self.stop.is_cancelled() => {
                        metrics::counter!("chat_publish_failures_total")
                            .increment(batch.len() as u64);
                        tracing::warn!(error = %e, events = batch.len(),
                            "publish failed; will publish each room's newest message again");
                        unsent.keep(&batch);
                        break;
                    }
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
            batch.clear();
        }
    }

    /// Publishes the kept events once; keeps them, with a longer wait, if that fails too.
    async fn resend(&self, unsent: &mut Unsent) {
        let events = unsent.events();
        match self.send_pipeline(&events).await {
            Ok(()) => {
                tracing::info!(
                    rooms = events.len(),
                    "published given-up rooms' newest messages again"
                );
                unsent.clear();
            }
            Err(_) => unsent.back_off(),
        }
    }

    async fn send_pipeline(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        let mut pipe = redis::pipe();
        for (channel, event) in batch {
            pipe.cmd("PUBLISH").arg(channel).arg(&event[..]).ignore();
        }
        let mut conn = self.commands.clone();
        self.within_deadline(pipe.query_async::<()>(&mut conn))
            .await
    }

    /// Keeps one Pub/Sub connection subscribed to what `wanted` says, replacing it whenever it
    /// breaks or stops delivering probes.
    async fn run_subscriber(self: Arc<Self>, mut control: mpsc::UnboundedReceiver<Control>) {
        let probe = self.probe_channel();
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.subscribe_session(&probe, &mut control).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, "redis subscription lost"),
            }
            self.connected.store(false, Ordering::Release);
            metrics::gauge!("chat_redis_connected").set(0.0);
            metrics::counter!("chat_redis_reconnects_total").increment(1);
            let jitter =
                Duration::from_millis(rand::random_range(0..=backoff.as_millis() as u64 / 2));
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn subscribe_session(
        &self,
        probe: &str,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<(), BusError> {
        let timeout = self.config.timeout;
        let pubsub = tokio::time::timeout(timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| unavailable("connect timed out"))?
            .map_err(unavailable)?;
        let (mut sink, mut stream) = pubsub.split();
        let mut channels: Vec<String> = {
            let wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
            wanted.keys().cloned().collect()
        };
        channels.push(probe.to_string());
        for chunk in channels.chunks(512) {
            tokio::time::timeout(timeout, sink.subscribe(chunk))
                .await
                .map_err(|_| unavailable("subscribe timed out"))?
                .map_err(unavailable)?;
        }
        self.last_probe_ms.store(self.now_ms(), Ordering::Release);
        self.connected.store(true, Ordering::Release);
        metrics::gauge!("chat_redis_connected").set(1.0);
        tracing::info!(channels = channels.len(), "redis subscription established");
        if let Some(listener) = self.listener.get() {
            listener.on_resubscribed();
        }
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(unavailable("subscription connection closed"));
                    };
                    let channel = message.get_channel_name();
                    if channel == probe {
                        self.last_probe_ms.store(self.now_ms(), Ordering::Release);
                    } else if let Some(room) = channel.strip_prefix(ROOM_PREFIX)
                        && let Some(listener) = self.listener.get()
                    {
                        listener.on_room_event(room, Bytes::copy_from_slice(message.get_payload_bytes()));
                    }
                }
                change = control.recv() => match change {
                    Some(Control::Subscribe(channel, done)) => {
                        tokio::time::timeout(timeout, sink.subscribe(&channel))
                            .await
                            .map_err(|_| unavailable("subscribe timed out"))?
                            .map_err(unavailable)?;
                        let _ = done.send(());
                    }
                    Some(Control::Unsubscribe(channel)) => {
                        tokio::time::timeout(timeout, sink.unsubscribe(&channel))
                            .await
                            .map_err(|_| unavailable("unsubscribe timed out"))?
                            .map_err(unavailable)?;
                    }
                    None => return Ok(()),
                },
                _ = self.reconnect.notified() => {
                    return Err(unavailable("self-probe missing: replacing the subscription"));
                }
                _ = self.stop.cancelled() => return Ok(()),
            }
        }
    }

    /// Publishes probes and heartbeats; forces a new subscription when probes stop arriving.
    async fn run_prober(self: Arc<Self>) {
        let probe = self.probe_channel();
        let mut ticker = tokio::time::interval(self.config.probe_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeat_every = (self.config.presence_timeout / 4).max(self.config.probe_interval);
        let mut last_heartbeat: Option<Instant> = None;
        let timeout_ms = self.config.presence_timeout.as_millis().to_string();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            if self.connected.load(Ordering::Acquire) && !self.healthy() {
                tracing::warn!("redis self-probe missing; resubscribing");
                self.reconnect.notify_one();
            }
            let _ = self
                .command::<()>(redis::cmd("PUBLISH").arg(&probe).arg("1"))
                .await;
            if last_heartbeat.is_none_or(|t| t.elapsed() >= heartbeat_every) {
                match self
                    .script::<(i64, i64)>(
                        &self.scripts.heartbeat,
                        &[&self.config.gateway, &timeout_ms],
                    )
                    .await
                {
                    Ok((unknown, reaped)) => {
                        // Unknown after the first heartbeat: Redis restarted empty, or another
                        // gateway withdrew this one while its heartbeats were late.
                        if unknown == 1
                            && last_heartbeat.is_some()
                            && let Some(listener) = self.listener.get()
                        {
                            listener.on_presence_lost();
                        }
                        last_heartbeat = Some(Instant::now());
                        if reaped > 0 {
                            tracing::info!(reaped, "withdrew presence of silent gateways");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "presence heartbeat failed"),
                }
            }
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn start(&self, listener: Arc<dyn BusListener>) {
        let shared = &self.shared;
        let _ = shared.listener.set(listener);
        // A previous process under the same id may have left entries behind.
        if let Err(e) = shared
            .script::<i64>(&shared.scripts.withdraw, &[&shared.config.gateway])
            .await
        {
            tracing::warn!(error = %e, "could not clear stale presence at start-up");
        }
        let control = shared
            .control_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(control) = control {
            tokio::spawn(shared.clone().run_subscriber(control));
            tokio::spawn(shared.clone().run_prober());
        }
        let outgoing = shared
            .outgoing_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(outgoing) = outgoing {
            tokio::spawn(shared.clone().run_publisher(outgoing));
        }
    }

    async fn publish(&self, room: &RoomName, event: Bytes) -> Result<(), BusError> {
        let channel = format!("{ROOM_PREFIX}{room}");
        let queued = self.shared.outgoing_tx.send((channel, event));
        match tokio::time::timeout(self.shared.config.timeout, queued).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(BusError::Unavailable("the publisher has stopped".into())),
            Err(_) => Err(BusError::Unavailable(
                "the publish queue stayed full: redis is not keeping up".into(),
            )),
        }
    }

    async fn subscribe(&self, room: &RoomName) -> Result<(), BusError> {
        let channel = format!("{ROOM_PREFIX}{room}");
        let (done_tx, done_rx) = oneshot::channel();
        {
            let mut wanted = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
            let count = wanted.entry(channel.clone()).or_insert(0);
            *count += 1;
            if *count > 1 {
                return Ok(());
            }
            let _ = self
                .shared
                .control_tx
                .send(Control::Subscribe(channel, done_tx));
        }
        metrics::gauge!("chat_subscribed_rooms").increment(1.0);
        match tokio::time::timeout(self.shared.config.timeout, done_rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(BusError::Unavailable(
                "subscription not confirmed; it will be made when redis is back".into(),
            )),
        }
    }

    fn unsubscribe(&self, room: &RoomName) {
        let channel = format!("{ROOM_PREFIX}{room}");
        let mut wanted = self.shared.wanted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = wanted.get_mut(&channel) {
            *count -= 1;
            if *count == 0 {
                wanted.remove(&channel);
                metrics::gauge!("chat_subscribed_rooms").decrement(1.0);
                let _ = self.shared.control_tx.send(Control::Unsubscribe(channel));
            }
        }
    }

    async fn presence_enter(
        &self,
        room: &RoomName,
        user: &Username,
    ) -> Result<Vec<Username>, BusError> {
        let shared = &self.shared;
        let online: Vec<String> = shared
            .script(
                &shared.scripts.enter,
                &[&shared.config.gateway, room.as_str(), user.as_str()],
            )
            .await?;
        Ok(online
            .into_iter()
            .filter_map(|u| Username::parse(u).ok())
            .collect())
    }

    async fn presence_exit(&self, room: &RoomName, user: &Username) -> Result<(), BusError> {
        let shared = &self.shared;
        shared
            .script::<i64>(
                &shared.scripts.exit,
                &[&shared.config.gateway, room.as_str(), user.as_str()],
            )
            .await
            .map(|_| ())
    }

    async fn withdraw_presence(&self) -> Result<(), BusError> {
        let shared = &self.shared;
        shared
            .script::<i64>(&shared.scripts.withdraw, &[&shared.config.gateway])
            .await
            .map(|_| ())
    }

    fn is_healthy(&self) -> bool {
        self.shared.healthy()
    }

    fn stop(&self) {
        self.shared.stop.cancel();
    }
}
