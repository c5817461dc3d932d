//! Crash safety: `careweave-node import` killed with SIGKILL at several
//! points. After each kill, every acknowledged record is present, records
//! and their index agree, and `careweave-node audit verify` passes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use careweave_node::config;
use careweave_node::node::{Inbound, Node};
use careweave_node::store::Store;
use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::message::{LocateRequest, Purpose};
use careweave_protocol::{NhsNumber, OdsCode, record};
use common::{T0, context, keys, network, open};

const BIN: &str = env!("CARGO_BIN_EXE_careweave-node");
const RESOURCES: usize = 40_000;

fn write_node(dir: &std::path::Path) -> std::path::PathBuf {
    keys("QUE").write_new(&dir.join("keys")).unwrap();
    let text = config::template(&OdsCode::parse("QUE").unwrap(), "NHS QUE ICB")
        .replace("testnet = false", "testnet = true")
        .replace("batch_records = 1000", "batch_records = 250")
        .replace(
            "checkpoint_every_entries = 100",
            "checkpoint_every_entries = 2",
        );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Some audit entries (and checkpoints) from real requests, before the crashes.
fn make_audit_history(config_path: &std::path::Path) {
    let loaded = config::load(config_path, []).unwrap();
    let store = Store::open(&loaded.store_dir(), 4 << 20).unwrap();
    let que = Node::new(loaded.config.clone(), keys("QUE"), store, T0).unwrap();
    let (coordinator, list) = network();
    que.install_root(&coordinator.root_bytes(), T0).unwrap();
    que.install_list(&list, T0).unwrap();
    let qhg = open("QHG", &coordinator, &list);
    for i in 0..5 {
        let request = qhg
            .node
            .prepare_locate(
                &OdsCode::parse("QUE").unwrap(),
                &LocateRequest {
                    nhs_number: NhsNumber::parse("9990000018").unwrap(),
                    context: context(Purpose::Treat),
                    sections: None,
                },
                T0 + i,
            )
            .unwrap();
        assert!(matches!(
            que.handle_request(
                ProtocolId::Locate,
                &request.bytes,
                qhg.node.peer_id(),
                T0 + i
            ),
            Inbound::Reply(_)
        ));
    }
}

fn ndjson(path: &std::path::Path) -> Vec<String> {
    let mut ids = Vec::with_capacity(RESOURCES);
    let mut text = String::new();
    let mut stem = 999_000_000u32;
    for i in 0..RESOURCES {
        let nhs = loop {
            stem += 1;
            if let Some(n) = NhsNumber::from_stem(stem) {
                break n;
            }
        };
        let id = format!("crash-{i}");
        text.push_str(&format!(
            r#"{{"resourceType":"Condition","id":"{id}","code":{{"coding":[{{"system":"http://snomed.info/sct","code":"38341003"}}]}},"subject":{{"identifier":{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{}"}}}},"onsetDateTime":"2020-01-01"}}"#,
            nhs.digits()
        ));
        text.push('\n');
        ids.push(id);
    }
    std::fs::write(path, text).unwrap();
    ids
}

#[test]
fn sigkill_during_import_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_node(dir.path());
    make_audit_history(&config_path);
    let input = dir.path().join("records.ndjson");
    let ids = ndjson(&input);
    let record_key = keys("QUE").record.public_key();

    // Kill points by progress (after the k-th flushed batch), so every kill
    // lands mid-import whatever the machine's speed, plus a few by time right
    // after start-up. 40 000 records in batches of 250 is 160 batches.
    let points = [
        KillAt::Delay(0),
        KillAt::Delay(20),
        KillAt::Batch(1),
        KillAt::Batch(2),
        KillAt::Batch(5),
        KillAt::Batch(11),
        KillAt::Batch(23),
        KillAt::Batch(47),
        KillAt::Batch(80),
        KillAt::Batch(120),
    ];
    for point in points {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .arg("import")
            .arg("--log-batches")
            .arg(&input)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel::<usize>(1024);
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut last = 0;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("flushed ") {
                    last = rest.split(' ').next().unwrap().parse().unwrap();
                    let _ = tx.try_send(last);
                }
            }
            last
        });
        match point {
            KillAt::Delay(ms) => std::thread::sleep(Duration::from_millis(ms)),
            KillAt::Batch(k) => {
                for _ in 0..k {
                    // Bounded wait: a stuck import fails the test rather than hanging it.
                    rx.recv_timeout(Duration::from_secs(120))
                        .expect("import made no progress");
                }
            }
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        let acknowledged = reader.join().unwrap();
        let delay_ms = format!("{point:?}");

        // Reopen: every acknowledged record is there and intact.
        let loaded = config::load(&config_path, []).unwrap();
        let store = Store::open(&loaded.store_dir(), 4 << 20).unwrap();
        let count = store.check_consistency().unwrap();
        assert!(
            count >= acknowledged,
            "{count} records but {acknowledged} acknowledged"
        );
        for id in ids.iter().take(acknowledged) {
            let r = store.record("Condition", id).unwrap().unwrap_or_else(|| {
                panic!("acknowledged record {id} lost after SIGKILL at {delay_ms}")
            });
            let sign1 =
                careweave_protocol::cose::Sign1::decode(&r.signed, record::MAX_RECORD_BYTES)
                    .unwrap();
            sign1.verify_signature(&record_key, b"").unwrap();
        }
        drop(store);

        let verify = Command::new(BIN)
            .arg("--config")
            .arg(&config_path)
            .args(["audit", "verify"])
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "audit verify failed after SIGKILL at {delay_ms}: {}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Milliseconds after start.
    Delay(u64),
    /// Right after the k-th batch was acknowledged.
    Batch(usize),
}
