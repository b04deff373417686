//! Presenting results: the text table, the side-by-side comparison and the
//! JSON file (written by hand; the shape is documented on [`write_json`]).

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::Path;

use hdrhistogram::Histogram;

use super::LoadReport;

/// Quantiles written to the JSON percentile series.
pub const JSON_QUANTILES: [f64; 14] = [
    0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0,
];

/// Latency at quantile `q` in milliseconds; `None` for an empty histogram.
pub fn latency_ms(hist: &Histogram<u64>, q: f64) -> Option<f64> {
    (!hist.is_empty()).then(|| hist.value_at_quantile(q) as f64 / 1000.0)
}

fn ms_cell(hist: &Histogram<u64>, q: f64) -> String {
    latency_ms(hist, q).map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

fn errors_cell(r: &LoadReport) -> String {
    let e = &r.errors;
    format!("{}/{}/{}/{}", e.connect, e.timeout, e.status_5xx, e.other)
}

fn label_width(labels: impl Iterator<Item = usize>) -> usize {
    labels.max().unwrap_or(0).max(5)
}

/// One line per row: label, requests, RPS, p50, p90, p99, p99.9, max
/// (ms, 2 decimals) and errors as connect/timeout/5xx/other.
pub fn format_table(rows: &[LoadReport]) -> String {
    let w = label_width(rows.iter().map(|r| r.label.len()));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w$} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}  errors c/t/5xx/o",
        "label", "requests", "RPS", "p50", "p90", "p99", "p99.9", "max"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<w$} {:>10} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
            r.label,
            r.requests,
            r.rps,
            ms_cell(&r.hist, 0.5),
            ms_cell(&r.hist, 0.9),
            ms_cell(&r.hist, 0.99),
            ms_cell(&r.hist, 0.999),
            ms_cell(&r.hist, 1.0),
            errors_cell(r),
        );
    }
    out.push_str("latencies in ms; errors = connect/timeout/5xx/other\n");
    out
}

fn ratio_cell(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        let r = a / b;
        // Keep two significant digits for small ratios.
        if r != 0.0 && r < 0.1 {
            format!("{r:.4}x")
        } else {
            format!("{r:.2}x")
        }
    } else {
        "-".to_string()
    }
}

fn delta_cell(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        // Round first so that a tiny negative difference is not "-0.00".
        (Some(a), Some(b)) => format!("{:+.2}", ((a - b) * 100.0).round() / 100.0 + 0.0),
        _ => "-".to_string(),
    }
}

/// Side by side: for each row the RPS and p50/p99 of A and B, then
/// RPS A/B, p50 A-B and p99 A-B (ms) and p50 A/B.
pub fn format_comparison(rows: &[(LoadReport, LoadReport)], a_name: &str, b_name: &str) -> String {
    let w = label_width(rows.iter().map(|(a, _)| a.label.len()));
    let mut out = String::new();
    let _ = writeln!(out, "A = {a_name}\nB = {b_name}");
    let _ = writeln!(
        out,
        "{:<w$} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<14} B errors",
        "label",
        "A rps",
        "B rps",
        "rps A/B",
        "A p50",
        "B p50",
        "p50 A-B",
        "p50 A/B",
        "A p99",
        "B p99",
        "p99 A-B",
        "A errors"
    );
    for (a, b) in rows {
        let (a50, b50) = (latency_ms(&a.hist, 0.5), latency_ms(&b.hist, 0.5));
        let (a99, b99) = (latency_ms(&a.hist, 0.99), latency_ms(&b.hist, 0.99));
        let _ = writeln!(
            out,
            "{:<w$} {:>10.1} {:>10.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<14} {}",
            a.label,
            a.rps,
            b.rps,
            ratio_cell(a.rps, b.rps),
            ms_cell(&a.hist, 0.5),
            ms_cell(&b.hist, 0.5),
            delta_cell(a50, b50),
            ratio_cell(a50.unwrap_or(f64::NAN), b50.unwrap_or(f64::NAN)),
            ms_cell(&a.hist, 0.99),
            ms_cell(&b.hist, 0.99),
            delta_cell(a99, b99),
            errors_cell(a),
            errors_cell(b),
        );
    }
    out.push_str(
        "latencies and deltas in ms; ratios are A/B; errors = connect/timeout/5xx/other\n",
    );
    out
}

/// Writes `{"rows": [ROW...], "compare": [ROW...] | null}` where ROW is
/// `{"label", "requests", "elapsed_s", "rps", "latency_ms": {"min", "mean",
/// "p50", "p90", "p99", "p99_9", "max"}, "errors": {"connect", "timeout",
/// "status_5xx", "other", "total"}, "status_counts": {"200": n, ...},
/// "percentiles": [{"q": percent, "ms": latency}, ...]}`. Latencies of an
/// empty histogram are `null`. `compare[i]` is the second target's row i.
pub fn write_json(
    path: &Path,
    rows: &[LoadReport],
    compare: Option<&[LoadReport]>,
) -> io::Result<()> {
    let mut out = String::from("{\n  \"rows\": ");
    rows_json(&mut out, rows);
    out.push_str(",\n  \"compare\": ");
    match compare {
        Some(c) => rows_json(&mut out, c),
        None => out.push_str("null"),
    }
    out.push_str("\n}\n");
    let mut f = std::fs::File::create(path)?;
    f.write_all(out.as_bytes())?;
    f.flush()
}

fn rows_json(out: &mut String, rows: &[LoadReport]) {
    out.push('[');
    for (i, r) in rows.iter().enumerate() {
        out.push_str(if i == 0 { "\n    " } else { ",\n    " });
        row_json(out, r);
    }
    out.push_str(if rows.is_empty() { "]" } else { "\n  ]" });
}

fn row_json(out: &mut String, r: &LoadReport) {
    let h = &r.hist;
    let lat = |q: f64| num(latency_ms(h, q));
    let mean = (!h.is_empty()).then(|| h.mean() / 1000.0);
    let e = &r.errors;
    out.push_str("{\"label\": ");
    push_str_json(out, &r.label);
    let _ = write!(
        out,
        ", \"requests\": {}, \"elapsed_s\": {}, \"rps\": {}, \"latency_ms\": {{\"min\": {}, \
         \"mean\": {}, \"p50\": {}, \"p90\": {}, \"p99\": {}, \"p99_9\": {}, \"max\": {}}}, \
         \"errors\": {{\"connect\": {}, \"timeout\": {}, \"status_5xx\": {}, \"other\": {}, \
         \"total\": {}}}, \"status_counts\": {{",
        r.requests,
        num(Some(r.elapsed.as_secs_f64())),
        num(Some(r.rps)),
        lat(0.0),
        num(mean),
        lat(0.5),
        lat(0.9),
        lat(0.99),
        lat(0.999),
        lat(1.0),
        e.connect,
        e.timeout,
        e.status_5xx,
        e.other,
        e.total()
    );
    for (i, (status, n)) in r.status_counts.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(out, "{sep}\"{status}\": {n}");
    }
    out.push_str("}, \"percentiles\": [");
    for (i, q) in JSON_QUANTILES.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(
            out,
            "{sep}{{\"q\": {}, \"ms\": {}}}",
            num(Some(q * 100.0)),
            lat(*q)
        );
    }
    out.push_str("]}");
}

/// A JSON number (finite, up to 3 decimals, trailing zeros trimmed) or null.
fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => {
            let s = format!("{v:.3}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            if s == "-0" {
                "0".to_string()
            } else {
                s.to_string()
            }
        }
        _ => "null".to_string(),
    }
}

/// A JSON string literal (`<` escaped too, so a string can never close
/// an HTML page's script).
pub(crate) fn push_str_json(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '<' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::super::load::new_histogram;
    use super::super::ErrorCounts;
    use super::*;
    use std::time::Duration;

    fn report(label: &str, lat_us: &[u64]) -> LoadReport {
        let mut hist = new_histogram();
        for &v in lat_us {
            hist.record(v).unwrap();
        }
        LoadReport {
            label: label.to_string(),
            requests: lat_us.len() as u64,
            elapsed: Duration::from_secs(2),
            rps: lat_us.len() as f64 / 2.0,
            hist,
            errors: ErrorCounts {
                connect: 1,
                timeout: 2,
                status_5xx: 3,
                other: 4,
            },
            status_counts: [(200, 7), (503, 3)].into_iter().collect(),
        }
    }

    #[test]
    fn table_has_rows_and_columns() {
        let rows = [report("c=1", &[1000, 2000, 35_000]), report("c=1000", &[])];
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        for col in [
            "label", "requests", "RPS", "p50", "p90", "p99", "p99.9", "max", "errors",
        ] {
            assert!(lines[0].contains(col), "{col} missing in {t}");
        }
        assert!(lines[1].starts_with("c=1 "), "{t}");
        assert!(lines[1].contains(" 3 ") && lines[1].contains("1.5"), "{t}");
        assert!(
            lines[1].contains("2.00") && lines[1].contains("35.01"),
            "{t}"
        );
        assert!(lines[1].ends_with("1/2/3/4"), "{t}");
        assert!(
            lines[2].starts_with("c=1000") && lines[2].contains(" - "),
            "{t}"
        );
        assert_eq!(
            ErrorCounts {
                connect: 1,
                timeout: 2,
                status_5xx: 3,
                other: 4
            }
            .total(),
            10
        );
    }

    #[test]
    fn comparison_has_ratios() {
        let rows = [(report("c=10", &[4000; 4]), report("c=10", &[2000; 2]))];
        let t = format_comparison(&rows, "http://tunnel", "http://direct");
        assert!(
            t.contains("A = http://tunnel") && t.contains("B = http://direct"),
            "{t}"
        );
        let line = t.lines().find(|l| l.starts_with("c=10")).unwrap();
        // rps 2.0 vs 1.0, p50 4.00 vs 2.00 ms.
        assert!(line.contains("2.00x"), "{line}");
        assert!(line.contains("+2.00"), "{line}");
        assert!(line.contains("4.00") && line.contains("2.00"), "{line}");
    }

    #[test]
    fn json_is_well_formed() {
        let dir = std::env::temp_dir().join(format!("rt-bench-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.json");
        let mut odd = report("c=\"1\"\n", &[1500]);
        odd.rps = f64::NAN;
        write_json(
            &path,
            &[odd, report("c=2", &[])],
            Some(&[report("x", &[10])]),
        )
        .unwrap();
        let s = std::fs::read_to_string(&path).unwrap();
        assert!(s.contains("\"label\": \"c=\\\"1\\\"\\n\""), "{s}");
        assert!(s.contains("\"rps\": null"), "{s}");
        assert!(s.contains("\"p50\": 1.5"), "{s}");
        assert!(
            s.contains("\"status_counts\": {\"200\": 7, \"503\": 3}"),
            "{s}"
        );
        assert!(s.contains("{\"q\": 99.999, \"ms\": 1.5}"), "{s}");
        assert!(s.contains("\"total\": 10"), "{s}");
        assert!(s.contains("\"compare\": [\n    {\"label\": \"x\""), "{s}");
        assert_balanced(&s);

        write_json(&path, &[], None).unwrap();
        let s = std::fs::read_to_string(&path).unwrap();
        assert_eq!(s, "{\n  \"rows\": [],\n  \"compare\": null\n}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Brackets balance outside strings: a cheap structural check.
    fn assert_balanced(s: &str) {
        let (mut depth, mut in_str, mut escaped) = (0i32, false, false);
        for c in s.chars() {
            match (in_str, escaped, c) {
                (true, true, _) => escaped = false,
                (true, false, '\\') => escaped = true,
                (true, false, '"') => in_str = false,
                (false, _, '"') => in_str = true,
                (false, _, '{' | '[') => depth += 1,
                (false, _, '}' | ']') => depth -= 1,
                _ => {}
            }
            assert!(depth >= 0);
        }
        assert_eq!((depth, in_str), (0, false));
    }

    #[test]
    fn numbers() {
        assert_eq!(num(Some(1.5)), "1.5");
        assert_eq!(num(Some(2.0)), "2");
        assert_eq!(num(Some(0.0001)), "0");
        assert_eq!(num(Some(f64::INFINITY)), "null");
        assert_eq!(num(None), "null");
    }
}
