//! The peer plane with real nodes on loopback: libp2p over TCP + TLS +
//! yamux on random 127.0.0.1 ports, a signed trust list, real stores.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use careweave_node::config::NodeConfig;
use careweave_node::daemon;
use careweave_node::import::Importer;
use careweave_node::net::{IcbOutcome, IcbResult, NetworkHandle};
use careweave_node::node::{FetchAnswer, Node};
use careweave_node::store::Store;
use careweave_protocol::cbor::{self, Limits};
use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::message::{ErrorMessage, FetchRequest, LocateRequest, Purpose};
use careweave_protocol::trust::{MemberStatus, Role};
use careweave_protocol::{NhsNumber, OdsCode};
use common::{Coordinator, DAY, T0, context, keys, member_at};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Net {
    coordinator: Coordinator,
    ports: Vec<(String, u16)>,
    /// Ports the list gives instead of a node's own, for nodes reached
    /// through a relay.
    relayed: Vec<(String, u16)>,
    quic: bool,
}

impl Net {
    fn new(codes: &[&str]) -> Self {
        Self {
            coordinator: Coordinator::new(),
            ports: codes.iter().map(|c| (c.to_string(), free_port())).collect(),
            relayed: Vec::new(),
            quic: false,
        }
    }

    fn list(&self, seq: u64, prev: Option<[u8; 32]>, suspended: &[&str]) -> Vec<u8> {
        let members = self
            .ports
            .iter()
            .map(|(ods, port)| {
                let port = self
                    .relayed
                    .iter()
                    .find(|(relayed, _)| relayed == ods)
                    .map_or(*port, |(_, relay)| *relay);
                let mut m = member_at(ods, vec![Role::Provider, Role::Consumer], &self.addr(port));
                if suspended.contains(&ods.as_str()) {
                    m.status = MemberStatus::Suspended;
                }
                m
            })
            .collect();
        self.coordinator.list_bytes(seq, prev, members, vec![])
    }

    fn addr(&self, port: u16) -> String {
        if self.quic {
            format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
        } else {
            format!("/ip4/127.0.0.1/tcp/{port}")
        }
    }

    fn port(&self, ods: &str) -> u16 {
        self.ports.iter().find(|(o, _)| o == ods).unwrap().1
    }
}

struct Running {
    node: Arc<Node>,
    handle: NetworkHandle,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn config(ods: &str, listen: String) -> NodeConfig {
    let mut config = common::config(ods);
    config.network.listen = vec![listen];
    config.network.request_deadline_ms = 1500;
    config.network.max_frame_bytes = 1024 * 1024;
    config
}

/// A node with a fresh store, the root and `list` installed, at the real
/// clock (the fixture's lists are valid around T0, so these tests sign
/// lists for now instead). Its network is not started.
fn ready_node(net: &Net, config: NodeConfig, list: &[u8]) -> (Arc<Node>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store"), 4 << 20).unwrap();
    let now = careweave_node::net::unix_now();
    let ods = config.node.ods.as_str().to_owned();
    let node = Arc::new(Node::new(config, keys(&ods), store, now).unwrap());
    node.install_root(&net.coordinator.root_bytes(), now)
        .unwrap();
    node.install_list(list, now).unwrap();
    (node, dir)
}

/// Starts a node, its event loop on the test's runtime.
async fn start(net: &Net, ods: &str, list: &[u8]) -> Running {
    start_with(net, config(ods, net.addr(net.port(ods))), list).await
}

async fn start_with(net: &Net, config: NodeConfig, list: &[u8]) -> Running {
    let (node, dir) = ready_node(net, config, list);
    let net_config = daemon::net_config(&node.config).unwrap();
    let (handle, event_loop) = careweave_node::net::start(Arc::clone(&node), net_config).unwrap();
    let task = tokio::spawn(event_loop.run());
    Running {
        node,
        handle,
        task,
        _dir: dir,
    }
}

fn load(node: &Node) {
    let (report, _, _) = Importer {
        store: &node.store,
        record_key: &node.keys.record,
        custodian: node.ods(),
        config: &node.config,
        now: careweave_node::net::unix_now(),
    }
    .import_bytes("bundle", common::BUNDLE.as_bytes(), &mut |_, _| {})
    .unwrap();
    assert_eq!(report.stored, 9);
}

/// Waits, at most 20 s, for a condition; fails the test naming it if it never holds.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, Duration::from_secs(20), check).await;
}

async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never happened: {what}");
}

async fn connected(r: &Running) -> usize {
    r.handle
        .status()
        .await
        .map(|s| s.connected.len())
        .unwrap_or(0)
}

/// One ICB's entry in a locate's results.
fn result_for<'a>(results: &'a [IcbResult], ods: &str) -> &'a IcbResult {
    results
        .iter()
        .find(|r| r.ods.as_str() == ods)
        .unwrap_or_else(|| panic!("no result for {ods}"))
}

/// Asserts that `ods` answered with pointers.
fn assert_pointers_from(results: &[IcbResult], ods: &str) {
    let result = result_for(results, ods);
    assert!(
        matches!(result.outcome, IcbOutcome::Pointers { .. }),
        "{ods}: {:?}",
        result.outcome
    );
}

fn locate_request() -> LocateRequest {
    LocateRequest {
        nhs_number: NhsNumber::parse("9990000018").unwrap(),
        context: context(Purpose::Treat),
        sections: None,
    }
}

/// The fixture's coordinator signs lists valid around T0; these tests run at
/// the real clock, so shift its windows to now.
fn shift_to_now(net: &mut Net) {
    let now = careweave_node::net::unix_now();
    let _ = T0;
    net.coordinator.root.issued = now - 60 * DAY;
    net.coordinator.root.expires = now + 365 * DAY;
    net.coordinator.at = Some(now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locate_and_fetch_across_three_nodes() {
    let mut net = Net::new(&["QHG", "QUE", "QM7"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list).await;
    let que = start(&net, "QUE", &list).await;
    let qm7 = start(&net, "QM7", &list).await;
    load(&que.node);
    eventually("every node connected to the other two", || async {
        connected(&qhg).await == 2 && connected(&que).await == 2 && connected(&qm7).await == 2
    })
    .await;

    let results = qhg.handle.locate(locate_request()).await.unwrap();
    // Every active provider answers, this node included (it holds nothing here).
    assert_eq!(results.len(), 3, "{results:?}");
    let own = result_for(&results, "QHG");
    assert_eq!(own.outcome, IcbOutcome::NoRecords);
    let que_result = result_for(&results, "QUE");
    let IcbOutcome::Pointers { pointers, withheld } = &que_result.outcome else {
        panic!("QUE: {:?}", que_result.outcome)
    };
    assert_eq!(pointers.len(), 7);
    assert_eq!(withheld.len(), 2);
    let qm7_result = result_for(&results, "QM7");
    assert_eq!(qm7_result.outcome, IcbOutcome::NoRecords);

    let answer = qhg
        .handle
        .fetch(FetchRequest {
            nhs_number: NhsNumber::parse("9990000018").unwrap(),
            pointer_id: pointers[0].id.clone(),
            context: context(Purpose::Treat),
        })
        .await
        .unwrap();
    let FetchAnswer::Records {
        records, custodian, ..
    } = answer
    else {
        panic!("{answer:?}")
    };
    assert_eq!(custodian.as_str(), "QUE");
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r.label.custodian.as_str() == "QUE"));
}

/// Status counts open connections as well as peers: at least one per
/// connected peer and never more than the limit of four per peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_open_connections_beside_peers() {
    let codes = ["QHG", "QUE", "QM7"];
    let mut net = Net::new(&codes);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let mut nodes = Vec::new();
    for ods in codes {
        nodes.push(start(&net, ods, &list).await);
    }
    let others = codes.len() - 1;
    eventually("every node connected to every other", || async {
        for node in &nodes {
            if connected(node).await != others {
                return false;
            }
        }
        true
    })
    .await;
    // Nodes dial each other as they start; the crossing dials leave one
    // connection per pair (net::pairing).
    for (ods, node) in codes.iter().zip(&nodes) {
        let status = node.handle.status().await.unwrap();
        assert_eq!(
            status.connections, others,
            "{ods}: {} connections for {others} peers",
            status.connections
        );
    }
    // Stopping one node closes every connection to it.
    let last = nodes.pop().unwrap();
    last.task.abort();
    drop(last);
    eventually("the stopped node's connections closed", || async {
        let status = nodes[0].handle.status().await.unwrap();
        status.connected.len() == others - 1 && status.connections == others - 1
    })
    .await;
}

/// `daemon::start_network` gives the network a thread and runtime of its
/// own, so it keeps answering after the runtime that started it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_outlives_the_runtime_that_started_it() {
    let mut net = Net::new(&["QHG", "QUE"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list).await;
    let (que, _dir) = ready_node(&net, config("QUE", net.addr(net.port("QUE"))), &list);
    load(&que);
    let starter = Arc::clone(&que);
    let que_handle = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = daemon::net_config(&starter.config).unwrap();
        let handle = runtime
            .block_on(async { daemon::start_network(Arc::clone(&starter), config) })
            .unwrap();
        drop(runtime);
        handle
    })
    .join()
    .unwrap();

    eventually("connected", || async { connected(&qhg).await == 1 }).await;
    let results = qhg.handle.locate(locate_request()).await.unwrap();
    let que_result = result_for(&results, "QUE");
    assert!(
        matches!(que_result.outcome, IcbOutcome::Pointers { .. }),
        "QUE: {:?}",
        que_result.outcome
    );
    assert_eq!(que_handle.status().await.unwrap().connected.len(), 1);
}

/// QHG and QUE on a fresh list, connected to each other.
async fn qhg_and_que_connected() -> (Running, Running) {
    let mut net = Net::new(&["QHG", "QUE"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list).await;
    let que = start(&net, "QUE", &list).await;
    eventually("connected", || async { connected(&qhg).await == 1 }).await;
    (qhg, que)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_tampered_requests_over_a_real_connection() {
    let (qhg, que) = qhg_and_que_connected().await;
    let now = careweave_node::net::unix_now();
    let request = qhg
        .node
        .prepare_locate(&OdsCode::parse("QUE").unwrap(), &locate_request(), now)
        .unwrap();
    let que_peer = que.node.peer_id().clone();
    let first = qhg
        .handle
        .send_raw(ProtocolId::Locate, &que_peer, request.bytes.clone())
        .await
        .unwrap();
    assert!(
        qhg.node
            .accept_locate_response(&request, &first, now)
            .is_ok()
    );
    let error_of = |bytes: &[u8]| -> ErrorMessage {
        let s = careweave_protocol::cose::Sign1::decode(bytes, 1 << 20).unwrap();
        cbor::decode(&s.payload, Limits::MESSAGE).unwrap()
    };
    let replay = qhg
        .handle
        .send_raw(ProtocolId::Locate, &que_peer, request.bytes.clone())
        .await
        .unwrap();
    assert!(
        error_of(&replay).message.contains("replay"),
        "{:?}",
        error_of(&replay)
    );
    let mut tampered = request.bytes.clone();
    let n = tampered.len();
    tampered[n - 3] ^= 1;
    let answer = qhg
        .handle
        .send_raw(ProtocolId::Locate, &que_peer, tampered)
        .await
        .unwrap();
    assert!(
        error_of(&answer).message.contains("signature"),
        "{:?}",
        error_of(&answer)
    );
    let refused = que.node.metrics.refused();
    assert_eq!(refused.get("replayed"), Some(&1));
    assert_eq!(refused.get("bad-signature"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_keeps_sending_bad_messages_loses_its_connection() {
    use careweave_node::strikes::DEFAULT_LIMIT;
    let (qhg, que) = qhg_and_que_connected().await;
    let que_peer = que.node.peer_id().clone();
    let tampered = || {
        let mut bytes = qhg
            .node
            .prepare_locate(
                &OdsCode::parse("QUE").unwrap(),
                &locate_request(),
                careweave_node::net::unix_now(),
            )
            .unwrap()
            .bytes;
        let n = bytes.len();
        bytes[n - 3] ^= 1;
        bytes
    };
    for i in 0..DEFAULT_LIMIT {
        let answer = qhg
            .handle
            .send_raw(ProtocolId::Locate, &que_peer, tampered())
            .await;
        assert!(answer.is_ok(), "bad message {i} got no signed refusal");
    }
    // The next gets no answer: QUE closes the connection instead.
    let closed = qhg
        .handle
        .send_raw(ProtocolId::Locate, &que_peer, tampered())
        .await;
    assert!(closed.is_err(), "a member over the limit was answered");
    assert_eq!(
        que.node
            .metrics
            .connections_closed_for_bad_messages
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        que.node.metrics.refused().get("bad-signature").copied(),
        Some(u64::from(DEFAULT_LIMIT) + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_reported_and_the_others_still_answer() {
    let mut net = Net::new(&["QHG", "QUE", "QM7"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list).await;
    let que = start(&net, "QUE", &list).await;
    let qm7 = start(&net, "QM7", &list).await;
    load(&que.node);
    eventually("connected", || async { connected(&qhg).await == 2 }).await;
    qm7.task.abort();
    drop(qm7);
    let results = qhg.handle.locate(locate_request()).await.unwrap();
    let qm7_result = result_for(&results, "QM7");
    assert!(
        matches!(
            qm7_result.outcome,
            IcbOutcome::Unreachable(_) | IcbOutcome::TimedOut
        ),
        "{:?}",
        qm7_result.outcome
    );
    assert_pointers_from(&results, "QUE");
}

/// Requests go out with their protocol id, without waiting for the
/// confirmation (decision 0024). A member that speaks another version of the
/// locate protocol refuses it at once: it is reported unreachable, not left
/// to time out, and the others still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_does_not_speak_locate_is_reported_at_once() {
    let mut net = Net::new(&["QHG", "QUE", "QM7"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list).await;
    let que = start(&net, "QUE", &list).await;
    load(&que.node);
    // QM7 holds its real key but speaks only a locate protocol of its own.
    let mut other = raw::swarm(
        raw::libp2p_key(&keys("QM7").transport),
        careweave_node::net::codec::FrameCodec {
            max_request: 1 << 20,
            max_response: 1 << 20,
            ..Default::default()
        },
        "/careweave/locate/99",
    );
    other
        .listen_on(net.addr(net.port("QM7")).parse().unwrap())
        .unwrap();
    let other = tokio::spawn(async move {
        loop {
            use futures::StreamExt;
            let _ = other.select_next_some().await;
        }
    });
    eventually("connected to both", || async { connected(&qhg).await == 2 }).await;

    let results = qhg.handle.locate(locate_request()).await.unwrap();
    let qm7 = result_for(&results, "QM7");
    assert!(
        matches!(qm7.outcome, IcbOutcome::Unreachable(_)),
        "{:?}",
        qm7.outcome
    );
    assert_pointers_from(&results, "QUE");
    other.abort();
}

/// A TCP relay on loopback that can be made to swallow everything, as a
/// pulled cable would, while both its connections stay open; or to hold
/// back what flows one way until it is let through.
struct Relay {
    port: u16,
    swallowing: Arc<AtomicBool>,
    /// Holds back bytes from the dialer to the target.
    holding_to_target: Arc<AtomicBool>,
    /// Holds back bytes from the target to the dialer.
    holding_to_dialer: Arc<AtomicBool>,
}

impl Relay {
    async fn to(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Self {
            port,
            swallowing: Arc::default(),
            holding_to_target: Arc::default(),
            holding_to_dialer: Arc::default(),
        };
        let hole = Arc::clone(&relay.swallowing);
        let (to_target, to_dialer) = (
            Arc::clone(&relay.holding_to_target),
            Arc::clone(&relay.holding_to_dialer),
        );
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    continue;
                };
                let (from_in, to_in) = inbound.into_split();
                let (from_out, to_out) = outbound.into_split();
                tokio::spawn(Self::pipe(
                    from_in,
                    to_out,
                    Arc::clone(&hole),
                    Arc::clone(&to_target),
                ));
                tokio::spawn(Self::pipe(
                    from_out,
                    to_in,
                    Arc::clone(&hole),
                    Arc::clone(&to_dialer),
                ));
            }
        });
        relay
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        swallowing: Arc<AtomicBool>,
        holding: Arc<AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if swallowing.load(Ordering::Relaxed) {
                continue;
            }
            // Bytes held back wait here, and nothing more is read behind
            // them, until they are let through.
            while holding.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn swallow(&self) {
        self.swallowing.store(true, Ordering::Relaxed);
    }
}

/// QHG and QUE, each reached through a relay of its own, connected, with
/// QUE holding records. `tune` adjusts both nodes' configuration.
async fn relayed_pair(tune: impl Fn(&mut NodeConfig)) -> ([Relay; 2], [Running; 2]) {
    let mut net = Net::new(&["QHG", "QUE"]);
    shift_to_now(&mut net);
    let relays = [
        Relay::to(net.port("QHG")).await,
        Relay::to(net.port("QUE")).await,
    ];
    for (ods, relay) in ["QHG", "QUE"].into_iter().zip(&relays) {
        net.relayed.push((ods.to_owned(), relay.port));
    }
    let list = net.list(1, None, &[]);
    let start_one = |ods: &str| {
        let mut config = config(ods, net.addr(net.port(ods)));
        tune(&mut config);
        start_with(&net, config, &list)
    };
    let nodes = [start_one("QHG").await, start_one("QUE").await];
    load(&nodes[1].node);
    eventually("connected through the relays", || async {
        connected(&nodes[0]).await == 1
    })
    .await;
    (relays, nodes)
}

/// A request goes out with its protocol id, without waiting a round trip
/// for the answering side to confirm the protocol (decision 0024). With
/// everything flowing towards the asking node held back, including that
/// confirmation, the request still reaches the answering node and is
/// answered; once the flow is let through, the answer arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_leaves_before_its_protocol_is_confirmed() {
    let ([qhg_relay, que_relay], [qhg, que]) = relayed_pair(|config| {
        // Long enough that neither a deadline nor a missed ping ends the
        // exchange while the flow is held.
        config.network.request_deadline_ms = 30_000;
        config.network.ping_every_secs = 60;
        config.network.ping_timeout_secs = 60;
    })
    .await;
    // Whichever node dialed, hold back every byte on its way to QHG.
    que_relay.holding_to_dialer.store(true, Ordering::Relaxed);
    qhg_relay.holding_to_target.store(true, Ordering::Relaxed);
    let answered_before = que.node.metrics.answered.load(Ordering::Relaxed);
    let handle = qhg.handle.clone();
    let asking = tokio::spawn(async move { handle.locate(locate_request()).await });
    eventually_within(
        "QUE answered a request whose protocol QHG never saw confirmed",
        Duration::from_secs(10),
        || async { que.node.metrics.answered.load(Ordering::Relaxed) > answered_before },
    )
    .await;
    assert!(!asking.is_finished(), "the answer came through the hold");

    que_relay.holding_to_dialer.store(false, Ordering::Relaxed);
    qhg_relay.holding_to_target.store(false, Ordering::Relaxed);
    let results = asking.await.unwrap().unwrap();
    assert_pointers_from(&results, "QUE");
}

/// A peer that goes silent without closing its connection (here a relay
/// that swallows every byte) is found by its missed pings: the connection
/// is closed and counted, instead of staying open until the idle timeout
/// while every request to it waits out its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_pings_is_closed() {
    let (relays, [qhg, que]) = relayed_pair(|config| {
        config.network.ping_every_secs = 1;
        config.network.ping_timeout_secs = 1;
    })
    .await;
    let (qhg, que) = (&qhg, &que);
    let results = qhg.handle.locate(locate_request()).await.unwrap();
    assert_pointers_from(&results, "QUE");

    for relay in &relays {
        relay.swallow();
    }
    let closed = |r: &Running| {
        r.node
            .metrics
            .connections_closed_for_missed_pings
            .load(Ordering::Relaxed)
    };
    // The first ping times out after 1 s; the second goes out on a new
    // stream about 1 s later, and libp2p gives up negotiating it after 10 s.
    eventually_within(
        "a silent connection closed for missed pings",
        Duration::from_secs(40),
        || async { closed(qhg) + closed(que) >= 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_member_is_cut_off_when_the_new_list_spreads() {
    let mut net = Net::new(&["QHG", "QUE", "QM7"]);
    shift_to_now(&mut net);
    let list1 = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list1).await;
    let que = start(&net, "QUE", &list1).await;
    let qm7 = start(&net, "QM7", &list1).await;
    eventually("all connected", || async {
        connected(&qhg).await == 2 && connected(&que).await == 2
    })
    .await;
    // The coordinator suspends QM7 and hands the list to QHG only.
    let prev = careweave_protocol::trust::sha256(&list1);
    let list2 = net.list(2, Some(prev), &["QM7"]);
    qhg.node
        .install_list(&list2, careweave_node::net::unix_now())
        .unwrap();
    qhg.handle.trust_changed().await.unwrap();
    eventually("QUE holds list 2 (by gossip or pull)", || async {
        que.node
            .current_list(careweave_node::net::unix_now())
            .map(|l| l.list().seq)
            == Some(2)
    })
    .await;
    eventually("QM7 disconnected from everyone", || async {
        connected(&qm7).await == 0 && connected(&qhg).await == 1 && connected(&que).await == 1
    })
    .await;
    // QM7's requests are refused from now on: it cannot even connect. (It
    // can still search its own records.)
    let results = qm7.handle.locate(locate_request()).await.unwrap();
    assert!(
        results
            .iter()
            .filter(|r| r.ods.as_str() != "QM7")
            .all(|r| !matches!(
                r.outcome,
                IcbOutcome::Pointers { .. } | IcbOutcome::NoRecords
            )),
        "{results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_an_older_list_catches_up_on_connect() {
    let mut net = Net::new(&["QHG", "QUE"]);
    shift_to_now(&mut net);
    let list1 = net.list(1, None, &[]);
    let list2 = net.list(2, Some(careweave_protocol::trust::sha256(&list1)), &[]);
    let qhg = start(&net, "QHG", &list2).await;
    let que = start(&net, "QUE", &list1).await;
    eventually("QUE caught up to list 2", || async {
        que.node
            .current_list(careweave_node::net::unix_now())
            .map(|l| l.list().seq)
            == Some(2)
    })
    .await;
    drop(qhg);
}

mod raw {
    //! A bare libp2p peer, to act as a stranger or a misbehaving member.
    use super::*;
    use futures::{AsyncWrite, AsyncWriteExt, StreamExt};
    use libp2p::swarm::SwarmEvent;
    use libp2p::{StreamProtocol, identity, request_response};

    /// Writes a length prefix claiming `claimed` bytes, then only a few.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct LyingCodec {
        pub(crate) claimed: u32,
    }

    impl request_response::Codec for LyingCodec {
        type Protocol = StreamProtocol;
        type Request = Vec<u8>;
        type Response = Vec<u8>;

        async fn read_request<T>(
            &mut self,
            _: &StreamProtocol,
            _: &mut T,
        ) -> std::io::Result<Vec<u8>>
        where
            T: futures::AsyncRead + Unpin + Send,
        {
            Ok(vec![])
        }

        async fn read_response<T>(
            &mut self,
            _: &StreamProtocol,
            io: &mut T,
        ) -> std::io::Result<Vec<u8>>
        where
            T: futures::AsyncRead + Unpin + Send,
        {
            let mut out = Vec::new();
            futures::AsyncReadExt::read_to_end(io, &mut out).await?;
            if out.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "stream closed without an answer",
                ));
            }
            Ok(out)
        }

        async fn write_request<T>(
            &mut self,
            _: &StreamProtocol,
            io: &mut T,
            req: Vec<u8>,
        ) -> std::io::Result<()>
        where
            T: AsyncWrite + Unpin + Send,
        {
            io.write_all(&self.claimed.to_be_bytes()).await?;
            io.write_all(&req).await?;
            io.close().await
        }

        async fn write_response<T>(
            &mut self,
            _: &StreamProtocol,
            _: &mut T,
            _: Vec<u8>,
        ) -> std::io::Result<()>
        where
            T: AsyncWrite + Unpin + Send,
        {
            Ok(())
        }
    }

    /// A bare libp2p peer holding `key` that speaks only `protocol`, with
    /// libp2p's default protocol negotiation.
    pub(crate) fn swarm<C>(
        key: identity::Keypair,
        codec: C,
        protocol: &'static str,
    ) -> libp2p::Swarm<request_response::Behaviour<C>>
    where
        C: request_response::Codec<Protocol = StreamProtocol> + Clone + Send + 'static,
    {
        libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                libp2p::tls::Config::new,
                libp2p::yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    codec,
                    [(
                        StreamProtocol::new(protocol),
                        request_response::ProtocolSupport::Full,
                    )],
                    request_response::Config::default(),
                )
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build()
    }

    /// Dials `addr` as `key`, sends one locate request with the codec, and
    /// reports whether any response came back (bounded wait of 10 s).
    pub(crate) async fn try_request(
        key: identity::Keypair,
        target: libp2p::PeerId,
        addr: libp2p::Multiaddr,
        codec: LyingCodec,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let mut swarm = swarm(key, codec, "/careweave/locate/1");
        swarm.add_peer_address(target, addr);
        swarm.behaviour_mut().send_request(&target, body);
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return Err("no answer and no failure within 10 s".into()),
                event = swarm.select_next_some() => match event {
                    SwarmEvent::Behaviour(request_response::Event::Message { message: request_response::Message::Response { response, .. }, .. }) => return Ok(response),
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => return Err(error.to_string()),
                    _ => {}
                }
            }
        }
    }

    pub(crate) fn libp2p_key(pair: &careweave_protocol::KeyPair) -> identity::Keypair {
        let mut secret = pair.secret_bytes();
        identity::Keypair::ed25519_from_bytes(&mut secret).unwrap()
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_not_on_the_list_gets_no_connection_and_no_answer() {
    let mut net = Net::new(&["QHG", "QUE"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let que = start(&net, "QUE", &list).await;
    let qhg = start(&net, "QHG", &list).await;
    eventually("members connected", || async { connected(&que).await == 1 }).await;
    // A stranger sends a well-formed, correctly signed-looking request.
    let now = careweave_node::net::unix_now();
    let body = qhg
        .node
        .prepare_locate(&OdsCode::parse("QUE").unwrap(), &locate_request(), now)
        .unwrap()
        .bytes;
    let stranger = libp2p::identity::Keypair::generate_ed25519();
    let target = libp2p::PeerId::from_bytes(que.node.peer_id().as_bytes()).unwrap();
    let addr = format!("/ip4/127.0.0.1/tcp/{}", net.port("QUE"))
        .parse()
        .unwrap();
    let result = raw::try_request(
        stranger,
        target,
        addr,
        raw::LyingCodec {
            claimed: body.len() as u32,
        },
        body,
    )
    .await;
    assert!(result.is_err(), "a stranger got an answer: {result:?}");
    assert_eq!(connected(&que).await, 1, "only the member stays connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_without_memory_growing_by_its_claim() {
    let mut net = Net::new(&["QHG", "QUE"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let que = start(&net, "QUE", &list).await;
    // QHG's identity (on the list) speaking through a codec that lies about length.
    let target = libp2p::PeerId::from_bytes(que.node.peer_id().as_bytes()).unwrap();
    let addr: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{}", net.port("QUE"))
        .parse()
        .unwrap();
    let before = rss_bytes();
    let refused = || que.node.metrics.frames_too_large.load(Ordering::Relaxed);
    // Send until four are refused for their size. An attempt whose connection
    // QUE refuses before reading a frame (for instance while its own dial to
    // QHG's absent address is pending, decision 0020) is not counted.
    let mut attempts = 0;
    while refused() < 4 && attempts < 16 {
        attempts += 1;
        let result = raw::try_request(
            raw::libp2p_key(&keys("QHG").transport),
            target,
            addr.clone(),
            raw::LyingCodec {
                claimed: 0x7fff_ffff,
            },
            vec![0xd2; 64],
        )
        .await;
        assert!(
            result.is_err(),
            "an oversized frame got an answer: {result:?}"
        );
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(
        grown < 64 * 1024 * 1024,
        "memory grew by {grown} bytes for frames claiming 2 GiB each"
    );
    eventually("the refusals are counted", || async { refused() >= 4 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_rate_gets_busy_answers_and_is_shut_out_if_it_ignores_them() {
    let mut net = Net::new(&["QHG", "QUE"]);
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list).await;
    let now = careweave_node::net::unix_now();
    let mut config = config("QUE", net.addr(net.port("QUE")));
    config.network.peer_rate_per_sec = 1;
    config.network.peer_burst = 2;
    let (que_node, _dir) = ready_node(&net, config, &list);
    let (handle, event_loop) = careweave_node::net::start(
        Arc::clone(&que_node),
        daemon::net_config(&que_node.config).unwrap(),
    )
    .unwrap();
    tokio::spawn(event_loop.run());
    eventually("connected", || async { connected(&qhg).await == 1 }).await;
    let mut busy = 0;
    for _ in 0..6 {
        let request = qhg
            .node
            .prepare_locate(&OdsCode::parse("QUE").unwrap(), &locate_request(), now)
            .unwrap();
        let bytes = qhg
            .handle
            .send_raw(
                ProtocolId::Locate,
                que_node.peer_id(),
                request.bytes.clone(),
            )
            .await
            .unwrap();
        if let Ok(careweave_node::node::LocateAnswer::Refused(e)) =
            qhg.node.accept_locate_response(&request, &bytes, now)
        {
            assert_eq!(e.code, careweave_protocol::message::ErrorCode::Busy);
            assert!(e.retry_after_ms.is_some());
            busy += 1;
        }
    }
    assert!(busy >= 1, "no busy answer past the burst");
    assert!(que_node.metrics.refused().get("busy").copied().unwrap_or(0) >= 1);

    // Ignoring the busy answers is flooding: past the limit the member is
    // shut out, once, audited, and its requests are held unanswered.
    let send = |when: u64| {
        let request = qhg
            .node
            .prepare_locate(&OdsCode::parse("QUE").unwrap(), &locate_request(), when)
            .unwrap();
        qhg.handle
            .send_raw(ProtocolId::Locate, que_node.peer_id(), request.bytes)
    };
    let mut held = false;
    for _ in 0..careweave_node::net::MIN_FLOOD_LIMIT + 10 {
        if send(now).await.is_err() {
            held = true;
            break;
        }
    }
    assert!(held, "the flooding member was never shut out");
    let shed_before = que_node
        .metrics
        .refused()
        .get("flooding")
        .copied()
        .unwrap_or(0);
    let unanswered = futures::future::join_all((0..5).map(|_| send(now))).await;
    assert!(
        unanswered.iter().all(Result::is_err),
        "a shut-out member got an answer: {unanswered:?}"
    );
    assert!(
        que_node
            .metrics
            .refused()
            .get("flooding")
            .copied()
            .unwrap_or(0)
            >= shed_before + 5,
        "held requests are counted"
    );
    assert_eq!(
        que_node.metrics.flooding_shut_outs.load(Ordering::Relaxed),
        1,
        "shut out once for the cool-down"
    );
    // The connection stays up, so the member does not re-dial in a loop.
    assert_eq!(connected(&qhg).await, 1);
    let audited = que_node
        .store
        .audit_entries()
        .map(|item| {
            let (_, bytes, _) = item.unwrap();
            let entry: careweave_node::audit::AuditEntry =
                careweave_protocol::cbor::decode(&bytes, careweave_protocol::cbor::Limits::MESSAGE)
                    .unwrap();
            entry
        })
        .filter(|e| {
            e.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("flooding"))
        })
        .count();
    assert_eq!(audited, 1, "the shutting out is audited once");

    // One that keeps more in flight than are held has its connection closed
    // for the rest of the cool-down.
    let _ = futures::future::join_all((0..300).map(|_| send(now))).await;
    eventually("the connection closed", || async {
        connected(&qhg).await == 0
    })
    .await;

    // After the cool-down (10 s) it reconnects, and a request within its
    // rate is answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(bytes) = send(careweave_node::net::unix_now()).await {
            assert!(!bytes.is_empty());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still shut out 60 s later"
        );
    }
    drop(handle);
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locate_over_quic() {
    let mut net = Net::new(&["QHG", "QUE"]);
    net.quic = true;
    net.ports = vec![
        ("QHG".into(), free_udp_port()),
        ("QUE".into(), free_udp_port()),
    ];
    shift_to_now(&mut net);
    let list = net.list(1, None, &[]);
    let qhg = start(&net, "QHG", &list).await;
    let que = start(&net, "QUE", &list).await;
    load(&que.node);
    eventually("connected over QUIC", || async {
        connected(&qhg).await == 1
    })
    .await;
    let results = qhg.handle.locate(locate_request()).await.unwrap();
    let que = result_for(&results, "QUE");
    assert!(
        matches!(que.outcome, IcbOutcome::Pointers { .. }),
        "{results:?}"
    );
}
