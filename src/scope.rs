//! Scoped tokens: which agent secret may claim which session names, with
//! what limits. Plain data and pure checks (no IO, no clocks), shared by
//! the flags (`--token`), the config file (`[[tokens]]`) and the gateway's
//! handshake.
//!
//! A rule's `sessions` are exact names or `prefix-*` patterns. An empty
//! rule list means an open gateway: any token may claim any free name (and
//! then owns it).

/// How a token's secret is stored.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The secret itself (from `--token` or `secret = "..."`).
    Plain(String),
    /// Its SHA-256 (`secret_sha256 = "<hex>"`), so a config file need not
    /// hold the secret.
    Sha256([u8; 32]),
}

impl std::fmt::Debug for Secret {
    /// Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Plain(***)"),
            Secret::Sha256(_) => f.write_str("Sha256(***)"),
        }
    }
}

impl Secret {
    /// Whether `token` is this secret. Compares without an early exit, so
    /// response timing does not reveal how much of a guessed token was
    /// right.
    pub fn matches(&self, token: &str) -> bool {
        match self {
            Secret::Plain(s) => constant_time_eq(s.as_bytes(), token.as_bytes()),
            Secret::Sha256(h) => {
                let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
                constant_time_eq(d.as_ref(), h)
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `token` is accepted at all under `rules` (empty = open gateway).
pub fn token_known(rules: &[TokenRule], token: &str) -> bool {
    rules.is_empty() || rules.iter().any(|r| r.secret.matches(token))
}

/// Whether an uplink of `session` claimed with `token` may stay connected
/// under `rules` (after a reload replaced them).
pub fn still_allowed(rules: &[TokenRule], token: &str, session: &str) -> bool {
    rules.is_empty()
        || rules
            .iter()
            .any(|r| r.secret.matches(token) && r.allows(session))
}

/// A request rate: `n` per `per` (e.g. `"50/s"`, `"1000/m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub n: u32,
    pub per: std::time::Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("rate {s:?}: expected N/s, N/m or N/h"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate {s:?}: {n:?} is not a whole number"))?;
        if n == 0 {
            return Err(format!("rate {s:?}: must be at least 1"));
        }
        let per = match unit.trim() {
            "s" => std::time::Duration::from_secs(1),
            "m" => std::time::Duration::from_secs(60),
            "h" => std::time::Duration::from_secs(3600),
            u => return Err(format!("rate {s:?}: unit {u:?} is not s, m or h")),
        };
        Ok(Rate { n, per })
    }
}

impl std::fmt::Display for Rate {
    /// The form `FromStr` reads (`--print-config` shows it back).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            3600 => "h",
            60 => "m",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.n)
    }
}

/// One `[[tokens]]` entry (or one `--token`, which may claim any name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRule {
    pub secret: Secret,
    /// Exact names and `prefix-*` patterns; `["*"]` for any name.
    pub sessions: Vec<String>,
    /// Sessions this token may hold at once.
    pub max_sessions: Option<u32>,
    /// Uplinks this token may hold at once (all its sessions).
    pub max_uplinks: Option<u32>,
    /// Requests per session claimed with this token.
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
    /// Several agents (agent ids) may serve one session together.
    pub pool: bool,
}

impl TokenRule {
    /// A rule for a plain `--token`: any name, no limits, no pool.
    pub fn any_session(secret: &str) -> TokenRule {
        TokenRule {
            secret: Secret::Plain(secret.to_string()),
            sessions: vec!["*".into()],
            max_sessions: None,
            max_uplinks: None,
            rate: None,
            burst: None,
            pool: false,
        }
    }

    /// Whether this rule's scope covers `session`.
    pub fn allows(&self, session: &str) -> bool {
        self.sessions.iter().any(|p| pattern_matches(p, session))
    }
}

/// `*` matches any name; `prefix-*` (or any `prefix*`) matches names that
/// start with `prefix` and are longer than it; anything else is exact.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.len() > prefix.len() && name.starts_with(prefix),
        None => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("team-*", "team-a"));
        assert!(!pattern_matches("team-*", "team-"));
        assert!(!pattern_matches("team-*", "teams"));
        assert!(pattern_matches("alpha", "alpha"));
        assert!(!pattern_matches("alpha", "alpha2"));
    }

    #[test]
    fn rates() {
        assert_eq!(
            "50/s".parse::<Rate>(),
            Ok(Rate {
                n: 50,
                per: std::time::Duration::from_secs(1)
            })
        );
        assert!("0/s".parse::<Rate>().is_err());
        assert!("5/d".parse::<Rate>().is_err());
        assert!("x/s".parse::<Rate>().is_err());
    }

    #[test]
    fn hashed_and_plain_secrets_match_only_their_token() {
        let plain = Secret::Plain("alpha-secret-0123456789abcdef".into());
        assert!(plain.matches("alpha-secret-0123456789abcdef"));
        assert!(!plain.matches("alpha-secret-0123456789abcdeX"));
        let d = ring::digest::digest(&ring::digest::SHA256, b"beta-secret");
        let mut h = [0u8; 32];
        h.copy_from_slice(d.as_ref());
        let hashed = Secret::Sha256(h);
        assert!(hashed.matches("beta-secret"));
        assert!(!hashed.matches("beta-secreT"));
        let mut r = TokenRule::any_session("x");
        r.secret = hashed;
        r.sessions = vec!["team-*".into()];
        let rules = [r];
        assert!(still_allowed(&rules, "beta-secret", "team-a"));
        assert!(!still_allowed(&rules, "beta-secret", "alpha"));
        assert!(!still_allowed(&rules, "other", "team-a"));
        assert!(still_allowed(&[], "anything", "alpha"));
    }

    #[test]
    fn rates_print_as_they_parse() {
        for s in ["50/s", "1000/m", "3/h"] {
            assert_eq!(s.parse::<Rate>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn secrets_never_print() {
        let r = TokenRule::any_session("hunter2-very-secret");
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
