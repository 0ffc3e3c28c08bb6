use clap::Parser;

fn main() {
    let cfg = aegis_broker::BrokerConfig::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = aegis_broker::run(cfg) {
        eprintln!("aegis-broker: {e}");
        std::process::exit(1);
    }
}
