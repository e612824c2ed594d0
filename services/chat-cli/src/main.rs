//! `chat`: the command line. Parses arguments and runs one command from the library.

use anyhow::Context as _;
use chat_cli::api::DEFAULT_SERVER;
use chat_cli::{Failure, commands, interactive};
use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// Terminal client of the chat backend.
///
/// `chat ROOM` opens ROOM interactively; the subcommands below are for accounts and scripts.
/// The session (server, user, token) is kept in $CHAT_CONFIG_DIR/session.json, by default
/// $XDG_CONFIG_HOME/chat/session.json, or ~/.config/chat/session.json without XDG_CONFIG_HOME.
#[derive(Parser)]
#[command(
    name = "chat",
    version,
    args_conflicts_with_subcommands = true,
    arg_required_else_help = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Room to open interactively (the same as `chat open ROOM`).
    room: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account and log in.
    Register(Credentials),
    /// Log in and store the session.
    Login(Credentials),
    /// Forget the stored session.
    Logout,
    /// List the public rooms and your direct rooms.
    Rooms,
    /// Print a room's messages: `[seq] HH:MM user: body`, oldest first.
    History {
        /// Room name, e.g. `general` or `dm:alice:bob`.
        room: String,
        /// How many messages (1 to 200).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=200))]
        limit: u32,
        /// Only messages with a seq lower than this (page backwards).
        #[arg(long, value_name = "SEQ")]
        before: Option<u64>,
    },
    /// Send one message and wait until the server stored it; prints its seq.
    ///
    /// Exits 0 only when the gateway acknowledged the message; otherwise prints the error code
    /// and message on stderr and exits 1.
    Send {
        /// Room name, e.g. `general` or `dm:alice:bob`.
        room: String,
        /// The message; several words are joined with spaces.
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true, trailing_var_arg = true)]
        text: Vec<String>,
        /// Seconds to wait for the acknowledgement (reconnecting meanwhile if needed).
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        timeout: u64,
        /// The message's idempotency key (1 to 64 bytes). Sending again with the same key
        /// after a timeout stores the message at most once. Default: a fresh one, printed
        /// with a timeout error.
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
    },
    /// Open a room interactively (the same as `chat ROOM`).
    Open {
        /// Room name, e.g. `general` or `dm:alice:bob`.
        room: String,
    },
}

#[derive(Args)]
struct Credentials {
    /// The gateway's address.
    #[arg(long, env = "CHAT_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Read the password from the first line of standard input (otherwise from
    /// $CHAT_PASSWORD, otherwise asked on the terminal).
    #[arg(long)]
    password_stdin: bool,
    /// 3 to 32 characters of a-z, 0-9 and _.
    username: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<Failure>() {
                Some(failure) => eprintln!("error: {failure}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let command = match (cli.command, cli.room) {
        (Some(command), _) => command,
        (None, Some(room)) => Command::Open { room },
        (None, None) => unreachable!("clap requires a room or a command"),
    };
    runtime.block_on(async {
        match command {
            Command::Register(c) => {
                let password = commands::read_password(c.password_stdin, true)?;
                commands::authenticate(&c.server, &c.username, &password, true).await?;
            }
            Command::Login(c) => {
                let password = commands::read_password(c.password_stdin, false)?;
                commands::authenticate(&c.server, &c.username, &password, false).await?;
            }
            Command::Logout => commands::logout()?,
            Command::Rooms => commands::rooms().await?,
            Command::History {
                room,
                limit,
                before,
            } => commands::history(&room, limit, before).await?,
            Command::Send {
                room,
                text,
                timeout,
                client_id,
            } => {
                let wait = Duration::from_secs(timeout.max(1));
                let seq =
                    commands::send(&room, &text.join(" "), wait, client_id.as_deref()).await?;
                println!("{seq}");
            }
            Command::Open { room } => interactive::run(&room).await?,
        }
        Ok(())
    })
}
