//! A short soak in CI: mixed locate, fetch and import on five real node
//! processes for 30 seconds, then `audit verify` on every node. Memory
//! growth is judged only by the long run (`careweave-testnet soak`, ten
//! minutes by default; see docs/security.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;

use serde_json::Value;

#[test]
fn a_short_soak_fails_nothing_and_every_audit_log_verifies() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_careweave-testnet"))
        .args(["soak", "--minutes", "0.5", "--dir"])
        .arg(work.path().join("net"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "soak failed: {stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("soak.json")).unwrap()).unwrap();
    for kind in ["locates", "fetches", "imports"] {
        assert!(report[kind].as_u64().unwrap() > 0, "no {kind}: {report}");
    }
    for failures in ["locate_failures", "fetch_failures", "import_failures"] {
        assert_eq!(report[failures], 0, "{report}");
    }
    let audits = report["audit"].as_array().unwrap();
    assert_eq!(audits.len(), 5);
    assert!(
        audits
            .iter()
            .all(|a| a["entries"].as_u64().unwrap() > 0 && a["error"].is_null())
    );
    assert_eq!(report["memory_judged"], false);
    assert!(stdout.contains("memory growth not judged"));
    // Every node was stopped: no process names the testnet's directory.
    let net = work.path().join("net").display().to_string();
    for proc_entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(proc_entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&net),
            "a node of the soak is still running: {}",
            String::from_utf8_lossy(&cmdline)
        );
    }
}

#[test]
fn a_soak_of_no_time_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_careweave-testnet"))
        .args(["soak", "--minutes", "0", "--dir"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--minutes must be"));
}
