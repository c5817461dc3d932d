//! Loading an ICB's own FHIR R4 records: Bundles (transaction: all or
//! nothing; batch and collection: per entry) and NDJSON (one resource per
//! line). Each record is filed, labelled, signed with the record key and
//! indexed; a resource seen again by type and id replaces the old version;
//! a transaction or batch entry with `request.method` DELETE removes one.
//!
//! Used by `careweave-node import` and by the clinical API's `POST /fhir`.

use std::collections::HashMap;

use careweave_protocol::record::{self, RecordLabel};
use careweave_protocol::{KeyPair, NhsNumber, OdsCode};
use serde::Serialize;
use serde_json::Value;

use crate::config::NodeConfig;
use crate::fhir::{self, PatientRef, ResourceError};
use crate::store::{RecordWrite, Store, StoreError, StoredRecord, WriteOutcome, record_key};

/// What kind of input was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    Transaction,
    Batch,
    Collection,
    Resource,
    Ndjson,
}

/// One entry that was not stored, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub source: String,
    /// `entry[3]` for bundles (0-based, as FHIRPath), `line 4` for NDJSON.
    pub entry: String,
    pub reason: String,
}

/// The outcome of one entry, in input order (for batch and transaction responses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum EntryOutcome {
    Stored {
        key: String,
        version: String,
    },
    Replaced {
        key: String,
        version: String,
    },
    Removed {
        key: String,
    },
    NotFound {
        key: String,
    },
    /// A Patient resource, used to resolve references and not stored.
    PatientLinked,
    Rejected {
        reason: String,
    },
    /// A valid entry of a transaction that failed as a whole.
    NotApplied,
}

/// The summary an import ends with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub stored: usize,
    pub replaced: usize,
    pub removed: usize,
    pub not_found: usize,
    pub patients_linked: usize,
    pub rejected: Vec<Rejection>,
    /// True when a transaction was refused as a whole.
    pub transaction_aborted: bool,
}

impl ImportReport {
    /// Adds another report's counts.
    pub fn merge(&mut self, other: ImportReport) {
        self.stored += other.stored;
        self.replaced += other.replaced;
        self.removed += other.removed;
        self.not_found += other.not_found;
        self.patients_linked += other.patients_linked;
        self.rejected.extend(other.rejected);
        self.transaction_aborted |= other.transaction_aborted;
    }
}

/// Why an import could not run at all (as opposed to rejecting entries).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{source_name}: the input is {size} bytes, over the limit of {max}")]
    TooLarge {
        source_name: String,
        size: usize,
        max: u64,
    },
    #[error("{source_name}: {message}")]
    Unreadable {
        source_name: String,
        message: String,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// An import run: the store, the record key and the settings.
#[derive(Debug)]
pub struct Importer<'a> {
    pub store: &'a Store,
    pub record_key: &'a KeyPair,
    pub custodian: &'a OdsCode,
    pub config: &'a NodeConfig,
    /// Seconds since the Unix epoch: the records' signing time.
    pub now: u64,
}

/// One parsed input entry.
#[derive(Clone)]
enum Item {
    Patient {
        full_url: Option<String>,
        resource: Value,
    },
    Resource {
        full_url: Option<String>,
        resource: Value,
    },
    Delete {
        url: String,
    },
    Bad(ResourceError),
}

fn label(kind: InputKind, index: usize) -> String {
    match kind {
        InputKind::Ndjson => format!("line {}", index + 1),
        InputKind::Resource => "resource".to_owned(),
        _ => format!("entry[{index}]"),
    }
}

fn split_bundle(value: &Value) -> Result<(InputKind, Vec<Item>), String> {
    let kind = match value.get("type").and_then(Value::as_str) {
        Some("transaction") => InputKind::Transaction,
        Some("batch") => InputKind::Batch,
        Some("collection") => InputKind::Collection,
        Some(other) => {
            return Err(format!(
                "Bundle type {other:?} cannot be imported (use transaction, batch or collection)"
            ));
        }
        None => return Err("Bundle has no type".to_owned()),
    };
    let entries = match value.get("entry") {
        None => return Ok((kind, vec![])),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err("Bundle.entry is not an array".to_owned()),
    };
    let items = entries
        .iter()
        .map(|entry| {
            let full_url = entry
                .get("fullUrl")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let method = entry
                .get("request")
                .and_then(|r| r.get("method"))
                .and_then(Value::as_str);
            if method == Some("DELETE") {
                return match entry
                    .get("request")
                    .and_then(|r| r.get("url"))
                    .and_then(Value::as_str)
                {
                    Some(url) => Item::Delete {
                        url: url.to_owned(),
                    },
                    None => Item::Bad(ResourceError::NotFhir(
                        "DELETE entry has no request.url".into(),
                    )),
                };
            }
            match entry.get("resource") {
                None => Item::Bad(ResourceError::NotFhir("entry has no resource".into())),
                Some(resource) => classify(resource.clone(), full_url),
            }
        })
        .collect();
    Ok((kind, items))
}

fn classify(resource: Value, full_url: Option<String>) -> Item {
    match resource.get("resourceType").and_then(Value::as_str) {
        Some("Patient") => Item::Patient { full_url, resource },
        _ => Item::Resource { full_url, resource },
    }
}

/// Parsed input: a Bundle or single resource held whole, or NDJSON read
/// one line at a time so a large file never sits in memory as JSON values.
enum Input<'a> {
    Whole(InputKind, Vec<Item>),
    Ndjson(Vec<&'a str>),
}

impl Input<'_> {
    fn kind(&self) -> InputKind {
        match self {
            Input::Whole(kind, _) => *kind,
            Input::Ndjson(_) => InputKind::Ndjson,
        }
    }

    fn len(&self) -> usize {
        match self {
            Input::Whole(_, items) => items.len(),
            Input::Ndjson(lines) => lines.len(),
        }
    }

    /// Entries that may be Patients, with their indexes. NDJSON lines that
    /// cannot hold a Patient are skipped unparsed.
    fn patient_candidates(&self) -> Box<dyn Iterator<Item = (usize, Item)> + '_> {
        match self {
            Input::Whole(_, items) => Box::new(items.iter().cloned().enumerate()),
            Input::Ndjson(lines) => Box::new(
                lines
                    .iter()
                    .enumerate()
                    .filter(|(_, line)| line.contains("Patient"))
                    .map(|(i, line)| (i, parse_line(line))),
            ),
        }
    }

    /// The entries in order; NDJSON lines are parsed as they are reached.
    fn items(&self) -> Box<dyn Iterator<Item = Item> + '_> {
        match self {
            Input::Whole(_, items) => Box::new(items.iter().map(Item::clone)),
            Input::Ndjson(lines) => Box::new(lines.iter().map(|line| parse_line(line))),
        }
    }
}

fn parse_line(line: &str) -> Item {
    if line.trim().is_empty() {
        return Item::Bad(ResourceError::InvalidJson("empty line".into()));
    }
    match serde_json::from_str::<Value>(line) {
        Ok(value) => classify(value, None),
        Err(e) => Item::Bad(ResourceError::InvalidJson(e.to_string())),
    }
}

/// Splits input bytes into entries: a Bundle, a single resource, or NDJSON.
fn split_input(bytes: &[u8]) -> Result<Input<'_>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "input is not UTF-8 text".to_owned())?;
    let mut lines: Vec<&str> = text.lines().collect();
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    // NDJSON: more than one line, and the first line is a whole JSON value.
    if lines.len() > 1
        && lines
            .first()
            .is_some_and(|l| serde_json::from_str::<serde::de::IgnoredAny>(l).is_ok())
    {
        return Ok(Input::Ndjson(lines));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => {
            if value.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                let (kind, items) = split_bundle(&value)?;
                Ok(Input::Whole(kind, items))
            } else {
                Ok(Input::Whole(
                    InputKind::Resource,
                    vec![classify(value, None)],
                ))
            }
        }
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn set(outcomes: &mut [Option<EntryOutcome>], i: usize, outcome: EntryOutcome) {
    if let Some(slot) = outcomes.get_mut(i) {
        *slot = Some(outcome);
    }
}

/// Most threads an import signs with.
const MAX_SIGNING_THREADS: usize = 4;

/// One entry's write, with the label its record is still to be signed under
/// (None once signed, and for removals).
#[derive(Debug)]
struct Prepared {
    entry: usize,
    write: RecordWrite,
    label: Option<RecordLabel>,
}

impl Prepared {
    /// Replaces the record's JSON with the custodian-signed record.
    fn sign(&mut self, key: &KeyPair) -> Result<(), String> {
        let (RecordWrite::Put(record), Some(label)) = (&mut self.write, &self.label) else {
            return Ok(());
        };
        record.signed =
            record::sign_record(&record.signed, label, key).map_err(|e| e.to_string())?;
        self.label = None;
        Ok(())
    }
}

fn urn_uuid_id(full_url: Option<&str>) -> Option<&str> {
    full_url.and_then(|u| u.strip_prefix("urn:uuid:"))
}

impl Importer<'_> {
    /// Imports one input. `progress` is called with the number of entries
    /// handled so far.
    pub fn import_bytes(
        &self,
        source_name: &str,
        bytes: &[u8],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(ImportReport, Vec<EntryOutcome>, InputKind), ImportError> {
        if bytes.len() as u64 > self.config.import.max_file_bytes {
            return Err(ImportError::TooLarge {
                source_name: source_name.to_owned(),
                size: bytes.len(),
                max: self.config.import.max_file_bytes,
            });
        }
        let input = split_input(bytes).map_err(|message| ImportError::Unreadable {
            source_name: source_name.to_owned(),
            message,
        })?;
        self.import_input(source_name, &input, progress)
    }

    /// Imports an already-parsed Bundle (the API's `POST /fhir`).
    pub fn import_bundle(
        &self,
        source_name: &str,
        bundle: &Value,
    ) -> Result<(ImportReport, Vec<EntryOutcome>, InputKind), ImportError> {
        let (kind, items) = split_bundle(bundle).map_err(|message| ImportError::Unreadable {
            source_name: source_name.to_owned(),
            message,
        })?;
        self.import_input(source_name, &Input::Whole(kind, items), &mut |_, _| {})
    }

    fn import_input(
        &self,
        source_name: &str,
        input: &Input<'_>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(ImportReport, Vec<EntryOutcome>, InputKind), ImportError> {
        let kind = input.kind();
        let total = input.len();
        let mut outcomes: Vec<Option<EntryOutcome>> = vec![None; total];
        // Pass 1: Patients, so references resolve whatever the order.
        let mut patients: HashMap<String, NhsNumber> = HashMap::new();
        for (i, item) in input.patient_candidates() {
            if let Item::Patient { full_url, resource } = item {
                match self.read_patient(&resource) {
                    Ok((id, nhs)) => {
                        if let Some(url) = full_url {
                            patients.insert(url, nhs);
                        }
                        if let Some(id) = id {
                            patients.insert(format!("Patient/{id}"), nhs);
                        }
                        set(&mut outcomes, i, EntryOutcome::PatientLinked);
                    }
                    Err(e) => set(
                        &mut outcomes,
                        i,
                        EntryOutcome::Rejected {
                            reason: e.to_string(),
                        },
                    ),
                }
            }
        }
        // Pass 2: prepare and write. A transaction is prepared whole and
        // written in one atomic batch, or not at all; anything else is
        // written in batches, each flushed before it counts.
        let batch_size = if kind == InputKind::Transaction {
            usize::MAX
        } else {
            self.config.import.batch_records
        };
        let mut versions: HashMap<String, String> = HashMap::new();
        let mut batch: Vec<Prepared> = Vec::new();
        let mut report = ImportReport::default();
        for (i, item) in input.items().enumerate() {
            match self.prepare_item(item, &patients, &mut versions) {
                Ok(Some((write, label))) => batch.push(Prepared {
                    entry: i,
                    write,
                    label,
                }),
                Ok(None) => {}
                Err(reason) => set(&mut outcomes, i, EntryOutcome::Rejected { reason }),
            }
            if batch.len() >= batch_size {
                self.sign_batch(&mut batch, &mut outcomes);
                self.write_batch(std::mem::take(&mut batch), &mut outcomes)?;
                progress(i + 1, total);
            }
        }
        self.sign_batch(&mut batch, &mut outcomes);
        let any_rejected = outcomes
            .iter()
            .any(|o| matches!(o, Some(EntryOutcome::Rejected { .. })));
        if kind == InputKind::Transaction && any_rejected {
            // All or nothing: store nothing, say which entries failed.
            report.transaction_aborted = true;
            for prepared in &batch {
                set(&mut outcomes, prepared.entry, EntryOutcome::NotApplied);
            }
        } else if !batch.is_empty() {
            self.write_batch(batch, &mut outcomes)?;
        }
        progress(total, total);
        let outcomes: Vec<EntryOutcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(EntryOutcome::NotApplied))
            .collect();
        for (i, outcome) in outcomes.iter().enumerate() {
            match outcome {
                EntryOutcome::Stored { .. } => report.stored += 1,
                EntryOutcome::Replaced { .. } => report.replaced += 1,
                EntryOutcome::Removed { .. } => report.removed += 1,
                EntryOutcome::NotFound { .. } => report.not_found += 1,
                EntryOutcome::PatientLinked => report.patients_linked += 1,
                EntryOutcome::Rejected { reason } => report.rejected.push(Rejection {
                    source: source_name.to_owned(),
                    entry: label(kind, i),
                    reason: reason.clone(),
                }),
                EntryOutcome::NotApplied => {}
            }
        }
        Ok((report, outcomes, kind))
    }

    fn read_patient(&self, resource: &Value) -> Result<(Option<String>, NhsNumber), ResourceError> {
        let (_, id) = fhir::resource_header(resource)?;
        let object = resource
            .as_object()
            .ok_or_else(|| ResourceError::NotFhir("not an object".into()))?;
        let nhs = self.check_nhs(fhir::patient_nhs_number(object)?)?;
        Ok((id, nhs))
    }

    /// Turns one entry into a write, `None` for Patients (already handled).
    /// A record comes with the label it is still to be signed under.
    fn prepare_item(
        &self,
        item: Item,
        patients: &HashMap<String, NhsNumber>,
        versions: &mut HashMap<String, String>,
    ) -> Result<Option<(RecordWrite, Option<RecordLabel>)>, String> {
        match item {
            Item::Patient { .. } => Ok(None),
            Item::Bad(e) => Err(e.to_string()),
            Item::Delete { url } => match url.split_once('/') {
                Some((t, id)) if fhir::section_for(t).is_some() && fhir::is_fhir_id(id) => {
                    Ok(Some((
                        RecordWrite::Remove {
                            resource_type: t.to_owned(),
                            id: id.to_owned(),
                        },
                        None,
                    )))
                }
                _ => Err(format!(
                    "DELETE url {url:?} is not ResourceType/id of a shared record"
                )),
            },
            Item::Resource { full_url, resource } => self
                .prepare(resource, full_url.as_deref(), patients, versions)
                .map(|(record, label)| Some((RecordWrite::Put(record), Some(label))))
                .map_err(|e| e.to_string()),
        }
    }

    /// Signs every record of the batch with the record key, spread over the
    /// machine's cores: signing is most of an import's work. A record that
    /// cannot be signed is rejected and leaves the batch.
    fn sign_batch(&self, batch: &mut Vec<Prepared>, outcomes: &mut [Option<EntryOutcome>]) {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_SIGNING_THREADS);
        let per_thread = batch.len().div_ceil(threads).max(1);
        let key = self.record_key;
        let failures: Vec<(usize, String)> = std::thread::scope(|scope| {
            let workers: Vec<_> = batch
                .chunks_mut(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        let mut failed = Vec::new();
                        for prepared in chunk {
                            if let Err(e) = prepared.sign(key) {
                                failed.push((prepared.entry, e));
                            }
                        }
                        failed
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| {
                    w.join()
                        .unwrap_or_else(|_| vec![(usize::MAX, "signing failed".into())])
                })
                .collect()
        });
        for (entry, reason) in &failures {
            set(
                outcomes,
                *entry,
                EntryOutcome::Rejected {
                    reason: reason.clone(),
                },
            );
        }
        batch.retain(|p| p.label.is_none());
    }

    /// Writes a batch, taking its records: copying each one for the store
    /// would cost an allocation and a copy of every resource.
    fn write_batch(
        &self,
        batch: Vec<Prepared>,
        outcomes: &mut [Option<EntryOutcome>],
    ) -> Result<(), ImportError> {
        let (entries, writes): (Vec<usize>, Vec<RecordWrite>) =
            batch.into_iter().map(|p| (p.entry, p.write)).unzip();
        let results = self.store.write_records(&writes)?;
        for ((i, write), result) in entries.iter().zip(&writes).zip(results) {
            let (key, version) = match write {
                RecordWrite::Put(r) => (r.key(), r.version.clone()),
                RecordWrite::Remove { resource_type, id } => {
                    (record_key(resource_type, id), String::new())
                }
            };
            set(
                outcomes,
                *i,
                match result {
                    WriteOutcome::Stored => EntryOutcome::Stored { key, version },
                    WriteOutcome::Replaced => EntryOutcome::Replaced { key, version },
                    WriteOutcome::Removed => EntryOutcome::Removed { key },
                    WriteOutcome::NotFound => EntryOutcome::NotFound { key },
                },
            );
        }
        Ok(())
    }

    fn check_nhs(&self, nhs: NhsNumber) -> Result<NhsNumber, ResourceError> {
        if self.config.node.testnet && !nhs.is_test_range() {
            return Err(ResourceError::OutsideTestRange);
        }
        Ok(nhs)
    }

    fn prepare(
        &self,
        resource: Value,
        full_url: Option<&str>,
        patients: &HashMap<String, NhsNumber>,
        versions: &mut HashMap<String, String>,
    ) -> Result<(StoredRecord, RecordLabel), ResourceError> {
        let mut parsed = fhir::parse_resource(resource, urn_uuid_id(full_url))?;
        let nhs = match &parsed.patient {
            PatientRef::Nhs(nhs) => *nhs,
            PatientRef::Reference(reference) => *patients
                .get(reference)
                .ok_or_else(|| ResourceError::UnknownReference(reference.clone()))?,
        };
        let nhs = self.check_nhs(nhs)?;
        let key = record_key(&parsed.resource_type, &parsed.id);
        let given = parsed
            .json
            .get("meta")
            .and_then(|m| m.get("versionId"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let version = match given {
            Some(v) => v,
            None => {
                let previous = match versions.get(&key) {
                    Some(v) => Some(v.clone()),
                    None => self
                        .store
                        .record(&parsed.resource_type, &parsed.id)
                        .ok()
                        .flatten()
                        .map(|r| r.version),
                };
                previous
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or_else(|| "1".to_owned(), |v| (v + 1).to_string())
            }
        };
        versions.insert(key, version.clone());
        let meta = parsed
            .json
            .entry("meta")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(meta) = meta {
            meta.insert("versionId".to_owned(), Value::String(version.clone()));
        }
        parsed
            .json
            .insert("id".to_owned(), Value::String(parsed.id.clone()));
        let bytes = serde_json::to_vec(&parsed.json)
            .map_err(|e| ResourceError::InvalidJson(e.to_string()))?;
        let max = self.config.import.max_resource_bytes;
        if bytes.len() > max {
            return Err(ResourceError::TooLarge {
                size: bytes.len(),
                max,
            });
        }
        let label = RecordLabel {
            custodian: self.custodian.clone(),
            nhs_number: nhs,
            signed_at: self.now,
            resource_type: parsed.resource_type.clone(),
            resource_id: parsed.id.clone(),
            version: version.clone(),
        };
        let record = StoredRecord {
            nhs_number: nhs,
            section: parsed.section,
            sensitive_categories: fhir::sensitive_categories(
                &parsed.snomed_codes,
                &self.config.policy.sensitive_codes,
            ),
            resource_type: parsed.resource_type,
            id: parsed.id,
            version,
            date: parsed.date,
            very_restricted: parsed.very_restricted,
            document_type: parsed.document_type,
            // The JSON, until `sign_batch` replaces it with the signed record.
            signed: bytes,
        };
        Ok((record, label))
    }
}
