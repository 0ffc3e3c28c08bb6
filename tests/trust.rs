//! Who may be trusted: the bus directory (owner, mode, symlinks), the control socket's mode,
//! and the broker's uid as clients check it. Tests that change uids need root (they run as
//! root here and in CI); without it they say so and return.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Command;

use aegis_client::{Bus, BusOptions, Error};
use support::{broker_bin, spawn_ready, terminate, TestBus};

/// A uid no one on the machine uses.
const OTHER_UID: u32 = 54_321;

fn broker_refuses(dir: &std::path::Path, extra: &[&str]) -> String {
    let out = Command::new(broker_bin())
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the broker started on {}",
        dir.display()
    );
    assert!(!dir.join("control.sock").exists());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_socket_is_owner_only_by_default_and_a_created_directory_private() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("bus");
    let mut c = Command::new(broker_bin());
    c.arg("--dir").arg(&dir).args(["--log", "warn"]);
    let (mut broker, _) = spawn_ready(c, "aegis-broker ready");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("control.sock")), 0o600);
    terminate(&mut broker);
}

#[test]
fn a_directory_others_can_write_is_refused_unless_allowed() {
    let bus_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bus_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = broker_refuses(bus_dir.path(), &[]);
    assert!(
        err.contains("writable by group or others (mode 777)")
            && err.contains("--allow-shared-dir"),
        "{err}"
    );
    let mut c = Command::new(broker_bin());
    c.arg("--dir")
        .arg(bus_dir.path())
        .args(["--log", "warn", "--allow-shared-dir"]);
    let (mut broker, _) = spawn_ready(c, "aegis-broker ready");
    terminate(&mut broker);
}

#[test]
fn a_symlinked_directory_or_lock_file_is_refused() {
    let parent = tempfile::tempdir().unwrap();
    let real = parent.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = parent.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = broker_refuses(&link, &[]);
    assert!(err.contains("is a symlink"), "{err}");

    let target = parent.path().join("victim");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, real.join("broker.lock")).unwrap();
    let err = broker_refuses(&real, &[]);
    assert!(err.contains("broker.lock"), "{err}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
}

#[test]
fn a_directory_owned_by_another_uid_is_refused() {
    if !support::root("needs root to chown") {
        return;
    }
    let bus_dir = tempfile::tempdir().unwrap();
    nix::unistd::chown(bus_dir.path(), Some(OTHER_UID.into()), None).unwrap();
    let err = broker_refuses(bus_dir.path(), &[]);
    assert!(
        err.contains(&format!(
            "owned by uid {OTHER_UID}, not by the broker's uid 0"
        )),
        "{err}"
    );
}

#[test]
fn a_client_refuses_a_broker_running_as_another_uid_unless_trusted() {
    if !support::root("needs root to run the broker as another uid") {
        return;
    }
    let bus_dir = tempfile::tempdir().unwrap();
    nix::unistd::chown(bus_dir.path(), Some(OTHER_UID.into()), None).unwrap();
    let mut c = Command::new(broker_bin());
    c.arg("--dir")
        .arg(bus_dir.path())
        .args(["--log", "warn", "--socket-mode", "666"])
        .uid(OTHER_UID)
        .gid(OTHER_UID);
    let (mut broker, _) = spawn_ready(c, "aegis-broker ready");
    assert_eq!(
        std::fs::metadata(bus_dir.path().join("control.sock"))
            .unwrap()
            .uid(),
        OTHER_UID
    );
    let e = Bus::connect_dir(bus_dir.path()).map(drop).unwrap_err();
    assert!(
        matches!(&e, Error::BrokerUnavailable { reason, .. }
            if reason.contains(&format!("runs as uid {OTHER_UID}"))),
        "{e}"
    );
    let trusted = Bus::connect_with(BusOptions {
        dir: Some(bus_dir.path().to_owned()),
        broker_uids: vec![OTHER_UID],
        ..Default::default()
    });
    assert!(trusted.is_ok(), "{:?}", trusted.err());
    drop(trusted);
    terminate(&mut broker);
}

/// The usual case stays the usual case: same uid, nothing to configure — the connection
/// is made, it calls, and the broker it trusted is the one of that directory (its pid).
#[test]
fn a_broker_of_our_own_uid_is_trusted_without_configuration() {
    let bus = TestBus::start();
    let _e = bus.serve("echo", "e1", &[]);
    let client = aegis_client::Bus::connect_with(aegis_client::BusOptions {
        dir: Some(bus.path().to_owned()),
        broker_uids: Vec::new(),
        ..Default::default()
    })
    .expect("a broker of our own uid is trusted with no broker_uids");
    let r = client
        .call(
            "echo",
            "m",
            b"hi",
            &aegis_client::CallOptions::timeout(std::time::Duration::from_secs(5)),
        )
        .unwrap();
    assert_eq!(
        (r.payload.as_slice(), r.instance_id.as_str()),
        (&b"hi"[..], "e1")
    );
}

/// A peer in another pid namespace (here a child one: `unshare --pid --fork`) is refused
/// with an error saying so: it would write its own namespace's pids into ring claims and
/// mailboxes, which everyone else would read as other processes.
#[test]
fn a_peer_in_another_pid_namespace_is_refused() {
    if !support::root("needs root to make a pid namespace") {
        return;
    }
    let bus = TestBus::start();
    let outside = std::process::Command::new("unshare")
        .args(["--pid", "--fork"])
        .arg(support::aegisctl_bin())
        .arg("--dir")
        .arg(bus.path())
        .arg("services")
        .output()
        .expect("unshare (util-linux)");
    let err = String::from_utf8_lossy(&outside.stderr);
    assert!(
        !outside.status.success(),
        "a peer in a child pid namespace was served"
    );
    assert!(err.contains("another pid namespace"), "{err}");
    // The same command in ours is served.
    support::succeed(&mut bus.aegisctl(&["services"]));
}
