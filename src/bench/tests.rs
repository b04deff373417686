//! Load runs against small std::net servers on 127.0.0.1 (thread per
//! connection, fixed answers), plus command-line parsing. No timing
//! assertions beyond loose sanity bounds.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Reply {
    Length,
    Chunked,
    /// Close-delimited body.
    Close,
    Status500,
    /// Keep-alive framing, but the server closes after every response.
    LengthThenClose,
    /// Reads requests and never answers.
    Silent,
}

struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    hosts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl TestServer {
    fn url(&self) -> String {
        format!("http://{}/path", self.addr)
    }
}

fn start_server(reply: Reply) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let hosts = Arc::new(Mutex::new(BTreeMap::new()));
    let (acc, hs) = (accepted.clone(), hosts.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            acc.fetch_add(1, Ordering::Relaxed);
            let hs = hs.clone();
            std::thread::spawn(move || serve(stream, reply, &hs));
        }
    });
    TestServer {
        addr,
        accepted,
        hosts,
    }
}

fn serve(mut s: TcpStream, reply: Reply, hosts: &Mutex<BTreeMap<String, u64>>) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Read one request head (and its body, if any).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let body_len: usize = header("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let host = header("host:").unwrap_or_default();
        *hosts.lock().unwrap().entry(host).or_insert(0) += 1;
        let client_close = header("connection:").is_some_and(|v| v.contains("close"));

        let resp: &[u8] = match reply {
            Reply::Length | Reply::LengthThenClose => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            }
            Reply::Chunked => {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            }
            Reply::Close => b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello, until close",
            Reply::Status500 => b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
            Reply::Silent => continue,
        };
        let resp = if head.starts_with("head ") {
            // A HEAD answer carries the head only.
            let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            &resp[..end]
        } else {
            resp
        };
        if s.write_all(resp).is_err() {
            return;
        }
        if client_close || matches!(reply, Reply::Close | Reply::LengthThenClose) {
            return;
        }
    }
}

fn spec(url: &str) -> LoadSpec {
    let mut s = LoadSpec::new(url);
    s.conns = 4;
    s.cores = 2;
    s.warmup = Duration::ZERO;
    s.duration = Duration::from_secs(30);
    s.timeout = Duration::from_secs(5);
    s
}

/// A port nobody listens on.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn request_count_is_bounded_for_every_body_framing() {
    for reply in [Reply::Length, Reply::Chunked, Reply::Close] {
        let server = start_server(reply);
        let mut s = spec(&server.url());
        s.max_requests = Some(100);
        let r = run_load(&s).unwrap();
        assert_eq!(r.requests, 100, "{reply:?}: {r:?}");
        assert_eq!(r.status_counts.get(&200), Some(&100), "{reply:?}");
        assert_eq!(r.errors, ErrorCounts::default(), "{reply:?}");
        assert_eq!(r.hist.len(), 100);
        assert!(r.rps > 0.0 && r.elapsed < Duration::from_secs(30), "{r:?}");
        let conns = server.accepted.load(Ordering::Relaxed);
        if reply == Reply::Close {
            assert_eq!(conns, 100, "close-delimited: one connection per response");
        } else {
            assert!(conns <= 4, "keep-alive reuses connections: {conns}");
        }
    }
}

#[test]
fn server_errors_count_as_5xx_with_latency() {
    let server = start_server(Reply::Status500);
    let mut s = spec(&server.url());
    s.max_requests = Some(50);
    let r = run_load(&s).unwrap();
    assert_eq!(r.requests, 50);
    assert_eq!(r.errors.status_5xx, 50);
    assert_eq!(r.errors.total(), 50);
    assert_eq!(r.status_counts.get(&500), Some(&50));
    assert_eq!(r.hist.len(), 50);
}

#[test]
fn closed_port_counts_connect_errors_and_ends() {
    let addr = closed_port();
    let mut s = spec(&format!("http://{addr}/"));
    s.conns = 2;
    s.max_requests = Some(20);
    let r = run_load(&s).unwrap();
    assert_eq!(r.requests, 0);
    assert_eq!(r.errors.connect, 20, "{:?}", r.errors);

    // Bounded by time alone: backoff keeps it from spinning and it ends.
    s.max_requests = None;
    s.duration = Duration::from_millis(300);
    let t = Instant::now();
    let r = run_load(&s).unwrap();
    assert!(r.errors.connect >= 2, "{:?}", r.errors);
    assert!(r.errors.connect < 1000, "backoff: {:?}", r.errors);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn silent_server_counts_timeouts() {
    let server = start_server(Reply::Silent);
    let mut s = spec(&server.url());
    s.conns = 2;
    s.max_requests = Some(4);
    s.timeout = Duration::from_millis(200);
    let r = run_load(&s).unwrap();
    assert_eq!(r.requests, 0);
    assert_eq!(r.errors.timeout, 4, "{:?}", r.errors);
}

#[test]
fn open_loop_sends_about_rate_times_duration() {
    let server = start_server(Reply::Length);
    let mut s = spec(&server.url());
    s.conns = 8;
    s.rate = Some(200.0);
    s.duration = Duration::from_secs(1);
    let r = run_load(&s).unwrap();
    assert!((100..=300).contains(&r.requests), "{r:?}");
    assert_eq!(r.errors.total(), 0);
    assert!((100.0..=300.0).contains(&r.rps), "{r:?}");
    assert_eq!(r.label, "rate=200");
}

#[test]
fn open_loop_respects_request_budget() {
    let server = start_server(Reply::Chunked);
    let mut s = spec(&server.url());
    s.rate = Some(500.0);
    s.max_requests = Some(60);
    let r = run_load(&s).unwrap();
    assert_eq!(r.requests, 60);
    assert!(r.elapsed < Duration::from_secs(5), "{r:?}");
}

#[test]
fn no_keepalive_opens_a_connection_per_request() {
    let server = start_server(Reply::Length);
    let mut s = spec(&server.url());
    s.keepalive = false;
    s.max_requests = Some(30);
    let r = run_load(&s).unwrap();
    assert_eq!(r.requests, 30);
    assert_eq!(server.accepted.load(Ordering::Relaxed), 30);
}

#[test]
fn stale_keepalive_connections_are_replaced() {
    let server = start_server(Reply::LengthThenClose);
    let mut s = spec(&server.url());
    s.conns = 2;
    s.max_requests = Some(20);
    let r = run_load(&s).unwrap();
    assert_eq!(r.requests, 20, "{:?}", r.errors);
    assert_eq!(r.errors.total(), 0, "{:?}", r.errors);
}

#[test]
fn hosts_are_used_round_robin() {
    let server = start_server(Reply::Length);
    let mut s = spec(&server.url());
    s.cores = 1;
    s.conns = 2;
    s.hosts = vec!["a".into(), "b.example".into()];
    s.max_requests = Some(40);
    s.method = "POST".into();
    s.body_size = 100;
    let r = run_load(&s).unwrap();
    assert_eq!(r.requests, 40);
    let hosts = server.hosts.lock().unwrap().clone();
    assert_eq!(hosts.get("a"), Some(&20), "{hosts:?}");
    assert_eq!(hosts.get("b.example"), Some(&20), "{hosts:?}");
}

#[test]
fn legacy_driver_works_too() {
    let server = start_server(Reply::Chunked);
    let mut s = spec(&server.url());
    s.driver = crate::runtime::DriverKind::Legacy;
    s.max_requests = Some(20);
    s.method = "HEAD".into();
    let r = run_load(&s).unwrap();
    // A HEAD response announces a chunked body that never comes.
    assert_eq!((r.requests, r.errors.total()), (20, 0), "{r:?}");

    s.method = "GET".into();
    let r = run_load(&s).unwrap();
    assert_eq!((r.requests, r.errors.total()), (20, 0));
}

#[test]
fn invalid_specs_are_rejected() {
    let server = start_server(Reply::Length);
    let base = spec(&server.url());
    let mut bad = Vec::new();
    let mut s = base.clone();
    s.conns = 0;
    bad.push(s);
    let mut s = base.clone();
    s.rate = Some(0.0);
    bad.push(s);
    let mut s = base.clone();
    s.max_requests = Some(0);
    bad.push(s);
    let mut s = base.clone();
    s.url = "https://127.0.0.1/".into();
    bad.push(s);
    let mut s = base.clone();
    s.headers = vec![("X".into(), "a\r\nb".into())];
    bad.push(s);
    for s in bad {
        let e = run_load(&s).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    }
}

#[test]
fn too_many_connections_for_the_fd_limit_is_explained() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall on a stack struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
    let conns = 1usize << 40;
    if rl.rlim_max >= conns as u64 {
        return; // unlimited hard limit: nothing to check without a huge run
    }
    let mut s = spec("http://127.0.0.1:9/");
    s.conns = conns;
    let e = run_load(&s).unwrap_err().to_string();
    assert!(
        e.contains("ulimit -n") && e.contains("RLIMIT_NOFILE"),
        "{e}"
    );
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    for bad in ["", "10", "s", "10x", "-1s", "1.2.3s", "1e3s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn headers_and_ramps_parse() {
    assert_eq!(parse_header("X-A:  b c "), Ok(("X-A".into(), "b c".into())));
    assert_eq!(
        parse_header("Host: a:80"),
        Ok(("Host".into(), "a:80".into()))
    );
    assert!(parse_header("novalue").is_err());
    assert!(parse_header("Bad Name: v").is_err());

    let r = parse_ramp("100:2000:5s").unwrap();
    assert_eq!(
        (r.start, r.end, r.step, r.step_every),
        (100.0, 2000.0, 190.0, Duration::from_secs(5))
    );
    let rates = r.rates();
    assert_eq!(rates.len(), 11);
    assert_eq!((rates[0], rates[10]), (100.0, 2000.0));

    let r = parse_ramp("100:350:1s:100").unwrap();
    assert_eq!(r.rates(), vec![100.0, 200.0, 300.0, 350.0]);
    let r = parse_ramp("300:100:1s:100").unwrap();
    assert_eq!(r.rates(), vec![300.0, 200.0, 100.0]);
    assert_eq!(parse_ramp("5:5:1s").unwrap().rates(), vec![5.0]);
    for bad in [
        "100:2000",
        "a:2:1s",
        "1:2:0s",
        "1:2:1s:0",
        "1:2:1s:1:1",
        "0:2:1s",
    ] {
        assert!(parse_ramp(bad).is_err(), "{bad}");
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn cli(argv: &[&str]) -> BenchArgs {
    Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
        .unwrap()
        .args
}

#[test]
fn command_line_becomes_rows() {
    let a = cli(&["http://127.0.0.1:8080/x"]);
    let (rows, x) = plan_rows(&a).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(x, "concurrency (connections)");
    let s = &rows[0].spec;
    assert_eq!(
        (s.conns, s.duration, s.warmup, s.keepalive),
        (50, Duration::from_secs(10), Duration::from_secs(1), true)
    );
    assert_eq!(
        (s.timeout, s.max_requests, s.cores, s.method.as_str()),
        (Duration::from_secs(10), None, 0, "GET")
    );

    let a = cli(&[
        "http://127.0.0.1:8080/",
        "--sweep",
        "1,10,50",
        "-d",
        "2s",
        "-H",
        "X-A: 1",
        "-H",
        "X-B: 2",
        "--hosts",
        "a,b",
        "--no-keepalive",
        "--cores",
        "1",
        "--driver",
        "legacy",
        "--method",
        "post",
        "--body-size",
        "10",
        "--timeout",
        "500ms",
        "--requests",
        "100",
    ]);
    let (rows, _) = plan_rows(&a).unwrap();
    let conns: Vec<usize> = rows.iter().map(|r| r.spec.conns).collect();
    assert_eq!(conns, vec![1, 10, 50]);
    let s = &rows[2].spec;
    assert_eq!(s.duration, Duration::from_secs(2));
    assert_eq!(s.headers.len(), 2);
    assert_eq!(s.hosts, vec!["a".to_string(), "b".to_string()]);
    assert!(!s.keepalive);
    assert_eq!(
        (s.cores, s.driver, s.method.as_str()),
        (1, crate::runtime::DriverKind::Legacy, "POST")
    );
    assert_eq!(
        (s.body_size, s.timeout, s.max_requests),
        (10, Duration::from_millis(500), Some(100))
    );

    // --requests without -d: bounded by the count, not by 10 s.
    let (rows, _) = plan_rows(&cli(&["http://127.0.0.1:1/", "--requests", "5"])).unwrap();
    assert!(rows[0].spec.duration > Duration::from_secs(3600));

    let a = cli(&[
        "http://127.0.0.1:1/",
        "--ramp",
        "100:300:1s:100",
        "--warmup",
        "2s",
    ]);
    let (rows, x) = plan_rows(&a).unwrap();
    assert_eq!(x, "rate (req/s)");
    let rates: Vec<Option<f64>> = rows.iter().map(|r| r.spec.rate).collect();
    assert_eq!(rates, vec![Some(100.0), Some(200.0), Some(300.0)]);
    assert_eq!(rows[0].spec.warmup, Duration::from_secs(2));
    assert_eq!(rows[1].spec.warmup, Duration::ZERO);
    assert_eq!(rows[1].spec.duration, Duration::from_secs(1));

    assert!(plan_rows(&cli(&["https://x/"])).is_err());
    assert!(plan_rows(&cli(&["http://127.0.0.1:1/", "--compare", "nope"])).is_err());
    assert!(plan_rows(&cli(&["http://127.0.0.1:1/", "--sweep", "0,1"])).is_err());
    assert!(
        Cli::try_parse_from(["bench", "http://x/", "--ramp", "1:2:1s", "--rate", "5"]).is_err()
    );
    assert!(Cli::try_parse_from(["bench", "http://x/", "-d", "ten"]).is_err());
}

#[test]
fn cli_run_writes_table_inputs_and_files() {
    let a = start_server(Reply::Length);
    let b = start_server(Reply::Chunked);
    let dir = std::env::temp_dir().join(format!("rt-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let svg = dir.join("r.svg");
    let url_a = a.url();
    let url_b = b.url();
    let args = cli(&[
        &url_a,
        "--sweep",
        "1,2",
        "--requests",
        "20",
        "--warmup",
        "0s",
        "--cores",
        "1",
        "--compare",
        &url_b,
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    run(args).unwrap();
    let j = std::fs::read_to_string(&json).unwrap();
    assert_eq!(j.matches("\"label\": \"c=1\"").count(), 2, "{j}");
    assert_eq!(j.matches("\"requests\": 20").count(), 4, "{j}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    std::fs::remove_dir_all(&dir).unwrap();
}
