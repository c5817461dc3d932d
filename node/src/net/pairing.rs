//! Which end of a pair of nodes dials first.
//!
//! Both nodes of a pair dial each other: at start-up, when a list names a
//! newcomer, and after a disconnection. Dialled at the same moment, the pair
//! used to end up with two connections, each with its own TLS session,
//! gossipsub, identify and ping traffic. On a 42-ICB testnet that was about
//! 1 300 connections where 861 do.
//!
//! So the node with the lesser PeerId dials at once, and the other waits
//! [`DIAL_GRACE`] and dials only if it is still not connected. Both ends
//! still dial, so a pair connects even if one end cannot dial out. Two
//! connections can still form when the two dials happen to meet, which is
//! rare and harmless; none is ever closed for being a second one, because
//! a connection that comes later may be the live one (from a peer that
//! restarted before its old connection was seen to die).
//!
//! ```
//! use careweave_node::net::pairing::dials_first;
//! let (low, high) = (b"\x00\x01".as_slice(), b"\x00\x02".as_slice());
//! assert!(dials_first(low, high));
//! assert!(!dials_first(high, low));
//! ```

use std::time::Duration;

/// How long the node with the greater PeerId waits before dialling, on
/// first sight of a peer and on top of every redial backoff, so the other's
/// dial can land first. Dials between ICBs take well under a second.
pub const DIAL_GRACE: Duration = Duration::from_secs(2);

/// Whether this node dials `peer` at once. `own` and `peer` are PeerIds as
/// bytes; the lesser dials first, so exactly one end of a pair does.
pub fn dials_first(own: &[u8], peer: &[u8]) -> bool {
    own < peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_end_of_a_pair_dials_at_once() {
        let ids: [&[u8]; 3] = [b"\x00\x24\x08\x01", b"\x00\x24\x08\x02", b"\x00\x25"];
        for a in ids {
            for b in ids {
                if a != b {
                    assert_ne!(dials_first(a, b), dials_first(b, a));
                }
            }
        }
    }
}
