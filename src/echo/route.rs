//! Request target -> echo route, with every numeric parameter validated and
//! bounded here so the handlers never see an unbounded request.

/// Longest `/delay/{ms}`; longer asks are clamped.
pub const MAX_DELAY_MS: u64 = 60_000;
/// Largest `/bytes/{n}`.
pub const MAX_BYTES: u64 = 1 << 30;
/// Most chunks for `/stream/{n}`.
pub const MAX_STREAM: u32 = 100_000;
/// Bounds for `/drip`: bytes, per-byte delay, and their product (total time).
pub const MAX_DRIP_BYTES: u64 = 1 << 20;
pub const MAX_DRIP_TOTAL_MS: u64 = 600_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Root,
    Delay(u64),
    Bytes(u64),
    Status(u16),
    Echo,
    Stream(u32),
    Headers,
    Drip {
        bytes: u64,
        delay_ms: u64,
    },
    Upgrade,
    NotFound,
    /// A known route with a bad parameter; the text is the response body.
    BadRequest(&'static str),
}

impl Route {
    pub fn parse(target: &str) -> Route {
        let (path, query) = split_target(target);
        let mut segments = path.strip_prefix('/').unwrap_or(path).splitn(2, '/');
        let first = segments.next().unwrap_or("");
        let arg = segments.next();
        match (first, arg) {
            ("", None) => Route::Root,
            ("echo", None) => Route::Echo,
            ("headers", None) => Route::Headers,
            ("upgrade", None) => Route::Upgrade,
            ("drip", None) => parse_drip(query),
            ("delay", Some(ms)) => match parse_u64(ms) {
                Some(ms) => Route::Delay(ms.min(MAX_DELAY_MS)),
                None => Route::BadRequest("delay must be a number of milliseconds\n"),
            },
            ("bytes", Some(n)) => match parse_u64(n) {
                Some(n) if n <= MAX_BYTES => Route::Bytes(n),
                _ => Route::BadRequest("bytes must be a number up to 1073741824\n"),
            },
            ("status", Some(code)) => match parse_u64(code) {
                Some(c @ 100..=599) => Route::Status(c as u16),
                _ => Route::BadRequest("status must be a number from 100 to 599\n"),
            },
            ("stream", Some(n)) => match parse_u64(n) {
                Some(n) if n <= u64::from(MAX_STREAM) => Route::Stream(n as u32),
                _ => Route::BadRequest("stream must be a number up to 100000\n"),
            },
            _ => Route::NotFound,
        }
    }
}

/// Path and query of an origin-form or absolute-form target.
fn split_target(target: &str) -> (&str, &str) {
    let target = match target.find("://") {
        Some(i) if !target[..i].contains('/') => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |p| &rest[p..])
        }
        _ => target,
    };
    let target = target.split('#').next().unwrap_or("");
    match target.split_once('?') {
        Some((path, query)) => (path, query),
        None => (target, ""),
    }
}

/// Plain decimal digits only (`str::parse` would also take a leading `+`).
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_drip(query: &str) -> Route {
    let mut bytes = 10;
    let mut delay_ms = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "bytes" => &mut bytes,
            "delay_ms" => &mut delay_ms,
            _ => continue,
        };
        match parse_u64(value) {
            Some(v) => *slot = v,
            None => return Route::BadRequest("drip parameters must be numbers\n"),
        }
    }
    let total = bytes.checked_mul(delay_ms);
    if bytes > MAX_DRIP_BYTES
        || delay_ms > MAX_DELAY_MS
        || total.map_or(true, |t| t > MAX_DRIP_TOTAL_MS)
    {
        return Route::BadRequest(
            "drip: bytes <= 1048576, delay_ms <= 60000, bytes * delay_ms <= 600000\n",
        );
    }
    Route::Drip { bytes, delay_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::parse("/"), Route::Root);
        assert_eq!(Route::parse("/?x=1"), Route::Root);
        assert_eq!(Route::parse("http://demo.example"), Route::Root);
        assert_eq!(Route::parse("http://demo.example/echo?x"), Route::Echo);
        assert_eq!(Route::parse("/echo"), Route::Echo);
        assert_eq!(Route::parse("/headers"), Route::Headers);
        assert_eq!(Route::parse("/upgrade"), Route::Upgrade);
        assert_eq!(Route::parse("/delay/250"), Route::Delay(250));
        assert_eq!(Route::parse("/delay/999999999"), Route::Delay(MAX_DELAY_MS));
        assert_eq!(Route::parse("/bytes/0"), Route::Bytes(0));
        assert_eq!(Route::parse("/bytes/1073741824"), Route::Bytes(MAX_BYTES));
        assert_eq!(Route::parse("/status/204"), Route::Status(204));
        assert_eq!(Route::parse("/stream/100000"), Route::Stream(100_000));
        assert_eq!(
            Route::parse("/drip"),
            Route::Drip {
                bytes: 10,
                delay_ms: 0
            }
        );
        assert_eq!(
            Route::parse("/drip?bytes=5&delay_ms=20&x=y"),
            Route::Drip {
                bytes: 5,
                delay_ms: 20
            }
        );
    }

    #[test]
    fn bad_parameters() {
        for t in [
            "/delay/x",
            "/delay/",
            "/bytes/1073741825",
            "/bytes/+5",
            "/bytes/99999999999999999999999",
            "/status/99",
            "/status/600",
            "/stream/100001",
            "/drip?bytes=x",
            "/drip?bytes=2000000",
            "/drip?bytes=1000&delay_ms=1000",
            "/drip?bytes=18446744073709551615&delay_ms=2",
            "/status/200/x",
        ] {
            assert!(matches!(Route::parse(t), Route::BadRequest(_)), "{t}");
        }
    }

    #[test]
    fn unknown_paths() {
        for t in ["/nope", "/echo/", "/echo/x", "/bytes", "/headersx", "*"] {
            assert_eq!(Route::parse(t), Route::NotFound, "{t}");
        }
    }
}
