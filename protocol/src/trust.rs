//! Trust roots and trust lists, and the rules for accepting them.
//!
//! The design follows TUF and X-Road: a root names the keys that may sign
//! the next root and the keys that may sign trust lists, each with a
//! threshold; roots rotate one version at a time, signed by a threshold of
//! both the old and the new root keys; lists are short-lived, strictly
//! increasing in `seq`, chained by hash, and refused when expired, so a node
//! fails closed rather than trusting stale membership.
//!
//! ```
//! use careweave_protocol::keys::KeyPair;
//! use careweave_protocol::trust::{Policy, Root, RootDocument};
//!
//! let root_key = KeyPair::from_secret_bytes(&[1; 32]);
//! let list_key = KeyPair::from_secret_bytes(&[2; 32]);
//! let root = Root {
//!     network: "careweave-test".into(),
//!     version: 1,
//!     issued: 1_800_000_000,
//!     expires: 1_800_000_000 + 365 * 86_400,
//!     root_keys: vec![root_key.public_key()],
//!     root_threshold: 1,
//!     list_keys: vec![list_key.public_key()],
//!     list_threshold: 1,
//!     policy: Policy::default(),
//! };
//! let mut doc = RootDocument::unsigned(&root)?;
//! doc.sign(&root_key)?;
//! let accepted = careweave_protocol::trust::accept_first_root(&doc.encode(), 1_800_000_100)?;
//! assert_eq!(accepted.root().version, 1);
//! # Ok::<(), careweave_protocol::trust::TrustError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cbor::{self, CborError, Limits};
use crate::cose::{CoseError, Sign};
use crate::keys::{KeyId, KeyPair, PeerIdBytes, PublicKey};
use crate::ods::OdsCode;

/// Content type of a signed trust root.
pub const ROOT_CONTENT_TYPE: &str = "application/careweave-trust-root+cbor";
/// Content type of a signed trust list.
pub const LIST_CONTENT_TYPE: &str = "application/careweave-trust-list+cbor";
/// Longest a trust list may be valid: 14 days.
pub const MAX_LIST_VALIDITY_SECS: u64 = 14 * 86_400;
/// Longest name, address, reason or contact text in a trust document.
pub const MAX_TEXT: usize = 512;

/// Network-wide values set by the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// How far a message's `iat` may be from the receiver's clock.
    pub max_clock_skew_secs: u64,
    /// Longest a message may live (`exp - iat`).
    pub max_message_life_secs: u64,
    /// Longest a trust list may be valid (`expires - issued`), at most 14 days.
    pub max_list_validity_secs: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_clock_skew_secs: 300,
            max_message_life_secs: 300,
            max_list_validity_secs: MAX_LIST_VALIDITY_SECS,
        }
    }
}

/// A trust root: who may sign roots and lists, and the network's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    pub network: String,
    pub version: u64,
    pub issued: u64,
    pub expires: u64,
    pub root_keys: Vec<PublicKey>,
    pub root_threshold: u32,
    pub list_keys: Vec<PublicKey>,
    pub list_threshold: u32,
    pub policy: Policy,
}

/// Whether a member may answer requests, ask them, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Holds records and answers locate and fetch.
    Provider,
    /// Asks locate and fetch on behalf of its clinicians.
    Consumer,
}

/// Whether a member is in service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberStatus {
    Active,
    /// Temporarily out: its connections are dropped and its messages refused,
    /// but its record keys still verify records it signed.
    Suspended,
}

/// What a member's key is for. Each use has its own key so they rotate
/// separately and a leak of one is contained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyUse {
    /// libp2p identity; the PeerId comes from it.
    Transport,
    /// Signs requests and responses.
    Message,
    /// Signs records at ingest.
    Record,
    /// Signs audit checkpoints.
    Log,
}

/// One of a member's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberKey {
    pub kid: KeyId,
    #[serde(rename = "use")]
    pub key_use: KeyUse,
    pub public: PublicKey,
    pub valid_from: u64,
    pub valid_until: u64,
}

/// A PeerId and where to dial it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub peer_id: PeerIdBytes,
    /// libp2p multiaddrs as text, e.g. `/ip4/127.0.0.1/tcp/7000`.
    pub addrs: Vec<String>,
}

/// One authorised ICB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub ods: OdsCode,
    pub name: String,
    pub status: MemberStatus,
    pub roles: Vec<Role>,
    pub valid_from: u64,
    pub valid_until: u64,
    pub peers: Vec<PeerEntry>,
    pub keys: Vec<MemberKey>,
    /// ODS codes this ICB succeeded (merges); records those ICBs signed
    /// verify under this member's record keys.
    pub predecessors: Vec<OdsCode>,
    /// Contact for the member's shared care records team.
    pub contact: Option<String>,
}

impl Member {
    /// Whether the member is active and inside its validity window at `now`.
    pub fn is_active_at(&self, now: u64) -> bool {
        self.status == MemberStatus::Active && self.valid_from <= now && now <= self.valid_until
    }

    /// Whether the member has the role.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// A revoked key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub kid: KeyId,
    pub ods: OdsCode,
    pub revoked_at: u64,
    pub reason: String,
    /// When known, the earliest moment the key may have been in other hands.
    /// Any signature by a key with this set is refused, whatever its date,
    /// because a thief can backdate `iat`.
    pub compromised_since: Option<u64>,
}

/// The signed list of authorised nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustList {
    pub network: String,
    pub seq: u64,
    pub root_version: u64,
    pub issued: u64,
    pub expires: u64,
    /// SHA-256 of the previous list's signed bytes; absent only for `seq` 1.
    #[serde(with = "opt_hash")]
    pub prev: Option<[u8; 32]>,
    pub members: Vec<Member>,
    pub revoked: Vec<Revocation>,
}

mod opt_hash {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(h) => s.serialize_bytes(h),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        let v: Option<serde_bytes::ByteBuf> = Option::deserialize(d)?;
        v.map(|b| {
            <[u8; 32]>::try_from(b.as_slice())
                .map_err(|_| serde::de::Error::custom("hash is not 32 bytes"))
        })
        .transpose()
    }
}

/// Why a trust document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("trust document envelope: {0}")]
    Envelope(#[from] CoseError),
    #[error("trust document contents: {0}")]
    Contents(#[from] CborError),
    #[error("trust document has content type {found:?}, expected {expected:?}")]
    WrongContentType {
        expected: &'static str,
        found: String,
    },
    #[error("trust document is invalid: {0}")]
    Invalid(String),
    #[error("signature threshold not met: {valid} valid of {threshold} needed ({which})")]
    ThresholdNotMet {
        which: &'static str,
        valid: usize,
        threshold: u32,
    },
    #[error("key {kid} is not authorised to sign this document")]
    SignerNotAuthorised { kid: KeyId },
    #[error("the signature by key {kid} does not verify")]
    BadSignature { kid: KeyId },
    #[error("key {kid} signed this document more than once")]
    DuplicateSignature { kid: KeyId },
    #[error(
        "root version {offered} does not follow held version {held} (must be exactly {held} + 1)"
    )]
    RootVersionNotNext { held: u64, offered: u64 },
    #[error("trust {what} expired at {expires} (now {now})")]
    Expired {
        what: &'static str,
        expires: u64,
        now: u64,
    },
    #[error("trust {what} is issued at {issued}, in the future (now {now})")]
    NotYetIssued {
        what: &'static str,
        issued: u64,
        now: u64,
    },
    #[error("trust list is for network {found:?}, expected {expected:?}")]
    WrongNetwork { expected: String, found: String },
    #[error("trust list names root version {found}, but the held root is version {expected}")]
    WrongRootVersion { expected: u64, found: u64 },
    #[error("trust list seq {offered} is not newer than held seq {held}")]
    NotNewer { held: u64, offered: u64 },
    #[error("trust list seq {seq} is already held")]
    AlreadyHeld { seq: u64 },
    #[error("equivocation: two different trust lists both carry seq {seq}")]
    Equivocation { seq: u64 },
    #[error("trust list seq {seq} does not chain to the held list (prev hash differs)")]
    BrokenChain { seq: u64 },
    #[error("trust list is valid for {secs} s, longer than the allowed {max} s")]
    ValidityTooLong { secs: u64, max: u64 },
}

fn invalid(msg: impl Into<String>) -> TrustError {
    TrustError::Invalid(msg.into())
}

/// SHA-256 of bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A root as a COSE_Sign document being signed.
#[derive(Debug, Clone)]
pub struct RootDocument(Sign);

impl RootDocument {
    /// Encodes an unsigned root document, after checking its contents.
    pub fn unsigned(root: &Root) -> Result<Self, TrustError> {
        validate_root(root)?;
        Ok(Self(Sign::new(ROOT_CONTENT_TYPE, cbor::encode(root)?)?))
    }

    /// Reads a root document (signed or partly signed) without accepting it.
    pub fn decode(bytes: &[u8]) -> Result<(Self, Root), TrustError> {
        let sign = Sign::decode(bytes, Limits::TRUST.max_bytes)?;
        check_content_type(&sign, ROOT_CONTENT_TYPE)?;
        let root: Root = cbor::decode(&sign.payload, Limits::TRUST)?;
        validate_root(&root)?;
        Ok((Self(sign), root))
    }

    /// Adds one signature.
    pub fn sign(&mut self, key: &KeyPair) -> Result<(), TrustError> {
        Ok(self.0.add_signature(key)?)
    }

    /// The signed bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.0.encode()
    }

    /// The COSE_Sign inside.
    pub fn cose(&self) -> &Sign {
        &self.0
    }
}

/// A trust list as a COSE_Sign document being signed.
#[derive(Debug, Clone)]
pub struct ListDocument(Sign);

impl ListDocument {
    /// Encodes an unsigned list, after checking its contents.
    pub fn unsigned(list: &TrustList) -> Result<Self, TrustError> {
        validate_list(list)?;
        Ok(Self(Sign::new(LIST_CONTENT_TYPE, cbor::encode(list)?)?))
    }

    /// Reads a list document without accepting it.
    pub fn decode(bytes: &[u8]) -> Result<(Self, TrustList), TrustError> {
        let sign = Sign::decode(bytes, Limits::TRUST.max_bytes)?;
        check_content_type(&sign, LIST_CONTENT_TYPE)?;
        let list: TrustList = cbor::decode(&sign.payload, Limits::TRUST)?;
        validate_list(&list)?;
        Ok((Self(sign), list))
    }

    /// Adds one signature, refusing a key the root does not authorise for lists.
    pub fn sign(&mut self, key: &KeyPair, root: &Root) -> Result<(), TrustError> {
        if !root.list_keys.iter().any(|k| k.kid() == key.kid()) {
            return Err(TrustError::SignerNotAuthorised { kid: key.kid() });
        }
        Ok(self.0.add_signature(key)?)
    }

    /// The signed bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.0.encode()
    }

    /// The COSE_Sign inside.
    pub fn cose(&self) -> &Sign {
        &self.0
    }
}

fn check_content_type(sign: &Sign, expected: &'static str) -> Result<(), TrustError> {
    if sign.content_type != expected {
        return Err(TrustError::WrongContentType {
            expected,
            found: sign.content_type.chars().take(64).collect(),
        });
    }
    Ok(())
}

/// How one signature on a trust document fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureStatus {
    /// By an authorised key, and it verifies.
    Valid,
    /// By an authorised key, but it does not verify.
    Invalid,
    /// By a key not authorised for this document.
    NotAuthorised,
    /// A second signature by a key already counted.
    Duplicate,
}

/// Checks every signature against the authorised keys.
pub fn signature_report(sign: &Sign, authorised: &[PublicKey]) -> Vec<(KeyId, SignatureStatus)> {
    let mut counted = BTreeSet::new();
    sign.signers
        .iter()
        .map(|signer| {
            let status = match authorised.iter().find(|k| k.kid() == signer.kid) {
                None => SignatureStatus::NotAuthorised,
                Some(_) if counted.contains(&signer.kid) => SignatureStatus::Duplicate,
                Some(key) => match sign.verify_signer(signer, key) {
                    Ok(()) => {
                        counted.insert(signer.kid);
                        SignatureStatus::Valid
                    }
                    Err(_) => SignatureStatus::Invalid,
                },
            };
            (signer.kid, status)
        })
        .collect()
}

/// Checks every signature on a trust document: each must be by a key
/// authorised for it (in any of `sets`), appear once, and verify. Then each
/// set's threshold must be met. A document carrying anything else is
/// refused, so nothing unexplained rides along on a trust document.
fn require_thresholds(
    sign: &Sign,
    sets: &[(&[PublicKey], u32, &'static str)],
) -> Result<(), TrustError> {
    let mut valid = BTreeSet::new();
    for signer in &sign.signers {
        let key = sets
            .iter()
            .flat_map(|(keys, _, _)| keys.iter())
            .find(|k| k.kid() == signer.kid)
            .ok_or(TrustError::SignerNotAuthorised { kid: signer.kid })?;
        if !valid.insert(signer.kid) {
            return Err(TrustError::DuplicateSignature { kid: signer.kid });
        }
        sign.verify_signer(signer, key)
            .map_err(|_| TrustError::BadSignature { kid: signer.kid })?;
    }
    for (keys, threshold, which) in sets {
        let count = keys.iter().filter(|k| valid.contains(&k.kid())).count();
        if count < *threshold as usize {
            return Err(TrustError::ThresholdNotMet {
                which,
                valid: count,
                threshold: *threshold,
            });
        }
    }
    Ok(())
}

fn validate_keys(keys: &[PublicKey], threshold: u32, which: &str) -> Result<(), TrustError> {
    if threshold == 0 || threshold as usize > keys.len() {
        return Err(invalid(format!(
            "{which} threshold {threshold} must be between 1 and the number of keys ({})",
            keys.len()
        )));
    }
    let distinct: BTreeSet<_> = keys.iter().map(PublicKey::kid).collect();
    if distinct.len() != keys.len() {
        return Err(invalid(format!("{which} keys contain a duplicate")));
    }
    Ok(())
}

fn validate_text(text: &str, what: &str) -> Result<(), TrustError> {
    if text.len() > MAX_TEXT || text.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} is longer than {MAX_TEXT} bytes or holds control characters"
        )));
    }
    Ok(())
}

fn validate_root(root: &Root) -> Result<(), TrustError> {
    if root.network.is_empty() {
        return Err(invalid("root network name is empty"));
    }
    validate_text(&root.network, "root network name")?;
    if root.version == 0 {
        return Err(invalid("root version starts at 1"));
    }
    if root.issued >= root.expires {
        return Err(invalid("root expires before it is issued"));
    }
    validate_keys(&root.root_keys, root.root_threshold, "root")?;
    validate_keys(&root.list_keys, root.list_threshold, "list")?;
    let p = root.policy;
    if p.max_list_validity_secs == 0 || p.max_list_validity_secs > MAX_LIST_VALIDITY_SECS {
        return Err(invalid("policy list validity must be 1 s to 14 days"));
    }
    if p.max_message_life_secs == 0 || p.max_message_life_secs > 300 {
        return Err(invalid("policy message life must be 1 to 300 s"));
    }
    if p.max_clock_skew_secs > 300 {
        return Err(invalid("policy clock skew must be at most 300 s"));
    }
    Ok(())
}

/// Checks a list's contents on their own: unique ODS codes, PeerIds and key
/// ids, key ids that match their keys, PeerIds that come from the member's
/// transport keys, sane windows and bounded text.
pub fn validate_list(list: &TrustList) -> Result<(), TrustError> {
    validate_text(&list.network, "list network name")?;
    if list.seq == 0 {
        return Err(invalid("list seq starts at 1"));
    }
    if list.issued >= list.expires {
        return Err(invalid("list expires before it is issued"));
    }
    if list.seq == 1 && list.prev.is_some() {
        return Err(invalid(
            "list seq 1 has no previous list, so prev must be absent",
        ));
    }
    if list.seq > 1 && list.prev.is_none() {
        return Err(invalid(format!(
            "list seq {} must name its previous list in prev",
            list.seq
        )));
    }
    let mut ods_seen = BTreeSet::new();
    let mut peers_seen = BTreeSet::new();
    let mut kids_seen = BTreeSet::new();
    for member in &list.members {
        let who = member.ods.as_str();
        if !ods_seen.insert(member.ods.clone()) {
            return Err(invalid(format!("member {who} appears twice")));
        }
        validate_text(&member.name, &format!("member {who} name"))?;
        if let Some(contact) = &member.contact {
            validate_text(contact, &format!("member {who} contact"))?;
        }
        if member.valid_from >= member.valid_until {
            return Err(invalid(format!("member {who} validity window is empty")));
        }
        if member.roles.is_empty() {
            return Err(invalid(format!("member {who} has no role")));
        }
        for key in &member.keys {
            if key.kid != key.public.kid() {
                return Err(invalid(format!(
                    "member {who} key {} does not match its public key",
                    key.kid
                )));
            }
            if !kids_seen.insert(key.kid) {
                return Err(invalid(format!("key {} appears twice", key.kid)));
            }
            if key.valid_from >= key.valid_until {
                return Err(invalid(format!(
                    "member {who} key {} validity window is empty",
                    key.kid
                )));
            }
        }
        for peer in &member.peers {
            if !peers_seen.insert(peer.peer_id.clone()) {
                return Err(invalid(format!("PeerId {} appears twice", peer.peer_id)));
            }
            let transport = peer
                .peer_id
                .public_key()
                .map_err(|e| invalid(format!("member {who} PeerId: {e}")))?;
            if !member
                .keys
                .iter()
                .any(|k| k.key_use == KeyUse::Transport && k.public == transport)
            {
                return Err(invalid(format!(
                    "member {who} PeerId {} is not derived from one of its transport keys",
                    peer.peer_id
                )));
            }
            for addr in &peer.addrs {
                validate_text(addr, &format!("member {who} address"))?;
            }
        }
    }
    for revocation in &list.revoked {
        validate_text(&revocation.reason, "revocation reason")?;
    }
    Ok(())
}

/// A root this node trusts, with the exact bytes it was accepted from.
#[derive(Debug, Clone)]
pub struct AcceptedRoot {
    root: Root,
    bytes: Vec<u8>,
}

impl AcceptedRoot {
    /// The root's contents.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The signed bytes, to store and to hand to peers.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

fn check_window(
    what: &'static str,
    issued: u64,
    expires: u64,
    now: u64,
    skew: u64,
) -> Result<(), TrustError> {
    if now > expires {
        return Err(TrustError::Expired { what, expires, now });
    }
    if issued > now.saturating_add(skew) {
        return Err(TrustError::NotYetIssued { what, issued, now });
    }
    Ok(())
}

/// Accepts a node's first root, given out of band: it must be signed by a
/// threshold of its own root keys and not be expired.
pub fn accept_first_root(bytes: &[u8], now: u64) -> Result<AcceptedRoot, TrustError> {
    let (doc, root) = RootDocument::decode(bytes)?;
    require_thresholds(
        doc.cose(),
        &[(&root.root_keys, root.root_threshold, "root keys")],
    )?;
    check_window(
        "root",
        root.issued,
        root.expires,
        now,
        root.policy.max_clock_skew_secs,
    )?;
    Ok(AcceptedRoot {
        root,
        bytes: bytes.to_vec(),
    })
}

/// Accepts root version N+1 after N: exactly the next version, signed by a
/// threshold of N's root keys and of its own, for the same network.
pub fn accept_next_root(
    held: &AcceptedRoot,
    bytes: &[u8],
    now: u64,
) -> Result<AcceptedRoot, TrustError> {
    let (doc, root) = RootDocument::decode(bytes)?;
    if root.network != held.root.network {
        return Err(TrustError::WrongNetwork {
            expected: held.root.network.clone(),
            found: root.network,
        });
    }
    if Some(root.version) != held.root.version.checked_add(1) {
        return Err(TrustError::RootVersionNotNext {
            held: held.root.version,
            offered: root.version,
        });
    }
    require_thresholds(
        doc.cose(),
        &[
            (
                &held.root.root_keys,
                held.root.root_threshold,
                "previous root keys",
            ),
            (&root.root_keys, root.root_threshold, "new root keys"),
        ],
    )?;
    check_window(
        "root",
        root.issued,
        root.expires,
        now,
        root.policy.max_clock_skew_secs,
    )?;
    Ok(AcceptedRoot {
        root,
        bytes: bytes.to_vec(),
    })
}

/// Follows a chain of roots from the held one, each step by [`accept_next_root`].
pub fn accept_root_chain<'a>(
    held: &AcceptedRoot,
    chain: impl IntoIterator<Item = &'a [u8]>,
    now: u64,
) -> Result<AcceptedRoot, TrustError> {
    let mut current = held.clone();
    for bytes in chain {
        current = accept_next_root(&current, bytes, now)?;
    }
    Ok(current)
}

/// A trust list this node acts under, with look-up indexes.
#[derive(Debug, Clone)]
pub struct AcceptedList {
    list: TrustList,
    bytes: Vec<u8>,
    hash: [u8; 32],
    by_kid: HashMap<KeyId, (usize, usize)>,
    by_peer: HashMap<PeerIdBytes, usize>,
    by_ods: BTreeMap<OdsCode, usize>,
    revoked: HashMap<KeyId, usize>,
}

/// Why a key cannot be used for what it was presented for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyLookupError {
    #[error("key id {kid} is not on the trust list")]
    UnknownKid { kid: KeyId },
    #[error("key {kid} is revoked")]
    Revoked { kid: KeyId },
    #[error("key {kid} is for {actual:?}, not {wanted:?}")]
    WrongUse {
        kid: KeyId,
        wanted: KeyUse,
        actual: KeyUse,
    },
    #[error("key {kid} is not valid at {at}")]
    OutsideValidity { kid: KeyId, at: u64 },
    #[error("member {ods} is suspended or outside its validity window")]
    MemberNotActive { ods: OdsCode },
}

impl AcceptedList {
    fn index(list: TrustList, bytes: Vec<u8>) -> Self {
        let mut by_kid = HashMap::new();
        let mut by_peer = HashMap::new();
        let mut by_ods = BTreeMap::new();
        for (m, member) in list.members.iter().enumerate() {
            by_ods.insert(member.ods.clone(), m);
            for (k, key) in member.keys.iter().enumerate() {
                by_kid.insert(key.kid, (m, k));
            }
            for peer in &member.peers {
                by_peer.insert(peer.peer_id.clone(), m);
            }
        }
        let revoked = list
            .revoked
            .iter()
            .enumerate()
            .map(|(i, r)| (r.kid, i))
            .collect();
        Self {
            hash: sha256(&bytes),
            list,
            bytes,
            by_kid,
            by_peer,
            by_ods,
            revoked,
        }
    }

    /// The list's contents.
    pub fn list(&self) -> &TrustList {
        &self.list
    }

    /// The signed bytes as accepted.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// SHA-256 of the signed bytes; the next list's `prev`.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// Whether the list is still in force at `now`. A node whose list is not
    /// current answers no locate or fetch.
    pub fn is_current(&self, now: u64) -> bool {
        now <= self.list.expires
    }

    /// The member and key with this key id, whatever their state.
    pub fn key(&self, kid: &KeyId) -> Option<(&Member, &MemberKey)> {
        let (m, k) = *self.by_kid.get(kid)?;
        let member = self.list.members.get(m)?;
        Some((member, member.keys.get(k)?))
    }

    /// The member that owns this PeerId.
    pub fn member_by_peer(&self, peer: &PeerIdBytes) -> Option<&Member> {
        self.list.members.get(*self.by_peer.get(peer)?)
    }

    /// The member with this ODS code.
    pub fn member_by_ods(&self, ods: &OdsCode) -> Option<&Member> {
        self.list.members.get(*self.by_ods.get(ods)?)
    }

    /// The revocation of this key, if any.
    pub fn revocation(&self, kid: &KeyId) -> Option<&Revocation> {
        self.list.revoked.get(*self.revoked.get(kid)?)
    }

    /// PeerIds of every member active at `now`: the connection allow-list.
    pub fn allowed_peers(&self, now: u64) -> Vec<PeerIdBytes> {
        self.list
            .members
            .iter()
            .filter(|m| m.is_active_at(now))
            .flat_map(|m| m.peers.iter().map(|p| p.peer_id.clone()))
            .collect()
    }

    /// A key usable right now for `wanted` by an active member: the check
    /// every inbound message's `kid` goes through.
    pub fn current_key(
        &self,
        kid: &KeyId,
        wanted: KeyUse,
        now: u64,
    ) -> Result<(&Member, &MemberKey), KeyLookupError> {
        let (member, key) = self
            .key(kid)
            .ok_or(KeyLookupError::UnknownKid { kid: *kid })?;
        if self.revocation(kid).is_some() {
            return Err(KeyLookupError::Revoked { kid: *kid });
        }
        if key.key_use != wanted {
            return Err(KeyLookupError::WrongUse {
                kid: *kid,
                wanted,
                actual: key.key_use,
            });
        }
        if now < key.valid_from || now > key.valid_until {
            return Err(KeyLookupError::OutsideValidity { kid: *kid, at: now });
        }
        if !member.is_active_at(now) {
            return Err(KeyLookupError::MemberNotActive {
                ods: member.ods.clone(),
            });
        }
        Ok((member, key))
    }

    /// A key that was good for signing a record at `signed_at`. A key retired
    /// without compromise still verifies what it signed before `revoked_at`;
    /// a key with `compromised_since` verifies nothing. The member may be
    /// suspended: records it signed while in good standing stay valid.
    pub fn record_key_at(
        &self,
        kid: &KeyId,
        signed_at: u64,
    ) -> Result<(&Member, &MemberKey), KeyLookupError> {
        let (member, key) = self
            .key(kid)
            .ok_or(KeyLookupError::UnknownKid { kid: *kid })?;
        if let Some(revocation) = self.revocation(kid)
            && (revocation.compromised_since.is_some() || signed_at >= revocation.revoked_at)
        {
            return Err(KeyLookupError::Revoked { kid: *kid });
        }
        if key.key_use != KeyUse::Record {
            return Err(KeyLookupError::WrongUse {
                kid: *kid,
                wanted: KeyUse::Record,
                actual: key.key_use,
            });
        }
        if signed_at < key.valid_from || signed_at > key.valid_until {
            return Err(KeyLookupError::OutsideValidity {
                kid: *kid,
                at: signed_at,
            });
        }
        Ok((member, key))
    }
}

/// Accepts a trust list under the held root, given the list held now (if
/// any). Checks, in order: envelope and contents, content type, network and
/// root version, threshold of the root's list keys, validity window and its
/// length, then `seq` against the held list (equivocation, rollback) and the
/// `prev` chain when the list is the direct successor.
pub fn accept_list(
    root: &AcceptedRoot,
    held: Option<&AcceptedList>,
    bytes: &[u8],
    now: u64,
) -> Result<AcceptedList, TrustError> {
    let root = root.root();
    let (doc, list) = ListDocument::decode(bytes)?;
    if list.network != root.network {
        return Err(TrustError::WrongNetwork {
            expected: root.network.clone(),
            found: list.network,
        });
    }
    if list.root_version != root.version {
        return Err(TrustError::WrongRootVersion {
            expected: root.version,
            found: list.root_version,
        });
    }
    require_thresholds(
        doc.cose(),
        &[(&root.list_keys, root.list_threshold, "list keys")],
    )?;
    check_window(
        "root",
        root.issued,
        root.expires,
        now,
        root.policy.max_clock_skew_secs,
    )?;
    let validity = list.expires - list.issued;
    if validity > root.policy.max_list_validity_secs {
        return Err(TrustError::ValidityTooLong {
            secs: validity,
            max: root.policy.max_list_validity_secs,
        });
    }
    check_window(
        "list",
        list.issued,
        list.expires,
        now,
        root.policy.max_clock_skew_secs,
    )?;
    if let Some(held) = held {
        let held_seq = held.list.seq;
        if list.seq == held_seq {
            return Err(if bytes == held.bytes() {
                TrustError::AlreadyHeld { seq: list.seq }
            } else {
                TrustError::Equivocation { seq: list.seq }
            });
        }
        if list.seq < held_seq {
            return Err(TrustError::NotNewer {
                held: held_seq,
                offered: list.seq,
            });
        }
        // A node that missed lists cannot check the chain across the gap; the
        // list keys' threshold is what vouches for it then.
        if list.seq == held_seq + 1 && list.prev != Some(held.hash()) {
            return Err(TrustError::BrokenChain { seq: list.seq });
        }
    }
    Ok(AcceptedList::index(list, bytes.to_vec()))
}
