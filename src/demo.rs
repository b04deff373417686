//! `ringtunnel demo`: echo backend + gateway + agent in one process on
//! loopback (free ports), a curl hint, then the same short load through
//! the tunnel and directly against the backend, side by side.

use std::time::{Duration, Instant};

use crate::bench::{format_comparison, run_load, writer_probe, LoadReport, LoadSpec};
use crate::config::{AgentConfig, Cores, EchoServerConfig, GatewayConfig};
use crate::runtime::DriverKind;

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Concurrency levels for the 35 ms backend rows.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50,100,1000")]
    pub sweep: Vec<usize>,
    /// Measured seconds per row and target.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Backend delay of the latency rows.
    #[arg(long, default_value_t = 35)]
    pub delay_ms: u64,
    /// Keep serving after the benchmark (Ctrl-C to stop).
    #[arg(long)]
    pub serve: bool,
    #[arg(long, value_enum, default_value_t = DriverKind::Auto)]
    pub driver: DriverKind,
    /// Cores per role [default: all].
    #[arg(long)]
    pub cores: Option<usize>,
}

fn row(label: String, mut r: LoadReport) -> LoadReport {
    r.label = label;
    r
}

pub fn run(a: DemoArgs) -> Result<(), String> {
    let cores = Cores::new(a.cores, false, a.driver);
    let echo = crate::echo::start(EchoServerConfig {
        listen: "127.0.0.1:0".into(),
        cores: cores.clone(),
        delay_ms: 0,
    })
    .map_err(|e| format!("echo: {e}"))?;
    let gw = crate::gateway::start(GatewayConfig {
        listen: "127.0.0.1:0".into(),
        tunnel_listen: "127.0.0.1:0".into(),
        admin_listen: Some("127.0.0.1:0".into()),
        cores: cores.clone(),
        ..GatewayConfig::default()
    })
    .map_err(|e| format!("gateway: {e}"))?;
    let agent = crate::agent::start(AgentConfig {
        gateway: gw.tunnel_addr().to_string(),
        session: "demo".into(),
        to: echo.addr().to_string(),
        cores: cores.clone(),
        ..AgentConfig::default()
    })
    .map_err(|e| format!("agent: {e}"))?;
    let t0 = Instant::now();
    while agent.total_uplinks() == 0 || agent.connected_uplinks() < agent.total_uplinks() {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err("agent did not connect to the gateway within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Uplinks are registered; give the directory broadcast a moment.
    std::thread::sleep(Duration::from_millis(100));
    let public = gw.public_addr();
    println!("ringtunnel demo: echo backend {}, gateway {} (admin {}), agent with {} uplinks, session 'demo'",
        echo.addr(), public, gw.admin_addr().map(|x| x.to_string()).unwrap_or_default(), agent.connected_uplinks());
    let lifetime = if a.serve {
        "until Ctrl-C"
    } else {
        "while the benchmark below runs; --serve keeps serving after it until Ctrl-C"
    };
    println!("try ({lifetime}):");
    println!("      curl -H 'Host: demo' http://{public}/headers");
    println!("      curl -H 'Host: demo' http://{public}/bytes/1048576 | wc -c");
    println!();

    let tunnel = format!("http://{public}");
    let direct = format!("http://{}", echo.addr());
    let spec = |base: &str, path: &str, c: usize, host: Option<&str>| {
        let mut s = LoadSpec::new(&format!("{base}{path}"));
        s.conns = c;
        s.duration = Duration::from_secs_f64(a.seconds);
        s.warmup = Duration::from_millis(500);
        s.host = host.map(str::to_string);
        s.cores = cores.cores;
        s.driver = a.driver;
        s
    };
    let admin = gw.admin_addr().map(|x| x.to_string()).unwrap_or_default();
    let mut rows = Vec::new();
    let mut writer_lines = Vec::new();
    // Runs the tunnel side of a row, sampling the gateway's uplink writer
    // counters around it.
    let mut tunnel_row = |label: &str, path: &str, c: usize| -> Result<LoadReport, String> {
        let before = writer_probe::sample(&admin);
        let r = run_load(&spec(&tunnel, path, c, Some("demo"))).map_err(|e| e.to_string())?;
        if let (Some(b), Some(after)) = (before, writer_probe::sample(&admin)) {
            writer_lines.push(format!("{label}: {}", writer_probe::describe(&b, &after)));
        }
        Ok(r)
    };
    let delay_path = format!("/delay/{}", a.delay_ms);
    for (i, &c) in a.sweep.iter().enumerate() {
        let label = format!("{} ms backend c={c}", a.delay_ms);
        eprintln!("running {label} ...");
        let direct_row =
            || run_load(&spec(&direct, &delay_path, c, None)).map_err(|e| e.to_string());
        // Alternate the order so neither target always runs on a warmer machine.
        let (rt, rd) = if i % 2 == 0 {
            let t = tunnel_row(&label, &delay_path, c)?;
            (t, direct_row()?)
        } else {
            let d = direct_row()?;
            (tunnel_row(&label, &delay_path, c)?, d)
        };
        rows.push((row(label.clone(), rt), row(label, rd)));
    }
    let c = 100;
    let label = format!("0 ms backend c={c}");
    eprintln!("running {label} ...");
    let rd = run_load(&spec(&direct, "/", c, None)).map_err(|e| e.to_string())?;
    let rt = tunnel_row(&label, "/", c)?;
    rows.push((row(label.clone(), rt), row(label, rd)));
    println!(
        "{}",
        format_comparison(
            &rows,
            &format!("tunnel  {tunnel} (Host: demo)"),
            &format!("direct  {direct}")
        )
    );
    println!(
        "columns: rps = requests per second; p50 / p99 = median and 99th percentile latency;\n  \
         A/B = tunnel divided by direct (1.00x: no cost); A-B = what the tunnel adds, in ms;\n  \
         errors = connect/timeout/5xx/other failures on each side"
    );
    println!("gateway uplink writer, per tunnel row (warmup included):");
    for l in &writer_lines {
        println!("  {l}");
    }
    if a.serve {
        println!("serving on http://{public} (Host: demo); Ctrl-C to stop");
        crate::signals::wait_for_termination();
    } else {
        println!("done: the demo's servers stop now (--serve keeps them up until Ctrl-C)");
    }
    agent.stop();
    gw.shutdown();
    Ok(())
}
