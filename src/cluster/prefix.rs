//! The peer prefix of a forwarded OPEN (sans-IO): what a node puts in
//! front of a request's OPEN payload when it forwards the request over a
//! peer link to a node that holds the session (docs/PROTOCOL.md, "Peer
//! links").
//!
//! ```text
//! +---------+------+---------+----------------+---------------------+
//! | version | hops | len (n) | session (n B)  | original OPEN       |
//! |  u8 = 1 |  u8  |   u8    | a-z 0-9 '-'    | payload, unchanged  |
//! +---------+------+---------+----------------+---------------------+
//! ```
//!
//! The original payload is what the session's agent gets, byte for byte:
//! the HTTP head exactly as the backend should see it (the forwarding
//! node already added the forwarding headers) or a TCP OPEN. Parsing
//! borrows nothing: the original comes back as a slice of the same
//! `Bytes`, so relaying it costs no copy.

use bytes::{BufMut, Bytes, BytesMut};

/// The only prefix version this build speaks.
pub const PREFIX_VERSION: u8 = 1;
/// A forwarded stream crosses one peer link at most: the forwarding node
/// sends hop 1, and the receiving node never forwards again.
pub const MAX_HOPS: u8 = 1;

/// Why a forwarded OPEN was rejected (the receiver resets the stream with
/// PROTOCOL_ERROR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    /// Shorter than its own length fields say, or no original payload.
    Truncated,
    UnknownVersion(u8),
    /// Not `1..=MAX_HOPS`.
    BadHops(u8),
    BadSession,
}

impl std::fmt::Display for PrefixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrefixError::Truncated => write!(f, "forwarded OPEN truncated"),
            PrefixError::UnknownVersion(v) => write!(f, "forwarded OPEN version {v}"),
            PrefixError::BadHops(h) => write!(f, "forwarded OPEN with {h} hops"),
            PrefixError::BadSession => write!(f, "forwarded OPEN with a bad session name"),
        }
    }
}

/// A parsed forwarded OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub hops: u8,
    pub session: String,
    /// The original OPEN payload (a slice of the received one).
    pub open: Bytes,
}

/// Prefix length for `session`.
pub fn prefix_len(session: &str) -> usize {
    3 + session.len()
}

/// `prefix(hops, session) ++ open`.
///
/// # Panics
/// If `session` is longer than 255 bytes; callers pass routed session
/// names, which are at most 63.
pub fn encode(hops: u8, session: &str, open: &[u8]) -> Bytes {
    let len = u8::try_from(session.len()).expect("session name fits a u8 length");
    let mut b = BytesMut::with_capacity(prefix_len(session) + open.len());
    b.put_u8(PREFIX_VERSION);
    b.put_u8(hops);
    b.put_u8(len);
    b.put_slice(session.as_bytes());
    b.put_slice(open);
    b.freeze()
}

/// Parses a forwarded OPEN. Checks, in order: the version, the lengths,
/// the hop count (`1..=MAX_HOPS`), the session name's shape, and that an
/// original payload follows.
pub fn parse(payload: &Bytes) -> Result<Forwarded, PrefixError> {
    let (&version, rest) = payload.split_first().ok_or(PrefixError::Truncated)?;
    if version != PREFIX_VERSION {
        return Err(PrefixError::UnknownVersion(version));
    }
    let [hops, len, ..] = *rest else {
        return Err(PrefixError::Truncated);
    };
    let start = 3usize;
    let end = start + len as usize;
    if payload.len() <= end {
        // The name is cut, or nothing follows it.
        return Err(PrefixError::Truncated);
    }
    if !(1..=MAX_HOPS).contains(&hops) {
        return Err(PrefixError::BadHops(hops));
    }
    let session = std::str::from_utf8(&payload[start..end])
        .ok()
        .filter(|s| crate::proto::valid_session_name(s))
        .ok_or(PrefixError::BadSession)?;
    Ok(Forwarded {
        hops,
        session: session.to_string(),
        open: payload.slice(end..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::test_rng::XorShift;

    #[test]
    fn round_trip_and_layout() {
        let open = b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n";
        let wire = encode(1, "demo", open);
        assert_eq!(&wire[..7], b"\x01\x01\x04demo");
        assert_eq!(&wire[7..], open);
        let f = parse(&wire).unwrap();
        assert_eq!(f.hops, 1);
        assert_eq!(f.session, "demo");
        assert_eq!(&f.open[..], open);
    }

    /// The example of docs/PROTOCOL.md, section 15, byte for byte.
    #[test]
    fn the_documented_example() {
        let wire = encode(1, "demo", b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n");
        let mut b = BytesMut::new();
        crate::proto::encode(&crate::proto::Frame::open(1, wire), &mut b);
        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "00 00 00 25 10 00 00 00 00 00 00 01 01 01 04 64 65 6d 6f \
             47 45 54 20 2f 20 48 54 54 50 2f 31 2e 31 \
             0d 0a 48 6f 73 74 3a 20 64 65 6d 6f 0d 0a 0d 0a"
        );
    }

    #[test]
    fn rejects_each_malformation() {
        let ok = encode(1, "a-1", b"x");
        parse(&ok).unwrap();
        assert_eq!(parse(&Bytes::new()), Err(PrefixError::Truncated));
        assert_eq!(
            parse(&encode(1, "a", b"")),
            Err(PrefixError::Truncated),
            "no original payload"
        );
        for cut in 0..ok.len() {
            assert!(parse(&ok.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut v2 = ok.to_vec();
        v2[0] = 2;
        assert_eq!(parse(&Bytes::from(v2)), Err(PrefixError::UnknownVersion(2)));
        assert_eq!(parse(&encode(0, "a", b"x")), Err(PrefixError::BadHops(0)));
        assert_eq!(parse(&encode(2, "a", b"x")), Err(PrefixError::BadHops(2)));
        assert_eq!(parse(&encode(1, "A", b"x")), Err(PrefixError::BadSession));
        assert_eq!(parse(&encode(1, "", b"x")), Err(PrefixError::BadSession));
        assert_eq!(
            parse(&Bytes::from_static(b"\x01\x01\x02\xff\xfex")),
            Err(PrefixError::BadSession)
        );
    }

    /// The model: the specification read field by field over a plain
    /// slice, written independently of `parse`.
    fn model(p: &[u8]) -> Option<(u8, String, Vec<u8>)> {
        let mut it = p.iter().copied();
        if it.next()? != 1 {
            return None;
        }
        let hops = it.next()?;
        let n = it.next()? as usize;
        let name: Vec<u8> = it.by_ref().take(n).collect();
        let rest: Vec<u8> = it.collect();
        if name.len() < n || rest.is_empty() || hops != 1 {
            return None;
        }
        let name = String::from_utf8(name).ok()?;
        let valid = !name.is_empty()
            && name.len() <= 63
            && !name.starts_with('-')
            && !name.ends_with('-')
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        valid.then_some((hops, name, rest))
    }

    #[test]
    fn random_inputs_agree_with_the_model() {
        let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"abz09-A.";
        for _ in 0..20_000 {
            let name_len = rng.below(70);
            let name: String = (0..name_len).map(|_| *rng.pick(alphabet) as char).collect();
            let hops = *rng.pick(&[0u8, 1, 1, 1, 2, 255]);
            let open = rng.noise(40);
            let mut wire = if name.len() <= 255 {
                encode(hops, &name, &open).to_vec()
            } else {
                Vec::new()
            };
            // Mutate some: flip a byte, cut, or append noise.
            match rng.below(4) {
                0 if !wire.is_empty() => {
                    let i = rng.below(wire.len());
                    wire[i] = rng.next_u32() as u8;
                }
                1 => wire.truncate(rng.below(wire.len() + 1)),
                2 => wire.extend(rng.noise(8)),
                _ => {}
            }
            let got = parse(&Bytes::from(wire.clone()));
            let want = model(&wire);
            match (&got, &want) {
                (Ok(f), Some((h, n, o))) => {
                    assert_eq!((f.hops, &f.session, &f.open[..]), (*h, n, &o[..]));
                    // Re-encoding a parsed prefix gives back the input.
                    assert_eq!(&encode(f.hops, &f.session, &f.open)[..], &wire[..]);
                }
                (Err(_), None) => {}
                _ => panic!("parse {got:?} vs model {want:?} for {wire:?}"),
            }
        }
    }
}
