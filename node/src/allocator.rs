//! What the process's memory allocator holds, for `/metrics`.
//!
//! RSS alone cannot tell memory the node is using from memory it has
//! freed and the allocator has not yet given back. The library does not
//! choose an allocator: a binary whose global allocator is jemalloc calls
//! [`jemalloc::start`], and from then on [`stats`] (and `/metrics`) report
//! jemalloc's own figures.
//!
//! ```
//! // A test binary keeps the system allocator and registers nothing.
//! assert!(careweave_node::allocator::stats().is_none());
//! ```

use std::sync::OnceLock;

/// The allocator's figures, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Allocated by the program and not yet freed.
    pub allocated: u64,
    /// In pages that hold at least one allocation.
    pub active: u64,
    /// Held in physical memory by the allocator, its own metadata and freed
    /// pages not yet returned included.
    pub resident: u64,
}

static READER: OnceLock<fn() -> Option<AllocatorStats>> = OnceLock::new();

/// The allocator's figures now, or `None` when no binary registered a
/// reader (the system allocator) or the reading failed.
pub fn stats() -> Option<AllocatorStats> {
    READER.get().and_then(|read| read())
}

/// jemalloc, for binaries that install it as their global allocator.
#[cfg(unix)]
pub mod jemalloc {
    use super::{AllocatorStats, READER};
    use tikv_jemalloc_ctl::{background_thread, epoch, stats};

    /// Starts jemalloc's background thread and registers its figures for
    /// [`super::stats`]. Call once, early in `main`, and only when jemalloc
    /// is the global allocator: otherwise the figures describe an allocator
    /// nothing uses.
    ///
    /// Without the background thread, jemalloc returns a thread's freed
    /// pages only when that thread next allocates, so a thread that freed
    /// much and then went quiet (sled's flusher) kept them.
    pub fn start() -> Result<(), String> {
        // A second call changes nothing: the reader is the same function.
        let _ = READER.set(read);
        background_thread::write(true)
            .map_err(|e| format!("could not start jemalloc's background thread: {e}"))
    }

    fn read() -> Option<AllocatorStats> {
        // jemalloc's figures are a snapshot taken at each epoch.
        epoch::advance().ok()?;
        Some(AllocatorStats {
            allocated: stats::allocated::read().ok()? as u64,
            active: stats::active::read().ok()? as u64,
            resident: stats::resident::read().ok()? as u64,
        })
    }
}
