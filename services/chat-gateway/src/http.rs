//! The HTTP API: accounts, room listing, history, and the health endpoints.

use crate::context::SharedContext;
use crate::error::Failure;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use chat_protocol::api::{
    Credentials, MessagesQuery, MessagesResponse, RoomsResponse, TokenResponse,
};
use chat_protocol::frames::{HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT};
use chat_protocol::{ErrorCode, NameError, Password, RoomName, Username};

fn bad_request(e: NameError) -> Failure {
    Failure::new(ErrorCode::BadRequest, e.to_string())
}

fn json_body(body: Result<Json<Credentials>, JsonRejection>) -> Result<Credentials, Failure> {
    body.map(|Json(c)| c).map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::TooLarge
        } else {
            ErrorCode::BadRequest
        };
        Failure::new(code, e.body_text())
    })
}

pub async fn register(
    State(ctx): State<SharedContext>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Result<Response, Failure> {
    let credentials = json_body(body)?;
    let user = Username::parse(credentials.username).map_err(bad_request)?;
    let password = Password::parse(credentials.password).map_err(bad_request)?;
    let token = ctx
        .auth
        .register(ctx.store.as_ref(), &user, &password)
        .await?;
    Ok((StatusCode::CREATED, Json(TokenResponse { token, user })).into_response())
}

pub async fn login(
    State(ctx): State<SharedContext>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Result<Json<TokenResponse>, Failure> {
    let credentials = json_body(body)?;
    let unauthorized = || Failure::new(ErrorCode::Unauthorized, "invalid username or password");
    let user = Username::parse(credentials.username).map_err(|_| unauthorized())?;
    if credentials.password.len() > chat_protocol::names::MAX_PASSWORD_BYTES {
        return Err(unauthorized());
    }
    let token = ctx
        .auth
        .login(ctx.store.as_ref(), &user, &credentials.password)
        .await?;
    Ok(Json(TokenResponse { token, user }))
}

/// The user named by a valid `Authorization: Bearer` token.
pub struct AuthUser(pub Username);

impl FromRequestParts<SharedContext> for AuthUser {
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &SharedContext,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Failure::new(ErrorCode::Unauthorized, "missing bearer token"))?;
        Ok(AuthUser(ctx.auth.verify(token.trim())?))
    }
}

pub async fn rooms(
    State(ctx): State<SharedContext>,
    AuthUser(user): AuthUser,
) -> Result<Json<RoomsResponse>, Failure> {
    let rooms = ctx
        .store
        .rooms_for(&user, ctx.settings.rooms_list_limit)
        .await?;
    Ok(Json(RoomsResponse { rooms }))
}

pub async fn messages(
    State(ctx): State<SharedContext>,
    AuthUser(user): AuthUser,
    Path(room): Path<String>,
    query: Result<Query<MessagesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<MessagesResponse>, Failure> {
    let Query(query) = query.map_err(|e| Failure::new(ErrorCode::BadRequest, e.body_text()))?;
    let room = RoomName::parse(room).map_err(bad_request)?;
    if !room.admits(&user) {
        return Err(Failure::new(
            ErrorCode::Forbidden,
            "this direct room belongs to other users",
        ));
    }
    let limit = query.limit.unwrap_or(HISTORY_DEFAULT_LIMIT);
    if limit == 0 || limit > HISTORY_MAX_LIMIT {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            "limit must be 1 to 200",
        ));
    }
    let page = match (query.before, query.after) {
        (Some(_), Some(_)) => {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                "give before or after, not both",
            ));
        }
        (before, None) => ctx.store.messages_before(&room, before, limit).await?,
        (None, Some(after)) => ctx.store.messages_after(&room, after, limit).await?,
    };
    Ok(Json(MessagesResponse {
        room,
        messages: page.messages,
        has_more: page.has_more,
    }))
}

/// A known path asked with a method it does not take: the API's error body, not an empty 405.
pub async fn method_not_allowed(method: axum::http::Method) -> Failure {
    Failure::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on this path"),
    )
}

pub async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 only while the store and the bus answer and the gateway is not draining. The answer is
/// also the `chat_ready` gauge, so that dashboards and alerts see what the orchestrator sees.
pub async fn readyz(State(ctx): State<SharedContext>) -> Response {
    let problem = if ctx.draining.is_cancelled() {
        Some("draining")
    } else if !ctx.bus.is_healthy() {
        Some("message bus unhealthy")
    } else {
        match ctx.store.ping(ctx.settings.ready_timeout()).await {
            Ok(()) => None,
            Err(_) => Some("history store unavailable"),
        }
    };
    metrics::gauge!("chat_ready").set(if problem.is_none() { 1.0 } else { 0.0 });
    match problem {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}
