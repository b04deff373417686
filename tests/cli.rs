//! Around the binary: shell completions and the manual page come from the
//! same clap definitions as the parser; addresses as people type them;
//! nonsense refused at start (real processes, stdout/stderr checked).

mod common;

use std::process::Command;

use common::*;

fn stdout_of(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run ringtunnel");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn completions_know_the_subcommands_and_their_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let s = stdout_of(&["completions", shell]);
        for word in [
            "gateway",
            "agent",
            "tunnel-listen",
            "session-lease",
            "backend-timeout",
        ] {
            assert!(s.contains(word), "{shell} completion lacks {word}");
        }
    }
    let bad = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an unknown shell was accepted");
}

#[test]
fn man_has_a_page_per_subcommand() {
    let m = stdout_of(&["man"]);
    assert!(m.contains(".TH ringtunnel 1"), "no top page");
    for sub in ["gateway", "agent", "echo", "bench", "demo"] {
        assert!(
            m.contains(&format!(".TH ringtunnel-{sub} 1")),
            "no page for {sub}"
        );
    }
    assert!(
        m.contains("write\\-stall\\-timeout"),
        "flags missing from the pages"
    );
}

#[test]
fn a_bare_port_is_a_local_backend() {
    let echo = echo("uring", 0);
    let gw = gateway("uring", &[]);
    let port = echo.addr("listen").port().to_string();
    let tunnel = gw.field("tunnel");
    let _agent = spawn(
        "agent",
        &[
            "agent",
            "--gateway",
            &tunnel,
            "--session",
            "demo",
            "--to",
            &port,
            "--cores",
            "1",
            "--no-pin",
        ],
        "ringtunnel agent ready",
    );
    let p = gw.addr("public");
    wait_routable(p, "demo");
    let r = request(
        p,
        "GET /echo HTTP/1.1\r\nHost: demo\r\nContent-Length: 2\r\n\r\nhi",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"hi");
}

#[test]
fn zero_cores_and_https_backends_are_refused_at_start() {
    for (args, want) in [
        (
            &["echo", "--listen", "127.0.0.1:0", "--cores", "0"][..],
            "--cores 0",
        ),
        (
            &[
                "agent",
                "--session",
                "x",
                "--to",
                "https://127.0.0.1:3000",
                "--cores",
                "1",
            ][..],
            "plain HTTP",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
