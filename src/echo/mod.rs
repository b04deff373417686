//! The built-in backend behind `ringtunnel echo`: an httpbin-like HTTP/1.1
//! server for tests, demos and benchmarks, built on [`crate::http`].
//!
//! Routes (any method; HEAD gets the GET head without a body):
//!
//! | route | answer |
//! |---|---|
//! | `/` | 200 `ringtunnel echo\n` |
//! | `/delay/{ms}` | 200 after `ms` (at most 60000) milliseconds |
//! | `/bytes/{n}` | 200, `n` bytes (at most 1 GiB) of [`pattern_byte`] |
//! | `/status/{code}` | that status (100..=599), no body |
//! | `/echo` | 200, the request body streamed back, framed like the request, same `Content-Type` |
//! | `/stream/{n}` | 200 chunked, `n` (at most 100000) chunks `{"id": i}\n` |
//! | `/headers` | 200, the request headers as `name: value` lines |
//! | `/drip?bytes=N&delay_ms=D` | 200, N bytes, one every D ms |
//! | `/upgrade` | with `Connection: upgrade` + `Upgrade`: 101, then a raw byte echo until EOF |
//!
//! `EchoConfig::delay_ms` is added before every answer. Requests on a
//! connection are answered in order (pipelining is safe); a malformed head
//! gets its [`HeadError`](crate::http::HeadError) status and a close.
//!
//! The server is meant never to be the bottleneck of a benchmark: answers
//! are written with one write per batch of requests, large bodies are sent
//! from a static table or straight from the received buffers.

mod conn;
pub mod route;
pub mod ws;

use std::io;
use std::rc::Rc;
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};

pub use route::Route;

/// Settings of one echo server.
#[derive(Clone, Debug)]
pub struct EchoConfig {
    /// Added before every answer, in milliseconds (simulates a slow backend).
    pub delay_ms: u64,
    /// Largest request head accepted; larger gets 431.
    pub max_head: usize,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            delay_ms: 0,
            max_head: crate::http::DEFAULT_MAX_HEAD,
        }
    }
}

/// Period of the `/bytes` pattern. Prime, so it never lines up with
/// power-of-two piece or buffer sizes: a dropped, repeated or misplaced
/// piece shows up as wrong bytes.
pub const PATTERN_PERIOD: u64 = 251;

/// Byte `i` of every `/bytes/{n}` body: `i % 251`.
pub fn pattern_byte(i: u64) -> u8 {
    (i % PATTERN_PERIOD) as u8
}

/// Size of the pieces `/bytes` is written in.
const PIECE: usize = 64 * 1024;
const TABLE_LEN: usize = PIECE + PATTERN_PERIOD as usize;

/// One piece of the pattern plus one period, so that a piece starting at
/// any body offset is a plain slice of it.
static PATTERN: [u8; TABLE_LEN] = pattern_table();

const fn pattern_table() -> [u8; TABLE_LEN] {
    let mut table = [0u8; TABLE_LEN];
    let mut i = 0;
    while i < TABLE_LEN {
        table[i] = (i % PATTERN_PERIOD as usize) as u8;
        i += 1;
    }
    table
}

/// Body bytes `offset..offset + len` of a `/bytes` response; `len <= PIECE`.
fn pattern_slice(offset: u64, len: usize) -> &'static [u8] {
    let start = (offset % PATTERN_PERIOD) as usize;
    &PATTERN[start..start + len]
}

/// Accept loop for one core: one task per connection, each isolated so a
/// panic ends only that connection. Returns when accepting fails in a way
/// that retrying cannot fix.
pub async fn serve(listener: TcpListener, cfg: Rc<EchoConfig>) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let cfg = cfg.clone();
                crate::runtime::spawn_isolated("echo-conn", serve_conn(stream, cfg));
            }
            Err(e) if accept_error_is_transient(&e) => {
                tracing::warn!(error = %e, "echo accept failed; retrying");
                if is_resource_exhaustion(&e) {
                    // Give closing connections a moment to free descriptors
                    // instead of spinning on the same error.
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "echo accept failed; listener stopped");
                return;
            }
        }
    }
}

/// Serve one connection until the client closes, asks to close, or errs.
pub async fn serve_conn(stream: TcpStream, cfg: Rc<EchoConfig>) {
    // Responses are written whole; Nagle would only hold back the tail of
    // one waiting for an ACK.
    let _ = stream.set_nodelay(true);
    if let Err(e) = conn::Conn::new(stream, cfg).run().await {
        tracing::debug!(error = %e, "echo connection ended");
    }
}

fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || is_resource_exhaustion(e)
        || e.raw_os_error() == Some(libc::EPROTO)
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod pattern_tests {
    use super::*;

    #[test]
    fn slices_match_pattern_byte_at_every_phase() {
        for offset in [
            0u64,
            1,
            250,
            251,
            252,
            65_535,
            65_536,
            1 << 30,
            u64::MAX - PIECE as u64,
        ] {
            let s = pattern_slice(offset, PIECE);
            assert_eq!(s.len(), PIECE);
            for (k, &b) in s.iter().enumerate().step_by(97) {
                assert_eq!(b, pattern_byte(offset + k as u64), "offset {offset} k {k}");
            }
            assert_eq!(s[PIECE - 1], pattern_byte(offset + PIECE as u64 - 1));
        }
    }
}

mod run;
pub use run::{start, EchoServer};
