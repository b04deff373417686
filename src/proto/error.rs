//! Wire error codes (carried by RESET, GOAWAY and REFUSE) and the decoding
//! error type.
//!
//! The two are distinct on purpose: `ErrorCode` is what goes on the wire and
//! must stay stable across versions, while `ProtoError` is a local diagnosis
//! that says exactly which rule a peer broke. `ProtoError::code` is the bridge
//! used when answering a malformed frame with GOAWAY.

use std::fmt;

use super::kind::{FrameType, StreamRule};

/// A u32 error code on the wire.
///
/// Codes this version does not know are kept as `Unknown(n)` rather than
/// rejected, so a newer peer can add codes without breaking older ones; an
/// unknown code is treated like `InternalError` by whoever acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NoError,
    ProtocolError,
    InternalError,
    FlowControlError,
    FrameTooLarge,
    /// Stream limit reached or stream not accepted. The request was not
    /// processed, so it is safe to retry elsewhere.
    RefusedStream,
    /// The requester gave up.
    Cancel,
    /// The agent could not connect to its backend.
    BackendConnect,
    BackendTimeout,
    /// The backend closed or sent garbage mid-response.
    BackendReset,
    AuthFailed,
    SessionTaken,
    BadSession,
    UnsupportedVersion,
    Shutdown,
    Overloaded,
    /// A TCP tunnel port was refused: taken, outside the gateway's range
    /// or the token's scope, or no TCP tunnels are configured.
    PortRefused,
    /// GOAWAY from a cluster node going into drain: reconnect to another
    /// node (the agent opens the replacement before this uplink ends).
    Rehome,
    /// RESET of a forwarded stream by the peer it was forwarded to: the
    /// session has no uplink there (any more). Nothing reached a backend,
    /// so the forwarding node may try another holder.
    NotHere,
    /// A code this version does not define; the number is kept so it can be
    /// logged and forwarded unchanged.
    Unknown(u32),
}

impl ErrorCode {
    /// Never returns `Unknown` for a value that has a named variant, so
    /// `from_u32(c.as_u32()) == c` for every code it produces.
    pub fn from_u32(value: u32) -> Self {
        match value {
            0 => Self::NoError,
            1 => Self::ProtocolError,
            2 => Self::InternalError,
            3 => Self::FlowControlError,
            4 => Self::FrameTooLarge,
            5 => Self::RefusedStream,
            6 => Self::Cancel,
            7 => Self::BackendConnect,
            8 => Self::BackendTimeout,
            9 => Self::BackendReset,
            10 => Self::AuthFailed,
            11 => Self::SessionTaken,
            12 => Self::BadSession,
            13 => Self::UnsupportedVersion,
            14 => Self::Shutdown,
            15 => Self::Overloaded,
            16 => Self::PortRefused,
            17 => Self::Rehome,
            18 => Self::NotHere,
            other => Self::Unknown(other),
        }
    }

    pub fn as_u32(self) -> u32 {
        match self {
            Self::NoError => 0,
            Self::ProtocolError => 1,
            Self::InternalError => 2,
            Self::FlowControlError => 3,
            Self::FrameTooLarge => 4,
            Self::RefusedStream => 5,
            Self::Cancel => 6,
            Self::BackendConnect => 7,
            Self::BackendTimeout => 8,
            Self::BackendReset => 9,
            Self::AuthFailed => 10,
            Self::SessionTaken => 11,
            Self::BadSession => 12,
            Self::UnsupportedVersion => 13,
            Self::Shutdown => 14,
            Self::Overloaded => 15,
            Self::PortRefused => 16,
            Self::Rehome => 17,
            Self::NotHere => 18,
            Self::Unknown(n) => n,
        }
    }

    /// The name used in docs/PROTOCOL.md, for logs and GOAWAY reasons.
    pub fn name(self) -> &'static str {
        match self {
            Self::NoError => "NO_ERROR",
            Self::ProtocolError => "PROTOCOL_ERROR",
            Self::InternalError => "INTERNAL_ERROR",
            Self::FlowControlError => "FLOW_CONTROL_ERROR",
            Self::FrameTooLarge => "FRAME_TOO_LARGE",
            Self::RefusedStream => "REFUSED_STREAM",
            Self::Cancel => "CANCEL",
            Self::BackendConnect => "BACKEND_CONNECT",
            Self::BackendTimeout => "BACKEND_TIMEOUT",
            Self::BackendReset => "BACKEND_RESET",
            Self::AuthFailed => "AUTH_FAILED",
            Self::SessionTaken => "SESSION_TAKEN",
            Self::BadSession => "BAD_SESSION",
            Self::UnsupportedVersion => "UNSUPPORTED_VERSION",
            Self::Shutdown => "SHUTDOWN",
            Self::Overloaded => "OVERLOADED",
            Self::PortRefused => "PORT_REFUSED",
            Self::Rehome => "REHOME",
            Self::NotHere => "NOT_HERE",
            Self::Unknown(_) => "UNKNOWN",
        }
    }

    /// The status the gateway answers a public request with when its stream
    /// is reset before a response head was sent (docs/PROTOCOL.md, "Stream
    /// errors"). Kept here so the mapping lives next to the codes it maps.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BackendTimeout => 504,
            Self::RefusedStream | Self::Overloaded | Self::Shutdown => 503,
            _ => 502,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(n) => write!(f, "UNKNOWN({n})"),
            known => f.write_str(known.name()),
        }
    }
}

/// Why a frame or a typed payload was rejected.
///
/// Every variant is a protocol violation by the peer: the uplink that
/// produced it is answered with GOAWAY(`self.code()`, `self.to_string()`)
/// and closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// The header announced a payload above the decoder's limit.
    FrameTooLarge {
        len: u32,
        max: u32,
    },
    UnknownType(u8),
    /// Flag bits that were not negotiated (none are defined in version 1).
    BadFlags(u8),
    /// The header's reserved u16, or a reserved payload field, is not zero.
    ReservedBits,
    BadStreamId {
        kind: FrameType,
        stream: u32,
    },
    BadLength {
        kind: FrameType,
        len: u32,
    },
    BadMagic,
    UnsupportedVersion(u16),
    BadPayload(&'static str),
    BadSessionName(String),
    ZeroWindowIncrement,
}

impl ProtoError {
    /// The code to put in the GOAWAY (or REFUSE, during the handshake) that
    /// answers this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::BadSessionName(_) => ErrorCode::BadSession,
            Self::UnknownType(_)
            | Self::BadFlags(_)
            | Self::ReservedBits
            | Self::BadStreamId { .. }
            | Self::BadLength { .. }
            | Self::BadMagic
            | Self::BadPayload(_)
            | Self::ZeroWindowIncrement => ErrorCode::ProtocolError,
        }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FrameTooLarge { len, max } => {
                write!(f, "frame payload of {len} bytes exceeds the limit of {max}")
            }
            Self::UnknownType(t) => write!(f, "unknown frame type 0x{t:02x}"),
            Self::BadFlags(flags) => write!(f, "unnegotiated flag bits 0x{flags:02x}"),
            Self::ReservedBits => f.write_str("reserved field is not zero"),
            Self::BadStreamId { kind, stream } => match kind.stream_rule() {
                StreamRule::Zero => write!(f, "{kind} frame on stream {stream} (must be 0)"),
                StreamRule::NonZero => write!(f, "{kind} frame on stream 0"),
                StreamRule::Any => write!(f, "{kind} frame on stream {stream}"),
            },
            Self::BadLength { kind, len } => write!(
                f,
                "{kind} payload of {len} bytes (expected {})",
                kind.length_rule()
            ),
            Self::BadMagic => f.write_str("handshake magic is not \"RTNL\""),
            Self::UnsupportedVersion(v) => write!(
                f,
                "protocol version {v} is not supported (this side speaks {})",
                super::control::PROTOCOL_VERSION
            ),
            Self::BadPayload(what) => f.write_str(what),
            Self::BadSessionName(name) => write!(
                f,
                "invalid session name {name:?} (1 to 63 of [a-z0-9-], no leading or trailing '-')"
            ),
            Self::ZeroWindowIncrement => f.write_str("WINDOW increment of 0"),
        }
    }
}

impl std::error::Error for ProtoError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_table() {
        let table = [
            (0, ErrorCode::NoError, "NO_ERROR"),
            (1, ErrorCode::ProtocolError, "PROTOCOL_ERROR"),
            (2, ErrorCode::InternalError, "INTERNAL_ERROR"),
            (3, ErrorCode::FlowControlError, "FLOW_CONTROL_ERROR"),
            (4, ErrorCode::FrameTooLarge, "FRAME_TOO_LARGE"),
            (5, ErrorCode::RefusedStream, "REFUSED_STREAM"),
            (6, ErrorCode::Cancel, "CANCEL"),
            (7, ErrorCode::BackendConnect, "BACKEND_CONNECT"),
            (8, ErrorCode::BackendTimeout, "BACKEND_TIMEOUT"),
            (9, ErrorCode::BackendReset, "BACKEND_RESET"),
            (10, ErrorCode::AuthFailed, "AUTH_FAILED"),
            (11, ErrorCode::SessionTaken, "SESSION_TAKEN"),
            (12, ErrorCode::BadSession, "BAD_SESSION"),
            (13, ErrorCode::UnsupportedVersion, "UNSUPPORTED_VERSION"),
            (14, ErrorCode::Shutdown, "SHUTDOWN"),
            (15, ErrorCode::Overloaded, "OVERLOADED"),
            (16, ErrorCode::PortRefused, "PORT_REFUSED"),
            (17, ErrorCode::Rehome, "REHOME"),
            (18, ErrorCode::NotHere, "NOT_HERE"),
        ];
        for (n, code, name) in table {
            assert_eq!(ErrorCode::from_u32(n), code);
            assert_eq!(code.as_u32(), n);
            assert_eq!(code.name(), name);
            assert_eq!(code.to_string(), name);
        }
    }

    #[test]
    fn unknown_codes_keep_their_number() {
        for n in [19, 1000, u32::MAX] {
            let code = ErrorCode::from_u32(n);
            assert_eq!(code, ErrorCode::Unknown(n));
            assert_eq!(code.as_u32(), n);
            assert_eq!(code.to_string(), format!("UNKNOWN({n})"));
        }
    }

    #[test]
    fn http_status_mapping() {
        assert_eq!(ErrorCode::BackendConnect.http_status(), 502);
        assert_eq!(ErrorCode::BackendReset.http_status(), 502);
        assert_eq!(ErrorCode::BackendTimeout.http_status(), 504);
        assert_eq!(ErrorCode::RefusedStream.http_status(), 503);
        assert_eq!(ErrorCode::Overloaded.http_status(), 503);
        assert_eq!(ErrorCode::InternalError.http_status(), 502);
        assert_eq!(ErrorCode::Unknown(77).http_status(), 502);
    }

    #[test]
    fn proto_errors_map_to_codes() {
        let cases = [
            (
                ProtoError::FrameTooLarge { len: 9, max: 8 },
                ErrorCode::FrameTooLarge,
            ),
            (ProtoError::BadMagic, ErrorCode::ProtocolError),
            (
                ProtoError::UnsupportedVersion(2),
                ErrorCode::UnsupportedVersion,
            ),
            (
                ProtoError::BadSessionName("X".into()),
                ErrorCode::BadSession,
            ),
            (ProtoError::UnknownType(0), ErrorCode::ProtocolError),
            (ProtoError::BadFlags(1), ErrorCode::ProtocolError),
            (ProtoError::ReservedBits, ErrorCode::ProtocolError),
            (
                ProtoError::BadStreamId {
                    kind: FrameType::Data,
                    stream: 0,
                },
                ErrorCode::ProtocolError,
            ),
            (
                ProtoError::BadLength {
                    kind: FrameType::End,
                    len: 1,
                },
                ErrorCode::ProtocolError,
            ),
            (ProtoError::BadPayload("x"), ErrorCode::ProtocolError),
            (ProtoError::ZeroWindowIncrement, ErrorCode::ProtocolError),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn messages_name_the_broken_rule() {
        let e = ProtoError::BadStreamId {
            kind: FrameType::Ping,
            stream: 3,
        };
        assert_eq!(e.to_string(), "PING frame on stream 3 (must be 0)");
        let e = ProtoError::BadLength {
            kind: FrameType::Reset,
            len: 2,
        };
        assert_eq!(e.to_string(), "RESET payload of 2 bytes (expected 4)");
    }
}
