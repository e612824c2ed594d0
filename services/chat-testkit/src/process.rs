//! Spawning server processes so that they die with the test binary, and
//! stopping them by PID.
//!
//! Every child is spawned from ONE dedicated, never-ending spawner thread,
//! with `PR_SET_PDEATHSIG = SIGKILL` set in `pre_exec`. The death signal fires
//! when the *thread* that forked the child exits, so children must not be
//! spawned from a test's own thread (cargo test ends it after each test); the
//! spawner thread only ends when the whole test binary exits, which then
//! kills every server, including the shared ones that live in never-dropped
//! statics.
//!
//! std runs `pre_exec` closures after switching uid/gid (`CommandExt::uid`,
//! `gid`), which matters: a credential change resets the death signal, so it
//! must be set after `setuid`, exactly where `pre_exec` runs.

// `unsafe` is needed here, and only here, for `CommandExt::pre_exec` (the
// closure runs between fork and exec), `libc::prctl`, `libc::getppid` and
// `libc::kill`. All are plain syscalls with no pointers involved.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel};
use std::thread;
use std::time::{Duration, Instant};

struct Request {
    command: Command,
    reply: Sender<io::Result<Child>>,
}

/// Spawns `command` from the testkit's spawner thread, with
/// `PR_SET_PDEATHSIG = SIGKILL`, so the child is killed when the test binary
/// exits. Set stdio, uid/gid and the working directory before calling.
pub fn spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<Request>();
        thread::Builder::new()
            .name("chat-testkit-spawner".into())
            .spawn(move || {
                // Lives until the process exits: the sender sits in a static.
                for Request { mut command, reply } in rx {
                    let _ = reply.send(spawn_with_death_signal(&mut command));
                }
            })
            .unwrap_or_else(|e| panic!("chat-testkit: cannot start the spawner thread: {e}"));
        tx
    });
    let (reply, answer) = channel();
    spawner
        .send(Request { command, reply })
        .unwrap_or_else(|_| panic!("chat-testkit: the spawner thread has died"));
    answer
        .recv()
        .unwrap_or_else(|_| panic!("chat-testkit: the spawner thread has died"))
}

fn spawn_with_death_signal(command: &mut Command) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe syscalls and
    // allocates nothing, as required between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The test binary may have exited between fork and prctl: then
            // we were re-parented and the death signal will never come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Sends `signal` (e.g. `libc::SIGKILL`) to the process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes no pointers. The pid is a child we have not yet
    // reaped, so it cannot have been reused by another process.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Sends `signal` to `child`, waits up to `grace` for it to exit, then sends
/// SIGKILL and reaps it, so no zombie is left behind.
pub fn stop_child(child: &mut Child, signal: libc::c_int, grace: Duration) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    send_signal(child.id(), signal);
    if signal != libc::SIGKILL {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            thread::sleep(Duration::from_millis(20));
        }
        send_signal(child.id(), libc::SIGKILL);
    }
    child
        .wait()
        .unwrap_or_else(|e| panic!("chat-testkit: cannot wait for pid {}: {e}", child.id()))
}

/// Runs a short-lived command to completion through the spawner thread and
/// returns its output (stdout and stderr are captured).
pub(crate) fn output(mut command: Command) -> io::Result<std::process::Output> {
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn(command)?.wait_with_output()
}

/// Whether this process runs as root (effective uid 0).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Why a server did not become ready.
#[derive(Debug)]
pub(crate) enum StartError {
    /// It exited at once, typically because its port was taken in the
    /// meantime (free ports are only free until someone binds them): worth
    /// another try.
    Exited(String),
    /// Anything else (could not run it, not ready in time): retrying won't help.
    Failed(String),
}

/// Calls `launch` until it succeeds, up to `attempts` times while the
/// server keeps exiting at once, pausing `pause` in between. Returns the last
/// error's message.
pub(crate) fn retry_start(
    attempts: u32,
    pause: Duration,
    mut launch: impl FnMut() -> Result<(), StartError>,
) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..attempts {
        match launch() {
            Ok(()) => return Ok(()),
            Err(StartError::Exited(e)) => last = e,
            Err(StartError::Failed(e)) => return Err(e),
        }
        thread::sleep(pause);
    }
    Err(format!("{last} (tried {attempts} times)"))
}
