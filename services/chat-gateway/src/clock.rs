//! Wall-clock time since the Unix epoch, in the units the gateway stores and sends: message
//! `ts` in milliseconds, bus commit stamps in microseconds, token expiry in seconds.
//!
//! Wall clock, not `Instant`: these values are compared across processes and hosts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Zero if the system clock is set before 1970.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

pub fn unix_ms() -> i64 {
    since_epoch().as_millis() as i64
}

pub fn unix_us() -> u64 {
    since_epoch().as_micros() as u64
}

pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}
