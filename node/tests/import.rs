//! Importing FHIR R4 records: a realistic bundle and every bad-input case.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use careweave_node::import::{EntryOutcome, ImportReport, Importer, InputKind};
use careweave_node::node::Node;
use careweave_protocol::message::Section;
use careweave_protocol::{NhsNumber, record};
use common::{T0, network, open};
use serde_json::{Value, json};

fn import(node: &Node, bytes: &[u8]) -> (ImportReport, Vec<EntryOutcome>, InputKind) {
    Importer {
        store: &node.store,
        record_key: &node.keys.record,
        custodian: node.ods(),
        config: &node.config,
        now: T0,
    }
    .import_bytes("input.json", bytes, &mut |_, _| {})
    .unwrap()
}

fn node() -> common::TestNode {
    let (coordinator, list) = network();
    open("QUE", &coordinator, &list)
}

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

fn condition(id: &str, nhs: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "id": id,
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]},
        "subject": {"identifier": {"system": NHS, "value": nhs}}
    })
}

fn bundle(kind: &str, resources: Vec<Value>) -> Vec<u8> {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| json!({"resource": r}))
        .collect();
    serde_json::to_vec(&json!({"resourceType": "Bundle", "type": kind, "entry": entries})).unwrap()
}

#[test]
fn a_realistic_multi_section_bundle() {
    let que = node();
    let (report, outcomes, kind) = import(&que.node, common::BUNDLE.as_bytes());
    assert_eq!(kind, InputKind::Transaction);
    assert_eq!(report.stored, 9);
    assert_eq!(report.patients_linked, 1);
    assert!(report.rejected.is_empty());
    assert_eq!(outcomes.len(), 10);
    let nhs = NhsNumber::parse("9990000018").unwrap();
    let records = que.node.store.patient_records(&nhs).unwrap();
    assert_eq!(records.len(), 9);
    let sections: std::collections::BTreeSet<Section> = records.iter().map(|r| r.section).collect();
    assert_eq!(sections.len(), 8, "{sections:?}");
    let sti = records.iter().find(|r| r.id == "cond-sti").unwrap();
    assert_eq!(sti.sensitive_categories, ["sexually-transmitted-infection"]);
    let plan = records.iter().find(|r| r.id == "cp-1").unwrap();
    assert!(plan.very_restricted);
    let obs = records.iter().find(|r| r.id == "obs-1").unwrap();
    assert_eq!(obs.date.as_deref(), Some("2026-02-14"));
    // Every record is signed by the custodian and verifies against the list.
    let list = que.node.current_list(T0).unwrap();
    for r in &records {
        let verified = record::verify_record(&r.signed, &list).unwrap();
        assert_eq!(verified.label.custodian.as_str(), "QUE");
        assert_eq!(verified.label.nhs_number, nhs);
        assert_eq!(verified.label.version, r.version);
    }
}

#[test]
fn the_same_resource_again_replaces_the_old_version() {
    let que = node();
    import(&que.node, common::BUNDLE.as_bytes());
    let (report, _, _) = import(&que.node, common::BUNDLE.as_bytes());
    assert_eq!((report.stored, report.replaced), (0, 9));
    let r = que
        .node
        .store
        .record("Condition", "cond-1")
        .unwrap()
        .unwrap();
    assert_eq!(r.version, "2");
    assert_eq!(que.node.store.record_count(), Some(9));
}

#[test]
fn a_transaction_is_all_or_nothing() {
    let que = node();
    let input = bundle(
        "transaction",
        vec![
            condition("ok-1", "9990000018"),
            condition("bad", "9990000019"),
            condition("ok-2", "9990000018"),
        ],
    );
    let (report, outcomes, _) = import(&que.node, &input);
    assert!(report.transaction_aborted);
    assert_eq!(report.stored, 0);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].entry, "entry[1]");
    assert!(
        report.rejected[0].reason.contains("check digit"),
        "{}",
        report.rejected[0].reason
    );
    assert_eq!(outcomes[0], EntryOutcome::NotApplied);
    assert_eq!(que.node.store.record_count(), Some(0));
}

#[test]
fn a_batch_reports_each_entry() {
    let que = node();
    let input = bundle(
        "batch",
        vec![
            condition("ok-1", "9990000018"),
            condition("bad", "123"),
            condition("ok-2", "9990000018"),
        ],
    );
    let (report, outcomes, _) = import(&que.node, &input);
    assert_eq!(report.stored, 2);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].entry, "entry[1]");
    assert!(matches!(outcomes[1], EntryOutcome::Rejected { .. }));
    assert_eq!(que.node.store.record_count(), Some(2));
}

#[test]
fn ndjson_lines_are_imported_one_by_one() {
    let que = node();
    let mut text = String::new();
    text.push_str(&serde_json::to_string(&condition("a", "9990000018")).unwrap());
    text.push('\n');
    text.push_str("{not json\n");
    text.push_str(&serde_json::to_string(&condition("b", "9990000018")).unwrap());
    text.push('\n');
    let (report, _, kind) = import(&que.node, text.as_bytes());
    assert_eq!(kind, InputKind::Ndjson);
    assert_eq!(report.stored, 2);
    assert_eq!(report.rejected[0].entry, "line 2");
    assert!(report.rejected[0].reason.contains("invalid JSON"));
}

#[test]
fn ndjson_over_many_batches_is_written_in_order() {
    // A resource seen again in a later batch comes out as its next
    // version, replacing the earlier one, and batches land in order.
    let que = node();
    let mut config = que.node.config.clone();
    config.import.batch_records = 2;
    let ids = ["a", "b", "c", "a", "d", "b", "e"];
    let text: String = ids
        .iter()
        .map(|id| serde_json::to_string(&condition(id, "9990000018")).unwrap() + "\n")
        .collect();
    let mut progress = Vec::new();
    let (report, outcomes, _) = Importer {
        store: &que.node.store,
        record_key: &que.node.keys.record,
        custodian: que.node.ods(),
        config: &config,
        now: T0,
    }
    .import_bytes("input.ndjson", text.as_bytes(), &mut |done, total| {
        progress.push((done, total));
    })
    .unwrap();

    assert_eq!((report.stored, report.replaced), (5, 2), "{report:?}");
    let versions: Vec<&str> = outcomes
        .iter()
        .map(|o| match o {
            EntryOutcome::Stored { version, .. } | EntryOutcome::Replaced { version, .. } => {
                version.as_str()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(versions, ["1", "1", "1", "2", "1", "2", "1"]);
    assert!(matches!(outcomes[3], EntryOutcome::Replaced { .. }));
    assert!(matches!(outcomes[5], EntryOutcome::Replaced { .. }));
    for (id, version) in [("a", "2"), ("b", "2"), ("c", "1"), ("d", "1"), ("e", "1")] {
        let stored = que.node.store.record("Condition", id).unwrap().unwrap();
        assert_eq!(stored.version, version, "{id}");
    }
    // Progress is reported as batches are written, ending whole.
    assert!(
        progress.windows(2).all(|w| w[0].0 <= w[1].0),
        "{progress:?}"
    );
    assert_eq!(progress.last(), Some(&(7, 7)));
    assert!(progress.len() >= 4, "{progress:?}");
}

#[test]
fn delete_entries_remove_records() {
    let que = node();
    import(&que.node, common::BUNDLE.as_bytes());
    let input = serde_json::to_vec(&json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": "Condition/cond-1"}}]
    }))
    .unwrap();
    let (report, _, _) = import(&que.node, &input);
    assert_eq!(report.removed, 1);
    assert!(
        que.node
            .store
            .record("Condition", "cond-1")
            .unwrap()
            .is_none()
    );
    assert_eq!(que.node.store.record_count(), Some(8));
}

fn rejected_reason(que: &Node, resource: Value) -> String {
    let input = bundle("batch", vec![resource]);
    let (report, _, _) = import(que, &input);
    assert_eq!(report.stored, 0, "{report:?}");
    assert_eq!(report.rejected.len(), 1);
    report.rejected[0].reason.clone()
}

#[test]
fn every_bad_input_is_rejected_with_its_reason_and_stores_nothing() {
    let que = node();
    // Invalid JSON as a whole file.
    let err = Importer {
        store: &que.node.store,
        record_key: &que.node.keys.record,
        custodian: que.node.ods(),
        config: &que.node.config,
        now: T0,
    }
    .import_bytes(
        "broken.json",
        b"{\"resourceType\": \"Bundle\", ",
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("broken.json") && err.to_string().contains("invalid JSON"),
        "{err}"
    );

    let cases = [
        (json!({"id": "x", "subject": {}}), "no resourceType"),
        (
            json!({"resourceType": "Observation", "id": "o"}),
            "names no patient",
        ),
        (
            json!({"resourceType": "Observation", "id": "o", "subject": {"identifier": {"system": NHS, "value": "99900000"}}}),
            "invalid NHS number",
        ),
        (
            json!({"resourceType": "Observation", "id": "o", "subject": {"identifier": {"system": NHS, "value": "9990000019"}}}),
            "check digit",
        ),
        (
            condition("real", &NhsNumber::from_stem(1).unwrap().digits()),
            "test range",
        ),
        (
            json!({"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/missing"}}),
            "does not resolve",
        ),
        (
            json!({"resourceType": "Practitioner", "id": "p"}),
            "not a record",
        ),
        (
            {
                let mut big = condition("big", "9990000018");
                big["note"] = json!([{"text": "x".repeat(300 * 1024)}]);
                big
            },
            "over the limit",
        ),
    ];
    for (resource, expected) in cases {
        let reason = rejected_reason(&que.node, resource);
        assert!(reason.contains(expected), "{reason} (expected {expected})");
    }
    assert_eq!(que.node.store.record_count(), Some(0));
}

#[test]
fn bundles_of_the_wrong_type_are_refused_whole() {
    let que = node();
    let input =
        serde_json::to_vec(&json!({"resourceType": "Bundle", "type": "searchset", "entry": []}))
            .unwrap();
    let err = Importer {
        store: &que.node.store,
        record_key: &que.node.keys.record,
        custodian: que.node.ods(),
        config: &que.node.config,
        now: T0,
    }
    .import_bytes("search.json", &input, &mut |_, _| {})
    .unwrap_err();
    assert!(err.to_string().contains("searchset"), "{err}");
}
