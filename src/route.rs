//! Pure routing: which session a Host names.
//!
//! `NAME` and `NAME.<domain>` name session NAME (the port is already
//! stripped by the HTTP parser); everything else goes to the default
//! session when one is configured. Whether the session is connected is the
//! gateway's business, not this module's.

/// The session a Host header names, before the default-session fallback.
pub fn session_for_host(host: &str, domain: Option<&str>) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if crate::proto::valid_session_name(&host) {
        return Some(host);
    }
    let domain = domain?.trim_end_matches('.').to_ascii_lowercase();
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
    crate::proto::valid_session_name(label).then(|| label.to_string())
}

/// Host -> session, falling back to `default` when the named session is
/// absent (`is_present` says whether any agent holds it).
pub fn route(
    host: Option<&str>,
    domain: Option<&str>,
    default: Option<&str>,
    is_present: impl Fn(&str) -> bool,
) -> Option<String> {
    if let Some(name) = host.and_then(|h| session_for_host(h, domain)) {
        if is_present(&name) || default.is_none() {
            return Some(name);
        }
    }
    default.map(str::to_string)
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
