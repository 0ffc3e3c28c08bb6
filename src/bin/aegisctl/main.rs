//! `aegisctl`: the aegis-ipc command line (modelled on `busctl` and the `nats` CLI).
//! Human tables by default, `--json` for scripts; every error is a non-zero exit and a
//! one-line reason on stderr.

mod bench;
mod demo;
mod private_bus;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aegis_client::{Bus, BusOptions, CallOptions, RegisterOptions, ServiceConfig, ServiceError};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(name = "aegisctl", version, about = "aegis-ipc command line")]
struct Cli {
    /// Bus directory (default: $AEGIS_IPC_DIR, /run/aegis-ipc, $XDG_RUNTIME_DIR/aegis-ipc, /tmp/aegis-ipc-$UID).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List services with their instance counts.
    Services {
        #[arg(long)]
        json: bool,
    },
    /// Show one service's instances (id, pid, status, requests served).
    Service {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Call a service once and print the reply.
    Call {
        service: String,
        method: String,
        /// Request payload as text.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        /// Request payload from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Print the reply with instance_id and latency_us as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run an instance of SERVICE until SIGTERM/SIGINT.
    Serve {
        service: String,
        #[arg(long)]
        instance: String,
        /// Reply with the request payload.
        #[arg(long, required = true)]
        echo: bool,
        /// Serving threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Wait this long before each reply (simulates a slow instance).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Microseconds an idle serving thread spins before sleeping.
        #[arg(long)]
        spin_us: Option<u64>,
        /// Inline request bytes per ring slot (first instance of a service sets it).
        #[arg(long)]
        slot_size: Option<u32>,
        /// Slots per instance ring (first instance of a service sets it).
        #[arg(long)]
        slot_count: Option<u32>,
        /// Largest message in bytes (first instance of a service sets it).
        #[arg(long)]
        max_message: Option<u64>,
    },
    /// Load generator: latency percentiles and error counts.
    Bench(bench::BenchArgs),
    /// Start a private bus, three instances, make calls, show the spread and latency.
    Demo {
        #[arg(long, default_value_t = 3000)]
        calls: u64,
    },
    /// Run the broker (the same code as `aegis-broker`; used when only aegisctl is built).
    #[command(hide = true, disable_help_flag = true)]
    Broker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_errors = matches!(
        cli.cmd,
        Cmd::Services { json: true }
            | Cmd::Service { json: true, .. }
            | Cmd::Call { json: true, .. }
    ) || matches!(&cli.cmd, Cmd::Bench(b) if b.json);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json_errors {
                println!(
                    "{}",
                    json!({ "error": e.kind, "code": e.code, "message": e.message })
                );
            }
            eprintln!("aegisctl: {}", e.message);
            ExitCode::from(1)
        }
    }
}

struct CliError {
    kind: &'static str,
    code: u16,
    message: String,
}

impl From<aegis_client::Error> for CliError {
    fn from(e: aegis_client::Error) -> Self {
        CliError {
            kind: e.kind(),
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        CliError {
            kind: "Usage",
            code: 400,
            message,
        }
    }
}

fn connect(dir: &Option<PathBuf>) -> Result<Bus, CliError> {
    Ok(Bus::connect_with(BusOptions {
        dir: dir.clone(),
        ..Default::default()
    })?)
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.cmd {
        Cmd::Services { json } => {
            let services = connect(&cli.dir)?.services()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&services).unwrap());
            } else {
                println!(
                    "{:<32} {:>9} {:>9} {:>12} {:>14}",
                    "SERVICE", "INSTANCES", "SLOT", "MAX_MESSAGE", "SERVED"
                );
                for s in &services {
                    let served: u64 = s.instances.iter().map(|i| i.requests_served).sum();
                    println!(
                        "{:<32} {:>9} {:>9} {:>12} {:>14}",
                        s.name,
                        s.instances.len(),
                        s.slot_size,
                        s.max_message,
                        served
                    );
                }
            }
        }
        Cmd::Service { name, json } => {
            let s = connect(&cli.dir)?.service(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap());
            } else {
                println!(
                    "service {} · slot {} B × {} · max message {} B",
                    s.name, s.slot_size, s.slot_count, s.max_message
                );
                println!(
                    "{:<24} {:>6} {:>8} {:>10} {:>12} {:>7}",
                    "INSTANCE", "INDEX", "PID", "STATUS", "SERVED", "QUEUED"
                );
                for i in &s.instances {
                    println!(
                        "{:<24} {:>6} {:>8} {:>10} {:>12} {:>7}",
                        i.id,
                        i.index,
                        i.pid,
                        format!("{:?}", i.status),
                        i.requests_served,
                        i.queued
                    );
                }
            }
        }
        Cmd::Call {
            service,
            method,
            data,
            file,
            timeout_ms,
            json,
        } => {
            let payload = match (data, file) {
                (Some(d), _) => d.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
                }
                (None, None) => Vec::new(),
            };
            let bus = connect(&cli.dir)?;
            let t = Instant::now();
            let reply = bus.call(
                &service,
                &method,
                &payload,
                &CallOptions::timeout(Duration::from_millis(timeout_ms)),
            )?;
            let latency_us = t.elapsed().as_secs_f64() * 1e6;
            if json {
                let text = String::from_utf8_lossy(&reply.payload);
                println!(
                    "{}",
                    json!({ "reply": text, "reply_len": reply.payload.len(), "instance_id": reply.instance_id, "latency_us": latency_us })
                );
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&reply.payload);
                if !reply.payload.ends_with(b"\n") {
                    let _ = out.write_all(b"\n");
                }
            }
        }
        Cmd::Serve {
            service,
            instance,
            echo: _,
            threads,
            delay_ms,
            spin_us,
            slot_size,
            slot_count,
            max_message,
        } => {
            let config = ServiceConfig {
                slot_size,
                slot_count,
                max_message,
            };
            serve(
                &cli.dir, &service, &instance, threads, delay_ms, spin_us, config,
            )?
        }
        Cmd::Bench(args) => {
            let report = if let Some(n) = args.spawn {
                let mut bus = private_bus::PrivateBus::start()?;
                let mut extra = vec![];
                let spin = args.instance_spin_us.map(|s| s.to_string());
                if let Some(s) = &spin {
                    extra.extend(["--spin-us", s.as_str()]);
                }
                for i in 0..n {
                    bus.spawn_echo(&args.service, &format!("{}-{i}", args.service), &extra)?;
                }
                bench::run(&args, Some(bus.dir().to_owned()))?
            } else {
                bench::run(&args, cli.dir.clone())?
            };
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap());
            } else {
                bench::print(&report);
            }
        }
        Cmd::Demo { calls } => demo::run(calls)?,
        Cmd::Broker { args } => {
            use clap::Parser as _;
            // `--dir` is also aegisctl's global flag, so clap hands it to us, not to `args`.
            let dir = cli
                .dir
                .iter()
                .flat_map(|d| ["--dir".to_string(), d.to_string_lossy().into_owned()]);
            let cfg = aegis_broker::BrokerConfig::try_parse_from(
                std::iter::once("aegis-broker".to_string())
                    .chain(dir)
                    .chain(args),
            )
            .map_err(|e| e.to_string())?;
            init_logging(&cfg.log);
            aegis_broker::run(cfg)?;
        }
    }
    Ok(())
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn serve(
    dir: &Option<PathBuf>,
    service: &str,
    id: &str,
    threads: usize,
    delay_ms: u64,
    spin_us: Option<u64>,
    config: ServiceConfig,
) -> Result<(), CliError> {
    use nix::sys::signal::{SigSet, Signal};
    init_logging("warn");
    // Block the stop signals in every thread; one thread waits for them synchronously.
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    let bus = connect(dir)?;
    let mut opts = RegisterOptions {
        config,
        ..Default::default()
    };
    if let Some(s) = spin_us {
        opts.spin = Duration::from_micros(s);
    }
    opts.metadata
        .push(("cmd".into(), "aegisctl serve --echo".into()));
    let inst = bus.register_with(service, id, opts)?;
    let stop = inst.stop_handle();
    std::thread::spawn(move || {
        let _ = set.wait();
        stop.stop();
    });
    println!("ready {service} {id} {}", inst.index());
    let _ = std::io::stdout().flush();
    let delay = Duration::from_millis(delay_ms);
    let results: Vec<aegis_client::Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    inst.serve(|req, out| {
                        if !delay.is_zero() {
                            std::thread::sleep(delay);
                        }
                        out.extend_from_slice(req.payload());
                        Ok::<(), ServiceError>(())
                    })
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("serving thread panicked"))
            .collect()
    });
    for r in results {
        r?;
    }
    match inst.unregister() {
        // A broker that is already gone has dropped the registration with the connection.
        Ok(()) | Err(aegis_client::Error::BrokerUnavailable { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
