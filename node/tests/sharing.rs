//! Sharing agreements end to end, without a network: QUE holds records and
//! answers QHG and QM7 under each kind of agreement, changed while it runs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use careweave_node::audit::AuditEntry;
use careweave_node::config::SharingSection;
use careweave_node::node::{FetchAnswer, Inbound, LocateAnswer, Node};
use careweave_node::sharing::Agreement;
use careweave_node::store::PatientFlags;
use careweave_protocol::cbor::{self, Limits};
use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::message::{
    FetchRequest, LocateRequest, LocateResponse, Purpose, Section, WithheldReason,
};
use careweave_protocol::{NhsNumber, OdsCode};
use common::{DAY, T0, TestNode, context, network, open};

fn ods(code: &str) -> OdsCode {
    OdsCode::parse(code).unwrap()
}

/// The patient QUE holds nine records for, in nine sections.
fn known() -> NhsNumber {
    NhsNumber::parse("9990000018").unwrap()
}

/// A patient QUE holds nothing for.
fn unknown() -> NhsNumber {
    NhsNumber::parse(&common::nhs_for(5000)).unwrap()
}

struct Net {
    qhg: TestNode,
    que: TestNode,
    qm7: TestNode,
}

fn net() -> Net {
    let (coordinator, list) = network();
    let net = Net {
        qhg: open("QHG", &coordinator, &list),
        que: open("QUE", &coordinator, &list),
        qm7: open("QM7", &coordinator, &list),
    };
    common::load_bundle(&net.que.node);
    net
}

fn agreement(toml_text: &str) -> Agreement {
    let config: SharingSection = toml::from_str(toml_text).unwrap();
    Agreement::from_config(&config).unwrap()
}

fn reply(inbound: Inbound) -> Vec<u8> {
    match inbound {
        Inbound::Reply(bytes) => bytes,
        Inbound::Drop(reason) => panic!("dropped: {reason}"),
    }
}

/// `asker` locates `nhs` at QUE and gets QUE's answer, checked.
fn locate(asker: &Node, que: &Node, nhs: NhsNumber, now: u64) -> LocateResponse {
    let request = LocateRequest {
        nhs_number: nhs,
        context: context(Purpose::Treat),
        sections: None,
    };
    let outbound = asker.prepare_locate(&ods("QUE"), &request, now).unwrap();
    let bytes =
        reply(que.handle_request(ProtocolId::Locate, &outbound.bytes, asker.peer_id(), now));
    match asker
        .accept_locate_response(&outbound, &bytes, now)
        .unwrap()
    {
        LocateAnswer::Answered(answer) => answer,
        LocateAnswer::Refused(e) => panic!("refused: {}", e.message),
    }
}

/// `asker` fetches `pointer` from QUE.
fn fetch(asker: &Node, que: &Node, pointer: &str, now: u64) -> FetchAnswer {
    fetch_for(asker, que, pointer, Purpose::Treat, now)
}

fn fetch_for(asker: &Node, que: &Node, pointer: &str, purpose: Purpose, now: u64) -> FetchAnswer {
    let request = FetchRequest {
        nhs_number: known(),
        pointer_id: pointer.to_owned(),
        context: context(purpose),
    };
    let outbound = asker.prepare_fetch(&ods("QUE"), &request, now).unwrap();
    let bytes = reply(que.handle_request(ProtocolId::Fetch, &outbound.bytes, asker.peer_id(), now));
    asker.accept_fetch_response(&outbound, &bytes, now).unwrap()
}

fn last_entry(node: &Node) -> AuditEntry {
    let len = node.store.audit_len().unwrap();
    cbor::decode(
        &node.store.audit_entry(len - 1).unwrap().unwrap(),
        Limits::MESSAGE,
    )
    .unwrap()
}

fn sections(answer: &LocateResponse) -> Vec<Section> {
    let mut out: Vec<Section> = answer.pointers.iter().map(|p| p.section).collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn a_node_shares_nationally_with_everyone_and_says_nothing_is_kept_back() {
    let n = net();
    n.que.node.set_sharing(Agreement::national(), T0);
    for asker in [&n.qhg.node, &n.qm7.node] {
        let answer = locate(asker, &n.que.node, known(), T0);
        assert_eq!(answer.pointers.len(), 7);
        assert!(answer.not_shared.is_empty());
        assert_eq!(last_entry(&n.que.node).outcome, "answered");
    }
}

#[test]
fn a_node_that_shares_with_no_one_answers_the_same_whether_or_not_it_holds_records() {
    let n = net();
    n.que.node.set_sharing(Agreement::national(), T0);
    let pointer = locate(&n.qhg.node, &n.que.node, known(), T0).pointers[0]
        .id
        .clone();

    // The agreement narrows while the node runs: the next request follows it.
    assert!(n.que.node.set_sharing(Agreement::none(), T0 + 1));
    let held = locate(&n.qhg.node, &n.que.node, known(), T0 + 1);
    let not_held = locate(&n.qhg.node, &n.que.node, unknown(), T0 + 1);
    assert_eq!(
        held, not_held,
        "the answer must not reveal that records exist"
    );
    assert!(held.pointers.is_empty() && held.withheld.is_empty());
    assert_eq!(held.not_shared, Section::ALL.to_vec());

    // The custodian's audit log tells the truth the answer does not.
    let entry = last_entry(&n.que.node);
    assert_eq!(entry.outcome, "not-shared");
    assert_eq!(entry.not_shared, Section::ALL.to_vec());
    assert!(entry.reason.is_none(), "nothing was held for this patient");
    let len = n.que.node.store.audit_len().unwrap();
    let held_entry: AuditEntry = cbor::decode(
        &n.que.node.store.audit_entry(len - 2).unwrap().unwrap(),
        Limits::MESSAGE,
    )
    .unwrap();
    let reason = held_entry.reason.unwrap();
    assert!(
        reason.contains("no sharing agreement with QHG") && reason.contains("9 record(s)"),
        "{reason}"
    );
    // The asker's log records what it was told.
    assert_eq!(last_entry(&n.qhg.node).outcome, "not-shared");

    // A pointer from before the change opens nothing now, exactly like a
    // pointer that never existed.
    let FetchAnswer::Records {
        records,
        not_shared,
        withheld,
        ..
    } = fetch(&n.qhg.node, &n.que.node, &pointer, T0 + 2)
    else {
        panic!("refused")
    };
    assert!(records.is_empty() && withheld.is_empty());
    assert_eq!(not_shared, Section::ALL.to_vec());
    let FetchAnswer::Records {
        records: bogus_records,
        not_shared: bogus_not_shared,
        ..
    } = fetch(&n.qhg.node, &n.que.node, "QUE-not-a-real-pointer", T0 + 2)
    else {
        panic!("refused")
    };
    assert!(bogus_records.is_empty());
    assert_eq!(bogus_not_shared, not_shared);

    // An emergency fetch the agreement refuses still alerts the custodian's
    // security team, as an emergency locate does.
    let alerts = || {
        n.que
            .node
            .metrics
            .emergency_alerts
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = alerts();
    let FetchAnswer::Records { records, .. } = fetch_for(
        &n.qhg.node,
        &n.que.node,
        &pointer,
        Purpose::EmergencyTreat,
        T0 + 2,
    ) else {
        panic!("refused")
    };
    assert!(records.is_empty());
    assert_eq!(alerts(), before + 1);
    let entry = last_entry(&n.que.node);
    assert!(
        entry.emergency && entry.outcome == "not-shared",
        "{entry:?}"
    );

    // Widened again, the same pointer opens.
    n.que.node.set_sharing(Agreement::national(), T0 + 3);
    let FetchAnswer::Records { records, .. } = fetch(&n.qhg.node, &n.que.node, &pointer, T0 + 3)
    else {
        panic!("refused")
    };
    assert!(!records.is_empty());
}

#[test]
fn a_named_set_of_icbs_is_shared_with_and_no_one_else() {
    let n = net();
    n.que.node.set_sharing(
        agreement(
            r#"
            scope = "icbs"
            icbs = ["QM7"]
            "#,
        ),
        T0,
    );
    let neighbour = locate(&n.qm7.node, &n.que.node, known(), T0);
    assert_eq!(neighbour.pointers.len(), 7);
    assert!(neighbour.not_shared.is_empty());
    let stranger = locate(&n.qhg.node, &n.que.node, known(), T0);
    assert!(stranger.pointers.is_empty());
    assert_eq!(stranger.not_shared, Section::ALL.to_vec());
}

#[test]
fn sections_can_be_shared_more_or_less_widely_than_the_rest() {
    let n = net();
    n.que.node.set_sharing(
        agreement(
            r#"
            scope = "national"
            [sections.medications]
            scope = "icbs"
            icbs = ["QM7"]
            [sections.care-plans]
            scope = "none"
            "#,
        ),
        T0,
    );
    let qhg = locate(&n.qhg.node, &n.que.node, known(), T0);
    assert_eq!(
        qhg.not_shared,
        vec![Section::Medications, Section::CarePlans]
    );
    assert!(!sections(&qhg).contains(&Section::Medications));
    assert_eq!(qhg.pointers.len(), 6);
    // The very restricted care plan is in a section not shared at all, so
    // it is not reported as withheld by policy either.
    assert_eq!(qhg.withheld, vec![WithheldReason::SensitiveCategory]);

    let qm7 = locate(&n.qm7.node, &n.que.node, known(), T0);
    assert!(sections(&qm7).contains(&Section::Medications));
    assert_eq!(qm7.not_shared, vec![Section::CarePlans]);

    // A fetch of the medications pointer QM7 holds is refused to QHG with
    // that section named.
    let medications = qm7
        .pointers
        .iter()
        .find(|p| p.section == Section::Medications)
        .unwrap()
        .id
        .clone();
    let FetchAnswer::Records {
        records,
        not_shared,
        ..
    } = fetch(&n.qhg.node, &n.que.node, &medications, T0 + 1)
    else {
        panic!("refused")
    };
    assert!(records.is_empty());
    assert_eq!(not_shared, vec![Section::Medications]);
    let FetchAnswer::Records { records, .. } =
        fetch(&n.qm7.node, &n.que.node, &medications, T0 + 1)
    else {
        panic!("refused")
    };
    assert!(!records.is_empty());

    // A shared section opens for QHG, and what it says was withheld is
    // only about sections QHG may see: not the very restricted care plan.
    let allergies = qhg
        .pointers
        .iter()
        .find(|p| p.section == Section::Allergies)
        .unwrap()
        .id
        .clone();
    let FetchAnswer::Records {
        records,
        withheld,
        not_shared,
        ..
    } = fetch(&n.qhg.node, &n.que.node, &allergies, T0 + 2)
    else {
        panic!("refused")
    };
    assert!(!records.is_empty() && not_shared.is_empty());
    assert_eq!(withheld, vec![WithheldReason::SensitiveCategory]);
}

#[test]
fn disclosing_that_records_exist_is_a_switch_and_never_covers_a_restricted_patient() {
    let n = net();
    n.que.node.set_sharing(Agreement::none(), T0);
    assert!(
        locate(&n.qhg.node, &n.que.node, known(), T0)
            .withheld
            .is_empty(),
        "off by default"
    );

    n.que.node.set_sharing(
        agreement(
            r#"
            scope = "none"
            disclose_existence = true
            "#,
        ),
        T0 + 1,
    );
    let held = locate(&n.qhg.node, &n.que.node, known(), T0 + 1);
    assert_eq!(held.withheld, vec![WithheldReason::NoAgreement]);
    let not_held = locate(&n.qhg.node, &n.que.node, unknown(), T0 + 1);
    assert!(not_held.withheld.is_empty());
    assert_eq!(held.not_shared, not_held.not_shared);

    n.que
        .node
        .store
        .set_flags(
            &known(),
            &PatientFlags {
                restricted: true,
                ..PatientFlags::default()
            },
        )
        .unwrap();
    let restricted = locate(&n.qhg.node, &n.que.node, known(), T0 + 2);
    assert_eq!(
        restricted, not_held,
        "a restricted patient answers exactly like an unknown one"
    );
}

#[test]
fn the_transparency_report_counts_what_the_audit_log_holds_and_names_no_one() {
    use careweave_node::transparency::{self, Tally};
    let n = net();
    // Day one: QHG gets six answers and one "no records"; QM7 two.
    n.que.node.set_sharing(Agreement::national(), T0);
    for _ in 0..6 {
        locate(&n.qhg.node, &n.que.node, known(), T0);
    }
    locate(&n.qhg.node, &n.que.node, unknown(), T0);
    locate(&n.qm7.node, &n.que.node, known(), T0);
    locate(&n.qm7.node, &n.que.node, known(), T0);
    // Day two: the agreement narrows to QM7; QHG is told "not shared" five times.
    let day2 = T0 + DAY;
    n.que.node.set_sharing(
        agreement(
            r#"
            scope = "icbs"
            icbs = ["QM7"]
            "#,
        ),
        day2,
    );
    for _ in 0..5 {
        locate(&n.qhg.node, &n.que.node, known(), day2);
    }
    // Then the patient objects: QM7 is told so.
    n.que
        .node
        .store
        .set_flags(
            &known(),
            &PatientFlags {
                objected: true,
                ..PatientFlags::default()
            },
        )
        .unwrap();
    locate(&n.qm7.node, &n.que.node, known(), day2);

    let now = day2 + 60;
    let mut tally = Tally::new(transparency::REPORT_DAYS);
    let report = transparency::report(&n.que.node, &mut tally, 5, now).unwrap();

    // Count the same thing straight from the audit log.
    let mut expected: std::collections::BTreeMap<(String, String, String), u64> =
        Default::default();
    for item in n.que.node.store.audit_entries() {
        let (_, bytes, _) = item.unwrap();
        let entry: AuditEntry = cbor::decode(&bytes, Limits::MESSAGE).unwrap();
        if entry.direction != careweave_node::audit::Direction::Inbound {
            continue;
        }
        let outcome = match entry.outcome.as_str() {
            "withheld" => format!("withheld:{}", cbor_name(&entry.withheld[0])),
            other => other.to_owned(),
        };
        *expected
            .entry((
                transparency::date(entry.time / DAY),
                entry.peer_ods.unwrap().to_string(),
                outcome,
            ))
            .or_default() += 1;
    }
    let rows = report["counts"].as_array().unwrap();
    assert_eq!(rows.len(), expected.len(), "{rows:#?}");
    for row in rows {
        let key = (
            row["day"].as_str().unwrap().to_owned(),
            row["requesting_icb"].as_str().unwrap().to_owned(),
            row["outcome"].as_str().unwrap().to_owned(),
        );
        let truth = expected[&key];
        assert_eq!(row["protocol"], "locate");
        assert_eq!(row["purpose"], "TREAT");
        if truth < 5 {
            assert_eq!(
                row["count"],
                serde_json::Value::Null,
                "{key:?} is suppressed"
            );
            assert_eq!(row["suppressed"], true);
        } else {
            assert_eq!(row["count"], truth, "{key:?}");
        }
    }
    let day1 = transparency::date(T0 / DAY);
    assert!(rows.iter().any(|r| r["day"] == day1.as_str()
        && r["requesting_icb"] == "QHG"
        && r["outcome"] == "answered"
        && r["count"] == 6));
    assert!(
        rows.iter().any(|r| r["requesting_icb"] == "QHG"
            && r["outcome"] == "not-shared"
            && r["count"] == 5)
    );
    assert!(rows.iter().any(|r| r["requesting_icb"] == "QM7"
        && r["outcome"] == "withheld:objection"
        && r["suppressed"] == true));

    // The agreement in force and the latest signed checkpoint are there.
    assert_eq!(report["sharing_agreement"]["default"]["icbs"][0], "QM7");
    assert!(
        report["audit"]["latest_checkpoint"]["size"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(report["complete"], true);

    // Nothing in it names a patient or a member of staff.
    let text = report.to_string();
    for secret in [
        "9990000018",
        unknown().digits().as_str(),
        "555021935107",
        "555021936108",
    ] {
        assert!(!text.contains(secret), "the report contains {secret}");
    }

    // A later report reads on from where this one stopped.
    locate(&n.qm7.node, &n.que.node, known(), now);
    let again = transparency::report(&n.que.node, &mut tally, 5, now + 1).unwrap();
    let qm7_day2: Vec<_> = again["counts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["requesting_icb"] == "QM7" && r["day"] != day1.as_str())
        .collect();
    assert_eq!(qm7_day2.len(), 1, "{qm7_day2:?}");
    assert_eq!(qm7_day2[0]["outcome"], "withheld:objection");
    assert_eq!(
        qm7_day2[0]["suppressed"], true,
        "two answers are still too few"
    );
    assert_eq!(
        again["counted_to_entry"],
        n.que.node.store.audit_len().unwrap()
    );
}

/// A withheld reason's wire name.
fn cbor_name(reason: &WithheldReason) -> String {
    let bytes = cbor::encode(reason).unwrap();
    cbor::decode::<String>(&bytes, Limits::MESSAGE).unwrap()
}
