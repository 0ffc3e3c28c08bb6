//! Broker settings: command-line flags, and the same settings (plus the access policy)
//! in a TOML file given with `--config` (default [`DEFAULT_CONFIG`] when it exists).
//! Every flag has a key of the same name with `_` for `-` (`--max-clients` is
//! `max_clients`; the repeatable `--admin-uid`/`--admin-gid` are `admin_uids`/`admin_gids`);
//! flags override the file. SIGHUP re-reads the file (see [`BrokerConfig::reloaded`]).

use std::ffi::OsString;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aegis_client::layout;
use clap::{CommandFactory, FromArgMatches};
use serde::{Deserialize, Serialize};

use crate::policy::Rule;

/// Read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/aegis-ipc/broker.toml";

#[derive(Debug, Clone, clap::Parser, Serialize)]
#[command(
    name = "aegis-broker",
    version,
    about = "aegis-ipc broker: owns the bus's shared memory and registry"
)]
pub struct BrokerConfig {
    /// Configuration file (TOML). Default: /etc/aegis-ipc/broker.toml if it exists.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Validate the configuration (flags and file), print the effective one, and exit.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// Bus directory (control socket, lock). Default: $AEGIS_IPC_DIR, /run/aegis-ipc if
    /// writable, $XDG_RUNTIME_DIR/aegis-ipc, else /tmp/aegis-ipc-$UID.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Service slots in the registry (power of two).
    #[arg(long, default_value_t = 256)]
    pub max_services: u32,
    /// Instance slots in the registry.
    #[arg(long, default_value_t = 1024)]
    pub max_instances: u32,
    /// Connected processes at once.
    #[arg(long, default_value_t = 1024)]
    pub max_clients: u32,
    /// Slots of the shared-memory resource map (power of two; keep about twice the ids in use).
    #[arg(long, default_value_t = 262_144)]
    pub max_resources: u32,
    /// Resources one instance may own.
    #[arg(long, default_value_t = 1000)]
    pub max_resources_per_instance: u32,
    /// Ring bytes (slots and their headers) one instance may have; a service asking for
    /// more slots or larger ones is refused at registration.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_ring_bytes: u64,
    /// Shared memory (instance, client and channel segments and request heaps, by size) all
    /// processes of one uid may hold together. A channel (a caller to one instance) costs
    /// about 0.6 MiB; one that has carried a request larger than a ring slot, or a loan,
    /// also has a request heap of twice --max-message (32 MiB by default, costing memory
    /// only where touched). The default admits two thousand such channels of one uid; lower
    /// both on hosts shared with untrusted uids.
    #[arg(long, default_value_t = 64 << 30)]
    pub max_shm_per_uid: u64,
    /// Instances one uid may have registered. Default: a quarter of --max-instances for
    /// other uids; --max-instances for the broker's uid, root and --admin-uid.
    #[arg(long)]
    pub max_instances_per_uid: Option<u32>,
    /// Connected processes (client slots, and control connections) one uid may have.
    /// Default: a quarter of --max-clients for other uids; --max-clients for the broker's
    /// uid, root and --admin-uid.
    #[arg(long)]
    pub max_clients_per_uid: Option<u32>,
    /// Resources the instances of one uid may own together. Default: a quarter of
    /// --max-resources for other uids; --max-resources for the broker's uid, root and
    /// --admin-uid.
    #[arg(long)]
    pub max_resources_per_uid: Option<u32>,
    /// Open control connections (before and after their Hello) at once; the broker also
    /// raises its descriptor limit to the hard limit at start. Default: --max-clients + 64.
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Default inline bytes per request slot (a service may choose its own).
    #[arg(long, default_value_t = layout::DEFAULT_SLOT_SIZE)]
    pub slot_size: u32,
    /// Default slots per instance ring.
    #[arg(long, default_value_t = layout::DEFAULT_SLOT_COUNT)]
    pub slot_count: u32,
    /// Largest message any service may carry, in bytes (default 16 MiB).
    #[arg(long, default_value_t = layout::DEFAULT_MAX_MESSAGE)]
    pub max_message: u64,
    /// Mode of the control socket (octal); 600 = owner only, 660 = owner and group.
    #[arg(long, default_value = "600")]
    pub socket_mode: String,
    /// Uids allowed administrative actions (force, release or transfer any resource).
    /// Default: root only.
    #[arg(long = "admin-uid", default_values_t = [0u32])]
    pub admin_uids: Vec<u32>,
    /// Gids whose members are administrators too.
    #[arg(long = "admin-gid")]
    pub admin_gids: Vec<u32>,
    /// How registered processes are watched for exit: `pidfd` (event-driven), or `poll`
    /// (`kill(pid, 0)` and the `/proc` start time on every 100 ms tick: the fallback for
    /// kernels without pidfd, always used where pidfd_open fails).
    #[arg(long, value_enum, default_value_t = ExitDetection::Pidfd)]
    pub exit_detection: ExitDetection,
    /// Use a bus directory that group or others may write (refused by default: whoever
    /// can write it can replace the control socket).
    #[arg(long)]
    pub allow_shared_dir: bool,
    /// After a restart, how long resources journaled by the previous run wait for their
    /// owners to claim them again (and get their metadata and expiry back) before they are
    /// forgotten, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub journal_recovery_ms: u64,
    /// Serve /metrics (Prometheus) and the read-only admin API (/api/v1/admin/...) on this
    /// address (e.g. 127.0.0.1:9464). Off unless given.
    #[arg(long)]
    pub http_listen: Option<std::net::SocketAddr>,
    /// A file holding the bearer token every HTTP request must carry
    /// (`Authorization: Bearer TOKEN`): owned by the broker's uid, readable by no one else
    /// (mode 0600 or 0400). Required with `http_listen`, unless `http_metrics_open` is set
    /// (then only /metrics is served, to anyone who can connect).
    #[arg(long)]
    pub http_token_file: Option<PathBuf>,
    /// Serve /metrics without the token (the admin API still needs it).
    #[arg(long)]
    pub http_metrics_open: bool,
    /// Log lines as text, or as one JSON object per line (for log collectors).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Per-service access rules (`[[policy]]` in the file only; see `policy`).
    #[arg(skip)]
    pub policy: Vec<Rule>,
    /// The settings from the command line alone (before the file), and which of them were
    /// given explicitly: what a reload starts from.
    #[arg(skip)]
    #[serde(skip)]
    cli: Option<Box<(BrokerConfig, Vec<String>)>>,
}

/// The file's keys: the flags' settings, all optional, and the policy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dir: Option<PathBuf>,
    max_services: Option<u32>,
    max_instances: Option<u32>,
    max_clients: Option<u32>,
    max_resources: Option<u32>,
    max_resources_per_instance: Option<u32>,
    max_ring_bytes: Option<u64>,
    max_shm_per_uid: Option<u64>,
    max_instances_per_uid: Option<u32>,
    max_clients_per_uid: Option<u32>,
    max_resources_per_uid: Option<u32>,
    max_connections: Option<u32>,
    slot_size: Option<u32>,
    slot_count: Option<u32>,
    max_message: Option<u64>,
    socket_mode: Option<String>,
    admin_uids: Option<Vec<u32>>,
    admin_gids: Option<Vec<u32>>,
    exit_detection: Option<ExitDetection>,
    allow_shared_dir: Option<bool>,
    http_listen: Option<std::net::SocketAddr>,
    journal_recovery_ms: Option<u64>,
    http_token_file: Option<PathBuf>,
    http_metrics_open: Option<bool>,
    log_format: Option<LogFormat>,
    log: Option<String>,
    #[serde(default)]
    policy: Vec<Rule>,
}

/// Sets each field the file has, unless the command line gave it.
macro_rules! take_from_file {
    ($cfg:ident, $file:ident, $given:ident; plain: $($f:ident),*; optional: $($o:ident),*) => {
        $(if let Some(v) = $file.$f {
            if !$given.iter().any(|g| g == stringify!($f)) {
                $cfg.$f = v;
            }
        })*
        $(if let Some(v) = $file.$o {
            if !$given.iter().any(|g| g == stringify!($o)) {
                $cfg.$o = Some(v);
            }
        })*
    };
}

impl BrokerConfig {
    /// Flags, then the file (`--config`, or [`DEFAULT_CONFIG`] if it exists) under them.
    /// A usage error exits like clap does (help, version, bad flag).
    pub fn load(
        args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    ) -> Result<BrokerConfig, String> {
        let m = BrokerConfig::command().get_matches_from(args);
        let cli = BrokerConfig::from_arg_matches(&m).map_err(|e| e.to_string())?;
        let given: Vec<String> = m
            .ids()
            .filter(|id| {
                m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.as_str().to_owned())
            .collect();
        let mut cfg = cli.clone();
        cfg.cli = Some(Box::new((cli, given)));
        cfg.read_file()?;
        Ok(cfg)
    }

    /// The file this configuration reads, if any.
    pub fn file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let d = PathBuf::from(DEFAULT_CONFIG);
            d.exists().then_some(d)
        })
    }

    fn read_file(&mut self) -> Result<(), String> {
        let Some(path) = self.file() else {
            return Ok(());
        };
        let mut file = parse_file(&path)?;
        let given = self.cli.as_ref().map(|c| c.1.clone()).unwrap_or_default();
        let policy = std::mem::take(&mut file.policy);
        take_from_file!(self, file, given;
            plain: max_services, max_instances, max_clients, max_resources,
                max_resources_per_instance, max_ring_bytes, max_shm_per_uid, slot_size,
                slot_count, max_message, socket_mode, admin_uids, admin_gids, exit_detection,
                allow_shared_dir, log_format, log, http_metrics_open, journal_recovery_ms;
            optional: dir, http_listen, http_token_file, max_instances_per_uid, max_clients_per_uid, max_resources_per_uid,
                max_connections);
        crate::policy::validate(&policy).map_err(|e| format!("{}: {e}", path.display()))?;
        self.policy = policy;
        self.validate()
            .map_err(|e| format!("invalid configuration (with {}): {e}", path.display()))?;
        Ok(())
    }

    /// The configuration as the file now says, under the same command line: what SIGHUP
    /// applies. An error (the file does not parse or validate) leaves everything as it was.
    pub fn reloaded(&self) -> Result<BrokerConfig, String> {
        let (cli, given) = self
            .cli
            .as_deref()
            .cloned()
            .unwrap_or_else(|| (self.clone(), Vec::new()));
        let mut cfg = cli.clone();
        cfg.cli = Some(Box::new((cli, given)));
        cfg.read_file()?;
        Ok(cfg)
    }

    /// The effective configuration as TOML (what `--check-config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print: {e}"))
    }
}

fn parse_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read configuration {}: {e}", path.display()))?;
    // One line naming the line and what is wrong there (toml's own text spans several).
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(n) => format!(
                "configuration {}: line {n}: {}",
                path.display(),
                e.message()
            ),
            None => format!("configuration {}: {}", path.display(), e.message()),
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitDetection {
    Pidfd,
    Poll,
}

impl BrokerConfig {
    /// The broker's own uid, root and `--admin-uid`s: trusted with the whole of each cap
    /// unless a per-uid cap is set explicitly.
    fn trusted_uid(&self, uid: u32) -> bool {
        uid == 0 || uid == nix::unistd::geteuid().as_raw() || self.admin_uids.contains(&uid)
    }
    /// `explicit`, else the whole `global` cap for a trusted uid and a quarter of it for any
    /// other: no single untrusted uid can take every slot.
    fn per_uid(&self, explicit: Option<u32>, global: u32, uid: u32) -> u32 {
        explicit.unwrap_or(if self.trusted_uid(uid) {
            global
        } else {
            (global / 4).max(1)
        })
    }
    pub fn max_instances_per_uid(&self, uid: u32) -> u32 {
        self.per_uid(self.max_instances_per_uid, self.max_instances, uid)
    }
    pub fn max_clients_per_uid(&self, uid: u32) -> u32 {
        self.per_uid(self.max_clients_per_uid, self.max_clients, uid)
    }
    pub fn max_resources_per_uid(&self, uid: u32) -> u32 {
        self.per_uid(self.max_resources_per_uid, self.max_resources, uid)
    }
    /// The bearer token of `http_token_file`, read after checking that only the broker's
    /// uid can read or change the file.
    pub fn http_token(&self) -> Result<Option<String>, String> {
        use std::os::unix::fs::MetadataExt;
        let Some(path) = &self.http_token_file else {
            return Ok(None);
        };
        let what = |e: String| format!("http_token_file {}: {e}", path.display());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| what(e.to_string()))?;
        let m = f.metadata().map_err(|e| what(e.to_string()))?;
        let me = nix::unistd::geteuid().as_raw();
        if m.uid() != me {
            return Err(what(format!(
                "owned by uid {}, not the broker's uid {me}",
                m.uid()
            )));
        }
        if m.mode() & 0o077 != 0 {
            return Err(what(format!(
                "mode {:o} lets others read or change it (chmod 600)",
                m.mode() & 0o777
            )));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut { f }, &mut text).map_err(|e| what(e.to_string()))?;
        let token = text.trim().to_owned();
        if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(what(
                "the token must be one word of at least 16 characters".into(),
            ));
        }
        Ok(Some(token))
    }

    pub fn max_connections(&self) -> u32 {
        self.max_connections
            .unwrap_or(self.max_clients.saturating_add(64))
    }

    pub fn validate(&self) -> Result<u32, String> {
        if !self.max_services.is_power_of_two() || self.max_services > 1 << 16 {
            return Err(format!(
                "--max-services {} must be a power of two up to 65536",
                self.max_services
            ));
        }
        if self.max_instances == 0 || self.max_instances > 1 << 20 {
            return Err(format!(
                "--max-instances {} must be in 1..=1048576",
                self.max_instances
            ));
        }
        if self.max_clients == 0 || self.max_clients > 1 << 20 {
            return Err(format!(
                "--max-clients {} must be in 1..=1048576",
                self.max_clients
            ));
        }
        if !self.max_resources.is_power_of_two() || self.max_resources > 1 << 24 {
            return Err(format!(
                "--max-resources {} must be a power of two up to 16777216",
                self.max_resources
            ));
        }
        if self.max_message == 0 || self.max_message > layout::MAX_MAX_MESSAGE {
            return Err(format!(
                "--max-message {} must be in 1..={}",
                self.max_message,
                layout::MAX_MAX_MESSAGE
            ));
        }
        layout::InstanceLayout {
            slot_size: self.slot_size,
            slot_count: self.slot_count,
            heap_size: 0,
        }
        .validate()
        .map_err(|e| format!("--slot-size/--slot-count: {e}"))?;
        if self.http_listen.is_some() && self.http_token_file.is_none() && !self.http_metrics_open {
            return Err(
                "http_listen needs http_token_file (a file with the bearer token the \
                 admin API and /metrics ask for, mode 0600 or 0400, owned by the broker's uid), \
                 or http_metrics_open = true to serve /metrics alone without one"
                    .into(),
            );
        }
        u32::from_str_radix(&self.socket_mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                format!(
                    "--socket-mode {:?} is not an octal mode like 600",
                    self.socket_mode
                )
            })
    }
}
