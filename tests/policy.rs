//! The broker's access policy (`[[policy]]` in its `--config` file): a process of another
//! uid (a child set to that uid, with a supplementary group) is refused where the policy
//! says so, with the rule named, and admitted where it allows; SIGHUP applies a changed
//! policy. Needs root (to run children under other uids); without it, says so and returns.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use support::{aegisctl_bin, start_broker, terminate, wait_for};

const UID: u32 = 54_322;
const GROUP: u32 = 4_242;

/// `aegisctl --dir DIR ARGS` run as `UID` with the supplementary group `GROUP`.
fn as_other_uid(dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(aegisctl_bin());
    c.arg("--dir").arg(dir).args(args);
    // SAFETY: between fork and exec only async-signal-safe calls (setgroups, setgid,
    // setuid), on plain values.
    unsafe {
        c.pre_exec(|| {
            let groups = [GROUP as libc::gid_t];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(UID) != 0
                || libc::setuid(UID) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

fn call(dir: &Path, service: &str) -> Output {
    as_other_uid(dir, &["call", service, "echo", "--data", "hi"])
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const POLICY: &str = r#"
socket_mode = "666"

[[policy]]
services = ["open.*"]
call_uids = [54322]

[[policy]]
services = ["group.*"]
call_gids = [4242]

[[policy]]
services = ["secret.*"]
"#;

#[test]
fn another_uid_is_refused_or_admitted_as_the_policy_says_and_sighup_applies_changes() {
    if !support::root("needs root to run a caller under another uid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Others must reach the socket (not write the directory).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, POLICY).unwrap();
    let mut broker = start_broker(dir.path(), &["--config", config.to_str().unwrap()]);
    let serve = |svc: &str| {
        let mut c = Command::new(aegisctl_bin());
        c.arg("--dir")
            .arg(dir.path())
            .args(["serve", svc, "--instance", "root", "--echo"]);
        support::spawn_ready(c, "ready ").0
    };
    // Root is an administrator: it may serve anything.
    let mut servers = vec![
        serve("open.echo"),
        serve("group.echo"),
        serve("secret.echo"),
        serve("plain.echo"),
    ];

    let ok = call(dir.path(), "open.echo");
    assert!(ok.status.success(), "uid call refused: {}", stderr(&ok));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "hi");
    let by_group = call(dir.path(), "group.echo");
    assert!(
        by_group.status.success(),
        "group call refused: {}",
        stderr(&by_group)
    );

    let refused = call(dir.path(), "secret.echo");
    assert!(!refused.status.success());
    let e = stderr(&refused);
    assert!(
        e.contains("permission denied")
            && e.contains("uid 54322")
            && e.contains("policy rule 3")
            && e.contains("secret.*"),
        "{e}"
    );
    let serving = as_other_uid(
        dir.path(),
        &["serve", "open.echo", "--instance", "x", "--echo"],
    );
    assert!(!serving.status.success());
    let e = stderr(&serving);
    assert!(
        e.contains("may not serve service 'open.echo'") && e.contains("policy rule 1"),
        "{e}"
    );
    // No rule for it: only the broker's uid and administrators.
    let unlisted = call(dir.path(), "plain.echo");
    assert!(!unlisted.status.success());
    let e = stderr(&unlisted);
    assert!(e.contains("no policy rule matches it"), "{e}");

    // A changed policy applies on SIGHUP.
    std::fs::write(
        &config,
        POLICY.replace(
            "services = [\"secret.*\"]",
            "services = [\"secret.*\"]\ncall_uids = [54322]",
        ),
    )
    .unwrap();
    // SAFETY: kill(2) on our broker child.
    unsafe { libc::kill(broker.id() as libc::pid_t, libc::SIGHUP) };
    wait_for("the reloaded policy to admit the call", || {
        call(dir.path(), "secret.echo").status.success()
    });
    for s in &mut servers {
        terminate(s);
    }
    terminate(&mut broker);
}

/// A bad file on SIGHUP (a key that does not exist) is refused with a line naming it, and
/// the running configuration stays; a good one then applies.
#[test]
fn a_bad_sighup_keeps_the_running_configuration() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    let locked = "admin_uids = []\n\n[[policy]]\nservices = [\"locked.*\"]\n";
    std::fs::write(&config, locked).unwrap();
    let bus_dir = dir.path().join("bus");
    let mut c = Command::new(support::broker_bin());
    c.arg("--dir")
        .arg(&bus_dir)
        .args(["--log", "warn", "--config", config.to_str().unwrap()])
        .stderr(std::process::Stdio::piped());
    let (mut broker, _) = support::spawn_ready(c, "aegis-broker ready");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = broker.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let bus = aegis_client::Bus::connect_dir(&bus_dir).unwrap();
    let refused = |bus: &aegis_client::Bus| {
        matches!(
            bus.register("locked.db", "x", &[]),
            Err(aegis_client::Error::PermissionDenied(_))
        )
    };
    assert!(refused(&bus));
    std::fs::write(&config, format!("{locked}max_clientz = 3\n")).unwrap();
    // SAFETY: kill(2) on our broker child.
    unsafe { libc::kill(broker.id() as libc::pid_t, libc::SIGHUP) };
    let line = loop {
        let l = rx
            .recv_timeout(support::DEADLINE)
            .expect("the broker said nothing");
        if l.contains("not reloaded") {
            break l;
        }
    };
    assert!(
        line.contains("max_clientz") && line.contains("line 5"),
        "{line}"
    );
    assert!(refused(&bus), "the bad file changed the running policy");
    // A good file applies.
    std::fs::write(&config, "admin_uids = []\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(broker.id() as libc::pid_t, libc::SIGHUP) };
    support::wait_for("the good file to apply", || !refused(&bus));
    terminate(&mut broker);
}
