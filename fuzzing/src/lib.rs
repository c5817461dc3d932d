//! Fuzz targets for everything careweave parses from outside: COSE
//! envelopes, every message payload, trust roots and lists, custodian-signed
//! records, FHIR imports and the clinical API's request headers. Each target takes arbitrary bytes and must
//! return without panicking, hanging or allocating beyond its limits,
//! whatever they hold.
//!
//! The targets are run two ways. `fuzzing/run` drives them with libFuzzer
//! (`cargo fuzz`, coverage-guided) for as long as asked. `tests/corpus.rs`
//! replays the seed corpora in `fuzzing/corpus/` and every input that ever
//! crashed a target on each `cargo test`.
//!
//! ```
//! // A target is a plain function of bytes.
//! careweave_fuzzing::payload(b"\x00\xa1\x61x\x01");
//! assert!(careweave_fuzzing::TARGETS.iter().any(|(name, _)| *name == "trust"));
//! ```

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use careweave_node::config::{self, NodeConfig};
use careweave_node::import::Importer;
use careweave_node::store::Store;
use careweave_protocol::cbor::Limits;
use careweave_protocol::envelope::{self, ProtocolId, Receive, Seal};
use careweave_protocol::keys::{KeyPair, PeerIdBytes};
use careweave_protocol::message::{LocateRequest, MessageKind, Purpose, RequesterContext};
use careweave_protocol::record::{self, RecordLabel};
use careweave_protocol::trust::{
    self, AcceptedList, AcceptedRoot, KeyUse, ListDocument, Member, MemberKey, MemberStatus,
    PeerEntry, Policy, Role, Root, RootDocument, TrustList,
};
use careweave_protocol::{NhsNumber, OdsCode};
use sha2::{Digest, Sha256};

/// A fuzz target: returns whether the input was accepted.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name, as `fuzzing/run` and the corpus test know them.
/// Each returns whether the input was accepted, so tests can tell that the
/// seeds reach past the first check.
pub const TARGETS: &[(&str, Target)] = &[
    ("envelope", envelope),
    ("payload", payload),
    ("trust", trust),
    ("record", record),
    ("import", import),
    ("api", api),
];

/// The fixture's clock: inside every key's and list's validity window.
const NOW: u64 = 1_800_000_000;
const DAY: u64 = 86_400;
/// The ICB the fixture's messages come from, and the one they go to.
const SENDER: &str = "QHG";
const RECEIVER: &str = "QUE";

fn key(name: &str) -> KeyPair {
    KeyPair::from_secret_bytes(&Sha256::digest(format!("careweave-fuzzing/{name}")).into())
}

fn member(ods: &OdsCode) -> Member {
    let keyed = |key_use: KeyUse, name: &str| {
        let pair = key(&format!("{ods}/{name}"));
        MemberKey {
            kid: pair.kid(),
            key_use,
            public: pair.public_key(),
            valid_from: NOW - 400 * DAY,
            valid_until: NOW + 400 * DAY,
        }
    };
    Member {
        ods: ods.clone(),
        name: format!("NHS {ods} ICB"),
        status: MemberStatus::Active,
        roles: vec![Role::Provider, Role::Consumer],
        valid_from: NOW - 400 * DAY,
        valid_until: NOW + 400 * DAY,
        peers: vec![PeerEntry {
            peer_id: key(&format!("{ods}/transport")).public_key().peer_id(),
            addrs: vec!["/ip4/127.0.0.1/tcp/7000".into()],
        }],
        keys: vec![
            keyed(KeyUse::Transport, "transport"),
            keyed(KeyUse::Message, "message"),
            keyed(KeyUse::Record, "record"),
            keyed(KeyUse::Log, "log"),
        ],
        predecessors: vec![],
        contact: None,
    }
}

/// A two-member network signed by a one-key coordinator, and a store.
struct Fixture {
    sender: OdsCode,
    receiver: OdsCode,
    root_bytes: Vec<u8>,
    list_bytes: Vec<u8>,
    root: AcceptedRoot,
    list: AcceptedList,
    config: NodeConfig,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn build() -> Option<Self> {
        let sender = OdsCode::parse(SENDER).ok()?;
        let receiver = OdsCode::parse(RECEIVER).ok()?;
        let (root_key, list_key) = (key("root"), key("list"));
        let root = Root {
            network: "careweave-fuzzing".into(),
            version: 1,
            issued: NOW - 60 * DAY,
            expires: NOW + 365 * DAY,
            root_keys: vec![root_key.public_key()],
            root_threshold: 1,
            list_keys: vec![list_key.public_key()],
            list_threshold: 1,
            policy: Policy::default(),
        };
        let mut root_doc = RootDocument::unsigned(&root).ok()?;
        root_doc.sign(&root_key).ok()?;
        let root_bytes = root_doc.encode();
        let list = TrustList {
            network: root.network.clone(),
            seq: 1,
            root_version: 1,
            issued: NOW - DAY,
            expires: NOW + 6 * DAY,
            prev: None,
            members: vec![member(&sender), member(&receiver)],
            revoked: vec![],
        };
        let mut list_doc = ListDocument::unsigned(&list).ok()?;
        list_doc.sign(&list_key, &root).ok()?;
        let list_bytes = list_doc.encode();
        let accepted_root = trust::accept_first_root(&root_bytes, NOW).ok()?;
        let accepted_list = trust::accept_list(&accepted_root, None, &list_bytes, NOW).ok()?;
        let dir = tempfile::tempdir().ok()?;
        let config_path = dir.path().join("config.toml");
        let text = config::template(&receiver, "NHS QUE ICB")
            .replace("\nscope = \"none\"", "\nscope = \"national\"");
        std::fs::write(&config_path, text).ok()?;
        let config = config::load(&config_path, []).ok()?.config;
        let store = Store::open(&dir.path().join("store"), 4 << 20).ok()?;
        Some(Self {
            sender,
            receiver,
            root_bytes,
            list_bytes,
            root: accepted_root,
            list: accepted_list,
            config,
            store,
            _dir: dir,
        })
    }

    fn peer(ods: &OdsCode) -> PeerIdBytes {
        key(&format!("{ods}/transport")).public_key().peer_id()
    }
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::build).as_ref()
}

/// Maps a selector byte onto one of `items`.
fn pick<T: Copy>(selector: u8, items: &[T]) -> Option<T> {
    items
        .get(usize::from(selector) % items.len().max(1))
        .copied()
}

const PROTOCOLS: [ProtocolId; 3] = [ProtocolId::Locate, ProtocolId::Fetch, ProtocolId::Trust];

/// A COSE envelope, checked as a node receiving it from an authenticated
/// member's connection would (`docs/protocol.md` §7). The first byte picks
/// the protocol.
pub fn envelope(data: &[u8]) -> bool {
    let (Some(f), Some((&selector, bytes))) = (fixture(), data.split_first()) else {
        return false;
    };
    let Some(protocol) = pick(selector, &PROTOCOLS) else {
        return false;
    };
    let policy = f.root.root().policy;
    let (local_peer, remote_peer) = (Fixture::peer(&f.receiver), Fixture::peer(&f.sender));
    let ctx = Receive {
        trust: &f.list,
        policy: &policy,
        protocol,
        local_ods: &f.receiver,
        local_peer: &local_peer,
        remote_peer: &remote_peer,
        now: NOW,
        max_bytes: 64 * 1024,
    };
    envelope::open(bytes, &ctx, |_, _, _| false).is_ok()
}

/// A message payload of the kind the first byte picks, decoded and
/// validated as it would be once its envelope's signature held.
pub fn payload(data: &[u8]) -> bool {
    let Some((&selector, bytes)) = data.split_first() else {
        return false;
    };
    pick(selector, &MessageKind::ALL)
        .is_some_and(|kind| envelope::decode_payload(kind, bytes, Limits::MESSAGE).is_ok())
}

/// A trust root (as a node's first, and as the fixture root's successor),
/// then a trust list under the fixture's root, with and without the
/// fixture's list held.
pub fn trust(data: &[u8]) -> bool {
    let first = trust::accept_first_root(data, NOW).is_ok();
    let Some(f) = fixture() else { return first };
    let next = trust::accept_next_root(&f.root, data, NOW).is_ok();
    let fresh = trust::accept_list(&f.root, None, data, NOW).is_ok();
    let after = trust::accept_list(&f.root, Some(&f.list), data, NOW).is_ok();
    first || next || fresh || after
}

/// A custodian-signed record, verified against the fixture's list.
pub fn record(data: &[u8]) -> bool {
    fixture().is_some_and(|f| record::verify_record(data, &f.list).is_ok())
}

/// A FHIR import file (Bundle or NDJSON), imported into the fixture's store.
pub fn import(data: &[u8]) -> bool {
    let Some(f) = fixture() else { return false };
    let record_key = key(&format!("{}/record", f.receiver));
    let importer = Importer {
        store: &f.store,
        record_key: &record_key,
        custodian: &f.receiver,
        config: &f.config,
        now: NOW,
    };
    importer
        .import_bytes("fuzz", data, &mut |_, _| {})
        .is_ok_and(|(report, _, _)| report.rejected.is_empty() && !report.transaction_aborted)
}

/// The clinical API's request headers (`Name: value` lines) and, after the
/// first NUL byte, a `subject:identifier` search value.
pub fn api(data: &[u8]) -> bool {
    let (headers, identifier) = match data.iter().position(|b| *b == 0) {
        Some(nul) => (
            data.get(..nul).unwrap_or_default(),
            data.get(nul + 1..).unwrap_or_default(),
        ),
        None => (data, &[][..]),
    };
    let identifier = String::from_utf8_lossy(identifier);
    let (context, nhs) = careweave_node::api::parse_clinical_request(headers, &identifier);
    context && nhs
}

/// Valid inputs for each target, from which fuzzing starts.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    let Some(f) = fixture() else {
        return seeds;
    };
    let Ok(nhs) = NhsNumber::parse("9990000018") else {
        return seeds;
    };
    let request = LocateRequest {
        nhs_number: nhs,
        context: RequesterContext {
            organisation: f.sender.clone(),
            user_id: "555021935107".into(),
            role_profile_id: "555021936108".into(),
            role_code: "R8000".into(),
            purpose: Purpose::Treat,
            relationship: "direct-care".into(),
            break_glass_reason: None,
            request_id: "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f".into(),
            correlation_id: None,
        },
        sections: None,
    };
    let message_key = key(&format!("{}/message", f.sender));
    let (sender_peer, receiver_peer) = (Fixture::peer(&f.sender), Fixture::peer(&f.receiver));
    let sealed = envelope::seal(
        &request,
        &Seal {
            key: &message_key,
            protocol: ProtocolId::Locate,
            sender_ods: &f.sender,
            receiver_ods: &f.receiver,
            sender_peer: &sender_peer,
            receiver_peer: &receiver_peer,
            trust_seq: 1,
            now: NOW,
            lifetime_secs: 60,
            cti: [7; 16],
            request_hash: None,
        },
    );
    if let Ok(sealed) = sealed {
        let mut input = vec![0u8];
        input.extend_from_slice(&sealed);
        seeds.push(("envelope", input));
    }
    if let Ok(cbor) = careweave_protocol::cbor::encode(&request) {
        let mut input = vec![0u8];
        input.extend_from_slice(&cbor);
        seeds.push(("payload", input));
    }
    seeds.push((
        "api",
        b"X-Request-ID: 6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f\n\
NHSD-End-User-Organisation-ODS: QHG\n\
NHSD-User-ID: 555021935107\n\
NHSD-Session-URID: 555021936108\n\
NHSD-Role-Code: R8000\n\
NHSD-Purpose-Of-Use: ETREAT\n\
NHSD-Break-Glass-Reason: unconscious patient in ED\n\
\0https://fhir.nhs.uk/Id/nhs-number|9990000018"
            .to_vec(),
    ));
    seeds.push(("trust", f.root_bytes.clone()));
    seeds.push(("trust", f.list_bytes.clone()));
    let json = serde_json::json!({
        "resourceType": "Condition",
        "id": "c1",
        "meta": {"versionId": "1"},
        "subject": {"identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}]},
    });
    if let Ok(bytes) = serde_json::to_vec(&json) {
        let label = RecordLabel {
            custodian: f.sender.clone(),
            nhs_number: nhs,
            signed_at: NOW,
            resource_type: "Condition".into(),
            resource_id: "c1".into(),
            version: "1".into(),
        };
        let record_key = key(&format!("{}/record", f.sender));
        if let Ok(signed) = record::sign_record(&bytes, &label, &record_key) {
            seeds.push(("record", signed));
        }
        let bundle = serde_json::json!({
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": json}],
        });
        if let Ok(bundle) = serde_json::to_vec(&bundle) {
            seeds.push(("import", bundle));
        }
        let mut ndjson = bytes;
        ndjson.push(b'\n');
        seeds.push(("import", ndjson));
    }
    seeds
}
