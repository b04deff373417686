//! The live dashboard's files (`GET /`), embedded in the binary with
//! `include_str!`: plain HTML, CSS and JavaScript under `dashboard/`, no
//! CDN and no build step. The page polls `/stats?limit=..` once a second
//! and draws its charts as inline SVG with its own code.
//!
//! The files hold no data, so they are served without the admin token;
//! the page sends the token (from the URL fragment `#token=...` or its
//! form, kept in `sessionStorage`) as `Authorization: Bearer` with each
//! poll. Content-Security-Policy allows only these files: session names
//! are agents' input and the page writes them as text, never as markup.

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// Extra headers of every admin answer (each line ends in CRLF).
pub const SECURITY_HEADERS: &str = "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\nReferrer-Policy: no-referrer\r\n";

/// Content type and body of a dashboard file, by request path.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", INDEX)),
        "/dashboard.js" => Some(("text/javascript; charset=utf-8", SCRIPT)),
        "/dashboard.css" => Some(("text/css; charset=utf-8", STYLE)),
        _ => None,
    }
}
