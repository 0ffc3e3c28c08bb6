//! Broker settings (command-line flags).

use std::path::PathBuf;

use aegis_client::layout;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "aegis-broker",
    version,
    about = "aegis-ipc broker: owns the bus's shared memory and registry"
)]
pub struct BrokerConfig {
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
    /// Shared memory (instance and client segments, virtual size) all processes of one uid
    /// may hold together.
    #[arg(long, default_value_t = 8 << 30)]
    pub max_shm_per_uid: u64,
    /// Instances one uid may have registered. Default: --max-instances.
    #[arg(long)]
    pub max_instances_per_uid: Option<u32>,
    /// Connected processes (client slots) one uid may have. Default: --max-clients.
    #[arg(long)]
    pub max_clients_per_uid: Option<u32>,
    /// Resources the instances of one uid may own together. Default: --max-resources.
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
    /// Log filter (tracing env-filter syntax); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExitDetection {
    Pidfd,
    Poll,
}

impl BrokerConfig {
    pub fn max_instances_per_uid(&self) -> u32 {
        self.max_instances_per_uid.unwrap_or(self.max_instances)
    }
    pub fn max_clients_per_uid(&self) -> u32 {
        self.max_clients_per_uid.unwrap_or(self.max_clients)
    }
    pub fn max_resources_per_uid(&self) -> u32 {
        self.max_resources_per_uid.unwrap_or(self.max_resources)
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
