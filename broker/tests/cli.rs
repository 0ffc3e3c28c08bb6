//! The broker binary's command line: bad flags are refused with a clear reason and a
//! non-zero exit, before anything is created.

use std::process::Command;

fn broker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aegis-broker"))
}

#[test]
fn invalid_capacity_flag_is_refused_with_the_flag_named() {
    let dir = tempfile_dir();
    let out = broker()
        .args(["--dir", &dir, "--max-services", "100"])
        .output()
        .expect("run aegis-broker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-services 100 must be a power of two"),
        "stderr: {err}"
    );
    assert!(!std::path::Path::new(&dir).join("control.sock").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_socket_mode_is_refused() {
    let dir = tempfile_dir();
    let out = broker()
        .args(["--dir", &dir, "--socket-mode", "9z"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--socket-mode \"9z\" is not an octal mode")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempfile_dir() -> String {
    let d = std::env::temp_dir().join(format!(
        "aegis-broker-cli-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn config_file_flags_override_it_and_bad_keys_are_named_with_their_line() {
    let dir = tempfile_dir();
    let cfg = std::path::Path::new(&dir).join("broker.toml");
    std::fs::write(
        &cfg,
        "max_clients = 100\nsocket_mode = \"660\"\n\n[[policy]]\nservices = [\"a.*\"]\ncall_uids = [7]\n",
    )
    .unwrap();
    let out = broker()
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--check-config",
            "--max-clients",
            "9",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_clients = 9"), "flag must win: {text}");
    assert!(text.contains("socket_mode = \"660\""), "{text}");
    assert!(text.contains("call_uids = [7]"), "{text}");

    // Each refused file: its error on stderr, and a non-zero exit.
    let refused = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        let out = broker()
            .args(["--config", cfg.to_str().unwrap(), "--check-config"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "accepted: {text}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused("max_clients = 100\nmax_clientz = 3\n");
    assert!(
        err.contains("line 2") && err.contains("max_clientz"),
        "{err}"
    );
    let err = refused("max_services = 100\n");
    assert!(
        err.contains("max-services 100 must be a power of two"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile_dir();
    let mut child = broker()
        .args(["--dir", &dir, "--log-format", "json", "--log", "info"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("aegis-broker ready"), "{line}");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|v| v["fields"]["message"] == "aegis-broker ready" && v["level"] == "INFO"));
    std::fs::remove_dir_all(&dir).unwrap();
}
