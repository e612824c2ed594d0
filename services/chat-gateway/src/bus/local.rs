//! The embedded bus: one process, so fan-out is already local and presence is a map.

use super::{Bus, BusError, BusListener, encode_presence, presence_frame};
use async_trait::async_trait;
use bytes::Bytes;
use chat_protocol::{RoomName, Username};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Default)]
pub struct LocalBus {
    listener: OnceLock<Arc<dyn BusListener>>,
    presence: Mutex<HashMap<RoomName, BTreeSet<Username>>>,
}

impl LocalBus {
    pub fn new() -> Self {
        Self::default()
    }

    fn announce(&self, room: &RoomName, user: &Username, online: bool) {
        if let Some(listener) = self.listener.get() {
            let frame = presence_frame(room.as_str(), user.as_str(), online);
            listener.on_room_event(room.as_str(), encode_presence(&frame));
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn start(&self, listener: Arc<dyn BusListener>) {
        let _ = self.listener.set(listener);
    }

    async fn publish(&self, _room: &RoomName, _event: Bytes) -> Result<(), BusError> {
        // The only gateway has already delivered the event to its sockets.
        Ok(())
    }

    async fn subscribe(&self, _room: &RoomName) -> Result<(), BusError> {
        Ok(())
    }

    fn unsubscribe(&self, _room: &RoomName) {}

    async fn presence_enter(
        &self,
        room: &RoomName,
        user: &Username,
    ) -> Result<Vec<Username>, BusError> {
        let (added, online) = {
            let mut presence = self.presence.lock().unwrap_or_else(|e| e.into_inner());
            let users = presence.entry(room.clone()).or_default();
            let added = users.insert(user.clone());
            (added, users.iter().cloned().collect())
        };
        if added {
            self.announce(room, user, true);
        }
        Ok(online)
    }

    async fn presence_exit(&self, room: &RoomName, user: &Username) -> Result<(), BusError> {
        let removed = {
            let mut presence = self.presence.lock().unwrap_or_else(|e| e.into_inner());
            let removed = presence.get_mut(room).is_some_and(|u| u.remove(user));
            if presence.get(room).is_some_and(|u| u.is_empty()) {
                presence.remove(room);
            }
            removed
        };
        if removed {
            self.announce(room, user, false);
        }
        Ok(())
    }

    async fn withdraw_presence(&self) -> Result<(), BusError> {
        let all = std::mem::take(&mut *self.presence.lock().unwrap_or_else(|e| e.into_inner()));
        for (room, users) in all {
            for user in users {
                self.announce(&room, &user, false);
            }
        }
        Ok(())
    }

    fn is_healthy(&self) -> bool {
        true
    }

    fn stop(&self) {}
}
