//! What receivers measure: end-to-end latency, and per-room seq checks that count every
//! missing or duplicated delivery.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latencies are recorded in microseconds, up to one minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One receiver's view of its room.
pub struct Receiver {
    pub e2e: Histogram<u64>,
    /// Unique messages received (seq advanced).
    pub unique: u64,
    /// Messages received again (seq not above the last one).
    pub duplicates: u64,
    /// Seqs skipped (a later seq arrived first); a gap later filled shows as a duplicate too.
    pub skipped: u64,
    pub last_seq: u64,
    /// Per-second end-to-end latencies, kept only by sampled receivers (for the plot).
    pub per_second: Option<Vec<Histogram<u64>>>,
}

impl Receiver {
    pub fn new(sampled: bool) -> Self {
        Receiver {
            e2e: histogram(),
            unique: 0,
            duplicates: 0,
            skipped: 0,
            last_seq: 0,
            per_second: sampled.then(Vec::new),
        }
    }

    /// Records a delivered message. `baseline` is the room's last seq when this receiver
    /// joined (messages up to it are not counted).
    /// Returns whether the message was new to this receiver.
    pub fn message(&mut self, seq: u64, latency_us: Option<u64>, second: usize) -> bool {
        if seq <= self.last_seq {
            self.duplicates += 1;
            return false;
        }
        if self.last_seq != 0 && seq > self.last_seq + 1 {
            self.skipped += seq - self.last_seq - 1;
        }
        self.last_seq = seq;
        self.unique += 1;
        if let Some(latency) = latency_us {
            let latency = latency.clamp(1, 60_000_000);
            let _ = self.e2e.record(latency);
            if let Some(series) = &mut self.per_second {
                while series.len() <= second {
                    series.push(Histogram::new_with_bounds(1, 60_000_000, 2).expect("bounds"));
                }
                let _ = series[second].record(latency);
            }
        }
        true
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
        let mut r = Receiver::new(true);
        for (seq, second) in [(1, 0), (2, 0), (4, 1), (3, 1), (4, 1), (5, 2)] {
            r.message(seq, Some(1000), second);
        }
        assert_eq!((r.unique, r.duplicates, r.skipped), (4, 2, 1));
        assert_eq!(r.per_second.as_ref().unwrap().len(), 3);
        assert_eq!(Percentiles::of(&r.e2e).p50_ms, 1.0);
    }
}
