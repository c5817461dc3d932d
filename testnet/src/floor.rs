//! The floor that careweave's locate and fetch figures are compared with:
//! plain libp2p request-response over the same transport (TCP + TLS +
//! yamux, no Nagle) and the same length-prefixed framing, carrying payloads
//! of the same sizes, with no signing, checks, storage or audit.
//!
//! A floor node answers every request with as many bytes as the request's
//! first four bytes ask for (big-endian), so one kind of node serves both
//! the locate and the fetch comparison.
//!
//! A request whose fifth byte is [`WITH_REQUIRED_WORK`] also asks for the
//! work DESIGN requires of every locate exchange that plain request-response
//! does not do, in its cheapest form and nothing else: the asking end signs
//! each request and appends an audit entry, synced, before any is sent; the
//! answering end checks the signature strictly, appends and syncs its audit
//! entry, and signs its answer; the asking end checks each answer strictly
//! and syncs one more entry before returning. No control socket, trust list,
//! replay cache, policy, index, audit encoding or other behaviours. The
//! answering end does its part on its event loop: the cheapest place when
//! requests come one at a time, which is the only way the bench sends them.
//!
//! A floor node started with a mesh file also runs the other protocols
//! DESIGN puts on every connection between nodes, beside locate: fetch and
//! trust request-response (idle), gossipsub on the trust topic (strict,
//! validating, heartbeat every second, as careweave's), identify, and
//! careweave's own liveness pings. It dials every floor node listed after
//! it in the mesh file, so the floor nodes hold a full mesh of connections,
//! as DESIGN's nodes do. With the required work, this is the *protocol
//! floor*: what any implementation of DESIGN must run on this machine for a
//! locate, short of the trust list's checks, the replay cache, policy,
//! storage, the audit entry's contents and the control socket.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use careweave_node::config::NetworkSection;
use careweave_node::net::codec::FrameCodec;
use careweave_node::net::{TRUST_TOPIC, liveness};
use careweave_protocol::keys::{KeyPair, PublicKey};
use futures::StreamExt;
use libp2p::core::upgrade;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify, identity};
use tokio::sync::{mpsc, oneshot};

const PROTOCOL: &str = "/careweave-floor/1";
/// Largest payload either side sends or accepts.
const MAX_FRAME: usize = 1024 * 1024;
/// Requests the client keeps queued for its event loop.
const QUEUE: usize = 1024;
const DEADLINE: Duration = Duration::from_secs(10);
/// The fifth byte of a request that asks for the required work.
pub const WITH_REQUIRED_WORK: u8 = 1;
const SIGNATURE_LEN: usize = 64;
/// Where a request's or answer's distinguishing bytes sit: after the length
/// and the mode byte, a nonce and the recipient's index.
const NONCE: std::ops::Range<usize> = 5..21;
/// Bytes appended to an audit file for each entry: fewer than careweave's
/// (about 490 on disk, decision 0013), so the floor stays a lower bound.
const AUDIT_ENTRY_BYTES: usize = 300;

type Frames = request_response::Behaviour<FrameCodec>;
type FramesEvent = request_response::Event<Vec<u8>, Vec<u8>>;
type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// How long a floor node waits for its mesh file before giving up.
const MESH_WAIT: Duration = Duration::from_secs(120);

/// Request-response on `protocol` over the floor's framing.
fn frames(protocol: &'static str) -> Frames {
    let codec = FrameCodec {
        max_request: MAX_FRAME,
        max_response: MAX_FRAME,
        ..FrameCodec::default()
    };
    let config = request_response::Config::default()
        .with_request_timeout(DEADLINE)
        .with_max_concurrent_streams(512);
    request_response::Behaviour::with_codec(
        codec,
        [(StreamProtocol::new(protocol), ProtocolSupport::Full)],
        config,
    )
}

/// The floor's behaviour with the other protocols DESIGN runs on every
/// connection (module documentation), configured as careweave's nodes
/// configure them.
#[allow(missing_debug_implementations)]
#[derive(NetworkBehaviour)]
pub struct WithProtocols {
    locate: Frames,
    fetch: Frames,
    trust: Frames,
    identify: identify::Behaviour,
    ping: liveness::Behaviour,
    gossip: gossipsub::Behaviour,
}

impl WithProtocols {
    fn new(key: &identity::Keypair) -> Result<Self, BuildError> {
        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(MAX_FRAME)
            .heartbeat_interval(Duration::from_secs(1))
            .build()?;
        let mut gossip = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )?;
        gossip.subscribe(&gossipsub::IdentTopic::new(TRUST_TOPIC))?;
        let defaults = NetworkSection::default();
        Ok(Self {
            locate: frames(PROTOCOL),
            fetch: frames("/careweave-floor/fetch/1"),
            trust: frames("/careweave-floor/trust/1"),
            identify: identify::Behaviour::new(
                identify::Config::new("/careweave-floor/1".into(), key.public())
                    .with_agent_version(format!("careweave-floor/{}", env!("CARGO_PKG_VERSION"))),
            ),
            ping: liveness::Behaviour::new(
                Duration::from_secs(defaults.ping_every_secs),
                Duration::from_secs(defaults.ping_timeout_secs),
            ),
            gossip,
        })
    }
}

/// A behaviour the floor can run: request-response on the floor's
/// protocol, alone or beside others.
pub trait FloorBehaviour: NetworkBehaviour {
    /// The request-response behaviour that carries the floor's requests.
    fn frames(&mut self) -> &mut Frames;
    /// The floor's own request-response events; others are dropped.
    fn frames_event(event: Self::ToSwarm) -> Option<FramesEvent>;
}

impl FloorBehaviour for Frames {
    fn frames(&mut self) -> &mut Frames {
        self
    }
    fn frames_event(event: FramesEvent) -> Option<FramesEvent> {
        Some(event)
    }
}

impl FloorBehaviour for WithProtocols {
    fn frames(&mut self) -> &mut Frames {
        &mut self.locate
    }
    fn frames_event(event: WithProtocolsEvent) -> Option<FramesEvent> {
        match event {
            WithProtocolsEvent::Locate(event) => Some(event),
            _ => None,
        }
    }
}

fn swarm<B: NetworkBehaviour>(
    behaviour: impl FnOnce(&identity::Keypair) -> Result<B, BuildError>,
) -> Result<Swarm<B>, String> {
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::tls::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(behaviour)
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| {
            // As careweave's nodes negotiate: the request goes with the
            // protocol's name, without a round trip first.
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                .with_substream_upgrade_protocol_override(upgrade::Version::V1Lazy)
        })
        .build())
}

/// The floor nodes of a mesh, one `<peer id> <address>` line each, in the
/// order they dial: each node dials those listed after it.
pub fn mesh_text(nodes: &[(PeerId, Multiaddr)]) -> String {
    nodes
        .iter()
        .map(|(id, addr)| format!("{id} {addr}\n"))
        .collect()
}

/// The peers listed after `me` in a mesh file's text; `None` if `me` is not
/// listed or a line is not a peer and an address.
fn mesh_after(text: &str, me: &PeerId) -> Option<Vec<(PeerId, Multiaddr)>> {
    let mut listed = Vec::new();
    for line in text.lines() {
        let (id, addr) = line.split_once(' ')?;
        listed.push((id.parse::<PeerId>().ok()?, addr.parse::<Multiaddr>().ok()?));
    }
    let position = listed.iter().position(|(id, _)| id == me)?;
    Some(listed.split_off(position + 1))
}

/// A request asking for a `response_len`-byte answer, `request_len` bytes long.
pub fn request_bytes(request_len: usize, response_len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; request_len.max(4)];
    let asked = u32::try_from(response_len)
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    for (slot, byte) in bytes.iter_mut().zip(asked) {
        *slot = byte;
    }
    bytes
}

fn asked_len(request: &[u8]) -> usize {
    let mut prefix = [0u8; 4];
    for (slot, byte) in prefix.iter_mut().zip(request) {
        *slot = *byte;
    }
    usize::try_from(u32::from_be_bytes(prefix))
        .unwrap_or(MAX_FRAME)
        .min(MAX_FRAME)
}

/// Appends one audit entry and makes it durable, as careweave does before
/// anything about a patient leaves a node.
fn audit_synced(audit: &Mutex<File>, about: &[u8]) -> Result<(), String> {
    let mut entry = [0u8; AUDIT_ENTRY_BYTES];
    for (slot, byte) in entry.iter_mut().zip(about) {
        *slot = *byte;
    }
    let file = audit
        .lock()
        .map_err(|_| "audit file lock poisoned".to_owned())?;
    (&*file).write_all(&entry).map_err(|e| e.to_string())?;
    file.sync_data().map_err(|e| e.to_string())
}

/// Opens an audit file for appending, creating it.
fn open_audit(path: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("audit file {}: {e}", path.display()))
}

/// `len` bytes carrying `nonce`, with the last 64 a signature over the
/// rest. A request also carries the answer length it asks for and the mode
/// byte, `asked`; both are signed.
fn signed_bytes(key: &KeyPair, len: usize, asked: Option<usize>, nonce: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; len.max(NONCE.end + SIGNATURE_LEN)];
    if let Some(asked) = asked {
        let asked = u32::try_from(asked).unwrap_or(u32::MAX).to_be_bytes();
        for (slot, byte) in bytes
            .iter_mut()
            .zip(asked.into_iter().chain([WITH_REQUIRED_WORK]))
        {
            *slot = byte;
        }
    }
    if let Some(slots) = bytes.get_mut(NONCE) {
        for (slot, byte) in slots.iter_mut().zip(nonce) {
            *slot = *byte;
        }
    }
    let body_len = bytes.len() - SIGNATURE_LEN;
    let (body, signature) = bytes.split_at_mut(body_len);
    signature.copy_from_slice(&key.sign(body));
    bytes
}

/// Whether the last 64 bytes are `key`'s signature over the rest.
fn signed_by(key: &PublicKey, bytes: &[u8]) -> bool {
    bytes
        .len()
        .checked_sub(SIGNATURE_LEN)
        .is_some_and(|body_len| {
            let (body, signature) = bytes.split_at(body_len);
            key.verify_strict(body, signature)
        })
}

/// What a floor node needs for the required work: the asking end's key,
/// its own, and its audit file.
#[derive(Debug)]
pub struct AnsweringWork {
    client: PublicKey,
    key: KeyPair,
    audit: Mutex<File>,
}

impl AnsweringWork {
    /// Opens (creating) the audit file and makes a fresh signing key.
    pub fn new(client: PublicKey, audit: &Path) -> Result<Self, String> {
        Ok(Self {
            client,
            key: fresh_key()?,
            audit: Mutex::new(open_audit(audit)?),
        })
    }

    /// The answer to a request asking for the required work, or why none.
    fn answer(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        if !signed_by(&self.client, request) {
            return Err("request signature does not verify".into());
        }
        let nonce = request.get(NONCE).ok_or("request too short")?;
        audit_synced(&self.audit, nonce)?;
        Ok(signed_bytes(&self.key, asked_len(request), None, nonce))
    }
}

/// A signing key from the operating system's randomness.
pub fn fresh_key() -> Result<KeyPair, String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("random: {e}"))?;
    Ok(KeyPair::from_secret_bytes(&secret))
}

/// A public key written as hex, as in a ready file or `--client-key`.
pub fn public_key_from_hex(text: &str) -> Option<PublicKey> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| PublicKey::from_slice(&bytes).ok())
}

/// Reads a ready file's `<peer id> <address> <public key, hex>` (see
/// [`serve`]); `None` unless it holds exactly those three.
pub fn read_ready(text: &str) -> Option<(FloorPeer, Multiaddr)> {
    let mut fields = text.split(' ');
    let (Some(id), Some(addr), Some(key), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    let peer = FloorPeer {
        id: id.parse().ok()?,
        key: public_key_from_hex(key)?,
    };
    Some((peer, addr.parse().ok()?))
}

/// Runs a floor node until killed. Writes `<peer id> <address> <public key,
/// hex>` to `ready` once it listens on 127.0.0.1. Without `work`, requests
/// asking for the required work go unanswered. With `mesh`, it runs the
/// other protocols too and joins the mesh that file lists once it appears
/// (module documentation).
pub async fn serve(
    ready: &Path,
    work: Option<AnsweringWork>,
    mesh: Option<&Path>,
) -> Result<(), String> {
    match mesh {
        Some(mesh) => {
            let swarm = swarm(WithProtocols::new)?;
            serve_on(swarm, ready, work, Some(mesh), MESH_WAIT).await
        }
        None => {
            let swarm = swarm(|_| Ok(frames(PROTOCOL)))?;
            serve_on(swarm, ready, work, None, MESH_WAIT).await
        }
    }
}

async fn serve_on<B: FloorBehaviour>(
    mut swarm: Swarm<B>,
    ready: &Path,
    work: Option<AnsweringWork>,
    mut mesh: Option<&Path>,
    mesh_wait: Duration,
) -> Result<(), String> {
    let public = match &work {
        Some(work) => work.key.public_key(),
        None => fresh_key()?.public_key(),
    };
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/0"
        .parse()
        .map_err(|e: libp2p::multiaddr::Error| e.to_string())?;
    swarm.listen_on(addr).map_err(|e| e.to_string())?;
    let mut look_for_mesh = tokio::time::interval(Duration::from_millis(100));
    let mesh_deadline = tokio::time::Instant::now() + mesh_wait;
    loop {
        let event = tokio::select! {
            event = swarm.select_next_some() => event,
            _ = look_for_mesh.tick(), if mesh.is_some() => {
                let Some(path) = mesh else { continue };
                match std::fs::read_to_string(path) {
                    Ok(text) => {
                        let me = *swarm.local_peer_id();
                        let peers = mesh_after(&text, &me).ok_or_else(|| {
                            format!(
                                "mesh file {} is malformed or does not list this node",
                                path.display()
                            )
                        })?;
                        for (peer, addr) in peers {
                            swarm.add_peer_address(peer, addr);
                            swarm.dial(peer).map_err(|e| format!("mesh dial: {e}"))?;
                        }
                        mesh = None;
                    }
                    Err(_) if tokio::time::Instant::now() > mesh_deadline => {
                        return Err(format!("mesh file {} never appeared", path.display()));
                    }
                    Err(_) => {}
                }
                continue;
            }
        };
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let line = format!(
                    "{} {address} {}",
                    swarm.local_peer_id(),
                    hex::encode(public.as_bytes())
                );
                std::fs::write(ready, line).map_err(|e| e.to_string())?;
            }
            SwarmEvent::Behaviour(event) => {
                let Some(request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                }) = B::frames_event(event)
                else {
                    continue;
                };
                let answer = match (request.get(4), &work) {
                    (Some(&WITH_REQUIRED_WORK), Some(work)) => work.answer(&request),
                    (Some(&WITH_REQUIRED_WORK), None) => Err("no required work here".into()),
                    _ => Ok(vec![0u8; asked_len(&request)]),
                };
                // A refused request is dropped, and the asking end sees it fail.
                if let Ok(answer) = answer {
                    let _ = swarm
                        .behaviour_mut()
                        .frames()
                        .send_response(channel, answer);
                }
            }
            _ => {}
        }
    }
}

/// A floor node as the asking end knows it.
#[derive(Debug, Clone)]
pub struct FloorPeer {
    pub id: PeerId,
    /// The key its answers with the required work are signed with.
    pub key: PublicKey,
}

/// What the asking end needs for the required work: its signing key and
/// its audit file.
#[derive(Debug)]
pub struct AskingWork {
    key: Arc<KeyPair>,
    audit: Arc<Mutex<File>>,
    next_nonce: AtomicU64,
}

impl AskingWork {
    /// Opens (creating) the audit file.
    pub fn new(key: KeyPair, audit: &Path) -> Result<Self, String> {
        Ok(Self {
            key: Arc::new(key),
            audit: Arc::new(Mutex::new(open_audit(audit)?)),
            next_nonce: AtomicU64::new(0),
        })
    }

    /// The public key answering ends check requests against.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// One audit entry, synced, on a blocking thread as careweave does.
    async fn sync(&self, nonce: u64) -> Result<(), String> {
        let audit = Arc::clone(&self.audit);
        tokio::task::spawn_blocking(move || audit_synced(&audit, &nonce.to_be_bytes()))
            .await
            .map_err(|e| e.to_string())?
    }
}

type Reply = oneshot::Sender<Result<Vec<u8>, String>>;

#[derive(Debug)]
enum Command {
    Dial(PeerId, Multiaddr, oneshot::Sender<Result<(), String>>),
    Request(PeerId, Vec<u8>, Reply),
}

/// A handle on the floor client's event loop; cheap to clone.
#[derive(Debug, Clone)]
pub struct FloorClient {
    commands: mpsc::Sender<Command>,
}

impl FloorClient {
    /// Starts the client's event loop on the current runtime.
    pub fn start() -> Result<Self, String> {
        let swarm = swarm(|_| Ok(frames(PROTOCOL)))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(client_loop(swarm, rx));
        Ok(Self { commands: tx })
    }

    /// Starts a client that also runs the other protocols, for floor nodes
    /// in a mesh.
    pub fn start_with_protocols() -> Result<Self, String> {
        let swarm = swarm(WithProtocols::new)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(client_loop(swarm, rx));
        Ok(Self { commands: tx })
    }

    /// Connects to a floor node and waits for the connection.
    pub async fn dial(&self, peer: PeerId, addr: Multiaddr) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Dial(peer, addr, tx)).await?;
        tokio::time::timeout(DEADLINE, rx)
            .await
            .map_err(|_| "dial timed out".to_owned())?
            .map_err(|_| "floor client stopped".to_owned())?
    }

    /// Sends one request and waits for its answer.
    pub async fn request(&self, peer: PeerId, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Request(peer, bytes, tx)).await?;
        rx.await.map_err(|_| "floor client stopped".to_owned())?
    }

    /// Sends the same request to every peer at once and waits for all answers.
    pub async fn fan_out(&self, peers: &[PeerId], bytes: &[u8]) -> Result<(), String> {
        let answers =
            futures::future::join_all(peers.iter().map(|p| self.request(*p, bytes.to_vec()))).await;
        answers.into_iter().try_for_each(|a| a.map(|_| ()))
    }

    /// The same fan-out with the required work at both ends (module
    /// documentation): requests signed on two threads and audited with one
    /// sync before any is sent, each answer checked as it arrives, and one
    /// more sync before returning.
    pub async fn fan_out_with_required_work(
        &self,
        peers: &[FloorPeer],
        work: &AskingWork,
        request_len: usize,
        response_len: usize,
    ) -> Result<(), String> {
        let nonce = work.next_nonce.fetch_add(1, Ordering::Relaxed);
        let sign = |indexes: std::ops::Range<usize>| {
            let key = Arc::clone(&work.key);
            tokio::task::spawn_blocking(move || {
                indexes
                    .map(|i| {
                        let nonce = [nonce.to_be_bytes(), (i as u64).to_be_bytes()].concat();
                        signed_bytes(&key, request_len, Some(response_len), &nonce)
                    })
                    .collect::<Vec<_>>()
            })
        };
        let half = peers.len() / 2;
        let (first, second) = tokio::join!(sign(0..half), sign(half..peers.len()));
        let mut requests = first.map_err(|e| e.to_string())?;
        requests.extend(second.map_err(|e| e.to_string())?);
        work.sync(nonce).await?;
        let asked = peers
            .iter()
            .zip(requests)
            .map(|(peer, request)| async move {
                let answer = self.request(peer.id, request).await?;
                if signed_by(&peer.key, &answer) {
                    Ok(())
                } else {
                    Err(format!("answer from {} does not verify", peer.id))
                }
            });
        let answers = futures::future::join_all(asked).await;
        answers.into_iter().collect::<Result<(), String>>()?;
        work.sync(nonce).await
    }

    async fn send(&self, command: Command) -> Result<(), String> {
        self.commands
            .send(command)
            .await
            .map_err(|_| "floor client stopped".to_owned())
    }
}

async fn client_loop<B: FloorBehaviour>(
    mut swarm: Swarm<B>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut pending: HashMap<OutboundRequestId, Reply> = HashMap::new();
    let mut dialling: HashMap<PeerId, oneshot::Sender<Result<(), String>>> = HashMap::new();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Dial(peer, addr, reply)) => {
                    swarm.add_peer_address(peer, addr);
                    match swarm.dial(peer) {
                        Ok(()) => { dialling.insert(peer, reply); }
                        Err(e) => { let _ = reply.send(Err(e.to_string())); }
                    }
                }
                Some(Command::Request(peer, bytes, reply)) => {
                    let id = swarm.behaviour_mut().frames().send_request(&peer, bytes);
                    pending.insert(id, reply);
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    if let Some(reply) = dialling.remove(&peer_id) {
                        let _ = reply.send(Ok(()));
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                    if let Some(reply) = dialling.remove(&peer) {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
                SwarmEvent::Behaviour(event) => match B::frames_event(event) {
                    Some(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    }) => {
                        if let Some(reply) = pending.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                    Some(request_response::Event::OutboundFailure {
                        request_id, error, ..
                    }) => {
                        if let Some(reply) = pending.remove(&request_id) {
                            let _ = reply.send(Err(error.to_string()));
                        }
                    }
                    _ => {}
                },
                _ => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A floor node in this process, checking requests against `client`;
    /// returns it as the asking end knows it, and its audit file.
    async fn node(dir: &Path, client: PublicKey) -> (FloorPeer, Multiaddr, std::path::PathBuf) {
        node_named(dir, "node", client, None).await
    }

    async fn node_named(
        dir: &Path,
        name: &str,
        client: PublicKey,
        mesh: Option<std::path::PathBuf>,
    ) -> (FloorPeer, Multiaddr, std::path::PathBuf) {
        let ready = dir.join(format!("{name}.ready"));
        let audit = dir.join(format!("{name}.audit"));
        let work = AnsweringWork::new(client, &audit).unwrap();
        let key = work.key.public_key();
        let serving = ready.clone();
        tokio::spawn(async move { serve(&serving, Some(work), mesh.as_deref()).await });
        let text = loop {
            match std::fs::read_to_string(&ready) {
                Ok(text) if !text.is_empty() => break text,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let (peer, addr) = read_ready(&text).unwrap();
        assert_eq!(peer.key.as_bytes(), key.as_bytes());
        (peer, addr, audit)
    }

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn required_work_is_signed_checked_and_audited_at_both_ends() {
        let dir = tempfile::tempdir().unwrap();
        let work = AskingWork::new(fresh_key().unwrap(), &dir.path().join("client.audit")).unwrap();
        let (peer, addr, node_audit) = node(dir.path(), work.public_key()).await;
        let client = FloorClient::start().unwrap();
        client.dial(peer.id, addr).await.unwrap();

        for _ in 0..3 {
            client
                .fan_out_with_required_work(std::slice::from_ref(&peer), &work, 435, 273)
                .await
                .unwrap();
        }
        // One synced entry per request at the answering end; two per
        // fan-out at the asking end (before sending, after the answers).
        assert_eq!(len(&node_audit), 3 * AUDIT_ENTRY_BYTES as u64);
        assert_eq!(
            len(&dir.path().join("client.audit")),
            6 * AUDIT_ENTRY_BYTES as u64
        );
        // Plain requests are still answered plainly, and audit nothing.
        let answer = client
            .request(peer.id, request_bytes(435, 273))
            .await
            .unwrap();
        assert_eq!(answer, vec![0u8; 273]);
        assert_eq!(len(&node_audit), 3 * AUDIT_ENTRY_BYTES as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_signed_by_another_key_is_refused_and_not_audited() {
        let dir = tempfile::tempdir().unwrap();
        let work = AskingWork::new(fresh_key().unwrap(), &dir.path().join("client.audit")).unwrap();
        let stranger = fresh_key().unwrap().public_key();
        let (peer, addr, node_audit) = node(dir.path(), stranger).await;
        let client = FloorClient::start().unwrap();
        client.dial(peer.id, addr).await.unwrap();

        let refused = client
            .fan_out_with_required_work(std::slice::from_ref(&peer), &work, 435, 273)
            .await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(len(&node_audit), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_signed_by_another_key_fails_the_fan_out() {
        let dir = tempfile::tempdir().unwrap();
        let work = AskingWork::new(fresh_key().unwrap(), &dir.path().join("client.audit")).unwrap();
        let (mut peer, addr, _) = node(dir.path(), work.public_key()).await;
        let client = FloorClient::start().unwrap();
        client.dial(peer.id, addr).await.unwrap();
        peer.key = fresh_key().unwrap().public_key();

        let error = client
            .fan_out_with_required_work(std::slice::from_ref(&peer), &work, 435, 273)
            .await
            .unwrap_err();
        assert!(error.contains("does not verify"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_protocol_floor_answers_with_the_required_work_across_its_mesh() {
        let dir = tempfile::tempdir().unwrap();
        let work = AskingWork::new(fresh_key().unwrap(), &dir.path().join("client.audit")).unwrap();
        let mesh = dir.path().join("mesh");
        let mut peers = Vec::new();
        let mut listed = Vec::new();
        for name in ["a", "b", "c"] {
            let (peer, addr, _) =
                node_named(dir.path(), name, work.public_key(), Some(mesh.clone())).await;
            listed.push((peer.id, addr));
            peers.push(peer);
        }
        std::fs::write(&mesh, mesh_text(&listed)).unwrap();
        let client = FloorClient::start_with_protocols().unwrap();
        for (id, addr) in &listed {
            client.dial(*id, addr.clone()).await.unwrap();
        }
        for _ in 0..3 {
            client
                .fan_out_with_required_work(&peers, &work, 435, 273)
                .await
                .unwrap();
        }
        for name in ["a", "b", "c"] {
            let audit = dir.path().join(format!("{name}.audit"));
            assert_eq!(len(&audit), 3 * AUDIT_ENTRY_BYTES as u64, "{name}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_left_out_of_its_mesh_file_stops_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh");
        let other = (
            PeerId::random(),
            "/ip4/127.0.0.1/tcp/9".parse::<Multiaddr>().unwrap(),
        );
        std::fs::write(&mesh, mesh_text(&[other])).unwrap();
        let error = serve(&dir.path().join("ready"), None, Some(&mesh))
            .await
            .unwrap_err();
        assert!(error.contains("does not list this node"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_mesh_file_never_appears_stops_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh");
        let ready = dir.path().join("ready");
        let serving = serve_on(
            swarm(WithProtocols::new).unwrap(),
            &ready,
            None,
            Some(&mesh),
            Duration::from_millis(300),
        );
        // Without the deadline it would wait for ever; fail instead.
        let error = tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("still waiting for the mesh file")
            .unwrap_err();
        assert!(error.contains("never appeared"), "{error}");
    }

    #[test]
    fn each_node_dials_the_nodes_listed_after_it() {
        let nodes: Vec<(PeerId, Multiaddr)> = (0..3)
            .map(|i| {
                let addr = format!("/ip4/127.0.0.1/tcp/{}", 4000 + i);
                (PeerId::random(), addr.parse().unwrap())
            })
            .collect();
        let text = mesh_text(&nodes);
        assert_eq!(mesh_after(&text, &nodes[0].0).unwrap(), nodes[1..].to_vec());
        assert_eq!(mesh_after(&text, &nodes[2].0).unwrap(), Vec::new());
        assert!(mesh_after(&text, &PeerId::random()).is_none());
        assert!(mesh_after("not a peer\n", &nodes[0].0).is_none());
        assert!(mesh_after(&format!("{}\n", nodes[0].0), &nodes[0].0).is_none());
    }

    #[test]
    fn a_ready_file_holds_exactly_a_peer_an_address_and_a_key() {
        let key = hex::encode(fresh_key().unwrap().public_key().as_bytes());
        let id = PeerId::random();
        let good = format!("{id} /ip4/127.0.0.1/tcp/4001 {key}");
        let (peer, addr) = read_ready(&good).unwrap();
        assert_eq!(
            (peer.id, addr.to_string()),
            (id, "/ip4/127.0.0.1/tcp/4001".into())
        );
        for bad in [
            format!("{id} /ip4/127.0.0.1/tcp/4001"),
            format!("{id} /ip4/127.0.0.1/tcp/4001 {key} more"),
            format!("{id} /ip4/127.0.0.1/tcp/4001 {}", &key[2..]),
            format!("{id} /ip4/127.0.0.1/tcp/4001 zz{}", &key[2..]),
            format!("not-a-peer /ip4/127.0.0.1/tcp/4001 {key}"),
            format!("{id} not-an-address {key}"),
            String::new(),
        ] {
            assert!(read_ready(&bad).is_none(), "{bad:?}");
        }
        assert!(public_key_from_hex(&key).is_some());
        assert!(public_key_from_hex("00").is_none());
    }

    #[test]
    fn a_signature_covers_every_byte_before_it() {
        let key = fresh_key().unwrap();
        let bytes = signed_bytes(&key, 435, Some(273), &[7; 16]);
        assert_eq!(bytes.len(), 435);
        assert_eq!(asked_len(&bytes), 273);
        assert_eq!(bytes[4], WITH_REQUIRED_WORK);
        assert!(signed_by(&key.public_key(), &bytes));
        for i in [0, 4, 5, 200, 434] {
            let mut tampered = bytes.clone();
            tampered[i] ^= 1;
            assert!(!signed_by(&key.public_key(), &tampered), "byte {i}");
        }
        assert!(!signed_by(&key.public_key(), &bytes[..63]));
        // Too short to hold a nonce and a signature: padded to fit.
        assert_eq!(signed_bytes(&key, 10, None, &[]).len(), 85);
    }
}
