//! A chart of figures over time from one or more `--stats-json` runs: lines of MiB against
//! seconds, with the moments a workload changed phase marked as labelled vertical lines.
//! `tests/guest_user.rs` draws seed 000's page-cache experiment with it (docs/seed-000.png).

use std::path::Path;

use plotters::prelude::*;

use super::chart::{axes, fail, legend_at, register_font, ChartError};

/// Size of a timeline chart, pixels.
pub const TIMELINE_CHART: (u32, u32) = (1200, 600);

/// Colors of the lines, in order (then again).
const COLORS: [RGBColor; 4] =
    [RGBColor(66, 133, 244), RGBColor(234, 67, 53), RGBColor(52, 168, 83), RGBColor(251, 140, 0)];

/// One line: its label and its points (seconds, MiB).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The legend's text.
    pub label: String,
    /// (seconds, MiB), in time order.
    pub points: Vec<(f64, f64)>,
}

/// Draws `lines` into the PNG file `path`, with a dashed vertical line and its label at each
/// of `marks` (seconds, what ended then). Lines after the fourth reuse the colors dashed.
///
/// # Errors
/// The file cannot be written.
pub fn chart(
    path: &Path,
    caption: &str,
    lines: &[Line],
    marks: &[(f64, String)],
) -> Result<(), ChartError> {
    register_font();
    let err = fail(path);
    let all = || lines.iter().flat_map(|l| l.points.iter());
    // 5% to the right of the last point, so that the last mark's label fits.
    let t_max = all().map(|p| p.0).chain(marks.iter().map(|m| m.0)).fold(1.0, f64::max) * 1.05;
    let y_max = all().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, TIMELINE_CHART).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = axes(&root, caption.to_owned(), (t_max, y_max), true).map_err(&err)?;
    for (t, label) in marks {
        let style = BLACK.mix(0.5).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new([(*t, 0.0), (*t, y_max)], 6, 4, style))
            .map_err(|e| err(e.to_string()))?;
        let text = Text::new(label.clone(), (*t, y_max * 0.97), ("sans-serif", 13));
        chart.draw_series(std::iter::once(text)).map_err(|e| err(e.to_string()))?;
    }
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let style = color.stroke_width(if i < COLORS.len() { 3 } else { 1 });
        chart
            .draw_series(LineSeries::new(line.points.clone(), style))
            .map_err(|e| err(e.to_string()))?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], color.stroke_width(3)));
    }
    // Middle right: timelines start low and end flat, so the corners hold lines.
    legend_at(&mut chart, SeriesLabelPosition::MiddleRight).map_err(&err)?;
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_is_drawn_to_a_png_file() {
        let dir = std::env::temp_dir().join(format!("ebb-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.png");
        let up =
            Line { label: "up".into(), points: (0..20).map(|i| (i as f64, i as f64)).collect() };
        chart(&path, "test", &[up], &[(5.0, "five".into())]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "a PNG file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
