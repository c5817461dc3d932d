//! The `careweave-node` command as an operator uses it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_careweave-node");
const BUNDLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/multi-section.json");

fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("SSLKEYLOGFILE")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn init(dir: &Path) -> Output {
    Command::new(BIN)
        .args([
            "init",
            "--ods",
            "QUE",
            "--name",
            "NHS Cambridgeshire and Peterborough ICB",
            "--testnet",
        ])
        .arg("--dir")
        .arg(dir)
        .args(["--listen", "/ip4/127.0.0.1/tcp/7102"])
        .output()
        .unwrap()
}

#[test]
fn init_creates_private_keys_and_prints_the_member_entry() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("que");
    let out = init(&node);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ods = \"QUE\""));
    assert!(text.contains("peer_id = \"12D3KooW"));
    assert!(text.contains("/ip4/127.0.0.1/tcp/7102"));
    for key in ["transport", "message", "record", "log"] {
        assert!(text.contains(&format!("keys.{key} = {{ kid = ")), "{text}");
        let path = node.join("keys").join(format!("{key}.pem"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(&path).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(
            !text.contains(&body),
            "the secret key must never be printed"
        );
    }
    assert!(!text.contains("PRIVATE"));
    // A second init refuses and changes nothing.
    let before = std::fs::read(node.join("keys/record.pem")).unwrap();
    let again = init(&node);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("never overwrites"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(node.join("keys/record.pem")).unwrap(), before);
}

#[test]
fn import_flag_status_and_audit_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("que");
    assert!(init(&node).status.success());
    let config = node.join("config.toml");

    let out = run(&config, &["import", BUNDLE]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("stored 9, replaced 0, removed 0, rejected 0"),
        "{}",
        stdout(&out)
    );

    let out = run(&config, &["import", "--json", BUNDLE]);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["replaced"], 9);

    // Rejections are listed and the exit code says so.
    let bad = dir.path().join("bad.ndjson");
    std::fs::write(
        &bad,
        "{\"resourceType\":\"Condition\",\"id\":\"x\",\"subject\":{\"identifier\":{\"system\":\"https://fhir.nhs.uk/Id/nhs-number\",\"value\":\"9990000019\"}}}\nnot json\n",
    )
    .unwrap();
    let out = run(&config, &["import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stdout(&out).contains("line 1: invalid NHS number"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("line 2: invalid JSON"),
        "{}",
        stdout(&out)
    );

    let out = run(
        &config,
        &[
            "patient",
            "flag",
            "9990000018",
            "--objection",
            "--reason",
            "asked at GP",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("objection yes"));
    let out = run(
        &config,
        &["patient", "flag", "999 000 0019", "--restricted"],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("check digit"), "{}", stderr(&out));

    let out = run(&config, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["records"], 9);
    assert_eq!(status["ready"], false);
    assert!(
        status["not_ready_reason"]
            .as_str()
            .unwrap()
            .contains("no trust root")
    );

    let out = run(&config, &["audit", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("audit log verified"));

    let out = run(&config, &["audit", "export", "--nhs-number", "9990000018"]);
    let export: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(export["nhs_number"], "9990000018");
}

#[test]
fn configuration_errors_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("que");
    assert!(init(&node).status.success());
    let config = node.join("config.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("cache_mb = 16", "cache_size = 16");
    std::fs::write(&config, text).unwrap();
    let out = run(&config, &["status"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cache_size") && err.contains("config.toml"),
        "{err}"
    );
}

#[test]
fn refuses_to_run_with_sslkeylogfile() {
    let out = Command::new(BIN)
        .args(["status"])
        .env("SSLKEYLOGFILE", "/tmp/keys.log")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("SSLKEYLOGFILE"));
}

#[test]
fn a_store_in_use_is_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("que");
    assert!(init(&node).status.success());
    let config = node.join("config.toml");
    // Hold the store open in this process, then ask another process to use it.
    let loaded = careweave_node::config::load(&config, []).unwrap();
    let _held = careweave_node::store::Store::open(&loaded.store_dir(), 1 << 20).unwrap();
    let out = run(&config, &["status"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another process"),
        "{}",
        stderr(&out)
    );
}
