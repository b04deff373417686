//! Pure routing: which session a Host names.
//!
//! `NAME` and `NAME.<domain>` name session NAME (the port is already
//! stripped by the HTTP parser); everything else goes to the default
//! session when one is configured. Whether the session is connected is the
//! gateway's business, not this module's.

use std::borrow::Cow;

/// The session a Host header names, before the default-session fallback.
/// Borrowed from `host` when it is already lower case (the HTTP parser
/// lowercases Host), so routing a request allocates nothing.
pub fn session_for_host<'a>(host: &'a str, domain: Option<&str>) -> Option<Cow<'a, str>> {
    let host = host.trim_end_matches('.');
    let host: Cow<'a, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    if crate::proto::valid_session_name(&host) {
        return Some(host);
    }
    let domain = domain?.trim_end_matches('.').as_bytes();
    // `label.domain`, the domain compared without case. The byte before it
    // must be the '.', an ASCII byte, so the label ends on a char boundary.
    let cut = host.len().checked_sub(domain.len() + 1)?;
    let b = host.as_bytes();
    if b[cut] != b'.' || !b[cut + 1..].eq_ignore_ascii_case(domain) {
        return None;
    }
    if !crate::proto::valid_session_name(&host[..cut]) {
        return None;
    }
    Some(match host {
        Cow::Borrowed(h) => Cow::Borrowed(&h[..cut]),
        Cow::Owned(mut h) => {
            h.truncate(cut);
            Cow::Owned(h)
        }
    })
}

/// Host -> session, falling back to `default` when the named session is
/// absent (`is_present` says whether any agent holds it).
pub fn route<'a>(
    host: Option<&'a str>,
    domain: Option<&str>,
    default: Option<&'a str>,
    is_present: impl Fn(&str) -> bool,
) -> Option<Cow<'a, str>> {
    if let Some(name) = host.and_then(|h| session_for_host(h, domain)) {
        if is_present(&name) || default.is_none() {
            return Some(name);
        }
    }
    default.map(Cow::Borrowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_domain_names() {
        assert_eq!(session_for_host("demo", None).as_deref(), Some("demo"));
        assert_eq!(session_for_host("DEMO", None).as_deref(), Some("demo"));
        assert_eq!(
            session_for_host("demo.t.example.com", Some("t.example.com")).as_deref(),
            Some("demo")
        );
        assert_eq!(
            session_for_host("demo.t.example.com.", Some("t.example.com")).as_deref(),
            Some("demo")
        );
        assert_eq!(
            session_for_host("a.b.t.example.com", Some("t.example.com")),
            None
        );
        assert_eq!(
            session_for_host("demo.other.com", Some("t.example.com")),
            None
        );
        assert_eq!(
            session_for_host("xt.example.com", Some("t.example.com")),
            None
        );
        assert_eq!(session_for_host("127.0.0.1", None), None);
    }

    /// The allocating form this replaced, kept as the model: lowercase
    /// everything, then strip `.domain`.
    fn model(host: &str, domain: Option<&str>) -> Option<String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if crate::proto::valid_session_name(&host) {
            return Some(host);
        }
        let domain = domain?.trim_end_matches('.').to_ascii_lowercase();
        let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
        crate::proto::valid_session_name(label).then(|| label.to_string())
    }

    #[test]
    fn agrees_with_the_model_and_borrows_lower_case_hosts() {
        let parts = [
            "demo", "DeMo", "a", "t", "T", "example", "EXAMPLE", "com", "", ".", "é", "x-1", "a_b",
        ];
        let domains = [
            None,
            Some("t.example.com"),
            Some("T.Example.COM."),
            Some("com"),
            Some(""),
            Some("é.com"),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = 1 + (next() % 5) as usize;
            let mut host = String::new();
            for k in 0..n {
                if k > 0 && next() % 4 != 0 {
                    host.push('.');
                }
                host.push_str(parts[(next() % parts.len() as u64) as usize]);
            }
            let domain = domains[(next() % domains.len() as u64) as usize];
            let got = session_for_host(&host, domain);
            assert_eq!(
                got.as_deref(),
                model(&host, domain).as_deref(),
                "host {host:?} domain {domain:?}"
            );
            if !host.bytes().any(|b| b.is_ascii_uppercase()) {
                assert!(
                    !matches!(got, Some(Cow::Owned(_))),
                    "a lower-case host was copied: {host:?}"
                );
            }
        }
    }

    #[test]
    fn default_session_catches_the_rest() {
        let present = |n: &str| n == "app";
        assert_eq!(
            route(Some("app"), None, Some("dflt"), present).as_deref(),
            Some("app")
        );
        assert_eq!(
            route(Some("nope"), None, Some("dflt"), present).as_deref(),
            Some("dflt")
        );
        assert_eq!(
            route(Some("1.2.3.4"), None, Some("dflt"), present).as_deref(),
            Some("dflt")
        );
        assert_eq!(
            route(None, None, Some("dflt"), present).as_deref(),
            Some("dflt")
        );
        assert_eq!(
            route(Some("nope"), None, None, present).as_deref(),
            Some("nope")
        );
        assert_eq!(route(Some("1.2.3.4"), None, None, present), None);
    }
}
