//! TLS settings of the uplink: rustls configurations built from PEM files
//! at start-up, and what a failed TLS handshake means for an agent.
//!
//! Owns no socket (the streams are in `io/transport.rs`). Both ends are
//! ringtunnel, so only TLS 1.3 is offered, with the `ring` provider chosen
//! explicitly rather than through a process-wide default.
//!
//! Every loading error names the file and what was wrong with it, because
//! these run once at start-up and their message is all the operator sees.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;

/// Gateway side: the tunnel listener's certificate, and optionally the CA
/// that agents' client certificates must chain to (mutual TLS).
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Agent side: whom to trust and, for mutual TLS, who we are.
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    /// Trust only this CA; `None` = the system's roots.
    pub ca: Option<PathBuf>,
    /// Name to verify; `None` = the host part of `--gateway`.
    pub server_name: Option<String>,
    /// Client certificate and key (both or neither).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM CERTIFICATE block found",
            path.display()
        ));
    }
    Ok(certs)
}

pub(crate) fn load_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn load_roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path, what)? {
        roots
            .add(c)
            .map_err(|e| format!("{what} {}: not a usable CA: {e}", path.display()))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(format!(
            "--tls: no usable CA certificate in the system's trust store{why}; pass --ca FILE"
        ));
    }
    Ok(roots)
}

/// The gateway's TLS configuration for its tunnel listener.
pub fn server_config(f: &ServerTlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs = load_certs(&f.cert, "--tunnel-tls-cert")?;
    let key = load_key(&f.key, "--tunnel-tls-key")?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let builder = match &f.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = load_roots(ca, "--client-ca")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        format!("--tunnel-tls-cert/--tunnel-tls-key: the key does not fit the certificate: {e}")
    })?;
    // Agents keep their uplinks for hours and never resume sessions:
    // tickets would only cost bytes and CPU on every handshake.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// The agent's TLS configuration.
pub fn client_config(f: &ClientTlsFiles) -> Result<Arc<ClientConfig>, String> {
    let roots = match &f.ca {
        Some(ca) => load_roots(ca, "--ca")?,
        None => system_roots()?,
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.into(), provider())
        .build()
        .map_err(|e| format!("--ca: {e}"))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(verifier);
    let cfg = match (&f.cert, &f.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(cert, "--cert")?, load_key(key, "--key")?)
            .map_err(|e| format!("--cert/--key: the key does not fit the certificate: {e}"))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("--cert and --key go together".into()),
    };
    Ok(Arc::new(cfg))
}

/// The name the agent verifies: `--server-name`, else the host part of
/// `--gateway` (a name or an IP address; rustls checks either against the
/// certificate's subject alternative names).
pub fn server_name(f: &ClientTlsFiles, gateway: &str) -> Result<ServerName<'static>, String> {
    let name = match &f.server_name {
        Some(n) => n.clone(),
        None => host_part(gateway).to_string(),
    };
    ServerName::try_from(name.clone())
        .map_err(|_| format!("--server-name {name:?}: not a valid DNS name or IP address"))
}

fn host_part(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    }
}

/// The rustls error carried by an IO error from a TLS stream, if any.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Why an agent's TLS exchange with the gateway failed, when that is a
/// refusal retrying cannot fix (an untrusted or wrong certificate, a
/// gateway that demands a client certificate, a gateway that does not
/// speak TLS). `None` for everything else (network errors: retry).
pub fn agent_fatal(e: &std::io::Error, name: &ServerName<'_>) -> Option<String> {
    use rustls::Error as E;
    let reason = match rustls_error(e)? {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "the gateway's certificate is not signed by a trusted CA \
                 (unknown issuer); pass the CA that signed it with --ca"
                    .to_string()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "the gateway's certificate does not cover the name {:?} (name mismatch); \
                     use --server-name NAME with a name in the certificate",
                    name.to_str()
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the gateway's certificate has expired (expired certificate)".to_string()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the gateway's certificate is not valid yet (check both clocks)".to_string()
            }
            CertificateError::Revoked => "the gateway's certificate was revoked".to_string(),
            other => format!("the gateway's certificate is invalid: {other:?}"),
        },
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            "the gateway requires a client certificate (mutual TLS); pass --cert and --key"
                .to_string()
        }
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied),
        ) => format!("the gateway rejected this agent's client certificate ({a:?})"),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the gateway did not answer with TLS (is its tunnel listener started with \
             --tunnel-tls-cert?)"
                .to_string()
        }
        _ => return None,
    };
    Some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_of_gateway_addresses() {
        assert_eq!(host_part("gw.example.com:7000"), "gw.example.com");
        assert_eq!(host_part("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_part("[::1]:7000"), "::1");
        assert_eq!(host_part("gw"), "gw");
    }

    #[test]
    fn verification_errors_name_their_reason() {
        let name = ServerName::try_from("gw.example.com").unwrap();
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let msg = |e| agent_fatal(&io(e), &name).unwrap();
        assert!(msg(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
        .contains("unknown issuer"));
        assert!(msg(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName
        ))
        .contains("name mismatch"));
        assert!(
            msg(rustls::Error::InvalidCertificate(CertificateError::Expired))
                .contains("expired certificate")
        );
        assert!(msg(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
        ))
        .contains("--cert"));
        // A network error is not a verdict on anyone's certificate: retry.
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(agent_fatal(&reset, &name), None);
    }
}
