//! The agent's request inspector in a real browser: it lists a request
//! the test sent through the tunnel, shows it with its secret masked, and
//! clicking Replay shows the backend's answer to the replay. Saves the
//! screenshot the README shows (docs/img/inspector.png).

use std::time::Duration;

use crate::common::*;
use crate::webdriver::Browser;

#[test]
fn inspector_lists_a_request_and_replays_it() {
    let Some(b) = Browser::start("inspector_lists_a_request_and_replays_it") else {
        return;
    };
    let echo = echo("uring", 0);
    let gw = gateway("uring", &[]);
    let agent = agent(
        "uring",
        &gw,
        "demo",
        echo.addr("listen"),
        &["--inspect", "127.0.0.1:0", "--cores", "1"],
    );
    let public = gw.addr("public");
    wait_routable(public, "demo");
    // The routing probes' records are not what the screenshot is about.
    std::thread::sleep(Duration::from_millis(200));
    let cleared = request(
        agent.addr("inspect"),
        "DELETE /api/requests HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(cleared.status, 200);
    // A few neighbours, then the request the test follows.
    for path in ["/status/404", "/bytes/2048", "/status/503", "/headers"] {
        request(
            public,
            &format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"),
        );
    }
    let body = "hello from the browser test";
    let r = request(
        public,
        &format!(
            "POST /echo?from=browser HTTP/1.1\r\nHost: demo\r\nAuthorization: Bearer TOP-SECRET\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(r.status, 200);

    b.goto(&format!("http://{}/", agent.addr("inspect")));
    assert_eq!(b.title(), "ringtunnel inspector");
    let wait = Duration::from_secs(10);
    // The row of our request (the list polls every second).
    b.wait_for("the POST in the list", wait, |b| {
        b.find_all("#requests tr[data-id]")
            .iter()
            .any(|row| {
                row.try_text()
                    .is_ok_and(|t| t.contains("/echo?from=browser"))
            })
            .then_some(())
    });
    // Rows are re-rendered only when the list changes: click it now.
    let row = b
        .find_all("#requests tr[data-id]")
        .into_iter()
        .find(|row| row.text().contains("/echo?from=browser"))
        .expect("the row");
    row.click();
    let detail = b.wait_for("the request's details", wait, |b| {
        b.try_find("#detail pre.head")
            .and_then(|_| b.find("#detail").try_text().ok())
            .filter(|t| t.contains("Authorization"))
    });
    assert!(detail.contains("POST /echo?from=browser"), "{detail}");
    assert!(detail.contains("********"), "{detail}");
    assert!(
        !detail.contains("TOP-SECRET"),
        "a secret is shown: {detail}"
    );
    assert!(detail.contains(body), "{detail}");

    b.find("#replay").click();
    let replayed = b.wait_for("the replay's response", wait, |b| {
        b.try_find("#replay-result .replay-status")
            .and_then(|_| b.find("#replay-result").try_text().ok())
    });
    assert!(replayed.contains("replayed: 200"), "{replayed}");
    assert!(
        replayed.contains(body),
        "the echo of the replayed body: {replayed}"
    );

    // docs/img/inspector.png with RINGTUNNEL_UPDATE_SCREENSHOTS=1; else a
    // temp file, so a test run leaves the committed picture alone.
    b.doc_screenshot("inspector.png");
}
