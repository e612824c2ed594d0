//! The client side of the wire: encodes a `ClientFrame` as the JSON text a client sends.
//!
//! `frames.rs` only parses client frames (the gateway's side); clients and tests that want typed
//! frames encode them here, so the field names live next to the parser's in this crate.

use crate::frames::{ClientFrame, Ref};
use crate::names::{ClientId, MessageBody, RoomName};
use serde::Serialize;

/// The shape of a client frame on the wire: the borrowed mirror of `frames::RawClientFrame`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Wire<'a> {
    Hello {
        token: &'a str,
    },
    Join {
        room: &'a RoomName,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    Leave {
        room: &'a RoomName,
    },
    Send {
        room: &'a RoomName,
        body: &'a MessageBody,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a ClientId>,
    },
    History {
        room: &'a RoomName,
        #[serde(skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        limit: u32,
    },
    Typing {
        room: &'a RoomName,
    },
    Ping {},
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(flatten)]
    frame: Wire<'a>,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a Ref>,
}

impl ClientFrame {
    /// The JSON text of this frame, carrying `reference` as its `ref` if given.
    pub fn encode(&self, reference: Option<&Ref>) -> String {
        let frame = match self {
            ClientFrame::Hello { token } => Wire::Hello { token },
            ClientFrame::Join { room, since } => Wire::Join {
                room,
                since: *since,
            },
            ClientFrame::Leave { room } => Wire::Leave { room },
            ClientFrame::Send {
                room,
                body,
                client_id,
            } => Wire::Send {
                room,
                body,
                client_id: client_id.as_ref(),
            },
            ClientFrame::History {
                room,
                before,
                limit,
            } => Wire::History {
                room,
                before: *before,
                limit: *limit,
            },
            ClientFrame::Typing { room } => Wire::Typing { room },
            ClientFrame::Ping => Wire::Ping {},
        };
        // Every field is a string or a number: serialising cannot fail.
        serde_json::to_string(&Envelope { frame, reference }).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::parse_client_frame;
    use serde_json::Value;

    fn room() -> RoomName {
        RoomName::parse("general").unwrap()
    }

    #[test]
    fn encodes_what_the_protocol_documents() {
        let send = ClientFrame::Send {
            room: room(),
            body: MessageBody::parse("hello, world").unwrap(),
            client_id: Some(ClientId::parse("m-1").unwrap()),
        };
        assert_eq!(
            send.encode(Some(&Value::from(3))),
            r#"{"type":"send","room":"general","body":"hello, world","client_id":"m-1","ref":3}"#
        );
        let join = ClientFrame::Join {
            room: room(),
            since: Some(41),
        };
        assert_eq!(
            join.encode(None),
            r#"{"type":"join","room":"general","since":41}"#
        );
        assert_eq!(
            ClientFrame::Ping.encode(Some(&Value::from("p-7"))),
            r#"{"type":"ping","ref":"p-7"}"#
        );
    }

    #[test]
    fn every_frame_round_trips_through_the_gateway_parser() {
        let frames = [
            ClientFrame::Hello { token: "t".into() },
            ClientFrame::Join {
                room: room(),
                since: None,
            },
            ClientFrame::Join {
                room: room(),
                since: Some(0),
            },
            ClientFrame::Leave { room: room() },
            ClientFrame::Send {
                room: RoomName::parse("dm:alice:bob").unwrap(),
                body: MessageBody::parse("\"quoted\" <b>\n\u{1b}[31m").unwrap(),
                client_id: None,
            },
            ClientFrame::History {
                room: room(),
                before: Some(40),
                limit: 20,
            },
            ClientFrame::History {
                room: room(),
                before: None,
                limit: 50,
            },
            ClientFrame::Typing { room: room() },
            ClientFrame::Ping,
        ];
        for (i, frame) in frames.into_iter().enumerate() {
            let reference = Value::from(i);
            let text = frame.encode(Some(&reference));
            let (parsed_ref, parsed) = parse_client_frame(&text).expect(&text);
            assert_eq!(parsed_ref, Some(reference), "{text}");
            assert_eq!(parsed, frame, "{text}");
        }
    }
}
