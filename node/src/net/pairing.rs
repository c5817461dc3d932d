//! One connection per pair of nodes.
//!
//! Both nodes of a pair dial each other: at start-up, and again whenever
//! their connection drops. When both dials land, the pair would hold two
//! connections for good, each with its own TLS session and keep-alives, and
//! libp2p's request-response spreads requests over both. So both ends apply
//! one rule: **the dial made by the node with the lesser PeerId wins**. A
//! connection that loses is refused while it is being set up, before either
//! end sends a request on it; a connection already in use is never closed.
//!
//! A connection loses only inside the race: when the winning dial started,
//! or its connection came up, less than [`RACE_WINDOW`] ago. A peer that
//! restarted, or a second process with the same key, connects beside an
//! older connection normally.
//!
//! [`Pairing`] holds the decisions and takes the time as an argument, so
//! they are tested without a network; [`Behaviour`] feeds it from the swarm.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use careweave_node::net::pairing::{Pairing, RACE_WINDOW};
//! use libp2p::PeerId;
//! use libp2p::swarm::ConnectionId;
//!
//! let (a, b) = (PeerId::random(), PeerId::random());
//! let (lesser, greater) = if a < b { (a, b) } else { (b, a) };
//! let mut at_lesser = Pairing::new(lesser);
//! let now = Instant::now();
//! at_lesser.dial_started(ConnectionId::new_unchecked(1), greater, now);
//! // The greater PeerId's own dial arrives while ours is under way: refused.
//! assert!(at_lesser.admit_inbound(greater, now).is_err());
//! // Long after, a second connection is a restarted peer, and is let in.
//! assert!(at_lesser.admit_inbound(greater, now + RACE_WINDOW * 2).is_ok());
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// How long after a winning dial starts, or its connection comes up, a
/// losing connection from the same peer is still refused. Dials that cross
/// take well under a second on a loaded machine; a restarted peer takes
/// longer than this to start and dial again.
pub const RACE_WINDOW: Duration = Duration::from_secs(3);

/// Most connection attempts tracked at once; past it an attempt is not
/// tracked, which at worst lets a second connection through.
const MAX_TRACKED: usize = 1024;

/// A connection refused because the pair already has (or is making) the
/// connection that wins.
#[derive(Debug, thiserror::Error)]
#[error("{peer} and this node are already connecting by the lesser PeerId's dial")]
pub struct SecondConnection {
    pub peer: PeerId,
}

#[derive(Debug, Clone, Copy)]
struct Attempt {
    peer: PeerId,
    since: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    peer: PeerId,
    we_dialled: bool,
    since: Instant,
}

/// The pairing decisions for one node, free of I/O.
#[derive(Debug)]
pub struct Pairing {
    local: PeerId,
    /// Our dials still being set up.
    dialling: HashMap<ConnectionId, Attempt>,
    /// Inbound connections still being set up, from a listed peer's address.
    arriving: HashMap<ConnectionId, Attempt>,
    open: HashMap<ConnectionId, Open>,
    /// Listed peers by address. A dial from a listed peer's listening port
    /// (libp2p reuses it for dialling) names the peer before its handshake.
    peers_by_addr: HashMap<Multiaddr, PeerId>,
}

impl Pairing {
    pub fn new(local: PeerId) -> Self {
        Self {
            local,
            dialling: HashMap::new(),
            arriving: HashMap::new(),
            open: HashMap::new(),
            peers_by_addr: HashMap::new(),
        }
    }

    /// Replaces the listed peers' addresses (from the trust list).
    pub fn set_addresses<'a>(
        &mut self,
        peers: impl IntoIterator<Item = (&'a PeerId, &'a [Multiaddr])>,
    ) {
        self.peers_by_addr.clear();
        for (peer, addrs) in peers {
            for addr in addrs {
                if self.peers_by_addr.len() < MAX_TRACKED {
                    self.peers_by_addr.insert(without_peer_id(addr), *peer);
                }
            }
        }
    }

    pub fn dial_started(&mut self, id: ConnectionId, peer: PeerId, now: Instant) {
        self.forget_stale(now);
        if self.dialling.len() < MAX_TRACKED {
            self.dialling.insert(id, Attempt { peer, since: now });
        }
    }

    /// An inbound connection began its handshake from `remote`.
    pub fn inbound_started(&mut self, id: ConnectionId, remote: &Multiaddr, now: Instant) {
        self.forget_stale(now);
        if let Some(peer) = self.peers_by_addr.get(&without_peer_id(remote))
            && self.arriving.len() < MAX_TRACKED
        {
            self.arriving.insert(
                id,
                Attempt {
                    peer: *peer,
                    since: now,
                },
            );
        }
    }

    pub fn came_up(&mut self, id: ConnectionId, peer: PeerId, we_dialled: bool, now: Instant) {
        self.dialling.remove(&id);
        self.arriving.remove(&id);
        self.open.insert(
            id,
            Open {
                peer,
                we_dialled,
                since: now,
            },
        );
    }

    /// A connection closed, or failed before it came up.
    pub fn ended(&mut self, id: ConnectionId) {
        self.dialling.remove(&id);
        self.arriving.remove(&id);
        self.open.remove(&id);
    }

    /// Whether `peer` is dialling us now: then our own dial would only cross it.
    pub fn arriving_from(&self, peer: &PeerId, now: Instant) -> bool {
        self.arriving
            .values()
            .any(|a| a.peer == *peer && within(a.since, now))
    }

    /// An inbound connection from `peer` finished its handshake. It loses
    /// when we have the lesser PeerId and our own dial is racing it.
    pub fn admit_inbound(&self, peer: PeerId, now: Instant) -> Result<(), SecondConnection> {
        let ours_wins = self.local < peer;
        let racing = self
            .dialling
            .values()
            .any(|a| a.peer == peer && within(a.since, now))
            || self
                .open
                .values()
                .any(|o| o.peer == peer && o.we_dialled && within(o.since, now));
        if ours_wins && racing {
            Err(SecondConnection { peer })
        } else {
            Ok(())
        }
    }

    /// Our dial to `peer` finished its handshake. It loses when `peer` has
    /// the lesser PeerId and its dial to us is racing ours.
    pub fn admit_outbound(&self, peer: PeerId, now: Instant) -> Result<(), SecondConnection> {
        let theirs_wins = peer < self.local;
        let racing = self.arriving_from(&peer, now)
            || self
                .open
                .values()
                .any(|o| o.peer == peer && !o.we_dialled && within(o.since, now));
        if theirs_wins && racing {
            Err(SecondConnection { peer })
        } else {
            Ok(())
        }
    }

    /// Attempts whose end the swarm never reported (it always should) do not
    /// stay forever.
    fn forget_stale(&mut self, now: Instant) {
        let keep = |a: &Attempt| now.saturating_duration_since(a.since) < Duration::from_secs(300);
        self.dialling.retain(|_, a| keep(a));
        self.arriving.retain(|_, a| keep(a));
    }
}

fn within(since: Instant, now: Instant) -> bool {
    now.saturating_duration_since(since) < RACE_WINDOW
}

fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// The swarm side of [`Pairing`]. It has no protocol of its own.
#[derive(Debug)]
pub struct Behaviour {
    pairing: Pairing,
}

impl Behaviour {
    pub fn new(local: PeerId) -> Self {
        Self {
            pairing: Pairing::new(local),
        }
    }

    pub fn set_addresses<'a>(
        &mut self,
        peers: impl IntoIterator<Item = (&'a PeerId, &'a [Multiaddr])>,
    ) {
        self.pairing.set_addresses(peers);
    }

    /// Whether `peer` is dialling us now.
    pub fn arriving_from(&self, peer: &PeerId) -> bool {
        self.pairing.arriving_from(peer, Instant::now())
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.pairing
            .inbound_started(connection_id, remote_addr, Instant::now());
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.pairing
            .admit_inbound(peer, Instant::now())
            .map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        _addresses: &[Multiaddr],
        _effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = maybe_peer {
            self.pairing
                .dial_started(connection_id, peer, Instant::now());
        }
        Ok(vec![])
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.pairing
            .admit_outbound(peer, Instant::now())
            .map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                let we_dialled = matches!(e.endpoint, ConnectedPoint::Dialer { .. });
                self.pairing
                    .came_up(e.connection_id, e.peer_id, we_dialled, Instant::now());
            }
            FromSwarm::ConnectionClosed(e) => self.pairing.ended(e.connection_id),
            FromSwarm::DialFailure(e) => self.pairing.ended(e.connection_id),
            FromSwarm::ListenFailure(e) => self.pairing.ended(e.connection_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (PeerId, PeerId) {
        let (a, b) = (PeerId::random(), PeerId::random());
        if a < b { (a, b) } else { (b, a) }
    }

    fn id(n: usize) -> ConnectionId {
        ConnectionId::new_unchecked(n)
    }

    #[test]
    fn the_lesser_refuses_the_greater_while_its_own_dial_is_under_way() {
        let (lesser, greater) = pair();
        let mut at_lesser = Pairing::new(lesser);
        let t = Instant::now();
        at_lesser.dial_started(id(1), greater, t);
        assert!(
            at_lesser
                .admit_inbound(greater, t + Duration::from_millis(300))
                .is_err()
        );
        // Its own dial is never refused.
        assert!(at_lesser.admit_outbound(greater, t).is_ok());
    }

    #[test]
    fn the_lesser_refuses_the_greater_just_after_its_own_dial_came_up() {
        let (lesser, greater) = pair();
        let mut at_lesser = Pairing::new(lesser);
        let t = Instant::now();
        at_lesser.dial_started(id(1), greater, t);
        at_lesser.came_up(id(1), greater, true, t);
        assert!(
            at_lesser
                .admit_inbound(greater, t + Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn the_greater_drops_its_own_dial_when_the_lesser_is_dialling_it() {
        let (lesser, greater) = pair();
        let mut at_greater = Pairing::new(greater);
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
        at_greater.set_addresses([(&lesser, std::slice::from_ref(&addr))]);
        let t = Instant::now();
        at_greater.inbound_started(id(7), &addr, t);
        assert!(at_greater.arriving_from(&lesser, t));
        assert!(at_greater.admit_outbound(lesser, t).is_err());
        // The lesser's dial itself is let in.
        assert!(at_greater.admit_inbound(lesser, t).is_ok());
        at_greater.came_up(id(7), lesser, false, t);
        assert!(!at_greater.arriving_from(&lesser, t));
        assert!(at_greater.admit_outbound(lesser, t).is_err());
    }

    #[test]
    fn an_address_with_a_peer_id_names_the_same_peer() {
        let (lesser, greater) = pair();
        let mut at_greater = Pairing::new(greater);
        let listed: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{lesser}")
            .parse()
            .unwrap();
        at_greater.set_addresses([(&lesser, std::slice::from_ref(&listed))]);
        let t = Instant::now();
        at_greater.inbound_started(id(1), &"/ip4/127.0.0.1/tcp/4001".parse().unwrap(), t);
        assert!(at_greater.arriving_from(&lesser, t));
        at_greater.inbound_started(id(2), &"/ip4/127.0.0.1/tcp/5999".parse().unwrap(), t);
        at_greater.ended(id(1));
        assert!(!at_greater.arriving_from(&lesser, t));
    }

    #[test]
    fn after_the_window_a_second_connection_is_a_restart_and_is_let_in() {
        let (lesser, greater) = pair();
        let t = Instant::now();
        let later = t + RACE_WINDOW + Duration::from_millis(1);
        let mut at_lesser = Pairing::new(lesser);
        at_lesser.dial_started(id(1), greater, t);
        at_lesser.came_up(id(1), greater, true, t);
        assert!(at_lesser.admit_inbound(greater, later).is_ok());
        let mut at_greater = Pairing::new(greater);
        at_greater.came_up(id(2), lesser, false, t);
        assert!(at_greater.admit_outbound(lesser, later).is_ok());
    }

    #[test]
    fn the_greater_lets_in_anything_and_the_lesser_dials_freely() {
        let (lesser, greater) = pair();
        let t = Instant::now();
        let mut at_greater = Pairing::new(greater);
        at_greater.dial_started(id(1), lesser, t);
        at_greater.came_up(id(1), lesser, true, t);
        assert!(at_greater.admit_inbound(lesser, t).is_ok());
        let mut at_lesser = Pairing::new(lesser);
        at_lesser.came_up(id(2), greater, false, t);
        assert!(at_lesser.admit_outbound(greater, t).is_ok());
    }

    #[test]
    fn an_ended_dial_no_longer_races() {
        let (lesser, greater) = pair();
        let t = Instant::now();
        let mut at_lesser = Pairing::new(lesser);
        at_lesser.dial_started(id(1), greater, t);
        at_lesser.ended(id(1));
        assert!(at_lesser.admit_inbound(greater, t).is_ok());
    }

    #[test]
    fn a_race_with_one_peer_leaves_the_others_alone() {
        let (lesser, greater) = pair();
        let t = Instant::now();
        let mut at_lesser = Pairing::new(lesser);
        at_lesser.dial_started(id(1), greater, t);
        at_lesser.came_up(id(2), greater, false, t);
        for _ in 0..20 {
            let other = PeerId::random();
            assert!(at_lesser.admit_inbound(other, t).is_ok());
            assert!(at_lesser.admit_outbound(other, t).is_ok());
        }
    }

    /// Two real swarms over TCP, TLS and yamux that dial each other at the
    /// same moment. Each round is a fresh pair.
    mod crossing_dials {
        use futures::StreamExt;
        use libp2p::swarm::{Swarm, SwarmEvent};

        use super::super::Behaviour;
        use super::*;

        fn swarm() -> Swarm<Behaviour> {
            libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    libp2p::tcp::Config::default().nodelay(true),
                    libp2p::tls::Config::new,
                    libp2p::yamux::Config::default,
                )
                .unwrap()
                .with_behaviour(|key| Behaviour::new(key.public().to_peer_id()))
                .unwrap()
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build()
        }

        async fn listening(swarm: &mut Swarm<Behaviour>) -> Multiaddr {
            swarm
                .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
                .unwrap();
            loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    return address;
                }
            }
        }

        fn open(swarm: &Swarm<Behaviour>) -> u32 {
            swarm.network_info().connection_counters().num_established()
        }

        #[tokio::test]
        async fn leave_one_connection_per_pair() {
            for round in 0..5 {
                let (mut a, mut b) = (swarm(), swarm());
                let (a_addr, b_addr) = (listening(&mut a).await, listening(&mut b).await);
                let (a_id, b_id) = (*a.local_peer_id(), *b.local_peer_id());
                a.behaviour_mut()
                    .set_addresses([(&b_id, std::slice::from_ref(&b_addr))]);
                b.behaviour_mut()
                    .set_addresses([(&a_id, std::slice::from_ref(&a_addr))]);
                a.dial(b_addr.with(Protocol::P2p(b_id))).unwrap();
                b.dial(a_addr.with(Protocol::P2p(a_id))).unwrap();
                // Drive both until both are connected and nothing has
                // happened for half a second (at most ten seconds).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let quiet = tokio::time::sleep(Duration::from_millis(500));
                    tokio::select! {
                        _ = a.select_next_some() => {}
                        _ = b.select_next_some() => {}
                        _ = quiet => if open(&a) > 0 && open(&b) > 0 { break },
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "round {round}: never settled"
                    );
                }
                assert_eq!((open(&a), open(&b)), (1, 1), "round {round}");
            }
        }
    }
}
