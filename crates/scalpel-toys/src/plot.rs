//! SVG figures for the toy-model reports, drawn with plotters' SVG backend: line plots (with
//! optional log axes, marker lines and reference lines), heatmaps, bar charts, 2-D feature
//! directions, categorical phase diagrams and grids of small line plots.
//!
//! Every function renders into memory and then writes the `.svg` file atomically. Bad input
//! never panics: non-finite points are skipped (and non-positive ones on a log axis), and a
//! figure with nothing left to draw still becomes a valid SVG that shows its title and "no data".

use std::error::Error as StdError;
use std::ops::Range;
use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Result, ToyError};
use crate::report::save;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), Box<dyn StdError>>;

const FONT: &str = "sans-serif";

/// Ten distinct colours (the "tab10" set); further indices fall back to plotters' Palette99.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

const MISSING: RGBColor = RGBColor(215, 215, 215);
const INK: RGBColor = RGBColor(40, 40, 40);
const FAINT: RGBColor = RGBColor(236, 236, 236);

/// The colour of series (or category) number `i`.
fn colour(i: usize) -> RGBColor {
    match PALETTE.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            let c = Palette99::pick(i).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

/// One named curve of a [`LinePlot`]; points pair `x[i]` with `y[i]` (extra entries of the
/// longer vector are ignored).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub name: String,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
}

/// A line plot of one or more series.
#[derive(Debug, Clone, Default)]
pub struct LinePlot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Logarithmic x axis (non-positive x values are dropped).
    pub log_x: bool,
    /// Logarithmic y axis (non-positive y values are dropped).
    pub log_y: bool,
    pub series: Vec<Series>,
    /// Vertical marker lines with a label (e.g. "phase change").
    pub markers: Vec<(f64, String)>,
    /// Optional horizontal reference lines with a label (e.g. "ln(64)/2").
    pub hlines: Vec<(f64, String)>,
}

/// A matrix drawn as coloured cells, row 0 at the top.
///
/// `diverging` uses blue–white–red centred at 0 over the symmetric range ±max|v|; otherwise the
/// colours run from white (minimum) to dark blue (maximum). A colour bar sits on the right and
/// the value range is written under the title. Labels default to indices; with many rows or
/// columns only every k-th tick is labelled.
#[derive(Debug, Clone)]
pub struct Heatmap<'a> {
    pub title: &'a str,
    pub values: &'a [Vec<f64>],
    pub row_labels: Option<Vec<String>>,
    pub col_labels: Option<Vec<String>>,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub diverging: bool,
}

/// A bar chart (e.g. a Fourier spectrum with one bar per frequency). Bars whose index is in
/// `highlight` are drawn in a second colour and listed in the legend as `highlight_name`.
#[derive(Debug, Clone, Default)]
pub struct BarPlot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// One label per bar; missing labels fall back to the bar's index.
    pub labels: Vec<String>,
    pub values: Vec<f64>,
    pub highlight: Vec<usize>,
    pub highlight_name: &'a str,
    /// Logarithmic y axis (non-positive bars are left out).
    pub log_y: bool,
}

/// A categorical grid (phase diagram). `cells[r][c]` indexes `categories`; row `r` belongs to
/// `y_values[r]` (rows run bottom to top) and column `c` to `x_values[c]`. Cells are evenly
/// spaced whatever the values, and the tick labels show the values, so log-spaced sweeps read
/// naturally. A legend on the right lists the categories with their colours.
#[derive(Debug, Clone)]
pub struct PhaseDiagram<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub x_values: &'a [f64],
    pub y_values: &'a [f64],
    pub cells: &'a [Vec<usize>],
    pub categories: &'a [&'a str],
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Renders a figure of `size` pixels into memory, then writes it to `path` atomically.
fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let outcome = root
            .fill(&WHITE)
            .map_err(Box::<dyn StdError>::from)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(Box::<dyn StdError>::from));
        outcome.map_err(|e| ToyError::File {
            path: path.display().to_string(),
            msg: format!("cannot draw the plot: {e}"),
        })?;
    }
    save(path, svg.as_bytes())
}

/// Draws `title` and a centred "no data" note.
fn draw_no_data(area: &Area<'_>, title: &str, title_size: u32) -> DrawResult {
    let inner = area.titled(title, (FONT, title_size))?;
    let (w, h) = inner.dim_in_pixel();
    let style = (FONT, title_size.max(16) - 4)
        .into_font()
        .color(&RGBColor(120, 120, 120))
        .pos(Pos::new(HPos::Center, VPos::Center));
    inner.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), style))?;
    Ok(())
}

/// A value usable on an axis: finite, not absurdly large, and positive on a log axis (where it
/// is replaced by its base-10 logarithm).
fn axis_value(v: f64, log: bool) -> Option<f64> {
    if !v.is_finite() || v.abs() > 1e300 {
        return None;
    }
    if log {
        (v > 0.0).then(|| v.log10())
    } else {
        Some(v)
    }
}

/// Short, readable tick text.
fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let a = v.abs();
    if a < 1e-12 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.2e}");
        // "1.50e-4" -> "1.5e-4", "1.00e6" -> "1e6"
        return match s.split_once('e') {
            Some((m, e)) if m.contains('.') => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            _ => s,
        };
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".to_string()
    } else {
        s
    }
}

/// Running minimum and maximum.
#[derive(Clone, Copy)]
struct Bounds {
    lo: f64,
    hi: f64,
}

impl Bounds {
    fn new() -> Bounds {
        Bounds {
            lo: f64::INFINITY,
            hi: f64::NEG_INFINITY,
        }
    }

    fn add(&mut self, v: f64) {
        self.lo = self.lo.min(v);
        self.hi = self.hi.max(v);
    }

    fn is_empty(&self) -> bool {
        self.lo > self.hi
    }

    /// The range widened by `pad` of its span on each side (a flat range gets ±0.5).
    fn padded(&self, pad: f64) -> Range<f64> {
        if self.is_empty() {
            return 0.0..1.0;
        }
        let span = self.hi - self.lo;
        if span <= 0.0 || !span.is_finite() {
            let half = (self.lo.abs() * 0.1).max(0.5);
            return self.lo - half..self.hi + half;
        }
        self.lo - span * pad..self.hi + span * pad
    }
}

/// The index that a tick at `v` stands for, when `v` is (nearly) an integer in `0..n`.
fn tick_index(v: f64, n: usize) -> Option<usize> {
    let r = v.round();
    ((v - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < n).then_some(r as usize)
}

/// How many tick labels fit along `pixels` when each needs `need` pixels, capped at 40 and at
/// `n` (the number of cells). Plotters then picks a round step of at least `n / hint`.
fn label_hint(n: usize, pixels: f64, need: f64) -> usize {
    let fit = (pixels / need.max(1.0)).floor().max(1.0) as usize;
    n.min(fit).clamp(1, 40)
}

fn max_chars<'s>(labels: impl Iterator<Item = &'s str>) -> usize {
    labels.map(|s| s.chars().count()).max().unwrap_or(1)
}

/// Label of cell `i`: the given label, or the index.
fn cell_label(labels: Option<&[String]>, i: usize) -> String {
    labels
        .and_then(|l| l.get(i))
        .cloned()
        .unwrap_or_else(|| i.to_string())
}

/// Linear interpolation through colour stops at evenly spaced positions, `t` in [0, 1].
fn ramp(stops: &[(u8, u8, u8)], t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let seg = (stops.len() - 1) as f64;
    let pos = t * seg;
    let i = (pos.floor() as usize).min(stops.len() - 2);
    let f = pos - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (stops[i], stops[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Round tick positions covering `lo..=hi`: about `n` multiples of 1, 2 or 5 times a power of 10.
fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = hi - lo;
    if !(span > 0.0 && span.is_finite()) {
        return if lo.is_finite() { vec![lo] } else { Vec::new() };
    }
    let rough = span / n.max(1) as f64;
    let exp = rough.log10().floor() as i32;
    let power = 10f64.powi(exp);
    let mult = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|&m| m * power >= rough)
        .unwrap_or(10.0);
    let step = mult * power;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last)
        .map(|k| {
            // Dividing by an exact power of ten keeps 0.6 from turning into 0.6000000000000001.
            let units = k as f64 * mult;
            let v = if exp < 0 {
                units / 10f64.powi(-exp)
            } else {
                units * power
            };
            // Snap values like 0.30000000000000004 and -0.0.
            if v.abs() < step * 1e-9 {
                0.0
            } else {
                v
            }
        })
        .collect()
}

/// Ticks for a log axis, given in base-10 exponents: whole decades when the range spans at least
/// three of them (thinned to at most ten), else 1-2-5 multiples, else round linear values.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades: Vec<f64> = ((lo.ceil() as i64)..=(hi.floor() as i64))
        .map(|k| k as f64)
        .collect();
    if decades.len() >= 3 {
        let stride = decades.len().div_ceil(10);
        return decades.into_iter().step_by(stride).collect();
    }
    let mut ticks: Vec<f64> = ((lo.floor() as i64)..=(hi.ceil() as i64))
        .flat_map(|k| [1.0f64, 2.0, 5.0].map(|m| k as f64 + m.log10()))
        .filter(|&v| v >= lo - 1e-9 && v <= hi + 1e-9)
        .collect();
    if ticks.len() < 3 {
        ticks = nice_ticks(10f64.powf(lo), 10f64.powf(hi), 5)
            .into_iter()
            .filter(|&v| v > 0.0)
            .map(f64::log10)
            .collect();
    }
    ticks
}

type LinChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws grid lines and tick labels of a log axis by hand (plotters would place them at
/// uneven values): `vertical` picks the x axis. Values are base-10 exponents.
fn draw_log_axis(
    chart: &mut LinChart<'_, '_>,
    vertical: bool,
    xr: &Range<f64>,
    yr: &Range<f64>,
    label_size: u32,
) -> DrawResult {
    let (lo, hi) = if vertical {
        (xr.start, xr.end)
    } else {
        (yr.start, yr.end)
    };
    let grid = RGBColor(205, 205, 205);
    for t in log_ticks(lo, hi) {
        let text = fmt_num(10f64.powf(t));
        if vertical {
            chart.draw_series(LineSeries::new(
                vec![(t, yr.start), (t, yr.end)],
                grid.stroke_width(1),
            ))?;
            let style = (FONT, label_size)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top));
            chart.draw_series(std::iter::once(
                EmptyElement::at((t, yr.start)) + Text::new(text, (0, 6), style),
            ))?;
        } else {
            chart.draw_series(LineSeries::new(
                vec![(xr.start, t), (xr.end, t)],
                grid.stroke_width(1),
            ))?;
            let style = (FONT, label_size)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center));
            chart.draw_series(std::iter::once(
                EmptyElement::at((xr.start, t)) + Text::new(text, (-6, 0), style),
            ))?;
        }
    }
    Ok(())
}

const SEQUENTIAL: [(u8, u8, u8); 3] = [(255, 255, 255), (107, 174, 214), (8, 48, 107)];
const DIVERGING: [(u8, u8, u8); 5] = [
    (33, 102, 172),
    (146, 197, 222),
    (255, 255, 255),
    (244, 165, 130),
    (178, 24, 43),
];

// ---------------------------------------------------------------------------------------------
// Line plots

/// Writes a line plot of `plot` to `path` (SVG).
pub fn line_plot(path: &Path, plot: &LinePlot) -> Result<()> {
    render(path, (960, 600), |root| {
        draw_line_panel(root, plot, false, true)
    })
}

/// Writes several small line plots into one SVG, `cols` panels per row (at least one), under a
/// common `title`. Each panel keeps its own title, series, markers and reference lines; the x
/// label is written only under the bottom panel of each column (unless it differs there).
pub fn line_grid(path: &Path, title: &str, panels: &[LinePlot], cols: usize) -> Result<()> {
    let n = panels.len();
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let size = ((cols as u32) * 460, (rows as u32) * 330 + 50);
    render(path, size, |root| {
        if n == 0 {
            return draw_no_data(root, title, 26);
        }
        let body = root.titled(title, (FONT, 26))?;
        let last_label = panels[n - 1].x_label;
        for (i, (panel, area)) in panels
            .iter()
            .zip(body.split_evenly((rows, cols)))
            .enumerate()
        {
            let show_x = i + cols >= n || panel.x_label != last_label;
            draw_line_panel(&area, panel, true, show_x)?;
        }
        Ok(())
    })
}

/// The finite pieces of one series, split where a point is missing so lines do not bridge gaps.
fn series_runs(s: &Series, log_x: bool, log_y: bool) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (&x, &y) in s.x.iter().zip(&s.y) {
        match (axis_value(x, log_x), axis_value(y, log_y)) {
            (Some(x), Some(y)) => run.push((x, y)),
            _ => {
                if !run.is_empty() {
                    runs.push(std::mem::take(&mut run));
                }
            }
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// Picks the legend corner that covers the fewest points.
fn legend_corner(
    points: impl Iterator<Item = (f64, f64)>,
    xr: &Range<f64>,
    yr: &Range<f64>,
) -> SeriesLabelPosition {
    // Upper right, upper left, lower right, lower left.
    let mut counts = [0usize; 4];
    for (x, y) in points {
        let nx = (x - xr.start) / (xr.end - xr.start);
        let ny = (y - yr.start) / (yr.end - yr.start);
        let right = nx > 0.55;
        let left = nx < 0.45;
        let top = ny > 0.6;
        let bottom = ny < 0.4;
        counts[0] += usize::from(right && top);
        counts[1] += usize::from(left && top);
        counts[2] += usize::from(right && bottom);
        counts[3] += usize::from(left && bottom);
    }
    let best = (0..4).min_by_key(|&i| counts[i]).unwrap_or(0);
    match best {
        0 => SeriesLabelPosition::UpperRight,
        1 => SeriesLabelPosition::UpperLeft,
        2 => SeriesLabelPosition::LowerRight,
        _ => SeriesLabelPosition::LowerLeft,
    }
}

fn draw_line_panel(area: &Area<'_>, plot: &LinePlot, compact: bool, show_x: bool) -> DrawResult {
    let (log_x, log_y) = (plot.log_x, plot.log_y);
    let (title_size, label_size) = if compact { (17, 12) } else { (24, 15) };
    let runs: Vec<Vec<Vec<(f64, f64)>>> = plot
        .series
        .iter()
        .map(|s| series_runs(s, log_x, log_y))
        .collect();
    let mut xb = Bounds::new();
    let mut yb = Bounds::new();
    for &(x, y) in runs.iter().flatten().flatten() {
        xb.add(x);
        yb.add(y);
    }
    if xb.is_empty() {
        return draw_no_data(area, plot.title, title_size);
    }
    let markers: Vec<(f64, &str)> = plot
        .markers
        .iter()
        .filter_map(|(x, l)| axis_value(*x, log_x).map(|x| (x, l.as_str())))
        .collect();
    let hlines: Vec<(f64, &str)> = plot
        .hlines
        .iter()
        .filter_map(|(y, l)| axis_value(*y, log_y).map(|y| (y, l.as_str())))
        .collect();
    markers.iter().for_each(|m| xb.add(m.0));
    hlines.iter().for_each(|h| yb.add(h.0));
    let xr = xb.padded(0.02);
    let yr = yb.padded(0.06);

    let mut chart = ChartBuilder::on(area)
        .caption(plot.title, (FONT, title_size))
        .margin(if compact { 8 } else { 15 })
        .x_label_area_size(if compact { 38 } else { 50 })
        .y_label_area_size(if compact { 58 } else { 78 })
        .build_cartesian_2d(xr.clone(), yr.clone())?;
    // Log axes get hand-placed ticks (see `draw_log_axis`); plotters only draws their title.
    let fx = move |v: &f64| if log_x { String::new() } else { fmt_num(*v) };
    let fy = move |v: &f64| if log_y { String::new() } else { fmt_num(*v) };
    let n_labels = if compact { 5 } else { 9 };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(if show_x { plot.x_label } else { "" })
        .y_desc(plot.y_label)
        .x_labels(n_labels)
        .y_labels(n_labels)
        .x_label_formatter(&fx)
        .y_label_formatter(&fy)
        .light_line_style(FAINT)
        .label_style((FONT, label_size))
        .axis_desc_style((FONT, label_size + 1));
    if log_x {
        mesh.disable_x_mesh()
            .set_tick_mark_size(LabelAreaPosition::Bottom, 0);
    }
    if log_y {
        mesh.disable_y_mesh()
            .set_tick_mark_size(LabelAreaPosition::Left, 0);
    }
    mesh.draw()?;
    if log_x {
        draw_log_axis(&mut chart, true, &xr, &yr, label_size)?;
    }
    if log_y {
        draw_log_axis(&mut chart, false, &xr, &yr, label_size)?;
    }

    let note = (FONT, label_size - 1).into_font().color(&INK);
    for (i, &(y, label)) in hlines.iter().enumerate() {
        let grey = RGBColor(110, 110, 110);
        chart.draw_series(DashedLineSeries::new(
            vec![(xr.start, y), (xr.end, y)],
            6,
            4,
            grey.stroke_width(1),
        ))?;
        let offset = (6 + 90 * (i as i32 % 4), -(label_size as i32) - 2);
        chart.draw_series(std::iter::once(
            EmptyElement::at((xr.start, y)) + Text::new(label.to_string(), offset, note.clone()),
        ))?;
    }
    for (i, &(x, label)) in markers.iter().enumerate() {
        chart.draw_series(DashedLineSeries::new(
            vec![(x, yr.start), (x, yr.end)],
            6,
            4,
            INK.stroke_width(1),
        ))?;
        let offset = (4, 4 + (label_size as i32 + 3) * (i as i32 % 3));
        chart.draw_series(std::iter::once(
            EmptyElement::at((x, yr.end)) + Text::new(label.to_string(), offset, note.clone()),
        ))?;
    }

    let mut named = false;
    for (i, (s, pieces)) in plot.series.iter().zip(&runs).enumerate() {
        let c = colour(i);
        let width = if compact { 1 } else { 2 };
        let total: usize = pieces.iter().map(Vec::len).sum();
        let mut labelled = false;
        let empty = Vec::new();
        let first_run = std::iter::once(pieces.first().unwrap_or(&empty));
        for run in first_run.chain(pieces.iter().skip(1)) {
            let anno =
                chart.draw_series(LineSeries::new(run.iter().copied(), c.stroke_width(width)))?;
            if !labelled && !s.name.is_empty() {
                anno.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
                labelled = true;
                named = true;
            }
            if total <= 60 {
                chart.draw_series(run.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            }
        }
    }
    if named {
        let corner = legend_corner(runs.iter().flatten().flatten().copied(), &xr, &yr);
        chart
            .configure_series_labels()
            .position(corner)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font((FONT, label_size))
            .draw()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Heatmap

/// Writes the matrix `h.values` as a heatmap with a colour bar to `path` (SVG).
pub fn heatmap(path: &Path, h: &Heatmap) -> Result<()> {
    let nrows = h.values.len();
    let ncols = h.values.iter().map(Vec::len).max().unwrap_or(0);
    let mut vb = Bounds::new();
    for &v in h.values.iter().flatten() {
        if let Some(v) = axis_value(v, false) {
            vb.add(v);
        }
    }
    render(path, (1000, 840), |root| {
        if nrows == 0 || ncols == 0 || vb.is_empty() {
            return draw_no_data(root, h.title, 24);
        }
        let (lo, hi) = if h.diverging {
            let m = vb.lo.abs().max(vb.hi.abs());
            if m > 0.0 {
                (-m, m)
            } else {
                (-1.0, 1.0)
            }
        } else if vb.hi > vb.lo {
            (vb.lo, vb.hi)
        } else {
            let r = vb.padded(0.0);
            (r.start, r.end)
        };
        let paint = |v: f64| -> RGBColor {
            if !v.is_finite() {
                return MISSING;
            }
            let t = (v - lo) / (hi - lo);
            if h.diverging {
                ramp(&DIVERGING, t)
            } else {
                ramp(&SEQUENTIAL, t)
            }
        };

        let body = root.titled(h.title, (FONT, 24))?;
        let range_note = format!(
            "value range [{}, {}]{}",
            fmt_num(vb.lo),
            fmt_num(vb.hi),
            if h.diverging {
                "; colour scale symmetric around 0"
            } else {
                ""
            }
        );
        let body = body.titled(&range_note, (FONT, 15))?;
        let (w, hgt) = body.dim_in_pixel();
        let (main, bar) = body.split_horizontally(w.saturating_sub(130));

        let row_labels = h.row_labels.as_deref();
        let col_labels = h.col_labels.as_deref();
        let row_chars = max_chars(
            (0..nrows)
                .map(|r| cell_label(row_labels, r))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        let col_chars = max_chars(
            (0..ncols)
                .map(|c| cell_label(col_labels, c))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        let y_area = (row_chars as u32 * 8 + 40).clamp(50, 220);
        let (mw, _) = main.dim_in_pixel();
        let plot_w = (mw as f64 - y_area as f64 - 20.0).max(50.0);
        // Column labels too long to sit side by side (tokens of a prompt) are turned upright,
        // so that every column keeps its label.
        let upright = ncols <= 60 && ncols as f64 * (col_chars as f64 * 8.0 + 10.0) > plot_w;
        let x_area = if upright {
            (col_chars as u32 * 8 + 60).clamp(55, 220)
        } else {
            55
        };
        let plot_h = (hgt as f64 - x_area as f64 - 20.0).max(50.0);
        let x_hint = if upright {
            label_hint(ncols, plot_w, 16.0)
        } else {
            label_hint(ncols, plot_w, col_chars as f64 * 8.0 + 10.0)
        };
        let y_hint = label_hint(nrows, plot_h, 18.0);

        let mut chart = ChartBuilder::on(&main)
            .margin(10)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(-0.5..ncols as f64 - 0.5, 0.5 - nrows as f64..0.5)?;
        // Row r sits at y = -r, so row 0 is on top and round ticks fall on round row numbers.
        let fx = |v: &f64| {
            tick_index(*v, ncols)
                .filter(|_| !upright)
                .map(|c| cell_label(col_labels, c))
                .unwrap_or_default()
        };
        let fy = |v: &f64| {
            tick_index(-*v, nrows)
                .map(|r| cell_label(row_labels, r))
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(h.x_label)
            .y_desc(h.y_label)
            .x_labels(x_hint)
            .y_labels(y_hint)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()?;
        chart.draw_series(h.values.iter().enumerate().flat_map(|(r, row)| {
            let y = -(r as f64);
            (0..ncols).map(move |c| {
                let v = row.get(c).copied().unwrap_or(f64::NAN);
                Rectangle::new(
                    [(c as f64 - 0.5, y - 0.5), (c as f64 + 0.5, y + 0.5)],
                    paint(v).filled(),
                )
            })
        }))?;
        if upright {
            // Every column's label, turned upright, starting just below the axis.
            let style = TextStyle::from((FONT, 13).into_font())
                .transform(FontTransform::Rotate90)
                .pos(Pos::new(HPos::Left, VPos::Center));
            for c in 0..ncols {
                let (px, py) = chart.backend_coord(&(c as f64, 0.5 - nrows as f64));
                main.draw(&Text::new(
                    cell_label(col_labels, c),
                    (px, py + 8),
                    style.clone(),
                ))?;
            }
        }

        // Colour bar, with its tick labels on the right.
        let mut scale = ChartBuilder::on(&bar)
            .margin_top(10)
            .margin_bottom(10 + x_area)
            .margin_left(15)
            .margin_right(75)
            .build_cartesian_2d(0.0..1.0, lo..hi)?;
        let steps = 100;
        scale.draw_series((0..steps).map(|i| {
            let a = lo + (hi - lo) * i as f64 / steps as f64;
            let b = lo + (hi - lo) * (i + 1) as f64 / steps as f64;
            Rectangle::new([(0.0, a), (1.0, b)], paint((a + b) / 2.0).filled())
        }))?;
        scale.draw_series(std::iter::once(Rectangle::new(
            [(0.0, lo), (1.0, hi)],
            INK.stroke_width(1),
        )))?;
        let style = (FONT, 12)
            .into_font()
            .color(&INK)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for t in nice_ticks(lo, hi, 8) {
            scale.draw_series(std::iter::once(
                EmptyElement::at((1.0, t))
                    + PathElement::new(vec![(0, 0), (5, 0)], INK.stroke_width(1))
                    + Text::new(fmt_num(t), (8, 0), style.clone()),
            ))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Bar plot

/// Writes a bar chart of `b.values` to `path` (SVG).
pub fn bar_plot(path: &Path, b: &BarPlot) -> Result<()> {
    let n = b.values.len();
    let bars: Vec<Option<f64>> = b.values.iter().map(|&v| axis_value(v, b.log_y)).collect();
    let mut vb = Bounds::new();
    bars.iter().flatten().for_each(|&v| vb.add(v));
    render(path, (1000, 600), |root| {
        if vb.is_empty() {
            return draw_no_data(root, b.title, 24);
        }
        let (base, yr) = if b.log_y {
            let span = (vb.hi - vb.lo).max(1.0);
            let bottom = vb.lo - 0.08 * span;
            (bottom, bottom..vb.hi + 0.06 * span)
        } else {
            let mut z = vb;
            z.add(0.0);
            let r = z.padded(0.05);
            let start = if z.lo >= 0.0 { 0.0 } else { r.start };
            let end = if z.hi <= 0.0 { 0.0 } else { r.end };
            let r = if end > start { start..end } else { r };
            (0.0, r)
        };
        let labels = Some(b.labels.as_slice());
        let chars = max_chars(
            (0..n)
                .map(|i| cell_label(labels, i))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        let x_hint = label_hint(n, 860.0, chars as f64 * 8.0 + 10.0);
        let mut chart = ChartBuilder::on(root)
            .caption(b.title, (FONT, 24))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(78)
            .build_cartesian_2d(-0.6..n as f64 - 0.4, yr)?;
        let fx = |v: &f64| {
            tick_index(*v, n)
                .map(|i| cell_label(labels, i))
                .unwrap_or_default()
        };
        let log_y = b.log_y;
        let fy = move |v: &f64| if log_y { String::new() } else { fmt_num(*v) };
        let mut mesh = chart.configure_mesh();
        mesh.disable_x_mesh()
            .light_line_style(FAINT)
            .x_desc(b.x_label)
            .y_desc(b.y_label)
            .x_labels(x_hint)
            .y_labels(9)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16));
        if log_y {
            mesh.disable_y_mesh()
                .set_tick_mark_size(LabelAreaPosition::Left, 0);
        }
        mesh.draw()?;
        if log_y {
            let (xr, yr) = (chart.x_range(), chart.y_range());
            draw_log_axis(&mut chart, false, &xr, &yr, 14)?;
        }
        let marked = |i: usize| b.highlight.contains(&i);
        let rect = |i: usize, v: f64, c: RGBColor| {
            let x = i as f64;
            Rectangle::new([(x - 0.4, base), (x + 0.4, v)], c.filled())
        };
        let plain = colour(0);
        let strong = colour(3);
        chart.draw_series(
            bars.iter()
                .enumerate()
                .filter(|&(i, _)| !marked(i))
                .filter_map(|(i, v)| v.map(|v| rect(i, v, plain))),
        )?;
        if !b.highlight.is_empty() {
            let name = if b.highlight_name.is_empty() {
                "highlighted"
            } else {
                b.highlight_name
            };
            chart
                .draw_series(
                    bars.iter()
                        .enumerate()
                        .filter(|&(i, _)| marked(i))
                        .filter_map(|(i, v)| v.map(|v| rect(i, v, strong))),
                )?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], strong.filled())
                });
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .label_font((FONT, 15))
                .draw()?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Directions in the plane

/// Writes feature directions in 2-D to `path` (SVG): one arrow from the origin per vector with
/// a dot at the tip and its label beside it, on axes symmetric around 0 with equal scales.
/// Labels missing from `labels` fall back to the vector's index.
pub fn directions_2d(
    path: &Path,
    title: &str,
    vectors: &[(f64, f64)],
    labels: &[String],
) -> Result<()> {
    let points: Vec<(usize, f64, f64)> = vectors
        .iter()
        .enumerate()
        .filter_map(|(i, &(x, y))| Some((i, axis_value(x, false)?, axis_value(y, false)?)))
        .collect();
    render(path, (780, 800), |root| {
        if points.is_empty() {
            return draw_no_data(root, title, 24);
        }
        let radius = points
            .iter()
            .map(|&(_, x, y)| x.hypot(y))
            .fold(0.0f64, f64::max);
        let radius = if radius > 0.0 && radius.is_finite() {
            radius
        } else {
            1.0
        };
        let lim = radius * 1.3;
        let body = root.titled(title, (FONT, 24))?;
        let (w, h) = body.dim_in_pixel();
        let (margin, x_area, y_area) = (15u32, 45u32, 65u32);
        let pw = w.saturating_sub(2 * margin + y_area).max(1) as f64;
        let ph = h.saturating_sub(2 * margin + x_area).max(1) as f64;
        // Stretch the range of the longer side so one unit spans as many pixels on both axes.
        let (xl, yl) = if pw >= ph {
            (lim * pw / ph, lim)
        } else {
            (lim, lim * ph / pw)
        };
        let mut chart = ChartBuilder::on(&body)
            .margin(margin)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(-xl..xl, -yl..yl)?;
        let f = |v: &f64| fmt_num(*v);
        chart
            .configure_mesh()
            .light_line_style(FAINT)
            .x_labels(9)
            .y_labels(9)
            .x_label_formatter(&f)
            .y_label_formatter(&f)
            .label_style((FONT, 13))
            .draw()?;
        let axis = RGBColor(150, 150, 150);
        chart.draw_series(LineSeries::new(
            vec![(-xl, 0.0), (xl, 0.0)],
            axis.stroke_width(1),
        ))?;
        chart.draw_series(LineSeries::new(
            vec![(0.0, -yl), (0.0, yl)],
            axis.stroke_width(1),
        ))?;
        let circle: Vec<(f64, f64)> = (0..=240)
            .map(|k| {
                let t = k as f64 / 240.0 * std::f64::consts::TAU;
                (radius * t.cos(), radius * t.sin())
            })
            .collect();
        chart.draw_series(DashedLineSeries::new(
            circle,
            4,
            4,
            RGBColor(190, 190, 190).stroke_width(1),
        ))?;

        let head = 0.07 * lim;
        let text = (FONT, 15)
            .into_font()
            .color(&INK)
            .pos(Pos::new(HPos::Center, VPos::Center));
        for &(i, x, y) in &points {
            let c = colour(i);
            let norm = x.hypot(y);
            chart.draw_series(LineSeries::new(vec![(0.0, 0.0), (x, y)], c.stroke_width(2)))?;
            if norm > 2.0 * head {
                let back = (-y).atan2(-x);
                for turn in [-0.45f64, 0.45] {
                    let a = back + turn;
                    let end = (x + head * a.cos(), y + head * a.sin());
                    chart.draw_series(LineSeries::new(vec![(x, y), end], c.stroke_width(2)))?;
                }
            }
            chart.draw_series(std::iter::once(Circle::new((x, y), 5, c.filled())))?;
            let (ux, uy) = if norm > 0.0 {
                (x / norm, y / norm)
            } else {
                (0.0, 1.0)
            };
            let at = (x + ux * 0.12 * lim, y + uy * 0.12 * lim);
            let label = labels.get(i).cloned().unwrap_or_else(|| i.to_string());
            chart.draw_series(std::iter::once(Text::new(label, at, text.clone())))?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Phase diagram

/// Writes the categorical grid `p` to `path` (SVG), with a legend of the categories.
pub fn phase_diagram(path: &Path, p: &PhaseDiagram) -> Result<()> {
    let nrows = p.cells.len();
    let ncols = p.cells.iter().map(Vec::len).max().unwrap_or(0);
    let names: Vec<&str> = p.categories.to_vec();
    let legend_w = (max_chars(names.iter().copied()) as u32 * 9 + 60).clamp(130, 320);
    render(path, (900 + legend_w, 760), |root| {
        if nrows == 0 || ncols == 0 {
            return draw_no_data(root, p.title, 24);
        }
        let body = root.titled(p.title, (FONT, 24))?;
        let (w, hgt) = body.dim_in_pixel();
        let (main, side) = body.split_horizontally(w.saturating_sub(legend_w));
        let (x_area, y_area) = (55u32, 80u32);
        let (mw, _) = main.dim_in_pixel();
        let plot_w = (mw as f64 - y_area as f64 - 20.0).max(50.0);
        let plot_h = (hgt as f64 - x_area as f64 - 20.0).max(50.0);
        let value_text = |values: &[f64], i: usize| {
            values
                .get(i)
                .map(|&v| fmt_num(v))
                .unwrap_or_else(|| i.to_string())
        };
        let x_chars = (0..ncols)
            .map(|i| value_text(p.x_values, i).len())
            .max()
            .unwrap_or(1);
        let x_hint = label_hint(ncols, plot_w, x_chars as f64 * 8.0 + 12.0);
        let y_hint = label_hint(nrows, plot_h, 18.0);
        let mut chart = ChartBuilder::on(&main)
            .margin(10)
            .x_label_area_size(x_area)
            .y_label_area_size(y_area)
            .build_cartesian_2d(-0.5..ncols as f64 - 0.5, -0.5..nrows as f64 - 0.5)?;
        let fx = |v: &f64| {
            tick_index(*v, ncols)
                .map(|i| value_text(p.x_values, i))
                .unwrap_or_default()
        };
        let fy = |v: &f64| {
            tick_index(*v, nrows)
                .map(|i| value_text(p.y_values, i))
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(p.x_label)
            .y_desc(p.y_label)
            .x_labels(x_hint)
            .y_labels(y_hint)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15))
            .draw()?;
        let paint = |k: usize| {
            if k < names.len() {
                colour(k)
            } else {
                MISSING
            }
        };
        chart.draw_series(p.cells.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, &k)| {
                let (x, y) = (c as f64, r as f64);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], paint(k).filled())
            })
        }))?;

        // Legend: a swatch and a name per category.
        let font = (FONT, 15).into_font().color(&INK);
        for (k, name) in names.iter().enumerate() {
            let y = 20 + 26 * k as i32;
            let swatch = [(12, y), (30, y + 18)];
            side.draw(&Rectangle::new(swatch, colour(k).filled()))?;
            side.draw(&Rectangle::new(swatch, INK.stroke_width(1)))?;
            side.draw(&Text::new(name.to_string(), (38, y + 2), font.clone()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_svg(path: &Path) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        if let Ok(dir) = std::env::var("PLOT_DUMP_DIR") {
            let name = path.file_name().unwrap();
            std::fs::write(Path::new(&dir).join(name), &text).unwrap();
        }
        let head = text.trim_start();
        assert!(
            head.starts_with("<svg") || head.starts_with("<?xml"),
            "not an SVG: {}",
            &text[..text.len().min(80)]
        );
        assert!(text.trim_end().ends_with("</svg>"), "unterminated SVG");
        text
    }

    /// The trimmed contents of the SVG's `<text>` elements.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    /// The `y` attribute of the first `<text>` element whose content is `label`.
    fn text_y(svg: &str, label: &str) -> Option<f64> {
        svg.split("<text").skip(1).find_map(|t| {
            let body = &t[t.find('>')? + 1..];
            if body[..body.find("</text>")?].trim() != label {
                return None;
            }
            let y = &t[t.find(" y=\"")? + 4..];
            y[..y.find('"')?].parse().ok()
        })
    }

    fn line(name: &str, f: impl Fn(f64) -> f64) -> Series {
        let x: Vec<f64> = (1..=50).map(|i| i as f64 * 10.0).collect();
        let y = x.iter().map(|&v| f(v)).collect();
        Series {
            name: name.to_string(),
            x,
            y,
        }
    }

    #[test]
    fn line_plot_shows_title_and_series() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("loss.svg");
        let plot = LinePlot {
            title: "Training loss",
            x_label: "step",
            y_label: "loss",
            log_x: false,
            log_y: true,
            series: vec![
                line("train loss", |s| 4.0 / s.sqrt()),
                line("test loss", |s| 5.0 / s.sqrt() + 0.01),
            ],
            markers: vec![(200.0, "phase change".into())],
            hlines: vec![(2.08, "ln(64)/2".into())],
        };
        line_plot(&path, &plot).unwrap();
        let svg = read_svg(&path);
        for text in [
            "Training loss",
            "train loss",
            "test loss",
            "phase change",
            "ln(64)/2",
        ] {
            assert!(svg.contains(text), "missing {text}");
        }
        assert!(svg.contains("<polyline") || svg.contains("<path"));
    }

    #[test]
    fn line_plot_survives_bad_values() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bad.svg");
        let plot = LinePlot {
            title: "Odd values",
            log_x: true,
            log_y: true,
            series: vec![Series {
                name: "s".into(),
                x: vec![0.0, 1.0, 2.0, f64::NAN, 4.0, 5.0],
                y: vec![1.0, -1.0, f64::INFINITY, 3.0, 0.5, 2.0],
            }],
            markers: vec![(f64::NAN, "nan".into()), (-3.0, "negative".into())],
            hlines: vec![(0.0, "zero".into())],
            ..Default::default()
        };
        line_plot(&path, &plot).unwrap();
        let svg = read_svg(&path);
        assert!(svg.contains("Odd values"));
        // A single finite point still gets an axis range.
        let single = LinePlot {
            title: "One point",
            series: vec![Series {
                name: "p".into(),
                x: vec![3.0],
                y: vec![7.0],
            }],
            ..Default::default()
        };
        line_plot(&path, &single).unwrap();
        assert!(read_svg(&path).contains("One point"));
    }

    #[test]
    fn empty_inputs_give_no_data_figures() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let nan_series = LinePlot {
            title: "Nothing finite",
            series: vec![Series {
                name: "all nan".into(),
                x: vec![f64::NAN; 3],
                y: vec![1.0; 3],
            }],
            ..Default::default()
        };
        line_plot(&dir.join("a.svg"), &nan_series).unwrap();
        let svg = read_svg(&dir.join("a.svg"));
        assert!(svg.contains("Nothing finite") && svg.contains("no data"));

        line_plot(
            &dir.join("b.svg"),
            &LinePlot {
                title: "Empty",
                ..Default::default()
            },
        )
        .unwrap();
        assert!(read_svg(&dir.join("b.svg")).contains("no data"));

        let empty: Vec<Vec<f64>> = Vec::new();
        let h = Heatmap {
            title: "Empty heatmap",
            values: &empty,
            row_labels: None,
            col_labels: None,
            x_label: "",
            y_label: "",
            diverging: true,
        };
        heatmap(&dir.join("c.svg"), &h).unwrap();
        assert!(read_svg(&dir.join("c.svg")).contains("no data"));
        let nans = vec![vec![f64::NAN; 2]; 2];
        heatmap(
            &dir.join("c2.svg"),
            &Heatmap {
                values: &nans,
                ..h.clone()
            },
        )
        .unwrap();
        assert!(read_svg(&dir.join("c2.svg")).contains("no data"));

        let b = BarPlot {
            title: "Empty bars",
            values: vec![f64::NAN, -1.0],
            log_y: true,
            ..Default::default()
        };
        bar_plot(&dir.join("d.svg"), &b).unwrap();
        assert!(read_svg(&dir.join("d.svg")).contains("no data"));

        directions_2d(&dir.join("e.svg"), "No vectors", &[(f64::NAN, 1.0)], &[]).unwrap();
        assert!(read_svg(&dir.join("e.svg")).contains("no data"));

        let p = PhaseDiagram {
            title: "Empty phases",
            x_label: "",
            y_label: "",
            x_values: &[],
            y_values: &[],
            cells: &[],
            categories: &[],
        };
        phase_diagram(&dir.join("f.svg"), &p).unwrap();
        assert!(read_svg(&dir.join("f.svg")).contains("no data"));

        line_grid(&dir.join("g.svg"), "No panels", &[], 3).unwrap();
        assert!(read_svg(&dir.join("g.svg")).contains("no data"));
    }

    #[test]
    fn heatmap_draws_every_cell() {
        let tmp = tempfile::tempdir().unwrap();
        let values = vec![
            vec![1.0, -2.0, 0.5],
            vec![0.0, 3.0, f64::NAN],
            vec![-1.0, 2.0, 1.5],
        ];
        for diverging in [true, false] {
            let path = tmp.path().join(format!("h{diverging}.svg"));
            let h = Heatmap {
                title: "Attention pattern",
                values: &values,
                row_labels: Some(vec!["a".into(), "b".into(), "c".into()]),
                col_labels: None,
                x_label: "key",
                y_label: "query",
                diverging,
            };
            heatmap(&path, &h).unwrap();
            let svg = read_svg(&path);
            assert!(svg.contains("Attention pattern"));
            assert!(svg.matches("<rect").count() >= 9);
            assert!(svg.contains("value range"));
            let (a, c) = (text_y(&svg, "a").unwrap(), text_y(&svg, "c").unwrap());
            assert!(a < c, "row 0 must be drawn on top");
        }
    }

    #[test]
    fn large_heatmap_and_constant_values() {
        let tmp = tempfile::tempdir().unwrap();
        let values: Vec<Vec<f64>> = (0..113)
            .map(|r| (0..97).map(|c| ((r * c) % 113) as f64).collect())
            .collect();
        let h = Heatmap {
            title: "Big",
            values: &values,
            row_labels: None,
            col_labels: None,
            x_label: "b",
            y_label: "a",
            diverging: false,
        };
        let path = tmp.path().join("big.svg");
        heatmap(&path, &h).unwrap();
        assert!(read_svg(&path).matches("<rect").count() >= 113 * 97);
        let flat = vec![vec![2.0; 4]; 4];
        let path = tmp.path().join("flat.svg");
        heatmap(
            &path,
            &Heatmap {
                values: &flat,
                ..h.clone()
            },
        )
        .unwrap();
        read_svg(&path);
        let zeros = vec![vec![0.0; 4]; 2];
        let path = tmp.path().join("zeros.svg");
        heatmap(
            &path,
            &Heatmap {
                values: &zeros,
                diverging: true,
                ..h
            },
        )
        .unwrap();
        read_svg(&path);
    }

    #[test]
    fn bar_plot_with_highlights() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("spectrum.svg");
        let values: Vec<f64> = (0..57).map(|k| 1.0 / (1.0 + k as f64)).collect();
        let b = BarPlot {
            title: "Fourier spectrum",
            x_label: "frequency",
            y_label: "norm",
            labels: (0..57).map(|k| k.to_string()).collect(),
            values: values.clone(),
            highlight: vec![3, 14, 41],
            highlight_name: "key frequencies",
            log_y: false,
        };
        bar_plot(&path, &b).unwrap();
        let svg = read_svg(&path);
        assert!(svg.contains("Fourier spectrum") && svg.contains("key frequencies"));
        assert!(svg.matches("<rect").count() >= 57);

        let mixed = BarPlot {
            values: vec![1.0, -2.0, f64::NAN, 0.0, 1e-4],
            labels: vec![],
            highlight: vec![1, 99],
            log_y: true,
            ..b.clone()
        };
        let path = tmp.path().join("mixed_log.svg");
        bar_plot(&path, &mixed).unwrap();
        read_svg(&path);
        let path = tmp.path().join("mixed.svg");
        bar_plot(
            &path,
            &BarPlot {
                log_y: false,
                ..mixed
            },
        )
        .unwrap();
        read_svg(&path);
    }

    #[test]
    fn pentagon_of_directions() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("pentagon.svg");
        let vectors: Vec<(f64, f64)> = (0..5)
            .map(|k| {
                let t = k as f64 * std::f64::consts::TAU / 5.0;
                (t.cos(), t.sin())
            })
            .chain([(0.0, 0.0), (f64::NAN, 0.2)])
            .collect();
        let labels: Vec<String> = (0..5).map(|k| format!("feature {k}")).collect();
        directions_2d(&path, "Five features in two dimensions", &vectors, &labels).unwrap();
        let svg = read_svg(&path);
        assert!(svg.contains("Five features in two dimensions"));
        for k in 0..5 {
            assert!(svg.contains(&format!("feature {k}")));
        }
        assert!(
            texts(&svg).iter().any(|t| t == "5"),
            "unlabelled vector gets its index"
        );
    }

    #[test]
    fn phase_diagram_lists_categories() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("phase.svg");
        let xs = [0.01, 0.1, 1.0, 10.0];
        let ys = [0.001, 0.01, 0.1];
        let cells = vec![vec![0, 0, 1, 2], vec![0, 1, 1, 2], vec![1, 2, 2, 7]];
        let cats = ["not represented", "superposition", "dedicated dimension"];
        let p = PhaseDiagram {
            title: "Phase diagram",
            x_label: "relative importance",
            y_label: "feature density",
            x_values: &xs,
            y_values: &ys,
            cells: &cells,
            categories: &cats,
        };
        phase_diagram(&path, &p).unwrap();
        let svg = read_svg(&path);
        assert!(svg.contains("Phase diagram"));
        for c in cats {
            assert!(svg.contains(c), "legend lacks {c}");
        }
        assert!(svg.matches("<rect").count() >= 12);
    }

    #[test]
    fn grid_of_panels() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("heads.svg");
        let panels: Vec<LinePlot> = (0..5)
            .map(|h| LinePlot {
                title: if h == 0 { "head 0.0" } else { "another head" },
                x_label: "step",
                y_label: "score",
                series: vec![line(&format!("series {h}"), move |s| {
                    (s * 0.01 * h as f64).sin()
                })],
                markers: vec![(250.0, "bump".into())],
                ..Default::default()
            })
            .chain(std::iter::once(LinePlot {
                title: "empty head",
                ..Default::default()
            }))
            .collect();
        line_grid(&path, "Induction scores per head", &panels, 3).unwrap();
        let svg = read_svg(&path);
        assert!(svg.contains("Induction scores per head") && svg.contains("head 0.0"));
        for h in 0..5 {
            assert!(svg.contains(&format!("series {h}")));
        }
        assert!(svg.contains("no data"));
        // More columns than panels is fine.
        line_grid(&path, "Wide", &panels[..2], 10).unwrap();
        assert!(read_svg(&path).contains("Wide"));
    }

    #[test]
    fn tick_text_is_short() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(1.0), "1");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_num(1500.0), "1500");
        assert_eq!(fmt_num(1e-5), "1e-5");
        assert_eq!(fmt_num(-2.5e7), "-2.5e7");
        assert_eq!(fmt_num(1.0 / 3.0), "0.3333");
        assert_eq!(nice_ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(
            nice_ticks(-3.0, 3.0, 8),
            vec![-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
        );
        assert_eq!(log_ticks(-3.2, 0.5), vec![-3.0, -2.0, -1.0, 0.0]);
        let near: Vec<String> = log_ticks(-0.8, 0.2)
            .iter()
            .map(|&t| fmt_num(10f64.powf(t)))
            .collect();
        assert_eq!(near, ["0.2", "0.5", "1"]);
    }
}
