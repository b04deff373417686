//! The admin endpoint: `GET /metrics` (Prometheus text) and `GET /stats`
//! (JSON), for the gateway and the agent.
//!
//! It runs on its own small thread with blocking IO: it reads the per-core
//! counters (relaxed atomics) and never touches a core's `Rc` state, so it
//! adds nothing to the data path.
//!
//! One thread serves one connection at a time, so no client may hold it:
//! a connection gets [`CONN_DEADLINE`] for its request and again for the
//! answer (a client that never sends or never reads is dropped), and an
//! accept error (EMFILE) backs off instead of spinning. With a token
//! (`--admin-token`), requests without `Authorization: Bearer <token>` get
//! 401.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::io::stats::{CoreStats, ErrorKind, Hist, HistSnapshot, HIST_BUCKETS};

/// What a role exposes.
pub trait StatsSource: Send + Sync + 'static {
    /// "gateway" or "agent": the prefix of role-specific metric names.
    fn role(&self) -> &'static str;
    fn cores(&self) -> &[Arc<CoreStats>];
    /// Extra JSON members (e.g. `"sessions": {...}`), without braces.
    fn extra_json(&self) -> String {
        String::new()
    }
    /// Extra Prometheus text appended to `/metrics`.
    fn extra_metrics(&self) -> String {
        String::new()
    }
}

/// How long one admin connection may take to send its request, and again
/// to take its answer.
pub const CONN_DEADLINE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Default)]
pub struct AdminOptions {
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
}

/// Binds `addr` and serves until the process ends. Returns the address.
pub fn start(addr: &str, src: Arc<dyn StatsSource>) -> std::io::Result<SocketAddr> {
    start_with(addr, src, AdminOptions::default())
}

/// [`start`] with options (a bearer token).
pub fn start_with(
    addr: &str,
    src: Arc<dyn StatsSource>,
    opts: AdminOptions,
) -> std::io::Result<SocketAddr> {
    serve_blocking("admin", addr, move |conn| handle(conn, &*src, &opts))
}

/// Binds `addr` and serves it on a service thread named `name` until the
/// process ends, one connection at a time, each read and write bounded by
/// [`CONN_DEADLINE`]. Returns the bound address.
pub(crate) fn serve_blocking(
    name: &'static str,
    addr: &str,
    mut handle: impl FnMut(std::net::TcpStream) + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {name} address {addr}: {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    crate::runtime::spawn_service_thread(name, move || {
        let mut backoff = crate::limits::AcceptBackoff::new(name);
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    backoff.succeeded();
                    let _ = conn.set_read_timeout(Some(CONN_DEADLINE));
                    let _ = conn.set_write_timeout(Some(CONN_DEADLINE));
                    handle(conn);
                }
                // At EMFILE the connection stays queued and accept fails
                // at once, forever: wait instead of spinning.
                Err(e) => std::thread::sleep(backoff.failed(&e, Instant::now())),
            }
        }
    })?;
    Ok(local)
}

/// Reads a request head into `buf` (until its empty line, a full buffer,
/// EOF or `deadline`); the bytes read. The socket's timeout bounds each
/// read; the deadline bounds them all (a client trickling one byte per
/// second).
pub(crate) fn read_head(
    conn: &mut std::net::TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> usize {
    let mut got = 0;
    while got < buf.len() && Instant::now() < deadline {
        match conn.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got += n;
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    got
}

fn handle(mut conn: std::net::TcpStream, src: &dyn StatsSource, opts: &AdminOptions) {
    let mut buf = [0u8; 4096];
    let got = read_head(&mut conn, &mut buf, Instant::now() + CONN_DEADLINE);
    let line = String::from_utf8_lossy(&buf[..got]);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let authorized = opts
        .token
        .as_deref()
        .map_or(true, |t| bearer_matches(&line, t));
    let (status, ctype, body) = match path.split('?').next().unwrap_or("/") {
        _ if !authorized => (
            "401 Unauthorized",
            "text/plain",
            "admin token required\n".to_string(),
        ),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render_metrics(src)),
        "/stats" => ("200 OK", "application/json", render_json(src)),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /stats\n".to_string(),
        ),
    };
    let challenge = if authorized {
        ""
    } else {
        "WWW-Authenticate: Bearer\r\n"
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\n{challenge}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_until(&mut conn, resp.as_bytes(), Instant::now() + CONN_DEADLINE);
}

/// Writes what the peer takes before `deadline`; a peer that stops
/// reading is dropped (each write is bounded by the socket's timeout).
pub(crate) fn write_until(conn: &mut std::net::TcpStream, mut data: &[u8], deadline: Instant) {
    while !data.is_empty() && Instant::now() < deadline {
        match conn.write(data) {
            Ok(0) | Err(_) => return,
            Ok(n) => data = &data[n..],
        }
    }
}

/// Whether the head carries `Authorization: Bearer <token>`, compared
/// without an early exit.
fn bearer_matches(head: &str, token: &str) -> bool {
    head.split("\r\n").skip(1).any(|l| {
        let Some((name, value)) = l.split_once(':') else {
            return false;
        };
        let Some(given) = value.trim().strip_prefix("Bearer ") else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("authorization")
            && given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    CoreStats::get(c)
}

/// Prometheus text format; every series has a `core` label.
pub fn render_metrics(src: &dyn StatsSource) -> String {
    let role = src.role();
    let cores = src.cores();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, f: &dyn Fn(&CoreStats) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, c) in cores.iter().enumerate() {
            let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", f(c));
        }
    };
    counter(
        &format!("ringtunnel_{role}_requests_total"),
        "Public requests received.",
        "counter",
        &|c| get(&c.requests),
    );
    counter(
        &format!("ringtunnel_{role}_handoffs_total"),
        "Connections handed to another core.",
        "counter",
        &|c| get(&c.handoffs_out),
    );
    counter(
        &format!("ringtunnel_{role}_connections"),
        "Open public connections.",
        "gauge",
        &|c| get(&c.public_conns),
    );
    counter(
        &format!("ringtunnel_{role}_https_connections"),
        "Open HTTPS connections whose TLS is on this core.",
        "gauge",
        &|c| get(&c.https_conns),
    );
    counter("ringtunnel_uplinks", "Open uplinks.", "gauge", &|c| {
        get(&c.uplinks)
    });
    counter(
        "ringtunnel_active_streams",
        "Open streams.",
        "gauge",
        &|c| get(&c.active_streams),
    );
    counter(
        "ringtunnel_uplink_frames_total",
        "Frames written to uplinks.",
        "counter",
        &|c| get(&c.frames),
    );
    counter(
        "ringtunnel_uplink_writev_total",
        "writev calls on uplinks.",
        "counter",
        &|c| get(&c.writevs),
    );
    counter(
        "ringtunnel_uplink_bytes_total",
        "Bytes written to uplinks.",
        "counter",
        &|c| get(&c.bytes_out),
    );
    counter(
        "ringtunnel_uplink_frames_received_total",
        "Frames read from uplinks.",
        "counter",
        &|c| get(&c.frames_in),
    );
    counter(
        "ringtunnel_uplink_queue_depth",
        "Frames queued for uplink writers.",
        "gauge",
        &|c| get(&c.queue_depth),
    );
    counter(
        "ringtunnel_uplink_queue_depth_max",
        "Largest uplink queue seen.",
        "gauge",
        &|c| get(&c.queue_depth_max),
    );
    let _ = writeln!(
        out,
        "# HELP ringtunnel_errors_total Errors by kind.\n# TYPE ringtunnel_errors_total counter"
    );
    for (i, c) in cores.iter().enumerate() {
        for k in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "ringtunnel_errors_total{{core=\"{i}\",kind=\"{}\"}} {}",
                k.as_str(),
                c.error_count(k)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP ringtunnel_task_panics_total Tasks that panicked and were isolated.\n# TYPE ringtunnel_task_panics_total counter\nringtunnel_task_panics_total {}",
        crate::runtime::task_panics()
    );
    let name = "ringtunnel_uplink_frames_per_writev";
    let _ = writeln!(
        out,
        "# HELP {name} Frames per writev call.\n# TYPE {name} histogram"
    );
    for (i, c) in cores.iter().enumerate() {
        let s = c.frames_per_writev.snapshot();
        let mut cum = 0;
        for b in 0..HIST_BUCKETS {
            cum += s.buckets[b];
            let le = Hist::bucket_bound(b)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(out, "{name}_bucket{{core=\"{i}\",le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{name}_sum{{core=\"{i}\"}} {}\n{name}_count{{core=\"{i}\"}} {}",
            s.sum, s.count
        );
    }
    out.push_str(&src.extra_metrics());
    out
}

fn hist_json(s: &HistSnapshot) -> String {
    format!(
        "{{\"count\":{},\"mean\":{:.2},\"p50\":{},\"p99\":{},\"max\":{}}}",
        s.count,
        s.mean(),
        s.quantile(0.5),
        s.quantile(0.99),
        s.max
    )
}

pub fn render_json(src: &dyn StatsSource) -> String {
    let mut cores = Vec::new();
    for (i, c) in src.cores().iter().enumerate() {
        let errors: Vec<String> = ErrorKind::ALL
            .iter()
            .map(|k| format!("\"{}\":{}", k.as_str(), c.error_count(*k)))
            .collect();
        cores.push(format!(
            "{{\"core\":{i},\"public_connections\":{},\"requests\":{},\"handoffs_out\":{},\"handoffs_in\":{},\"active_streams\":{},\"uplinks\":{},\"frames_written\":{},\"writev_calls\":{},\"bytes_written\":{},\"frames_read\":{},\"bytes_read\":{},\"frames_per_writev\":{},\"kib_per_writev\":{},\"queue_depth\":{},\"queue_depth_max\":{},\"errors\":{{{}}}}}",
            get(&c.public_conns),
            get(&c.requests),
            get(&c.handoffs_out),
            get(&c.handoffs_in),
            get(&c.active_streams),
            get(&c.uplinks),
            get(&c.frames),
            get(&c.writevs),
            get(&c.bytes_out),
            get(&c.frames_in),
            get(&c.bytes_in),
            hist_json(&c.frames_per_writev.snapshot()),
            hist_json(&c.kib_per_writev.snapshot()),
            get(&c.queue_depth),
            get(&c.queue_depth_max),
            errors.join(",")
        ));
    }
    let extra = src.extra_json();
    let sep = if extra.is_empty() { "" } else { "," };
    format!(
        "{{\"role\":\"{}\",\"task_panics\":{},\"cores\":[{}]{sep}{extra}}}\n",
        src.role(),
        crate::runtime::task_panics(),
        cores.join(",")
    )
}
