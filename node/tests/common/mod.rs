//! Two or three ICB nodes with real keys, stores in temporary directories and
//! a signed trust list, for end-to-end tests without a network.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use careweave_node::config::{self, NodeConfig};
use careweave_node::import::Importer;
use careweave_node::keys::NodeKeys;
use careweave_node::node::Node;
use careweave_node::store::Store;
use careweave_protocol::OdsCode;
use careweave_protocol::keys::KeyPair;
use careweave_protocol::message::{Purpose, RequesterContext};
use careweave_protocol::trust::{
    KeyUse, ListDocument, Member, MemberKey, MemberStatus, PeerEntry, Policy, Revocation, Role,
    Root, RootDocument, TrustList,
};
use sha2::{Digest, Sha256};

pub const T0: u64 = 1_800_000_000;
pub const DAY: u64 = 86_400;

pub fn key(name: &str) -> KeyPair {
    KeyPair::from_secret_bytes(&Sha256::digest(format!("careweave-node-test/{name}")).into())
}

pub fn keys(ods: &str) -> NodeKeys {
    NodeKeys {
        transport: key(&format!("{ods}/transport")),
        message: key(&format!("{ods}/message")),
        record: key(&format!("{ods}/record")),
        log: key(&format!("{ods}/log")),
    }
}

pub fn member(ods: &str, roles: Vec<Role>) -> Member {
    member_at(ods, roles, "/ip4/127.0.0.1/tcp/7000")
}

pub fn member_at(ods: &str, roles: Vec<Role>, addr: &str) -> Member {
    let k = keys(ods);
    let mk = |pair: &KeyPair, key_use| MemberKey {
        kid: pair.kid(),
        key_use,
        public: pair.public_key(),
        valid_from: T0 - 400 * DAY,
        valid_until: T0 + 400 * DAY,
    };
    Member {
        ods: OdsCode::parse(ods).unwrap(),
        name: format!("NHS {ods} ICB"),
        status: MemberStatus::Active,
        roles,
        valid_from: T0 - 400 * DAY,
        valid_until: T0 + 400 * DAY,
        peers: vec![PeerEntry {
            peer_id: k.peer_id(),
            addrs: vec![addr.into()],
        }],
        keys: vec![
            mk(&k.transport, KeyUse::Transport),
            mk(&k.message, KeyUse::Message),
            mk(&k.record, KeyUse::Record),
            mk(&k.log, KeyUse::Log),
        ],
        predecessors: vec![],
        contact: Some("scr-team@example.invalid".into()),
    }
}

pub struct Coordinator {
    pub root_key: KeyPair,
    pub list_key: KeyPair,
    pub root: Root,
    /// The moment lists are issued around (T0 unless set).
    pub at: Option<u64>,
}

impl Coordinator {
    pub fn new() -> Self {
        let root_key = key("root");
        let list_key = key("list");
        let root = Root {
            network: "careweave-test".into(),
            version: 1,
            issued: T0 - 60 * DAY,
            expires: T0 + 365 * DAY,
            root_keys: vec![root_key.public_key()],
            root_threshold: 1,
            list_keys: vec![list_key.public_key()],
            list_threshold: 1,
            policy: Policy::default(),
        };
        Self {
            root_key,
            list_key,
            root,
            at: None,
        }
    }

    pub fn root_bytes(&self) -> Vec<u8> {
        let mut doc = RootDocument::unsigned(&self.root).unwrap();
        doc.sign(&self.root_key).unwrap();
        doc.encode()
    }

    pub fn list_bytes(
        &self,
        seq: u64,
        prev: Option<[u8; 32]>,
        members: Vec<Member>,
        revoked: Vec<Revocation>,
    ) -> Vec<u8> {
        let list = TrustList {
            network: self.root.network.clone(),
            seq,
            root_version: 1,
            issued: self.at.unwrap_or(T0) - DAY,
            expires: self.at.unwrap_or(T0) + 6 * DAY,
            prev,
            members,
            revoked,
        };
        let mut doc = ListDocument::unsigned(&list).unwrap();
        doc.sign(&self.list_key, &self.root).unwrap();
        doc.encode()
    }
}

pub fn config(ods: &str) -> NodeConfig {
    let text = config::template(&OdsCode::parse(ods).unwrap(), &format!("NHS {ods} ICB"))
        .replace("testnet = false", "testnet = true")
        .replace("\nscope = \"none\"", "\nscope = \"national\"")
        .replace(
            "checkpoint_every_entries = 100",
            "checkpoint_every_entries = 3",
        );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    config::load(&path, []).unwrap().config
}

pub struct TestNode {
    pub node: Node,
    pub dir: tempfile::TempDir,
}

pub fn open(ods: &str, coordinator: &Coordinator, list: &[u8]) -> TestNode {
    open_with(config(ods), coordinator, list)
}

/// A node opened with `config`, its root and list installed.
pub fn open_with(config: NodeConfig, coordinator: &Coordinator, list: &[u8]) -> TestNode {
    let ods = config.node.ods.to_string();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store"), 4 << 20).unwrap();
    let node = Node::new(config, keys(&ods), store, T0).unwrap();
    node.install_root(&coordinator.root_bytes(), T0).unwrap();
    node.install_list(list, T0).unwrap();
    TestNode { node, dir }
}

/// QHG and QUE, both providers and consumers; QM7 a consumer only.
pub fn network() -> (Coordinator, Vec<u8>) {
    let coordinator = Coordinator::new();
    let both = vec![Role::Provider, Role::Consumer];
    let list = coordinator.list_bytes(
        1,
        None,
        vec![
            member("QHG", both.clone()),
            member("QUE", both),
            member("QM7", vec![Role::Consumer]),
        ],
        vec![],
    );
    (coordinator, list)
}

pub fn context(purpose: Purpose) -> RequesterContext {
    RequesterContext {
        organisation: OdsCode::parse("QHG").unwrap(),
        user_id: "555021935107".into(),
        role_profile_id: "555021936108".into(),
        role_code: "R8000".into(),
        purpose,
        relationship: "direct-care".into(),
        break_glass_reason: (purpose == Purpose::EmergencyTreat)
            .then(|| "Unconscious patient in the emergency department".into()),
        request_id: "60ef4f6e-1d35-4ec4-9b8e-7f5b1f2e9c1a".into(),
        correlation_id: None,
    }
}

pub const BUNDLE: &str = include_str!("../data/multi-section.json");

/// Imports [`BUNDLE`] into `node` as of a day before T0: nine records for
/// 999 000 0018.
pub fn load_bundle(node: &Node) {
    let importer = Importer {
        store: &node.store,
        record_key: &node.keys.record,
        custodian: node.ods(),
        config: &node.config,
        now: T0 - DAY,
    };
    let (report, _, _) = importer
        .import_bytes("multi-section.json", BUNDLE.as_bytes(), &mut |_, _| {})
        .unwrap();
    assert_eq!(report.stored, 9, "{report:?}");
}

/// The i-th synthetic NHS number (999 000 0000 onwards, valid check digit).
pub fn nhs_for(i: usize) -> String {
    let mut n = 9_990_000_000u64 / 10 + i as u64;
    loop {
        let digits: Vec<u64> = n.to_string().bytes().map(|b| u64::from(b - b'0')).collect();
        let sum: u64 = digits
            .iter()
            .enumerate()
            .map(|(k, d)| d * (10 - k as u64))
            .sum();
        let check = 11 - sum % 11;
        if check == 10 {
            n += 1;
            continue;
        }
        return format!("{n}{}", if check == 11 { 0 } else { check });
    }
}
