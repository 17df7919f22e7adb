//! Charts of runs, as PNG files (plotters): for each run, the guests' memory by state stacked
//! per VM over time, with the budget, minFree and the state thresholds as lines and the
//! memory states as shaded bands; for each scenario, the host memory of every policy.

use std::path::Path;
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::runner::Run;
use crate::host::report::{HostReport, VmReport, STATE_NAMES};

/// Size of a run's chart, pixels.
pub const RUN_CHART: (u32, u32) = (1200, 700);
/// Size of a scenario's comparison chart, pixels.
pub const COMPARE_CHART: (u32, u32) = (1200, 600);

/// The labels' font, embedded so that charts need no fonts on the host.
static FONT: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/lab/fonts/DejaVuSans.ttf"));
static REGISTER: Once = Once::new();

/// Errors drawing a chart.
#[derive(Debug, thiserror::Error)]
#[error("chart {path}: {msg}")]
pub struct ChartError {
    path: String,
    msg: String,
}

const MIB: f64 = (1u64 << 20) as f64;

/// Guest memory states stacked in the chart, bottom first: name, color, value.
type Layer = (&'static str, RGBColor, fn(&VmReport) -> u64);
const LAYERS: [Layer; 5] = [
    ("resident", RGBColor(66, 133, 244), |v| v.resident_bytes),
    ("shared", RGBColor(52, 168, 83), |v| v.shared_bytes),
    ("compressed", RGBColor(251, 188, 5), |v| v.compressed_bytes),
    ("swapped", RGBColor(234, 67, 53), |v| v.swapped_bytes),
    ("ballooned", RGBColor(154, 100, 200), |v| v.ballooned_bytes),
];
/// Band colors of High..Low.
const STATE_COLORS: [RGBColor; 5] = [
    RGBColor(255, 255, 255),
    RGBColor(220, 240, 255),
    RGBColor(255, 245, 200),
    RGBColor(255, 220, 190),
    RGBColor(255, 190, 190),
];
/// Free-memory thresholds drawn, as (label, percent of minFree below the budget).
const THRESHOLDS: [(&str, u64); 5] =
    [("Clear", 300), ("minFree", 100), ("Soft", 64), ("Hard", 32), ("Low", 16)];

pub(super) fn register_font() {
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            log::warn!("the charts' font could not be loaded: labels will be missing");
        }
    });
}

fn secs(r: &HostReport) -> f64 {
    r.t_ms as f64 / 1000.0
}

pub(super) fn fail(path: &Path) -> impl Fn(String) -> ChartError + '_ {
    move |msg| ChartError { path: path.display().to_string(), msg }
}

/// The VM names in start order, as they appear over a run.
fn vm_names(reports: &[HostReport]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for v in reports.iter().flat_map(|r| &r.vms) {
        if !names.contains(&v.name) {
            names.push(v.name.clone());
        }
    }
    names
}

/// A chart's drawing context: time in seconds across, MiB up.
pub(super) type Chart<'a> =
    ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The axes of a chart titled `caption` on `root`, up to `t_max` s and `y_max` MiB.
pub(super) fn axes<'a>(
    root: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    caption: String,
    (t_max, y_max): (f64, f64),
    grid: bool,
) -> Result<Chart<'a>, String> {
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("time (s)").y_desc("MiB");
    if !grid {
        mesh.light_line_style(WHITE);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    Ok(chart)
}

/// Draws the legend of `chart` in its upper right corner.
pub(super) fn legend(chart: &mut Chart<'_>) -> Result<(), String> {
    legend_at(chart, SeriesLabelPosition::UpperRight)
}

/// Draws the legend of `chart` at `position`.
pub(super) fn legend_at(
    chart: &mut Chart<'_>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())
}

/// Draws `run` of `scenario` into `path`.
///
/// # Errors
/// The file cannot be written.
pub fn run_chart(path: &Path, scenario: &str, run: &Run) -> Result<(), ChartError> {
    register_font();
    let err = fail(path);
    let reports = &run.reports;
    let names = vm_names(reports);
    let t_max = reports.last().map_or(1.0, secs).max(0.1);
    // Stack: per VM, per layer, bottom first.
    let stacks: Vec<Vec<f64>> = reports
        .iter()
        .map(|r| {
            let mut acc = 0.0;
            let mut out = Vec::new();
            for name in &names {
                for (_, _, f) in LAYERS {
                    acc += r
                        .vms
                        .iter()
                        .find(|v| &v.name == name && v.running)
                        .map_or(0.0, |v| f(v) as f64 / MIB);
                    out.push(acc);
                }
            }
            out
        })
        .collect();
    let top = stacks.iter().filter_map(|s| s.last().copied()).fold(0.0, f64::max);
    let budget_max = reports.iter().map(|r| r.budget_bytes as f64 / MIB).fold(0.0, f64::max);
    let y_max = top.max(budget_max) * 1.08 + 1.0;
    let root = BitMapBackend::new(path, RUN_CHART).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let caption = format!(
        "{scenario} under {}: guest memory by state, VMs stacked {} (bottom up)",
        run.policy,
        names.join(", ")
    );
    let mut chart = axes(&root, caption, (t_max, y_max), false).map_err(&err)?;
    // State bands.
    let bands = reports.windows(2).map(|w| {
        let s = STATE_NAMES.iter().position(|n| *n == w[0].state).unwrap_or(0);
        Rectangle::new([(secs(&w[0]), 0.0), (secs(&w[1]), y_max)], STATE_COLORS[s].filled())
    });
    chart.draw_series(bands).map_err(|e| err(e.to_string()))?;
    // Stacked areas, top layer first so that the lower ones paint over it.
    let layers = names.len() * LAYERS.len();
    for k in (0..layers).rev() {
        let (label, color, _) = LAYERS[k % LAYERS.len()];
        let vm = k / LAYERS.len();
        let shade = color.mix(1.0 - 0.45 * vm as f64 / names.len().max(1) as f64);
        let points: Vec<(f64, f64)> =
            reports.iter().zip(&stacks).map(|(r, s)| (secs(r), s[k])).collect();
        let series = chart
            .draw_series(AreaSeries::new(points, 0.0, shade.filled()))
            .map_err(|e| err(e.to_string()))?;
        if vm == 0 {
            series.label(label).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
            });
        }
    }
    // The budget and the thresholds: the VMs' consumption at which free memory crosses them.
    let line = |pct: u64| -> Vec<(f64, f64)> {
        reports
            .iter()
            .map(|r| {
                (
                    secs(r),
                    (r.budget_bytes as f64 - r.min_free_bytes as f64 * pct as f64 / 100.0) / MIB,
                )
            })
            .collect()
    };
    chart
        .draw_series(LineSeries::new(line(0), BLACK.stroke_width(3)))
        .map_err(|e| err(e.to_string()))?
        .label("budget")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(3)));
    for (label, pct) in THRESHOLDS {
        let style = if label == "minFree" {
            BLACK.stroke_width(2)
        } else {
            RGBColor(120, 120, 120).stroke_width(1)
        };
        let pts = line(pct);
        let last = pts.last().copied().unwrap_or((0.0, 0.0));
        chart.draw_series(LineSeries::new(pts, style)).map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (last.0 * 0.93, last.1),
                ("sans-serif", 13),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    let consumed: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| {
            (
                secs(r),
                r.vms.iter().filter(|v| v.running).map(|v| v.consumed_bytes).sum::<u64>() as f64
                    / MIB,
            )
        })
        .collect();
    chart
        .draw_series(LineSeries::new(consumed, RGBColor(0, 0, 0).stroke_width(1)))
        .map_err(|e| err(e.to_string()))?
        .label("host memory consumed")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(1)));
    legend(&mut chart).map_err(&err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Line colors of the policies compared.
const POLICY_COLORS: [RGBColor; 6] = [
    RGBColor(66, 133, 244),
    RGBColor(234, 67, 53),
    RGBColor(52, 168, 83),
    RGBColor(251, 140, 0),
    RGBColor(120, 60, 180),
    RGBColor(90, 90, 90),
];

/// Draws the host memory of every run of `scenario` into `path`, with the budget.
///
/// # Errors
/// The file cannot be written.
pub fn compare_chart(path: &Path, scenario: &str, runs: &[Run]) -> Result<(), ChartError> {
    register_font();
    let err = fail(path);
    let consumed = |r: &HostReport| {
        r.vms.iter().filter(|v| v.running).map(|v| v.consumed_bytes).sum::<u64>() as f64 / MIB
    };
    let t_max = runs.iter().filter_map(|r| r.reports.last()).map(secs).fold(0.1, f64::max);
    let y_max = runs
        .iter()
        .flat_map(|r| r.reports.iter().map(|x| consumed(x).max(x.budget_bytes as f64 / MIB)))
        .fold(1.0, f64::max)
        * 1.08;
    let root = BitMapBackend::new(path, COMPARE_CHART).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let caption = format!("{scenario}: host memory consumed by the VMs, per policy");
    let mut chart = axes(&root, caption, (t_max, y_max), true).map_err(&err)?;
    if let Some(first) = runs.iter().find(|r| r.policy != "unconstrained") {
        let budget: Vec<(f64, f64)> =
            first.reports.iter().map(|r| (secs(r), r.budget_bytes as f64 / MIB)).collect();
        chart
            .draw_series(LineSeries::new(budget, BLACK.stroke_width(3)))
            .map_err(|e| err(e.to_string()))?
            .label("budget")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(3)));
    }
    for (i, run) in runs.iter().enumerate() {
        let color = POLICY_COLORS[i % POLICY_COLORS.len()];
        let pts: Vec<(f64, f64)> = run.reports.iter().map(|r| (secs(r), consumed(r))).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(run.policy.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], color.stroke_width(2)));
    }
    legend(&mut chart).map_err(&err)?;
    root.present().map_err(|e| err(e.to_string()))
}
