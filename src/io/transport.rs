//! An uplink's byte stream: plain TCP, or TLS (rustls through
//! monoio-rustls) over TCP, on the gateway's or the agent's side.
//!
//! [`Transport`] carries a connection through its handshake (TLS, then
//! HELLO/ACCEPT) and then starts the uplink driver on its read and write
//! halves. The driver (`io/uplink.rs`) is generic over those halves, so the
//! plain path is compiled exactly as before: TCP halves, `writev` straight
//! to the socket.
//!
//! Invariants kept under TLS:
//! - Deadlines still shut the raw fd down (kept here, since a TLS stream
//!   does not hand its socket out): a pending TLS read sees EOF, a pending
//!   TLS write fails, exactly as on plain TCP.
//! - A TLS session lives in this process's memory, so a TLS transport can
//!   never move to another core by fd; only [`Transport::into_plain`]
//!   yields a movable socket (docs/ARCHITECTURE.md, placement).
//!
//! Costs of the TLS path (not measured here): monoio-rustls reads the
//! socket through its own 16 KiB buffer and copies decrypted bytes into
//! ours; its `writev` writes only the first iovec, so the writer goes
//! through [`Gather`], which copies a batch's small pieces into one buffer
//! per TLS write (one record and one syscall instead of one per iovec).
//! Encryption copies every byte anyway, so the gather copy adds one memcpy
//! of at most [`GATHER_MAX`] per write.

use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use monoio::buf::{IoBuf, IoVecBuf};
use monoio::io::{AsyncWriteRent, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;
use monoio_rustls::{ClientTlsStream, ServerTlsStream, TlsAcceptor, TlsConnector};
use rustls::pki_types::ServerName;

use super::stats::CoreStats;
use super::uplink::{read_handshake_frame, write_frame, Uplink};
use crate::proto::{Frame, Heartbeat, Limits, Role};

/// One TLS write takes at most this much plaintext: rustls's default
/// buffer limit for outgoing records, so a write is accepted whole.
pub const GATHER_MAX: usize = 64 * 1024;

enum Kind {
    Plain(TcpStream),
    // Boxed: a TLS stream is about 1 KiB, a TcpStream a few words.
    Server(Box<ServerTlsStream<TcpStream>>),
    Client(Box<ClientTlsStream<TcpStream>>),
}

/// A connection in its handshake, TLS or not.
pub struct Transport {
    fd: RawFd,
    kind: Kind,
}

/// What the uplink driver needs besides the socket.
pub struct UplinkParams {
    pub id: u64,
    pub core: usize,
    pub session: String,
    pub role: Role,
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    pub stats: Arc<CoreStats>,
}

impl Transport {
    pub fn plain(s: TcpStream) -> Transport {
        Transport {
            fd: s.as_raw_fd(),
            kind: Kind::Plain(s),
        }
    }

    /// Runs the server side of the TLS handshake. The caller bounds it
    /// with a watchdog on the fd (taken before the stream is consumed).
    pub async fn accept_tls(s: TcpStream, acceptor: &TlsAcceptor) -> std::io::Result<Transport> {
        let fd = s.as_raw_fd();
        let _ = s.set_nodelay(true);
        let tls = acceptor.accept(s).await?;
        Ok(Transport {
            fd,
            kind: Kind::Server(Box::new(tls)),
        })
    }

    /// Runs the client side of the TLS handshake (bounded like
    /// [`Transport::accept_tls`]).
    pub async fn connect_tls(
        s: TcpStream,
        connector: &TlsConnector,
        name: ServerName<'static>,
    ) -> std::io::Result<Transport> {
        let fd = s.as_raw_fd();
        let _ = s.set_nodelay(true);
        let tls = connector.connect(name, s).await?;
        Ok(Transport {
            fd,
            kind: Kind::Client(Box::new(tls)),
        })
    }

    /// The socket's fd, for deadlines enforced by `shutdown(2)`.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self.kind, Kind::Plain(_))
    }

    /// The plain socket, which may move to another core; a TLS transport
    /// is handed back unchanged.
    pub fn into_plain(self) -> Result<TcpStream, Transport> {
        match self.kind {
            Kind::Plain(s) => Ok(s),
            kind => Err(Transport { fd: self.fd, kind }),
        }
    }

    /// Reads one frame of the handshake.
    pub async fn read_frame(
        &mut self,
        buf: BytesMut,
        max: u32,
    ) -> (std::io::Result<Frame>, BytesMut) {
        match &mut self.kind {
            Kind::Plain(s) => read_handshake_frame(s, buf, max).await,
            Kind::Server(s) => read_handshake_frame(&mut **s, buf, max).await,
            Kind::Client(s) => read_handshake_frame(&mut **s, buf, max).await,
        }
    }

    /// Writes one frame of the handshake.
    pub async fn write_frame(&mut self, f: &Frame) -> std::io::Result<()> {
        match &mut self.kind {
            Kind::Plain(s) => write_frame(s, f).await,
            Kind::Server(s) => write_frame(&mut **s, f).await,
            Kind::Client(s) => write_frame(&mut **s, f).await,
        }
    }

    /// Starts the uplink's tasks on this core. `leftover` holds bytes read
    /// past the handshake.
    pub fn start_uplink(self, leftover: BytesMut, p: UplinkParams) -> Rc<Uplink> {
        let fd = self.fd;
        match self.kind {
            Kind::Plain(s) => {
                let _ = s.set_nodelay(true);
                Uplink::start(s.into_split(), fd, leftover, p)
            }
            Kind::Server(s) => {
                let (r, w) = s.into_split();
                Uplink::start((r, Gather::new(w)), fd, leftover, p)
            }
            Kind::Client(s) => {
                let (r, w) = s.into_split();
                Uplink::start((r, Gather::new(w)), fd, leftover, p)
            }
        }
    }
}

/// A write half whose `writev` gathers the iovecs into one buffer and
/// makes one `write` of it: for TLS streams, whose own `writev` sends only
/// the first iovec (one record and one syscall per iovec).
pub struct Gather<W> {
    inner: W,
    scratch: Option<Vec<u8>>,
}

impl<W> Gather<W> {
    pub fn new(inner: W) -> Gather<W> {
        Gather {
            inner,
            scratch: Some(Vec::with_capacity(GATHER_MAX)),
        }
    }
}

impl<W: AsyncWriteRent> AsyncWriteRent for Gather<W> {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.inner.write(buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, bufs: T) -> BufResult<usize, T> {
        // SAFETY: `bufs` owns the memory its iovecs point to and is kept
        // alive (and unmoved in the heap) for this whole call.
        let iovs =
            unsafe { std::slice::from_raw_parts(bufs.read_iovec_ptr(), bufs.read_iovec_len()) };
        let Some(first) = iovs.first() else {
            return (Ok(0), bufs);
        };
        if first.iov_len >= GATHER_MAX {
            // A big payload goes through as it is: no copy to save.
            return self.inner.writev(bufs).await;
        }
        let mut scratch = self.scratch.take().unwrap_or_default();
        scratch.clear();
        for v in iovs {
            let take = v.iov_len.min(GATHER_MAX - scratch.len());
            // SAFETY: as above; `take` <= the iovec's length.
            scratch.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, take)
            });
            if scratch.len() == GATHER_MAX {
                break;
            }
        }
        let (res, scratch) = self.inner.write(scratch).await;
        self.scratch = Some(scratch);
        (res, bufs)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().await
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::batch::Parts;
    use bytes::Bytes;

    /// Records each write; accepts at most `cap` bytes per call.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        cap: usize,
    }

    impl AsyncWriteRent for Recorder {
        async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            // SAFETY: the buffer is initialised up to bytes_init.
            let s = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            let n = s.len().min(self.cap);
            self.writes.push(s[..n].to_vec());
            (Ok(n), buf)
        }
        async fn writev<T: IoVecBuf>(&mut self, bufs: T) -> BufResult<usize, T> {
            // Like monoio-rustls: the first iovec only.
            let v = unsafe { *bufs.read_iovec_ptr() };
            let s = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            let n = s.len().min(self.cap);
            self.writes.push(s[..n].to_vec());
            (Ok(n), bufs)
        }
        async fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        async fn shutdown(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn drain(g: &mut Gather<Recorder>, mut parts: Parts) -> usize {
        parts.seal();
        let mut calls = 0;
        while !parts.is_empty() {
            let (res, p) = g.writev(parts).await;
            parts = p;
            parts.advance(res.unwrap());
            calls += 1;
        }
        calls
    }

    #[test]
    fn gathers_small_pieces_into_one_write_and_resumes_after_short_ones() {
        // No socket is involved: any driver runs it.
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap();
        rt.block_on(gather_cases());
    }

    async fn gather_cases() {
        let mut g = Gather::new(Recorder {
            writes: vec![],
            cap: usize::MAX,
        });
        let mut parts = Parts::new();
        let mut want = Vec::new();
        for i in 0..50u8 {
            let piece = vec![i; 100 + i as usize];
            want.extend_from_slice(&piece);
            parts.push(Bytes::from(piece));
        }
        assert_eq!(drain(&mut g, parts).await, 1, "50 small pieces, one write");
        assert_eq!(g.inner.writes.concat(), want);

        // Short writes from below: every byte still goes out once, in order.
        let mut g = Gather::new(Recorder {
            writes: vec![],
            cap: 777,
        });
        let mut parts = Parts::new();
        for i in 0..50u8 {
            parts.push(Bytes::from(vec![i; 100 + i as usize]));
        }
        drain(&mut g, parts).await;
        assert_eq!(g.inner.writes.concat(), want);

        // A big payload is passed through, never copied into the scratch.
        let mut g = Gather::new(Recorder {
            writes: vec![],
            cap: usize::MAX,
        });
        let mut parts = Parts::new();
        let big = vec![7u8; GATHER_MAX + 1];
        parts.push(Bytes::from(big.clone()));
        parts.push(Bytes::from_static(b"tail"));
        assert_eq!(drain(&mut g, parts).await, 2);
        assert_eq!(g.inner.writes[0], big);
        assert_eq!(g.inner.writes[1], b"tail");
    }
}
