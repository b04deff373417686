//! Browser tests: pages the binary serves, driven in headless Chromium
//! through chromedriver (`webdriver.rs`, our own small client).
//!
//! One test target so it can be skipped as a whole: with
//! `RINGTUNNEL_SKIP_BROWSER=1` every test here prints a skip line and
//! passes. Without that variable, a machine lacking `chromium` or
//! `chromedriver` fails these tests with the install command
//! (`apt-get install chromium chromium-driver`); CI installs them
//! (`.ci/run`) and runs them.
//!
//! A page module (`dashboard.rs`, `inspector.rs`)
//! gets a [`webdriver::Browser`] from `Browser::start(test_name)` (`None`:
//! skipped) and the process harness from `common`. For pages that
//! re-render themselves, read text with `Browser::texts`/`text_of` (one
//! script run, nothing goes stale) inside `Browser::wait_for`; pictures
//! for the docs go through `Browser::doc_screenshot` (written to
//! `docs/img/` only with `RINGTUNNEL_UPDATE_SCREENSHOTS=1`).

#[path = "../common/mod.rs"]
mod common;
mod dashboard;
mod inspector;
mod webdriver;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use webdriver::Browser;

/// A page served by the test itself: one input, one button whose click
/// copies the input's value into `#out`.
const PROBE_PAGE: &str = "<!doctype html><title>probe</title>\
<input id=in><button id=go onclick=\"document.getElementById('out').textContent='got '+document.getElementById('in').value\">go</button>\
<div id=out>nothing</div>";

/// Serves `PROBE_PAGE` to every connection until the test ends; returns
/// its URL.
fn serve_probe_page() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PROBE_PAGE}",
                PROBE_PAGE.len()
            );
        }
    });
    url
}

/// The WebDriver client itself: navigate, find, type, click, read text,
/// run a script, take a screenshot.
#[test]
fn webdriver_drives_a_page() {
    let Some(b) = Browser::start("webdriver_drives_a_page") else {
        return;
    };
    b.goto(&serve_probe_page());
    assert_eq!(b.title(), "probe");
    assert_eq!(b.find("#out").text(), "nothing");
    b.find("#in").send_keys("hello 42");
    b.find("#go").click();
    assert_eq!(b.find("#out").text(), "got hello 42");
    assert!(b.try_find("#missing").is_none());
    assert_eq!(b.find_all("input, button").len(), 2);
    let v = b.execute("return arguments[0] + document.title;", vec![1.into()]);
    assert_eq!(v, serde_json::json!("1probe"));
    let png = std::env::temp_dir().join(format!("ringtunnel-probe-{}.png", std::process::id()));
    b.screenshot(&png);
    let bytes = std::fs::read(&png).unwrap();
    let _ = std::fs::remove_file(&png);
    // A PNG of the 1280x900 window: IHDR carries the width and height.
    assert_eq!(&bytes[1..4], b"PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    assert!(width >= 800, "screenshot width {width}");
}
