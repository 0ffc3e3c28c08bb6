//! `aegisctl serve`: an echo instance (optionally slow, optionally owning resources) that
//! runs until SIGTERM/SIGINT and unregisters on the way out.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use aegis_client::{
    BulkMode, BulkOptions, Heartbeat, RegisterOptions, ResourceMetadata, ResourceSpec,
    ServiceConfig, ServiceError,
};

use crate::{connect, init_logging, CliError};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    pub service: String,
    #[arg(long)]
    pub instance: String,
    /// Reply with the request payload.
    #[arg(long, required = true)]
    pub echo: bool,
    /// Serving threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Wait this long before each reply (simulates a slow instance).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Microseconds an idle serving thread spins before sleeping (0 = sleep at once);
    /// without it, the adaptive policy decides.
    #[arg(long)]
    pub spin_us: Option<u64>,
    /// Inline request bytes per ring slot (first instance of a service sets it).
    #[arg(long)]
    pub slot_size: Option<u32>,
    /// Slots per instance ring (first instance of a service sets it).
    #[arg(long)]
    pub slot_count: Option<u32>,
    /// Largest message in bytes (first instance of a service sets it).
    #[arg(long)]
    pub max_message: Option<u64>,
    /// Resource ids to claim once registered (comma-separated). If any cannot be claimed
    /// (another instance owns it), the instance unregisters and exits non-zero naming the
    /// owners, unless `--claim-partial` is given.
    #[arg(long, value_delimiter = ',')]
    pub claim: Vec<String>,
    /// Serve even when some `--claim` ids could not be claimed (they are reported on stderr).
    #[arg(long)]
    pub claim_partial: bool,
    /// Ids per claim batch.
    #[arg(long, default_value_t = 100)]
    pub claim_batch: u32,
    /// Take claimed ids over from their owners (administrators only).
    #[arg(long)]
    pub claim_force: bool,
    /// Release the claimed ids this long after claiming them.
    #[arg(long)]
    pub claim_ttl_ms: Option<u64>,
    /// How often the serving loop proves it is alive while idle.
    #[arg(long, default_value_t = Heartbeat::default().interval_ms)]
    pub heartbeat_interval_ms: u64,
    /// No progress for this long makes the instance Unhealthy.
    #[arg(long, default_value_t = Heartbeat::default().timeout_ms)]
    pub heartbeat_timeout_ms: u64,
    /// Answer with a reply written in place in the instance's reply heap
    /// (`Request::loan_reply`): the request is read where the caller wrote it, and nothing
    /// is copied by the bus.
    #[arg(long)]
    pub loan: bool,
    /// With `--loan`: copy only the first and last page of the request into the reply (the
    /// rest of the reply is whatever its memory held). For measuring the transport alone:
    /// `aegisctl bench --loan`.
    #[arg(long, requires = "loan")]
    pub touch_ends: bool,
}

/// Answers `req` with a loaned reply of its length: its bytes, or only its first and last
/// page with `ends`.
fn answer_loaned(req: aegis_client::Request<'_>, ends: bool) -> aegis_client::Result<()> {
    let p = req.payload();
    let n = p.len();
    let mut loan = match req.loan_reply(n) {
        Ok(l) => l,
        Err(e) => return req.reply_error(e.code(), &e.to_string()),
    };
    if ends {
        let page = n.min(4096);
        loan[..page].copy_from_slice(&p[..page]);
        loan[n - page..].copy_from_slice(&p[n - page..]);
    } else {
        loan.copy_from_slice(p);
    }
    req.reply_loan(loan)
}

pub fn run(dir: &Option<PathBuf>, a: &ServeArgs) -> Result<(), CliError> {
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
        config: ServiceConfig {
            slot_size: a.slot_size,
            slot_count: a.slot_count,
            max_message: a.max_message,
        },
        ..Default::default()
    };
    if let Some(s) = a.spin_us {
        opts.spin = aegis_client::Spin::Fixed(Duration::from_micros(s));
    }
    opts.heartbeat = Heartbeat {
        interval_ms: a.heartbeat_interval_ms,
        timeout_ms: a.heartbeat_timeout_ms,
    };
    opts.metadata
        .push(("cmd".into(), "aegisctl serve --echo".into()));
    let inst = bus.register_with(&a.service, &a.instance, opts)?;
    if !a.claim.is_empty() {
        let metadata = ResourceMetadata {
            created_by: format!("aegisctl serve --instance {}", a.instance),
            ttl_ms: a.claim_ttl_ms,
            ..Default::default()
        };
        let specs = a
            .claim
            .iter()
            .map(|id| ResourceSpec {
                id: id.clone(),
                metadata: metadata.clone(),
            })
            .collect();
        let options = BulkOptions {
            mode: BulkMode::ContinueOnError,
            batch_size: a.claim_batch,
            force: a.claim_force,
        };
        let report = inst.claim_with(specs, options)?;
        let failed: Vec<String> = report
            .failures
            .iter()
            // The broker's reason names the owner.
            .map(|f| format!("{} ({})", f.id, f.reason))
            .collect();
        if !failed.is_empty() && !a.claim_partial {
            // Leave the bus before saying so: nobody routes to an instance missing the
            // resources it was started for.
            let _ = inst.unregister();
            return Err(format!(
                "could not claim {} of {} resource(s): {}; not serving (--claim-partial serves anyway)",
                failed.len(),
                a.claim.len(),
                failed.join(", ")
            )
            .into());
        }
        for f in &failed {
            eprintln!("aegisctl: not claimed: {f}");
        }
        println!("claimed {} of {}", report.succeeded, a.claim.len());
    }
    let stop = inst.stop_handle();
    std::thread::spawn(move || {
        let _ = set.wait();
        stop.stop();
    });
    println!("ready {} {} {}", a.service, a.instance, inst.index());
    let _ = std::io::stdout().flush();
    let delay = Duration::from_millis(a.delay_ms);
    let results: Vec<aegis_client::Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..a.threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    if a.loan {
                        let mut rx = inst.receiver();
                        while let Some(req) = rx.recv(None)? {
                            if !delay.is_zero() {
                                std::thread::sleep(delay);
                            }
                            answer_loaned(req, a.touch_ends)?;
                        }
                        return Ok(());
                    }
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
