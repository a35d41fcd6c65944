//! PNG plots of a [`Report`], drawn with plotters into an RGB buffer and encoded with `png`.
//!
//! Text is rendered with DejaVu Sans, bundled in the crate (`fonts/DejaVuSans.ttf`, licence in
//! `fonts/LICENSE-DejaVu`) and registered with plotters' `ab_glyph` backend: no system font,
//! no fontconfig, at build time or at run time.

use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::element::{Drawable, PointCollection};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use plotters_backend::{BackendCoord, DrawingErrorKind};

use crate::report::Report;
use crate::study::{CurvePoint, EvalMetrics};
use crate::{Error, Result};

/// Width and height of every plot, in pixels.
pub const PLOT_SIZE: (u32, u32) = (1000, 600);

/// DejaVu Sans, registered as plotters' `sans-serif` family.
const FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Tableau 10: distinguishable, and readable by most colour-blind people.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const GRID: RGBColor = RGBColor(225, 225, 225);
const REFERENCE: RGBColor = RGBColor(90, 90, 90);

/// The held-out metric a curve plot shows on its y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CurveMetric {
    /// KL(teacher ‖ student) in nats per position (lower is better).
    ForwardKl,
    /// Top-1 agreement with the teacher, a fraction (higher is better).
    Top1Agreement,
}

impl CurveMetric {
    fn of_point(self, p: &CurvePoint) -> f64 {
        match self {
            CurveMetric::ForwardKl => p.forward_kl,
            CurveMetric::Top1Agreement => p.top1_agreement,
        }
    }

    fn of_eval(self, e: &EvalMetrics) -> f64 {
        match self {
            CurveMetric::ForwardKl => e.forward_kl,
            CurveMetric::Top1Agreement => e.top1_agreement,
        }
    }

    fn caption(self) -> &'static str {
        match self {
            CurveMetric::ForwardKl => "Held-out forward KL during training",
            CurveMetric::Top1Agreement => "Held-out top-1 agreement during training",
        }
    }

    fn axis(self) -> &'static str {
        match self {
            CurveMetric::ForwardKl => "forward KL(teacher ‖ student), nats/position",
            CurveMetric::Top1Agreement => "top-1 agreement with the teacher",
        }
    }

    /// The corner where the curves usually are not: KL falls, agreement rises.
    fn legend_position(self) -> SeriesLabelPosition {
        match self {
            CurveMetric::ForwardKl => SeriesLabelPosition::UpperRight,
            CurveMetric::Top1Agreement => SeriesLabelPosition::LowerRight,
        }
    }

    /// Values the axis never goes beyond.
    fn bounds(self) -> (f64, f64) {
        match self {
            CurveMetric::ForwardKl => (0.0, f64::INFINITY),
            CurveMetric::Top1Agreement => (0.0, 1.0),
        }
    }
}

/// Registers the bundled font once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(Error::Font) }
}

/// Draws `metric` against training positions for the methods of `student` (see
/// [`Report::students`]): one line with markers per method that has a run, and a dashed
/// horizontal line per method without one (the initialisation). `name` is the file name
/// drawing errors are reported against. Returns the PNG file's bytes, [`PLOT_SIZE`] pixels.
pub fn curve_png(
    report: &Report,
    metric: CurveMetric,
    student: Option<&str>,
    name: &str,
) -> Result<Vec<u8>> {
    let mine = |m: &&crate::report::MethodResult| m.student.as_deref() == student;
    let curves: Vec<(&str, Vec<(f64, f64)>)> = report
        .methods
        .iter()
        .filter(mine)
        .filter(|m| !m.curve.is_empty())
        .map(|m| {
            let pts = m
                .curve
                .iter()
                .map(|p| (p.train_positions as f64, metric.of_point(p)));
            (m.label.as_str(), pts.collect())
        })
        .collect();
    let levels: Vec<(&str, f64)> = report
        .methods
        .iter()
        .filter(mine)
        .filter(|m| m.curve.is_empty())
        .map(|m| (m.label.as_str(), metric.of_eval(&m.eval)))
        .collect();
    let x_max = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.03;
    let ys = curves
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .chain(levels.iter().map(|l| l.1));
    let (y0, y1) = padded_range(ys, metric.bounds());

    let caption = match student {
        Some(s) => format!("{}: {s}", metric.caption()),
        None => metric.caption().to_string(),
    };
    render(name, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption.as_str(), (FAMILY, 26))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..x_max, y0..y1)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .bold_line_style(GRID)
            .x_desc("training positions (distilled tokens)")
            .y_desc(metric.axis())
            .x_label_formatter(&|x| si(*x))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .axis_desc_style((FAMILY, 18))
            .label_style((FAMILY, 15))
            .draw()?;
        for (i, (label, pts)) in curves.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(*label)
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (24, 0)], color.stroke_width(2))
                        + marker(i, color, (12, 0))
                });
            chart.draw_series(
                pts.iter()
                    .map(|&p| EmptyElement::at(p) + marker(i, color, (0, 0))),
            )?;
        }
        for (label, y) in &levels {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, *y), (x_max, *y)],
                    10,
                    6,
                    REFERENCE.stroke_width(2),
                ))?
                .label(*label)
                .legend(|(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (9, 0)], REFERENCE.stroke_width(2))
                        + PathElement::new(vec![(15, 0), (24, 0)], REFERENCE.stroke_width(2))
                });
        }
        if !curves.is_empty() || !levels.is_empty() {
            chart
                .configure_series_labels()
                .position(metric.legend_position())
                .margin(12)
                .background_style(WHITE)
                .border_style(BLACK.mix(0.4))
                .label_font((FAMILY, 16))
                .draw()?;
        }
        Ok(())
    })
}

/// Draws the cost study against k: bytes per distilled position (left) and the held-out
/// forward KL reached (right), one line per series (by default the tail policy), the distinct k values evenly spaced.
/// Returns the PNG file's bytes, [`PLOT_SIZE`] pixels.
pub fn cost_png(report: &Report) -> Result<Vec<u8>> {
    let mut ks: Vec<u32> = report.cost.iter().map(|c| c.k).collect();
    ks.sort_unstable();
    ks.dedup();
    let mut tails: Vec<&str> = Vec::new();
    for c in &report.cost {
        if !tails.contains(&c.series.as_str()) {
            tails.push(&c.series);
        }
    }
    // One line per tail, sorted by k; x is the index of k among the distinct values.
    struct CostPoint {
        x: f64,
        bytes: f64,
        kl: f64,
    }
    let series: Vec<(&str, Vec<CostPoint>)> = tails
        .iter()
        .map(|&tail| {
            let mut pts: Vec<CostPoint> = report
                .cost
                .iter()
                .filter(|c| c.series == tail)
                .map(|c| CostPoint {
                    x: ks.binary_search(&c.k).unwrap_or(0) as f64,
                    bytes: c.bytes_per_position,
                    kl: c.eval.forward_kl,
                })
                .collect();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            (tail, pts)
        })
        .collect();
    let n = ks.len().max(1) as f64;
    let k_label = |x: &f64| {
        let i = x.round();
        match ks.get(i as usize) {
            Some(k) if (x - i).abs() < 1e-6 && i >= 0.0 => k.to_string(),
            _ => String::new(),
        }
    };
    let bytes_max = report
        .cost
        .iter()
        .map(|c| c.bytes_per_position)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let (kl0, kl1) = padded_range(
        report.cost.iter().map(|c| c.eval.forward_kl),
        CurveMetric::ForwardKl.bounds(),
    );

    render("cost.png", |root| {
        let root = root.titled("Cost of the teacher cache against k", (FAMILY, 26))?;
        let panels = root.split_evenly((1, 2));
        let specs = [
            // Bytes grow with k and KL falls: each legend goes where its lines are not.
            (
                "bytes per distilled position",
                0.0,
                bytes_max,
                0usize,
                SeriesLabelPosition::UpperLeft,
            ),
            (
                "held-out forward KL, nats/position",
                kl0,
                kl1,
                1usize,
                SeriesLabelPosition::UpperRight,
            ),
        ];
        for (panel, (desc, lo, hi, which, legend_at)) in panels.iter().zip(specs) {
            let mut chart = ChartBuilder::on(panel)
                .margin(15)
                .x_label_area_size(50)
                .y_label_area_size(75)
                .build_cartesian_2d(-0.5..n - 0.5, lo..hi)?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .bold_line_style(GRID)
                .x_labels(ks.len() + 1)
                .x_desc("k (teacher entries kept per position)")
                .y_desc(desc)
                .x_label_formatter(&k_label)
                .y_label_formatter(&|y| match which {
                    0 => format!("{y:.0}"),
                    _ => format!("{y:.2}"),
                })
                .axis_desc_style((FAMILY, 17))
                .label_style((FAMILY, 15))
                .draw()?;
            for (i, (tail, pts)) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let xy: Vec<(f64, f64)> = pts
                    .iter()
                    .map(|p| (p.x, if which == 0 { p.bytes } else { p.kl }))
                    .collect();
                chart
                    .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))?
                    .label(tail.to_string())
                    .legend(move |(x, y)| {
                        EmptyElement::at((x, y))
                            + PathElement::new(vec![(0, 0), (24, 0)], color.stroke_width(2))
                            + marker(i, color, (12, 0))
                    });
                chart.draw_series(
                    xy.iter()
                        .map(|&p| EmptyElement::at(p) + marker(i, color, (0, 0))),
                )?;
            }
            if !series.is_empty() {
                chart
                    .configure_series_labels()
                    .position(legend_at)
                    .margin(10)
                    .background_style(WHITE)
                    .border_style(BLACK.mix(0.4))
                    .label_font((FAMILY, 15))
                    .draw()?;
            }
        }
        Ok(())
    })
}

/// What a drawing closure returns: plotters' error for an RGB buffer backend.
type DrawResult<'b> =
    std::result::Result<(), DrawingAreaErrorKind<<BitMapBackend<'b> as DrawingBackend>::ErrorType>>;

/// Runs `draw` on a white [`PLOT_SIZE`] RGB canvas and encodes the result as PNG. Drawing
/// errors are reported against `name`.
fn render(
    name: &str,
    draw: impl for<'b> FnOnce(&DrawingArea<BitMapBackend<'b>, Shift>) -> DrawResult<'b>,
) -> Result<Vec<u8>> {
    ensure_font()?;
    let plot_err = |what: String| Error::Plot {
        plot: name.to_string(),
        what,
    };
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
        draw(&root).map_err(|e| plot_err(e.to_string()))?;
        root.present().map_err(|e| plot_err(e.to_string()))?;
    }
    encode_png(&buf, w, h).map_err(|e| plot_err(format!("PNG encoding: {e}")))
}

/// Encodes 8-bit RGB pixels as a PNG file.
fn encode_png(rgb: &[u8], w: u32, h: u32) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

/// A filled marker, composed at an offset `at` in backend pixels (`EmptyElement::at(point) +
/// marker(..)`). The shape cycles with the series index so lines stay distinguishable in grey
/// print: circle, triangle, square, diamond.
struct Marker {
    at: BackendCoord,
    series: usize,
    color: RGBColor,
}

/// The marker of series `series`, `at` pixels from the point it is composed with.
fn marker(series: usize, color: RGBColor, at: BackendCoord) -> Marker {
    Marker { at, series, color }
}

impl<'a> PointCollection<'a, BackendCoord> for &'a Marker {
    type Point = &'a BackendCoord;
    type IntoIter = std::iter::Once<&'a BackendCoord>;
    fn point_iter(self) -> Self::IntoIter {
        std::iter::once(&self.at)
    }
}

impl<DB: DrawingBackend> Drawable<DB> for Marker {
    fn draw<I: Iterator<Item = BackendCoord>>(
        &self,
        mut pos: I,
        backend: &mut DB,
        _parent_dim: (u32, u32),
    ) -> std::result::Result<(), DrawingErrorKind<DB::ErrorType>> {
        let Some((x, y)) = pos.next() else {
            return Ok(());
        };
        let c = &self.color;
        match self.series % 4 {
            0 => backend.draw_circle((x, y), 4, c, true),
            1 => backend.fill_polygon([(x, y - 6), (x + 6, y + 4), (x - 6, y + 4)], c),
            2 => backend.draw_rect((x - 4, y - 4), (x + 4, y + 4), c, true),
            _ => backend.fill_polygon([(x, y - 6), (x + 6, y), (x, y + 6), (x - 6, y)], c),
        }
    }
}

/// A `lo..hi` axis range covering `values` with 6% padding, clipped to `bounds`; a sensible
/// range for a single value or none.
fn padded_range(values: impl Iterator<Item = f64>, bounds: (f64, f64)) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (bounds.0, if bounds.1.is_finite() { bounds.1 } else { 1.0 });
    }
    let pad = if hi > lo {
        (hi - lo) * 0.06
    } else {
        (lo.abs() * 0.1).max(0.05)
    };
    ((lo - pad).max(bounds.0), (hi + pad).min(bounds.1))
}

/// A tick label with an SI suffix: `0`, `500`, `12k`, `1.5M`.
fn si(x: f64) -> String {
    let (v, suffix) = match x.abs() {
        a if a >= 1e9 => (x / 1e9, "G"),
        a if a >= 1e6 => (x / 1e6, "M"),
        a if a >= 1e3 => (x / 1e3, "k"),
        _ => (x, ""),
    };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_labels() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(500.0), "500");
        assert_eq!(si(12_000.0), "12k");
        assert_eq!(si(1_500_000.0), "1.5M");
        assert_eq!(si(2_250.0), "2.25k");
    }

    #[test]
    fn padded_ranges_stay_in_bounds() {
        let (lo, hi) = padded_range([0.1, 0.9].into_iter(), (0.0, 1.0));
        assert!((0.0..0.1).contains(&lo) && hi > 0.9 && hi <= 1.0);
        let (lo, hi) = padded_range([2.0].into_iter(), (0.0, f64::INFINITY));
        assert!(lo < 2.0 && hi > 2.0);
        assert_eq!(padded_range(std::iter::empty(), (0.0, 1.0)), (0.0, 1.0));
    }
}
