//! Certificates of the public HTTPS edge (`--https-listen`), chosen per
//! TLS handshake by the name the client asks for (SNI).
//!
//! Owns loading the PEM pairs, the names each certificate serves (its
//! subjectAltName DNS entries, read once at load), and the choice, which
//! is pure and unit-tested:
//!
//! - an exact name beats a wildcard; among equals the first listed wins;
//! - `*.tunnel.example.com` covers exactly one more label
//!   (`a.tunnel.example.com`, not `tunnel.example.com` nor
//!   `a.b.tunnel.example.com`), as browsers match it;
//! - no SNI (a client connecting by IP address) or a name no certificate
//!   covers gets the first certificate, the default: the client then
//!   decides whether it trusts it (curl and browsers refuse a name
//!   mismatch). Refusing the handshake instead would only hide why.
//!
//! A reload builds a whole new [`SniCerts`] (and `ServerConfig`) and
//! swaps it in `gateway::Live`; handshakes already running keep the one
//! they started with.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// One certificate chain and its key (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The edge's certificates and the names they serve.
#[derive(Debug)]
pub struct SniCerts {
    keys: Vec<Arc<CertifiedKey>>,
    names: NameTable,
}

/// Name -> index into the certificate list (pure; see the module doc).
#[derive(Debug, Default)]
struct NameTable {
    exact: HashMap<String, usize>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, usize>,
}

impl NameTable {
    /// Registers the DNS names of certificate `index`; earlier
    /// certificates keep a name they already have.
    fn add(&mut self, index: usize, name: &str) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(parent) => self.wildcard.entry(parent.to_string()).or_insert(index),
            None => self.exact.entry(name).or_insert(index),
        };
    }

    /// The certificate for `sni` (index 0, the default, if none covers it).
    fn pick(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni else { return 0 };
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(i) = self.exact.get(&sni) {
            return *i;
        }
        sni.split_once('.')
            .and_then(|(label, parent)| {
                (!label.is_empty())
                    .then(|| self.wildcard.get(parent))
                    .flatten()
            })
            .copied()
            .unwrap_or(0)
    }
}

/// The DNS names (subjectAltName) of a leaf certificate.
fn dns_names(cert: &rustls::pki_types::CertificateDer<'_>) -> Result<Vec<String>, String> {
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("not parsable: {e}"))?;
    Ok(ee.valid_dns_names().map(str::to_string).collect())
}

impl SniCerts {
    /// Loads every pair; errors name the file and what was wrong.
    pub fn load(files: &[CertFiles]) -> Result<SniCerts, String> {
        if files.is_empty() {
            return Err(
                "--https-listen needs a certificate: --https-cert FILE --https-key FILE, \
                 or [[https_certs]] tables in --config"
                    .into(),
            );
        }
        let provider = crate::tls::provider();
        let mut keys = Vec::with_capacity(files.len());
        let mut names = NameTable::default();
        for (i, f) in files.iter().enumerate() {
            let chain = crate::tls::load_certs(&f.cert, "HTTPS certificate")?;
            let key = crate::tls::load_key(&f.key, "HTTPS key")?;
            for n in dns_names(&chain[0])
                .map_err(|e| format!("HTTPS certificate {}: {e}", f.cert.display()))?
            {
                names.add(i, &n);
            }
            let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                format!(
                    "HTTPS key {} does not fit certificate {}: {e}",
                    f.key.display(),
                    f.cert.display()
                )
            })?;
            keys.push(Arc::new(ck));
        }
        Ok(SniCerts { keys, names })
    }

    /// Index of the certificate served for `sni` (0 = the default).
    pub fn pick(&self, sni: Option<&str>) -> usize {
        self.names.pick(sni)
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.keys.get(self.pick(hello.server_name())).cloned()
    }
}

/// The rustls configuration of the HTTPS edge: TLS 1.2 and 1.3 (public
/// clients), session tickets, certificates by SNI, ALPN `http/1.1` only
/// (the edge speaks HTTP/1.x). A client offering only `h2` is refused:
/// rustls queues a `no_application_protocol` alert after its ServerHello,
/// but monoio-rustls flushes only the ServerHello before the handshake
/// fails, so the client sees the connection close.
pub fn edge_server_config(files: &[CertFiles]) -> Result<Arc<ServerConfig>, String> {
    let certs = SniCerts::load(files)?;
    let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Stateless resumption tickets (keys rotated by rustls every 6 hours):
    // any core can resume any client's session, and no session cache
    // fills up. A reload starts a new key, so resumptions after it fall
    // back to a full handshake.
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(certs: &[&[&str]]) -> NameTable {
        let mut t = NameTable::default();
        for (i, names) in certs.iter().enumerate() {
            for n in *names {
                t.add(i, n);
            }
        }
        t
    }

    #[test]
    fn exact_beats_wildcard_and_wildcards_cover_one_label() {
        let t = table(&[
            &["gw.example.com"],
            &["*.tunnel.example.com"],
            &["api.tunnel.example.com"],
        ]);
        assert_eq!(t.pick(Some("api.tunnel.example.com")), 2);
        assert_eq!(t.pick(Some("demo.tunnel.example.com")), 1);
        assert_eq!(t.pick(Some("DEMO.Tunnel.Example.com.")), 1);
        // One label only, and not the parent itself.
        assert_eq!(t.pick(Some("a.b.tunnel.example.com")), 0);
        assert_eq!(t.pick(Some("tunnel.example.com")), 0);
        assert_eq!(t.pick(Some(".tunnel.example.com")), 0);
        assert_eq!(t.pick(Some("gw.example.com")), 0);
    }

    #[test]
    fn no_or_unknown_sni_gets_the_first_certificate() {
        let t = table(&[&["b.example.com"], &["a.example.com"]]);
        assert_eq!(t.pick(None), 0);
        assert_eq!(t.pick(Some("elsewhere.org")), 0);
        assert_eq!(t.pick(Some("a.example.com")), 1);
    }

    #[test]
    fn the_first_certificate_listing_a_name_keeps_it() {
        let t = table(&[&["x.example.com"], &["*.example.com", "x.example.com"]]);
        assert_eq!(t.pick(Some("x.example.com")), 0);
        assert_eq!(t.pick(Some("y.example.com")), 1);
    }
}
