//! The floor that careweave's locate and fetch figures are compared with:
//! plain libp2p request-response over the same transport (TCP + TLS +
//! yamux, no Nagle) and the same length-prefixed framing, carrying payloads
//! of the same sizes, with no signing, checks, storage or audit.
//!
//! A floor node answers every request with as many bytes as the request's
//! first four bytes ask for (big-endian), so one kind of node serves both
//! the locate and the fetch comparison.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use careweave_node::net::codec::FrameCodec;
use futures::StreamExt;
use libp2p::core::upgrade;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::{mpsc, oneshot};

const PROTOCOL: &str = "/careweave-floor/1";
/// Largest payload either side sends or accepts.
const MAX_FRAME: usize = 1024 * 1024;
/// Requests the client keeps queued for its event loop.
const QUEUE: usize = 1024;
const DEADLINE: Duration = Duration::from_secs(10);

type Behaviour = request_response::Behaviour<FrameCodec>;

fn swarm() -> Result<Swarm<Behaviour>, String> {
    let codec = FrameCodec {
        max_request: MAX_FRAME,
        max_response: MAX_FRAME,
        ..FrameCodec::default()
    };
    let config = request_response::Config::default()
        .with_request_timeout(DEADLINE)
        .with_max_concurrent_streams(512);
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::tls::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                codec,
                [(StreamProtocol::new(PROTOCOL), ProtocolSupport::Full)],
                config,
            )
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| {
            // As careweave's nodes negotiate: the request goes with the
            // protocol's name, without a round trip first.
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                .with_substream_upgrade_protocol_override(upgrade::Version::V1Lazy)
        })
        .build())
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

/// Runs a floor node until killed. Writes `<peer id> <address>` to `ready`
/// once it listens on 127.0.0.1.
pub async fn serve(ready: &Path) -> Result<(), String> {
    let mut swarm = swarm()?;
    let addr: Multiaddr = "/ip4/127.0.0.1/tcp/0"
        .parse()
        .map_err(|e: libp2p::multiaddr::Error| e.to_string())?;
    swarm.listen_on(addr).map_err(|e| e.to_string())?;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::NewListenAddr { address, .. } => {
                std::fs::write(ready, format!("{} {address}", swarm.local_peer_id()))
                    .map_err(|e| e.to_string())?;
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            }) => {
                let answer = vec![0u8; asked_len(&request)];
                let _ = swarm.behaviour_mut().send_response(channel, answer);
            }
            _ => {}
        }
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
        let swarm = swarm()?;
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

    async fn send(&self, command: Command) -> Result<(), String> {
        self.commands
            .send(command)
            .await
            .map_err(|_| "floor client stopped".to_owned())
    }
}

async fn client_loop(mut swarm: Swarm<Behaviour>, mut commands: mpsc::Receiver<Command>) {
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
                    let id = swarm.behaviour_mut().send_request(&peer, bytes);
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
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { request_id, response },
                    ..
                }) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id, error, ..
                }) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
                _ => {}
            },
        }
    }
}
