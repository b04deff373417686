//! Frame types and their header-level rules (which stream ids, which
//! payload lengths). A leaf module: `error` names these types in its
//! messages and `frame` checks them, so neither imports the other for them.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Hello = 0x01,
    Accept = 0x02,
    Refuse = 0x03,
    Open = 0x10,
    Response = 0x11,
    Data = 0x12,
    End = 0x13,
    Reset = 0x14,
    Window = 0x20,
    Ping = 0x21,
    Pong = 0x22,
    GoAway = 0x23,
}

/// Which stream ids a frame type may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamRule {
    /// Connection frames.
    Zero,
    /// Stream frames.
    NonZero,
    /// WINDOW: 0 is the uplink-level credit, anything else a stream's.
    Any,
}

impl FrameType {
    pub const ALL: [FrameType; 12] = [
        Self::Hello,
        Self::Accept,
        Self::Refuse,
        Self::Open,
        Self::Response,
        Self::Data,
        Self::End,
        Self::Reset,
        Self::Window,
        Self::Ping,
        Self::Pong,
        Self::GoAway,
    ];

    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            0x01 => Self::Hello,
            0x02 => Self::Accept,
            0x03 => Self::Refuse,
            0x10 => Self::Open,
            0x11 => Self::Response,
            0x12 => Self::Data,
            0x13 => Self::End,
            0x14 => Self::Reset,
            0x20 => Self::Window,
            0x21 => Self::Ping,
            0x22 => Self::Pong,
            0x23 => Self::GoAway,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Frames the uplink writer sends ahead of queued stream data, so that a
    /// bulk transfer never delays a heartbeat, a credit grant or an abort.
    /// OPEN, RESPONSE, DATA and END are excluded because their order within a
    /// stream is its content; RESET may overtake them because it discards the
    /// stream anyway.
    pub fn is_control(self) -> bool {
        match self {
            Self::Window
            | Self::Ping
            | Self::Pong
            | Self::GoAway
            | Self::Reset
            | Self::Hello
            | Self::Accept
            | Self::Refuse => true,
            Self::Open | Self::Response | Self::Data | Self::End => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "HELLO",
            Self::Accept => "ACCEPT",
            Self::Refuse => "REFUSE",
            Self::Open => "OPEN",
            Self::Response => "RESPONSE",
            Self::Data => "DATA",
            Self::End => "END",
            Self::Reset => "RESET",
            Self::Window => "WINDOW",
            Self::Ping => "PING",
            Self::Pong => "PONG",
            Self::GoAway => "GOAWAY",
        }
    }

    pub fn stream_rule(self) -> StreamRule {
        match self {
            Self::Open | Self::Response | Self::Data | Self::End | Self::Reset => {
                StreamRule::NonZero
            }
            Self::Hello | Self::Accept | Self::Refuse | Self::Ping | Self::Pong | Self::GoAway => {
                StreamRule::Zero
            }
            Self::Window => StreamRule::Any,
        }
    }

    pub(crate) fn stream_ok(self, stream: u32) -> bool {
        match self.stream_rule() {
            StreamRule::Zero => stream == 0,
            StreamRule::NonZero => stream != 0,
            StreamRule::Any => true,
        }
    }

    /// HELLO and ACCEPT have no frame-level length rule: their typed decoders
    /// check what they read, and ignore trailing bytes for forward
    /// compatibility.
    pub(crate) fn length_ok(self, len: u32) -> bool {
        match self {
            Self::End => len == 0,
            Self::Reset | Self::Window => len == 4,
            Self::Ping | Self::Pong => len == 8,
            Self::GoAway | Self::Refuse => len >= 4,
            Self::Open | Self::Response => len >= 1,
            Self::Data | Self::Hello | Self::Accept => true,
        }
    }

    /// The length rule in words, for error messages.
    pub fn length_rule(self) -> &'static str {
        match self {
            Self::End => "0",
            Self::Reset | Self::Window => "4",
            Self::Ping | Self::Pong => "8",
            Self::GoAway | Self::Refuse => "at least 4",
            Self::Open | Self::Response => "at least 1",
            Self::Data | Self::Hello | Self::Accept => "any",
        }
    }
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
