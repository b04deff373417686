//! The admin endpoint: `GET /metrics` (Prometheus text) and `GET /stats`
//! (JSON), for the gateway and the agent.
//!
//! It runs on its own small thread with blocking IO: it reads the per-core
//! counters (relaxed atomics) and never touches a core's `Rc` state, so it
//! adds nothing to the data path.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

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
}

/// Binds `addr` and serves until the process ends. Returns the address.
pub fn start(addr: &str, src: Arc<dyn StatsSource>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on admin address {addr}: {e}"),
        )
    })?;
    let local = listener.local_addr()?;
    crate::runtime::spawn_service_thread("admin", move || {
        for conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            handle(conn, &*src);
        }
    })?;
    Ok(local)
}

fn handle(mut conn: std::net::TcpStream, src: &dyn StatsSource) {
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while got < buf.len() {
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
    let line = String::from_utf8_lossy(&buf[..got]);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, ctype, body) = match path.split('?').next().unwrap_or("/") {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render_metrics(src)),
        "/stats" => ("200 OK", "application/json", render_json(src)),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /stats\n".to_string(),
        ),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
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
