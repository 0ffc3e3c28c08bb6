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
