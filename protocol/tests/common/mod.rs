//! A small synthetic network for the protocol's integration tests: a
//! coordinator with three root keys and three list keys (threshold two of
//! each), and ICB members with their four keys, all from fixed seeds.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use careweave_protocol::keys::{KeyPair, PeerIdBytes};
use careweave_protocol::ods::OdsCode;
use careweave_protocol::trust::{
    self, AcceptedList, AcceptedRoot, KeyUse, ListDocument, Member, MemberKey, MemberStatus,
    PeerEntry, Policy, Role, Root, RootDocument, TrustList,
};
use sha2::{Digest, Sha256};

/// 2027-01-15T08:00:00Z: the fixed "now" of the tests.
pub const T0: u64 = 1_800_000_000;
pub const DAY: u64 = 86_400;

/// A key from a fixed seed, so tests and vectors are reproducible.
pub fn key(name: &str) -> KeyPair {
    let seed: [u8; 32] = Sha256::digest(format!("careweave-test-key/{name}")).into();
    KeyPair::from_secret_bytes(&seed)
}

pub struct Node {
    pub ods: OdsCode,
    pub name: String,
    pub transport: KeyPair,
    pub message: KeyPair,
    pub record: KeyPair,
    pub log: KeyPair,
}

impl Node {
    pub fn new(ods: &str, name: &str) -> Self {
        Self {
            ods: OdsCode::parse(ods).unwrap(),
            name: name.to_owned(),
            transport: key(&format!("{ods}/transport")),
            message: key(&format!("{ods}/message")),
            record: key(&format!("{ods}/record")),
            log: key(&format!("{ods}/log")),
        }
    }

    pub fn peer(&self) -> PeerIdBytes {
        self.transport.public_key().peer_id()
    }

    pub fn member(&self) -> Member {
        let k = |pair: &KeyPair, key_use| MemberKey {
            kid: pair.kid(),
            key_use,
            public: pair.public_key(),
            valid_from: T0 - 30 * DAY,
            valid_until: T0 + 365 * DAY,
        };
        Member {
            ods: self.ods.clone(),
            name: self.name.clone(),
            status: MemberStatus::Active,
            roles: vec![Role::Provider, Role::Consumer],
            valid_from: T0 - 30 * DAY,
            valid_until: T0 + 365 * DAY,
            peers: vec![PeerEntry {
                peer_id: self.peer(),
                addrs: vec!["/ip4/127.0.0.1/tcp/7000".to_owned()],
            }],
            keys: vec![
                k(&self.transport, KeyUse::Transport),
                k(&self.message, KeyUse::Message),
                k(&self.record, KeyUse::Record),
                k(&self.log, KeyUse::Log),
            ],
            predecessors: vec![],
            contact: Some("shared-care-records@example.invalid".to_owned()),
        }
    }
}

pub struct Net {
    pub root_keys: Vec<KeyPair>,
    pub list_keys: Vec<KeyPair>,
    pub root: Root,
    pub nodes: Vec<Node>,
}

impl Net {
    /// Three ICBs of the East of England, by their 2022 ODS codes.
    pub fn new() -> Self {
        let root_keys: Vec<_> = (1..=3).map(|i| key(&format!("root/{i}"))).collect();
        let list_keys: Vec<_> = (1..=3).map(|i| key(&format!("list/{i}"))).collect();
        let root = Root {
            network: "careweave-test".to_owned(),
            version: 1,
            issued: T0 - 60 * DAY,
            expires: T0 + 365 * DAY,
            root_keys: root_keys.iter().map(KeyPair::public_key).collect(),
            root_threshold: 2,
            list_keys: list_keys.iter().map(KeyPair::public_key).collect(),
            list_threshold: 2,
            policy: Policy::default(),
        };
        let nodes = vec![
            Node::new("QHG", "NHS Bedfordshire, Luton and Milton Keynes ICB"),
            Node::new("QUE", "NHS Cambridgeshire and Peterborough ICB"),
            Node::new("QM7", "NHS Hertfordshire and West Essex ICB"),
        ];
        Self {
            root_keys,
            list_keys,
            root,
            nodes,
        }
    }

    /// Root version 1, signed by every root key.
    pub fn root_bytes(&self) -> Vec<u8> {
        let mut doc = RootDocument::unsigned(&self.root).unwrap();
        for k in &self.root_keys {
            doc.sign(k).unwrap();
        }
        doc.encode()
    }

    pub fn accepted_root(&self) -> AcceptedRoot {
        trust::accept_first_root(&self.root_bytes(), T0).unwrap()
    }

    pub fn list(&self, seq: u64, prev: Option<[u8; 32]>) -> TrustList {
        TrustList {
            network: self.root.network.clone(),
            seq,
            root_version: self.root.version,
            issued: T0 - DAY,
            expires: T0 + 6 * DAY,
            prev,
            members: self.nodes.iter().map(Node::member).collect(),
            revoked: vec![],
        }
    }

    /// Signs a list with the chosen list keys (by index).
    pub fn sign_list(&self, list: &TrustList, signers: &[usize]) -> Vec<u8> {
        let mut doc = ListDocument::unsigned(list).unwrap();
        for i in signers {
            doc.sign(&self.list_keys[*i], &self.root).unwrap();
        }
        doc.encode()
    }

    /// The root and list seq 1, both accepted.
    pub fn accepted(&self) -> (AcceptedRoot, AcceptedList) {
        let root = self.accepted_root();
        let bytes = self.sign_list(&self.list(1, None), &[0, 1]);
        let list = trust::accept_list(&root, None, &bytes, T0).unwrap();
        (root, list)
    }
}
