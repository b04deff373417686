//! Worker threads, core pinning, driver choice, listeners, task isolation
//! and cross-core mailboxes.
//!
//! This is the only module that creates threads. Every worker is one monoio
//! runtime on one (optionally pinned) core; everything a worker owns is
//! `!Send` and stays on it. Crossing cores is explicit: a [`mailbox`] carries
//! plain data (fds, `Bytes`, names) to another core and wakes its runtime.
//!
//! Invariants:
//! - a panic inside a task started with [`spawn_isolated`] ends that task
//!   only (monoio would otherwise unwind out of `block_on` and kill the core);
//! - a listener address that is already in use is a start-up error, even
//!   though monoio binds with SO_REUSEPORT (which would silently share it).

pub mod catch;
mod join;
pub mod mailbox;
pub mod notify;

pub use catch::{panic_message, CatchUnwind};
pub use join::join2;

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

/// Which monoio driver a worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverKind {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring only; start-up fails if unavailable.
    Uring,
    /// epoll (monoio's legacy driver).
    Legacy,
}

impl DriverKind {
    /// Resolves `Auto` against what this kernel offers.
    pub fn resolve(self) -> DriverKind {
        match self {
            DriverKind::Auto if monoio::utils::detect_uring() => DriverKind::Uring,
            DriverKind::Auto => DriverKind::Legacy,
            other => other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Auto => "auto",
            DriverKind::Uring => "io_uring",
            DriverKind::Legacy => "epoll",
        }
    }
}

/// How to start a group of workers.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// Thread name prefix, e.g. "gw" gives threads "gw-0", "gw-1".
    pub name: String,
    pub cores: usize,
    pub pin: bool,
    pub driver: DriverKind,
    /// Pin worker i to core `(first_core + i) % ncpu`; lets a demo place
    /// roles on different cores.
    pub first_core: usize,
}

impl WorkerSpec {
    pub fn new(name: &str, cores: usize) -> Self {
        WorkerSpec {
            name: name.to_string(),
            cores: cores.max(1),
            pin: true,
            driver: DriverKind::Auto,
            first_core: 0,
        }
    }
}

/// Number of cores this process may run on.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Running worker threads.
pub struct Workers {
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Waits until every worker's main future has ended.
    pub fn join(self) {
        for h in self.handles {
            if h.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// io_uring submission queue size; 32768 is the largest accepted here, and
/// far more than the few thousand ops a core keeps in flight.
const URING_ENTRIES: u32 = 4096;

/// Spawns `spec.cores` threads; each builds a monoio runtime (timers on)
/// and runs `f(core_index)` to completion. Fails before spawning anything
/// if the requested driver is unavailable.
pub fn spawn_workers<F, Fut>(spec: &WorkerSpec, f: F) -> io::Result<Workers>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    if spec.cores == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--cores 0: at least one worker core is needed",
        ));
    }
    let driver = spec.driver.resolve();
    if spec.driver == DriverKind::Uring && !monoio::utils::detect_uring() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring requested (--driver uring) but the kernel does not allow it; use --driver legacy",
        ));
    }
    let core_ids = if spec.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let f = std::sync::Arc::new(f);
    let mut handles = Vec::with_capacity(spec.cores);
    for i in 0..spec.cores {
        let f = f.clone();
        let pin_to = if core_ids.is_empty() {
            None
        } else {
            Some(core_ids[(spec.first_core + i) % core_ids.len()])
        };
        let role = spec.name.clone();
        let h = std::thread::Builder::new()
            .name(format!("{}-{}", spec.name, i))
            .spawn(move || {
                let pinned = match pin_to {
                    Some(id) if core_affinity::set_for_current(id) => Some(id.id),
                    _ => None,
                };
                tracing::info!(
                    role = %role,
                    core = i,
                    driver = driver.as_str(),
                    pinned_cpu = %pinned.map_or("none".to_string(), |c| c.to_string()),
                    "worker started"
                );
                run_on_driver(driver, f(i));
            })?;
        handles.push(h);
    }
    Ok(Workers { handles })
}

fn run_on_driver<Fut: Future<Output = ()>>(driver: DriverKind, fut: Fut) {
    match driver {
        DriverKind::Legacy => {
            let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .expect("build epoll runtime");
            rt.block_on(fut);
        }
        _ => {
            let build = |urb: io_uring::Builder| {
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(URING_ENTRIES)
                    .uring_builder(urb)
                    .enable_timer()
                    .build()
            };
            let mut rt = match build(tuned_uring()) {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "io_uring setup flags refused by this kernel; using a plain ring"
                    );
                    build(io_uring::IoUring::builder()).expect("build io_uring runtime")
                }
            };
            rt.block_on(fut);
        }
    }
}

/// The ring's setup flags. A ring is built, submitted to and reaped on its
/// worker thread only, which is what SINGLE_ISSUER promises the kernel (it
/// then skips the submitter locking); COOP_TASKRUN lets completions wait
/// for the thread's next io_uring_enter instead of interrupting it with an
/// IPI-driven task-work run while it is busy in user space (measured in
/// docs/BENCHMARKS.md, issue 9). Kernels older than 6.0 refuse them, and
/// [`run_on_driver`] then falls back to a plain ring.
fn tuned_uring() -> io_uring::Builder {
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun().setup_single_issuer();
    urb
}

static TASK_PANICS: AtomicU64 = AtomicU64::new(0);

/// Tasks that panicked and were isolated since start-up (all cores).
pub fn task_panics() -> u64 {
    TASK_PANICS.load(Ordering::Relaxed)
}

/// Spawns a task on the current core whose panic ends only that task
/// (logged and counted in [`task_panics`]).
pub fn spawn_isolated<F: Future<Output = ()> + 'static>(what: &'static str, fut: F) {
    monoio::spawn(catch::Isolated::new(what, fut));
}

/// Logs and counts a task's panic (see [`spawn_isolated`]).
fn count_panic(what: &'static str, payload: &(dyn std::any::Any + Send)) {
    TASK_PANICS.fetch_add(1, Ordering::Relaxed);
    tracing::error!(
        task = what,
        panic = panic_message(payload),
        "task panicked; it alone was ended"
    );
}

/// Runs `f` with the same isolation as [`spawn_isolated`], for work done
/// inline by a long-lived loop (a core's mailbox): a panic in handling one
/// message is logged and counted, and the loop goes on with the next.
pub fn run_isolated(what: &'static str, f: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        TASK_PANICS.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            task = what,
            panic = panic_message(payload.as_ref()),
            "panic while handling a message; the loop goes on"
        );
    }
}

/// Resolves `addr` once (blocking lookups must never run on a core) and
/// checks that nobody listens there yet. Port 0 is resolved to a concrete
/// free port so that every core's SO_REUSEPORT listener shares it.
pub fn reserve_listen_addr(addr: &str) -> io::Result<SocketAddr> {
    let resolved = addr
        .to_socket_addrs()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot resolve listen address {addr}: {e}"),
            )
        })?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no address for {addr}"),
            )
        })?;
    // std's listener does not set SO_REUSEPORT, so this bind fails exactly
    // when another socket already holds the port.
    let probe = std::net::TcpListener::bind(resolved).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {resolved}: {e} (is another ringtunnel or server already using it?)"),
        )
    })?;
    let actual = probe.local_addr()?;
    drop(probe);
    Ok(actual)
}

/// Binds one core's SO_REUSEPORT listener; must run on a worker thread.
///
/// TCP_NODELAY is set on the listener: Linux copies it to every accepted
/// socket, which saves the accept path a setsockopt(2) per connection
/// (issue 9, docs/BENCHMARKS.md).
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<monoio::net::TcpListener> {
    use std::os::fd::AsRawFd;
    let opts = monoio::net::ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(4096);
    let l = monoio::net::TcpListener::bind_with_config(addr, &opts)?;
    set_nodelay(l.as_raw_fd())?;
    Ok(l)
}

/// Sets TCP_NODELAY on `fd`.
fn set_nodelay(fd: std::os::fd::RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid option pointer and length for an fd we own.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Resolves a `host:port` once, before the runtimes start.
pub fn resolve(addr: &str) -> io::Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no address for {addr}"),
            )
        })
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft
/// limit. Thousands of connections need it and the default is often 1024.
pub fn raise_nofile_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    rl.rlim_cur
}

/// Starts a plain (non-runtime) helper thread, e.g. the admin endpoint.
pub fn spawn_service_thread(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn nodelay(fd: std::os::fd::RawFd) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid out pointers for an fd the test owns.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        v
    }

    /// A task spawned with `spawn_isolated` that panics ends alone: it is
    /// counted, its sibling runs on, and so does the runtime.
    #[test]
    fn spawn_isolated_counts_a_panic_and_the_core_goes_on() {
        let before = task_panics();
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let done = std::rc::Rc::new(std::cell::Cell::new(false));
        let d = done.clone();
        rt.block_on(async move {
            spawn_isolated("test-panic", async {
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                if std::hint::black_box(true) {
                    panic!("isolated");
                }
            });
            spawn_isolated("test-sibling", async move {
                monoio::time::sleep(std::time::Duration::from_millis(5)).await;
                d.set(true);
            });
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
        });
        assert!(done.get(), "the sibling task did not finish");
        assert!(task_panics() > before, "the panic was not counted");
    }

    /// The accept path no longer sets TCP_NODELAY per connection: an
    /// accepted socket must get it from the listener, on both drivers.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        for driver in [DriverKind::Auto.resolve(), DriverKind::Legacy] {
            run_on_driver(driver, async move {
                let l = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
                assert_eq!(nodelay(l.as_raw_fd()), 1);
                // The kernel completes the handshake into the backlog.
                let _client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
                let (s, _) = l.accept().await.unwrap();
                assert_ne!(
                    nodelay(s.as_raw_fd()),
                    0,
                    "{}: accepted socket without TCP_NODELAY",
                    driver.as_str()
                );
            });
        }
    }
}
