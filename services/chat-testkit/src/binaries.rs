//! Finding the server binaries (and the `postgres` OS user) on this machine,
//! with loud install hints when something is missing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const REDIS_HINT: &str =
    "install Debian package redis-server (`apt-get install redis-server`; scripts/test does this)";
const POSTGRES_HINT: &str = "install Debian package postgresql, which puts initdb and postgres under \
     /usr/lib/postgresql/<version>/bin (`apt-get install postgresql`; scripts/test does this)";

/// Finds `name` in the directories of `$PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The `redis-server` binary, or a panic saying how to install it.
pub(crate) fn redis_server() -> PathBuf {
    on_path("redis-server")
        .unwrap_or_else(|| panic!("chat-testkit: redis-server not found on PATH: {REDIS_HINT}"))
}

/// The directory holding `initdb`, `postgres` and `psql`: `pg_config
/// --bindir` if it has them, else the newest `/usr/lib/postgresql/*/bin`,
/// else the directory of `initdb` on `$PATH`. Panics saying how to install
/// PostgreSQL when none has them.
pub(crate) fn postgres_bindir() -> PathBuf {
    let complete = |dir: &Path| {
        ["initdb", "postgres", "psql"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };

    let mut pg_config = Command::new("pg_config");
    pg_config.arg("--bindir");
    let from_pg_config = crate::process::output(pg_config)
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|d| complete(d)) {
        return dir;
    }

    let mut versioned: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| complete(bin))
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return dir;
    }

    if let Some(dir) = on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf))
        && complete(&dir)
    {
        return dir;
    }
    panic!(
        "chat-testkit: PostgreSQL server binaries (initdb, postgres, psql) not found via \
         `pg_config --bindir`, /usr/lib/postgresql/*/bin or PATH: {POSTGRES_HINT}"
    );
}

/// uid and gid of the `postgres` OS user, used to run initdb and postgres
/// when the tests run as root (both refuse to run as root).
pub(crate) fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let mut command = Command::new("id");
        command.args([flag, "postgres"]);
        let out = crate::process::output(command)
            .unwrap_or_else(|e| panic!("chat-testkit: cannot run `id {flag} postgres`: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        match (out.status.success(), text.trim().parse()) {
            (true, Ok(n)) => n,
            _ => panic!(
                "chat-testkit: running as root, but there is no `postgres` OS user to run \
                 initdb/postgres as (they refuse to run as root): {POSTGRES_HINT} (it creates \
                 the user), or run the tests as a non-root user"
            ),
        }
    };
    (id("-u"), id("-g"))
}
