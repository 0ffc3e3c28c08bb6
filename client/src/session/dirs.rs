//! Where a bus lives. The broker and its clients resolve the directory the same way, so
//! one environment variable (`AEGIS_IPC_DIR`) points everything at a private bus.

use std::path::{Path, PathBuf};

pub const ENV_DIR: &str = "AEGIS_IPC_DIR";
pub const SOCKET: &str = "control.sock";
pub const LOCK: &str = "broker.lock";

fn candidates() -> Vec<PathBuf> {
    let mut c = vec![PathBuf::from("/run/aegis-ipc")];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        c.push(Path::new(&x).join("aegis-ipc"));
    }
    // SAFETY: getuid has no failure mode and touches no memory.
    c.push(PathBuf::from(format!("/tmp/aegis-ipc-{}", unsafe {
        libc::getuid()
    })));
    c
}

fn writable(dir: &Path) -> bool {
    let probe = if dir.exists() {
        dir
    } else {
        dir.parent().unwrap_or(dir)
    };
    nix::unistd::access(probe, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The directory a broker started without `--dir` uses: `$AEGIS_IPC_DIR`, else
/// `/run/aegis-ipc` when writable, else `$XDG_RUNTIME_DIR/aegis-ipc`, else `/tmp/aegis-ipc-$UID`.
pub fn broker_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(ENV_DIR).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let c = candidates();
    c.iter()
        .find(|d| writable(d))
        .cloned()
        .unwrap_or_else(|| c[c.len() - 1].clone())
}

/// The directory a client connects to: `$AEGIS_IPC_DIR`, else the first candidate with a
/// control socket in it, else where a broker would be started.
pub fn client_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(ENV_DIR).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    candidates()
        .into_iter()
        .find(|d| d.join(SOCKET).exists())
        .unwrap_or_else(broker_dir)
}
