//! Socket-facing loops over monoio: the uplink (frame reader, the single
//! batched writer, its stream table) and small rent-style IO helpers.
//!
//! Only this module, `gateway/`, `agent/`, `echo/` and `bench/` touch
//! `monoio::net`; the protocol and HTTP logic they drive is sans-IO
//! (`proto/`, `http/`).

pub mod batch;
pub mod relay;
pub mod stats;
pub mod transport;
pub mod uplink;
pub mod watchdog;

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent};

/// Reads at least one byte and appends it to `buf`. Returns 0 on EOF.
///
/// monoio reads write from the start of the buffer they are given, so we
/// lend it the spare capacity as a slice and take the buffer back. When
/// fewer than `min_spare` bytes are free, `chunk` more are reserved: big
/// chunks serve many reads, so a reader whose earlier bytes were split off
/// (and are still referenced) does not allocate and copy on every read.
pub async fn read_append<R: AsyncReadRent>(
    r: &mut R,
    buf: BytesMut,
    min_spare: usize,
    chunk: usize,
) -> (std::io::Result<usize>, BytesMut) {
    let mut buf = buf;
    if buf.capacity() - buf.len() < min_spare {
        buf.reserve(chunk.max(min_spare));
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

thread_local! {
    static CARVE: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Chunk from which [`carve`] cuts buffers.
const CARVE_CHUNK: usize = 256 * 1024;

/// An empty buffer with `size` bytes of capacity, cut from a per-core
/// 256 KiB chunk: one allocation serves many requests or connections
/// instead of one malloc (and later free) each. The chunk is freed when
/// the last buffer cut from it (and every `Bytes` split off one) is gone.
pub fn carve(size: usize) -> BytesMut {
    CARVE.with(|c| {
        let mut spare = c.borrow_mut();
        if spare.capacity() < size {
            *spare = BytesMut::with_capacity(CARVE_CHUNK.max(size));
        }
        let rest = spare.split_off(size);
        std::mem::replace(&mut *spare, rest)
    })
}
