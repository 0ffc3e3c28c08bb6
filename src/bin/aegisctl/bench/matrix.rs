//! `aegisctl bench --matrix`: closed-loop calls/s for callers × instances, each cell run with
//! the default (adaptive) wait policy, in blocking mode (nobody spins) and in spin mode
//! (fixed 50 µs budgets on both sides, the old default). The three modes of one cell run
//! back to back against three private buses, so drift of the machine hits them alike;
//! `--repeat` runs every cell several times and reports the median.

use std::time::Duration;

use aegis_client::Spin;
use serde::Serialize;

use super::load::{self, Load};
use super::BenchArgs;
use crate::private_bus::PrivateBus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Default,
    Blocking,
    Spin,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Default, Mode::Blocking, Mode::Spin];
    /// `(caller policy, instance --spin-us)`.
    fn policies(self) -> (Spin, Option<&'static str>) {
        match self {
            Mode::Default => (Spin::Adaptive, None),
            Mode::Blocking => (Spin::Fixed(Duration::ZERO), Some("0")),
            Mode::Spin => (Spin::Fixed(Duration::from_micros(50)), Some("50")),
        }
    }
}

#[derive(Debug, Serialize)]
struct Cell {
    callers: usize,
    instances: usize,
    mode: Mode,
    calls_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.callers.is_empty() || args.callers.contains(&0) {
        return Err("--callers needs a list of counts of at least 1, like 1,2,4,8".into());
    }
    if args.instances.is_empty() || args.instances.contains(&0) {
        return Err("--instances needs a list of counts of at least 1, like 1,2,3".into());
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    let duration = args.duration.unwrap_or(1.0);
    if !(duration > 0.0 && duration.is_finite()) {
        return Err("--duration must be a positive number of seconds".into());
    }
    let mut cells = Vec::new();
    for &n in &args.instances {
        // One private bus per mode, with the mode's instance spin policy.
        let mut buses = Vec::new();
        for mode in Mode::ALL {
            let mut bus = PrivateBus::start()?;
            let extra: Vec<&str> = mode
                .policies()
                .1
                .map(|s| vec!["--spin-us", s])
                .unwrap_or_default();
            for i in 0..n {
                bus.spawn_echo(&args.service, &format!("{}-{i}", args.service), &extra)?;
            }
            buses.push((mode, bus));
        }
        for &c in &args.callers {
            let mut runs: Vec<Vec<load::BenchReport>> = (0..3).map(|_| Vec::new()).collect();
            for _ in 0..args.repeat {
                for (k, (mode, bus)) in buses.iter().enumerate() {
                    let l = Load {
                        service: args.service.clone(),
                        method: args.method.clone(),
                        clients: c,
                        rate: None,
                        duration: Duration::from_secs_f64(duration),
                        count: None,
                        payload: args.payload,
                        timeout: Duration::from_millis(args.timeout_ms),
                        spin: mode.policies().0,
                        stall_bound: aegis_client::call::DEFAULT_STALL_BOUND,
                        verify: false,
                        idempotent: false,
                        ramp_up: Duration::ZERO,
                        start_at: None,
                        inflight: 1,
                        loan: false,
                        floor: false,
                    };
                    runs[k].push(load::run(&l, Some(bus.dir().to_owned()), None)?);
                }
            }
            for (k, (mode, _)) in buses.iter().enumerate() {
                let r = &mut runs[k];
                r.sort_by(|a, b| a.calls_per_s.total_cmp(&b.calls_per_s));
                let m = &r[r.len() / 2];
                let cell = Cell {
                    callers: c,
                    instances: n,
                    mode: *mode,
                    calls_per_s: m.calls_per_s,
                    p50_us: m.p50_us,
                    p99_us: m.p99_us,
                    errors: r.iter().map(|x| x.errors).sum(),
                };
                if !args.json {
                    eprintln!(
                        "  {c} × {n} {:<8} {:>10.0} calls/s  p50 {:>8.1} µs  p99 {:>8.1} µs",
                        format!("{mode:?}").to_lowercase(),
                        cell.calls_per_s,
                        cell.p50_us,
                        cell.p99_us
                    );
                }
                cells.push(cell);
            }
        }
    }
    let find = |c: usize, n: usize, m: Mode| {
        cells
            .iter()
            .find(|x| x.callers == c && x.instances == n && x.mode == m)
            .map_or(0.0, |x| x.calls_per_s)
    };
    let mut below = Vec::new();
    for &n in &args.instances {
        for &c in &args.callers {
            if find(c, n, Mode::Default) < find(c, n, Mode::Blocking) {
                below.push(format!("{c} × {n}"));
            }
        }
    }
    let one = find(1, 1, Mode::Default) / find(1, 1, Mode::Blocking).max(1e-9);
    let errors: u64 = cells.iter().map(|c| c.errors).sum();
    if args.json {
        let v = serde_json::json!({
            "duration_s": duration,
            "repeat": args.repeat,
            "payload": args.payload,
            "cells": cells,
            "default_below_blocking": below,
            "one_by_one_default_over_blocking": one,
            "errors": errors,
        });
        println!("{v}");
    } else {
        println!(
            "closed loop, {} B payload, {duration} s per run, median of {}; calls/s",
            args.payload, args.repeat
        );
        println!("| callers × instances | default | blocking | spin | default / blocking |");
        println!("|---|---|---|---|---|");
        for &n in &args.instances {
            for &c in &args.callers {
                let (d, b, s) = (
                    find(c, n, Mode::Default),
                    find(c, n, Mode::Blocking),
                    find(c, n, Mode::Spin),
                );
                println!(
                    "| {c} × {n} | {d:.0} | {b:.0} | {s:.0} | {:.2}× |",
                    d / b.max(1e-9)
                );
            }
        }
        println!(
            "default below blocking: {}",
            if below.is_empty() {
                "none".to_string()
            } else {
                below.join(", ")
            }
        );
        println!("1 × 1 default / blocking: {one:.1}×");
        if errors > 0 {
            println!("errors: {errors}");
        }
    }
    Ok(())
}
