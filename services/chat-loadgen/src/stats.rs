//! What receivers measure: end-to-end latency, and per-room seq checks that count every
//! missing or duplicated delivery.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latencies are recorded in microseconds, up to one minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One receiver's view of its room: the seq checks. Its latencies go to `Latencies`.
pub struct Receiver {
    /// Which receiver this is (it picks the latency shard).
    pub id: usize,
    /// Unique messages received (seq advanced).
    pub unique: u64,
    /// Messages received again (seq not above the last one).
    pub duplicates: u64,
    /// Seqs skipped (a later seq arrived first); a gap later filled shows as a duplicate too.
    pub skipped: u64,
    pub last_seq: u64,
}

impl Receiver {
    pub fn new(id: usize) -> Self {
        Receiver {
            id,
            unique: 0,
            duplicates: 0,
            skipped: 0,
            last_seq: 0,
        }
    }

    /// Checks a delivered message's seq against the last one seen.
    /// Returns whether the message was new to this receiver.
    pub fn message(&mut self, seq: u64) -> bool {
        if seq <= self.last_seq {
            self.duplicates += 1;
            return false;
        }
        if self.last_seq != 0 && seq > self.last_seq + 1 {
            self.skipped += seq - self.last_seq - 1;
        }
        self.last_seq = seq;
        self.unique += 1;
        true
    }
}

/// End-to-end latencies of every delivery, overall and per second of the run, in a few
/// shards that receivers share by index. A histogram per receiver cost 139 KiB each (1.4 GB
/// for big-room's 10,000 receivers) and made nearly every record a cache miss; a handful of
/// shards stays in cache, and with a few shards per thread a lock is rarely contended.
pub struct Latencies {
    shards: Vec<std::sync::Mutex<Shard>>,
}

struct Shard {
    total: Histogram<u64>,
    per_second: Vec<Histogram<u64>>,
}

/// Per-second histograms keep 2 significant digits: they feed the plot and the step p99s.
fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

impl Latencies {
    pub fn new(shards: usize) -> Self {
        Latencies {
            shards: (0..shards.max(1))
                .map(|_| {
                    std::sync::Mutex::new(Shard {
                        total: histogram(),
                        per_second: Vec::new(),
                    })
                })
                .collect(),
        }
    }

    /// Records one delivery's latency for receiver `receiver`, in second `second` of the run.
    pub fn record(&self, receiver: usize, latency_us: u64, second: usize) {
        let latency = latency_us.clamp(1, 60_000_000);
        let shard = &self.shards[receiver % self.shards.len()];
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let _ = shard.total.record(latency);
        if shard.per_second.len() <= second {
            shard.per_second.resize_with(second + 1, second_histogram);
        }
        let _ = shard.per_second[second].record(latency);
    }

    /// Every shard merged: the whole run, and each second.
    pub fn merged(&self) -> (Histogram<u64>, Vec<Histogram<u64>>) {
        let mut total = histogram();
        let mut per_second: Vec<Histogram<u64>> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let _ = total.add(&shard.total);
            for (second, h) in shard.per_second.iter().enumerate() {
                if per_second.len() <= second {
                    per_second.resize_with(second + 1, second_histogram);
                }
                let _ = per_second[second].add(h);
            }
        }
        (total, per_second)
    }
}

/// Counters shared by every task, read by the progress bar and the per-second series.
pub struct Shared {
    /// Connections open now.
    pub connected: AtomicU64,
    /// Receiving clients connected and joined now (publishers excluded).
    pub receivers_connected: AtomicU64,
    /// Connections ever made (first connections; reconnects are counted apart).
    pub opened: AtomicU64,
    /// Messages sent by publishers (acked or refused later).
    pub sent: AtomicU64,
    pub connect_failures: AtomicU64,
    pub reconnects: AtomicU64,
    pub acked: AtomicU64,
    pub send_errors: AtomicU64,
    pub received: AtomicU64,
    /// Deliveries new to their receiver (duplicates excluded).
    pub unique: AtomicU64,
    /// Deliveries per second since the start of the run.
    pub per_second: Vec<AtomicU64>,
    /// Messages acknowledged per second since the start of the run.
    pub acked_per_second: Vec<AtomicU64>,
}

impl Shared {
    pub fn new(seconds: usize) -> Self {
        Shared {
            connected: AtomicU64::new(0),
            receivers_connected: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            received: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            acked_per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn acknowledged(&self, second: usize) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.acked_per_second.get(second) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn delivered(&self, second: usize) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.per_second.get(second) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Percentiles {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_gaps_and_duplicates() {
        let mut r = Receiver::new(0);
        let new: Vec<bool> = [1, 2, 4, 3, 4, 5]
            .into_iter()
            .map(|seq| r.message(seq))
            .collect();
        assert_eq!(new, [true, true, true, false, false, true]);
        assert_eq!((r.unique, r.duplicates, r.skipped), (4, 2, 1));
    }

    #[test]
    fn latencies_of_every_shard_are_merged_per_second() {
        let latencies = Latencies::new(4);
        // Receivers 0..8 over 4 shards: 1 ms in second 0, 3 ms in second 2, none in second 1.
        for receiver in 0..8 {
            latencies.record(receiver, 1_000, 0);
            latencies.record(receiver, 3_000, 2);
        }
        let (total, per_second) = latencies.merged();
        assert_eq!(total.len(), 16);
        assert!(total.equivalent(total.max(), 3_000));
        let counts: Vec<u64> = per_second.iter().map(|h| h.len()).collect();
        assert_eq!(counts, [8, 0, 8]);
        assert!(per_second[2].equivalent(per_second[2].value_at_quantile(0.5), 3_000));
    }
}
