//! Repeated bad messages from one peer. A member whose messages keep failing
//! the envelope checks (bad signatures, replays, wrong audience, stale or
//! future-dated messages, malformed payloads) is broken or hostile; past a
//! limit within a window its connection is closed instead of answered. The
//! peer may reconnect, and its next bad message inside the window closes it
//! again, so abuse costs it a connection each time and costs us little.
//!
//! No I/O and no clock of its own: callers pass the time, so the rules are
//! tested directly.
//!
//! ```
//! use careweave_node::strikes::Strikes;
//! let strikes = Strikes::new(3, 60, 16);
//! let peer = b"peer".to_vec();
//! assert!(!strikes.record(&peer, 1_000));
//! assert!(!strikes.record(&peer, 1_001));
//! assert!(!strikes.record(&peer, 1_002));
//! assert!(strikes.record(&peer, 1_003), "the fourth within a minute closes");
//! assert!(!strikes.record(&peer, 1_100), "a new window starts afresh");
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

/// Bad messages allowed from one peer within a window before its
/// connection is closed.
pub const DEFAULT_LIMIT: u32 = 20;
/// The window, in seconds.
pub const DEFAULT_WINDOW_SECS: u64 = 60;
/// Peers tracked at once; a trust list has tens of members.
pub const DEFAULT_MAX_PEERS: usize = 1024;

/// Whether a refusal reason says the sender's message was wrong, as opposed
/// to policy declining a well-formed request (which is never abuse).
pub fn is_bad_message(reason: &str) -> bool {
    matches!(
        reason,
        "too-large"
            | "malformed"
            | "unsupported-algorithm"
            | "unknown-key"
            | "wrong-signer"
            | "bad-signature"
            | "wrong-audience"
            | "lifetime-too-long"
            | "from-future"
            | "too-old"
            | "expired"
            | "replayed"
            | "bad-payload"
    )
}

/// Counts bad messages per peer in fixed windows.
#[derive(Debug)]
pub struct Strikes {
    limit: u32,
    window_secs: u64,
    max_peers: usize,
    /// Peer → (window start, bad messages in it).
    by_peer: Mutex<HashMap<Vec<u8>, (u64, u32)>>,
}

impl Default for Strikes {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT, DEFAULT_WINDOW_SECS, DEFAULT_MAX_PEERS)
    }
}

impl Strikes {
    pub fn new(limit: u32, window_secs: u64, max_peers: usize) -> Self {
        Self {
            limit,
            window_secs: window_secs.max(1),
            max_peers: max_peers.max(1),
            by_peer: Mutex::new(HashMap::new()),
        }
    }

    /// Records one bad message from `peer` at `now` (Unix seconds). Returns
    /// true when it is over the limit for the current window.
    pub fn record(&self, peer: &[u8], now: u64) -> bool {
        let mut by_peer = self
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !by_peer.contains_key(peer) && by_peer.len() >= self.max_peers {
            // Forget windows that have ended; if none has, the oldest.
            let window = self.window_secs;
            by_peer.retain(|_, (start, _)| now.saturating_sub(*start) < window);
            if by_peer.len() >= self.max_peers
                && let Some(oldest) = by_peer
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(peer, _)| peer.clone())
            {
                by_peer.remove(&oldest);
            }
        }
        let slot = by_peer.entry(peer.to_vec()).or_insert((now, 0));
        if now.saturating_sub(slot.0) >= self.window_secs {
            *slot = (now, 0);
        }
        slot.1 = slot.1.saturating_add(1);
        slot.1 > self.limit
    }

    /// Peers being tracked.
    pub fn len(&self) -> usize {
        self.by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no peer is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_has_its_own_window() {
        let strikes = Strikes::new(2, 60, 16);
        assert!(!strikes.record(b"a", 0));
        assert!(!strikes.record(b"a", 1));
        assert!(!strikes.record(b"b", 2), "b is not punished for a");
        assert!(strikes.record(b"a", 2));
        assert!(strikes.record(b"a", 59), "still the same window");
        assert!(!strikes.record(b"a", 60), "the window ended");
    }

    #[test]
    fn tracking_is_bounded() {
        let strikes = Strikes::new(2, 60, 4);
        for i in 0..100u8 {
            strikes.record(&[i], u64::from(i));
        }
        assert!(strikes.len() <= 4);
    }

    #[test]
    fn policy_refusals_are_not_bad_messages() {
        assert!(is_bad_message("bad-signature"));
        assert!(is_bad_message("from-future"));
        assert!(!is_bad_message("busy"));
        assert!(!is_bad_message("not-a-provider"));
    }
}
