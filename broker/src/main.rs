fn main() {
    let cfg = match aegis_broker::BrokerConfig::load(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aegis-broker: {e}");
            std::process::exit(2);
        }
    };
    if cfg.check_config {
        if let Err(e) = cfg.validate() {
            eprintln!("aegis-broker: {e}");
            std::process::exit(2);
        }
        match cfg.file() {
            Some(f) => println!("# effective configuration (flags over {})", f.display()),
            None => println!("# effective configuration (flags and defaults; no file)"),
        }
        print!("{}", cfg.to_toml());
        return;
    }
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cfg.log_format {
        aegis_broker::LogFormat::Text => registry.with(layer).init(),
        aegis_broker::LogFormat::Json => registry.with(layer.json()).init(),
    }
    // RUST_LOG, when set, wins over the file on reload too.
    let log_reload: Option<aegis_broker::LogReload> =
        std::env::var_os("RUST_LOG").is_none().then(|| {
            Box::new(move |f: &str| {
                let filter =
                    tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
                handle.reload(filter).map_err(|e| e.to_string())
            }) as aegis_broker::LogReload
        });
    if let Err(e) = aegis_broker::run_with(cfg, log_reload) {
        eprintln!("aegis-broker: {e}");
        std::process::exit(1);
    }
}
