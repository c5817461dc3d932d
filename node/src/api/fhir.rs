//! FHIR R4 shapes the API answers with: searchset Bundles of NRL-style
//! DocumentReference pointers, OperationOutcomes with NHS error codes, and
//! record Bundles.

use careweave_protocol::message::{Pointer, WithheldReason};
use careweave_protocol::{NhsNumber, OdsCode};
use serde_json::{Value, json};

use crate::fhir::NHS_NUMBER_SYSTEM;
use crate::net::{IcbOutcome, IcbResult};

/// ODS organisation codes as FHIR identifiers.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// NHS England's error and warning codes.
pub const SPINE_ERROR_SYSTEM: &str = "https://fhir.nhs.uk/CodeSystem/Spine-ErrorOrWarningCode";
/// FHIR content type.
pub const FHIR_JSON: &str = "application/fhir+json";

/// An OperationOutcome with one issue.
pub fn outcome(severity: &str, code: &str, nhs_code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{
            "severity": severity,
            "code": code,
            "details": {"coding": [{"system": SPINE_ERROR_SYSTEM, "code": nhs_code, "display": nhs_code.replace('_', " ").to_lowercase()}]},
            "diagnostics": diagnostics,
        }]
    })
}

/// The pointer as an NRL-shaped DocumentReference.
pub fn document_reference(pointer: &Pointer, nhs: &NhsNumber, base: &str) -> Value {
    let mut period = serde_json::Map::new();
    if let Some(from) = &pointer.date_from {
        period.insert("start".into(), json!(from));
    }
    if let Some(to) = &pointer.date_to {
        period.insert("end".into(), json!(to));
    }
    json!({
        "resourceType": "DocumentReference",
        "id": pointer.id,
        "status": "current",
        "type": {"coding": [{"system": pointer.type_code.system, "code": pointer.type_code.code, "display": pointer.type_code.display}]},
        "category": [{"coding": [{"system": pointer.category.system, "code": pointer.category.code, "display": pointer.category.display}]}],
        "subject": {"identifier": {"system": NHS_NUMBER_SYSTEM, "value": nhs.digits()}},
        "custodian": {"identifier": {"system": ODS_SYSTEM, "value": pointer.custodian.as_str()}},
        "date": pointer.date_to.as_ref().map(|d| format!("{d}T00:00:00Z")),
        "description": format!("{} record(s) in {}", pointer.count, crate::fhir::section_name(pointer.section).1),
        "securityLabel": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]}],
        "content": [{"attachment": {
            "contentType": FHIR_JSON,
            "url": format!("{base}/fhir/DocumentReference/{}/$records", pointer.id),
            "title": format!("{} record(s)", pointer.count),
        }}],
        "context": {"period": Value::Object(period)},
    })
}

fn withheld_text(reasons: &[WithheldReason]) -> String {
    reasons
        .iter()
        .map(|r| match r {
            WithheldReason::Objection => "the patient has objected to sharing",
            WithheldReason::SensitiveCategory => {
                "records in a legally sensitive category are not shared"
            }
            WithheldReason::VeryRestricted => "records labelled very restricted are not shared",
            WithheldReason::NoAgreement => "records are held in sections not shared with your ICB",
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The OperationOutcomes for one ICB that did not simply answer: sections
/// its agreement keeps from us, then anything withheld or failed.
fn icb_outcomes(result: &IcbResult, asker: &OdsCode, contact: Option<&str>) -> Vec<Value> {
    let who = format!("{} ({})", result.name, result.ods);
    let mut out = Vec::new();
    if !result.not_shared.is_empty() {
        out.push(outcome(
            "information",
            "suppressed",
            "ACCESS_DENIED",
            &crate::sharing::not_shared_text(&who, asker, &result.not_shared, contact),
        ));
    }
    out.extend(icb_outcome(result, &who, contact));
    out
}

/// The OperationOutcome for one ICB's withheld records or failure.
fn icb_outcome(result: &IcbResult, who: &str, contact: Option<&str>) -> Option<Value> {
    let contact = contact
        .map(|c| format!(" Contact: {c}."))
        .unwrap_or_default();
    let (severity, code, nhs_code, text) = match &result.outcome {
        IcbOutcome::Pointers { withheld, .. } if !withheld.is_empty() => (
            "information",
            "suppressed",
            "ACCESS_DENIED",
            format!(
                "{who} withheld some records: {}.{contact}",
                withheld_text(withheld)
            ),
        ),
        IcbOutcome::Pointers { .. } | IcbOutcome::NoRecords | IcbOutcome::NotShared => {
            return None;
        }
        IcbOutcome::Withheld(w) => (
            "information",
            "suppressed",
            "ACCESS_DENIED",
            format!("{who} withheld records: {}.{contact}", withheld_text(w)),
        ),
        IcbOutcome::TimedOut => (
            "warning",
            "timeout",
            "SERVICE_UNAVAILABLE",
            format!("{who} did not answer in time."),
        ),
        IcbOutcome::Unreachable(d) => (
            "warning",
            "transient",
            "SERVICE_UNAVAILABLE",
            format!("{who} could not be reached: {d}."),
        ),
        IcbOutcome::Refused(d) => (
            "warning",
            "forbidden",
            "ACCESS_DENIED",
            format!("{who} refused the request: {d}."),
        ),
    };
    Some(outcome(severity, code, nhs_code, &text))
}

/// The searchset Bundle for a national locate.
pub fn searchset(
    results: &[IcbResult],
    nhs: &NhsNumber,
    base: &str,
    self_url: &str,
    asker: &OdsCode,
    contact: impl Fn(&str) -> Option<String>,
) -> Value {
    let mut entries = Vec::new();
    let mut total = 0;
    for result in results {
        if let IcbOutcome::Pointers { pointers, .. } = &result.outcome {
            for pointer in pointers {
                total += 1;
                entries.push(json!({
                    "fullUrl": format!("{base}/fhir/DocumentReference/{}", pointer.id),
                    "resource": document_reference(pointer, nhs, base),
                    "search": {"mode": "match"},
                }));
            }
        }
    }
    for result in results {
        let found = icb_outcomes(result, asker, contact(result.ods.as_str()).as_deref());
        let several = found.len() > 1;
        for (i, resource) in found.into_iter().enumerate() {
            let url = if several {
                format!("urn:careweave:outcome:{}:{}", result.ods, i + 1)
            } else {
                format!("urn:careweave:outcome:{}", result.ods)
            };
            entries.push(json!({
                "fullUrl": url,
                "resource": resource,
                "search": {"mode": "outcome"},
            }));
        }
    }
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{"relation": "self", "url": self_url}],
        "entry": entries,
    })
}

/// A collection Bundle of fetched records; `not_shared` is the text to show
/// when the custodian's agreement kept records from us.
pub fn collection(
    records: Vec<Value>,
    withheld: &[WithheldReason],
    not_shared: Option<String>,
    base: &str,
) -> Value {
    let mut entries: Vec<Value> = records
        .into_iter()
        .map(|r| {
            let url = format!(
                "{base}/fhir/{}/{}",
                r.get("resourceType")
                    .and_then(Value::as_str)
                    .unwrap_or("Resource"),
                r.get("id").and_then(Value::as_str).unwrap_or("")
            );
            json!({"fullUrl": url, "resource": r})
        })
        .collect();
    if let Some(text) = not_shared {
        entries.push(json!({
            "fullUrl": "urn:careweave:outcome:not-shared",
            "resource": outcome("information", "suppressed", "ACCESS_DENIED", &text),
        }));
    }
    if !withheld.is_empty() {
        entries.push(json!({
            "fullUrl": "urn:careweave:outcome:withheld",
            "resource": outcome("information", "suppressed", "ACCESS_DENIED", &format!("Some records were withheld: {}.", withheld_text(withheld))),
        }));
    }
    json!({"resourceType": "Bundle", "type": "collection", "entry": entries})
}

/// The CapabilityStatement: what this API really supports.
pub fn capability_statement() -> Value {
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-28",
        "kind": "instance",
        "software": {"name": "careweave-node", "version": env!("CARGO_PKG_VERSION")},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "Mutual TLS: client certificates from the CA the node is configured with."},
            "resource": [{
                "type": "DocumentReference",
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "searchParam": [
                    {"name": "subject:identifier", "type": "token"},
                    {"name": "custodian:identifier", "type": "token"},
                    {"name": "type", "type": "token"}
                ],
                "operation": [{"name": "records", "definition": "DocumentReference/{id}/$records returns the records behind a pointer"}]
            }],
            "interaction": [{"code": "transaction"}, {"code": "batch"}]
        }]
    })
}
