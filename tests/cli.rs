//! Around the binary: shell completions and the manual page come from the
//! same clap definitions as the parser (real process, stdout checked).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ringtunnel");

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
