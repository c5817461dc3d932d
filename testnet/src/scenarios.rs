//! Scenarios that break a running testnet on purpose and check it copes.
//! Each says what it did and what it saw, and fails if the expected outcome
//! did not happen.

// serde_json's `Value[&str]` answers Null for anything missing; it never panics.
#![allow(clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use careweave_certs::keystore;
use careweave_node::api::client::ApiClient;
use careweave_protocol::trust::{ListDocument, RootDocument, TrustList, sha256};
use serde_json::Value;

use crate::setup::{self, TESTNET_PASSPHRASE, Testnet};

/// What a scenario reports.
pub type Outcome = Result<Vec<String>, String>;

const RID: &str = "0b7e2c4d-6f81-4a93-b5c7-d9e1f3a5b7c9";

fn client(t: &Testnet) -> Result<ApiClient, String> {
    ApiClient::new(
        &t.dir.join("api-ca/ca.pem"),
        &t.dir.join("api-ca/client/cert.pem"),
        &t.dir.join("api-ca/client/key.pem"),
    )
}

fn clinician() -> Vec<(&'static str, &'static str)> {
    vec![
        ("X-Request-ID", RID),
        ("NHSD-End-User-Organisation-ODS", "QHG"),
        ("NHSD-User-ID", "555021935107"),
        ("NHSD-Session-URID", "555021936108"),
        ("NHSD-Role-Code", "R8000"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ]
}

async fn search(t: &Testnet, c: &ApiClient) -> Result<Value, String> {
    let asker = t.nodes.first().ok_or("no nodes")?;
    let body = format!(
        "subject%3Aidentifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{}",
        t.demo.shared.digits()
    );
    let answer = c
        .call(
            asker.api_port,
            "POST",
            "/fhir/DocumentReference/_search",
            &clinician(),
            body.into_bytes(),
        )
        .await?;
    if answer.status != 200 {
        return Err(format!(
            "search answered {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    Ok(answer.json())
}

fn custodians(bundle: &Value) -> Vec<String> {
    let mut out: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == "match")
        .filter_map(|e| {
            e["resource"]["custodian"]["identifier"]["value"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a search Bundle's OperationOutcome entries say, for error messages.
fn search_outcomes(bundle: &Value) -> String {
    let said: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] != "match")
        .flat_map(|e| {
            e["resource"]["issue"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|issue| issue["diagnostics"].as_str().map(str::to_owned))
        .collect();
    if said.is_empty() {
        "none".to_owned()
    } else {
        said.join("; ")
    }
}

/// Signs and records the coordinator's next list, made by `edit` from the current one.
fn next_list(t: &Testnet, edit: impl FnOnce(&mut TrustList)) -> Result<Vec<u8>, String> {
    let current = std::fs::read(t.dir.join("coord/list.cose")).map_err(|e| e.to_string())?;
    let (_, mut list) = ListDocument::decode(&current).map_err(|e| e.to_string())?;
    let (_, root) = RootDocument::decode(
        &std::fs::read(t.dir.join("coord/root.cose")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let now = careweave_node::net::unix_now();
    list.seq += 1;
    list.prev = Some(sha256(&current));
    list.issued = now - 1;
    list.expires = now + 7 * 86_400;
    edit(&mut list);
    let mut doc = ListDocument::unsigned(&list).map_err(|e| e.to_string())?;
    for i in 1..=2 {
        let key = keystore::read(
            &t.dir.join(format!("coord/keys/list-v1-{i}.pem")),
            TESTNET_PASSPHRASE,
        )
        .map_err(|e| e.to_string())?;
        doc.sign(&key, &root).map_err(|e| e.to_string())?;
    }
    let bytes = doc.encode();
    std::fs::write(t.dir.join("coord/list.cose"), &bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

async fn publish(c: &ApiClient, port: u16, list: &[u8]) -> Result<(), String> {
    let answer = c
        .call(
            port,
            "POST",
            "/admin/trust-list",
            &[("Content-Type", "application/cose")],
            list.to_vec(),
        )
        .await?;
    // A node that already got the list by gossip says so; that is fine.
    if answer.status == 200 || String::from_utf8_lossy(&answer.body).contains("already held") {
        Ok(())
    } else {
        Err(format!(
            "publish answered {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ))
    }
}

async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// One node is killed: locates return within the deadline with that ICB flagged and the rest intact.
pub async fn node_down(t: &Testnet) -> Outcome {
    let t = &listed(t)?;
    let c = client(t)?;
    let victim = t
        .nodes
        .get(2)
        .ok_or("node-down needs at least three nodes")?;
    let mut said = vec![];
    let before = custodians(&search(t, &c).await?);
    said.push(format!(
        "before: records for {} at {}",
        t.demo.shared,
        before.join(", ")
    ));
    let pid = std::fs::read_to_string(victim.dir.join("node.pid")).map_err(|e| e.to_string())?;
    std::process::Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .map_err(|e| e.to_string())?;
    said.push(format!(
        "killed {} ({}) with SIGKILL",
        victim.ods, victim.name
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let bundle = search(t, &c).await?;
    let took = started.elapsed();
    let after = custodians(&bundle);
    let flagged = bundle
        .to_string()
        .contains(&format!("({}) could not be reached", victim.ods))
        || bundle
            .to_string()
            .contains(&format!("({}) did not answer in time", victim.ods));
    said.push(format!(
        "after: records at {} in {:.0} ms; {} flagged: {flagged}",
        after.join(", "),
        took.as_secs_f64() * 1000.0,
        victim.ods
    ));
    let others_intact = before
        .iter()
        .filter(|o| **o != victim.ods)
        .all(|o| after.contains(o));
    setup::start_one(victim)?;
    said.push(format!("restarted {}", victim.ods));
    if !flagged || !others_intact {
        return Err(format!(
            "{}\nexpected {} flagged and the others intact",
            said.join("\n"),
            victim.ods
        ));
    }
    Ok(said)
}

/// The coordinator revokes one ICB: it is cut off within seconds.
pub async fn revoke(t: &Testnet) -> Outcome {
    let t = &listed(t)?;
    let c = client(t)?;
    let victim = t.nodes.last().ok_or("no nodes")?.clone();
    let asker = t.nodes.first().ok_or("no nodes")?;
    let mut said = vec![];
    let list = next_list(t, |l| {
        if let Some(m) = l.members.iter().find(|m| m.ods.as_str() == victim.ods) {
            for key in &m.keys {
                l.revoked.push(careweave_protocol::trust::Revocation {
                    kid: key.kid,
                    ods: m.ods.clone(),
                    revoked_at: careweave_node::net::unix_now(),
                    reason: "testnet scenario: revoked".into(),
                    compromised_since: None,
                });
            }
        }
        l.members.retain(|m| m.ods.as_str() != victim.ods);
    })?;
    publish(&c, asker.api_port, &list).await?;
    said.push(format!(
        "coordinator removed {} and revoked its keys; list handed to {} only",
        victim.ods, asker.ods
    ));
    let others: Vec<_> = t
        .nodes
        .iter()
        .filter(|n| n.ods != victim.ods)
        .cloned()
        .collect();
    let want = others.len().saturating_sub(1);
    let cut = wait_until(Duration::from_secs(20), || async {
        let mut all = true;
        for n in &others {
            all &= matches!(setup::node_status(n).await, Some((c, _)) if c == want);
        }
        all
    })
    .await;
    match cut {
        Some(took) => said.push(format!(
            "every other node dropped {} within {:.1} s",
            victim.ods,
            took.as_secs_f64()
        )),
        None => {
            return Err(format!(
                "{}\n{} was still connected after 20 s",
                said.join("\n"),
                victim.ods
            ));
        }
    }
    let after = custodians(&search(t, &c).await?);
    if after.contains(&victim.ods) {
        return Err(format!(
            "{}\n{} still answered: {after:?}",
            said.join("\n"),
            victim.ods
        ));
    }
    said.push(format!(
        "a search now leaves {} out: records at {}",
        victim.ods,
        after.join(", ")
    ));
    Ok(said)
}

/// The nodes that are members of the coordinator's current list.
fn listed(t: &Testnet) -> Result<Testnet, String> {
    let current = std::fs::read(t.dir.join("coord/list.cose")).map_err(|e| e.to_string())?;
    let (_, list) = ListDocument::decode(&current).map_err(|e| e.to_string())?;
    let mut out = t.clone();
    out.nodes
        .retain(|n| list.members.iter().any(|m| m.ods.as_str() == n.ods));
    Ok(out)
}

/// The list expires: nodes refuse to serve and say why; a fresh list restores service.
pub async fn stale_trust(t: &Testnet) -> Outcome {
    let t = &listed(t)?;
    let c = client(t)?;
    let mut said = vec![];
    let short = next_list(t, |l| l.expires = l.issued + 6)?;
    for n in &t.nodes {
        publish(&c, n.api_port, &short).await?;
    }
    said.push("coordinator published a list that expires in 5 seconds".to_owned());
    let probe = t.nodes.get(1).or(t.nodes.first()).ok_or("no nodes")?;
    let refused = wait_until(Duration::from_secs(20), || async {
        c.call(probe.api_port, "GET", "/readyz", &[], vec![])
            .await
            .is_ok_and(|a| a.status == 503)
    })
    .await
    .ok_or("nodes still ready 20 s after the list expired")?;
    let why = c
        .call(probe.api_port, "GET", "/readyz", &[], vec![])
        .await?
        .json()["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    said.push(format!(
        "after {:.1} s {} answers 503: {why}",
        refused.as_secs_f64(),
        probe.ods
    ));
    let search_now = search(t, &c).await;
    said.push(format!(
        "a search now: {}",
        search_now
            .err()
            .unwrap_or_else(|| "answered (unexpected)".into())
    ));
    let fresh = next_list(t, |_| {})?;
    for n in &t.nodes {
        publish(&c, n.api_port, &fresh).await?;
    }
    let restored = wait_until(Duration::from_secs(30), || async {
        let mut all = true;
        for n in &t.nodes {
            all &= matches!(setup::node_status(n).await, Some((peers, true)) if peers + 1 == t.nodes.len());
        }
        all
    })
    .await
    .ok_or("service did not come back after a fresh list")?;
    said.push(format!(
        "a fresh list restored service and connections in {:.1} s",
        restored.as_secs_f64()
    ));
    let _ = custodians(&search(t, &c).await?);
    if !why.contains("expired") {
        return Err(format!(
            "{}\nthe reason did not say the list expired",
            said.join("\n")
        ));
    }
    Ok(said)
}

mod raw {
    //! A bare libp2p peer for the rogue-peer and replay scenarios.
    use std::time::Duration;

    use careweave_node::net::codec::FrameCodec;
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, PeerId, StreamProtocol, identity, request_response};

    type LocateClient = libp2p::Swarm<request_response::Behaviour<FrameCodec>>;

    /// A swarm with `key`'s identity that sends on the locate protocol over
    /// TCP, TLS and yamux, as a node does.
    fn locate_client(
        key: identity::Keypair,
        config: request_response::Config,
    ) -> Result<LocateClient, String> {
        let codec = FrameCodec {
            max_request: 4 << 20,
            max_response: 4 << 20,
            ..FrameCodec::default()
        };
        Ok(libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                libp2p::tls::Config::new,
                libp2p::yamux::Config::default,
            )
            .map_err(|e| e.to_string())?
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    codec,
                    [(
                        StreamProtocol::new("/careweave/locate/1"),
                        request_response::ProtocolSupport::Outbound,
                    )],
                    config,
                )
            })
            .map_err(|e| e.to_string())?
            .build())
    }

    /// Dials `addr` as `key` and sends each request in turn on the locate
    /// protocol; returns each answer or failure (waits at most 10 s each).
    pub(super) async fn requests(
        key: identity::Keypair,
        target: PeerId,
        addr: Multiaddr,
        bodies: Vec<Vec<u8>>,
    ) -> Result<Vec<Result<Vec<u8>, String>>, String> {
        let mut swarm = locate_client(key, request_response::Config::default())?;
        swarm.add_peer_address(target, addr);
        let mut out = Vec::new();
        for body in bodies {
            swarm.behaviour_mut().send_request(&target, body);
            let deadline = tokio::time::sleep(Duration::from_secs(10));
            tokio::pin!(deadline);
            let answer = loop {
                tokio::select! {
                    _ = &mut deadline => break Err("no answer within 10 s".to_owned()),
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::Behaviour(request_response::Event::Message { message: request_response::Message::Response { response, .. }, .. }) => break Ok(response),
                        SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => break Err(error.to_string()),
                        _ => {}
                    }
                }
            };
            out.push(answer);
        }
        Ok(out)
    }

    /// Dials `addr` as `key` and keeps `window` locates in flight, each made
    /// by `next`, until `stop` is set; then hands every answer to `seen`.
    pub(super) async fn flood(
        key: identity::Keypair,
        target: PeerId,
        addr: Multiaddr,
        window: usize,
        mut next: impl FnMut() -> Result<Vec<u8>, String>,
        stop: tokio::sync::watch::Receiver<bool>,
        mut seen: impl FnMut(Result<Vec<u8>, String>),
    ) -> Result<(), String> {
        let mut swarm = locate_client(
            key,
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(10))
                .with_max_concurrent_streams(window),
        )?;
        swarm.add_peer_address(target, addr);
        let mut in_flight = 0;
        loop {
            while in_flight < window && !*stop.borrow() {
                swarm.behaviour_mut().send_request(&target, next()?);
                in_flight += 1;
            }
            if in_flight == 0 {
                return Ok(());
            }
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) => {
                    in_flight -= 1;
                    seen(Ok(response));
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    error, ..
                }) => {
                    in_flight -= 1;
                    seen(Err(error.to_string()));
                }
                _ => {}
            }
        }
    }
}

fn p2p_target(
    node: &crate::setup::NodeInfo,
) -> Result<(libp2p::PeerId, libp2p::Multiaddr), String> {
    let keys =
        careweave_node::keys::NodeKeys::load(&node.dir.join("keys")).map_err(|e| e.to_string())?;
    let peer = libp2p::PeerId::from_bytes(keys.peer_id().as_bytes()).map_err(|e| e.to_string())?;
    let addr = format!("/ip4/127.0.0.1/tcp/{}", node.p2p_port)
        .parse()
        .map_err(|e: libp2p::multiaddr::Error| e.to_string())?;
    Ok((peer, addr))
}

/// A node not on the list cannot connect or get an answer.
pub async fn rogue_peer(t: &Testnet) -> Outcome {
    let t = &listed(t)?;
    let target_node = t.nodes.get(1).ok_or("rogue-peer needs two nodes")?;
    let (target, addr) = p2p_target(target_node)?;
    let rogue = libp2p::identity::Keypair::generate_ed25519();
    let mut said = vec![format!(
        "a libp2p peer with a fresh key ({}) dials {} and asks a locate",
        rogue.public().to_peer_id(),
        target_node.ods
    )];
    let answers = raw::requests(
        rogue,
        target,
        addr,
        vec![vec![0xd2, 0x84, 0x40, 0xa0, 0x40, 0x40]],
    )
    .await?;
    match answers.first() {
        Some(Err(e)) => {
            said.push(format!("refused: {e}"));
            Ok(said)
        }
        other => Err(format!(
            "{}\nthe rogue peer got an answer: {other:?}",
            said.join("\n")
        )),
    }
}

/// One signer of locate requests: a member's own keys, aimed at one node.
struct LocateSigner {
    keys: careweave_node::keys::NodeKeys,
    sender: careweave_protocol::OdsCode,
    receiver: careweave_protocol::OdsCode,
    receiver_peer: careweave_protocol::keys::PeerIdBytes,
    trust_seq: u64,
    patient: careweave_protocol::NhsNumber,
}

impl LocateSigner {
    fn new(
        t: &Testnet,
        asker: &crate::setup::NodeInfo,
        target: &crate::setup::NodeInfo,
    ) -> Result<Self, String> {
        let load = |node: &crate::setup::NodeInfo| {
            careweave_node::keys::NodeKeys::load(&node.dir.join("keys")).map_err(|e| e.to_string())
        };
        let current = std::fs::read(t.dir.join("coord/list.cose")).map_err(|e| e.to_string())?;
        let (_, list) = ListDocument::decode(&current).map_err(|e| e.to_string())?;
        let ods = |code: &str| careweave_protocol::OdsCode::parse(code).map_err(|e| e.to_string());
        Ok(Self {
            keys: load(asker)?,
            sender: ods(&asker.ods)?,
            receiver: ods(&target.ods)?,
            receiver_peer: load(target)?.peer_id(),
            trust_seq: list.seq,
            patient: t.demo.shared,
        })
    }

    /// A locate sealed now with `cti`.
    fn sign(&self, cti: [u8; 16]) -> Result<Vec<u8>, String> {
        use careweave_protocol::envelope::{self, ProtocolId, Seal};
        let request = careweave_protocol::message::LocateRequest {
            nhs_number: self.patient,
            context: crate::data::clinician(self.sender.clone(), RID),
            sections: None,
        };
        envelope::seal(
            &request,
            &Seal {
                key: &self.keys.message,
                protocol: ProtocolId::Locate,
                sender_ods: &self.sender,
                receiver_ods: &self.receiver,
                sender_peer: &self.keys.peer_id(),
                receiver_peer: &self.receiver_peer,
                trust_seq: self.trust_seq,
                now: careweave_node::net::unix_now(),
                lifetime_secs: 60,
                cti,
                request_hash: None,
            },
        )
        .map_err(|e| e.to_string())
    }

    /// The libp2p identity of the signing member's node.
    fn identity(&self) -> Result<libp2p::identity::Keypair, String> {
        let mut secret = self.keys.transport.secret_bytes();
        libp2p::identity::Keypair::ed25519_from_bytes(&mut secret).map_err(|e| e.to_string())
    }
}

/// What a node answered to a request: "answered", "refused: <why>",
/// "busy" or "failure: <why>".
fn answer_kind(answer: &Result<Vec<u8>, String>) -> String {
    use careweave_protocol::message::{ErrorCode, ErrorMessage};
    let bytes = match answer {
        Err(e) => return format!("failure: {e}"),
        Ok(bytes) => bytes,
    };
    let signed = match careweave_protocol::cose::Sign1::decode(bytes, 4 << 20) {
        Ok(signed) => signed,
        Err(e) => return format!("failure: {e}"),
    };
    if !signed.header.content_type.contains("error") {
        return "answered".to_owned();
    }
    match careweave_protocol::cbor::decode::<ErrorMessage>(
        &signed.payload,
        careweave_protocol::cbor::Limits::MESSAGE,
    ) {
        Ok(error) if error.code == ErrorCode::Busy => "busy".to_owned(),
        Ok(error) => format!("refused: {}", error.message),
        Err(e) => format!("failure: {e}"),
    }
}

/// A captured request sent again is refused as a replay.
pub async fn replay(t: &Testnet) -> Outcome {
    let t = &listed(t)?;
    let (asker, target_node) = (
        t.nodes.first().ok_or("no nodes")?,
        t.nodes.get(1).ok_or("replay needs two nodes")?,
    );
    let signer = LocateSigner::new(t, asker, target_node)?;
    let (target, addr) = p2p_target(target_node)?;
    let mut said = vec![format!(
        "{} signs one locate for {} and it is sent twice",
        asker.ods, target_node.ods
    )];
    let send_twice = async |attempt: u32| -> Result<(String, String), String> {
        let mut cti = [0u8; 16];
        cti.copy_from_slice(
            &sha256(format!("replay-{}-{attempt}", careweave_node::net::unix_now()).as_bytes())
                [..16],
        );
        let bytes = signer.sign(cti)?;
        let answers = raw::requests(
            signer.identity()?,
            target,
            addr.clone(),
            vec![bytes.clone(), bytes],
        )
        .await?;
        Ok((
            answers.first().map(answer_kind).unwrap_or_default(),
            answers.get(1).map(answer_kind).unwrap_or_default(),
        ))
    };
    let (mut first, mut second) = send_twice(0).await?;
    // This client speaks as a member beside that member's own node. If the
    // two nodes connected moments ago, the target refuses a second
    // connection from the same PeerId until the race window has passed.
    if first.starts_with("failure") {
        said.push(format!("first try: {first}; trying again once"));
        tokio::time::sleep(careweave_node::net::pairing::RACE_WINDOW).await;
        (first, second) = send_twice(1).await?;
    }
    said.push(format!("first: {first}"));
    said.push(format!("second: {second}"));
    if first == "answered" && second.contains("replay") {
        Ok(said)
    } else {
        Err(format!(
            "{}\nexpected the first answered and the second refused as a replay",
            said.join("\n")
        ))
    }
}

/// Locate latencies in milliseconds, sorted, of searches at the first node's
/// API: at least `count`, and for at least `at_least`. A failed search, or
/// one without `custodian`'s records, is an error.
async fn timed_searches(
    t: &Testnet,
    c: &ApiClient,
    count: usize,
    at_least: Duration,
    custodian: &str,
) -> Result<Vec<f64>, String> {
    let mut times = Vec::with_capacity(count);
    let started = Instant::now();
    let mut pace = tokio::time::interval(SEARCH_EVERY);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while times.len() < count || started.elapsed() < at_least {
        pace.tick().await;
        let asked = Instant::now();
        let found = search(t, c).await?;
        times.push(asked.elapsed().as_secs_f64() * 1000.0);
        if !custodians(&found).iter().any(|ods| ods == custodian) {
            return Err(format!(
                "search {} ({:.1} ms) did not include {custodian}'s records; its outcomes: {}",
                times.len(),
                times.last().copied().unwrap_or_default(),
                search_outcomes(&found)
            ));
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// The nearest-rank `p` percentile of sorted values.
fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

fn rss_mib(node: &crate::setup::NodeInfo) -> f64 {
    crate::bench::pid(node)
        .and_then(crate::bench::rss_bytes)
        .map_or(f64::NAN, |b| b as f64 / (1024.0 * 1024.0))
}

/// CPU seconds a node's process has used, from /proc.
fn cpu_secs(node: &crate::setup::NodeInfo) -> f64 {
    let Some(stat) = crate::bench::pid(node)
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
    else {
        return f64::NAN;
    };
    // Fields after the command name, which may hold spaces: utime and stime
    // are the 12th and 13th, in clock ticks (100 a second on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// The share of one core a node used since `start`.
fn cpu_share(node: &crate::setup::NodeInfo, start: (f64, Instant)) -> f64 {
    (cpu_secs(node) - start.0) / start.1.elapsed().as_secs_f64()
}

/// Searches made before and during the flood, each, at least.
const FLOOD_SAMPLES: usize = 100;
/// The well-behaved ICB's pace: 100 searches a second, half the per-peer
/// rate each node allows (200 a second). Searches back to back went past
/// that rate once answers got fast enough, and were told "busy" in normal
/// operation.
const SEARCH_EVERY: Duration = Duration::from_millis(10);
/// Each phase lasts at least this long. The flood outlasts the victim's
/// ten-second cool-down, so the flooder gets back in once and is shut out
/// again.
const FLOOD_MEASURED_FOR: Duration = Duration::from_secs(15);
/// Requests the flooding member keeps in flight: twice the per-peer limit.
const FLOOD_WINDOW: usize = 64;

/// An authorised member floods another with signed locates. The flooder gets
/// busy answers, then it is shut out for a cool-down, its requests held
/// unanswered; a third ICB's searches, which ask the flooded node too, keep
/// working. Reports their p99 before and during the flood (the target is at
/// most 2x) and the flooded node's RSS before, during and after. Timings and
/// memory are reported, not judged: timing belongs to benchmarks.
pub async fn flood(t: &Testnet) -> Outcome {
    let t = &listed(t)?;
    let [asker, victim, flooder, ..] = t.nodes.as_slice() else {
        return Err("flood needs three nodes".to_owned());
    };
    let c = client(t)?;
    let signer = LocateSigner::new(t, flooder, victim)?;
    let (target, addr) = p2p_target(victim)?;
    let mut said = vec![format!(
        "{} keeps {FLOOD_WINDOW} signed locates in flight at {} while {} searches through its API",
        flooder.ods, victim.ods, asker.ods
    )];

    let rss_before = rss_mib(victim);
    let cpu_start = (cpu_secs(victim), Instant::now());
    let before = timed_searches(t, &c, FLOOD_SAMPLES, FLOOD_MEASURED_FOR, &victim.ods).await?;
    let cpu_before = cpu_share(victim, cpu_start);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let tally = std::sync::Arc::clone(&counts);
    let identity = signer.identity()?;
    let mut serial = 0u64;
    let started = careweave_node::net::unix_now();
    // The flooder gets its own thread and runtime. Sharing the scenario's
    // runtime, its busy loop (sign, send, fail, again) delayed the tasks
    // that time the searches, which then measured the scenario process
    // rather than the flooded node. It still shares the two cores.
    let (flood_done, flooding) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("flooder".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
                .and_then(|runtime| {
                    runtime.block_on(raw::flood(
                        identity,
                        target,
                        addr,
                        FLOOD_WINDOW,
                        move || {
                            serial += 1;
                            let mut cti = [0u8; 16];
                            cti.copy_from_slice(
                                &sha256(format!("flood-{started}-{serial}").as_bytes())[..16],
                            );
                            signer.sign(cti)
                        },
                        stop_rx,
                        move |answer| {
                            let mut kind = answer_kind(&answer);
                            if kind.starts_with("failure") {
                                kind = "failure".to_owned();
                            }
                            if let Ok(mut counts) = tally.lock() {
                                *counts.entry(kind).or_default() += 1;
                            }
                        },
                    ))
                });
            let _ = flood_done.send(result);
        })
        .map_err(|e| format!("the flooder thread: {e}"))?;
    // Measure from the start: the busy answers, the shutting out, and a
    // return after the cool-down all fall inside.
    let cpu_start = (cpu_secs(victim), Instant::now());
    let rss_peak = std::sync::Arc::new(std::sync::Mutex::new(rss_mib(victim)));
    let during = {
        let peak = std::sync::Arc::clone(&rss_peak);
        let victim_node = victim.clone();
        let watcher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Ok(mut peak) = peak.lock() {
                    *peak = peak.max(rss_mib(&victim_node));
                }
            }
        });
        let during = timed_searches(t, &c, FLOOD_SAMPLES, FLOOD_MEASURED_FOR, &victim.ods).await;
        watcher.abort();
        during
    };
    let cpu_during = cpu_share(victim, cpu_start);
    let _ = stop_tx.send(true);
    let flood_result = tokio::time::timeout(Duration::from_secs(30), flooding).await;
    let during = during?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_mib(victim);
    let rss_peak = rss_peak.lock().map_or(f64::NAN, |p| *p);

    let counts = counts.lock().map(|c| c.clone()).unwrap_or_default();
    said.push(format!(
        "the flooder's answers: {}",
        counts
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let (p50_before, p99_before) = (nearest_rank(&before, 50.0), nearest_rank(&before, 99.0));
    let (p50_during, p99_during) = (nearest_rank(&during, 50.0), nearest_rank(&during, 99.0));
    let ratio = p99_during / p99_before;
    said.push(format!(
        "{}'s searches ({} before, {} during): p50 {p50_before:.1} ms / p99 {p99_before:.1} ms before, \
         p50 {p50_during:.1} ms / p99 {p99_during:.1} ms during; p99 ratio {ratio:.2} (target at most 2): {}",
        asker.ods,
        before.len(),
        during.len(),
        if ratio <= 2.0 { "met" } else { "missed" }
    ));
    said.push(format!(
        "{}'s RSS: {rss_before:.1} MiB before, {rss_peak:.1} MiB at most during, {rss_after:.1} MiB after",
        victim.ods
    ));
    let busy = counts.get("busy").copied().unwrap_or(0);
    let metrics = c
        .call(victim.api_port, "GET", "/metrics", &[], vec![])
        .await?;
    let metric = |name: &str| -> u64 {
        String::from_utf8_lossy(&metrics.body)
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let closed = metric("careweave_flooding_shut_outs_total");
    let shed = metric("careweave_requests_refused_total{reason=\"flooding\"}");
    said.push(format!(
        "{}'s CPU: {:.0}% of one core before, {:.0}% during (the flooder runs on the same two cores)",
        victim.ods,
        cpu_before * 100.0,
        cpu_during * 100.0
    ));
    said.push(if closed > 0 {
        format!(
            "{} shut the flooder out {closed} time(s) and held {shed} of its requests unanswered",
            victim.ods
        )
    } else {
        format!("{} never shut the flooder out", victim.ods)
    });
    match flood_result {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(format!("{}\nthe flood failed: {e}", said.join("\n"))),
        Ok(Err(e)) => {
            return Err(format!(
                "{}\nthe flooder thread ended: {e}",
                said.join("\n")
            ));
        }
        Err(_) => {
            return Err(format!(
                "{}\nthe flood's answers did not all arrive within 30 s",
                said.join("\n")
            ));
        }
    }
    if busy == 0 && closed == 0 {
        return Err(format!(
            "{}\nthe flooder was neither told the node is busy nor shut out",
            said.join("\n")
        ));
    }
    said.push(format!(
        "every search during the flood had {}'s records",
        victim.ods
    ));
    Ok(said)
}
