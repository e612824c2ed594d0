//! Per-server temporary directories under
//! `std::env::temp_dir()/chat-testkit/<pid>-<n>`, and the sweep that removes
//! the ones left by test binaries that have exited.
//!
//! Shared servers live in statics that are never dropped, so their
//! directories outlive the test binary; the next test binary removes every
//! directory whose owning pid no longer exists (`/proc/<pid>` is gone).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory that is removed, with everything in it, on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh `<base>/<pid>-<n>` directory, mode 0755 so that the
    /// `postgres` OS user can reach what is inside.
    pub(crate) fn new() -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let base = base_dir();
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| remove_stale(&base));
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| {
            panic!(
                "chat-testkit: cannot create temp dir {}: {e}",
                path.display()
            )
        });
        set_mode(&path, 0o755);
        TempDir { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| {
        panic!(
            "chat-testkit: cannot chmod {mode:o} {}: {e}",
            path.display()
        )
    });
}

/// `temp_dir()/chat-testkit`, created world-writable with the sticky bit (like
/// /tmp) so that several OS users can share it. If a parent of `temp_dir()`
/// is not searchable by others (o+x), the `postgres` OS user could not reach
/// its data directory, so `/tmp` is used instead.
fn base_dir() -> PathBuf {
    let mut temp = std::env::temp_dir();
    if !searchable_by_others(&temp) {
        temp = PathBuf::from("/tmp");
    }
    let base = temp.join("chat-testkit");
    if !base.is_dir() {
        match fs::create_dir_all(&base) {
            Ok(()) => set_mode(&base, 0o1777),
            Err(e) if base.is_dir() => drop(e),
            Err(e) => panic!("chat-testkit: cannot create {}: {e}", base.display()),
        }
    }
    base
}

fn searchable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|p| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// Removes `<base>/<pid>-<n>` directories whose pid is no longer running.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
