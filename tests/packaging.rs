//! The packaged systemd units pass `systemd-analyze verify` with an empty stderr and score
//! under 2.0 in `systemd-analyze security --offline=true` (skipped, saying so, where
//! systemd-analyze is not installed; systemd itself does not run here), and the packaged
//! bridge configuration is valid.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn systemd_analyze() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    support::precondition(found, "systemd-analyze is not installed")
}

/// Verifies packaged unit `unit` and returns its offline exposure score. Every packaged
/// unit is copied beside it (a unit may bind to another) with `ExecStart` pointing at the
/// binaries just built.
fn verify_and_score(unit: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let bins: [PathBuf; 2] = [support::broker_bin(), support::bridge_bin()];
    for name in ["aegis-broker.service", "aegis-bridge.service"] {
        let mut text =
            std::fs::read_to_string(root().join("packaging/systemd").join(name)).unwrap();
        for b in &bins {
            let file = b.file_name().unwrap().to_str().unwrap();
            text = text.replace(&format!("/usr/local/bin/{file}"), b.to_str().unwrap());
        }
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join(unit);
    let out = support::succeed(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display())),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "verify complained"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split(&format!("exposure level for {unit}: ")).nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {text}"))
}

#[test]
fn the_broker_unit_verifies_clean_and_scores_under_2() {
    if systemd_analyze() {
        let score = verify_and_score("aegis-broker.service");
        assert!(score < 2.0, "exposure {score}");
    }
}

#[test]
fn the_bridge_unit_and_configuration_check_out() {
    let out = support::succeed(
        Command::new(support::bridge_bin())
            .arg("--config")
            .arg(root().join("packaging/bridge.toml"))
            .arg("--check-config"),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("aegis_resources"));
    if systemd_analyze() {
        let score = verify_and_score("aegis-bridge.service");
        assert!(score < 2.0, "exposure {score}");
    }
}
