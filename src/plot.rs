//! Plots for the command line: key rate against distance, pool levels over
//! time. SVG or PNG by file extension; PNG text uses an embedded DejaVu Sans so
//! no system fonts or C libraries are needed.

use anyhow::{Context, bail};
use plotters::prelude::*;

/// One named series of (x, y) points.
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// Points; non-positive y values are dropped on a log axis.
    pub points: Vec<(f64, f64)>,
    /// Dashed (bounds) or solid (models and measurements).
    pub dashed: bool,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TTF; if registration failed, text would
        // be missing but the plot would still be written.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// The y axis of a plot.
#[derive(Clone, Copy)]
enum YAxis {
    /// Logarithmic, decades around the data; non-positive values dropped.
    Log,
    /// Linear from 0, so that an empty pool shows.
    Linear,
}

impl YAxis {
    fn keeps(self, p: &(f64, f64)) -> bool {
        p.0.is_finite()
            && p.1.is_finite()
            && match self {
                YAxis::Log => p.1 > 0.0,
                YAxis::Linear => true,
            }
    }
}

/// Draws `series` with a log-scale y axis to `path` (.svg or .png).
pub fn log_y(
    path: &std::path::Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    plot(path, title, x_label, y_label, series, YAxis::Log)
}

/// Draws `series` with linear axes (y from 0) to `path` (.svg or .png): pool
/// levels over time, where an empty pool (0) must show.
pub fn linear_y(
    path: &std::path::Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    plot(path, title, x_label, y_label, series, YAxis::Linear)
}

fn plot(
    path: &std::path::Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    axis: YAxis,
) -> anyhow::Result<()> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| axis.keeps(p))
        .collect();
    if pts.is_empty() {
        bail!(match axis {
            YAxis::Log => "nothing to plot: every value is zero (no key at any point)",
            YAxis::Linear => "nothing to plot: no points",
        });
    }
    let (x0, x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0), a.1.max(p.0))
    });
    let (y0, y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.1), a.1.max(p.1))
    });
    let y = match axis {
        YAxis::Log => (
            10f64.powf(y0.log10().floor()),
            10f64.powf(y1.log10().ceil()),
        ),
        YAxis::Linear => (0.0, if y1 > 0.0 { y1 * 1.05 } else { 1.0 }),
    };
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let frame = Frame {
        title,
        x_label,
        y_label,
        x: (x0, x1),
        y,
        axis,
    };
    register_font(); // both backends measure text with it
    match ext.as_str() {
        "svg" => draw(
            SVGBackend::new(path, (900, 600)).into_drawing_area(),
            &frame,
            series,
        ),
        "png" => draw(
            BitMapBackend::new(path, (900, 600)).into_drawing_area(),
            &frame,
            series,
        ),
        _ => bail!("plot file must end in .svg or .png: {}", path.display()),
    }
    .with_context(|| format!("writing plot {}", path.display()))
}

struct Frame<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x: (f64, f64),
    y: (f64, f64),
    axis: YAxis,
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    f: &Frame<'_>,
    series: &[Series<'_>],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ((x0, x1), (y0, y1)) = (f.x, f.y);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(f.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80);
    match f.axis {
        YAxis::Log => {
            let chart = builder
                .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            draw_series(chart, f, series, |v| format!("{v:.0e}"))?;
        }
        YAxis::Linear => {
            let chart = builder
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            draw_series(chart, f, series, |v| format!("{v:.2e}"))?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn draw_series<'a, DB, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    f: &Frame<'_>,
    series: &[Series<'_>],
    y_format: fn(&f64) -> String,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(f.x_label)
        .y_desc(f.y_label)
        .y_label_formatter(&y_format)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (i, s) in series.iter().enumerate() {
        let c = colours[i % colours.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| f.axis.keeps(p))
            .collect();
        let style = if s.dashed {
            c.mix(0.6).stroke_width(2)
        } else {
            c.stroke_width(2)
        };
        let legend = move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c);
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(pts, 8, 6, style))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(s.label)
                .legend(legend);
        } else {
            chart
                .draw_series(LineSeries::new(pts, style))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(s.label)
                .legend(legend);
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
