//! One connection per pair of nodes.
//!
//! Both nodes of a pair dial each other: at start-up, when a list names a
//! newcomer, and after a disconnection. Dialled at the same moment, the pair
//! used to end up with two connections, each with its own TLS session,
//! gossipsub, identify and ping traffic. On a 42-ICB testnet that was about
//! 1 350 connections where 861 do.
//!
//! Two rules, the same at both ends, avoid that without closing a
//! connection that carries requests in the usual case:
//! - the node with the lesser PeerId dials at once; the other waits
//!   [`DIAL_GRACE`] and dials only if still not connected;
//! - if two connections still form, both ends keep the one the lesser
//!   PeerId dialled and close the other. Each end reaches the same answer
//!   whatever order its connections came up in.
//!
//! This module decides; the event loop does the dialling and closing.
//!
//! ```
//! use careweave_node::net::pairing::{DialedBy, Redundant, dials_first, redundant};
//! let (low, high) = (b"\x00\x01".as_slice(), b"\x00\x02".as_slice());
//! assert!(dials_first(low, high));
//! assert!(!dials_first(high, low));
//! // The lesser PeerId's end sees its own dial come up, then the other's:
//! // it keeps its own and closes the new one.
//! assert_eq!(redundant(low, high, DialedBy::Us, DialedBy::Them), Some(Redundant::New));
//! // The other end sees them the other way round and closes the same one.
//! assert_eq!(redundant(high, low, DialedBy::Us, DialedBy::Them), Some(Redundant::Existing));
//! ```

use std::time::Duration;

/// How long the node with the greater PeerId waits before dialling, so
/// the other's dial can land first. Dials between ICBs take well under a
/// second.
pub const DIAL_GRACE: Duration = Duration::from_secs(2);

/// Which end of a connection dialled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialedBy {
    Us,
    Them,
}

/// Which of two connections to the same peer should close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redundant {
    /// The connection that has just come up.
    New,
    /// The one that was already there.
    Existing,
}

/// Whether this node dials `peer` at once. `own` and `peer` are PeerIds as
/// bytes; the lesser dials first.
pub fn dials_first(own: &[u8], peer: &[u8]) -> bool {
    own < peer
}

/// Given a connection to `peer` that was already up and one that has just
/// come up, which should close, if either. Both ends keep the connection
/// the lesser PeerId dialled. Two connections dialled by the same end are
/// both kept: the ends could not agree which is older, and the dial rules
/// make that rare.
pub fn redundant(own: &[u8], peer: &[u8], existing: DialedBy, new: DialedBy) -> Option<Redundant> {
    if existing == new {
        return None;
    }
    let keeper = if dials_first(own, peer) {
        DialedBy::Us
    } else {
        DialedBy::Them
    };
    Some(if new == keeper {
        Redundant::Existing
    } else {
        Redundant::New
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: &[u8] = b"\x00\x24\x08\x01";
    const HIGH: &[u8] = b"\x00\x24\x08\x02";

    /// The connection each end closes, named from the lesser PeerId's end:
    /// `true` for the one it dialled.
    fn closed_at(own: &[u8], peer: &[u8], first_up_dialed_by_low: bool) -> bool {
        let own_is_low = own == LOW;
        let by = |dialed_by_low: bool| {
            if dialed_by_low == own_is_low {
                DialedBy::Us
            } else {
                DialedBy::Them
            }
        };
        let existing = by(first_up_dialed_by_low);
        let new = by(!first_up_dialed_by_low);
        match redundant(own, peer, existing, new) {
            Some(Redundant::New) => !first_up_dialed_by_low,
            Some(Redundant::Existing) => first_up_dialed_by_low,
            None => panic!("two connections dialled by different ends must resolve"),
        }
    }

    #[test]
    fn exactly_one_end_dials_at_once() {
        assert!(dials_first(LOW, HIGH));
        assert!(!dials_first(HIGH, LOW));
    }

    #[test]
    fn both_ends_close_the_same_connection_whatever_order_they_saw() {
        for low_saw_own_first in [true, false] {
            for high_saw_low_first in [true, false] {
                let at_low = closed_at(LOW, HIGH, low_saw_own_first);
                let at_high = closed_at(HIGH, LOW, high_saw_low_first);
                assert_eq!(at_low, at_high);
                // The lesser PeerId's dial is the one kept.
                assert!(!at_low);
            }
        }
    }

    #[test]
    fn two_dials_by_the_same_end_are_both_kept() {
        for (own, peer) in [(LOW, HIGH), (HIGH, LOW)] {
            for by in [DialedBy::Us, DialedBy::Them] {
                assert_eq!(redundant(own, peer, by, by), None);
            }
        }
    }
}
