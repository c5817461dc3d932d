//! Pointers: one per (custodian, section) and one per document, shaped like
//! NRL DocumentReference pointers, with opaque ids that name neither the
//! patient nor the records.

use std::collections::BTreeMap;

use careweave_protocol::message::{Pointer, Section};
use careweave_protocol::{NhsNumber, OdsCode};
use sha2::{Digest, Sha256};

use crate::fhir;
use crate::store::StoredRecord;

/// Records that one pointer leads to.
#[derive(Debug, Clone)]
pub struct Group<'a> {
    /// `section:<name>` or `document:<Type/id>`.
    pub key: String,
    pub section: Section,
    pub records: Vec<&'a StoredRecord>,
}

/// Groups records the way pointers name them.
pub fn groups<'a>(records: &[&'a StoredRecord]) -> Vec<Group<'a>> {
    let mut by_key: BTreeMap<String, Group<'a>> = BTreeMap::new();
    for record in records {
        let key = if record.section == Section::Documents {
            format!("document:{}", record.key())
        } else {
            format!("section:{}", fhir::section_name(record.section).0)
        };
        by_key
            .entry(key.clone())
            .or_insert_with(|| Group {
                key,
                section: record.section,
                records: Vec::new(),
            })
            .records
            .push(record);
    }
    by_key.into_values().collect()
}

/// An opaque pointer id: `<ODS>-<24 hex>`, a salted hash of patient and group.
pub fn pointer_id(ods: &OdsCode, salt: &[u8; 32], nhs: &NhsNumber, group_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"careweave-pointer/1");
    h.update(salt);
    h.update(nhs.digits().as_bytes());
    h.update([0]);
    h.update(group_key.as_bytes());
    let digest = h.finalize();
    let opaque: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("{ods}-{opaque}")
}

/// The pointers for released records.
pub fn build(
    ods: &OdsCode,
    salt: &[u8; 32],
    nhs: &NhsNumber,
    released: &[&StoredRecord],
) -> Vec<Pointer> {
    groups(released)
        .into_iter()
        .map(|group| {
            let dates: Vec<&str> = group
                .records
                .iter()
                .filter_map(|r| r.date.as_deref())
                .collect();
            let section_coding = fhir::section_coding(group.section);
            let type_code = group
                .records
                .first()
                .and_then(|r| r.document_type.clone())
                .unwrap_or_else(|| section_coding.clone());
            Pointer {
                id: pointer_id(ods, salt, nhs, &group.key),
                custodian: ods.clone(),
                section: group.section,
                type_code,
                category: section_coding,
                count: u32::try_from(group.records.len()).unwrap_or(u32::MAX),
                date_from: dates.iter().min().map(|d| (*d).to_owned()),
                date_to: dates.iter().max().map(|d| (*d).to_owned()),
            }
        })
        .collect()
}

/// Finds the group a pointer id names among `records`.
pub fn find<'a>(
    ods: &OdsCode,
    salt: &[u8; 32],
    nhs: &NhsNumber,
    records: &[&'a StoredRecord],
    id: &str,
) -> Option<Group<'a>> {
    groups(records)
        .into_iter()
        .find(|g| pointer_id(ods, salt, nhs, &g.key) == id)
}
