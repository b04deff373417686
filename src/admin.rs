//! The admin endpoint: `GET /metrics` (Prometheus text), `GET /stats`
//! (JSON) and the live dashboard at `GET /` (a page polling `/stats`, see
//! `admin/dashboard/`), for the gateway and the agent.
//!
//! It runs on its own small thread with blocking IO: it reads the per-core
//! counters (relaxed atomics) and never touches a core's `Rc` state, so it
//! adds nothing to the data path.
//!
//! One thread serves one connection at a time, so no client may hold it:
//! a connection gets [`CONN_DEADLINE`] for its request and again for the
//! answer (a client that never sends or never reads is dropped), and an
//! accept error (EMFILE) backs off instead of spinning. With a token
//! (`--admin-token`), requests for `/stats` and `/metrics` without
//! `Authorization: Bearer <token>` get 401; the dashboard's static files
//! carry no data and are served to anyone (the page asks for the token
//! and sends it with each poll).
//!
//! Per-session windows (the gateway's `sessions` in `/stats`): each core
//! writes its own [`SessionWindows`]; this thread reads every core's and
//! merges them by session name (`io/stats.rs` says how, without a lock on
//! the request path).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::io::stats::{
    CoreStats, ErrorKind, Hist, HistSnapshot, SessionWindows, WindowSnapshot, HIST_BOUNDS,
    HIST_BUCKETS, MAX_WINDOW_SESSIONS, WINDOW_BYTES, WINDOW_SECS,
};

mod dashboard;

/// What a role exposes.
pub trait StatsSource: Send + Sync + 'static {
    /// "gateway" or "agent": the prefix of role-specific metric names.
    fn role(&self) -> &'static str;
    fn cores(&self) -> &[Arc<CoreStats>];
    /// Extra JSON members, without braces.
    fn extra_json(&self) -> String {
        String::new()
    }
    /// Sessions with their uplinks per core (the gateway), in name order.
    fn sessions(&self) -> Option<Vec<(String, Vec<u32>)>> {
        None
    }
    /// Per-core session windows (the gateway).
    fn windows(&self) -> &[Arc<SessionWindows>] {
        &[]
    }
    /// `GET /health`: the status line and one word, for load balancers.
    /// Ready unless said otherwise.
    fn health(&self) -> (&'static str, &'static str) {
        ("200 OK", "ready")
    }
    /// Lines after the `/health` word (each ending in a newline), e.g. a
    /// clustered agent's nodes; load balancers look at the status and the
    /// first word only.
    fn health_detail(&self) -> String {
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

/// Requests the admin endpoints of this process have read (any path):
/// `admin_requests` in `/stats`, e.g. to see a dashboard's polls.
static ADMIN_REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
    ADMIN_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let line = String::from_utf8_lossy(&buf[..got]);
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let authorized = opts
        .token
        .as_deref()
        .map_or(true, |t| bearer_matches(&line, t));
    let (status, ctype, body) = match path {
        // Static files: no data in them, and a browser cannot send a
        // bearer token with a navigation.
        _ if dashboard::asset(path).is_some() => {
            let (ctype, body) = dashboard::asset(path).unwrap_or_default();
            ("200 OK", ctype, body.to_string())
        }
        // For load balancers' health checks, which carry no token; one
        // word says nothing an outsider could use.
        "/health" => {
            let (status, word) = src.health();
            (
                status,
                "text/plain",
                format!("{word}\n{}", src.health_detail()),
            )
        }
        _ if !authorized => (
            "401 Unauthorized",
            "text/plain",
            "admin token required\n".to_string(),
        ),
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render_metrics(src)),
        "/stats" => (
            "200 OK",
            "application/json",
            render_json_with(src, &StatsQuery::parse(query)),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try / (dashboard), /metrics, /stats or /health\n".to_string(),
        ),
    };
    let challenge = if authorized {
        ""
    } else {
        "WWW-Authenticate: Bearer\r\n"
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\n{challenge}Content-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{}Connection: close\r\n\r\n{body}",
        body.len(),
        dashboard::SECURITY_HEADERS,
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

/// What `/stats?...` asks for: with `limit`, one page of sessions
/// (`sessions_page`) ordered by recent request rate, filtered by `q` (a
/// substring of the name), from `offset`; without it, every session in
/// `sessions`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsQuery {
    pub limit: Option<usize>,
    pub offset: usize,
    pub filter: String,
}

/// Rows one page may hold.
pub const MAX_PAGE: usize = 500;

impl StatsQuery {
    pub fn parse(query: &str) -> StatsQuery {
        let mut q = StatsQuery::default();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "limit" => q.limit = v.parse::<usize>().ok().map(|n| n.min(MAX_PAGE)),
                "offset" => q.offset = v.parse().unwrap_or(0),
                "q" => q.filter = v.trim().to_ascii_lowercase(),
                _ => {}
            }
        }
        q
    }
}

/// `%XX` and `+` of a query value; bytes that do not decode stay as they
/// are, and non-UTF-8 is replaced.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every core's windows merged by session, read at the current second.
fn merged_windows(src: &dyn StatsSource) -> HashMap<Arc<str>, WindowSnapshot> {
    let now = crate::io::stats::window_second(Instant::now());
    let mut out = HashMap::new();
    for w in src.windows() {
        w.read(now, &mut out);
    }
    out
}

/// A session's window as JSON members (no braces).
fn window_json(w: &WindowSnapshot) -> String {
    format!(
        "\"requests\":{},\"errors\":{},\"rps\":{:.2},\"rps_1m\":{:.2},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}",
        w.requests,
        w.errors,
        w.rate(RECENT_SECS),
        w.rate_1m(),
        w.quantile_us(0.5),
        w.quantile_us(0.99),
        w.max_us
    )
}

/// The "recent" request rate (`rps`) is the mean of this many complete
/// seconds: quick to follow a change, steadier than one second.
pub const RECENT_SECS: usize = 5;

fn join_numbers<T: std::fmt::Display>(v: impl IntoIterator<Item = T>) -> String {
    v.into_iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The gateway's sessions: all of them (`sessions`, by name), or one page
/// (`sessions_page`), plus what the windows cost (`window`).
fn sessions_json(src: &dyn StatsSource, q: &StatsQuery) -> Option<String> {
    let sessions = src.sessions()?;
    let windows = merged_windows(src);
    let empty = WindowSnapshot::default();
    let untracked: u64 = src.windows().iter().map(|w| w.untracked()).sum();
    let meta = format!(
        "\"window\":{{\"seconds\":{WINDOW_SECS},\"recent_seconds\":{RECENT_SECS},\"max_sessions_per_core\":{MAX_WINDOW_SESSIONS},\"bytes_per_session_per_core\":{WINDOW_BYTES},\"untracked\":{untracked}}}"
    );
    let Some(limit) = q.limit else {
        let all: Vec<String> = sessions
            .iter()
            .map(|(name, per_core)| {
                let w = windows.get(name.as_str()).unwrap_or(&empty);
                format!(
                    "\"{name}\":{{\"uplinks_per_core\":[{}],\"window\":{{{}}}}}",
                    join_numbers(per_core),
                    window_json(w)
                )
            })
            .collect();
        return Some(format!("\"sessions\":{{{}}},{meta}", all.join(",")));
    };
    let total = sessions.len();
    let mut rows: Vec<(&String, &Vec<u32>, &WindowSnapshot)> = sessions
        .iter()
        .filter(|(name, _)| name.contains(q.filter.as_str()))
        .map(|(name, per_core)| (name, per_core, windows.get(name.as_str()).unwrap_or(&empty)))
        .collect();
    let matched = rows.len();
    // Busiest first; names break ties so a page is stable between polls.
    rows.sort_by(|a, b| {
        b.2.rate(RECENT_SECS)
            .total_cmp(&a.2.rate(RECENT_SECS))
            .then(b.2.requests.cmp(&a.2.requests))
            .then(a.0.cmp(b.0))
    });
    let page: Vec<String> = rows
        .iter()
        .skip(q.offset)
        .take(limit)
        .map(|(name, per_core, w)| {
            format!(
                "{{\"name\":\"{name}\",\"uplinks_per_core\":[{}],{},\"series\":[{}]}}",
                join_numbers(per_core.iter()),
                window_json(w),
                join_numbers(w.per_second)
            )
        })
        .collect();
    Some(format!(
        "\"sessions_page\":{{\"total\":{total},\"matched\":{matched},\"offset\":{},\"limit\":{limit},\"rows\":[{}]}},{meta}",
        q.offset,
        page.join(",")
    ))
}

/// `/stats` with every session.
pub fn render_json(src: &dyn StatsSource) -> String {
    render_json_with(src, &StatsQuery::default())
}

pub fn render_json_with(src: &dyn StatsSource, q: &StatsQuery) -> String {
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
    // The frames-per-writev histogram of all cores, for a chart:
    // `counts` has one more entry than `bounds` (the +Inf bucket).
    let mut fpw = HistSnapshot::default();
    for c in src.cores() {
        fpw.merge(&c.frames_per_writev.snapshot());
    }
    let mut extra: Vec<String> = vec![format!(
        "\"frames_per_writev_hist\":{{\"bounds\":[{}],\"counts\":[{}]}}",
        join_numbers(HIST_BOUNDS),
        join_numbers(fpw.buckets)
    )];
    extra.extend(sessions_json(src, q));
    extra.push(src.extra_json());
    extra.retain(|e| !e.is_empty());
    format!(
        "{{\"role\":\"{}\",\"task_panics\":{},\"admin_requests\":{},\"cores\":[{}],{}}}\n",
        src.role(),
        crate::runtime::task_panics(),
        ADMIN_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
        cores.join(","),
        extra.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_query_parses_paging_and_a_decoded_filter() {
        let q = StatsQuery::parse("limit=25&offset=50&q=My%20App+x&junk&limit2=3");
        assert_eq!(
            q,
            StatsQuery {
                limit: Some(25),
                offset: 50,
                filter: "my app x".into()
            }
        );
        // A page is capped; nonsense is ignored; a bad escape stays as is.
        assert_eq!(StatsQuery::parse("limit=100000").limit, Some(MAX_PAGE));
        assert_eq!(
            StatsQuery::parse("limit=x&offset=-1"),
            StatsQuery::default()
        );
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%e2%80%93"), "\u{2013}");
    }

    #[test]
    fn dashboard_files_are_served_and_refer_only_to_themselves() {
        let (ctype, html) = dashboard::asset("/").unwrap();
        assert!(ctype.starts_with("text/html"));
        for f in ["/dashboard.js", "/dashboard.css"] {
            assert!(html.contains(&format!("\"{f}\"")), "{f}");
            assert!(dashboard::asset(f).is_some(), "{f}");
        }
        // Nothing from another origin (no CDN).
        for (_, body) in
            ["/", "/dashboard.js", "/dashboard.css"].map(|p| dashboard::asset(p).unwrap())
        {
            assert!(!body.contains("https://") && !body.contains("//cdn"));
        }
        assert!(dashboard::asset("/stats").is_none());
    }
}
