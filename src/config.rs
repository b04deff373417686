//! Validated configurations of each role. `main.rs` turns CLI flags into
//! these; tests build them directly. Invalid settings are rejected here,
//! at start-up, with a message naming the flag.

use std::time::Duration;

use crate::proto::{Heartbeat, Limits};
use crate::runtime::DriverKind;
use crate::trust::TrustedProxies;

/// The timeouts' defaults, shared by the CLI flags and `Default`.
pub mod defaults {
    use std::time::Duration;

    pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
    /// Above the agent's backend timeout, so that the agent's 504 (which
    /// names the backend) normally wins.
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(30);
    pub const SLOT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a session name stays reserved for its owner after its last
    /// uplink went (an agent restarting).
    pub const SESSION_LEASE: Duration = Duration::from_secs(30);
    /// How long a request for a reserved session waits for its owner.
    pub const HOLD_TIMEOUT: Duration = Duration::from_secs(5);
    /// Requests waiting per session per gateway core.
    pub const HOLD_QUEUE: usize = 1024;
    /// How long a stopping agent lets its streams finish.
    pub const AGENT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// Public connections at once per TCP tunnel port.
    pub const TCP_MAX_CONNS_PER_PORT: usize = 1024;

    // Limits (`crate::limits`). --max-conns and --fd-reserve default to
    // values derived from RLIMIT_NOFILE at start-up.
    /// Floor of the default `--max-conns-per-ip` (a quarter of
    /// `--max-conns`).
    pub const MIN_CONNS_PER_IP: u32 = 256;
    pub const MAX_HANDSHAKES: usize = 256;
    pub const HANDSHAKE_FAIL_LIMIT: u32 = 5;
    pub const HANDSHAKE_FAIL_WINDOW: Duration = Duration::from_secs(60);
    pub const HANDSHAKE_BAN: Duration = Duration::from_secs(10);
    pub const HANDSHAKE_MAX_BAN: Duration = Duration::from_secs(600);
    /// Per-(session, client IP) rate cells kept, all sessions together
    /// (`--rate-ip-table`): about 150 bytes each, plus up to as many
    /// cache entries per core.
    pub const RATE_IP_TABLE: usize = 16384;
}

/// The backend address as people type it: `3000` or `:3000` means
/// `127.0.0.1:3000`; `http://host[:port][/...]` means `host:port` (80 by
/// default); `https://` is refused (the agent speaks plain HTTP to its
/// backend).
pub fn backend_addr(to: &str) -> Result<String, String> {
    let t = to.trim();
    if let Some(rest) = t.strip_prefix("https://") {
        let _ = rest;
        return Err(format!(
            "--to {t}: the agent speaks plain HTTP to its backend; give the host:port of a plain-HTTP listener"
        ));
    }
    let t = match t.strip_prefix("http://") {
        Some(rest) => {
            let authority = rest.split('/').next().unwrap_or("");
            if authority.is_empty() {
                return Err(format!("--to {to}: no host"));
            }
            if authority.contains(':') {
                authority.to_string()
            } else {
                format!("{authority}:80")
            }
        }
        None => t.to_string(),
    };
    let port = t.strip_prefix(':').unwrap_or(&t);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        return match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(format!("127.0.0.1:{p}")),
            _ => Err(format!("--to {to}: not a port (1-65535)")),
        };
    }
    Ok(t)
}

/// The gateway address as people type it: a host without a port means
/// the tunnel port 7000.
pub fn gateway_addr(gateway: &str) -> String {
    let g = gateway.trim();
    let colons = g.matches(':').count();
    match g.strip_prefix('[') {
        Some(rest) if rest.contains("]:") => g.to_string(),
        Some(_) => format!("{g}:7000"),
        None if colons == 1 => g.to_string(),
        // A bare IPv6 literal: bracket it to add the port.
        None if colons > 1 => format!("[{g}]:7000"),
        None => format!("{g}:7000"),
    }
}

/// Worker cores are tracked in 64-bit masks (the session directory).
pub const MAX_CORES: usize = 64;

fn check_cores(c: &Cores) -> Result<(), String> {
    if c.cores == 0 {
        return Err("--cores 0: at least one worker core is needed".into());
    }
    if c.cores > MAX_CORES {
        return Err(format!(
            "--cores {}: at most {MAX_CORES} worker cores are supported",
            c.cores
        ));
    }
    Ok(())
}

/// Where and how a role's workers run.
#[derive(Clone, Debug)]
pub struct Cores {
    pub cores: usize,
    pub pin: bool,
    pub driver: DriverKind,
    pub first_core: usize,
}

impl Cores {
    pub fn new(cores: Option<usize>, pin: bool, driver: DriverKind) -> Self {
        Cores {
            // Not clamped: `--cores 0` is refused with a message (check_cores,
            // spawn_workers), never silently turned into 1.
            cores: cores.unwrap_or_else(crate::runtime::available_cores),
            pin,
            driver,
            first_core: 0,
        }
    }

    pub fn spec(&self, name: &str) -> crate::runtime::WorkerSpec {
        crate::runtime::WorkerSpec {
            name: name.to_string(),
            cores: self.cores,
            pin: self.pin,
            driver: self.driver,
            first_core: self.first_core,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub listen: String,
    pub tunnel_listen: String,
    pub admin_listen: Option<String>,
    pub cores: Cores,
    pub domain: Option<String>,
    pub default_session: Option<String>,
    /// Accepted agent tokens with their scopes (`crate::scope`); empty =
    /// open gateway (any token, which then only decides who owns a session
    /// name).
    pub tokens: Vec<crate::scope::TokenRule>,
    /// `[[sessions]]`: rates per session name (reloadable).
    pub sessions: Vec<crate::scope::SessionRule>,
    pub max_head: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// A name stays reserved for its owner this long after its last
    /// uplink went (zero: freed at once).
    pub session_lease: Duration,
    /// Requests for a reserved session wait this long for its owner.
    pub hold_timeout: Duration,
    /// Requests waiting per session per core; beyond, 503.
    pub hold_queue: usize,
    pub body_idle_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub response_timeout: Duration,
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    /// TLS on the tunnel listener (`--tunnel-tls-cert/-key`, `--client-ca`).
    pub tunnel_tls: Option<crate::tls::ServerTlsFiles>,
    /// Allows a plaintext tunnel listener on a non-loopback address.
    pub insecure_plaintext: bool,
    /// Peers whose X-Forwarded-For / Forwarded / X-Real-IP /
    /// X-Forwarded-Proto are kept and extended; from anyone else they are
    /// replaced. With `proxy_protocol`, also the only peers whose PROXY
    /// header is accepted (when not empty).
    pub trusted_proxies: TrustedProxies,
    /// Every public connection starts with a PROXY protocol (v1 or v2)
    /// header naming the client; a connection without one is closed.
    pub proxy_protocol: bool,
    /// Connection limits, fd reserve, handshake bans, session rates.
    pub edge_limits: crate::limits::LimitsConfig,
    /// `--admin-token`: the admin endpoint wants `Authorization: Bearer`.
    pub admin_token: Option<String>,
    /// `--https-listen`: the public HTTPS listener (TLS terminated here).
    pub https_listen: Option<String>,
    /// Its certificates, chosen by SNI; the first is the default.
    pub https_certs: Vec<crate::sni::CertFiles>,
    /// Ports agents may open raw TCP tunnels on (`--tcp-ports`); empty =
    /// no TCP tunnels.
    pub tcp_ports: crate::proto::tcp::PortRanges,
    /// Public connections at once per TCP tunnel port; more are accepted
    /// and closed at once.
    pub tcp_max_conns_per_port: usize,
    /// Cluster membership (`--cluster-etcd`…); `None`: a single node.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:8080".into(),
            tunnel_listen: "0.0.0.0:7000".into(),
            admin_listen: Some("127.0.0.1:9090".into()),
            cores: Cores::new(None, true, DriverKind::Auto),
            domain: None,
            default_session: None,
            tokens: Vec::new(),
            sessions: Vec::new(),
            max_head: crate::http::DEFAULT_MAX_HEAD,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            session_lease: defaults::SESSION_LEASE,
            hold_timeout: defaults::HOLD_TIMEOUT,
            hold_queue: defaults::HOLD_QUEUE,
            body_idle_timeout: defaults::BODY_IDLE_TIMEOUT,
            write_stall_timeout: defaults::WRITE_STALL_TIMEOUT,
            response_timeout: defaults::RESPONSE_TIMEOUT,
            limits: Limits::default(),
            heartbeat: Heartbeat::default(),
            tunnel_tls: None,
            insecure_plaintext: false,
            trusted_proxies: TrustedProxies::default(),
            proxy_protocol: false,
            edge_limits: crate::limits::LimitsConfig::default(),
            admin_token: None,
            https_listen: None,
            https_certs: Vec::new(),
            tcp_ports: crate::proto::tcp::PortRanges::none(),
            tcp_max_conns_per_port: defaults::TCP_MAX_CONNS_PER_PORT,
            cluster: None,
        }
    }
}

/// Gateway settings (config-file keys) a SIGHUP reload applies without a
/// restart, besides the tokens and the tunnel's TLS files: each is read
/// once per connection, request or held request, never per frame, so a
/// new value simply applies from the next one. See
/// [`GatewayConfig::with_reloaded`].
pub const RELOADABLE: [&str; 14] = [
    "max_conns",
    "max_conns_per_ip",
    "session_rate",
    "session_burst",
    "rate_per_ip",
    "burst_per_ip",
    "hold_timeout",
    "hold_queue",
    "header_timeout",
    "idle_timeout",
    "body_idle_timeout",
    "write_stall_timeout",
    "response_timeout",
    "max_head",
];

impl GatewayConfig {
    /// This (running) configuration with the [`RELOADABLE`] settings, the
    /// tokens and the TLS certificates (tunnel and HTTPS) taken from
    /// `new`; everything else (addresses, cores, driver, windows, TLS
    /// listener choice, fd reserve, handshake limits, trusted proxies…)
    /// stays as started.
    pub fn with_reloaded(&self, new: &GatewayConfig) -> GatewayConfig {
        let mut c = self.clone();
        c.tokens = new.tokens.clone();
        c.sessions = new.sessions.clone();
        c.tunnel_tls = new.tunnel_tls.clone();
        // The HTTPS listener stays as started; its certificates reload.
        c.https_certs = new.https_certs.clone();
        c.hold_timeout = new.hold_timeout;
        c.hold_queue = new.hold_queue;
        c.header_timeout = new.header_timeout;
        c.idle_timeout = new.idle_timeout;
        c.body_idle_timeout = new.body_idle_timeout;
        c.write_stall_timeout = new.write_stall_timeout;
        c.response_timeout = new.response_timeout;
        c.max_head = new.max_head;
        let (l, n) = (&mut c.edge_limits, &new.edge_limits);
        l.max_conns = n.max_conns;
        l.max_conns_per_ip = n.max_conns_per_ip;
        l.session_rate = n.session_rate;
        l.session_burst = n.session_burst;
        l.rate_per_ip = n.rate_per_ip;
        l.burst_per_ip = n.burst_per_ip;
        c
    }

    pub fn validate(&self) -> Result<(), String> {
        check_cores(&self.cores)?;
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        self.check_https()?;
        self.check_plaintext_exposure()?;
        self.edge_limits.validate()?;
        if self.hold_queue == 0 {
            return Err(
                "--hold-queue must be at least 1 (use --session-lease 0 to never hold requests)"
                    .into(),
            );
        }
        if self.tcp_max_conns_per_port == 0 {
            return Err("--tcp-max-conns-per-port must be at least 1".into());
        }
        if self.admin_token.as_deref() == Some("") {
            return Err("--admin-token must not be empty".into());
        }
        if let Some(d) = &self.domain {
            if d.is_empty() || d.starts_with('.') || d.contains(['/', ':', ' ']) {
                return Err(format!(
                    "--domain {d:?}: expected a bare domain like tunnel.example.com"
                ));
            }
        }
        if let Some(s) = &self.default_session {
            if !crate::proto::valid_session_name(s) {
                return Err(format!(
                    "--default-session {s:?}: not a valid session name ([a-z0-9-], 1..=63)"
                ));
            }
        }
        if self.max_head < 1024 {
            return Err("--max-head must be at least 1024 bytes".into());
        }
        if self.limits.stream_window < 1024 || self.limits.conn_window < self.limits.stream_window {
            return Err(
                "--stream-window must be >= 1 KiB and --conn-window >= --stream-window".into(),
            );
        }
        Ok(())
    }

    /// `--listen off` is allowed when HTTPS serves instead; certificates
    /// need a listener and the other way round.
    fn check_https(&self) -> Result<(), String> {
        match (&self.https_listen, self.https_certs.is_empty()) {
            (Some(_), true) => Err("--https-listen needs --https-cert FILE --https-key FILE \
                 (or [[https_certs]] tables in --config)"
                .into()),
            (None, false) => Err("HTTPS certificates given without --https-listen".into()),
            (None, true) if self.listen == "off" => {
                Err("--listen off leaves no public listener: give --https-listen".into())
            }
            _ => Ok(()),
        }
    }

    /// A plaintext tunnel listener is only allowed on loopback (or when
    /// the operator says the path is trusted): the uplink carries agent
    /// tokens in HELLO and every tunnelled request and response.
    fn check_plaintext_exposure(&self) -> Result<(), String> {
        if self.tunnel_tls.is_some() || self.insecure_plaintext {
            return Ok(());
        }
        use std::net::ToSocketAddrs;
        // Unresolvable addresses fail later, when binding, with their own
        // message.
        let Ok(addrs) = self.tunnel_listen.to_socket_addrs() else {
            return Ok(());
        };
        if addrs.into_iter().all(|a| a.ip().is_loopback()) {
            return Ok(());
        }
        Err(format!(
            "--tunnel-listen {} is not a loopback address and the uplink has no TLS: \
             agent tokens and all tunnelled traffic would cross the network in clear. \
             Give --tunnel-tls-cert FILE --tunnel-tls-key FILE, or --insecure-plaintext \
             if the path to the agents is already protected (VPN, private link)",
            self.tunnel_listen
        ))
    }
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub gateway: String,
    pub session: String,
    pub to: String,
    /// None: as many as the gateway has cores (announced in ACCEPT).
    pub uplinks: Option<usize>,
    /// In a cluster, how many nodes hold uplinks (`--nodes`); `None`: 2.
    pub nodes: Option<usize>,
    pub cores: Cores,
    pub backend_concurrency: usize,
    pub backend_queue: usize,
    pub backend_timeout: Duration,
    pub slot_timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub token: String,
    pub admin_listen: Option<String>,
    pub heartbeat: Heartbeat,
    pub reconnect_max: Duration,
    /// TLS to the gateway (`--tls`, `--ca`, `--server-name`, `--cert/--key`).
    pub tls: Option<crate::tls::ClientTlsFiles>,
    /// How long a stopping agent lets in-flight streams finish.
    pub shutdown_grace: Duration,
    /// Who this agent is to the gateway (owner of its session). `None`:
    /// derived from host name, session and backend, so a restarted agent
    /// is the same owner.
    pub agent_id: Option<u64>,
    /// Raw TCP tunnels to ask the gateway for (`--tcp`).
    pub tcp: Vec<crate::proto::tcp::TcpSpec>,
    /// No line per request (`--quiet`).
    pub quiet: bool,
    /// Whether `--to` was given: a TCP-only agent (`--tcp` alone) neither
    /// checks the default backend at start nor prints a Forwarding line.
    pub http: bool,
    /// The request inspector (`--inspect ADDR`), off when `None`.
    pub inspect: Option<crate::inspect::InspectConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            gateway: "127.0.0.1:7000".into(),
            session: String::new(),
            to: "127.0.0.1:3000".into(),
            uplinks: None,
            nodes: None,
            cores: Cores::new(None, true, DriverKind::Auto),
            backend_concurrency: 1024,
            backend_queue: 8192,
            backend_timeout: defaults::BACKEND_TIMEOUT,
            slot_timeout: defaults::SLOT_TIMEOUT,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            token: String::new(),
            admin_listen: None,
            heartbeat: Heartbeat::default(),
            reconnect_max: Duration::from_secs(10),
            tls: None,
            shutdown_grace: defaults::AGENT_SHUTDOWN_GRACE,
            agent_id: None,
            tcp: Vec::new(),
            quiet: false,
            http: true,
            inspect: None,
        }
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), String> {
        check_cores(&self.cores)?;
        if let Some(i) = &self.inspect {
            i.validate()?;
        }
        if !crate::proto::valid_session_name(&self.session) {
            return Err(format!(
                "--session {:?}: 1..=63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
                self.session
            ));
        }
        if self.backend_concurrency == 0 {
            return Err("--backend-concurrency must be at least 1".into());
        }
        if self.uplinks == Some(0) {
            return Err("--uplinks must be at least 1".into());
        }
        if self.nodes == Some(0) {
            return Err("--nodes must be at least 1".into());
        }
        if self.tcp.len() > crate::proto::tcp::MAX_TCP_TUNNELS {
            return Err(format!(
                "--tcp: at most {} TCP tunnels per agent",
                crate::proto::tcp::MAX_TCP_TUNNELS
            ));
        }
        if let Some(t) = &self.tls {
            if t.cert.is_some() != t.key.is_some() {
                return Err("--cert and --key go together".into());
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct EchoServerConfig {
    pub listen: String,
    pub cores: Cores,
    pub delay_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_people_type_them() {
        assert_eq!(backend_addr("3000").unwrap(), "127.0.0.1:3000");
        assert_eq!(backend_addr(":8081").unwrap(), "127.0.0.1:8081");
        assert_eq!(
            backend_addr("http://127.0.0.1:3000/").unwrap(),
            "127.0.0.1:3000"
        );
        assert_eq!(backend_addr("http://app.local").unwrap(), "app.local:80");
        assert_eq!(backend_addr("10.0.0.5:9000").unwrap(), "10.0.0.5:9000");
        assert!(backend_addr("https://127.0.0.1:3000")
            .unwrap_err()
            .contains("plain HTTP"));
        assert!(backend_addr("70000").is_err());
        assert!(backend_addr("0").is_err());
        assert_eq!(gateway_addr("gw.example.com"), "gw.example.com:7000");
        assert_eq!(gateway_addr("gw.example.com:7443"), "gw.example.com:7443");
        assert_eq!(gateway_addr("[::1]:7000"), "[::1]:7000");
        assert_eq!(gateway_addr("[::1]"), "[::1]:7000");
        assert_eq!(gateway_addr("127.0.0.1"), "127.0.0.1:7000");
        assert_eq!(gateway_addr("::1"), "[::1]:7000");
    }

    #[test]
    fn a_reload_takes_the_reloadable_settings_only() {
        let running = GatewayConfig::default();
        let s = Duration::from_secs(77);
        let rate = Some("7/s".parse().unwrap());
        let new = GatewayConfig {
            listen: "127.0.0.1:1".into(),
            shutdown_grace: s,
            session_lease: s,
            hold_timeout: s,
            hold_queue: 7,
            header_timeout: s,
            idle_timeout: s,
            body_idle_timeout: s,
            write_stall_timeout: s,
            response_timeout: s,
            max_head: 7777,
            edge_limits: crate::limits::LimitsConfig {
                max_conns: Some(7),
                max_conns_per_ip: Some(7),
                session_rate: rate,
                session_burst: Some(7),
                rate_per_ip: rate,
                burst_per_ip: Some(7),
                rate_ip_table: 7,
                max_handshakes: 7,
                ..Default::default()
            },
            ..GatewayConfig::default()
        };
        let c = running.with_reloaded(&new);
        // One per RELOADABLE key.
        let took = [
            c.edge_limits.max_conns == Some(7),
            c.edge_limits.max_conns_per_ip == Some(7),
            c.edge_limits.session_rate == rate,
            c.edge_limits.session_burst == Some(7),
            c.edge_limits.rate_per_ip == rate,
            c.edge_limits.burst_per_ip == Some(7),
            c.hold_timeout == s,
            c.hold_queue == 7,
            c.header_timeout == s,
            c.idle_timeout == s,
            c.body_idle_timeout == s,
            c.write_stall_timeout == s,
            c.response_timeout == s,
            c.max_head == 7777,
        ];
        assert_eq!(took.len(), RELOADABLE.len());
        assert!(took.iter().all(|t| *t), "{took:?}");
        assert_eq!(c.listen, running.listen);
        assert_eq!(c.shutdown_grace, running.shutdown_grace);
        assert_eq!(c.session_lease, running.session_lease);
        assert_eq!(
            c.edge_limits.rate_ip_table,
            running.edge_limits.rate_ip_table
        );
        assert_eq!(
            c.edge_limits.max_handshakes,
            running.edge_limits.max_handshakes
        );
    }

    #[test]
    fn zero_cores_are_refused() {
        let c = GatewayConfig {
            tunnel_listen: "127.0.0.1:0".into(),
            cores: Cores::new(Some(0), false, DriverKind::Auto),
            ..GatewayConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("--cores 0"));
    }

    #[test]
    fn an_empty_hold_queue_is_refused() {
        let c = GatewayConfig {
            tunnel_listen: "127.0.0.1:0".into(),
            hold_queue: 0,
            ..GatewayConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.contains("--hold-queue"), "{e}");
    }

    #[test]
    fn plaintext_tunnel_off_loopback_needs_tls_or_an_explicit_opt_out() {
        let mut c = GatewayConfig {
            tunnel_listen: "0.0.0.0:7000".into(),
            ..GatewayConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(
            e.contains("in clear") && e.contains("--insecure-plaintext"),
            "{e}"
        );
        c.insecure_plaintext = true;
        assert!(c.validate().is_ok());
        c.insecure_plaintext = false;
        c.tunnel_tls = Some(crate::tls::ServerTlsFiles {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: None,
        });
        assert!(c.validate().is_ok());
        for local in ["127.0.0.1:0", "[::1]:0", "localhost:0"] {
            let c = GatewayConfig {
                tunnel_listen: local.into(),
                ..GatewayConfig::default()
            };
            assert!(c.validate().is_ok(), "{local}");
        }
    }
}
