//! Scoped tokens: which agent secret may claim which session names, with
//! what limits. Plain data and pure checks (no IO, no clocks), shared by
//! the flags (`--token`), the config file (`[[tokens]]`) and the gateway's
//! handshake.
//!
//! A rule's `sessions` are exact names or `prefix-*` patterns. An empty
//! rule list means an open gateway: any token may claim any free name (and
//! then owns it).
//!
//! Secrets are compared in constant time (`subtle`), hashed ones as the
//! SHA-256 of the presented token, so the time a refusal takes says
//! nothing about how close a guess was.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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

/// Whether a session claimed under the rule whose secret hashes to
/// `owner` may stay connected under `rules` (after a reload replaced
/// them): some rule with that secret still covers the session. Not a
/// credential check (no token is presented), so no constant time needed.
pub fn rule_still_allows(rules: &[TokenRule], owner: &[u8; 32], session: &str) -> bool {
    rules
        .iter()
        .any(|r| &r.secret.sha256() == owner && r.allows(session))
}

/// Rates for one session name, whoever claims it (a `[[sessions]]` table
/// of the config file). Each rate set here wins over the claiming token's
/// rule and over the gateway's flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRule {
    pub name: String,
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
    pub rate_per_ip: Option<Rate>,
    pub burst_per_ip: Option<u32>,
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
    /// Requests per client IP within each session claimed with this token.
    pub rate_per_ip: Option<Rate>,
    pub burst_per_ip: Option<u32>,
    /// Several agents (agent ids) may serve one session together.
    pub pool: bool,
    /// TCP tunnel ports this token may open. `None`: any port of the
    /// gateway's `--tcp-ports`; an empty set: none.
    pub tcp_ports: Option<crate::proto::tcp::PortRanges>,
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
            rate_per_ip: None,
            burst_per_ip: None,
            pool: false,
            tcp_ports: None,
        }
    }

    /// Whether this rule's scope covers `session`.
    pub fn allows(&self, session: &str) -> bool {
        self.sessions.iter().any(|p| pattern_matches(p, session))
    }
}

/// What a presented token may do, per the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No rules: an open gateway.
    Open,
    /// Rule `i` matches the secret and covers the session.
    Rule(usize),
    /// No rule has this secret.
    BadToken,
    /// The secret is known but no rule with it covers the session.
    OutOfScope,
}

impl Secret {
    /// The secret's SHA-256: what identifies a token's rule (e.g. as a
    /// session's owner) without keeping the secret itself.
    pub fn sha256(&self) -> [u8; 32] {
        match self {
            Secret::Plain(s) => Sha256::digest(s.as_bytes()).into(),
            Secret::Sha256(h) => *h,
        }
    }

    /// Constant time in the secret's content. `sha` is the presented
    /// token's SHA-256, computed once by the caller for all rules.
    fn matches(&self, token: &[u8], sha: &[u8; 32]) -> bool {
        match self {
            // Unequal lengths return at once; a length is no secret worth
            // hiding, the content is.
            Secret::Plain(s) => s.as_bytes().ct_eq(token).into(),
            Secret::Sha256(h) => h.ct_eq(sha).into(),
        }
    }
}

/// Checks `token` against every rule (no early exit on a match, so the
/// rule's position does not show in the timing) and picks the first rule
/// with that secret whose scope covers `session`.
pub fn authorize(rules: &[TokenRule], token: &str, session: &str) -> Verdict {
    if rules.is_empty() {
        return Verdict::Open;
    }
    let sha: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut known = false;
    let mut chosen = None;
    for (i, r) in rules.iter().enumerate() {
        if r.secret.matches(token.as_bytes(), &sha) {
            known = true;
            if chosen.is_none() && r.allows(session) {
                chosen = Some(i);
            }
        }
    }
    match (chosen, known) {
        (Some(i), _) => Verdict::Rule(i),
        (None, true) => Verdict::OutOfScope,
        (None, false) => Verdict::BadToken,
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

    fn scoped(secret: Secret, sessions: &[&str]) -> TokenRule {
        TokenRule {
            secret,
            sessions: sessions.iter().map(|s| s.to_string()).collect(),
            ..TokenRule::any_session("")
        }
    }

    #[test]
    fn authorize_plain_hashed_and_scoped() {
        let sha: [u8; 32] = Sha256::digest(b"team-secret").into();
        let rules = vec![
            scoped(Secret::Plain("alpha-secret".into()), &["alpha"]),
            scoped(Secret::Sha256(sha), &["team-*"]),
            TokenRule::any_session("root"),
        ];
        assert_eq!(authorize(&[], "x", "y"), Verdict::Open);
        assert_eq!(authorize(&rules, "alpha-secret", "alpha"), Verdict::Rule(0));
        assert_eq!(
            authorize(&rules, "alpha-secret", "beta"),
            Verdict::OutOfScope
        );
        assert_eq!(authorize(&rules, "team-secret", "team-a"), Verdict::Rule(1));
        assert_eq!(
            authorize(&rules, "team-secret", "alpha"),
            Verdict::OutOfScope
        );
        // The hash itself is not the secret.
        let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(authorize(&rules, &hex, "team-a"), Verdict::BadToken);
        assert_eq!(authorize(&rules, "alpha-secre", "alpha"), Verdict::BadToken);
        assert_eq!(authorize(&rules, "", "alpha"), Verdict::BadToken);
        assert_eq!(authorize(&rules, "root", "anything"), Verdict::Rule(2));
    }

    #[test]
    fn the_first_rule_covering_the_session_wins() {
        let rules = vec![
            scoped(Secret::Plain("s".into()), &["a"]),
            scoped(Secret::Plain("s".into()), &["b"]),
        ];
        assert_eq!(authorize(&rules, "s", "b"), Verdict::Rule(1));
        assert_eq!(authorize(&rules, "s", "a"), Verdict::Rule(0));
    }

    #[test]
    fn a_reload_keeps_only_claims_its_rules_still_cover() {
        let hashed = Secret::Sha256(Sha256::digest(b"beta-secret").into());
        let owner = hashed.sha256();
        let mut r = TokenRule::any_session("x");
        r.secret = hashed;
        r.sessions = vec!["team-*".into()];
        let rules = [r];
        assert!(rule_still_allows(&rules, &owner, "team-a"));
        assert!(!rule_still_allows(&rules, &owner, "alpha"));
        let other = Secret::Plain("other".into()).sha256();
        assert!(!rule_still_allows(&rules, &other, "team-a"));
        // A plain secret and its hash name the same owner.
        assert_eq!(Secret::Plain("beta-secret".into()).sha256(), owner);
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
