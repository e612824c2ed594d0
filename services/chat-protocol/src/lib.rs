//! The chat protocol v1 wire contract, shared by the gateway, the clients and the tests.
//!
//! Only this crate derives the wire format: every JSON object a client or the gateway puts on a
//! WebSocket or an HTTP body is a type from here. The names (`RoomName`, `Username`, ...) validate
//! at construction, so code that holds one never re-checks it.

pub mod api;
pub mod client;
pub mod codes;
pub mod frames;
pub mod names;

pub use codes::ErrorCode;
pub use frames::{ClientFrame, FrameError, Ref, ServerFrame, StoredMessage, parse_client_frame};
pub use names::{ClientId, MessageBody, NameError, Password, RoomKind, RoomName, Username};

/// Close code sent when a client's frame is larger than the configured limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code sent when the first frame is not a valid `hello`.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code sent when a client breaks the WebSocket protocol (RFC 6455): a reserved bit set,
/// an unmasked frame, a text frame that is not UTF-8, an oversized control frame.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code sent when the gateway drains (restart): reconnect elsewhere.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
/// Close code sent to a consumer whose outbound queue overflowed; it should reconnect and resume.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code sent when no frame (nor pong) arrived within the heartbeat timeout.
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4001;
