//! Interoperability with an independent COSE implementation (coset, on
//! ciborium): it verifies our vectors from the files alone, and we verify
//! COSE objects it builds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::path::PathBuf;

use careweave_protocol::envelope::{self, ProtocolId, Receive, message_aad};
use careweave_protocol::message::{Message, TrustRequest};
use careweave_protocol::trust::{self, LIST_CONTENT_TYPE, Policy};
use common::{Net, T0};
use coset::cbor::value::Value as CborValue;
use coset::{
    CborSerializable, CoseSign, CoseSign1, CoseSign1Builder, CoseSignBuilder, CoseSignatureBuilder,
    HeaderBuilder, TaggedCborSerializable, iana,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::Value as Json;

fn vectors() -> Vec<(String, Vec<u8>, Json)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cbor") {
            let json: Json = serde_json::from_str(
                &std::fs::read_to_string(path.with_extension("json")).unwrap(),
            )
            .unwrap();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            out.push((name, std::fs::read(&path).unwrap(), json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 11, "every vector kind is present");
    out
}

fn verifying_key(hex_key: &Json) -> VerifyingKey {
    let raw: [u8; 32] = hex::decode(hex_key.as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    VerifyingKey::from_bytes(&raw).unwrap()
}

fn verify(key: &VerifyingKey, sig: &[u8], data: &[u8]) -> Result<(), String> {
    let sig = Signature::from_slice(sig).map_err(|e| e.to_string())?;
    key.verify_strict(data, &sig).map_err(|e| e.to_string())
}

#[test]
fn coset_verifies_every_vector_from_the_files() {
    for (name, bytes, json) in vectors() {
        match json["structure"].as_str().unwrap() {
            "COSE_Sign1" => {
                let msg = CoseSign1::from_tagged_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{name}: coset cannot parse: {e:?}"));
                let aad = hex::decode(json["external_aad"].as_str().unwrap()).unwrap();
                let key = verifying_key(&json["signer"]["public_key"]);
                msg.verify_signature(&aad, |sig, data| verify(&key, sig, data))
                    .unwrap_or_else(|e| panic!("{name}: signature: {e}"));
                assert!(
                    msg.verify_signature(b"wrong aad", |sig, data| verify(&key, sig, data))
                        .is_err()
                );
                let header = &msg.protected.header;
                assert_eq!(
                    header.alg,
                    Some(coset::RegisteredLabelWithPrivate::Assigned(
                        iana::Algorithm::EdDSA
                    )),
                    "{name}"
                );
                assert_eq!(
                    hex::encode(&header.key_id),
                    json["signer"]["kid"].as_str().unwrap()
                );
                assert!(msg.unprotected.is_empty(), "{name}");
                let claims = header
                    .rest
                    .iter()
                    .find(|(l, _)| *l == coset::Label::Int(15))
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| panic!("{name}: no CWT claims"));
                let CborValue::Map(claims) = claims else {
                    panic!("{name}: claims are not a map")
                };
                let iss = claims
                    .iter()
                    .find(|(k, _)| *k == CborValue::Integer(1.into()))
                    .and_then(|(_, v)| v.as_text())
                    .unwrap();
                assert_eq!(iss, json["signer"]["ods"].as_str().unwrap(), "{name}");
            }
            "COSE_Sign" => {
                let doc = CoseSign::from_tagged_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{name}: coset cannot parse: {e:?}"));
                let signers = json["signers"].as_array().unwrap();
                let mut valid = 0;
                for (i, sig) in doc.signatures.iter().enumerate() {
                    let kid = hex::encode(&sig.protected.header.key_id);
                    let signer = signers
                        .iter()
                        .find(|s| s["kid"].as_str() == Some(kid.as_str()))
                        .unwrap_or_else(|| panic!("{name}: unknown signer {kid}"));
                    let key = verifying_key(&signer["public_key"]);
                    doc.verify_signature(i, b"", |s, d| verify(&key, s, d))
                        .unwrap_or_else(|e| panic!("{name}: signature {i}: {e}"));
                    valid += 1;
                }
                assert!(valid >= json["threshold"].as_u64().unwrap() as usize);
            }
            other => panic!("{name}: unknown structure {other}"),
        }
    }
}

fn signing_key(pair: &careweave_protocol::KeyPair) -> SigningKey {
    SigningKey::from_bytes(&pair.secret_bytes())
}

#[test]
fn we_verify_a_message_built_by_coset() {
    let net = Net::new();
    let (_, list) = net.accepted();
    let (qhg, que) = (&net.nodes[0], &net.nodes[1]);
    let payload = careweave_protocol::cbor::encode(&TrustRequest {
        root_version: 1,
        list_seq: 1,
    })
    .unwrap();
    let claims = CborValue::Map(vec![
        (CborValue::Integer(1.into()), CborValue::Text("QHG".into())),
        (CborValue::Integer(3.into()), CborValue::Text("QUE".into())),
        (
            CborValue::Integer(4.into()),
            CborValue::Integer((T0 + 60).into()),
        ),
        (CborValue::Integer(6.into()), CborValue::Integer(T0.into())),
        (
            CborValue::Integer(7.into()),
            CborValue::Bytes(vec![0x5a; 16]),
        ),
    ]);
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::EdDSA)
        .key_id(qhg.message.kid().as_bytes().to_vec())
        .content_type("application/careweave-trust-request+cbor".into())
        .value(15, claims)
        .value(-65537, CborValue::Integer(1.into()))
        .build();
    let aad = message_aad(ProtocolId::Trust, &qhg.peer(), &que.peer());
    let sk = signing_key(&qhg.message);
    let msg = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .create_signature(&aad, |data| sk.sign(data).to_bytes().to_vec())
        .build();
    let bytes = msg.to_tagged_vec().unwrap();

    let policy = Policy::default();
    let ctx = Receive {
        trust: &list,
        policy: &policy,
        protocol: ProtocolId::Trust,
        local_ods: &que.ods,
        local_peer: &que.peer(),
        remote_peer: &qhg.peer(),
        now: T0,
        max_bytes: 64 * 1024,
    };
    let opened = envelope::open(&bytes, &ctx, |_, _, _| false).unwrap();
    assert_eq!(
        opened.message,
        Message::TrustRequest(TrustRequest {
            root_version: 1,
            list_seq: 1
        })
    );
    assert_eq!(opened.cti, [0x5a; 16]);
}

#[test]
fn we_accept_a_trust_list_co_signed_with_coset() {
    let net = Net::new();
    let root = net.accepted_root();
    let payload = careweave_protocol::cbor::encode(&net.list(1, None)).unwrap();
    let mut builder = CoseSignBuilder::new()
        .protected(
            HeaderBuilder::new()
                .content_type(LIST_CONTENT_TYPE.into())
                .build(),
        )
        .payload(payload);
    for pair in &net.list_keys[1..] {
        let sk = signing_key(pair);
        builder = builder.add_created_signature(
            CoseSignatureBuilder::new()
                .protected(
                    HeaderBuilder::new()
                        .algorithm(iana::Algorithm::EdDSA)
                        .key_id(pair.kid().as_bytes().to_vec())
                        .build(),
                )
                .build(),
            b"",
            |data| sk.sign(data).to_bytes().to_vec(),
        );
    }
    let bytes = builder.build().to_tagged_vec().unwrap();
    let accepted = trust::accept_list(&root, None, &bytes, T0).unwrap();
    assert_eq!(accepted.list().members.len(), 3);

    // And coset reads what we co-signed, including the untagged form's parts.
    let ours = net.sign_list(&net.list(1, None), &[0, 2]);
    let parsed = CoseSign::from_tagged_slice(&ours).unwrap();
    assert_eq!(parsed.signatures.len(), 2);
    assert!(CoseSign::from_slice(&ours[2..]).is_ok());
}
