//! The node's audit log: every locate and fetch, inbound and outbound,
//! allowed or refused, appended to an RFC 6962 Merkle log before any data
//! leaves, with checkpoints signed by the log key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use careweave_protocol::audit::{self, Checkpoint, CompactRange, Hash};
use careweave_protocol::cbor::{self, Limits};
use careweave_protocol::message::{RequesterContext, Section, WithheldReason};
use careweave_protocol::{KeyPair, NhsNumber, OdsCode, PublicKey};
use serde::{Deserialize, Serialize};

use crate::store::{AuditItem, Store, StoreError};

/// Which way a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Another node asked us.
    Inbound,
    /// We asked another node (the request is logged before it is sent).
    OutboundRequest,
    /// Another node's answer to our request (logged before it is handed on).
    OutboundResponse,
}

/// One audit entry: who, about whom, what, when, why and the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub time: u64,
    pub direction: Direction,
    /// `locate`, `fetch` or `trust`.
    pub protocol: String,
    /// The other node, when known.
    pub peer_ods: Option<OdsCode>,
    pub peer_id: String,
    /// Who asked and why, when the request could be read.
    pub context: Option<RequesterContext>,
    pub nhs_number: Option<NhsNumber>,
    /// `answered`, `no-records`, `not-shared`, `withheld`, `refused`, `sent`, `failed`.
    pub outcome: String,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    /// Pointer ids or record keys released.
    pub released: Vec<String>,
    pub withheld: Vec<WithheldReason>,
    /// SHA-256 of the signed request's bytes.
    #[serde(with = "serde_bytes")]
    pub request_hash: Vec<u8>,
    /// Emergency access was used.
    pub emergency: bool,
    /// Sections the sharing agreement kept from the requester (absent in
    /// entries written before agreements existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_shared: Vec<Section>,
}

/// Audit failures. When an append fails, nothing may be released.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}")]
    Store(#[from] StoreError),
    #[error("audit entry could not be encoded: {0}")]
    Encode(String),
    #[error("checkpoint could not be signed: {0}")]
    Sign(String),
}

/// Where `audit verify` found the log wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyFailure {
    #[error(
        "entry {index} was altered: its bytes no longer match the hash recorded when it was appended"
    )]
    EntryAltered { index: u64 },
    #[error(
        "checkpoint at size {size} does not match the entries (entries before {size} were altered)"
    )]
    RootMismatch { size: u64 },
    #[error("checkpoint at size {size} is not validly signed by this node's log key: {message}")]
    BadCheckpoint { size: u64, message: String },
    #[error("checkpoint at size {size} claims size {claimed}")]
    SizeMismatch { size: u64, claimed: u64 },
    #[error(
        "checkpoint at size {size} is larger than the log ({len} entries): entries were removed"
    )]
    Truncated { size: u64, len: u64 },
    #[error("entry {index} cannot be read: {message}")]
    Unreadable { index: u64, message: String },
}

/// What `audit verify` checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub entries: u64,
    pub checkpoints: usize,
    pub root: String,
}

struct LogState {
    range: CompactRange,
    last_checkpoint_size: u64,
    last_checkpoint_time: u64,
}

impl LogState {
    /// Entries were added since the last checkpoint.
    fn has_unsigned_entries(&self) -> bool {
        self.range.size() != self.last_checkpoint_size
    }

    /// Entries since the last checkpoint, and that one old enough (or none yet).
    fn due(&self, every_secs: u64, now: u64) -> bool {
        self.has_unsigned_entries() && now.saturating_sub(self.last_checkpoint_time) >= every_secs
    }
}

/// The append side of the log.
pub struct AuditLog {
    store: Store,
    log_key: KeyPair,
    ods: OdsCode,
    origin: String,
    every_entries: u64,
    every_secs: u64,
    state: Mutex<LogState>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The log's origin string, naming network and node.
pub fn origin(network: &str, ods: &OdsCode) -> String {
    format!("careweave/{network}/{ods}/audit")
}

impl AuditLog {
    /// Opens the log, taking its right edge from the store (the sealed
    /// segments' peaks and the newest segment's leaves).
    pub fn open(
        store: Store,
        log_key: KeyPair,
        ods: OdsCode,
        origin: String,
        every_entries: u64,
        every_secs: u64,
    ) -> Result<Self, AuditError> {
        let range = store.audit_range();
        let last = store.latest_checkpoint()?.map_or(0, |(size, _)| size);
        Ok(Self {
            store,
            log_key,
            ods,
            origin,
            every_entries,
            every_secs,
            state: Mutex::new(LogState {
                range,
                last_checkpoint_size: last,
                last_checkpoint_time: 0,
            }),
        })
    }

    /// Appends an entry and makes it durable; signs a checkpoint when one is
    /// due. Returns the entry's index. An error means the entry is not in
    /// the log and the caller must not release data.
    ///
    /// The lock covers only the in-memory tree and the write; the journal
    /// sync comes after it, so concurrent appends share one sync.
    pub fn append(&self, entry: &AuditEntry) -> Result<u64, AuditError> {
        let index = self.append_deferred(entry)?;
        self.sync()?;
        Ok(index)
    }

    /// Appends an entry without waiting for it to be durable. The caller
    /// must call [`AuditLog::sync`] before releasing anything the entry
    /// records; several entries can then share one sync.
    pub fn append_deferred(&self, entry: &AuditEntry) -> Result<u64, AuditError> {
        let bytes = cbor::encode(entry).map_err(|e| AuditError::Encode(e.to_string()))?;
        let leaf = audit::leaf_hash(&bytes);
        let mut state = self.lock_state();
        let index = state.range.size();
        self.store
            .append_audit(index, &bytes, &leaf, entry.nhs_number.as_ref())?;
        state.range.append(leaf);
        if state.last_checkpoint_time == 0 {
            state.last_checkpoint_time = entry.time;
        }
        let due = state.range.size() - state.last_checkpoint_size >= self.every_entries
            || entry.time.saturating_sub(state.last_checkpoint_time) >= self.every_secs;
        if due {
            self.checkpoint_locked(&mut state, entry.time)?;
        }
        Ok(index)
    }

    /// Makes every entry appended so far durable.
    pub fn sync(&self) -> Result<(), AuditError> {
        self.store.sync_audit()?;
        Ok(())
    }

    /// Signs a checkpoint if entries were added since the last one and
    /// `checkpoint_every_secs` have passed since it, and makes it durable.
    /// Entries alone bring one on as they are appended; this covers a log
    /// that has gone quiet. Returns the size it covers, if one was signed.
    pub fn checkpoint_if_due(&self, now: u64) -> Result<Option<u64>, AuditError> {
        let signed = self.sign_checkpoint_if(now, |state| state.due(self.every_secs, now))?;
        if signed.is_some() {
            // The audit sync, not a whole store flush: it makes the checkpoint
            // durable and records it as the newest without waking sled's flusher.
            self.sync()?;
        }
        Ok(signed)
    }

    /// Whether [`AuditLog::checkpoint_if_due`] would sign one now.
    pub fn checkpoint_is_due(&self, now: u64) -> bool {
        self.lock_state().due(self.every_secs, now)
    }

    /// Signs a checkpoint now if entries were added since the last one, and
    /// flushes the whole store. For shutdown and tests.
    pub fn checkpoint(&self, now: u64) -> Result<Option<u64>, AuditError> {
        let signed = self.sign_checkpoint_if(now, LogState::has_unsigned_entries)?;
        if signed.is_some() {
            self.store.flush()?;
        }
        Ok(signed)
    }

    /// Signs a checkpoint (not yet durable) if `wanted` says so, under the
    /// lock. Returns the size it covers.
    fn sign_checkpoint_if(
        &self,
        now: u64,
        wanted: impl FnOnce(&LogState) -> bool,
    ) -> Result<Option<u64>, AuditError> {
        let mut state = self.lock_state();
        if !wanted(&state) {
            return Ok(None);
        }
        self.checkpoint_locked(&mut state, now).map(Some)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn checkpoint_locked(&self, state: &mut LogState, now: u64) -> Result<u64, AuditError> {
        let size = state.range.size();
        let checkpoint = Checkpoint {
            origin: self.origin.clone(),
            size,
            root: state.range.root(),
        };
        let signed = audit::sign_checkpoint(&checkpoint, &self.ods, now, &self.log_key)
            .map_err(|e| AuditError::Sign(e.to_string()))?;
        self.store.put_checkpoint(size, &signed)?;
        state.last_checkpoint_size = size;
        state.last_checkpoint_time = now;
        Ok(size)
    }

    /// The number of entries.
    pub fn len(&self) -> u64 {
        self.lock_state().range.size()
    }

    /// When the last checkpoint was signed (Unix seconds; 0 for none yet).
    pub fn last_checkpoint_time(&self) -> u64 {
        self.lock_state().last_checkpoint_time
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Recomputes the tree from the stored entries and checks every checkpoint:
/// its signature by `log_key` and its root against the entries.
///
/// One pass, with only the tree's peaks and the checkpoints not yet reached
/// in memory: a checkpoint is written just after the entry that brought the
/// log to its size, so its root is compared as it is read. Two checkpoints
/// whose roots both match prefixes of the same entries are consistent with
/// each other by construction, so no consistency proofs are needed between
/// them. A checkpoint found after the log had grown past its size (which
/// the node never writes) costs a second pass.
pub fn verify(store: &Store, log_key: &PublicKey) -> Result<VerifyReport, VerifyFailure> {
    let unreadable = |index: u64, e: &dyn std::fmt::Display| VerifyFailure::Unreadable {
        index,
        message: e.to_string(),
    };
    let root_of = |size: u64, signed: &[u8]| -> Result<Hash, VerifyFailure> {
        let verified = audit::verify_checkpoint(signed, log_key).map_err(|e| {
            VerifyFailure::BadCheckpoint {
                size,
                message: e.to_string(),
            }
        })?;
        if verified.checkpoint.size != size {
            return Err(VerifyFailure::SizeMismatch {
                size,
                claimed: verified.checkpoint.size,
            });
        }
        Ok(verified.checkpoint.root)
    };
    // Roots still to compare, by size. Checkpoints since sled stopped
    // keeping them are in the files only; earlier ones may be in both.
    let mut due = BTreeMap::new();
    let mut late = BTreeMap::new();
    let mut legacy = BTreeSet::new();
    let mut checkpoints = 0usize;
    let expect =
        |roots: &mut BTreeMap<u64, Hash>, size: u64, root: Hash| match roots.insert(size, root) {
            Some(other) if other != root => Err(VerifyFailure::RootMismatch { size }),
            _ => Ok(()),
        };
    for (size, signed) in store.legacy_checkpoints().map_err(|e| unreadable(0, &e))? {
        expect(&mut due, size, root_of(size, &signed)?)?;
        legacy.insert(size);
    }
    let mut range = CompactRange::default();
    compare_due(&range, &mut due)?;
    for item in store.audit_items() {
        match item.map_err(|e| unreadable(range.size(), &e))? {
            AuditItem::Entry { index, bytes, leaf } => {
                if index != range.size() {
                    return Err(unreadable(range.size(), &"entry is missing"));
                }
                if audit::leaf_hash(&bytes) != leaf {
                    return Err(VerifyFailure::EntryAltered { index });
                }
                range.append(leaf);
            }
            AuditItem::Checkpoint { size, signed } => {
                let root = root_of(size, &signed)?;
                if !legacy.contains(&size) {
                    checkpoints += 1;
                }
                if size < range.size() {
                    expect(&mut late, size, root)?;
                } else {
                    expect(&mut due, size, root)?;
                }
            }
        }
        compare_due(&range, &mut due)?;
    }
    if let Some((size, _)) = due.first_key_value() {
        return Err(VerifyFailure::Truncated {
            size: *size,
            len: range.size(),
        });
    }
    if !late.is_empty() {
        let mut again = CompactRange::default();
        compare_due(&again, &mut late)?;
        for item in store.audit_entries() {
            let (_, _, leaf) = item.map_err(|e| unreadable(again.size(), &e))?;
            again.append(leaf);
            compare_due(&again, &mut late)?;
        }
    }
    Ok(VerifyReport {
        entries: range.size(),
        checkpoints: checkpoints + legacy.len(),
        root: hex::encode(range.root()),
    })
}

/// Compares and forgets the root expected at the tree's current size.
fn compare_due(range: &CompactRange, due: &mut BTreeMap<u64, Hash>) -> Result<(), VerifyFailure> {
    if let Some(root) = due.remove(&range.size())
        && root != range.root()
    {
        return Err(VerifyFailure::RootMismatch { size: range.size() });
    }
    Ok(())
}

/// One exported entry with its proof.
#[derive(Debug, Clone, Serialize)]
pub struct ExportedEntry {
    pub index: u64,
    pub entry: AuditEntry,
    /// SHA-256 leaf hash, hex.
    pub leaf_hash: String,
    /// Inclusion proof against `checkpoint`, hex hashes; absent when the
    /// entry is newer than the latest checkpoint.
    pub inclusion_proof: Option<Vec<String>>,
}

/// A patient's entries, each with an inclusion proof against the latest checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    pub nhs_number: String,
    /// The latest signed checkpoint (COSE_Sign1, hex) and its size and root.
    pub checkpoint: Option<ExportedCheckpoint>,
    pub entries: Vec<ExportedEntry>,
}

/// A checkpoint in an export.
#[derive(Debug, Clone, Serialize)]
pub struct ExportedCheckpoint {
    pub size: u64,
    pub root: String,
    pub signed: String,
}

/// Builds a patient's export.
pub fn export(store: &Store, nhs: &NhsNumber) -> Result<Export, AuditError> {
    let mut leaves = Vec::new();
    for item in store.audit_entries() {
        let (_, _, leaf) = item?;
        leaves.push(leaf);
    }
    let checkpoint = store.latest_checkpoint()?;
    let (size, exported_checkpoint) = match &checkpoint {
        Some((size, signed)) => {
            let prefix = usize::try_from(*size)
                .ok()
                .and_then(|n| leaves.get(..n))
                .unwrap_or(&leaves);
            (
                *size,
                Some(ExportedCheckpoint {
                    size: *size,
                    root: hex::encode(audit::root(prefix)),
                    signed: hex::encode(signed),
                }),
            )
        }
        None => (0, None),
    };
    let prefix = usize::try_from(size)
        .ok()
        .and_then(|n| leaves.get(..n))
        .unwrap_or(&[]);
    let mut entries = Vec::new();
    for (index, bytes) in store.audit_for_patient(nhs)? {
        let entry: AuditEntry = cbor::decode(&bytes, Limits::MESSAGE)
            .map_err(|e| AuditError::Store(StoreError::Corrupt(e.to_string())))?;
        let inclusion_proof = if index < size {
            audit::inclusion_proof(prefix, index)
                .ok()
                .map(|p| p.iter().map(hex::encode).collect())
        } else {
            None
        };
        entries.push(ExportedEntry {
            index,
            leaf_hash: hex::encode(audit::leaf_hash(&bytes)),
            entry,
            inclusion_proof,
        });
    }
    Ok(Export {
        nhs_number: nhs.digits(),
        checkpoint: exported_checkpoint,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            time: 1_800_000_000 + i,
            direction: Direction::Inbound,
            protocol: "locate".into(),
            peer_ods: None,
            peer_id: String::new(),
            context: None,
            nhs_number: None,
            outcome: "no-records".into(),
            reason: None,
            released: vec![],
            withheld: vec![],
            request_hash: vec![0; 32],
            emergency: false,
            not_shared: vec![],
        }
    }

    fn log(dir: &std::path::Path) -> (AuditLog, KeyPair, OdsCode) {
        let store = Store::open(dir, 1 << 20).unwrap();
        let key = KeyPair::from_secret_bytes(&[5; 32]);
        let ods = OdsCode::parse("QUE").unwrap();
        let copy = KeyPair::from_secret_bytes(&[5; 32]);
        let origin = origin("test", &ods);
        let log = AuditLog::open(store, copy, ods.clone(), origin, 3, 3600).unwrap();
        (log, key, ods)
    }

    /// A log in a fresh directory with `count` entries appended.
    fn log_with_entries(count: u64) -> (tempfile::TempDir, AuditLog, KeyPair, OdsCode) {
        let dir = tempfile::tempdir().unwrap();
        let (log, key, ods) = log(dir.path());
        for i in 0..count {
            log.append(&entry(i)).unwrap();
        }
        (dir, log, key, ods)
    }

    fn signed(log: &AuditLog, key: &KeyPair, ods: &OdsCode, size: u64, root: Hash) -> Vec<u8> {
        let checkpoint = Checkpoint {
            origin: log.origin.clone(),
            size,
            root,
        };
        audit::sign_checkpoint(&checkpoint, ods, 1_800_000_100, key).unwrap()
    }

    #[test]
    fn checkpoints_are_checked_against_the_entries_in_one_pass() {
        let (_dir, log, key, ods) = log_with_entries(10);
        let report = verify(&log.store, &key.public_key()).unwrap();
        assert_eq!((report.entries, report.checkpoints), (10, 3));

        // A checkpoint whose root is not the entries' root at its size.
        log.store
            .put_checkpoint(4, &signed(&log, &key, &ods, 4, [9; 32]))
            .unwrap();
        assert_eq!(
            verify(&log.store, &key.public_key()),
            Err(VerifyFailure::RootMismatch { size: 4 })
        );
    }

    #[test]
    fn a_quiet_log_is_checkpointed_once_the_interval_has_passed() {
        // Every 3 entries or 3600 s: 10 entries leave one past the last checkpoint.
        let (_dir, log, key, _) = log_with_entries(10);
        let last = log.last_checkpoint_time();
        assert_eq!(log.store.latest_checkpoint().unwrap().unwrap().0, 9);
        assert!(!log.checkpoint_is_due(last + 3599));
        assert_eq!(log.checkpoint_if_due(last + 3599).unwrap(), None);

        assert!(log.checkpoint_is_due(last + 3600));
        assert_eq!(log.checkpoint_if_due(last + 3600).unwrap(), Some(10));
        // Durable and recorded as the newest, without a store flush.
        assert_eq!(log.store.latest_checkpoint().unwrap().unwrap().0, 10);
        let report = verify(&log.store, &key.public_key()).unwrap();
        assert_eq!((report.entries, report.checkpoints), (10, 4));

        // Nothing new since: nothing to sign, however long it stays quiet.
        assert!(!log.checkpoint_is_due(last + 100_000));
        assert_eq!(log.checkpoint_if_due(last + 100_000).unwrap(), None);
    }

    #[test]
    fn a_checkpoint_past_the_end_means_entries_were_removed() {
        let (_dir, log, key, ods) = log_with_entries(4);
        log.store
            .put_checkpoint(40, &signed(&log, &key, &ods, 40, [1; 32]))
            .unwrap();
        assert_eq!(
            verify(&log.store, &key.public_key()),
            Err(VerifyFailure::Truncated { size: 40, len: 4 })
        );
    }

    #[test]
    fn checkpoints_kept_in_sled_by_older_stores_are_still_checked() {
        let (_dir, log, key, ods) = log_with_entries(10);
        let written = verify(&log.store, &key.public_key()).unwrap();
        // An older store: every checkpoint also in sled. Counted once.
        let mut size = 0;
        for item in log.store.audit_items() {
            match item.unwrap() {
                AuditItem::Entry { index, .. } => size = index + 1,
                AuditItem::Checkpoint { size: at, signed } => {
                    assert_eq!(at, size);
                    crate::store::put_legacy_checkpoint(&log.store, at, &signed);
                }
            }
        }
        assert_eq!(verify(&log.store, &key.public_key()), Ok(written.clone()));

        // One that only sled holds (a store moved from schema 1), wrong.
        crate::store::put_legacy_checkpoint(&log.store, 5, &signed(&log, &key, &ods, 5, [9; 32]));
        assert_eq!(
            verify(&log.store, &key.public_key()),
            Err(VerifyFailure::RootMismatch { size: 5 })
        );
    }
}
