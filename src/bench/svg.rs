//! The latency chart: p50/p90/p99/p99.9 against concurrency or rate, both
//! axes logarithmic; the first series solid, later ones (e.g. `--compare`)
//! dashed.

use std::path::Path;

use plotters::prelude::*;

use super::report::latency_ms;
use super::LoadReport;

const PERCENTILES: [(f64, &str, RGBColor); 4] = [
    (0.5, "p50", RGBColor(31, 119, 180)),
    (0.9, "p90", RGBColor(44, 160, 44)),
    (0.99, "p99", RGBColor(255, 127, 14)),
    (0.999, "p99.9", RGBColor(214, 39, 40)),
];

/// Writes an SVG chart. `xs[i]` is the x value (concurrency or rate) of
/// row `i` of every series; `series` pairs a name (e.g. the target URL)
/// with its rows. Rows without responses are left out of the lines.
pub fn write_svg(
    path: &Path,
    x_label: &str,
    xs: &[f64],
    series: &[(String, Vec<LoadReport>)],
) -> Result<(), String> {
    let lines: Vec<Line> = series
        .iter()
        .enumerate()
        .flat_map(|(si, (name, rows))| {
            PERCENTILES.iter().map(move |&(q, pname, color)| Line {
                label: if series.len() > 1 {
                    format!("{name} {pname}")
                } else {
                    pname.to_string()
                },
                color,
                dashed: si > 0,
                points: xs
                    .iter()
                    .zip(rows)
                    .filter_map(|(&x, r)| Some((x, latency_ms(&r.hist, q)?)))
                    .filter(|&(x, y)| x > 0.0 && y.is_finite())
                    .map(|(x, y)| (x, y.max(0.001)))
                    .collect(),
            })
        })
        .collect();
    let (x_range, y_range) = ranges(xs, &lines);
    draw(path, x_label, x_range, y_range, &lines).map_err(|e| format!("{}: {e}", path.display()))
}

struct Line {
    label: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Log-friendly ranges with some room around the data.
fn ranges(xs: &[f64], lines: &[Line]) -> ((f64, f64), (f64, f64)) {
    let pos = |it: &mut dyn Iterator<Item = f64>| {
        it.filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let (xlo, xhi) = pos(&mut xs.iter().copied());
    let (ylo, yhi) = pos(&mut lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    let widen = |(lo, hi): (f64, f64), default: (f64, f64)| {
        if lo.is_finite() && hi.is_finite() {
            (lo / 1.5, hi * 1.5)
        } else {
            default
        }
    };
    (
        widen((xlo, xhi), (0.5, 2.0)),
        widen((ylo, yhi), (0.1, 10.0)),
    )
}

fn draw(
    path: &Path,
    x_label: &str,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    lines: &[Line],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1100, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    // The legend gets its own column so that it never hides a line.
    let (plot_area, legend_area) = root.split_horizontally(800);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(format!("latency vs {x_label}"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("latency (ms)")
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .draw()?;
    for line in lines.iter().filter(|l| !l.points.is_empty()) {
        let style = line.color.stroke_width(2);
        if line.dashed {
            chart.draw_series(DashedLineSeries::new(
                line.points.iter().copied(),
                8,
                5,
                style,
            ))?;
        } else {
            chart.draw_series(LineSeries::new(line.points.iter().copied(), style))?;
        }
        chart.draw_series(
            line.points
                .iter()
                .map(|&p| Circle::new(p, 3, line.color.filled())),
        )?;
    }
    for (i, line) in lines.iter().enumerate() {
        let y = 60 + 22 * i as i32;
        let style = line.color.stroke_width(2);
        if line.dashed {
            for x in [10, 24] {
                legend_area.draw(&PathElement::new(vec![(x, y), (x + 8, y)], style))?;
            }
        } else {
            legend_area.draw(&PathElement::new(vec![(10, y), (32, y)], style))?;
        }
        legend_area.draw(&Text::new(
            line.label.clone(),
            (40, y - 7),
            ("sans-serif", 13),
        ))?;
    }
    root.present()?;
    Ok(())
}

fn tick(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        let s = format!("{v:.1}");
        s.trim_end_matches(".0").to_string()
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::load::new_histogram;
    use super::super::ErrorCounts;
    use super::*;
    use std::time::Duration;

    fn row(base_us: u64) -> LoadReport {
        let mut hist = new_histogram();
        for i in 0..100 {
            hist.record(base_us + i * base_us / 20).unwrap();
        }
        LoadReport {
            label: "x".into(),
            requests: 100,
            elapsed: Duration::from_secs(1),
            rps: 100.0,
            hist,
            errors: ErrorCounts::default(),
            status_counts: Default::default(),
        }
    }

    #[test]
    fn writes_a_chart_with_both_series() {
        let dir = std::env::temp_dir().join(format!("rt-bench-svg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lat.svg");
        let xs = [1.0, 10.0, 100.0];
        let mut empty = row(1000);
        empty.hist.reset();
        let series = vec![
            (
                "tunnel".to_string(),
                vec![row(1000), row(2000), row(40_000)],
            ),
            ("direct".to_string(), vec![row(500), empty, row(9000)]),
        ];
        write_svg(&path, "concurrency", &xs, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("tunnel p99.9") && svg.contains("direct p50"));
        assert!(svg.contains("latency (ms)") && svg.contains("concurrency"));
        assert!(svg.contains("stroke-dasharray") || svg.matches("<polyline").count() > 8);

        // A single point and an empty run still draw.
        write_svg(
            &path,
            "rate",
            &[500.0],
            &[("a".to_string(), vec![row(100)])],
        )
        .unwrap();
        let mut none = row(1);
        none.hist.reset();
        write_svg(&path, "rate", &[500.0], &[("a".to_string(), vec![none])]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ticks() {
        assert_eq!(tick(1000.0), "1000");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(0.25), "0.25");
    }
}
