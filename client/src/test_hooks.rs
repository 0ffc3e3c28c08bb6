//! Test-only hooks (feature `test-hooks`), for fault-injection tests of real processes.

use std::io::Write;
use std::sync::OnceLock;

/// With `AEGIS_TEST_PARK_AFTER_CLAIM` set, a producer stops for good right after claiming a
/// ring slot and before publishing it, after printing `parked` on stdout, so a test can
/// SIGKILL it at exactly that point.
pub(crate) fn park_after_claim() {
    static PARK: OnceLock<bool> = OnceLock::new();
    if *PARK.get_or_init(|| std::env::var_os("AEGIS_TEST_PARK_AFTER_CLAIM").is_some()) {
        println!("parked");
        let _ = std::io::stdout().flush();
        loop {
            std::thread::park();
        }
    }
}

/// With `AEGIS_TEST_RECONNECT_DELAY_MS=N`, a process that lost the broker waits N ms more
/// before its first reconnect attempt, so a test can have callers reach a restarted broker
/// before this process's instances do.
pub(crate) fn reconnect_delay() -> Option<std::time::Duration> {
    let ms = std::env::var("AEGIS_TEST_RECONNECT_DELAY_MS").ok()?;
    Some(std::time::Duration::from_millis(ms.parse().ok()?))
}

/// With `AEGIS_TEST_FORK_HOLDER` set, a process that has just registered an instance forks
/// a child that does nothing but hold every descriptor it inherited, the control
/// connection included, and prints `holder PID`: when the registering process dies, its
/// connection stays open, so only the broker's process watch can notice the death.
pub(crate) fn fork_control_holder() {
    if std::env::var_os("AEGIS_TEST_FORK_HOLDER").is_none() {
        return;
    }
    // SAFETY: the child calls only async-signal-safe functions (pause) and never returns
    // into Rust code of the parent's other threads.
    match unsafe { libc::fork() } {
        0 => loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        },
        pid if pid > 0 => {
            println!("holder {pid}");
            let _ = std::io::stdout().flush();
        }
        _ => {}
    }
}
