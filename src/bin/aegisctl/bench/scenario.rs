//! The seed's four performance scenarios by name (`aegisctl bench --scenario …`): each sets
//! the load the seed describes (flags given on the command line win, so `--duration` and
//! `--spawn` shorten or resize a run), and judges the result against the seed's targets.
//!
//! | scenario | seed load | seed targets |
//! |---|---|---|
//! | baseline | 100 clients, 1,000 calls/s, 1 KiB, 5 min | p99 < 5 ms, success > 99.9 % |
//! | stress | 1,000 clients, 10,000 calls/s, 5 s ramp-up (the issue's; the seed says 5 min), 30 min | p99 < 5 ms, 0 failed |
//! | fault | the baseline load; 20 % of the instances SIGKILLed 40 % into the run | detection < 5 s, no lost request, p99 < 5 ms |
//! | soak | 500 calls/s from 50 clients, 24 h | p99 < 5 ms, success > 99.9 %, even round-robin, no memory growth |

use std::path::Path;

use aegis_client::Bus;

use super::load::{BenchReport, Check, Load, RssReport};
use super::BenchArgs;
use crate::private_bus::PrivateBus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Baseline,
    Stress,
    Fault,
    Soak,
}

/// The seed's latency target for every scenario.
const TARGET_P99_US: f64 = 5000.0;
/// Soak: each process's resident memory may grow by at most this much over the run.
const SOAK_RSS_GROWTH_KIB: u64 = 16 * 1024;
/// Soak: each instance serves within this fraction of the mean (round-robin evenness).
const SOAK_SPREAD: f64 = 0.10;

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::Stress => "stress",
            Scenario::Fault => "fault",
            Scenario::Soak => "soak",
        }
    }

    /// Fills in the scenario's load wherever the command line left a value unset.
    pub fn apply(self, a: &mut BenchArgs) {
        let (clients, rate, duration) = match self {
            Scenario::Baseline | Scenario::Fault => (100, 1000.0, 300.0),
            Scenario::Stress => (1000, 10_000.0, 1800.0),
            Scenario::Soak => (50, 500.0, 86_400.0),
        };
        // With --processes, --clients is per process: split the scenario's clients.
        a.clients
            .get_or_insert((clients / a.processes.max(1)).max(1));
        a.rate.get_or_insert(rate);
        a.duration.get_or_insert(duration);
        if self == Scenario::Stress {
            a.ramp_up.get_or_insert(5.0);
        }
        if self == Scenario::Fault {
            if let Some(n) = a.spawn {
                a.kill.get_or_insert(n.div_ceil(5).min(n.saturating_sub(1)));
            }
            a.kill_after = a.duration.unwrap_or(duration) * 0.4;
        }
    }

    /// Checks `r` against the seed's targets; sets `scenario`, `target_p99_us`, `pass`.
    pub fn judge(self, load: &Load, r: &mut BenchReport) {
        let mut checks = vec![Check {
            what: "p99 latency".into(),
            target: format!("< {TARGET_P99_US} µs"),
            measured: format!("{:.1} µs", r.p99_us),
            pass: r.p99_us < TARGET_P99_US && r.ok > 0,
        }];
        let success = r.ok as f64 / r.sent.max(1) as f64;
        match self {
            Scenario::Baseline | Scenario::Soak => checks.push(Check {
                what: "success rate".into(),
                target: "> 99.9 %".into(),
                measured: format!("{:.3} % ({} of {})", success * 100.0, r.ok, r.sent),
                pass: success > 0.999,
            }),
            Scenario::Stress | Scenario::Fault => checks.push(Check {
                what: "failed calls".into(),
                target: "0".into(),
                measured: format!("{} of {}", r.errors + r.mismatched, r.sent),
                pass: r.errors == 0 && r.mismatched == 0 && r.sent > 0,
            }),
        }
        if let Some(rate) = load.rate {
            // Open loop: the generator must actually have offered the scenario's load.
            let expected = rate * (load.duration.as_secs_f64() - load.ramp_up.as_secs_f64() / 2.0);
            checks.push(Check {
                what: "calls sent".into(),
                target: format!("≥ 99 % of {expected:.0}"),
                measured: format!("{}", r.sent),
                pass: r.sent as f64 >= 0.99 * expected,
            });
        }
        if self == Scenario::Fault {
            let worst = r
                .killed
                .iter()
                .map(|k| k.left_routing_ms)
                .fold(0.0, f64::max);
            checks.push(Check {
                what: "failure detection".into(),
                target: "< 5000 ms, every killed instance".into(),
                measured: format!(
                    "{} killed, slowest left routing after {worst:.1} ms",
                    r.killed.len()
                ),
                pass: !r.killed.is_empty() && worst < 5000.0,
            });
        }
        for m in &r.rss {
            checks.push(Check {
                what: format!("private memory (RssAnon) of {} (pid {})", m.process, m.pid),
                target: format!("grows < {} MiB", SOAK_RSS_GROWTH_KIB / 1024),
                measured: format!("{} KiB -> {} KiB", m.start_kib, m.end_kib),
                pass: m.end_kib < m.start_kib + SOAK_RSS_GROWTH_KIB,
            });
        }
        r.scenario = Some(self.name().into());
        r.target_p99_us = Some(TARGET_P99_US);
        r.checks.extend(checks);
        r.pass = Some(r.checks.iter().all(|c| c.pass));
    }
}

/// What a soak run watches besides latency: resident memory of the bus's processes and
/// how evenly the instances served.
pub struct Watched {
    soak: bool,
    bus: Option<Bus>,
    service: String,
    procs: Vec<(String, u32, u64)>,
    served: Vec<(String, u64)>,
}

impl Watched {
    pub fn start(
        args: &BenchArgs,
        dir: Option<&Path>,
        private: &Option<PrivateBus>,
        instances: &[(String, u32)],
    ) -> Result<Watched, String> {
        let soak = args.scenario == Some(Scenario::Soak);
        let mut w = Watched {
            soak,
            bus: None,
            service: args.service.clone(),
            procs: Vec::new(),
            served: Vec::new(),
        };
        if !soak {
            return Ok(w);
        }
        let mut procs = vec![("aegisctl bench".to_string(), std::process::id())];
        if let Some(p) = private {
            procs.push(("broker".into(), p.broker_pid()));
        }
        procs.extend(instances.iter().cloned());
        w.procs = procs
            .into_iter()
            .filter_map(|(name, pid)| rss_kib(pid).map(|k| (name, pid, k)))
            .collect();
        let bus = match dir {
            Some(d) => Bus::connect_dir(d),
            None => Bus::connect(),
        }
        .map_err(|e| e.to_string())?;
        w.served = served(&bus, &w.service)?;
        w.bus = Some(bus);
        Ok(w)
    }

    /// Adds the end-of-run samples to `r` (and the round-robin check).
    pub fn finish(&self, r: &mut BenchReport) -> Result<(), String> {
        if !self.soak {
            return Ok(());
        }
        r.rss = self
            .procs
            .iter()
            .map(|(name, pid, start)| RssReport {
                process: name.clone(),
                pid: *pid,
                start_kib: *start,
                end_kib: rss_kib(*pid).unwrap_or(0),
            })
            .collect();
        let Some(bus) = &self.bus else { return Ok(()) };
        let now = served(bus, &self.service)?;
        let counts: Vec<(String, u64)> = now
            .iter()
            .filter_map(|(id, n)| {
                let before = self.served.iter().find(|(i, _)| i == id)?.1;
                Some((id.clone(), n.saturating_sub(before)))
            })
            .collect();
        if counts.len() >= 2 {
            let mean = counts.iter().map(|c| c.1 as f64).sum::<f64>() / counts.len() as f64;
            let worst = counts
                .iter()
                .map(|c| (c.1 as f64 - mean).abs() / mean.max(1.0))
                .fold(0.0, f64::max);
            let list: Vec<String> = counts.iter().map(|(i, n)| format!("{i} {n}")).collect();
            r.checks.push(Check {
                what: "round-robin evenness".into(),
                target: format!(
                    "every instance within {:.0} % of the mean",
                    SOAK_SPREAD * 100.0
                ),
                measured: format!(
                    "{} (off by {:.1} % at most)",
                    list.join(", "),
                    worst * 100.0
                ),
                pass: worst <= SOAK_SPREAD,
            });
        }
        Ok(())
    }
}

fn served(bus: &Bus, service: &str) -> Result<Vec<(String, u64)>, String> {
    Ok(bus
        .service(service)
        .map_err(|e| e.to_string())?
        .instances
        .into_iter()
        .map(|i| (i.id, i.requests_served))
        .collect())
}

/// Private resident memory of a process in KiB (`RssAnon` of `/proc/PID/status`): what a
/// leak grows. Shared pages are left out: an instance touching the mailboxes of each new
/// caller's segment raises its `VmRSS` by up to the segments' size, which is no leak.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}
