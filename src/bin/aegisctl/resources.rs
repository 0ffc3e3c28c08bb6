//! `aegisctl resources`, `release`, `transfer`: the resource map as an operator sees it.

use aegis_client::{BulkMode, BulkOptions, Bus, ResourceQuery};

use crate::CliError;

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub service: Option<String>,
    #[arg(long)]
    pub instance: Option<String>,
    #[arg(long = "type")]
    pub resource_type: Option<String>,
    /// Only resources carrying this tag (repeatable: all must be present).
    #[arg(long)]
    pub tag: Vec<String>,
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    #[arg(long, default_value_t = 0)]
    pub offset: u32,
    #[arg(long)]
    pub json: bool,
}

pub fn list(bus: &Bus, a: &ListArgs) -> Result<(), CliError> {
    let page = bus.resources(&ResourceQuery {
        service: a.service.clone(),
        instance: a.instance.clone(),
        ids: Vec::new(),
        resource_type: a.resource_type.clone(),
        tags: a.tag.clone(),
        limit: a.limit,
        offset: a.offset,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&page).unwrap());
        return Ok(());
    }
    println!(
        "{:<40} {:<24} {:<24} {:<10} {:<12}",
        "RESOURCE", "SERVICE", "INSTANCE", "OWNER", "TYPE"
    );
    for r in &page.items {
        println!(
            "{:<40} {:<24} {:<24} {:<10} {:<12}",
            r.id,
            r.service,
            r.instance_id,
            format!("{:?}", r.owner_status),
            r.metadata.resource_type
        );
    }
    println!(
        "{} of {} (offset {}){}",
        page.items.len(),
        page.total,
        a.offset,
        if page.has_more {
            ", more with --offset"
        } else {
            ""
        }
    );
    Ok(())
}

/// Administrator release of `ids`, whoever owns them (all or none).
pub fn release(bus: &Bus, ids: &[String], json: bool) -> Result<(), CliError> {
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let r = bus.release_resources(
        &refs,
        BulkOptions {
            mode: BulkMode::AllOrNothing,
            ..Default::default()
        },
    )?;
    if json {
        println!("{}", serde_json::to_string(&r).unwrap());
    }
    match r.failures.first() {
        Some(f) => Err(f.to_error().into()),
        None => {
            if !json {
                println!("released {}", r.succeeded);
            }
            Ok(())
        }
    }
}
