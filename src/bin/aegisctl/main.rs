//! `aegisctl`: the aegis-ipc command line (modelled on `busctl` and the `nats` CLI).
//! Human tables by default, `--json` for scripts; every error is a non-zero exit and a
//! one-line reason on stderr.

mod bench;
mod demo;
mod monitor;
mod private_bus;
mod resources;
mod serve;
mod top;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aegis_client::{Bus, BusOptions, CallOptions};
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
        /// Route by resource: call the instance that owns this id (it must be of SERVICE).
        #[arg(long)]
        resource: Option<String>,
        /// Print the reply with instance_id and latency_us as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run an instance of SERVICE until SIGTERM/SIGINT.
    Serve(serve::ServeArgs),
    /// Instances with their state and recent transitions (departed ones last).
    Health {
        service: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List resources and their owners.
    Resources(resources::ListArgs),
    /// Stream events as they happen: instances joining and leaving, health transitions,
    /// claims, releases, transfers.
    Monitor(monitor::MonitorArgs),
    /// A table of instances (calls/s, errors/s, queued, state), redrawn every second.
    Top(top::TopArgs),
    /// Administrator: release resources whoever owns them.
    Release {
        /// Resource ids (comma-separated).
        #[arg(value_delimiter = ',', required = true)]
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Administrator: move resources to another instance (all or none).
    Transfer {
        #[arg(value_delimiter = ',', required = true)]
        ids: Vec<String>,
        #[arg(long)]
        to_service: String,
        /// Target instance id.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "administrator transfer")]
        reason: String,
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
            | Cmd::Release { json: true, .. }
            | Cmd::Health { json: true, .. }
    ) || matches!(&cli.cmd, Cmd::Bench(b) if b.json)
        || matches!(&cli.cmd, Cmd::Resources(r) if r.json)
        || matches!(&cli.cmd, Cmd::Monitor(m) if m.json);
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
                let b = s.circuit_breaker;
                println!(
                    "circuit breaker (per caller): {} closed, {} open, {} half-open",
                    b.closed, b.open, b.half_open
                );
                println!(
                    "{:<24} {:>6} {:>8} {:>10} {:>12} {:>7}  WHERE",
                    "INSTANCE", "INDEX", "PID", "STATUS", "SERVED", "QUEUED"
                );
                for i in &s.instances {
                    // Stand-ins of `aegis-bridge` name the host they forward to.
                    let place = i
                        .metadata
                        .iter()
                        .find(|(k, _)| k == aegis_client::layout::REMOTE_METADATA_KEY)
                        .map_or_else(|| "local".to_owned(), |(_, h)| format!("remote:{h}"));
                    println!(
                        "{:<24} {:>6} {:>8} {:>10} {:>12} {:>7}  {place}",
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
            resource,
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
            let opts = CallOptions::timeout(Duration::from_millis(timeout_ms));
            let t = Instant::now();
            let reply = match &resource {
                None => bus.call(&service, &method, &payload, &opts)?,
                Some(r) => {
                    // Routing is by resource alone; check it lands in the service asked for.
                    if let Some(owner) = bus.resource_owner(r) {
                        if owner.service != service {
                            return Err(format!(
                                "resource '{r}' is owned by instance '{}' of service '{}', not of '{service}'",
                                owner.instance_id, owner.service
                            )
                            .into());
                        }
                    }
                    bus.call_resource(r, &method, &payload, &opts)?
                }
            };
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
        Cmd::Serve(args) => serve::run(&cli.dir, &args)?,
        Cmd::Health { service, json } => {
            let h = connect(&cli.dir)?.health(service.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h).unwrap());
            } else {
                println!(
                    "{:<20} {:<20} {:>8} {:>10} {:>10} {:>13}",
                    "SERVICE", "INSTANCE", "PID", "STATUS", "SERVED", "PROGRESS_AGO"
                );
                for i in &h {
                    println!(
                        "{:<20} {:<20} {:>8} {:>10} {:>10} {:>10} ms",
                        i.service,
                        i.id,
                        i.pid,
                        format!("{:?}", i.status),
                        i.requests_served,
                        i.last_progress_ms
                    );
                    for t in &i.transitions {
                        println!(
                            "    {} ms  {:?} -> {:?}  {}",
                            t.at_ms, t.from, t.to, t.reason
                        );
                    }
                }
            }
        }
        Cmd::Resources(args) => resources::list(&connect(&cli.dir)?, &args)?,
        Cmd::Monitor(args) => monitor::run(&connect(&cli.dir)?, &args)?,
        Cmd::Top(args) => top::run(&connect(&cli.dir)?, &args)?,
        Cmd::Release { ids, json } => resources::release(&connect(&cli.dir)?, &ids, json)?,
        Cmd::Transfer {
            ids,
            to_service,
            to,
            reason,
        } => {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            connect(&cli.dir)?.transfer_resources(&refs, &to_service, &to, &reason)?;
            println!("transferred {} to {to}", ids.len());
        }
        Cmd::Bench(args) => bench::command(&args, cli.dir.clone())?,
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
