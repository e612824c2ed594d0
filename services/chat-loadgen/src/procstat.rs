//! CPU seconds and resident memory of the gateway processes, and how busy the whole machine
//! was, read from /proc.

use std::path::Path;

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ is 100 on every architecture
/// the kernel ships).
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// The load generator's own CPU time so far: it shares the machine with the gateways.
    pub own_cpu_seconds: f64,
    pub machine: MachineTicks,
    /// The processes that could be read.
    cpu_by_pid: Vec<(u32, f64)>,
}

/// The whole machine's CPU time so far, summed over its cores, in ticks (the first line of
/// /proc/stat). On a virtual machine `steal` is time a core was ready to run but the
/// hypervisor ran something else.
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTicks {
    pub cores: usize,
    /// user, nice, system, irq and softirq (guest time is inside user).
    pub busy: u64,
    /// idle and iowait.
    pub idle: u64,
    pub steal: u64,
}

/// How busy the machine was between two samples, as shares of all its cores' time.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MachineUse {
    pub cores: usize,
    pub busy_share: f64,
    pub steal_share: f64,
}

impl MachineTicks {
    /// `None` when /proc/stat could not be read or no time passed.
    pub fn since(&self, earlier: &MachineTicks) -> Option<MachineUse> {
        let busy = self.busy.checked_sub(earlier.busy)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        let total = busy + idle + steal;
        (total > 0 && self.cores > 0).then(|| MachineUse {
            cores: self.cores,
            busy_share: busy as f64 / total as f64,
            steal_share: steal as f64 / total as f64,
        })
    }
}

/// Parses /proc/stat (all zeros when it cannot be read).
fn machine_ticks(stat: &str) -> MachineTicks {
    let mut ticks = MachineTicks::default();
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("cpu") => {
                let v: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
                let at = |i: usize| v.get(i).copied().unwrap_or(0);
                // user nice system idle iowait irq softirq steal (guest, guest_nice).
                ticks.busy = at(0) + at(1) + at(2) + at(5) + at(6);
                ticks.idle = at(3) + at(4);
                ticks.steal = at(7);
            }
            Some(cpu) if cpu.starts_with("cpu") => ticks.cores += 1,
            _ => {}
        }
    }
    ticks
}

/// Samples the gateway processes through a run. A process that exits keeps the CPU time it
/// was last seen with (counting it as zero would subtract all it used), and with a cluster
/// state directory the pids are read again at each sample, so a gateway restarted mid-run
/// (reconnect-storm) is counted from its start.
pub struct Sampler {
    cluster_state: Option<std::path::PathBuf>,
    pids: Vec<u32>,
    /// CPU seconds each pid was last seen with.
    last_cpu: std::collections::HashMap<u32, f64>,
}

impl Sampler {
    /// Fails on a `--pid` that is not running (a typo would otherwise read as 0 CPU s).
    pub fn new(pids: &[u32], cluster_state: Option<&Path>) -> anyhow::Result<Sampler> {
        let pids = match cluster_state {
            Some(state) => cluster_pids(state)?,
            None => pids.to_vec(),
        };
        for pid in &pids {
            anyhow::ensure!(
                Path::new(&format!("/proc/{pid}/stat")).exists(),
                "no running process with pid {pid} to sample"
            );
        }
        Ok(Sampler {
            cluster_state: cluster_state.map(Path::to_path_buf),
            pids,
            last_cpu: Default::default(),
        })
    }

    /// Every pid sampled so far.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    pub fn sample(&mut self) -> Sample {
        if let Some(state) = &self.cluster_state
            && let Ok(now) = cluster_pids(state)
        {
            for pid in now {
                if !self.pids.contains(&pid) {
                    self.pids.push(pid);
                }
            }
        }
        let mut total = sample(&self.pids);
        for (pid, cpu) in &total.cpu_by_pid {
            self.last_cpu.insert(*pid, *cpu);
        }
        total.cpu_seconds = self.last_cpu.values().sum();
        total
    }
}

/// The resident memory summed over `pids`, each one's CPU time (`Sampler` sums those, keeping
/// the processes that are gone), and the machine's ticks.
fn sample(pids: &[u32]) -> Sample {
    let mut total = Sample {
        machine: machine_ticks(&std::fs::read_to_string("/proc/stat").unwrap_or_default()),
        own_cpu_seconds: std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| cpu_seconds(&stat))
            .unwrap_or(0.0),
        ..Sample::default()
    };
    for pid in pids {
        if let Some(cpu) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| cpu_seconds(&stat))
        {
            total.cpu_by_pid.push((*pid, cpu));
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

/// User and system CPU time from a /proc/PID/stat line.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after ')'.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    Some(ticks / TICKS_PER_SECOND)
}

/// Gateway pids from a `chat-cluster` state directory (its cluster.json).
fn cluster_pids(state: &Path) -> anyhow::Result<Vec<u32>> {
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
    use super::*;

    #[test]
    fn reads_this_process_and_the_machine() {
        // Busy until this process has used a clock tick of CPU.
        let started = std::time::Instant::now();
        while sample(&[]).own_cpu_seconds == 0.0 {
            assert!(started.elapsed().as_secs() < 10, "no CPU time seen");
        }
        let s = sample(&[std::process::id()]);
        assert!(s.rss_bytes > 0);
        // The same process, sampled as a gateway and as the load generator itself, a moment
        // apart: the same CPU time, give or take a clock tick.
        assert_eq!(s.cpu_by_pid.len(), 1);
        assert!(s.own_cpu_seconds > 0.0, "{s:?}");
        assert!(
            (s.cpu_by_pid[0].1 - s.own_cpu_seconds).abs() <= 1.0 / TICKS_PER_SECOND + 1e-9,
            "{s:?}"
        );
        assert_eq!(
            cpu_seconds("1 (a) b) S 0 0 0 0 0 0 0 0 0 0 250 50 0 0"),
            Some(3.0),
            "a command name with a parenthesis and a space"
        );
        assert!(
            s.machine.cores >= 1 && s.machine.busy > 0,
            "{:?}",
            s.machine
        );
    }

    #[test]
    fn a_process_that_exits_keeps_the_cpu_it_used() {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; read x",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut sampler = Sampler::new(&[pid], None).unwrap();
        let mut used = 0.0;
        while used == 0.0 {
            used = sampler.sample().cpu_seconds;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(child.stdin.take());
        child.wait().unwrap();
        let after = sampler.sample().cpu_seconds;
        assert!(after >= used, "{after} < {used}");
        assert!(
            Sampler::new(&[u32::MAX], None).is_err(),
            "a pid that is not running"
        );
    }

    #[test]
    fn machine_use_is_shares_of_every_core_s_time() {
        let before = machine_ticks(
            "cpu  100 0 50 800 10 5 5 30 0 0\ncpu0 50 0 25 400 5 3 2 15 0 0\n\
             cpu1 50 0 25 400 5 2 3 15 0 0\nintr 1 2 3\n",
        );
        assert_eq!(before.cores, 2);
        assert_eq!((before.busy, before.idle, before.steal), (160, 810, 30));
        // 200 ticks later (1 s on two cores): 150 busy, 40 idle, 10 stolen.
        let after = MachineTicks {
            busy: 310,
            idle: 850,
            steal: 40,
            ..before
        };
        let used = after.since(&before).unwrap();
        assert_eq!(used.cores, 2);
        assert!((used.busy_share - 0.75).abs() < 1e-9);
        assert!((used.steal_share - 0.05).abs() < 1e-9);
        assert!(
            before.since(&after).is_none(),
            "time does not run backwards"
        );
        assert!(before.since(&before).is_none(), "no time passed");
        let unreadable = machine_ticks("");
        assert!(unreadable.since(&unreadable).is_none());
    }
}
