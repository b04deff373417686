//! The gateway's live dashboard (`GET /` on the admin listener) in
//! headless Chromium: a session the test drives shows up with its request
//! rate, the page works behind `--admin-token`, and 1000 sessions stay one
//! page of rows at a time.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ringtunnel::proto;

use crate::common::*;
use crate::webdriver::Browser;

const WAIT: Duration = Duration::from_secs(15);

/// Sends `per_sec` requests a second for `host` (new connection each)
/// until the flag is set, for at most 30 s. Returns the flag and the
/// thread.
fn steady_traffic(
    public: SocketAddr,
    host: &'static str,
    per_sec: u32,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<u32>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let h = std::thread::spawn(move || {
        let t = Instant::now();
        let mut sent = 0;
        while !flag.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(30) {
            // Errors are ignored: the gateway goes away first when a test
            // fails.
            if let Ok(mut c) = TcpStream::connect(public) {
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = write!(
                    c,
                    "GET /traffic HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                );
                let _ = std::io::Read::read_to_end(&mut c, &mut Vec::new());
            }
            sent += 1;
            std::thread::sleep(Duration::from_secs(1) / per_sec);
        }
        sent
    });
    (stop, h)
}

/// The text of a cell (`td.CLASS`) in the row of `session`, if shown.
fn cell(b: &Browser, session: &str, class: &str) -> Option<String> {
    b.text_of(&format!(
        "#sessions tr[data-session=\"{session}\"] td.{class}"
    ))
}

/// The session's "req/s (5 s)" as the page shows it.
fn shown_rate(b: &Browser, session: &str) -> Option<f64> {
    cell(b, session, "rps")?.parse().ok()
}

fn is_hidden(b: &Browser, id: &str) -> bool {
    b.execute(
        "return document.getElementById(arguments[0]).hidden;",
        vec![id.into()],
    ) == serde_json::json!(true)
}

#[test]
fn dashboard_shows_a_live_session_with_its_rate() {
    let Some(b) = Browser::start("dashboard_shows_a_live_session_with_its_rate") else {
        return;
    };
    let s = Stack::start("uring", 2);
    let (stop, traffic) = steady_traffic(s.public(), "demo", 20);
    // A few requests nobody serves, so the errors panel has a row.
    for _ in 0..3 {
        request(
            s.public(),
            "GET / HTTP/1.1\r\nHost: nosuch\r\nConnection: close\r\n\r\n",
        );
    }
    b.goto(&format!("http://{}/", s.admin()));
    assert_eq!(b.title(), "ringtunnel dashboard");
    let rate = b.wait_for("a non-zero request rate for demo", WAIT, |b| {
        shown_rate(b, "demo").filter(|r| *r > 0.0)
    });
    // 20 requests a second were sent; the page shows the last 5 s.
    assert!(rate <= 40.0, "rate {rate}");
    assert_eq!(b.text_of("#role").unwrap_or_default(), "gateway");
    // Uplinks per core: the agent opened one per gateway core.
    assert_eq!(cell(&b, "demo", "uplinks").as_deref(), Some("1 · 1"));
    // p50 of a 2 ms backend, as the page prints it.
    let p50 = cell(&b, "demo", "p50").unwrap_or_default();
    assert!(p50.ends_with(" ms") || p50.ends_with(" µs"), "p50 {p50:?}");
    b.wait_for("the no_session errors", WAIT, |b| {
        let t = b.text_of("#errors")?;
        t.contains("no_session").then_some(())
    });
    let cores = b.texts("#cores tbody tr").len();
    assert_eq!(cores, 2);
    // Let the sparklines fill a little for the picture.
    std::thread::sleep(Duration::from_secs(3));
    let shot = b.doc_screenshot("dashboard.png");
    eprintln!("dashboard screenshot: {}", shot.display());
    stop.store(true, Ordering::Relaxed);
    assert!(traffic.join().unwrap() > 0);
}

#[test]
fn dashboard_works_behind_the_admin_token() {
    let Some(b) = Browser::start("dashboard_works_behind_the_admin_token") else {
        return;
    };
    let gw = gateway("uring", &["--admin-token", "s3cret-admin"]);
    let admin = gw.addr("admin");
    // The data stays behind the token; the page itself carries none.
    let r = request(admin, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 401);
    let r = request(admin, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("s3cret"));

    b.goto(&format!("http://{admin}/"));
    b.wait_for("the token form", WAIT, |b| {
        (!is_hidden(b, "auth")).then_some(())
    });
    assert!(b
        .text_of("#status")
        .unwrap_or_default()
        .contains("token required"));
    // A wrong token is refused and said so.
    b.find("#token").send_keys("wrong");
    b.find("#token-save").click();
    b.wait_for("the refusal", WAIT, |b| {
        b.text_of("#status")?.contains("refused").then_some(())
    });
    b.find("#token").send_keys("s3cret-admin\n");
    b.wait_for("the data behind the token", WAIT, |b| {
        (is_hidden(b, "auth") && b.text_of("#role")? == "gateway").then_some(())
    });
    // Without the stored token the page asks again; a link with the token
    // in its fragment then works, and the token leaves the address bar.
    b.execute("sessionStorage.clear();", vec![]);
    b.wait_for("the token form again", WAIT, |b| {
        (!is_hidden(b, "auth")).then_some(())
    });
    b.goto(&format!("http://{admin}/#token=s3cret-admin"));
    b.wait_for("the data with the fragment's token", WAIT, |b| {
        is_hidden(b, "auth").then_some(())
    });
    assert!(!b.url().contains("s3cret"), "{}", b.url());
    // A fresh load with the fragment works the same.
    b.execute("sessionStorage.clear();", vec![]);
    b.wait_for("the token form again", WAIT, |b| {
        (!is_hidden(b, "auth")).then_some(())
    });
    b.goto("about:blank");
    b.goto(&format!("http://{admin}/#token=s3cret-admin"));
    b.wait_for("the data after a fresh load", WAIT, |b| {
        (b.text_of("#role")? == "gateway" && is_hidden(b, "auth")).then_some(())
    });
    assert!(!b.url().contains("s3cret"), "{}", b.url());
}

/// One fake agent's uplink: HELLO, then wait for ACCEPT (the harness's
/// `fake_hello`). It is never used for a request.
fn fake_uplink(tunnel: SocketAddr, session: &str) -> TcpStream {
    let mut s = connect(tunnel);
    let mut b = BytesMut::new();
    proto::encode(&fake_hello(session), &mut b);
    s.write_all(&b).unwrap();
    let mut dec = proto::Decoder::new(proto::DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Some(f)) = dec.decode(&mut buf) {
            assert_eq!(f.kind, proto::FrameType::Accept, "{session}: no ACCEPT");
            return s;
        }
        let mut tmp = [0u8; 1024];
        let n = std::io::Read::read(&mut s, &mut tmp).expect("ACCEPT");
        assert!(n > 0, "{session}: closed before ACCEPT");
        buf.extend_from_slice(&tmp[..n]);
    }
}

#[test]
fn a_thousand_sessions_stay_one_page_at_a_time() {
    let Some(b) = Browser::start("a_thousand_sessions_stay_one_page_at_a_time") else {
        return;
    };
    let s = Stack::start("uring", 0);
    let tunnel = s.gw.addr("tunnel");
    let fakes: Vec<TcpStream> = (0..1000)
        .map(|i| fake_uplink(tunnel, &format!("s-{i:04}")))
        .collect();
    let (stop, traffic) = steady_traffic(s.public(), "demo", 20);
    // /stats pages too: a page holds at most `limit` rows whatever the
    // number of sessions.
    let page = request(
        s.admin(),
        "GET /stats?limit=25&offset=0 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .text();
    assert!(page.contains("\"total\":1001"), "{page}");
    assert_eq!(page.matches("\"name\":").count(), 25);

    b.goto(&format!("http://{}/", s.admin()));
    b.wait_for("demo first (the busiest)", WAIT, |b| {
        let first = b.text_of("#sessions tbody tr td.name")?;
        (first == "demo" && shown_rate(b, "demo")? > 0.0).then_some(())
    });
    assert_eq!(b.texts("#sessions tbody tr").len(), 25);
    assert_eq!(b.text_of("#page-info").unwrap_or_default(), "1–25 of 1001");
    assert_eq!(b.text_of("#c-sessions").unwrap_or_default(), "1001");
    b.find("#next").click();
    b.wait_for("the second page", WAIT, |b| {
        (b.text_of("#page-info")? == "26–50 of 1001").then_some(())
    });
    assert_eq!(b.texts("#sessions tbody tr").len(), 25);
    // The filter finds one session among 1001, from the first page.
    b.find("#filter").send_keys("s-0999");
    b.wait_for("the filtered row", WAIT, |b| {
        let info = b.text_of("#page-info")?;
        (info == "1–1 of 1 (filtered from 1001)").then_some(())
    });
    assert_eq!(b.texts("#sessions tbody tr td.name"), ["s-0999"]);
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    drop(fakes);
}

#[test]
fn dashboard_says_when_the_gateway_is_gone() {
    let Some(b) = Browser::start("dashboard_says_when_the_gateway_is_gone") else {
        return;
    };
    let mut gw = gateway("uring", &[]);
    let admin = gw.addr("admin");
    b.goto(&format!("http://{admin}/"));
    b.wait_for("the first data", WAIT, |b| {
        b.text_of("#status")?.starts_with("updated").then_some(())
    });
    // The gateway goes away under the open page: the page says so instead
    // of showing stale numbers as current.
    gw.kill();
    let status = b.wait_for("the page to notice", WAIT, |b| {
        let s = b.text_of("#status")?;
        s.starts_with("cannot read /stats").then_some(s)
    });
    assert!(
        b.execute(
            "return document.getElementById('status').className;",
            vec![]
        )
        .as_str()
        .unwrap_or_default()
        .contains("bad"),
        "{status}"
    );
}

#[test]
fn an_agents_admin_serves_the_page_without_sessions() {
    let Some(b) = Browser::start("an_agents_admin_serves_the_page_without_sessions") else {
        return;
    };
    let echo = echo("uring", 0);
    let gw = gateway("uring", &[]);
    // The agent's ready line does not carry its admin address: pick one.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .to_string();
    let _agent = agent(
        "uring",
        &gw,
        "demo",
        echo.addr("listen"),
        &["--admin-listen", &admin],
    );
    b.goto(&format!("http://{admin}/"));
    b.wait_for("the agent's data", WAIT, |b| {
        (b.text_of("#role")? == "agent").then_some(())
    });
    assert!(is_hidden(&b, "sessions-panel"));
    assert_eq!(b.texts("#cores tbody tr").len(), 2);
}
