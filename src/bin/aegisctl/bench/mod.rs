//! `aegisctl bench`: the load generator ([`load`]), the seed's scenarios by name
//! ([`scenario`]), the closed-loop load matrix ([`matrix`]), and running the load from
//! several worker processes (`--processes`).

mod load;
mod matrix;
mod scenario;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use aegis_client::Spin;

pub use load::{print, BenchReport, Load, Victims};
pub use scenario::Scenario;

use crate::private_bus::PrivateBus;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Service to call.
    #[arg(long, default_value = "echo")]
    pub service: String,
    #[arg(long, default_value = "bench")]
    pub method: String,
    /// Client threads (per process with --processes), each with its own bus connection
    /// [default: 1, or the scenario's].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Total calls per second over all clients (open loop); omit for closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds to run [default: 5, or the scenario's].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Calls per client instead of a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Request payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Per-call timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// Microseconds a waiting caller spins before sleeping (0 = sleep at once); without
    /// it, the adaptive policy decides.
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
    #[arg(long)]
    pub kill: Option<usize>,
    /// Seconds into the run at which --kill strikes.
    #[arg(long, default_value_t = 2.0)]
    pub kill_after: f64,
    /// With --spawn: every this many seconds, SIGSTOP one instance (picked at random) for
    /// --pause-for seconds, then SIGCONT it: a stalled instance under load.
    #[arg(long)]
    pub pause_every: Option<f64>,
    #[arg(long, default_value_t = 2.0)]
    pub pause_for: f64,
    /// Milliseconds an instance may leave a request untaken before the call withdraws it
    /// and goes elsewhere (CallOptions::stall_bound).
    #[arg(long)]
    pub stall_ms: Option<u64>,
    /// With --spawn: microseconds the instances spin before sleeping (default: adaptive).
    #[arg(long)]
    pub instance_spin_us: Option<u64>,
    /// Open loop: seconds over which the clients join, one after another (the offered rate
    /// climbs linearly from zero to --rate).
    #[arg(long)]
    pub ramp_up: Option<f64>,
    /// Run the clients in this many processes, each with --clients threads and an equal
    /// share of --rate.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Calls each client keeps in flight (submitted, replies collected later); closed
    /// loop only.
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// Zero-copy calls: each request is written in a loan (`Bus::loan`) and the reply read
    /// in place; `--spawn` instances answer with loaned replies. Only the first and last
    /// page of each payload are written and checked on either side (the transport's own
    /// cost), or every byte with `--verify`.
    #[arg(long)]
    pub loan: bool,
    /// Open loop: the clients connect and keep the schedule but make no calls. What is
    /// measured is the generator's own wake-up lag on this host: the floor under every
    /// open-loop figure (`--scenario stress --floor` beside `--scenario stress`).
    #[arg(long)]
    pub floor: bool,
    /// One of the seed's performance scenarios, with its load, targets and a verdict.
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,
    /// The closed-loop load matrix: calls/s for callers x instances, each with default
    /// settings, blocking mode and spin mode.
    #[arg(long)]
    pub matrix: bool,
    /// --matrix: caller counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub callers: Vec<usize>,
    /// --matrix: instance counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub instances: Vec<usize>,
    /// --matrix: runs per cell (the median is reported).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    #[arg(long)]
    pub json: bool,
    /// Internal: this process is one of --processes' workers (prints its raw report).
    #[arg(long, hide = true)]
    pub worker: bool,
    /// Internal: wall-clock start time for workers, in milliseconds since the Unix epoch.
    #[arg(long, hide = true)]
    pub start_at_ms: Option<u64>,
}

impl BenchArgs {
    fn load(&self) -> Result<Load, String> {
        let clients = self.clients.unwrap_or(1);
        if clients == 0 {
            return Err("--clients must be at least 1".into());
        }
        if self.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err("--rate must be a positive number of calls per second".into());
        }
        let duration = self.duration.unwrap_or(5.0);
        if !(duration > 0.0 && duration.is_finite()) {
            return Err("--duration must be a positive number of seconds".into());
        }
        let ramp_up = self.ramp_up.unwrap_or(0.0);
        if !(ramp_up >= 0.0 && ramp_up.is_finite()) {
            return Err("--ramp-up must be zero or a positive number of seconds".into());
        }
        if ramp_up > 0.0 && self.rate.is_none() {
            return Err("--ramp-up needs --rate (it ramps an open-loop rate)".into());
        }
        if self.floor && self.rate.is_none() {
            return Err(
                "--floor needs --rate or --scenario (it measures an open-loop schedule)".into(),
            );
        }
        if self.verify && self.payload < 16 {
            return Err("--verify needs --payload of at least 16 bytes".into());
        }
        if self.processes == 0 {
            return Err("--processes must be at least 1".into());
        }
        if self.inflight == 0 {
            return Err("--inflight must be at least 1 (calls each client keeps in flight)".into());
        }
        if self.loan && self.inflight > 1 {
            return Err(
                "--loan makes one call at a time per client; it does not combine with --inflight"
                    .into(),
            );
        }
        if self.inflight > 1 && self.rate.is_some() {
            return Err("--inflight runs a closed loop; it does not combine with --rate".into());
        }
        if self.stall_ms == Some(0) {
            return Err(
                "--stall-ms must be at least 1 (how long an instance may leave a request untaken)"
                    .into(),
            );
        }
        Ok(Load {
            service: self.service.clone(),
            method: self.method.clone(),
            clients,
            rate: self.rate,
            duration: Duration::from_secs_f64(duration),
            count: self.count,
            payload: self.payload,
            timeout: Duration::from_millis(self.timeout_ms),
            spin: Spin::from_micros(self.spin_us),
            stall_bound: self.stall_ms.map_or(
                aegis_client::call::DEFAULT_STALL_BOUND,
                Duration::from_millis,
            ),
            verify: self.verify,
            idempotent: self.idempotent,
            ramp_up: Duration::from_secs_f64(ramp_up),
            start_at: self
                .start_at_ms
                .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
            inflight: self.inflight,
            loan: self.loan,
            floor: self.floor,
        })
    }
}

/// `aegisctl bench`.
pub fn command(args: &BenchArgs, dir: Option<PathBuf>) -> Result<(), String> {
    if args.matrix {
        return matrix::run(args);
    }
    let mut args = args.clone();
    if let Some(s) = args.scenario {
        s.apply(&mut args);
    }
    let mut report = if args.worker {
        load::run(&args.load()?, dir, None)?
    } else {
        run_spawned(&args, dir)?
    };
    if !args.worker {
        // Raw histograms are for a parent of workers only.
        report.hist_ns.clear();
        report.lag_ns.clear();
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap());
    } else {
        print(&report);
    }
    match report.pass {
        Some(false) => Err(format!(
            "scenario {} failed its targets",
            report.scenario.as_deref().unwrap_or("?")
        )),
        _ => Ok(()),
    }
}

/// Starts the private bus if asked, runs the load (in this process or in workers), and
/// judges the scenario.
fn run_spawned(args: &BenchArgs, dir: Option<PathBuf>) -> Result<BenchReport, String> {
    let load = args.load()?;
    let kill = args.kill.unwrap_or(0);
    let mut private = None;
    let mut victims = None;
    let mut instance_pids = Vec::new();
    if let Some(n) = args.spawn {
        if n == 0 {
            return Err("--spawn needs at least 1 instance".into());
        }
        if kill >= n {
            return Err(format!(
                "--kill {kill} would leave none of the {n} instances to call"
            ));
        }
        let spin = args.instance_spin_us.map(|s| s.to_string());
        let mut extra: Vec<&str> = spin.iter().flat_map(|s| ["--spin-us", s]).collect();
        if args.loan {
            extra.push("--loan");
            if !args.verify {
                extra.push("--touch-ends");
            }
        }
        let mut bus = PrivateBus::start()?;
        let mut targets = Vec::new();
        for i in 0..n {
            let id = format!("{}-{i}", args.service);
            let pid = bus.spawn_echo(&args.service, &id, &extra)?;
            instance_pids.push((id.clone(), pid));
            if i < kill {
                targets.push((id, pid));
            }
        }
        victims = (kill > 0).then(|| Victims {
            targets,
            after: Duration::from_secs_f64(args.kill_after),
        });
        private = Some(bus);
    } else if kill > 0 {
        return Err("--kill needs --spawn (it kills instances the bench started)".into());
    }
    let dir = private.as_ref().map(|b| b.dir().to_owned()).or(dir);
    let pauses = match args.pause_every {
        Some(every) if !(every > 0.0 && args.pause_for > 0.0 && every.is_finite()) => {
            return Err("--pause-every and --pause-for take positive seconds".into());
        }
        Some(_) if instance_pids.len() < 2 => {
            return Err("--pause-every needs --spawn with at least 2 instances".into());
        }
        Some(every) => Some(load::Pauses::start(
            instance_pids.iter().map(|p| p.1).collect(),
            Duration::from_secs_f64(every),
            Duration::from_secs_f64(args.pause_for),
        )),
        None => None,
    };
    let watched = scenario::Watched::start(args, dir.as_deref(), &private, &instance_pids)?;
    let mut report = if args.processes > 1 {
        run_workers(args, &load, dir.as_deref(), victims)?
    } else {
        load::run(&load, dir, victims)?
    };
    if let Some(p) = pauses {
        report.paused = p.stop();
    }
    if let Some(s) = args.scenario {
        watched.finish(&mut report)?;
        s.judge(&load, &mut report);
    }
    Ok(report)
}

/// Runs `args.processes` copies of this bench as worker processes, all starting at the same
/// moment, and merges their reports (histograms included). The parent does the killing.
fn run_workers(
    args: &BenchArgs,
    load: &Load,
    dir: Option<&Path>,
    victims: Option<Victims>,
) -> Result<BenchReport, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    // Room for every worker to connect its clients before the clock starts.
    let lead = Duration::from_millis(500 + 2 * (load.clients * args.processes) as u64);
    let start = SystemTime::now() + lead;
    let start_ms = start
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as u64;
    let mut children = Vec::new();
    for _ in 0..args.processes {
        let mut cmd = Command::new(&me);
        if let Some(d) = dir {
            cmd.arg("--dir").arg(d);
        }
        cmd.args(["bench", "--worker", "--json"])
            .args(["--service", &args.service, "--method", &args.method])
            .args(["--clients", &load.clients.to_string()])
            .args(["--duration", &load.duration.as_secs_f64().to_string()])
            .args(["--payload", &load.payload.to_string()])
            .args(["--timeout-ms", &args.timeout_ms.to_string()])
            .args(["--inflight", &load.inflight.to_string()])
            .args(["--start-at-ms", &start_ms.to_string()]);
        if let Some(r) = load.rate {
            cmd.args(["--rate", &(r / args.processes as f64).to_string()]);
        }
        if !load.ramp_up.is_zero() {
            cmd.args(["--ramp-up", &load.ramp_up.as_secs_f64().to_string()]);
        }
        if let Some(c) = load.count {
            cmd.args(["--count", &c.to_string()]);
        }
        if let Some(s) = args.spin_us {
            cmd.args(["--spin-us", &s.to_string()]);
        }
        if let Some(s) = args.stall_ms {
            cmd.args(["--stall-ms", &s.to_string()]);
        }
        for (flag, on) in [
            ("--verify", load.verify),
            ("--idempotent", load.idempotent),
            ("--loan", load.loan),
            ("--floor", load.floor),
        ] {
            if on {
                cmd.arg(flag);
            }
        }
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        children.push(
            cmd.spawn()
                .map_err(|e| format!("cannot start a bench worker: {e}"))?,
        );
    }
    let kills = match victims {
        Some(v) => {
            let dir = dir
                .ok_or("--kill needs --spawn (it kills instances the bench started)")?
                .to_owned();
            let service = load.service.clone();
            let at = Instant::now() + lead;
            Some(std::thread::spawn(move || -> Result<_, String> {
                let watcher = aegis_client::Bus::connect_dir(&dir).map_err(|e| e.to_string())?;
                Ok(load::kill_and_time(&watcher, &service, &v, at))
            }))
        }
        None => None,
    };
    let mut merged = BenchReport {
        processes: args.processes,
        ..Default::default()
    };
    let mut hist = load::new_hist();
    let mut lag = load::new_hist();
    for c in children {
        let out = c
            .wait_with_output()
            .map_err(|e| format!("bench worker: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let r: BenchReport = serde_json::from_str(text.trim()).map_err(|e| {
            format!(
                "bench worker exited with {} and no report ({e}): {}",
                out.status,
                text.trim()
            )
        })?;
        load::add_pairs(&mut hist, &r.hist_ns);
        load::add_pairs(&mut lag, &r.lag_ns);
        merged.sent += r.sent;
        merged.ok += r.ok;
        merged.errors += r.errors;
        merged.mismatched += r.mismatched;
        merged.clients += r.clients;
        merged.payload = r.payload;
        merged.elapsed_s = merged.elapsed_s.max(r.elapsed_s);
        merged.first_error = merged.first_error.or(r.first_error);
    }
    // The workers' rates are shares: name the whole load.
    merged.mode = load::mode(load);
    merged.calls_per_s = merged.ok as f64 / merged.elapsed_s.max(1e-9);
    merged.set_latencies(&hist, &lag);
    if let Some(k) = kills {
        merged.killed = k.join().map_err(|_| "kill thread panicked")??;
    }
    Ok(merged)
}
