//! What the load generator sends: the target URL, resolved once, and the
//! request bytes, built once per Host and reused for every request.

use std::net::{SocketAddr, ToSocketAddrs};

use bytes::{BufMut, Bytes, BytesMut};

/// A parsed `http://host[:port][/path]` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// Host as written (brackets kept for IPv6), without the port.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with '/'.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        let rest = if lower.starts_with("http://") {
            &url[7..]
        } else if lower.starts_with("https://") {
            return Err(format!(
                "{url}: https is not supported; point the bench at a plain-HTTP listener"
            ));
        } else {
            return Err(format!(
                "{url}: expected a URL like http://127.0.0.1:8080/path"
            ));
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) || path.contains('#') {
            return Err(format!(
                "{url}: the path must not contain spaces, controls or '#'"
            ));
        }
        if authority.is_empty() || authority.contains('@') {
            return Err(format!(
                "{url}: expected http://host:port/path (no user info)"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let close = v6
                .find(']')
                .ok_or_else(|| format!("{url}: unterminated IPv6 literal"))?;
            let host = &authority[..close + 2];
            match &v6[close + 1..] {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{url}: bad port"))?,
                    ),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{url}: bad port {p:?}"))?,
        };
        if host.is_empty() {
            return Err(format!("{url}: missing host"));
        }
        Ok(Url {
            host: host.to_string(),
            port,
            path,
        })
    }

    /// `host:port` as a Host header (port omitted when it is 80).
    pub fn authority(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host with a blocking lookup: call before the runtimes
    /// start. IPv4 is preferred when a name has both families (servers
    /// started on "localhost" usually listen on 127.0.0.1).
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = (host, self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| format!("no address for {}", self.host))
    }
}

/// Everything that shapes the request bytes.
pub struct RequestShape<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    pub body_size: usize,
    pub keepalive: bool,
}

/// Checks a header (or Host) for bytes that would break the request.
pub fn validate_header(name: &str, value: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("bad header name {name:?}"));
    }
    if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return Err(format!("bad value for header {name}: control characters"));
    }
    Ok(())
}

/// Builds the request bytes for one Host.
pub fn build_request(shape: &RequestShape<'_>, host: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(128 + shape.body_size);
    b.put_slice(shape.method.as_bytes());
    b.put_u8(b' ');
    b.put_slice(shape.path.as_bytes());
    b.put_slice(b" HTTP/1.1\r\nHost: ");
    b.put_slice(host.as_bytes());
    b.put_slice(b"\r\n");
    let has = |n: &str| shape.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has("user-agent") {
        b.put_slice(b"User-Agent: ringtunnel-bench\r\n");
    }
    for (k, v) in shape.headers {
        b.put_slice(k.as_bytes());
        b.put_slice(b": ");
        b.put_slice(v.as_bytes());
        b.put_slice(b"\r\n");
    }
    let sends_body = shape.body_size > 0 || matches!(shape.method, "POST" | "PUT" | "PATCH");
    if sends_body && !has("content-length") {
        b.put_slice(format!("Content-Length: {}\r\n", shape.body_size).as_bytes());
    }
    if !shape.keepalive && !has("connection") {
        b.put_slice(b"Connection: close\r\n");
    }
    b.put_slice(b"\r\n");
    b.put_bytes(b'x', shape.body_size);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = Url::parse("http://127.0.0.1:8080/a/b?q=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/a/b?q=1")
        );
        assert_eq!(u.authority(), "127.0.0.1:8080");

        let u = Url::parse("HTTP://localhost").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("localhost", 80, "/")
        );
        assert_eq!(u.authority(), "localhost");

        let u = Url::parse("http://[::1]:9000?x").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("[::1]", 9000, "/?x")
        );
        assert_eq!(u.resolve().unwrap(), "[::1]:9000".parse().unwrap());

        assert_eq!(
            Url::parse("http://localhost:1/")
                .unwrap()
                .resolve()
                .unwrap()
                .port(),
            1
        );

        for bad in [
            "https://x/",
            "ftp://x/",
            "127.0.0.1:80",
            "http://",
            "http://:80/",
            "http://h:0/",
            "http://h:99999/",
            "http://u@h/",
            "http://h/a b",
            "http://[::1/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builds_requests() {
        let headers = vec![("X-A".to_string(), "1".to_string())];
        let shape = RequestShape {
            method: "POST",
            path: "/p",
            headers: &headers,
            body_size: 3,
            keepalive: false,
        };
        let req = build_request(&shape, "demo");
        assert_eq!(
            &req[..],
            b"POST /p HTTP/1.1\r\nHost: demo\r\nUser-Agent: ringtunnel-bench\r\nX-A: 1\r\n\
              Content-Length: 3\r\nConnection: close\r\n\r\nxxx"
        );
        let shape = RequestShape {
            method: "GET",
            path: "/",
            headers: &[],
            body_size: 0,
            keepalive: true,
        };
        assert_eq!(
            &build_request(&shape, "h:1")[..],
            b"GET / HTTP/1.1\r\nHost: h:1\r\nUser-Agent: ringtunnel-bench\r\n\r\n"
        );
    }

    #[test]
    fn validates_headers() {
        assert!(validate_header("X-Ok", "fine value\twith tab").is_ok());
        assert!(validate_header("Bad Name", "v").is_err());
        assert!(validate_header("", "v").is_err());
        assert!(validate_header("X", "a\r\nInjected: 1").is_err());
    }
}
