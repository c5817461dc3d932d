//! A node on a filesystem that fills up: imports fail with a clear error and
//! store nothing half-written, requests that need an audit entry release
//! nothing, and service resumes once space returns, without a restart. The
//! test mounts its own small tmpfs, so it needs root: run as anyone else it
//! says it is skipped.
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
use std::sync::Arc;

use axum::Extension;
use careweave_node::api::{self, ApiState, ClientIdentity};
use careweave_node::daemon;
use http_body_util::BodyExt;
use tower::ServiceExt;

use careweave_node::import::{ImportError, Importer};
use careweave_node::node::{BatchedRequest, Inbound, Node};
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

/// POSTs a one-entry transaction Bundle to the node's clinical API, in
/// process, and returns the status and the body as JSON.
fn post_bundle(node: &Arc<Node>) -> (u16, serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut net = daemon::net_config(&node.config).unwrap();
        net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        net.mdns = false;
        let handle = daemon::start_network(Arc::clone(node), net).unwrap();
        let state = Arc::new(ApiState::new(
            Arc::clone(node),
            handle,
            "https://127.0.0.1".into(),
        ));
        let app = api::router(state, 1 << 20).layer(Extension(ClientIdentity {
            name: "clinical system".into(),
            ods: None,
            admin: false,
        }));
        let entry: serde_json::Value =
            serde_json::from_slice(ndjson(900_000, 1).strip_suffix(b"\n").unwrap()).unwrap();
        let bundle = serde_json::json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": entry, "request": {"method": "PUT", "url": "Condition/c900000"}}],
        });
        let mut request = axum::http::Request::post("/fhir")
            .header("Content-Type", "application/fhir+json")
            .header("X-Request-ID", "3b2c1d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d");
        for (name, value) in [
            ("NHSD-End-User-Organisation-ODS", "QUE"),
            ("NHSD-User-ID", "555021935107"),
            ("NHSD-Session-URID", "555021936108"),
            ("NHSD-Role-Code", "R8000"),
        ] {
            request = request.header(name, value);
        }
        let response = app
            .oneshot(
                request
                    .body(axum::body::Body::from(serde_json::to_vec(&bundle).unwrap()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    })
    // Dropping the runtime ends the network task and its hold on the node.
}

#[test]
fn a_full_disk_fails_cleanly_and_service_resumes_when_space_returns() {
    let Some(disk) = SmallDisk::mount(24) else {
        return;
    };
    let (coordinator, list) = network();
    let store = Store::open(&disk.path.join("store"), 1 << 20).unwrap();
    let que = Arc::new(Node::new(config("QUE"), keys("QUE"), store, T0).unwrap());
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

    // The clinical API says the same with a 503 OperationOutcome.
    let (status, outcome) = post_bundle(&que);
    assert_eq!(status, 503, "{outcome}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "transient");
    let text = outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("not acknowledged"), "{outcome}");

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

    // Readiness says why, and metrics show it.
    let reason = que.not_ready_reason(T0).unwrap_or_default();
    assert!(reason.contains("disk full"), "{reason}");
    assert!(que.store.health().failed);
    // The record count cannot be read, and is not reported as zero.
    assert_eq!(que.store.record_count(), None);

    // Space returns. The node is not restarted: the store opens its
    // database again by itself, within its retry wait (at most 30 s).
    disk.resize(64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let resumed_with = loop {
        match import(&que, &ndjson(stored, 100)) {
            Ok(n) => break n,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "imports still fail 90 s after space returned: {e}"
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    };
    assert_eq!(resumed_with, 100);
    let health = que.store.health();
    assert!(!health.failed);
    assert!(health.reopened >= 1, "{health:?}");
    assert_eq!(que.not_ready_reason(T0), None);
    assert!(que.store.record_count().is_some_and(|n| n >= stored));

    // Every acknowledged record is there, nothing is half-written, the
    // clinical API stores again, a locate is answered and the audit log
    // verifies.
    let held = que.store.check_consistency().unwrap();
    assert!(
        held >= stored + 100,
        "{held} records after space returned, {} acknowledged",
        stored + 100
    );
    let (status, body) = post_bundle(&que);
    assert!(status == 200 || status == 201, "{status} {body}");
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
    careweave_node::audit::verify(&que.store, &keys("QUE").log.public_key()).unwrap();

    // A restart afterwards finds the same store.
    let after = que.store.check_consistency().unwrap();
    let que = Arc::into_inner(que).expect("nothing else holds the node");
    drop(que);
    let store = reopen(&disk.path.join("store"));
    assert_eq!(store.check_consistency().unwrap(), after);
    let que = Node::new(config("QUE"), keys("QUE"), store, T0).unwrap();
    careweave_node::audit::verify(&que.store, &keys("QUE").log.public_key()).unwrap();
}

/// Opens a store a dropped node held, once sled's background writer has let
/// go of its lock (5 s at most).
fn reopen(dir: &std::path::Path) -> Store {
    careweave_node::store::wait_until_released(dir, std::time::Duration::from_secs(5))
        .expect("the dropped node's store is released");
    Store::open(dir, 1 << 20).expect("the store opens again")
}

/// The newest audit segment file in a store.
fn newest_segment(store_dir: &std::path::Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(store_dir.join("audit"))
        .unwrap()
        .map(|item| item.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// Fills the filesystem holding `dir` until a write fails.
fn fill(dir: &std::path::Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for size in [1 << 16, 1] {
        let chunk = vec![0u8; size];
        while file.write_all(&chunk).is_ok() {}
    }
    path
}

fn entry(i: u64) -> careweave_node::audit::AuditEntry {
    careweave_node::audit::AuditEntry {
        time: T0 + i,
        direction: careweave_node::audit::Direction::Inbound,
        protocol: "locate".into(),
        peer_ods: Some(OdsCode::parse("QHG").unwrap()),
        peer_id: "12D3KooWtest".into(),
        context: None,
        nhs_number: NhsNumber::parse(&common::nhs_for(usize::try_from(i).unwrap())).ok(),
        outcome: "refused".into(),
        reason: Some("x".repeat(400)),
        released: Vec::new(),
        withheld: Vec::new(),
        request_hash: vec![7; 32],
        emergency: false,
        not_shared: Vec::new(),
    }
}

#[test]
fn an_audit_write_cut_short_by_a_full_disk_leaves_no_partial_record() {
    let Some(disk) = SmallDisk::mount(16) else {
        return;
    };
    let store_dir = disk.path.join("store");
    let store = Store::open(&store_dir, 1 << 20).unwrap();
    let que = Node::new(config("QUE"), keys("QUE"), store, T0).unwrap();
    let mut appended = 0;
    // Leave the segment's end part-way through a page, so the next write
    // fits part of itself in the page's free tail before the disk refuses.
    while appended < 3 || std::fs::metadata(newest_segment(&store_dir)).unwrap().len() % 4096 < 512
    {
        que.audit.append_deferred(&entry(appended)).unwrap();
        que.audit.sync().unwrap();
        appended += 1;
    }
    let segment = newest_segment(&store_dir);
    let before = std::fs::metadata(&segment).unwrap().len();

    let filler = fill(&disk.path);
    for _ in 0..20 {
        que.audit.append_deferred(&entry(appended)).unwrap();
        appended += 1;
    }
    let err = que.audit.sync().unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    // The part that fitted was cut off again: the file ends at its last
    // whole record.
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), before);

    // Space returns: the entries reach the file once, whole and in order.
    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while let Err(e) = que.audit.sync() {
        assert!(
            std::time::Instant::now() < deadline,
            "the audit log still cannot be written 90 s after space returned: {e}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(que);
    let store = reopen(&store_dir);
    careweave_node::audit::verify(&store, &keys("QUE").log.public_key()).unwrap();
    assert_eq!(store.audit_len().unwrap(), appended);
}

/// Requests answered together share one audit sync. When that sync fails,
/// none of the batch's answers may go out, since none of their entries is
/// known to be on disk.
#[test]
fn a_batch_whose_audit_sync_fails_releases_no_answer() {
    let Some(disk) = SmallDisk::mount(16) else {
        return;
    };
    let (coordinator, list) = network();
    let store_dir = disk.path.join("store");
    let store = Store::open(&store_dir, 1 << 20).unwrap();
    let que = Node::new(config("QUE"), keys("QUE"), store, T0).unwrap();
    que.install_root(&coordinator.root_bytes(), T0).unwrap();
    que.install_list(&list, T0).unwrap();
    let qhg = open("QHG", &coordinator, &list);
    let locate = |i: usize, now: u64| {
        let request = LocateRequest {
            nhs_number: NhsNumber::parse(&common::nhs_for(i)).unwrap(),
            context: context(Purpose::Treat),
            sections: None,
        };
        qhg.node
            .prepare_locate(&OdsCode::parse("QUE").unwrap(), &request, now)
            .unwrap()
            .bytes
    };
    let batch = |requests: &[Vec<u8>], now: u64| {
        que.answer_batch(
            requests.iter().map(|bytes| BatchedRequest {
                protocol: ProtocolId::Locate,
                bytes,
                remote: qhg.node.peer_id(),
                busy: false,
            }),
            now,
        )
    };

    // The disk fills.
    let filler = fill(&disk.path);
    let requests: Vec<Vec<u8>> = (0..4).map(|i| locate(i, T0)).collect();
    let answers = batch(&requests, T0);
    assert_eq!(answers.len(), 4);
    for answer in &answers {
        assert!(
            matches!(answer, Inbound::Drop(_)),
            "an answer went out with its audit entry not on disk: {answer:?}"
        );
    }

    // Space returns: the node answers again, without a restart.
    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let answers = loop {
        let requests: Vec<Vec<u8>> = (10..14).map(|i| locate(i, T0 + 1)).collect();
        let answers = batch(&requests, T0 + 1);
        if answers.iter().all(|a| matches!(a, Inbound::Reply(_))) {
            break answers;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answers 90 s after space returned: {answers:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(answers.len(), 4);
    drop(que);
    let store = reopen(&store_dir);
    careweave_node::audit::verify(&store, &keys("QUE").log.public_key()).unwrap();
}
