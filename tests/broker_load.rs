//! The broker's own loop under an HTTP flood: with 100,000 resources claimed and eight
//! threads fetching `/api/v1/admin/resources?limit=1` as fast as they can, SIGKILLed
//! instances still leave routing within milliseconds and the systemd watchdog is never
//! late: HTTP runs on a thread of its own and reads the state one request at a time.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{broker_bin, TestBus};

const TOKEN: &str = "load-token-0123456789abcdef";
/// The watchdog interval systemd would ask for: the broker pings every half of it.
const WATCHDOG_USEC: u64 = 400_000;

fn get(addr: &str, path: &str) -> u16 {
    support::http_get(addr, path, Some(TOKEN)).0
}

#[test]
fn killed_instances_leave_and_the_watchdog_ticks_while_the_admin_api_is_flooded() {
    let dir = tempfile::Builder::new()
        .prefix("aegis-test-")
        .tempdir()
        .unwrap();
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), TOKEN).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let bus_dir = dir.path().join("bus");
    // systemd names the pid the watchdog is for (WATCHDOG_PID): the shell's, which `exec`
    // hands to the broker.
    let mut c = Command::new("sh");
    c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(broker_bin())
        .arg("--dir")
        .arg(&bus_dir)
        .args(["--log", "warn", "--http-listen", "127.0.0.1:0"])
        .arg("--http-token-file")
        .arg(token.path())
        .args([
            "--max-resources-per-instance",
            "100000",
            "--max-resources-per-uid",
            "200000",
        ])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string());
    let (broker, addr) = support::start_http_broker(c);
    let bus = TestBus {
        dir: tempfile::TempDir::new().unwrap(),
        broker,
    };
    let client = aegis_client::Bus::connect_dir(&bus_dir).unwrap();

    // 100,000 resources, owned by one instance of this process.
    let holder = client.register("holder", "h", &[]).unwrap();
    let ids: Vec<String> = (0..100_000).map(|i| format!("doc-{i:06}")).collect();
    for chunk in ids.chunks(1000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        holder.claim(&refs).unwrap();
    }

    // Pings sent before the flood are not what is measured.
    let mut buf = [0u8; 512];
    notify.set_nonblocking(true).unwrap();
    while notify.recv(&mut buf).is_ok() {}
    notify.set_nonblocking(false).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = AtomicBool::new(false);
    let (fetched, ok) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut gaps = Vec::new();
    let mut removal = Vec::new();
    let mut listing = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    if get(&addr, "/api/v1/admin/resources?limit=1") == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    fetched.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // The watchdog pings, timed while the flood runs.
        let pings = s.spawn(|| {
            let mut at = Vec::new();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = notify.recv(&mut buf) {
                    if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                        at.push(Instant::now());
                    }
                }
            }
            at
        });
        support::wait_for("the flood under way", || ok.load(Ordering::Relaxed) > 50);
        // At least 20 kills, and at least 3 s of flood (a dozen watchdog pings).
        let flood = Instant::now();
        let mut i = 0;
        while i < 20 || flood.elapsed() < Duration::from_secs(3) {
            i += 1;
            let mut served = Command::new(support::aegisctl_bin());
            served.arg("--dir").arg(&bus_dir).args([
                "serve",
                "victim",
                "--instance",
                &format!("v{i}"),
                "--echo",
            ]);
            let (mut child, _) = support::spawn_ready(served, "ready ");
            let seen = client.watch("victim", 0, Duration::ZERO);
            let t = Instant::now();
            child.kill().unwrap();
            let mut gen = seen;
            while client
                .service("victim")
                .is_ok_and(|s| s.instances.iter().any(|x| x.id == format!("v{i}")))
            {
                gen = client.watch("victim", gen, support::DEADLINE);
                assert!(t.elapsed() < support::DEADLINE, "v{i} never left");
            }
            removal.push(t.elapsed());
            let _ = child.wait();
            // What `aegisctl services` asks, timed.
            for _ in 0..5 {
                let t = Instant::now();
                client.services().unwrap();
                listing.push(t.elapsed());
            }
        }
        stop.store(true, Ordering::Relaxed);
        let at = pings.join().unwrap();
        gaps = at.windows(2).map(|w| w[1] - w[0]).collect();
    });
    removal.sort();
    listing.sort();
    let p99 = removal[removal.len() * 99 / 100];
    let list_p99 = listing[listing.len() * 99 / 100];
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", bus.broker.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} admin requests ({} ok); removal after SIGKILL: p50 {:?}, p99 {p99:?}; services listing p50 {:?}, p99 {list_p99:?}; {} watchdog pings, longest gap {max_gap:?}; broker RSS {rss_kb} kB",
        fetched.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed),
        removal[removal.len() / 2],
        listing[listing.len() / 2],
        gaps.len() + 1
    );
    assert!(
        list_p99 < Duration::from_millis(50),
        "services listing p99 {list_p99:?}"
    );
    // 100,000 resources' records and their registry: well under this.
    assert!(rss_kb < 256 * 1024, "broker RSS {rss_kb} kB");
    assert!(
        gaps.len() >= 5,
        "the watchdog pinged {} times",
        gaps.len() + 1
    );
    // A gap of WATCHDOG_USEC would have systemd restart the broker.
    assert!(
        max_gap < Duration::from_micros(WATCHDOG_USEC),
        "watchdog late: {max_gap:?}"
    );
    // The stated figure is 5 ms; the bound catches a loop that waits behind HTTP (322 ms
    // before this change), not the scheduler noise of a loaded two-core machine.
    assert!(p99 < Duration::from_millis(50), "removal p99 {p99:?}");
    drop(holder);
    drop(bus);
}
