//! Group commit: the appends of every session on this gateway share transactions.
//!
//! A durable commit waits for its WAL flush. With one transaction per message, a gateway tops
//! out at a few thousand messages per second whatever the pool size, and the database spends its
//! time flushing. Here appends queue while earlier commits are in flight and then go to the
//! database together, so a flush is paid per batch. An append that finds a free slot is
//! committed at once, alone: batching adds no wait when there is no load.
//!
//! Bounds: at most `max_batch` messages per transaction, `in_flight` transactions at a time, and
//! `max_batch * in_flight` appends waiting; a caller waits for room in the queue (its own
//! deadline bounds that wait).

use super::{Committed, NewMessage, StoreError};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// How much the queue gathers (`CHAT_DB_COMMIT_BATCH`, `CHAT_DB_COMMITS_IN_FLIGHT`).
#[derive(Debug, Clone, Copy)]
pub struct CommitLimits {
    /// Most messages in one transaction.
    pub max_batch: usize,
    /// Most transactions running at once.
    pub in_flight: usize,
}

/// The outcome of committing one batch: a result per message, in order, or a failure of the
/// whole transaction.
pub(crate) type BatchOutcome = Result<Vec<Result<Committed, StoreError>>, StoreError>;

struct Pending {
    message: NewMessage,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// The sending side; cheap to clone. The gathering task ends when every clone is dropped.
#[derive(Clone)]
pub(crate) struct CommitQueue {
    queue: mpsc::Sender<Pending>,
}

impl CommitQueue {
    /// Starts the gathering task. `commit` writes one batch in one transaction and must bound its
    /// own time (it runs detached from the callers, who may stop waiting).
    pub fn start<C, F>(limits: CommitLimits, commit: C) -> Self
    where
        C: Fn(Arc<Vec<NewMessage>>) -> F + Send + Sync + 'static,
        F: Future<Output = BatchOutcome> + Send + 'static,
    {
        let max_batch = limits.max_batch.max(1);
        let in_flight = limits.in_flight.max(1);
        let (queue, waiting) = mpsc::channel(max_batch * in_flight);
        tokio::spawn(gather(waiting, max_batch, in_flight, Arc::new(commit)));
        CommitQueue { queue }
    }

    /// Commits `message` with the next batch; answers when that batch has committed.
    pub async fn append(&self, message: NewMessage) -> Result<Committed, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { message, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the commit queue has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the commit was abandoned".into()))?
    }
}

/// Takes whatever has queued each time a commit slot frees up.
async fn gather<C, F>(
    mut waiting: mpsc::Receiver<Pending>,
    max_batch: usize,
    in_flight: usize,
    commit: Arc<C>,
) where
    C: Fn(Arc<Vec<NewMessage>>) -> F + Send + Sync + 'static,
    F: Future<Output = BatchOutcome> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(max_batch.min(64));
        if waiting.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        let commit = commit.clone();
        tokio::spawn(async move {
            settle(batch, commit.as_ref()).await;
            drop(slot);
        });
    }
}

/// Commits a batch and answers each caller. A resend of a message in the same batch (same room,
/// sender and client id) is committed once; the later copies get its result as a duplicate. If
/// the transaction fails for a reason other than availability (one message the database refuses
/// must not cost the others theirs), each message is retried in a transaction of its own.
async fn settle<C, F>(mut batch: Vec<Pending>, commit: &C)
where
    C: Fn(Arc<Vec<NewMessage>>) -> F,
    F: Future<Output = BatchOutcome>,
{
    // A caller that stopped waiting while its append was queued (its deadline passed, so it
    // was told `unavailable`) must not have the message stored behind its back.
    batch.retain(|pending| !pending.reply.is_closed());
    if batch.is_empty() {
        return;
    }
    crate::telemetry::hot::COMMIT_BATCH_MESSAGES.record(batch.len() as f64);
    // For each pending append: the message (an index into `unique`) whose result answers it,
    // and whether it is a resend of that message.
    let mut answered_by = Vec::with_capacity(batch.len());
    let mut unique = Vec::with_capacity(batch.len());
    {
        let mut first_of: HashMap<(&str, &str, &str), usize> = HashMap::new();
        for pending in &batch {
            let m = &pending.message;
            let key = m
                .client_id
                .as_ref()
                .map(|id| (m.room.as_str(), m.from.as_str(), id.as_str()));
            match key.and_then(|key| first_of.get(&key).copied()) {
                Some(original) => answered_by.push((original, true)),
                None => {
                    if let Some(key) = key {
                        first_of.insert(key, unique.len());
                    }
                    answered_by.push((unique.len(), false));
                    unique.push(m.clone());
                }
            }
        }
    }
    let unique = Arc::new(unique);
    let count = unique.len();
    let results = match commit(unique.clone()).await {
        Ok(results) if results.len() == count => results,
        Ok(_) => vec![Err(wrong_count()); count],
        Err(StoreError::Internal(_)) if count > 1 => {
            let mut results = Vec::with_capacity(count);
            for message in unique.iter() {
                results.push(match commit(Arc::new(vec![message.clone()])).await {
                    Ok(mut one) if one.len() == 1 => one.remove(0),
                    Ok(_) => Err(wrong_count()),
                    Err(e) => Err(e),
                });
            }
            results
        }
        Err(e) => vec![Err(e); count],
    };
    for (pending, (index, resent)) in batch.into_iter().zip(answered_by) {
        let mut result = results[index].clone();
        if resent && let Ok(committed) = &mut result {
            committed.duplicate = true;
        }
        // The caller may have stopped waiting while the transaction ran; the message stays
        // committed, and a resend with its client id finds it and delivers it.
        let _ = pending.reply.send(result);
    }
}

fn wrong_count() -> StoreError {
    StoreError::Internal("a batch commit answered the wrong number of messages".into())
}

#[cfg(test)]
mod tests {
    //! The gathering logic with a commit function that records what it is given; the SQL that
    //! Postgres runs is tested against a real server in `tests/api/store.rs`.
    use super::*;
    use chat_protocol::{ClientId, MessageBody, RoomName, StoredMessage, Username};
    use std::sync::Mutex;

    fn message(room: &str, body: &str, client_id: Option<&str>) -> NewMessage {
        NewMessage {
            room: RoomName::parse(room).unwrap(),
            from: Username::parse("alice").unwrap(),
            body: MessageBody::parse(body).unwrap(),
            client_id: client_id.map(|c| ClientId::parse(c).unwrap()),
        }
    }

    /// A commit function that numbers messages, records each batch, and holds every batch until
    /// the test lets one through (so that batches form while one is in flight).
    struct Recorder {
        batches: Mutex<Vec<Vec<String>>>,
        gate: Semaphore,
        seq: Mutex<u64>,
    }

    impl Recorder {
        fn new() -> Arc<Self> {
            Arc::new(Recorder {
                batches: Mutex::new(Vec::new()),
                gate: Semaphore::new(0),
                seq: Mutex::new(0),
            })
        }

        fn queue(self: &Arc<Self>, limits: CommitLimits) -> CommitQueue {
            let recorder = self.clone();
            CommitQueue::start(limits, move |batch| {
                let recorder = recorder.clone();
                async move {
                    let bodies = batch.iter().map(|m| m.body.as_str().to_string()).collect();
                    recorder.batches.lock().unwrap().push(bodies);
                    recorder.gate.acquire().await.unwrap().forget();
                    if batch.len() > 1 && batch.iter().any(|m| m.body.as_str() == "poison") {
                        return Err(StoreError::Internal("refused".into()));
                    }
                    Ok(batch
                        .iter()
                        .map(|m| {
                            if m.body.as_str() == "poison" {
                                return Err(StoreError::Internal("refused".into()));
                            }
                            let mut seq = recorder.seq.lock().unwrap();
                            *seq += 1;
                            Ok(Committed {
                                message: StoredMessage {
                                    room: m.room.clone(),
                                    seq: *seq,
                                    from: m.from.clone(),
                                    body: m.body.as_str().to_string(),
                                    ts: 0,
                                    client_id: m.client_id.as_ref().map(|c| c.as_str().into()),
                                },
                                duplicate: false,
                            })
                        })
                        .collect())
                }
            })
        }

        fn batches(&self) -> Vec<Vec<String>> {
            self.batches.lock().unwrap().clone()
        }
    }

    /// Yields until `done` holds; the queue's tasks run in between (current-thread runtime).
    async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition never held");
    }

    type Appending = tokio::task::JoinHandle<Result<Committed, StoreError>>;

    fn spawn_appends(queue: &CommitQueue, messages: Vec<NewMessage>) -> Vec<Appending> {
        messages
            .into_iter()
            .map(|m| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.append(m).await })
            })
            .collect()
    }

    /// Starts one append and waits until its commit is held at the recorder's gate, then starts
    /// `messages` and waits until as many as fit have entered the queue behind it. Returns the
    /// held append and the others.
    async fn behind_a_held_commit(
        recorder: &Recorder,
        queue: &CommitQueue,
        messages: Vec<NewMessage>,
    ) -> (Appending, Vec<Appending>) {
        let held = spawn_appends(queue, vec![message("lobby", "hold", None)]).remove(0);
        until(|| recorder.batches().len() == 1).await;
        let room_left = queue.queue.max_capacity().saturating_sub(messages.len());
        let queued = spawn_appends(queue, messages);
        until(|| queue.queue.capacity() == room_left).await;
        (held, queued)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn appends_gather_while_a_commit_is_in_flight_up_to_the_batch_limit() {
        let recorder = Recorder::new();
        let queue = recorder.queue(CommitLimits {
            max_batch: 3,
            in_flight: 1,
        });
        // The queue holds max_batch * in_flight = 3; the other four callers wait to enter it.
        let (held, rest) = behind_a_held_commit(
            &recorder,
            &queue,
            (1..8)
                .map(|i| message("lobby", &format!("m{i}"), None))
                .collect(),
        )
        .await;
        recorder.gate.add_permits(100);
        let mut seqs = Vec::new();
        for handle in std::iter::once(held).chain(rest) {
            seqs.push(handle.await.unwrap().unwrap().message.seq);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        let sizes: Vec<usize> = recorder.batches().iter().map(Vec::len).collect();
        assert_eq!(
            sizes[0], 1,
            "an append with a free slot goes alone: {sizes:?}"
        );
        assert_eq!(sizes[1], 3, "the next batch takes what gathered: {sizes:?}");
        assert!(
            sizes.iter().all(|&n| n <= 3),
            "batch over the limit: {sizes:?}"
        );
        assert_eq!(sizes.iter().sum::<usize>(), 8);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_resend_in_the_same_batch_is_committed_once() {
        let recorder = Recorder::new();
        let queue = recorder.queue(CommitLimits {
            max_batch: 10,
            in_flight: 1,
        });
        let (held, same) = behind_a_held_commit(
            &recorder,
            &queue,
            vec![
                message("lobby", "hi", Some("c1")),
                message("lobby", "hi", Some("c1")),
                message("other", "hi", Some("c1")),
            ],
        )
        .await;
        recorder.gate.add_permits(2);
        held.await.unwrap().unwrap();
        let results: Vec<Committed> = futures_util::future::join_all(same)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        assert_eq!(recorder.batches()[1], ["hi", "hi"], "one copy per room");
        assert_eq!(results[0].message.seq, results[1].message.seq);
        assert!(!results[0].duplicate && results[1].duplicate);
        assert!(!results[2].duplicate, "another room is another message");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_message_the_database_refuses_does_not_fail_its_batch() {
        let recorder = Recorder::new();
        let queue = recorder.queue(CommitLimits {
            max_batch: 10,
            in_flight: 1,
        });
        let (held, batch) = behind_a_held_commit(
            &recorder,
            &queue,
            vec![
                message("lobby", "a", None),
                message("lobby", "poison", None),
                message("lobby", "b", None),
            ],
        )
        .await;
        recorder.gate.add_permits(100);
        held.await.unwrap().unwrap();
        let results: Vec<_> = futures_util::future::join_all(batch)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(StoreError::Internal(_))));
        let sizes: Vec<usize> = recorder.batches().iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 3, 1, 1, 1], "retried one by one");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_append_abandoned_while_queued_is_not_committed() {
        let recorder = Recorder::new();
        let queue = recorder.queue(CommitLimits {
            max_batch: 10,
            in_flight: 1,
        });
        let (held, mut queued) = behind_a_held_commit(
            &recorder,
            &queue,
            vec![
                message("lobby", "kept", None),
                message("lobby", "given up", None),
            ],
        )
        .await;
        // The second caller's deadline passes while the first commit holds the only slot.
        queued.pop().unwrap().abort();
        tokio::task::yield_now().await;
        recorder.gate.add_permits(100);
        held.await.unwrap().unwrap();
        assert_eq!(queued.pop().unwrap().await.unwrap().unwrap().message.seq, 2);
        assert_eq!(recorder.batches(), [vec!["hold"], vec!["kept"]]);
    }
}
