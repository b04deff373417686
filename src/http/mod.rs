//! Sans-IO HTTP/1.x: bytes in, parsed heads and body pieces out; heads and
//! chunk framing encoded into a `BytesMut`. No sockets, no clocks.
//!
//! - [`head`]: find, parse and validate request and response heads. Requests
//!   are strict (every request-smuggling ambiguity is a [`HeadError`] with
//!   its status); responses are lenient where the result stays unambiguous.
//! - [`body`]: [`BodyDecoder`] strips length, chunked or close-delimited
//!   framing and yields the body zero-copy, in bounded pieces.
//! - [`encode`]: heads as they are forwarded (hop-by-hop headers dropped,
//!   framing restated), chunk framing, small error responses.
//! - [`forwarded`]: the X-Forwarded-* / Forwarded / X-Real-IP a request
//!   carries to its backend, replaced or extended by whether the peer is a
//!   trusted proxy.
//! - [`proxy`]: PROXY protocol v1/v2 headers a load balancer sends before
//!   the first request, parsed to the client address they carry.
//! - `invariants` (hidden): the checks shared by the randomised tests and
//!   the fuzz targets in `fuzz/`.
//!
//! Invariants the IO layer relies on: `parse_*` never consume input (the
//! caller advances by `head_len`); `Ok(None)` always means "read more", and
//! malformed framing is an error as soon as the byte that breaks it
//! arrives, so no peer can keep a connection waiting on bytes that cannot
//! help; a decoder never touches the bytes after the end of its body, so
//! pipelined requests stay in the buffer. Every [`HeadError`] has a status
//! ([`HeadError::status`]), every [`BodyError`] but `UnexpectedEof` is 400
//! ([`BodyError::status`]).

pub mod body;
pub mod encode;
pub mod forwarded;
pub mod head;
#[doc(hidden)]
pub mod invariants;
pub mod proxy;

pub use body::{BodyDecoder, BodyError, MAX_CHUNK_LINE, MAX_TRAILERS};
pub use encode::{
    encode_chunk_header, encode_request_forward, encode_request_forward_except,
    encode_response_forward, encode_response_head, is_hop_by_hop, reason_phrase, simple_response,
    CHUNK_TRAILER, LAST_CHUNK,
};
pub use forwarded::{encode_request_forwarded, Origin, Scheme};
pub use head::{
    parse_request, parse_response, BodyKind, HeadError, HeaderIter, Headers, RequestHead,
    ResponseHead, DEFAULT_MAX_HEAD, MAX_HEADERS,
};
