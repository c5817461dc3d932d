//! The store's write-ahead journal for audit entries and replay-cache
//! entries: an append-only file made durable with one `fdatasync`, shared by
//! every writer waiting at the time (group commit).
//!
//! Why: an audit entry must be on disk before the data it records is
//! released, once per request. sled's own flush wakes its whole I/O thread
//! pool each time, which on a two-core machine cost more than the request
//! itself. The journal makes the entry durable; sled catches up in its own
//! time and the journal is emptied after sled has flushed. On open, whatever
//! the journal holds that sled lost is written back into sled.
//!
//! Each record: kind (1 byte), body length (4 bytes, big-endian), body,
//! then the first 8 bytes of SHA-256 over kind, length and body. A record
//! cut short by a crash fails its check and ends the journal there; it was
//! never acknowledged, because acknowledging waits for the sync.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use careweave_protocol::NhsNumber;
use sha2::{Digest, Sha256};

/// Largest record body read back; anything longer is damage, not data.
const MAX_BODY: usize = 16 * 1024 * 1024;
const KIND_AUDIT: u8 = 1;
const KIND_REPLAY: u8 = 2;
const CHECK_LEN: usize = 8;

/// One journalled write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JournalRecord {
    Audit {
        index: u64,
        leaf: [u8; 32],
        patient: Option<NhsNumber>,
        entry: Vec<u8>,
    },
    Replay {
        key: Vec<u8>,
        expires: u64,
    },
}

impl JournalRecord {
    fn encode(&self) -> Vec<u8> {
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
        };
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(1 + 4 + body.len() + CHECK_LEN);
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
            _ => None,
        }
    }
}

/// Reads whole, checked records from the start of `bytes`. Returns them and
/// the length of the good prefix; anything after it is a torn tail.
fn read_records(bytes: &[u8]) -> (Vec<JournalRecord>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some((&kind, rest)) = bytes.get(at..).and_then(<[u8]>::split_first) {
        let Some(len) = rest
            .get(..4)
            .and_then(|l| <[u8; 4]>::try_from(l).ok())
            .map(u32::from_be_bytes)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|l| *l <= MAX_BODY)
        else {
            break;
        };
        let total = 1 + 4 + len + CHECK_LEN;
        let Some(whole) = bytes.get(at..at + total) else {
            break;
        };
        let (signed, check) = whole.split_at(total - CHECK_LEN);
        if Sha256::digest(signed).get(..CHECK_LEN) != Some(check) {
            break;
        }
        let Some(record) = signed
            .get(5..)
            .and_then(|body| JournalRecord::decode(kind, body))
        else {
            break;
        };
        records.push(record);
        at += total;
    }
    (records, at)
}

/// Lets concurrent writers share one flush: a writer takes a ticket after
/// its writes, and any flush that began after the ticket was issued covers
/// them. Under load one sync serves many requests instead of one each.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    /// Tickets issued so far.
    issued: AtomicU64,
    /// The highest ticket known to be on disk; held while flushing.
    durable: Mutex<u64>,
}

impl GroupCommit {
    /// Runs `flush` unless a flush that began after this call's writes has
    /// already finished.
    pub(crate) fn commit<E>(&self, flush: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self
            .durable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *durable >= ticket {
            return Ok(());
        }
        let covered = self.issued.load(Ordering::SeqCst);
        flush()?;
        *durable = covered;
        Ok(())
    }
}

/// The journal file.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    open: Mutex<Open>,
    /// A second descriptor for the same file, so a sync does not hold up
    /// appends.
    sync_handle: File,
    len: AtomicU64,
    syncs: GroupCommit,
}

/// Records are gathered here and written with one `write` per sync.
#[derive(Debug)]
struct Open {
    file: File,
    buffer: Vec<u8>,
}

/// Past this many bytes waiting, an append writes them out itself.
const MAX_BUFFERED: usize = 1024 * 1024;

impl Journal {
    /// Opens (or creates) the journal and returns what it holds. A torn
    /// tail is cut off.
    pub(crate) fn open(path: &Path) -> std::io::Result<(Self, Vec<JournalRecord>)> {
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        if created && let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (records, good) = read_records(&bytes);
        if good < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                cut = bytes.len() - good,
                "the audit journal ended in a partial record (a crash mid-write); it was never acknowledged and is dropped"
            );
            file.set_len(good as u64)?;
            file.sync_data()?;
        }
        let sync_handle = file.try_clone()?;
        Ok((
            Self {
                path: path.to_path_buf(),
                open: Mutex::new(Open {
                    file,
                    buffer: Vec::new(),
                }),
                sync_handle,
                len: AtomicU64::new(good as u64),
                syncs: GroupCommit::default(),
            },
            records,
        ))
    }

    /// Appends a record. It reaches the file at the next sync (or once
    /// enough is waiting), in order.
    pub(crate) fn append(&self, record: &JournalRecord) -> std::io::Result<()> {
        let bytes = record.encode();
        let mut open = self.lock();
        open.buffer.extend_from_slice(&bytes);
        self.len.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        if open.buffer.len() >= MAX_BUFFERED {
            open.write_out()?;
        }
        Ok(())
    }

    /// Writes everything appended so far and makes it durable, sharing the
    /// write and the sync with concurrent callers.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.syncs.commit(|| {
            self.lock().write_out()?;
            self.sync_handle.sync_data()
        })
    }

    /// Bytes in the journal.
    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::SeqCst)
    }

    /// Empties the journal. The caller has made everything in it durable
    /// in the store and keeps writers out until this returns.
    pub(crate) fn reset(&self) -> std::io::Result<()> {
        let mut open = self.lock();
        open.buffer.clear();
        open.file.set_len(0)?;
        open.file.sync_data()?;
        self.len.store(0, Ordering::SeqCst);
        tracing::debug!(path = %self.path.display(), "audit journal emptied");
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Open {
    fn write_out(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            self.file.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(index: u64) -> JournalRecord {
        JournalRecord::Audit {
            index,
            leaf: [index as u8; 32],
            patient: NhsNumber::parse("9990000018").ok(),
            entry: vec![7; 300],
        }
    }

    #[test]
    fn records_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (journal, held) = Journal::open(&path).unwrap();
        assert!(held.is_empty());
        let replay = JournalRecord::Replay {
            key: b"QHG\0abc".to_vec(),
            expires: 99,
        };
        let unnamed = JournalRecord::Audit {
            index: 2,
            leaf: [2; 32],
            patient: None,
            entry: vec![],
        };
        for r in [&audit(0), &replay, &audit(1), &unnamed] {
            journal.append(r).unwrap();
        }
        journal.sync().unwrap();
        drop(journal);
        let (_, held) = Journal::open(&path).unwrap();
        assert_eq!(held, vec![audit(0), replay, audit(1), unnamed]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (journal, _) = Journal::open(&path).unwrap();
        journal.append(&audit(0)).unwrap();
        journal.append(&audit(1)).unwrap();
        journal.sync().unwrap();
        drop(journal);
        let whole = std::fs::read(&path).unwrap();
        // Every possible cut inside the second record leaves the first.
        let first_len = whole.len() / 2;
        for cut in first_len..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (journal, held) = Journal::open(&path).unwrap();
            assert_eq!(held, vec![audit(0)], "cut at {cut}");
            assert_eq!(journal.len(), first_len as u64);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), first_len as u64);
        }
    }

    #[test]
    fn a_flipped_bit_ends_the_journal_at_the_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (journal, _) = Journal::open(&path).unwrap();
        for i in 0..3 {
            journal.append(&audit(i)).unwrap();
        }
        journal.sync().unwrap();
        drop(journal);
        let mut bytes = std::fs::read(&path).unwrap();
        let record = bytes.len() / 3;
        bytes[record + 100] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let (_, held) = Journal::open(&path).unwrap();
        assert_eq!(held, vec![audit(0)]);
    }

    #[test]
    fn a_huge_length_is_damage_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, [1, 0xff, 0xff, 0xff, 0xff, 0, 0]).unwrap();
        let (journal, held) = Journal::open(&path).unwrap();
        assert!(held.is_empty());
        assert_eq!(journal.len(), 0);
    }

    #[test]
    fn nothing_reaches_the_file_before_a_sync_and_reset_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (journal, _) = Journal::open(&path).unwrap();
        journal.append(&audit(0)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        journal.sync().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        journal.append(&audit(1)).unwrap();
        journal.reset().unwrap();
        assert_eq!(journal.len(), 0);
        journal.append(&audit(2)).unwrap();
        journal.sync().unwrap();
        drop(journal);
        let (_, held) = Journal::open(&path).unwrap();
        assert_eq!(held, vec![audit(2)]);
    }

    #[test]
    fn writers_waiting_on_a_flush_share_the_next_one() {
        use std::sync::Arc;
        use std::sync::mpsc;
        let group = Arc::new(GroupCommit::default());
        let flushes = Arc::new(AtomicU64::new(0));
        let (in_flush, entered) = mpsc::channel();
        let (go, release) = mpsc::channel::<()>();
        let first = {
            let group = group.clone();
            std::thread::spawn(move || {
                group
                    .commit(|| {
                        in_flush.send(()).unwrap();
                        release.recv().unwrap();
                        Ok::<(), ()>(())
                    })
                    .unwrap();
            })
        };
        entered.recv().unwrap();
        // Two writers arrive while the first flush runs; their writes came
        // after it began, so it cannot cover them, but one flush covers both.
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let (group, flushes) = (group.clone(), flushes.clone());
                std::thread::spawn(move || {
                    group
                        .commit(|| {
                            flushes.fetch_add(1, Ordering::SeqCst);
                            Ok::<(), ()>(())
                        })
                        .unwrap();
                })
            })
            .collect();
        while group.issued.load(Ordering::SeqCst) < 3 {
            std::thread::yield_now();
        }
        go.send(()).unwrap();
        first.join().unwrap();
        for t in waiting {
            t.join().unwrap();
        }
        assert_eq!(flushes.load(Ordering::SeqCst), 1);
    }
}
