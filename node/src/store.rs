//! The node's sled store: one database, named trees, a schema version.
//!
//! Every write that is acknowledged has been flushed first (see
//! `docs/decisions/0002-sled-durability.md`). Writes that belong together
//! (a record and its index entry; an audit entry, its leaf hash and its
//! patient index) go in one sled transaction, so a crash never leaves half.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use careweave_protocol::cbor::{self, Limits};
use careweave_protocol::message::{Coding, Section};
use careweave_protocol::{NhsNumber, OdsCode};
use serde::{Deserialize, Serialize};
use sled::Transactional;

use crate::journal::{GroupCommit, Journal, JournalRecord};
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// The schema this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

const TREE_RECORDS: &str = "records";
const TREE_PATIENT_INDEX: &str = "patient_index";
const TREE_FLAGS: &str = "patient_flags";
const TREE_AUDIT: &str = "audit";
const TREE_AUDIT_LEAVES: &str = "audit_leaves";
const TREE_AUDIT_BY_PATIENT: &str = "audit_by_patient";
const TREE_CHECKPOINTS: &str = "audit_checkpoints";
const TREE_REPLAY: &str = "replay_cache";
const TREE_TRUST: &str = "trust";
const TREE_META: &str = "meta";

const META_SCHEMA: &[u8] = b"schema_version";
const META_POINTER_SALT: &[u8] = b"pointer_salt";

/// Problems with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {path} is in use by another process (is the node already running?)")]
    Locked { path: String },
    #[error("the store at {path} cannot be opened: {message}")]
    Open { path: String, message: String },
    #[error("the store has schema version {found}; this careweave-node reads version {expected}")]
    Schema { found: u32, expected: u32 },
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(inner) => inner,
            TransactionError::Storage(e) => StoreError::Io(e.to_string()),
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// What the store keeps about one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRecord {
    pub nhs_number: NhsNumber,
    pub section: Section,
    pub resource_type: String,
    pub id: String,
    pub version: String,
    pub date: Option<String>,
    pub very_restricted: bool,
    /// Sensitive categories the record falls in; never empty means never leaves.
    pub sensitive_categories: Vec<String>,
    pub document_type: Option<Coding>,
    /// The custodian-signed record (COSE_Sign1), exactly as it will travel.
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
}

impl StoredRecord {
    /// `ResourceType/id`, the record's key.
    pub fn key(&self) -> String {
        record_key(&self.resource_type, &self.id)
    }
}

/// `ResourceType/id`.
pub fn record_key(resource_type: &str, id: &str) -> String {
    format!("{resource_type}/{id}")
}

/// A patient's flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientFlags {
    /// Restricted (S-flagged): answers exactly as an unknown patient.
    pub restricted: bool,
    /// The patient objected to sharing; the reason, if recorded.
    pub objection: Option<String>,
    pub objected: bool,
    pub updated_at: u64,
}

/// A write to the record trees.
#[derive(Debug, Clone)]
pub enum RecordWrite {
    Put(StoredRecord),
    Remove { resource_type: String, id: String },
}

/// What a record write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Stored,
    Replaced,
    Removed,
    NotFound,
}

/// The node's database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    records: sled::Tree,
    patient_index: sled::Tree,
    flags: sled::Tree,
    audit: sled::Tree,
    audit_leaves: sled::Tree,
    audit_by_patient: sled::Tree,
    checkpoints: sled::Tree,
    replay: sled::Tree,
    trust: sled::Tree,
    meta: sled::Tree,
    flushes: Arc<GroupCommit>,
    journal: Arc<Journal>,
    journal_syncs: Arc<GroupCommit>,
    /// Writers of journalled state hold it shared; emptying the journal
    /// holds it alone, so nothing is written between sled's flush and the
    /// journal's truncation. Order: gate, then pending, then journal.
    journal_gate: Arc<RwLock<()>>,
    /// Audit writes journalled but not yet in sled, in log order. They are
    /// durable in the journal; sled gets them in one transaction once
    /// `APPLY_AT` are waiting, before any read of the audit trees, and on
    /// every flush, so many entries cost sled one write.
    pending: Arc<Mutex<Vec<PendingWrite>>>,
}

/// An audit write waiting to be applied to sled.
#[derive(Debug, Clone)]
enum PendingWrite {
    Entry {
        index: u64,
        entry: Vec<u8>,
        leaf: [u8; 32],
        patient: Option<NhsNumber>,
    },
    Checkpoint {
        size: u64,
        signed: Vec<u8>,
    },
}

/// The journal's file inside the store directory.
const JOURNAL_FILE: &str = "audit.journal";
/// Queued audit writes are applied to sled once this many wait.
const APPLY_AT: usize = 256;
/// The journal is emptied into sled past this size.
const JOURNAL_LIMIT: u64 = 3 * 1024 * 1024;

fn journal_error(e: std::io::Error) -> StoreError {
    StoreError::Io(format!("audit journal: {e}"))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    cbor::encode(value).map_err(corrupt)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    cbor::decode(bytes, Limits::MESSAGE).map_err(corrupt)
}

fn patient_key(nhs: &NhsNumber, record_key: &str) -> Vec<u8> {
    let mut key = nhs.digits().into_bytes();
    key.push(b'/');
    key.extend_from_slice(record_key.as_bytes());
    key
}

impl Store {
    /// Opens (or creates) the store with the given page cache size.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                let message = e.to_string();
                if message.contains("lock") || message.contains("Resource temporarily unavailable")
                {
                    StoreError::Locked {
                        path: shown.clone(),
                    }
                } else {
                    StoreError::Open {
                        path: shown.clone(),
                        message,
                    }
                }
            })?;
        let tree = |name: &str| db.open_tree(name);
        let (journal, held) =
            Journal::open(&path.join(JOURNAL_FILE)).map_err(|e| StoreError::Open {
                path: shown.clone(),
                message: format!("audit journal: {e}"),
            })?;
        let store = Self {
            records: tree(TREE_RECORDS)?,
            patient_index: tree(TREE_PATIENT_INDEX)?,
            flags: tree(TREE_FLAGS)?,
            audit: tree(TREE_AUDIT)?,
            audit_leaves: tree(TREE_AUDIT_LEAVES)?,
            audit_by_patient: tree(TREE_AUDIT_BY_PATIENT)?,
            checkpoints: tree(TREE_CHECKPOINTS)?,
            replay: tree(TREE_REPLAY)?,
            trust: tree(TREE_TRUST)?,
            meta: tree(TREE_META)?,
            db,
            flushes: Arc::new(GroupCommit::default()),
            journal: Arc::new(journal),
            journal_syncs: Arc::new(GroupCommit::default()),
            journal_gate: Arc::new(RwLock::new(())),
            pending: Arc::new(Mutex::new(Vec::new())),
        };
        store.check_schema()?;
        store.replay_journal(held)?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        match self.meta.get(META_SCHEMA)? {
            Some(bytes) => {
                let raw: [u8; 4] = bytes.as_ref().try_into().map_err(corrupt)?;
                let found = u32::from_be_bytes(raw);
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                self.meta
                    .insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                let mut salt = [0u8; 32];
                getrandom::fill(&mut salt).map_err(|e| StoreError::Io(e.to_string()))?;
                self.meta.insert(META_POINTER_SALT, &salt)?;
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Waits until everything written so far is on disk (sled's flush, which
    /// survives a process crash; see decision 0002 for power loss).
    /// Concurrent callers share flushes (group commit).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flushes.commit(|| {
            self.apply_pending()?;
            self.db.flush()?;
            Ok(())
        })
    }

    /// Makes every audit and replay-cache entry written so far durable
    /// through the journal (one `fdatasync`, shared by concurrent callers),
    /// and applies the waiting audit writes to sled once enough wait.
    /// Empties the journal into sled once it has grown large.
    pub fn sync_journal(&self) -> Result<(), StoreError> {
        self.journal_syncs
            .commit(|| self.journal.sync().map_err(journal_error))?;
        if self.pending_len() >= APPLY_AT {
            self.apply_pending()?;
        }
        if self.journal.len() > JOURNAL_LIMIT {
            self.empty_journal()?;
        }
        Ok(())
    }

    /// Makes everything in sled durable and empties the journal, with
    /// writers held off meanwhile.
    fn empty_journal(&self) -> Result<(), StoreError> {
        let _alone = self
            .journal_gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.flush()?;
        self.journal.reset().map_err(journal_error)
    }

    fn shared_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.journal_gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pending_len(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Applies every waiting audit write to sled in one transaction, in
    /// order. The lock is held throughout so two callers cannot reorder.
    fn apply_pending(&self) -> Result<(), StoreError> {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.apply_locked(&mut pending)
    }

    fn apply_locked(&self, pending: &mut Vec<PendingWrite>) -> Result<(), StoreError> {
        if pending.is_empty() {
            return Ok(());
        }
        let writes: &[PendingWrite] = pending;
        (
            &self.audit,
            &self.audit_leaves,
            &self.audit_by_patient,
            &self.checkpoints,
        )
            .transaction(|(audit, leaves, by_patient, checkpoints)| {
                for write in writes {
                    match write {
                        PendingWrite::Entry {
                            index,
                            entry,
                            leaf,
                            patient,
                        } => {
                            let key = index.to_be_bytes();
                            audit.insert(&key, entry.as_slice())?;
                            leaves.insert(&key, &leaf[..])?;
                            if let Some(nhs) = patient {
                                let mut pkey = nhs.digits().into_bytes();
                                pkey.extend_from_slice(&key);
                                by_patient.insert(pkey, &[])?;
                            }
                        }
                        PendingWrite::Checkpoint { size, signed } => {
                            checkpoints.insert(&size.to_be_bytes(), signed.as_slice())?;
                        }
                    }
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })?;
        pending.clear();
        Ok(())
    }

    /// Writes back into sled whatever the journal holds that sled lost in a
    /// crash, makes sled durable and empties the journal.
    fn replay_journal(&self, held: Vec<JournalRecord>) -> Result<(), StoreError> {
        if held.is_empty() {
            return Ok(());
        }
        let mut restored = 0;
        for record in held {
            match record {
                JournalRecord::Audit {
                    index,
                    leaf,
                    patient,
                    entry,
                } => {
                    let next = self.audit_len()?;
                    if index < next {
                        continue;
                    }
                    if index > next {
                        return Err(corrupt(format!(
                            "the audit journal holds entry {index} but the log ends at {next}"
                        )));
                    }
                    // Queued like a new entry; `empty_journal` below applies
                    // them all to sled in one transaction.
                    self.pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(PendingWrite::Entry {
                            index,
                            entry,
                            leaf,
                            patient,
                        });
                    restored += 1;
                }
                JournalRecord::Replay { key, expires } => {
                    let _ = self.replay.compare_and_swap(
                        key,
                        None as Option<&[u8]>,
                        Some(&expires.to_be_bytes()[..]),
                    )?;
                }
            }
        }
        if restored > 0 {
            tracing::warn!(
                restored,
                "audit entries restored from the journal after an unclean stop"
            );
        }
        self.empty_journal()
    }

    /// A per-store random salt for opaque pointer ids.
    pub fn pointer_salt(&self) -> Result<[u8; 32], StoreError> {
        let bytes = self
            .meta
            .get(META_POINTER_SALT)?
            .ok_or_else(|| corrupt("pointer salt is missing"))?;
        bytes.as_ref().try_into().map_err(corrupt)
    }

    // Records.

    /// The record stored under `ResourceType/id`.
    pub fn record(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredRecord>, StoreError> {
        self.records
            .get(record_key(resource_type, id))?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Applies a batch of record writes atomically, then flushes. Returns
    /// what each write did, in order.
    pub fn write_records(&self, writes: &[RecordWrite]) -> Result<Vec<WriteOutcome>, StoreError> {
        let encoded: Vec<Option<Vec<u8>>> = writes
            .iter()
            .map(|w| match w {
                RecordWrite::Put(r) => encode(r).map(Some),
                RecordWrite::Remove { .. } => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let outcomes = (&self.records, &self.patient_index).transaction(|(records, index)| {
            let mut outcomes = Vec::with_capacity(writes.len());
            for (write, bytes) in writes.iter().zip(&encoded) {
                let key = match write {
                    RecordWrite::Put(r) => r.key(),
                    RecordWrite::Remove { resource_type, id } => record_key(resource_type, id),
                };
                let old = records.get(key.as_bytes())?;
                if let Some(old) = &old {
                    let old: StoredRecord =
                        decode(old).map_err(ConflictableTransactionError::Abort)?;
                    index.remove(patient_key(&old.nhs_number, &key))?;
                }
                match (write, bytes) {
                    (RecordWrite::Put(r), Some(bytes)) => {
                        records.insert(key.as_bytes(), bytes.as_slice())?;
                        index.insert(patient_key(&r.nhs_number, &key), &[])?;
                        outcomes.push(if old.is_some() {
                            WriteOutcome::Replaced
                        } else {
                            WriteOutcome::Stored
                        });
                    }
                    _ => {
                        records.remove(key.as_bytes())?;
                        outcomes.push(if old.is_some() {
                            WriteOutcome::Removed
                        } else {
                            WriteOutcome::NotFound
                        });
                    }
                }
            }
            Ok(outcomes)
        })?;
        self.flush()?;
        Ok(outcomes)
    }

    /// Every record held for a patient.
    pub fn patient_records(&self, nhs: &NhsNumber) -> Result<Vec<StoredRecord>, StoreError> {
        let mut prefix = nhs.digits().into_bytes();
        prefix.push(b'/');
        let mut out = Vec::new();
        for item in self.patient_index.scan_prefix(&prefix) {
            let (key, _) = item?;
            let record_key = key
                .get(prefix.len()..)
                .ok_or_else(|| corrupt("index key"))?;
            match self.records.get(record_key)? {
                Some(bytes) => out.push(decode(&bytes)?),
                None => return Err(corrupt("index names a missing record")),
            }
        }
        Ok(out)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Number of records held.
    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    /// Number of patients with at least one record.
    pub fn patient_count(&self) -> Result<usize, StoreError> {
        let mut count = 0;
        let mut last: Option<Vec<u8>> = None;
        for item in self.patient_index.iter() {
            let (key, _) = item?;
            let nhs = key.get(..10).ok_or_else(|| corrupt("index key"))?.to_vec();
            if last.as_ref() != Some(&nhs) {
                count += 1;
                last = Some(nhs);
            }
        }
        Ok(count)
    }

    /// Checks that records and the patient index agree and every record
    /// decodes: what a crash must never break. Returns the record count.
    pub fn check_consistency(&self) -> Result<usize, StoreError> {
        let mut records = 0;
        for item in self.records.iter() {
            let (key, bytes) = item?;
            let record: StoredRecord = decode(&bytes)?;
            if record.key().as_bytes() != key.as_ref() {
                return Err(corrupt(format!(
                    "record stored under the wrong key {}",
                    String::from_utf8_lossy(&key)
                )));
            }
            if !self
                .patient_index
                .contains_key(patient_key(&record.nhs_number, &record.key()))?
            {
                return Err(corrupt(format!(
                    "record {} has no index entry",
                    record.key()
                )));
            }
            records += 1;
        }
        let mut indexed = 0;
        for item in self.patient_index.iter() {
            let (key, _) = item?;
            let record_key = key.get(11..).ok_or_else(|| corrupt("index key"))?;
            if !self.records.contains_key(record_key)? {
                return Err(corrupt(format!(
                    "index names missing record {}",
                    String::from_utf8_lossy(record_key)
                )));
            }
            indexed += 1;
        }
        if indexed != records {
            return Err(corrupt(format!(
                "{records} records but {indexed} index entries"
            )));
        }
        Ok(records)
    }

    // Patient flags.

    /// A patient's flags (default: none).
    pub fn flags(&self, nhs: &NhsNumber) -> Result<PatientFlags, StoreError> {
        self.flags
            .get(nhs.digits())?
            .map(|b| decode(&b))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Sets a patient's flags, flushed before returning.
    pub fn set_flags(&self, nhs: &NhsNumber, flags: &PatientFlags) -> Result<(), StoreError> {
        if flags.restricted || flags.objected {
            self.flags.insert(nhs.digits(), encode(flags)?)?;
        } else {
            self.flags.remove(nhs.digits())?;
        }
        self.flush()
    }

    // Replay cache.

    /// Records `(iss, cti)` until `expires`. Returns true if it was already
    /// there (a replay). The entry is journalled and made durable with the
    /// audit write that follows every verified request.
    pub fn seen_before(
        &self,
        iss: &OdsCode,
        cti: &[u8; 16],
        expires: u64,
    ) -> Result<bool, StoreError> {
        let mut key = iss.as_str().as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(cti);
        let _gate = self.shared_gate();
        let inserted = self.replay.compare_and_swap(
            key.clone(),
            None as Option<&[u8]>,
            Some(&expires.to_be_bytes()[..]),
        )?;
        if inserted.is_err() {
            return Ok(true);
        }
        self.journal
            .append(&JournalRecord::Replay { key, expires })
            .map_err(journal_error)?;
        Ok(false)
    }

    /// Drops replay entries that expired before `before`. Returns how many.
    pub fn purge_replay(&self, before: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for item in self.replay.iter() {
            let (key, value) = item?;
            let raw: [u8; 8] = value.as_ref().try_into().map_err(corrupt)?;
            if u64::from_be_bytes(raw) < before {
                self.replay.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of live replay entries.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    // Trust state.

    /// Stored trust bytes under `name` (`root` or `list`).
    pub fn trust_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.trust.get(name)?.map(|b| b.to_vec()))
    }

    /// Stores trust bytes, flushed before returning.
    pub fn set_trust_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.trust.insert(name, bytes)?;
        self.flush()
    }

    // Audit log.

    /// Number of audit entries.
    pub fn audit_len(&self) -> Result<u64, StoreError> {
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .rev()
            .find_map(|w| match w {
                PendingWrite::Entry { index, .. } => Some(*index + 1),
                PendingWrite::Checkpoint { .. } => None,
            });
        if let Some(len) = waiting {
            return Ok(len);
        }
        match self.audit.last()? {
            Some((key, _)) => Ok(index_of(&key)? + 1),
            None => Ok(0),
        }
    }

    /// Journals audit entry `index` (the next one, which the caller's lock
    /// guarantees) and queues it, its leaf hash and its patient index for
    /// sled. Not yet durable: the caller calls [`Store::sync_journal`] before
    /// it counts on the entry.
    pub fn append_audit(
        &self,
        index: u64,
        entry: &[u8],
        leaf_hash: &[u8; 32],
        patient: Option<&NhsNumber>,
    ) -> Result<(), StoreError> {
        let _gate = self.shared_gate();
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.journal
            .append(&JournalRecord::Audit {
                index,
                leaf: *leaf_hash,
                patient: patient.copied(),
                entry: entry.to_vec(),
            })
            .map_err(journal_error)?;
        pending.push(PendingWrite::Entry {
            index,
            entry: entry.to_vec(),
            leaf: *leaf_hash,
            patient: patient.copied(),
        });
        // A bound even for callers that append many entries before a sync.
        if pending.len() >= 4 * APPLY_AT {
            self.apply_locked(&mut pending)?;
        }
        Ok(())
    }

    /// Every audit entry with its recorded leaf hash, in order.
    pub fn audit_entries(
        &self,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>, [u8; 32]), StoreError>> + '_ {
        // Queued entries first, so the iteration sees the whole log.
        let settled = self.apply_pending().err().map(Err);
        settled
            .into_iter()
            .chain(self.audit.iter().map(move |item| {
                let (key, entry) = item?;
                let index = index_of(&key)?;
                let leaf = self
                    .audit_leaves
                    .get(&key)?
                    .ok_or_else(|| corrupt(format!("audit entry {index} has no leaf hash")))?;
                let leaf: [u8; 32] = leaf.as_ref().try_into().map_err(corrupt)?;
                Ok((index, entry.to_vec(), leaf))
            }))
    }

    /// The audit entry at `index`.
    pub fn audit_entry(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(bytes) = self.audit.get(index.to_be_bytes())? {
            return Ok(Some(bytes.to_vec()));
        }
        Ok(self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find_map(|w| match w {
                PendingWrite::Entry {
                    index: i, entry, ..
                } if *i == index => Some(entry.clone()),
                _ => None,
            }))
    }

    /// Indexes of a patient's audit entries.
    pub fn audit_for_patient(&self, nhs: &NhsNumber) -> Result<Vec<u64>, StoreError> {
        self.apply_pending()?;
        let prefix = nhs.digits().into_bytes();
        self.audit_by_patient
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, _) = item?;
                index_of(
                    key.get(prefix.len()..)
                        .ok_or_else(|| corrupt("audit index key"))?,
                )
            })
            .collect()
    }

    /// Queues a signed checkpoint for a log size behind the entries it
    /// covers, so sled never holds a checkpoint without its entries. Stored
    /// by the next journal sync or flush.
    pub fn put_checkpoint(&self, size: u64, signed: &[u8]) -> Result<(), StoreError> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(PendingWrite::Checkpoint {
                size,
                signed: signed.to_vec(),
            });
        Ok(())
    }

    /// Every checkpoint, by size.
    pub fn checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.apply_pending()?;
        self.checkpoints
            .iter()
            .map(|item| {
                let (key, value) = item?;
                Ok((index_of(&key)?, value.to_vec()))
            })
            .collect()
    }

    /// Overwrites an audit entry's bytes (for tamper tests and nothing else).
    #[doc(hidden)]
    pub fn tamper_audit_entry(&self, index: u64, entry: &[u8]) -> Result<(), StoreError> {
        self.audit.insert(index.to_be_bytes(), entry)?;
        self.flush()
    }
}

fn index_of(key: &[u8]) -> Result<u64, StoreError> {
    let raw: [u8; 8] = key.try_into().map_err(corrupt)?;
    Ok(u64::from_be_bytes(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(nhs: &str, id: &str) -> StoredRecord {
        StoredRecord {
            nhs_number: NhsNumber::parse(nhs).unwrap(),
            section: Section::Problems,
            resource_type: "Condition".into(),
            id: id.into(),
            version: "1".into(),
            date: None,
            very_restricted: false,
            sensitive_categories: vec![],
            document_type: None,
            signed: vec![1, 2, 3],
        }
    }

    #[test]
    fn records_are_indexed_by_patient_and_replaced_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let a = NhsNumber::parse("9990000018").unwrap();
        let out = store
            .write_records(&[
                RecordWrite::Put(record("9990000018", "c1")),
                RecordWrite::Put(record("9990000018", "c2")),
            ])
            .unwrap();
        assert_eq!(out, [WriteOutcome::Stored, WriteOutcome::Stored]);
        assert_eq!(store.patient_records(&a).unwrap().len(), 2);
        // c2 moves to another patient: the old index entry goes.
        let b = NhsNumber::from_stem(999_000_002).unwrap();
        let out = store
            .write_records(&[RecordWrite::Put(record(&b.digits(), "c2"))])
            .unwrap();
        assert_eq!(out, [WriteOutcome::Replaced]);
        assert_eq!(store.patient_records(&a).unwrap().len(), 1);
        assert_eq!(store.patient_records(&b).unwrap().len(), 1);
        let out = store
            .write_records(&[
                RecordWrite::Remove {
                    resource_type: "Condition".into(),
                    id: "c1".into(),
                },
                RecordWrite::Remove {
                    resource_type: "Condition".into(),
                    id: "nope".into(),
                },
            ])
            .unwrap();
        assert_eq!(out, [WriteOutcome::Removed, WriteOutcome::NotFound]);
        assert!(store.patient_records(&a).unwrap().is_empty());
        assert_eq!(store.patient_count().unwrap(), 1);
    }

    #[test]
    fn schema_version_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            store.meta.insert(META_SCHEMA, &7u32.to_be_bytes()).unwrap();
            store.flush().unwrap();
        }
        let err = Store::open(dir.path(), 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Schema {
                    found: 7,
                    expected: 1
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_store_held_elsewhere_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Store::open(dir.path(), 1 << 20).unwrap();
        // sled's lock is per process and file; a second open in the same
        // process reports it the same way another process would see it.
        match Store::open(dir.path(), 1 << 20) {
            Err(StoreError::Locked { .. }) => {}
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => {} // Some platforms allow re-opening within one process.
        }
    }

    #[test]
    fn audit_entries_survive_the_journal_being_emptied_into_sled() {
        let dir = tempfile::tempdir().unwrap();
        let nhs = NhsNumber::parse("9990000018").unwrap();
        let entry = |i: u64| {
            let mut bytes = vec![(i % 251) as u8; 4096];
            bytes.extend_from_slice(&i.to_be_bytes());
            bytes
        };
        let count = 1200u64;
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            let mut emptied = 0;
            for i in 0..count {
                let before = store.journal.len();
                store
                    .append_audit(i, &entry(i), &[i as u8; 32], Some(&nhs))
                    .unwrap();
                store.sync_journal().unwrap();
                if store.journal.len() < before {
                    emptied += 1;
                }
                // Queued or in sled, every entry reads back at once.
                assert_eq!(store.audit_len().unwrap(), i + 1);
                assert_eq!(store.audit_entry(i).unwrap(), Some(entry(i)));
            }
            assert!(emptied >= 1, "4.8 MB of entries never emptied the journal");
            assert!(store.journal.len() <= JOURNAL_LIMIT);
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.audit_len().unwrap(), count);
        let all: Vec<_> = store.audit_entries().map(Result::unwrap).collect();
        assert_eq!(all.len() as u64, count);
        for (i, (index, bytes, leaf)) in all.into_iter().enumerate() {
            assert_eq!(index, i as u64);
            assert_eq!(bytes, entry(index));
            assert_eq!(leaf, [index as u8; 32]);
        }
        assert_eq!(store.audit_for_patient(&nhs).unwrap().len() as u64, count);
    }

    #[test]
    fn replay_cache_remembers_until_purged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let ods = OdsCode::parse("QHG").unwrap();
        assert!(!store.seen_before(&ods, &[1; 16], 100).unwrap());
        assert!(store.seen_before(&ods, &[1; 16], 100).unwrap());
        assert!(
            !store
                .seen_before(&OdsCode::parse("QUE").unwrap(), &[1; 16], 100)
                .unwrap()
        );
        assert_eq!(store.purge_replay(101).unwrap(), 2);
        assert!(!store.seen_before(&ods, &[1; 16], 200).unwrap());
    }

    #[test]
    fn flags_default_to_none_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let nhs = NhsNumber::parse("9990000018").unwrap();
        assert_eq!(store.flags(&nhs).unwrap(), PatientFlags::default());
        let flags = PatientFlags {
            restricted: true,
            ..PatientFlags::default()
        };
        store.set_flags(&nhs, &flags).unwrap();
        assert!(store.flags(&nhs).unwrap().restricted);
        store.set_flags(&nhs, &PatientFlags::default()).unwrap();
        assert_eq!(store.flags(&nhs).unwrap(), PatientFlags::default());
    }
}
