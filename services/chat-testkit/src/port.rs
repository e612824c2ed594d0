//! Picking free loopback TCP ports for test servers (never fixed/default ports).

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// Binds `127.0.0.1:0`, reads the port the kernel chose and closes the socket.
/// A port is never handed out twice by one process, so servers started
/// concurrently by parallel tests cannot be given the same port.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    for _ in 0..100 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap_or_else(|e| {
            panic!("chat-testkit: cannot bind 127.0.0.1:0 to find a free port: {e}")
        });
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| {
                panic!("chat-testkit: cannot read local address of 127.0.0.1:0: {e}")
            })
            .port();
        drop(listener);
        if given.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("chat-testkit: could not find a free port on 127.0.0.1 after 100 tries");
}
