//! This gateway's presence: how many local sessions each user has in each room, and the repair
//! that brings the cluster's record (kept by the bus) back in line with it.
//!
//! The local count is the truth; the bus holds one entry per (room, user) this gateway has
//! sessions for. A bus call can fail (Redis restarting, a connection being replaced), and Redis
//! can lose its data. Either way the key is marked, and a repair task calls the bus again,
//! with backoff, until the record matches: `presence_enter` for a key with local sessions,
//! `presence_exit` for one without. Both are idempotent in the bus, so repeating one is safe.
//!
//! Bounds: at most one mark per (room, user) this gateway had sessions for while the bus was
//! failing; one repair task at a time, which ends once nothing is marked.

use crate::bus::{Bus, BusError};
use chat_protocol::{RoomName, Username};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

type Key = (RoomName, Username);

/// The first retry of a repair, and the longest wait between two.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Arc<dyn Bus>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (room, user) -> local sessions of that user in that room.
    sessions: HashMap<Key, usize>,
    /// Keys whose record in the bus may be wrong, each with the mark's number: a repair that
    /// finishes clears a key only if it was not marked again meanwhile.
    marked: HashMap<Key, u64>,
    marks: u64,
    repairing: bool,
}

impl State {
    fn present(&self, key: &Key) -> bool {
        self.sessions.contains_key(key)
    }
}

impl Presence {
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Presence {
            inner: Arc::new(Inner {
                bus,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Counts a local session of `user` in `room` and records it in the bus (the cluster hears
    /// of the first one); returns who is online.
    pub async fn enter(&self, room: &RoomName, user: &Username) -> Result<Vec<Username>, BusError> {
        *self
            .inner
            .lock()
            .sessions
            .entry((room.clone(), user.clone()))
            .or_insert(0) += 1;
        self.announce(room, user).await
    }

    /// Records again a session that is counted already (a re-join); returns who is online.
    pub async fn announce(
        &self,
        room: &RoomName,
        user: &Username,
    ) -> Result<Vec<Username>, BusError> {
        let online = self.inner.bus.presence_enter(room, user).await;
        if online.is_err() {
            self.mark(room, user);
        }
        online
    }

    /// Uncounts a session; the cluster hears when it was the user's last one here.
    pub async fn exit(&self, room: &RoomName, user: &Username) {
        let key = (room.clone(), user.clone());
        let last = {
            let mut state = self.inner.lock();
            match state.sessions.get_mut(&key) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    state.sessions.remove(&key);
                    true
                }
                None => false,
            }
        };
        if last && let Err(e) = self.inner.bus.presence_exit(room, user).await {
            tracing::warn!(error = %e, "could not record presence exit; will retry");
            self.mark(room, user);
        }
    }

    /// The bus lost this gateway's record (Redis restarted, or withdrew it): write it again.
    pub fn rewrite_all(&self) {
        let mut state = self.inner.lock();
        let keys: Vec<Key> = state.sessions.keys().cloned().collect();
        for key in keys {
            Self::mark_locked(&self.inner, &mut state, key);
        }
    }

    fn mark(&self, room: &RoomName, user: &Username) {
        let mut state = self.inner.lock();
        Self::mark_locked(&self.inner, &mut state, (room.clone(), user.clone()));
    }

    fn mark_locked(inner: &Arc<Inner>, state: &mut State, key: Key) {
        state.marks += 1;
        let mark = state.marks;
        state.marked.insert(key, mark);
        metrics::gauge!("chat_presence_repairs_pending").set(state.marked.len() as f64);
        if !state.repairing {
            state.repairing = true;
            // Not tracked with the sessions: it holds only a weak reference and ends with the
            // gateway, and shutdown must not wait for a bus that is down.
            tokio::spawn(repair(Arc::downgrade(inner)));
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Calls the bus for each marked key until none is left; backs off while the bus fails.
async fn repair(inner: Weak<Inner>) {
    let mut delay = FIRST_RETRY;
    loop {
        tokio::time::sleep(delay).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let round: Vec<(Key, u64)> = inner
            .lock()
            .marked
            .iter()
            .map(|(key, mark)| (key.clone(), *mark))
            .collect();
        let mut failed = false;
        for (key, mark) in round {
            let present = inner.lock().present(&key);
            let (room, user) = &key;
            let done = if present {
                inner.bus.presence_enter(room, user).await.map(drop)
            } else {
                inner.bus.presence_exit(room, user).await
            };
            if let Err(e) = done {
                tracing::debug!(error = %e, "presence repair failed; retrying");
                failed = true;
                break;
            }
            // Cleared only if nothing changed while the bus answered: a session that came or
            // went meanwhile may have been recorded before this call, and is checked again.
            let mut state = inner.lock();
            if state.present(&key) == present && state.marked.get(&key) == Some(&mark) {
                state.marked.remove(&key);
            }
        }
        let mut state = inner.lock();
        metrics::gauge!("chat_presence_repairs_pending").set(state.marked.len() as f64);
        if state.marked.is_empty() {
            state.repairing = false;
            return;
        }
        delay = if failed {
            (delay * 2).min(LAST_RETRY)
        } else {
            FIRST_RETRY
        };
    }
}
