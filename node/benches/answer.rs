//! What one answering node spends on one locate, in process and without a
//! network: the whole answer beside the work DESIGN requires of it alone.
//!
//! The whole answer is `Node::handle_request` on a signed locate: the
//! ordered checks and the signature, the replay cache, policy, the index
//! look-up, the audit entry made durable, and the signed answer. The
//! required work alone is one `verify_strict` over a request of the same
//! size, one append of an audit entry's size with `fdatasync` in the same
//! directory, and one signature over an answer of the same size. What the
//! first costs beyond the second is careweave's own work per answer.
//!
//! Run with `cargo bench -p careweave-node --bench answer`; figures go in
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

use careweave_node::node::{Inbound, OutboundRequest};
use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::message::{LocateRequest, Purpose};
use careweave_protocol::{NhsNumber, OdsCode};
use common::{T0, TestNode, context, key, network, open_with};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

/// Bytes an answer's audit entry takes in its segment (docs/benchmarks.md).
const AUDIT_ENTRY_BYTES: usize = 490;

/// Bytes of a signed locate answer with no pointers.
const ANSWER_BYTES: usize = 273;

/// A node as operators run it: the config template's audit checkpoints,
/// not the test helpers' frequent ones.
fn node(ods: &str, coordinator: &common::Coordinator, list: &[u8]) -> TestNode {
    let mut config = common::config(ods);
    config.audit = careweave_node::config::AuditSection::default();
    open_with(config, coordinator, list)
}

fn locate(asker: &TestNode, nhs_number: &str) -> OutboundRequest {
    let request = LocateRequest {
        nhs_number: NhsNumber::parse(nhs_number).unwrap(),
        context: context(Purpose::Treat),
        sections: None,
    };
    asker
        .node
        .prepare_locate(&OdsCode::parse("QUE").unwrap(), &request, T0)
        .unwrap()
}

fn answered(inbound: Inbound) -> Vec<u8> {
    match inbound {
        Inbound::Reply(bytes) => bytes,
        Inbound::Drop(reason) => panic!("dropped: {reason}"),
    }
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
            |request| {
                answered(
                    que.node
                        .handle_request(ProtocolId::Locate, &request.bytes, &asker, T0),
                )
            },
            BatchSize::SmallInput,
        );
    });

    group.bench_function("locate, patient held (7 pointers): the whole answer", |b| {
        b.iter_batched(
            || locate(&qhg, "9990000018"),
            |request| {
                answered(
                    que.node
                        .handle_request(ProtocolId::Locate, &request.bytes, &asker, T0),
                )
            },
            BatchSize::SmallInput,
        );
    });

    let request_len = locate(&qhg, "9990000018").bytes.len();
    let client = key("required-work/client");
    let answerer = key("required-work/answerer");
    let request = vec![7u8; request_len - 64];
    let signature = client.sign(&request);
    let public = client.public_key();
    let mut audit = audit_file(que.dir.path());
    let entry = [1u8; AUDIT_ENTRY_BYTES];
    let answer = [2u8; ANSWER_BYTES - 64];
    group.bench_function(
        "required work alone: verify_strict, append and fdatasync, sign",
        |b| {
            b.iter(|| {
                assert!(public.verify_strict(black_box(&request), &signature));
                audit.write_all(&entry).unwrap();
                audit.sync_data().unwrap();
                black_box(answerer.sign(&answer))
            });
        },
    );
    group.bench_function("append and fdatasync alone", |b| {
        b.iter(|| {
            audit.write_all(&entry).unwrap();
            audit.sync_data().unwrap();
        });
    });
    group.finish();
}

criterion_group!(benches, answering_node);
criterion_main!(benches);
