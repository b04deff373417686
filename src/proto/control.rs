//! Typed payloads of the handshake and connection frames: HELLO, ACCEPT,
//! REFUSE and GOAWAY (the WINDOW, RESET and PING accessors live beside the
//! frame in `frame.rs`, being one fixed-size field each).
//!
//! Forward compatibility rests on two habits: magic and version sit at fixed
//! offsets that no later version may move, so a peer of another version is
//! told `UnsupportedVersion` rather than a confusing length error; and bytes
//! after the fields this version knows are ignored, so a later version can
//! append fields without breaking older peers.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{ErrorCode, ProtoError};
use super::frame::{Frame, FrameType, MAX_FRAME_CEILING};
use super::tcp::{put_ports, CAP_TCP, MAX_TCP_TUNNELS};

pub const PROTOCOL_VERSION: u16 = 1;

/// Capability bit: the agent can read the gateway's public endpoint, and
/// (in ACCEPT) the endpoint follows the capabilities field.
pub const CAP_PUBLIC_URL: u32 = 0x0000_0002;
/// Capability bit: the agent can keep uplinks on several nodes of a
/// cluster (`--nodes K`); in ACCEPT, the cluster's ready nodes follow the
/// public endpoint (`Accept::nodes`).
pub const CAP_CLUSTER: u32 = 0x0000_0004;
/// HELLO only: this connection is a peer link from another gateway node
/// of the cluster, not an agent's uplink. Its `session` is the dialing
/// node's name and its `token` the cluster secret; the gateway that
/// accepts it opens no session and serves the streams it carries by
/// relaying them to its own uplinks (`cluster::peer`).
pub const CAP_PEER: u32 = 0x0000_0008;
/// At most this many nodes travel in one ACCEPT.
pub const MAX_ACCEPT_NODES: usize = 64;
pub const MAGIC: [u8; 4] = *b"RTNL";

/// Longest session name: a DNS label, so `<session>.<domain>` stays a
/// valid host name.
pub const MAX_SESSION_NAME: usize = 63;

/// The smallest `max_frame` an ACCEPT may announce, and the limit on every
/// frame before ACCEPT (when neither side knows the other's limit). Request
/// and response heads travel in one OPEN or RESPONSE frame, so this must
/// cover the HTTP head limit (64 KiB by default).
pub const MIN_MAX_FRAME: u32 = 64 * 1024;

/// GOAWAY and REFUSE reasons are cut to this many bytes (at a character
/// boundary) when encoded, so that a verbose error message can never make a
/// frame the peer rejects as too large.
pub const MAX_REASON_LEN: usize = 1024;

/// 1 to 63 of `[a-z0-9-]`, not starting or ending with `-`.
pub fn valid_session_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    bytes.len() <= MAX_SESSION_NAME
        && first != b'-'
        && last != b'-'
        && bytes
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// First frame on every uplink, agent -> gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// Bit flags the agent supports; none are defined in version 1.
    pub capabilities: u32,
    /// Random per agent process; groups the uplinks of one agent.
    pub agent_id: u64,
    pub uplink_index: u16,
    pub uplinks_total: u16,
    pub token: String,
    pub session: String,
    /// TCP tunnel ports asked for (0: any free one), present on the wire
    /// only with `CAP_TCP` in `capabilities` (see `tcp.rs`).
    pub tcp: Vec<u16>,
}

impl Hello {
    /// magic, version, capabilities, agent_id, uplink_index, uplinks_total.
    const FIXED_LEN: usize = 4 + 2 + 4 + 8 + 2 + 2;

    /// What the agent should check once, at start-up, so that encoding
    /// cannot panic later.
    pub fn validate(&self) -> Result<(), ProtoError> {
        // Before ACCEPT nobody knows the peer's limit beyond the floor every
        // peer must accept, so the whole HELLO has to fit that floor.
        if self.encoded_len() > MIN_MAX_FRAME as usize {
            return Err(ProtoError::BadPayload("HELLO longer than 64 KiB"));
        }
        if !valid_session_name(&self.session) {
            return Err(ProtoError::BadSessionName(self.session.clone()));
        }
        if self.uplink_index >= self.uplinks_total {
            return Err(ProtoError::BadPayload(
                "HELLO uplink_index is not below uplinks_total",
            ));
        }
        if self.tcp.len() > MAX_TCP_TUNNELS
            || (!self.tcp.is_empty() && self.capabilities & CAP_TCP == 0)
        {
            return Err(ProtoError::BadPayload(
                "HELLO TCP ports without CAP_TCP, or more than 64",
            ));
        }
        Ok(())
    }

    pub fn encoded_len(&self) -> usize {
        let tcp = if self.capabilities & CAP_TCP != 0 {
            2 + 2 * self.tcp.len()
        } else {
            0
        };
        Self::FIXED_LEN + 2 + self.token.len() + 2 + self.session.len() + tcp
    }

    /// # Panics
    /// If the token or the session name is longer than 65535 bytes, which
    /// `validate` rejects (its limit on the whole HELLO is lower).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(self.encoded_len());
        dst.put_slice(&MAGIC);
        dst.put_u16(self.version);
        dst.put_u32(self.capabilities);
        dst.put_u64(self.agent_id);
        dst.put_u16(self.uplink_index);
        dst.put_u16(self.uplinks_total);
        put_str16(dst, &self.token);
        put_str16(dst, &self.session);
        if self.capabilities & CAP_TCP != 0 {
            put_ports(dst, &self.tcp);
        }
    }

    /// Checks magic, then version, before anything else, so a peer of
    /// another version gets `UnsupportedVersion` whatever its layout.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(FrameType::Hello, payload);
        if r.array::<4>()? != MAGIC {
            return Err(ProtoError::BadMagic);
        }
        let version = r.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion(version));
        }
        let capabilities = r.u32()?;
        let agent_id = r.u64()?;
        let uplink_index = r.u16()?;
        let uplinks_total = r.u16()?;
        let token = r.str16()?;
        let token = std::str::from_utf8(token)
            .map_err(|_| ProtoError::BadPayload("HELLO token is not UTF-8"))?
            .to_owned();
        let session = r.str16()?;
        let session = match std::str::from_utf8(session) {
            Ok(s) if valid_session_name(s) => s.to_owned(),
            _ => {
                return Err(ProtoError::BadSessionName(
                    String::from_utf8_lossy(session).into_owned(),
                ))
            }
        };
        let tcp = if capabilities & CAP_TCP != 0 {
            r.ports()?
        } else {
            Vec::new()
        };
        // Trailing bytes: fields of a later minor revision, ignored.
        let hello = Self {
            version,
            capabilities,
            agent_id,
            uplink_index,
            uplinks_total,
            token,
            session,
            tcp,
        };
        hello.validate()?;
        Ok(hello)
    }
}

/// The gateway's answer to a valid HELLO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub version: u16,
    pub gateway_cores: u16,
    /// Index of the gateway core that owns this uplink.
    pub core: u16,
    /// Largest payload either side may send on this uplink.
    pub max_frame: u32,
    /// Initial per-stream credit, in each direction.
    pub stream_window: u32,
    /// Initial per-uplink credit, in each direction.
    pub conn_window: u32,
    /// Concurrent streams per uplink.
    pub max_streams: u32,
    /// Capability bits the gateway enabled on this uplink (a subset of the
    /// HELLO's). Appended after `max_streams`; absent (an older gateway)
    /// reads as 0. The optional parts follow in bit order: `CAP_TCP`'s
    /// ports, then `CAP_PUBLIC_URL`'s endpoint.
    pub capabilities: u32,
    /// With `CAP_TCP`: the public port granted for each port of the HELLO,
    /// in the same order.
    pub tcp: Vec<u16>,
    /// With `CAP_PUBLIC_URL`: where the public reaches this gateway's
    /// sessions, so the agent can print its URL.
    pub public: Option<PublicEndpoint>,
    /// With `CAP_CLUSTER`: the cluster's ready nodes (this one included),
    /// at most `MAX_ACCEPT_NODES`, for the agent's rendezvous choice.
    pub nodes: Vec<AcceptNode>,
}

/// One cluster node as an agent sees it in ACCEPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptNode {
    /// The node's name (a session-name shape, <= 63 bytes).
    pub name: String,
    /// Its tunnel address as `host:port` text, at most 255 bytes.
    pub tunnel: String,
}

/// The gateway's public HTTP endpoint as clients should type it: a
/// session NAME is served at `scheme://NAME.domain:port/`, or, with no
/// domain, at any Host `NAME` (the gateway routes by Host alone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicEndpoint {
    /// "http" or "https"; at most 255 bytes.
    pub scheme: String,
    /// `--domain`, empty when the gateway has none.
    pub domain: String,
    pub port: u16,
}

impl PublicEndpoint {
    /// The URL of `session`, when the gateway has a domain; without one
    /// only a Host header (or `--default-session`) reaches it.
    pub fn url_for(&self, session: &str) -> Option<String> {
        if self.domain.is_empty() {
            return None;
        }
        let default_port = matches!(
            (self.scheme.as_str(), self.port),
            ("http", 80) | ("https", 443)
        );
        Some(if default_port {
            format!("{}://{session}.{}", self.scheme, self.domain)
        } else {
            format!("{}://{session}.{}:{}", self.scheme, self.domain, self.port)
        })
    }
}

impl Accept {
    /// version, gateway_cores, core, reserved, then four u32: the layout of
    /// the first revision, which every ACCEPT starts with.
    pub const BASE_LEN: usize = 2 + 2 + 2 + 2 + 4 * 4;

    pub fn encoded_len(&self) -> usize {
        let tcp = if self.capabilities & CAP_TCP != 0 {
            2 + 2 * self.tcp.len()
        } else {
            0
        };
        let public = self
            .public
            .as_ref()
            .map_or(0, |p| 2 + 1 + p.scheme.len() + 2 + p.domain.len());
        let nodes = if self.capabilities & CAP_CLUSTER != 0 {
            1 + self
                .nodes
                .iter()
                .map(|n| 2 + n.name.len() + n.tunnel.len())
                .sum::<usize>()
        } else {
            0
        };
        Self::BASE_LEN + 4 + tcp + public + nodes
    }

    /// What the gateway should check once, at start-up: an agent refuses an
    /// ACCEPT that fails this.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if self.gateway_cores == 0 || self.core >= self.gateway_cores {
            return Err(ProtoError::BadPayload(
                "ACCEPT core is not below gateway_cores",
            ));
        }
        if !(MIN_MAX_FRAME..=MAX_FRAME_CEILING).contains(&self.max_frame) {
            return Err(ProtoError::BadPayload(
                "ACCEPT max_frame outside 64 KiB..=16 MiB",
            ));
        }
        if self.public.is_some() != (self.capabilities & CAP_PUBLIC_URL != 0) {
            return Err(ProtoError::BadPayload(
                "ACCEPT public endpoint without CAP_PUBLIC_URL, or the reverse",
            ));
        }
        if self.capabilities & CAP_CLUSTER == 0 && !self.nodes.is_empty() {
            return Err(ProtoError::BadPayload("ACCEPT nodes without CAP_CLUSTER"));
        }
        if self.nodes.len() > MAX_ACCEPT_NODES {
            return Err(ProtoError::BadPayload("ACCEPT lists more than 64 nodes"));
        }
        for n in &self.nodes {
            if !valid_session_name(&n.name) || n.tunnel.is_empty() || n.tunnel.len() > 255 {
                return Err(ProtoError::BadPayload(
                    "ACCEPT node with a bad name or tunnel address",
                ));
            }
        }
        if let Some(p) = &self.public {
            if p.scheme.is_empty() || p.scheme.len() > 255 {
                return Err(ProtoError::BadPayload(
                    "ACCEPT public scheme empty or longer than 255 bytes",
                ));
            }
            if p.domain.len() > 255 {
                return Err(ProtoError::BadPayload(
                    "ACCEPT public domain longer than 255 bytes",
                ));
            }
        }
        Ok(())
    }

    /// # Panics
    /// If `public` breaks the length rules `validate` checks.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(self.encoded_len());
        dst.put_u16(self.version);
        dst.put_u16(self.gateway_cores);
        dst.put_u16(self.core);
        dst.put_u16(0);
        dst.put_u32(self.max_frame);
        dst.put_u32(self.stream_window);
        dst.put_u32(self.conn_window);
        dst.put_u32(self.max_streams);
        dst.put_u32(self.capabilities);
        if self.capabilities & CAP_TCP != 0 {
            put_ports(dst, &self.tcp);
        }
        if let Some(p) = &self.public {
            dst.put_u16(p.port);
            let len = u8::try_from(p.scheme.len()).expect("scheme longer than 255 bytes");
            dst.put_u8(len);
            dst.put_slice(p.scheme.as_bytes());
            put_str16(dst, &p.domain);
        }
        if self.capabilities & CAP_CLUSTER != 0 {
            let n = u8::try_from(self.nodes.len()).expect("more than 255 nodes");
            dst.put_u8(n);
            for node in &self.nodes {
                for text in [&node.name, &node.tunnel] {
                    let len = u8::try_from(text.len()).expect("node field over 255 bytes");
                    dst.put_u8(len);
                    dst.put_slice(text.as_bytes());
                }
            }
        }
    }

    pub fn decode(payload: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(FrameType::Accept, payload);
        let version = r.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion(version));
        }
        let gateway_cores = r.u16()?;
        let core = r.u16()?;
        if r.u16()? != 0 {
            return Err(ProtoError::ReservedBits);
        }
        let mut accept = Self {
            version,
            gateway_cores,
            core,
            max_frame: r.u32()?,
            stream_window: r.u32()?,
            conn_window: r.u32()?,
            max_streams: r.u32()?,
            capabilities: 0,
            tcp: Vec::new(),
            public: None,
            nodes: Vec::new(),
        };
        // A gateway without capabilities ends here.
        if !r.rest.is_empty() {
            accept.capabilities = r.u32()?;
        }
        if accept.capabilities & CAP_TCP != 0 {
            accept.tcp = r.ports()?;
        }
        if accept.capabilities & CAP_PUBLIC_URL != 0 {
            let port = r.u16()?;
            let scheme_len = r.array::<1>()?[0];
            let scheme = r.bytes(usize::from(scheme_len))?;
            let domain = r.str16()?;
            let text = |b: &[u8]| {
                std::str::from_utf8(b)
                    .map(str::to_owned)
                    .map_err(|_| ProtoError::BadPayload("ACCEPT public endpoint is not UTF-8"))
            };
            accept.public = Some(PublicEndpoint {
                scheme: text(scheme)?,
                domain: text(domain)?,
                port,
            });
        }
        if accept.capabilities & CAP_CLUSTER != 0 {
            let n = r.array::<1>()?[0];
            for _ in 0..n {
                let mut field = || -> Result<String, ProtoError> {
                    let len = r.array::<1>()?[0];
                    let b = r.bytes(usize::from(len))?;
                    std::str::from_utf8(b)
                        .map(str::to_owned)
                        .map_err(|_| ProtoError::BadPayload("ACCEPT node is not UTF-8"))
                };
                let name = field()?;
                let tunnel = field()?;
                accept.nodes.push(AcceptNode { name, tunnel });
            }
        }
        accept.validate()?;
        Ok(accept)
    }
}

impl Frame {
    /// `reason` is cut to `MAX_REASON_LEN` bytes.
    pub fn goaway(code: ErrorCode, reason: &str) -> Self {
        Self::new(FrameType::GoAway, 0, code_and_reason(code, reason))
    }

    /// `reason` is cut to `MAX_REASON_LEN` bytes.
    pub fn refuse(code: ErrorCode, reason: &str) -> Self {
        Self::new(FrameType::Refuse, 0, code_and_reason(code, reason))
    }

    /// # Panics
    /// As `Hello::encode`.
    pub fn hello(hello: &Hello) -> Self {
        let mut buf = BytesMut::with_capacity(hello.encoded_len());
        hello.encode(&mut buf);
        Self::new(FrameType::Hello, 0, buf.freeze())
    }

    pub fn accept(accept: &Accept) -> Self {
        let mut buf = BytesMut::with_capacity(accept.encoded_len());
        accept.encode(&mut buf);
        Self::new(FrameType::Accept, 0, buf.freeze())
    }

    /// The code and reason of a GOAWAY. (Named `parse_*` because `goaway`
    /// is the constructor.)
    pub fn parse_goaway(&self) -> Result<(ErrorCode, String), ProtoError> {
        self.expect_kind(&[FrameType::GoAway])?;
        parse_code_and_reason(self)
    }

    /// The code and reason of a REFUSE.
    pub fn parse_refuse(&self) -> Result<(ErrorCode, String), ProtoError> {
        self.expect_kind(&[FrameType::Refuse])?;
        parse_code_and_reason(self)
    }

    pub fn parse_hello(&self) -> Result<Hello, ProtoError> {
        self.expect_kind(&[FrameType::Hello])?;
        Hello::decode(&self.payload)
    }

    pub fn parse_accept(&self) -> Result<Accept, ProtoError> {
        self.expect_kind(&[FrameType::Accept])?;
        Accept::decode(&self.payload)
    }
}

fn code_and_reason(code: ErrorCode, reason: &str) -> Bytes {
    let reason = truncate_at_char(reason, MAX_REASON_LEN);
    let mut buf = BytesMut::with_capacity(4 + reason.len());
    buf.put_u32(code.as_u32());
    buf.put_slice(reason.as_bytes());
    buf.freeze()
}

/// The reason is for humans and logs, so invalid UTF-8 is replaced rather
/// than rejected: a garbled reason must not hide the code.
fn parse_code_and_reason(frame: &Frame) -> Result<(ErrorCode, String), ProtoError> {
    let mut r = Reader::new(frame.kind, &frame.payload);
    let code = ErrorCode::from_u32(r.u32()?);
    let reason = String::from_utf8_lossy(r.rest()).into_owned();
    Ok((code, reason))
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str16(dst: &mut BytesMut, s: &str) {
    let len = u16::try_from(s.len()).expect("string field longer than 65535 bytes");
    dst.put_u16(len);
    dst.put_slice(s.as_bytes());
}

/// Bounds-checked big-endian reads; running out of bytes is `BadLength` of
/// the whole payload, which is what a peer needs to see in the GOAWAY.
struct Reader<'a> {
    kind: FrameType,
    whole: usize,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(kind: FrameType, payload: &'a [u8]) -> Self {
        Self {
            kind,
            whole: payload.len(),
            rest: payload,
        }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.rest.len() < n {
            return Err(ProtoError::BadLength {
                kind: self.kind,
                len: u32::try_from(self.whole).unwrap_or(u32::MAX),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A u16 length followed by that many bytes.
    fn str16(&mut self) -> Result<&'a [u8], ProtoError> {
        let len = self.u16()?;
        self.bytes(usize::from(len))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// A TCP port list (`tcp.rs`): count u16, then that many u16, at most
    /// `MAX_TCP_TUNNELS`.
    fn ports(&mut self) -> Result<Vec<u16>, ProtoError> {
        let n = usize::from(self.u16()?);
        if n > MAX_TCP_TUNNELS {
            return Err(ProtoError::BadPayload("more than 64 TCP ports"));
        }
        (0..n).map(|_| self.u16()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{encode, Decoder};
    use crate::proto::test_rng::XorShift;
    use crate::proto::{DEFAULT_CONN_WINDOW, DEFAULT_MAX_STREAMS, DEFAULT_STREAM_WINDOW};

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            capabilities: 0,
            agent_id: 42,
            uplink_index: 0,
            uplinks_total: 2,
            token: "secret".into(),
            session: "demo".into(),
            tcp: Vec::new(),
        }
    }

    fn accept() -> Accept {
        Accept {
            version: PROTOCOL_VERSION,
            gateway_cores: 2,
            core: 1,
            max_frame: 256 * 1024,
            stream_window: DEFAULT_STREAM_WINDOW,
            conn_window: DEFAULT_CONN_WINDOW,
            max_streams: DEFAULT_MAX_STREAMS,
            capabilities: CAP_PUBLIC_URL,
            tcp: Vec::new(),
            public: Some(PublicEndpoint {
                scheme: "http".into(),
                domain: "tunnel.example.com".into(),
                port: 8080,
            }),
            nodes: Vec::new(),
        }
    }

    /// An ACCEPT without capabilities.
    fn base_accept() -> Accept {
        Accept {
            capabilities: 0,
            public: None,
            ..accept()
        }
    }

    fn hello_bytes(h: &Hello) -> Vec<u8> {
        let mut buf = BytesMut::new();
        h.encode(&mut buf);
        assert_eq!(buf.len(), h.encoded_len());
        buf.to_vec()
    }

    fn accept_bytes(a: &Accept) -> Vec<u8> {
        let mut buf = BytesMut::new();
        a.encode(&mut buf);
        assert_eq!(buf.len(), a.encoded_len());
        buf.to_vec()
    }

    /// Through the whole codec, not just the payload parser.
    fn over_the_wire(frame: &Frame) -> Frame {
        let mut buf = BytesMut::new();
        encode(frame, &mut buf);
        let out = Decoder::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        out
    }

    fn random_session(rng: &mut XorShift) -> String {
        const EDGE: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        const INNER: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
        let len = 1 + rng.below(MAX_SESSION_NAME);
        (0..len)
            .map(|i| {
                let set = if i == 0 || i == len - 1 { EDGE } else { INNER };
                char::from(*rng.pick(set))
            })
            .collect()
    }

    fn random_ports(rng: &mut XorShift, caps: u32) -> Vec<u16> {
        if caps & CAP_TCP == 0 {
            return Vec::new();
        }
        (0..rng.below(MAX_TCP_TUNNELS + 1))
            .map(|_| rng.next_u32() as u16)
            .collect()
    }

    fn random_text(rng: &mut XorShift, max_chars: usize) -> String {
        const CHARS: &[char] = &['a', 'Z', '0', ' ', '-', 'é', 'ß', '€', '日', '🦀', '\0'];
        (0..rng.below(max_chars + 1))
            .map(|_| *rng.pick(CHARS))
            .collect()
    }

    #[test]
    fn session_names() {
        for good in ["a", "demo", "my-app-2", "0", "a-b", &"x".repeat(63)] {
            assert!(valid_session_name(good), "{good:?}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "-",
            "Demo",
            "de mo",
            "de.mo",
            "de_mo",
            "démo",
            &"x".repeat(64),
        ] {
            assert!(!valid_session_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn random_hellos_round_trip() {
        let mut rng = XorShift::new(1);
        for _ in 0..2_000 {
            let total = 1 + rng.below(usize::from(u16::MAX)) as u16;
            let h = Hello {
                version: PROTOCOL_VERSION,
                capabilities: rng.next_u32(),
                agent_id: rng.next_u64(),
                uplink_index: rng.below(usize::from(total)) as u16,
                uplinks_total: total,
                token: random_text(&mut rng, 40),
                session: random_session(&mut rng),
                tcp: Vec::new(),
            };
            let h = Hello {
                tcp: random_ports(&mut rng, h.capabilities),
                ..h
            };
            assert_eq!(h.validate(), Ok(()));
            assert_eq!(Hello::decode(&hello_bytes(&h)), Ok(h.clone()));
            assert_eq!(over_the_wire(&Frame::hello(&h)).parse_hello(), Ok(h));
        }
    }

    #[test]
    fn random_accepts_round_trip() {
        let mut rng = XorShift::new(2);
        for _ in 0..2_000 {
            let cores = 1 + rng.below(usize::from(u16::MAX)) as u16;
            let a = Accept {
                version: PROTOCOL_VERSION,
                gateway_cores: cores,
                core: rng.below(usize::from(cores)) as u16,
                max_frame: MIN_MAX_FRAME
                    + rng.below((MAX_FRAME_CEILING - MIN_MAX_FRAME + 1) as usize) as u32,
                stream_window: rng.next_u32(),
                conn_window: rng.next_u32(),
                max_streams: rng.next_u32(),
                capabilities: rng.next_u32(),
                tcp: Vec::new(),
                public: None,
                nodes: Vec::new(),
            };
            let a = Accept {
                tcp: random_ports(&mut rng, a.capabilities),
                ..a
            };
            // Nodes whenever CAP_CLUSTER came up.
            let nodes = if a.capabilities & CAP_CLUSTER != 0 {
                (0..rng.below(MAX_ACCEPT_NODES + 1))
                    .map(|i| AcceptNode {
                        name: format!("gw-{i}-{}", rng.below(100_000)),
                        tunnel: format!("10.0.0.{}:{}", rng.below(256), rng.next_u32() as u16),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let a = Accept { nodes, ..a };
            // Half of them with a public endpoint.
            let a = if rng.below(2) == 0 {
                Accept {
                    capabilities: a.capabilities & !CAP_PUBLIC_URL,
                    ..a
                }
            } else {
                Accept {
                    capabilities: a.capabilities | CAP_PUBLIC_URL,
                    public: Some(PublicEndpoint {
                        scheme: random_text(&mut rng, 8).replace('\0', "s") + "h",
                        domain: random_text(&mut rng, 60),
                        port: rng.next_u32() as u16,
                    }),
                    ..a
                }
            };
            assert_eq!(a.validate(), Ok(()));
            assert_eq!(Accept::decode(&accept_bytes(&a)), Ok(a.clone()));
            assert_eq!(over_the_wire(&Frame::accept(&a)).parse_accept(), Ok(a));
        }
    }

    #[test]
    fn goaway_and_refuse_round_trip() {
        let mut rng = XorShift::new(3);
        for _ in 0..1_000 {
            let code = ErrorCode::from_u32(rng.next_u32() % 20);
            let reason = random_text(&mut rng, 100);
            let g = over_the_wire(&Frame::goaway(code, &reason));
            assert_eq!(g.parse_goaway(), Ok((code, reason.clone())));
            let r = over_the_wire(&Frame::refuse(code, &reason));
            assert_eq!(r.parse_refuse(), Ok((code, reason)));
        }
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN); // two bytes each
        let frame = Frame::goaway(ErrorCode::InternalError, &reason);
        assert_eq!(frame.payload.len(), 4 + MAX_REASON_LEN);
        let (_, got) = frame.parse_goaway().unwrap();
        assert_eq!(got, "é".repeat(MAX_REASON_LEN / 2));

        let odd = format!("a{}", "é".repeat(MAX_REASON_LEN));
        let (_, got) = Frame::refuse(ErrorCode::AuthFailed, &odd)
            .parse_refuse()
            .unwrap();
        assert_eq!(got.len(), MAX_REASON_LEN - 1);
        assert!(odd.starts_with(&got));
    }

    #[test]
    fn invalid_utf8_reason_is_replaced_not_rejected() {
        let payload = Bytes::from_static(&[0, 0, 0, 14, b'o', 0xff, b'k']);
        let frame = Frame::new(FrameType::GoAway, 0, payload);
        assert_eq!(
            frame.parse_goaway(),
            Ok((ErrorCode::Shutdown, "o\u{fffd}k".to_owned()))
        );
    }

    #[test]
    fn hello_trailing_bytes_are_ignored() {
        let mut bytes = hello_bytes(&hello());
        bytes.extend_from_slice(b"fields from a later revision");
        assert_eq!(Hello::decode(&bytes), Ok(hello()));
    }

    #[test]
    fn accept_trailing_bytes_are_ignored() {
        let mut bytes = accept_bytes(&accept());
        bytes.extend_from_slice(&[0xff; 9]);
        assert_eq!(Accept::decode(&bytes), Ok(accept()));
        let tcp = Accept {
            capabilities: CAP_TCP | CAP_PUBLIC_URL,
            tcp: vec![20000, 20022],
            ..accept()
        };
        let mut bytes = accept_bytes(&tcp);
        bytes.extend_from_slice(&[0xff; 9]);
        assert_eq!(Accept::decode(&bytes), Ok(tcp));
    }

    #[test]
    fn tcp_ports_travel_only_with_the_capability() {
        // An older gateway's ACCEPT (no capabilities field) enables nothing.
        let bytes = accept_bytes(&accept());
        assert_eq!(
            Accept::decode(&bytes[..Accept::BASE_LEN]),
            Ok(base_accept())
        );
        // HELLO: the list follows the session with CAP_TCP, else nothing
        // does (and a list without the bit is refused before encoding).
        let h = Hello {
            capabilities: CAP_TCP,
            tcp: vec![0, 20022],
            ..hello()
        };
        let bytes = hello_bytes(&h);
        assert_eq!(&bytes[bytes.len() - 6..], &[0, 2, 0, 0, 0x4e, 0x36]);
        assert_eq!(Hello::decode(&bytes), Ok(h.clone()));
        // An older gateway reading it ignores the list as trailing bytes;
        // this one refuses a truncated list.
        for cut in bytes.len() - 5..bytes.len() {
            assert!(matches!(
                Hello::decode(&bytes[..cut]),
                Err(ProtoError::BadLength { .. })
            ));
        }
        let no_cap = Hello {
            capabilities: 0,
            ..h.clone()
        };
        assert!(no_cap.validate().is_err());
        let too_many = Hello {
            tcp: vec![0; MAX_TCP_TUNNELS + 1],
            ..h
        };
        assert!(too_many.validate().is_err());
        let mut bytes = hello_bytes(&hello());
        bytes[9] = 1; // capabilities = CAP_TCP
        bytes.extend_from_slice(&[0, 65]);
        assert!(matches!(
            Hello::decode(&bytes),
            Err(ProtoError::BadPayload(_))
        ));
    }

    #[test]
    fn accept_without_capabilities_has_no_public_endpoint() {
        let bytes = accept_bytes(&base_accept());
        assert_eq!(bytes.len(), Accept::BASE_LEN + 4);
        assert_eq!(Accept::decode(&bytes), Ok(base_accept()));
        // A gateway that predates capabilities sends the first 24 bytes.
        assert_eq!(
            Accept::decode(&bytes[..Accept::BASE_LEN]),
            Ok(base_accept())
        );
        // The extended one starts with the same 24 bytes, so an agent that
        // knows no capability reads it as before and ignores the rest.
        let extended = accept_bytes(&accept());
        assert_eq!(extended[..Accept::BASE_LEN], bytes[..Accept::BASE_LEN]);
        // Pinned layout: capabilities, port, scheme (u8 length), domain.
        assert_eq!(
            &extended[Accept::BASE_LEN..Accept::BASE_LEN + 10],
            &[0, 0, 0, 2, 0x1f, 0x90, 4, b'h', b't', b't']
        );
        // The bit and the field go together.
        for a in [
            Accept {
                capabilities: 0,
                ..accept()
            },
            Accept {
                public: None,
                ..accept()
            },
        ] {
            assert!(matches!(a.validate(), Err(ProtoError::BadPayload(_))));
        }
    }

    /// The example of docs/PROTOCOL.md, section 13.
    #[test]
    fn documented_public_endpoint_bytes() {
        let a = Accept {
            public: Some(PublicEndpoint {
                scheme: "http".into(),
                domain: "t.example.com".into(),
                port: 8080,
            }),
            ..accept()
        };
        let bytes = accept_bytes(&a);
        assert_eq!(bytes.len(), 50);
        let mut want = vec![0, 0, 0, 2, 0x1f, 0x90, 4];
        want.extend_from_slice(b"http");
        want.extend_from_slice(&[0, 13]);
        want.extend_from_slice(b"t.example.com");
        assert_eq!(&bytes[Accept::BASE_LEN..], &want[..]);
    }

    #[test]
    fn public_urls() {
        let mut p = accept().public.unwrap();
        assert_eq!(
            p.url_for("myapp").as_deref(),
            Some("http://myapp.tunnel.example.com:8080")
        );
        p.port = 80;
        assert_eq!(
            p.url_for("myapp").as_deref(),
            Some("http://myapp.tunnel.example.com")
        );
        p.domain.clear();
        assert_eq!(p.url_for("myapp"), None);
    }

    #[test]
    fn hello_magic_and_version_come_first() {
        let mut bytes = hello_bytes(&hello());
        bytes[0] = b'X';
        assert_eq!(Hello::decode(&bytes), Err(ProtoError::BadMagic));

        let mut bytes = hello_bytes(&hello());
        bytes[4..6].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            Hello::decode(&bytes),
            Err(ProtoError::UnsupportedVersion(2))
        );
        // A later version may change everything after the version field.
        assert_eq!(
            Hello::decode(&bytes[..6]),
            Err(ProtoError::UnsupportedVersion(2))
        );
        bytes[4..6].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            Hello::decode(&bytes),
            Err(ProtoError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn every_truncated_hello_is_bad_length() {
        let bytes = hello_bytes(&hello());
        for cut in 0..bytes.len() {
            assert_eq!(
                Hello::decode(&bytes[..cut]),
                Err(ProtoError::BadLength {
                    kind: FrameType::Hello,
                    len: cut as u32
                }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_truncated_accept_is_bad_length() {
        let a = Accept {
            capabilities: CAP_TCP | CAP_PUBLIC_URL,
            tcp: vec![20000],
            ..accept()
        };
        let bytes = accept_bytes(&a);
        // A cut right after the first revision's fields is that revision.
        for cut in (0..bytes.len()).filter(|&c| c != Accept::BASE_LEN) {
            assert_eq!(
                Accept::decode(&bytes[..cut]),
                Err(ProtoError::BadLength {
                    kind: FrameType::Accept,
                    len: cut as u32
                }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn hello_field_errors() {
        let bad_session = |session: &str| {
            let h = Hello {
                session: session.into(),
                ..hello()
            };
            Hello::decode(&hello_bytes(&h))
        };
        for name in ["", "Demo", "-x", "x-", "a.b", &"a".repeat(64)] {
            assert_eq!(
                bad_session(name),
                Err(ProtoError::BadSessionName(name.to_owned()))
            );
        }

        // The session is the last field: swap its bytes for invalid UTF-8.
        let mut bytes = hello_bytes(&hello());
        let n = bytes.len();
        bytes[n - 1] = 0xff;
        assert_eq!(
            Hello::decode(&bytes),
            Err(ProtoError::BadSessionName("dem\u{fffd}".into()))
        );

        // Token "secret" starts after the fixed part and its length field.
        let mut bytes = hello_bytes(&hello());
        bytes[Hello::FIXED_LEN + 2] = 0xc3;
        assert!(matches!(
            Hello::decode(&bytes),
            Err(ProtoError::BadPayload(_))
        ));

        for (index, total) in [(0, 0), (2, 2), (u16::MAX, 1)] {
            let h = Hello {
                uplink_index: index,
                uplinks_total: total,
                ..hello()
            };
            assert!(matches!(
                Hello::decode(&hello_bytes(&h)),
                Err(ProtoError::BadPayload(_))
            ));
        }
    }

    #[test]
    fn hello_must_fit_the_handshake_limit() {
        // 64 KiB minus the fixed part, two length fields and "demo".
        let longest = MIN_MAX_FRAME as usize - Hello::FIXED_LEN - 2 - 2 - 4;
        let max = Hello {
            token: "t".repeat(longest),
            ..hello()
        };
        assert_eq!(max.validate(), Ok(()));
        assert_eq!(Frame::hello(&max).payload.len(), MIN_MAX_FRAME as usize);
        assert_eq!(over_the_wire(&Frame::hello(&max)).parse_hello(), Ok(max));

        let over = Hello {
            token: "t".repeat(longest + 1),
            ..hello()
        };
        assert!(matches!(over.validate(), Err(ProtoError::BadPayload(_))));
        // Encodable, but the gateway refuses it.
        assert!(matches!(
            Frame::hello(&over).parse_hello(),
            Err(ProtoError::BadPayload(_))
        ));
    }

    #[test]
    fn accept_field_errors() {
        let mut bytes = accept_bytes(&accept());
        bytes[0..2].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(
            Accept::decode(&bytes),
            Err(ProtoError::UnsupportedVersion(9))
        );
        assert_eq!(
            Accept::decode(&bytes[..2]),
            Err(ProtoError::UnsupportedVersion(9))
        );

        let mut bytes = accept_bytes(&accept());
        bytes[7] = 1;
        assert_eq!(Accept::decode(&bytes), Err(ProtoError::ReservedBits));

        let broken = [
            Accept {
                gateway_cores: 0,
                core: 0,
                ..accept()
            },
            Accept {
                core: 2,
                ..accept()
            },
            Accept {
                max_frame: MIN_MAX_FRAME - 1,
                ..accept()
            },
            Accept {
                max_frame: MAX_FRAME_CEILING + 1,
                ..accept()
            },
        ];
        for a in broken {
            assert!(matches!(
                Accept::decode(&accept_bytes(&a)),
                Err(ProtoError::BadPayload(_))
            ));
        }
    }

    /// A lying or broken gateway's node list is refused whole: the agent
    /// never sees a node it could not name or reach by text.
    #[test]
    fn garbage_node_lists_are_refused() {
        let good = Accept {
            capabilities: CAP_PUBLIC_URL | CAP_CLUSTER,
            nodes: vec![AcceptNode {
                name: "gw-a".into(),
                tunnel: "10.0.0.1:7000".into(),
            }],
            ..accept()
        };
        let bytes = accept_bytes(&good);
        assert_eq!(Accept::decode(&bytes), Ok(good.clone()));
        // The list starts after the public endpoint: count, then fields.
        let list_at = bytes.len() - (1 + 1 + 4 + 1 + 13);
        assert_eq!(bytes[list_at], 1);
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = bytes.clone();
            f(&mut b);
            Accept::decode(&b)
        };
        // More nodes announced than sent.
        assert!(bad(&|b| b[list_at] = 2).is_err());
        // A name that is not a session-name shape, then one not UTF-8.
        assert!(matches!(
            bad(&|b| b[list_at + 2] = b'G'),
            Err(ProtoError::BadPayload(_))
        ));
        assert!(matches!(
            bad(&|b| b[list_at + 2] = 0xff),
            Err(ProtoError::BadPayload(_))
        ));
        // A tunnel address that is not UTF-8, an empty one, a length past
        // the end.
        assert!(matches!(
            bad(&|b| b[list_at + 7] = 0xc3),
            Err(ProtoError::BadPayload(_))
        ));
        assert!(bad(&|b| {
            b[list_at + 6] = 0;
            b.truncate(list_at + 7);
        })
        .is_err());
        assert!(bad(&|b| b[list_at + 6] = 200).is_err());
        // Nodes without the capability bit are refused at encode-side
        // validation too.
        let no_cap = Accept {
            capabilities: CAP_PUBLIC_URL,
            ..good.clone()
        };
        assert!(no_cap.validate().is_err());
        // More than MAX_ACCEPT_NODES.
        let many = Accept {
            nodes: (0..=MAX_ACCEPT_NODES)
                .map(|i| AcceptNode {
                    name: format!("n{i}"),
                    tunnel: "10.0.0.1:7000".into(),
                })
                .collect(),
            ..good
        };
        assert!(Accept::decode(&accept_bytes(&many)).is_err());
    }

    #[test]
    fn typed_parsers_check_the_frame_type() {
        let ping = Frame::ping([0; 8]);
        assert!(matches!(ping.parse_hello(), Err(ProtoError::BadPayload(_))));
        assert!(matches!(
            ping.parse_accept(),
            Err(ProtoError::BadPayload(_))
        ));
        assert!(matches!(
            ping.parse_goaway(),
            Err(ProtoError::BadPayload(_))
        ));
        let goaway = Frame::goaway(ErrorCode::NoError, "");
        assert!(matches!(
            goaway.parse_refuse(),
            Err(ProtoError::BadPayload(_))
        ));
        let short = Frame::new(FrameType::GoAway, 0, Bytes::from_static(&[0, 0]));
        assert_eq!(
            short.parse_goaway(),
            Err(ProtoError::BadLength {
                kind: FrameType::GoAway,
                len: 2
            })
        );
    }

    #[test]
    fn random_payloads_never_panic_the_typed_parsers() {
        let mut rng = XorShift::new(4);
        let valid_hello = hello_bytes(&hello());
        let valid_accept = accept_bytes(&accept());
        for _ in 0..20_000 {
            let mut h = valid_hello.clone();
            let mut a = valid_accept.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(h.len());
                h[at] = rng.next_u32() as u8;
                let at = rng.below(a.len());
                a[at] = rng.next_u32() as u8;
            }
            h.truncate(rng.below(h.len() + 8));
            a.truncate(rng.below(a.len() + 8));
            // Whatever parses must survive its own round trip.
            if let Ok(parsed) = Hello::decode(&h) {
                assert_eq!(Hello::decode(&hello_bytes(&parsed)), Ok(parsed));
            }
            if let Ok(parsed) = Accept::decode(&a) {
                assert_eq!(Accept::decode(&accept_bytes(&parsed)), Ok(parsed));
            }
            let noise = rng.noise(40);
            let _ = Hello::decode(&noise);
            let _ = Accept::decode(&noise);
        }
    }
}
