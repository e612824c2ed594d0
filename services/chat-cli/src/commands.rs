//! The one-shot commands: `register`, `login`, `logout`, `rooms`, `history` and `send`.

use crate::api::Api;
use crate::conn::{self, About, Event};
use crate::error::Failure;
use crate::format::message_line;
use crate::session::{self, Session};
use chat_protocol::api::MessagesQuery;
use chat_protocol::{ClientId, ErrorCode, MessageBody, Password, RoomName, Username};
use std::io::BufRead;
use std::time::Duration;

/// Environment variable a script or test may put the password in.
pub const PASSWORD_ENV: &str = "CHAT_PASSWORD";

/// Where the password comes from: one line of standard input, or `CHAT_PASSWORD`, or else a
/// prompt on the terminal that does not echo (asked twice when registering).
pub fn read_password(from_stdin: bool, confirm: bool) -> Result<String, Failure> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| Failure::new("io", format!("reading the password from stdin: {e}")))?;
        let password = line.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            return Err(Failure::server(
                ErrorCode::BadRequest,
                "no password on standard input",
            ));
        }
        return Ok(password);
    }
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        return Ok(password);
    }
    let no_tty = |e: std::io::Error| {
        Failure::new(
            "io",
            format!(
                "cannot ask for the password ({e}): set {PASSWORD_ENV} or use --password-stdin"
            ),
        )
    };
    let password = rpassword::prompt_password("password: ").map_err(no_tty)?;
    if confirm {
        let again = rpassword::prompt_password("password (again): ").map_err(no_tty)?;
        if again != password {
            return Err(Failure::server(
                ErrorCode::BadRequest,
                "the passwords differ",
            ));
        }
    }
    Ok(password)
}

/// `chat register` / `chat login`: gets a token and stores the session.
pub async fn authenticate(
    server: &str,
    username: &str,
    password: &str,
    register: bool,
) -> Result<(), Failure> {
    let api = Api::new(server)?;
    let username = Username::parse(username)?;
    let answer = if register {
        Password::parse(password)?;
        api.register(username.as_str(), password).await?
    } else {
        api.login(username.as_str(), password).await?
    };
    let session = Session {
        server: api.server().to_string(),
        user: answer.user.to_string(),
        token: answer.token,
    };
    let path = session::save(&session)?;
    let verb = if register { "registered" } else { "logged in" };
    println!(
        "{verb} as {} on {} (session saved in {})",
        session.user,
        session.server,
        path.display()
    );
    Ok(())
}

/// `chat logout`: forgets the stored token (it stays valid on the server until it expires).
pub fn logout() -> Result<(), Failure> {
    match session::load()? {
        Some(s) => {
            session::remove()?;
            println!("logged out {} from {}", s.user, s.server);
        }
        None => println!("not logged in"),
    }
    Ok(())
}

/// `chat rooms`: the public rooms and the user's direct rooms, with their message counts.
pub async fn rooms() -> Result<(), Failure> {
    let session = session::require()?;
    let rooms = Api::new(&session.server)?
        .rooms(&session.token)
        .await?
        .rooms;
    let width = rooms
        .iter()
        .map(|r| r.room.as_str().len())
        .max()
        .unwrap_or(0);
    for room in rooms {
        println!(
            "{:width$}  {} message{}",
            room.room.as_str(),
            room.last_seq,
            if room.last_seq == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// `chat history`: one page of a room, oldest first, `[seq] HH:MM user: body`.
pub async fn history(room: &str, limit: u32, before: Option<u64>) -> Result<(), Failure> {
    let session = session::require()?;
    let room = RoomName::parse(room)?;
    let query = MessagesQuery {
        before,
        after: None,
        limit: Some(limit),
    };
    let page = Api::new(&session.server)?
        .messages(&session.token, &room, &query)
        .await?;
    for message in &page.messages {
        println!("{}", message_line(message));
    }
    if page.has_more
        && let Some(first) = page.messages.first()
    {
        eprintln!("(older: chat history {room} --before {})", first.seq);
    }
    Ok(())
}

/// `chat send`: joins, sends with `client_id` (a fresh one if not given), and waits for
/// `sent`; the seq.
///
/// A dropped connection is retried within `wait` (the `client_id` makes the retry safe), so a
/// script survives a gateway restart. Past `wait`, the error names the `client_id`, so that the
/// script can run the command again with it and store the message at most once.
pub async fn send(
    room: &str,
    text: &str,
    wait: Duration,
    client_id: Option<&str>,
) -> Result<u64, Failure> {
    let session = session::require()?;
    let room = RoomName::parse(room)?;
    let body = MessageBody::parse(text)?;
    let chosen = client_id.map(ClientId::parse).transpose()?;
    let (connection, mut events) = conn::connect(conn::Config {
        server: session.server.clone(),
        token: session.token,
    });
    connection.join(room.clone(), 0);
    let client_id = match chosen {
        Some(id) => connection.send_as(room.clone(), body, id),
        None => connection.send(room.clone(), body),
    };
    let mut problem: Option<String> = None;
    let mut connected = false;
    let outcome = tokio::time::timeout(wait, async {
        while let Some(event) = events.recv().await {
            match event {
                Event::Sent {
                    client_id: id, seq, ..
                } if id == client_id => return Ok(seq),
                Event::Failed {
                    about: About::Send { client_id: id, .. },
                    code,
                    message,
                } if id == client_id => return Err(Failure::server(code, message)),
                Event::Failed {
                    about: About::Join(r),
                    code,
                    message,
                } if r == room => return Err(Failure::server(code, format!("{r}: {message}"))),
                Event::Fatal { code, message } => return Err(Failure::server(code, message)),
                Event::Disconnected { reason, .. } => problem = Some(reason),
                Event::Connected { .. } => connected = true,
                _ => {}
            }
        }
        Err(Failure::server(
            ErrorCode::Internal,
            "the connection task ended",
        ))
    })
    .await;
    // Close politely: the task sends a close frame when its handle is dropped.
    drop(connection);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while events.recv().await.is_some() {}
    })
    .await;
    // It may have been stored: the same command with this id stores it at most once.
    let retry = format!(
        "; to try again without a duplicate: chat send --client-id {} {room} ...",
        client_id.as_str()
    );
    match outcome {
        Ok(result) => result,
        Err(_) => Err(match problem {
            Some(reason) if !connected => Failure::server(
                ErrorCode::Unavailable,
                format!(
                    "cannot reach {}: {reason} (gave up after {}s){retry}",
                    session.server,
                    wait.as_secs_f32()
                ),
            ),
            Some(reason) => Failure::new(
                "timeout",
                format!(
                    "not acknowledged within {}s (last problem: {reason}){retry}",
                    wait.as_secs_f32()
                ),
            ),
            None => Failure::new(
                "timeout",
                format!("not acknowledged within {}s{retry}", wait.as_secs_f32()),
            ),
        }),
    }
}
