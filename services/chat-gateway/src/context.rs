//! What every handler and session shares: the store, the bus, the hub, the settings, and the
//! registry of open sessions that a drain closes.

use crate::auth::Auth;
use crate::bus::Bus;
use crate::config::Settings;
use crate::hub::Hub;
use crate::store::Store;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Context {
    pub settings: Settings,
    pub gateway: String,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub hub: Hub,
    pub auth: Auth,
    /// Cancelled when the gateway starts draining.
    pub draining: CancellationToken,
    pub sessions: Arc<SessionRegistry>,
    /// Session and room tasks, awaited on shutdown.
    pub tasks: TaskTracker,
}

pub type SharedContext = Arc<Context>;

/// Open sockets, each with the token that closes it for a drain.
#[derive(Default)]
pub struct SessionRegistry {
    next_id: AtomicU64,
    open: AtomicUsize,
    closers: Mutex<HashMap<u64, CancellationToken>>,
}

/// Unregisters its socket when dropped, however the socket's task ends.
pub struct SessionSlot {
    registry: Arc<SessionRegistry>,
    pub id: u64,
    pub close: CancellationToken,
}

impl SessionRegistry {
    /// Takes a slot if fewer than `limit` sockets are open.
    pub fn admit(self: &Arc<Self>, limit: usize) -> Option<SessionSlot> {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            return None;
        }
        metrics::gauge!("chat_connections_open").increment(1.0);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let close = CancellationToken::new();
        self.closers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, close.clone());
        Some(SessionSlot {
            registry: self.clone(),
            id,
            close,
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The close tokens of every open socket, for the drain to fire in batches.
    pub fn closers(&self) -> Vec<CancellationToken> {
        self.closers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.registry
            .closers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        self.registry.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("chat_connections_open").decrement(1.0);
    }
}
