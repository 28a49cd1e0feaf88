//! The HTML report: one self-contained page (inline SVG and CSS, no scripts, no network), so
//! it can be attached to an issue or opened from CI artifacts as is.

use std::fmt::Write;
use std::path::Path;

use super::json::{Report, RunResult};
use crate::error::ScenarioError;

const COLORS: [&str; 6] = [
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
];
const W: f64 = 640.0;
const H: f64 = 260.0;
const PAD_L: f64 = 56.0;
const PAD_R: f64 = 16.0;
const PAD_T: f64 = 24.0;
const PAD_B: f64 = 40.0;

/// One line of a chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart with axes, ticks, a legend and vertical markers (faults).
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    markers: &[(f64, String)],
    y_max: Option<f64>,
) -> String {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_min = xs
        .clone()
        .fold(f64::INFINITY, f64::min)
        .min(markers.iter().map(|m| m.0).fold(f64::INFINITY, f64::min));
    let x_max = xs.fold(f64::NEG_INFINITY, f64::max).max(
        markers
            .iter()
            .map(|m| m.0)
            .fold(f64::NEG_INFINITY, f64::max),
    );
    let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
        (x_min, x_max)
    } else if x_min.is_finite() {
        (x_min - 1.0, x_min + 1.0)
    } else {
        (0.0, 1.0)
    };
    let y_top = y_max.unwrap_or_else(|| {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            * 1.1
    });
    let y_top = if y_top > 0.0 { y_top } else { 1.0 };
    let sx = |x: f64| PAD_L + (x - x_min) / (x_max - x_min) * (W - PAD_L - PAD_R);
    let sy = |y: f64| H - PAD_B - y / y_top * (H - PAD_T - PAD_B);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<figure><figcaption>{}</figcaption><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img">"#,
        esc(title)
    );
    for i in 0..=4 {
        let y = y_top * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{PAD_L}" x2="{}" y1="{y0:.1}" y2="{y0:.1}" stroke="#e5e7eb"/><text x="{}" y="{:.1}" text-anchor="end" class="tick">{}</text>"##,
            W - PAD_R,
            PAD_L - 6.0,
            sy(y) + 4.0,
            fmt_num(y),
            y0 = sy(y)
        );
        let x = x_min + (x_max - x_min) * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"#,
            sx(x),
            H - PAD_B + 16.0,
            fmt_num(x)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle" class="axis">{}</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle" class="axis">{}</text>"#,
        (W + PAD_L) / 2.0,
        H - 6.0,
        esc(x_label),
        H / 2.0,
        H / 2.0,
        esc(y_label)
    );
    for (x, label) in markers {
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{PAD_T}" y2="{1}" stroke="#f59e0b" stroke-dasharray="4 3"><title>{2}</title></line>"##,
            sx(*x),
            H - PAD_B,
            esc(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        if s.points.len() <= 40 {
            for &(x, y) in &s.points {
                let _ = write!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    sx(x),
                    sy(y)
                );
            }
        }
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}" class="tick">{}</text>"#,
            PAD_L + 8.0 + 150.0 * i as f64,
            6.0,
            PAD_L + 22.0 + 150.0 * i as f64,
            15.0,
            esc(&s.name)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Horizontal bars, one per `(label, value)`, with the value printed.
fn bar_chart(title: &str, bars: &[(String, f64)], unit: &str) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0);
    let row = 26.0;
    let height = row * bars.len() as f64 + 10.0;
    let mut svg = format!(
        r#"<figure><figcaption>{}</figcaption><svg viewBox="0 0 {W} {height}" width="{W}" height="{height}" role="img">"#,
        esc(title)
    );
    for (i, (label, value)) in bars.iter().enumerate() {
        let y = 5.0 + row * i as f64;
        let width = value / max * (W - 330.0);
        let _ = write!(
            svg,
            r#"<text x="190" y="{:.1}" text-anchor="end" class="tick">{}</text><rect x="196" y="{y:.1}" width="{width:.1}" height="18" fill="{}"/><text x="{:.1}" y="{:.1}" class="tick">{} {unit}</text>"#,
            y + 13.0,
            esc(label),
            COLORS[i % COLORS.len()],
            200.0 + width,
            y + 13.0,
            fmt_num(*value)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Numbers for ticks and labels: short, no needless decimals.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn run_label(run: &RunResult) -> String {
    format!("pool {}", mib(run.pool_bytes))
}

/// Blocks per tier the lookups reported, and what loads delivered: a remote claim is a
/// peer's digest, a remote load is a page that crossed the fabric.
fn tier_hits(run: &RunResult) -> String {
    let b = &run.blocks;
    let memory = b.hit.saturating_sub(b.ssd_hit + b.remote_hit);
    let bars = vec![
        ("lookup: memory".to_string(), memory as f64),
        ("lookup: SSD".to_string(), b.ssd_hit as f64),
        ("lookup: remote (claimed)".to_string(), b.remote_hit as f64),
        ("loaded: all tiers".to_string(), b.loaded as f64),
        ("loaded: remote".to_string(), b.remote_loaded as f64),
    ];
    bar_chart(
        &format!(
            "Blocks hit per tier, {} ({} looked up)",
            run_label(run),
            b.looked_up
        ),
        &bars,
        "blocks",
    )
}

/// Renders the whole report.
pub fn render(report: &Report) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>Scenario <code>{}</code> {}</h1><p>{}</p>",
        esc(&report.scenario),
        if report.passed {
            r#"<span class="ok">checks passed</span>"#
        } else {
            r#"<span class="bad">CHECKS FAILED</span>"#
        },
        esc(&report.description)
    );
    let _ = write!(
        body,
        "<p class=\"meta\">harness {} · git {} · node {} ({}) · generated at unix {}{}</p>",
        esc(&report.version.harness),
        esc(report.version.git_commit.as_deref().unwrap_or("unknown")),
        esc(report.version.node_version.as_deref().unwrap_or("?")),
        esc(&report.version.node_binary),
        report.generated_unix_s,
        report
            .request_limit
            .map(|n| format!(" · first {n} requests"))
            .unwrap_or_default()
    );
    body.push_str("<h2>Summary</h2><table><tr><th>pool / node</th><th>nodes × engines</th><th>routing</th><th>requests</th><th>block hit ratio</th><th>token hit ratio</th><th>TTFT mean (model)</th><th>cold TTFT</th><th>speedup</th><th>p99 lookup</th><th>corrupt loads</th><th>leaked pages</th><th>faults ok / failed / n.a.</th><th>wall s</th></tr>");
    for run in &report.runs {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{} × {}</td><td>{}</td><td>{}</td><td>{:.2}%</td><td>{:.2}%</td><td>{:.0} ms</td><td>{:.0} ms</td><td>{:.2}×</td><td>{:.0} µs</td><td>{}</td><td>{}</td><td>{} / {} / {}</td><td>{:.1}</td></tr>",
            mib(run.pool_bytes),
            run.nodes,
            run.engines / run.nodes.max(1),
            esc(&run.routing),
            run.requests,
            run.block_hit_ratio * 100.0,
            run.token_hit_ratio * 100.0,
            run.ttft.mean_ms,
            run.ttft.cold_mean_ms,
            run.ttft.speedup,
            run.latency.lookup_p99_us,
            run.checks.corrupt_loads,
            run.checks.leaked_pages,
            run.checks.faults_recovered,
            run.checks.faults_failed,
            run.checks.faults_skipped,
            run.wall_s
        );
    }
    body.push_str("</table>");

    let markers: Vec<(f64, String)> = report
        .runs
        .first()
        .map(|run| {
            run.faults
                .iter()
                .map(|f| (f.at_ms as f64 / 1e3, format!("{} {}", f.kind, f.target)))
                .collect()
        })
        .unwrap_or_default();
    let over_time: Vec<Series> = report
        .runs
        .iter()
        .map(|run| Series {
            name: run_label(run),
            points: run
                .timeline
                .iter()
                .filter(|b| b.looked_up > 0)
                .map(|b| (b.start_s, b.hit_ratio * 100.0))
                .collect(),
        })
        .collect();
    body.push_str("<h2>Hit ratio over time</h2>");
    body.push_str(&line_chart(
        "Block hit ratio per time bucket (by arrival); dashed: faults",
        "virtual time (s)",
        "hit ratio (%)",
        &over_time,
        &markers,
        Some(100.0),
    ));
    if report.runs.len() > 1 {
        let sweep = Series {
            name: "block hit ratio".into(),
            points: report
                .runs
                .iter()
                .map(|r| {
                    (
                        r.pool_bytes as f64 / f64::from(1u32 << 20),
                        r.block_hit_ratio * 100.0,
                    )
                })
                .collect(),
        };
        body.push_str("<h2>Hit ratio vs capacity</h2>");
        body.push_str(&line_chart(
            "Hit ratio against pool size per node",
            "pool per node (MiB)",
            "hit ratio (%)",
            &[sweep],
            &[],
            Some(100.0),
        ));
    }
    body.push_str("<h2>TTFT model</h2><p>Per request: measured lookup + load round trips, plus the modeled transfer of the hit KV at the engine's load bandwidth, plus the modeled prefill of the missed tokens. Queueing is not included. Cold: every token prefilled.</p>");
    for run in &report.runs {
        let series = [
            Series {
                name: "with PegaFlow".into(),
                points: run.ttft.cdf.iter().map(|p| (p[0], p[1])).collect(),
            },
            Series {
                name: "cold".into(),
                points: run.ttft.cold_cdf.iter().map(|p| (p[0], p[1])).collect(),
            },
        ];
        body.push_str(&line_chart(
            &format!("TTFT percentiles, {} (mean {:.0} ms vs cold {:.0} ms, p50 {:.0}, p90 {:.0}, p99 {:.0} ms)", run_label(run), run.ttft.mean_ms, run.ttft.cold_mean_ms, run.ttft.p50_ms, run.ttft.p90_ms, run.ttft.p99_ms),
            "percentile",
            "TTFT (ms)",
            &series,
            &[],
            None,
        ));
    }
    body.push_str("<h2>Hits per tier</h2>");
    for run in &report.runs {
        body.push_str(&tier_hits(run));
    }
    body.push_str("<h2>Bytes moved per tier</h2>");
    for run in &report.runs {
        let t = &run.tiers;
        let bars = vec![
            ("memory: saved".to_string(), t.memory_saved_bytes as f64),
            ("memory: loaded".to_string(), t.memory_loaded_bytes as f64),
            ("SSD: written".to_string(), t.ssd_written_bytes as f64),
            ("SSD: read".to_string(), t.ssd_read_bytes as f64),
            (
                "remote: fetched from peers".to_string(),
                t.remote_fetched_bytes as f64,
            ),
        ];
        body.push_str(&bar_chart(
            &format!(
                "Measured on the nodes (simulated {}-byte pages), {}",
                run.page_bytes,
                run_label(run)
            ),
            &bars,
            "B",
        ));
        let _ = write!(
            body,
            "<p>Modeled for the engine's model shape: {} loaded instead of recomputing {} tokens, {} of them from peers over the network; evictions {}; SSD checksum failures {}; SSD segments dropped for space {}; fabric: {} pages served to peers, {} false positives, {} failed fetches.</p>",
            fmt_num(t.modeled_loaded_bytes as f64) + "B",
            fmt_num(t.modeled_recomputed_tokens as f64),
            fmt_num(t.modeled_remote_bytes as f64) + "B",
            t.evictions,
            t.ssd_checksum_failures,
            t.ssd_segments_dropped,
            t.remote_served_pages,
            t.remote_false_positives,
            t.remote_fetch_failures
        );
    }
    body.push_str("<h2>Faults</h2>");
    for run in &report.runs {
        if run.faults.is_empty() {
            continue;
        }
        let _ = write!(body, "<h3>{}</h3><table><tr><th>at (ms)</th><th>fault</th><th>target</th><th>action</th><th>effect</th><th>recovered</th></tr>", run_label(run));
        for f in &run.faults {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                f.at_ms,
                esc(&f.kind),
                esc(&f.target),
                esc(&f.action),
                esc(&f.effect),
                match f.recovered {
                    Some(true) => r#"<span class="ok">yes</span>"#,
                    Some(false) => r#"<span class="bad">NO</span>"#,
                    None => "n/a",
                }
            );
        }
        let c = &run.checks;
        let _ = write!(
            body,
            "</table><p>Checks: corrupt loads {}, leaked pages {}, acknowledged blocks {} (checked after faults {}, lost {}).</p>",
            c.corrupt_loads, c.leaked_pages, c.acked_blocks, c.acked_checked, c.acked_lost
        );
    }
    if report.runs.iter().all(|r| r.faults.is_empty()) {
        body.push_str("<p>No faults in this scenario.</p>");
    }
    let _ = write!(
        body,
        "<h2>Scenario file</h2><pre>{}</pre>",
        esc(&report.scenario_toml)
    );
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>PegaFlow scenario {}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#111827;padding:0 1em}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #d1d5db;padding:4px 6px;text-align:left;vertical-align:top}}
th{{background:#f3f4f6}}.ok{{color:#15803d;font-weight:600}}.bad{{color:#b91c1c;font-weight:700}}
.meta{{color:#6b7280;font-size:13px}}
figure{{margin:1em 0}}figcaption{{font-weight:600;font-size:14px}}.tick{{font-size:11px;fill:#374151}}.axis{{font-size:12px;fill:#111827}}
pre{{background:#f3f4f6;padding:1em;overflow-x:auto;font-size:12px}}
</style></head><body>{body}</body></html>
"#,
        esc(&report.scenario)
    )
}

/// Writes the rendered report.
pub fn write(report: &Report, path: &Path) -> Result<(), ScenarioError> {
    std::fs::write(path, render(report))
        .map_err(ScenarioError::io(format!("write {}", path.display())))
}
