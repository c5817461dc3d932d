//! Synthetic data: the ICBs (real ODS codes and names, from the reference
//! data), and patients with records, deterministic from a seed.
//!
//! NHS numbers come only from 999 000 0000 – 999 999 9999 with valid check
//! digits; practice codes start `ZZ` so nobody mistakes them for real ones.

use careweave_protocol::message::{Purpose, RequesterContext};
use careweave_protocol::{NhsNumber, OdsCode};
use serde_json::{Value, json};

const ICBS_2022: &str = include_str!("../data/icbs-2022.csv");
const SUCCESSIONS_2026: &str = include_str!("../data/icbs-2026-successions.csv");

/// One ICB from the reference data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Icb {
    pub ods: String,
    pub name: String,
    pub region: String,
    /// ODS codes this ICB succeeded in the April 2026 merges.
    pub predecessors: Vec<String>,
}

/// Splits one CSV line, honouring double quotes.
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut current)),
            other => current.push(other),
        }
    }
    fields.push(current);
    fields
}

/// The 42 ICBs of 2022–2026, in file order.
pub fn icbs_2022() -> Vec<Icb> {
    ICBS_2022
        .lines()
        .skip(1)
        .filter_map(|line| match csv_fields(line).as_slice() {
            [ods, _gss, region, name] => Some(Icb {
                ods: ods.clone(),
                name: name.clone(),
                region: region.clone(),
                predecessors: vec![],
            }),
            _ => None,
        })
        .collect()
}

/// The 36 ICBs after the April 2026 merges: the 2022 ICBs no merge touched,
/// then each successor with the ICBs (or parts of ICBs) it succeeded.
pub fn icbs_2026() -> Vec<Icb> {
    let old = icbs_2022();
    let successors: Vec<(String, String, Vec<String>)> = SUCCESSIONS_2026
        .lines()
        .skip(1)
        .filter_map(|line| match csv_fields(line).as_slice() {
            [ods, name, predecessors] => Some((
                ods.clone(),
                name.clone(),
                predecessors
                    .split_whitespace()
                    .map(|p| p.trim_end_matches("(part)").to_owned())
                    .collect(),
            )),
            _ => None,
        })
        .collect();
    let merged: Vec<&String> = successors.iter().flat_map(|(_, _, p)| p).collect();
    let mut out: Vec<Icb> = old
        .iter()
        .filter(|i| !merged.contains(&&i.ods))
        .cloned()
        .collect();
    for (ods, name, predecessors) in successors {
        let region = predecessors
            .first()
            .and_then(|p| old.iter().find(|i| &i.ods == p))
            .map(|i| i.region.clone())
            .unwrap_or_default();
        let predecessors = predecessors.into_iter().filter(|p| *p != ods).collect();
        out.push(Icb {
            ods,
            name,
            region,
            predecessors,
        });
    }
    out
}

/// A small deterministic generator (SplitMix64), so `--seed` reproduces data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    pub fn pick<T: Copy + Default>(&mut self, items: &[T]) -> T {
        let i = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        items.get(i).copied().unwrap_or_default()
    }
}

const GIVEN: [&str; 12] = [
    "Olivia", "Amelia", "Isla", "Ava", "Mohammed", "Noah", "Oliver", "George", "Priya", "Siobhan",
    "Kwame", "Dylan",
];
const FAMILY: [&str; 12] = [
    "Smith", "Jones", "Williams", "Taylor", "Brown", "Davies", "Evans", "Patel", "Khan", "O'Brien",
    "Okafor", "Hughes",
];

/// Curated SNOMED CT codes by resource kind: (code, display).
const ALLERGIES: [(&str, &str); 3] = [
    ("91936005", "Allergy to penicillin"),
    ("300913006", "Shellfish allergy"),
    ("91935009", "Allergy to peanuts"),
];
const CONDITIONS: [(&str, &str); 4] = [
    ("38341003", "Hypertensive disorder"),
    ("44054006", "Type 2 diabetes mellitus"),
    ("195967001", "Asthma"),
    ("13645005", "Chronic obstructive lung disease"),
];
const MEDICATIONS: [(&str, &str); 3] = [
    ("318475005", "Amlodipine 5mg tablets"),
    ("325278003", "Metformin 500mg tablets"),
    ("320137002", "Salbutamol 100micrograms/dose inhaler"),
];
const PROCEDURES: [(&str, &str); 2] = [
    ("80146002", "Appendicectomy"),
    ("232717009", "Coronary artery bypass grafting"),
];
const OBSERVATIONS: [(&str, &str); 2] = [
    ("271649006", "Systolic blood pressure"),
    ("27113001", "Body weight"),
];
const VACCINES: [(&str, &str); 2] = [
    ("39114911000001105", "COVID-19 vaccine"),
    ("1119349007", "Influenza vaccine"),
];
/// A code from each legally sensitive category (matching the node's default lists).
pub const SENSITIVE: [(&str, &str); 4] = [
    ("63487001", "Assisted fertilisation"),
    ("93461009", "Gender dysphoria"),
    ("15628003", "Gonorrhoea"),
    ("386639001", "Termination of pregnancy"),
];

/// A synthetic patient.
#[derive(Debug, Clone)]
pub struct Patient {
    pub nhs: NhsNumber,
    pub given: String,
    pub family: String,
    pub birth_date: String,
    pub practice: String,
}

/// The `n`-th valid NHS number in the test range after `offset`.
pub fn nhs_number(offset: u32) -> NhsNumber {
    let mut stem = 999_000_000u32.saturating_add(offset);
    loop {
        if let Some(n) = NhsNumber::from_stem(stem) {
            return n;
        }
        stem = stem.saturating_add(1);
    }
}

/// Makes a patient from the generator.
pub fn patient(rng: &mut Rng, nhs: NhsNumber) -> Patient {
    Patient {
        nhs,
        given: rng.pick(&GIVEN).to_owned(),
        family: rng.pick(&FAMILY).to_owned(),
        birth_date: format!(
            "{}-{:02}-{:02}",
            1935 + rng.below(85),
            1 + rng.below(12),
            1 + rng.below(28)
        ),
        practice: format!("ZZ{:04}", rng.below(10_000)),
    }
}

fn subject(nhs: &NhsNumber) -> Value {
    json!({"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs.digits()}})
}

fn coded(code: &(&str, &str)) -> Value {
    json!({"coding": [{"system": "http://snomed.info/sct", "code": code.0, "display": code.1}]})
}

/// A varied set of records for a patient at one ICB: one per section and more.
pub fn records(rng: &mut Rng, patient: &Patient, icb: &str) -> Vec<Value> {
    let nhs = &patient.nhs;
    let id = |kind: &str, n: u64| format!("{}-{kind}-{}-{n}", icb.to_lowercase(), nhs.digits());
    let date = |rng: &mut Rng| {
        format!(
            "20{:02}-{:02}-{:02}",
            15 + rng.below(11),
            1 + rng.below(12),
            1 + rng.below(28)
        )
    };
    let mut out = vec![
        json!({"resourceType": "AllergyIntolerance", "id": id("allergy", 1), "code": coded(&rng.pick(&ALLERGIES)), "patient": subject(nhs), "recordedDate": date(rng)}),
        json!({"resourceType": "Condition", "id": id("condition", 1), "code": coded(&rng.pick(&CONDITIONS)), "subject": subject(nhs), "onsetDateTime": date(rng)}),
        json!({"resourceType": "MedicationStatement", "id": id("medication", 1), "status": "active", "medicationCodeableConcept": coded(&rng.pick(&MEDICATIONS)), "subject": subject(nhs), "effectiveDateTime": date(rng)}),
        json!({"resourceType": "Observation", "id": id("observation", 1), "status": "final", "code": coded(&rng.pick(&OBSERVATIONS)), "subject": subject(nhs), "effectiveDateTime": date(rng)}),
        json!({"resourceType": "Immunization", "id": id("immunization", 1), "status": "completed", "vaccineCode": coded(&rng.pick(&VACCINES)), "patient": subject(nhs), "occurrenceDateTime": date(rng)}),
        json!({"resourceType": "Encounter", "id": id("encounter", 1), "status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}, "subject": subject(nhs), "period": {"start": date(rng)}, "serviceProvider": {"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": patient.practice}, "display": "registered GP practice (synthetic)"}}),
    ];
    if rng.below(3) == 0 {
        out.push(json!({"resourceType": "Procedure", "id": id("procedure", 1), "status": "completed", "code": coded(&rng.pick(&PROCEDURES)), "subject": subject(nhs), "performedDateTime": date(rng)}));
    }
    if rng.below(4) == 0 {
        out.push(json!({"resourceType": "Flag", "id": id("flag", 1), "status": "active", "code": {"text": "Lives alone"}, "subject": subject(nhs)}));
    }
    if rng.below(4) == 0 {
        out.push(json!({"resourceType": "CarePlan", "id": id("careplan", 1), "status": "active", "intent": "plan", "subject": subject(nhs), "period": {"start": date(rng)}}));
    }
    if rng.below(3) == 0 {
        out.push(json!({"resourceType": "DocumentReference", "id": id("document", 1), "status": "current", "type": coded(&("373942005", "Discharge summary")), "subject": subject(nhs), "date": format!("{}T10:00:00Z", date(rng)), "content": [{"attachment": {"contentType": "text/plain", "data": "U3ludGhldGljIGRpc2NoYXJnZSBzdW1tYXJ5Lg=="}}]}));
    }
    // Some records in a sensitive category, some very restricted: every policy path.
    if rng.below(6) == 0 {
        out.push(json!({"resourceType": "Condition", "id": id("condition", 2), "code": coded(&rng.pick(&SENSITIVE)), "subject": subject(nhs), "onsetDateTime": date(rng)}));
    }
    if rng.below(8) == 0 {
        out.push(json!({"resourceType": "Condition", "id": id("condition", 3), "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "V"}]}, "code": coded(&rng.pick(&CONDITIONS)), "subject": subject(nhs)}));
    }
    out
}

/// An Observation of about `bytes` bytes of JSON (padded with a note), for
/// the benchmark's fixed-size records. `n` makes its id unique.
pub fn sized_observation(nhs: &NhsNumber, icb: &str, n: u64, bytes: usize) -> Value {
    let mut resource = json!({
        "resourceType": "Observation",
        "id": format!("{}-bench-{}-{n}", icb.to_lowercase(), nhs.digits()),
        "status": "final",
        "code": coded(&("271649006", "Systolic blood pressure")),
        "subject": subject(nhs),
        "effectiveDateTime": format!("20{:02}-{:02}-{:02}", 15 + n % 11, 1 + n % 12, 1 + n % 28),
        "valueQuantity": {"value": 110 + n % 60, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        "note": [{"text": ""}],
    });
    let base = serde_json::to_vec(&resource).map_or(0, |v| v.len());
    let text = note_text(nhs, n, bytes.saturating_sub(base));
    if let Some(fields) = resource.as_object_mut() {
        fields.insert("note".into(), json!([{ "text": text }]));
    }
    resource
}

/// `len` characters of free text for a note: random letters in word-sized
/// groups. It compresses worse than clinical English (about 4.7 bits a
/// character against 2 to 3), so store sizes measured with it are not
/// flattered by repetition.
fn note_text(nhs: &NhsNumber, n: u64, len: usize) -> String {
    let seed = nhs.digits().parse::<u64>().unwrap_or(0) ^ n.rotate_left(32);
    let mut rng = Rng::new(seed);
    let mut text = String::with_capacity(len);
    while text.len() < len {
        let word = 2 + rng.below(9);
        for _ in 0..word {
            text.push(char::from(b'a' + rng.below(26) as u8));
        }
        text.push(if rng.below(8) == 0 { '.' } else { ' ' });
    }
    text.truncate(len);
    text
}

/// The testnet's synthetic clinician at `organisation`, asking for direct
/// care (the same SDS ids the API's client certificate stands for).
pub fn clinician(organisation: OdsCode, request_id: &str) -> RequesterContext {
    RequesterContext {
        organisation,
        user_id: "555021935107".into(),
        role_profile_id: "555021936108".into(),
        role_code: "R8000".into(),
        purpose: Purpose::Treat,
        relationship: "direct-care".into(),
        break_glass_reason: None,
        request_id: request_id.into(),
        correlation_id: None,
    }
}

/// A collection Bundle holding resources.
pub fn bundle(resources: Vec<Value>) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": resources.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_data_has_the_42_icbs() {
        let icbs = icbs_2022();
        assert_eq!(icbs.len(), 42);
        assert!(
            icbs.iter()
                .any(|i| i.ods == "QHG" && i.name.contains("Bedfordshire"))
        );
    }

    #[test]
    fn the_2026_set_has_36_icbs_with_five_character_codes() {
        let icbs = icbs_2026();
        assert_eq!(icbs.len(), 36);
        let central = icbs.iter().find(|i| i.ods == "S1Y5D").unwrap();
        assert_eq!(central.predecessors, ["QHG", "QUE", "QM7"]);
        assert!(!icbs.iter().any(|i| i.ods == "QHG"));
        let hiow = icbs.iter().find(|i| i.ods == "QRL").unwrap();
        assert_eq!(hiow.predecessors, ["QNQ"]);
    }

    #[test]
    fn synthetic_numbers_are_valid_and_in_the_test_range() {
        for offset in 0..2000 {
            let n = nhs_number(offset * 37);
            assert!(n.is_test_range());
        }
    }

    #[test]
    fn sized_observations_are_the_size_asked_for() {
        for bytes in [1024, 4096] {
            let r = sized_observation(&nhs_number(7), "QHG", 3, bytes);
            let len = serde_json::to_vec(&r).unwrap().len();
            assert!(len.abs_diff(bytes) <= 8, "{len} for {bytes}");
        }
    }

    #[test]
    fn data_is_deterministic_from_the_seed() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let pa = patient(&mut a, nhs_number(1));
        let pb = patient(&mut b, nhs_number(1));
        assert_eq!(pa.given, pb.given);
        assert_eq!(records(&mut a, &pa, "QHG"), records(&mut b, &pb, "QHG"));
        assert!(pa.practice.starts_with("ZZ"));
    }
}
