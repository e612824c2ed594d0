//! Integration tests of chat-testkit against real redis-server and postgres.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use chat_testkit::{PostgresServer, RedisServer, free_port, shared_postgres, shared_redis};

/// PING over a plain TCP connection, independent of the testkit's own check.
fn raw_ping(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn free_port_is_not_repeated() {
    // Bindability is not asserted: with tests running in parallel, another
    // socket may legitimately take a port the moment it is released.
    let ports: std::collections::HashSet<u16> = (0..20).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 20);
    assert!(!ports.contains(&0));
}

#[test]
fn redis_starts_stops_and_restarts_on_the_same_port() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    assert_eq!(raw_ping(port).unwrap(), "+PONG");
    let first_pid = redis.pid().unwrap();

    redis.stop();
    assert_eq!(redis.pid(), None);
    assert!(
        !process_exists(first_pid),
        "redis pid {first_pid} still exists after stop"
    );
    assert!(raw_ping(port).is_err(), "redis still answers after stop");

    redis.start_again();
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid(), Some(first_pid));
    assert_eq!(raw_ping(port).unwrap(), "+PONG");
    assert!(redis.ping());

    let pid = redis.pid().unwrap();
    drop(redis);
    assert!(
        !process_exists(pid),
        "redis pid {pid} still exists after drop"
    );
}

#[test]
fn postgres_starts_creates_databases_stops_and_restarts() {
    let mut pg = PostgresServer::start();
    let port = pg.port();
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    );

    let one = pg.create_database();
    let two = pg.create_database();
    assert_ne!(one, two);
    assert!(one.starts_with(&format!("postgres://postgres@127.0.0.1:{port}/t_")));
    assert_eq!(pg.psql(&one, "select 1"), "1");
    pg.psql(
        &one,
        "create table kept (v int); insert into kept values (42)",
    );
    assert_eq!(
        pg.psql(
            &two,
            "select count(*) from pg_tables where tablename = 'kept'"
        ),
        "0"
    );

    let first_pid = pg.pid().unwrap();
    pg.stop();
    assert_eq!(pg.pid(), None);
    assert!(
        !process_exists(first_pid),
        "postgres pid {first_pid} still exists after stop"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "postgres still listens after stop"
    );

    pg.start_again();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql(&one, "select v from kept"), "42");

    let pid = pg.pid().unwrap();
    drop(pg);
    assert!(
        !process_exists(pid),
        "postgres pid {pid} still exists after drop"
    );
}

#[test]
fn shared_servers_are_started_once() {
    let redis = shared_redis();
    assert!(std::ptr::eq(redis, shared_redis()));
    assert_eq!(raw_ping(redis.port()).unwrap(), "+PONG");

    let pg = shared_postgres();
    assert!(std::ptr::eq(pg, shared_postgres()));
    let db = pg.create_database();
    assert_eq!(pg.psql(&db, "select 1"), "1");
}

#[test]
fn redis_start_again_waits_for_a_briefly_taken_port() {
    let mut redis = RedisServer::start();
    let port = redis.port();
    redis.stop();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(squatter);
    });
    redis.start_again();
    release.join().unwrap();
    assert_eq!(redis.port(), port);
    assert_eq!(raw_ping(port).unwrap(), "+PONG");
}
