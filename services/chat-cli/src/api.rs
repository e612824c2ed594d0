//! The gateway's HTTP API: register, login, the room list and history pages.

use crate::error::Failure;
use chat_protocol::api::{
    Credentials, ErrorResponse, MessagesQuery, MessagesResponse, RoomsResponse, TokenResponse,
};
use chat_protocol::{ErrorCode, RoomName};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// The gateway's default public address.
pub const DEFAULT_SERVER: &str = "http://localhost:8080";

/// Checks a server URL and returns it without a trailing slash. Only `http://` is supported:
/// no TLS is compiled in (terminate TLS in front of the gateway, or tunnel).
pub fn normalize_server(server: &str) -> Result<String, Failure> {
    let server = server.trim().trim_end_matches('/');
    if server.starts_with("https://") {
        return Err(Failure::new(
            "bad_request",
            "https:// is not supported by this client (no TLS compiled in); use http://",
        ));
    }
    let Some(host) = server.strip_prefix("http://") else {
        return Err(Failure::new(
            "bad_request",
            format!("server must be an http:// URL, like {DEFAULT_SERVER}, not {server:?}"),
        ));
    };
    if host.is_empty() || host.contains('/') {
        return Err(Failure::new(
            "bad_request",
            format!("server must be http://HOST[:PORT] with no path, not {server:?}"),
        ));
    }
    Ok(server.to_string())
}

/// The WebSocket URL of a (normalised) server: `http://h:p` becomes `ws://h:p/ws`.
pub fn ws_url(server: &str) -> String {
    let host = server.strip_prefix("http://").unwrap_or(server);
    format!("ws://{host}/ws")
}

/// A client of one gateway's HTTP API.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    server: String,
}

impl Api {
    pub fn new(server: &str) -> Result<Api, Failure> {
        let server = normalize_server(server)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| Failure::new("internal", format!("HTTP client: {e}")))?;
        Ok(Api { http, server })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub async fn register(&self, username: &str, password: &str) -> Result<TokenResponse, Failure> {
        self.credentials("/api/register", username, password).await
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<TokenResponse, Failure> {
        self.credentials("/api/login", username, password).await
    }

    async fn credentials(
        &self,
        path: &str,
        username: &str,
        password: &str,
    ) -> Result<TokenResponse, Failure> {
        let body = Credentials {
            username: username.to_string(),
            password: password.to_string(),
        };
        let request = self.http.post(self.url(path)).json(&body);
        self.answer(request, false).await
    }

    /// `GET /api/rooms`: every public room and the caller's direct rooms.
    pub async fn rooms(&self, token: &str) -> Result<RoomsResponse, Failure> {
        let request = self.http.get(self.url("/api/rooms")).bearer_auth(token);
        self.answer(request, true).await
    }

    /// `GET /api/rooms/{room}/messages`: one page, in ascending seq order.
    pub async fn messages(
        &self,
        token: &str,
        room: &RoomName,
        query: &MessagesQuery,
    ) -> Result<MessagesResponse, Failure> {
        let request = self
            .http
            .get(self.url(&format!("/api/rooms/{room}/messages")))
            .bearer_auth(token)
            .query(query);
        self.answer(request, true).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    /// Sends the request; a success body parsed as `T`, or the error the gateway reported.
    /// `with_token`: the request carried the stored token, so `unauthorized` means log in again.
    async fn answer<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        with_token: bool,
    ) -> Result<T, Failure> {
        let response = request.send().await.map_err(|e| {
            Failure::server(
                ErrorCode::Unavailable,
                format!("cannot reach {}: {}", self.server, root_cause(&e)),
            )
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            Failure::server(
                ErrorCode::Unavailable,
                format!("reading the answer of {}: {e}", self.server),
            )
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                Failure::server(
                    ErrorCode::Internal,
                    format!("unexpected answer from {} ({status}): {e}", self.server),
                )
            });
        }
        match serde_json::from_slice::<ErrorResponse>(&bytes) {
            Ok(ErrorResponse { error }) => {
                let mut message = error.message;
                if with_token && error.code == ErrorCode::Unauthorized {
                    message.push_str(" (log in again with `chat login USERNAME`)");
                }
                Err(Failure::server(error.code, message))
            }
            Err(_) => Err(Failure::server(
                if status.is_server_error() {
                    ErrorCode::Unavailable
                } else {
                    ErrorCode::Internal
                },
                format!(
                    "{} answered {status}: {}",
                    self.server,
                    String::from_utf8_lossy(&bytes)
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
            )),
        }
    }
}

/// The innermost error's text ("Connection refused (os error 111)"), which is what helps.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers() {
        assert_eq!(
            normalize_server("http://localhost:8080/").unwrap(),
            "http://localhost:8080"
        );
        assert_eq!(ws_url("http://127.0.0.1:9"), "ws://127.0.0.1:9/ws");
        for bad in [
            "localhost:8080",
            "https://x",
            "http://",
            "http://x/api",
            "ftp://x",
        ] {
            assert!(normalize_server(bad).is_err(), "{bad}");
        }
    }
}
