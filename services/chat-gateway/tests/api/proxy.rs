//! A TCP proxy that can silently freeze the connections it carries: bytes stop flowing both
//! ways but no socket is closed, as with a dead NAT entry or a hung peer. New connections made
//! after a freeze flow normally. It can also refuse: close what it carries and every new
//! connection, as an unreachable server does, until told to accept again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct FreezingProxy {
    pub port: u16,
    /// Connections opened in a generation below this one are frozen.
    frozen_below: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    refusing: Arc<AtomicBool>,
    /// Bumped to close every connection open now.
    cuts: watch::Sender<u64>,
    _tasks: JoinSet<()>,
}

impl FreezingProxy {
    pub async fn start(upstream_port: u16) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let refusing = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let mut tasks = JoinSet::new();
        let (fb, gen_, refuse) = (frozen_below.clone(), generation.clone(), refusing.clone());
        let cut_rx = cuts.subscribe();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                let mine = gen_.load(Ordering::SeqCst);
                let fb = fb.clone();
                let mut cut = cut_rx.clone();
                let cut_at_start = *cut.borrow_and_update();
                connections.spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let fb2 = fb.clone();
                    let up = async move { pump(&mut cr, &mut sw, mine, &fb).await };
                    let down = async move { pump(&mut sr, &mut cw, mine, &fb2).await };
                    // Returning drops all four halves: both sockets close.
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = cut.wait_for(|&n| n > cut_at_start) => {}
                    }
                });
            }
        });
        FreezingProxy {
            port,
            frozen_below,
            generation,
            refusing,
            cuts,
            _tasks: tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `url` (of the proxied server) with its port replaced by the proxy's.
    pub fn rewrite(&self, url: &str, upstream_port: u16) -> String {
        url.replace(&format!(":{upstream_port}/"), &format!(":{}/", self.port))
    }

    /// Closes every connection open now, and each new one at once, until `accept_again`.
    pub fn refuse(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn accept_again(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }

    /// Freezes every connection open now.
    pub fn freeze_existing(&self) {
        let next = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.frozen_below.store(next, Ordering::SeqCst);
    }
}

async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    generation: u64,
    frozen_below: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation < frozen_below.load(Ordering::SeqCst) {
            // Hold both sockets open and never forward again.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
