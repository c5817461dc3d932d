//! Reading FHIR R4 resources: which PRSB section a resource is filed under,
//! which patient it belongs to, its date and its sensitivity.
//!
//! The section table is also in `docs/records.md`.

use std::collections::BTreeMap;

use careweave_protocol::NhsNumber;
use careweave_protocol::message::{Coding, Section};
use serde_json::{Map, Value};

/// The NHS number identifier system.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// SNOMED CT.
pub const SNOMED: &str = "http://snomed.info/sct";
/// HL7 v3 confidentiality codes, used in `meta.security`.
pub const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";

/// The PRSB section each shareable resource type is filed under.
pub const SECTIONS: [(&str, Section); 17] = [
    ("AllergyIntolerance", Section::Allergies),
    ("MedicationStatement", Section::Medications),
    ("MedicationRequest", Section::Medications),
    ("MedicationAdministration", Section::Medications),
    ("MedicationDispense", Section::Medications),
    ("Condition", Section::Problems),
    ("Procedure", Section::Procedures),
    ("Observation", Section::Investigations),
    ("DiagnosticReport", Section::Investigations),
    ("Immunization", Section::Vaccinations),
    ("Flag", Section::Alerts),
    ("CarePlan", Section::CarePlans),
    ("DocumentReference", Section::Documents),
    ("Composition", Section::Documents),
    ("Encounter", Section::Encounters),
    ("ClinicalImpression", Section::Problems),
    ("RiskAssessment", Section::Alerts),
];

/// The section a resource type is filed under, if careweave shares it.
pub fn section_for(resource_type: &str) -> Option<Section> {
    SECTIONS
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map(|(_, s)| *s)
}

/// A section's name on the wire and for people.
pub fn section_name(section: Section) -> (&'static str, &'static str) {
    match section {
        Section::Allergies => ("allergies", "Allergies and adverse reactions"),
        Section::Medications => ("medications", "Medications and medical devices"),
        Section::Problems => ("problems", "Problems and diagnoses"),
        Section::Procedures => ("procedures", "Procedures"),
        Section::Investigations => ("investigations", "Investigations and results"),
        Section::Vaccinations => ("vaccinations", "Vaccinations"),
        Section::Alerts => ("alerts", "Alerts"),
        Section::CarePlans => ("care-plans", "Care plans"),
        Section::Documents => ("documents", "Documents"),
        Section::Encounters => ("encounters", "Encounters"),
    }
}

/// The coding a section pointer carries as its type and category.
pub fn section_coding(section: Section) -> Coding {
    let (code, display) = section_name(section);
    Coding {
        system: "https://careweave.invalid/CodeSystem/prsb-section".to_owned(),
        code: code.to_owned(),
        display: display.to_owned(),
    }
}

/// How a resource names its patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientRef {
    /// An identifier reference carrying the NHS number itself.
    Nhs(NhsNumber),
    /// A literal reference (`Patient/x` or `urn:uuid:...`) to resolve in the bundle.
    Reference(String),
}

/// What was read from one resource.
#[derive(Debug, Clone)]
pub struct ParsedResource {
    pub resource_type: String,
    pub id: String,
    pub section: Section,
    pub patient: PatientRef,
    pub date: Option<String>,
    /// SNOMED codes in `code`, `type` and `category`.
    pub snomed_codes: Vec<String>,
    /// Labelled very restricted (`meta.security` confidentiality `V`).
    pub very_restricted: bool,
    /// For documents: their type coding, for the pointer.
    pub document_type: Option<Coding>,
    /// The resource itself.
    pub json: Map<String, Value>,
}

/// Why one resource was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("not a FHIR R4 resource: {0}")]
    NotFhir(String),
    #[error("resource type {0} is not a record careweave shares")]
    NotShareable(String),
    #[error("resource has no id")]
    MissingId,
    #[error("resource id {0:?} is not a FHIR id (1-64 of A-Z a-z 0-9 - .)")]
    BadId(String),
    #[error("resource names no patient (subject or patient)")]
    MissingPatient,
    #[error("patient identifier is not an NHS number ({NHS_NUMBER_SYSTEM})")]
    NotNhsIdentifier,
    #[error("invalid NHS number: {0}")]
    InvalidNhsNumber(String),
    #[error(
        "NHS number is outside the test range 999 000 0000 - 999 999 9999, which a testnet node requires"
    )]
    OutsideTestRange,
    #[error(
        "patient reference {0:?} does not resolve to a Patient with an NHS number in this input"
    )]
    UnknownReference(String),
    #[error("resource is {size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("meta.versionId must be text of 1-64 characters")]
    BadVersion,
}

/// Whether text is a FHIR id.
pub fn is_fhir_id(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn codings(value: Option<&Value>) -> Vec<&Map<String, Value>> {
    let concepts: Vec<&Value> = match value {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(concept @ Value::Object(_)) => vec![concept],
        _ => vec![],
    };
    concepts
        .into_iter()
        .filter_map(|c| c.get("coding").and_then(Value::as_array))
        .flat_map(|list| list.iter().filter_map(Value::as_object))
        .collect()
}

fn is_date_prefix(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 10
        && b.iter().take(10).enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

fn date_of(json: &Map<String, Value>) -> Option<String> {
    const FIELDS: [&str; 10] = [
        "effectiveDateTime",
        "onsetDateTime",
        "occurrenceDateTime",
        "performedDateTime",
        "recordedDate",
        "authoredOn",
        "assertedDate",
        "issued",
        "date",
        "dateAsserted",
    ];
    const PERIODS: [&str; 4] = [
        "effectivePeriod",
        "performedPeriod",
        "period",
        "onsetPeriod",
    ];
    FIELDS
        .iter()
        .filter_map(|f| json.get(*f).and_then(Value::as_str))
        .chain(PERIODS.iter().filter_map(|p| {
            json.get(*p)
                .and_then(|v| v.get("start"))
                .and_then(Value::as_str)
        }))
        .find(|t| is_date_prefix(t))
        .and_then(|t| t.get(..10))
        .map(str::to_owned)
}

/// Reads an NHS number identifier `{system, value}`.
pub fn nhs_from_identifier(identifier: &Value) -> Result<NhsNumber, ResourceError> {
    if identifier.get("system").and_then(Value::as_str) != Some(NHS_NUMBER_SYSTEM) {
        return Err(ResourceError::NotNhsIdentifier);
    }
    let value = identifier
        .get("value")
        .and_then(Value::as_str)
        .ok_or(ResourceError::NotNhsIdentifier)?;
    NhsNumber::parse(value).map_err(|e| ResourceError::InvalidNhsNumber(e.to_string()))
}

/// The NHS number of a Patient resource, from its identifiers.
pub fn patient_nhs_number(json: &Map<String, Value>) -> Result<NhsNumber, ResourceError> {
    let identifiers = json
        .get("identifier")
        .and_then(Value::as_array)
        .ok_or(ResourceError::NotNhsIdentifier)?;
    identifiers
        .iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(NHS_NUMBER_SYSTEM))
        .ok_or(ResourceError::NotNhsIdentifier)
        .and_then(nhs_from_identifier)
}

/// Checks the envelope every resource shares: a JSON object with a
/// `resourceType` and a FHIR id.
pub fn resource_header(value: &Value) -> Result<(String, Option<String>), ResourceError> {
    let object = value
        .as_object()
        .ok_or_else(|| ResourceError::NotFhir("not a JSON object".into()))?;
    let resource_type = object
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or_else(|| ResourceError::NotFhir("no resourceType".into()))?;
    if resource_type.is_empty()
        || !resource_type.chars().all(|c| c.is_ascii_alphabetic())
        || !resource_type.starts_with(|c: char| c.is_ascii_uppercase())
    {
        return Err(ResourceError::NotFhir(format!(
            "resourceType {resource_type:?} is not a FHIR resource type"
        )));
    }
    let id = match object.get("id") {
        None => None,
        Some(Value::String(id)) if is_fhir_id(id) => Some(id.clone()),
        Some(Value::String(id)) => return Err(ResourceError::BadId(id.clone())),
        Some(_) => return Err(ResourceError::BadId("(not text)".into())),
    };
    Ok((resource_type.to_owned(), id))
}

/// Reads a shareable resource. `fallback_id` is used when the resource has
/// no id (a transaction entry identified by its `urn:uuid:` full URL).
pub fn parse_resource(
    value: Value,
    fallback_id: Option<&str>,
) -> Result<ParsedResource, ResourceError> {
    let (resource_type, id) = resource_header(&value)?;
    let section = section_for(&resource_type)
        .ok_or_else(|| ResourceError::NotShareable(resource_type.clone()))?;
    let id = match (id, fallback_id) {
        (Some(id), _) => id,
        (None, Some(f)) if is_fhir_id(f) => f.to_owned(),
        _ => return Err(ResourceError::MissingId),
    };
    let Value::Object(json) = value else {
        return Err(ResourceError::NotFhir("not a JSON object".into()));
    };
    if let Some(meta) = json.get("meta") {
        match meta.get("versionId") {
            None => {}
            Some(Value::String(v)) if (1..=64).contains(&v.len()) => {}
            Some(_) => return Err(ResourceError::BadVersion),
        }
    }
    let patient_field = json
        .get("subject")
        .or_else(|| json.get("patient"))
        .ok_or(ResourceError::MissingPatient)?;
    let patient = if let Some(reference) = patient_field.get("reference").and_then(Value::as_str) {
        PatientRef::Reference(reference.to_owned())
    } else if let Some(identifier) = patient_field.get("identifier") {
        PatientRef::Nhs(nhs_from_identifier(identifier)?)
    } else {
        return Err(ResourceError::MissingPatient);
    };
    let snomed_codes = ["code", "type", "category"]
        .iter()
        .flat_map(|field| codings(json.get(*field)))
        .filter(|c| c.get("system").and_then(Value::as_str) == Some(SNOMED))
        .filter_map(|c| c.get("code").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let very_restricted = json
        .get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array)
        .is_some_and(|labels| {
            labels.iter().any(|l| {
                l.get("system").and_then(Value::as_str) == Some(CONFIDENTIALITY)
                    && l.get("code").and_then(Value::as_str) == Some("V")
            })
        });
    let document_type = if section == Section::Documents {
        codings(json.get("type")).first().and_then(|c| {
            Some(Coding {
                system: c.get("system")?.as_str()?.to_owned(),
                code: c.get("code")?.as_str()?.to_owned(),
                display: c
                    .get("display")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
        })
    } else {
        None
    };
    Ok(ParsedResource {
        date: date_of(&json),
        resource_type,
        id,
        section,
        patient,
        snomed_codes,
        very_restricted,
        document_type,
        json,
    })
}

/// Which sensitive categories a resource's codes fall in.
pub fn sensitive_categories(
    codes: &[String],
    table: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    table
        .iter()
        .filter(|(_, listed)| codes.iter().any(|c| listed.contains(c)))
        .map(|(category, _)| category.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn files_resources_by_section() {
        assert_eq!(section_for("AllergyIntolerance"), Some(Section::Allergies));
        assert_eq!(section_for("Immunization"), Some(Section::Vaccinations));
        assert_eq!(section_for("Patient"), None);
        assert_eq!(section_for("Bundle"), None);
    }

    #[test]
    fn reads_patient_date_codes_and_labels() {
        let parsed = parse_resource(
            json!({
                "resourceType": "Condition",
                "id": "c1",
                "meta": {"security": [{"system": CONFIDENTIALITY, "code": "V"}]},
                "code": {"coding": [{"system": SNOMED, "code": "8098009"}]},
                "subject": {"identifier": {"system": NHS_NUMBER_SYSTEM, "value": "9990000018"}},
                "onsetDateTime": "2024-05-06T10:00:00Z"
            }),
            None,
        )
        .unwrap();
        assert_eq!(parsed.section, Section::Problems);
        assert_eq!(
            parsed.patient,
            PatientRef::Nhs(NhsNumber::parse("9990000018").unwrap())
        );
        assert_eq!(parsed.date.as_deref(), Some("2024-05-06"));
        assert!(parsed.very_restricted);
        let table = crate::config::PolicySection::default().sensitive_codes;
        assert_eq!(
            sensitive_categories(&parsed.snomed_codes, &table),
            ["sexually-transmitted-infection"]
        );
    }

    #[test]
    fn rejects_what_is_not_a_shareable_record() {
        let cases = [
            (json!([1, 2]), "not a FHIR"),
            (json!({"id": "x"}), "no resourceType"),
            (
                json!({"resourceType": "bundle!"}),
                "not a FHIR resource type",
            ),
            (
                json!({"resourceType": "Practitioner", "id": "p"}),
                "not a record",
            ),
            (
                json!({"resourceType": "Condition", "subject": {"reference": "Patient/1"}}),
                "no id",
            ),
            (
                json!({"resourceType": "Condition", "id": "a b"}),
                "not a FHIR id",
            ),
            (
                json!({"resourceType": "Condition", "id": "c"}),
                "names no patient",
            ),
            (
                json!({"resourceType": "Condition", "id": "c", "subject": {"identifier": {"system": "x", "value": "9990000018"}}}),
                "not an NHS number",
            ),
            (
                json!({"resourceType": "Condition", "id": "c", "subject": {"identifier": {"system": NHS_NUMBER_SYSTEM, "value": "9990000019"}}}),
                "invalid NHS number",
            ),
            (
                json!({"resourceType": "Condition", "id": "c", "meta": {"versionId": 3}, "subject": {"reference": "Patient/1"}}),
                "versionId",
            ),
        ];
        for (value, expected) in cases {
            let err = parse_resource(value, None).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} (expected {expected})");
        }
    }
}
