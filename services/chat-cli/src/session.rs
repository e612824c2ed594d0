//! The stored session: which server, which user, and the token, in `session.json` (mode 0600).
//!
//! The file lives in `$CHAT_CONFIG_DIR` if that is set (tests use it), otherwise in
//! `<config dir>/chat/`, where the config dir is `$XDG_CONFIG_HOME` or `~/.config`.

use crate::error::Failure;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

/// Environment variable naming the folder that holds `session.json` directly.
pub const CONFIG_DIR_ENV: &str = "CHAT_CONFIG_DIR";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Base URL of the gateway, e.g. `http://localhost:8080`.
    pub server: String,
    pub user: String,
    pub token: String,
}

/// The folder holding `session.json`.
pub fn dir() -> Result<PathBuf, Failure> {
    if let Some(dir) = std::env::var_os(CONFIG_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::config_dir()
        .map(|d| d.join("chat"))
        .ok_or_else(|| Failure::new("io", "no config directory: set HOME or CHAT_CONFIG_DIR"))
}

pub fn path() -> Result<PathBuf, Failure> {
    Ok(dir()?.join("session.json"))
}

/// The stored session, if any.
pub fn load() -> Result<Option<Session>, Failure> {
    let path = path()?;
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Failure::new(
                "io",
                format!(
                    "{} is damaged ({e}): run `chat login` again",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::new(
            "io",
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

/// The stored session, or `not_logged_in`.
pub fn require() -> Result<Session, Failure> {
    load()?.ok_or_else(Failure::not_logged_in)
}

/// Writes the session readable by its owner only (0600, folder 0700), replacing any other.
pub fn save(session: &Session) -> Result<PathBuf, Failure> {
    let dir = dir()?;
    let io = |what: &str, e: std::io::Error| Failure::new("io", format!("cannot {what}: {e}"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io(&format!("create {}", dir.display()), e))?;
    let path = dir.join("session.json");
    let temp = dir.join(format!(".session.json.{}", std::process::id()));
    let json = serde_json::to_vec_pretty(session).unwrap_or_default();
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&temp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        io(&format!("write {}", path.display()), e)
    })?;
    Ok(path)
}

/// Forgets the session; whether there was one.
pub fn remove() -> Result<bool, Failure> {
    let path = path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Failure::new(
            "io",
            format!("cannot remove {}: {e}", path.display()),
        )),
    }
}
