//! A throw-away bus for `demo` and `bench --spawn`: a broker in a temporary directory and
//! echo instances in child processes, all stopped and removed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct PrivateBus {
    dir: tempfile::TempDir,
    broker: Child,
    instances: Vec<Child>,
}

/// Spawns `cmd` and waits (bounded) for a stdout line starting with `ready_prefix`.
pub fn spawn_ready(
    mut cmd: Command,
    ready_prefix: &str,
    what: &str,
) -> Result<(Child, String), String> {
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let prefix = ready_prefix.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(&prefix) {
                let _ = tx.send(line);
                // Keep draining so the child never blocks on a full pipe.
            }
        }
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) => Ok((child, line)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            Err(format!(
                "{what} did not become ready within {READY_TIMEOUT:?} (exit status {status:?})"
            ))
        }
    }
}

/// The broker, run from this executable (`aegisctl broker`, the same code as
/// `aegis-broker`): a private bus can then never meet a stale broker binary built from
/// other sources.
pub fn broker_command() -> Command {
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("aegisctl"));
    let mut c = Command::new(me);
    c.arg("broker");
    c
}

impl PrivateBus {
    pub fn start() -> Result<PrivateBus, String> {
        let dir = tempfile::Builder::new()
            .prefix("aegis-private-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let mut cmd = broker_command();
        cmd.arg("--dir").arg(dir.path()).arg("--log").arg("warn");
        let (broker, _) = spawn_ready(cmd, "aegis-broker ready", "the broker")?;
        Ok(PrivateBus {
            dir,
            broker,
            instances: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn broker_pid(&self) -> u32 {
        self.broker.id()
    }

    /// Starts `aegisctl serve SERVICE --instance ID --echo` as a child process.
    pub fn spawn_echo(&mut self, service: &str, id: &str, extra: &[&str]) -> Result<u32, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(me);
        cmd.arg("--dir")
            .arg(self.dir.path())
            .args(["serve", service, "--instance", id, "--echo"])
            .args(extra);
        let (child, _) = spawn_ready(cmd, "ready", &format!("instance {id}"))?;
        let pid = child.id();
        self.instances.push(child);
        Ok(pid)
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        // Instances first (they unregister from a live broker), then the broker.
        stop_all(&mut self.instances);
        stop_all(std::slice::from_mut(&mut self.broker));
    }
}

fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}
