//! The peer plane: a libp2p swarm gated by the trust list.
//!
//! One task owns the swarm ([`EventLoop`]); everything else talks to it
//! through a cloneable [`NetworkHandle`] over bounded channels with oneshot
//! replies. Signing, verification, policy and audit happen in the node
//! ([`crate::node::Node`]) on blocking threads, never in the event loop.

mod answerer;
pub mod codec;
pub mod liveness;
pub mod pairing;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::message::{FetchRequest, LocateRequest, Pointer, Section, WithheldReason};
use careweave_protocol::trust::{AcceptedList, Role};
use careweave_protocol::{OdsCode, PeerIdBytes};
use futures::StreamExt;
use libp2p::core::upgrade;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, allow_block_list, connection_limits, gossipsub,
    identify, identity, mdns, ping, request_response,
};
use tokio::sync::{mpsc, oneshot};

use crate::node::{FetchAnswer, Inbound, LocateAnswer, Node, OutboundRequest, RequestError};
use crate::strikes::{self, Strikes};
use codec::FrameCodec;

/// The gossipsub topic new trust lists are pushed on.
pub const TRUST_TOPIC: &str = "careweave/trust/1";
/// Most commands queued for the event loop.
const COMMAND_QUEUE: usize = 256;
/// Most finished inbound requests queued for the event loop.
const RESPONSE_QUEUE: usize = 1024;

/// Settings for the peer plane, from `[network]`.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub listen: Vec<Multiaddr>,
    pub max_frame_bytes: usize,
    /// Each outbound request's own deadline.
    pub request_deadline: Duration,
    pub max_inflight_total: usize,
    pub max_inflight_per_peer: usize,
    /// Token bucket per peer: sustained requests per second and burst.
    pub rate_per_sec: f64,
    pub burst: f64,
    pub idle_timeout: Duration,
    /// Liveness: each connection is pinged about this often (see
    /// [`liveness`]), and closed when two pings running go unanswered
    /// within `ping_timeout`.
    pub ping_every: Duration,
    pub ping_timeout: Duration,
    pub mdns: bool,
}

/// Protocol names as libp2p streams.
fn stream_protocol(protocol: ProtocolId) -> StreamProtocol {
    match protocol {
        ProtocolId::Locate => StreamProtocol::new("/careweave/locate/1"),
        ProtocolId::Fetch => StreamProtocol::new("/careweave/fetch/1"),
        ProtocolId::Trust => StreamProtocol::new("/careweave/trust/1"),
    }
}

/// The behaviours, the allow-list first so it decides before anything else,
/// then pairing, so a second connection is refused before the others see it.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    allow: allow_block_list::Behaviour<allow_block_list::AllowedPeers>,
    pairing: pairing::Behaviour,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: liveness::Behaviour,
    locate: request_response::Behaviour<FrameCodec>,
    fetch: request_response::Behaviour<FrameCodec>,
    trust: request_response::Behaviour<FrameCodec>,
    gossip: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Why the network could not start or a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("libp2p: {0}")]
    Libp2p(String),
    #[error("the network task has stopped")]
    Stopped,
    #[error("the network is busy; try again")]
    Busy,
    #[error("the audit log could not be written, so nothing was released: {0}")]
    Audit(String),
    #[error("a worker task failed: {0}")]
    Task(String),
}

/// The outcome for one ICB in a national locate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IcbOutcome {
    /// Answered with pointers (and possibly some withheld).
    Pointers {
        pointers: Vec<Pointer>,
        withheld: Vec<WithheldReason>,
    },
    /// Holds nothing for the patient (or nothing it may say).
    NoRecords,
    /// Its sharing agreement does not share what was asked with this ICB
    /// (the sections are in [`IcbResult::not_shared`]); whether it holds
    /// records is not said.
    NotShared,
    /// Holds records it withheld, with the reasons.
    Withheld(Vec<WithheldReason>),
    /// Did not answer within the deadline.
    TimedOut,
    /// No connection, or the connection failed.
    Unreachable(String),
    /// Refused the request, with its reason.
    Refused(String),
}

/// One ICB's part of a locate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcbResult {
    pub ods: OdsCode,
    pub name: String,
    pub outcome: IcbOutcome,
    /// Sections its sharing agreement does not share with this ICB.
    pub not_shared: Vec<Section>,
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchFailure {
    #[error("the custodian {0} is not an active provider on the trust list")]
    UnknownCustodian(String),
    #[error("no answer from {0} within the deadline")]
    TimedOut(String),
    #[error("{0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("the response was refused: {0}")]
    BadResponse(String),
    #[error("the request could not be made: {0}")]
    Request(String),
}

/// A snapshot for `status`.
#[derive(Debug, Clone, Default)]
pub struct NetStatus {
    pub listen_addrs: Vec<Multiaddr>,
    pub connected: Vec<PeerId>,
    /// Open connections: one per peer, except for a moment while a restarted
    /// peer's old connection dies (see [`pairing`]).
    pub connections: usize,
}

enum Command {
    Send {
        protocol: ProtocolId,
        peer: PeerId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    Connected {
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    TrustChanged,
    Status {
        reply: oneshot::Sender<NetStatus>,
    },
}

/// A cloneable handle to the swarm's event loop.
#[derive(Clone)]
pub struct NetworkHandle {
    commands: mpsc::Sender<Command>,
    node: Arc<Node>,
    deadline: Duration,
}

impl std::fmt::Debug for NetworkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkHandle").finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_libp2p(peer: &PeerIdBytes) -> Option<PeerId> {
    PeerId::from_bytes(peer.as_bytes()).ok()
}

impl NetworkHandle {
    async fn command(&self, command: Command) -> Result<(), NetError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Tells the event loop the trust state changed (a list was installed
    /// locally), so it re-applies the allow-list and pushes the list out.
    pub async fn trust_changed(&self) -> Result<(), NetError> {
        self.command(Command::TrustChanged).await
    }

    /// Listen addresses and connected peers.
    pub async fn status(&self) -> Result<NetStatus, NetError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Status { reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    async fn connected(&self) -> Result<HashSet<PeerId>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Connected { reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Sends signed bytes and waits for the answer, at most the deadline.
    /// A request to this node itself is answered here, through the same
    /// checks, policy and audit as any other.
    async fn exchange(&self, request: &OutboundRequest) -> Result<Vec<u8>, FetchFailure> {
        let ods = request.peer_ods.to_string();
        if &request.peer_id == self.node.peer_id() {
            let node = Arc::clone(&self.node);
            let (protocol, bytes, own) = (
                request.protocol,
                request.bytes.clone(),
                request.peer_id.clone(),
            );
            let answer = tokio::task::spawn_blocking(move || {
                node.handle_request(protocol, &bytes, &own, unix_now())
            })
            .await
            .map_err(|e| FetchFailure::Unreachable(ods.clone(), e.to_string()))?;
            return match answer {
                Inbound::Reply(bytes) => Ok(bytes),
                Inbound::Drop(reason) => Err(FetchFailure::Unreachable(ods, reason)),
            };
        }
        let peer = to_libp2p(&request.peer_id)
            .ok_or_else(|| FetchFailure::Unreachable(ods.clone(), "bad PeerId".into()))?;
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Send {
                protocol: request.protocol,
                peer,
                bytes: request.bytes.clone(),
                reply,
            })
            .await
            .map_err(|_| FetchFailure::Unreachable(ods.clone(), "network stopped".into()))?;
        match tokio::time::timeout(self.deadline, rx).await {
            Err(_) => Err(FetchFailure::TimedOut(ods)),
            Ok(Err(_)) => Err(FetchFailure::Unreachable(ods, "network stopped".into())),
            Ok(Ok(Err(e))) => Err(FetchFailure::Unreachable(ods, e)),
            Ok(Ok(Ok(bytes))) => Ok(bytes),
        }
    }

    /// Sends already-signed bytes to a peer and returns its raw answer (for
    /// diagnostics and tests; the answer is not checked here).
    pub async fn send_raw(
        &self,
        protocol: ProtocolId,
        peer: &PeerIdBytes,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let peer = to_libp2p(peer).ok_or("bad PeerId")?;
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Send {
                protocol,
                peer,
                bytes,
                reply,
            })
            .await
            .map_err(|_| "network stopped".to_owned())?;
        match tokio::time::timeout(self.deadline, rx).await {
            Err(_) => Err("timed out".to_owned()),
            Ok(Err(_)) => Err("network stopped".to_owned()),
            Ok(Ok(result)) => result,
        }
    }

    /// Asks every active provider on the list at once, each with its own
    /// deadline, and returns when all have answered or the deadline passed.
    ///
    /// Two blocking tasks sign and audit the requests, and one audit sync
    /// makes them durable before any is sent; the answers are checked as
    /// they arrive and audited, and one more sync makes those entries
    /// durable before anything is returned.
    pub async fn locate(&self, request: LocateRequest) -> Result<Vec<IcbResult>, NetError> {
        let now = unix_now();
        let list = self.node.current_list(now).ok_or(NetError::Busy)?;
        let connected = self.connected().await?;
        let mut results = Vec::new();
        let mut reachable = Vec::new();
        for (ods, name, peer) in providers(&list, now) {
            let own = peer.as_ref() == Some(self.node.peer_id());
            let is_connected = own
                || peer
                    .as_ref()
                    .and_then(to_libp2p)
                    .is_some_and(|p| connected.contains(&p));
            if is_connected {
                reachable.push((ods, name));
            } else {
                results.push(IcbResult {
                    ods,
                    name,
                    outcome: IcbOutcome::Unreachable("not connected".into()),
                    not_shared: vec![],
                });
            }
        }
        let targets: Vec<OdsCode> = reachable.iter().map(|(ods, _)| ods.clone()).collect();
        let prepared = prepare_on_two_threads(Arc::clone(&self.node), targets, request).await?;
        let asked = reachable
            .into_iter()
            .zip(prepared)
            .map(|((ods, name), outbound)| async move {
                let (outcome, not_shared) = match outbound {
                    Ok(outbound) => self.locate_one(&outbound).await,
                    Err(e) => (IcbOutcome::Refused(e.to_string()), vec![]),
                };
                IcbResult {
                    ods,
                    name,
                    outcome,
                    not_shared,
                }
            });
        results.extend(futures::future::join_all(asked).await);
        let node = Arc::clone(&self.node);
        tokio::task::spawn_blocking(move || node.sync_audit())
            .await
            .map_err(|e| NetError::Task(e.to_string()))?
            .map_err(|e| NetError::Audit(e.to_string()))?;
        results.sort_by(|a, b| a.ods.cmp(&b.ods));
        Ok(results)
    }

    /// Sends one signed locate and checks the answer. Its audit entry is
    /// written but not yet durable; `locate` syncs once for all answers.
    async fn locate_one(&self, outbound: &OutboundRequest) -> (IcbOutcome, Vec<Section>) {
        let answer = self.exchange(outbound).await;
        let now = unix_now();
        match answer {
            Err(failure) => {
                let _ =
                    self.node
                        .record_outbound_failure_deferred(outbound, &failure.to_string(), now);
                let outcome = match failure {
                    FetchFailure::TimedOut(_) => IcbOutcome::TimedOut,
                    other => IcbOutcome::Unreachable(other.to_string()),
                };
                (outcome, vec![])
            }
            Ok(bytes) => match self
                .node
                .accept_locate_response_deferred(outbound, &bytes, now)
            {
                Ok(LocateAnswer::Answered(r)) => {
                    let outcome = if !r.pointers.is_empty() {
                        IcbOutcome::Pointers {
                            pointers: r.pointers,
                            withheld: r.withheld,
                        }
                    } else if !r.withheld.is_empty() {
                        IcbOutcome::Withheld(r.withheld)
                    } else if !r.not_shared.is_empty() {
                        IcbOutcome::NotShared
                    } else {
                        IcbOutcome::NoRecords
                    };
                    (outcome, r.not_shared)
                }
                Ok(LocateAnswer::Refused(e)) => (
                    IcbOutcome::Refused(format!("{:?}: {}", e.code, e.message)),
                    vec![],
                ),
                Err(e) => (
                    IcbOutcome::Refused(format!("response not accepted: {e}")),
                    vec![],
                ),
            },
        }
    }

    /// Fetches the records behind a pointer from its custodian; every
    /// record's custodian signature is checked before it is returned.
    pub async fn fetch(&self, request: FetchRequest) -> Result<FetchAnswer, FetchFailure> {
        let custodian = request
            .pointer_id
            .split_once('-')
            .and_then(|(ods, _)| OdsCode::parse(ods).ok())
            .ok_or_else(|| FetchFailure::Request("pointer id does not name a custodian".into()))?;
        let node = Arc::clone(&self.node);
        let target = custodian.clone();
        let outbound =
            tokio::task::spawn_blocking(move || node.prepare_fetch(&target, &request, unix_now()))
                .await
                .map_err(|e| FetchFailure::Request(e.to_string()))?
                .map_err(|e| FetchFailure::Request(e.to_string()))?;
        let answer = self.exchange(&outbound).await;
        let node = Arc::clone(&self.node);
        tokio::task::spawn_blocking(move || match answer {
            Err(failure) => {
                let _ = node.record_outbound_failure(&outbound, &failure.to_string(), unix_now());
                Err(failure)
            }
            Ok(bytes) => node
                .accept_fetch_response(&outbound, &bytes, unix_now())
                .map_err(|e| FetchFailure::BadResponse(e.to_string())),
        })
        .await
        .map_err(|e| FetchFailure::Request(e.to_string()))?
    }
}

/// Signs and audits a locate's requests, half on each of two blocking
/// threads, then makes every audit entry durable with one sync. Nothing is
/// sent until then, so while the requests are signed the rest of the
/// network waits; on one thread this took 2.6 ms of a 34 ms national
/// locate (p50, two cores), on two 2.0 ms.
async fn prepare_on_two_threads(
    node: Arc<Node>,
    targets: Vec<OdsCode>,
    request: LocateRequest,
) -> Result<Vec<Result<OutboundRequest, RequestError>>, NetError> {
    let now = unix_now();
    let request = Arc::new(request);
    let sign = |half: Vec<OdsCode>| {
        let (node, request) = (Arc::clone(&node), Arc::clone(&request));
        tokio::task::spawn_blocking(move || node.sign_locates(&half, &request, now))
    };
    let mut first = targets;
    let second = first.split_off(first.len() / 2);
    let (first, second) = tokio::join!(sign(first), sign(second));
    let mut signed = first.map_err(|e| NetError::Task(e.to_string()))?;
    signed.append(second.map_err(|e| NetError::Task(e.to_string()))?);
    tokio::task::spawn_blocking(move || node.sync_signed(signed))
        .await
        .map_err(|e| NetError::Task(e.to_string()))
}

/// Active providers, this node included (its own records are part of a
/// national answer): ODS, name and PeerId.
fn providers(list: &AcceptedList, now: u64) -> Vec<(OdsCode, String, Option<PeerIdBytes>)> {
    list.list()
        .members
        .iter()
        .filter(|m| m.is_active_at(now) && m.has_role(Role::Provider))
        .map(|m| {
            (
                m.ods.clone(),
                m.name.clone(),
                m.peers.first().map(|p| p.peer_id.clone()),
            )
        })
        .collect()
}

/// The window in which busy answers to one peer are counted.
const FLOOD_WINDOW_SECS: u64 = 60;
/// How long a flooding peer is shut out. Back inside the window, its next
/// busy request shuts it out again.
const FLOOD_COOL_DOWN: Duration = Duration::from_secs(10);
/// Requests from a shut-out peer held unanswered at once. A peer that keeps
/// more than this in flight has its connections closed and is refused
/// reconnection for the rest of the cool-down.
const MAX_HELD_FOR_FLOODING: usize = 256;

/// Busy answers one peer may get within the window before it is shut out:
/// its burst allowance, and never fewer than [`MIN_FLOOD_LIMIT`], so
/// a peer that backs off when told it is busy never reaches it.
fn flood_limit(burst: f64) -> u32 {
    // A float-to-int `as` saturates; the burst is validated positive.
    (burst.max(1.0) as u32).max(MIN_FLOOD_LIMIT)
}

/// The fewest busy answers in a window that count as flooding.
pub const MIN_FLOOD_LIMIT: u32 = 50;

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Finished {
    protocol: ProtocolId,
    peer: PeerId,
    channel: request_response::ResponseChannel<Vec<u8>>,
    inbound: Inbound,
}

enum Validated {
    Gossip {
        id: gossipsub::MessageId,
        source: PeerId,
        acceptance: gossipsub::MessageAcceptance,
        changed: bool,
    },
    TrustPulled,
}

/// Where the answer to an outbound request goes.
type AnswerSender = oneshot::Sender<Result<Vec<u8>, String>>;

/// The task that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    node: Arc<Node>,
    config: NetConfig,
    commands: mpsc::Receiver<Command>,
    /// The thread that answers inbound requests; its answers come back on `finished`.
    answerer: answerer::Answerer,
    finished: mpsc::Receiver<Finished>,
    validated_tx: mpsc::Sender<Validated>,
    validated: mpsc::Receiver<Validated>,
    /// Outbound requests awaiting answers. Request ids are counted per
    /// protocol behaviour, so the protocol is part of the key.
    pending: HashMap<(ProtocolId, request_response::OutboundRequestId), AnswerSender>,
    allowed: HashSet<PeerId>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    redial: HashMap<PeerId, (u32, Instant)>,
    inflight_total: usize,
    inflight: HashMap<PeerId, usize>,
    buckets: HashMap<PeerId, Bucket>,
    /// Busy answers per peer; past the limit the peer is flooding.
    flooding: Strikes,
    /// Flooding peers shut out for the cool-down, with their requests held.
    shut_out: HashMap<PeerId, ShutOut>,
    topic: gossipsub::IdentTopic,
    /// The audit checkpoint being signed and synced, if one is.
    checkpointing: Option<tokio::task::JoinHandle<()>>,
}

/// A flooding peer, shut out. Its requests are held unanswered, neither
/// read further, signed nor audited, until the cool-down ends or they time
/// out. A flooder with a bounded window then sits idle. Closing its
/// connection instead made it re-dial at once, and each TLS handshake cost
/// this node more than a held request.
struct ShutOut {
    since: Instant,
    held: Vec<request_response::ResponseChannel<Vec<u8>>>,
    /// Its connections were closed for sending more than can be held.
    disconnected: bool,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

/// Builds the swarm and returns its handle and the loop to spawn.
pub fn start(node: Arc<Node>, config: NetConfig) -> Result<(NetworkHandle, EventLoop), NetError> {
    let burst = config.burst;
    let secret = node.keys.transport.secret_bytes();
    let mut secret_copy = secret;
    let keypair = identity::Keypair::ed25519_from_bytes(&mut secret_copy)
        .map_err(|e| NetError::Libp2p(e.to_string()))?;
    let codec = FrameCodec {
        max_request: config.max_frame_bytes,
        max_response: config.max_frame_bytes,
        refused: Arc::clone(&node.metrics.frames_too_large),
    };
    let rr_config = request_response::Config::default()
        .with_request_timeout(config.request_deadline + Duration::from_secs(1))
        .with_max_concurrent_streams(config.max_inflight_total.max(1) * 2);
    let max_frame = config.max_frame_bytes;
    let mdns_enabled = config.mdns;
    let idle = config.idle_timeout;
    let (ping_every, ping_timeout) = (config.ping_every, config.ping_timeout);
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(128))
        .with_max_established_per_peer(Some(4))
        .with_max_established(Some(512));
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::tls::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| NetError::Libp2p(e.to_string()))?
        .with_quic()
        .with_behaviour(|key| {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(max_frame)
                .heartbeat_interval(Duration::from_secs(1))
                .build()
                .map_err(|e| e.to_string())?;
            let gossip = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let mdns = if mdns_enabled {
                Some(
                    mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())
                        .map_err(|e| e.to_string())?,
                )
            } else {
                None
            };
            let rr = |protocol| {
                request_response::Behaviour::with_codec(
                    codec.clone(),
                    [(
                        stream_protocol(protocol),
                        request_response::ProtocolSupport::Full,
                    )],
                    rr_config.clone(),
                )
            };
            Ok(Behaviour {
                allow: allow_block_list::Behaviour::default(),
                pairing: pairing::Behaviour::new(key.public().to_peer_id()),
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new("/careweave/1".into(), key.public())
                        .with_agent_version(format!("careweave/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: liveness::Behaviour::new(ping_every, ping_timeout),
                locate: rr(ProtocolId::Locate),
                fetch: rr(ProtocolId::Fetch),
                trust: rr(ProtocolId::Trust),
                gossip,
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(|e| NetError::Libp2p(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                // Every stream offers one protocol, so a request goes out with
                // the protocol id instead of one round trip later.
                .with_substream_upgrade_protocol_override(upgrade::Version::V1Lazy)
        })
        .build();
    let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (finished_tx, finished) = mpsc::channel(RESPONSE_QUEUE);
    // Inbound requests in flight never exceed `max_inflight_total`, so a
    // queue that size never turns one away.
    let answerer =
        answerer::Answerer::start(Arc::clone(&node), config.max_inflight_total, finished_tx)
            .map_err(|e| NetError::Task(format!("could not start the answering thread: {e}")))?;
    let (validated_tx, validated) = mpsc::channel(RESPONSE_QUEUE);
    let handle = NetworkHandle {
        commands: commands_tx,
        node: Arc::clone(&node),
        deadline: config.request_deadline,
    };
    let event_loop = EventLoop {
        swarm,
        node,
        config,
        commands,
        answerer,
        finished,
        validated_tx,
        validated,
        pending: HashMap::new(),
        allowed: HashSet::new(),
        addresses: HashMap::new(),
        redial: HashMap::new(),
        inflight_total: 0,
        inflight: HashMap::new(),
        buckets: HashMap::new(),
        flooding: Strikes::new(
            flood_limit(burst),
            FLOOD_WINDOW_SECS,
            strikes::DEFAULT_MAX_PEERS,
        ),
        shut_out: HashMap::new(),
        topic: gossipsub::IdentTopic::new(TRUST_TOPIC),
        checkpointing: None,
    };
    Ok((handle, event_loop))
}

impl EventLoop {
    /// Runs until every handle is dropped.
    pub async fn run(mut self) {
        for addr in self.config.listen.clone() {
            if let Err(e) = self.swarm.listen_on(addr.clone()) {
                tracing::error!(%addr, error = %e, "cannot listen");
            }
        }
        if let Err(e) = self.swarm.behaviour_mut().gossip.subscribe(&self.topic) {
            tracing::error!(error = %e, "cannot subscribe to the trust topic");
        }
        self.apply_trust(false);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(done) = self.finished.recv() => self.on_finished(done),
                Some(validated) = self.validated.recv() => self.on_validated(validated),
                _ = tick.tick() => self.on_tick(),
            }
        }
        tracing::info!("network stopped");
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        for shut in self.shut_out.values_mut() {
            // Held requests that timed out have had their streams closed.
            shut.held.retain(request_response::ResponseChannel::is_open);
        }
        let cooled: Vec<PeerId> = self
            .shut_out
            .iter()
            .filter(|(_, shut)| now.duration_since(shut.since) >= FLOOD_COOL_DOWN)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in cooled {
            // Dropping the held requests closes their streams unanswered.
            let Some(shut) = self.shut_out.remove(&peer) else {
                continue;
            };
            // Only members still on the list come back.
            if shut.disconnected && self.allowed.contains(&peer) {
                self.swarm.behaviour_mut().allow.allow_peer(peer);
            }
        }
        let due: Vec<PeerId> = self
            .redial
            .iter()
            .filter(|(peer, (_, at))| *at <= now && !self.swarm.is_connected(peer))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            self.dial(peer);
        }
        let unix = unix_now();
        self.checkpoint_if_due(unix);
        // Fail closed the moment the list expires: drop everyone.
        if self.node.current_list(unix).is_none() && !self.allowed.is_empty() {
            tracing::error!(
                "the trust list expired; disconnecting every peer until a new list arrives"
            );
            self.apply_trust(false);
        }
    }

    /// Signs and syncs a due audit checkpoint on the blocking pool, one at
    /// a time: a sync on this loop would stall every connection meanwhile.
    fn checkpoint_if_due(&mut self, unix: u64) {
        let busy = self
            .checkpointing
            .as_ref()
            .is_some_and(|task| !task.is_finished());
        if busy || !self.node.audit.checkpoint_is_due(unix) {
            return;
        }
        let node = Arc::clone(&self.node);
        self.checkpointing = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = node.audit.checkpoint_if_due(unix) {
                tracing::error!(error = %e, "could not sign the audit checkpoint");
            }
        }));
    }

    fn dial(&mut self, peer: PeerId) {
        let Some(addrs) = self.addresses.get(&peer).cloned() else {
            return;
        };
        if self.swarm.behaviour().pairing.arriving_from(&peer) {
            // Its dial to us is under way; ours would only cross it. Look
            // again next tick in case that dial fails.
            self.redial.entry(peer).or_insert((0, Instant::now())).1 = Instant::now();
            return;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dial failed");
            self.schedule_redial(peer);
        }
    }

    fn schedule_redial(&mut self, peer: PeerId) {
        if !self.allowed.contains(&peer) {
            self.redial.remove(&peer);
            return;
        }
        let entry = self.redial.entry(peer).or_insert((0, Instant::now()));
        entry.0 = entry.0.saturating_add(1);
        let base = Duration::from_millis(500)
            .saturating_mul(1 << entry.0.min(7))
            .min(Duration::from_secs(60));
        // Jitter of up to a quarter, from the low bits of the clock.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = base.mul_f64(f64::from(nanos % 1000) / 4000.0);
        entry.1 = Instant::now() + base + jitter;
    }

    /// Makes the allow-list exactly the active members' PeerIds, drops the
    /// rest, dials newcomers, and optionally pushes the list on gossip.
    fn apply_trust(&mut self, publish: bool) {
        let now = unix_now();
        let own = to_libp2p(self.node.peer_id());
        let list = self.node.current_list(now);
        let mut wanted: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        if let Some(list) = &list {
            for member in list.list().members.iter().filter(|m| m.is_active_at(now)) {
                for entry in &member.peers {
                    let Some(peer) = to_libp2p(&entry.peer_id) else {
                        continue;
                    };
                    if Some(peer) == own {
                        continue;
                    }
                    let addrs = entry.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    wanted.insert(peer, addrs);
                }
            }
        }
        let removed: Vec<PeerId> = self
            .allowed
            .iter()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for peer in removed {
            tracing::info!(%peer, "peer is no longer an active member; disconnecting");
            self.swarm.behaviour_mut().allow.disallow_peer(peer);
            let _ = self.swarm.disconnect_peer_id(peer);
            self.allowed.remove(&peer);
            self.redial.remove(&peer);
            self.buckets.remove(&peer);
        }
        self.swarm
            .behaviour_mut()
            .pairing
            .set_addresses(wanted.iter().map(|(peer, addrs)| (peer, addrs.as_slice())));
        self.addresses = wanted.clone();
        for (peer, _) in wanted {
            if self.allowed.insert(peer) {
                self.swarm.behaviour_mut().allow.allow_peer(peer);
            }
            if !self.swarm.is_connected(&peer) {
                self.dial(peer);
            }
        }
        if publish && let Some(list) = list {
            match self
                .swarm
                .behaviour_mut()
                .gossip
                .publish(self.topic.clone(), list.bytes().to_vec())
            {
                Ok(_) => tracing::info!(seq = list.list().seq, "trust list pushed to peers"),
                Err(e) => tracing::debug!(error = %e, "trust list not pushed"),
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Send {
                protocol,
                peer,
                bytes,
                reply,
            } => {
                let behaviour = self.swarm.behaviour_mut();
                let id = match protocol {
                    ProtocolId::Locate => behaviour.locate.send_request(&peer, bytes),
                    ProtocolId::Fetch => behaviour.fetch.send_request(&peer, bytes),
                    ProtocolId::Trust => behaviour.trust.send_request(&peer, bytes),
                };
                self.pending.insert((protocol, id), reply);
            }
            Command::Connected { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::TrustChanged => self.apply_trust(true),
            Command::Status { reply } => {
                let _ = reply.send(NetStatus {
                    listen_addrs: self.swarm.listeners().cloned().collect(),
                    connected: self.swarm.connected_peers().copied().collect(),
                    connections: usize::try_from(
                        self.swarm
                            .network_info()
                            .connection_counters()
                            .num_established(),
                    )
                    .unwrap_or(usize::MAX),
                });
            }
        }
    }

    fn on_finished(&mut self, done: Finished) {
        self.inflight_total = self.inflight_total.saturating_sub(1);
        if let Some(n) = self.inflight.get_mut(&done.peer) {
            *n = n.saturating_sub(1);
        }
        match done.inbound {
            Inbound::Reply(bytes) => {
                let behaviour = self.swarm.behaviour_mut();
                let sent = match done.protocol {
                    ProtocolId::Locate => behaviour.locate.send_response(done.channel, bytes),
                    ProtocolId::Fetch => behaviour.fetch.send_response(done.channel, bytes),
                    ProtocolId::Trust => behaviour.trust.send_response(done.channel, bytes),
                };
                if sent.is_err() {
                    tracing::debug!(peer = %done.peer, "response not delivered: the stream closed");
                }
            }
            Inbound::Drop(reason) => {
                tracing::info!(peer = %done.peer, %reason, "request dropped and connection closed");
                let _ = self.swarm.disconnect_peer_id(done.peer);
            }
        }
    }

    fn on_validated(&mut self, validated: Validated) {
        match validated {
            Validated::Gossip {
                id,
                source,
                acceptance,
                changed,
            } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .report_message_validation_result(&id, &source, acceptance);
                if changed {
                    self.apply_trust(false);
                }
            }
            Validated::TrustPulled => self.apply_trust(true),
        }
    }

    fn take_token(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        let (rate, burst) = (self.config.rate_per_sec, self.config.burst);
        let bucket = self.buckets.entry(peer).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.last).as_secs_f64() * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn on_request(
        &mut self,
        protocol: ProtocolId,
        peer: PeerId,
        request: Vec<u8>,
        channel: request_response::ResponseChannel<Vec<u8>>,
    ) {
        let remote = match PeerIdBytes::from_slice(&peer.to_bytes()) {
            Ok(remote) => remote,
            Err(_) => return,
        };
        if let Some(shut) = self.shut_out.get_mut(&peer) {
            // Shut out: counted, held unanswered, not audited one by one.
            self.node.record_shed();
            if shut.held.len() < MAX_HELD_FOR_FLOODING {
                shut.held.push(channel);
            } else if !shut.disconnected {
                shut.disconnected = true;
                tracing::warn!(%peer, "a flooding member kept more requests in flight than are held; its connections are closed");
                self.swarm.behaviour_mut().allow.disallow_peer(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            return;
        }
        let over_peer =
            self.inflight.get(&peer).copied().unwrap_or(0) >= self.config.max_inflight_per_peer;
        let over_total = self.inflight_total >= self.config.max_inflight_total;
        let has_token = self.take_token(peer);
        let busy = over_peer || over_total || !has_token;
        let now_secs = unix_now();
        if busy && self.flooding.record(&peer.to_bytes(), now_secs) {
            // Shut it out for the cool-down (on_tick ends it), holding this
            // request too; the shutting out is audited once.
            self.shut_out.insert(
                peer,
                ShutOut {
                    since: Instant::now(),
                    held: vec![channel],
                    disconnected: false,
                },
            );
            let node = Arc::clone(&self.node);
            let rule = crate::node::FloodRule {
                busy_answers: flood_limit(self.config.burst),
                window_secs: FLOOD_WINDOW_SECS,
                cool_down_secs: FLOOD_COOL_DOWN.as_secs(),
            };
            tokio::task::spawn_blocking(move || {
                node.refuse_flooding(protocol, &request, &remote, &rule, unix_now());
            });
            return;
        }
        let job = answerer::Job {
            protocol,
            peer,
            remote,
            request,
            channel,
            busy,
        };
        if let Err(e) = self.answerer.submit(job) {
            // Cannot happen while the in-flight limit holds and the thread runs.
            tracing::error!(%peer, error = %e, "inbound request dropped");
            return;
        }
        self.inflight_total += 1;
        *self.inflight.entry(peer).or_default() += 1;
    }

    fn on_response(
        &mut self,
        protocol: ProtocolId,
        id: request_response::OutboundRequestId,
        result: Result<Vec<u8>, String>,
    ) {
        if let Some(reply) = self.pending.remove(&(protocol, id)) {
            let _ = reply.send(result);
        }
    }

    fn pull_trust(&mut self, peer: PeerId) {
        let Ok(remote) = PeerIdBytes::from_slice(&peer.to_bytes()) else {
            return;
        };
        let node = Arc::clone(&self.node);
        let Some(list) = node
            .current_list(unix_now())
            .or_else(|| node.trust().and_then(|t| t.list.clone()))
        else {
            return;
        };
        let Some(ods) = list.member_by_peer(&remote).map(|m| m.ods.clone()) else {
            return;
        };
        let Ok(outbound) = node.prepare_trust_pull(&ods, unix_now()) else {
            return;
        };
        let (reply, rx) = oneshot::channel();
        let id = self
            .swarm
            .behaviour_mut()
            .trust
            .send_request(&peer, outbound.bytes.clone());
        self.pending.insert((ProtocolId::Trust, id), reply);
        let validated = self.validated_tx.clone();
        tokio::spawn(async move {
            let Ok(Ok(bytes)) = rx.await else { return };
            let changed = tokio::task::spawn_blocking(move || {
                node.accept_trust_response(&outbound, &bytes, unix_now())
            })
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
            if let Some(seq) = changed {
                tracing::info!(seq, "caught up with a newer trust list from a peer");
                let _ = validated.send(Validated::TrustPulled).await;
            }
        });
    }

    fn on_gossip(&mut self, id: gossipsub::MessageId, source: PeerId, data: Vec<u8>) {
        let node = Arc::clone(&self.node);
        let validated = self.validated_tx.clone();
        tokio::spawn(async move {
            let result =
                tokio::task::spawn_blocking(move || node.install_list(&data, unix_now())).await;
            use careweave_protocol::trust::TrustError;
            let (acceptance, changed) = match result {
                Ok(Ok(seq)) => {
                    tracing::info!(seq, "new trust list received by gossip");
                    (gossipsub::MessageAcceptance::Accept, true)
                }
                Ok(Err(crate::node::NodeError::Trust(
                    TrustError::AlreadyHeld { .. } | TrustError::NotNewer { .. },
                ))) => (gossipsub::MessageAcceptance::Ignore, false),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "a gossiped trust list was rejected");
                    (gossipsub::MessageAcceptance::Reject, false)
                }
                Err(_) => (gossipsub::MessageAcceptance::Ignore, false),
            };
            let _ = validated
                .send(Validated::Gossip {
                    id,
                    source,
                    acceptance,
                    changed,
                })
                .await;
        });
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(%address, "listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } => {
                self.redial.remove(&peer_id);
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, "connected");
                    self.pull_trust(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                tracing::info!(peer = %peer_id, cause = ?cause, "disconnected");
                self.schedule_redial(peer_id);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "could not connect");
                self.schedule_redial(peer);
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    /// libp2p reports a ping failure only when a connection's pings fail
    /// twice running. An unanswered connection is closed, so its peer is
    /// reported unreachable at once and dialled again; a peer that does not
    /// speak ping at all is left alone.
    fn on_ping(&mut self, event: ping::Event) {
        let failure = match event.result {
            Ok(_) | Err(ping::Failure::Unsupported) => return,
            Err(failure) => failure,
        };
        tracing::warn!(
            peer = %event.peer,
            %failure,
            "two pings running failed (unanswered in time, or the stream broke); closing the connection"
        );
        if self.swarm.close_connection(event.connection) {
            self.node
                .metrics
                .connections_closed_for_missed_pings
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        use request_response::{Event, Message};
        let rr = |protocol: ProtocolId, event: Event<Vec<u8>, Vec<u8>>| (protocol, event);
        let (protocol, event) = match event {
            BehaviourEvent::Locate(e) => rr(ProtocolId::Locate, e),
            BehaviourEvent::Fetch(e) => rr(ProtocolId::Fetch, e),
            BehaviourEvent::Trust(e) => rr(ProtocolId::Trust, e),
            BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.on_gossip(message_id, propagation_source, message.data);
                return;
            }
            BehaviourEvent::Ping(event) => {
                self.on_ping(event);
                return;
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                // Testnets only: learn addresses of listed peers; the allow-list still decides.
                for (peer, addr) in found {
                    if self.allowed.contains(&peer) {
                        self.addresses.entry(peer).or_default().push(addr);
                    }
                }
                return;
            }
            _ => return,
        };
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_request(protocol, peer, request, channel),
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => self.on_response(protocol, request_id, Ok(response)),
            Event::OutboundFailure {
                request_id, error, ..
            } => self.on_response(protocol, request_id, Err(error.to_string())),
            Event::InboundFailure { peer, error, .. } => {
                tracing::info!(%peer, %error, "inbound request refused or failed");
                let reason = if error.to_string().contains("over the limit") {
                    "too-large"
                } else {
                    "inbound-failure"
                };
                if let Ok(remote) = PeerIdBytes::from_slice(&peer.to_bytes()) {
                    let node = Arc::clone(&self.node);
                    let detail = error.to_string();
                    tokio::task::spawn_blocking(move || {
                        node.record_unread_refusal(protocol, &remote, reason, &detail, unix_now());
                    });
                }
            }
            Event::ResponseSent { .. } => {}
        }
    }
}
