//! A small W3C WebDriver client of our own: `chromedriver` (Debian's
//! `chromium-driver`) driving headless Chromium, over plain
//! `std::net::TcpStream` with one connection per command and JSON by
//! `serde_json`.
//!
//! [`Browser::start`] starts chromedriver on a free loopback port, opens a
//! session with a fresh profile directory, and returns `None` (after a
//! skip line on stderr) when `RINGTUNNEL_SKIP_BROWSER=1`. Missing binaries
//! are a failure with the install command: CI must never skip silently.
//! Dropping the [`Browser`] deletes the session (chromedriver then ends
//! Chromium), kills chromedriver by its PID and removes the profile.
//!
//! Commands that the caller expects to work panic with the WebDriver
//! error; `try_*` forms return it for "not there yet" polling.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Set to `1` to skip every browser test (locally, without Chromium).
pub const SKIP_ENV: &str = "RINGTUNNEL_SKIP_BROWSER";

/// The W3C key under which an element reference travels.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver command's bound (a page load included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Flags for a quiet, reproducible headless Chromium on a shared machine:
/// no GPU, no network of its own (updates, sync, QUIC probes), no sandbox
/// (tests run as root in CI), no reliance on a large /dev/shm
/// (containers).
const CHROMIUM_ARGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
];

/// A WebDriver error: the HTTP status and the `error` / `message` of the
/// answer (or a transport failure).
#[derive(Debug)]
pub struct WdError {
    pub status: u16,
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error, self.message)
    }
}

/// The binaries, from `PATH` (Debian: /usr/bin/chromium and
/// /usr/bin/chromedriver).
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether the browser tests are skipped by [`SKIP_ENV`]; prints why.
pub fn skipped(test: &str) -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        // Straight to the process's stderr: libtest would hide an
        // `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED browser test {test}: {SKIP_ENV}=1 is set"
        );
        return true;
    }
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A headless Chromium session behind its own chromedriver.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a browser session, or `None` when
    /// [`SKIP_ENV`] is set. Panics (with how to install them) when
    /// chromium or chromedriver are missing.
    pub fn start(test: &str) -> Option<Browser> {
        if skipped(test) {
            return None;
        }
        let (Some(chromium), Some(chromedriver)) =
            (find_on_path("chromium"), find_on_path("chromedriver"))
        else {
            panic!(
                "browser test {test}: chromium and chromedriver must be on PATH. \
                 Install them with `apt-get install chromium chromium-driver` \
                 (Debian), or set {SKIP_ENV}=1 to skip the browser tests locally"
            );
        };
        // A port picked, then given to chromedriver: another process may
        // take it in between, so a start that never answers is retried.
        for _ in 0..3 {
            if let Some(b) = Self::try_start(&chromium, &chromedriver) {
                return Some(b);
            }
        }
        panic!("chromedriver did not start (3 tries)");
    }

    fn try_start(chromium: &Path, chromedriver: &Path) -> Option<Browser> {
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let profile =
            std::env::temp_dir().join(format!("ringtunnel-chromium-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("profile dir");
        let mut b = Browser {
            driver,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
            profile,
        };
        let t = Instant::now();
        loop {
            match b.call("GET", "/status", None) {
                Ok(v) if v["ready"] == json!(true) => break,
                _ if t.elapsed() > Duration::from_secs(10) => return None,
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
            if let Ok(Some(_)) = b.driver.try_wait() {
                return None;
            }
        }
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", b.profile.display()));
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "goog:chromeOptions": {
                        "binary": chromium.to_string_lossy(),
                        "args": args,
                    },
                    "timeouts": {
                        "pageLoad": COMMAND_TIMEOUT.as_millis() as u64,
                        "script": COMMAND_TIMEOUT.as_millis() as u64,
                    },
                }
            }
        });
        let v = b
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("new WebDriver session: {e}"));
        b.session = v["sessionId"]
            .as_str()
            .expect("sessionId in the new session's answer")
            .to_string();
        Some(b)
    }

    /// One command: `method path` with an optional JSON body; the answer's
    /// `value`, or its error.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        let transport = |message: String| WdError {
            status: 0,
            error: "transport".into(),
            message,
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(|e| transport(format!("connect {}: {e}", self.addr)))?;
        let _ = s.set_read_timeout(Some(COMMAND_TIMEOUT));
        let _ = s.set_write_timeout(Some(COMMAND_TIMEOUT));
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| transport(format!("send {method} {path}: {e}")))?;
        // chromedriver keeps the connection open whatever we ask: read
        // until the answer is complete, not to EOF.
        let mut raw = Vec::new();
        let mut tmp = [0u8; 16 * 1024];
        while !http_complete(&raw) {
            match s.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&tmp[..n]),
                Err(e) => return Err(transport(format!("read answer to {method} {path}: {e}"))),
            }
        }
        let (status, json) = parse_http(&raw).ok_or_else(|| {
            transport(format!(
                "bad HTTP answer to {method} {path}: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(200)])
            ))
        })?;
        let v: Value = serde_json::from_slice(&json)
            .map_err(|e| transport(format!("JSON answer to {method} {path}: {e}")))?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if status == 200 {
            return Ok(value);
        }
        Err(WdError {
            status,
            error: value["error"].as_str().unwrap_or("unknown").to_string(),
            message: value["message"].as_str().unwrap_or("").to_string(),
        })
    }

    /// A command on this session that must succeed.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn try_cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WdError> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    /// Navigates and waits for the page's load event.
    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .into()
    }

    pub fn title(&self) -> String {
        self.cmd("GET", "/title", None)
            .as_str()
            .unwrap_or_default()
            .into()
    }

    /// The first element matching a CSS selector, if any.
    pub fn try_find(&self, css: &str) -> Option<Element<'_>> {
        let v = self
            .try_cmd(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .ok()?;
        Some(self.element(&v))
    }

    /// The first element matching a CSS selector; panics if none.
    pub fn find(&self, css: &str) -> Element<'_> {
        self.try_find(css)
            .unwrap_or_else(|| panic!("no element matches {css:?} on {}", self.url()))
    }

    /// Every element matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v.as_array()
            .map(|a| a.iter().map(|e| self.element(e)).collect())
            .unwrap_or_default()
    }

    fn element(&self, v: &Value) -> Element<'_> {
        Element {
            browser: self,
            id: v[ELEMENT_KEY]
                .as_str()
                .expect("an element reference")
                .to_string(),
        }
    }

    /// The text content of every element matching a CSS selector, read
    /// in one script run: no element can go stale in between, as it can
    /// between `find` and `text` on a page that re-renders itself.
    pub fn texts(&self, css: &str) -> Vec<String> {
        let v = self.execute(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent);",
            vec![css.into()],
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|t| t.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// [`Browser::texts`] of the first match, if any.
    pub fn text_of(&self, css: &str) -> Option<String> {
        self.texts(css).into_iter().next()
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the
    /// page and returns what it returns.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// Saves a PNG of the viewport to `path` (parent directories made).
    pub fn screenshot(&self, path: &Path) {
        let v = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(v.as_str().expect("base64 PNG")).expect("valid base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Saves a screenshot for the docs as `docs/img/NAME` when
    /// `RINGTUNNEL_UPDATE_SCREENSHOTS=1`, else in Cargo's temp directory for
    /// tests (so a test run leaves the committed images alone). Returns
    /// the path written.
    pub fn doc_screenshot(&self, name: &str) -> PathBuf {
        let dir = if std::env::var("RINGTUNNEL_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/img")
        } else {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        };
        let path = dir.join(name);
        self.screenshot(&path);
        path
    }

    /// Polls `probe` (every 100 ms) until it returns `Some`, for at most
    /// `limit`; panics naming `what` and the page's text when it never
    /// does.
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let t = Instant::now();
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            if t.elapsed() > limit {
                let text = self
                    .try_find("body")
                    .and_then(|b| b.try_text().ok())
                    .unwrap_or_default();
                panic!("waited {limit:?} for {what}; the page reads:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Chromedriver ends its Chromium when the session goes.
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// An element of the current page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    fn path(&self, what: &str) -> String {
        format!("/element/{}{what}", self.id)
    }

    /// Rendered text (what a person sees; hidden parts excluded).
    pub fn text(&self) -> String {
        self.try_text()
            .unwrap_or_else(|e| panic!("text of an element: {e}"))
    }

    /// [`Element::text`], or the error (e.g. the element went stale when
    /// the page re-rendered).
    pub fn try_text(&self) -> Result<String, WdError> {
        let v = self.browser.try_cmd("GET", &self.path("/text"), None)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    pub fn attr(&self, name: &str) -> Option<String> {
        let v = self
            .browser
            .cmd("GET", &self.path(&format!("/attribute/{name}")), None);
        v.as_str().map(String::from)
    }

    pub fn click(&self) {
        self.browser
            .cmd("POST", &self.path("/click"), Some(json!({})));
    }

    /// Types `text` into the element (keyboard events, as a person would).
    pub fn send_keys(&self, text: &str) {
        self.browser
            .cmd("POST", &self.path("/value"), Some(json!({ "text": text })));
    }

    pub fn clear(&self) {
        self.browser
            .cmd("POST", &self.path("/clear"), Some(json!({})));
    }

    /// Elements under this one matching a CSS selector.
    pub fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        let v = self.browser.cmd(
            "POST",
            &self.path("/elements"),
            Some(json!({ "using": "css selector", "value": css })),
        );
        v.as_array()
            .map(|a| a.iter().map(|e| self.browser.element(e)).collect())
            .unwrap_or_default()
    }
}

/// Whether `raw` holds a whole answer: its head, then `Content-Length`
/// bytes or a chunked body up to its last chunk.
fn http_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    match length {
        Some(n) => raw.len() >= end + 4 + n,
        None if head.contains("transfer-encoding: chunked") => parse_http(raw).is_some(),
        // Delimited by the close.
        None => false,
    }
}

/// Status and body of an HTTP/1.1 answer (Content-Length or chunked).
fn parse_http(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if !chunked {
        let length = head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        });
        return Some((
            status,
            body[..length.unwrap_or(body.len()).min(body.len())].to_vec(),
        ));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_txt = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Standard base64 (with padding), as WebDriver sends screenshots.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[test]
fn base64_and_chunked_decoding() {
    assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(base64_decode("aGVsbG8hIQ==").unwrap(), b"hello!!");
    assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
    assert!(base64_decode("a*b").is_none());
    let raw =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    assert_eq!(parse_http(raw).unwrap(), (200, b"abcde".to_vec()));
    let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}";
    assert_eq!(parse_http(raw).unwrap(), (404, b"{}".to_vec()));
}
