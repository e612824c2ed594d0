//! WebSocket frames: what clients send (`ClientFrame`), what the gateway sends (`ServerFrame`).
//!
//! A client frame that is well-formed JSON of a known type is read in one pass. Any other is
//! parsed again in two steps so that every failure has a protocol code and still echoes the
//! frame's `ref`: first to a JSON object (taking `ref` and `type` out), then the fields of the
//! known type. Either way the domain rules (names, body size) come last.

use crate::codes::ErrorCode;
use crate::names::{ClientId, MessageBody, NameError, RoomName, Username};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// A client's correlation id: a JSON string or number, echoed verbatim on the reply.
pub type Ref = Value;

/// The largest `limit` a `history` request may ask for, and what it gets by default.
pub const HISTORY_MAX_LIMIT: u32 = 200;
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;

/// A valid client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Hello {
        token: String,
    },
    Join {
        room: RoomName,
        since: Option<u64>,
    },
    Leave {
        room: RoomName,
    },
    Send {
        room: RoomName,
        body: MessageBody,
        client_id: Option<ClientId>,
    },
    History {
        room: RoomName,
        before: Option<u64>,
        limit: u32,
    },
    Typing {
        room: RoomName,
    },
    Ping,
}

impl ClientFrame {
    /// The frame's `type`, for logs and metrics labels (a fixed set).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::Send { .. } => "send",
            ClientFrame::History { .. } => "history",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Ping => "ping",
        }
    }
}

/// A client frame that could not be accepted, with the `ref` it carried (if it was readable).
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub reference: Option<Ref>,
    pub code: ErrorCode,
    pub message: String,
}

/// The shape of client frames on the wire, before domain validation.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RawClientFrame {
    Hello {
        token: String,
    },
    Join {
        room: String,
        since: Option<u64>,
    },
    Leave {
        room: String,
    },
    Send {
        room: String,
        body: String,
        client_id: Option<String>,
    },
    History {
        room: String,
        before: Option<u64>,
        limit: Option<u32>,
    },
    Typing {
        room: String,
    },
    Ping {},
}

/// Every client frame `type` (also the label values of the frames-received metric).
pub const CLIENT_FRAME_TYPES: [&str; 7] = [
    "hello", "join", "leave", "send", "history", "typing", "ping",
];

/// Parses one text frame from a client. A frame with an unreadable `ref` is answered without one.
pub fn parse_client_frame(text: &str) -> Result<(Option<Ref>, ClientFrame), FrameError> {
    let (reference, raw) = match parse_well_formed(text) {
        Some(parsed) => parsed,
        None => parse_carefully(text)?,
    };
    match validate(raw) {
        Ok(frame) => Ok((reference, frame)),
        Err(e) => {
            let code = match e {
                NameError::Invalid(_) => ErrorCode::BadRequest,
                NameError::TooLarge(_) => ErrorCode::TooLarge,
            };
            Err(FrameError {
                reference,
                code,
                message: e.to_string(),
            })
        }
    }
}

/// Every field of every client frame, borrowed from the text where it has no escapes.
#[derive(Deserialize)]
struct FlatClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(borrow)]
    client_id: Option<Cow<'a, str>>,
    since: Option<u64>,
    before: Option<u64>,
    limit: Option<u32>,
}

/// The one-pass parse, for the frames clients send all the time: a well-formed frame of a known
/// type. `None` for anything else (bad JSON, a wrong or missing field, a repeated key...), which
/// `parse_carefully` then parses again to find the error and its code. For every frame this
/// accepts, `parse_carefully` gives the same answer (tested below): it only saves the building
/// of a `serde_json::Value` tree, about ten allocations per frame.
fn parse_well_formed(text: &str) -> Option<(Option<Ref>, RawClientFrame)> {
    let flat: FlatClientFrame = serde_json::from_str(text).ok()?;
    let reference = match flat.reference {
        None | Some(Value::Null) => None,
        Some(r @ (Value::String(_) | Value::Number(_))) => Some(r),
        Some(_) => return None,
    };
    let raw = match &*flat.kind {
        "hello" => RawClientFrame::Hello {
            token: flat.token?.into_owned(),
        },
        "join" => RawClientFrame::Join {
            room: flat.room?.into_owned(),
            since: flat.since,
        },
        "leave" => RawClientFrame::Leave {
            room: flat.room?.into_owned(),
        },
        "send" => RawClientFrame::Send {
            room: flat.room?.into_owned(),
            body: flat.body?.into_owned(),
            client_id: flat.client_id.map(Cow::into_owned),
        },
        "history" => RawClientFrame::History {
            room: flat.room?.into_owned(),
            before: flat.before,
            limit: flat.limit,
        },
        "typing" => RawClientFrame::Typing {
            room: flat.room?.into_owned(),
        },
        "ping" => RawClientFrame::Ping {},
        _ => return None,
    };
    Some((reference, raw))
}

/// The two-step parse (see the module's doc), which names what is wrong with a frame.
fn parse_carefully(text: &str) -> Result<(Option<Ref>, RawClientFrame), FrameError> {
    let bad = |reference: Option<Ref>, code: ErrorCode, message: String| FrameError {
        reference,
        code,
        message,
    };
    let mut object: Map<String, Value> = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => {
            return Err(bad(
                None,
                ErrorCode::BadRequest,
                "a frame must be a JSON object".into(),
            ));
        }
        Err(e) => {
            return Err(bad(
                None,
                ErrorCode::BadRequest,
                format!("invalid JSON: {e}"),
            ));
        }
    };
    let reference = match object.remove("ref") {
        None | Some(Value::Null) => None,
        Some(r @ (Value::String(_) | Value::Number(_))) => Some(r),
        Some(_) => {
            return Err(bad(
                None,
                ErrorCode::BadRequest,
                "ref must be a string or a number".into(),
            ));
        }
    };
    match object.get("type") {
        Some(Value::String(t)) if CLIENT_FRAME_TYPES.contains(&t.as_str()) => {}
        Some(Value::String(t)) => {
            let t: String = t.chars().take(32).collect();
            return Err(bad(
                reference,
                ErrorCode::BadRequest,
                format!("unknown frame type {t:?}"),
            ));
        }
        _ => {
            return Err(bad(
                reference,
                ErrorCode::BadRequest,
                "a frame needs a string field \"type\"".into(),
            ));
        }
    }
    match serde_json::from_value(Value::Object(object)) {
        Ok(raw) => Ok((reference, raw)),
        Err(e) => Err(bad(reference, ErrorCode::BadRequest, e.to_string())),
    }
}

fn validate(raw: RawClientFrame) -> Result<ClientFrame, NameError> {
    Ok(match raw {
        RawClientFrame::Hello { token } => ClientFrame::Hello { token },
        RawClientFrame::Join { room, since } => ClientFrame::Join {
            room: RoomName::parse(room)?,
            since,
        },
        RawClientFrame::Leave { room } => ClientFrame::Leave {
            room: RoomName::parse(room)?,
        },
        RawClientFrame::Send {
            room,
            body,
            client_id,
        } => ClientFrame::Send {
            room: RoomName::parse(room)?,
            body: MessageBody::parse(body)?,
            client_id: client_id.map(ClientId::parse).transpose()?,
        },
        RawClientFrame::History {
            room,
            before,
            limit,
        } => {
            let limit = limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
            if limit == 0 || limit > HISTORY_MAX_LIMIT {
                return Err(NameError::Invalid("limit must be 1 to 200"));
            }
            ClientFrame::History {
                room: RoomName::parse(room)?,
                before,
                limit,
            }
        }
        RawClientFrame::Typing { room } => ClientFrame::Typing {
            room: RoomName::parse(room)?,
        },
        RawClientFrame::Ping {} => ClientFrame::Ping,
    })
}

/// A committed message, as delivered live (`message`) and in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub room: RoomName,
    pub seq: u64,
    pub from: Username,
    pub body: String,
    /// Commit time, milliseconds since the Unix epoch.
    pub ts: i64,
    pub client_id: Option<String>,
}

/// Whether a user is in a room somewhere in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    Online,
    Offline,
}

/// Every frame the gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        user: Username,
        session: String,
        gateway: String,
        heartbeat_ms: u64,
    },
    Joined {
        room: RoomName,
        last_seq: u64,
        online: Vec<Username>,
    },
    Left {
        room: RoomName,
    },
    Sent {
        room: RoomName,
        seq: u64,
        ts: i64,
        client_id: Option<String>,
    },
    Message(StoredMessage),
    History {
        room: RoomName,
        messages: Vec<StoredMessage>,
        has_more: bool,
    },
    Typing {
        room: RoomName,
        user: Username,
    },
    Presence {
        room: RoomName,
        user: Username,
        state: PresenceState,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// A server frame with the `ref` of the client frame it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEnvelope {
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Ref>,
    #[serde(flatten)]
    pub frame: ServerFrame,
}

impl ServerFrame {
    /// The JSON text of this frame, answering the client frame that carried `reference`.
    pub fn encode(self, reference: Option<Ref>) -> String {
        let envelope = ServerEnvelope {
            reference,
            frame: self,
        };
        // Serialising these types cannot fail: every map key is a string and no field is a
        // custom serializer that errors.
        serde_json::to_string(&envelope).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"encoding failed"}"#.to_string()
        })
    }

    /// Encodes a committed message as a `message` frame. Done once per message per gateway.
    pub fn encode_message(message: &StoredMessage) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            #[serde(flatten)]
            message: &'a StoredMessage,
        }
        serde_json::to_string(&Wire {
            kind: "message",
            message,
        })
        .unwrap_or_default()
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
        }
    }
}

/// Parses a server frame: for clients and tests.
pub fn parse_server_frame(text: &str) -> Result<ServerEnvelope, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> FrameError {
        parse_client_frame(text).expect_err(text)
    }

    #[test]
    fn parses_every_client_frame() {
        let (r, f) =
            parse_client_frame(r#"{"type":"join","room":"general","since":3,"ref":7}"#).unwrap();
        assert_eq!(r, Some(Value::from(7)));
        assert_eq!(
            f,
            ClientFrame::Join {
                room: RoomName::parse("general").unwrap(),
                since: Some(3)
            }
        );
        let (_, f) = parse_client_frame(r#"{"type":"history","room":"a"}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::History {
                room: RoomName::parse("a").unwrap(),
                before: None,
                limit: 50
            }
        );
        let (r, f) = parse_client_frame(r#"{"type":"ping","ref":"x"}"#).unwrap();
        assert_eq!((r, f), (Some(Value::from("x")), ClientFrame::Ping));
    }

    #[test]
    fn every_bad_frame_has_a_code_and_keeps_its_ref() {
        assert_eq!(err("{nope").code, ErrorCode::BadRequest);
        assert_eq!(err("[1]").code, ErrorCode::BadRequest);
        let e = err(r#"{"type":"dance","ref":"r1"}"#);
        assert_eq!(
            (e.code, e.reference),
            (ErrorCode::BadRequest, Some(Value::from("r1")))
        );
        let e = err(r#"{"type":"join","ref":2}"#);
        assert_eq!(
            (e.code, e.reference),
            (ErrorCode::BadRequest, Some(Value::from(2)))
        );
        assert_eq!(
            err(r#"{"type":"join","room":"Bad Room"}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"type":"join","room":"a","since":-1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"type":"send","room":"a","body":""}"#).code,
            ErrorCode::BadRequest
        );
        let long = "x".repeat(4001);
        let e = err(&format!(
            r#"{{"type":"send","room":"a","body":"{long}","ref":1}}"#
        ));
        assert_eq!(
            (e.code, e.reference),
            (ErrorCode::TooLarge, Some(Value::from(1)))
        );
        assert_eq!(
            err(r#"{"type":"history","room":"a","limit":201}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"type":"history","room":"a","limit":0}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"type":"ping","ref":[1]}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(err(r#"{"room":"a"}"#).code, ErrorCode::BadRequest);
    }

    /// The one-pass parse must never change what a frame means: whatever it accepts, the
    /// careful parse reads the same way; whatever it leaves, the careful parse still answers.
    #[test]
    fn the_one_pass_parse_agrees_with_the_careful_one() {
        let accepted = [
            r#"{"type":"hello","token":"t0k\"en"}"#,
            r#"{"type":"join","room":"general","since":3,"ref":7}"#,
            r#"{"ref":"r","type":"join","room":"gen\u0065ral","since":null}"#,
            r#"{"type":"leave","room":"a"}"#,
            r#"{"type":"send","room":"a","body":"hi \"there\" é 😀","client_id":"c1","ref":1.5}"#,
            r#"{"type":"send","room":"a","body":"x","client_id":null,"extra":{"deep":[1,2]}}"#,
            r#"{"type":"history","room":"a","before":10,"limit":200}"#,
            r#"{"type":"history","room":"a","limit":0}"#,
            r#"{"type":"typing","room":"a","ref":null}"#,
            r#" { "type" : "ping" } "#,
            r#"{"type":"send","room":"Bad Room","body":"x"}"#,
        ];
        for text in accepted {
            let one_pass = parse_well_formed(text).unwrap_or_else(|| panic!("one pass: {text}"));
            let careful = parse_carefully(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(one_pass, careful, "{text}");
        }
        // Left to the careful parse, which accepts some of them (a field of another type is
        // ignored; a repeated key takes its last value) and names the fault in the others.
        let left = [
            r#"{"type":"ping","room":5}"#,
            r#"{"type":"join","room":"a","limit":-1}"#,
            r#"{"type":"join","room":"a","room":"b"}"#,
            r#"{"type":"join","room":null}"#,
            r#"{"type":"send","room":"a"}"#,
            r#"{"type":"dance"}"#,
            r#"{"type":7}"#,
            r#"{"type":"ping","ref":[1]}"#,
            r#"{"type":"ping"} trailing"#,
            r#"{"type":"join","room":"a","since":1.0}"#,
        ];
        for text in left {
            assert!(parse_well_formed(text).is_none(), "{text}");
        }
        assert_eq!(
            parse_client_frame(r#"{"type":"ping","room":5}"#).unwrap().1,
            ClientFrame::Ping
        );
        let (_, joined) = parse_client_frame(r#"{"type":"join","room":"a","room":"b"}"#).unwrap();
        assert_eq!(
            joined,
            ClientFrame::Join {
                room: RoomName::parse("b").unwrap(),
                since: None
            }
        );
    }

    #[test]
    fn server_frames_round_trip_with_ref() {
        let text = ServerFrame::Pong.encode(Some(Value::from("abc")));
        assert_eq!(text, r#"{"ref":"abc","type":"pong"}"#);
        let message = StoredMessage {
            room: RoomName::parse("general").unwrap(),
            seq: 4,
            from: Username::parse("alice").unwrap(),
            body: "<b>hi</b> \"quoted\"".into(),
            ts: 1_700_000_000_000,
            client_id: Some("c1".into()),
        };
        let text = ServerFrame::encode_message(&message);
        let parsed = parse_server_frame(&text).unwrap();
        assert_eq!(parsed.frame, ServerFrame::Message(message));
        let e = ServerFrame::error(ErrorCode::NotJoined, "join first").encode(None);
        assert_eq!(
            e,
            r#"{"type":"error","code":"not_joined","message":"join first"}"#
        );
    }
}
