//! Test vectors for independent implementations, under `tests/vectors/`.
//!
//! Each `.cbor` file holds the exact bytes of one signed object; the `.json`
//! beside it gives the public key(s) in hex, the `external_aad` in hex and
//! the decoded fields. This test regenerates every vector from fixed keys,
//! times and random bytes, and fails if a byte changes. To regenerate after
//! a deliberate format change:
//!
//! ```sh
//! CAREWEAVE_UPDATE_VECTORS=1 cargo test -p careweave-protocol --test vectors
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::path::PathBuf;

use careweave_protocol::audit::{self, Checkpoint};
use careweave_protocol::cbor::{self, Limits, Value};
use careweave_protocol::cose::{Sign, Sign1};
use careweave_protocol::envelope::{self, ProtocolId, Seal, message_aad};
use careweave_protocol::keys::KeyPair;
use careweave_protocol::message::{
    Coding, ErrorCode, ErrorMessage, FetchRequest, FetchResponse, LocateRequest, LocateResponse,
    Payload, Pointer, Purpose, RequesterContext, Section, TrustRequest, TrustResponse,
    WithheldReason,
};
use careweave_protocol::record::{self, RecordLabel};
use careweave_protocol::{NhsNumber, OdsCode};
use common::{DAY, Net, T0};
use serde_json::{Map, Value as Json, json};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// CBOR to JSON for humans: byte strings as `h'<hex>'`, map keys as text.
fn to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Integer(i) => i64::try_from(*i).map_or_else(|_| json!(i.to_string()), |v| json!(v)),
        Value::Bytes(b) => json!(format!("h'{}'", hex::encode(b))),
        Value::Text(t) => json!(t),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    Value::Text(t) => t.clone(),
                    Value::Integer(i) => i.to_string(),
                    other => format!("{other:?}"),
                };
                out.insert(key, to_json(v));
            }
            Json::Object(out)
        }
        other => json!(format!("{other:?}")),
    }
}

fn decoded(bytes: &[u8]) -> Json {
    to_json(&cbor::decode_value(bytes, Limits::MESSAGE).unwrap())
}

fn key_json(pair: &KeyPair, key_use: &str) -> Json {
    json!({
        "kid": hex::encode(pair.kid().as_bytes()),
        "public_key": hex::encode(pair.public_key().as_bytes()),
        "use": key_use,
    })
}

struct Vector {
    name: &'static str,
    bytes: Vec<u8>,
    json: Json,
}

fn sign1_vector(
    name: &'static str,
    description: &str,
    bytes: Vec<u8>,
    aad: &[u8],
    signer: Json,
) -> Vector {
    let s = Sign1::decode(&bytes, Limits::MESSAGE.max_bytes).unwrap();
    Vector {
        name,
        json: json!({
            "name": name,
            "description": description,
            "structure": "COSE_Sign1",
            "tag": 18,
            "external_aad": hex::encode(aad),
            "signer": signer,
            "protected": decoded(&s.protected_bytes),
            "payload": if s.header.content_type == record::RECORD_CONTENT_TYPE {
                serde_json::from_slice(&s.payload).unwrap()
            } else {
                decoded(&s.payload)
            },
        }),
        bytes,
    }
}

fn sign_vector(
    name: &'static str,
    description: &str,
    bytes: Vec<u8>,
    signers: Vec<Json>,
    threshold: u32,
) -> Vector {
    let s = Sign::decode(&bytes, Limits::TRUST.max_bytes).unwrap();
    Vector {
        name,
        json: json!({
            "name": name,
            "description": description,
            "structure": "COSE_Sign",
            "tag": 98,
            "external_aad": "",
            "signers": signers,
            "threshold": threshold,
            "protected": decoded(&s.protected_bytes),
            "signer_protected": s.signers.iter().map(|x| decoded(&x.protected_bytes)).collect::<Vec<_>>(),
            "payload": decoded(&s.payload),
        }),
        bytes,
    }
}

fn context(purpose: Purpose) -> RequesterContext {
    RequesterContext {
        organisation: OdsCode::parse("QHG").unwrap(),
        user_id: "555021935107".into(),
        role_profile_id: "555021936108".into(),
        role_code: "R8000".into(),
        purpose,
        relationship: "direct-care".into(),
        break_glass_reason: (purpose == Purpose::EmergencyTreat)
            .then(|| "Patient unconscious in emergency department".into()),
        request_id: "60ef4f6e-1d35-4ec4-9b8e-7f5b1f2e9c1a".into(),
        correlation_id: Some("11c7a1d6-8e0f-4a55-b7c1-2f0a3b9d5e10".into()),
    }
}

fn all_vectors() -> Vec<Vector> {
    let net = Net::new();
    let (qhg, que) = (&net.nodes[0], &net.nodes[1]);
    let nhs = NhsNumber::parse("9990000018").unwrap();
    let mut out = Vec::new();

    // Messages: QHG asks, QUE answers.
    let message = |protocol: ProtocolId,
                   from: usize,
                   cti: u8,
                   request_hash: Option<[u8; 32]>|
     -> (Seal<'_>, Vec<u8>) {
        let (sender, receiver) = if from == 0 { (qhg, que) } else { (que, qhg) };
        let sender_peer = Box::leak(Box::new(sender.peer()));
        let receiver_peer = Box::leak(Box::new(receiver.peer()));
        let aad = message_aad(protocol, sender_peer, receiver_peer);
        (
            Seal {
                key: &sender.message,
                protocol,
                sender_ods: &sender.ods,
                receiver_ods: &receiver.ods,
                sender_peer,
                receiver_peer,
                trust_seq: 1,
                now: T0,
                lifetime_secs: 120,
                cti: [cti; 16],
                request_hash,
            },
            aad,
        )
    };
    fn push<P: Payload>(
        out: &mut Vec<Vector>,
        name: &'static str,
        description: &str,
        payload: &P,
        (seal, aad): (Seal<'_>, Vec<u8>),
    ) -> Vec<u8> {
        let bytes = envelope::seal(payload, &seal).unwrap();
        out.push(sign1_vector(
            name,
            description,
            bytes.clone(),
            &aad,
            json!({
                "kid": hex::encode(seal.key.kid().as_bytes()),
                "public_key": hex::encode(seal.key.public_key().as_bytes()),
                "use": "message",
                "ods": seal.sender_ods.as_str(),
                "peer_id": seal.sender_peer.to_base58(),
                "receiver_peer_id": seal.receiver_peer.to_base58(),
            }),
        ));
        bytes
    }

    let locate = LocateRequest {
        nhs_number: nhs,
        context: context(Purpose::Treat),
        sections: None,
    };
    let req = push(
        &mut out,
        "locate-request",
        "QHG asks QUE which records it holds for 999 000 0018.",
        &locate,
        message(ProtocolId::Locate, 0, 0x11, None),
    );
    let pointer = Pointer {
        id: "QUE-7f3a9c".into(),
        custodian: que.ods.clone(),
        section: Section::Allergies,
        type_code: Coding {
            system: "http://snomed.info/sct".into(),
            code: "722446000".into(),
            display: "Allergy record".into(),
        },
        category: Coding {
            system: "http://snomed.info/sct".into(),
            code: "716931000000107".into(),
            display: "Allergies and adverse reactions".into(),
        },
        count: 2,
        date_from: Some("2024-03-01".into()),
        date_to: Some("2026-10-12".into()),
    };
    push(
        &mut out,
        "locate-response",
        "QUE answers with one pointer, says it withheld records in a sensitive category, and that it does not share care plans with QHG.",
        &LocateResponse {
            custodian: que.ods.clone(),
            pointers: vec![pointer],
            withheld: vec![WithheldReason::SensitiveCategory],
            not_shared: vec![Section::CarePlans],
        },
        message(
            ProtocolId::Locate,
            1,
            0x12,
            Some(envelope::message_hash(&req)),
        ),
    );

    let json_record = br#"{"resourceType":"AllergyIntolerance","id":"al-1","meta":{"versionId":"2"},"code":{"text":"Penicillin"},"patient":{"identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000018"}}}"#;
    let record_bytes = record::sign_record(
        json_record,
        &RecordLabel {
            custodian: que.ods.clone(),
            nhs_number: nhs,
            signed_at: T0 - 30 * DAY,
            resource_type: "AllergyIntolerance".into(),
            resource_id: "al-1".into(),
            version: "2".into(),
        },
        &que.record,
    )
    .unwrap();
    out.push(sign1_vector(
        "record",
        "A FHIR AllergyIntolerance signed by its custodian QUE at ingest.",
        record_bytes.clone(),
        b"",
        json!({
            "kid": hex::encode(que.record.kid().as_bytes()),
            "public_key": hex::encode(que.record.public_key().as_bytes()),
            "use": "record",
            "ods": "QUE",
        }),
    ));

    let fetch = FetchRequest {
        nhs_number: nhs,
        pointer_id: "QUE-7f3a9c".into(),
        context: context(Purpose::EmergencyTreat),
    };
    let fetch_req = push(
        &mut out,
        "fetch-request",
        "QHG fetches the pointer's records under emergency access, with a reason.",
        &fetch,
        message(ProtocolId::Fetch, 0, 0x21, None),
    );
    push(
        &mut out,
        "fetch-response",
        "QUE returns the custodian-signed record unchanged.",
        &FetchResponse {
            custodian: que.ods.clone(),
            records: vec![serde_bytes::ByteBuf::from(record_bytes)],
            withheld: vec![],
            not_shared: vec![],
        },
        message(
            ProtocolId::Fetch,
            1,
            0x22,
            Some(envelope::message_hash(&fetch_req)),
        ),
    );

    let trust_req = push(
        &mut out,
        "trust-request",
        "QHG holds root 1 and list 1 and asks for anything newer.",
        &TrustRequest {
            root_version: 1,
            list_seq: 1,
        },
        message(ProtocolId::Trust, 0, 0x31, None),
    );
    let root_bytes = net.root_bytes();
    let list_bytes = net.sign_list(&net.list(1, None), &[0, 1]);
    push(
        &mut out,
        "trust-response",
        "QUE has nothing newer: no roots, and its list (the same seq 1).",
        &TrustResponse {
            roots: vec![],
            list: Some(serde_bytes::ByteBuf::from(list_bytes.clone())),
        },
        message(
            ProtocolId::Trust,
            1,
            0x32,
            Some(envelope::message_hash(&trust_req)),
        ),
    );
    push(
        &mut out,
        "error",
        "QUE refuses a locate because QHG is over its rate.",
        &ErrorMessage {
            code: ErrorCode::Busy,
            message: "over the request rate for your node; retry later".into(),
            retry_after_ms: Some(500),
        },
        message(
            ProtocolId::Locate,
            1,
            0x41,
            Some(envelope::message_hash(&req)),
        ),
    );

    out.push(sign_vector(
        "trust-root",
        "Root version 1: three root keys (threshold 2), three list keys (threshold 2), signed by all three root keys.",
        root_bytes,
        net.root_keys
            .iter()
            .map(|k| key_json(k, "root"))
            .collect(),
        2,
    ));
    out.push(sign_vector(
        "trust-list",
        "Trust list seq 1 with three ICBs, signed by two of the three list keys.",
        list_bytes,
        net.list_keys.iter().map(|k| key_json(k, "list")).collect(),
        2,
    ));

    let leaves: Vec<_> = (0u8..5).map(|i| audit::leaf_hash(&[i])).collect();
    let checkpoint = audit::sign_checkpoint(
        &Checkpoint {
            origin: "careweave/careweave-test/QUE/audit".into(),
            size: 5,
            root: audit::root(&leaves),
        },
        &que.ods,
        T0,
        &que.log,
    )
    .unwrap();
    out.push(sign1_vector(
        "checkpoint",
        "QUE's audit log checkpoint over five entries (leaves 0x00..0x04), signed by its log key.",
        checkpoint,
        b"",
        json!({
            "kid": hex::encode(que.log.kid().as_bytes()),
            "public_key": hex::encode(que.log.public_key().as_bytes()),
            "use": "log",
            "ods": "QUE",
        }),
    ));
    out
}

#[test]
fn vectors_are_unchanged() {
    let update = std::env::var_os("CAREWEAVE_UPDATE_VECTORS").is_some();
    let mut changed = Vec::new();
    for v in all_vectors() {
        let cbor_path = dir().join(format!("{}.cbor", v.name));
        let json_path = dir().join(format!("{}.json", v.name));
        let json_text = format!("{}\n", serde_json::to_string_pretty(&v.json).unwrap());
        if update {
            std::fs::create_dir_all(dir()).unwrap();
            std::fs::write(&cbor_path, &v.bytes).unwrap();
            std::fs::write(&json_path, &json_text).unwrap();
            continue;
        }
        let on_disk = std::fs::read(&cbor_path).unwrap_or_default();
        let json_on_disk = std::fs::read_to_string(&json_path).unwrap_or_default();
        if on_disk != v.bytes || json_on_disk != json_text {
            changed.push(v.name);
        }
    }
    assert!(
        changed.is_empty(),
        "test vectors changed: {changed:?}; if the format change is deliberate, \
         regenerate with CAREWEAVE_UPDATE_VECTORS=1 and say why in the commit"
    );
}
