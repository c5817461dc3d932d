//! Sign, verify and decode costs of careweave's signed objects.
//!
//! Run with `cargo bench -p careweave-protocol`; figures go in
//! `docs/benchmarks.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;

use careweave_protocol::cbor::{self, Limits, Value};
use careweave_protocol::cose::Sign1;
use careweave_protocol::envelope::{self, ProtocolId, Receive, Seal};
use careweave_protocol::keys::KeyPair;
use careweave_protocol::message::{LocateRequest, Purpose, RequesterContext};
use careweave_protocol::record::{self, RecordLabel};
use careweave_protocol::trust::{
    self, KeyUse, ListDocument, Member, MemberKey, MemberStatus, PeerEntry, Policy, Role, Root,
    RootDocument, TrustList,
};
use careweave_protocol::{NhsNumber, OdsCode};
use criterion::{Criterion, criterion_group, criterion_main};
use sha2::{Digest, Sha256};

const T0: u64 = 1_800_000_000;

fn key(name: &str) -> KeyPair {
    KeyPair::from_secret_bytes(&Sha256::digest(name).into())
}

struct Node {
    ods: OdsCode,
    transport: KeyPair,
    message: KeyPair,
}

fn member(node: &Node) -> Member {
    let k = |pair: &KeyPair, key_use| MemberKey {
        kid: pair.kid(),
        key_use,
        public: pair.public_key(),
        valid_from: T0 - 86_400,
        valid_until: T0 + 86_400 * 365,
    };
    Member {
        ods: node.ods.clone(),
        name: format!("NHS {} ICB", node.ods),
        status: MemberStatus::Active,
        roles: vec![Role::Provider, Role::Consumer],
        valid_from: T0 - 86_400,
        valid_until: T0 + 86_400 * 365,
        peers: vec![PeerEntry {
            peer_id: node.transport.public_key().peer_id(),
            addrs: vec!["/ip4/127.0.0.1/tcp/7000".into()],
        }],
        keys: vec![
            k(&node.transport, KeyUse::Transport),
            k(&node.message, KeyUse::Message),
        ],
        predecessors: vec![],
        contact: None,
    }
}

/// A 42-member network, as England's ICBs were from 2022 to 2026.
fn network() -> (Vec<Node>, Vec<KeyPair>, Root) {
    let nodes: Vec<Node> = (0..42)
        .map(|i| Node {
            ods: OdsCode::parse(&format!("Q{i:02}")).unwrap(),
            transport: key(&format!("t{i}")),
            message: key(&format!("m{i}")),
        })
        .collect();
    let list_keys: Vec<KeyPair> = (0..3).map(|i| key(&format!("list{i}"))).collect();
    let root = Root {
        network: "bench".into(),
        version: 1,
        issued: T0 - 86_400,
        expires: T0 + 86_400 * 365,
        root_keys: vec![key("root").public_key()],
        root_threshold: 1,
        list_keys: list_keys.iter().map(KeyPair::public_key).collect(),
        list_threshold: 2,
        policy: Policy::default(),
    };
    (nodes, list_keys, root)
}

fn bench(c: &mut Criterion) {
    let (nodes, list_keys, root) = network();
    let list = TrustList {
        network: "bench".into(),
        seq: 1,
        root_version: 1,
        issued: T0 - 3600,
        expires: T0 + 86_400 * 7,
        prev: None,
        members: nodes.iter().map(member).collect(),
        revoked: vec![],
    };
    let mut root_doc = RootDocument::unsigned(&root).unwrap();
    root_doc.sign(&key("root")).unwrap();
    let accepted_root = trust::accept_first_root(&root_doc.encode(), T0).unwrap();
    let mut list_doc = ListDocument::unsigned(&list).unwrap();
    list_doc.sign(&list_keys[0], &root).unwrap();
    list_doc.sign(&list_keys[1], &root).unwrap();
    let list_bytes = list_doc.encode();
    let accepted = trust::accept_list(&accepted_root, None, &list_bytes, T0).unwrap();

    let request = LocateRequest {
        nhs_number: NhsNumber::parse("9990000018").unwrap(),
        context: RequesterContext {
            organisation: nodes[0].ods.clone(),
            user_id: "555021935107".into(),
            role_profile_id: "555021936108".into(),
            role_code: "R8000".into(),
            purpose: Purpose::Treat,
            relationship: "direct-care".into(),
            break_glass_reason: None,
            request_id: "60ef4f6e-1d35-4ec4-9b8e-7f5b1f2e9c1a".into(),
            correlation_id: None,
        },
        sections: None,
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    let (a_peer, b_peer) = (
        a.transport.public_key().peer_id(),
        b.transport.public_key().peer_id(),
    );
    let seal = Seal {
        key: &a.message,
        protocol: ProtocolId::Locate,
        sender_ods: &a.ods,
        receiver_ods: &b.ods,
        sender_peer: &a_peer,
        receiver_peer: &b_peer,
        trust_seq: 1,
        now: T0,
        lifetime_secs: 60,
        cti: [7; 16],
        request_hash: None,
    };
    let sealed = envelope::seal(&request, &seal).unwrap();
    let policy = Policy::default();
    let receive = Receive {
        trust: &accepted,
        policy: &policy,
        protocol: ProtocolId::Locate,
        local_ods: &b.ods,
        local_peer: &b_peer,
        remote_peer: &a_peer,
        now: T0,
        max_bytes: 64 * 1024,
    };

    c.bench_function("locate request: seal (encode + sign)", |bench| {
        bench.iter(|| envelope::seal(black_box(&request), &seal).unwrap())
    });
    c.bench_function(
        "locate request: open (decode + all checks + verify)",
        |bench| {
            bench.iter(|| envelope::open(black_box(&sealed), &receive, |_, _, _| false).unwrap())
        },
    );
    c.bench_function("locate request: COSE decode only", |bench| {
        bench.iter(|| Sign1::decode(black_box(&sealed), 64 * 1024).unwrap())
    });
    c.bench_function("CBOR well-formedness scan of a 42-member list", |bench| {
        let payload = list_doc.cose().payload.clone();
        bench.iter(|| cbor::check_well_formed(black_box(&payload), Limits::TRUST).unwrap())
    });
    c.bench_function("CBOR decode to Value of a 42-member list", |bench| {
        let payload = list_doc.cose().payload.clone();
        bench.iter(|| cbor::decode::<Value>(black_box(&payload), Limits::TRUST).unwrap())
    });
    c.bench_function("trust list (42 members, 2 signatures): accept", |bench| {
        bench.iter(|| trust::accept_list(&accepted_root, None, black_box(&list_bytes), T0).unwrap())
    });
    c.bench_function("Ed25519 verify_strict alone (floor)", |bench| {
        let sig = a.message.sign(b"floor");
        let public = a.message.public_key();
        bench.iter(|| assert!(public.verify_strict(black_box(b"floor"), &sig)))
    });
    c.bench_function("Ed25519 sign alone (floor)", |bench| {
        bench.iter(|| a.message.sign(black_box(b"floor")))
    });
    // Import signs every record: a 1 KiB FHIR resource, as the ingest
    // figure's are.
    let note = "word ".repeat(180);
    let resource = format!(
        r#"{{"resourceType":"Observation","id":"bench-1","meta":{{"versionId":"1"}},"status":"final","note":[{{"text":"{note}"}}]}}"#
    );
    let label = RecordLabel {
        custodian: a.ods.clone(),
        nhs_number: NhsNumber::parse("9990000018").unwrap(),
        signed_at: T0,
        resource_type: "Observation".into(),
        resource_id: "bench-1".into(),
        version: "1".into(),
    };
    c.bench_function(
        "record of 1 KiB: sign_record (check, encode, sign)",
        |bench| {
            bench.iter(|| {
                record::sign_record(black_box(resource.as_bytes()), &label, &a.message).unwrap()
            })
        },
    );
    c.bench_function("Ed25519 sign of 1 KiB alone (floor)", |bench| {
        bench.iter(|| a.message.sign(black_box(resource.as_bytes())))
    });
    // A national locate brings 41 answers, each signed by another ICB.
    let answerers: Vec<KeyPair> = (0..41).map(|i| key(&format!("answerer {i}"))).collect();
    let answers: Vec<Vec<u8>> = (0..41u8).map(|i| vec![i; 273]).collect();
    let signed: Vec<ed25519_dalek::Signature> = answerers
        .iter()
        .zip(&answers)
        .map(|(k, m)| ed25519_dalek::Signature::from_bytes(&k.sign(m)))
        .collect();
    let publics: Vec<ed25519_dalek::VerifyingKey> = answerers
        .iter()
        .map(|k| ed25519_dalek::VerifyingKey::from_bytes(k.public_key().as_bytes()).unwrap())
        .collect();
    c.bench_function("41 answers: verify_strict one by one", |bench| {
        bench.iter(|| {
            for ((p, m), s) in publics.iter().zip(&answers).zip(&signed) {
                assert!(p.verify_strict(black_box(m), s).is_ok());
            }
        })
    });
    c.bench_function("41 answers: verify_batch", |bench| {
        let messages: Vec<&[u8]> = answers.iter().map(Vec::as_slice).collect();
        bench.iter(|| {
            assert!(ed25519_dalek::verify_batch(black_box(&messages), &signed, &publics).is_ok())
        })
    });
    println!(
        "sizes: locate request {} bytes, 42-member list {} bytes",
        sealed.len(),
        list_bytes.len()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
