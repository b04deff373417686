//! A small timing harness for `harness = false` benches: no dependencies.
//! Lives in `benches/harness/mod.rs` (not `benches/harness.rs`) because
//! cargo makes every `benches/*.rs` a bench target; use it with `mod harness;`.
//!
//! Each case is calibrated so that one sample takes about `SAMPLE_TARGET`,
//! warmed up, then timed over several samples; the table shows the median
//! ns per op (and min / max across samples, so noise is visible) plus a
//! throughput derived from the median.
//!
//! `cargo bench -- FILTER` runs only the cases whose name contains FILTER;
//! `cargo bench -- --quick` takes fewer, shorter samples.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// What one op processes, for the throughput column.
#[derive(Clone, Copy)]
pub enum Unit {
    /// Bytes per op: throughput shown in MiB/s or GiB/s.
    Bytes(u64),
    /// Items per op (frames, requests, ...): shown in M items/s.
    Items(u64, &'static str),
}

pub struct Row {
    pub name: String,
    pub median_ns: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    pub unit: Unit,
}

pub struct Bench {
    filter: Option<String>,
    samples: usize,
    sample_target: Duration,
    warmup: Duration,
    rows: Vec<Row>,
}

impl Bench {
    /// Reads the filter and `--quick` from the command line; ignores the
    /// flags cargo passes (`--bench`).
    pub fn from_args() -> Self {
        let mut filter = None;
        let mut quick = false;
        for a in std::env::args().skip(1) {
            match a.as_str() {
                "--bench" | "--nocapture" | "--test" => {}
                "--quick" => quick = true,
                s if s.starts_with('-') => {}
                s => filter = Some(s.to_string()),
            }
        }
        Bench {
            filter,
            samples: if quick { 5 } else { 11 },
            sample_target: Duration::from_millis(if quick { 20 } else { 60 }),
            warmup: Duration::from_millis(if quick { 30 } else { 150 }),
            rows: Vec::new(),
        }
    }

    /// Times `f`, one call = one op. Whatever `f` returns is passed through
    /// `black_box` so the work cannot be optimised away.
    pub fn run<T, F: FnMut() -> T>(&mut self, name: &str, unit: Unit, mut f: F) {
        if let Some(flt) = &self.filter {
            if !name.contains(flt.as_str()) {
                return;
            }
        }
        // Warm up (caches, branch predictors, allocator) and calibrate.
        let start = Instant::now();
        let mut warm_iters: u64 = 0;
        while start.elapsed() < self.warmup {
            black_box(f());
            warm_iters += 1;
        }
        let per_op = start.elapsed().as_nanos() as f64 / warm_iters.max(1) as f64;
        let iters = ((self.sample_target.as_nanos() as f64 / per_op.max(1.0)) as u64).max(1);

        let mut samples = Vec::with_capacity(self.samples);
        for _ in 0..self.samples {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            samples.push(t.elapsed().as_nanos() as f64 / iters as f64);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let row = Row {
            name: name.to_string(),
            median_ns: samples[samples.len() / 2],
            min_ns: samples[0],
            max_ns: samples[samples.len() - 1],
            unit,
        };
        println!("{}", format_row(&row));
        self.rows.push(row);
    }

    pub fn print_header(&self) {
        println!(
            "{:<52} {:>10} {:>10} {:>10} {:>16}",
            "name", "ns/op", "min", "max", "throughput"
        );
    }

    pub fn finish(self) -> Vec<Row> {
        println!(
            "({} samples per case, ~{} ms each, after {} ms warmup; ns/op = median)",
            self.samples,
            self.sample_target.as_millis(),
            self.warmup.as_millis()
        );
        self.rows
    }
}

pub fn format_row(r: &Row) -> String {
    format!(
        "{:<52} {:>10} {:>10} {:>10} {:>16}",
        r.name,
        fmt_ns(r.median_ns),
        fmt_ns(r.min_ns),
        fmt_ns(r.max_ns),
        throughput(r.unit, r.median_ns)
    )
}

fn fmt_ns(ns: f64) -> String {
    if ns < 10.0 {
        format!("{ns:.2}")
    } else if ns < 1000.0 {
        format!("{ns:.1}")
    } else {
        format!("{ns:.0}")
    }
}

fn throughput(unit: Unit, ns: f64) -> String {
    let per_sec = 1e9 / ns;
    match unit {
        Unit::Bytes(b) => {
            let bps = b as f64 * per_sec;
            if bps >= (1u64 << 30) as f64 {
                format!("{:.2} GiB/s", bps / (1u64 << 30) as f64)
            } else {
                format!("{:.1} MiB/s", bps / (1u64 << 20) as f64)
            }
        }
        Unit::Items(n, what) => format!("{:.2} M{what}/s", n as f64 * per_sec / 1e6),
    }
}
