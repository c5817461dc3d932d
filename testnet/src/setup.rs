//! Building a testnet on disk and running its node processes.
//!
//! Layout under the testnet directory:
//!
//! ```text
//! testnet.json            what was built: nodes, ports, demo patients
//! coord/                  root.cose, list.cose, keys/ (encrypted, testnet passphrase)
//! api-ca/                 the clinical API's CA; client/ holds a clinician certificate
//! nodes/<ODS>/            config.toml, keys/, store/, trust/, api/, node.log, node.pid
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use careweave_certs::{ca, keystore};
use careweave_node::config;
use careweave_node::daemon::{self, ControlRequest, ControlResponse};
use careweave_node::import::Importer;
use careweave_node::keys::{KEY_USES, NodeKeys};
use careweave_node::store::{PatientFlags, Store};
use careweave_protocol::trust::{
    ListDocument, Member, MemberKey, MemberStatus, PeerEntry, Policy, Role, Root, RootDocument,
    TrustList,
};
use careweave_protocol::{KeyPair, NhsNumber, OdsCode};
use serde_json::{Value, json};

use crate::data::{self, Icb, Rng};

/// The passphrase testnet coordinator keys are encrypted with. Testnets only.
pub const TESTNET_PASSPHRASE: &str = "careweave-testnet-only-passphrase";

/// Problems building or running a testnet.
#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    #[error("{0}")]
    Setup(String),
    #[error("I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TestnetError + '_ {
    move |source| TestnetError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn setup_err(e: impl std::fmt::Display) -> TestnetError {
    TestnetError::Setup(e.to_string())
}

/// Hands out ports for a testnet's listeners. They come from below Linux's
/// ephemeral range (32768 and up), so the outgoing connections of nodes
/// already running cannot take them between now and start-up, and each is
/// held open until the pool is dropped, so no two nodes get the same one.
struct PortPool {
    next: u16,
    held: Vec<std::net::TcpListener>,
}

impl PortPool {
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;

    fn new() -> Self {
        // Start somewhere different each time so testnets built side by
        // side (parallel tests) rarely probe the same ports.
        let spread = u16::try_from(std::process::id() % 1000).unwrap_or(0) * 12;
        Self {
            next: Self::FIRST + spread,
            held: Vec::new(),
        }
    }

    fn take(&mut self) -> Result<u16, TestnetError> {
        for _ in Self::FIRST..Self::LAST {
            let port = self.next;
            self.next = if port >= Self::LAST {
                Self::FIRST
            } else {
                port + 1
            };
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                self.held.push(listener);
                return Ok(port);
            }
        }
        Err(TestnetError::Setup(format!(
            "no free port on 127.0.0.1 between {} and {}",
            Self::FIRST,
            Self::LAST
        )))
    }
}

fn now() -> u64 {
    careweave_node::net::unix_now()
}

/// One node of a built testnet.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub ods: String,
    pub name: String,
    pub dir: PathBuf,
    pub p2p_port: u16,
    pub api_port: u16,
}

impl NodeInfo {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
}

/// The patients the demo talks about.
#[derive(Debug, Clone)]
pub struct DemoPatients {
    /// Records at three ICBs.
    pub shared: NhsNumber,
    /// Objected to sharing at one ICB.
    pub objecting: NhsNumber,
    /// Restricted at one ICB.
    pub restricted: NhsNumber,
}

/// What `build` made.
#[derive(Debug, Clone)]
pub struct Testnet {
    pub dir: PathBuf,
    pub nodes: Vec<NodeInfo>,
    pub demo: DemoPatients,
}

/// Options for building.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub patients_per_icb: u32,
    pub seed: u64,
    pub sharing: SharingMix,
}

/// The sharing agreements a testnet's ICBs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingMix {
    /// Every ICB shares every section nationally.
    National,
    /// A realistic mix: most share nationally, some only with the ICBs of
    /// their NHS region (all sections, or care plans only), and some with
    /// no one outside themselves. The fourth ICB always shares with no one,
    /// so the demo's patient meets one refusal.
    Mixed,
}

impl SharingMix {
    /// `[sharing]` settings for the ICB at `position` in the testnet, with
    /// `all` the reference ICBs (neighbours are drawn from them): the
    /// top-level lines, then any per-section tables.
    pub fn agreement(self, position: usize, icb: &Icb, all: &[Icb]) -> (String, String) {
        let neighbours = || {
            all.iter()
                .filter(|other| other.region == icb.region && other.ods != icb.ods)
                .map(|other| format!("\"{}\"", other.ods))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let national = || ("scope = \"national\"\nicbs = []".to_owned(), String::new());
        let own_only = || ("scope = \"none\"\nicbs = []".to_owned(), String::new());
        match self {
            SharingMix::National => national(),
            SharingMix::Mixed => match position {
                3 => own_only(),
                // An ICB alone in its region has no neighbours to name.
                p if p >= 4 && p % 5 == 4 && neighbours().is_empty() => own_only(),
                p if p >= 4 && p % 5 == 4 => (
                    format!("scope = \"icbs\"\nicbs = [{}]", neighbours()),
                    String::new(),
                ),
                p if p >= 4 && p % 5 == 0 && neighbours().is_empty() => (
                    national().0,
                    "\n[sharing.sections.care-plans]\nscope = \"none\"\n".to_owned(),
                ),
                p if p >= 4 && p % 5 == 0 => (
                    national().0,
                    format!(
                        "\n[sharing.sections.care-plans]\nscope = \"icbs\"\nicbs = [{}]\n",
                        neighbours()
                    ),
                ),
                p if p >= 4 && p % 10 == 7 => own_only(),
                _ => national(),
            },
        }
    }
}

fn member(
    ods: OdsCode,
    predecessors: &[String],
    info: &NodeInfo,
    keys: &NodeKeys,
    now: u64,
) -> Member {
    Member {
        ods,
        name: info.name.clone(),
        status: MemberStatus::Active,
        roles: vec![Role::Provider, Role::Consumer],
        valid_from: now - 86_400,
        valid_until: now + 365 * 86_400,
        peers: vec![PeerEntry {
            peer_id: keys.peer_id(),
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", info.p2p_port)],
        }],
        keys: KEY_USES
            .iter()
            .map(|u| MemberKey {
                kid: keys.get(*u).kid(),
                key_use: *u,
                public: keys.get(*u).public_key(),
                valid_from: now - 86_400,
                valid_until: now + 365 * 86_400,
            })
            .collect(),
        predecessors: predecessors
            .iter()
            .filter_map(|p| OdsCode::parse(p).ok())
            .collect(),
        contact: Some(format!(
            "shared-care-records@{}.testnet.invalid",
            info.ods.to_lowercase()
        )),
    }
}

/// Builds a testnet in `dir`: keys, coordinator, co-signed list, API
/// certificates, configs and synthetic records.
pub fn build(
    dir: &Path,
    icbs: &[Icb],
    options: &Options,
    progress: &dyn Fn(&str),
) -> Result<Testnet, TestnetError> {
    if dir.join("testnet.json").exists() {
        return Err(TestnetError::Setup(format!(
            "{} already holds a testnet; run `careweave-testnet down --dir {}` and remove it first",
            dir.display(),
            dir.display()
        )));
    }
    let all = icbs;
    let icbs: Vec<&Icb> = icbs.iter().take(options.nodes).collect();
    if icbs.len() < options.nodes || options.nodes == 0 {
        return Err(TestnetError::Setup(format!(
            "--nodes must be between 1 and {}",
            icbs.len()
        )));
    }
    std::fs::create_dir_all(dir.join("coord/keys")).map_err(io(dir))?;
    let now = now();

    progress("coordinator: root and list keys");
    let root_keys: Vec<KeyPair> = (0..3)
        .map(|_| keystore::generate())
        .collect::<Result<_, _>>()
        .map_err(setup_err)?;
    let list_keys: Vec<KeyPair> = (0..3)
        .map(|_| keystore::generate())
        .collect::<Result<_, _>>()
        .map_err(setup_err)?;
    for (kind, keys) in [("root", &root_keys), ("list", &list_keys)] {
        for (i, key) in keys.iter().enumerate() {
            keystore::write(
                &dir.join(format!("coord/keys/{kind}-v1-{}.pem", i + 1)),
                key,
                TESTNET_PASSPHRASE,
            )
            .map_err(setup_err)?;
        }
    }
    let root = Root {
        network: "careweave-testnet".into(),
        version: 1,
        issued: now - 3600,
        expires: now + 365 * 86_400,
        root_keys: root_keys.iter().map(KeyPair::public_key).collect(),
        root_threshold: 2,
        list_keys: list_keys.iter().map(KeyPair::public_key).collect(),
        list_threshold: 2,
        policy: Policy::default(),
    };
    let mut root_doc = RootDocument::unsigned(&root).map_err(setup_err)?;
    for key in &root_keys {
        root_doc.sign(key).map_err(setup_err)?;
    }
    let root_bytes = root_doc.encode();
    std::fs::write(dir.join("coord/root.cose"), &root_bytes).map_err(io(dir))?;

    progress("clinical API certificates");
    ca::init(&dir.join("api-ca"), "careweave testnet API CA").map_err(setup_err)?;
    let first = icbs.first().map(|i| i.ods.clone()).unwrap_or_default();
    ca::issue(
        &dir.join("api-ca"),
        &ca::Leaf::Client {
            name: "testnet clinician".into(),
            ods: OdsCode::parse(&first).map_err(setup_err)?,
            admin: true,
        },
        &dir.join("api-ca/client"),
    )
    .map_err(setup_err)?;

    let mut nodes = Vec::new();
    let mut members = Vec::new();
    let mut ports = PortPool::new();
    for (position, icb) in icbs.iter().enumerate() {
        progress(&format!(
            "node {} ({}): keys and configuration",
            icb.ods, icb.name
        ));
        let info = NodeInfo {
            ods: icb.ods.clone(),
            name: icb.name.clone(),
            dir: dir.join("nodes").join(&icb.ods),
            p2p_port: ports.take()?,
            api_port: ports.take()?,
        };
        let keys = NodeKeys::generate().map_err(setup_err)?;
        keys.write_new(&info.dir.join("keys")).map_err(setup_err)?;
        std::fs::create_dir_all(info.dir.join("trust")).map_err(io(&info.dir))?;
        std::fs::write(info.dir.join("trust/root.cose"), &root_bytes).map_err(io(&info.dir))?;
        ca::issue(
            &dir.join("api-ca"),
            &ca::Leaf::Server {
                dns: vec!["localhost".into()],
                ips: vec![[127, 0, 0, 1].into()],
            },
            &info.dir.join("api"),
        )
        .map_err(setup_err)?;
        std::fs::copy(dir.join("api-ca/ca.pem"), info.dir.join("api/ca.pem"))
            .map_err(io(&info.dir))?;
        let ods = OdsCode::parse(&icb.ods).map_err(setup_err)?;
        let (scope, section_tables) = options.sharing.agreement(position, icb, all);
        let text = config::template(&ods, &icb.name)
            .replace("testnet = false", "testnet = true")
            .replace(
                "listen = [\"/ip4/0.0.0.0/tcp/7000\", \"/ip4/0.0.0.0/udp/7000/quic-v1\"]",
                &format!("listen = [\"/ip4/127.0.0.1/tcp/{}\"]", info.p2p_port),
            )
            .replace("# root = \"trust/root.cose\"", "root = \"trust/root.cose\"")
            .replace("# list = \"trust/list.cose\"", "list = \"trust/list.cose\"")
            .replace(
                "# listen = \"0.0.0.0:8443\"",
                &format!("listen = \"127.0.0.1:{}\"", info.api_port),
            )
            .replace("# cert = \"api/cert.pem\"", "cert = \"api/cert.pem\"")
            .replace("# key = \"api/key.pem\"", "key = \"api/key.pem\"")
            .replace(
                "# client_ca = \"api/client-ca.pem\"",
                "client_ca = \"api/ca.pem\"",
            )
            .replace("level = \"info\"", "level = \"warn\"")
            .replace("\nscope = \"none\"\nicbs = []", &format!("\n{scope}"))
            .replace("\n[log]", &format!("{section_tables}\n[log]"));
        std::fs::write(info.config(), text).map_err(io(&info.dir))?;
        members.push(member(ods, &icb.predecessors, &info, &keys, now));
        nodes.push((info, keys));
    }

    progress("coordinator: co-signed trust list");
    let list = TrustList {
        network: root.network.clone(),
        seq: 1,
        root_version: 1,
        issued: now - 60,
        expires: now + 7 * 86_400,
        prev: None,
        members,
        revoked: vec![],
    };
    let mut list_doc = ListDocument::unsigned(&list).map_err(setup_err)?;
    for key in list_keys.iter().take(2) {
        list_doc.sign(key, &root).map_err(setup_err)?;
    }
    let list_bytes = list_doc.encode();
    std::fs::write(dir.join("coord/list.cose"), &list_bytes).map_err(io(dir))?;
    for (info, _) in &nodes {
        std::fs::write(info.dir.join("trust/list.cose"), &list_bytes).map_err(io(&info.dir))?;
    }

    // Synthetic patients: each ICB has its own; about a fifth also have
    // records at the next ICB; the demo's patients have fixed roles.
    let mut rng = Rng::new(options.seed);
    let demo = DemoPatients {
        shared: data::nhs_number(0),
        objecting: data::nhs_number(10),
        restricted: data::nhs_number(20),
    };
    let count = nodes.len();
    let mut per_node: Vec<Vec<Value>> = vec![Vec::new(); count];
    // A few restricted patients and a few objections at their home ICB.
    let mut flagged: Vec<Vec<(NhsNumber, PatientFlags)>> = vec![Vec::new(); count];
    let mut offset = 100u32;
    for home in 0..count {
        let ods = nodes
            .get(home)
            .map(|(i, _)| i.ods.clone())
            .unwrap_or_default();
        for _ in 0..options.patients_per_icb {
            let patient = data::patient(&mut rng, data::nhs_number(offset));
            offset += 13;
            let records = data::records(&mut rng, &patient, &ods);
            if let Some(list) = per_node.get_mut(home) {
                list.extend(records);
            }
            let flags = match rng.below(40) {
                0 => Some(PatientFlags {
                    restricted: true,
                    ..PatientFlags::default()
                }),
                1 => Some(PatientFlags {
                    objected: true,
                    objection: Some("synthetic objection".into()),
                    ..PatientFlags::default()
                }),
                _ => None,
            };
            if let (Some(flags), Some(list)) = (flags, flagged.get_mut(home)) {
                list.push((patient.nhs, flags));
            }
            if rng.below(5) == 0 && count > 1 {
                let other = (home + 1) % count;
                let other_ods = nodes
                    .get(other)
                    .map(|(i, _)| i.ods.clone())
                    .unwrap_or_default();
                let records = data::records(&mut rng, &patient, &other_ods);
                if let Some(list) = per_node.get_mut(other) {
                    list.extend(records);
                }
            }
        }
    }
    // The demo's patients: the shared one at three ICBs other than the first.
    for (i, (info, _)) in nodes.iter().enumerate() {
        let mut add = |nhs: NhsNumber| {
            let patient = data::patient(&mut rng, nhs);
            let records = data::records(&mut rng, &patient, &info.ods);
            if let Some(list) = per_node.get_mut(i) {
                list.extend(records);
            }
        };
        if (1..=3).contains(&i) {
            add(demo.shared);
        }
        if i == 1 {
            add(demo.objecting);
        }
        if i == 2 {
            add(demo.restricted);
        }
    }
    for (i, (info, keys)) in nodes.iter().enumerate() {
        progress(&format!("node {}: importing synthetic records", info.ods));
        let loaded = config::load(&info.config(), []).map_err(setup_err)?;
        let store = Store::open(
            &loaded.store_dir(),
            loaded.config.store.cache_mb * 1024 * 1024,
        )
        .map_err(setup_err)?;
        let resources = per_node.get(i).cloned().unwrap_or_default();
        let bytes = serde_json::to_vec(&data::bundle(resources)).map_err(setup_err)?;
        let (report, _, _) = Importer {
            store: &store,
            record_key: &keys.record,
            custodian: &loaded.config.node.ods,
            config: &loaded.config,
            now,
        }
        .import_bytes("synthetic", &bytes, &mut |_, _| {})
        .map_err(setup_err)?;
        if !report.rejected.is_empty() {
            return Err(TestnetError::Setup(format!(
                "synthetic data rejected at {}: {:?}",
                info.ods,
                report.rejected.first()
            )));
        }
        for (nhs, flags) in flagged.get(i).into_iter().flatten() {
            store.set_flags(nhs, flags).map_err(setup_err)?;
        }
        if i == 1 {
            store
                .set_flags(
                    &demo.objecting,
                    &PatientFlags {
                        objected: true,
                        objection: Some("asked at the practice".into()),
                        ..PatientFlags::default()
                    },
                )
                .map_err(setup_err)?;
        }
        if i == 2 {
            store
                .set_flags(
                    &demo.restricted,
                    &PatientFlags {
                        restricted: true,
                        ..PatientFlags::default()
                    },
                )
                .map_err(setup_err)?;
        }
        // The node process opens this store as soon as the testnet starts.
        store.close(Duration::from_secs(10)).map_err(setup_err)?;
    }
    let testnet = Testnet {
        dir: dir.to_path_buf(),
        nodes: nodes.into_iter().map(|(i, _)| i).collect(),
        demo,
    };
    save(&testnet)?;
    Ok(testnet)
}

fn save(t: &Testnet) -> Result<(), TestnetError> {
    let value = json!({
        "nodes": t.nodes.iter().map(|n| json!({"ods": n.ods, "name": n.name, "p2p_port": n.p2p_port, "api_port": n.api_port})).collect::<Vec<_>>(),
        "demo": {"shared": t.demo.shared.digits(), "objecting": t.demo.objecting.digits(), "restricted": t.demo.restricted.digits()},
    });
    let path = t.dir.join("testnet.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&value).map_err(setup_err)?).map_err(io(&path))
}

/// Reads what `build` wrote.
// serde_json's `Value[&str]` answers Null for anything missing; it never panics.
#[allow(clippy::indexing_slicing)]
pub fn load(dir: &Path) -> Result<Testnet, TestnetError> {
    let path = dir.join("testnet.json");
    let text = std::fs::read_to_string(&path).map_err(|_| {
        TestnetError::Setup(format!(
            "no testnet in {} (run `careweave-testnet up --dir {}`)",
            dir.display(),
            dir.display()
        ))
    })?;
    let v: Value = serde_json::from_str(&text).map_err(setup_err)?;
    let nhs = |k: &str| NhsNumber::parse(v["demo"][k].as_str().unwrap_or("")).map_err(setup_err);
    let nodes = v["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| NodeInfo {
                    ods: n["ods"].as_str().unwrap_or("").to_owned(),
                    name: n["name"].as_str().unwrap_or("").to_owned(),
                    dir: dir.join("nodes").join(n["ods"].as_str().unwrap_or("")),
                    p2p_port: u16::try_from(n["p2p_port"].as_u64().unwrap_or(0)).unwrap_or(0),
                    api_port: u16::try_from(n["api_port"].as_u64().unwrap_or(0)).unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Testnet {
        dir: dir.to_path_buf(),
        nodes,
        demo: DemoPatients {
            shared: nhs("shared")?,
            objecting: nhs("objecting")?,
            restricted: nhs("restricted")?,
        },
    })
}

/// Starts every node as its own process (`<this program> node-run`).
pub fn start_all(t: &Testnet) -> Result<(), TestnetError> {
    for node in &t.nodes {
        start_node(node)?;
    }
    Ok(())
}

/// Starts one node's process.
pub fn start_one(node: &NodeInfo) -> Result<(), String> {
    start_node(node).map_err(|e| e.to_string())
}

fn start_node(node: &NodeInfo) -> Result<(), TestnetError> {
    let exe = std::env::current_exe().map_err(setup_err)?;
    {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("node.log"))
            .map_err(io(&node.dir))?;
        let child = Command::new(&exe)
            .arg("node-run")
            .arg("--config")
            .arg(node.config())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io(&exe))?;
        std::fs::write(node.dir.join("node.pid"), child.id().to_string()).map_err(io(&node.dir))?;
    }
    Ok(())
}

/// Asks a node for its status through its control socket.
pub async fn node_status(node: &NodeInfo) -> Option<(usize, bool)> {
    let socket = node.dir.join("control.sock");
    if !socket.exists() {
        return None;
    }
    match daemon::control(&socket, &ControlRequest::Status)
        .await
        .ok()?
    {
        ControlResponse::Status {
            connected, ready, ..
        } => Some((connected, ready)),
        _ => None,
    }
}

/// Waits until every node is ready and connected to every other, at most `limit`.
pub async fn wait_connected(t: &Testnet, limit: Duration) -> Result<(), TestnetError> {
    let want = t.nodes.len().saturating_sub(1);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut laggards = Vec::new();
        for node in &t.nodes {
            match node_status(node).await {
                Some((connected, true)) if connected >= want => {}
                other => laggards.push(format!(
                    "{} ({})",
                    node.ods,
                    other.map_or("not started".to_owned(), |(c, r)| format!(
                        "{c} peers, ready {r}"
                    ))
                )),
            }
        }
        if laggards.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TestnetError::Setup(format!(
                "nodes did not come up in time: {}; see nodes/*/node.log",
                laggards.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops every node: SIGTERM, then SIGKILL after a grace period. Safe to run
/// after an interrupted `up` and more than once.
pub fn stop_all(dir: &Path) -> usize {
    let mut stopped = 0;
    let Ok(entries) = std::fs::read_dir(dir.join("nodes")) else {
        return 0;
    };
    for entry in entries.flatten() {
        let pid_file = entry.path().join("node.pid");
        let Ok(pid) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        let pid = pid.trim().to_owned();
        if pid.parse::<u32>().is_err() {
            let _ = std::fs::remove_file(&pid_file);
            continue;
        }
        if is_running(&pid) {
            let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
            for _ in 0..50 {
                if !is_running(&pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if is_running(&pid) {
                let _ = Command::new("kill").arg("-KILL").arg(&pid).status();
            }
            stopped += 1;
        }
        let _ = std::fs::remove_file(&pid_file);
    }
    stopped
}

/// Whether a process is alive (exists and is not a zombie awaiting its parent).
pub fn is_running(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn is_zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}
