//! A minimal protocol v1 client for load: connect, hello, join, and read frames cheaply. It
//! also speaks the same exchanges over Socket.IO (`Protocol::Socketio`), for the side-by-side
//! run against Socket.IO with its Redis adapter (`bench/socketio`).

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::borrow::Cow;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The fields of a server frame the load generator reads (borrowed: no copy of the body).
#[derive(Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    pub seq: Option<u64>,
    pub last_seq: Option<u64>,
    #[serde(borrow)]
    pub body: Option<Cow<'a, str>>,
    #[serde(rename = "ref")]
    pub reference: Option<u64>,
    #[serde(borrow)]
    pub code: Option<Cow<'a, str>>,
}

/// The wire protocol of the server under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The gateway's protocol v1.
    Chat,
    /// Socket.IO v4 over WebSocket, with the events of `bench/socketio/server.js`.
    Socketio,
}

/// A server frame with the protocol's own framing taken off.
#[derive(Debug, PartialEq, Eq)]
enum Inbound<'a> {
    /// A frame in the gateway's shapes (`message`, `sent`, `joined`, ...).
    Frame(&'a str),
    /// A Socket.IO heartbeat, to be answered with [`PONG`].
    Ping,
    /// Anything else.
    Other,
}

/// The answer to [`Inbound::Ping`].
const PONG: &str = "3";

/// Takes the protocol's framing off a text frame. Socket.IO packets start with the Engine.IO
/// type (`2` ping, `4` message), then the Socket.IO type (`2` event, `3` ack, with the ack id):
/// `42["message",{...}]` and `43<id>[{...}]` carry the object the gateway would have sent.
fn inbound(protocol: Protocol, text: &str) -> Inbound<'_> {
    match protocol {
        Protocol::Chat => Inbound::Frame(text),
        Protocol::Socketio => {
            if text == "2" {
                return Inbound::Ping;
            }
            let object = if let Some(event) = text.strip_prefix("42[\"message\",") {
                event.strip_suffix(']')
            } else if let Some(ack) = text.strip_prefix("43") {
                ack.trim_start_matches(|c: char| c.is_ascii_digit())
                    .strip_prefix('[')
                    .and_then(|rest| rest.strip_suffix(']'))
            } else {
                None
            };
            object.map_or(Inbound::Other, Inbound::Frame)
        }
    }
}

/// Puts a client frame in the gateway's shape (`{"type": "send", "ref": 3, ...}`) into the
/// protocol's framing: for Socket.IO, the event named by `type` with the frame as its argument
/// and `ref` as the ack id (`423["send",{...}]`).
pub fn outbound(protocol: Protocol, frame: String) -> String {
    match protocol {
        Protocol::Chat => frame,
        Protocol::Socketio => {
            #[derive(Deserialize)]
            struct Head<'a> {
                #[serde(rename = "type", borrow)]
                kind: Cow<'a, str>,
                #[serde(rename = "ref")]
                reference: Option<u64>,
            }
            let Ok(head) = serde_json::from_str::<Head<'_>>(&frame) else {
                return frame;
            };
            let id = head.reference.map(|r| r.to_string()).unwrap_or_default();
            format!(
                "42{id}[{},{frame}]",
                serde_json::Value::from(head.kind.as_ref())
            )
        }
    }
}

/// Small buffers: the load generator holds thousands of sockets on the gateway's machine, and
/// tungstenite zeroes the free part of the read buffer before every read.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
}

/// Connects (from `source` when given: a loopback address, so that a load balancer's
/// per-address limits see many clients), sends hello, waits for welcome.
pub async fn open(
    protocol: Protocol,
    ws_url: &str,
    token: &str,
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<Ws> {
    let connect = async {
        match source {
            None => Ok(
                tokio_tungstenite::connect_async_with_config(ws_url, Some(config()), true)
                    .await?
                    .0,
            ),
            Some(ip) => {
                let authority = ws_url
                    .strip_prefix("ws://")
                    .and_then(|rest| rest.split('/').next())
                    .context("--source-ips needs a ws:// URL")?;
                let target: std::net::SocketAddr = authority
                    .parse()
                    .context("--source-ips needs an IP address in --url")?;
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
                let stream = socket.connect(target).await?;
                stream.set_nodelay(true)?;
                let (ws, _) = tokio_tungstenite::client_async_with_config(
                    ws_url,
                    MaybeTlsStream::Plain(stream),
                    Some(config()),
                )
                .await?;
                anyhow::Ok(ws)
            }
        }
    };
    let mut ws = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .context("connect timed out")??;
    if protocol == Protocol::Socketio {
        // Engine.IO's open packet, then a connect to the main namespace.
        match next_raw(&mut ws).await? {
            Some(text) if text.starts_with('0') => {}
            other => bail!("no Engine.IO open packet: {other:?}"),
        }
        ws.send(Message::text("40")).await?;
        return match next_raw(&mut ws).await? {
            Some(text) if text.starts_with("40") => Ok(ws),
            other => bail!("no Socket.IO connect: {other:?}"),
        };
    }
    let hello = serde_json::json!({"type": "hello", "token": token}).to_string();
    ws.send(Message::text(hello)).await?;
    match next_text(protocol, &mut ws).await? {
        Some(text) if text.contains("\"welcome\"") => Ok(ws),
        other => bail!("no welcome: {other:?}"),
    }
}

/// Joins a room; returns the room's last seq. With `since`, the backlog follows.
pub async fn join(
    protocol: Protocol,
    ws: &mut Ws,
    room: &str,
    since: Option<u64>,
) -> anyhow::Result<u64> {
    let mut frame = serde_json::json!({"type": "join", "room": room, "ref": 0});
    if let Some(since) = since {
        frame["since"] = since.into();
    }
    ws.send(Message::text(outbound(protocol, frame.to_string())))
        .await?;
    loop {
        let Some(text) = next_text(protocol, ws).await? else {
            bail!("closed while joining");
        };
        let incoming: Incoming<'_> = serde_json::from_str(&text)?;
        match incoming.kind.as_ref() {
            "joined" => return Ok(incoming.last_seq.unwrap_or(0)),
            "error" => bail!("join refused: {:?}", incoming.code),
            _ => {}
        }
    }
}

/// The frame in the gateway's shapes that `text` carries, if any; answers a heartbeat on `ws`.
/// Every reader of a socket goes through here, so none can forget the heartbeat.
pub async fn unframe<'t>(
    protocol: Protocol,
    ws: &mut Ws,
    text: &'t str,
) -> Result<Option<&'t str>, tokio_tungstenite::tungstenite::Error> {
    match inbound(protocol, text) {
        Inbound::Frame(frame) => Ok(Some(frame)),
        Inbound::Ping => ws.send(Message::text(PONG)).await.map(|()| None),
        Inbound::Other => Ok(None),
    }
}

/// The next frame in the gateway's shapes (`None` when the socket ended), answering
/// heartbeats on the way.
pub async fn next_text(protocol: Protocol, ws: &mut Ws) -> anyhow::Result<Option<String>> {
    loop {
        let Some(text) = next_raw(ws).await? else {
            return Ok(None);
        };
        if let Some(frame) = unframe(protocol, ws, &text).await? {
            return Ok(Some(frame.to_string()));
        }
    }
}

/// The next text frame as sent (`None` when the socket ended), with a generous timeout.
async fn next_raw(ws: &mut Ws) -> anyhow::Result<Option<String>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Err(_) => bail!("no frame for 30 s"),
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(Some(t.to_string())),
            Ok(Some(Ok(Message::Close(_)))) => return Ok(None),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The send time a publisher wrote at the start of a body: `t<µs> ...`.
pub fn sent_at_us(body: &str) -> Option<u64> {
    body.strip_prefix('t')?.split(' ').next()?.parse().ok()
}

/// Wall clock in microseconds (publisher and receivers share the host's clock).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `http://host:port` -> `ws://host:port/ws`, or Socket.IO's WebSocket endpoint.
pub fn ws_url(protocol: Protocol, base: &str) -> String {
    let base = base.trim_end_matches('/');
    let rest = base
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))
        .unwrap_or_else(|| base.to_string());
    match protocol {
        Protocol::Chat => format!("{rest}/ws"),
        Protocol::Socketio => format!("{rest}/socket.io/?EIO=4&transport=websocket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_needs() {
        let m: Incoming<'_> = serde_json::from_str(
            r#"{"type":"message","room":"r","seq":7,"from":"a","body":"t123 p0 n1 xx","ts":1,"client_id":null}"#,
        )
        .unwrap();
        assert_eq!((m.kind.as_ref(), m.seq), ("message", Some(7)));
        assert_eq!(sent_at_us(m.body.as_deref().unwrap()), Some(123));
        assert_eq!(
            ws_url(Protocol::Chat, "http://127.0.0.1:80/"),
            "ws://127.0.0.1:80/ws"
        );
    }

    #[test]
    fn speaks_socketio_framing() {
        let sio = Protocol::Socketio;
        assert_eq!(
            ws_url(sio, "http://127.0.0.1:80"),
            "ws://127.0.0.1:80/socket.io/?EIO=4&transport=websocket"
        );
        let message = r#"{"type":"message","room":"r","seq":7,"body":"t1 p0 n1"}"#;
        assert_eq!(
            inbound(sio, &format!(r#"42["message",{message}]"#)),
            Inbound::Frame(message)
        );
        let sent = r#"{"type":"sent","ref":12,"seq":7}"#;
        assert_eq!(inbound(sio, &format!("4312[{sent}]")), Inbound::Frame(sent));
        assert_eq!(inbound(sio, "2"), Inbound::Ping);
        assert_eq!(inbound(sio, r#"42["typing",{}]"#), Inbound::Other);
        assert_eq!(inbound(sio, "40{\"sid\":\"x\"}"), Inbound::Other);
        assert_eq!(inbound(Protocol::Chat, "2"), Inbound::Frame("2"));

        let send = r#"{"type":"send","room":"r","body":"b","ref":3}"#.to_string();
        assert_eq!(
            outbound(sio, send.clone()),
            format!(r#"423["send",{send}]"#)
        );
        let join = r#"{"type":"join","room":"r"}"#.to_string();
        assert_eq!(outbound(sio, join.clone()), format!(r#"42["join",{join}]"#));
        assert_eq!(outbound(Protocol::Chat, send.clone()), send);
    }
}
