//! `ringtunnel`: command line front end. Flags, laid over an optional
//! `--config` file (`ringtunnel::config_file`), become validated configs
//! (`ringtunnel::config`), then the library runs them.
//!
//! Precedence: a flag the operator gave (or its environment variable)
//! beats the file, which beats the flag's default. Defaults are only
//! written in the flag definitions, so "given" is asked of clap
//! (`ArgMatches::value_source`) rather than compared with a default.

use std::process::ExitCode;

// glibc malloc was 12-17% of gateway and agent CPU under load (per-request
// heads, frames and task allocations, freed on another pattern than they
// were allocated); mimalloc's per-thread free lists fit thread-per-core.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ringtunnel::config::defaults as cfgdef;
use ringtunnel::config::{AgentConfig, Cores, EchoServerConfig, GatewayConfig};
use ringtunnel::config_file::{self, AgentFile, GatewayFile, TokenEntry, MASK};
use ringtunnel::proto::{Heartbeat, Limits};
use ringtunnel::runtime::DriverKind;
use ringtunnel::scope::TokenRule;

#[derive(Parser)]
#[command(
    name = "ringtunnel",
    version,
    about = "Thread-per-core HTTP tunnel gateway on io_uring"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up; boxing the gateway's flags would only make
// every use of them noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Public HTTP listener + uplink listener; routes requests by Host.
    Gateway(GatewayArgs),
    /// Connects to a gateway, claims a session, forwards to a backend.
    Agent(AgentArgs),
    /// One-liner agent: `ringtunnel http 3000` exposes 127.0.0.1:3000 under
    /// a generated name (defaults from RINGTUNNEL_GATEWAY, RINGTUNNEL_TOKEN
    /// and ~/.config/ringtunnel/agent.toml).
    Http(HttpArgs),
    /// One-liner TCP tunnel: `ringtunnel tcp 22` exposes 127.0.0.1:22 on a
    /// public port of the gateway's --tcp-ports (same defaults as http).
    Tcp(TcpArgs),
    /// Built-in httpbin-like backend for tests, demos and benchmarks.
    Echo(EchoArgs),
    /// Load generator (closed/open loop, sweeps, ramps, comparisons).
    Bench(ringtunnel::bench::BenchArgs),
    /// Echo + gateway + agent on loopback, then a short benchmark.
    Demo(ringtunnel::demo::DemoArgs),
    /// Prints a shell completion script (e.g. `ringtunnel completions bash
    /// > /etc/bash_completion.d/ringtunnel`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Prints the manual page (roff) of ringtunnel and its subcommands
    /// (e.g. `ringtunnel man | man -l -`).
    Man,
}

#[derive(Args, Clone)]
struct CoreArgs {
    /// Worker cores [default: all].
    #[arg(long)]
    cores: Option<usize>,
    /// Pin each worker to a core.
    #[arg(long, overrides_with = "no_pin", default_value_t = true)]
    pin: bool,
    /// Do not pin workers.
    #[arg(long = "no-pin")]
    no_pin: bool,
    #[arg(long, value_enum, default_value_t = DriverKind::Auto)]
    driver: DriverKind,
}

impl CoreArgs {
    fn cores(&self) -> Cores {
        Cores::new(self.cores, self.pin && !self.no_pin, self.driver)
    }
}

#[derive(Args, Clone)]
struct GatewayArgs {
    /// TOML file with any of these flags as keys (`tunnel_listen = ...`)
    /// and [[tokens]] tables; flags given here override it. SIGHUP
    /// re-reads it (tokens, TLS certificates).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML (secrets masked), then exit.
    #[arg(long)]
    print_config: bool,
    /// Public HTTP listen address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
    /// Uplink (agent) listen address [default: 0.0.0.0:7000 with
    /// --tunnel-tls-cert, else 127.0.0.1:7000].
    #[arg(long)]
    tunnel_listen: Option<String>,
    /// Admin endpoint (/metrics, /stats); "off" disables it.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: String,
    #[command(flatten)]
    core: CoreArgs,
    /// Serve sessions as <name>.<domain> too.
    #[arg(long)]
    domain: Option<String>,
    /// Session for every Host that names no connected session.
    #[arg(long)]
    default_session: Option<String>,
    /// Token(s) agents must present, comma separated [env RINGTUNNEL_TOKEN; none = open].
    #[arg(long, env = "RINGTUNNEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Largest request head accepted (bytes); larger gets 431.
    #[arg(long, default_value_t = 64 * 1024)]
    max_head: usize,
    /// Seconds a client may take to send a request head (then 408).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds an idle keep-alive connection is kept.
    #[arg(long, default_value_t = 60.0)]
    idle_timeout: f64,
    /// Seconds in-flight requests get to finish on SIGTERM.
    #[arg(long, default_value_t = 10.0)]
    shutdown_grace: f64,
    /// Seconds a session name stays reserved for its owner after its last
    /// uplink went (0: freed at once).
    #[arg(long, default_value_t = cfgdef::SESSION_LEASE.as_secs_f64())]
    session_lease: f64,
    /// Seconds a request for a reserved session waits for its agent (then 502).
    #[arg(long, default_value_t = cfgdef::HOLD_TIMEOUT.as_secs_f64())]
    hold_timeout: f64,
    /// Requests waiting per session per core (beyond: 503).
    #[arg(long, default_value_t = cfgdef::HOLD_QUEUE)]
    hold_queue: usize,
    /// Seconds a request body may pause between bytes (then 408, or the
    /// connection is closed if the response started).
    #[arg(long, default_value_t = cfgdef::BODY_IDLE_TIMEOUT.as_secs_f64())]
    body_idle_timeout: f64,
    /// Seconds a write to a client may make no progress (a client that
    /// stopped reading) before the connection is closed.
    #[arg(long, default_value_t = cfgdef::WRITE_STALL_TIMEOUT.as_secs_f64())]
    write_stall_timeout: f64,
    /// Seconds the agent has to send a response head once the request was
    /// fully sent (then 504).
    #[arg(long, default_value_t = cfgdef::RESPONSE_TIMEOUT.as_secs_f64())]
    response_timeout: f64,
    /// Initial per-stream credit in bytes.
    #[arg(long, default_value_t = ringtunnel::proto::DEFAULT_STREAM_WINDOW)]
    stream_window: u32,
    /// Initial per-uplink credit in bytes (the per-uplink memory budget).
    #[arg(long, default_value_t = ringtunnel::proto::DEFAULT_CONN_WINDOW)]
    conn_window: u32,
    /// Concurrent streams per uplink.
    #[arg(long, default_value_t = ringtunnel::proto::DEFAULT_MAX_STREAMS)]
    max_streams: u32,
    /// Seconds between PINGs on each uplink; an uplink silent for three
    /// intervals is closed.
    #[arg(long, default_value_t = ringtunnel::proto::PING_INTERVAL.as_secs_f64())]
    heartbeat_interval: f64,
    /// Certificate chain (PEM) of the tunnel listener: uplinks use TLS.
    #[arg(long, requires = "tunnel_tls_key")]
    tunnel_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tunnel-tls-cert.
    #[arg(long, requires = "tunnel_tls_cert")]
    tunnel_tls_key: Option<PathBuf>,
    /// CA (PEM) that agents' client certificates must chain to (mutual TLS).
    #[arg(long, requires = "tunnel_tls_cert")]
    client_ca: Option<PathBuf>,
    /// Allow a plaintext tunnel listener on a non-loopback address (tokens
    /// and traffic cross the network in clear).
    #[arg(long, conflicts_with = "tunnel_tls_cert")]
    insecure_plaintext: bool,
    /// Proxies in front of the gateway, as CIDRs (e.g. 10.0.0.0/8,::1/128):
    /// their X-Forwarded-For / Forwarded / X-Real-IP / X-Forwarded-Proto
    /// are kept and extended; anyone else's are replaced [default: none].
    #[arg(long)]
    trusted_proxies: Option<String>,
    /// Every public connection starts with a PROXY protocol v1/v2 header
    /// (from a load balancer; only from --trusted-proxies when set).
    #[arg(long)]
    proxy_protocol: bool,
    /// Public HTTPS listen address (TLS terminated here, certificates by
    /// SNI); with it, --listen may be "off".
    #[arg(long)]
    https_listen: Option<String>,
    /// Certificate chain (PEM) of --https-listen; the default for clients
    /// naming no other certificate's name ([[https_certs]] adds more).
    #[arg(long, requires = "https_key")]
    https_cert: Option<PathBuf>,
    /// Private key (PEM) of --https-cert.
    #[arg(long, requires = "https_cert")]
    https_key: Option<PathBuf>,
    /// The file's [[https_certs]] tables (no flag form).
    #[arg(skip)]
    https_certs: Vec<ringtunnel::sni::CertFiles>,
    /// The file's [[sessions]] tables (no flag form).
    #[arg(skip)]
    sessions: Vec<config_file::SessionEntry>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Ports agents may open raw TCP tunnels on: "20000-20999",
    /// "20000-20099,21000", or "none" (no TCP tunnels).
    #[arg(long, default_value = "none")]
    tcp_ports: String,
    /// Public connections at once per TCP tunnel port; more are accepted
    /// and closed at once (counted).
    #[arg(long, default_value_t = cfgdef::TCP_MAX_CONNS_PER_PORT)]
    tcp_max_conns_per_port: usize,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Clustering (docs/CLUSTER.md): off unless --cluster-etcd is given.
#[derive(Args, Clone)]
struct ClusterArgs {
    /// etcd client URL(s), comma separated (http://10.0.0.5:2379): join
    /// the cluster registered there. Needs --node-name, --peer-listen and
    /// --cluster-secret.
    #[arg(long, requires_all = ["node_name", "peer_listen"])]
    cluster_etcd: Option<String>,
    /// This node's name in the cluster (unique; a-z, 0-9, '-').
    #[arg(long, requires = "cluster_etcd")]
    node_name: Option<String>,
    /// Where this node accepts peer links from the other nodes.
    #[arg(long, requires = "cluster_etcd")]
    peer_listen: Option<String>,
    /// The host other nodes and agents reach this node at [default: the
    /// host of --peer-listen].
    #[arg(long, requires = "cluster_etcd")]
    advertise: Option<String>,
    /// Secret every node of the cluster presents on its peer links
    /// [env RINGTUNNEL_CLUSTER_SECRET].
    #[arg(long, env = "RINGTUNNEL_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Seconds of the node's etcd lease: its keys vanish this long after
    /// it stops renewing them.
    #[arg(long, default_value_t = ringtunnel::cluster::DEFAULT_LEASE_TTL.as_secs_f64())]
    cluster_lease_ttl: f64,
}

impl ClusterArgs {
    fn config(&self) -> Result<Option<ringtunnel::cluster::ClusterConfig>, String> {
        let Some(etcd) = &self.cluster_etcd else {
            return Ok(None);
        };
        let c = ringtunnel::cluster::ClusterConfig {
            etcd: etcd
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect(),
            node: self.node_name.clone().unwrap_or_default(),
            peer_listen: self.peer_listen.clone().unwrap_or_default(),
            advertise: self.advertise.clone(),
            secret: self
                .cluster_secret
                .clone()
                .ok_or("--cluster-etcd needs --cluster-secret (or RINGTUNNEL_CLUSTER_SECRET)")?,
            lease_ttl: secs(self.cluster_lease_ttl, "cluster-lease-ttl")?,
        };
        c.validate()?;
        Ok(Some(c))
    }
}

/// The gateway's limits (README, "Limits").
#[derive(Args, Clone)]
struct LimitArgs {
    /// Public connections, all cores together [default: RLIMIT_NOFILE
    /// minus --fd-reserve]. Over it: 503 and close.
    #[arg(long)]
    max_conns: Option<usize>,
    /// Public connections per client IP (trusted proxies exempt)
    /// [default: a quarter of --max-conns, at least 256].
    #[arg(long)]
    max_conns_per_ip: Option<u32>,
    /// File descriptors the public listener leaves free for agents and
    /// the admin endpoint [default: 64 or 5% of RLIMIT_NOFILE].
    #[arg(long)]
    fd_reserve: Option<usize>,
    /// Tunnel handshakes in progress per core; more are closed at accept.
    #[arg(long, default_value_t = cfgdef::MAX_HANDSHAKES)]
    max_handshakes: usize,
    /// Refused handshakes from one IP (within --handshake-fail-window)
    /// after which its tunnel connections are closed at accept; 0 = never.
    #[arg(long, default_value_t = cfgdef::HANDSHAKE_FAIL_LIMIT)]
    handshake_fail_limit: u32,
    /// Seconds over which refused handshakes add up.
    #[arg(long, default_value_t = cfgdef::HANDSHAKE_FAIL_WINDOW.as_secs_f64())]
    handshake_fail_window: f64,
    /// Seconds of the first ban; each further ban doubles it (to 600 s).
    #[arg(long, default_value_t = cfgdef::HANDSHAKE_BAN.as_secs_f64())]
    handshake_ban: f64,
    /// Requests per session, e.g. 50/s, 1000/m, 10/h (a token rule's own
    /// rate wins) [default: unlimited]. Over it: 429 with Retry-After.
    #[arg(long)]
    session_rate: Option<ringtunnel::scope::Rate>,
    /// Requests a session may send at once above --session-rate
    /// [default: the rate's N].
    #[arg(long)]
    session_burst: Option<u32>,
    /// Bearer token the admin endpoint requires [env RINGTUNNEL_ADMIN_TOKEN].
    #[arg(long, env = "RINGTUNNEL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Requests per client IP within each session, e.g. 10/s (a token
    /// rule's rate_per_ip wins; trusted proxies exempt) [default:
    /// unlimited]. Over it: 429 with Retry-After.
    #[arg(long)]
    rate_per_ip: Option<ringtunnel::scope::Rate>,
    /// Requests one client IP may send at once above --rate-per-ip
    /// [default: the rate's N].
    #[arg(long)]
    burst_per_ip: Option<u32>,
    /// Per-(session, client IP) rate cells kept, all sessions together;
    /// when full of active clients, new IPs get only the session's rate.
    #[arg(long, default_value_t = cfgdef::RATE_IP_TABLE)]
    rate_ip_table: usize,
}

impl LimitArgs {
    fn config(&self) -> Result<ringtunnel::limits::LimitsConfig, String> {
        Ok(ringtunnel::limits::LimitsConfig {
            max_conns: self.max_conns,
            max_conns_per_ip: self.max_conns_per_ip,
            fd_reserve: self.fd_reserve,
            max_handshakes: self.max_handshakes,
            strikes: ringtunnel::limits::strikes::StrikesConfig {
                limit: self.handshake_fail_limit,
                window: secs(self.handshake_fail_window, "handshake-fail-window")?,
                ban: secs(self.handshake_ban, "handshake-ban")?,
                max_ban: cfgdef::HANDSHAKE_MAX_BAN,
            },
            session_rate: self.session_rate,
            session_burst: self.session_burst,
            rate_per_ip: self.rate_per_ip,
            burst_per_ip: self.burst_per_ip,
            rate_ip_table: self.rate_ip_table,
        })
    }
}

#[derive(Args, Clone)]
struct AgentArgs {
    /// TOML file with any of these flags as keys (`backend_timeout = ...`);
    /// flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML (token masked), then exit.
    #[arg(long)]
    print_config: bool,
    /// Gateway tunnel address [env RINGTUNNEL_GATEWAY].
    #[arg(long, env = "RINGTUNNEL_GATEWAY", default_value = "127.0.0.1:7000")]
    gateway: String,
    /// Session name to claim (required, here or in --config).
    #[arg(long)]
    session: Option<String>,
    /// Backend address (required, here or in --config).
    #[arg(long)]
    to: Option<String>,
    /// Uplinks to open (per node, in a cluster) [default: the gateway's
    /// core count].
    #[arg(long)]
    uplinks: Option<usize>,
    /// In a cluster: keep uplinks on this many nodes, chosen by
    /// rendezvous hashing of the session name [default: 2]. Ignored by a
    /// single gateway.
    #[arg(long)]
    nodes: Option<usize>,
    #[command(flatten)]
    core: CoreArgs,
    /// Backend requests in flight per core; more wait in a bounded queue.
    #[arg(long, default_value_t = 1024)]
    backend_concurrency: usize,
    /// Requests waiting for a backend slot per core before 503.
    #[arg(long, default_value_t = 8192)]
    backend_queue: usize,
    /// Seconds the backend has to start answering once the request body
    /// was sent, and longest pause inside its response (then 504).
    #[arg(long, default_value_t = cfgdef::BACKEND_TIMEOUT.as_secs_f64())]
    backend_timeout: f64,
    /// Seconds a request may wait for a backend slot (then 503).
    #[arg(long, default_value_t = cfgdef::SLOT_TIMEOUT.as_secs_f64())]
    slot_timeout: f64,
    /// Seconds the gateway has to answer the agent's HELLO.
    #[arg(long, default_value_t = cfgdef::HANDSHAKE_TIMEOUT.as_secs_f64())]
    handshake_timeout: f64,
    /// Token presented to the gateway [env RINGTUNNEL_TOKEN].
    #[arg(
        long,
        env = "RINGTUNNEL_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    token: String,
    /// File holding the token (its first line), e.g. a systemd credential
    /// ($CREDENTIALS_DIRECTORY/token); beats RINGTUNNEL_TOKEN and the
    /// config file's `token`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Seconds in-flight requests get to finish on SIGTERM (after GOAWAY).
    #[arg(long, default_value_t = cfgdef::AGENT_SHUTDOWN_GRACE.as_secs_f64())]
    shutdown_grace: f64,
    /// This agent's id as owner of its session [default: derived from host
    /// name, session and --to, stable across restarts].
    #[arg(long)]
    agent_id: Option<u64>,
    /// Admin endpoint (/metrics, /stats) [default: off].
    #[arg(long)]
    admin_listen: Option<String>,
    /// Seconds between PINGs on each uplink; a gateway silent for three
    /// intervals is treated as lost (reconnect).
    #[arg(long, default_value_t = ringtunnel::proto::PING_INTERVAL.as_secs_f64())]
    heartbeat_interval: f64,
    /// TLS to the gateway, verified against the system's trusted roots.
    #[arg(long)]
    tls: bool,
    /// TLS, trusting only this CA (PEM); implies --tls.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Name the gateway's certificate must carry [default: the host of
    /// --gateway]; implies --tls.
    #[arg(long)]
    server_name: Option<String>,
    /// Client certificate (PEM) for mutual TLS; implies --tls.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Expose a local TCP service through the gateway: PORT or HOST:PORT,
    /// optionally =PUBLIC_PORT (else the gateway picks one); repeatable.
    #[arg(long)]
    tcp: Vec<String>,
    #[command(flatten)]
    show: ShowArgs,
}

/// What the agent shows: request lines and the inspector.
#[derive(Args, Clone)]
struct ShowArgs {
    /// No line per request.
    #[arg(long)]
    quiet: bool,
    /// Request inspector (page, JSON API, replay) on this address, e.g.
    /// 127.0.0.1:4040 [default: off].
    #[arg(long)]
    inspect: Option<String>,
    /// Requests the inspector keeps.
    #[arg(long, default_value_t = 100)]
    inspect_max: usize,
    /// Bytes kept of each request and response body.
    #[arg(long, default_value_t = 1024)]
    inspect_body_bytes: usize,
    /// Header whose value the inspector masks, besides Authorization,
    /// Proxy-Authorization, Cookie and Set-Cookie (repeatable, or comma
    /// separated).
    #[arg(long, value_delimiter = ',')]
    inspect_mask: Vec<String>,
}

impl ShowArgs {
    fn inspect(&self) -> Option<ringtunnel::inspect::InspectConfig> {
        self.inspect
            .as_ref()
            .map(|l| ringtunnel::inspect::InspectConfig {
                listen: l.clone(),
                max: self.inspect_max,
                body_bytes: self.inspect_body_bytes,
                mask: self.inspect_mask.clone(),
            })
    }
}

/// `ringtunnel http PORT`: an agent with defaults for a quick try.
#[derive(Args, Clone)]
struct HttpArgs {
    /// The local app: a port (3000), host:port, or http://host:port.
    to: String,
    #[command(flatten)]
    common: OneLinerArgs,
    #[command(flatten)]
    show: ShowArgs,
}

/// `ringtunnel tcp PORT`: the same for a raw TCP service.
#[derive(Args, Clone)]
struct TcpArgs {
    /// The local service: PORT or HOST:PORT, optionally =PUBLIC_PORT (else
    /// the gateway picks one from its --tcp-ports).
    target: String,
    #[command(flatten)]
    common: OneLinerArgs,
}

/// What both one-liners take besides their target.
#[derive(Args, Clone)]
struct OneLinerArgs {
    /// Session name [default: generated, e.g. brave-otter-3f2a].
    #[arg(long)]
    name: Option<String>,
    /// Gateway tunnel address [env RINGTUNNEL_GATEWAY, then the user
    /// config file, then 127.0.0.1:7000].
    #[arg(long, env = "RINGTUNNEL_GATEWAY")]
    gateway: Option<String>,
    /// Token [env RINGTUNNEL_TOKEN, then the user config file].
    #[arg(long, env = "RINGTUNNEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Agent config file [default: $XDG_CONFIG_HOME/ringtunnel/agent.toml,
    /// else ~/.config/ringtunnel/agent.toml, when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// TLS to the gateway (system roots).
    #[arg(long)]
    tls: bool,
    /// TLS, trusting only this CA (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Worker cores [default: all].
    #[arg(long)]
    cores: Option<usize>,
}

/// The user's agent config file, if there is one: the one-liners read it
/// without being told (XDG base directory rules).
fn user_agent_file() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    let path = base.join("ringtunnel").join("agent.toml");
    path.is_file().then_some(path)
}

/// The command line of the equivalent `ringtunnel agent`: a one-liner is
/// that, with `target` (`--to X` or `--tcp X`), a generated name and the
/// user's file as `--config`, so both share every rule (precedence,
/// validation, output).
fn one_liner_as_agent(
    c: &OneLinerArgs,
    target: [&str; 2],
) -> Result<Vec<std::ffi::OsString>, String> {
    let mut argv: Vec<std::ffi::OsString> = vec!["ringtunnel".into(), "agent".into()];
    let mut push = |flag: &str, v: std::ffi::OsString| {
        argv.push(flag.into());
        argv.push(v);
    };
    push(target[0], target[1].into());
    let file = c.config.clone().or_else(user_agent_file);
    let file_session = match &file {
        Some(p) => config_file::load::<AgentFile>(p)?.session,
        None => None,
    };
    if let Some(p) = &file {
        push("--config", p.clone().into());
    }
    match (&c.name, file_session) {
        (Some(n), _) => push("--session", n.into()),
        (None, Some(_)) => {}
        (None, None) => push("--session", ringtunnel::agent::generated_name().into()),
    }
    if let Some(g) = &c.gateway {
        push("--gateway", g.into());
    }
    if let Some(t) = &c.token {
        push("--token", t.into());
    }
    if let Some(ca) = &c.ca {
        push("--ca", ca.clone().into());
    }
    if let Some(n) = c.cores {
        push("--cores", n.to_string().into());
    }
    if c.tls {
        argv.push("--tls".into());
    }
    Ok(argv)
}

fn http_as_agent(h: &HttpArgs) -> Result<Vec<std::ffi::OsString>, String> {
    let mut argv = one_liner_as_agent(&h.common, ["--to", &h.to])?;
    let mut push = |flag: &str, v: std::ffi::OsString| {
        argv.push(flag.into());
        argv.push(v);
    };
    if let Some(i) = &h.show.inspect {
        push("--inspect", i.into());
        push("--inspect-max", h.show.inspect_max.to_string().into());
        push(
            "--inspect-body-bytes",
            h.show.inspect_body_bytes.to_string().into(),
        );
    }
    for m in &h.show.inspect_mask {
        push("--inspect-mask", m.into());
    }
    if h.show.quiet {
        argv.push("--quiet".into());
    }
    Ok(argv)
}

#[derive(Args)]
struct EchoArgs {
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: String,
    /// Delay added to every response.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    #[command(flatten)]
    core: CoreArgs,
}

fn secs(s: f64, flag: &str) -> Result<Duration, String> {
    if s.is_finite() && s > 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(format!("--{flag} must be a positive number of seconds"))
    }
}

fn secs_or_zero(s: f64, flag: &str) -> Result<Duration, String> {
    if s == 0.0 {
        Ok(Duration::ZERO)
    } else {
        secs(s, flag)
    }
}

fn heartbeat(interval: f64) -> Result<Heartbeat, String> {
    Ok(Heartbeat::from_interval(secs(
        interval,
        "heartbeat-interval",
    )?))
}

/// Whether the operator gave `id`: on the command line, or through its
/// environment variable (also an explicit choice). Defaults do not count.
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// For each key set in the file whose flag was not given: take the
/// file's value. Key and field share the name (clap's arg id too).
macro_rules! lay_under {
    ($m:expr, $file:expr, $args:expr; $($field:ident),+ $(,)?) => {$(
        if let Some(v) = $file.$field.take() {
            if !given($m, stringify!($field)) {
                $args.$field = v.into();
            }
        }
    )+};
}

fn driver_key(s: &str) -> Result<DriverKind, String> {
    DriverKind::from_str(s, true).map_err(|_| {
        let names: Vec<_> = DriverKind::value_variants()
            .iter()
            .filter_map(|d| d.to_possible_value().map(|v| v.get_name().to_string()))
            .collect();
        format!("driver = {s:?}: expected one of {}", names.join(", "))
    })
}

fn driver_name(d: DriverKind) -> Option<String> {
    d.to_possible_value().map(|v| v.get_name().to_string())
}

fn lay_core_under(
    m: &ArgMatches,
    c: &mut CoreArgs,
    cores: Option<usize>,
    pin: Option<bool>,
    no_pin: Option<bool>,
    driver: Option<String>,
) -> Result<(), String> {
    if let Some(v) = cores {
        if !given(m, "cores") {
            c.cores = Some(v);
        }
    }
    // `pin` and `no_pin` are one setting: a flag given for either one
    // decides it, whatever the file says.
    if !(given(m, "pin") || given(m, "no_pin")) {
        if let Some(v) = pin {
            c.pin = v;
            c.no_pin = !v;
        }
        if let Some(v) = no_pin {
            c.no_pin = v;
        }
    }
    if let Some(d) = driver {
        if !given(m, "driver") {
            c.driver = driver_key(&d)?;
        }
    }
    Ok(())
}

/// The gateway's flags with `--config` laid under them, and the file's
/// `[[tokens]]` rules. Run again on every reload, from the original flags.
fn gateway_args(
    mut a: GatewayArgs,
    m: &ArgMatches,
) -> Result<(GatewayArgs, Vec<TokenRule>), String> {
    let Some(path) = a.config.clone() else {
        return Ok((a, Vec::new()));
    };
    let mut f: GatewayFile = config_file::load(&path)?;
    let rules = f
        .token_rules()
        .map_err(|e| format!("--config {}: {e}", path.display()))?;
    lay_under!(m, f, a;
        listen, tunnel_listen, admin_listen, domain, default_session, token, max_head,
        header_timeout, idle_timeout, shutdown_grace, session_lease, hold_timeout,
        hold_queue, body_idle_timeout,
        write_stall_timeout, response_timeout, stream_window, conn_window, max_streams,
        heartbeat_interval, tunnel_tls_cert, tunnel_tls_key, client_ca,
        insecure_plaintext, trusted_proxies, proxy_protocol, tcp_ports,
        tcp_max_conns_per_port);
    lay_under!(m, f, a; https_listen, https_cert, https_key);
    a.https_certs = f
        .https_certs
        .iter()
        .map(|e| ringtunnel::sni::CertFiles {
            cert: e.cert.clone(),
            key: e.key.clone(),
        })
        .collect();
    if a.https_cert.is_some() != a.https_key.is_some() {
        return Err("https_cert and https_key go together".into());
    }
    a.sessions = f.sessions.clone();
    lay_under!(m, f, a.limits;
        max_conns, max_conns_per_ip, fd_reserve, max_handshakes, handshake_fail_limit,
        handshake_fail_window, handshake_ban, session_burst, admin_token,
        burst_per_ip, rate_ip_table);
    if let Some(r) = f.session_rate.take() {
        if !given(m, "session_rate") {
            a.limits.session_rate = Some(r.parse().map_err(|e| format!("session_rate: {e}"))?);
        }
    }
    if let Some(r) = f.rate_per_ip.take() {
        if !given(m, "rate_per_ip") {
            a.limits.rate_per_ip = Some(r.parse().map_err(|e| format!("rate_per_ip: {e}"))?);
        }
    }
    lay_core_under(m, &mut a.core, f.cores, f.pin, f.no_pin, f.driver)?;
    // clap's `requires` only sees the command line.
    if a.tunnel_tls_cert.is_some() != a.tunnel_tls_key.is_some() {
        return Err("tunnel_tls_cert and tunnel_tls_key go together".into());
    }
    if a.client_ca.is_some() && a.tunnel_tls_cert.is_none() {
        return Err("client_ca needs tunnel_tls_cert".into());
    }
    Ok((a, rules))
}

/// The effective gateway settings as a file (`--print-config`).
fn gateway_shown(a: &GatewayArgs, rules: &[TokenRule]) -> GatewayFile {
    GatewayFile {
        listen: Some(a.listen.clone()),
        tunnel_listen: Some(tunnel_listen(a)),
        admin_listen: Some(a.admin_listen.clone()),
        cores: Some(a.core.cores().cores),
        pin: Some(a.core.pin && !a.core.no_pin),
        no_pin: None,
        driver: driver_name(a.core.driver),
        domain: a.domain.clone(),
        default_session: a.default_session.clone(),
        token: a.token.as_ref().map(|_| MASK.to_string()),
        max_head: Some(a.max_head),
        header_timeout: Some(a.header_timeout),
        idle_timeout: Some(a.idle_timeout),
        shutdown_grace: Some(a.shutdown_grace),
        session_lease: Some(a.session_lease),
        hold_timeout: Some(a.hold_timeout),
        hold_queue: Some(a.hold_queue),
        body_idle_timeout: Some(a.body_idle_timeout),
        write_stall_timeout: Some(a.write_stall_timeout),
        response_timeout: Some(a.response_timeout),
        stream_window: Some(a.stream_window),
        conn_window: Some(a.conn_window),
        max_streams: Some(a.max_streams),
        heartbeat_interval: Some(a.heartbeat_interval),
        tunnel_tls_cert: a.tunnel_tls_cert.clone(),
        tunnel_tls_key: a.tunnel_tls_key.clone(),
        client_ca: a.client_ca.clone(),
        insecure_plaintext: Some(a.insecure_plaintext),
        trusted_proxies: a.trusted_proxies.clone(),
        proxy_protocol: Some(a.proxy_protocol),
        sessions: a.sessions.clone(),
        https_listen: a.https_listen.clone(),
        https_cert: a.https_cert.clone(),
        https_key: a.https_key.clone(),
        https_certs: a
            .https_certs
            .iter()
            .map(|c| config_file::HttpsCertEntry {
                cert: c.cert.clone(),
                key: c.key.clone(),
            })
            .collect(),
        max_conns: a.limits.max_conns,
        max_conns_per_ip: a.limits.max_conns_per_ip,
        fd_reserve: a.limits.fd_reserve,
        max_handshakes: Some(a.limits.max_handshakes),
        handshake_fail_limit: Some(a.limits.handshake_fail_limit),
        handshake_fail_window: Some(a.limits.handshake_fail_window),
        handshake_ban: Some(a.limits.handshake_ban),
        session_rate: a.limits.session_rate.map(|r| r.to_string()),
        session_burst: a.limits.session_burst,
        admin_token: a.limits.admin_token.as_ref().map(|_| MASK.to_string()),
        rate_per_ip: a.limits.rate_per_ip.map(|r| r.to_string()),
        burst_per_ip: a.limits.burst_per_ip,
        rate_ip_table: Some(a.limits.rate_ip_table),
        tcp_ports: Some(a.tcp_ports.clone()),
        tcp_max_conns_per_port: Some(a.tcp_max_conns_per_port),
        tokens: rules.iter().map(TokenEntry::shown).collect(),
    }
}

/// The tunnel listener. Left to its default, it faces the network only
/// with TLS: a plaintext one stays on loopback, so `ringtunnel gateway`
/// alone starts (a local trial) instead of refusing a plaintext 0.0.0.0.
fn tunnel_listen(a: &GatewayArgs) -> String {
    match (&a.tunnel_listen, &a.tunnel_tls_cert) {
        (Some(l), _) => l.clone(),
        (None, Some(_)) => "0.0.0.0:7000".into(),
        (None, None) => "127.0.0.1:7000".into(),
    }
}

fn gateway_config(a: GatewayArgs, file_rules: Vec<TokenRule>) -> Result<GatewayConfig, String> {
    // `--token` (or `token =`) adds rules for any session next to the
    // file's scoped ones.
    let mut tokens: Vec<TokenRule> = a
        .token
        .as_deref()
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(TokenRule::any_session)
                .collect()
        })
        .unwrap_or_default();
    tokens.extend(file_rules);
    let tunnel_listen = tunnel_listen(&a);
    Ok(GatewayConfig {
        listen: a.listen,
        tunnel_listen,
        admin_listen: (a.admin_listen != "off").then_some(a.admin_listen),
        cores: a.core.cores(),
        domain: a.domain,
        default_session: a.default_session,
        tokens,
        max_head: a.max_head,
        header_timeout: secs(a.header_timeout, "header-timeout")?,
        idle_timeout: secs(a.idle_timeout, "idle-timeout")?,
        shutdown_grace: secs(a.shutdown_grace, "shutdown-grace")?,
        session_lease: secs_or_zero(a.session_lease, "session-lease")?,
        hold_timeout: secs(a.hold_timeout, "hold-timeout")?,
        hold_queue: a.hold_queue,
        body_idle_timeout: secs(a.body_idle_timeout, "body-idle-timeout")?,
        write_stall_timeout: secs(a.write_stall_timeout, "write-stall-timeout")?,
        response_timeout: secs(a.response_timeout, "response-timeout")?,
        limits: Limits {
            max_frame: ringtunnel::proto::DEFAULT_MAX_FRAME,
            stream_window: a.stream_window,
            conn_window: a.conn_window,
            max_streams: a.max_streams,
        },
        heartbeat: heartbeat(a.heartbeat_interval)?,
        tunnel_tls: match (a.tunnel_tls_cert, a.tunnel_tls_key) {
            (Some(cert), Some(key)) => Some(ringtunnel::tls::ServerTlsFiles {
                cert,
                key,
                client_ca: a.client_ca,
            }),
            _ => None,
        },
        insecure_plaintext: a.insecure_plaintext,
        trusted_proxies: ringtunnel::trust::TrustedProxies::parse_list(
            a.trusted_proxies.as_deref().unwrap_or(""),
        )
        .map_err(|e| format!("--trusted-proxies {e}"))?,
        proxy_protocol: a.proxy_protocol,
        edge_limits: a.limits.config()?,
        sessions: config_file::session_rules(&a.sessions)?,
        admin_token: a.limits.admin_token,
        https_listen: a.https_listen,
        // The flag's pair first: it is the default certificate.
        https_certs: a
            .https_cert
            .zip(a.https_key)
            .map(|(cert, key)| ringtunnel::sni::CertFiles { cert, key })
            .into_iter()
            .chain(a.https_certs)
            .collect(),
        tcp_ports: ringtunnel::proto::tcp::PortRanges::parse(&a.tcp_ports)
            .map_err(|e| format!("--tcp-ports {}: {e}", a.tcp_ports))?,
        tcp_max_conns_per_port: a.tcp_max_conns_per_port,
        cluster: a.cluster.config()?,
    })
}

/// The token in `path`: its first line, without surrounding blanks.
fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(format!(
            "--token-file {}: the file is empty",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// The agent's flags with `--config` laid under them.
fn agent_args(mut a: AgentArgs, m: &ArgMatches) -> Result<AgentArgs, String> {
    let Some(path) = a.config.clone() else {
        return Ok(a);
    };
    let mut f: AgentFile = config_file::load(&path)?;
    lay_under!(m, f, a;
        gateway, session, to, uplinks, backend_concurrency, backend_queue,
        backend_timeout, slot_timeout, handshake_timeout, token, admin_listen,
        heartbeat_interval, shutdown_grace, agent_id, tls, ca, server_name, cert, key,
        token_file, tcp);
    lay_under!(m, f, a.show;
        quiet, inspect, inspect_max, inspect_body_bytes, inspect_mask);
    lay_core_under(m, &mut a.core, f.cores, f.pin, f.no_pin, f.driver)?;
    if a.cert.is_some() != a.key.is_some() {
        return Err("cert and key go together".into());
    }
    Ok(a)
}

fn agent_shown(a: &AgentArgs) -> AgentFile {
    AgentFile {
        gateway: Some(a.gateway.clone()),
        session: a.session.clone(),
        to: a.to.clone(),
        uplinks: a.uplinks,
        cores: Some(a.core.cores().cores),
        pin: Some(a.core.pin && !a.core.no_pin),
        no_pin: None,
        driver: driver_name(a.core.driver),
        backend_concurrency: Some(a.backend_concurrency),
        backend_queue: Some(a.backend_queue),
        backend_timeout: Some(a.backend_timeout),
        slot_timeout: Some(a.slot_timeout),
        handshake_timeout: Some(a.handshake_timeout),
        token: (!a.token.is_empty()).then(|| MASK.to_string()),
        token_file: a.token_file.clone(),
        admin_listen: a.admin_listen.clone(),
        heartbeat_interval: Some(a.heartbeat_interval),
        shutdown_grace: Some(a.shutdown_grace),
        agent_id: a.agent_id,
        tls: Some(a.tls),
        ca: a.ca.clone(),
        server_name: a.server_name.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
        tcp: (!a.tcp.is_empty()).then(|| a.tcp.clone()),
        quiet: Some(a.show.quiet),
        inspect: a.show.inspect.clone(),
        inspect_max: Some(a.show.inspect_max),
        inspect_body_bytes: Some(a.show.inspect_body_bytes),
        inspect_mask: Some(a.show.inspect_mask.clone()),
    }
}

/// Re-reads the gateway's file on SIGHUP and applies what can change
/// live; a bad file is refused with its reason and the old settings stay.
/// `running` is what the last successful load produced, to name the
/// settings a reload cannot apply.
fn reload_gateway(
    gw: &ringtunnel::gateway::Gateway,
    a: &GatewayArgs,
    m: &ArgMatches,
    running: &mut GatewayFile,
) {
    let res = gateway_args(a.clone(), m).and_then(|(a, rules)| {
        let shown = gateway_shown(&a, &rules);
        gw.reload(&gateway_config(a, rules)?)?;
        Ok(shown)
    });
    match res {
        Ok(shown) => {
            let fixed = restart_only_changes(running, &shown);
            *running = shown;
            if fixed.is_empty() {
                eprintln!("ringtunnel gateway: configuration reloaded");
            } else {
                // Saying so beats letting the operator believe a new
                // address or timeout is in force.
                let keys = fixed.join(", ");
                tracing::warn!(%keys, "changed settings that apply only at the next restart");
                eprintln!(
                    "ringtunnel gateway: configuration reloaded; changed but applied only \
                     at the next restart: {keys}"
                );
            }
        }
        Err(e) => {
            tracing::error!("configuration reload refused, keeping the running one: {e}");
            eprintln!("ringtunnel gateway: reload refused, previous configuration kept: {e}");
        }
    }
}

/// Keys whose value differs between two effective configurations, except
/// the ones `Gateway::reload` applies (tokens, TLS files and
/// `config::RELOADABLE`).
fn restart_only_changes(old: &GatewayFile, new: &GatewayFile) -> Vec<String> {
    const LIVE: [&str; 9] = [
        "tokens",
        "sessions",
        "token",
        "tunnel_tls_cert",
        "tunnel_tls_key",
        "client_ca",
        "https_cert",
        "https_key",
        "https_certs",
    ];
    let live = |k: &str| LIVE.contains(&k) || ringtunnel::config::RELOADABLE.contains(&k);
    let table = |f: &GatewayFile| match toml::Value::try_from(f) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let (a, b) = (table(old), table(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| !live(k.as_str()) && a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn sub<'a>(m: &'a ArgMatches, name: &str) -> &'a ArgMatches {
    m.subcommand_matches(name).unwrap_or(m)
}

/// A one-liner, parsed again as the `agent` it stands for.
fn run_as_agent(argv: Vec<std::ffi::OsString>) -> Result<(), String> {
    let m = Cli::command()
        .try_get_matches_from(argv)
        .map_err(|e| e.to_string())?;
    let cli = Cli::from_arg_matches(&m).map_err(|e| e.to_string())?;
    run(cli, &m)
}

fn run(cli: Cli, matches: &ArgMatches) -> Result<(), String> {
    match cli.cmd {
        Cmd::Gateway(flags) => {
            let m = sub(matches, "gateway");
            let (a, rules) = gateway_args(flags.clone(), m)?;
            if a.print_config {
                print!("{}", config_file::print(&gateway_shown(&a, &rules))?);
                return Ok(());
            }
            let mut running = gateway_shown(&a, &rules);
            let cfg = gateway_config(a, rules)?;
            // Handlers before start: a SIGHUP during start-up must not
            // kill the process (its default action).
            ringtunnel::signals::install();
            let gw = ringtunnel::gateway::start(cfg).map_err(|e| e.to_string())?;
            let or_off = |a: Option<std::net::SocketAddr>| {
                a.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
            };
            println!(
                "ringtunnel gateway ready public={} tunnel={} admin={} https={}",
                or_off(gw.listen_addr()),
                gw.tunnel_addr(),
                or_off(gw.admin_addr()),
                or_off(gw.https_addr()),
            );
            while !ringtunnel::signals::terminated() {
                if ringtunnel::signals::take_hangup() {
                    reload_gateway(&gw, &flags, m, &mut running);
                }
                // Asleep until a signal: an idle gateway's main thread
                // never wakes.
                ringtunnel::signals::wait(None);
            }
            eprintln!(
                "ringtunnel gateway: shutting down (finishing in-flight requests; \
                 Ctrl-C again to exit now)"
            );
            gw.shutdown();
            Ok(())
        }
        Cmd::Http(h) => run_as_agent(http_as_agent(&h)?),
        Cmd::Tcp(t) => run_as_agent(one_liner_as_agent(&t.common, ["--tcp", &t.target])?),
        Cmd::Agent(a) => {
            let m = sub(matches, "agent");
            let mut a = agent_args(a, m)?;
            if let Some(path) = &a.token_file {
                if m.value_source("token") == Some(ValueSource::CommandLine) {
                    return Err("give --token or --token-file, not both".into());
                }
                a.token = read_token_file(path)?;
            }
            if a.print_config {
                print!("{}", config_file::print(&agent_shown(&a))?);
                return Ok(());
            }
            let cfg = AgentConfig {
                gateway: a.gateway,
                session: a
                    .session
                    .ok_or("--session is required (or session = \"...\" in --config)")?,
                // A TCP-only agent needs no HTTP backend: its HTTP
                // requests get 502 from the default address.
                http: a.to.is_some() || a.tcp.is_empty(),
                to: match (a.to, a.tcp.is_empty()) {
                    (Some(to), _) => to,
                    (None, false) => AgentConfig::default().to,
                    (None, true) => {
                        return Err("--to is required (or to = \"...\" in --config)".into())
                    }
                },
                tcp: a
                    .tcp
                    .iter()
                    .map(|t| ringtunnel::proto::tcp::TcpSpec::parse(t))
                    .collect::<Result<_, _>>()?,
                uplinks: a.uplinks,
                nodes: a.nodes,
                cores: a.core.cores(),
                backend_concurrency: a.backend_concurrency,
                backend_queue: a.backend_queue,
                backend_timeout: secs(a.backend_timeout, "backend-timeout")?,
                slot_timeout: secs(a.slot_timeout, "slot-timeout")?,
                handshake_timeout: secs(a.handshake_timeout, "handshake-timeout")?,
                token: a.token,
                admin_listen: a.admin_listen,
                heartbeat: heartbeat(a.heartbeat_interval)?,
                shutdown_grace: secs(a.shutdown_grace, "shutdown-grace")?,
                agent_id: a.agent_id,
                quiet: a.show.quiet,
                inspect: a.show.inspect(),
                // Every TLS flag implies TLS: asking for a CA or a name and
                // silently getting plaintext would be the worst outcome.
                tls: (a.tls || a.ca.is_some() || a.server_name.is_some() || a.cert.is_some())
                    .then_some(ringtunnel::tls::ClientTlsFiles {
                        ca: a.ca,
                        server_name: a.server_name,
                        cert: a.cert,
                        key: a.key,
                    }),
                ..AgentConfig::default()
            };
            ringtunnel::signals::install();
            let shutdown_grace = cfg.shutdown_grace;
            let agent = ringtunnel::agent::start(cfg).map_err(|e| e.to_string())?;
            let mut announced = false;
            let mut forwarding = false;
            if let Some(addr) = agent.inspect_addr() {
                println!("Inspector http://{addr}/");
            }
            while !ringtunnel::signals::terminated() {
                if !forwarding {
                    if let Some(line) = agent.forwarding() {
                        println!("{line}");
                        forwarding = true;
                    }
                }
                if let Some(e) = agent.fatal_error() {
                    agent.stop();
                    // e says who refused whom: "gateway refused this
                    // agent: ..." or "TLS with the gateway failed: ...".
                    return Err(e);
                }
                let (up, total) = (agent.connected_uplinks(), agent.total_uplinks());
                if !announced && total > 0 && up >= total {
                    // Scripts and tests wait for this line.
                    let mut line = format!("ringtunnel agent ready uplinks={up}");
                    if let Some(i) = agent.inspect_addr() {
                        line += &format!(" inspect={i}");
                    }
                    if let Some(a) = agent.admin_addr() {
                        line += &format!(" admin={a}");
                    }
                    println!("{line}");
                    announced = true;
                }
                // Asleep until a signal or a nudge from the agent's cores
                // (an uplink accepted, lost or refused).
                ringtunnel::signals::wait(None);
            }
            eprintln!(
                "ringtunnel agent: stopping (finishing in-flight requests, up to {} s; \
                 Ctrl-C again to exit now)",
                shutdown_grace.as_secs_f64()
            );
            agent.stop();
            Ok(())
        }
        Cmd::Echo(a) => {
            let cfg = EchoServerConfig {
                listen: a.listen,
                cores: a.core.cores(),
                delay_ms: a.delay_ms,
            };
            let srv = ringtunnel::echo::start(cfg).map_err(|e| e.to_string())?;
            ringtunnel::signals::install();
            println!("ringtunnel echo ready listen={}", srv.addr());
            ringtunnel::signals::wait_for_termination();
            Ok(())
        }
        Cmd::Bench(a) => ringtunnel::bench::run(a),
        Cmd::Demo(a) => ringtunnel::demo::run(a),
        Cmd::Completions { shell } => {
            // Generated from the same clap definitions as the parser, so
            // they can never list a flag that does not exist.
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "ringtunnel", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man => print_man(),
    }
}

/// The manual: the top-level page, then one section per subcommand.
fn print_man() -> Result<(), String> {
    let cmd = Cli::command().name("ringtunnel");
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut out)
        .map_err(|e| e.to_string())?;
    for sub in cmd.get_subcommands() {
        let name = format!("ringtunnel-{}", sub.get_name());
        clap_mangen::Man::new(sub.clone().name(name))
            .render(&mut out)
            .map_err(|e| e.to_string())?;
    }
    use std::io::Write as _;
    std::io::stdout().write_all(&out).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // Matches are kept next to the parsed flags: they know which flags
    // were given (see `given`).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Servers log their start-up (driver, pinned core) by default; the
    // one-shot tools print tables and stay quiet unless RUST_LOG asks.
    let default_level = match cli.cmd {
        Cmd::Bench(_) | Cmd::Demo(_) => "warn",
        // The one-liner shows its URL and one line per request, and
        // warnings; not every worker's start-up.
        Cmd::Http(_) | Cmd::Tcp(_) => "warn,ringtunnel::request=info",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // The one-liner's lines are for a person: `... INFO GET / 200 1.2 ms`.
        .with_target(!matches!(cli.cmd, Cmd::Http(_) | Cmd::Tcp(_)))
        .init();
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringtunnel: {e}");
            ExitCode::from(2)
        }
    }
}
