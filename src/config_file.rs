//! The `--config FILE` format: what a TOML file for `gateway` or `agent`
//! may contain, how it is read, and how the effective settings are shown
//! back (`--print-config`).
//!
//! Owns the file's shape only. Every key is the long flag of the same
//! name with `_` for `-`, and every key is optional: `main.rs` lays the
//! file under the command line (an explicitly passed flag wins) and the
//! flags' defaults fill the rest, so defaults live in one place (the flag
//! definitions, which take them from `config::defaults` and
//! `proto::limits`). Validation of the merged result stays in
//! `config.rs`; only `[[tokens]]`, which has no flag form, is checked
//! here.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a misspelt timeout
//! silently left at its default is worse than a refused start. toml's
//! error message names the key and its line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scope::{Rate, Secret, TokenRule};

/// A plain secret shorter than this is refused: tokens are the only
/// authentication of an agent.
pub const MIN_SECRET_LEN: usize = 16;

/// Shown instead of a secret by `--print-config`.
pub const MASK: &str = "***";

/// `ringtunnel gateway --config FILE`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub listen: Option<String>,
    pub tunnel_listen: Option<String>,
    pub admin_listen: Option<String>,
    pub cores: Option<usize>,
    pub pin: Option<bool>,
    pub no_pin: Option<bool>,
    pub driver: Option<String>,
    pub domain: Option<String>,
    pub default_session: Option<String>,
    /// Like `--token`: comma separated, each for any session.
    pub token: Option<String>,
    pub max_head: Option<usize>,
    pub header_timeout: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub shutdown_grace: Option<f64>,
    pub session_lease: Option<f64>,
    pub hold_timeout: Option<f64>,
    pub hold_queue: Option<usize>,
    pub body_idle_timeout: Option<f64>,
    pub write_stall_timeout: Option<f64>,
    pub response_timeout: Option<f64>,
    pub stream_window: Option<u32>,
    pub conn_window: Option<u32>,
    pub max_streams: Option<u32>,
    pub heartbeat_interval: Option<f64>,
    pub tunnel_tls_cert: Option<PathBuf>,
    pub tunnel_tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub insecure_plaintext: Option<bool>,
    pub trusted_proxies: Option<String>,
    pub proxy_protocol: Option<bool>,
    pub https_listen: Option<String>,
    pub https_cert: Option<PathBuf>,
    pub https_key: Option<PathBuf>,
    pub max_conns: Option<usize>,
    pub max_conns_per_ip: Option<u32>,
    pub fd_reserve: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub handshake_fail_limit: Option<u32>,
    pub handshake_fail_window: Option<f64>,
    pub handshake_ban: Option<f64>,
    /// Like `--session-rate`: "50/s", "1000/m", "10/h".
    pub session_rate: Option<String>,
    pub session_burst: Option<u32>,
    pub admin_token: Option<String>,
    /// Like `--rate-per-ip`: "10/s" per client IP within each session.
    pub rate_per_ip: Option<String>,
    pub burst_per_ip: Option<u32>,
    pub rate_ip_table: Option<usize>,
    /// Like `--tcp-ports`: "20000-20999", "20000-20099,21000", "none".
    pub tcp_ports: Option<String>,
    pub tcp_max_conns_per_port: Option<usize>,
    /// Scoped tokens. Last: TOML puts arrays of tables after plain keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenEntry>,
    /// Per-session rates (`[[sessions]]`), whoever claims the name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionEntry>,
    /// HTTPS certificates chosen by SNI, after `https_cert` (the first of
    /// all is the default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub https_certs: Vec<HttpsCertEntry>,
}

/// One `[[https_certs]]` table: a PEM certificate chain and its key.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsCertEntry {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One `[[tokens]]` table. The key names are a stable interface.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub secret: Option<String>,
    pub secret_sha256: Option<String>,
    #[serde(default)]
    pub sessions: Vec<String>,
    pub max_sessions: Option<u32>,
    pub max_uplinks: Option<u32>,
    pub rate: Option<String>,
    pub burst: Option<u32>,
    /// Per client IP within each session claimed with this token.
    pub rate_per_ip: Option<String>,
    pub burst_per_ip: Option<u32>,
    pub pool: Option<bool>,
    /// TCP tunnel ports this token may open, e.g. ["20000-20099"]; absent:
    /// any port of the gateway's `tcp_ports`; [] or ["none"]: none.
    pub tcp_ports: Option<Vec<String>>,
}

/// One `[[sessions]]` table: the request rates of one session name.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SessionEntry {
    pub name: String,
    pub rate: Option<String>,
    pub burst: Option<u32>,
    pub rate_per_ip: Option<String>,
    pub burst_per_ip: Option<u32>,
}

impl SessionEntry {
    pub fn to_rule(&self) -> Result<crate::scope::SessionRule, String> {
        let bad = |e: String| format!("[[sessions]] {:?}: {e}", self.name);
        if !crate::proto::valid_session_name(&self.name) {
            return Err(bad(
                "name is not a session name ([a-z0-9-], 1..=63, no leading or trailing -)".into(),
            ));
        }
        let rate = |r: &Option<String>, key: &str| match r {
            Some(r) => r
                .parse::<Rate>()
                .map(Some)
                .map_err(|e| bad(format!("{key}: {e}"))),
            None => Ok(None),
        };
        let rule = crate::scope::SessionRule {
            name: self.name.clone(),
            rate: rate(&self.rate, "rate")?,
            burst: self.burst,
            rate_per_ip: rate(&self.rate_per_ip, "rate_per_ip")?,
            burst_per_ip: self.burst_per_ip,
        };
        if rule.rate.is_none() && rule.rate_per_ip.is_none() {
            return Err(bad("sets neither rate nor rate_per_ip".into()));
        }
        if (rule.burst.is_some() && rule.rate.is_none())
            || (rule.burst_per_ip.is_some() && rule.rate_per_ip.is_none())
        {
            return Err(bad("a burst without its rate".into()));
        }
        Ok(rule)
    }
}

/// The `[[sessions]]` tables as rules: each valid, no name twice.
pub fn session_rules(entries: &[SessionEntry]) -> Result<Vec<crate::scope::SessionRule>, String> {
    let mut out: Vec<crate::scope::SessionRule> = Vec::with_capacity(entries.len());
    for e in entries {
        let r = e.to_rule()?;
        if out.iter().any(|o| o.name == r.name) {
            return Err(format!("[[sessions]] {:?} appears twice", r.name));
        }
        out.push(r);
    }
    Ok(out)
}

/// `ringtunnel agent --config FILE`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub gateway: Option<String>,
    pub session: Option<String>,
    pub to: Option<String>,
    pub uplinks: Option<usize>,
    pub cores: Option<usize>,
    pub pin: Option<bool>,
    pub no_pin: Option<bool>,
    pub driver: Option<String>,
    pub backend_concurrency: Option<usize>,
    pub backend_queue: Option<usize>,
    pub backend_timeout: Option<f64>,
    pub slot_timeout: Option<f64>,
    pub handshake_timeout: Option<f64>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub admin_listen: Option<String>,
    pub heartbeat_interval: Option<f64>,
    pub shutdown_grace: Option<f64>,
    pub agent_id: Option<u64>,
    pub tls: Option<bool>,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Like `--tcp` (repeatable): ["22", "5432=20100"].
    pub tcp: Option<Vec<String>>,
    pub quiet: Option<bool>,
    pub inspect: Option<String>,
    pub inspect_max: Option<usize>,
    pub inspect_body_bytes: Option<usize>,
    pub inspect_mask: Option<Vec<String>>,
}

/// Reads and parses a file. The error starts with the path; toml's part
/// gives the line, the column and the offending key.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("--config {}: {e}", path.display()))
}

/// Parses file text (the IO-free half of [`load`]).
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
}

/// Serialises the effective settings for `--print-config`.
pub fn print<T: Serialize>(file: &T) -> Result<String, String> {
    toml::to_string(file).map_err(|e| format!("cannot print the configuration: {e}"))
}

impl GatewayFile {
    /// The `[[tokens]]` tables as rules, each checked; errors name the
    /// table by its position (1-based, in file order).
    pub fn token_rules(&self) -> Result<Vec<TokenRule>, String> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.to_rule()
                    .map_err(|e| format!("[[tokens]] #{}: {e}", i + 1))
            })
            .collect()
    }
}

impl TokenEntry {
    pub fn to_rule(&self) -> Result<TokenRule, String> {
        let secret = match (&self.secret, &self.secret_sha256) {
            (Some(s), None) => {
                if s.len() < MIN_SECRET_LEN {
                    return Err(format!(
                        "secret is {} bytes; at least {MIN_SECRET_LEN} are required \
                         (or give its SHA-256 as secret_sha256)",
                        s.len()
                    ));
                }
                Secret::Plain(s.clone())
            }
            (None, Some(h)) => Secret::Sha256(parse_sha256(h)?),
            (Some(_), Some(_)) => {
                return Err("give either secret or secret_sha256, not both".into())
            }
            (None, None) => return Err("secret or secret_sha256 is required".into()),
        };
        if self.sessions.is_empty() {
            return Err(
                "sessions is empty or missing (a list of names, \"prefix-*\" or \"*\")".into(),
            );
        }
        for p in &self.sessions {
            if !valid_pattern(p) {
                return Err(format!(
                    "sessions: {p:?} is not a session name ([a-z0-9-], 1..=63), \
                     \"prefix-*\" or \"*\""
                ));
            }
        }
        let rate = match &self.rate {
            Some(r) => Some(r.parse::<Rate>()?),
            None => None,
        };
        let rate_per_ip = match &self.rate_per_ip {
            Some(r) => Some(r.parse::<Rate>().map_err(|e| format!("rate_per_ip: {e}"))?),
            None => None,
        };
        Ok(TokenRule {
            secret,
            sessions: self.sessions.clone(),
            max_sessions: self.max_sessions,
            max_uplinks: self.max_uplinks,
            rate,
            burst: self.burst,
            rate_per_ip,
            burst_per_ip: self.burst_per_ip,
            pool: self.pool.unwrap_or(false),
            tcp_ports: match &self.tcp_ports {
                Some(list) => Some(
                    crate::proto::tcp::PortRanges::parse(&list.join(","))
                        .map_err(|e| format!("tcp_ports: {e}"))?,
                ),
                None => None,
            },
        })
    }

    /// The rule as `--print-config` shows it: a plain secret masked, a
    /// hash in hex (a hash reveals nothing worth hiding).
    pub fn shown(rule: &TokenRule) -> TokenEntry {
        let (secret, secret_sha256) = match &rule.secret {
            Secret::Plain(_) => (Some(MASK.to_string()), None),
            Secret::Sha256(h) => (None, Some(h.iter().map(|b| format!("{b:02x}")).collect())),
        };
        TokenEntry {
            secret,
            secret_sha256,
            sessions: rule.sessions.clone(),
            max_sessions: rule.max_sessions,
            max_uplinks: rule.max_uplinks,
            rate: rule.rate.map(|r| r.to_string()),
            burst: rule.burst,
            rate_per_ip: rule.rate_per_ip.map(|r| r.to_string()),
            burst_per_ip: rule.burst_per_ip,
            pool: Some(rule.pool),
            tcp_ports: rule.tcp_ports.as_ref().map(|r| vec![r.to_string()]),
        }
    }
}

fn parse_sha256(h: &str) -> Result<[u8; 32], String> {
    let bad = || {
        format!(
            "secret_sha256 must be 64 hex characters, got {} characters",
            h.len()
        )
    };
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// `*`, an exact session name, or `prefix-*` whose prefix is a name.
fn valid_pattern(p: &str) -> bool {
    if p == "*" {
        return true;
    }
    match p.strip_suffix("-*") {
        Some(prefix) => crate::proto::valid_session_name(prefix),
        None => crate::proto::valid_session_name(p),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn sessions_tables_are_checked() {
        let entry = |name: &str, rate: Option<&str>, burst: Option<u32>| SessionEntry {
            name: name.into(),
            rate: rate.map(str::to_string),
            burst,
            ..SessionEntry::default()
        };
        let ok = session_rules(&[entry("alpha", Some("5/s"), Some(10))]).unwrap();
        assert_eq!(ok[0].rate, Some("5/s".parse().unwrap()));
        assert_eq!(ok[0].burst, Some(10));
        for (bad, why) in [
            (
                vec![entry("Alpha", Some("5/s"), None)],
                "not a session name",
            ),
            (vec![entry("alpha", None, None)], "neither rate"),
            (vec![entry("alpha", None, Some(3))], "neither rate"),
            (vec![entry("alpha", Some("0/s"), None)], "at least 1"),
            (
                vec![entry("a", Some("1/s"), None), entry("a", Some("2/s"), None)],
                "twice",
            ),
        ] {
            let e = session_rules(&bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let f: GatewayFile =
            toml::from_str("[[sessions]]\nname = \"a\"\nrate = \"1/s\"\nburst = 1\n").unwrap();
        assert_eq!(f.sessions, vec![entry("a", Some("1/s"), Some(1))]);
        assert!(
            toml::from_str::<GatewayFile>("[[sessions]]\nname = \"a\"\nrat = \"1/s\"\n").is_err()
        );
    }

    use super::*;

    const EXAMPLE: &str = r#"
tunnel_listen = "127.0.0.1:7000"
body_idle_timeout = 12.5

[[tokens]]
secret = "alpha-secret-0123456789abcdef"
sessions = ["alpha", "team-*"]
max_sessions = 10
max_uplinks = 32
rate = "50/s"
burst = 10
rate_per_ip = "5/s"
burst_per_ip = 2
pool = false

[[tokens]]
secret_sha256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
sessions = ["*"]
"#;

    #[test]
    fn example_file_parses_into_rules() {
        let f: GatewayFile = parse(EXAMPLE).unwrap();
        assert_eq!(f.tunnel_listen.as_deref(), Some("127.0.0.1:7000"));
        assert_eq!(f.body_idle_timeout, Some(12.5));
        let rules = f.token_rules().unwrap();
        assert_eq!(rules.len(), 2);
        assert!(rules[0].allows("team-a") && !rules[0].allows("beta"));
        assert_eq!(rules[0].rate, Some("50/s".parse().unwrap()));
        assert_eq!(rules[0].max_uplinks, Some(32));
        assert_eq!(rules[0].rate_per_ip, Some("5/s".parse().unwrap()));
        assert_eq!(rules[0].burst_per_ip, Some(2));
        assert_eq!(rules[1].rate_per_ip, None);
        // sha256("hello")
        assert_eq!(
            crate::scope::authorize(&rules[1..], "hello", "anything-at-all"),
            crate::scope::Verdict::Rule(0)
        );
    }

    #[test]
    fn tcp_tunnel_keys() {
        let f: GatewayFile = parse(
            "tcp_ports = \"20000-20999\"\ntcp_max_conns_per_port = 10\n[[tokens]]\n\
             secret = \"alpha-secret-0123456789\"\nsessions = [\"*\"]\n\
             tcp_ports = [\"20000-20009\", \"20100\"]\n\
             [[tokens]]\nsecret = \"omega-secret-0123456789\"\nsessions = [\"*\"]\n\
             tcp_ports = []\n",
        )
        .unwrap();
        assert_eq!(f.tcp_ports.as_deref(), Some("20000-20999"));
        assert_eq!(f.tcp_max_conns_per_port, Some(10));
        let rules = f.token_rules().unwrap();
        let scope = rules[0].tcp_ports.as_ref().unwrap();
        assert!(scope.contains(20009) && scope.contains(20100) && !scope.contains(20010));
        // An empty list: this token may open no TCP port.
        assert!(rules[1].tcp_ports.as_ref().unwrap().is_empty());
        // The key shown by --print-config parses back to the same rule.
        let shown = TokenEntry::shown(&rules[0]);
        assert_eq!(shown.tcp_ports, Some(vec!["20000-20009,20100".to_string()]));
        let e = parse::<GatewayFile>(
            "[[tokens]]\nsecret = \"alpha-secret-0123456789\"\nsessions = [\"a\"]\n\
             tcp_ports = [\"9-1\"]\n",
        )
        .unwrap()
        .token_rules()
        .unwrap_err();
        assert!(e.contains("tcp_ports") && e.contains("backwards"), "{e}");
        let a: AgentFile = parse("tcp = [\"22\", \"5432=20100\"]\n").unwrap();
        assert_eq!(a.tcp, Some(vec!["22".into(), "5432=20100".into()]));
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e =
            parse::<GatewayFile>("listen = \"127.0.0.1:1\"\n\nbody_idle_timout = 3\n").unwrap_err();
        assert!(
            e.contains("line 3") && e.contains("body_idle_timout"),
            "{e}"
        );
        let e = parse::<GatewayFile>(
            "[[tokens]]\nsecret = \"alpha-secret-0123456789\"\nsessions = [\"a\"]\nscope = 1\n",
        )
        .unwrap_err();
        assert!(e.contains("line 4") && e.contains("scope"), "{e}");
        let e = parse::<AgentFile>("sesion = \"a\"\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("sesion"), "{e}");
    }

    #[test]
    fn token_tables_are_checked() {
        let rule = |t: &str| {
            parse::<GatewayFile>(&format!("[[tokens]]\n{t}\n"))
                .unwrap()
                .token_rules()
        };
        let e = rule("secret = \"short\"\nsessions = [\"a\"]").unwrap_err();
        assert!(e.contains("#1") && e.contains("at least 16"), "{e}");
        let e = rule("secret_sha256 = \"abc\"\nsessions = [\"a\"]").unwrap_err();
        assert!(e.contains("64 hex"), "{e}");
        let both =
            "secret = \"alpha-secret-0123456789\"\nsecret_sha256 = \"00\"\nsessions = [\"a\"]";
        assert!(rule(both).unwrap_err().contains("not both"));
        assert!(rule("sessions = [\"a\"]").unwrap_err().contains("required"));
        let s = "secret = \"alpha-secret-0123456789\"\n";
        assert!(rule(s).unwrap_err().contains("sessions"));
        for bad in ["\"Alpha\"", "\"team*\"", "\"-*\"", "\"a b\""] {
            let e = rule(&format!("{s}sessions = [{bad}]")).unwrap_err();
            assert!(e.contains("not a session name"), "{bad}: {e}");
        }
        let e = rule(&format!("{s}sessions = [\"a\"]\nrate = \"5/d\"")).unwrap_err();
        assert!(e.contains("unit"), "{e}");
        let e = rule(&format!("{s}sessions = [\"a\"]\nrate_per_ip = \"0/s\"")).unwrap_err();
        assert!(e.contains("rate_per_ip") && e.contains("at least 1"), "{e}");
        assert!(rule(&format!("{s}sessions = [\"a\", \"team-*\", \"*\"]")).is_ok());
    }

    #[test]
    fn printed_rules_mask_plain_secrets_and_show_hashes() {
        let f: GatewayFile = parse(EXAMPLE).unwrap();
        let shown = GatewayFile {
            tokens: f
                .token_rules()
                .unwrap()
                .iter()
                .map(TokenEntry::shown)
                .collect(),
            ..GatewayFile::default()
        };
        let out = print(&shown).unwrap();
        assert!(!out.contains("alpha-secret"), "{out}");
        assert!(out.contains("secret = \"***\""), "{out}");
        assert!(out.contains("2cf24dba5fb0a30e"), "{out}");
        assert!(out.contains("rate = \"50/s\""), "{out}");
        assert!(out.contains("rate_per_ip = \"5/s\""), "{out}");
        // What is printed reads back as the same rules.
        let back: GatewayFile = parse(&out).unwrap();
        assert_eq!(back.tokens.len(), 2);
    }
}
