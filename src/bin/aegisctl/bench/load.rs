//! `aegisctl bench`: a load generator. Open loop (`--rate`, latency measured from each
//! call's *intended* send time, so queueing is not hidden) or closed loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aegis_client::{Bus, BusOptions, CallOptions, Spin};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// One load run, every parameter resolved (from flags, a scenario, or the matrix).
#[derive(Debug, Clone)]
pub struct Load {
    pub service: String,
    pub method: String,
    /// Client threads, each with its own bus connection.
    pub clients: usize,
    /// Total calls per second over all clients (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Calls per client instead of a duration.
    pub count: Option<u64>,
    pub payload: usize,
    pub timeout: Duration,
    pub spin: Spin,
    /// `CallOptions::stall_bound`.
    pub stall_bound: Duration,
    pub verify: bool,
    pub idempotent: bool,
    /// Open loop: the rate climbs linearly from zero to `rate` over this long.
    pub ramp_up: Duration,
    /// Start the clock at this wall-clock time (several worker processes start together).
    pub start_at: Option<SystemTime>,
    /// Calls each client keeps in flight (`Bus::submit`); 1: one call at a time.
    pub inflight: usize,
    /// Zero-copy calls (`Bus::loan`, `Bus::call_loan`): see `BenchArgs::loan`.
    pub loan: bool,
    /// Keep the schedule, make no calls: see `BenchArgs::floor`.
    pub floor: bool,
}

#[derive(Debug, Serialize, Deserialize, Default)]
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
    pub send_lag_p999_us: f64,
    /// Instances killed during the run and how long until each left routing.
    pub killed: Vec<KillReport>,
    /// `--scenario`: its name, the seed's p99 target, and whether every check passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pass: Option<bool>,
    /// Each check of the scenario: what, the seed's target, what was measured.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub checks: Vec<Check>,
    /// Worker processes (`--processes`).
    pub processes: usize,
    /// Instances SIGSTOPped during the run (`--pause-every`): (pid, seconds into the run).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub paused: Vec<(u32, f64)>,
    /// Private resident memory (`RssAnon`) of the bus's processes at the start and end
    /// (`--scenario soak`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub rss: Vec<RssReport>,
    /// A worker's raw latency histogram, `(nanoseconds, count)` pairs, for the parent of
    /// `--processes` to merge. Not printed.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub hist_ns: Vec<(u64, u64)>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub lag_ns: Vec<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Check {
    pub what: String,
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct RssReport {
    pub process: String,
    pub pid: u32,
    pub start_kib: u64,
    pub end_kib: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KillReport {
    pub instance: String,
    pub pid: u32,
    /// From the SIGKILL to the instance's absence from the registry's routing view.
    pub left_routing_ms: f64,
}

/// `--pause-every`: a thread that SIGSTOPs one instance at a time, at random, and SIGCONTs
/// it after a while.
pub struct Pauses {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u32, f64)>>,
}

impl Pauses {
    pub fn start(pids: Vec<u32>, every: Duration, pause: Duration) -> Pauses {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut done = Vec::new();
            let mut seed = t0.elapsed().as_nanos() as u64 | 1;
            while !flag.load(Ordering::Relaxed) {
                // A scheduled fault, not a wait for a condition: sleep in slices so the
                // end of the run is noticed.
                let at = Instant::now() + every.mul_f64(0.5 + (seed % 1000) as f64 / 1000.0);
                while Instant::now() < at && !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let pid = pids[(seed % pids.len() as u64) as usize];
                done.push((pid, t0.elapsed().as_secs_f64()));
                // SAFETY: kill(2) on an instance process the bench spawned.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
                std::thread::sleep(pause);
                // SAFETY: as above.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
            }
            done
        });
        Pauses { stop, thread }
    }

    /// Ends the pauses (the paused instance, if any, is continued) and lists them.
    pub fn stop(self) -> Vec<(u32, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
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

/// A histogram with the bench's bounds (1 ns .. 120 s, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid bounds")
}

/// One client thread's histogram: two significant digits (1 % resolution), merged into a
/// [`new_hist`] at the end. At three digits each held 228 KiB of counters, all resident:
/// a thousand clients' pair came to 450 MB, half the stress scenario's memory, which a
/// footprint measurement of the bus should not count.
fn client_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000_000, 2).expect("valid bounds")
}

pub fn run(
    load: &Load,
    dir: Option<std::path::PathBuf>,
    victims: Option<Victims>,
) -> Result<BenchReport, String> {
    let interval = load
        .rate
        .map(|r| Duration::from_secs_f64(load.clients as f64 / r));
    let opts = BusOptions {
        dir,
        spin: load.spin,
        mailboxes: BusOptions::default().mailboxes.max(load.inflight as u32),
        ..Default::default()
    };
    // Connect every client before the clock starts.
    let buses = (0..load.clients)
        .map(|_| Bus::connect_with(opts.clone()).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let call_opts = CallOptions {
        idempotent: load.idempotent,
        stall_bound: load.stall_bound,
        ..CallOptions::timeout(load.timeout)
    };
    let watcher = Bus::connect_with(opts.clone()).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    // The clock starts once every client thread exists: spawning a thousand threads takes
    // tens of milliseconds, and calls made meanwhile would measure the generator's own
    // thread creation (each maps a stack, stalling the running threads' page faults).
    let ready = std::sync::Barrier::new(load.clients + 1);
    // And a client that is done waits for the others before it disconnects and its thread
    // exits: a thousand teardowns (unmapping, the broker's disconnect work) while the last
    // clients still call would be measured as their latency (the last 100 ms of a stress
    // run held half of its calls over 5 ms).
    let finished = std::sync::Barrier::new(load.clients);
    let clock = std::sync::OnceLock::<(Instant, Instant)>::new();
    let mut killed = Vec::new();
    let results: Vec<ClientResult> = std::thread::scope(|s| {
        let handles: Vec<_> = buses
            .into_iter()
            .enumerate()
            .map(|(ci, bus)| {
                let call_opts = call_opts.clone();
                let stop = stop.clone();
                let (ready, clock, finished) = (&ready, &clock, &finished);
                s.spawn(move || {
                    ready.wait();
                    let (start, end) = *clock.get().expect("set before the barrier opens");
                    let offset = interval.map_or(Duration::ZERO, |iv| {
                        start_offset(ci, load.clients, iv, load.ramp_up)
                    });
                    let r = client_loop(
                        &bus,
                        load,
                        ci as u64,
                        &call_opts,
                        start + offset,
                        end,
                        interval,
                        &stop,
                    );
                    finished.wait();
                    r
                })
            })
            .collect();
        let start = match load.start_at {
            Some(at) => Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default(),
            None => Instant::now() + Duration::from_millis(20),
        };
        let _ = clock.set((start, start + load.duration));
        if let Some(v) = &victims {
            let (watcher, killed) = (&watcher, &mut killed);
            s.spawn(move || *killed = kill_and_time(watcher, &load.service, v, start));
        }
        ready.wait();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench client panicked"))
            .collect()
    });
    let (start, _) = *clock.get().expect("set when the clients were spawned");
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
    let elapsed = elapsed.max(1e-9);
    let mut report = BenchReport {
        sent,
        ok,
        errors,
        mismatched,
        clients: load.clients,
        payload: load.payload,
        mode: mode(load),
        elapsed_s: elapsed,
        calls_per_s: ok as f64 / elapsed,
        first_error,
        killed,
        processes: 1,
        ..Default::default()
    };
    report.set_latencies(&hist, &lag);
    report.hist_ns = hist_pairs(&hist);
    report.lag_ns = hist_pairs(&lag);
    Ok(report)
}

impl BenchReport {
    /// Fills the percentile fields from the histograms.
    pub fn set_latencies(&mut self, hist: &Histogram<u64>, lag: &Histogram<u64>) {
        let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
        self.p50_us = q(0.50);
        self.p90_us = q(0.90);
        self.p99_us = q(0.99);
        self.p999_us = q(0.999);
        self.max_us = hist.max() as f64 / 1000.0;
        self.send_lag_p50_us = lag.value_at_quantile(0.5) as f64 / 1000.0;
        self.send_lag_p99_us = lag.value_at_quantile(0.99) as f64 / 1000.0;
        self.send_lag_p999_us = lag.value_at_quantile(0.999) as f64 / 1000.0;
    }
}

/// A histogram as `(value, count)` pairs (for a worker process to hand to its parent).
pub fn hist_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds `(value, count)` pairs into `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        let _ = h.record_n(v.max(1), n);
    }
}

/// At `start + after`, SIGKILLs the victims and measures how long until each has left the
/// routing view (waiting on the service's generation futex, not polling).
pub fn kill_and_time(watcher: &Bus, service: &str, v: &Victims, start: Instant) -> Vec<KillReport> {
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
    args: &Load,
    client: u64,
    opts: &CallOptions,
    first: Instant,
    end: Instant,
    interval: Option<Duration>,
    stop: &AtomicBool,
) -> ClientResult {
    let mut r = ClientResult {
        hist: client_hist(),
        lag: client_hist(),
        sent: 0,
        ok: 0,
        errors: 0,
        mismatched: 0,
        first_error: None,
    };
    if args.inflight > 1 {
        pipelined(bus, args, client, opts, first, end, stop, &mut r);
        return r;
    }
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
            stamp(&mut payload, client, r.sent);
        }
        let sent_at = if interval.is_some() {
            let _ = r.lag.record(intended.elapsed().as_nanos().max(1) as u64);
            intended
        } else {
            Instant::now()
        };
        r.sent += 1;
        let answered = if args.floor {
            // The floor: a "call" that returns at once; its latency is the wake-up lag.
            Ok(true)
        } else if args.loan {
            loaned_call(bus, args, opts, &payload, (client, r.sent))
        } else {
            bus.call_into(&args.service, &args.method, &payload, opts, &mut out)
                .map(|_| !args.verify || out == payload)
        };
        match answered {
            Ok(matched) => {
                let _ = r.hist.record(sent_at.elapsed().as_nanos().max(1) as u64);
                r.ok += 1;
                if !matched {
                    r.mismatched += 1;
                }
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        if let Some(iv) = interval {
            intended = first + iv.mul_f64(r.sent as f64);
        }
    }
    r
}

/// `--loan`: one zero-copy call. With `--verify`, every byte of `payload` (stamped) is
/// written into the loan and every byte of the reply checked; else only the first and
/// last page are: the call's stamp is written into the first and last 16 bytes and
/// checked there (an echo instance with `--touch-ends` copies those pages back). Returns
/// whether the reply matched.
fn loaned_call(
    bus: &Bus,
    args: &Load,
    opts: &CallOptions,
    payload: &[u8],
    (client, seq): (u64, u64),
) -> aegis_client::Result<bool> {
    let n = payload.len();
    let mut loan = bus.loan(&args.service, n)?;
    let mut s = [0u8; 16];
    stamp(&mut s, client, seq);
    // The stamp, repeated, in the first and last 16 bytes (all of a shorter payload).
    let (head, tail) = (n.min(16), n.saturating_sub(16).max(n.min(16)));
    let ends = || (0..head).chain(tail..n).enumerate();
    if args.verify {
        loan.copy_from_slice(payload);
    } else {
        for (i, b) in ends() {
            loan[b] = s[i % 16];
        }
    }
    let reply = bus.call_loan(&args.service, &args.method, loan, opts)?;
    Ok(reply.len() == n
        && if args.verify {
            reply[..] == *payload
        } else {
            ends().all(|(i, b)| reply[b] == s[i % 16])
        })
}

/// `--verify`: a request names its client and sequence number in its first 16 bytes.
fn stamp(payload: &mut [u8], client: u64, seq: u64) {
    payload[..8].copy_from_slice(&client.to_le_bytes());
    payload[8..16].copy_from_slice(&seq.to_le_bytes());
}

/// Closed loop with `args.inflight` calls in flight: submit until that many are out, then
/// collect the oldest and submit the next. Latency runs from submit to collect.
#[allow(clippy::too_many_arguments)]
fn pipelined(
    bus: &Bus,
    args: &Load,
    client: u64,
    opts: &CallOptions,
    first: Instant,
    end: Instant,
    stop: &AtomicBool,
    r: &mut ClientResult,
) {
    let mut payload = vec![0xa5u8; args.payload];
    let mut out = Vec::with_capacity(args.payload);
    let mut queue = std::collections::VecDeque::with_capacity(args.inflight);
    if let Some(d) = first.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
    let mut collected = 0u64;
    loop {
        let done = match args.count {
            Some(c) => r.sent >= c,
            None => Instant::now() >= end,
        } || stop.load(Ordering::Relaxed);
        while !done && queue.len() < args.inflight {
            if args.verify {
                stamp(&mut payload, client, r.sent);
            }
            r.sent += 1;
            match bus.submit(&args.service, &args.method, &payload, opts) {
                Ok(p) => queue.push_back((p, Instant::now())),
                Err(e) => {
                    r.errors += 1;
                    r.first_error.get_or_insert_with(|| e.to_string());
                    break;
                }
            }
        }
        let Some((p, at)) = queue.pop_front() else {
            if done {
                break;
            }
            continue;
        };
        match p.wait(&mut out) {
            Ok(_) => {
                let _ = r.hist.record(at.elapsed().as_nanos().max(1) as u64);
                r.ok += 1;
                if args.verify {
                    stamp(&mut payload, client, collected);
                    if out != payload {
                        r.mismatched += 1;
                    }
                }
            }
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        collected += 1;
    }
}

/// How the report names `load`'s mode.
pub fn mode(load: &Load) -> String {
    match (load.rate, load.floor) {
        (Some(r), true) => format!("open loop, {r} calls/s, floor: no calls made (wake-ups only)"),
        (Some(r), false) => format!("open loop, {r} calls/s"),
        (None, _) => "closed loop".into(),
    }
}

/// When open-loop client `ci` of `clients` makes its first call, after the clock starts.
/// With a ramp-up, clients join one after another over it, evenly spaced (the offered
/// rate climbs linearly from zero to the full rate, as users arriving), each calling at its
/// full rate from its first call on. Without one they join over the first interval.
///
/// Each client keeps its own phase within the interval, and the phases are spread evenly,
/// so that the clients' calls interleave instead of arriving in bursts: client `ci` joins
/// at `ci / clients` of the ramp, moved later by `j` steps of `interval / clients`, where
/// `j` is the interval of the ramp it joins in. (Before, the phase was `ci / clients` of
/// the interval and the join the whole interval it fell in, so the 20 clients joining in
/// one 100 ms interval of the stress scenario all joined within 2 ms of each other: 20
/// first contacts at once, every 100 ms, whose queueing at the broker was measured as
/// their latency.)
fn start_offset(ci: usize, clients: usize, iv: Duration, ramp: Duration) -> Duration {
    // In nanoseconds, integers: a float's floor put some clients a whole interval off.
    let (n, ci) = (clients.max(1) as u128, ci as u128);
    let iv = iv.as_nanos().max(1);
    let span = ramp.as_nanos().max(iv);
    let joins_at = span * ci / n;
    // The phases of the clients joining in interval j are those of interval 0 (a grid of
    // span / n) shifted by j · iv / n: together, every step of iv / n once.
    let j = span * ci / (n * iv);
    Duration::from_nanos((joins_at + j * iv / n) as u64)
}

pub fn print(r: &BenchReport) {
    if let Some(name) = &r.scenario {
        println!("scenario    {name}");
    }
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
            "send lag µs p50 {:.1} · p99 {:.1} · p99.9 {:.1} (generator wake-up, included above)",
            r.send_lag_p50_us, r.send_lag_p99_us, r.send_lag_p999_us
        );
    }
    for k in &r.killed {
        println!(
            "killed      {} (pid {}) left routing {:.1} ms after SIGKILL",
            k.instance, k.pid, k.left_routing_ms
        );
    }
    if !r.paused.is_empty() {
        println!(
            "paused      {} times (SIGSTOP, one instance at a time)",
            r.paused.len()
        );
    }
    if r.processes > 1 {
        println!("processes   {} (clients and rate are totals)", r.processes);
    }
    for m in &r.rss {
        println!(
            "rss (anon)  {} (pid {}) {} KiB -> {} KiB",
            m.process, m.pid, m.start_kib, m.end_kib
        );
    }
    if let Some(e) = &r.first_error {
        println!("first error {e}");
    }
    if let Some(name) = &r.scenario {
        for c in &r.checks {
            println!(
                "check       {:<5} {}: {} (seed target {})",
                if c.pass { "ok" } else { "FAIL" },
                c.what,
                c.measured,
                c.target
            );
        }
        let pass = r.pass == Some(true);
        println!(
            "verdict     {} scenario {}",
            name,
            if pass { "PASSED" } else { "FAILED" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::start_offset;
    use std::time::Duration;

    /// The stress scenario's ramp: 1,000 clients, one call each per 100 ms, joining over 5 s.
    #[test]
    fn a_ramp_adds_clients_evenly_and_their_phases_cover_the_interval() {
        let (n, iv, ramp) = (1000, Duration::from_millis(100), Duration::from_secs(5));
        let starts: Vec<f64> = (0..n)
            .map(|ci| start_offset(ci, n, iv, ramp).as_secs_f64())
            .collect();
        for (ci, w) in starts.windows(2).enumerate() {
            let gap = w[1] - w[0];
            assert!(
                (0.0049..0.0052).contains(&gap),
                "client {} joins {gap} s after client {ci}",
                ci + 1
            );
        }
        assert!(starts[n - 1] < 5.01, "the last joins at {}", starts[n - 1]);
        // Every phase on the 0.1 ms grid once.
        let mut phases: Vec<u64> = starts
            .iter()
            .map(|s| (s * 1e4).round() as u64 % 1000)
            .collect();
        phases.sort_unstable();
        phases.dedup();
        assert_eq!(phases.len(), n, "distinct phases");
    }

    #[test]
    fn without_a_ramp_clients_join_over_the_first_interval() {
        let (n, iv) = (100, Duration::from_millis(10));
        for ci in 0..n {
            let s = start_offset(ci, n, iv, Duration::ZERO);
            assert_eq!(s.as_micros(), (ci as u128) * 100, "client {ci}");
        }
    }
}
