//! Group commit: concurrent writers share one flush.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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

#[cfg(test)]
mod tests {
    use super::*;

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
