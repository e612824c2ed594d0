//! The bounded queues that carry one connection's outgoing frames: the session's replies and
//! the rooms' fanout.
//!
//! Each queue has one receiver (the connection's task) and any number of senders. They are
//! small because there is one pair per connection: an idle queue is one allocation of 136
//! bytes, and holds no buffer while it is empty (a tokio channel allocates a block of 32
//! slots up front, about 1.7 KiB with its shared state). The receiver does not learn that
//! every sender is gone; the connection that owns it knows when to stop.
//!
//! A full queue either makes the sender wait for room (`send`, for replies: a client that
//! does not read slows only itself), or is reported at once (`try_send`, for room events:
//! the room marks the queue `overflow`ed, which closes it and tells the receiver).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::sync::Notify;

/// Creates a queue that holds at most `capacity` items.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let receiver = Receiver::new(capacity);
    (receiver.sender(), receiver)
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Woken when an item is taken from a full queue, or the queue closes.
    room: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    closed: bool,
    overflowed: bool,
    /// Items ever queued: with the receiver's count of items taken, it places a frame of
    /// another queue after everything queued here before it (`Sender::mark`).
    queued: u64,
    /// Held back from the receiver (see `Sender::cork`).
    corked: bool,
    /// Woken by the next item (or the close).
    receiver: Option<Waker>,
    /// Woken by the close only.
    watcher: Option<Waker>,
}

fn register(slot: &mut Option<Waker>, waker: &Waker) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the queue and drops what it holds (outside the lock); waiting senders return.
    fn close(&self, overflowed: bool) -> bool {
        let (first, items, wakers) = {
            let mut state = self.lock();
            let first = !state.closed;
            state.closed = true;
            state.overflowed |= overflowed && first;
            (
                first,
                std::mem::take(&mut state.items),
                [state.receiver.take(), state.watcher.take()],
            )
        };
        drop(items);
        self.room.notify_waiters();
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
        first
    }
}

/// Why an item was not queued; the item comes back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    Full(T),
    Closed(T),
}

/// The receiver is gone, or closed the queue.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` if there is room.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let receiver = {
            let mut state = self.shared.lock();
            if state.closed {
                return Err(TrySendError::Closed(item));
            }
            if state.items.len() >= state.capacity {
                return Err(TrySendError::Full(item));
            }
            state.items.push_back(item);
            state.queued += 1;
            state.receiver.take()
        };
        if let Some(waker) = receiver {
            waker.wake();
        }
        Ok(())
    }

    /// Queues `item`, waiting for room while the queue is full.
    pub async fn send(&self, mut item: T) -> Result<(), Closed> {
        loop {
            // Registered before looking, so that room made in between is not missed.
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(_)) => return Err(Closed),
                Err(TrySendError::Full(back)) => item = back,
            }
            room.await;
        }
    }

    /// Closes the queue because a sender found it full and must not wait: the receiver fell
    /// behind. Returns whether this call closed it.
    pub fn overflow(&self) -> bool {
        self.shared.close(true)
    }

    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// How many items have been queued so far: once `Receiver::taken` reaches it, everything
    /// queued before this call has been taken.
    pub fn mark(&self) -> u64 {
        self.shared.lock().queued
    }

    /// Holds the queue back from the receiver until the returned guard is dropped, so that
    /// frames queued meanwhile (here and, by the receiver's choice, elsewhere) leave together.
    /// Items can still be queued; a `send` that waits for room while the queue is corked by
    /// the same task waits forever, so queue before corking.
    pub fn cork(&self) -> Cork<'_, T> {
        self.shared.lock().corked = true;
        Cork {
            shared: &self.shared,
        }
    }
}

/// Uncorks its queue when dropped, and wakes the receiver.
pub struct Cork<'a, T> {
    shared: &'a Shared<T>,
}

impl<T> Drop for Cork<'_, T> {
    fn drop(&mut self) {
        let receiver = {
            let mut state = self.shared.lock();
            state.corked = false;
            state.receiver.take()
        };
        if let Some(waker) = receiver {
            waker.wake();
        }
    }
}

pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The queue was corked when last looked at.
    corked: bool,
    /// Items taken so far (see `Sender::mark`).
    taken: u64,
}

enum Taken<T> {
    Item(T),
    Empty,
    Corked,
    Closed,
}

/// Whether the next item may be taken now (see `Receiver::poll_recv_when`).
pub trait Gate<T> {
    fn admits(&self, item: &T) -> bool;
}

/// Admits every item.
struct Open;

impl<T> Gate<T> for Open {
    fn admits(&self, _: &T) -> bool {
        true
    }
}

impl<T, F: Fn(&T) -> bool> Gate<T> for F {
    fn admits(&self, item: &T) -> bool {
        self(item)
    }
}

impl<T> Receiver<T> {
    /// A queue that holds at most `capacity` items, with no sender yet (see `sender`).
    pub fn new(capacity: usize) -> Self {
        Receiver {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    items: VecDeque::new(),
                    capacity: capacity.max(1),
                    closed: false,
                    overflowed: false,
                    queued: 0,
                    corked: false,
                    receiver: None,
                    watcher: None,
                }),
                room: Notify::new(),
            }),
            corked: false,
            taken: 0,
        }
    }

    /// The next item; `None` once the queue is closed (what it held was dropped then).
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_recv_when(cx, Open)
    }

    /// Like `poll_recv`, but leaves the next item queued (and is pending) while `gate` refuses
    /// it: the caller takes from elsewhere until it would not.
    pub fn poll_recv_when(&mut self, cx: &mut Context<'_>, gate: impl Gate<T>) -> Poll<Option<T>> {
        // Taking items spends the task's budget, like tokio's channels: a queue that is
        // refilled as fast as it drains must not keep the task from yielding.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        match self.take(Some(cx.waker()), gate) {
            Taken::Item(item) => {
                coop.made_progress();
                Poll::Ready(Some(item))
            }
            Taken::Closed => Poll::Ready(None),
            Taken::Empty | Taken::Corked => Poll::Pending,
        }
    }

    /// Items taken so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Whether the queue was corked when last polled: the receiver may then hold back its
    /// other queues too, so that nothing overtakes what the corked one will release.
    pub fn is_corked(&self) -> bool {
        self.corked
    }

    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        match self.take(None, Open) {
            Taken::Item(item) => Some(item),
            Taken::Empty | Taken::Corked | Taken::Closed => None,
        }
    }

    /// Pops an item; when there is none (or the queue is corked), registers `waker` (if given)
    /// for the next one (or the uncork).
    fn take(&mut self, waker: Option<&Waker>, gate: impl Gate<T>) -> Taken<T> {
        let (item, was_full) = {
            let mut state = self.shared.lock();
            self.corked = state.corked && !state.closed;
            if self.corked {
                if let Some(waker) = waker {
                    register(&mut state.receiver, waker);
                }
                return Taken::Corked;
            }
            let was_full = state.items.len() >= state.capacity;
            if state.items.front().is_some_and(|item| !gate.admits(item)) {
                if let Some(waker) = waker {
                    register(&mut state.receiver, waker);
                }
                return Taken::Empty;
            }
            let Some(item) = state.items.pop_front() else {
                if state.closed {
                    return Taken::Closed;
                }
                if let Some(waker) = waker {
                    register(&mut state.receiver, waker);
                }
                return Taken::Empty;
            };
            if state.items.is_empty() {
                // An idle connection holds no buffer, whatever its last burst was.
                state.items = VecDeque::new();
            }
            (item, was_full)
        };
        self.taken += 1;
        if was_full {
            self.shared.room.notify_waiters();
        }
        Taken::Item(item)
    }

    /// Ready once a sender has overflowed the queue; otherwise wakes the task when one does.
    pub fn poll_overflowed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.lock();
        if state.overflowed {
            return Poll::Ready(());
        }
        register(&mut state.watcher, cx.waker());
        Poll::Pending
    }

    /// Refuses further items and drops the queued ones; waiting senders return `Closed`.
    pub fn close(&mut self) {
        self.shared.close(false);
    }

    /// A sender for this queue.
    pub fn sender(&self) -> Sender<T> {
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.close(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_up_to_the_capacity() {
        let (tx, mut rx) = bounded(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().await, Some(1));
        tx.try_send(3).unwrap();
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn a_gated_item_waits_until_the_other_queue_is_taken_past_its_mark() {
        let (fanout_tx, mut fanout) = bounded(8);
        let (replies_tx, mut replies) = bounded(8);
        fanout_tx.try_send("a").unwrap();
        fanout_tx.try_send("b").unwrap();
        replies_tx.try_send(("left", fanout_tx.mark())).unwrap();
        fanout_tx.try_send("c").unwrap();
        let mut order = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            let taken = fanout.taken();
            let gate = |reply: &(&'static str, u64)| reply.1 <= taken;
            if let Poll::Ready(Some((reply, _))) = replies.poll_recv_when(&mut cx, gate) {
                order.push(reply);
            } else if let Some(item) = fanout.try_recv() {
                order.push(item);
            } else {
                break;
            }
        }
        assert_eq!(order, ["a", "b", "left", "c"]);
    }

    #[tokio::test]
    async fn a_corked_queue_holds_its_items_until_uncorked() {
        let (tx, mut rx) = bounded(4);
        tx.try_send(1).unwrap();
        let cork = tx.cork();
        tx.try_send(2).unwrap();
        assert_eq!(rx.try_recv(), None);
        assert!(rx.is_corked());
        let receiving = tokio::spawn(async move {
            let first = rx.recv().await;
            (first, rx)
        });
        tokio::task::yield_now().await;
        assert!(!receiving.is_finished(), "nothing is taken while corked");
        drop(cork);
        let (first, mut rx) = receiving.await.unwrap();
        assert_eq!((first, rx.try_recv()), (Some(1), Some(2)));
        assert!(!rx.is_corked());
    }

    #[tokio::test]
    async fn an_empty_queue_keeps_no_buffer() {
        let (tx, mut rx) = bounded(100);
        for i in 0..100 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }

    #[tokio::test]
    async fn send_waits_for_room() {
        let (tx, mut rx) = bounded(1);
        tx.send(1).await.unwrap();
        let waiting = tokio::spawn(async move { tx.send(2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
    }

    #[tokio::test]
    async fn closing_releases_waiting_senders() {
        let (tx, mut rx) = bounded(1);
        tx.send(1).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(2).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        rx.close();
        assert_eq!(waiting.await.unwrap(), Err(Closed));
        assert_eq!(rx.recv().await, None);
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed(3)));
        drop(rx);
        assert_eq!(tx.send(4).await, Err(Closed));
    }

    #[tokio::test]
    async fn an_overflow_closes_the_queue_and_wakes_the_receiver() {
        let (tx, mut rx) = bounded(1);
        let watching = tokio::spawn(async move {
            poll_fn(|cx| rx.poll_overflowed(cx)).await;
            rx
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(1).unwrap();
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
        assert!(tx.overflow());
        assert!(!tx.overflow(), "reported once");
        let mut rx = watching.await.unwrap();
        assert!(tx.is_closed());
        assert_eq!(rx.recv().await, None);
    }
}
