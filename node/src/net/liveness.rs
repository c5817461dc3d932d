//! Liveness pings, each connection at an interval of its own.
//!
//! Every connection to another ICB is pinged with libp2p's ping protocol.
//! The event loop closes a connection whose pings go unanswered twice
//! running, so a peer that vanished without closing its connections (a
//! pulled cable, a frozen host) is reported unreachable at once, instead of
//! after every request's deadline, and is dialled again.
//!
//! libp2p pings a connection at one fixed interval, counted from the moment
//! the connection came up. Connections that come up together, as all of a
//! node's do when it starts, would be pinged together for as long as they
//! last. On a testnet of 42 nodes on one machine that was 1 722 pings every
//! 15 s, about 0.35 s of CPU in one burst, and the locates that met a burst
//! were the slowest (docs/benchmarks.md). So each connection is given one of
//! [`SPREAD`] intervals between ¾ and 1¼ of the configured one, and the
//! pings drift apart.
//!
//! ```
//! use std::time::Duration;
//! use careweave_node::net::liveness::intervals;
//!
//! let every = intervals(Duration::from_secs(20));
//! assert_eq!(every.first(), Some(&Duration::from_secs(15)));
//! assert_eq!(every.last(), Some(&Duration::from_secs(25)));
//! ```

use std::hash::{BuildHasher, RandomState};
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, ping};

/// How many different intervals connections are spread over.
pub const SPREAD: usize = 16;

/// The intervals connections are pinged at: [`SPREAD`] of them, evenly
/// from ¾ to 1¼ of `every`.
pub fn intervals(every: Duration) -> [Duration; SPREAD] {
    let steps = u32::try_from(SPREAD - 1).unwrap_or(u32::MAX);
    std::array::from_fn(|i| {
        let i = u32::try_from(i).unwrap_or(steps);
        every * (3 * steps + 2 * i) / (4 * steps)
    })
}

/// libp2p's ping behaviour, once per interval; each connection is handed to
/// one of them, chosen by a hash of its id with this process's random keys.
pub struct Behaviour {
    pings: Vec<ping::Behaviour>,
    choose: RandomState,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("liveness::Behaviour")
            .field("intervals", &self.pings.len())
            .finish()
    }
}

impl Behaviour {
    /// Pings every connection about every `every`, and counts a ping as
    /// unanswered after `timeout`.
    pub fn new(every: Duration, timeout: Duration) -> Self {
        let pings = intervals(every)
            .into_iter()
            .map(|interval| {
                ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(interval)
                        .with_timeout(timeout),
                )
            })
            .collect();
        Self {
            pings,
            choose: RandomState::new(),
        }
    }

    /// Which ping behaviour serves `connection`: the same one every time.
    fn index_for(&self, connection: ConnectionId) -> usize {
        let len = self.pings.len().max(1);
        // The remainder is below `len`, so it fits a usize.
        usize::try_from(self.choose.hash_one(connection) % len as u64).unwrap_or(0)
    }

    fn ping_for(&mut self, connection: ConnectionId) -> Result<&mut ping::Behaviour, String> {
        let index = self.index_for(connection);
        self.pings
            .get_mut(index)
            .ok_or_else(|| "liveness has no ping behaviour".to_owned())
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <ping::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = ping::Event;

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.ping_for(connection_id)
            .map_err(ConnectionDenied::new)?
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.ping_for(connection_id)
            .map_err(ConnectionDenied::new)?
            .handle_established_outbound_connection(
                connection_id,
                peer,
                addr,
                role_override,
                port_use,
            )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        for ping in &mut self.pings {
            ping.on_swarm_event(event);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        if let Ok(ping) = self.ping_for(connection) {
            ping.on_connection_handler_event(peer, connection, event);
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        for ping in &mut self.pings {
            if let Poll::Ready(event) = ping.poll(cx) {
                return Poll::Ready(event);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_spread_evenly_around_the_setting() {
        let every = intervals(Duration::from_secs(15));
        assert_eq!(every.len(), SPREAD);
        assert_eq!(every[0], Duration::from_millis(11_250));
        assert_eq!(every[SPREAD - 1], Duration::from_millis(18_750));
        assert!(every.windows(2).all(|w| w[0] < w[1]), "{every:?}");
        let mean = every.iter().sum::<Duration>() / SPREAD as u32;
        assert_eq!(mean, Duration::from_secs(15));
    }

    #[test]
    fn connections_are_spread_over_the_intervals() {
        let liveness = Behaviour::new(Duration::from_secs(15), Duration::from_secs(20));
        let mut used = std::collections::HashSet::new();
        for id in 0..400 {
            let connection = ConnectionId::new_unchecked(id);
            let index = liveness.index_for(connection);
            assert_eq!(
                index,
                liveness.index_for(connection),
                "a connection keeps its interval"
            );
            used.insert(index);
        }
        assert_eq!(
            used.len(),
            SPREAD,
            "400 connections should use every interval"
        );
    }
}
