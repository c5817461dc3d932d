//! The audit log's files: append-only segments in `store/audit/`.
//!
//! Why not sled: sled keeps metadata in memory for every key it holds, so a
//! node's memory grew with its audit log (about 110 bytes per entry). A
//! segment costs memory only while it is the one being written.
//!
//! `<first entry index, 20 digits>.seg` holds records in order. Every segment
//! but the newest has a `.idx` beside it, written when it was sealed: the
//! Merkle peaks at its end and its patient index. The newest segment is read
//! through at open.
//!
//! Each record: kind (1 byte), body length (4 bytes, big-endian), body, then
//! the first 8 bytes of SHA-256 over kind, length and body. Kinds: an audit
//! entry (index, leaf hash, patient, entry bytes), a replay-cache entry
//! (expiry, key) and a signed checkpoint (size, bytes). Replay and checkpoint
//! records make those sled writes durable with the entries' `fdatasync`;
//! sled is flushed before a segment is sealed, so only the newest segment's
//! are written back into sled at open.
//!
//! A crash can leave a partial record at the end of the newest segment. It
//! was never acknowledged (acknowledging waits for the sync), so it is cut
//! off. Damage anywhere else is reported, never cut.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use careweave_protocol::NhsNumber;
use careweave_protocol::audit::{CompactRange, Hash};
use sha2::{Digest, Sha256};

use crate::group_commit::GroupCommit;

/// A segment is sealed and a new one begun once it holds this many bytes.
pub(crate) const SEGMENT_LIMIT: u64 = 16 * 1024 * 1024;
/// Largest record body read back; anything longer is damage, not data.
const MAX_BODY: usize = 1024 * 1024;
/// Past this many bytes waiting, an append writes them out itself.
const MAX_BUFFERED: usize = 1024 * 1024;
const HEADER_LEN: usize = 5;
const CHECK_LEN: usize = 8;
/// A crash can only damage what was never synced: at most one buffer and
/// the record that overflowed it. More unreadable bytes than this at the end
/// of the newest segment is damage, not a torn write.
const MAX_TORN: u64 = (MAX_BUFFERED + MAX_BODY + HEADER_LEN + CHECK_LEN) as u64;

const KIND_AUDIT: u8 = 1;
const KIND_REPLAY: u8 = 2;
const KIND_CHECKPOINT: u8 = 3;

const INDEX_MAGIC: &[u8; 8] = b"CWAUDX01";
/// Patient index row: NHS number, entry index, byte offset in the segment.
const ROW_LEN: usize = 24;

/// Problems with the audit files.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SegmentError {
    #[error("audit files: {0}")]
    Io(#[from] std::io::Error),
    #[error("audit files are damaged: {0}")]
    Damaged(String),
}

fn damaged(path: &Path, what: impl std::fmt::Display) -> SegmentError {
    SegmentError::Damaged(format!("{}: {what}", path.display()))
}

/// One record in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogRecord {
    Audit {
        index: u64,
        leaf: Hash,
        patient: Option<NhsNumber>,
        entry: Vec<u8>,
    },
    Replay {
        key: Vec<u8>,
        expires: u64,
    },
    Checkpoint {
        size: u64,
        signed: Vec<u8>,
    },
}

impl LogRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Self::Audit {
                index,
                leaf,
                patient,
                entry,
            } => {
                let mut body = Vec::with_capacity(8 + 32 + 11 + entry.len());
                body.extend_from_slice(&index.to_be_bytes());
                body.extend_from_slice(leaf);
                match patient {
                    Some(nhs) => {
                        body.push(1);
                        body.extend_from_slice(nhs.digits().as_bytes());
                    }
                    None => body.push(0),
                }
                body.extend_from_slice(entry);
                (KIND_AUDIT, body)
            }
            Self::Replay { key, expires } => {
                let mut body = Vec::with_capacity(8 + key.len());
                body.extend_from_slice(&expires.to_be_bytes());
                body.extend_from_slice(key);
                (KIND_REPLAY, body)
            }
            Self::Checkpoint { size, signed } => {
                let mut body = Vec::with_capacity(8 + signed.len());
                body.extend_from_slice(&size.to_be_bytes());
                body.extend_from_slice(signed);
                (KIND_CHECKPOINT, body)
            }
        };
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CHECK_LEN);
        out.push(kind);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        let check = Sha256::digest(&out);
        out.extend_from_slice(check.get(..CHECK_LEN).unwrap_or_default());
        out
    }

    fn decode(kind: u8, body: &[u8]) -> Option<Self> {
        let (head, rest) = body.split_at_checked(8)?;
        let number = u64::from_be_bytes(head.try_into().ok()?);
        match kind {
            KIND_AUDIT => {
                let (leaf, rest) = rest.split_at_checked(32)?;
                let (flag, rest) = rest.split_first()?;
                let (patient, entry) = match flag {
                    0 => (None, rest),
                    1 => {
                        let (digits, entry) = rest.split_at_checked(10)?;
                        let nhs = NhsNumber::parse(std::str::from_utf8(digits).ok()?).ok()?;
                        (Some(nhs), entry)
                    }
                    _ => return None,
                };
                Some(Self::Audit {
                    index: number,
                    leaf: leaf.try_into().ok()?,
                    patient,
                    entry: entry.to_vec(),
                })
            }
            KIND_REPLAY => Some(Self::Replay {
                key: rest.to_vec(),
                expires: number,
            }),
            KIND_CHECKPOINT => Some(Self::Checkpoint {
                size: number,
                signed: rest.to_vec(),
            }),
            _ => None,
        }
    }
}

/// The length of a record whose header starts `header`, if it is sane.
fn record_len(header: &[u8]) -> Option<usize> {
    let len = u32::from_be_bytes(header.get(1..HEADER_LEN)?.try_into().ok()?);
    let len = usize::try_from(len).ok().filter(|l| *l <= MAX_BODY)?;
    Some(HEADER_LEN + len + CHECK_LEN)
}

/// Checks and decodes one whole record.
fn decode_record(whole: &[u8]) -> Option<LogRecord> {
    let (signed, check) = whole.split_at_checked(whole.len().checked_sub(CHECK_LEN)?)?;
    if Sha256::digest(signed).get(..CHECK_LEN) != Some(check) {
        return None;
    }
    let (&kind, rest) = signed.split_first()?;
    LogRecord::decode(kind, rest.get(HEADER_LEN - 1..)?)
}

/// Reads whole, checked records from the start of `bytes`; `at` ends at the
/// first byte that is not part of one.
pub(crate) struct Records<'a> {
    bytes: &'a [u8],
    pub(crate) at: usize,
}

impl<'a> Records<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }
}

impl Iterator for Records<'_> {
    /// The record's offset and the record.
    type Item = (u64, LogRecord);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.bytes.get(self.at..)?;
        let total = record_len(rest)?;
        let record = decode_record(rest.get(..total)?)?;
        let offset = self.at as u64;
        self.at += total;
        Some((offset, record))
    }
}

fn nhs_number_key(nhs: &NhsNumber) -> u64 {
    nhs.digits().parse().unwrap_or(0)
}

/// What a segment holds, found by reading it through.
#[derive(Debug, Default)]
struct Scan {
    entries: u64,
    /// Bytes of whole records.
    good: u64,
    /// (NHS number, entry index, offset).
    patients: Vec<(u64, u64, u64)>,
    range: CompactRange,
    replay: Vec<(Vec<u8>, u64)>,
    checkpoints: Vec<(u64, Vec<u8>)>,
}

fn scan(path: &Path, bytes: &[u8], first: u64, range: CompactRange) -> Result<Scan, SegmentError> {
    let mut scan = Scan {
        range,
        ..Scan::default()
    };
    let mut records = Records::new(bytes);
    for (offset, record) in records.by_ref() {
        match record {
            LogRecord::Audit {
                index,
                leaf,
                patient,
                ..
            } => {
                if index != first + scan.entries {
                    return Err(damaged(
                        path,
                        format!(
                            "holds entry {index} where entry {} belongs",
                            first + scan.entries
                        ),
                    ));
                }
                if let Some(nhs) = patient {
                    scan.patients.push((nhs_number_key(&nhs), index, offset));
                }
                scan.range.append(leaf);
                scan.entries += 1;
            }
            LogRecord::Replay { key, expires } => scan.replay.push((key, expires)),
            LogRecord::Checkpoint { size, signed } => scan.checkpoints.push((size, signed)),
        }
    }
    scan.good = records.at as u64;
    Ok(scan)
}

/// A sealed segment, as far as memory goes.
#[derive(Debug, Clone, Copy)]
struct Sealed {
    first: u64,
}

/// The `.idx` beside a sealed segment.
#[derive(Debug)]
struct SegmentIndex {
    first: u64,
    entries: u64,
    segment_len: u64,
    range: CompactRange,
}

impl SegmentIndex {
    /// Header, its check, patient rows, their check.
    fn encode(&self, patients: &[(u64, u64, u64)]) -> Vec<u8> {
        let peaks = self.range.peak_hashes();
        let mut out = Vec::with_capacity(64 + peaks.len() * 32 + patients.len() * ROW_LEN);
        out.extend_from_slice(INDEX_MAGIC);
        for number in [
            self.first,
            self.entries,
            self.segment_len,
            self.range.size(),
        ] {
            out.extend_from_slice(&number.to_be_bytes());
        }
        out.extend_from_slice(&(peaks.len() as u32).to_be_bytes());
        peaks.iter().for_each(|peak| out.extend_from_slice(peak));
        out.extend_from_slice(&(patients.len() as u64).to_be_bytes());
        let check = Sha256::digest(&out);
        out.extend_from_slice(check.get(..CHECK_LEN).unwrap_or_default());
        let rows_start = out.len();
        for (nhs, index, offset) in patients {
            for number in [nhs, index, offset] {
                out.extend_from_slice(&number.to_be_bytes());
            }
        }
        let check = Sha256::digest(out.get(rows_start..).unwrap_or_default());
        out.extend_from_slice(check.get(..CHECK_LEN).unwrap_or_default());
        out
    }

    /// Reads the header only; returns it and where the rows start.
    fn decode_header(bytes: &[u8]) -> Option<(Self, usize, u64)> {
        let mut rest = bytes;
        let mut take = |n: usize| {
            let (slice, after) = rest.split_at_checked(n)?;
            rest = after;
            Some(slice)
        };
        let u64_at = |s: &[u8]| s.try_into().ok().map(u64::from_be_bytes);
        if take(8)? != INDEX_MAGIC {
            return None;
        }
        let first = u64_at(take(8)?)?;
        let entries = u64_at(take(8)?)?;
        let segment_len = u64_at(take(8)?)?;
        let size = u64_at(take(8)?)?;
        let peak_count = u32::from_be_bytes(take(4)?.try_into().ok()?);
        if peak_count > 64 {
            return None;
        }
        let mut peaks = Vec::with_capacity(peak_count as usize);
        for _ in 0..peak_count {
            peaks.push(take(32)?.try_into().ok()?);
        }
        let rows = u64_at(take(8)?)?;
        let check = take(CHECK_LEN)?;
        let at = bytes.len() - rest.len();
        let header_end = at - CHECK_LEN;
        if Sha256::digest(bytes.get(..header_end)?).get(..CHECK_LEN) != Some(check) {
            return None;
        }
        let range = CompactRange::from_peaks(size, &peaks)?;
        Some((
            Self {
                first,
                entries,
                segment_len,
                range,
            },
            at,
            rows,
        ))
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

fn index_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.idx"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The patient rows of a sealed segment's index, or `None` if the index is
/// missing or damaged.
fn read_rows(dir: &Path, sealed: Sealed) -> Option<Vec<(u64, u64, u64)>> {
    let bytes = fs::read(index_path(dir, sealed.first)).ok()?;
    let (_, start, rows) = SegmentIndex::decode_header(&bytes)?;
    let len = usize::try_from(rows).ok()?.checked_mul(ROW_LEN)?;
    let body = bytes.get(start..start.checked_add(len)?)?;
    let check = bytes.get(start + len..start + len + CHECK_LEN)?;
    if Sha256::digest(body).get(..CHECK_LEN) != Some(check) {
        return None;
    }
    Some(
        body.chunks_exact(ROW_LEN)
            .filter_map(|row| {
                let n = |i: usize| row.get(i..i + 8)?.try_into().ok().map(u64::from_be_bytes);
                Some((n(0)?, n(8)?, n(16)?))
            })
            .collect(),
    )
}

/// Writes a sealed segment's index beside it, durably.
fn write_index(
    dir: &Path,
    index: &SegmentIndex,
    patients: &mut [(u64, u64, u64)],
) -> std::io::Result<()> {
    patients.sort_unstable();
    let path = index_path(dir, index.first);
    let temporary = path.with_extension("idx.new");
    let mut file = File::create(&temporary)?;
    file.write_all(&index.encode(patients))?;
    file.sync_all()?;
    fs::rename(&temporary, &path)?;
    sync_dir(dir)
}

/// The segment being written.
#[derive(Debug)]
struct Active {
    first: u64,
    next: u64,
    file: File,
    /// A second descriptor for the same file, so a sync does not hold up
    /// appends.
    sync_file: Arc<File>,
    /// Records gathered for one `write` per sync.
    buffer: Vec<u8>,
    written: u64,
    patients: Vec<(u64, u64, u64)>,
    /// The whole log's Merkle peaks, up to this segment's last entry.
    range: CompactRange,
}

impl Active {
    fn open(dir: &Path, first: u64, written: u64, range: CompactRange) -> std::io::Result<Self> {
        let path = segment_path(dir, first);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        if created {
            sync_dir(dir)?;
        }
        Ok(Self {
            first,
            next: first,
            sync_file: Arc::new(file.try_clone()?),
            file,
            buffer: Vec::new(),
            written,
            patients: Vec::new(),
            range,
        })
    }

    fn len(&self) -> u64 {
        self.written + self.buffer.len() as u64
    }

    /// Writes the buffer. If the write fails part-way (a full disk), the
    /// file is cut back to its last whole record and the buffer kept, so a
    /// later write neither duplicates nor misaligns records.
    fn write_out(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&self.buffer) {
            let _ = self.file.set_len(self.written);
            return Err(e);
        }
        self.written += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }
}

/// What the newest segment held that sled may have lost in a crash.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    pub(crate) replay: Vec<(Vec<u8>, u64)>,
    pub(crate) checkpoints: Vec<(u64, Vec<u8>)>,
    /// Bytes of a partial record cut from the end.
    pub(crate) cut: u64,
}

/// The audit log's segment files.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    active: Mutex<Active>,
    sealed: RwLock<Vec<Sealed>>,
    syncs: GroupCommit,
}

impl Segments {
    /// Opens (or creates) the segments in `dir`.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Recovered), SegmentError> {
        if !dir.exists() {
            fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let mut firsts = Vec::new();
        for item in fs::read_dir(dir)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            if let Some(stem) = name.strip_suffix(".seg") {
                let first = stem
                    .parse::<u64>()
                    .ok()
                    .filter(|_| stem.len() == 20)
                    .ok_or_else(|| damaged(dir, format!("unexpected segment file {name}")))?;
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let newest = firsts.pop().unwrap_or(0);
        let mut recovered = Recovered::default();
        let mut sealed = Vec::with_capacity(firsts.len());
        let mut range = CompactRange::default();
        for first in firsts {
            if first != range.size() {
                return Err(damaged(
                    &segment_path(dir, first),
                    format!(
                        "starts at entry {first}, but the segments before it end at entry {}",
                        range.size()
                    ),
                ));
            }
            range = Self::open_sealed(dir, first, range, &mut recovered)?;
            sealed.push(Sealed { first });
        }
        if newest != range.size() {
            return Err(damaged(
                &segment_path(dir, newest),
                format!(
                    "starts at entry {newest}, but the segments before it end at entry {}",
                    range.size()
                ),
            ));
        }
        let active = Self::open_newest(dir, newest, range, &mut recovered)?;
        Ok((
            Self {
                dir: dir.to_path_buf(),
                active: Mutex::new(active),
                sealed: RwLock::new(sealed),
                syncs: GroupCommit::default(),
            },
            recovered,
        ))
    }

    /// Reads a sealed segment's index header, or rebuilds the index when it
    /// is missing or damaged (a crash while sealing).
    fn open_sealed(
        dir: &Path,
        first: u64,
        range: CompactRange,
        recovered: &mut Recovered,
    ) -> Result<CompactRange, SegmentError> {
        let path = segment_path(dir, first);
        let segment_len = fs::metadata(&path)?.len();
        if let Ok(bytes) = read_header_bytes(&index_path(dir, first))
            && let Some((index, _, _)) = SegmentIndex::decode_header(&bytes)
            && index.first == first
            && index.segment_len == segment_len
            && index.range.size() == first + index.entries
        {
            return Ok(index.range);
        }
        tracing::warn!(segment = %path.display(), "rebuilding a sealed audit segment's index");
        let bytes = fs::read(&path)?;
        let mut found = scan(&path, &bytes, first, range)?;
        if found.good != segment_len {
            return Err(damaged(
                &path,
                format!(
                    "unreadable record at byte {} of a sealed segment",
                    found.good
                ),
            ));
        }
        let index = SegmentIndex {
            first,
            entries: found.entries,
            segment_len,
            range: found.range.clone(),
        };
        write_index(dir, &index, &mut found.patients)?;
        recovered.replay.append(&mut found.replay);
        recovered.checkpoints.append(&mut found.checkpoints);
        Ok(found.range)
    }

    /// Reads the newest segment through and cuts a torn tail.
    fn open_newest(
        dir: &Path,
        first: u64,
        range: CompactRange,
        recovered: &mut Recovered,
    ) -> Result<Active, SegmentError> {
        let path = segment_path(dir, first);
        // An index beside the newest segment is left from a seal that did
        // not finish; the segment carries on being written.
        match fs::remove_file(index_path(dir, first)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut found = scan(&path, &bytes, first, range)?;
        let unreadable = bytes.len() as u64 - found.good;
        if unreadable > MAX_TORN {
            return Err(damaged(
                &path,
                format!(
                    "{unreadable} bytes from byte {} cannot be read; a crash cannot tear that much, so this is damage. Keep a copy of the store and restore it from backup",
                    found.good
                ),
            ));
        }
        let mut active = Active::open(dir, first, found.good, found.range.clone())?;
        if unreadable > 0 {
            tracing::warn!(
                segment = %path.display(),
                cut = unreadable,
                "the audit log ended in a partial record (a crash mid-write); it was never acknowledged and is dropped"
            );
            active.file.set_len(found.good)?;
            active.file.sync_data()?;
        }
        active.next = first + found.entries;
        active.patients = std::mem::take(&mut found.patients);
        recovered.replay.append(&mut found.replay);
        recovered.checkpoints.append(&mut found.checkpoints);
        recovered.cut = unreadable;
        Ok(active)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Active> {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sealed(&self) -> Vec<Sealed> {
        self.sealed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Appends a record. It reaches the file at the next sync (or once
    /// enough is waiting), in order. An audit entry must be the next one.
    pub(crate) fn append(&self, record: &LogRecord) -> Result<(), SegmentError> {
        let bytes = record.encode();
        let mut active = self.lock();
        if let LogRecord::Audit {
            index,
            leaf,
            patient,
            ..
        } = record
        {
            if *index != active.next {
                return Err(SegmentError::Io(std::io::Error::other(format!(
                    "audit entry {index} appended where entry {} belongs",
                    active.next
                ))));
            }
            if let Some(nhs) = patient {
                let at = active.len();
                active.patients.push((nhs_number_key(nhs), *index, at));
            }
            active.range.append(*leaf);
            active.next += 1;
        }
        active.buffer.extend_from_slice(&bytes);
        if active.buffer.len() >= MAX_BUFFERED {
            active.write_out()?;
        }
        Ok(())
    }

    /// Writes everything appended so far and makes it durable, sharing the
    /// write and the sync with concurrent callers.
    pub(crate) fn sync(&self) -> Result<(), SegmentError> {
        self.syncs.commit(|| {
            let file = {
                let mut active = self.lock();
                active.write_out()?;
                Arc::clone(&active.sync_file)
            };
            file.sync_data()?;
            Ok(())
        })
    }

    /// The whole log's Merkle peaks.
    pub(crate) fn range(&self) -> CompactRange {
        self.lock().range.clone()
    }

    /// Bytes in the segment being written.
    pub(crate) fn active_len(&self) -> u64 {
        self.lock().len()
    }

    /// Number of audit entries.
    pub(crate) fn len(&self) -> u64 {
        self.lock().next
    }

    /// Bytes on disk.
    pub(crate) fn size_on_disk(&self) -> u64 {
        fs::read_dir(&self.dir)
            .map(|items| {
                items
                    .filter_map(|item| item.ok()?.metadata().ok())
                    .map(|meta| meta.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Seals the segment being written and begins the next. The caller has
    /// made every replay and checkpoint record in it durable in sled and
    /// keeps other writers out until this returns.
    pub(crate) fn seal(&self) -> Result<(), SegmentError> {
        let mut active = self.lock();
        active.write_out()?;
        active.sync_file.sync_data()?;
        let index = SegmentIndex {
            first: active.first,
            entries: active.next - active.first,
            segment_len: active.written,
            range: active.range.clone(),
        };
        write_index(&self.dir, &index, &mut active.patients)?;
        let next = Active::open(&self.dir, active.next, 0, active.range.clone())?;
        self.sealed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Sealed { first: index.first });
        tracing::debug!(
            first = index.first,
            entries = index.entries,
            "audit segment sealed"
        );
        *active = next;
        Ok(())
    }

    /// The bytes of the segment starting at `first`, up to what has been
    /// written; the newest segment's buffer is written out first.
    fn segment_bytes(&self, first: u64) -> Result<Vec<u8>, SegmentError> {
        let len = {
            let mut active = self.lock();
            if active.first == first {
                active.write_out()?;
                Some(active.written)
            } else {
                None
            }
        };
        let mut bytes = fs::read(segment_path(&self.dir, first))?;
        if let Some(len) = len {
            bytes.truncate(usize::try_from(len).unwrap_or(usize::MAX));
        }
        Ok(bytes)
    }

    /// The replay entries and checkpoints in the newest segment, read again
    /// from its file (written out first): what a database reopened while
    /// the log stayed open may have lost. Sealed segments need nothing, as
    /// sealing waits for the database's flush.
    pub(crate) fn newest_for_database(&self) -> Result<Recovered, SegmentError> {
        let first = self.lock().first;
        let bytes = self.segment_bytes(first)?;
        let path = segment_path(&self.dir, first);
        let found = scan(&path, &bytes, first, CompactRange::default())?;
        Ok(Recovered {
            replay: found.replay,
            checkpoints: found.checkpoints,
            cut: 0,
        })
    }

    /// Every segment's first entry, oldest first, the newest included.
    fn firsts(&self) -> Vec<u64> {
        let mut firsts: Vec<u64> = self.sealed().iter().map(|s| s.first).collect();
        firsts.push(self.lock().first);
        firsts
    }

    /// Every audit entry with its recorded leaf hash, in order, one segment
    /// in memory at a time.
    pub(crate) fn entries(&self) -> impl Iterator<Item = EntryItem> + '_ {
        self.items().filter_map(|item| match item {
            Ok(LogItem::Entry(index, entry, leaf)) => Some(Ok((index, entry, leaf))),
            Ok(LogItem::Checkpoint(..)) => None,
            Err(e) => Some(Err(e)),
        })
    }

    /// Every audit entry and signed checkpoint, in the order written: a
    /// checkpoint follows the entry that brought the log to its size.
    pub(crate) fn items(&self) -> Items<'_> {
        Items {
            segments: self,
            firsts: self.firsts().into_iter(),
            current: Vec::new().into_iter(),
            failed: false,
        }
    }

    /// Entries from `start` on, in order: reading begins at the segment
    /// holding `start`, so the ones before it cost nothing.
    pub(crate) fn entries_from(&self, start: u64) -> impl Iterator<Item = EntryItem> + '_ {
        let firsts = self.firsts();
        let from = firsts
            .iter()
            .rposition(|first| *first <= start)
            .unwrap_or(0);
        Items {
            segments: self,
            firsts: firsts.get(from..).unwrap_or_default().to_vec().into_iter(),
            current: Vec::new().into_iter(),
            failed: false,
        }
        .filter_map(move |item| match item {
            Ok(LogItem::Entry(index, entry, leaf)) => {
                (index >= start).then_some(Ok((index, entry, leaf)))
            }
            Ok(LogItem::Checkpoint(..)) => None,
            Err(e) => Some(Err(e)),
        })
    }

    /// The first index of every segment, oldest first.
    pub(crate) fn segment_starts(&self) -> Vec<u64> {
        self.firsts()
    }

    fn segment_items(&self, first: u64) -> Result<Vec<LogItem>, SegmentError> {
        let path = segment_path(&self.dir, first);
        let bytes = self.segment_bytes(first)?;
        let mut records = Records::new(&bytes);
        let items = records
            .by_ref()
            .filter_map(|(_, record)| match record {
                LogRecord::Audit {
                    index, leaf, entry, ..
                } => Some(LogItem::Entry(index, entry, leaf)),
                LogRecord::Checkpoint { size, signed } => Some(LogItem::Checkpoint(size, signed)),
                LogRecord::Replay { .. } => None,
            })
            .collect();
        if records.at != bytes.len() {
            return Err(damaged(
                &path,
                format!("unreadable record at byte {}", records.at),
            ));
        }
        Ok(items)
    }

    /// The audit entry at `index`.
    pub(crate) fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, SegmentError> {
        let Some(first) = self
            .firsts()
            .into_iter()
            .take_while(|first| *first <= index)
            .last()
        else {
            return Ok(None);
        };
        Ok(self
            .segment_items(first)?
            .into_iter()
            .find_map(|item| match item {
                LogItem::Entry(i, entry, _) if i == index => Some(entry),
                _ => None,
            }))
    }

    /// A patient's audit entries, oldest first.
    pub(crate) fn patient_entries(
        &self,
        nhs: &NhsNumber,
    ) -> Result<Vec<(u64, Vec<u8>)>, SegmentError> {
        let key = nhs_number_key(nhs);
        let mut out = Vec::new();
        for sealed in self.sealed() {
            let path = segment_path(&self.dir, sealed.first);
            let rows = match read_rows(&self.dir, sealed) {
                Some(rows) => rows,
                None => {
                    tracing::warn!(segment = %path.display(), "audit segment index unreadable; reading the segment through");
                    let bytes = fs::read(&path)?;
                    scan(&path, &bytes, sealed.first, CompactRange::default())?.patients
                }
            };
            let start = rows.partition_point(|row| row.0 < key);
            let offsets: Vec<(u64, u64)> = rows
                .get(start..)
                .unwrap_or_default()
                .iter()
                .take_while(|row| row.0 == key)
                .map(|row| (row.1, row.2))
                .collect();
            if offsets.is_empty() {
                continue;
            }
            let file = File::open(&path)?;
            for (index, offset) in offsets {
                out.push((index, read_entry_at(&file, &path, index, offset)?));
            }
        }
        let (first, offsets) = {
            let mut active = self.lock();
            active.write_out()?;
            let offsets: Vec<(u64, u64)> = active
                .patients
                .iter()
                .filter(|row| row.0 == key)
                .map(|row| (row.1, row.2))
                .collect();
            (active.first, offsets)
        };
        if !offsets.is_empty() {
            let path = segment_path(&self.dir, first);
            let file = File::open(&path)?;
            for (index, offset) in offsets {
                out.push((index, read_entry_at(&file, &path, index, offset)?));
            }
        }
        Ok(out)
    }

    /// Replaces an entry's bytes but not its recorded leaf hash, as someone
    /// editing the file would (for tamper tests; newest segment only).
    #[doc(hidden)]
    pub(crate) fn tamper(&self, index: u64, new_entry: &[u8]) -> Result<(), SegmentError> {
        let mut active = self.lock();
        active.write_out()?;
        let path = segment_path(&self.dir, active.first);
        let bytes = fs::read(&path)?;
        let mut rewritten = Vec::with_capacity(bytes.len());
        let mut patients = Vec::new();
        for (_, mut record) in Records::new(&bytes) {
            if let LogRecord::Audit {
                index: i,
                entry,
                patient,
                ..
            } = &mut record
            {
                if *i == index {
                    *entry = new_entry.to_vec();
                }
                if let Some(nhs) = patient {
                    patients.push((nhs_number_key(nhs), *i, rewritten.len() as u64));
                }
            }
            rewritten.extend_from_slice(&record.encode());
        }
        active.file.set_len(0)?;
        active.file.write_all(&rewritten)?;
        active.file.sync_data()?;
        active.written = rewritten.len() as u64;
        active.patients = patients;
        Ok(())
    }
}

fn read_header_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // The header is at most 8 + 4 * 8 + 4 + 64 * 32 + 8 + 8 bytes.
    let mut bytes = Vec::with_capacity(2 * 1024 + 64);
    File::open(path)?
        .take(2 * 1024 + 64)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_entry_at(
    file: &File,
    path: &Path,
    index: u64,
    offset: u64,
) -> Result<Vec<u8>, SegmentError> {
    let bad = || {
        damaged(
            path,
            format!("entry {index} at byte {offset} cannot be read"),
        )
    };
    let mut header = [0u8; HEADER_LEN];
    file.read_exact_at(&mut header, offset).map_err(|_| bad())?;
    let total = record_len(&header).ok_or_else(bad)?;
    let mut whole = vec![0u8; total];
    file.read_exact_at(&mut whole, offset).map_err(|_| bad())?;
    match decode_record(&whole) {
        Some(LogRecord::Audit {
            index: found,
            entry,
            ..
        }) if found == index => Ok(entry),
        _ => Err(bad()),
    }
}

/// An audit entry (index, bytes, recorded leaf hash) or a signed
/// checkpoint (size, bytes), read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogItem {
    Entry(u64, Vec<u8>, Hash),
    Checkpoint(u64, Vec<u8>),
}

/// Iterator over the log's entries and checkpoints; see [`Segments::items`].
/// It holds one segment's items at a time.
pub(crate) struct Items<'a> {
    segments: &'a Segments,
    firsts: std::vec::IntoIter<u64>,
    current: std::vec::IntoIter<LogItem>,
    failed: bool,
}

/// One entry read back: its index, bytes and recorded leaf hash.
pub(crate) type EntryItem = Result<(u64, Vec<u8>, Hash), SegmentError>;

impl Iterator for Items<'_> {
    type Item = Result<LogItem, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.failed {
                return None;
            }
            if let Some(entry) = self.current.next() {
                return Some(Ok(entry));
            }
            let first = self.firsts.next()?;
            match self.segments.segment_items(first) {
                Ok(items) => self.current = items.into_iter(),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(index: u64) -> LogRecord {
        LogRecord::Audit {
            index,
            leaf: [index as u8; 32],
            patient: NhsNumber::parse("9990000018").ok(),
            entry: vec![7; 300],
        }
    }

    fn entries(segments: &Segments) -> Vec<u64> {
        segments.entries().map(|e| e.unwrap().0).collect()
    }

    fn newest(dir: &Path) -> PathBuf {
        segment_path(dir, 0)
    }

    #[test]
    fn records_round_trip_and_replay_and_checkpoints_are_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, recovered) = Segments::open(dir.path()).unwrap();
        assert!(recovered.replay.is_empty() && recovered.checkpoints.is_empty());
        let replay = LogRecord::Replay {
            key: b"QHG\0abc".to_vec(),
            expires: 99,
        };
        let checkpoint = LogRecord::Checkpoint {
            size: 2,
            signed: b"cose".to_vec(),
        };
        let unnamed = LogRecord::Audit {
            index: 2,
            leaf: [2; 32],
            patient: None,
            entry: vec![],
        };
        for r in [&audit(0), &replay, &audit(1), &checkpoint, &unnamed] {
            segments.append(r).unwrap();
        }
        segments.sync().unwrap();
        let range = segments.range();
        drop(segments);
        let (segments, recovered) = Segments::open(dir.path()).unwrap();
        assert_eq!(recovered.replay, vec![(b"QHG\0abc".to_vec(), 99)]);
        assert_eq!(recovered.checkpoints, vec![(2, b"cose".to_vec())]);
        assert_eq!(entries(&segments), vec![0, 1, 2]);
        assert_eq!(segments.range(), range);
        assert_eq!(segments.entry(2).unwrap(), Some(vec![]));
    }

    #[test]
    fn an_entry_out_of_order_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        segments.append(&audit(0)).unwrap();
        assert!(segments.append(&audit(5)).is_err());
        assert_eq!(segments.len(), 1);
    }

    #[test]
    fn nothing_reaches_the_file_before_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        segments.append(&audit(0)).unwrap();
        assert_eq!(fs::metadata(newest(dir.path())).unwrap().len(), 0);
        segments.sync().unwrap();
        assert!(fs::metadata(newest(dir.path())).unwrap().len() > 0);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        segments.append(&audit(0)).unwrap();
        segments.append(&audit(1)).unwrap();
        segments.sync().unwrap();
        drop(segments);
        let path = newest(dir.path());
        let whole = fs::read(&path).unwrap();
        // Every possible cut inside the second record leaves the first.
        let first_len = whole.len() / 2;
        for cut in first_len..whole.len() {
            fs::write(&path, &whole[..cut]).unwrap();
            let (segments, recovered) = Segments::open(dir.path()).unwrap();
            assert_eq!(entries(&segments), vec![0], "cut at {cut}");
            assert_eq!(recovered.cut, (cut - first_len) as u64);
            assert_eq!(fs::metadata(&path).unwrap().len(), first_len as u64);
            // Appending carries on where the good records end.
            segments.append(&audit(1)).unwrap();
            segments.sync().unwrap();
            drop(segments);
            fs::write(&path, &whole[..first_len]).unwrap();
        }
    }

    #[test]
    fn a_huge_length_is_damage_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(newest(dir.path()), [1, 0xff, 0xff, 0xff, 0xff, 0, 0]).unwrap();
        let (segments, recovered) = Segments::open(dir.path()).unwrap();
        assert_eq!(segments.len(), 0);
        assert_eq!(recovered.cut, 7);
    }

    #[test]
    fn damage_far_from_the_end_is_reported_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        let big = |index: u64| LogRecord::Audit {
            index,
            leaf: [0; 32],
            patient: None,
            entry: vec![1; 4096],
        };
        let count = (MAX_TORN / 4096) + 10;
        for i in 0..count {
            segments.append(&big(i)).unwrap();
        }
        segments.sync().unwrap();
        drop(segments);
        let path = newest(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let err = Segments::open(dir.path()).unwrap_err();
        assert!(matches!(err, SegmentError::Damaged(_)), "{err}");
        assert!(err.to_string().contains("cannot be read"), "{err}");
        // Nothing was cut.
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    fn sealed_pair(dir: &Path) {
        let (segments, _) = Segments::open(dir).unwrap();
        for i in 0..3 {
            segments.append(&audit(i)).unwrap();
        }
        segments.seal().unwrap();
        for i in 3..5 {
            segments.append(&audit(i)).unwrap();
        }
        segments.sync().unwrap();
    }

    #[test]
    fn a_sealed_segment_is_read_from_its_index_and_the_index_rebuilt_when_damaged() {
        let dir = tempfile::tempdir().unwrap();
        sealed_pair(dir.path());
        let nhs = NhsNumber::parse("9990000018").unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        assert_eq!(entries(&segments), vec![0, 1, 2, 3, 4]);
        let mine: Vec<u64> = segments
            .patient_entries(&nhs)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(mine, vec![0, 1, 2, 3, 4]);
        let range = segments.range();
        drop(segments);
        // A damaged index is rebuilt from the segment at open.
        let index = index_path(dir.path(), 0);
        let mut bytes = fs::read(&index).unwrap();
        bytes[20] ^= 1;
        fs::write(&index, &bytes).unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        assert_eq!(segments.range(), range);
        assert_ne!(fs::read(&index).unwrap(), bytes);
        // Damaged rows are read around by reading the segment through.
        let mut bytes = fs::read(&index).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&index, &bytes).unwrap();
        assert_eq!(segments.patient_entries(&nhs).unwrap().len(), 5);
    }

    #[test]
    fn damage_in_a_sealed_segment_without_its_index_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        sealed_pair(dir.path());
        fs::remove_file(index_path(dir.path(), 0)).unwrap();
        let path = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[50] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = Segments::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("sealed segment"), "{err}");
    }

    #[test]
    fn a_missing_segment_is_a_gap_not_a_shorter_log() {
        let dir = tempfile::tempdir().unwrap();
        sealed_pair(dir.path());
        let (segments, _) = Segments::open(dir.path()).unwrap();
        segments.seal().unwrap();
        drop(segments);
        fs::remove_file(segment_path(dir.path(), 3)).unwrap();
        let err = Segments::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("end at entry 3"), "{err}");
    }

    #[test]
    fn a_full_disk_fails_the_sync_and_the_entries_reach_the_file_once_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        segments.append(&audit(0)).unwrap();
        segments.sync().unwrap();
        // /dev/full refuses every write with ENOSPC, as a full disk does.
        let real = {
            let mut active = segments.lock();
            let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
            std::mem::replace(&mut active.file, full)
        };
        segments.append(&audit(1)).unwrap();
        let err = segments.sync().unwrap_err();
        assert!(err.to_string().contains("No space left"), "{err}");
        // Nothing of entry 1 reached the segment.
        let path = newest(dir.path());
        let before = fs::read(&path).unwrap();
        assert_eq!(Records::new(&before).count(), 1);
        // Space returns: the waiting entry is written once, whole.
        segments.lock().file = real;
        segments.append(&audit(2)).unwrap();
        segments.sync().unwrap();
        drop(segments);
        let (segments, recovered) = Segments::open(dir.path()).unwrap();
        assert_eq!(recovered.cut, 0);
        assert_eq!(entries(&segments), vec![0, 1, 2]);
    }

    #[test]
    fn a_seal_cut_short_leaves_the_segment_open_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        segments.append(&audit(0)).unwrap();
        segments.seal().unwrap();
        drop(segments);
        // As if the crash came after the index but before the next segment.
        fs::remove_file(segment_path(dir.path(), 1)).unwrap();
        let (segments, _) = Segments::open(dir.path()).unwrap();
        assert!(!index_path(dir.path(), 0).exists());
        segments.append(&audit(1)).unwrap();
        segments.sync().unwrap();
        assert_eq!(entries(&segments), vec![0, 1]);
    }
}
