//! `ringtunnel`: command line front end. Flags become validated configs
//! (`ringtunnel::config`), then the library runs them.

use std::process::ExitCode;

// glibc malloc was 12-17% of gateway and agent CPU under load (per-request
// heads, frames and task allocations, freed on another pattern than they
// were allocated); mimalloc's per-thread free lists fit thread-per-core.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringtunnel::config::defaults as cfgdef;
use ringtunnel::config::{AgentConfig, Cores, EchoServerConfig, GatewayConfig};
use ringtunnel::proto::{Heartbeat, Limits};
use ringtunnel::runtime::DriverKind;

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

#[derive(Subcommand)]
enum Cmd {
    /// Public HTTP listener + uplink listener; routes requests by Host.
    Gateway(GatewayArgs),
    /// Connects to a gateway, claims a session, forwards to a backend.
    Agent(AgentArgs),
    /// Built-in httpbin-like backend for tests, demos and benchmarks.
    Echo(EchoArgs),
    /// Load generator (closed/open loop, sweeps, ramps, comparisons).
    Bench(ringtunnel::bench::BenchArgs),
    /// Echo + gateway + agent on loopback, then a short benchmark.
    Demo(ringtunnel::demo::DemoArgs),
}

#[derive(Args)]
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

#[derive(Args)]
struct GatewayArgs {
    /// Public HTTP listen address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: String,
    /// Uplink (agent) listen address.
    #[arg(long, default_value = "0.0.0.0:7000")]
    tunnel_listen: String,
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
    #[arg(long, env = "RINGTUNNEL_TOKEN")]
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
    #[command(flatten)]
    limits: LimitArgs,
}

/// The gateway's limits (README, "Limits").
#[derive(Args)]
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
    #[arg(long, env = "RINGTUNNEL_ADMIN_TOKEN")]
    admin_token: Option<String>,
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
        })
    }
}

#[derive(Args)]
struct AgentArgs {
    /// Gateway tunnel address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    gateway: String,
    /// Session name to claim.
    #[arg(long)]
    session: String,
    /// Backend address.
    #[arg(long)]
    to: String,
    /// Uplinks to open [default: the gateway's core count].
    #[arg(long)]
    uplinks: Option<usize>,
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
    #[arg(long, env = "RINGTUNNEL_TOKEN", default_value = "")]
    token: String,
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

fn heartbeat(interval: f64) -> Result<Heartbeat, String> {
    Ok(Heartbeat::from_interval(secs(
        interval,
        "heartbeat-interval",
    )?))
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Gateway(a) => {
            let cfg = GatewayConfig {
                listen: a.listen,
                tunnel_listen: a.tunnel_listen,
                admin_listen: (a.admin_listen != "off").then_some(a.admin_listen),
                cores: a.core.cores(),
                domain: a.domain,
                default_session: a.default_session,
                tokens: a
                    .token
                    .map(|t| {
                        t.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(ringtunnel::scope::TokenRule::any_session)
                            .collect()
                    })
                    .unwrap_or_default(),
                max_head: a.max_head,
                header_timeout: secs(a.header_timeout, "header-timeout")?,
                idle_timeout: secs(a.idle_timeout, "idle-timeout")?,
                shutdown_grace: secs(a.shutdown_grace, "shutdown-grace")?,
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
                admin_token: a.limits.admin_token,
            };
            let gw = ringtunnel::gateway::start(cfg).map_err(|e| e.to_string())?;
            ringtunnel::signals::install();
            println!(
                "ringtunnel gateway ready public={} tunnel={} admin={}",
                gw.public_addr(),
                gw.tunnel_addr(),
                gw.admin_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "off".into())
            );
            ringtunnel::signals::wait_for_termination();
            eprintln!("ringtunnel gateway: shutting down (finishing in-flight requests)");
            gw.shutdown();
            Ok(())
        }
        Cmd::Agent(a) => {
            let cfg = AgentConfig {
                gateway: a.gateway,
                session: a.session,
                to: a.to,
                uplinks: a.uplinks,
                cores: a.core.cores(),
                backend_concurrency: a.backend_concurrency,
                backend_queue: a.backend_queue,
                backend_timeout: secs(a.backend_timeout, "backend-timeout")?,
                slot_timeout: secs(a.slot_timeout, "slot-timeout")?,
                handshake_timeout: secs(a.handshake_timeout, "handshake-timeout")?,
                token: a.token,
                admin_listen: a.admin_listen,
                heartbeat: heartbeat(a.heartbeat_interval)?,
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
            let agent = ringtunnel::agent::start(cfg).map_err(|e| e.to_string())?;
            let mut announced = false;
            while !ringtunnel::signals::terminated() {
                if let Some(e) = agent.fatal_error() {
                    agent.stop();
                    // e says who refused whom: "gateway refused this
                    // agent: ..." or "TLS with the gateway failed: ...".
                    return Err(e);
                }
                let (up, total) = (agent.connected_uplinks(), agent.total_uplinks());
                if !announced && total > 0 && up >= total {
                    // Scripts and tests wait for this line.
                    println!("ringtunnel agent ready uplinks={up}");
                    announced = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
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
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Servers log their start-up (driver, pinned core) by default; the
    // one-shot tools print tables and stay quiet unless RUST_LOG asks.
    let default_level = match cli.cmd {
        Cmd::Bench(_) | Cmd::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringtunnel: {e}");
            ExitCode::from(2)
        }
    }
}
