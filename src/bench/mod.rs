//! `ringtunnel bench`: the load generator and its statistics.
//!
//! Closed loop (default): `-c` connections spread over the client cores,
//! each sending a request and waiting for the whole response. Open loop
//! (`--rate`): a constant request schedule split over cores and served by a
//! pool of `-c` connections, latency measured from each request's intended
//! send time (no coordinated omission). Sweeps (`--sweep`), rate ramps
//! (`--ramp`) and direct-vs-tunnel comparisons (`--compare`) are runs of the
//! same [`run_load`], one row each.
//!
//! # Layout
//! - [`response`]: sans-IO response framing (head, length/chunked/close bodies);
//! - [`target`]: URL parsing and the request bytes, built once;
//! - `client`: one connection over monoio (the only socket code here);
//! - `load`: the plan, per-core connection tasks, per-core histograms merged
//!   at the end;
//! - `report`, `svg`: table, comparison, JSON and chart.
//!
//! Client threads come from [`crate::runtime::spawn_workers`]; every core
//! measures into its own `hdrhistogram` (1 us .. 60 s, 3 significant
//! figures) and the main thread merges them. Every load is bounded by a
//! duration or a request count, and every request by a timeout.

mod client;
mod load;
pub(crate) mod report;
pub mod response;
mod svg;
pub mod target;
pub mod writer_probe;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::runtime::DriverKind;

pub use load::{fmt_rate, new_histogram};
pub use report::{format_comparison, format_table, latency_ms, write_json};
pub use svg::write_svg;

/// One load against one target.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// `http://host:port/path` (IP literal or a name resolved once).
    pub url: String,
    /// Connections: concurrency in the closed loop, pool size in the open loop.
    pub conns: usize,
    /// Length of the measured phase. With `max_requests`, an upper bound.
    pub duration: Duration,
    /// Load sent before measuring starts (not recorded, not budgeted).
    pub warmup: Duration,
    /// Host header; default: the URL's `host[:port]`.
    pub host: Option<String>,
    /// Host headers used round robin over requests (wins over `host`).
    pub hosts: Vec<String>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    pub method: String,
    /// Request body bytes (sent with Content-Length).
    pub body_size: usize,
    /// Open loop: requests per second over all cores.
    pub rate: Option<f64>,
    /// Reuse connections; `false` opens one per request (`Connection: close`).
    pub keepalive: bool,
    /// Per request, from its (intended) start to its last response byte.
    pub timeout: Duration,
    /// Stop after this many measured attempts (responses and failures).
    pub max_requests: Option<u64>,
    /// Client cores; 0 = all available. Never more than `conns`.
    pub cores: usize,
    pub driver: DriverKind,
}

impl LoadSpec {
    /// 50 connections, 10 s after a 1 s warmup, GET, keep-alive, 10 s
    /// timeout, all cores, driver chosen automatically.
    pub fn new(url: &str) -> Self {
        LoadSpec {
            url: url.to_string(),
            conns: 50,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            host: None,
            hosts: Vec::new(),
            headers: Vec::new(),
            method: "GET".to_string(),
            body_size: 0,
            rate: None,
            keepalive: true,
            timeout: Duration::from_secs(10),
            max_requests: None,
            cores: 0,
            driver: DriverKind::Auto,
        }
    }
}

/// What one load measured (merged over cores).
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// "c=50" (closed loop) or "rate=1000" (open loop) unless set by the caller.
    pub label: String,
    /// Responses received (any status, 5xx included).
    pub requests: u64,
    /// Measured time: the window, or up to the last response when the
    /// request budget ran out first.
    pub elapsed: Duration,
    /// `requests / elapsed`.
    pub rps: f64,
    /// Latency of every response, in microseconds.
    pub hist: hdrhistogram::Histogram<u64>,
    pub errors: ErrorCounts,
    pub status_counts: BTreeMap<u16, u64>,
}

/// Failed or failing requests by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    /// The TCP connection could not be opened.
    pub connect: u64,
    /// No complete response within the timeout.
    pub timeout: u64,
    /// Responses with status >= 500 (also counted in `requests`).
    pub status_5xx: u64,
    /// Resets, early closes, unparsable responses.
    pub other: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.status_5xx + self.other
    }
}

/// Runs one load and blocks until it ends; spawns the client cores, joins
/// them and merges their statistics. No progress output.
pub fn run_load(spec: &LoadSpec) -> std::io::Result<LoadReport> {
    load::run(spec, false)
}

/// [`run_load`] with a one-line live progress on stderr when `progress`.
pub fn run_load_with_progress(spec: &LoadSpec, progress: bool) -> std::io::Result<LoadReport> {
    load::run(spec, progress)
}

/// Command line of `ringtunnel bench`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Target: http://host:port/path (IP literal or localhost).
    pub url: String,
    /// Connections (closed loop: concurrency; open loop: pool size).
    #[arg(short = 'c', long = "conns", default_value_t = 50)]
    pub conns: usize,
    /// Measured duration per run, e.g. 10s, 500ms, 2m [default: 10s, or
    /// unbounded by time with --requests].
    #[arg(short = 'd', long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Unmeasured load before each run.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Host header (default: from the URL).
    #[arg(long)]
    pub host: Option<String>,
    /// Extra header, 'Name: value' (repeatable).
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 0)]
    pub body_size: usize,
    /// Open loop: total requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// A new connection per request (Connection: close).
    #[arg(long)]
    pub no_keepalive: bool,
    /// One closed-loop run per concurrency, e.g. 1,10,50,100,1000.
    #[arg(long, value_delimiter = ',', conflicts_with = "ramp")]
    pub sweep: Vec<usize>,
    /// Open-loop rate steps START:END:STEP_EVERY or START:END:STEP_EVERY:STEP, e.g. 100:2000:5s
    /// (default step (END-START)/10).
    #[arg(long, value_parser = parse_ramp, conflicts_with = "rate")]
    pub ramp: Option<Ramp>,
    /// Host headers used round robin, e.g. a,b,c.
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Write the rows and percentile series as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a latency chart (SVG).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Run every row against this URL too (alternating order) and compare.
    #[arg(long)]
    pub compare: Option<String>,
    /// Client cores [default: all].
    #[arg(long)]
    pub cores: Option<usize>,
    #[arg(long, value_enum, default_value_t = DriverKind::Auto)]
    pub driver: DriverKind,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Stop after N requests instead of after the duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Gateway admin address (host:port): report its uplink frames per
    /// writev for each row of URL.
    #[arg(long)]
    pub admin: Option<String>,
}

/// `--ramp START:END:STEP_EVERY[:STEP]`: open-loop rates from START to END.
#[derive(Clone, Debug, PartialEq)]
pub struct Ramp {
    pub start: f64,
    pub end: f64,
    pub step_every: Duration,
    pub step: f64,
}

impl Ramp {
    /// The rates of the steps, START first, END last.
    pub fn rates(&self) -> Vec<f64> {
        let mut out = Vec::new();
        let mut r = self.start;
        let up = self.end >= self.start;
        while (up && r < self.end - 1e-9) || (!up && r > self.end + 1e-9) {
            out.push(r);
            r += if up { self.step } else { -self.step };
        }
        out.push(self.end);
        out
    }
}

/// Time cap of a run bounded by `--requests` alone.
const REQUESTS_ONLY_CAP: Duration = Duration::from_secs(24 * 3600);

/// Parses "10s", "500ms", "2m", "1h", "250us" or "1.5s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?}: missing unit (e.g. 10s, 500ms, 2m)"))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number then a unit, e.g. 10s"))?;
    let secs = match unit.trim() {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use us, ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?}: duration out of range"))
}

/// Parses "Name: value".
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected 'Name: value'"))?;
    let (k, v) = (k.trim().to_string(), v.trim().to_string());
    target::validate_header(&k, &v)?;
    Ok((k, v))
}

/// Parses START:END:STEP_EVERY or START:END:STEP_EVERY:STEP.
pub fn parse_ramp(s: &str) -> Result<Ramp, String> {
    let parts: Vec<&str> = s.split(':').collect();
    if !(3..=4).contains(&parts.len()) {
        return Err(format!(
            "{s:?}: expected START:END:STEP_EVERY[:STEP], e.g. 100:2000:5s"
        ));
    }
    let rate = |p: &str| -> Result<f64, String> {
        p.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a positive rate"))
    };
    let (start, end) = (rate(parts[0])?, rate(parts[1])?);
    let step_every = parse_duration(parts[2])?;
    if step_every.is_zero() {
        return Err(format!("{s:?}: STEP_EVERY must be greater than zero"));
    }
    let step = match parts.get(3) {
        Some(p) => rate(p)?,
        None => ((end - start).abs() / 10.0).max(1.0),
    };
    Ok(Ramp {
        start,
        end,
        step_every,
        step,
    })
}

/// One planned row: its load and its x value for the chart.
struct Row {
    spec: LoadSpec,
    x: f64,
}

/// `ringtunnel bench`: runs the rows, prints the table, writes the files.
pub fn run(args: BenchArgs) -> Result<(), String> {
    let (rows, x_label) = plan_rows(&args)?;
    let progress = stderr_is_tty();
    let mut a_reports = Vec::with_capacity(rows.len());
    let mut b_reports = Vec::with_capacity(rows.len());
    let mut writer_lines = Vec::new();
    // Samples the gateway's writer counters around the tunnel (URL) runs.
    let probe = |label: &str,
                 f: &mut dyn FnMut() -> Result<LoadReport, String>,
                 lines: &mut Vec<String>| {
        let before = args.admin.as_deref().and_then(writer_probe::sample);
        let r = f()?;
        if let (Some(b), Some(a)) = (before, args.admin.as_deref().and_then(writer_probe::sample)) {
            lines.push(format!("{label}: {}", writer_probe::describe(&b, &a)));
        }
        Ok::<_, String>(r)
    };
    for (i, row) in rows.iter().enumerate() {
        let label = row_label(&row.spec);
        match &args.compare {
            None => {
                eprintln!("[bench] {label} -> {}", row.spec.url);
                a_reports.push(probe(
                    &label,
                    &mut || run_row(&row.spec, &label, progress),
                    &mut writer_lines,
                )?);
            }
            Some(url2) => {
                let mut b_spec = row.spec.clone();
                b_spec.url = url2.clone();
                // Alternate the order so that neither target always runs
                // on a warmer (or more tired) machine.
                let b_first = i % 2 == 1;
                if b_first {
                    eprintln!("[bench] {label} -> {url2}, then {}", row.spec.url);
                    b_reports.push(run_row(&b_spec, &label, progress)?);
                    a_reports.push(probe(
                        &label,
                        &mut || run_row(&row.spec, &label, progress),
                        &mut writer_lines,
                    )?);
                } else {
                    eprintln!("[bench] {label} -> {}, then {url2}", row.spec.url);
                    a_reports.push(probe(
                        &label,
                        &mut || run_row(&row.spec, &label, progress),
                        &mut writer_lines,
                    )?);
                    b_reports.push(run_row(&b_spec, &label, progress)?);
                }
            }
        }
    }

    println!("{}", args.url);
    print!("{}", format_table(&a_reports));
    if let Some(url2) = &args.compare {
        println!("\n{url2}");
        print!("{}", format_table(&b_reports));
        println!();
        let pairs: Vec<(LoadReport, LoadReport)> = a_reports
            .iter()
            .cloned()
            .zip(b_reports.iter().cloned())
            .collect();
        print!("{}", format_comparison(&pairs, &args.url, url2));
    }
    if !writer_lines.is_empty() {
        println!(
            "\ngateway uplink writer ({}):",
            args.admin.as_deref().unwrap_or("")
        );
        for l in &writer_lines {
            println!("  {l}");
        }
    }

    let compare = args.compare.as_ref().map(|_| b_reports.as_slice());
    if let Some(path) = &args.json {
        write_json(path, &a_reports, compare).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("[bench] wrote {}", path.display());
    }
    if let Some(path) = &args.svg {
        let xs: Vec<f64> = rows.iter().map(|r| r.x).collect();
        let mut series = vec![(args.url.clone(), a_reports.clone())];
        if let Some(url2) = &args.compare {
            series.push((url2.clone(), b_reports.clone()));
        }
        write_svg(path, x_label, &xs, &series)?;
        eprintln!("[bench] wrote {}", path.display());
    }
    Ok(())
}

fn run_row(spec: &LoadSpec, label: &str, progress: bool) -> Result<LoadReport, String> {
    let mut report = load::run(spec, progress).map_err(|e| format!("{}: {e}", spec.url))?;
    report.label = label.to_string();
    Ok(report)
}

fn row_label(spec: &LoadSpec) -> String {
    match spec.rate {
        Some(r) => format!("rate={}", fmt_rate(r)),
        None => format!("c={}", spec.conns),
    }
}

/// Turns the command line into rows (one per sweep value or ramp step)
/// and the chart's x-axis name.
fn plan_rows(args: &BenchArgs) -> Result<(Vec<Row>, &'static str), String> {
    let mut base = LoadSpec::new(&args.url);
    base.conns = args.conns;
    base.duration = match (args.duration, args.requests) {
        (Some(d), _) => d,
        (None, Some(_)) => REQUESTS_ONLY_CAP,
        (None, None) => Duration::from_secs(10),
    };
    base.warmup = args.warmup;
    base.host = args.host.clone();
    base.hosts = args
        .hosts
        .iter()
        .filter(|h| !h.is_empty())
        .cloned()
        .collect();
    base.headers = args.headers.clone();
    base.method = args.method.to_ascii_uppercase();
    base.body_size = args.body_size;
    base.rate = args.rate;
    base.keepalive = !args.no_keepalive;
    base.timeout = args.timeout;
    base.max_requests = args.requests;
    base.cores = args.cores.unwrap_or(0);
    base.driver = args.driver;
    // Fail on a bad URL before any load starts (and for --compare too).
    target::Url::parse(&args.url)?;
    if let Some(u) = &args.compare {
        target::Url::parse(u)?;
    }
    if args.cores == Some(0) {
        return Err("--cores must be at least 1".into());
    }

    if let Some(ramp) = &args.ramp {
        let rows = ramp
            .rates()
            .into_iter()
            .enumerate()
            .map(|(i, rate)| {
                let mut spec = base.clone();
                spec.rate = Some(rate);
                spec.duration = ramp.step_every;
                if i > 0 {
                    spec.warmup = Duration::ZERO;
                }
                Row { spec, x: rate }
            })
            .collect();
        return Ok((rows, "rate (req/s)"));
    }
    if !args.sweep.is_empty() {
        if args.sweep.contains(&0) {
            return Err("--sweep values must be at least 1".into());
        }
        let rows = args
            .sweep
            .iter()
            .map(|&c| {
                let mut spec = base.clone();
                spec.conns = c;
                Row { spec, x: c as f64 }
            })
            .collect();
        return Ok((rows, "concurrency (connections)"));
    }
    let (x, x_label) = match base.rate {
        Some(r) => (r, "rate (req/s)"),
        None => (base.conns as f64, "concurrency (connections)"),
    };
    Ok((vec![Row { spec: base, x }], x_label))
}

fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDERR_FILENO) == 1 }
}

#[cfg(test)]
mod tests;
