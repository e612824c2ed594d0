//! `chat ROOM`: the interactive room view. Messages, presence and typing notices print while the
//! user types: above the prompt (rustyline's `ExternalPrinter`) on a terminal, or as plain lines
//! when standard input or output is not a terminal (messages on stdout, notices on stderr).

use crate::api::Api;
use crate::conn::{self, About, Connection, Event};
use crate::error::Failure;
use crate::format::{message_line, printable};
use crate::session;
use chat_protocol::frames::{PresenceState, StoredMessage};
use chat_protocol::{ClientId, ErrorCode, MessageBody, RoomName, Username};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Messages shown when a room is opened.
const BACKLOG: u32 = 20;
/// Default and largest page of `/history`.
const OLDER_PAGE: u32 = 20;
/// How long quitting waits for messages not yet acknowledged.
const DRAIN_ON_QUIT: Duration = Duration::from_secs(5);
/// A "typing" notice of the same user in the same room is shown at most this often.
const TYPING_QUIET: Duration = Duration::from_secs(5);
/// While reconnect attempts keep failing the same way, that is said at most this often.
const RETRY_QUIET: Duration = Duration::from_secs(30);

const HELP: &str = "\
commands:
  /join ROOM      join ROOM (or switch to it) and make it the current room
  /leave [ROOM]   leave ROOM (default: the current room)
  /dm USER        open the direct room with USER
  /history [N]    show N older messages of the current room (default 20)
  /who            who is online in the current room
  /rooms          list the rooms you can join
  /help           this help
  /quit           leave (also Ctrl-D)
a line not starting with / is sent to the current room (start it with // to send a leading /)";

/// Runs the room view until `/quit` or the end of input.
pub async fn run(room: &str) -> Result<(), Failure> {
    let session = session::require()?;
    let me = Username::parse(session.user.as_str())?;
    let room = RoomName::parse(room)?;
    let api = Api::new(&session.server)?;
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (input, output) = if terminal {
        match editor_input() {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("-- line editor unavailable ({e}); using plain input");
                plain_input()
            }
        }
    } else {
        plain_input()
    };
    let (connection, events) = conn::connect(conn::Config {
        server: session.server.clone(),
        token: session.token.clone(),
    });
    let mut view = View {
        me,
        api,
        token: session.token,
        server: session.server,
        connection,
        output,
        current: None,
        rooms: BTreeSet::new(),
        online: HashMap::new(),
        unsent: HashMap::new(),
        refused: 0,
        typing_shown: HashMap::new(),
        connected: false,
        last_retry: None,
        fatal: None,
    };
    let intro = format!(
        "-- {} on {}; /help lists the commands",
        view.me, view.server
    );
    view.output.notice(&intro);
    view.join(room);
    view.run(input, events).await
}

enum Input {
    Line(String),
    End,
}

struct InputHandle {
    lines: mpsc::Receiver<Input>,
    /// With the line editor: the prompt of the next line, sent when the previous one is handled.
    prompts: Option<std::sync::mpsc::Sender<String>>,
}

impl InputHandle {
    fn prompt(&self, prompt: String) {
        if let Some(prompts) = &self.prompts {
            let _ = prompts.send(prompt);
        }
    }
}

/// Where the view prints.
enum Output {
    /// Messages to stdout, notices to stderr, one line each.
    Plain,
    /// Both above the line being edited.
    Editor(Box<dyn rustyline::ExternalPrinter + Send>),
}

impl Output {
    fn message(&mut self, line: &str) {
        match self {
            Output::Plain => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            Output::Editor(printer) => {
                if printer.print(format!("{line}\n")).is_err() {
                    println!("{line}");
                }
            }
        }
    }

    fn notice(&mut self, line: &str) {
        match self {
            Output::Plain => eprintln!("{line}"),
            Output::Editor(_) => self.message(line),
        }
    }
}

/// Lines from standard input read by a thread (so that reading never blocks the view).
fn plain_input() -> (InputHandle, Output) {
    let (tx, lines) = mpsc::channel(64);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            if tx.blocking_send(Input::Line(line)).is_err() {
                return;
            }
        }
        let _ = tx.blocking_send(Input::End);
    });
    (
        InputHandle {
            lines,
            prompts: None,
        },
        Output::Plain,
    )
}

/// The line editor in a thread: it reads one line per prompt it is given.
fn editor_input() -> rustyline::Result<(InputHandle, Output)> {
    let mut editor = rustyline::DefaultEditor::new()?;
    let printer = editor.create_external_printer()?;
    let (tx, lines) = mpsc::channel(64);
    let (prompts, prompt_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        while let Ok(prompt) = prompt_rx.recv() {
            match editor.readline(&prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    if tx.blocking_send(Input::Line(line)).is_err() {
                        return;
                    }
                }
                // Ctrl-C, Ctrl-D, or a terminal error: leave.
                Err(_) => break,
            }
        }
        let _ = tx.blocking_send(Input::End);
    });
    Ok((
        InputHandle {
            lines,
            prompts: Some(prompts),
        },
        Output::Editor(Box::new(printer)),
    ))
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

struct View {
    me: Username,
    api: Api,
    token: String,
    server: String,
    connection: Connection,
    output: Output,
    /// Where lines are sent.
    current: Option<RoomName>,
    /// The rooms joined or being joined.
    rooms: BTreeSet<RoomName>,
    /// Who is in each room: `joined.online`, then presence events.
    online: HashMap<RoomName, BTreeSet<Username>>,
    /// Sends not acknowledged yet.
    unsent: HashMap<ClientId, RoomName>,
    /// Messages refused for good, here or by the server (each was reported when it happened).
    refused: usize,
    typing_shown: HashMap<(RoomName, Username), Instant>,
    connected: bool,
    /// The last reconnect failure shown, and when.
    last_retry: Option<(String, Instant)>,
    /// The connection gave up; shown, and returned once the user presses Enter.
    fatal: Option<Failure>,
}

impl View {
    async fn run(
        mut self,
        mut input: InputHandle,
        mut events: mpsc::Receiver<Event>,
    ) -> Result<(), Failure> {
        input.prompt(self.prompt());
        loop {
            tokio::select! {
                line = input.lines.recv() => match line {
                    Some(Input::Line(line)) => {
                        if let Some(fatal) = self.fatal.take() {
                            return Err(fatal);
                        }
                        if self.on_line(&line).await == Flow::Quit {
                            break;
                        }
                        input.prompt(self.prompt());
                    }
                    Some(Input::End) | None => break,
                },
                event = events.recv(), if self.fatal.is_none() => {
                    match event {
                        Some(event) => self.on_event(event),
                        None => {
                            self.fatal = Some(Failure::server(
                                ErrorCode::Internal,
                                "the connection task ended",
                            ));
                        }
                    }
                    if self.fatal.is_some() {
                        if input.prompts.is_none() {
                            return Err(self.fatal.take().unwrap_or_else(|| unreachable!()));
                        }
                        self.output.notice("-- press Enter to exit");
                    }
                }
            }
        }
        if let Some(fatal) = self.fatal.take() {
            return Err(fatal);
        }
        self.finish(events).await
    }

    /// Waits a little for messages typed but not yet acknowledged, then closes.
    async fn finish(mut self, mut events: mpsc::Receiver<Event>) -> Result<(), Failure> {
        if !self.unsent.is_empty() {
            self.output.notice(&format!(
                "-- waiting for {} unsent message(s)…",
                self.unsent.len()
            ));
            let deadline = tokio::time::Instant::now() + DRAIN_ON_QUIT;
            while !self.unsent.is_empty() && self.fatal.is_none() {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some(event)) => self.on_event(event),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        drop(self.connection);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while events.recv().await.is_some() {}
        })
        .await;
        // Whoever piped messages in learns from the exit status that some did not go.
        let not_sent = self.unsent.len() + self.refused;
        if not_sent > 0 {
            return Err(Failure::new(
                "not_sent",
                format!("{not_sent} message(s) were not sent"),
            ));
        }
        Ok(())
    }

    fn prompt(&self) -> String {
        match &self.current {
            Some(room) => format!("{room}> "),
            None => "> ".to_string(),
        }
    }

    async fn on_line(&mut self, line: &str) -> Flow {
        let line = line.trim_end();
        if line.trim().is_empty() {
            return Flow::Continue;
        }
        let Some(command) = line.strip_prefix('/') else {
            self.say(line);
            return Flow::Continue;
        };
        if command.starts_with('/') {
            self.say(command);
            return Flow::Continue;
        }
        let mut words = command.split_whitespace();
        let name = words.next().unwrap_or_default();
        let arg = words.next();
        match (name, arg) {
            ("join" | "j", Some(room)) => match RoomName::parse(room) {
                Ok(room) => self.join(room),
                Err(e) => self.output.notice(&format!("!! {e}")),
            },
            ("leave" | "part", room) => self.leave(room),
            ("dm" | "msg", Some(user)) => self.direct(user),
            ("history", n) => self.older(n),
            ("who", _) => self.who(),
            ("rooms", _) => self.list_rooms().await,
            ("help" | "?", _) => {
                for line in HELP.lines() {
                    self.output.notice(line);
                }
            }
            ("quit" | "exit" | "q", _) => return Flow::Quit,
            ("join" | "j" | "dm" | "msg", None) => {
                self.output.notice(&format!(
                    "!! /{name} needs an argument; /help lists the commands"
                ));
            }
            _ => self.output.notice(&format!(
                "!! unknown command /{name}; /help lists the commands"
            )),
        }
        Flow::Continue
    }

    fn say(&mut self, text: &str) {
        let Some(room) = self.current.clone() else {
            self.output.notice("!! join a room first: /join ROOM");
            return;
        };
        match MessageBody::parse(text) {
            Ok(body) => {
                let client_id = self.connection.send(room.clone(), body);
                self.unsent.insert(client_id, room);
            }
            Err(e) => {
                self.refused += 1;
                self.output.notice(&format!("!! not sent: {e}"));
            }
        }
    }

    fn join(&mut self, room: RoomName) {
        if self.rooms.contains(&room) {
            self.output.notice(&format!("-- now talking in {room}"));
        } else {
            self.rooms.insert(room.clone());
            self.output.notice(&format!("-- joining {room}…"));
            self.connection.join(room.clone(), BACKLOG);
        }
        self.current = Some(room);
    }

    fn leave(&mut self, room: Option<&str>) {
        let room = match room {
            Some(name) => match RoomName::parse(name) {
                Ok(room) => room,
                Err(e) => return self.output.notice(&format!("!! {e}")),
            },
            None => match &self.current {
                Some(room) => room.clone(),
                None => return self.output.notice("!! not in a room"),
            },
        };
        if !self.rooms.contains(&room) {
            return self.output.notice(&format!("!! not in {room}"));
        }
        self.connection.leave(room);
    }

    fn direct(&mut self, user: &str) {
        let user = match Username::parse(user) {
            Ok(user) => user,
            Err(e) => return self.output.notice(&format!("!! {e}")),
        };
        match RoomName::direct(&self.me, &user) {
            Some(room) => self.join(room),
            None => self.output.notice("!! that is you"),
        }
    }

    fn older(&mut self, n: Option<&str>) {
        let limit = match n.map(str::parse::<u32>) {
            None => OLDER_PAGE,
            Some(Ok(n)) if (1..=chat_protocol::frames::HISTORY_MAX_LIMIT).contains(&n) => n,
            Some(_) => {
                return self
                    .output
                    .notice("!! /history takes a number from 1 to 200");
            }
        };
        match self.current.clone() {
            Some(room) => self.connection.older(room, limit),
            None => self.output.notice("!! not in a room"),
        }
    }

    fn who(&mut self) {
        let Some(room) = &self.current else {
            return self.output.notice("!! not in a room");
        };
        let names: Vec<&str> = self
            .online
            .get(room)
            .map(|users| users.iter().map(Username::as_str).collect())
            .unwrap_or_default();
        let line = format!("-- online in {room}: {}", names.join(", "));
        self.output.notice(&line);
    }

    async fn list_rooms(&mut self) {
        match self.api.rooms(&self.token).await {
            Ok(answer) => {
                self.output.notice("-- rooms (* joined):");
                for room in answer.rooms {
                    let mark = if self.rooms.contains(&room.room) {
                        '*'
                    } else {
                        ' '
                    };
                    let line = format!("{mark} {} ({} messages)", room.room, room.last_seq);
                    self.output.notice(&line);
                }
            }
            Err(e) => self.output.notice(&format!("!! /rooms: {e}")),
        }
    }

    fn render(&self, message: &StoredMessage) -> String {
        if self.current.as_ref() == Some(&message.room) {
            message_line(message)
        } else {
            format!("({}) {}", message.room, message_line(message))
        }
    }

    /// `(room) ` before a notice about another room than the current one.
    fn about(&self, room: &RoomName) -> String {
        if self.current.as_ref() == Some(room) {
            String::new()
        } else {
            format!("({room}) ")
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected {
                gateway, reconnect, ..
            } => {
                self.connected = true;
                self.last_retry = None;
                let what = if reconnect {
                    "reconnected"
                } else {
                    "connected"
                };
                self.output
                    .notice(&format!("-- {what} (gateway {})", printable(&gateway)));
            }
            Event::Disconnected { reason, retry_in } => {
                let was = std::mem::replace(&mut self.connected, false);
                let repeated = self
                    .last_retry
                    .as_ref()
                    .is_some_and(|(r, at)| *r == reason && at.elapsed() < RETRY_QUIET);
                if was || !repeated {
                    let what = if was {
                        "disconnected"
                    } else {
                        "still disconnected"
                    };
                    self.output.notice(&format!(
                        "-- {what}: {}; retrying in {:.1}s",
                        printable(&reason),
                        retry_in.as_secs_f32()
                    ));
                    self.last_retry = Some((reason, Instant::now()));
                }
            }
            Event::Joined {
                room,
                online,
                resumed,
            } => {
                let names: Vec<&str> = online.iter().map(Username::as_str).collect();
                let what = if resumed { "rejoined" } else { "joined" };
                self.output
                    .notice(&format!("-- {what} {room} (online: {})", names.join(", ")));
                self.online.insert(room, online.into_iter().collect());
            }
            Event::Left { room } => {
                self.rooms.remove(&room);
                self.online.remove(&room);
                self.output.notice(&format!("-- left {room}"));
                if self.current.as_ref() == Some(&room) {
                    self.current = self.rooms.iter().next().cloned();
                    if let Some(now) = &self.current {
                        self.output.notice(&format!("-- now talking in {now}"));
                    }
                }
            }
            Event::Message(message) => {
                self.typing_shown
                    .remove(&(message.room.clone(), message.from.clone()));
                let line = self.render(&message);
                self.output.message(&line);
            }
            Event::Older {
                room,
                messages,
                has_more,
            } => {
                if messages.is_empty() {
                    return self
                        .output
                        .notice(&format!("-- no older messages in {room}"));
                }
                self.output.notice(&format!("-- earlier in {room}:"));
                for message in &messages {
                    let line = self.render(message);
                    self.output.message(&line);
                }
                let more = if has_more { " (/history for more)" } else { "" };
                self.output
                    .notice(&format!("-- end of earlier messages{more}"));
            }
            Event::Queued { room, .. } => {
                let line = if self.connected {
                    format!("-- queued until {room} is joined")
                } else {
                    "-- queued: not connected; it is sent on reconnect".to_string()
                };
                self.output.notice(&line);
            }
            Event::Sent { client_id, .. } => {
                self.unsent.remove(&client_id);
            }
            Event::Failed {
                about,
                code,
                message,
            } => {
                let line = match about {
                    About::Send { room, client_id } => {
                        self.unsent.remove(&client_id);
                        self.refused += 1;
                        format!("!! {}not sent: {code}: {message}", self.about(&room))
                    }
                    About::Join(room) => {
                        self.rooms.remove(&room);
                        if self.current.as_ref() == Some(&room) {
                            self.current = self.rooms.iter().next().cloned();
                        }
                        format!("!! cannot join {room}: {code}: {message}")
                    }
                    About::Older(room) => {
                        format!("!! {}history: {code}: {message}", self.about(&room))
                    }
                    About::Connection => format!("!! {code}: {message}"),
                };
                self.output.notice(&line);
            }
            Event::Presence { room, user, state } => {
                let users = self.online.entry(room.clone()).or_default();
                let word = match state {
                    PresenceState::Online => {
                        users.insert(user.clone());
                        "joined"
                    }
                    PresenceState::Offline => {
                        users.remove(&user);
                        "left"
                    }
                };
                let line = format!("* {}{user} {word}", self.about(&room));
                self.output.notice(&line);
            }
            Event::Typing { room, user } => {
                let now = Instant::now();
                let key = (room, user);
                let recent = self
                    .typing_shown
                    .get(&key)
                    .is_some_and(|t| now.duration_since(*t) < TYPING_QUIET);
                if !recent {
                    let line = format!("* {}{} is typing…", self.about(&key.0), key.1);
                    self.output.notice(&line);
                    self.typing_shown.insert(key, now);
                }
            }
            Event::Fatal { code, message } => {
                self.output.notice(&format!("!! {code}: {message}"));
                self.fatal = Some(Failure::server(code, message));
            }
        }
    }
}
