//! `kvgear plot`: charts from the CSVs in results/, written as SVG and PNG (plotters).
//!
//! Three kinds: `scatter` (one marker per row, a colour per series, optionally the Pareto front:
//! the rows no other row beats on both axes, smaller x and better y), `line` (each series sorted
//! by x and joined) and `stacked` (one bar per x category, the y columns stacked; the last row of
//! each category counts, as CSVs are appended to). PNGs are drawn with an embedded DejaVu Sans
//! (assets/fonts, Bitstream Vera licence), so no system font configuration is needed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Scatter,
    Line,
    Stacked,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

#[derive(clap::Args, Clone, Debug)]
pub struct PlotArgs {
    /// A CSV written by bench, compare, memory or sweep.
    pub csv: PathBuf,
    /// Column on the x axis (a category column for `--kind stacked`).
    #[arg(long)]
    pub x: String,
    /// Column on the y axis; for `--kind stacked`, several, comma-separated, stacked in order.
    #[arg(long)]
    pub y: String,
    /// Column naming each series (scatter, line).
    #[arg(long, default_value = "strategy")]
    pub series: String,
    /// Column whose value labels each Pareto-front point (e.g. `params`).
    #[arg(long)]
    pub label: Option<String>,
    /// Keep only rows where COLUMN=VALUE, or COLUMN=A|B|... for any of several values
    /// (repeatable; all must hold).
    #[arg(long = "where")]
    pub filters: Vec<String>,
    #[arg(long, value_enum, default_value_t = Kind::Scatter)]
    pub kind: Kind,
    /// Draw the Pareto front (scatter).
    #[arg(long)]
    pub pareto: bool,
    /// Whether a larger or a smaller y is better (for the Pareto front).
    #[arg(long, value_enum, default_value_t = Better::Higher)]
    pub better: Better,
    /// Unit x values are shown in: 1, K, M, G (powers of 1000) or KiB, MiB, GiB.
    #[arg(long, default_value = "1")]
    pub x_unit: String,
    /// Unit y values are shown in (as --x-unit).
    #[arg(long, default_value = "1")]
    pub y_unit: String,
    #[arg(long)]
    pub title: Option<String>,
    /// Output path without extension: OUT.svg and OUT.png are written.
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Image size in pixels, WIDTHxHEIGHT.
    #[arg(long, default_value = "960x640")]
    pub size: String,
}

fn unit(s: &str) -> Result<f64> {
    Ok(match s {
        "1" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("unknown unit '{s}' (1, K, M, G, KiB, MiB, GiB)"),
    })
}

fn axis_name(col: &str, u: &str) -> String {
    if u == "1" {
        col.to_string()
    } else {
        format!("{col} ({u})")
    }
}

/// The rows of a CSV that pass the filters, as (header, rows).
pub fn read_rows(path: &Path, filters: &[String]) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let mut r = csv::ReaderBuilder::new().has_headers(true).from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let header: Vec<String> = r.headers()?.iter().map(str::to_string).collect();
    let mut conds = Vec::new();
    for f in filters {
        let (c, v) = f.split_once('=').with_context(|| format!("--where {f}: expected COLUMN=VALUE"))?;
        let i = col(&header, c.trim(), path)?;
        conds.push((i, v.split('|').map(|x| x.trim().to_string()).collect::<Vec<_>>()));
    }
    let mut rows = Vec::new();
    for (n, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", path.display(), n + 2))?;
        let row: Vec<String> = rec.iter().map(str::to_string).collect();
        if conds.iter().all(|(i, vs)| row.get(*i).is_some_and(|x| vs.iter().any(|v| v == x))) {
            rows.push(row);
        }
    }
    if rows.is_empty() {
        bail!("{}: no rows{}", path.display(), if filters.is_empty() { String::new() } else { format!(" where {}", filters.join(", ")) });
    }
    Ok((header, rows))
}

fn col(header: &[String], name: &str, path: &Path) -> Result<usize> {
    header.iter().position(|h| h == name).with_context(|| format!("{} has no column '{name}' (columns: {})", path.display(), header.join(", ")))
}

fn num(v: &str, name: &str, row: usize) -> Result<f64> {
    let x: f64 = v.parse().with_context(|| format!("column {name}, row {row}: '{v}' is not a number"))?;
    if !x.is_finite() {
        bail!("column {name}, row {row}: {v} is not finite");
    }
    Ok(x)
}

/// Indices of the Pareto-optimal points: no other point has x <= and y at least as good with
/// one of them strictly better. Sorted by x.
pub fn pareto_front(pts: &[(f64, f64)], better: Better) -> Vec<usize> {
    let good = |y: f64| if better == Better::Higher { y } else { -y };
    let mut idx: Vec<usize> = (0..pts.len()).collect();
    idx.sort_by(|&a, &b| pts[a].0.total_cmp(&pts[b].0).then(good(pts[b].1).total_cmp(&good(pts[a].1))));
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for i in idx {
        if good(pts[i].1) > best {
            best = good(pts[i].1);
            front.push(i);
        }
    }
    front
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
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
    C[i % C.len()]
}

/// A series: its name and points (x, y, label).
type Series = (String, Vec<(f64, f64, String)>);

enum Data {
    Points(Vec<Series>),
    Stacked { categories: Vec<String>, parts: Vec<String>, values: Vec<Vec<f64>> },
}

fn pe<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plot: {e:?}")
}

fn range(lo: f64, hi: f64, from_zero: bool) -> std::ops::Range<f64> {
    let lo = if from_zero { lo.min(0.0) } else { lo };
    let pad = if hi > lo { (hi - lo) * 0.06 } else { hi.abs().max(1.0) * 0.1 };
    (if from_zero && lo >= 0.0 { 0.0 } else { lo - pad })..hi + pad
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, a: &PlotArgs, data: &Data) -> Result<()> {
    root.fill(&WHITE).map_err(pe)?;
    let title = a.title.clone().unwrap_or_else(|| format!("{} vs {}", a.y, a.x));
    let (xu, yu) = (a.x_unit.as_str(), a.y_unit.as_str());
    match data {
        Data::Points(series) => {
            let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().map(|q| (q.0, q.1))).collect();
            let (x0, x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| (l.min(p.0), h.max(p.0)));
            let (y0, y1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| (l.min(p.1), h.max(p.1)));
            let mut chart = ChartBuilder::on(&root)
                .caption(&title, (FAMILY, 22))
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(range(x0, x1, a.kind == Kind::Line), range(y0, y1, false))
                .map_err(pe)?;
            chart
                .configure_mesh()
                .x_desc(axis_name(&a.x, xu))
                .y_desc(axis_name(&a.y, yu))
                .label_style((FAMILY, 13))
                .axis_desc_style((FAMILY, 15))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(pe)?;
            if a.pareto {
                let front = pareto_front(&all, a.better);
                let labels: Vec<String> = series.iter().flat_map(|(n, p)| p.iter().map(move |q| format!("{n} {}", q.2).trim().to_string())).collect();
                let line: Vec<(f64, f64)> = front.iter().map(|&i| all[i]).collect();
                chart
                    .draw_series(LineSeries::new(line.clone(), ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(2)))
                    .map_err(pe)?
                    .label("Pareto front")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6).stroke_width(2)));
                chart
                    .draw_series(front.iter().map(|&i| Text::new(labels[i].clone(), (all[i].0, all[i].1), (FAMILY, 11).into_font())))
                    .map_err(pe)?;
            }
            for (si, (name, pts)) in series.iter().enumerate() {
                let c = color(si);
                let xy: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.1)).collect();
                if a.kind == Kind::Line {
                    chart.draw_series(LineSeries::new(xy.clone(), c.stroke_width(2))).map_err(pe)?;
                }
                chart
                    .draw_series(xy.iter().map(|&p| Circle::new(p, 4, c.filled())))
                    .map_err(pe)?
                    .label(name.clone())
                    .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font((FAMILY, 13))
                .draw()
                .map_err(pe)?;
        }
        Data::Stacked { categories, parts, values } => {
            let top = values.iter().map(|v| v.iter().sum::<f64>()).fold(0.0, f64::max);
            let n = categories.len();
            let mut chart = ChartBuilder::on(&root)
                .caption(&title, (FAMILY, 22))
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0.0..top * 1.08)
                .map_err(pe)?;
            let cats = categories.clone();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_desc(a.x.clone())
                .y_desc(axis_name("bytes", yu))
                .label_style((FAMILY, 13))
                .axis_desc_style((FAMILY, 15))
                .x_labels(n)
                .x_label_formatter(&move |v| match v {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => cats.get(*i).cloned().unwrap_or_default(),
                    SegmentValue::Last => String::new(),
                })
                .draw()
                .map_err(pe)?;
            for (pi, part) in parts.iter().enumerate() {
                let c = color(pi);
                let bars: Vec<Rectangle<(SegmentValue<usize>, f64)>> = (0..n)
                    .map(|i| {
                        let base: f64 = values[i][..pi].iter().sum();
                        let mut r = Rectangle::new([(SegmentValue::Exact(i), base), (SegmentValue::Exact(i + 1), base + values[i][pi])], c.filled());
                        r.set_margin(0, 0, 12, 12);
                        r
                    })
                    .collect();
                chart
                    .draw_series(bars)
                    .map_err(pe)?
                    .label(part.clone())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font((FAMILY, 13))
                .draw()
                .map_err(pe)?;
        }
    }
    root.present().map_err(pe)?;
    Ok(())
}

fn load(a: &PlotArgs) -> Result<Data> {
    let (header, rows) = read_rows(&a.csv, &a.filters)?;
    let (xu, yu) = (unit(&a.x_unit)?, unit(&a.y_unit)?);
    let xi = col(&header, &a.x, &a.csv)?;
    let ys: Vec<&str> = a.y.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if ys.is_empty() {
        bail!("--y names no column");
    }
    let yi = ys.iter().map(|y| col(&header, y, &a.csv)).collect::<Result<Vec<_>>>()?;
    if a.kind == Kind::Stacked {
        let mut categories: Vec<String> = Vec::new();
        let mut values: Vec<Vec<f64>> = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let v = yi.iter().zip(&ys).map(|(&i, y)| Ok(num(&row[i], y, r + 2)? / yu)).collect::<Result<Vec<f64>>>()?;
            match categories.iter().position(|c| *c == row[xi]) {
                Some(p) => values[p] = v,
                None => {
                    categories.push(row[xi].clone());
                    values.push(v);
                }
            }
        }
        return Ok(Data::Stacked { categories, parts: ys.iter().map(|s| s.to_string()).collect(), values });
    }
    if ys.len() > 1 {
        bail!("several --y columns need --kind stacked");
    }
    let si = col(&header, &a.series, &a.csv)?;
    let li = a.label.as_deref().map(|l| col(&header, l, &a.csv)).transpose()?;
    let mut series: Vec<Series> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let p = (num(&row[xi], &a.x, r + 2)? / xu, num(&row[yi[0]], ys[0], r + 2)? / yu, li.map(|i| row[i].clone()).unwrap_or_default());
        match series.iter_mut().find(|s| s.0 == row[si]) {
            Some(s) => s.1.push(p),
            None => series.push((row[si].clone(), vec![p])),
        }
    }
    if a.kind == Kind::Line {
        for s in &mut series {
            s.1.sort_by(|p, q| p.0.total_cmp(&q.0));
        }
    }
    Ok(Data::Points(series))
}

/// `kvgear plot`: writes `OUT.svg` and `OUT.png`; returns their paths.
pub fn run(a: &PlotArgs) -> Result<Vec<PathBuf>> {
    let (w, h) = a.size.split_once('x').and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?))).filter(|&(w, h)| w >= 200 && h >= 150 && w <= 8192 && h <= 8192).with_context(|| format!("--size {}: expected WIDTHxHEIGHT between 200x150 and 8192x8192", a.size))?;
    let data = load(a)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Registering twice (a second plot in one process) is harmless: the same bytes replace them.
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).map_err(|_| anyhow!("the embedded font does not load"))?;
    let svg = a.out.with_extension("svg");
    let png = a.out.with_extension("png");
    draw(SVGBackend::new(&svg, (w, h)).into_drawing_area(), a, &data).with_context(|| format!("writing {}", svg.display()))?;
    draw(BitMapBackend::new(&png, (w, h)).into_drawing_area(), a, &data).with_context(|| format!("writing {}", png.display()))?;
    Ok(vec![svg, png])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_front_keeps_the_undominated_points() {
        let pts = [(1.0, 0.5), (2.0, 0.9), (2.0, 0.7), (3.0, 0.8), (4.0, 0.95), (0.5, 0.1)];
        assert_eq!(pareto_front(&pts, Better::Higher), [5, 0, 1, 4]);
        assert_eq!(pareto_front(&pts, Better::Lower), [5]);
        assert_eq!(pareto_front(&[], Better::Higher), Vec::<usize>::new());
    }
}
