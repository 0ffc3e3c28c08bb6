//! `aegis-bridge`: makes one aegis-ipc bus a member of an AegisIPC deployment on NATS.
//! See `bridge.rs` for what it exports and imports, `resources.rs` for resource ownership
//! across hosts, `model.rs` for the messages.

mod bridge;
mod config;
mod model;
mod resource_api;
mod resources;
mod trust;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};

use clap::Parser;

use crate::bridge::Shared;
use crate::config::{Args, Settings};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.new_signing_key {
        return match trust::new_key(path) {
            Ok(public) => {
                println!("{public}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("aegis-bridge: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let check = args.check_config;
    let settings = match Settings::resolve(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aegis-bridge: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if check {
        // Secrets are not printed.
        let shown = Settings {
            password: settings.password.as_ref().map(|_| "(set)".into()),
            token: settings.token.as_ref().map(|_| "(set)".into()),
            nkey: settings.nkey.as_ref().map(|_| "(set)".into()),
            ..settings
        };
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{shown:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&settings.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // A bug in any of the bridge's threads ends the process (systemd restarts it), rather
    // than leaving a bridge that announces instances it no longer serves.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    match run(settings) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aegis-bridge: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn connect_options(
    s: &Settings,
    events: tokio::sync::mpsc::UnboundedSender<async_nats::Event>,
) -> Result<async_nats::ConnectOptions, String> {
    let mut o = match &s.creds {
        Some(path) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async_nats::ConnectOptions::with_credentials_file(path))
                .map_err(|e| format!("credentials {}: {e}", path.display()))?
        }
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(u), Some(p)) = (&s.user, &s.password) {
        o = o.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &s.token {
        o = o.token(t.clone());
    }
    if let Some(k) = &s.nkey {
        o = o.nkey(k.clone());
    }
    if s.tls {
        o = o.require_tls(true);
    }
    if let Some(ca) = &s.tls_ca {
        o = o.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&s.tls_cert, &s.tls_key) {
        o = o.add_client_certificate(c.clone(), k.clone());
    }
    Ok(o.name(format!("aegis-bridge {}", s.name))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |e| {
            let events = events.clone();
            async move {
                let _ = events.send(e);
            }
        }))
}

fn run(settings: Settings) -> Result<(), String> {
    let bus = aegis_client::Bus::connect_with(aegis_client::BusOptions {
        dir: settings.dir.clone(),
        // A stand-in forwards many calls at once; the default mailboxes are per caller.
        ..Default::default()
    })
    .map_err(|e| format!("connecting to the local bus: {e}"))?;
    let services = bus
        .services()
        .map_err(|e| format!("listing local services: {e}"))?;
    for p in &settings.export {
        if !services.iter().any(|s| config::glob(p, &s.name)) {
            tracing::warn!(pattern = %p, "--export pattern matches no service on this bus (yet): exported when one registers");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
    let opts = connect_options(&settings, etx)?;
    let nats = rt
        .block_on(opts.connect(settings.nats.as_str()))
        .map_err(|e| format!("NATS {}: {e}", settings.nats))?;
    let trust = if settings.trusted_hosts.is_empty() {
        trust::Trust::open()
    } else {
        trust::Trust::load(
            settings.signing_key_file.as_deref(),
            &settings.trusted_hosts,
            settings.accept_unsigned,
        )?
    };
    if let Some(pk) = trust.public_key() {
        tracing::info!(public_key = %pk, trusted = settings.trusted_hosts.len(), "signing announcements and resource entries");
    }
    let (ptx, prx) = mpsc::channel();
    let sh = Arc::new(Shared {
        bus,
        nats,
        trust,
        cfg: settings,
        rt: rt.handle().clone(),
        state: Mutex::new(Default::default()),
        online: Default::default(),
        lost: Default::default(),
        poke: Mutex::new(ptx),
        resources: Default::default(),
    });
    if sh.nats.connection_state() == async_nats::connection::State::Connected {
        sh.online.store(true, Ordering::Release);
    } else {
        tracing::info!(url = %sh.cfg.nats, "connecting to NATS (local calls never wait for it)");
    }
    // Connection events: stand-ins leave while NATS is away and come back with it.
    let events = sh.clone();
    rt.spawn(async move {
        while let Some(e) = erx.recv().await {
            match e {
                async_nats::Event::Connected => {
                    tracing::info!("NATS connected: announcing exported instances");
                    events.online.store(true, Ordering::Release);
                    events.state.lock().unwrap().reannounce = true;
                }
                async_nats::Event::Disconnected => {
                    tracing::warn!(
                        "NATS disconnected: remote instances leave local routing until it is back"
                    );
                    events.online.store(false, Ordering::Release);
                    events.lost.notify_waiters();
                    {
                        let mut st = events.state.lock().unwrap();
                        st.directory.clear();
                        st.seen.clear();
                    }
                    events.resources.disconnected();
                }
                other => tracing::info!("NATS: {other}"),
            }
            events.poke();
        }
    });
    rt.spawn(bridge::route_loop(sh.clone()));
    rt.spawn(bridge::plain_fallback_loop(sh.clone()));
    rt.spawn(bridge::directory_loop(sh.clone()));
    rt.spawn(resource_api::serve(sh.clone()));
    let w = sh.clone();
    std::thread::spawn(move || bridge::registry_watch(w));
    let s = sh.clone();
    std::thread::spawn(move || bridge::sync_loop(s, prx));
    println!(
        "aegis-bridge ready: host {} nats {} export {:?} import {:?}",
        sh.cfg.name, sh.cfg.nats, sh.cfg.export, sh.cfg.import
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, String>(())
    })?;
    tracing::info!("stopping: exported instances unregister, stand-ins leave");
    // Said only while connected, and never waited on for long: a bridge must stop even
    // when NATS is gone.
    if sh.online.load(Ordering::Acquire) {
        for (nats_id, service) in sh.exported_list() {
            let msg = model::encode(&model::ServiceRegistration {
                service_name: service,
                instance_id: nats_id,
                timestamp: model::now_iso().into(),
                metadata: Default::default(),
            });
            let _ = sh.wait(
                "saying an instance leaves",
                sh.nats.publish(model::UNREGISTER_SUBJECT, msg.into()),
            );
        }
        let _ = sh.wait("flushing", sh.nats.flush());
    }
    // Dropping the runtime would wait for every blocking task still running: a call
    // forwarded to another host, or a bus call made for a NATS request, each waits up to its
    // own timeout (seconds). A stopping bridge abandons them (their callers see the
    // bridge leave) instead of outliving the stop request by that much.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}
