//! How the client prints messages: `[seq] HH:MM user: body`, local time, control characters
//! made visible so that a message cannot drive the terminal.

use chat_protocol::StoredMessage;
use chrono::{Local, TimeZone};

/// `[seq] HH:MM user: body`.
pub fn message_line(message: &StoredMessage) -> String {
    format!(
        "[{}] {} {}: {}",
        message.seq,
        time_of_day(message.ts),
        message.from,
        printable(&message.body)
    )
}

/// `HH:MM` in the local time zone of a commit time in milliseconds since the epoch.
pub fn time_of_day(ts_ms: i64) -> String {
    match Local.timestamp_millis_opt(ts_ms).single() {
        Some(time) => time.format("%H:%M").to_string(),
        None => "--:--".to_string(),
    }
}

/// The text with every control character (escape sequences included) shown escaped, except
/// line breaks, which continue on an indented line.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\n    "),
            '\t' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            // Bidirectional overrides can reorder what follows them on the line.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        assert_eq!(printable("hi \u{1b}[2J there"), "hi \\u{1b}[2J there");
        assert_eq!(printable("a\r\nb"), "a\\r\n    b");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("é <b>"), "é <b>");
    }

    #[test]
    fn lines_have_seq_time_user_and_body() {
        let message = StoredMessage {
            room: chat_protocol::RoomName::parse("general").unwrap(),
            seq: 7,
            from: chat_protocol::Username::parse("alice").unwrap(),
            body: "hello".into(),
            ts: 1_700_000_000_000,
            client_id: None,
        };
        let line = message_line(&message);
        assert!(line.starts_with("[7] "), "{line}");
        assert!(line.ends_with(" alice: hello"), "{line}");
        assert_eq!(line.len(), "[7] HH:MM alice: hello".len(), "{line}");
    }
}
