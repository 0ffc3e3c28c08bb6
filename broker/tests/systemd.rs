//! systemd integration without systemd: the broker talks `sd_notify` to a datagram socket
//! the test binds (`NOTIFY_SOCKET`). The packaged units are checked in the workspace's
//! `tests/packaging.rs`.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Messages until one contains `want` (each datagram may hold several lines).
fn expect(sock: &UnixDatagram, want: &str) -> String {
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == want) {
                    return msg;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("no {want} from the broker within 30 s");
}

/// A broker that dies with the test even if an assertion fails first.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a broker on bus directory `bus`, notifying `notify`, with systemd's watchdog
/// set to `watchdog_usec`.
fn spawn_broker(bus: &std::path::Path, notify: &std::path::Path, watchdog_usec: &str) -> Reap {
    // systemd names the watched process in WATCHDOG_PID: the shell's pid, which `exec`
    // hands to the broker.
    let child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_aegis-broker"))
        .arg("--dir")
        .arg(bus)
        .args(["--log", "warn"])
        .env("NOTIFY_SOCKET", notify)
        .env("WATCHDOG_USEC", watchdog_usec)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Reap(child)
}

#[test]
fn the_broker_notifies_ready_watchdog_status_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let bus = dir.path().join("bus");
    let child = spawn_broker(&bus, &notify, "200000");
    let ready = expect(&sock, "READY=1");
    assert!(ready.contains("STATUS=serving 0 services"), "{ready}");
    expect(&sock, "WATCHDOG=1");
    expect(&sock, "WATCHDOG=1");
    let pid = child.0.id();
    let mut child = child;
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    expect(&sock, "STOPPING=1");
    assert!(child.0.wait().unwrap().success());
}

/// A notify socket nobody reads never stops the broker: with its datagram queue full
/// (10 datagrams by default; watchdog pings every 10 ms fill it), a client still gets its
/// `Hello` answered and SIGTERM still ends the broker. (Before, `sd_notify`'s blocking
/// send stopped the event loop: the client's Hello timed out after 10 s and the broker
/// ignored SIGTERM.)
#[test]
fn a_notify_socket_nobody_reads_never_stops_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let _sock = UnixDatagram::bind(&notify).unwrap();
    let bus = dir.path().join("bus");
    let mut child = spawn_broker(&bus, &notify, "20000");
    let end = Instant::now() + Duration::from_secs(30);
    while !bus.join("control.sock").exists() {
        assert!(Instant::now() < end, "the broker never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Full once a send of our own would block: the broker's next notification blocks
    // where sends block.
    let probe = UnixDatagram::unbound().unwrap();
    probe.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match probe.send_to(b"X=probe\n", &notify) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            _ if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
            other => panic!("the notify queue never filled: {other:?}"),
        }
    }
    let start = Instant::now();
    let client = aegis_client::Bus::connect_dir(&bus);
    assert!(
        client.is_ok(),
        "Hello with a full notify queue: {:?} after {:?}",
        client.err(),
        start.elapsed()
    );
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "SIGTERM did not end the broker within 10 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
