//! `bench-report`: turns the results `make bench` writes (`target/bench/load.jsonl`, one JSON
//! object per measurement) into Markdown tables on stdout and SVG plots:
//! `throughput.svg` (flows per second against concurrency, per connection mode),
//! `latency.svg` (p50 and p99 against concurrency) and `handshakes.svg` (new connections per
//! broker CPU-second for each TLS setup and server certificate).
//!
//! ```sh
//! bench-report target/bench/load.jsonl docs/bench
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde_json::Value;

const MODES: [(&str, RGBColor); 3] = [
    ("keepalive", RGBColor(0x1f, 0x77, 0xb4)),
    ("resumed", RGBColor(0xff, 0x7f, 0x0e)),
    ("newconn", RGBColor(0x2c, 0xa0, 0x2c)),
];

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_f64().unwrap_or(0.0)
}

/// (concurrency, value) for one mode of the sweep, in order of concurrency.
fn series(sweep: &[&Value], mode: &str, path: &[&str]) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = sweep
        .iter()
        .filter(|v| v["mode"] == mode)
        .map(|v| (f(v, &["concurrency"]), f(v, path)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// One line of a plot: its label, colour, whether it is the thin (secondary) kind, points.
struct Line {
    label: String,
    color: RGBColor,
    thin: bool,
    points: Vec<(f64, f64)>,
}

fn lines_plot(file: &Path, caption: &str, y_desc: &str, lines: &[Line]) -> anyhow::Result<()> {
    let max_x = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let max_y = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(file, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..max_x).log_scale(), 0.0..max_y.max(1.0))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("concurrent flows")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for Line {
        label,
        color,
        thin,
        points,
    } in lines
    {
        let style = ShapeStyle::from(color).stroke_width(if *thin { 1 } else { 2 });
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(
            points
                .iter()
                .map(|p| Circle::new(*p, 3, ShapeStyle::from(color).filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn handshake_plot(file: &Path, rows: &[&Value]) -> anyhow::Result<()> {
    let mut labels: Vec<String> = Vec::new();
    for r in rows {
        let l = r["label"].as_str().unwrap_or("?").to_string();
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let certs = [
        ("ecdsa-p256", RGBColor(0x1f, 0x77, 0xb4)),
        ("rsa-2048", RGBColor(0xd6, 0x27, 0x28)),
    ];
    let max_y = rows
        .iter()
        .map(|r| f(r, &["connections_per_broker_cpu_second"]))
        .fold(0.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(file, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = labels.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "New TLS connections per broker CPU-second (handshake + one GET)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n, 0.0..max_y.max(1.0))?;
    let names = labels.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(labels.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("connections per broker CPU-second")
        .draw()?;
    for (k, (cert, color)) in certs.iter().enumerate() {
        let bars: Vec<_> = rows
            .iter()
            .filter(|r| r["certificate"] == *cert)
            .filter_map(|r| {
                let i = labels.iter().position(|l| r["label"] == l.as_str())? as f64;
                let x0 = i + 0.1 + 0.4 * k as f64;
                let y = f(r, &["connections_per_broker_cpu_second"]);
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + 0.38, y)],
                    ShapeStyle::from(color).filled(),
                ))
            })
            .collect();
        chart.draw_series(bars)?.label(*cert).legend(move |(x, y)| {
            Rectangle::new(
                [(x, y - 5), (x + 14, y + 5)],
                ShapeStyle::from(color).filled(),
            )
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out] = args.as_slice() else {
        bail!("usage: bench-report RESULTS.jsonl OUTPUT-DIR");
    };
    let text = std::fs::read_to_string(input).with_context(|| input.clone())?;
    let results: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{input}: one JSON object per line"))?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let kind = |k: &str| -> Vec<&Value> { results.iter().filter(|v| v["kind"] == k).collect() };
    let floor = kind("floor")
        .first()
        .map(|v| f(v, &["floor_per_second"]))
        .context("no floor measurement")?;
    println!("Crypto floor on the broker's core: {floor:.0} attestations/s\n");

    let sweep = kind("sweep");
    println!(
        "| mode | concurrency | flows/s | per broker CPU-second | vs floor | p50 ms | p90 ms | p99 ms | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for v in kind("flows").iter().chain(sweep.iter()) {
        let per_cpu = f(v, &["flows_per_broker_cpu_second"]);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2}× | {:.1} | {:.1} | {:.1} | {} |",
            v["mode"].as_str().unwrap_or("?"),
            v["concurrency"],
            f(v, &["flows_per_second"]),
            per_cpu,
            per_cpu / floor,
            f(v, &["latency_ms", "p50"]),
            f(v, &["latency_ms", "p90"]),
            f(v, &["latency_ms", "p99"]),
            v["errors"],
        );
    }
    for v in kind("halfload") {
        let p99 = f(v, &["latency_ms", "p99"]);
        println!(
            "\nOpen loop at half the maximum keep-alive throughput ({:.0} flows/s asked, {:.0} achieved, \
             {} due flows never started): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (target ≤ 5 ms: {}).",
            f(v, &["rate"]),
            f(v, &["flows_per_second"]),
            v["missed"],
            f(v, &["latency_ms", "p50"]),
            f(v, &["latency_ms", "p90"]),
            p99,
            if p99 <= 5.0 { "met" } else { "not met" },
        );
    }
    let cores = kind("cores");
    if !cores.is_empty() {
        println!("\n| broker cores | flows/s | per broker CPU-second | p99 ms |");
        println!("|---|---|---|---|");
        for v in &cores {
            println!(
                "| {} | {:.0} | {:.0} | {:.1} |",
                v["broker_cores"],
                f(v, &["flows_per_second"]),
                f(v, &["flows_per_broker_cpu_second"]),
                f(v, &["latency_ms", "p99"]),
            );
        }
    }
    let kbs = kind("kbs");
    if !kbs.is_empty() {
        println!(
            "\n| protocol (keep-alive) | concurrency | flows/s | per broker CPU-second | vs native | p50 ms | p99 ms | errors |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let native = kbs
            .iter()
            .find(|v| v["protocol"] == "native")
            .map(|v| f(v, &["flows_per_broker_cpu_second"]))
            .unwrap_or(0.0);
        for v in &kbs {
            let per_cpu = f(v, &["flows_per_broker_cpu_second"]);
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2}× | {:.1} | {:.1} | {} |",
                v["protocol"].as_str().unwrap_or("?"),
                v["concurrency"],
                f(v, &["flows_per_second"]),
                per_cpu,
                if native > 0.0 { per_cpu / native } else { 0.0 },
                f(v, &["latency_ms", "p50"]),
                f(v, &["latency_ms", "p99"]),
                v["errors"],
            );
        }
    }
    let providers = kind("provider");
    if !providers.is_empty() {
        println!(
            "\n| master key provider | ready after ms | flows/s | per broker CPU-second | p99 ms |"
        );
        println!("|---|---|---|---|---|");
        for v in &providers {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.1} |",
                v["provider"].as_str().unwrap_or("?"),
                v["startup_ms"],
                f(v, &["flows_per_second"]),
                f(v, &["flows_per_broker_cpu_second"]),
                f(v, &["latency_ms", "p99"]),
            );
        }
    }
    let measures = kind("measure");
    if !measures.is_empty() {
        println!("\n| reference measurement | broker measure ms | sev-snp-measure ms | speed-up |");
        println!("|---|---|---|---|");
        for v in &measures {
            println!(
                "| {} | {:.0} | {:.0} | {:.2}× |",
                v["inputs"].as_str().unwrap_or("?"),
                f(v, &["broker_ms"]),
                f(v, &["sev_snp_measure_ms"]),
                f(v, &["speedup"]),
            );
        }
    }
    let rotations = kind("rotation");
    if !rotations.is_empty() {
        println!("\n| data-key rotation | records | batch | seconds | records/s |");
        println!("|---|---|---|---|---|");
        for v in &rotations {
            println!(
                "| {} | {} | {} | {:.1} | {:.0} |",
                v["engine"].as_str().unwrap_or("?"),
                v["records"],
                v["batch"],
                f(v, &["seconds"]),
                f(v, &["records_per_second"]),
            );
        }
    }
    let shakes = kind("handshake");
    if !shakes.is_empty() {
        println!(
            "\n| server certificate | setup | connections/s | per broker CPU-second | handshake p50 ms | first answer p50 ms | p99 ms | resumed |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for v in &shakes {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {}/{} |",
                v["certificate"].as_str().unwrap_or("?"),
                v["label"].as_str().unwrap_or("?"),
                f(v, &["connections_per_second"]),
                f(v, &["connections_per_broker_cpu_second"]),
                f(v, &["handshake_ms", "p50"]),
                f(v, &["first_answer_ms", "p50"]),
                f(v, &["first_answer_ms", "p99"]),
                v["resumed"],
                v["connections"],
            );
        }
        handshake_plot(&out.join("handshakes.svg"), &shakes)?;
    }

    let throughput: Vec<_> = MODES
        .iter()
        .map(|(m, c)| Line {
            label: m.to_string(),
            color: *c,
            thin: false,
            points: series(&sweep, m, &["flows_per_second"]),
        })
        .collect();
    lines_plot(
        &out.join("throughput.svg"),
        "Challenge + attest flows per second (broker on one core)",
        "flows per second",
        &throughput,
    )?;
    let mut latency = Vec::new();
    for (m, c) in MODES {
        latency.push(Line {
            label: format!("{m} p50"),
            color: c,
            thin: false,
            points: series(&sweep, m, &["latency_ms", "p50"]),
        });
        latency.push(Line {
            label: format!("{m} p99"),
            color: c,
            thin: true,
            points: series(&sweep, m, &["latency_ms", "p99"]),
        });
    }
    lines_plot(
        &out.join("latency.svg"),
        "Flow latency (challenge + attest), ms",
        "milliseconds",
        &latency,
    )?;
    println!("\nplots: {}", out.display());
    Ok(())
}
