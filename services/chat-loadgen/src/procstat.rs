//! CPU seconds and resident memory of the gateway processes, read from /proc.

use std::path::Path;

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ is 100 on every architecture
/// the kernel ships).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// The sum over `pids` (processes that are gone count as zero).
pub fn sample(pids: &[u32]) -> Sample {
    let mut total = Sample::default();
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name (which may hold spaces, inside parentheses).
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                // utime and stime are fields 14 and 15 of the line: 12 and 13 after ')'.
                let ticks: f64 = [11, 12]
                    .iter()
                    .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
                    .sum();
                total.cpu_seconds += ticks / TICKS_PER_SECOND;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let rss_kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            total.rss_bytes += rss_kib * 1024;
        }
    }
    total
}

/// Gateway pids from a `chat-cluster` state directory (its cluster.json).
pub fn cluster_pids(state: &Path) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(state.join("cluster.json"))?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    Ok(value["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["pid"].as_u64().map(|p| p as u32))
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let s = super::sample(&[std::process::id()]);
        assert!(s.rss_bytes > 0);
    }
}
