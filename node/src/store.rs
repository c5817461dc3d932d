//! The node's store: a sled database with named trees and a schema version
//! for records, flags, the replay cache and trust, and append-only segment
//! files for the audit log (`store/audit/`, kept by the private `segments`
//! module).
//!
//! Every write that is acknowledged has been made durable first (see
//! `docs/decisions/0002-sled-durability.md` and `0013-audit-segments.md`).
//! A record and its index entry go in one sled transaction, so a crash
//! never leaves half.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use careweave_protocol::cbor::{self, Limits};
use careweave_protocol::message::{Coding, Section};
use careweave_protocol::{NhsNumber, OdsCode};
use serde::{Deserialize, Serialize};
use sled::Transactional;

use crate::group_commit::GroupCommit;
use crate::segments::{LogItem, LogRecord, Recovered, SEGMENT_LIMIT, SegmentError, Segments};
use sled::transaction::{ConflictableTransactionError, TransactionError};

/// The schema this code reads and writes. Version 1 kept the audit log in
/// sled; it is moved into segment files when opened.
pub const SCHEMA_VERSION: u32 = 2;

const TREE_RECORDS: &str = "records";
const TREE_PATIENT_INDEX: &str = "patient_index";
const TREE_FLAGS: &str = "patient_flags";
// Schema 1's audit trees, read only to move them into segments.
const V1_TREE_AUDIT: &str = "audit";
const V1_TREE_AUDIT_LEAVES: &str = "audit_leaves";
const V1_TREE_AUDIT_BY_PATIENT: &str = "audit_by_patient";
const V1_JOURNAL_FILE: &str = "audit.journal";
/// Every signed checkpoint up to the change that made the audit segments
/// their only home. No longer written: at thousands of entries a second it
/// grew by a checkpoint every 100 entries, and so did sled's memory. Still
/// read, because a store moved from schema 1 has its older checkpoints only
/// here.
const TREE_CHECKPOINTS: &str = "audit_checkpoints";
const TREE_REPLAY: &str = "replay_cache";
const TREE_TRUST: &str = "trust";
const TREE_META: &str = "meta";

/// How often sled's own thread flushes, fsyncs and cleans its files.
/// Nothing relies on it for durability: every write that is acknowledged
/// is flushed (or synced in the audit files) first. sled's default of
/// 500 ms made every node fsync twice a second, changes or not, and those
/// device flushes queued behind and ahead of the audit syncs that answers
/// wait for. Its cleaning gets the same share of each interval either way.
const BACKGROUND_FLUSH_MS: u64 = 5_000;

/// The file in the store directory that sled locks while it is open.
const SLED_DATA_FILE: &str = "db";

const META_SCHEMA: &[u8] = b"schema_version";
const META_POINTER_SALT: &[u8] = b"pointer_salt";
/// The newest durable signed checkpoint: its size (8 bytes, big-endian),
/// then the signed bytes.
const META_LATEST_CHECKPOINT: &[u8] = b"latest_checkpoint";
/// When the database was last opened again after a write failure.
const META_REOPENED: &[u8] = b"reopened_at";

/// Problems with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store at {path} is in use by another process (is the node already running?)")]
    Locked { path: String },
    #[error(
        "the store at {path} was closed but its lock was still held {waited_ms} ms later (is another handle to it still open?)"
    )]
    NotReleased { path: String, waited_ms: u128 },
    #[error("the store at {path} cannot be opened: {message}")]
    Open { path: String, message: String },
    #[error("the store has schema version {found}; this careweave-node reads version {expected}")]
    Schema { found: u32, expected: u32 },
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error(
        "the store's database closed when a write failed {failed_seconds_ago} s ago ({cause}); it is opened again, without a restart, once writes succeed"
    )]
    Closed {
        failed_seconds_ago: u64,
        cause: String,
    },
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

impl From<SegmentError> for StoreError {
    fn from(e: SegmentError) -> Self {
        match e {
            SegmentError::Io(e) => StoreError::Io(format!("audit files: {e}")),
            SegmentError::Damaged(message) => {
                StoreError::Corrupt(format!("audit files: {message}"))
            }
        }
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

/// The sled database and its trees. sled keeps the first write error it
/// meets (a full disk) and fails everything after it, so the store closes
/// this and opens it again; see [`Store`].
#[derive(Debug)]
struct Database {
    db: sled::Db,
    records: sled::Tree,
    patient_index: sled::Tree,
    flags: sled::Tree,
    checkpoints: sled::Tree,
    replay: sled::Tree,
    trust: sled::Tree,
    meta: sled::Tree,
    /// Per database, so a flush of a reopened database never counts as
    /// the flush of a write made to the one it replaced.
    flushes: GroupCommit,
}

impl Database {
    fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(BACKGROUND_FLUSH_MS))
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
        Ok(Self {
            records: tree(TREE_RECORDS)?,
            patient_index: tree(TREE_PATIENT_INDEX)?,
            flags: tree(TREE_FLAGS)?,
            checkpoints: tree(TREE_CHECKPOINTS)?,
            replay: tree(TREE_REPLAY)?,
            trust: tree(TREE_TRUST)?,
            meta: tree(TREE_META)?,
            db,
            flushes: GroupCommit::default(),
        })
    }
}

/// After a write failure, when the database is next opened again, and how
/// long to wait after that attempt fails too.
#[derive(Debug)]
struct Reopening {
    failed_since: Option<Instant>,
    /// The write failure that closed the database.
    cause: String,
    next_attempt: Instant,
    wait: Duration,
    /// The closed database, until the operations still using it finish.
    retiring: Option<Arc<Database>>,
}

/// The first attempt to reopen comes this soon after a write failure...
const FIRST_REOPEN_WAIT: Duration = Duration::from_secs(1);
/// ...and the wait doubles after each failed attempt, up to this.
const MAX_REOPEN_WAIT: Duration = Duration::from_secs(30);

/// Whether the database is working, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreHealth {
    /// A write failed and the database has not yet been reopened.
    pub failed: bool,
    /// Times the database was reopened after a write failure.
    pub reopened: u64,
}

/// The node's database.
///
/// A write that fails (a full disk) closes the sled database: every
/// operation then fails with a clear error, and the next one after a
/// short wait (1 s, doubling to 30 s) opens it again. A crash-safe reopen
/// is what a restart would do, so service resumes once space returns,
/// without one. The audit files stay open throughout; they retry their
/// own writes.
#[derive(Debug, Clone)]
pub struct Store {
    path: Arc<PathBuf>,
    cache_bytes: u64,
    database: Arc<RwLock<Option<Arc<Database>>>>,
    /// Set when a write failed; checked before every operation.
    failed: Arc<AtomicBool>,
    /// Held only by the one caller reopening, or briefly to note a failure;
    /// others never wait for it.
    reopening: Arc<Mutex<Reopening>>,
    reopened: Arc<AtomicU64>,
    audit: Arc<Segments>,
    /// Writers of the audit files hold it shared; sealing a segment holds
    /// it alone, so nothing is written between sled's flush and the seal.
    /// Order: gate, then the segments' own lock.
    audit_gate: Arc<RwLock<()>>,
    audit_syncs: Arc<GroupCommit>,
    /// Signed checkpoints appended to the audit files but not yet in sled.
    /// They go into sled only after the sync that makes them durable, so
    /// sled never holds a checkpoint whose entries a crash could lose.
    pending_checkpoints: Arc<Mutex<Vec<SignedCheckpoint>>>,
}

/// A checkpoint's log size and its signed bytes.
type SignedCheckpoint = (u64, Vec<u8>);

/// The audit log's directory inside the store directory.
const AUDIT_DIR: &str = "audit";

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    cbor::encode(value).map_err(corrupt)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    cbor::decode(bytes, Limits::MESSAGE).map_err(corrupt)
}

/// zstd level for stored records: the fastest level already takes a 1 KiB
/// FHIR resource's signed record to well under half (decision 0013).
const RECORD_COMPRESSION_LEVEL: i32 = 1;
/// A stored record never decompresses to more than this.
const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;
/// Every zstd frame starts with these bytes; a CBOR record (a map) never does.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

thread_local! {
    /// One compression context per thread, reused: making one per record
    /// cost more than compressing it.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// One decompression context per thread, reused: a locate reads every
    /// record of the patient, and making a context each time showed in the
    /// answering thread's profile.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// A record as sled holds it: its CBOR, fields keyed by position, compressed.
fn encode_record(record: &StoredRecord) -> Result<Vec<u8>, StoreError> {
    let plain = cbor::encode_packed(record).map_err(corrupt)?;
    let failed = |e: std::io::Error| StoreError::Io(format!("record compression: {e}"));
    COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some(compressor) => compressor,
            None => {
                slot.insert(zstd::bulk::Compressor::new(RECORD_COMPRESSION_LEVEL).map_err(failed)?)
            }
        };
        compressor.compress(&plain).map_err(failed)
    })
}

/// Encodes a batch's records, on several threads when the batch is large.
fn encode_writes(writes: &[RecordWrite]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
    let encode_one = |write: &RecordWrite| match write {
        RecordWrite::Put(record) => encode_record(record).map(Some),
        RecordWrite::Remove { .. } => Ok(None),
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_ENCODING_THREADS);
    if threads == 1 || writes.len() < PARALLEL_ENCODING_FROM {
        return writes.iter().map(encode_one).collect();
    }
    let per_thread = writes.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = writes
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || chunk.iter().map(encode_one).collect::<Result<Vec<_>, _>>())
            })
            .collect();
        let mut encoded = Vec::with_capacity(writes.len());
        for worker in workers {
            let part = worker
                .join()
                .map_err(|_| StoreError::Io("a record encoding thread panicked".into()))??;
            encoded.extend(part);
        }
        Ok(encoded)
    })
}

/// Threads that encode one large batch of records.
const MAX_ENCODING_THREADS: usize = 4;
/// Batches smaller than this are encoded on the caller's thread.
const PARALLEL_ENCODING_FROM: usize = 64;

/// Reads a stored record, compressed or (as schema 1 wrote them) not.
fn decode_record(bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    if bytes.starts_with(&ZSTD_MAGIC) {
        decode(&decompress_record(bytes)?)
    } else {
        decode(bytes)
    }
}

/// Decompresses a stored record into a buffer the size its frame declares.
/// Sizing it to the 16 MiB limit instead cost a 16 MiB allocation per read,
/// which glibc came to serve from, and keep in, a heap.
fn decompress_record(bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    let too_big = || {
        corrupt(format!(
            "record decompresses to over {MAX_RECORD_BYTES} bytes"
        ))
    };
    match zstd::zstd_safe::get_frame_content_size(bytes) {
        Ok(Some(declared)) => {
            let declared = usize::try_from(declared)
                .ok()
                .filter(|n| *n <= MAX_RECORD_BYTES)
                .ok_or_else(too_big)?;
            // A frame holding more than it declares fails here for want of room.
            DECOMPRESSOR.with_borrow_mut(|slot| {
                let decompressor = match slot {
                    Some(decompressor) => decompressor,
                    None => slot.insert(zstd::bulk::Decompressor::new().map_err(corrupt)?),
                };
                decompressor.decompress(bytes, declared).map_err(corrupt)
            })
        }
        // Frames this store writes declare their size; one that does not is
        // read as a stream, stopping just past the limit.
        Ok(None) => {
            use std::io::Read;
            let mut plain = Vec::new();
            zstd::stream::read::Decoder::new(bytes)
                .map_err(corrupt)?
                .take(MAX_RECORD_BYTES as u64 + 1)
                .read_to_end(&mut plain)
                .map_err(corrupt)?;
            if plain.len() > MAX_RECORD_BYTES {
                return Err(too_big());
            }
            Ok(plain)
        }
        Err(e) => Err(corrupt(format!("unreadable zstd frame header: {e:?}"))),
    }
}

fn patient_key(nhs: &NhsNumber, record_key: &str) -> Vec<u8> {
    let mut key = nhs.digits().into_bytes();
    key.push(b'/');
    key.extend_from_slice(record_key.as_bytes());
    key
}

/// Waits up to `within` until no handle in this process holds the lock on
/// the store at `path`.
///
/// Dropping the last handle to a store is not enough for another process
/// to open it at once: sled finishes writes on background threads, which
/// keep the locked file open for a moment after the drop.
pub fn wait_until_released(path: &Path, within: Duration) -> Result<(), StoreError> {
    let lock_file = std::fs::File::open(path.join(SLED_DATA_FILE))?;
    let started = Instant::now();
    loop {
        match lock_file.try_lock() {
            Ok(()) => return Ok(lock_file.unlock()?),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < within => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::NotReleased {
                    path: path.display().to_string(),
                    waited_ms: started.elapsed().as_millis(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
    }
}

impl Store {
    /// Opens (or creates) the store with the given page cache size.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let database = Database::open(path, cache_bytes)?;
        let schema = Self::read_schema(&database.db)?;
        let audit_dir = path.join(AUDIT_DIR);
        if schema == Some(1) && audit_dir.exists() {
            // A move from schema 1 that did not finish; it starts again.
            std::fs::remove_dir_all(&audit_dir)?;
        }
        let (segments, recovered) = Segments::open(&audit_dir).map_err(|e| StoreError::Open {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let now = Instant::now();
        let store = Self {
            path: Arc::new(path.to_path_buf()),
            cache_bytes,
            database: Arc::new(RwLock::new(Some(Arc::new(database)))),
            failed: Arc::new(AtomicBool::new(false)),
            reopening: Arc::new(Mutex::new(Reopening {
                failed_since: None,
                cause: String::new(),
                next_attempt: now,
                wait: FIRST_REOPEN_WAIT,
                retiring: None,
            })),
            reopened: Arc::new(AtomicU64::new(0)),
            audit: Arc::new(segments),
            audit_gate: Arc::new(RwLock::new(())),
            audit_syncs: Arc::new(GroupCommit::default()),
            pending_checkpoints: Arc::new(Mutex::new(Vec::new())),
        };
        match schema {
            None => store.initialise()?,
            Some(1) => store.move_audit_from_v1(path)?,
            Some(SCHEMA_VERSION) => store.with_database(|db| store.restore(db, recovered))?,
            Some(found) => {
                return Err(StoreError::Schema {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        Ok(store)
    }

    fn read_schema(db: &sled::Db) -> Result<Option<u32>, StoreError> {
        match db.open_tree(TREE_META)?.get(META_SCHEMA)? {
            Some(bytes) => {
                let raw: [u8; 4] = bytes.as_ref().try_into().map_err(corrupt)?;
                Ok(Some(u32::from_be_bytes(raw)))
            }
            None => Ok(None),
        }
    }

    fn initialise(&self) -> Result<(), StoreError> {
        self.with_database(|db| {
            db.meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
            let mut salt = [0u8; 32];
            getrandom::fill(&mut salt).map_err(|e| StoreError::Io(e.to_string()))?;
            db.meta.insert(META_POINTER_SALT, &salt)?;
            self.flush_database(db)
        })
    }

    /// Writes back into sled the replay-cache entries and checkpoints that
    /// the newest audit segment holds and a crash may have cost sled.
    fn restore(&self, db: &Database, recovered: Recovered) -> Result<(), StoreError> {
        for (key, expires) in &recovered.replay {
            let _ = db.replay.compare_and_swap(
                key.as_slice(),
                None as Option<&[u8]>,
                Some(&expires.to_be_bytes()[..]),
            )?;
        }
        if let Some((size, signed)) = recovered.checkpoints.iter().max_by_key(|(size, _)| *size) {
            keep_latest_checkpoint(db, *size, signed)?;
        }
        if recovered.cut > 0 || !recovered.replay.is_empty() || !recovered.checkpoints.is_empty() {
            self.flush_database(db)?;
        }
        Ok(())
    }

    /// Moves a schema 1 store's audit log (sled trees and journal) into
    /// segment files, then drops the trees. Safe to interrupt: the schema
    /// stays 1 until the move is durable, and a new attempt starts over.
    fn move_audit_from_v1(&self, path: &Path) -> Result<(), StoreError> {
        self.with_database(|db| self.move_audit_from_v1_in(db, path))
    }

    fn move_audit_from_v1_in(&self, db: &Database, path: &Path) -> Result<(), StoreError> {
        let entries = db.db.open_tree(V1_TREE_AUDIT)?;
        let leaves = db.db.open_tree(V1_TREE_AUDIT_LEAVES)?;
        let by_patient = db.db.open_tree(V1_TREE_AUDIT_BY_PATIENT)?;
        let mut patients = std::collections::HashMap::new();
        for item in by_patient.iter() {
            let (key, _) = item?;
            let (digits, index) = key
                .split_at_checked(10)
                .ok_or_else(|| corrupt("audit index key"))?;
            let nhs = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| NhsNumber::parse(d).ok())
                .ok_or_else(|| corrupt("audit index key"))?;
            patients.insert(index_of(index)?, nhs);
        }
        let mut moved = 0u64;
        for item in entries.iter() {
            let (key, entry) = item?;
            let index = index_of(&key)?;
            let leaf = leaves
                .get(&key)?
                .ok_or_else(|| corrupt(format!("audit entry {index} has no leaf hash")))?;
            let leaf: [u8; 32] = leaf.as_ref().try_into().map_err(corrupt)?;
            self.append_audit(index, &entry, &leaf, patients.get(&index))?;
            moved += 1;
            if moved.is_multiple_of(1024) {
                self.sync_audit_in(db)?;
            }
        }
        // The schema 1 journal held entries and replay-cache writes that
        // sled may not have had; its format is the segments' own.
        let journal = path.join(V1_JOURNAL_FILE);
        if journal.exists() {
            let bytes = std::fs::read(&journal)?;
            for (_, record) in crate::segments::Records::new(&bytes) {
                match record {
                    LogRecord::Audit {
                        index,
                        leaf,
                        patient,
                        entry,
                    } if index == self.audit.len() => {
                        self.append_audit(index, &entry, &leaf, patient.as_ref())?;
                        moved += 1;
                    }
                    LogRecord::Replay { key, expires } => {
                        let _ = db.replay.compare_and_swap(
                            key,
                            None as Option<&[u8]>,
                            Some(&expires.to_be_bytes()[..]),
                        )?;
                    }
                    _ => {}
                }
            }
        }
        self.sync_audit_in(db)?;
        for tree in [
            V1_TREE_AUDIT,
            V1_TREE_AUDIT_LEAVES,
            V1_TREE_AUDIT_BY_PATIENT,
        ] {
            db.db.drop_tree(tree)?;
        }
        db.meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
        self.flush_database(db)?;
        if journal.exists() {
            std::fs::remove_file(&journal)?;
        }
        tracing::info!(
            entries = moved,
            "audit log moved from sled into segment files (schema 1 to 2)"
        );
        Ok(())
    }

    /// Flushes, closes this handle and waits up to `within` until the
    /// database's file lock is free, so that another process (a node
    /// started straight after an import) can open the store.
    pub fn close(self, within: Duration) -> Result<(), StoreError> {
        self.flush()?;
        let path = self.path.as_ref().clone();
        drop(self);
        wait_until_released(&path, within)
    }

    /// Waits until everything written so far is on disk (sled's flush, which
    /// survives a process crash; see decision 0002 for power loss), the
    /// audit files included. Concurrent callers share flushes (group commit).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.with_database(|db| self.flush_database(db))
    }

    fn flush_database(&self, db: &Database) -> Result<(), StoreError> {
        db.flushes.commit(|| {
            self.sync_audit_files(db)?;
            db.db.flush()?;
            Ok(())
        })
    }

    /// Makes every audit entry and replay-cache entry written so far
    /// durable (one `fdatasync` of the newest audit segment, shared by
    /// concurrent callers), then puts the checkpoints it covered into sled.
    /// Seals the segment once it is full.
    pub fn sync_audit(&self) -> Result<(), StoreError> {
        self.with_database(|db| self.sync_audit_in(db))
    }

    fn sync_audit_in(&self, db: &Database) -> Result<(), StoreError> {
        self.sync_audit_files(db)?;
        if self.audit.active_len() > SEGMENT_LIMIT {
            self.seal_audit_segment(db)?;
        }
        Ok(())
    }

    fn sync_audit_files(&self, db: &Database) -> Result<(), StoreError> {
        let waiting = std::mem::take(&mut *self.lock_checkpoints());
        if let Err(e) = self.audit_syncs.commit(|| self.audit.sync()) {
            self.lock_checkpoints().extend(waiting);
            return Err(e.into());
        }
        if let Some((size, signed)) = waiting.iter().max_by_key(|(size, _)| *size) {
            keep_latest_checkpoint(db, *size, signed)?;
        }
        Ok(())
    }

    /// Makes sled durable and seals the newest audit segment, with writers
    /// held off meanwhile.
    fn seal_audit_segment(&self, db: &Database) -> Result<(), StoreError> {
        let _alone = self
            .audit_gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.audit.active_len() <= SEGMENT_LIMIT {
            return Ok(()); // Another caller sealed it first.
        }
        self.flush_database(db)?;
        self.audit.seal()?;
        Ok(())
    }

    fn shared_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.audit_gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_checkpoints(&self) -> std::sync::MutexGuard<'_, Vec<SignedCheckpoint>> {
        self.pending_checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The reopening state, unless a reopen holds it (then `None`: the
    /// caller does not wait for a database to open).
    fn try_lock_reopening(&self) -> Option<std::sync::MutexGuard<'_, Reopening>> {
        match self.reopening.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The database, opened again first if a write failed and the wait
    /// since is over.
    fn database(&self) -> Result<Arc<Database>, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            self.reopen()?;
        }
        self.database
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| self.closed_error())
    }

    /// Runs `op` on the database. An I/O failure marks the database for
    /// reopening, since sled fails everything after its first write error.
    fn with_database<T>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let database = self.database()?;
        let result = op(&database);
        drop(database);
        if let Err(StoreError::Io(message)) = &result {
            self.write_failed(message);
        }
        result
    }

    fn write_failed(&self, message: &str) {
        // A reopen under way is dealing with it already.
        let Some(mut reopening) = self.try_lock_reopening() else {
            return;
        };
        if reopening.failed_since.is_none() {
            let now = Instant::now();
            tracing::error!(
                error = message,
                retry_in_seconds = reopening.wait.as_secs(),
                "a store write failed (is the disk full?); the database will be closed and opened again once writes succeed, and until then requests that need it are refused"
            );
            reopening.failed_since = Some(now);
            message.clone_into(&mut reopening.cause);
            reopening.next_attempt = now + reopening.wait;
        }
        self.failed.store(true, Ordering::Release);
    }

    fn closed_error(&self) -> StoreError {
        match self.try_lock_reopening() {
            Some(reopening) => Self::closed_error_of(&reopening, Instant::now()),
            None => Self::being_reopened(),
        }
    }

    fn being_reopened() -> StoreError {
        StoreError::Closed {
            failed_seconds_ago: 0,
            cause: "it is being opened again now".into(),
        }
    }

    fn closed_error_of(reopening: &Reopening, now: Instant) -> StoreError {
        StoreError::Closed {
            failed_seconds_ago: reopening
                .failed_since
                .map_or(0, |t| now.duration_since(t).as_secs()),
            cause: reopening.cause.clone(),
        }
    }

    /// Closes the failed database and opens it again, as a restart would:
    /// sled recovers from its log and the newest audit segment gives back
    /// the replay entries and checkpoints it may have lost. One caller
    /// tries at a time, and not before the wait is over.
    fn reopen(&self) -> Result<(), StoreError> {
        let Some(mut reopening) = self.try_lock_reopening() else {
            return Err(Self::being_reopened());
        };
        if !self.failed.load(Ordering::Acquire) {
            return Ok(()); // Another caller reopened it.
        }
        let now = Instant::now();
        let closed = Self::closed_error_of(&reopening, now);
        if now < reopening.next_attempt {
            return Err(closed);
        }
        // From here on no new operation gets the failed database...
        let taken = self
            .database
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(old) = taken {
            reopening.retiring = Some(old);
        }
        // ...and sled lets go of its files once the last one using it ends.
        if let Some(old) = reopening.retiring.take()
            && let Err(old) = Arc::try_unwrap(old)
        {
            reopening.retiring = Some(old);
            reopening.next_attempt = now + Duration::from_millis(50);
            return Err(closed);
        }
        match self.open_again() {
            Ok(database) => {
                *self
                    .database
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(database));
                tracing::warn!(
                    closed_for_seconds = reopening
                        .failed_since
                        .map_or(0, |t| now.duration_since(t).as_secs()),
                    "the store's database was opened again after a write failure; service resumes"
                );
                self.reopened.fetch_add(1, Ordering::Relaxed);
                reopening.failed_since = None;
                reopening.wait = FIRST_REOPEN_WAIT;
                self.failed.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                reopening.wait = (reopening.wait * 2).min(MAX_REOPEN_WAIT);
                reopening.next_attempt = now + reopening.wait;
                tracing::warn!(
                    error = %e,
                    retry_in_seconds = reopening.wait.as_secs(),
                    "the store's database could not be opened again yet"
                );
                Err(closed)
            }
        }
    }

    /// Opens the database again and proves it takes a write.
    fn open_again(&self) -> Result<Database, StoreError> {
        let database = Database::open(&self.path, self.cache_bytes)?;
        let recovered = self.audit.newest_for_database()?;
        self.restore(&database, recovered)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        database.meta.insert(META_REOPENED, &now.to_be_bytes())?;
        self.flush_database(&database)?;
        Ok(database)
    }

    /// Whether the database is working.
    /// Asking also opens a failed database again once its wait is over, so
    /// a node that nothing else touches still recovers.
    pub fn health(&self) -> StoreHealth {
        if self.failed.load(Ordering::Acquire) {
            let _ = self.database();
        }
        StoreHealth {
            failed: self.failed.load(Ordering::Acquire),
            reopened: self.reopened.load(Ordering::Relaxed),
        }
    }

    /// A per-store random salt for opaque pointer ids.
    pub fn pointer_salt(&self) -> Result<[u8; 32], StoreError> {
        self.with_database(|db| {
            let bytes = db
                .meta
                .get(META_POINTER_SALT)?
                .ok_or_else(|| corrupt("pointer salt is missing"))?;
            bytes.as_ref().try_into().map_err(corrupt)
        })
    }

    // Records.

    /// The record stored under `ResourceType/id`.
    pub fn record(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredRecord>, StoreError> {
        self.with_database(|db| {
            db.records
                .get(record_key(resource_type, id))?
                .map(|b| decode_record(&b))
                .transpose()
        })
    }

    /// Applies a batch of record writes atomically, then flushes. Returns
    /// what each write did, in order.
    pub fn write_records(&self, writes: &[RecordWrite]) -> Result<Vec<WriteOutcome>, StoreError> {
        let encoded = encode_writes(writes)?;
        self.with_database(|db| {
            let outcomes = Self::write_records_in(db, writes, &encoded)?;
            self.flush_database(db)?;
            Ok(outcomes)
        })
    }

    fn write_records_in(
        db: &Database,
        writes: &[RecordWrite],
        encoded: &[Option<Vec<u8>>],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let outcomes = (&db.records, &db.patient_index).transaction(|(records, index)| {
            let mut outcomes = Vec::with_capacity(writes.len());
            for (write, bytes) in writes.iter().zip(encoded) {
                let key = match write {
                    RecordWrite::Put(r) => r.key(),
                    RecordWrite::Remove { resource_type, id } => record_key(resource_type, id),
                };
                let old = records.get(key.as_bytes())?;
                if let Some(old) = &old {
                    let old: StoredRecord =
                        decode_record(old).map_err(ConflictableTransactionError::Abort)?;
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
        Ok(outcomes)
    }

    /// Every record held for a patient.
    pub fn patient_records(&self, nhs: &NhsNumber) -> Result<Vec<StoredRecord>, StoreError> {
        let mut prefix = nhs.digits().into_bytes();
        prefix.push(b'/');
        self.with_database(|db| {
            let mut out = Vec::new();
            for item in db.patient_index.scan_prefix(&prefix) {
                let (key, _) = item?;
                let record_key = key
                    .get(prefix.len()..)
                    .ok_or_else(|| corrupt("index key"))?;
                match db.records.get(record_key)? {
                    Some(bytes) => out.push(decode_record(&bytes)?),
                    None => return Err(corrupt("index names a missing record")),
                }
            }
            Ok(out)
        })
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        let database = self.database().ok();
        database.map_or(0, |db| db.db.size_on_disk().unwrap_or(0)) + self.audit.size_on_disk()
    }

    /// Number of records held; `None` while the database is closed after a
    /// write failure, when the count cannot be read (it is not zero).
    pub fn record_count(&self) -> Option<usize> {
        self.database().ok().map(|db| db.records.len())
    }

    /// Number of patients with at least one record.
    pub fn patient_count(&self) -> Result<usize, StoreError> {
        self.with_database(|db| {
            let mut count = 0;
            let mut last: Option<Vec<u8>> = None;
            for item in db.patient_index.iter() {
                let (key, _) = item?;
                let nhs = key.get(..10).ok_or_else(|| corrupt("index key"))?.to_vec();
                if last.as_ref() != Some(&nhs) {
                    count += 1;
                    last = Some(nhs);
                }
            }
            Ok(count)
        })
    }

    /// Checks that records and the patient index agree and every record
    /// decodes: what a crash must never break. Returns the record count.
    pub fn check_consistency(&self) -> Result<usize, StoreError> {
        self.with_database(Self::check_consistency_in)
    }

    fn check_consistency_in(db: &Database) -> Result<usize, StoreError> {
        let mut records = 0;
        for item in db.records.iter() {
            let (key, bytes) = item?;
            let record = decode_record(&bytes)?;
            if record.key().as_bytes() != key.as_ref() {
                return Err(corrupt(format!(
                    "record stored under the wrong key {}",
                    String::from_utf8_lossy(&key)
                )));
            }
            if !db
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
        for item in db.patient_index.iter() {
            let (key, _) = item?;
            let record_key = key.get(11..).ok_or_else(|| corrupt("index key"))?;
            if !db.records.contains_key(record_key)? {
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
        self.with_database(|db| {
            db.flags
                .get(nhs.digits())?
                .map(|b| decode(&b))
                .transpose()
                .map(Option::unwrap_or_default)
        })
    }

    /// Sets a patient's flags, flushed before returning.
    pub fn set_flags(&self, nhs: &NhsNumber, flags: &PatientFlags) -> Result<(), StoreError> {
        self.with_database(|db| {
            if flags.restricted || flags.objected {
                db.flags.insert(nhs.digits(), encode(flags)?)?;
            } else {
                db.flags.remove(nhs.digits())?;
            }
            self.flush_database(db)
        })
    }

    // Replay cache.

    /// Records `(iss, cti)` until `expires`. Returns true if it was already
    /// there (a replay). The entry is appended to the audit files and made
    /// durable with the audit write that follows every verified request.
    pub fn seen_before(
        &self,
        iss: &OdsCode,
        cti: &[u8; 16],
        expires: u64,
    ) -> Result<bool, StoreError> {
        let mut key = iss.as_str().as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(cti);
        self.with_database(|db| {
            let _gate = self.shared_gate();
            let inserted = db.replay.compare_and_swap(
                key.clone(),
                None as Option<&[u8]>,
                Some(&expires.to_be_bytes()[..]),
            )?;
            if inserted.is_err() {
                return Ok(true);
            }
            self.audit.append(&LogRecord::Replay { key, expires })?;
            Ok(false)
        })
    }

    /// Drops replay entries that expired before `before`. Returns how many.
    pub fn purge_replay(&self, before: u64) -> Result<usize, StoreError> {
        self.with_database(|db| {
            let mut removed = 0;
            for item in db.replay.iter() {
                let (key, value) = item?;
                let raw: [u8; 8] = value.as_ref().try_into().map_err(corrupt)?;
                if u64::from_be_bytes(raw) < before {
                    db.replay.remove(key)?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    /// Number of live replay entries (0 while the database is closed).
    pub fn replay_len(&self) -> usize {
        self.database().map_or(0, |db| db.replay.len())
    }

    // Trust state.

    /// Stored trust bytes under `name` (`root` or `list`).
    pub fn trust_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_database(|db| Ok(db.trust.get(name)?.map(|b| b.to_vec())))
    }

    /// Stores trust bytes, flushed before returning.
    pub fn set_trust_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.with_database(|db| {
            db.trust.insert(name, bytes)?;
            self.flush_database(db)
        })
    }

    // Audit log.

    /// Number of audit entries.
    pub fn audit_len(&self) -> Result<u64, StoreError> {
        Ok(self.audit.len())
    }

    /// The Merkle peaks of the whole audit log, for carrying on appending.
    pub fn audit_range(&self) -> careweave_protocol::audit::CompactRange {
        self.audit.range()
    }

    /// Appends audit entry `index` (the next one, which the caller's lock
    /// guarantees) with its leaf hash and patient. Not yet durable: the
    /// caller calls [`Store::sync_audit`] before it counts on the entry.
    pub fn append_audit(
        &self,
        index: u64,
        entry: &[u8],
        leaf_hash: &[u8; 32],
        patient: Option<&NhsNumber>,
    ) -> Result<(), StoreError> {
        let _gate = self.shared_gate();
        self.audit.append(&LogRecord::Audit {
            index,
            leaf: *leaf_hash,
            patient: patient.copied(),
            entry: entry.to_vec(),
        })?;
        Ok(())
    }

    /// Every audit entry with its recorded leaf hash, in order.
    pub fn audit_entries(
        &self,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>, [u8; 32]), StoreError>> + '_ {
        self.audit
            .entries()
            .map(|item| item.map_err(StoreError::from))
    }

    /// Audit entries (index and bytes) from `start` on, in order, reading
    /// only the segments from the one holding `start`.
    pub fn audit_entries_from(
        &self,
        start: u64,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_ {
        self.audit.entries_from(start).map(|item| {
            item.map(|(index, bytes, _)| (index, bytes))
                .map_err(StoreError::from)
        })
    }

    /// The first index of each audit segment, oldest first: where reading
    /// can start cheaply.
    pub fn audit_segment_starts(&self) -> Vec<u64> {
        self.audit.segment_starts()
    }

    /// The newest signed audit checkpoint (size and bytes), if any.
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let pending = self.lock_checkpoints().last().cloned();
        let stored = self.with_database(|db| {
            let latest = match db.meta.get(META_LATEST_CHECKPOINT)? {
                Some(value) => Some(decode_latest_checkpoint(&value)?),
                None => None,
            };
            let legacy = match db.checkpoints.iter().next_back().transpose()? {
                Some((key, value)) => Some((index_of(&key)?, value.to_vec())),
                None => None,
            };
            Ok(latest
                .into_iter()
                .chain(legacy)
                .max_by_key(|(size, _)| *size))
        })?;
        Ok(pending
            .into_iter()
            .chain(stored)
            .max_by_key(|(size, _)| *size))
    }

    /// The audit entry at `index`.
    pub fn audit_entry(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.audit.entry(index)?)
    }

    /// A patient's audit entries (index and bytes), oldest first.
    pub fn audit_for_patient(&self, nhs: &NhsNumber) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        Ok(self.audit.patient_entries(nhs)?)
    }

    /// Appends a signed checkpoint for a log size behind the entries it
    /// covers. It is durable, and in sled, after the next sync or flush.
    pub fn put_checkpoint(&self, size: u64, signed: &[u8]) -> Result<(), StoreError> {
        let _gate = self.shared_gate();
        let mut waiting = self.lock_checkpoints();
        self.audit.append(&LogRecord::Checkpoint {
            size,
            signed: signed.to_vec(),
        })?;
        waiting.push((size, signed.to_vec()));
        Ok(())
    }

    /// The checkpoints sled held before the audit segments became their
    /// only home, by size; see [`Store::audit_items`] for the rest.
    pub fn legacy_checkpoints(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.with_database(|db| {
            db.checkpoints
                .iter()
                .map(|item| {
                    let (key, value) = item?;
                    Ok((index_of(&key)?, value.to_vec()))
                })
                .collect()
        })
    }

    /// Every audit entry and signed checkpoint in the audit files, in the
    /// order written, one segment in memory at a time.
    pub fn audit_items(&self) -> impl Iterator<Item = Result<AuditItem, StoreError>> + '_ {
        self.audit.items().map(|item| {
            item.map(|item| match item {
                LogItem::Entry(index, bytes, leaf) => AuditItem::Entry { index, bytes, leaf },
                LogItem::Checkpoint(size, signed) => AuditItem::Checkpoint { size, signed },
            })
            .map_err(StoreError::from)
        })
    }

    /// Overwrites an audit entry's bytes in the newest segment but not its
    /// recorded leaf hash (for tamper tests and nothing else).
    #[doc(hidden)]
    pub fn tamper_audit_entry(&self, index: u64, entry: &[u8]) -> Result<(), StoreError> {
        Ok(self.audit.tamper(index, entry)?)
    }
}

/// Something read back from the audit files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditItem {
    /// An entry, its index and the leaf hash recorded with it.
    Entry {
        index: u64,
        bytes: Vec<u8>,
        leaf: [u8; 32],
    },
    /// A signed checkpoint of the first `size` entries.
    Checkpoint { size: u64, signed: Vec<u8> },
}

/// Records `signed` as the newest checkpoint unless a larger one is there
/// already (two syncs can finish in either order).
fn keep_latest_checkpoint(db: &Database, size: u64, signed: &[u8]) -> Result<(), StoreError> {
    let mut value = Vec::with_capacity(8 + signed.len());
    value.extend_from_slice(&size.to_be_bytes());
    value.extend_from_slice(signed);
    db.meta.fetch_and_update(META_LATEST_CHECKPOINT, |old| {
        let newer = old
            .and_then(|old| old.get(..8))
            .and_then(|bytes| bytes.try_into().ok())
            .is_none_or(|held: [u8; 8]| u64::from_be_bytes(held) < size);
        if newer {
            Some(value.clone())
        } else {
            old.map(<[u8]>::to_vec)
        }
    })?;
    Ok(())
}

/// Puts a checkpoint where sled kept every checkpoint before (tests of
/// stores written then).
#[cfg(test)]
pub(crate) fn put_legacy_checkpoint(store: &Store, size: u64, signed: &[u8]) {
    let db = store.database().expect("open");
    db.checkpoints
        .insert(size.to_be_bytes(), signed)
        .expect("insert");
}

fn decode_latest_checkpoint(value: &[u8]) -> Result<(u64, Vec<u8>), StoreError> {
    let (size, signed) = value
        .split_at_checked(8)
        .ok_or_else(|| corrupt("latest checkpoint"))?;
    Ok((index_of(size)?, signed.to_vec()))
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
    fn records_are_compressed_and_uncompressed_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mut big = record("9990000018", "c1");
        big.signed = b"Blood pressure taken seated, left arm. ".repeat(30);
        store
            .write_records(&[RecordWrite::Put(big.clone())])
            .unwrap();
        let held = store
            .database()
            .unwrap()
            .records
            .get(big.key())
            .unwrap()
            .unwrap();
        assert!(held.starts_with(&ZSTD_MAGIC));
        assert!(held.len() < big.signed.len() / 2, "{} bytes", held.len());
        assert_eq!(store.record("Condition", "c1").unwrap(), Some(big));
        // Schema 1 wrote plain CBOR.
        let plain = record("9990000018", "c2");
        store
            .database()
            .unwrap()
            .records
            .insert(plain.key(), encode(&plain).unwrap())
            .unwrap();
        assert_eq!(store.record("Condition", "c2").unwrap(), Some(plain));
        // A frame that claims more than a record may hold is refused.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_RECORD_BYTES + 1], 1).unwrap();
        store
            .database()
            .unwrap()
            .records
            .insert("Condition/c3", bomb)
            .unwrap();
        assert!(matches!(
            store.record("Condition", "c3"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_record_is_decompressed_into_a_buffer_of_its_own_size() {
        let plain = encode(&record("9990000018", "c1")).unwrap();
        let framed = zstd::bulk::compress(&plain, RECORD_COMPRESSION_LEVEL).unwrap();
        let back = decompress_record(&framed).unwrap();
        assert_eq!(back, plain);
        assert!(
            back.capacity() < 64 * 1024,
            "{} bytes held",
            back.capacity()
        );
    }

    #[test]
    fn a_damaged_frame_leaves_the_reused_decompressor_fit_for_the_next() {
        let plain = encode(&record("9990000018", "c1")).unwrap();
        let framed = zstd::bulk::compress(&plain, RECORD_COMPRESSION_LEVEL).unwrap();
        let cut = &framed[..framed.len() - 3];
        assert!(matches!(
            decompress_record(cut),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(decompress_record(&framed).unwrap(), plain);
    }

    #[test]
    fn a_frame_that_does_not_declare_its_size_is_read_up_to_the_limit() {
        let stream = |plain: &[u8]| {
            let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            std::io::Write::write_all(&mut encoder, plain).unwrap();
            encoder.finish().unwrap()
        };
        let plain = encode(&record("9990000018", "c1")).unwrap();
        let framed = stream(&plain);
        assert!(matches!(
            zstd::zstd_safe::get_frame_content_size(&framed),
            Ok(None)
        ));
        assert_eq!(decompress_record(&framed).unwrap(), plain);
        let bomb = stream(&vec![0u8; MAX_RECORD_BYTES + 1]);
        assert!(matches!(
            decompress_record(&bomb),
            Err(StoreError::Corrupt(message)) if message.contains("over")
        ));
        assert!(matches!(
            decompress_record(&ZSTD_MAGIC),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn schema_version_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            store
                .database()
                .unwrap()
                .meta
                .insert(META_SCHEMA, &7u32.to_be_bytes())
                .unwrap();
            store.flush().unwrap();
        }
        let err = Store::open(dir.path(), 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Schema {
                    found: 7,
                    expected: SCHEMA_VERSION
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_closed_store_opens_at_once_and_a_store_held_elsewhere_does_not_close() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..20u64 {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            store.put_checkpoint(round + 1, &[round as u8; 8]).unwrap();
            store.close(Duration::from_secs(5)).unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let other_handle = store.clone();
        match store.close(Duration::from_millis(50)) {
            Err(StoreError::NotReleased { waited_ms, .. }) => assert!(waited_ms >= 50),
            other => panic!("closing a store with another handle open: {other:?}"),
        }
        drop(other_handle);
    }

    #[test]
    fn a_store_held_elsewhere_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Store::open(dir.path(), 1 << 20).unwrap();
        // sled's lock is an flock on its file; a second open in the same
        // process meets it the same way another process would.
        match Store::open(dir.path(), 1 << 20) {
            Err(StoreError::Locked { .. }) => {}
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("a store in use was opened a second time"),
        }
    }

    #[test]
    fn audit_entries_survive_segments_being_sealed_and_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let nhs = NhsNumber::parse("9990000018").unwrap();
        let other = NhsNumber::parse("9990000026").unwrap();
        let entry = |i: u64| {
            let mut bytes = vec![(i % 251) as u8; 4096];
            bytes.extend_from_slice(&i.to_be_bytes());
            bytes
        };
        let patient = |i: u64| if i.is_multiple_of(3) { &other } else { &nhs };
        // Enough 4 KiB entries to fill one segment and begin the next.
        let count = SEGMENT_LIMIT / 4096 + 300;
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            for i in 0..count {
                store
                    .append_audit(i, &entry(i), &[i as u8; 32], Some(patient(i)))
                    .unwrap();
                if i % 64 == 0 {
                    store.put_checkpoint(i + 1, &[i as u8; 8]).unwrap();
                }
                store.sync_audit().unwrap();
            }
            assert_eq!(store.audit_len().unwrap(), count);
            assert_eq!(store.audit_entry(5).unwrap(), Some(entry(5)));
            assert_eq!(
                store.audit_entry(count - 1).unwrap(),
                Some(entry(count - 1))
            );
        }
        let segments = std::fs::read_dir(dir.path().join(AUDIT_DIR))
            .unwrap()
            .count();
        assert_eq!(
            segments, 3,
            "one sealed segment with its index and the newest"
        );
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.audit_len().unwrap(), count);
        let all: Vec<_> = store.audit_entries().map(Result::unwrap).collect();
        assert_eq!(all.len() as u64, count);
        for (i, (index, bytes, leaf)) in all.into_iter().enumerate() {
            assert_eq!(index, i as u64);
            assert_eq!(bytes, entry(index));
            assert_eq!(leaf, [index as u8; 32]);
        }
        let theirs = store.audit_for_patient(&other).unwrap();
        assert_eq!(theirs.len() as u64, count.div_ceil(3));
        assert!(
            theirs
                .iter()
                .all(|(i, bytes)| i.is_multiple_of(3) && *bytes == entry(*i))
        );
        assert_eq!(
            store.audit_for_patient(&nhs).unwrap().len() as u64,
            count - count.div_ceil(3)
        );
        // Checkpoints are read back from the files, each after the entry
        // that brought the log to its size; sled keeps only the newest.
        let mut size = 0;
        let mut checkpoints = Vec::new();
        for item in store.audit_items() {
            match item.unwrap() {
                AuditItem::Entry { index, .. } => size = index + 1,
                AuditItem::Checkpoint { size: at, signed } => {
                    assert_eq!(at, size);
                    checkpoints.push((at, signed));
                }
            }
        }
        assert_eq!(checkpoints.len() as u64, count.div_ceil(64));
        let newest = (count - 1) / 64 * 64;
        assert_eq!(checkpoints.last().unwrap().1, vec![newest as u8; 8]);
        assert_eq!(
            store.latest_checkpoint().unwrap(),
            Some((newest + 1, vec![newest as u8; 8]))
        );
        assert!(store.legacy_checkpoints().unwrap().is_empty());
    }

    #[test]
    fn a_schema_1_store_has_its_audit_log_moved_into_segments() {
        let dir = tempfile::tempdir().unwrap();
        let nhs = NhsNumber::parse("9990000018").unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let meta = db.open_tree(TREE_META).unwrap();
            meta.insert(META_SCHEMA, &1u32.to_be_bytes()).unwrap();
            meta.insert(META_POINTER_SALT, &[9u8; 32]).unwrap();
            let audit = db.open_tree(V1_TREE_AUDIT).unwrap();
            let leaves = db.open_tree(V1_TREE_AUDIT_LEAVES).unwrap();
            let by_patient = db.open_tree(V1_TREE_AUDIT_BY_PATIENT).unwrap();
            for i in 0u64..3 {
                audit.insert(i.to_be_bytes(), vec![i as u8; 10]).unwrap();
                leaves.insert(i.to_be_bytes(), &[i as u8; 32]).unwrap();
            }
            let mut key = b"9990000018".to_vec();
            key.extend_from_slice(&1u64.to_be_bytes());
            by_patient.insert(key, &[]).unwrap();
            db.open_tree(TREE_CHECKPOINTS)
                .unwrap()
                .insert(2u64.to_be_bytes(), &b"signed"[..])
                .unwrap();
            db.flush().unwrap();
            // The schema 1 journal held a fourth entry sled had not got.
            let journal = LogRecord::Audit {
                index: 3,
                leaf: [3; 32],
                patient: Some(nhs),
                entry: vec![3; 10],
            };
            std::fs::write(dir.path().join(V1_JOURNAL_FILE), journal.encode()).unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.audit_len().unwrap(), 4);
        let all: Vec<_> = store.audit_entries().map(Result::unwrap).collect();
        for (i, (index, bytes, leaf)) in all.into_iter().enumerate() {
            assert_eq!(
                (index, bytes, leaf),
                (i as u64, vec![i as u8; 10], [i as u8; 32])
            );
        }
        let mine: Vec<u64> = store
            .audit_for_patient(&nhs)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(mine, vec![1, 3]);
        assert_eq!(
            store.legacy_checkpoints().unwrap(),
            vec![(2, b"signed".to_vec())]
        );
        assert_eq!(
            store.latest_checkpoint().unwrap(),
            Some((2, b"signed".to_vec()))
        );
        assert_eq!(store.pointer_salt().unwrap(), [9u8; 32]);
        assert!(!dir.path().join(V1_JOURNAL_FILE).exists());
        assert!(
            !store
                .database()
                .unwrap()
                .db
                .tree_names()
                .iter()
                .any(|t| t.as_ref() == V1_TREE_AUDIT.as_bytes())
        );
        drop(store);
        // Opened again, it is an ordinary schema 2 store.
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.audit_len().unwrap(), 4);
        assert_eq!(
            Store::read_schema(&store.database().unwrap().db).unwrap(),
            Some(SCHEMA_VERSION)
        );
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
    fn a_failed_database_is_refused_then_opened_again_with_nothing_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let ods = OdsCode::parse("QHG").unwrap();
        store
            .write_records(&[RecordWrite::Put(record("9990000018", "c1"))])
            .unwrap();
        // A replay entry made durable only in the audit files, as an
        // answered request's is.
        assert!(!store.seen_before(&ods, &[1; 16], 100).unwrap());
        store.sync_audit().unwrap();

        store.write_failed("No space left on device (os error 28)");
        assert!(store.health().failed);
        let Err(StoreError::Closed { cause, .. }) = store.record("Condition", "c1") else {
            panic!("a failed database still answered");
        };
        assert!(cause.contains("No space left"), "{cause}");

        // A clone in use elsewhere (another request) keeps the old database
        // open; the reopen waits for it and loses nothing meanwhile.
        let held = store.database.read().unwrap().clone();
        std::thread::sleep(FIRST_REOPEN_WAIT);
        assert!(matches!(
            store.record("Condition", "c1"),
            Err(StoreError::Closed { .. })
        ));
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            match store.record("Condition", "c1") {
                Ok(found) => break found,
                Err(StoreError::Closed { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("not reopened: {e}"),
            }
        };
        assert_eq!(found, Some(record("9990000018", "c1")));
        assert_eq!(
            store.health(),
            StoreHealth {
                failed: false,
                reopened: 1
            }
        );
        assert!(
            store.seen_before(&ods, &[1; 16], 100).unwrap(),
            "a replay got through"
        );
        assert_eq!(store.check_consistency().unwrap(), 1);
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

    #[test]
    fn the_newest_checkpoint_is_kept_whichever_sync_finishes_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.latest_checkpoint().unwrap(), None);
        let db = store.database().unwrap();
        keep_latest_checkpoint(&db, 200, b"two hundred").unwrap();
        keep_latest_checkpoint(&db, 100, b"one hundred").unwrap();
        assert_eq!(
            store.latest_checkpoint().unwrap(),
            Some((200, b"two hundred".to_vec()))
        );
        // A store written before sled stopped keeping every checkpoint.
        put_legacy_checkpoint(&store, 300, b"three hundred");
        assert_eq!(
            store.latest_checkpoint().unwrap(),
            Some((300, b"three hundred".to_vec()))
        );
        drop(db);
        drop(store);
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            store.latest_checkpoint().unwrap(),
            Some((300, b"three hundred".to_vec()))
        );
    }

    #[test]
    fn a_damaged_latest_checkpoint_is_an_error_not_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let db = store.database().unwrap();
        db.meta.insert(META_LATEST_CHECKPOINT, &[0u8; 3]).unwrap();
        let error = store.latest_checkpoint().unwrap_err().to_string();
        assert!(error.contains("latest checkpoint"), "{error}");
    }
}
