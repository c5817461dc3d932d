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
        .replace("\nscope = \"none\"", "\nscope = \"national\"")
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
    drop(que);
    // The child processes that follow open this store.
    careweave_node::store::wait_until_released(&loaded.store_dir(), Duration::from_secs(10))
        .unwrap();
}

/// `careweave-node audit verify` on a stopped node.
fn audit_verify(config_path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config_path)
        .args(["audit", "verify"])
        .output()
        .unwrap()
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

/// A seed for the random kill points: `CAREWEAVE_CRASH_SEED` to repeat a
/// run, otherwise fresh. Failures print it.
fn crash_seed() -> u64 {
    std::env::var("CAREWEAVE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).unwrap();
            u64::from_le_bytes(bytes)
        })
}

/// SplitMix64: `n` numbers in `range`, from `seed`.
fn random_points(seed: u64, n: usize, range: std::ops::Range<u64>) -> Vec<u64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            range.start + (z ^ (z >> 31)) % (range.end - range.start)
        })
        .collect()
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
    // Ten fixed points, then ten at random: delays up to 300 ms and batches
    // anywhere in the import.
    let seed = crash_seed();
    let mut points = vec![
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
    for (i, n) in random_points(seed, 10, 0..300).into_iter().enumerate() {
        points.push(if i % 3 == 0 {
            KillAt::Delay(n)
        } else {
            KillAt::Batch(usize::try_from(n % 159).unwrap() + 1)
        });
    }
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
        let delay_ms = format!("{point:?} (CAREWEAVE_CRASH_SEED={seed})");

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

        let verify = audit_verify(&config_path);
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

/// The child half of the next test: answers signed locates from QHG for
/// ever, printing each answered request once its audit entry is durable.
fn answer_until_killed(config_path: &std::path::Path) {
    use std::io::Write;
    let loaded = config::load(config_path, []).unwrap();
    let store = Store::open(&loaded.store_dir(), 4 << 20).unwrap();
    let que = Node::new(loaded.config.clone(), keys("QUE"), store, T0).unwrap();
    let (coordinator, list) = network();
    if que.trust().is_none() {
        que.install_root(&coordinator.root_bytes(), T0).unwrap();
        que.install_list(&list, T0).unwrap();
    }
    let qhg = open("QHG", &coordinator, &list);
    let que_ods = OdsCode::parse("QUE").unwrap();
    let mut out = std::io::stdout().lock();
    loop {
        let request = qhg
            .node
            .prepare_locate(
                &que_ods,
                &LocateRequest {
                    nhs_number: NhsNumber::parse("9990000018").unwrap(),
                    context: context(Purpose::Treat),
                    sections: None,
                },
                T0,
            )
            .unwrap();
        let inbound =
            que.handle_request(ProtocolId::Locate, &request.bytes, qhg.node.peer_id(), T0);
        assert!(matches!(inbound, Inbound::Reply(_)));
        // The answer is released only now: its audit entry is durable.
        writeln!(
            out,
            "answered {} {}",
            que.store.audit_len().unwrap(),
            hex::encode(&request.bytes)
        )
        .unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_while_answering_loses_no_audit_entry_and_no_replay_protection() {
    if let Some(config_path) = std::env::var_os("CAREWEAVE_CRASH_CHILD") {
        answer_until_killed(std::path::Path::new(&config_path));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_path = write_node(dir.path());
    let loaded = config::load(&config_path, []).unwrap();
    let me = std::env::current_exe().unwrap();
    // Kill after different numbers of answers, so the kill lands at
    // different points of the write, sync, checkpoint and seal cycle.
    // Ten fixed counts, then ten at random.
    let seed = crash_seed();
    let mut counts = vec![1usize, 3, 17, 40, 95, 7, 160, 2, 61, 250];
    counts.extend(
        random_points(seed, 10, 1..300)
            .into_iter()
            .map(|n| usize::try_from(n).unwrap()),
    );
    for (round, answers) in counts.into_iter().enumerate() {
        let round = format!("{round} (CAREWEAVE_CRASH_SEED={seed})");
        let mut child = Command::new(&me)
            .args([
                "sigkill_while_answering_loses_no_audit_entry_and_no_replay_protection",
                "--exact",
                "--nocapture",
            ])
            .env("CAREWEAVE_CRASH_CHILD", &config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acknowledged = (0u64, String::new());
        let mut seen = 0;
        while seen < answers {
            let line = lines.next().expect("child stopped answering").unwrap();
            if let Some(rest) = line.strip_prefix("answered ") {
                let (len, hex) = rest.split_once(' ').unwrap();
                acknowledged = (len.parse().unwrap(), hex.to_owned());
                seen += 1;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();

        let store = Store::open(&loaded.store_dir(), 4 << 20).unwrap();
        let held = store.audit_len().unwrap();
        assert!(
            held >= acknowledged.0,
            "round {round}: {held} audit entries after the kill, {} acknowledged",
            acknowledged.0
        );
        // The restarted node holds its root and list from before.
        let que = Node::new(loaded.config.clone(), keys("QUE"), store.clone(), T0).unwrap();
        let (coordinator, list) = network();
        let qhg = open("QHG", &coordinator, &list);
        let last = hex::decode(&acknowledged.1).unwrap();
        let _ = que.handle_request(ProtocolId::Locate, &last, qhg.node.peer_id(), T0 + 1);
        let entry: careweave_node::audit::AuditEntry = careweave_protocol::cbor::decode(
            &store
                .audit_entry(store.audit_len().unwrap() - 1)
                .unwrap()
                .unwrap(),
            careweave_protocol::cbor::Limits::MESSAGE,
        )
        .unwrap();
        assert_eq!(entry.outcome, "refused", "round {round}");
        assert!(
            entry
                .reason
                .as_deref()
                .unwrap_or("")
                .starts_with("replayed"),
            "round {round}: the last answered request was accepted again: {entry:?}"
        );
        drop(que);
        drop(store);
        let verify = audit_verify(&config_path);
        assert!(
            verify.status.success(),
            "round {round}: audit verify failed: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}
