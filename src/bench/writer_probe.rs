//! Reads the gateway's `/metrics` around each bench row so the report
//! shows how well the uplink writer batched under that load (frames per
//! writev), next to the latency it produced.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::io::stats::{HistSnapshot, HIST_BUCKETS};

/// Uplink writer counters summed over the gateway's cores.
#[derive(Clone, Debug, Default)]
pub struct WriterSample {
    pub frames: u64,
    pub writevs: u64,
    pub hist: HistSnapshot,
}

/// Fetches and sums the writer counters; `None` if the admin endpoint
/// cannot be read.
pub fn sample(admin: &str) -> Option<WriterSample> {
    let mut s = TcpStream::connect(admin).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(parse(&text))
}

fn value(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sums the per-core series of the Prometheus text.
pub fn parse(text: &str) -> WriterSample {
    let mut out = WriterSample::default();
    // Buckets are cumulative per core: turn them back into counts.
    let mut per_core: std::collections::BTreeMap<String, [Option<u64>; HIST_BUCKETS]> =
        Default::default();
    for line in text.lines() {
        if line.starts_with("ringtunnel_uplink_frames_total{") {
            out.frames += value(line);
        } else if line.starts_with("ringtunnel_uplink_writev_total{") {
            out.writevs += value(line);
        } else if let Some(rest) = line.strip_prefix("ringtunnel_uplink_frames_per_writev_bucket{")
        {
            let core = rest.split('"').nth(1).unwrap_or("").to_string();
            let le = rest
                .split("le=\"")
                .nth(1)
                .and_then(|x| x.split('"').next())
                .unwrap_or("");
            let idx = if le == "+Inf" {
                HIST_BUCKETS - 1
            } else {
                le.parse::<u64>()
                    .map(crate::io::stats::Hist::bucket_of)
                    .unwrap_or(0)
            };
            per_core.entry(core).or_insert([None; HIST_BUCKETS])[idx.min(HIST_BUCKETS - 1)] =
                Some(value(line));
        } else if line.starts_with("ringtunnel_uplink_frames_per_writev_count{") {
            out.hist.count += value(line);
        } else if line.starts_with("ringtunnel_uplink_frames_per_writev_sum{") {
            out.hist.sum += value(line);
        }
    }
    for cum in per_core.values() {
        // A gateway with other bounds may skip some: a missing bound has
        // the cumulative count of the one below it.
        let mut prev = 0;
        for (i, c) in cum.iter().enumerate() {
            let c = c.unwrap_or(prev);
            out.hist.buckets[i] += c.saturating_sub(prev);
            prev = c;
        }
    }
    out
}

/// What happened between two samples, as one report line.
pub fn describe(before: &WriterSample, after: &WriterSample) -> String {
    let mut h = HistSnapshot::default();
    for i in 0..HIST_BUCKETS {
        h.buckets[i] = after.hist.buckets[i].saturating_sub(before.hist.buckets[i]);
    }
    h.count = after.hist.count.saturating_sub(before.hist.count);
    h.sum = after.hist.sum.saturating_sub(before.hist.sum);
    // The max is not kept per interval; bound quantiles by the top bucket.
    h.max = (0..HIST_BUCKETS)
        .rev()
        .find(|&i| h.buckets[i] > 0)
        .map(|i| crate::io::stats::Hist::bucket_bound(i).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let frames = after.frames.saturating_sub(before.frames);
    let writevs = after.writevs.saturating_sub(before.writevs);
    format!(
        "{frames} frames in {writevs} writev calls: mean {:.1} frames/writev, p50 <= {}, p99 <= {}",
        if writevs == 0 {
            0.0
        } else {
            frames as f64 / writevs as f64
        },
        h.quantile(0.5),
        h.quantile(0.99)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_diffs_prometheus_text() {
        let a = "ringtunnel_uplink_frames_total{core=\"0\"} 10\nringtunnel_uplink_frames_total{core=\"1\"} 5\n\
                 ringtunnel_uplink_writev_total{core=\"0\"} 3\nringtunnel_uplink_writev_total{core=\"1\"} 2\n\
                 ringtunnel_uplink_frames_per_writev_bucket{core=\"0\",le=\"1\"} 1\n\
                 ringtunnel_uplink_frames_per_writev_bucket{core=\"0\",le=\"2\"} 1\n\
                 ringtunnel_uplink_frames_per_writev_bucket{core=\"0\",le=\"4\"} 2\n\
                 ringtunnel_uplink_frames_per_writev_bucket{core=\"0\",le=\"8\"} 3\n\
                 ringtunnel_uplink_frames_per_writev_bucket{core=\"0\",le=\"+Inf\"} 3\n\
                 ringtunnel_uplink_frames_per_writev_count{core=\"0\"} 3\n";
        let s = parse(a);
        assert_eq!((s.frames, s.writevs), (15, 5));
        assert_eq!(s.hist.buckets[0], 1);
        assert_eq!(s.hist.buckets[3], 1);
        assert_eq!(s.hist.buckets[7], 1);
        let d = describe(&WriterSample::default(), &s);
        assert!(
            d.starts_with("15 frames in 5 writev calls: mean 3.0"),
            "{d}"
        );
        assert!(d.contains("p50 <= 4"), "{d}");
        assert!(d.contains("p99 <= 8"), "{d}");
    }
}
