//! `--report DIR`: `latency.svg`, each RPC's mean latency per second of the
//! run, and `histograms.svg`, each RPC's latency distribution in
//! power-of-two buckets (plotters, SVG backend).

use std::path::Path;

use plotters::prelude::*;

use crate::stats::{Snapshot, rpcs};

type Error = Box<dyn std::error::Error>;

/// Writes both charts into `dir`.
pub fn write(dir: &Path, snap: &Snapshot) -> Result<(), Error> {
    latency_over_time(&dir.join("latency.svg"), snap)?;
    histograms(&dir.join("histograms.svg"), snap)?;
    Ok(())
}

fn latency_over_time(path: &Path, snap: &Snapshot) -> Result<(), Error> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = rpcs()
        .map(|rpc| {
            let points = snap
                .timeline
                .iter()
                .filter(|((r, _), _)| *r == rpc)
                .map(|((_, sec), t)| {
                    let mean_ms = t.total_us as f64 / t.calls.max(1) as f64 / 1000.0;
                    (*sec as f64, mean_ms)
                })
                .collect();
            (rpc, points)
        })
        .filter(|(_, p): &(&str, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    let max_x = snap.elapsed.as_secs_f64().max(1.0);
    let max_y = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("metald-stress: mean latency per second", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("ms")
        .draw()?;
    for (i, (rpc, points)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(rpc)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Buckets of `[2^i, 2^(i+1))` µs with their counts.
fn buckets(h: &hdrhistogram::Histogram<u64>) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = Vec::new();
    for v in h.iter_recorded() {
        let b = 63 - v.value_iterated_to().max(1).leading_zeros();
        match out.last_mut() {
            Some((last, n)) if *last == b => *n += v.count_at_value(),
            _ => out.push((b, v.count_at_value())),
        }
    }
    out
}

fn bucket_label(b: u32) -> String {
    let us = 1u64 << b;
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{}s", us / 1_000_000)
    }
}

fn histograms(path: &Path, snap: &Snapshot) -> Result<(), Error> {
    let called: Vec<(&str, Vec<(u32, u64)>)> = rpcs()
        .filter_map(|r| snap.latency.get(r).map(|h| (r, buckets(h))))
        .collect();
    let rows = called.len().div_ceil(3).max(1);
    let root = SVGBackend::new(path, (1200, 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, 3));
    let lo = called
        .iter()
        .flat_map(|(_, b)| b.first())
        .map(|(b, _)| *b)
        .min()
        .unwrap_or(0);
    let hi = called
        .iter()
        .flat_map(|(_, b)| b.last())
        .map(|(b, _)| *b)
        .max()
        .unwrap_or(1)
        + 1;
    for (area, (rpc, b)) in areas.iter().zip(called) {
        let top = b.iter().map(|(_, n)| *n).max().unwrap_or(1);
        let mut chart = ChartBuilder::on(area)
            .caption(rpc, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(lo..hi, 0u64..top + top / 10 + 1)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .x_label_formatter(&|b| bucket_label(*b))
            .x_desc("latency (power-of-two buckets)")
            .y_desc("calls")
            .draw()?;
        chart.draw_series(
            b.into_iter()
                .map(|(x, n)| Rectangle::new([(x, 0), (x + 1, n)], BLUE.mix(0.6).filled())),
        )?;
    }
    root.present()?;
    Ok(())
}
