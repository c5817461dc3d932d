//! Request handling end to end, without a network: two nodes, real keys,
//! a signed trust list, real stores and audit logs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use careweave_node::audit::{self, AuditEntry};
use careweave_node::node::{
    BatchedRequest, FetchAnswer, Inbound, LocateAnswer, Node, OutboundRequest, RequestError,
    ResponseError,
};
use careweave_node::store::PatientFlags;
use careweave_protocol::cbor::{self, Limits};
use careweave_protocol::envelope::{self, ProtocolId, Seal};
use careweave_protocol::message::{
    ErrorCode, FetchRequest, LocateRequest, Purpose, WithheldReason,
};
use careweave_protocol::trust::{Revocation, Role};
use careweave_protocol::{NhsNumber, OdsCode, PeerIdBytes};
use common::{DAY, T0, TestNode, context, keys, member, network, open};

fn nhs() -> NhsNumber {
    NhsNumber::parse("9990000018").unwrap()
}

fn ods(code: &str) -> OdsCode {
    OdsCode::parse(code).unwrap()
}

fn locate_request(purpose: Purpose) -> LocateRequest {
    LocateRequest {
        nhs_number: nhs(),
        context: context(purpose),
        sections: None,
    }
}

/// A signed locate from `from` to QUE, for treatment, at T0.
fn treat_locate(from: &TestNode) -> OutboundRequest {
    from.node
        .prepare_locate(&ods("QUE"), &locate_request(Purpose::Treat), T0)
        .unwrap()
}

fn pair() -> (TestNode, TestNode) {
    let (coordinator, list) = network();
    let qhg = open("QHG", &coordinator, &list);
    let que = open("QUE", &coordinator, &list);
    common::load_bundle(&que.node);
    (qhg, que)
}

fn reply(inbound: Inbound) -> Vec<u8> {
    match inbound {
        Inbound::Reply(bytes) => bytes,
        Inbound::Drop(reason) => panic!("dropped: {reason}"),
    }
}

fn last_entry(node: &Node) -> AuditEntry {
    let len = node.store.audit_len().unwrap();
    let bytes = node.store.audit_entry(len - 1).unwrap().unwrap();
    cbor::decode(&bytes, Limits::MESSAGE).unwrap()
}

#[test]
fn locate_then_fetch_across_two_nodes() {
    let (qhg, que) = pair();
    let request = treat_locate(&qhg);
    // The outbound request is audited before it is sent.
    assert_eq!(last_entry(&qhg.node).outcome, "sent");
    let response =
        reply(
            que.node
                .handle_request(ProtocolId::Locate, &request.bytes, qhg.node.peer_id(), T0),
        );
    let LocateAnswer::Answered(answer) = qhg
        .node
        .accept_locate_response(&request, &response, T0 + 1)
        .unwrap()
    else {
        panic!("refused")
    };
    assert_eq!(answer.custodian, ods("QUE"));
    // Released: allergies, medications, problems (the hypertension only),
    // investigations, vaccinations, one document, encounters. Withheld: the
    // STI condition (sensitive) and the very restricted care plan.
    let sections: Vec<_> = answer
        .pointers
        .iter()
        .map(|p| format!("{:?}", p.section))
        .collect();
    assert_eq!(answer.pointers.len(), 7, "{sections:?}");
    assert_eq!(
        answer.withheld,
        [
            WithheldReason::SensitiveCategory,
            WithheldReason::VeryRestricted
        ]
    );
    assert!(answer.pointers.iter().all(|p| p.id.starts_with("QUE-")));
    assert!(answer.pointers.iter().all(|p| !p.id.contains("9990000018")));
    let problems = answer
        .pointers
        .iter()
        .find(|p| p.section == careweave_protocol::message::Section::Problems)
        .unwrap();
    assert_eq!(problems.count, 1);

    // Both sides audited it.
    let inbound = last_entry(&que.node);
    assert_eq!(inbound.outcome, "answered");
    assert_eq!(inbound.peer_ods, Some(ods("QHG")));
    assert_eq!(inbound.nhs_number, Some(nhs()));
    assert_eq!(inbound.request_hash, request.hash.to_vec());
    assert_eq!(last_entry(&qhg.node).outcome, "answered");

    // Fetch the problems pointer: the custodian-signed record comes back unchanged.
    let fetch = FetchRequest {
        nhs_number: nhs(),
        pointer_id: problems.id.clone(),
        context: context(Purpose::Treat),
    };
    let request = qhg.node.prepare_fetch(&ods("QUE"), &fetch, T0 + 2).unwrap();
    let response = reply(que.node.handle_request(
        ProtocolId::Fetch,
        &request.bytes,
        qhg.node.peer_id(),
        T0 + 2,
    ));
    let FetchAnswer::Records {
        records, custodian, ..
    } = qhg
        .node
        .accept_fetch_response(&request, &response, T0 + 3)
        .unwrap()
    else {
        panic!("refused")
    };
    assert_eq!(custodian, ods("QUE"));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].label.resource_id, "cond-1");
    assert_eq!(records[0].label.nhs_number, nhs());
    let stored = que
        .node
        .store
        .record("Condition", "cond-1")
        .unwrap()
        .unwrap();
    let careweave_protocol::message::Message::FetchResponse(raw) = envelope_payload(&response)
    else {
        panic!()
    };
    assert_eq!(
        raw.records[0].as_ref(),
        stored.signed.as_slice(),
        "records travel unchanged from ingest"
    );
    assert_eq!(last_entry(&que.node).outcome, "answered");
}

/// A national locate signs its requests in two batches, one per core. The
/// batches keep the order asked, a member that cannot be asked keeps its
/// place as an error, and every request sent is audited as sent.
#[test]
fn requests_signed_in_two_batches_keep_their_order_and_are_audited() {
    let (qhg, _que) = pair();
    let request = locate_request(Purpose::Treat);
    let before = qhg.node.store.audit_len().unwrap();
    let mut signed = qhg.node.sign_locates(&[ods("QUE")], &request, T0);
    signed.append(
        qhg.node
            .sign_locates(&[ods("QM7"), ods("QHG")], &request, T0),
    );
    let sent = qhg.node.sync_signed(signed);
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0].as_ref().unwrap().peer_ods, ods("QUE"));
    assert!(
        matches!(sent[1], Err(RequestError::NotProvider(ref who)) if who == "QM7"),
        "{:?}",
        sent[1]
    );
    assert_eq!(sent[2].as_ref().unwrap().peer_ods, ods("QHG"));
    // The consumer-only member was never asked, so only two were audited.
    assert_eq!(qhg.node.store.audit_len().unwrap(), before + 2);
    for index in before..before + 2 {
        let bytes = qhg.node.store.audit_entry(index).unwrap().unwrap();
        let entry: AuditEntry = cbor::decode(&bytes, Limits::MESSAGE).unwrap();
        assert_eq!(entry.outcome, "sent");
    }
}

/// Requests answered as one batch get the same answers and audit entries,
/// in order, as requests answered one at a time: a replay inside the batch
/// is caught and a busy request is told so.
#[test]
fn a_batch_is_answered_in_order_and_every_request_audited() {
    let (qhg, que) = pair();
    let first = treat_locate(&qhg);
    let second = treat_locate(&qhg);
    let before = que.node.store.audit_len().unwrap();
    let batch = [
        (&first.bytes, false),
        (&second.bytes, false),
        (&first.bytes, false),
        (&second.bytes, true),
    ];
    let answers = que.node.answer_batch(
        batch.iter().map(|(bytes, busy)| BatchedRequest {
            protocol: ProtocolId::Locate,
            bytes,
            remote: qhg.node.peer_id(),
            busy: *busy,
        }),
        T0,
    );
    assert_eq!(answers.len(), 4);
    let mut answers = answers.into_iter().map(reply);
    for request in [&first, &second] {
        let Ok(LocateAnswer::Answered(answer)) =
            qhg.node
                .accept_locate_response(request, &answers.next().unwrap(), T0 + 1)
        else {
            panic!("not answered")
        };
        assert_eq!(answer.pointers.len(), 7);
    }
    let code = |bytes: Vec<u8>| {
        let s = careweave_protocol::cose::Sign1::decode(&bytes, 1 << 20).unwrap();
        cbor::decode::<careweave_protocol::message::ErrorMessage>(&s.payload, Limits::MESSAGE)
            .unwrap()
            .code
    };
    assert_eq!(code(answers.next().unwrap()), ErrorCode::Unauthorised);
    assert_eq!(code(answers.next().unwrap()), ErrorCode::Busy);

    let entries: Vec<AuditEntry> = (before..before + 4)
        .map(|i| {
            cbor::decode(
                &que.node.store.audit_entry(i).unwrap().unwrap(),
                Limits::MESSAGE,
            )
            .unwrap()
        })
        .collect();
    let outcomes: Vec<(&str, Option<&str>)> = entries
        .iter()
        .map(|e| {
            let reason = e.reason.as_deref().and_then(|r| r.split(':').next());
            (e.outcome.as_str(), reason)
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("answered", None),
            ("answered", None),
            ("refused", Some("replayed")),
            ("refused", Some("busy")),
        ]
    );
    assert_eq!(que.node.store.audit_len().unwrap(), before + 4);
    audit::verify(&que.node.store, &keys("QUE").log.public_key()).unwrap();
}

fn envelope_payload(bytes: &[u8]) -> careweave_protocol::message::Message {
    let s = careweave_protocol::cose::Sign1::decode(bytes, 1 << 22).unwrap();
    careweave_protocol::message::Message::FetchResponse(
        cbor::decode(&s.payload, Limits::MESSAGE).unwrap(),
    )
}

/// Sends raw bytes from QHG's connection to QUE and returns QUE's refusal
/// reason as audited, checking the reply is a signed error.
fn refused_with(que: &Node, qhg_peer: &PeerIdBytes, bytes: &[u8], now: u64) -> (String, ErrorCode) {
    let before = que.store.audit_len().unwrap();
    let inbound = que.handle_request(ProtocolId::Locate, bytes, qhg_peer, now);
    assert_eq!(
        que.store.audit_len().unwrap(),
        before + 1,
        "every refusal is audited"
    );
    let entry = last_entry(que);
    assert_eq!(entry.outcome, "refused");
    let reason = entry.reason.unwrap();
    let Inbound::Reply(reply) = inbound else {
        panic!("a member gets a signed refusal")
    };
    let s = careweave_protocol::cose::Sign1::decode(&reply, 1 << 20).unwrap();
    let err: careweave_protocol::message::ErrorMessage =
        cbor::decode(&s.payload, Limits::MESSAGE).unwrap();
    (reason, err.code)
}

fn seal_as(
    signer: &careweave_protocol::KeyPair,
    sender: &str,
    receiver: &str,
    now: u64,
) -> Vec<u8> {
    let sender_peer = keys(sender).peer_id();
    let receiver_peer = keys("QUE").peer_id();
    envelope::seal(
        &locate_request(Purpose::Treat),
        &Seal {
            key: signer,
            protocol: ProtocolId::Locate,
            sender_ods: &ods(sender),
            receiver_ods: &ods(receiver),
            sender_peer: &sender_peer,
            receiver_peer: &receiver_peer,
            trust_seq: 1,
            now,
            lifetime_secs: 60,
            cti: [now as u8; 16],
            request_hash: None,
        },
    )
    .unwrap()
}

#[test]
fn each_bad_request_is_refused_with_its_own_reason_and_audited() {
    let (qhg, que) = pair();
    let qhg_peer = qhg.node.peer_id().clone();
    let good = treat_locate(&qhg).bytes;

    // Tampered.
    let mut tampered = good.clone();
    let n = tampered.len();
    tampered[n - 5] ^= 0x10;
    assert_eq!(
        refused_with(&que.node, &qhg_peer, &tampered, T0)
            .0
            .split(':')
            .next(),
        Some("bad-signature")
    );

    // Replayed: the first copy is answered, the second refused.
    reply(
        que.node
            .handle_request(ProtocolId::Locate, &good, &qhg_peer, T0),
    );
    let (reason, code) = refused_with(&que.node, &qhg_peer, &good, T0 + 1);
    assert!(reason.starts_with("replayed"), "{reason}");
    assert_eq!(code, ErrorCode::Unauthorised);

    // Wrong audience: addressed to QM7 but delivered to QUE.
    let bytes = seal_as(&keys("QHG").message, "QHG", "QM7", T0);
    assert!(
        refused_with(&que.node, &qhg_peer, &bytes, T0)
            .0
            .starts_with("wrong-audience")
    );

    // Expired and too old.
    let bytes = seal_as(&keys("QHG").message, "QHG", "QUE", T0 - 100);
    assert!(
        refused_with(&que.node, &qhg_peer, &bytes, T0)
            .0
            .starts_with("expired")
    );
    let bytes = seal_as(&keys("QHG").message, "QHG", "QUE", T0 - 1000);
    assert!(
        refused_with(&que.node, &qhg_peer, &bytes, T0)
            .0
            .starts_with("too-old")
    );
    let bytes = seal_as(&keys("QHG").message, "QHG", "QUE", T0 + 600);
    let (reason, _) = refused_with(&que.node, &qhg_peer, &bytes, T0);
    assert!(
        reason.starts_with("from-future") && reason.contains("clock"),
        "{reason}"
    );

    // Unknown kid.
    let bytes = seal_as(&common::key("stranger"), "QHG", "QUE", T0 + 3);
    assert!(
        refused_with(&que.node, &qhg_peer, &bytes, T0)
            .0
            .starts_with("unknown-key")
    );

    // Another member's kid, on QHG's connection.
    let bytes = seal_as(&keys("QM7").message, "QHG", "QUE", T0 + 4);
    assert!(
        refused_with(&que.node, &qhg_peer, &bytes, T0)
            .0
            .starts_with("wrong-signer")
    );

    // Malformed.
    assert!(
        refused_with(&que.node, &qhg_peer, b"\xd2\x84garbage", T0)
            .0
            .starts_with("malformed")
    );

    let refused = que.node.metrics.refused();
    for reason in [
        "bad-signature",
        "replayed",
        "wrong-audience",
        "expired",
        "too-old",
        "from-future",
        "unknown-key",
        "wrong-signer",
        "malformed",
    ] {
        assert!(
            refused.get(reason).copied().unwrap_or(0) >= 1,
            "{reason} not counted: {refused:?}"
        );
    }
}

#[test]
fn a_member_that_keeps_sending_bad_messages_has_its_connection_closed() {
    use careweave_node::strikes::{DEFAULT_LIMIT, DEFAULT_WINDOW_SECS};
    let (qhg, que) = pair();
    let qhg_peer = qhg.node.peer_id().clone();
    let tampered = |now: u64| {
        let mut bytes = qhg
            .node
            .prepare_locate(&ods("QUE"), &locate_request(Purpose::Treat), now)
            .unwrap()
            .bytes;
        let n = bytes.len();
        bytes[n - 5] ^= 0x10;
        bytes
    };
    // Up to the limit, each bad message gets its signed refusal.
    for _ in 0..DEFAULT_LIMIT {
        let (reason, _) = refused_with(&que.node, &qhg_peer, &tampered(T0), T0);
        assert!(reason.starts_with("bad-signature"), "{reason}");
    }
    // The next closes the connection, and is still counted and audited.
    let before = que.node.store.audit_len().unwrap();
    match que
        .node
        .handle_request(ProtocolId::Locate, &tampered(T0), &qhg_peer, T0 + 1)
    {
        Inbound::Drop(why) => assert!(
            why.contains("keeps sending bad messages") && why.contains("bad-signature"),
            "{why}"
        ),
        Inbound::Reply(_) => panic!("a peer over the limit was answered"),
    }
    assert_eq!(que.node.store.audit_len().unwrap(), before + 1);
    assert_eq!(last_entry(&que.node).outcome, "refused");
    assert_eq!(
        que.node.metrics.refused().get("bad-signature").copied(),
        Some(u64::from(DEFAULT_LIMIT) + 1)
    );
    assert_eq!(
        que.node
            .metrics
            .connections_closed_for_bad_messages
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A well-formed request from the same member is still answered.
    let good = qhg
        .node
        .prepare_locate(&ods("QUE"), &locate_request(Purpose::Treat), T0 + 2)
        .unwrap();
    let answer = reply(
        que.node
            .handle_request(ProtocolId::Locate, &good.bytes, &qhg_peer, T0 + 2),
    );
    assert!(matches!(
        qhg.node
            .accept_locate_response(&good, &answer, T0 + 2)
            .unwrap(),
        LocateAnswer::Answered(_)
    ));
    // Once the window has passed, a bad message is answered again.
    let later = T0 + DEFAULT_WINDOW_SECS + 1;
    let (reason, _) = refused_with(&que.node, &qhg_peer, &tampered(later), later);
    assert!(reason.starts_with("bad-signature"), "{reason}");
}

#[test]
fn revoked_keys_are_refused_and_audited() {
    let (coordinator, _) = network();
    let both = vec![Role::Provider, Role::Consumer];
    let list = coordinator.list_bytes(
        1,
        None,
        vec![member("QHG", both.clone()), member("QUE", both)],
        vec![Revocation {
            kid: keys("QHG").message.kid(),
            ods: ods("QHG"),
            revoked_at: T0 - DAY,
            reason: "laptop stolen".into(),
            compromised_since: Some(T0 - 2 * DAY),
        }],
    );
    let que = open("QUE", &coordinator, &list);
    let bytes = seal_as(&keys("QHG").message, "QHG", "QUE", T0);
    let (reason, code) = refused_with(&que.node, &keys("QHG").peer_id(), &bytes, T0);
    assert!(reason.contains("revoked"), "{reason}");
    assert_eq!(code, ErrorCode::Unauthorised);
}

#[test]
fn a_stranger_connection_gets_no_answer_but_is_audited() {
    let (_, que) = pair();
    let stranger = common::key("stranger-transport").public_key().peer_id();
    let bytes = seal_as(&common::key("stranger"), "QHG", "QUE", T0);
    let before = que.node.store.audit_len().unwrap();
    assert!(matches!(
        que.node
            .handle_request(ProtocolId::Locate, &bytes, &stranger, T0),
        Inbound::Drop(_)
    ));
    assert_eq!(que.node.store.audit_len().unwrap(), before + 1);
}

#[test]
fn objection_restriction_and_emergency() {
    let (qhg, que) = pair();
    let ask = |purpose, now| {
        let request = qhg
            .node
            .prepare_locate(&ods("QUE"), &locate_request(purpose), now)
            .unwrap();
        let response = reply(que.node.handle_request(
            ProtocolId::Locate,
            &request.bytes,
            qhg.node.peer_id(),
            now,
        ));
        match qhg
            .node
            .accept_locate_response(&request, &response, now)
            .unwrap()
        {
            LocateAnswer::Answered(a) => a,
            LocateAnswer::Refused(e) => panic!("refused: {}", e.message),
        }
    };

    // Objection: withheld, visibly.
    que.node
        .store
        .set_flags(
            &nhs(),
            &PatientFlags {
                objected: true,
                objection: Some("asked at GP".into()),
                ..PatientFlags::default()
            },
        )
        .unwrap();
    let a = ask(Purpose::Treat, T0);
    assert!(a.pointers.is_empty());
    assert_eq!(a.withheld, [WithheldReason::Objection]);
    assert_eq!(last_entry(&que.node).outcome, "withheld");

    // Emergency access with a reason: allowed only if configured, alert raised.
    let alerts = que
        .node
        .metrics
        .emergency_alerts
        .load(std::sync::atomic::Ordering::Relaxed);
    let a = ask(Purpose::EmergencyTreat, T0 + 1);
    assert_eq!(
        a.withheld,
        [WithheldReason::Objection],
        "objection holds by default"
    );
    assert_eq!(
        que.node
            .metrics
            .emergency_alerts
            .load(std::sync::atomic::Ordering::Relaxed),
        alerts + 1
    );
    assert!(last_entry(&que.node).emergency);

    // Restricted: exactly like a patient the node has never heard of.
    que.node
        .store
        .set_flags(
            &nhs(),
            &PatientFlags {
                restricted: true,
                ..PatientFlags::default()
            },
        )
        .unwrap();
    let restricted = ask(Purpose::Treat, T0 + 2);
    let unknown_request = LocateRequest {
        nhs_number: (999_123_456..).find_map(NhsNumber::from_stem).unwrap(),
        ..locate_request(Purpose::Treat)
    };
    let request = qhg
        .node
        .prepare_locate(&ods("QUE"), &unknown_request, T0 + 3)
        .unwrap();
    let response = reply(que.node.handle_request(
        ProtocolId::Locate,
        &request.bytes,
        qhg.node.peer_id(),
        T0 + 3,
    ));
    let LocateAnswer::Answered(unknown) = qhg
        .node
        .accept_locate_response(&request, &response, T0 + 3)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(restricted, unknown);
}

#[test]
fn a_consumer_only_node_is_not_asked_and_does_not_answer() {
    let (coordinator, list) = network();
    let qhg = open("QHG", &coordinator, &list);
    let qm7 = open("QM7", &coordinator, &list);
    let err = qhg
        .node
        .prepare_locate(&ods("QM7"), &locate_request(Purpose::Treat), T0)
        .unwrap_err();
    assert!(err.to_string().contains("provider"), "{err}");
    // If asked anyway, it refuses with a reason.
    let bytes = envelope::seal(
        &locate_request(Purpose::Treat),
        &Seal {
            key: &keys("QHG").message,
            protocol: ProtocolId::Locate,
            sender_ods: &ods("QHG"),
            receiver_ods: &ods("QM7"),
            sender_peer: &keys("QHG").peer_id(),
            receiver_peer: &keys("QM7").peer_id(),
            trust_seq: 1,
            now: T0,
            lifetime_secs: 60,
            cti: [9; 16],
            request_hash: None,
        },
    )
    .unwrap();
    let Inbound::Reply(_) =
        qm7.node
            .handle_request(ProtocolId::Locate, &bytes, &keys("QHG").peer_id(), T0)
    else {
        panic!()
    };
    assert!(
        last_entry(&qm7.node)
            .reason
            .unwrap()
            .starts_with("not-provider")
    );
}

#[test]
fn expired_trust_fails_closed_with_a_reason() {
    let (qhg, que) = pair();
    let request = treat_locate(&qhg);
    let later = T0 + 30 * DAY;
    let Inbound::Drop(reason) = que.node.handle_request(
        ProtocolId::Locate,
        &request.bytes,
        qhg.node.peer_id(),
        later,
    ) else {
        panic!("an expired list must not answer")
    };
    assert!(reason.contains("expired"), "{reason}");
    assert!(
        que.node
            .not_ready_reason(later)
            .unwrap()
            .contains("failing closed")
    );
    assert!(
        qhg.node
            .prepare_locate(&ods("QUE"), &locate_request(Purpose::Treat), later)
            .is_err()
    );
}

#[test]
fn responses_must_answer_our_request_and_carry_true_records() {
    let (qhg, que) = pair();
    let first = treat_locate(&qhg);
    let second = treat_locate(&qhg);
    let response =
        reply(
            que.node
                .handle_request(ProtocolId::Locate, &first.bytes, qhg.node.peer_id(), T0),
        );
    // The answer to the first request cannot be passed off as the second's.
    assert_eq!(
        qhg.node
            .accept_locate_response(&second, &response, T0)
            .unwrap_err(),
        ResponseError::NotOurRequest
    );
    assert_eq!(last_entry(&qhg.node).outcome, "failed");
    // Nor accepted twice.
    qhg.node
        .accept_locate_response(&first, &response, T0)
        .unwrap();
    assert!(matches!(
        qhg.node.accept_locate_response(&first, &response, T0),
        Err(ResponseError::Verify(
            careweave_protocol::envelope::VerifyError::Replayed { .. }
        ))
    ));
}

#[test]
fn fetch_of_an_unknown_pointer_looks_like_an_unknown_patient() {
    let (qhg, que) = pair();
    let fetch = FetchRequest {
        nhs_number: nhs(),
        pointer_id: "QUE-000000000000000000000000".into(),
        context: context(Purpose::Treat),
    };
    let request = qhg.node.prepare_fetch(&ods("QUE"), &fetch, T0).unwrap();
    let response =
        reply(
            que.node
                .handle_request(ProtocolId::Fetch, &request.bytes, qhg.node.peer_id(), T0),
        );
    let FetchAnswer::Refused(e) = qhg
        .node
        .accept_fetch_response(&request, &response, T0)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::NotFound);
}

#[test]
fn audit_log_verifies_and_names_an_altered_entry() {
    let (qhg, que) = pair();
    for i in 0..5 {
        let request = qhg
            .node
            .prepare_locate(&ods("QUE"), &locate_request(Purpose::Treat), T0 + i)
            .unwrap();
        reply(que.node.handle_request(
            ProtocolId::Locate,
            &request.bytes,
            qhg.node.peer_id(),
            T0 + i,
        ));
    }
    que.node.audit.checkpoint(T0 + 10).unwrap();
    let log_key = keys("QUE").log.public_key();
    let report = audit::verify(&que.node.store, &log_key).unwrap();
    assert_eq!(report.entries, 5);
    assert!(report.checkpoints >= 2);

    // Export: each entry with an inclusion proof that verifies.
    let export = audit::export(&que.node.store, &nhs()).unwrap();
    assert_eq!(export.entries.len(), 5);
    let checkpoint = export.checkpoint.as_ref().unwrap();
    for e in &export.entries {
        let proof: Vec<[u8; 32]> = e
            .inclusion_proof
            .as_ref()
            .unwrap()
            .iter()
            .map(|h| hex::decode(h).unwrap().try_into().unwrap())
            .collect();
        let leaf: [u8; 32] = hex::decode(&e.leaf_hash).unwrap().try_into().unwrap();
        let root: [u8; 32] = hex::decode(&checkpoint.root).unwrap().try_into().unwrap();
        careweave_protocol::audit::verify_inclusion(&leaf, e.index, checkpoint.size, &proof, &root)
            .unwrap();
    }

    // Alter entry 2.
    let mut entry: AuditEntry = cbor::decode(
        &que.node.store.audit_entry(2).unwrap().unwrap(),
        Limits::MESSAGE,
    )
    .unwrap();
    entry.outcome = "no-records".into();
    que.node
        .store
        .tamper_audit_entry(2, &cbor::encode(&entry).unwrap())
        .unwrap();
    let failure = audit::verify(&que.node.store, &log_key).unwrap_err();
    assert_eq!(failure, audit::VerifyFailure::EntryAltered { index: 2 });
    assert!(failure.to_string().contains("entry 2"));
}

#[tokio::test]
async fn a_running_node_drops_expired_replay_entries() {
    let (coordinator, list) = network();
    let TestNode { node, dir: _dir } = open("QUE", &coordinator, &list);
    let node = std::sync::Arc::new(node);
    let qhg = OdsCode::parse("QHG").unwrap();
    // One long expired, one that expires long after this test.
    assert!(!node.store.seen_before(&qhg, &[1; 16], 1_000).unwrap());
    assert!(!node.store.seen_before(&qhg, &[2; 16], u64::MAX).unwrap());
    assert_eq!(node.store.replay_len(), 2);
    let purge = tokio::spawn(careweave_node::daemon::purge_replay_cache(
        std::sync::Arc::clone(&node),
        std::time::Duration::from_millis(10),
    ));
    let mut waited = 0;
    while node.store.replay_len() != 1 && waited < 500 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        waited += 1;
    }
    purge.abort();
    assert_eq!(
        node.store.replay_len(),
        1,
        "the expired entry is dropped, the live one kept"
    );
    assert!(node.store.seen_before(&qhg, &[2; 16], u64::MAX).unwrap());
}
