//! `aegisctl top [SERVICE]`: a table of instances redrawn every interval, like `nats top`:
//! calls/s and errors/s (from the counters each instance keeps), p50/p99 of the requests
//! answered since the last draw (from the duration histogram each instance keeps: the
//! bucket bound at or above the percentile, so "≤250µs"), requests queued in its ring, and
//! its state.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aegis_client::layout::histogram_quantile;
use aegis_client::Bus;

/// `ns` as µs, ms or s.
fn human(ns: u64) -> String {
    match ns {
        n if n < 1_000_000 => format!("{}µs", n / 1000),
        n if n < 1_000_000_000 => format!("{}ms", n / 1_000_000),
        n => format!("{}s", n / 1_000_000_000),
    }
}

use crate::CliError;

#[derive(clap::Args)]
pub struct TopArgs {
    /// Only this service's instances.
    pub service: Option<String>,
    /// Seconds between redraws.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Stop after this many tables (default: until interrupted).
    #[arg(long)]
    pub iterations: Option<u64>,
}

pub fn run(bus: &Bus, a: &TopArgs) -> Result<(), CliError> {
    if !(a.interval.is_finite() && a.interval > 0.0) {
        return Err(format!(
            "--interval {} must be a positive number of seconds",
            a.interval
        )
        .into());
    }
    let interval = Duration::from_secs_f64(a.interval);
    // (service, instance id) -> (served, failed, durations) at the previous draw.
    type Seen = (u64, u64, Vec<u64>);
    let mut before: HashMap<(String, String), Seen> = HashMap::new();
    let mut last = Instant::now();
    let mut drawn = 0u64;
    loop {
        let services = match &a.service {
            Some(s) => vec![bus.service(s)?],
            None => bus.services()?,
        };
        let secs = last.elapsed().as_secs_f64().max(1e-9);
        last = Instant::now();
        let mut out = String::from("\x1b[H\x1b[2J");
        out.push_str(&format!(
            "aegisctl top · {} · every {:.1} s\n\n{:<24} {:<20} {:>8} {:>10} {:>9} {:>10} {:>10} {:>7} {:>10}\n",
            bus.dir().display(),
            a.interval,
            "SERVICE",
            "INSTANCE",
            "PID",
            "CALLS/S",
            "ERRORS/S",
            "P50",
            "P99",
            "QUEUED",
            "STATE"
        ));
        let mut now = HashMap::new();
        for s in &services {
            for i in &s.instances {
                let key = (s.name.clone(), i.id.clone());
                let (served, failed) = (i.requests_served, i.requests_failed);
                let rate = |now: u64, then: Option<u64>| match then {
                    Some(t) if now >= t => format!("{:.0}", (now - t) as f64 / secs),
                    _ => "-".into(),
                };
                let prev = before.get(&key);
                // This interval's requests: the histogram now minus the one drawn last.
                let delta: Vec<u64> = match prev {
                    Some(p) if p.2.len() == i.durations.len() => i
                        .durations
                        .iter()
                        .zip(&p.2)
                        .map(|(n, t)| n.saturating_sub(*t))
                        .collect(),
                    _ => i.durations.clone(),
                };
                let pct = |q| match histogram_quantile(&delta, q) {
                    None => "-".to_owned(),
                    Some(u64::MAX) => "> 1s".to_owned(),
                    Some(ns) => format!("≤{}", human(ns)),
                };
                out.push_str(&format!(
                    "{:<24} {:<20} {:>8} {:>10} {:>9} {:>10} {:>10} {:>7} {:>10}\n",
                    s.name,
                    i.id,
                    i.pid,
                    rate(served, prev.map(|p| p.0)),
                    rate(failed, prev.map(|p| p.1)),
                    pct(0.5),
                    pct(0.99),
                    i.queued,
                    format!("{:?}", i.status)
                ));
                now.insert(key, (served, failed, i.durations.clone()));
            }
        }
        print!("{out}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
        before = now;
        drawn += 1;
        if a.iterations.is_some_and(|n| drawn >= n) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}
