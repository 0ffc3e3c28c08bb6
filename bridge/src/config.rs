//! Settings: command-line flags, the same keys in a TOML file (`--config FILE`), flags win.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(clap::Parser, Debug, Default)]
#[command(
    name = "aegis-bridge",
    about = "Connects one aegis-ipc bus to NATS, speaking the AegisIPC subjects and models"
)]
pub struct Args {
    /// TOML file with any of the keys below (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The local bus directory (default: as clients find it, `AEGIS_IPC_DIR`, …).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (key `nats`).
    #[arg(long)]
    pub nats: Option<String>,
    /// Local services to offer on NATS (glob: `*`, `?`); repeatable.
    #[arg(long = "export")]
    pub export: Vec<String>,
    /// Services of other hosts to make routable here (glob); repeatable.
    #[arg(long = "import")]
    pub import: Vec<String>,
    /// This host's name on NATS (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long)]
    pub creds: Option<PathBuf>,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    #[arg(long)]
    pub token: Option<String>,
    /// NKey seed.
    #[arg(long)]
    pub nkey: Option<String>,
    /// Require TLS to the server.
    #[arg(long)]
    pub tls: bool,
    /// CA certificate(s) (PEM) to trust for the server.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// How often exported instances are announced (milliseconds; default 1000).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// This bridge's signing key (an nkey seed; mode 0600): announcements and resource
    /// entries are signed with it. `--new-signing-key FILE` makes one.
    #[arg(long)]
    pub signing_key_file: Option<PathBuf>,
    /// A host whose bridge is believed, as `HOST=PUBLIC_NKEY` (repeatable; file:
    /// `[trusted_hosts]`). With any, announcements and resource entries are taken only from
    /// these hosts, signed by their keys, for their own instance ids.
    #[arg(long = "trust", value_parser = parse_trust)]
    pub trust: Vec<(String, String)>,
    /// With trusted hosts: still take unsigned announcements (AegisIPC instances of the
    /// seed's SDK, which cannot sign). Off by default.
    #[arg(long)]
    pub accept_unsigned: bool,
    /// Write a new signing key's seed to FILE (mode 0600), print its public key, and exit.
    #[arg(long)]
    pub new_signing_key: Option<PathBuf>,
    /// A remote instance not heard from for this long leaves local routing (milliseconds;
    /// default 30000, the seed's absolute heartbeat timeout: an instance that heartbeats
    /// every 10 s stays).
    #[arg(long)]
    pub remote_timeout_ms: Option<u64>,
    /// JetStream key-value bucket holding which host owns each resource id (default
    /// `aegis_resources`; `""` turns resource routing across hosts off).
    #[arg(long)]
    pub kv_bucket: Option<String>,
    /// Log filter (default `info`).
    #[arg(long)]
    pub log: Option<String>,
    /// Check the settings, print the effective ones and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The file's keys: the flags' names with `_` for `-`.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct File {
    dir: Option<PathBuf>,
    nats: Option<String>,
    #[serde(default)]
    export: Vec<String>,
    #[serde(default)]
    import: Vec<String>,
    name: Option<String>,
    creds: Option<PathBuf>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    nkey: Option<String>,
    tls: Option<bool>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    heartbeat_ms: Option<u64>,
    remote_timeout_ms: Option<u64>,
    signing_key_file: Option<PathBuf>,
    #[serde(default)]
    trusted_hosts: std::collections::BTreeMap<String, String>,
    accept_unsigned: Option<bool>,
    kv_bucket: Option<String>,
    log: Option<String>,
}

/// The effective settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: Option<PathBuf>,
    pub nats: String,
    pub export: Vec<String>,
    pub import: Vec<String>,
    pub name: String,
    pub creds: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub nkey: Option<String>,
    pub tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub heartbeat: Duration,
    pub remote_timeout: Duration,
    pub signing_key_file: Option<PathBuf>,
    pub trusted_hosts: std::collections::BTreeMap<String, String>,
    pub accept_unsigned: bool,
    pub kv_bucket: Option<String>,
    pub log: String,
}

impl Settings {
    /// Flags over the file; every problem is one line naming the key.
    pub fn resolve(a: Args) -> Result<Settings, String> {
        let f = match &a.config {
            None => File::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read configuration {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| {
                    let line = e
                        .span()
                        .map(|s| text[..s.start].matches('\n').count() + 1)
                        .unwrap_or(0);
                    format!(
                        "{} line {line}: {}",
                        p.display(),
                        e.message().replace('\n', " ")
                    )
                })?
            }
        };
        let pick = |v: Vec<String>, w: Vec<String>| if v.is_empty() { w } else { v };
        let s = Settings {
            dir: a.dir.or(f.dir),
            nats: a
                .nats
                .or(f.nats)
                .ok_or("no NATS server given (--nats URL or key nats)")?,
            export: pick(a.export, f.export),
            import: pick(a.import, f.import),
            name: a.name.or(f.name).unwrap_or_else(hostname),
            creds: a.creds.or(f.creds),
            user: a.user.or(f.user),
            password: a.password.or(f.password),
            token: a.token.or(f.token),
            nkey: a.nkey.or(f.nkey),
            tls: a.tls || f.tls.unwrap_or(false),
            tls_ca: a.tls_ca.or(f.tls_ca),
            tls_cert: a.tls_cert.or(f.tls_cert),
            tls_key: a.tls_key.or(f.tls_key),
            heartbeat: Duration::from_millis(a.heartbeat_ms.or(f.heartbeat_ms).unwrap_or(1000)),
            remote_timeout: Duration::from_millis(
                a.remote_timeout_ms
                    .or(f.remote_timeout_ms)
                    .unwrap_or(30_000),
            ),
            signing_key_file: a.signing_key_file.or(f.signing_key_file),
            trusted_hosts: if a.trust.is_empty() {
                f.trusted_hosts
            } else {
                a.trust.into_iter().collect()
            },
            accept_unsigned: a.accept_unsigned || f.accept_unsigned.unwrap_or(false),
            kv_bucket: match a.kv_bucket.or(f.kv_bucket) {
                None => Some("aegis_resources".into()),
                Some(b) if b.is_empty() => None,
                Some(b) => Some(b),
            },
            log: a.log.or(f.log).unwrap_or_else(|| "info".into()),
        };
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), String> {
        if self.export.is_empty() && self.import.is_empty() {
            return Err("nothing to bridge: give --export PATTERN and/or --import PATTERN".into());
        }
        for p in self.export.iter().chain(&self.import) {
            check_pattern(p)?;
        }
        aegis_client::names::instance_id(&format!("x@{}", self.name))
            .map_err(|e| format!("--name {:?}: {e}", self.name))?;
        if self.name.contains(['.', '*', '>']) {
            return Err(format!(
                "--name {:?}: a host name here may not contain '.', '*' or '>' (it becomes part of NATS subjects)",
                self.name
            ));
        }
        if self.heartbeat.is_zero() {
            return Err("heartbeat_ms must be more than 0".into());
        }
        if !self.trusted_hosts.is_empty() && self.signing_key_file.is_none() {
            return Err(
                "trusted_hosts needs signing_key_file: the other hosts check this bridge's \
                 signatures too (aegis-bridge --new-signing-key FILE makes one)"
                    .into(),
            );
        }
        if self.remote_timeout <= self.heartbeat {
            return Err(format!(
                "remote_timeout_ms {} must be more than heartbeat_ms {}",
                self.remote_timeout.as_millis(),
                self.heartbeat.as_millis()
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key go together".into());
        }
        if let Some(b) = &self.kv_bucket {
            if !b
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!(
                    "kv_bucket {b:?}: letters, digits, '_' and '-' only"
                ));
            }
        }
        Ok(())
    }
}

/// A service pattern: a non-empty glob without whitespace or control characters.
pub fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "pattern {p:?}: a service name glob (`*` any run, `?` one character), without spaces"
        ));
    }
    Ok(())
}

/// Whether `name` matches glob `pattern` (`*`: any run of characters, `?`: one).
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point (the last `*`).
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().replace('.', "-"))
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `HOST=PUBLIC_NKEY`.
fn parse_trust(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(h, k)| !h.is_empty() && !k.is_empty())
        .map(|(h, k)| (h.to_owned(), k.to_owned()))
        .ok_or_else(|| format!("{s:?} is not HOST=PUBLIC_NKEY"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("user-*", "user-service"));
        assert!(glob("a?c", "abc"));
        assert!(glob("*.v1", "echo.v1"));
        assert!(!glob("user-*", "users"));
        assert!(!glob("a?c", "ac"));
        assert!(glob("a*b*c", "aXbYbZc"));
    }
}
