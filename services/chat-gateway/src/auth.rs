//! Accounts and session tokens: argon2id password hashes, HS256 JWTs signed with a secret shared
//! by every replica (so a token from one gateway is accepted by all).

use crate::store::{Store, StoreError};
use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use chat_protocol::{Password, Username};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid username or password")]
    BadCredentials,
    #[error("missing, invalid or expired token")]
    BadToken,
    #[error("username is taken")]
    UsernameTaken,
    #[error(transparent)]
    Store(StoreError),
    #[error("password hashing failed: {0}")]
    Hashing(String),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken => AuthError::UsernameTaken,
            other => AuthError::Store(other),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iat: u64,
    exp: u64,
}

/// Cheap to clone: the keys are behind an `Arc`.
#[derive(Clone)]
pub struct Auth {
    keys: Arc<(EncodingKey, DecodingKey)>,
    ttl: Duration,
    /// The threads that hash passwords.
    hashing: HashPool,
}

type HashJob = Box<dyn FnOnce() + Send>;

/// A fixed set of threads for password hashing. Bounded CPU (a login flood cannot take every
/// core), and bounded memory: argon2 takes 19 MiB per hash, and a thread's allocator keeps
/// what it freed for its next hash; on tokio's blocking pool, whose threads come and go, a
/// few logins left a gateway at 160 MiB instead of 10.
#[derive(Clone)]
struct HashPool {
    jobs: std::sync::mpsc::SyncSender<HashJob>,
}

impl HashPool {
    fn new(threads: usize) -> Self {
        // Waiting work is bounded too: a full queue makes callers wait (asynchronously).
        let (jobs, queue) = std::sync::mpsc::sync_channel::<HashJob>(threads * 4);
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job, never while running it.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-hash thread");
            }
        }
        HashPool { jobs }
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let mut job: HashJob = Box::new(move || {
            let _ = done.send(work());
        });
        // try_send first; when the queue is full, wait for room without blocking the runtime.
        loop {
            match self.jobs.try_send(job) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    job = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                    return Err(AuthError::Hashing("no password-hash thread".into()));
                }
            }
        }
        result
            .await
            .map_err(|_| AuthError::Hashing("password-hash thread failed".into()))
    }
}

impl Auth {
    pub fn new(secret: &SecretString, ttl: Duration, hash_concurrency: usize) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        Auth {
            keys: Arc::new((
                EncodingKey::from_secret(bytes),
                DecodingKey::from_secret(bytes),
            )),
            ttl,
            hashing: HashPool::new(hash_concurrency),
        }
    }

    /// Runs a password hash or check on the hashing threads.
    async fn hash_work<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        self.hashing.run(work).await
    }

    /// The embedded mode's secret: generated once, kept in `<data_dir>/jwt-secret` (mode 0600).
    pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<SecretString> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join("jwt-secret");
        match std::fs::read_to_string(&path) {
            Ok(existing) if existing.trim().len() >= crate::config::MIN_JWT_SECRET_BYTES => {
                return Ok(SecretString::from(existing.trim().to_string()));
            }
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is shorter than 32 bytes; delete it to generate a new one",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(data_dir)?;
        let secret: String = (0..48)
            .map(|_| {
                let i = rand::random_range(0..62u8);
                (match i {
                    0..=9 => b'0' + i,
                    10..=35 => b'a' + i - 10,
                    _ => b'A' + i - 36,
                }) as char
            })
            .collect();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(secret.as_bytes())?;
        file.sync_all()?;
        Ok(SecretString::from(secret))
    }

    pub fn issue(&self, user: &Username) -> String {
        let now = crate::clock::unix_secs();
        let claims = Claims {
            sub: user.to_string(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        // HS256 signing of a small struct does not fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.keys.0)
            .unwrap_or_default()
    }

    pub fn verify(&self, token: &str) -> Result<Username, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        let data = jsonwebtoken::decode::<Claims>(token, &self.keys.1, &validation)
            .map_err(|_| AuthError::BadToken)?;
        Username::parse(data.claims.sub).map_err(|_| AuthError::BadToken)
    }

    pub async fn register(
        &self,
        store: &dyn Store,
        user: &Username,
        password: &Password,
    ) -> Result<String, AuthError> {
        let password = password.clone();
        let hash = self
            .hash_work(move || {
                Argon2::default()
                    .hash_password(password.expose().as_bytes())
                    .map(|h| h.to_string())
                    .map_err(|e| AuthError::Hashing(e.to_string()))
            })
            .await??;
        store.create_user(user, &hash).await?;
        Ok(self.issue(user))
    }

    pub async fn login(
        &self,
        store: &dyn Store,
        user: &Username,
        password: &str,
    ) -> Result<String, AuthError> {
        let Some(hash) = store.password_hash(user).await? else {
            return Err(AuthError::BadCredentials);
        };
        let password = password.to_string();
        let ok = self
            .hash_work(move || {
                Argon2::default()
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok()
            })
            .await?;
        if ok {
            Ok(self.issue(user))
        } else {
            Err(AuthError::BadCredentials)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_the_same_secret() {
        let auth = Auth::new(
            &SecretString::from("a".repeat(32)),
            Duration::from_secs(60),
            1,
        );
        let other = Auth::new(
            &SecretString::from("b".repeat(32)),
            Duration::from_secs(60),
            1,
        );
        let bob = Username::parse("bob").unwrap();
        let token = auth.issue(&bob);
        assert_eq!(auth.verify(&token).unwrap(), bob);
        assert!(other.verify(&token).is_err());
        assert!(auth.verify("not.a.token").is_err());
        let mut forged = token.clone();
        forged.pop();
        assert!(auth.verify(&forged).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let auth = Auth::new(
            &SecretString::from("a".repeat(32)),
            Duration::from_secs(0),
            1,
        );
        let claims = Claims {
            sub: "bob".into(),
            iat: 1,
            exp: 2,
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &auth.keys.0).unwrap();
        assert!(matches!(auth.verify(&token), Err(AuthError::BadToken)));
    }
}
