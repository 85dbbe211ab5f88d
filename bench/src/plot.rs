//! SVG plots: the latency distribution as a percentile plot (latency against
//! percentile on a "nines" axis, so the tail is visible) and a series over time.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// A named series of points.
pub type Series = (String, Vec<(f64, f64)>);

/// What to draw.
#[derive(Debug, Default)]
pub struct Plot {
    /// Title over the whole figure.
    pub title: String,
    /// Latency distributions: `(name, cdf points (ms, fraction))`.
    pub latencies: Vec<Series>,
    /// Series for the right panel (e.g. messages per second over time).
    pub series: Vec<Series>,
    /// Caption of the right panel.
    pub series_title: String,
    /// Its x axis.
    pub series_x: String,
    /// Its y axis.
    pub series_y: String,
}

const COLOURS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

/// `-log10(1 - fraction)`: 1 is p90, 2 is p99, 3 is p99.9.
fn nines(fraction: f64, cap: f64) -> f64 {
    if fraction >= 1.0 {
        cap
    } else {
        (-(1.0 - fraction).log10()).min(cap)
    }
}

fn percentile_label(n: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-*n));
    let s = format!("{p:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

/// Writes the plot as SVG to `path`.
pub fn write_svg(path: &Path, plot: &Plot) -> Result<()> {
    let panels = usize::from(!plot.latencies.is_empty()) + usize::from(!plot.series.is_empty());
    if panels == 0 {
        return Ok(());
    }
    let width = 620 * panels as u32;
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(&plot.title, ("sans-serif", 18)).map_err(err)?;
    let areas = if panels == 2 {
        let (a, b) = root.split_horizontally(620);
        vec![a, b]
    } else {
        vec![root]
    };
    let mut area = areas.iter();
    if !plot.latencies.is_empty() {
        let area = area.next().ok_or_else(|| anyhow!("no panel"))?;
        latency_panel(area, &plot.latencies)?;
    }
    if !plot.series.is_empty() {
        let area = area.next().ok_or_else(|| anyhow!("no panel"))?;
        series_panel(area, plot)?;
    }
    areas
        .first()
        .ok_or_else(|| anyhow!("no panel"))?
        .present()
        .map_err(err)?;
    Ok(())
}

fn latency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    latencies: &[Series],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let count_cap = latencies
        .iter()
        .map(|(_, p)| p.len())
        .max()
        .unwrap_or(1)
        .max(10);
    // Points are thinned; the cap is where the last point (the maximum) goes.
    let cap = 4.0f64.min((count_cap as f64).log10() + 1.0).max(2.0);
    let max_ms = latencies
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(ms, _)| ms))
        .fold(0.1f64, f64::max);
    let min_ms = latencies
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(ms, _)| ms))
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, max_ms / 2.0);
    let mut chart = ChartBuilder::on(area)
        .caption("latency distribution", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..cap, (min_ms..max_ms * 1.2).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms, log scale)")
        .x_labels(cap as usize + 1)
        .x_label_formatter(&percentile_label)
        .y_label_formatter(&|v| format!("{v}"))
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in latencies.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = points
            .iter()
            .map(|&(ms, f)| (nines(f, cap), ms.max(min_ms)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn series_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    plot: &Plot,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let all = || plot.series.iter().flat_map(|(_, p)| p.iter());
    let max_x = all().map(|p| p.0).fold(1e-3f64, f64::max);
    let max_y = all().map(|p| p.1).fold(1e-3f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(&plot.series_title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_x * 1.02, 0f64..max_y * 1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(plot.series_x.as_str())
        .y_desc(plot.series_y.as_str())
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in plot.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("p.svg");
        let plot = Plot {
            title: "t".into(),
            latencies: vec![(
                "delivery".into(),
                vec![(0.2, 0.1), (0.5, 0.5), (1.0, 0.99), (3.0, 1.0)],
            )],
            series: vec![("sent".into(), vec![(0.0, 10.0), (1.0, 20.0)])],
            series_title: "throughput".into(),
            series_x: "s".into(),
            series_y: "msg/s".into(),
        };
        write_svg(&path, &plot).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("svg");
        assert!(svg.contains("<svg") && svg.contains("latency distribution"));
        assert_eq!(percentile_label(&2.0), "99%");
        assert_eq!(percentile_label(&3.0), "99.9%");
    }
}
