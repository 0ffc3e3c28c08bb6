//! `aegisctl bench`: a load generator. Open loop (`--rate`, latency measured from each
//! call's *intended* send time, so queueing is not hidden) or closed loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_client::{Bus, BusOptions, CallOptions};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Service to call.
    #[arg(long, default_value = "echo")]
    pub service: String,
    #[arg(long, default_value = "bench")]
    pub method: String,
    /// Client threads, each with its own bus connection.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// Total calls per second over all clients (open loop); omit for closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Calls per client instead of a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Request payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Per-call timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Microseconds a waiting caller spins before sleeping (0 = sleep at once).
    #[arg(long)]
    pub spin_us: Option<u64>,
    /// Check that every reply equals its request (against an echo service).
    #[arg(long)]
    pub verify: bool,
    /// Start a private broker with this many echo instances and bench against it.
    #[arg(long)]
    pub spawn: Option<usize>,
    /// Mark calls idempotent: one an instance took but never answered (it died) may be
    /// retried on another instance.
    #[arg(long)]
    pub idempotent: bool,
    /// With --spawn: SIGKILL this many of the instances during the run.
    #[arg(long, default_value_t = 0)]
    pub kill: usize,
    /// Seconds into the run at which --kill strikes.
    #[arg(long, default_value_t = 2.0)]
    pub kill_after: f64,
    /// With --spawn: microseconds the instances spin before sleeping.
    #[arg(long)]
    pub instance_spin_us: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub mismatched: u64,
    pub clients: usize,
    pub payload: usize,
    pub mode: String,
    pub elapsed_s: f64,
    pub calls_per_s: f64,
    pub first_error: Option<String>,
    /// Open loop: how late the generator itself sent calls (timer wake-up), included in
    /// the latencies above.
    pub send_lag_p50_us: f64,
    pub send_lag_p99_us: f64,
    /// Instances killed during the run and how long until each left routing.
    pub killed: Vec<KillReport>,
}

#[derive(Debug, Serialize)]
pub struct KillReport {
    pub instance: String,
    pub pid: u32,
    /// From the SIGKILL to the instance's absence from the registry's routing view.
    pub left_routing_ms: f64,
}

/// Instances to kill mid-run: (instance id, pid).
pub struct Victims {
    pub targets: Vec<(String, u32)>,
    pub after: Duration,
}

struct ClientResult {
    hist: Histogram<u64>,
    lag: Histogram<u64>,
    sent: u64,
    ok: u64,
    errors: u64,
    mismatched: u64,
    first_error: Option<String>,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds")
}

pub fn run(
    args: &BenchArgs,
    dir: Option<std::path::PathBuf>,
    victims: Option<Victims>,
) -> Result<BenchReport, String> {
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number of calls per second".into());
    }
    if args.verify && args.payload < 16 {
        return Err("--verify needs --payload of at least 16 bytes".into());
    }
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(args.clients as f64 / r));
    let opts = BusOptions {
        dir,
        spin: args
            .spin_us
            .map_or(BusOptions::default().spin, Duration::from_micros),
        ..Default::default()
    };
    // Connect every client before the clock starts.
    let buses = (0..args.clients)
        .map(|_| Bus::connect_with(opts.clone()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let call_opts = CallOptions {
        idempotent: args.idempotent,
        ..CallOptions::timeout(Duration::from_millis(args.timeout_ms))
    };
    let watcher = Bus::connect_with(opts.clone()).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs_f64(args.duration);
    let mut killed = Vec::new();
    let results: Vec<ClientResult> = std::thread::scope(|s| {
        if let Some(v) = &victims {
            let (watcher, killed) = (&watcher, &mut killed);
            s.spawn(move || *killed = kill_and_time(watcher, &args.service, v, start));
        }
        let handles: Vec<_> = buses
            .into_iter()
            .enumerate()
            .map(|(ci, bus)| {
                let call_opts = call_opts.clone();
                let stop = stop.clone();
                s.spawn(move || {
                    // Stagger open-loop clients evenly over one interval.
                    let offset = interval.map_or(Duration::ZERO, |iv| {
                        iv.mul_f64(ci as f64 / args.clients as f64)
                    });
                    client_loop(
                        &bus,
                        args,
                        ci as u64,
                        &call_opts,
                        start + offset,
                        end,
                        interval,
                        &stop,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench client panicked"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut hist = new_hist();
    let mut lag = new_hist();
    let (mut sent, mut ok, mut errors, mut mismatched, mut first_error) = (0, 0, 0, 0, None);
    for r in results {
        hist.add(&r.hist).expect("same bounds");
        lag.add(&r.lag).expect("same bounds");
        sent += r.sent;
        ok += r.ok;
        errors += r.errors;
        mismatched += r.mismatched;
        first_error = first_error.or(r.first_error);
    }
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    Ok(BenchReport {
        p50_us: q(0.50),
        p90_us: q(0.90),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: hist.max() as f64 / 1000.0,
        sent,
        ok,
        errors,
        mismatched,
        clients: args.clients,
        payload: args.payload,
        mode: match args.rate {
            Some(r) => format!("open loop, {r} calls/s"),
            None => "closed loop".into(),
        },
        elapsed_s: elapsed,
        calls_per_s: ok as f64 / elapsed.max(1e-9),
        first_error,
        killed,
        send_lag_p50_us: lag.value_at_quantile(0.5) as f64 / 1000.0,
        send_lag_p99_us: lag.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// At `start + after`, SIGKILLs the victims and measures how long until each has left the
/// routing view (waiting on the service's generation futex, not polling).
fn kill_and_time(watcher: &Bus, service: &str, v: &Victims, start: Instant) -> Vec<KillReport> {
    let at = start + v.after;
    if let Some(d) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(d); // a scheduled fault, not a wait for a condition
    }
    let mut pending: Vec<(String, u32, Instant)> = Vec::new();
    for (id, pid) in &v.targets {
        // SAFETY: kill(2) on an instance process we spawned.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        pending.push((id.clone(), *pid, Instant::now()));
    }
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pending.is_empty() && Instant::now() < deadline {
        let seen = watcher.service_generation(service);
        let routable: Vec<String> = watcher
            .routable_instances(service)
            .into_iter()
            .map(|(_, id, _)| id)
            .collect();
        pending.retain(|(id, pid, t)| {
            if routable.contains(id) {
                return true;
            }
            out.push(KillReport {
                instance: id.clone(),
                pid: *pid,
                left_routing_ms: t.elapsed().as_secs_f64() * 1e3,
            });
            false
        });
        if !pending.is_empty() {
            watcher.watch(
                service,
                seen,
                deadline.saturating_duration_since(Instant::now()),
            );
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn client_loop(
    bus: &Bus,
    args: &BenchArgs,
    client: u64,
    opts: &CallOptions,
    first: Instant,
    end: Instant,
    interval: Option<Duration>,
    stop: &AtomicBool,
) -> ClientResult {
    let mut r = ClientResult {
        hist: new_hist(),
        lag: new_hist(),
        sent: 0,
        ok: 0,
        errors: 0,
        mismatched: 0,
        first_error: None,
    };
    let mut payload = vec![0xa5u8; args.payload];
    let mut out = Vec::with_capacity(args.payload);
    let mut intended = first;
    if interval.is_some() {
        // Sleep precisely: the default 50 µs timer slack would be counted as call latency
        // (latency runs from the intended send time).
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    }
    loop {
        let done = match (args.count, interval) {
            (Some(c), _) => r.sent >= c,
            (None, Some(_)) => intended >= end,
            (None, None) => Instant::now() >= end,
        };
        if done || stop.load(Ordering::Relaxed) {
            break;
        }
        if interval.is_some() || r.sent == 0 {
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
        }
        if args.verify {
            payload[..8].copy_from_slice(&client.to_le_bytes());
            payload[8..16].copy_from_slice(&r.sent.to_le_bytes());
        }
        let sent_at = if interval.is_some() {
            let _ = r.lag.record(intended.elapsed().as_nanos().max(1) as u64);
            intended
        } else {
            Instant::now()
        };
        r.sent += 1;
        match bus.call_into(&args.service, &args.method, &payload, opts, &mut out) {
            Ok(_) => {
                let _ = r.hist.record(sent_at.elapsed().as_nanos().max(1) as u64);
                r.ok += 1;
                if args.verify && out != payload {
                    r.mismatched += 1;
                }
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        if let Some(iv) = interval {
            intended += iv;
        }
    }
    r
}

pub fn print(r: &BenchReport) {
    println!(
        "mode        {} · {} clients · {} B payload",
        r.mode, r.clients, r.payload
    );
    println!(
        "calls       sent {} · ok {} · failed {} · mismatched {}",
        r.sent, r.ok, r.errors, r.mismatched
    );
    println!(
        "throughput  {:.0} calls/s over {:.2} s",
        r.calls_per_s, r.elapsed_s
    );
    println!(
        "latency µs  p50 {:.1} · p90 {:.1} · p99 {:.1} · p99.9 {:.1} · max {:.1}",
        r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.max_us
    );
    if r.send_lag_p50_us > 0.0 {
        println!(
            "send lag µs p50 {:.1} · p99 {:.1} (generator wake-up, included above)",
            r.send_lag_p50_us, r.send_lag_p99_us
        );
    }
    for k in &r.killed {
        println!(
            "killed      {} (pid {}) left routing {:.1} ms after SIGKILL",
            k.instance, k.pid, k.left_routing_ms
        );
    }
    if let Some(e) = &r.first_error {
        println!("first error {e}");
    }
}
