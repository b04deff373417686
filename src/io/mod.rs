//! Socket-facing loops over monoio: the uplink (frame reader, the single
//! batched writer, its stream table) and small rent-style IO helpers.
//!
//! Only this module, `gateway/`, `agent/`, `echo/` and `bench/` touch
//! `monoio::net`; the protocol and HTTP logic they drive is sans-IO
//! (`proto/`, `http/`).

pub mod batch;
pub mod stats;
pub mod uplink;
pub mod watchdog;

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent};

/// Reads at least one byte and appends it to `buf`. Returns 0 on EOF.
///
/// monoio reads write from the start of the buffer they are given, so we
/// lend it the spare capacity as a slice and take the buffer back.
pub async fn read_append<R: AsyncReadRent>(
    r: &mut R,
    buf: BytesMut,
    min_spare: usize,
) -> (std::io::Result<usize>, BytesMut) {
    let mut buf = buf;
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(min_spare);
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (res, slice) = r.read(buf.slice_mut(len..cap)).await;
    (res, slice.into_inner())
}

/// Writes all of `data`, resuming after short writes.
pub async fn write_all<W: AsyncWriteRent, B: monoio::buf::IoBuf>(
    w: &mut W,
    data: B,
) -> std::io::Result<B> {
    let (res, data) = monoio::io::AsyncWriteRentExt::write_all(w, data).await;
    res.map(|_| data)
}

/// Half- or full-closes a socket by fd, so that a read pending on it in
/// another task ends. This is how timeouts and aborts stop a reader:
/// dropping an in-flight io_uring read can lose delivered bytes.
pub fn shutdown_fd(fd: std::os::fd::RawFd, how: libc::c_int) {
    // SAFETY: shutdown on an fd we own; errors (e.g. ENOTCONN) are moot.
    unsafe {
        libc::shutdown(fd, how);
    }
}
