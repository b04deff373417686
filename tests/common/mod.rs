//! Test harness: real `ringtunnel` processes on 127.0.0.1 (free ports),
//! real clients (curl and raw sockets). Every process is killed by PID
//! when its handle drops, so a failing test leaves nothing behind.

#![allow(dead_code)]

pub mod cluster;
pub mod pki;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringtunnel");

/// A child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub ready: String,
    pub name: &'static str,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Value of `key=` in the ready line.
    pub fn field(&self, key: &str) -> String {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{}: no {key}= in {:?}", self.name, self.ready))
            .to_string()
    }

    pub fn addr(&self, key: &str) -> SocketAddr {
        self.field(key).parse().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `limit` for a clean exit.
    pub fn terminate(&mut self, limit: Duration) -> bool {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `ringtunnel ARGS` and waits for a stdout line starting with
/// `ready_prefix`.
pub fn spawn(name: &'static str, args: &[&str], ready_prefix: &str) -> Proc {
    spawn_env(name, args, ready_prefix, &[])
}

pub fn echo(driver: &str, delay_ms: u64) -> Proc {
    spawn(
        "echo",
        &[
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--no-pin",
            "--driver",
            driver,
            "--delay-ms",
            &delay_ms.to_string(),
        ],
        "ringtunnel echo ready",
    )
}

/// `base` plus what every role in these tests gets: no pinning (tests
/// share the cores), the driver under test, and 2 cores unless `extra`
/// chooses.
fn role_args(base: &[&str], driver: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    args.extend(["--no-pin", "--driver", driver].map(String::from));
    if !extra.contains(&"--cores") {
        args.extend(["--cores", "2"].map(String::from));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn_args(name: &'static str, args: &[String], ready_prefix: &str) -> Proc {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(name, &refs, ready_prefix)
}

/// A gateway's arguments on free loopback ports (admin on too).
pub const GATEWAY_BASE: [&str; 7] = [
    "gateway",
    "--listen",
    "127.0.0.1:0",
    "--tunnel-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
];

pub fn gateway(driver: &str, extra: &[&str]) -> Proc {
    gateway_env(driver, extra, &[])
}

pub fn agent(driver: &str, gw: &Proc, session: &str, backend: SocketAddr, extra: &[&str]) -> Proc {
    let args = agent_args(driver, gw, session, backend, extra);
    spawn_args("agent", &args, "ringtunnel agent ready")
}

/// echo + gateway + agent for session "demo".
pub struct Stack {
    pub echo: Proc,
    pub gw: Proc,
    pub agent: Proc,
}

impl Stack {
    pub fn start(driver: &str, echo_delay: u64) -> Stack {
        let echo = echo(driver, echo_delay);
        let gw = gateway(driver, &[]);
        let agent = agent(driver, &gw, "demo", echo.addr("listen"), &[]);
        let s = Stack { echo, gw, agent };
        wait_routable(s.public(), "demo");
        s
    }

    pub fn public(&self) -> SocketAddr {
        self.gw.addr("public")
    }

    pub fn admin(&self) -> SocketAddr {
        self.gw.addr("admin")
    }
}

/// Waits until a request for `host` gets a non-502 answer on every core
/// (directory updates reach the cores asynchronously).
pub fn wait_routable(public: SocketAddr, host: &str) {
    let t = Instant::now();
    let mut ok = 0;
    while ok < 20 {
        let r = request(
            public,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        if r.status == 200 {
            ok += 1;
        } else {
            ok = 0;
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "session {host} never became routable"
        );
    }
}

/// A parsed HTTP response read off a raw socket.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response from `s` (`head_req`: the request was HEAD).
/// Understands Content-Length, chunked and close-delimited bodies.
pub fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_req: bool) -> Option<Resp> {
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        })
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    let fill = |s: &mut TcpStream, buf: &mut Vec<u8>| -> bool {
        let mut tmp = [0u8; 65536];
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    };
    if head_req || status / 100 == 1 || status == 204 || status == 304 {
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let line_end = loop {
                if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                if !fill(s, buf) {
                    return None;
                }
            };
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&buf[..line_end])
                    .split(';')
                    .next()?
                    .trim(),
                16,
            )
            .ok()?;
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                if !fill(s, buf) {
                    return None;
                }
            }
            if size == 0 {
                buf.drain(..2);
                break;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().ok()?;
        while buf.len() < n {
            if !fill(s, buf) {
                return None;
            }
        }
        body = buf.drain(..n).collect();
    } else {
        while fill(s, buf) {}
        body = std::mem::take(buf);
    }
    Some(Resp {
        status,
        headers,
        body,
    })
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// One raw request on a fresh connection; status 0 if no response.
pub fn request(addr: SocketAddr, raw: &str) -> Resp {
    request_bytes(addr, raw.as_bytes())
}

pub fn request_bytes(addr: SocketAddr, raw: &[u8]) -> Resp {
    let mut s = connect(addr);
    if s.write_all(raw).is_err() {
        return Resp {
            status: 0,
            headers: vec![],
            body: vec![],
        };
    }
    let head_req = raw.starts_with(b"HEAD ");
    let mut buf = Vec::new();
    read_response(&mut s, &mut buf, head_req).unwrap_or(Resp {
        status: 0,
        headers: vec![],
        body: vec![],
    })
}

/// curl with a Host header; returns (status, body).
pub fn curl(public: SocketAddr, host: &str, path: &str, extra: &[&str]) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-m",
            "60",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Host: {host}"),
        ])
        .args(extra)
        .arg(format!("http://{public}{path}"))
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    curl_status_body(out.stdout)
}

/// Splits curl's stdout under `-o - -w "\n%{http_code}"` into the status
/// (0 when curl got no answer) and the body.
pub fn curl_status_body(mut body: Vec<u8>) -> (u16, Vec<u8>) {
    let nl = body
        .iter()
        .rposition(|b| *b == b'\n')
        .expect("curl -w output");
    let status = String::from_utf8_lossy(&body[nl + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(nl);
    (status, body)
}

/// The echo backend's deterministic byte at offset i (mirrors
/// `ringtunnel::echo::pattern_byte`).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n as u64).map(ringtunnel::echo::pattern_byte).collect()
}

/// FNV-1a: a checksum without extra crates.
pub fn checksum(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

pub fn metrics(admin: SocketAddr) -> String {
    request(admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").text()
}

pub fn stats_json(admin: SocketAddr) -> String {
    request(admin, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n").text()
}

/// Sum of a metric's samples whose labels contain `label_filter`.
pub fn metric_sum(text: &str, name: &str, label_filter: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label_filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Generates one test per driver.
#[macro_export]
macro_rules! both_drivers {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn io_uring() {
                ($body)("uring");
            }
            #[test]
            fn epoll() {
                ($body)("legacy");
            }
        }
    };
}

// ---------------------------------------------------------------------
// Helpers added for tests/sharding.rs (sessions, placement, refusals).
// ---------------------------------------------------------------------

/// A process started without waiting for a ready line; its stdout and
/// stderr are collected as they arrive (killed on drop, like `Proc`).
pub struct Bg {
    pub proc: Proc,
    pub stdout: std::sync::Arc<std::sync::Mutex<String>>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Bg {
    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(st)) = self.proc.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits up to `limit` for `needle` on stderr.
    pub fn wait_stderr(&self, needle: &str, limit: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if self.stderr().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stderr().contains(needle)
    }
}

/// Starts `ringtunnel ARGS` and returns at once (no ready line awaited),
/// capturing stdout and stderr.
pub fn spawn_nowait(name: &'static str, args: &[&str]) -> Bg {
    spawn_nowait_env(name, args, &[])
}

/// `spawn_nowait` with extra environment variables (they win over the
/// default `RUST_LOG`).
pub fn spawn_nowait_env(name: &'static str, args: &[&str], envs: &[(&str, &str)]) -> Bg {
    let mut child = Command::new(BIN)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtunnel");
    let collect = |r: Box<dyn Read + Send>| {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let b = buf.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                let mut g = b.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        buf
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    Bg {
        proc: Proc {
            child,
            ready: String::new(),
            name,
        },
        stdout,
        stderr,
    }
}

/// The arguments `agent` uses, for `spawn_nowait`.
pub fn agent_args(
    driver: &str,
    gw: &Proc,
    session: &str,
    backend: SocketAddr,
    extra: &[&str],
) -> Vec<String> {
    let (tunnel, backend) = (gw.field("tunnel"), backend.to_string());
    let base = [
        "agent",
        "--gateway",
        &tunnel,
        "--session",
        session,
        "--to",
        &backend,
    ];
    role_args(&base, driver, extra)
}

/// Polls `GET /` for `host` until it answers `want`; returns that answer.
pub fn wait_status(public: SocketAddr, host: &str, want: u16, limit: Duration) -> Resp {
    let t = Instant::now();
    loop {
        let r = request(
            public,
            &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        if r.status == want {
            return r;
        }
        assert!(
            t.elapsed() < limit,
            "{host}: wanted {want} within {limit:?}, last {} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `"sessions":{"NAME":{"uplinks_per_core":[a,b]}}` from gateway `/stats`.
pub fn session_placement(stats: &str, name: &str) -> Option<Vec<u32>> {
    let key = format!("\"{name}\":{{\"uplinks_per_core\":[");
    let start = stats.find(&key)? + key.len();
    let end = start + stats[start..].find(']')?;
    Some(
        stats[start..end]
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().unwrap())
            .collect(),
    )
}

/// Every `"KEY":N` in `/stats` JSON, in order (per-core fields appear once
/// per core).
pub fn json_numbers(stats: &str, key: &str) -> Vec<u64> {
    let pat = format!("\"{key}\":");
    stats
        .match_indices(&pat)
        .filter_map(|(i, _)| {
            let rest = &stats[i + pat.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect()
}

/// A tiny keep-alive HTTP/1.1 backend on 127.0.0.1 that answers every
/// request with `backend=TAG\n` followed by the request head it received,
/// so a test can tell which backend served a request. Request bodies
/// (Content-Length only) are read and dropped. Threads end with their
/// connections; the accept thread lives as long as the test process.
pub fn tag_backend(tag: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let tag = tag.to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let tag = tag.clone();
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut buf = Vec::new();
                let mut tmp = [0u8; 16384];
                loop {
                    let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match c.read(&mut tmp) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..p + 4]).into_owned();
                    let cl: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim()
                                .eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < p + 4 + cl {
                        match c.read(&mut tmp) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    buf.drain(..p + 4 + cl);
                    let body = format!("backend={tag}\n{head}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if c.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------
// Helpers added for tests/streams_end.rs (streams that always end).
// ---------------------------------------------------------------------

impl Proc {
    /// Context switches of all the process's threads so far (voluntary and
    /// not): each sleep that ends, a wake-up.
    pub fn wakeups(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return 0;
        };
        tasks
            .flatten()
            .map(|t| {
                let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                s.lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }

    /// Open file descriptors of the process (`/proc/PID/fd` entries).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Current resident memory (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Like `spawn`, with extra environment variables for the child.
///
/// A server asked for port 0 picks a free port and then binds it on every
/// core; another test's connection can take that port in between, and the
/// server then exits at start-up ("address in use"). That race is the
/// harness's, not the product's: a child that exits before its ready line
/// is started again, at most twice more.
pub fn spawn_env(
    name: &'static str,
    args: &[&str],
    ready_prefix: &str,
    envs: &[(&str, &str)],
) -> Proc {
    let mut tries = 0;
    loop {
        tries += 1;
        match try_spawn_env(name, args, ready_prefix, envs) {
            Ok(p) => return p,
            Err(true) if tries < 3 => continue,
            Err(_) => panic!("{name} did not become ready: {args:?}"),
        }
    }
}

/// One start; `Err(true)`: the child exited before its ready line.
fn try_spawn_env(
    name: &'static str,
    args: &[&str],
    ready_prefix: &str,
    envs: &[(&str, &str)],
) -> Result<Proc, bool> {
    let mut child = Command::new(BIN)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RT_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(if std::env::var("RT_TEST_LOG").is_ok() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn ringtunnel");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let prefix = ready_prefix.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.starts_with(&prefix) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(ready) => Ok(Proc { child, ready, name }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e == mpsc::RecvTimeoutError::Disconnected)
        }
    }
}

/// `gateway`, with extra environment variables.
pub fn gateway_env(driver: &str, extra: &[&str], envs: &[(&str, &str)]) -> Proc {
    let args = role_args(&GATEWAY_BASE, driver, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_env("gateway", &refs, "ringtunnel gateway ready", envs)
}

/// What a gateway holds when it is idle: streams, public connections,
/// open fds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Baseline {
    pub streams: u64,
    pub conns: u64,
    pub fds: usize,
}

pub fn gateway_load(gw: &Proc, admin: SocketAddr) -> Baseline {
    let m = metrics(admin);
    Baseline {
        streams: metric_sum(&m, "ringtunnel_active_streams", "core="),
        conns: metric_sum(&m, "ringtunnel_gateway_connections", "core="),
        fds: gw.fd_count(),
    }
}

/// The idle state to come back to: waits (up to 2 s) for the streams and
/// public connections of earlier set-up traffic to go, then measures.
pub fn baseline(gw: &Proc, admin: SocketAddr) -> Baseline {
    let t = Instant::now();
    loop {
        let b = gateway_load(gw, admin);
        if (b.streams == 0 && b.conns == 0) || t.elapsed() > Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(50));
            return gateway_load(gw, admin);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until the gateway's streams and public connections are back at
/// `base` and its fd count is within `base + 2`; panics with all three
/// numbers after `limit`. Returns how long it took.
pub fn wait_baseline(gw: &Proc, admin: SocketAddr, base: Baseline, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let now = gateway_load(gw, admin);
        if now.streams <= base.streams && now.conns <= base.conns && now.fds <= base.fds + 2 {
            return t.elapsed();
        }
        if t.elapsed() > limit {
            panic!(
                "gateway not back at its baseline after {limit:?}: \
                 active streams {} (baseline {}), public connections {} (baseline {}), \
                 open fds {} (baseline {}, tolerance +2)",
                now.streams, base.streams, now.conns, base.conns, now.fds, base.fds
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Closes with SO_LINGER 0: the peer gets a RST, not a FIN.
pub fn abort(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Connects with a small receive buffer set before the handshake, so the
/// peer sees a genuinely slow (or stalled) reader at once.
pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only: {addr}")
    };
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let s = TcpStream::from_raw_fd(fd);
        assert!(
            r == 0,
            "connect {addr}: {}",
            std::io::Error::last_os_error()
        );
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

/// The HELLO of a fake agent (a test speaking the uplink protocol over a
/// std socket): open gateway, one uplink.
pub fn fake_hello(session: &str) -> ringtunnel::proto::Frame {
    use ringtunnel::proto::{Frame, Hello, PROTOCOL_VERSION};
    Frame::hello(&Hello {
        version: PROTOCOL_VERSION,
        capabilities: 0,
        agent_id: 7,
        uplink_index: 0,
        uplinks_total: 1,
        token: String::new(),
        session: session.into(),
        tcp: Vec::new(),
    })
}

/// Waits up to 5 s until `p` holds at most `fds` open descriptors.
pub fn wait_fds_at_most(p: &Proc, fds: usize) {
    let t = Instant::now();
    while p.fd_count() > fds {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}: {} fds, more than the {fds} before",
            p.name,
            p.fd_count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
