//! What one locate costs each end, in process and without a network: the
//! whole of careweave's work beside the work DESIGN requires of it alone.
//!
//! At the answering node the whole answer is `Node::handle_request` on a
//! signed locate: the ordered checks and the signature, the replay cache,
//! policy, the index look-up, the audit entry made durable, and the signed
//! answer. The required work alone is one `verify_strict` over a request of
//! the same size, one append of an audit entry's size with `fdatasync` in
//! the same directory, and one signature over an answer of the same size.
//!
//! At the asking node a national locate of 42 ICBs signs and audits a
//! request to each (itself included), makes the entries durable, then
//! checks and audits the 42 answers and makes those durable. The answers
//! are made by 42 real answering nodes between the two timed halves. The
//! required work alone is 42 signatures, 42 entries' worth of bytes appended
//! and synced, 42 `verify_strict` and the same append and sync again.
//!
//! What the whole costs beyond the required work is careweave's own work.
//!
//! Run with `cargo bench -p careweave-node --bench locate`; figures go in
//! `docs/benchmarks.md`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use careweave_node::node::{Inbound, OutboundRequest};
use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::message::{LocateRequest, Purpose};
use careweave_protocol::trust::Role;
use careweave_protocol::{NhsNumber, OdsCode, PeerIdBytes};
use common::{T0, TestNode, context, key, network, open_with};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

/// Bytes an answer's audit entry takes in its segment (docs/benchmarks.md).
const AUDIT_ENTRY_BYTES: usize = 490;

/// A node as operators run it: the config template's audit checkpoints,
/// not the test helpers' frequent ones.
fn node(ods: &str, coordinator: &common::Coordinator, list: &[u8]) -> TestNode {
    let mut config = common::config(ods);
    config.audit = careweave_node::config::AuditSection::default();
    open_with(config, coordinator, list)
}

fn locate_for(nhs_number: &str) -> LocateRequest {
    LocateRequest {
        nhs_number: NhsNumber::parse(nhs_number).unwrap(),
        context: context(Purpose::Treat),
        sections: None,
    }
}

fn locate(asker: &TestNode, nhs_number: &str) -> OutboundRequest {
    asker
        .node
        .prepare_locate(&OdsCode::parse("QUE").unwrap(), &locate_for(nhs_number), T0)
        .unwrap()
}

/// `answerer`'s answer to `request` from `asker`, as its answering thread
/// makes it.
fn answer(answerer: &TestNode, request: &OutboundRequest, asker: &PeerIdBytes) -> Vec<u8> {
    match answerer
        .node
        .handle_request(ProtocolId::Locate, &request.bytes, asker, T0)
    {
        Inbound::Reply(bytes) => bytes,
        Inbound::Drop(reason) => panic!("dropped: {reason}"),
    }
}

/// Appends `bytes` to `audit` and makes them durable.
fn append_synced(audit: &mut File, bytes: &[u8]) {
    audit.write_all(bytes).unwrap();
    audit.sync_data().unwrap();
}

fn audit_file(dir: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("required-work-audit"))
        .unwrap()
}

fn answering_node(c: &mut Criterion) {
    let (coordinator, list) = network();
    let qhg = node("QHG", &coordinator, &list);
    let que = node("QUE", &coordinator, &list);
    common::load_bundle(&que.node);
    let asker = qhg.node.peer_id().clone();
    // Requests are made before each timed answer, each with its own id, so
    // none is refused as a replay.
    let mut patient = 0usize;
    let mut group = c.benchmark_group("answering node");

    group.bench_function("locate, patient not held: the whole answer", |b| {
        b.iter_batched(
            || {
                patient = (patient + 1) % 10_000;
                locate(&qhg, &common::nhs_for(1_000 + patient))
            },
            |request| answer(&que, &request, &asker),
            BatchSize::SmallInput,
        );
    });

    group.bench_function("locate, patient held (7 pointers): the whole answer", |b| {
        b.iter_batched(
            || locate(&qhg, "9990000018"),
            |request| answer(&que, &request, &asker),
            BatchSize::SmallInput,
        );
    });

    // Sizes of one exchange about a patient not held, for the required work.
    let one = locate(&qhg, &common::nhs_for(0));
    let answer_len = answer(&que, &one, &asker).len();
    let client = key("required-work/client");
    let answerer = key("required-work/answerer");
    let request = vec![7u8; one.bytes.len() - 64];
    let signature = client.sign(&request);
    let public = client.public_key();
    let mut audit = audit_file(que.dir.path());
    let entry = [1u8; AUDIT_ENTRY_BYTES];
    let answer = vec![2u8; answer_len - 64];
    group.bench_function(
        "required work alone: verify_strict, append and fdatasync, sign",
        |b| {
            b.iter(|| {
                assert!(public.verify_strict(black_box(&request), &signature));
                append_synced(&mut audit, &entry);
                black_box(answerer.sign(&answer))
            });
        },
    );
    group.bench_function("append and fdatasync alone", |b| {
        b.iter(|| {
            append_synced(&mut audit, &entry);
        });
    });
    group.finish();
}

/// Forty-two members: QHG, which asks, and 41 others with synthetic codes.
fn national() -> (common::Coordinator, Vec<u8>, Vec<String>) {
    let coordinator = common::Coordinator::new();
    let codes: Vec<String> = std::iter::once("QHG".to_owned())
        .chain(('A'..='Z').map(|c| format!("QZ{c}")))
        .chain(('A'..='O').map(|c| format!("QY{c}")))
        .collect();
    let both = vec![Role::Provider, Role::Consumer];
    let members = codes
        .iter()
        .map(|ods| common::member(ods, both.clone()))
        .collect();
    let list = coordinator.list_bytes(1, None, members, vec![]);
    (coordinator, list, codes)
}

fn asking_node(c: &mut Criterion) {
    let (coordinator, list, codes) = national();
    let nodes: Vec<TestNode> = codes
        .iter()
        .map(|ods| node(ods, &coordinator, &list))
        .collect();
    let asker = &nodes[0];
    let asker_peer = asker.node.peer_id().clone();
    let peers: Vec<OdsCode> = codes.iter().map(|c| OdsCode::parse(c).unwrap()).collect();
    let mut patient = 0usize;
    let mut group = c.benchmark_group("asking node");
    group.sample_size(20);

    group.bench_function(
        "national locate of 42 ICBs: sign, audit and sync 42 requests; check, audit and sync 42 answers",
        |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    patient = (patient + 1) % 10_000;
                    let request = locate_for(&common::nhs_for(1_000 + patient));
                    let started = Instant::now();
                    let signed = asker.node.sign_locates(&peers, &request, T0);
                    let sent: Vec<OutboundRequest> = asker
                        .node
                        .sync_signed(signed)
                        .into_iter()
                        .map(Result::unwrap)
                        .collect();
                    timed += started.elapsed();
                    let answers: Vec<Vec<u8>> = sent
                        .iter()
                        .zip(&nodes)
                        .map(|(request, answerer)| answer(answerer, request, &asker_peer))
                        .collect();
                    let started = Instant::now();
                    for (request, answer) in sent.iter().zip(&answers) {
                        black_box(
                            asker
                                .node
                                .accept_locate_response_deferred(request, answer, T0)
                                .unwrap(),
                        );
                    }
                    asker.node.sync_audit().unwrap();
                    timed += started.elapsed();
                }
                timed
            });
        },
    );

    // Sizes of one exchange, for the required work alone.
    let one = asker
        .node
        .prepare_locate(&peers[1], &locate_for("9990000018"), T0)
        .unwrap();
    let answer_len = answer(&nodes[1], &one, &asker_peer).len();
    let signer = key("required-work/asker");
    let request = vec![7u8; one.bytes.len() - 64];
    let answer = vec![2u8; answer_len - 64];
    let answers: Vec<_> = (0..peers.len())
        .map(|i| {
            let answerer = key(&format!("required-work/answerer-{i}"));
            (answerer.public_key(), answerer.sign(&answer))
        })
        .collect();
    let entries = vec![1u8; peers.len() * AUDIT_ENTRY_BYTES];
    let mut audit = audit_file(asker.dir.path());
    group.bench_function(
        "required work alone: 42 signatures, append and fdatasync, 42 verify_strict, append and fdatasync",
        |b| {
            b.iter(|| {
                for _ in 0..peers.len() {
                    black_box(signer.sign(black_box(&request)));
                }
                append_synced(&mut audit, &entries);
                for (public, signature) in &answers {
                    assert!(public.verify_strict(black_box(&answer), signature));
                }
                append_synced(&mut audit, &entries);
            });
        },
    );
    group.finish();
}

criterion_group!(benches, answering_node, asking_node);
criterion_main!(benches);
