//! Fan-out between gateways and cluster-wide presence.
//!
//! `Bus` is the one interface for both; `redis` (clustered) and `local` (embedded, one process)
//! each implement it once. Only this module touches Redis.
//!
//! An event on the bus is `header\nframe`: a short text header that says what it is, then the
//! exact client frame JSON, so a receiving gateway hands the same bytes to every local socket
//! without re-encoding.

pub mod local;
pub mod redis;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use chat_protocol::{RoomName, Username};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("message bus unavailable: {0}")]
    Unavailable(String),
}

/// What the bus hands to the gateway.
pub trait BusListener: Send + Sync + 'static {
    /// An event published to `room` by any gateway (this one included).
    fn on_room_event(&self, room: &str, event: Bytes);
    /// The subscription connection came back after a break: events may have been missed, so
    /// every room must be refilled from the store and local presence announced again.
    fn on_resubscribed(&self);
    /// The bus lost this gateway's presence entries (its store restarted empty, or another
    /// gateway withdrew them after missing this one's heartbeats): they must be recorded again.
    fn on_presence_lost(&self);
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Starts background work (connections, probes, heartbeats); events go to `listener`.
    async fn start(&self, listener: Arc<dyn BusListener>);
    /// Sends an encoded event to every gateway subscribed to the room. Events published by one
    /// caller leave in the order of the calls. `Ok` may mean queued, not yet sent: the bus
    /// retries a send that fails.
    async fn publish(&self, room: &RoomName, event: Bytes) -> Result<(), BusError>;
    /// Starts receiving the room's events; returns once the subscription is active (or the
    /// deadline passed: it becomes active when the connection returns).
    async fn subscribe(&self, room: &RoomName) -> Result<(), BusError>;
    /// Stops receiving the room's events (when no other local user of it remains).
    fn unsubscribe(&self, room: &RoomName);
    /// Records that `user` is in `room` on this gateway. Publishes `presence online` if that
    /// makes the user present in the room anywhere in the cluster. Returns who is online.
    async fn presence_enter(
        &self,
        room: &RoomName,
        user: &Username,
    ) -> Result<Vec<Username>, BusError>;
    /// Reverses `presence_enter`; publishes `presence offline` if it was the user's last.
    async fn presence_exit(&self, room: &RoomName, user: &Username) -> Result<(), BusError>;
    /// Removes every presence entry of this gateway at once (drain).
    async fn withdraw_presence(&self) -> Result<(), BusError>;
    /// Whether live fan-out currently works (the self-probe arrives).
    fn is_healthy(&self) -> bool;
    /// Stops background work.
    fn stop(&self);
}

/// A decoded bus event.
#[derive(Debug, Clone, PartialEq)]
pub enum BusEvent<'a> {
    /// `committed_us`: when the publishing gateway saw the commit (µs since the Unix epoch),
    /// for the fan-out latency metric.
    Message {
        seq: u64,
        origin: &'a str,
        committed_us: u64,
        frame: Bytes,
    },
    Typing {
        origin: &'a str,
        frame: Bytes,
    },
    Presence {
        frame: Bytes,
    },
}

pub fn encode_message(seq: u64, origin: &str, committed_us: u64, frame: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(frame.len() + origin.len() + 48);
    buf.put_slice(b"m ");
    buf.put_slice(seq.to_string().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(origin.as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(committed_us.to_string().as_bytes());
    buf.put_u8(b'\n');
    buf.put_slice(frame.as_bytes());
    buf.freeze()
}

pub fn encode_typing(origin: &str, frame: &str) -> Bytes {
    Bytes::from(format!("t {origin}\n{frame}"))
}

pub fn encode_presence(frame: &str) -> Bytes {
    Bytes::from(format!("p\n{frame}"))
}

/// Reads an event; `None` for anything this version does not understand.
pub fn decode(event: &Bytes) -> Option<BusEvent<'_>> {
    let newline = event.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&event[..newline]).ok()?;
    let frame = event.slice(newline + 1..);
    let mut parts = header.split(' ');
    match parts.next()? {
        "m" => {
            let seq = parts.next()?.parse().ok()?;
            let origin = parts.next()?;
            let committed_us = parts.next()?.parse().ok()?;
            Some(BusEvent::Message {
                seq,
                origin,
                committed_us,
                frame,
            })
        }
        "t" => Some(BusEvent::Typing {
            origin: parts.next()?,
            frame,
        }),
        "p" => Some(BusEvent::Presence { frame }),
        _ => None,
    }
}

/// The presence frame as the Redis scripts also build it (names need no JSON escaping: their
/// alphabets have no quote or backslash).
pub fn presence_frame(room: &str, user: &str, online: bool) -> String {
    let state = if online { "online" } else { "offline" };
    format!(r#"{{"type":"presence","room":"{room}","user":"{user}","state":"{state}"}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let m = encode_message(42, "gw-1", 1_700_000_000_000_123, r#"{"type":"message"}"#);
        assert_eq!(
            decode(&m),
            Some(BusEvent::Message {
                seq: 42,
                origin: "gw-1",
                committed_us: 1_700_000_000_000_123,
                frame: Bytes::from_static(br#"{"type":"message"}"#)
            })
        );
        let t = encode_typing("gw-2", "{}");
        assert!(matches!(
            decode(&t),
            Some(BusEvent::Typing { origin: "gw-2", .. })
        ));
        let p = encode_presence(&presence_frame("a", "bob", true));
        assert!(matches!(decode(&p), Some(BusEvent::Presence { .. })));
        assert_eq!(decode(&Bytes::from_static(b"garbage")), None);
        assert_eq!(decode(&Bytes::from_static(b"m x gw 1\n{}")), None);
        assert_eq!(decode(&Bytes::from_static(b"m 1 gw\n{}")), None);
    }

    #[test]
    fn presence_frame_is_the_protocol_frame() {
        let text = presence_frame("general", "bob", false);
        let parsed = chat_protocol::frames::parse_server_frame(&text).unwrap();
        assert_eq!(
            parsed.frame,
            chat_protocol::ServerFrame::Presence {
                room: RoomName::parse("general").unwrap(),
                user: Username::parse("bob").unwrap(),
                state: chat_protocol::frames::PresenceState::Offline
            }
        );
    }
}
