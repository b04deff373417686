//! The public HTTPS edge of one gateway core (`--https-listen`).
//!
//! Each core binds its own SO_REUSEPORT HTTPS listener. A connection is
//! admitted like a plain one (`--max-conns`, `--max-conns-per-ip`, the fd
//! reserve: `guard::admit_public`), then, on the core that accepted it:
//!
//! 1. under `--proxy-protocol`, the PROXY header is read from the raw
//!    socket (it precedes the ClientHello; bytes read past it are fed to
//!    TLS first, through [`Prefixed`]);
//! 2. the TLS handshake runs (certificate by SNI, `crate::sni`; ALPN
//!    `http/1.1`), bounded by `--header-timeout`; a failure (plain HTTP,
//!    garbage, a client that vanishes or stalls) closes this connection
//!    only, is counted as `https_handshake` and logged at most once per
//!    10 s per core;
//! 3. the decrypted byte stream is relayed through a
//!    `socketpair(AF_UNIX, SOCK_STREAM)` whose other end is served by the
//!    ordinary HTTP path (`public::adopt`) as an `https` connection with
//!    the client's address.
//!
//! Why the relay: a TLS session is memory on this core and cannot follow
//! its fd to the core that holds the request's session, but the plaintext
//! end of a socketpair can. So every HTTPS connection is served exactly
//! like a plain one (routing, handoff by fd to the owning core, deadlines,
//! forwarding headers with `proto=https`), and the TLS side stays here.
//! The cost is two extra socket operations per chunk each way, and 2 more
//! fds per connection (docs/ARCHITECTURE.md, "The HTTPS edge").
//!
//! Bounds: the relay task holds two 16 KiB buffers, monoio-rustls two
//! more and rustls its state: with the HTTP side, about 100 KiB per idle
//! HTTPS connection (tests/https_edge.rs holds it under 256 KiB).
//! `--header-timeout` bounds the handshake; the HTTP side's deadlines
//! bound everything after it, because the relay ends when that side
//! closes its end. A client that stops reading stalls the relay's TLS
//! write: `--write-stall-timeout` closes it.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};
use monoio::net::{TcpListener, TcpStream, UnixStream};
use monoio::BufResult;

use super::{guard, public, Core};
use crate::http::Scheme;
use crate::io::shutdown_fd;
use crate::io::stats::{CoreStats, ErrorKind};
use crate::io::watchdog::Watchdog;
use crate::limits::{ConnPermit, LogLimiter};

/// Each direction of the relay reads at most this much at a time: one
/// full TLS record of plaintext.
const RELAY_BUF: usize = 16 * 1024;

/// The content type of a TLS handshake record: the first byte a TLS
/// client sends.
const TLS_HANDSHAKE: u8 = 0x16;

pub(super) async fn accept_loop(core: Rc<Core>, listener: TcpListener, stop: Rc<Cell<bool>>) {
    // Scanners and plain-HTTP clients fail handshakes in bulk: one line
    // per 10 s per core, with the count of the others.
    let log = Rc::new(RefCell::new(LogLimiter::new(
        crate::limits::backoff::LOG_EVERY,
    )));
    guard::accept_until_stopped(
        listener,
        "https",
        || stop.get(),
        |stream, peer| {
            // Over a limit: closed unanswered (see `admit_public`).
            let Some(permit) = guard::admit_public(&core, &stream, peer, false) else {
                return;
            };
            // TCP_NODELAY comes from the listener (`runtime::bind_reuseport`).
            let c = core.clone();
            let log = log.clone();
            crate::runtime::spawn_isolated("https-conn", async move {
                serve(c, stream, peer, permit, log).await;
            });
        },
    )
    .await;
}

/// Keeps `https_conns` true however the task ends.
struct Gauge(Rc<Core>);

impl Drop for Gauge {
    fn drop(&mut self) {
        CoreStats::dec(&self.0.stats.https_conns);
    }
}

async fn serve(
    core: Rc<Core>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    permit: ConnPermit,
    log: Rc<RefCell<LogLimiter>>,
) {
    CoreStats::inc(&core.stats.https_conns);
    let _gauge = Gauge(core.clone());
    let fd = tcp.as_raw_fd();
    // Both deadlines shut the socket down both ways: nothing is ever
    // answered in clear on this port.
    let wd = Watchdog::start(fd, libc::SHUT_RDWR);
    let mut pre = BytesMut::new();
    let client = if core.cfg().proxy_protocol {
        match public::settle_proxy_client(&core, &mut tcp, &mut pre, &wd, peer).await {
            Some(c) => c,
            None => return,
        }
    } else {
        peer
    };
    wd.arm(core.cfg().header_timeout);
    let failed = |why: &dyn std::fmt::Display| {
        core.stats.error(ErrorKind::HttpsHandshake);
        if let Some(suppressed) = log.borrow_mut().allow(Instant::now()) {
            tracing::info!(core = core.index, %client, error = %why, suppressed, "HTTPS handshake failed");
        }
    };
    // The first bytes are read here, not by rustls, to tell plain HTTP
    // (or anything else that is not a TLS handshake record) from TLS: it
    // is closed without a byte in answer, where rustls would send an
    // alert that an HTTP client shows as garbage. They reach rustls
    // through `Prefixed`, like bytes after a PROXY header.
    if pre.is_empty() {
        let (res, b) = crate::io::read_append(&mut tcp, pre, 512, 2048).await;
        pre = b;
        if !matches!(res, Ok(n) if n > 0) {
            failed(&if wd.fired() {
                "timed out (--header-timeout)"
            } else {
                "closed before the ClientHello"
            });
            return;
        }
    }
    if pre[0] != TLS_HANDSHAKE {
        failed(&"not a TLS handshake (plain HTTP on the HTTPS port?)");
        return;
    }
    // One read of the reloadable configuration per handshake: a reload
    // mid-handshake does not change the certificate it is using.
    let Some(acceptor) = core.shared.live().https.clone() else {
        return;
    };
    let io = Prefixed {
        tcp,
        pre: pre.freeze(),
    };
    let tls = match acceptor.accept(io).await {
        Ok(t) => t,
        Err(e) => {
            if wd.fired() {
                failed(&"timed out (--header-timeout)");
            } else {
                failed(&handshake_error(e));
            }
            return;
        }
    };
    wd.disarm();
    let (ours, theirs) = match socket_pair() {
        Ok(p) => p,
        Err(e) => {
            // Out of fds: this connection only (the fd reserve keeps
            // agents' room).
            if let Some(suppressed) = log.borrow_mut().allow(Instant::now()) {
                tracing::warn!(core = core.index, error = %e, suppressed, "HTTPS relay: no socketpair");
            }
            return;
        }
    };
    // Its two fds come after the admission check: at the fd ceiling they
    // must not eat into the reserve kept for agents either.
    let top = ours.as_raw_fd().max(theirs.as_raw_fd());
    if top as u64 + 1 >= core.shared.limits.fd_ceiling {
        core.stats.error(ErrorKind::FdReserve);
        return;
    }
    // The HTTP side: exactly a plain connection, but `https`, with the
    // client settled here; it may move to another core by fd.
    public::adopt(
        core.clone(),
        theirs.into_raw_fd(),
        Bytes::new(),
        client,
        Scheme::Https,
        0,
        permit,
    );
    relay(&core, tls, ours, fd, &wd).await;
    wd.stop();
}

fn handshake_error(e: monoio_rustls::TlsError) -> String {
    match e {
        monoio_rustls::TlsError::Io(e) => match e.get_ref() {
            // rustls errors surface wrapped in io errors; say which.
            Some(inner) => inner.to_string(),
            None => e.to_string(),
        },
        monoio_rustls::TlsError::Rustls(e) => e.to_string(),
    }
}

fn socket_pair() -> std::io::Result<(UnixStream, std::os::unix::net::UnixStream)> {
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    Ok((UnixStream::from_std(a)?, b))
}

type Tls = monoio_rustls::ServerTlsStream<Prefixed>;

/// Moves bytes between the TLS client and the HTTP side until either
/// ends. Each pump passes the end on: the client's EOF becomes a
/// half-close the HTTP side sees (and treats as a client gone); the HTTP
/// side's close becomes close_notify and a closed TCP connection, which
/// also ends the other pump.
async fn relay(core: &Core, tls: Tls, unix: UnixStream, tcp_fd: RawFd, wd: &Watchdog) {
    let unix_fd = unix.as_raw_fd();
    let (mut tr, mut tw) = tls.into_split();
    let (mut ur, mut uw) = unix.into_split();
    let stall = core.cfg().write_stall_timeout;
    let up = async {
        // A blocked write here ends when the HTTP side closes its end
        // (its own deadlines) or the other pump shuts ours.
        pump(&mut tr, &mut uw, None).await;
        shutdown_fd(unix_fd, libc::SHUT_WR);
    };
    let down = async {
        pump(&mut ur, &mut tw, Some((wd, stall))).await;
        wd.arm_write(stall);
        let _ = tw.shutdown().await;
        wd.disarm_write();
        shutdown_fd(tcp_fd, libc::SHUT_RDWR);
        shutdown_fd(unix_fd, libc::SHUT_RDWR);
    };
    crate::runtime::join2(up, down).await;
}

/// Copies `r` to `w` until either ends. `stall`: each write must finish
/// within this deadline, else the watchdog shuts the socket down.
async fn pump<R: AsyncReadRent, W: AsyncWriteRent>(
    r: &mut R,
    w: &mut W,
    stall: Option<(&Watchdog, Duration)>,
) {
    let mut buf = vec![0u8; RELAY_BUF];
    loop {
        let (res, b) = r.read(buf).await;
        buf = b;
        let n = match res {
            Ok(n) if n > 0 => n,
            _ => return,
        };
        if let Some((wd, after)) = stall {
            wd.arm_write(after);
        }
        let (res, b) = w.write_all(buf.slice(..n)).await;
        if let Some((wd, _)) = stall {
            wd.disarm_write();
        }
        buf = b.into_inner();
        if res.is_err() {
            return;
        }
    }
}

/// The raw socket of an HTTPS connection, with the bytes a PROXY header
/// read took past its end served first: the start of the ClientHello.
pub(super) struct Prefixed {
    tcp: TcpStream,
    pre: Bytes,
}

// SAFETY: the read half touches `pre` and reads `tcp`; the write half only
// writes `tcp`, which TcpStream allows from both halves (it is `Split`).
unsafe impl Split for Prefixed {}

impl Prefixed {
    /// Copies up to `cap` bytes of the prefix to `dst`.
    fn take_prefix(&mut self, dst: *mut u8, cap: usize) -> usize {
        let n = self.pre.len().min(cap);
        // SAFETY: `dst` points to at least `cap` writable bytes (the
        // caller's buffer) and cannot overlap our own `Bytes`.
        unsafe { std::ptr::copy_nonoverlapping(self.pre.as_ptr(), dst, n) };
        self.pre.advance(n);
        n
    }
}

impl AsyncReadRent for Prefixed {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        if self.pre.is_empty() {
            return self.tcp.read(buf).await;
        }
        let n = self.take_prefix(buf.write_ptr(), buf.bytes_total());
        // SAFETY: n bytes were written above.
        unsafe { buf.set_init(n) };
        (Ok(n), buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        if self.pre.is_empty() {
            return self.tcp.readv(buf).await;
        }
        // The first non-empty iovec takes what fits; the next read gets
        // the rest.
        // SAFETY: the iovecs describe memory `buf` owns, alive for the call.
        let iovs =
            unsafe { std::slice::from_raw_parts(buf.write_iovec_ptr(), buf.write_iovec_len()) };
        let n = match iovs.iter().find(|v| v.iov_len > 0) {
            Some(v) => self.take_prefix(v.iov_base as *mut u8, v.iov_len),
            None => 0,
        };
        // SAFETY: n bytes were written at the start of the iovec list
        // (the empty ones before it hold none).
        unsafe { buf.set_init(n) };
        (Ok(n), buf)
    }
}

impl AsyncWriteRent for Prefixed {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.tcp.write(buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, bufs: T) -> BufResult<usize, T> {
        self.tcp.writev(bufs).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush().await
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        self.tcp.shutdown().await
    }
}
