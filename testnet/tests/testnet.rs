//! The testnet as testers and newcomers use it: `demo`, and `up`, `status`,
//! `down` with three nodes, leaving no processes behind.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_careweave-testnet");

#[test]
fn the_demo_finishes_and_stops_its_nodes_when_its_output_is_closed() {
    // As `careweave-testnet demo | head -1` does: the reader goes away.
    let mut child = Command::new(BIN)
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
}

#[test]
fn the_demo_tells_its_story_and_exits_zero() {
    let out = Command::new(BIN).arg("demo").output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for fact in [
        "1. Where does patient 999 000 0018 have records?",
        "each custodian's signature checked",
        "the patient has objected to sharing",
        "exactly as for a patient nobody holds",
        "raised an alert",
        "All five nodes stopped.",
    ] {
        assert!(report.contains(fact), "missing {fact:?} in:\n{report}");
    }
    // Three ICBs hold the shared patient's records; two share them with the
    // asking ICB, and the third's refusal names whom to contact.
    let section = report
        .split("1. ")
        .nth(1)
        .unwrap()
        .split("2. ")
        .next()
        .unwrap();
    assert_eq!(section.matches("pointer(s)").count(), 2, "{section}");
    assert!(
        section.contains("has no sharing agreement with ICB QHG for any section")
            && section.contains("Contact: shared-care-records@qh8.testnet.invalid"),
        "{section}"
    );
}

/// Starts a testnet of `nodes` ICBs in `net` and checks that `up` succeeded.
fn up(net: &std::path::Path, nodes: u32, patients: u32) -> std::process::Output {
    let out = Command::new(BIN)
        .args(["up", "--nodes", &nodes.to_string()])
        .args(["--patients", &patients.to_string(), "--dir"])
        .arg(net)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether process `pid` has ended (gone, or a zombie awaiting its parent).
fn ended(pid: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.split(") ").nth(1).unwrap_or("");
    stat.is_empty() || state.starts_with('Z')
}

fn pids(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("nodes"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("node.pid")).ok())
        .map(|p| p.trim().to_owned())
        .collect()
}

#[test]
fn up_status_down_with_three_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    let up = up(&net, 3, 5);
    let text = String::from_utf8_lossy(&up.stdout);
    assert!(text.contains("testnet of 3 ICBs running"), "{text}");
    // The suggested locate command passes the NHS number as one argument.
    let hint = text.lines().find(|l| l.contains(" locate ")).unwrap();
    let words: Vec<&str> = hint.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "locate").unwrap();
    let number = words[at + 1];
    assert!(
        number.len() == 10 && number.bytes().all(|b| b.is_ascii_digit()),
        "{hint}"
    );
    assert_eq!(words[at + 2], "--user", "{hint}");
    let running = pids(&net);
    assert_eq!(running.len(), 3);
    let status = Command::new(BIN)
        .args(["status", "--dir"])
        .arg(&net)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert_eq!(
        text.matches("running, 2 peer(s), ready").count(),
        3,
        "{text}"
    );
    // A second `up` into the same directory refuses.
    let again = Command::new(BIN)
        .args(["up", "--nodes", "3", "--dir"])
        .arg(&net)
        .output()
        .unwrap();
    assert!(!again.status.success());
    let down = Command::new(BIN)
        .args(["down", "--dir"])
        .arg(&net)
        .output()
        .unwrap();
    assert!(down.status.success());
    assert!(String::from_utf8_lossy(&down.stdout).contains("stopped 3"));
    for pid in running {
        assert!(ended(&pid), "process {pid} left behind");
    }
    // Down again is harmless.
    let down = Command::new(BIN)
        .args(["down", "--dir"])
        .arg(&net)
        .output()
        .unwrap();
    assert!(down.status.success());
}

#[test]
fn nodes_of_a_testnet_whose_directory_is_removed_stop_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    up(&net, 2, 2);
    let running = pids(&net);
    assert_eq!(running.len(), 2);
    std::fs::remove_dir_all(&net).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for pid in running {
        while !ended(&pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "node {pid} still runs 20 s after its directory was removed"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

#[test]
fn a_list_published_to_one_nodes_api_reaches_the_others() {
    use careweave_protocol::trust::{ListDocument, RootDocument, sha256};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    up(&net, 3, 2);
    let t = careweave_testnet::setup::load(&net).unwrap();
    // The coordinator makes list 2 with its testnet keys.
    let list1 = std::fs::read(net.join("coord/list.cose")).unwrap();
    let (_, old) = ListDocument::decode(&list1).unwrap();
    let (_, root) =
        RootDocument::decode(&std::fs::read(net.join("coord/root.cose")).unwrap()).unwrap();
    let mut list = old.clone();
    list.seq = 2;
    list.prev = Some(sha256(&list1));
    let mut doc = ListDocument::unsigned(&list).unwrap();
    for i in 1..=2 {
        let key = careweave_certs::keystore::read(
            &net.join(format!("coord/keys/list-v1-{i}.pem")),
            careweave_testnet::setup::TESTNET_PASSPHRASE,
        )
        .unwrap();
        doc.sign(&key, &root).unwrap();
    }
    let ca = net.join("api-ca/ca.pem");
    let (cert, key) = (
        net.join("api-ca/client/cert.pem"),
        net.join("api-ca/client/key.pem"),
    );
    let url = format!("https://127.0.0.1:{}", t.nodes[0].api_port);
    let answer = careweave_certs::publish::to_node(&url, &doc.encode(), &ca, &cert, &key).unwrap();
    assert!(answer.contains("\"seq\":2"), "{answer}");
    // It spreads to the third node.
    let client = careweave_node::api::client::ApiClient::new(&ca, &cert, &key).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut seq = 0;
    for _ in 0..100 {
        let status = rt
            .block_on(client.call(t.nodes[2].api_port, "GET", "/admin/status", &[], vec![]))
            .unwrap();
        seq = status.json()["trust_list_seq"].as_u64().unwrap_or(0);
        if seq == 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Command::new(BIN)
        .args(["down", "--dir"])
        .arg(&net)
        .output()
        .unwrap();
    assert_eq!(seq, 2, "the list did not reach the third node");
}

#[test]
fn scenarios_break_the_testnet_and_see_it_cope() {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    up(&net, 4, 3);
    let mut failures = Vec::new();
    for (name, fact) in [
        ("node-down", "flagged: true"),
        ("replay", "replay of one already received"),
        ("rogue-peer", "refused"),
        ("stale-trust", "failing closed"),
        ("flood", "shut the flooder out"),
        ("revoke", "every other node dropped"),
    ] {
        let out = Command::new(BIN)
            .args(["scenario", name, "--dir"])
            .arg(&net)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || !text.contains(fact) || !text.contains("as expected") {
            failures.push(format!(
                "{name}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Command::new(BIN)
        .args(["down", "--dir"])
        .arg(&net)
        .output()
        .unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
