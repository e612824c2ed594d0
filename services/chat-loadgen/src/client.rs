//! A minimal protocol v1 client for load: connect, hello, join, and read frames cheaply.

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
    let hello = serde_json::json!({"type": "hello", "token": token}).to_string();
    ws.send(Message::text(hello)).await?;
    match next_text(&mut ws).await? {
        Some(text) if text.contains("\"welcome\"") => Ok(ws),
        other => bail!("no welcome: {other:?}"),
    }
}

/// Joins a room; returns the room's last seq. With `since`, the backlog follows.
pub async fn join(ws: &mut Ws, room: &str, since: Option<u64>) -> anyhow::Result<u64> {
    let mut frame = serde_json::json!({"type": "join", "room": room, "ref": 0});
    if let Some(since) = since {
        frame["since"] = since.into();
    }
    ws.send(Message::text(frame.to_string())).await?;
    loop {
        let Some(text) = next_text(ws).await? else {
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

/// The next text frame (`None` when the socket ended), with a generous timeout.
pub async fn next_text(ws: &mut Ws) -> anyhow::Result<Option<String>> {
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

/// `http://host:port` -> `ws://host:port/ws`.
pub fn ws_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let rest = base
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))
        .unwrap_or_else(|| base.to_string());
    format!("{rest}/ws")
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
        assert_eq!(ws_url("http://127.0.0.1:80/"), "ws://127.0.0.1:80/ws");
    }
}
