//! Running one load against one target.
//!
//! The main thread validates the [`LoadSpec`], resolves the target, builds
//! the request bytes and a [`Plan`] that every client core reads. Each core
//! runs its share of the connections as tasks and keeps its own statistics
//! (histogram, counters) in plain `Cell`/`RefCell` state; at the end it
//! sends them over a channel and the main thread merges them.
//!
//! Timing rules (the same for both loops):
//! - a request is *measured* when its start (closed loop) or its intended
//!   send time (open loop) falls in `[start + warmup, start + warmup +
//!   duration)`; measured requests are recorded however late they finish,
//!   and a run waits for them (each is bounded by the per-request timeout);
//! - `max_requests` caps measured attempts (responses and failures alike),
//!   so a dead target cannot keep a run alive either;
//! - the closed loop measures latency from the moment a request starts
//!   (connect included when a new connection is needed); the open loop
//!   measures from the intended send time, so waiting for a free
//!   connection counts (no coordinated omission); it wakes one timer tick
//!   early and measures an early send from the moment it is sent.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use monoio::time::Instant;

use super::client::{Client, Failure};
use super::target::{build_request, validate_header, RequestShape, Url};
use super::{ErrorCounts, LoadReport, LoadSpec};
use crate::runtime::{self, notify::Notify, WorkerSpec};

/// Highest latency the histograms track: 60 s, in microseconds.
pub const HIST_MAX_US: u64 = 60_000_000;
/// File descriptors kept free beside the connections (rings, std, logs).
const FD_SLACK: u64 = 128;
/// Time between spawning the client cores and the first request, so that
/// every core starts on the same clock (the open loop would otherwise
/// charge thread start-up to its first requests).
const START_LEAD: Duration = Duration::from_millis(50);
/// Resolution of monoio's timer wheel.
const TIMER_TICK: Duration = Duration::from_millis(1);
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// A new empty latency histogram: 1 us .. 60 s, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

/// What every client core reads; immutable once the cores start.
struct Plan {
    addr: SocketAddr,
    /// One prepared request per Host, used round robin.
    requests: Vec<Bytes>,
    head_request: bool,
    keepalive: bool,
    timeout: Duration,
    start: StdInstant,
    measure_start: StdInstant,
    end: StdInstant,
    shares: Vec<Share>,
    progress: Vec<ProgressSlot>,
}

/// One core's part of the load.
#[derive(Clone, Copy, Debug)]
struct Share {
    conns: usize,
    /// Measured attempts this core may make (`max_requests` split).
    budget: Option<u64>,
    /// Open loop only: this core's request schedule.
    pace: Option<Pace>,
}

/// Open-loop schedule of one core: ticket `k` is due at
/// `start + first + k * interval`.
#[derive(Clone, Copy, Debug)]
struct Pace {
    first: Duration,
    interval_s: f64,
}

/// Live counters for the progress line; one writer (its core), padded so
/// that cores do not share a cache line.
#[derive(Default)]
#[repr(align(64))]
struct ProgressSlot {
    responses: AtomicU64,
    errors: AtomicU64,
}

/// What one core measured; sent to the main thread at the end.
struct CoreStats {
    hist: Histogram<u64>,
    requests: u64,
    errors: ErrorCounts,
    status_counts: BTreeMap<u16, u64>,
    /// When the last measured request ended.
    last_done: Option<StdInstant>,
    /// The core stopped because its request budget ran out.
    budget_hit: bool,
}

impl CoreStats {
    fn new() -> Self {
        CoreStats {
            hist: new_histogram(),
            requests: 0,
            errors: ErrorCounts::default(),
            status_counts: BTreeMap::new(),
            last_done: None,
            budget_hit: false,
        }
    }
}

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    Connect,
    Timeout,
    Other,
}

/// Message from a core: its stats, or `None` if it died before reporting.
type CoreMsg = (usize, Option<CoreStats>);

/// Sends the core's result; if the core's future is dropped without
/// reporting (a panic, a runtime that failed to build), its `Drop` tells
/// the main thread so that it never waits for a dead core.
struct Reporter {
    core: usize,
    tx: Option<crossbeam_channel::Sender<CoreMsg>>,
}

impl Reporter {
    fn send(mut self, stats: CoreStats) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.core, Some(stats)));
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.core, None));
        }
    }
}

/// Runs one load; blocks until every client core has finished.
pub fn run(spec: &LoadSpec, progress: bool) -> io::Result<LoadReport> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    validate(spec).map_err(invalid)?;
    let url = Url::parse(&spec.url).map_err(invalid)?;
    let addr = url.resolve().map_err(invalid)?;
    let requests = prepare_requests(spec, &url).map_err(invalid)?;
    check_fd_limit(spec.conns)?;

    let wanted = if spec.cores == 0 {
        runtime::available_cores()
    } else {
        spec.cores
    };
    let mut cores = wanted.min(spec.conns).max(1);
    if let Some(n) = spec.max_requests {
        cores = cores.min(usize::try_from(n).unwrap_or(usize::MAX));
    }
    let start = StdInstant::now() + START_LEAD;
    let measure_start = start + spec.warmup;
    let plan = Arc::new(Plan {
        addr,
        requests,
        head_request: spec.method.eq_ignore_ascii_case("HEAD"),
        keepalive: spec.keepalive,
        timeout: spec.timeout,
        start,
        measure_start,
        end: measure_start + spec.duration,
        shares: split_load(spec, cores),
        progress: (0..cores).map(|_| ProgressSlot::default()).collect(),
    });

    let (tx, rx) = crossbeam_channel::unbounded::<CoreMsg>();
    let worker_spec = WorkerSpec {
        name: "bench".to_string(),
        cores,
        pin: false,
        driver: spec.driver,
        first_core: 0,
    };
    let core_plan = plan.clone();
    let workers = runtime::spawn_workers(&worker_spec, move |core| {
        // Created outside the async block: it reports even if the future
        // is dropped before its first poll.
        let reporter = Reporter {
            core,
            tx: Some(tx.clone()),
        };
        core_main(core_plan.clone(), core, reporter)
    })?;

    let mut results: Vec<Option<CoreStats>> = (0..cores).map(|_| None).collect();
    let mut lost = 0usize;
    let mut received = 0usize;
    let mut meter = progress.then(|| Meter::new(start));
    while received < cores {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok((core, stats)) => {
                received += 1;
                match stats {
                    Some(s) => results[core] = Some(s),
                    None => lost += 1,
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            // Every sender is gone: all cores ended (some without a word).
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        if let Some(m) = meter.as_mut() {
            m.tick(&plan);
        }
    }
    if let Some(m) = meter {
        m.clear();
    }
    workers.join();
    if lost > 0 || received < cores {
        return Err(io::Error::other(format!(
            "{} of {cores} client cores stopped without reporting (see the log)",
            cores - received + lost
        )));
    }
    let label = match spec.rate {
        Some(r) => format!("rate={}", fmt_rate(r)),
        None => format!("c={}", spec.conns),
    };
    Ok(merge(label, &plan, results.into_iter().flatten().collect()))
}

fn validate(spec: &LoadSpec) -> Result<(), String> {
    if spec.conns == 0 {
        return Err("connections (-c) must be at least 1".into());
    }
    if spec.duration.is_zero() {
        return Err("duration (-d) must be greater than zero".into());
    }
    if spec.timeout.is_zero() {
        return Err("timeout must be greater than zero".into());
    }
    if spec.max_requests == Some(0) {
        return Err("--requests must be at least 1".into());
    }
    if let Some(r) = spec.rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(format!(
                "rate must be a positive number of requests per second, not {r}"
            ));
        }
    }
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if spec.method.is_empty() || !spec.method.bytes().all(token) {
        return Err(format!("bad method {:?}", spec.method));
    }
    Ok(())
}

/// One request per Host: `hosts` round robin, else `host`, else a Host
/// header given in `headers`, else the URL's authority.
fn prepare_requests(spec: &LoadSpec, url: &Url) -> Result<Vec<Bytes>, String> {
    let mut host_header = None;
    let mut headers = Vec::with_capacity(spec.headers.len());
    for (k, v) in &spec.headers {
        validate_header(k, v)?;
        if k.eq_ignore_ascii_case("host") {
            host_header = Some(v.clone());
        } else {
            headers.push((k.clone(), v.clone()));
        }
    }
    let hosts: Vec<String> = if !spec.hosts.is_empty() {
        spec.hosts.clone()
    } else {
        vec![spec
            .host
            .clone()
            .or(host_header)
            .unwrap_or_else(|| url.authority())]
    };
    let shape = RequestShape {
        method: &spec.method,
        path: &url.path,
        headers: &headers,
        body_size: spec.body_size,
        keepalive: spec.keepalive,
    };
    hosts
        .iter()
        .map(|h| {
            validate_header("Host", h)?;
            Ok(build_request(&shape, h))
        })
        .collect()
}

/// Raises the soft open-file limit to the hard one; fails with advice when
/// it is still too low for `conns` connections.
fn check_fd_limit(conns: usize) -> io::Result<()> {
    let need = conns as u64 + FD_SLACK;
    let have = runtime::raise_nofile_limit();
    if have != 0 && have < need {
        return Err(io::Error::other(format!(
            "{conns} connections need about {need} open files, but the open-file limit \
             (RLIMIT_NOFILE) is {have} even after raising the soft limit to the hard limit; \
             raise it (e.g. `ulimit -n {}` in this shell, as root or after raising the hard \
             limit in /etc/security/limits.conf) and retry",
            need.next_power_of_two()
        )));
    }
    Ok(())
}

/// Splits connections, request budget and rate over `cores`.
fn split_load(spec: &LoadSpec, cores: usize) -> Vec<Share> {
    let part =
        |total: u64, i: usize| total / cores as u64 + u64::from((i as u64) < total % cores as u64);
    (0..cores)
        .map(|i| {
            let conns = part(spec.conns as u64, i) as usize;
            let pace = spec.rate.map(|rate| {
                let core_rate = rate * conns as f64 / spec.conns as f64;
                Pace {
                    // Interleave the cores' schedules.
                    first: Duration::from_secs_f64(i as f64 / rate),
                    interval_s: 1.0 / core_rate,
                }
            });
            Share {
                conns,
                budget: spec.max_requests.map(|n| part(n, i)),
                pace,
            }
        })
        .collect()
}

/// One client core's shared state; its connection tasks hold an `Rc`.
struct Core {
    plan: Arc<Plan>,
    index: usize,
    start: Instant,
    measure_start: Instant,
    end: Instant,
    budget: Cell<Option<u64>>,
    next_ticket: Cell<u64>,
    next_host: Cell<usize>,
    stats: RefCell<CoreStats>,
    /// Connection tasks still running; `core_main` waits for zero.
    live: Cell<usize>,
    all_done: Notify,
}

impl Core {
    /// Takes one measured attempt from the budget; false when none left.
    fn take_budget(&self) -> bool {
        match self.budget.get() {
            None => true,
            Some(0) => {
                self.stats.borrow_mut().budget_hit = true;
                false
            }
            Some(n) => {
                self.budget.set(Some(n - 1));
                true
            }
        }
    }

    fn next_request(&self) -> Bytes {
        let reqs = &self.plan.requests;
        let i = self.next_host.get();
        self.next_host.set((i + 1) % reqs.len());
        reqs[i].clone()
    }

    /// One request with its deadline; the connection is dropped on failure.
    async fn exchange(&self, client: &mut Client, deadline: Instant) -> Outcome {
        let req = self.next_request();
        let fut = client.request(&req, self.plan.head_request);
        let outcome = match monoio::time::timeout_at(deadline, fut).await {
            Ok(Ok(status)) => return Outcome::Status(status),
            Ok(Err(Failure::Connect(e))) => {
                tracing::debug!(error = %e, "bench connect failed");
                Outcome::Connect
            }
            Ok(Err(Failure::Other(e))) => {
                tracing::debug!(error = %e, "bench request failed");
                Outcome::Other
            }
            Err(_) => Outcome::Timeout,
        };
        client.reset();
        outcome
    }

    fn record(&self, measured: bool, since: Instant, outcome: Outcome) {
        let slot = &self.plan.progress[self.index];
        match outcome {
            Outcome::Status(s) if s < 500 => &slot.responses,
            _ => &slot.errors,
        }
        .fetch_add(1, Ordering::Relaxed);
        if !measured {
            return;
        }
        let now = Instant::now();
        let mut st = self.stats.borrow_mut();
        st.last_done = Some(now.into_std());
        match outcome {
            Outcome::Status(status) => {
                let us = now.saturating_duration_since(since).as_micros();
                st.hist
                    .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                st.requests += 1;
                *st.status_counts.entry(status).or_insert(0) += 1;
                if status >= 500 {
                    st.errors.status_5xx += 1;
                }
            }
            Outcome::Connect => st.errors.connect += 1,
            Outcome::Timeout => st.errors.timeout += 1,
            Outcome::Other => st.errors.other += 1,
        }
    }
}

/// Decrements the live-task count when a connection task ends, even by
/// panic (the isolated task's future is dropped).
struct LiveGuard(Rc<Core>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let left = self.0.live.get() - 1;
        self.0.live.set(left);
        if left == 0 {
            self.0.all_done.notify();
        }
    }
}

async fn core_main(plan: Arc<Plan>, index: usize, reporter: Reporter) {
    let share = plan.shares[index];
    let core = Rc::new(Core {
        start: Instant::from_std(plan.start),
        measure_start: Instant::from_std(plan.measure_start),
        end: Instant::from_std(plan.end),
        budget: Cell::new(share.budget),
        next_ticket: Cell::new(0),
        next_host: Cell::new(index % plan.requests.len()),
        stats: RefCell::new(CoreStats::new()),
        live: Cell::new(0),
        all_done: Notify::new(),
        plan,
        index,
    });
    for _ in 0..share.conns {
        core.live.set(core.live.get() + 1);
        let guard = LiveGuard(core.clone());
        runtime::spawn_isolated("bench connection", async move {
            let core = guard.0.clone();
            monoio::time::sleep_until(core.start).await;
            match share.pace {
                Some(pace) => open_loop(&core, pace).await,
                None => closed_loop(&core).await,
            }
            drop(guard);
        });
    }
    // Own the tasks until they end: block_on drops unfinished ones.
    while core.live.get() > 0 {
        core.all_done.notified().await;
    }
    let stats = core.stats.replace(CoreStats::new());
    reporter.send(stats);
}

/// Waits a little after failures so that a dead target does not spin.
struct Backoff {
    next: Duration,
    failures: u32,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            failures: 0,
        }
    }

    /// Sleeps after a failed connect, or after repeated other failures.
    async fn after(&mut self, outcome: Outcome) {
        let failures = match outcome {
            Outcome::Connect => self.failures.max(1) + 1,
            Outcome::Other => self.failures + 1,
            Outcome::Status(_) | Outcome::Timeout => 0,
        };
        self.failures = failures;
        if failures < 2 {
            self.next = BACKOFF_MIN;
            return;
        }
        monoio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(BACKOFF_MAX);
    }
}

/// Each connection: send, wait for the full response, repeat.
async fn closed_loop(core: &Core) {
    let mut client = Client::new(core.plan.addr, core.plan.keepalive);
    let mut backoff = Backoff::new();
    loop {
        let now = Instant::now();
        if now >= core.end {
            break;
        }
        let measured = now >= core.measure_start;
        if measured && !core.take_budget() {
            break;
        }
        let outcome = core.exchange(&mut client, now + core.plan.timeout).await;
        core.record(measured, now, outcome);
        backoff.after(outcome).await;
    }
}

/// Each connection takes the next due ticket of its core's schedule when
/// it is free; a late ticket's latency includes the wait.
async fn open_loop(core: &Core, pace: Pace) {
    let mut client = Client::new(core.plan.addr, core.plan.keepalive);
    let mut backoff = Backoff::new();
    loop {
        let k = core.next_ticket.get();
        core.next_ticket.set(k + 1);
        let offset = pace.first + Duration::from_secs_f64(k as f64 * pace.interval_s);
        let intended = core.start + offset;
        if intended >= core.end {
            break;
        }
        let measured = intended >= core.measure_start;
        if measured && !core.take_budget() {
            break;
        }
        // monoio's timer rounds a deadline up to the next millisecond:
        // aim one tick early so that the send is not charged timer lag.
        let wake = intended.checked_sub(TIMER_TICK).unwrap_or(intended);
        if wake > Instant::now() {
            monoio::time::sleep_until(wake).await;
        }
        let sent = Instant::now();
        // Late (no free connection, busy core): latency counts from the
        // intended time. Early: from the actual send.
        let from = sent.min(intended);
        let deadline = intended + core.plan.timeout;
        let outcome = if sent >= deadline {
            // Waited a whole timeout for a free connection.
            Outcome::Timeout
        } else {
            core.exchange(&mut client, deadline).await
        };
        core.record(measured, from, outcome);
        backoff.after(outcome).await;
    }
}

fn merge(label: String, plan: &Plan, cores: Vec<CoreStats>) -> LoadReport {
    let window = plan.end - plan.measure_start;
    let mut hist = new_histogram();
    let mut errors = ErrorCounts::default();
    let mut status_counts = BTreeMap::new();
    let mut requests = 0;
    let mut elapsed = Duration::ZERO;
    for c in cores {
        hist.add(&c.hist).expect("histograms share bounds");
        requests += c.requests;
        errors.connect += c.errors.connect;
        errors.timeout += c.errors.timeout;
        errors.status_5xx += c.errors.status_5xx;
        errors.other += c.errors.other;
        for (s, n) in c.status_counts {
            *status_counts.entry(s).or_insert(0) += n;
        }
        // A core that ran out of budget stopped early: its time is up to
        // its last response; otherwise the whole window.
        let core_elapsed = match (c.budget_hit, c.last_done) {
            (true, Some(t)) => t.saturating_duration_since(plan.measure_start).min(window),
            _ => window,
        };
        elapsed = elapsed.max(core_elapsed);
    }
    let elapsed = elapsed.max(Duration::from_micros(1));
    LoadReport {
        label,
        requests,
        elapsed,
        rps: requests as f64 / elapsed.as_secs_f64(),
        hist,
        errors,
        status_counts,
    }
}

/// "1000", "2.5": a rate without trailing zeros.
pub fn fmt_rate(r: f64) -> String {
    if r.fract() == 0.0 && r.abs() < 1e15 {
        format!("{}", r as i64)
    } else {
        format!("{r:.2}")
    }
}

/// The once-per-second progress line on stderr.
struct Meter {
    start: StdInstant,
    last: StdInstant,
    last_responses: u64,
}

impl Meter {
    fn new(start: StdInstant) -> Self {
        Meter {
            start,
            last: StdInstant::now(),
            last_responses: 0,
        }
    }

    fn tick(&mut self, plan: &Plan) {
        let now = StdInstant::now();
        if now.saturating_duration_since(self.last) < Duration::from_millis(900) {
            return; // a core reported early: keep one line per second
        }
        let (mut responses, mut errors) = (0, 0);
        for slot in &plan.progress {
            responses += slot.responses.load(Ordering::Relaxed);
            errors += slot.errors.load(Ordering::Relaxed);
        }
        let dt = now
            .saturating_duration_since(self.last)
            .as_secs_f64()
            .max(1e-3);
        let rps = (responses - self.last_responses) as f64 / dt;
        let phase = if now < plan.measure_start {
            " (warmup)"
        } else {
            ""
        };
        let t = now.saturating_duration_since(self.start).as_secs_f64();
        let mut err = io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{t:6.1}s{phase}  requests {responses}  rps {rps:.0}  errors {errors}"
        );
        let _ = err.flush();
        self.last = now;
        self.last_responses = responses;
    }

    fn clear(self) {
        let mut err = io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}
