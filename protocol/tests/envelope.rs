//! Signed peer messages: sealing, opening, and each refusal in its order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::cell::Cell;

use careweave_protocol::cbor;
use careweave_protocol::cose::{Claims, ProtectedHeader, Sign1};
use careweave_protocol::envelope::{
    self, Opened, ProtocolId, Receive, Seal, SealError, VerifyError, message_aad,
};
use careweave_protocol::keys::KeyPair;
use careweave_protocol::message::{
    ErrorCode, ErrorMessage, LocateRequest, LocateResponse, Message, MessageKind, Purpose,
    RequesterContext, TrustRequest,
};
use careweave_protocol::trust::{self, AcceptedList, MemberStatus, Policy, Revocation};
use careweave_protocol::{NhsNumber, OdsCode};
use common::{DAY, Net, T0, key};

fn context() -> RequesterContext {
    RequesterContext {
        organisation: OdsCode::parse("QHG").unwrap(),
        user_id: "555021935107".into(),
        role_profile_id: "555021936108".into(),
        role_code: "R8000".into(),
        purpose: Purpose::Treat,
        relationship: "direct-care".into(),
        break_glass_reason: None,
        request_id: "60ef4f6e-1d35-4ec4-9b8e-7f5b1f2e9c1a".into(),
        correlation_id: Some("corr-1".into()),
    }
}

fn locate() -> LocateRequest {
    LocateRequest {
        nhs_number: NhsNumber::parse("9990000018").unwrap(),
        context: context(),
        sections: None,
    }
}

/// QHG (node 0) asks QUE (node 1).
fn seal_params<'a>(net: &'a Net, now: u64, cti: [u8; 16], key: &'a KeyPair) -> Seal<'a> {
    Seal {
        key,
        protocol: ProtocolId::Locate,
        sender_ods: &net.nodes[0].ods,
        receiver_ods: &net.nodes[1].ods,
        sender_peer: leak(net.nodes[0].peer()),
        receiver_peer: leak(net.nodes[1].peer()),
        trust_seq: 1,
        now,
        lifetime_secs: 60,
        cti,
        request_hash: None,
    }
}

fn leak<T>(v: T) -> &'static T {
    Box::leak(Box::new(v))
}

fn request(net: &Net) -> Vec<u8> {
    envelope::seal(
        &locate(),
        &seal_params(net, T0, [1; 16], &net.nodes[0].message),
    )
    .unwrap()
}

struct Receiver {
    list: AcceptedList,
    policy: Policy,
}

impl Receiver {
    fn new(net: &Net) -> Self {
        let (_, list) = net.accepted();
        Self {
            list,
            policy: Policy::default(),
        }
    }

    /// QUE (node 1) receives on a connection from `remote` (node index).
    fn open_from(
        &self,
        net: &Net,
        remote: usize,
        bytes: &[u8],
        now: u64,
    ) -> Result<Opened, VerifyError> {
        let ctx = Receive {
            trust: &self.list,
            policy: &self.policy,
            protocol: ProtocolId::Locate,
            local_ods: &net.nodes[1].ods,
            local_peer: &net.nodes[1].peer(),
            remote_peer: &net.nodes[remote].peer(),
            now,
            max_bytes: 64 * 1024,
        };
        envelope::open(bytes, &ctx, |_, _, _| false)
    }

    fn open(&self, net: &Net, bytes: &[u8]) -> Result<Opened, VerifyError> {
        self.open_from(net, 0, bytes, T0)
    }
}

#[test]
fn a_sealed_request_opens_with_its_facts() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let bytes = request(&net);
    let opened = rx.open(&net, &bytes).unwrap();
    assert_eq!(opened.message, Message::LocateRequest(locate()));
    assert_eq!(opened.sender, net.nodes[0].ods);
    assert_eq!(opened.kid, net.nodes[0].message.kid());
    assert_eq!(opened.iat, T0);
    assert_eq!(opened.exp, T0 + 60);
    assert_eq!(opened.cti, [1; 16]);
    assert_eq!(opened.sender_trust_seq, Some(1));
    assert_eq!(opened.request_hash, None);
    assert_eq!(opened.hash, envelope::message_hash(&bytes));
}

#[test]
fn a_response_carries_the_request_hash() {
    let net = Net::new();
    let (_, list) = net.accepted();
    let req = request(&net);
    let response = LocateResponse {
        custodian: net.nodes[1].ods.clone(),
        pointers: vec![],
        withheld: vec![],
        not_shared: vec![],
    };
    let params = Seal {
        key: &net.nodes[1].message,
        protocol: ProtocolId::Locate,
        sender_ods: &net.nodes[1].ods,
        receiver_ods: &net.nodes[0].ods,
        sender_peer: &net.nodes[1].peer(),
        receiver_peer: &net.nodes[0].peer(),
        trust_seq: 1,
        now: T0,
        lifetime_secs: 60,
        cti: [2; 16],
        request_hash: Some(envelope::message_hash(&req)),
    };
    let bytes = envelope::seal(&response, &params).unwrap();
    let policy = Policy::default();
    let ctx = Receive {
        trust: &list,
        policy: &policy,
        protocol: ProtocolId::Locate,
        local_ods: &net.nodes[0].ods,
        local_peer: &net.nodes[0].peer(),
        remote_peer: &net.nodes[1].peer(),
        now: T0 + 1,
        max_bytes: 64 * 1024,
    };
    let opened = envelope::open(&bytes, &ctx, |_, _, _| false).unwrap();
    assert_eq!(opened.request_hash, Some(envelope::message_hash(&req)));
    // A response without the hash cannot be sealed, nor a request with one.
    let no_hash = Seal {
        request_hash: None,
        ..params
    };
    assert_eq!(
        envelope::seal(&response, &no_hash).unwrap_err(),
        SealError::RequestHash
    );
}

#[test]
fn sealing_refuses_wrong_protocol_and_invalid_payloads() {
    let net = Net::new();
    let mut params = seal_params(&net, T0, [1; 16], &net.nodes[0].message);
    params.protocol = ProtocolId::Fetch;
    assert!(matches!(
        envelope::seal(&locate(), &params),
        Err(SealError::WrongProtocol { .. })
    ));
    let mut bad = locate();
    bad.context.purpose = Purpose::EmergencyTreat;
    let params = seal_params(&net, T0, [1; 16], &net.nodes[0].message);
    assert!(matches!(
        envelope::seal(&bad, &params),
        Err(SealError::Payload(_))
    ));
}

#[test]
fn refuses_oversized_messages_before_decoding() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let huge = vec![0u8; 64 * 1024 + 1];
    assert_eq!(
        rx.open(&net, &huge).unwrap_err(),
        VerifyError::TooLarge {
            len: 64 * 1024 + 1,
            max: 64 * 1024
        }
    );
}

#[test]
fn refuses_malformed_bytes() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let good = request(&net);
    for bad in [
        vec![],
        vec![0xff; 10],
        good[1..].to_vec(),
        good[..good.len() - 1].to_vec(),
        [good.as_slice(), &[0x00]].concat(),
        vec![0xd2, 0x80],
        vec![0xd2, 0x9f, 0xff],
    ] {
        assert!(
            matches!(rx.open(&net, &bad), Err(VerifyError::Malformed(_))),
            "{bad:02x?}"
        );
    }
}

/// Builds a Sign1 by hand, so tests can produce what `seal` never would.
fn hand_made(
    net: &Net,
    key: &KeyPair,
    kind: MessageKind,
    edit: impl FnOnce(&mut ProtectedHeader),
    payload: &[u8],
) -> Vec<u8> {
    let mut header = ProtectedHeader::new(key.kid(), kind.content_type());
    header.claims = Claims {
        iss: Some("QHG".into()),
        aud: Some("QUE".into()),
        iat: Some(T0),
        exp: Some(T0 + 60),
        cti: Some(vec![9; 16]),
        sub: None,
    };
    header.trust_seq = Some(1);
    edit(&mut header);
    let aad = message_aad(
        ProtocolId::Locate,
        &net.nodes[0].peer(),
        &net.nodes[1].peer(),
    );
    Sign1::sign(&header, payload, &aad, key).unwrap()
}

fn locate_payload() -> Vec<u8> {
    cbor::encode(&locate()).unwrap()
}

#[test]
fn refuses_other_algorithms() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let bytes = hand_made(
        &net,
        &net.nodes[0].message,
        MessageKind::LocateRequest,
        |h| h.alg = -7,
        &locate_payload(),
    );
    assert_eq!(
        rx.open(&net, &bytes).unwrap_err(),
        VerifyError::UnsupportedAlgorithm(-7)
    );
}

type HeaderEdit = Box<dyn FnOnce(&mut ProtectedHeader)>;

#[test]
fn refuses_missing_claims_and_wrong_content_types() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let k = &net.nodes[0].message;
    let p = locate_payload();
    let cases: Vec<HeaderEdit> = vec![
        Box::new(|h| h.claims.cti = None),
        Box::new(|h| h.claims.cti = Some(vec![1; 15])),
        Box::new(|h| h.claims.aud = None),
        Box::new(|h| h.claims.sub = Some("9990000018".into())),
        Box::new(|h| h.trust_seq = None),
        Box::new(|h| h.request_hash = Some([0; 32])),
        Box::new(|h| h.resource_type = Some("Condition".into())),
        Box::new(|h| h.claims.exp = Some(T0)),
        Box::new(|h| h.content_type = "application/json".into()),
        Box::new(|h| h.content_type = MessageKind::TrustRequest.content_type().into()),
    ];
    for edit in cases {
        let bytes = hand_made(&net, k, MessageKind::LocateRequest, edit, &p);
        assert!(
            matches!(rx.open(&net, &bytes), Err(VerifyError::Malformed(_))),
            "{:?}",
            rx.open(&net, &bytes)
        );
    }
}

#[test]
fn refuses_unknown_revoked_and_wrong_use_keys() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let p = locate_payload();
    let stranger = key("stranger");
    let bytes = hand_made(&net, &stranger, MessageKind::LocateRequest, |_| {}, &p);
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::UnknownKey(
            trust::KeyLookupError::UnknownKid { .. }
        ))
    ));
    let bytes = hand_made(
        &net,
        &net.nodes[0].record,
        MessageKind::LocateRequest,
        |_| {},
        &p,
    );
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::UnknownKey(
            trust::KeyLookupError::WrongUse { .. }
        ))
    ));

    // Revoked key and suspended member, on a list that says so.
    let root = net.accepted_root();
    let mut list = net.list(1, None);
    list.revoked.push(Revocation {
        kid: net.nodes[0].message.kid(),
        ods: net.nodes[0].ods.clone(),
        revoked_at: T0 - DAY,
        reason: "laptop lost".into(),
        compromised_since: Some(T0 - 2 * DAY),
    });
    list.members[2].status = MemberStatus::Suspended;
    let revoked_rx = Receiver {
        list: trust::accept_list(&root, None, &net.sign_list(&list, &[0, 1]), T0).unwrap(),
        policy: Policy::default(),
    };
    assert!(matches!(
        revoked_rx.open(&net, &request(&net)),
        Err(VerifyError::UnknownKey(
            trust::KeyLookupError::Revoked { .. }
        ))
    ));
    let mut from_suspended = seal_params(&net, T0, [3; 16], &net.nodes[2].message);
    from_suspended.sender_ods = &net.nodes[2].ods;
    from_suspended.sender_peer = leak(net.nodes[2].peer());
    let bytes = envelope::seal(&locate(), &from_suspended).unwrap();
    assert!(matches!(
        revoked_rx.open_from(&net, 2, &bytes, T0),
        Err(VerifyError::UnknownKey(
            trust::KeyLookupError::MemberNotActive { .. }
        ))
    ));
}

#[test]
fn refuses_a_signer_that_does_not_own_the_connection() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    // QHG's message, arriving on QM7's connection.
    let err = rx.open_from(&net, 2, &request(&net), T0).unwrap_err();
    assert!(matches!(err, VerifyError::WrongSigner { .. }), "{err}");
    // QHG's key, but claiming to be QM7.
    let bytes = hand_made(
        &net,
        &net.nodes[0].message,
        MessageKind::LocateRequest,
        |h| h.claims.iss = Some("QM7".into()),
        &locate_payload(),
    );
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::WrongSigner { .. })
    ));
}

#[test]
fn refuses_messages_bound_to_another_protocol_or_connection() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    // Signed for QHG -> QM7, replayed to QUE on a QHG connection.
    let mut params = seal_params(&net, T0, [1; 16], &net.nodes[0].message);
    params.receiver_peer = leak(net.nodes[2].peer());
    let bytes = envelope::seal(&locate(), &params).unwrap();
    assert_eq!(
        rx.open(&net, &bytes).unwrap_err(),
        VerifyError::BadSignature
    );
    // An error message signed for the trust protocol, presented on locate.
    let mut params = seal_params(&net, T0, [1; 16], &net.nodes[0].message);
    params.protocol = ProtocolId::Trust;
    params.request_hash = Some([0; 32]);
    let err = ErrorMessage {
        code: ErrorCode::Busy,
        message: "busy".into(),
        retry_after_ms: Some(100),
    };
    let bytes = envelope::seal(&err, &params).unwrap();
    assert_eq!(
        rx.open(&net, &bytes).unwrap_err(),
        VerifyError::BadSignature
    );
}

#[test]
fn refuses_wrong_audience() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let mut params = seal_params(&net, T0, [1; 16], &net.nodes[0].message);
    params.receiver_ods = &net.nodes[2].ods;
    let bytes = envelope::seal(&locate(), &params).unwrap();
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::WrongAudience { .. })
    ));
}

#[test]
fn refuses_by_time_with_distinct_reasons() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let k = &net.nodes[0].message;
    let mut long = seal_params(&net, T0, [1; 16], k);
    long.lifetime_secs = 301;
    let bytes = envelope::seal(&locate(), &long).unwrap();
    assert_eq!(
        rx.open(&net, &bytes).unwrap_err(),
        VerifyError::LifetimeTooLong {
            secs: 301,
            max: 300
        }
    );
    // Sender's clock 10 minutes ahead.
    let bytes = envelope::seal(&locate(), &seal_params(&net, T0 + 600, [1; 16], k)).unwrap();
    let err = rx.open(&net, &bytes).unwrap_err();
    assert_eq!(
        err,
        VerifyError::FromFuture {
            ahead: 600,
            skew: 300
        }
    );
    assert!(err.to_string().contains("clock"));
    // Sender's clock 10 minutes behind (the message is also expired; too old is reported first).
    let bytes = envelope::seal(&locate(), &seal_params(&net, T0 - 600, [1; 16], k)).unwrap();
    assert_eq!(
        rx.open(&net, &bytes).unwrap_err(),
        VerifyError::TooOld {
            behind: 600,
            skew: 300
        }
    );
    // Issued within skew but past its expiry.
    let bytes = envelope::seal(&locate(), &seal_params(&net, T0 - 100, [1; 16], k)).unwrap();
    assert_eq!(
        rx.open(&net, &bytes).unwrap_err(),
        VerifyError::Expired { ago: 40 }
    );
    // Within skew in both directions is fine.
    for now in [T0 - 299, T0 + 59] {
        rx.open_from(&net, 0, &request(&net), now).unwrap();
    }
}

#[test]
fn refuses_replays_and_asks_only_after_every_other_check() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let (_, list) = net.accepted();
    let policy = Policy::default();
    let asked = Cell::new(0);
    let ctx = Receive {
        trust: &list,
        policy: &policy,
        protocol: ProtocolId::Locate,
        local_ods: &net.nodes[1].ods,
        local_peer: &net.nodes[1].peer(),
        remote_peer: &net.nodes[0].peer(),
        now: T0,
        max_bytes: 64 * 1024,
    };
    let bytes = request(&net);
    let err = envelope::open(&bytes, &ctx, |iss, cti, exp| {
        asked.set(asked.get() + 1);
        assert_eq!(iss.as_str(), "QHG");
        assert_eq!(cti, &[1; 16]);
        assert_eq!(exp, T0 + 60);
        true
    })
    .unwrap_err();
    assert_eq!(
        err,
        VerifyError::Replayed {
            iss: net.nodes[0].ods.clone()
        }
    );
    assert_eq!(asked.get(), 1);
    // A message with a bad signature never reaches the replay cache.
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let _ = envelope::open(&tampered, &ctx, |_, _, _| {
        asked.set(asked.get() + 1);
        false
    });
    assert_eq!(asked.get(), 1);
    drop(rx);
}

#[test]
fn checks_run_in_order() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    // Unknown key and expired and wrong audience: the key is reported.
    let stranger = key("stranger");
    let bytes = hand_made(
        &net,
        &stranger,
        MessageKind::LocateRequest,
        |h| {
            h.claims.aud = Some("QM7".into());
            h.claims.iat = Some(T0 - 1000);
            h.claims.exp = Some(T0 - 900);
        },
        &locate_payload(),
    );
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::UnknownKey(_))
    ));
    // Bad signature and expired: the signature is reported.
    let mut params = seal_params(&net, T0 - 1000, [1; 16], &net.nodes[0].message);
    params.receiver_peer = leak(net.nodes[2].peer());
    let bytes = envelope::seal(&locate(), &params).unwrap();
    assert_eq!(
        rx.open(&net, &bytes).unwrap_err(),
        VerifyError::BadSignature
    );
    // Wrong audience and expired: the audience is reported.
    let mut params = seal_params(&net, T0 - 1000, [1; 16], &net.nodes[0].message);
    params.receiver_ods = &net.nodes[2].ods;
    let bytes = envelope::seal(&locate(), &params).unwrap();
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::WrongAudience { .. })
    ));
}

#[test]
fn refuses_bad_payloads_after_authentication() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let mut bad = locate();
    bad.context.purpose = Purpose::EmergencyTreat;
    let bytes = hand_made(
        &net,
        &net.nodes[0].message,
        MessageKind::LocateRequest,
        |_| {},
        &cbor::encode(&bad).unwrap(),
    );
    let err = rx.open(&net, &bytes).unwrap_err();
    assert!(matches!(err, VerifyError::BadPayload(_)), "{err}");
    assert!(err.to_string().contains("break-glass"));
    // A payload of the wrong kind for the content type.
    let bytes = hand_made(
        &net,
        &net.nodes[0].message,
        MessageKind::LocateRequest,
        |_| {},
        &cbor::encode(&TrustRequest {
            root_version: 1,
            list_seq: 1,
        })
        .unwrap(),
    );
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::BadPayload(_))
    ));
    // An NHS number with a wrong check digit inside a signed request.
    let text = cbor::encode(&locate()).unwrap();
    let pos = text.windows(10).position(|w| w == b"9990000018").unwrap();
    let mut wrong = text.clone();
    wrong[pos + 9] = b'9';
    let bytes = hand_made(
        &net,
        &net.nodes[0].message,
        MessageKind::LocateRequest,
        |_| {},
        &wrong,
    );
    assert!(matches!(
        rx.open(&net, &bytes),
        Err(VerifyError::BadPayload(_))
    ));
}

#[test]
fn every_single_bit_flip_is_refused() {
    let net = Net::new();
    let rx = Receiver::new(&net);
    let bytes = request(&net);
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            rx.open(&net, &flipped).is_err(),
            "bit {bit} flipped was accepted"
        );
    }
}

#[test]
fn reasons_are_stable_labels() {
    let labels = [
        VerifyError::TooLarge { len: 1, max: 0 }.reason(),
        VerifyError::BadSignature.reason(),
        VerifyError::Replayed {
            iss: OdsCode::parse("QHG").unwrap(),
        }
        .reason(),
    ];
    assert_eq!(labels, ["too-large", "bad-signature", "replayed"]);
}

mod properties {
    use super::*;
    use careweave_protocol::message::Section;
    use proptest::prelude::*;

    fn section() -> impl Strategy<Value = Section> {
        prop_oneof![
            Just(Section::Allergies),
            Just(Section::Medications),
            Just(Section::Problems),
            Just(Section::Procedures),
            Just(Section::Investigations),
            Just(Section::Vaccinations),
            Just(Section::Alerts),
            Just(Section::CarePlans),
            Just(Section::Documents),
            Just(Section::Encounters),
        ]
    }

    fn locate_request() -> impl Strategy<Value = LocateRequest> {
        (
            999_000_000u32..=999_999_999,
            "[A-Za-z0-9 ]{1,40}",
            "[A-Z0-9]{5}",
            any::<bool>(),
            "[a-z ]{1,80}",
            proptest::option::of(proptest::collection::vec(section(), 1..8)),
            any::<[u8; 16]>(),
        )
            .prop_filter_map(
                "stem without a check digit",
                |(stem, user, role, emergency, reason, sections, uuid)| {
                    let nhs_number = NhsNumber::from_stem(stem)?;
                    if user.trim().is_empty() || reason.trim().is_empty() {
                        return None;
                    }
                    let h = hex::encode(uuid);
                    let mut context = context();
                    context.user_id = user;
                    context.role_code = role;
                    context.request_id = format!(
                        "{}-{}-{}-{}-{}",
                        &h[..8],
                        &h[8..12],
                        &h[12..16],
                        &h[16..20],
                        &h[20..]
                    );
                    if emergency {
                        context.purpose = Purpose::EmergencyTreat;
                        context.break_glass_reason = Some(reason);
                    }
                    Some(LocateRequest {
                        nhs_number,
                        context,
                        sections,
                    })
                },
            )
    }

    proptest! {
        /// Seal then open gives back exactly the payload that was sealed.
        #[test]
        fn seal_then_open_is_identity(request in locate_request(), cti in any::<[u8; 16]>()) {
            let net = Net::new();
            let rx = Receiver::new(&net);
            let bytes = envelope::seal(&request, &seal_params(&net, T0, cti, &net.nodes[0].message)).unwrap();
            let opened = rx.open(&net, &bytes).unwrap();
            prop_assert_eq!(opened.message, Message::LocateRequest(request));
            prop_assert_eq!(opened.cti, cti);
        }

        /// Arbitrary bytes never panic the opener and are never accepted.
        #[test]
        fn arbitrary_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let net = Net::new();
            let rx = Receiver::new(&net);
            prop_assert!(rx.open(&net, &bytes).is_err());
        }
    }
}
