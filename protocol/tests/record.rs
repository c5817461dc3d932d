//! Custodian-signed records.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use careweave_protocol::record::{self, RecordError, RecordLabel};
use careweave_protocol::trust::{self, KeyLookupError, Revocation};
use careweave_protocol::{NhsNumber, OdsCode};
use common::{DAY, Net, Node, T0};

const JSON: &[u8] = br#"{"resourceType":"AllergyIntolerance","id":"al-1","meta":{"versionId":"2"},"patient":{"identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000018"}}}"#;

fn label(custodian: &str) -> RecordLabel {
    RecordLabel {
        custodian: OdsCode::parse(custodian).unwrap(),
        nhs_number: NhsNumber::parse("9990000018").unwrap(),
        signed_at: T0 - DAY,
        resource_type: "AllergyIntolerance".into(),
        resource_id: "al-1".into(),
        version: "2".into(),
    }
}

#[test]
fn a_signed_record_verifies_and_travels_unchanged() {
    let net = Net::new();
    let (_, list) = net.accepted();
    let bytes = record::sign_record(JSON, &label("QHG"), &net.nodes[0].record).unwrap();
    let verified = record::verify_record(&bytes, &list).unwrap();
    assert_eq!(verified.json, JSON);
    assert_eq!(verified.label, label("QHG"));
    assert_eq!(verified.kid, net.nodes[0].record.kid());
}

#[test]
fn the_label_must_match_the_resource() {
    let net = Net::new();
    let k = &net.nodes[0].record;
    for edit in [
        |l: &mut RecordLabel| l.resource_type = "Condition".into(),
        |l: &mut RecordLabel| l.resource_id = "al-2".into(),
        |l: &mut RecordLabel| l.version = "3".into(),
    ] {
        let mut l = label("QHG");
        edit(&mut l);
        assert!(matches!(
            record::sign_record(JSON, &l, k),
            Err(RecordError::ContentMismatch(_))
        ));
    }
    assert!(record::sign_record(b"not json", &label("QHG"), k).is_err());
}

#[test]
fn only_the_custodians_record_key_counts() {
    let net = Net::new();
    let (_, list) = net.accepted();
    // QUE's record key signing a record that claims QHG as custodian.
    let bytes = record::sign_record(JSON, &label("QHG"), &net.nodes[1].record).unwrap();
    assert!(matches!(
        record::verify_record(&bytes, &list),
        Err(RecordError::WrongCustodian { .. })
    ));
    // QHG's message key is not a record key.
    let bytes = record::sign_record(JSON, &label("QHG"), &net.nodes[0].message).unwrap();
    assert!(matches!(
        record::verify_record(&bytes, &list),
        Err(RecordError::Key(KeyLookupError::WrongUse { .. }))
    ));
}

#[test]
fn records_of_a_predecessor_verify_under_its_successor() {
    let net = Net::new();
    let root = net.accepted_root();
    let successor = Node::new("S1Y5D", "NHS Central East ICB");
    let mut member = successor.member();
    member.predecessors = vec![OdsCode::parse("QHG").unwrap()];
    let mut list = net.list(1, None);
    list.members.remove(0);
    list.members.push(member);
    let accepted = trust::accept_list(&root, None, &net.sign_list(&list, &[0, 1]), T0).unwrap();
    let bytes = record::sign_record(JSON, &label("QHG"), &successor.record).unwrap();
    let verified = record::verify_record(&bytes, &accepted).unwrap();
    assert_eq!(verified.label.custodian.as_str(), "QHG");
}

#[test]
fn revoked_record_keys() {
    let net = Net::new();
    let root = net.accepted_root();
    let mut list = net.list(1, None);
    list.revoked.push(Revocation {
        kid: net.nodes[0].record.kid(),
        ods: net.nodes[0].ods.clone(),
        revoked_at: T0 - 2 * DAY,
        reason: "rotated".into(),
        compromised_since: None,
    });
    let accepted = trust::accept_list(&root, None, &net.sign_list(&list, &[0, 1]), T0).unwrap();
    let mut old = label("QHG");
    old.signed_at = T0 - 3 * DAY;
    let bytes = record::sign_record(JSON, &old, &net.nodes[0].record).unwrap();
    record::verify_record(&bytes, &accepted).unwrap();
    let bytes = record::sign_record(JSON, &label("QHG"), &net.nodes[0].record).unwrap();
    assert!(matches!(
        record::verify_record(&bytes, &accepted),
        Err(RecordError::Key(KeyLookupError::Revoked { .. }))
    ));
}

#[test]
fn every_single_bit_flip_is_refused() {
    let net = Net::new();
    let (_, list) = net.accepted();
    let bytes = record::sign_record(JSON, &label("QHG"), &net.nodes[0].record).unwrap();
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            record::verify_record(&flipped, &list).is_err(),
            "bit {bit} flipped was accepted"
        );
    }
}
