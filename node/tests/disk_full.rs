//! A node on a filesystem that fills up: imports fail with a clear error and
//! store nothing half-written, requests that need an audit entry release
//! nothing, and service resumes once space returns. The test mounts its own
//! small tmpfs, so it needs root: run as anyone else it says it is skipped.
//! CAREWEAVE_SKIP_DISK_FULL=1 skips it as root too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use careweave_node::import::{ImportError, Importer};
use careweave_node::node::{Inbound, Node};
use careweave_node::store::Store;
use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::message::{LocateRequest, Purpose};
use careweave_protocol::{NhsNumber, OdsCode};
use common::{T0, config, context, keys, network, open};

/// A tmpfs of `mib` MiB, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> Option<Self> {
        if std::env::var_os("CAREWEAVE_SKIP_DISK_FULL").is_some() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("the mount command");
        if !status.success() {
            let uid = Command::new("id").arg("-u").output().expect("id -u").stdout;
            // Root must be able to mount; anyone else is told, loudly.
            assert!(
                String::from_utf8_lossy(&uid).trim() != "0",
                "root could not mount a tmpfs for the disk-full test"
            );
            eprintln!(
                "SKIPPED the disk-full test: it mounts a small tmpfs and needs root \
                 (CI and the benchmark machine run it as root)"
            );
            return None;
        }
        Some(Self { path, _dir: dir })
    }

    fn resize(&self, mib: u64) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn ndjson(first: usize, count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in first..first + count {
        let nhs = common::nhs_for(i);
        let line = serde_json::json!({
            "resourceType": "Condition",
            "id": format!("c{i}"),
            "subject": {"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}]},
            "note": [{"text": "x".repeat(900)}],
        });
        out.extend_from_slice(&serde_json::to_vec(&line).unwrap());
        out.push(b'\n');
    }
    out
}

fn import(node: &Node, bytes: &[u8]) -> Result<usize, ImportError> {
    Importer {
        store: &node.store,
        record_key: &node.keys.record,
        custodian: node.ods(),
        config: &node.config,
        now: T0,
    }
    .import_bytes("input.ndjson", bytes, &mut |_, _| {})
    .map(|(report, _, _)| report.stored + report.replaced)
}

#[test]
fn a_full_disk_fails_cleanly_and_service_resumes_when_space_returns() {
    let Some(disk) = SmallDisk::mount(24) else {
        return;
    };
    let (coordinator, list) = network();
    let store = Store::open(&disk.path.join("store"), 1 << 20).unwrap();
    let que = Node::new(config("QUE"), keys("QUE"), store, T0).unwrap();
    que.install_root(&coordinator.root_bytes(), T0).unwrap();
    que.install_list(&list, T0).unwrap();
    let qhg = open("QHG", &coordinator, &list);

    // Fill the disk with imports until one fails.
    let mut stored = 0;
    let err = loop {
        match import(&que, &ndjson(stored, 2000)) {
            Ok(n) => stored += n,
            Err(e) => break e,
        }
        assert!(stored < 200_000, "the disk never filled");
    };
    assert!(matches!(err, ImportError::Store(_)), "{err}");
    assert!(err.to_string().contains("No space left"), "{err}");

    // While the disk is full, a locate releases nothing.
    let request = LocateRequest {
        nhs_number: NhsNumber::parse(&common::nhs_for(0)).unwrap(),
        context: context(Purpose::Treat),
        sections: None,
    };
    let bytes = qhg
        .node
        .prepare_locate(&OdsCode::parse("QUE").unwrap(), &request, T0)
        .unwrap()
        .bytes;
    match que.handle_request(ProtocolId::Locate, &bytes, qhg.node.peer_id(), T0) {
        Inbound::Drop(_) => {}
        Inbound::Reply(reply) => {
            let answer = careweave_protocol::cose::Sign1::decode(&reply, 1 << 20).unwrap();
            let error: Result<careweave_protocol::message::ErrorMessage, _> =
                careweave_protocol::cbor::decode(
                    &answer.payload,
                    careweave_protocol::cbor::Limits::MESSAGE,
                );
            assert!(error.is_ok(), "a full disk released an answer");
        }
    }

    // Space returns. sled keeps its first I/O error until the store is
    // opened again, so the node is restarted (docs/operator-guide.md).
    disk.resize(64);
    drop(que);
    let store = Store::open(&disk.path.join("store"), 1 << 20).unwrap();
    let held = store.check_consistency().unwrap();
    assert!(
        held >= stored,
        "{held} records after the restart, {stored} acknowledged"
    );
    let que = Node::new(config("QUE"), keys("QUE"), store, T0).unwrap();
    careweave_node::audit::verify(&que.store, &keys("QUE").log.public_key()).unwrap();
    assert_eq!(import(&que, &ndjson(held, 100)).unwrap(), 100);
    let answer = que.handle_request(
        ProtocolId::Locate,
        &qhg.node
            .prepare_locate(&OdsCode::parse("QUE").unwrap(), &request, T0 + 1)
            .unwrap()
            .bytes,
        qhg.node.peer_id(),
        T0 + 1,
    );
    assert!(
        matches!(answer, Inbound::Reply(_)),
        "no answer after space returned"
    );
    assert_eq!(que.store.check_consistency().unwrap(), held + 100);
}
