//! The report: the table, the JSON file and the chart.

use std::time::Duration;

/// The three stacks compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stack {
    Quicseal,
    Quinn,
    Tcp,
}

impl Stack {
    pub(crate) const ALL: [Stack; 3] = [Stack::Quicseal, Stack::Quinn, Stack::Tcp];

    /// Its name in `--stacks` and in the JSON output.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stack::Quicseal => "quicseal",
            Stack::Quinn => "quinn",
            Stack::Tcp => "tcp",
        }
    }
}

/// One value per stack.
#[derive(Debug, Default)]
pub(crate) struct PerStack<T> {
    quicseal: T,
    quinn: T,
    tcp: T,
}

impl<T> PerStack<T> {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        [&self.quicseal, &self.quinn, &self.tcp].into_iter()
    }
}

impl<T> std::ops::Index<Stack> for PerStack<T> {
    type Output = T;
    fn index(&self, s: Stack) -> &T {
        match s {
            Stack::Quicseal => &self.quicseal,
            Stack::Quinn => &self.quinn,
            Stack::Tcp => &self.tcp,
        }
    }
}

impl<T> std::ops::IndexMut<Stack> for PerStack<T> {
    fn index_mut(&mut self, s: Stack) -> &mut T {
        match s {
            Stack::Quicseal => &mut self.quicseal,
            Stack::Quinn => &mut self.quinn,
            Stack::Tcp => &mut self.tcp,
        }
    }
}

#[derive(Default)]
pub(crate) struct Row {
    pub(crate) workload: String,
    pub(crate) unit: &'static str,
    /// Higher is better (throughput) or lower is better (latency).
    pub(crate) higher_better: bool,
    pub(crate) values: PerStack<Vec<f64>>,
}

impl Row {
    /// Whether any stack ran this workload (`--only`/`--stacks` leave the others empty).
    fn measured(&self) -> bool {
        self.values.iter().any(|v| !v.is_empty())
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// CPU time this process has used so far, every thread, user and system (the kernel's
/// `CLOCK_PROCESS_CPUTIME_ID`, nanoseconds).
pub(crate) fn cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub(crate) fn percentile(lat: &mut [Duration], p: f64) -> f64 {
    lat.sort_unstable();
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat[i].as_secs_f64() * 1e6
}

fn ratio(row: &Row, base: Stack) -> f64 {
    let (q, b) = (median(&row.values[Stack::Quicseal]), median(&row.values[base]));
    if b == 0.0 || b.is_nan() { f64::NAN } else { q / b }
}

pub(crate) fn print_table(rows: &[Row], quick: bool) {
    println!(
        "\nquicseal vs raw quinn vs TLS over TCP ({}; medians of alternating runs)\n",
        if quick { "quick" } else { "full" }
    );
    if cfg!(debug_assertions) {
        // CI builds the benchmark in the test profile to check that it runs, in a fraction of
        // a release build's time; such figures say nothing about speed.
        println!("NOT A MEASUREMENT: built without optimizations (`--profile dev`); for figures run `cargo bench`.\n");
    }
    println!("| workload | unit | quicseal | raw quinn | TLS/TCP | quicseal/quinn | quicseal/TCP |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let num = |x: f64| if x.is_nan() { "-".to_owned() } else { format!("{x:.1}") };
    for row in rows.iter().filter(|r| r.measured()) {
        let m: Vec<f64> = row.values.iter().map(|v| median(v)).collect();
        let r = |base| {
            let x = ratio(row, base);
            if x.is_nan() {
                "-".to_owned()
            } else {
                format!("{x:.2}{}", if row.higher_better { "" } else { " (cost)" })
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.workload,
            row.unit,
            num(m[0]),
            num(m[1]),
            num(m[2]),
            r(Stack::Quinn),
            r(Stack::Tcp)
        );
    }
    println!("\nRatios: throughput as quicseal's share of the baseline (higher is better); \"(cost)\" rows as");
    println!("quicseal's multiple of the baseline's time or memory (lower is better).");
}

pub(crate) fn write_json(rows: &[Row]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!(
        rows.iter()
            .map(|r| serde_json::json!({
                "workload": r.workload,
                "unit": r.unit,
                "higher_is_better": r.higher_better,
                "quicseal": r.values[Stack::Quicseal],
                "quinn": r.values[Stack::Quinn],
                "tcp": r.values[Stack::Tcp],
                "median": {
                    "quicseal": median(&r.values[Stack::Quicseal]),
                    "quinn": median(&r.values[Stack::Quinn]),
                    "tcp": median(&r.values[Stack::Tcp]),
                },
            }))
            .collect::<Vec<_>>()
    );
    let path = dir.join("compare.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nwrote {}", path.display());
}

/// The chart: quicseal's performance relative to each baseline, one pair of bars per workload
/// (1.0 = as fast as the baseline; time and memory rows inverted so that longer is better
/// everywhere).
pub(crate) fn write_svg(rows: &[Row]) {
    use plotters::prelude::*;
    let rows: Vec<&Row> = rows.iter().filter(|r| r.measured()).collect();
    let relative = |row: &Row, base: Stack| {
        let r = ratio(row, base);
        if row.higher_better { r } else { 1.0 / r }
    };
    let bars: Vec<[f64; 2]> = rows.iter().map(|r| [relative(r, Stack::Quinn), relative(r, Stack::Tcp)]).collect();
    let top = bars.iter().flatten().copied().filter(|x| x.is_finite()).fold(1.5f64, f64::max) * 1.1;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/compare.svg");
    let height = 80 + 34 * rows.len() as u32;
    let root = SVGBackend::new(&path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("quicseal relative to raw quinn and TLS/TCP (1.0 = equal, longer is better)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(420)
        .build_cartesian_2d(0f64..top, 0f64..n)
        .unwrap();
    let names: Vec<String> =
        rows.iter().map(|r| format!("{}{}", r.workload, if r.higher_better { "" } else { " (inverted)" })).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len() * 2 + 1)
        .y_label_formatter(&|y: &f64| {
            // Labels sit at the middle of each row's band.
            let i = y.floor() as usize;
            if (y - y.floor() - 0.5).abs() < 1e-6 && i < names.len() {
                names[names.len() - 1 - i].clone()
            } else {
                String::new()
            }
        })
        .x_desc("quicseal / baseline")
        .draw()
        .unwrap();
    const COLORS: [RGBColor; 2] = [RGBColor(52, 101, 164), RGBColor(237, 125, 49)];
    let labels = ["vs raw quinn", "vs TLS/TCP"];
    for (stack, (&color, label)) in COLORS.iter().zip(labels).enumerate() {
        let rects = bars.iter().enumerate().filter(|(_, b)| b[stack].is_finite()).map(|(i, b)| {
            // Row 0 at the top: band (n - 1 - i); quinn's bar above TCP's.
            let base = n - 1.0 - i as f64;
            let (y0, y1) = if stack == 0 { (base + 0.5, base + 0.9) } else { (base + 0.1, base + 0.5) };
            Rectangle::new([(0.0, y0), (b[stack], y1)], color.filled())
        });
        chart
            .draw_series(rects)
            .unwrap()
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart.draw_series(std::iter::once(PathElement::new(vec![(1.0, 0.0), (1.0, n)], BLACK.stroke_width(1)))).unwrap();
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .unwrap();
    root.present().unwrap();
    println!("wrote {}", path.display());
}
