//! The 12-byte frame header, frame types, the decoder and the encoder.
//!
//! ```text
//! offset 0: u32 BE  payload length
//! offset 4: u8      frame type
//! offset 5: u8      flags
//! offset 6: u16 BE  reserved, must be 0
//! offset 8: u32 BE  stream id
//! ```
//!
//! Every rule that can be checked from the header alone is checked as soon
//! as the 12 header bytes are buffered, before any payload is waited for: a
//! peer cannot make us buffer a frame we would reject anyway.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{ErrorCode, ProtoError};
pub use super::kind::{FrameType, StreamRule};

pub const HEADER_LEN: usize = 12;

/// The only flag value version 1 allows.
pub const FLAG_NONE: u8 = 0;

/// Flag bits this version accepts. A later version widens this only after
/// the handshake has negotiated the new flags, so an older peer never sees
/// bits it would misread.
const KNOWN_FLAGS: u8 = FLAG_NONE;

/// Default limit on a frame's payload (the header is not counted).
pub use super::limits::DEFAULT_MAX_FRAME;

/// No decoder accepts payloads above this, whatever it is configured with.
pub const MAX_FRAME_CEILING: u32 = 16 * 1024 * 1024;

/// A parsed and validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub kind: FrameType,
    pub flags: u8,
    pub stream: u32,
}

impl Header {
    /// Checks every header-only rule, in wire order: length against
    /// `max_payload` first, since that is the check that bounds memory.
    pub fn parse(bytes: &[u8; HEADER_LEN], max_payload: u32) -> Result<Self, ProtoError> {
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if len > max_payload {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: max_payload,
            });
        }
        let kind = FrameType::from_u8(bytes[4]).ok_or(ProtoError::UnknownType(bytes[4]))?;
        let flags = bytes[5];
        let reserved = u16::from_be_bytes([bytes[6], bytes[7]]);
        let stream = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        check_fields(kind, flags, reserved, stream, len)?;
        Ok(Self {
            len,
            kind,
            flags,
            stream,
        })
    }
}

fn check_fields(
    kind: FrameType,
    flags: u8,
    reserved: u16,
    stream: u32,
    len: u32,
) -> Result<(), ProtoError> {
    if flags & !KNOWN_FLAGS != 0 {
        return Err(ProtoError::BadFlags(flags));
    }
    if reserved != 0 {
        return Err(ProtoError::ReservedBits);
    }
    if !kind.stream_ok(stream) {
        return Err(ProtoError::BadStreamId { kind, stream });
    }
    if !kind.length_ok(len) {
        return Err(ProtoError::BadLength { kind, len });
    }
    Ok(())
}

/// Rules that need the payload. Only WINDOW has one at the frame level; the
/// richer payloads are checked by their typed decoders in `control`.
fn check_payload(kind: FrameType, payload: &[u8]) -> Result<(), ProtoError> {
    if kind == FrameType::Window && payload == [0, 0, 0, 0] {
        return Err(ProtoError::ZeroWindowIncrement);
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub flags: u8,
    pub stream: u32,
    pub payload: Bytes,
}

impl Frame {
    /// Constructors do not validate: tests need to build frames that break
    /// the rules, and the peer's decoder is the authority anyway. Use
    /// `validate` where a frame's origin is untrusted.
    pub fn new(kind: FrameType, stream: u32, payload: Bytes) -> Self {
        Self {
            kind,
            flags: FLAG_NONE,
            stream,
            payload,
        }
    }

    pub fn data(stream: u32, payload: Bytes) -> Self {
        Self::new(FrameType::Data, stream, payload)
    }

    pub fn end(stream: u32) -> Self {
        Self::new(FrameType::End, stream, Bytes::new())
    }

    /// `head` is the raw HTTP/1.1 request head, up to and including the
    /// blank line.
    pub fn open(stream: u32, head: Bytes) -> Self {
        Self::new(FrameType::Open, stream, head)
    }

    /// `head` is the raw HTTP/1.1 response head, up to and including the
    /// blank line.
    pub fn response(stream: u32, head: Bytes) -> Self {
        Self::new(FrameType::Response, stream, head)
    }

    pub fn reset(stream: u32, code: ErrorCode) -> Self {
        let payload = Bytes::copy_from_slice(&code.as_u32().to_be_bytes());
        Self::new(FrameType::Reset, stream, payload)
    }

    /// `stream` 0 grants uplink-level credit.
    pub fn window(stream: u32, increment: u32) -> Self {
        let payload = Bytes::copy_from_slice(&increment.to_be_bytes());
        Self::new(FrameType::Window, stream, payload)
    }

    pub fn ping(opaque: [u8; 8]) -> Self {
        Self::new(FrameType::Ping, 0, Bytes::copy_from_slice(&opaque))
    }

    /// Answers a PING by echoing its opaque bytes.
    pub fn pong(opaque: [u8; 8]) -> Self {
        Self::new(FrameType::Pong, 0, Bytes::copy_from_slice(&opaque))
    }

    /// The header alone, so the writer can put the payload in its own iovec
    /// instead of copying it next to the header.
    ///
    /// A payload over 4 GiB cannot be described; its length is written as
    /// `u32::MAX`, which every peer rejects as too large, rather than
    /// truncated into a length that would desynchronise the stream.
    pub fn header_bytes(&self) -> [u8; HEADER_LEN] {
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&len.to_be_bytes());
        out[4] = self.kind.as_u8();
        out[5] = self.flags;
        // out[6..8]: reserved, zero.
        out[8..12].copy_from_slice(&self.stream.to_be_bytes());
        out
    }

    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// The same checks the decoder applies, for frames built locally from
    /// untrusted parts.
    pub fn validate(&self, max_payload: u32) -> Result<(), ProtoError> {
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        if len > max_payload {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: max_payload,
            });
        }
        check_fields(self.kind, self.flags, 0, self.stream, len)?;
        check_payload(self.kind, &self.payload)
    }

    pub(crate) fn expect_kind(&self, kinds: &[FrameType]) -> Result<(), ProtoError> {
        if kinds.contains(&self.kind) {
            Ok(())
        } else {
            Err(ProtoError::BadPayload(
                "typed accessor called on the wrong frame type",
            ))
        }
    }

    /// The payload as exactly `N` bytes, or `BadLength`.
    fn fixed<const N: usize>(&self) -> Result<[u8; N], ProtoError> {
        <[u8; N]>::try_from(&self.payload[..]).map_err(|_| ProtoError::BadLength {
            kind: self.kind,
            len: u32::try_from(self.payload.len()).unwrap_or(u32::MAX),
        })
    }

    pub fn window_increment(&self) -> Result<u32, ProtoError> {
        self.expect_kind(&[FrameType::Window])?;
        match u32::from_be_bytes(self.fixed::<4>()?) {
            0 => Err(ProtoError::ZeroWindowIncrement),
            n => Ok(n),
        }
    }

    pub fn reset_code(&self) -> Result<ErrorCode, ProtoError> {
        self.expect_kind(&[FrameType::Reset])?;
        Ok(ErrorCode::from_u32(u32::from_be_bytes(self.fixed::<4>()?)))
    }

    /// The opaque bytes of a PING or a PONG.
    pub fn ping_payload(&self) -> Result<[u8; 8], ProtoError> {
        self.expect_kind(&[FrameType::Ping, FrameType::Pong])?;
        self.fixed::<8>()
    }
}

/// Appends header and payload to `dst`. This copies the payload; the uplink
/// writer uses `header_bytes` and a separate iovec instead.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(frame.encoded_len());
    dst.put_slice(&frame.header_bytes());
    dst.put_slice(&frame.payload);
}

/// Splits frames off the front of a read buffer.
///
/// Stateless apart from its limit: a call that returns `Ok(None)` or `Err`
/// leaves the buffer exactly as it was, so a retry after more bytes arrive
/// starts from the same header, and a repeated call after an error returns
/// the same error.
#[derive(Clone, Debug)]
pub struct Decoder {
    max_payload: u32,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// `max_payload` above `MAX_FRAME_CEILING` is lowered to it.
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload: max_payload.min(MAX_FRAME_CEILING),
        }
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// For an agent that adopts the `max_frame` announced in ACCEPT.
    pub fn set_max_payload(&mut self, max_payload: u32) {
        self.max_payload = max_payload.min(MAX_FRAME_CEILING);
    }

    /// How many bytes `buf` must hold before `decode` can make progress: the
    /// header length while the header is incomplete, then the whole frame.
    /// Lets the reader reserve once instead of growing in small steps. The
    /// header is not validated here; `decode` reports a bad one.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        match buf.first_chunk::<4>() {
            Some(len) if buf.len() >= HEADER_LEN => {
                let len = u32::from_be_bytes(*len).min(self.max_payload);
                HEADER_LEN + len as usize
            }
            _ => HEADER_LEN,
        }
    }

    /// `Ok(None)`: need more bytes; `buf` is untouched. `Ok(Some(frame))`:
    /// exactly `frame.encoded_len()` bytes were removed from the front of
    /// `buf`, and the payload shares `buf`'s allocation instead of being
    /// copied (so a payload held for long keeps that allocation alive).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::parse(head, self.max_payload)?;
        let len = header.len as usize;
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        check_payload(header.kind, payload)?;
        buf.advance(HEADER_LEN);
        let payload = if len == 0 {
            Bytes::new()
        } else {
            buf.split_to(len).freeze()
        };
        Ok(Some(Frame {
            kind: header.kind,
            flags: header.flags,
            stream: header.stream,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::mem::discriminant;

    use super::*;
    use crate::proto::control::{Accept, Hello};
    use crate::proto::test_rng::XorShift;

    fn enc(frame: &Frame) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode(frame, &mut buf);
        buf.to_vec()
    }

    /// Decodes every complete frame in `buf`; any error fails the test.
    fn drain(dec: &mut Decoder, buf: &mut BytesMut, out: &mut Vec<Frame>) {
        loop {
            let before = buf.len();
            match dec.decode(buf) {
                Ok(Some(frame)) => {
                    assert_eq!(before - buf.len(), frame.encoded_len());
                    out.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "Ok(None) must not consume");
                    return;
                }
                Err(e) => panic!("valid input rejected: {e}"),
            }
        }
    }

    fn decode_bytes(bytes: &[u8], max: u32) -> Result<Option<Frame>, ProtoError> {
        Decoder::new(max).decode(&mut BytesMut::from(bytes))
    }

    fn raw_header(len: u32, kind: u8, flags: u8, reserved: u16, stream: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN);
        out.extend_from_slice(&len.to_be_bytes());
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&reserved.to_be_bytes());
        out.extend_from_slice(&stream.to_be_bytes());
        out
    }

    fn sample_hello() -> Hello {
        Hello {
            version: 1,
            capabilities: 0,
            agent_id: 0x0102_0304_0506_0708,
            uplink_index: 1,
            uplinks_total: 4,
            token: "tk".into(),
            session: "demo".into(),
            tcp: Vec::new(),
        }
    }

    fn sample_accept() -> Accept {
        Accept {
            version: 1,
            gateway_cores: 4,
            core: 2,
            max_frame: 256 * 1024,
            stream_window: 256 * 1024,
            conn_window: 16 * 1024 * 1024,
            max_streams: 16384,
            capabilities: 0,
            tcp: Vec::new(),
            public: None,
            nodes: Vec::new(),
        }
    }

    fn random_stream(rng: &mut XorShift) -> u32 {
        match rng.below(3) {
            0 => 1 + rng.below(8) as u32,
            1 => rng.next_u32().max(1),
            _ => u32::MAX,
        }
    }

    /// A frame that satisfies every frame-level rule.
    fn random_frame(rng: &mut XorShift) -> Frame {
        let kind = *rng.pick(&FrameType::ALL);
        let stream = match kind.stream_rule() {
            StreamRule::Zero => 0,
            StreamRule::NonZero => random_stream(rng),
            StreamRule::Any if rng.chance(2) => 0,
            StreamRule::Any => random_stream(rng),
        };
        let len = match kind {
            FrameType::End => 0,
            FrameType::Reset | FrameType::Window => 4,
            FrameType::Ping | FrameType::Pong => 8,
            FrameType::GoAway | FrameType::Refuse => 4 + rng.below(40),
            FrameType::Open | FrameType::Response => 1 + rng.below(200),
            FrameType::Data if rng.chance(50) => rng.below(20_000),
            FrameType::Data => rng.below(300),
            FrameType::Hello | FrameType::Accept => rng.below(64),
        };
        let mut payload = rng.bytes(len);
        if kind == FrameType::Window && payload == [0; 4] {
            payload[3] = 1;
        }
        Frame::new(kind, stream, payload.into())
    }

    // ---- byte-exact layouts (these pin the tables in docs/PROTOCOL.md) ----

    #[test]
    fn data_frame_layout() {
        let frame = Frame::data(7, Bytes::from_static(b"hi"));
        let want = [0, 0, 0, 2, 0x12, 0, 0, 0, 0, 0, 0, 7, b'h', b'i'];
        assert_eq!(enc(&frame), want);
        assert_eq!(frame.header_bytes(), want[..HEADER_LEN]);
        assert_eq!(frame.encoded_len(), want.len());
    }

    #[test]
    fn end_reset_window_layouts() {
        assert_eq!(
            enc(&Frame::end(0x0102_0304)),
            [0, 0, 0, 0, 0x13, 0, 0, 0, 1, 2, 3, 4]
        );
        assert_eq!(
            enc(&Frame::reset(3, ErrorCode::BackendTimeout)),
            [0, 0, 0, 4, 0x14, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 8]
        );
        assert_eq!(
            enc(&Frame::window(0, 65_536)),
            [0, 0, 0, 4, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
        );
        assert_eq!(
            enc(&Frame::window(9, 1)),
            [0, 0, 0, 4, 0x20, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1]
        );
    }

    #[test]
    fn ping_pong_goaway_open_layouts() {
        let opaque = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            enc(&Frame::ping(opaque)),
            [0, 0, 0, 8, 0x21, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            enc(&Frame::pong(opaque)),
            [0, 0, 0, 8, 0x22, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            enc(&Frame::goaway(ErrorCode::ProtocolError, "bad")),
            [0, 0, 0, 7, 0x23, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'b', b'a', b'd']
        );
        assert_eq!(
            enc(&Frame::refuse(ErrorCode::AuthFailed, "no")),
            [0, 0, 0, 6, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, b'n', b'o']
        );
        let head = b"GET / HTTP/1.1\r\n\r\n";
        let mut want = vec![0, 0, 0, 18, 0x10, 0, 0, 0, 0, 0, 0, 1];
        want.extend_from_slice(head);
        assert_eq!(enc(&Frame::open(1, Bytes::from_static(head))), want);
        want[4] = 0x11;
        assert_eq!(enc(&Frame::response(1, Bytes::from_static(head))), want);
    }

    #[test]
    fn hello_layout() {
        #[rustfmt::skip]
        let want = [
            0, 0, 0, 32, 0x01, 0, 0, 0, 0, 0, 0, 0,
            b'R', b'T', b'N', b'L',  // magic
            0, 1,                    // version
            0, 0, 0, 0,              // capabilities
            1, 2, 3, 4, 5, 6, 7, 8,  // agent_id
            0, 1,                    // uplink_index
            0, 4,                    // uplinks_total
            0, 2, b't', b'k',        // token
            0, 4, b'd', b'e', b'm', b'o', // session
        ];
        assert_eq!(enc(&Frame::hello(&sample_hello())), want);
    }

    #[test]
    fn accept_layout() {
        #[rustfmt::skip]
        let want = [
            0, 0, 0, 28, 0x02, 0, 0, 0, 0, 0, 0, 0,
            0, 1,        // version
            0, 4,        // gateway_cores
            0, 2,        // core
            0, 0,        // reserved
            0, 4, 0, 0,  // max_frame 256 KiB
            0, 4, 0, 0,  // stream_window 256 KiB (the default)
            1, 0, 0, 0,  // conn_window 16 MiB
            0, 0, 64, 0, // max_streams 16384 (the default)
            0, 0, 0, 0,  // capabilities: none enabled
        ];
        assert_eq!(enc(&Frame::accept(&sample_accept())), want);
    }

    #[test]
    fn frame_type_codes_round_trip() {
        let mut seen = HashSet::new();
        for kind in FrameType::ALL {
            assert_eq!(FrameType::from_u8(kind.as_u8()), Some(kind));
            assert!(seen.insert(kind.as_u8()));
        }
        let known = (0..=255u8).filter(|b| FrameType::from_u8(*b).is_some());
        assert_eq!(known.count(), FrameType::ALL.len());
    }

    #[test]
    fn control_frames_are_the_ones_that_may_jump_ahead() {
        use FrameType::*;
        for kind in [Window, Ping, Pong, GoAway, Reset, Hello, Accept, Refuse] {
            assert!(kind.is_control(), "{kind}");
        }
        for kind in [Open, Response, Data, End] {
            assert!(!kind.is_control(), "{kind}");
        }
    }

    // ---- split reads ----

    fn mixed_sequence() -> Vec<Frame> {
        let mut rng = XorShift::new(7);
        let mut frames = vec![
            Frame::hello(&sample_hello()),
            Frame::accept(&sample_accept()),
            Frame::open(
                1,
                Bytes::from_static(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n"),
            ),
            Frame::data(1, Bytes::new()),
            Frame::data(1, Bytes::from(vec![0xab; 300])),
            Frame::end(1),
            Frame::window(0, 300),
            Frame::window(1, 300),
            Frame::ping(*b"12345678"),
            Frame::pong(*b"12345678"),
            Frame::response(1, Bytes::from_static(b"HTTP/1.1 204 No Content\r\n\r\n")),
            Frame::reset(2, ErrorCode::Cancel),
            Frame::goaway(ErrorCode::Shutdown, "bye"),
            Frame::refuse(ErrorCode::SessionTaken, ""),
        ];
        frames.extend((0..8).map(|_| random_frame(&mut rng)));
        frames.retain(|f| f.payload.len() < 2_000);
        frames
    }

    #[test]
    fn split_at_every_offset() {
        let frames = mixed_sequence();
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        for split in 0..=wire.len() {
            let mut dec = Decoder::default();
            let mut buf = BytesMut::from(&wire[..split]);
            let mut out = Vec::new();
            drain(&mut dec, &mut buf, &mut out);
            buf.extend_from_slice(&wire[split..]);
            drain(&mut dec, &mut buf, &mut out);
            assert!(buf.is_empty(), "split {split}: bytes left over");
            assert_eq!(out, frames, "split {split}");
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let frames = mixed_sequence();
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire);
        }
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &byte in wire.iter() {
            buf.extend_from_slice(&[byte]);
            drain(&mut dec, &mut buf, &mut out);
        }
        assert!(buf.is_empty());
        assert_eq!(out, frames);
    }

    #[test]
    fn payload_shares_the_read_buffer() {
        let mut buf = BytesMut::new();
        encode(&Frame::data(1, Bytes::from(vec![5u8; 64])), &mut buf);
        let start = buf.as_ptr() as usize;
        let frame = Decoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.payload.as_ptr() as usize, start + HEADER_LEN);
    }

    #[test]
    fn wanted_reports_the_next_step() {
        let dec = Decoder::default();
        let wire = enc(&Frame::data(3, Bytes::from(vec![1u8; 100])));
        assert_eq!(dec.wanted(&[]), HEADER_LEN);
        assert_eq!(dec.wanted(&wire[..5]), HEADER_LEN);
        assert_eq!(dec.wanted(&wire[..HEADER_LEN]), HEADER_LEN + 100);
        assert_eq!(dec.wanted(&wire), HEADER_LEN + 100);
        let huge = raw_header(u32::MAX, 0x12, 0, 0, 1);
        assert_eq!(dec.wanted(&huge), HEADER_LEN + DEFAULT_MAX_FRAME as usize);
    }

    // ---- property round trips ----

    #[test]
    fn ten_thousand_random_frames_round_trip() {
        let mut rng = XorShift::new(0x5eed);
        let mut dec = Decoder::new(MAX_FRAME_CEILING);
        let mut batch = BytesMut::new();
        let mut sent = Vec::new();
        for i in 0..10_000 {
            let frame = random_frame(&mut rng);
            assert_eq!(frame.validate(MAX_FRAME_CEILING), Ok(()), "{frame:?}");
            let mut one = BytesMut::new();
            encode(&frame, &mut one);
            assert_eq!(one.len(), frame.encoded_len());
            assert_eq!(dec.decode(&mut one), Ok(Some(frame.clone())));
            assert!(one.is_empty());
            encode(&frame, &mut batch);
            sent.push(frame);
            // Also decode back-to-back frames from one buffer, as a reader
            // does after a large read.
            if i % 100 == 99 {
                let mut out = Vec::new();
                drain(&mut dec, &mut batch, &mut out);
                assert!(batch.is_empty());
                assert_eq!(out, sent);
                sent.clear();
            }
        }
    }

    // ---- adversarial: every rule, one violation at a time ----

    #[test]
    fn oversized_header_is_rejected_before_its_payload() {
        let head = raw_header(1025, 0x12, 0, 0, 1);
        assert_eq!(
            decode_bytes(&head, 1024),
            Err(ProtoError::FrameTooLarge {
                len: 1025,
                max: 1024
            })
        );
        // At the limit it is merely incomplete.
        assert_eq!(
            decode_bytes(&raw_header(1024, 0x12, 0, 0, 1), 1024),
            Ok(None)
        );
        assert_eq!(
            decode_bytes(&raw_header(u32::MAX, 0x12, 0, 0, 1), DEFAULT_MAX_FRAME),
            Err(ProtoError::FrameTooLarge {
                len: u32::MAX,
                max: DEFAULT_MAX_FRAME
            })
        );
    }

    #[test]
    fn decoder_limit_is_capped_at_the_ceiling() {
        assert_eq!(Decoder::new(u32::MAX).max_payload(), MAX_FRAME_CEILING);
        let mut dec = Decoder::new(1);
        dec.set_max_payload(u32::MAX);
        assert_eq!(dec.max_payload(), MAX_FRAME_CEILING);
        let head = raw_header(MAX_FRAME_CEILING + 1, 0x12, 0, 0, 1);
        assert!(matches!(
            decode_bytes(&head, u32::MAX),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn unknown_type_flags_and_reserved_are_rejected() {
        for kind in [0x00, 0x04, 0x0f, 0x15, 0x24, 0xff] {
            assert_eq!(
                decode_bytes(&raw_header(0, kind, 0, 0, 1), 1024),
                Err(ProtoError::UnknownType(kind))
            );
        }
        for flags in [0x01, 0x80, 0xff] {
            assert_eq!(
                decode_bytes(&raw_header(0, 0x12, flags, 0, 1), 1024),
                Err(ProtoError::BadFlags(flags))
            );
        }
        for reserved in [1, 0x8000] {
            assert_eq!(
                decode_bytes(&raw_header(0, 0x12, 0, reserved, 1), 1024),
                Err(ProtoError::ReservedBits)
            );
        }
    }

    #[test]
    fn stream_id_rules() {
        use FrameType::*;
        for kind in [Open, Response, Data, End, Reset] {
            let len = if kind == Reset { 4 } else { 0 };
            assert_eq!(
                decode_bytes(&raw_header(len, kind.as_u8(), 0, 0, 0), 1024),
                Err(ProtoError::BadStreamId { kind, stream: 0 }),
                "{kind}"
            );
        }
        for kind in [Hello, Accept, Refuse, Ping, Pong, GoAway] {
            assert_eq!(
                decode_bytes(&raw_header(8, kind.as_u8(), 0, 0, 5), 1024),
                Err(ProtoError::BadStreamId { kind, stream: 5 }),
                "{kind}"
            );
        }
        for stream in [0, 1, u32::MAX] {
            let mut wire = raw_header(4, Window.as_u8(), 0, 0, stream);
            wire.extend_from_slice(&[0, 0, 0, 1]);
            assert!(matches!(decode_bytes(&wire, 1024), Ok(Some(_))));
        }
    }

    #[test]
    fn length_rules() {
        use FrameType::*;
        let cases: &[(FrameType, u32, &[u32], &[u32])] = &[
            // (kind, stream, bad lengths, good lengths)
            (End, 1, &[1, 4], &[0]),
            (Reset, 1, &[0, 3, 5, 8], &[4]),
            (Window, 1, &[0, 3, 5, 8], &[4]),
            (Window, 0, &[0, 8], &[4]),
            (Ping, 0, &[0, 4, 7, 9], &[8]),
            (Pong, 0, &[0, 7, 9, 16], &[8]),
            (GoAway, 0, &[0, 1, 3], &[4, 5, 100]),
            (Refuse, 0, &[0, 3], &[4, 50]),
            (Open, 1, &[0], &[1, 500]),
            (Response, 1, &[0], &[1, 500]),
            (Data, 1, &[], &[0, 1, 1024]),
            (Hello, 0, &[], &[0, 1, 30]),
            (Accept, 0, &[], &[0, 24]),
        ];
        for &(kind, stream, bad, good) in cases {
            for &len in bad {
                // Rejected from the header alone, before the payload arrives.
                assert_eq!(
                    decode_bytes(&raw_header(len, kind.as_u8(), 0, 0, stream), 1024),
                    Err(ProtoError::BadLength { kind, len }),
                    "{kind} len {len}"
                );
            }
            for &len in good {
                let mut wire = raw_header(len, kind.as_u8(), 0, 0, stream);
                wire.extend((0..len).map(|i| i as u8 | 1));
                let frame = decode_bytes(&wire, 1024)
                    .unwrap_or_else(|e| panic!("{kind} len {len}: {e}"))
                    .unwrap();
                assert_eq!(enc(&frame), wire);
            }
        }
    }

    #[test]
    fn zero_window_increment_is_rejected() {
        for stream in [0, 3] {
            let mut wire = raw_header(4, 0x20, 0, 0, stream);
            wire.extend_from_slice(&[0, 0, 0, 0]);
            assert_eq!(
                decode_bytes(&wire, 1024),
                Err(ProtoError::ZeroWindowIncrement)
            );
            // Not before the payload is there to look at.
            assert_eq!(decode_bytes(&wire[..14], 1024), Ok(None));
        }
        assert_eq!(
            Frame::window(1, 0).window_increment(),
            Err(ProtoError::ZeroWindowIncrement)
        );
    }

    #[test]
    fn errors_leave_the_buffer_untouched_and_repeat() {
        let mut wire = BytesMut::new();
        encode(&Frame::end(1), &mut wire);
        wire.extend_from_slice(&raw_header(0, 0x12, 0x01, 0, 1));
        let mut dec = Decoder::default();
        assert_eq!(dec.decode(&mut wire), Ok(Some(Frame::end(1))));
        let snapshot = wire.clone();
        for _ in 0..2 {
            assert_eq!(dec.decode(&mut wire), Err(ProtoError::BadFlags(1)));
            assert_eq!(wire, snapshot);
        }
    }

    #[test]
    fn validate_agrees_with_the_decoder() {
        let mut rng = XorShift::new(99);
        for _ in 0..5_000 {
            let mut frame = random_frame(&mut rng);
            match rng.below(5) {
                0 => frame.stream = rng.next_u32() % 3,
                1 => frame.payload = rng.noise(12).into(),
                2 => frame.flags = rng.next_u32() as u8 & 3,
                3 => frame.kind = *rng.pick(&FrameType::ALL),
                _ => {}
            }
            let max = 16 + rng.below(64) as u32;
            let decoded = decode_bytes(&enc(&frame), max).map(|f| f.expect("complete frame"));
            assert_eq!(frame.validate(max), decoded.map(|_| ()), "{frame:?}");
        }
    }

    #[test]
    fn typed_accessors() {
        assert_eq!(Frame::window(2, 77).window_increment(), Ok(77));
        assert_eq!(
            Frame::reset(2, ErrorCode::BackendReset).reset_code(),
            Ok(ErrorCode::BackendReset)
        );
        assert_eq!(
            Frame::reset(2, ErrorCode::Unknown(999)).reset_code(),
            Ok(ErrorCode::Unknown(999))
        );
        assert_eq!(Frame::ping(*b"abcdefgh").ping_payload(), Ok(*b"abcdefgh"));
        assert_eq!(Frame::pong(*b"abcdefgh").ping_payload(), Ok(*b"abcdefgh"));

        let wrong = Frame::data(1, Bytes::from_static(&[0, 0, 0, 1]));
        assert!(matches!(
            wrong.window_increment(),
            Err(ProtoError::BadPayload(_))
        ));
        assert!(matches!(wrong.reset_code(), Err(ProtoError::BadPayload(_))));
        assert!(matches!(
            wrong.ping_payload(),
            Err(ProtoError::BadPayload(_))
        ));

        let short = Frame::new(FrameType::Window, 1, Bytes::from_static(&[1]));
        assert_eq!(
            short.window_increment(),
            Err(ProtoError::BadLength {
                kind: FrameType::Window,
                len: 1
            })
        );
        let long = Frame::new(FrameType::Ping, 0, Bytes::from(vec![0; 9]));
        assert!(matches!(
            long.ping_payload(),
            Err(ProtoError::BadLength { .. })
        ));
    }

    // ---- random bytes: no panic, and length conservation ----

    /// Decodes `input` the way a connection would and checks the invariants
    /// that fuzz/fuzz_targets/frame_decode.rs also checks. Returns what
    /// stopped the loop.
    fn decode_checked(input: &[u8], max: u32) -> (usize, Option<ProtoError>) {
        let mut dec = Decoder::new(max);
        let mut buf = BytesMut::from(input);
        let mut offset = 0;
        let mut frames = 0;
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let consumed = before - buf.len();
                    assert_eq!(enc(&frame), input[offset..offset + consumed]);
                    assert!(frame.payload.len() <= max as usize);
                    assert_eq!(frame.validate(max), Ok(()));
                    crate::proto::invariants::assert_typed_payloads_round_trip(&frame);
                    offset += consumed;
                    frames += 1;
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    assert!(buf.len() < dec.wanted(&buf));
                    return (frames, None);
                }
                Err(e) => {
                    assert_eq!(buf.len(), before);
                    assert!(!e.to_string().is_empty());
                    return (frames, Some(e));
                }
            }
        }
    }

    #[test]
    fn fifty_thousand_random_inputs() {
        let mut rng = XorShift::new(0xdead_beef);
        let mut frames = 0;
        let mut errors = HashSet::new();
        for _ in 0..50_000 {
            let input = match rng.below(3) {
                // Pure noise: mostly FrameTooLarge, which is the point.
                0 => rng.noise(64),
                // Valid frames with a few bytes overwritten, cut or added.
                1 => {
                    let mut wire = Vec::new();
                    for _ in 0..1 + rng.below(4) {
                        let mut f = random_frame(&mut rng);
                        f.payload.truncate(100);
                        wire.extend(enc(&f));
                    }
                    for _ in 0..rng.below(4) {
                        let at = rng.below(wire.len());
                        wire[at] = rng.next_u32() as u8;
                    }
                    if rng.chance(3) {
                        wire.truncate(rng.below(wire.len() + 1));
                    }
                    if rng.chance(3) {
                        wire.extend(rng.noise(16));
                    }
                    wire
                }
                // Plausible headers (small length, known-ish type) + noise.
                _ => {
                    let len = rng.below(24) as u32;
                    let kind = if rng.chance(4) {
                        rng.next_u32() as u8
                    } else {
                        rng.pick(&FrameType::ALL).as_u8()
                    };
                    let flags = if rng.chance(8) { 1 } else { 0 };
                    let reserved = if rng.chance(8) { 1 } else { 0 };
                    let stream = rng.next_u32() % 3;
                    let mut wire = raw_header(len, kind, flags, reserved, stream);
                    // Zeros reach the WINDOW increment check.
                    if rng.chance(4) {
                        wire.extend(vec![0; rng.below(40)]);
                    } else {
                        wire.extend(rng.noise(40));
                    }
                    wire
                }
            };
            let max = *rng.pick(&[0, 8, 64, 1024, DEFAULT_MAX_FRAME]);
            let (n, err) = decode_checked(&input, max);
            frames += n;
            if let Some(e) = err {
                errors.insert(discriminant(&e));
            }
        }
        // The generator must actually reach the interesting paths.
        assert!(frames > 10_000, "only {frames} frames decoded");
        assert_eq!(errors.len(), 7, "frame-level error kinds reached");
    }
}
