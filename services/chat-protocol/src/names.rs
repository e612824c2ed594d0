//! Validated domain names: a value of one of these types has passed the protocol's rules.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Why a name, body or password was refused. The message is shown to the client as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0}")]
    Invalid(&'static str),
    /// Valid in form but over a size limit (maps to `too_large`).
    #[error("{0}")]
    TooLarge(&'static str),
}

macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                $name::parse(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A user name: `^[a-z0-9_]{3,32}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Username(String);
string_newtype!(Username);

impl Username {
    pub fn parse(raw: impl Into<String>) -> Result<Self, NameError> {
        let raw = raw.into();
        let ok_len = (3..=32).contains(&raw.len());
        let ok_chars = raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok_len && ok_chars {
            Ok(Username(raw))
        } else {
            Err(NameError::Invalid(
                "username must be 3 to 32 characters of a-z, 0-9 and _",
            ))
        }
    }
}

/// What kind of room a name designates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomKind {
    Public,
    Direct,
}

/// A room name: a public room `^[a-z0-9][a-z0-9_-]{0,63}$` or a direct room `dm:<a>:<b>` with a < b.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(String);
string_newtype!(RoomName);

/// Lets maps keyed by room be searched with the name as it arrives from the bus. `Hash` and `Eq`
/// are those of the inner string, as `Borrow` requires.
impl std::borrow::Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl RoomName {
    pub fn parse(raw: impl Into<String>) -> Result<Self, NameError> {
        let raw = raw.into();
        if let Some(pair) = raw.strip_prefix("dm:") {
            let (a, b) = pair.split_once(':').ok_or(NameError::Invalid(
                "a direct room is named dm:<user>:<user>",
            ))?;
            let (a, b) = (Username::parse(a)?, Username::parse(b)?);
            if a >= b {
                return Err(NameError::Invalid(
                    "a direct room names its two users in ascending order: dm:<a>:<b> with a < b",
                ));
            }
            return Ok(RoomName(raw));
        }
        let bytes = raw.as_bytes();
        let first_ok = bytes
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
        if first_ok && rest_ok && bytes.len() <= 64 {
            Ok(RoomName(raw))
        } else {
            Err(NameError::Invalid(
                "room must be 1 to 64 characters of a-z, 0-9, _ and -, starting with a letter or digit, or dm:<a>:<b>",
            ))
        }
    }

    /// The direct room of two distinct users.
    pub fn direct(a: &Username, b: &Username) -> Option<Self> {
        match a.cmp(b) {
            std::cmp::Ordering::Less => Some(RoomName(format!("dm:{a}:{b}"))),
            std::cmp::Ordering::Greater => Some(RoomName(format!("dm:{b}:{a}"))),
            std::cmp::Ordering::Equal => None,
        }
    }

    pub fn kind(&self) -> RoomKind {
        if self.0.starts_with("dm:") {
            RoomKind::Direct
        } else {
            RoomKind::Public
        }
    }

    /// Whether `user` may join, read and send in this room: anyone for a public room, only the
    /// two named users for a direct one.
    pub fn admits(&self, user: &Username) -> bool {
        match self.0.strip_prefix("dm:").and_then(|p| p.split_once(':')) {
            None => true,
            Some((a, b)) => a == user.as_str() || b == user.as_str(),
        }
    }
}

/// The most characters a message body may have.
pub const MAX_BODY_CHARS: usize = 4000;

/// A message body: 1 to 4000 characters, not only white space, without U+0000 (which no
/// Postgres text column can hold; refusing it here keeps both stores alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageBody(String);
string_newtype!(MessageBody);

impl MessageBody {
    pub fn parse(raw: impl Into<String>) -> Result<Self, NameError> {
        let raw = raw.into();
        if raw.trim().is_empty() {
            return Err(NameError::Invalid("body must not be empty"));
        }
        if raw.contains('\0') {
            return Err(NameError::Invalid("body must not contain U+0000"));
        }
        // Cheap byte check first: at most 4 bytes per char, so short strings need no count.
        if raw.len() > MAX_BODY_CHARS && raw.chars().count() > MAX_BODY_CHARS {
            return Err(NameError::TooLarge("body is longer than 4000 characters"));
        }
        Ok(MessageBody(raw))
    }
}

/// The longest client id, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 64;

/// A client-chosen idempotency key for `send`: 1 to 64 bytes, without U+0000.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);
string_newtype!(ClientId);

impl ClientId {
    pub fn parse(raw: impl Into<String>) -> Result<Self, NameError> {
        let raw = raw.into();
        if raw.is_empty() || raw.len() > MAX_CLIENT_ID_BYTES {
            Err(NameError::Invalid("client_id must be 1 to 64 bytes"))
        } else if raw.contains('\0') {
            Err(NameError::Invalid("client_id must not contain U+0000"))
        } else {
            Ok(ClientId(raw))
        }
    }
}

/// Password length limits: the upper one bounds the cost of hashing a hostile input.
pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A password in transit. Its `Debug` never shows the secret.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    pub fn parse(raw: impl Into<String>) -> Result<Self, NameError> {
        let raw = raw.into();
        if raw.len() > MAX_PASSWORD_BYTES {
            Err(NameError::TooLarge("password is longer than 1024 bytes"))
        } else if raw.chars().count() < MIN_PASSWORD_CHARS {
            Err(NameError::Invalid("password must be at least 8 characters"))
        } else {
            Ok(Password(raw))
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_refused_where_postgres_cannot_store_them() {
        assert!(MessageBody::parse("a\0b").is_err());
        assert!(ClientId::parse("c\0").is_err());
        assert!(MessageBody::parse("a\u{1}b").is_ok());
    }

    #[test]
    fn usernames() {
        assert!(Username::parse("bob").is_ok());
        assert!(Username::parse("a_1").is_ok());
        assert!(Username::parse("x".repeat(32)).is_ok());
        for bad in ["ab", "Bob", "bo b", "bob!", "", &"x".repeat(33)] {
            assert!(Username::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rooms() {
        for good in ["general", "0", "a-b_c", &"r".repeat(64), "dm:alice:bob"] {
            assert!(RoomName::parse(good).is_ok(), "{good:?} refused");
        }
        for bad in [
            "",
            "-x",
            "_x",
            "General",
            "a b",
            &"r".repeat(65),
            "dm:bob:alice",
            "dm:bob:bob",
            "dm:bob",
            "dm:al:bob",
        ] {
            assert!(RoomName::parse(bad).is_err(), "{bad:?} accepted");
        }
        let dm = RoomName::parse("dm:alice:bob").unwrap();
        assert_eq!(dm.kind(), RoomKind::Direct);
        assert!(dm.admits(&Username::parse("alice").unwrap()));
        assert!(dm.admits(&Username::parse("bob").unwrap()));
        assert!(!dm.admits(&Username::parse("carol").unwrap()));
        let a = Username::parse("zed").unwrap();
        let b = Username::parse("amy").unwrap();
        assert_eq!(RoomName::direct(&a, &b).unwrap().as_str(), "dm:amy:zed");
        assert!(RoomName::direct(&a, &a).is_none());
    }

    #[test]
    fn bodies_at_their_edges() {
        assert!(MessageBody::parse("x").is_ok());
        assert!(MessageBody::parse("é".repeat(4000)).is_ok());
        assert_eq!(
            MessageBody::parse("é".repeat(4001)),
            Err(NameError::TooLarge("body is longer than 4000 characters"))
        );
        assert!(matches!(
            MessageBody::parse("  "),
            Err(NameError::Invalid(_))
        ));
    }

    #[test]
    fn passwords() {
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse("1234567").is_err());
        assert!(matches!(
            Password::parse("x".repeat(1025)),
            Err(NameError::TooLarge(_))
        ));
        assert_eq!(
            format!("{:?}", Password::parse("secretpw").unwrap()),
            "Password(***)"
        );
    }
}
