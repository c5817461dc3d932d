//! A node: its keys, store, audit log and trust state, and the handling of
//! signed requests in both directions, independent of any transport.
//!
//! Inbound: bytes and the connection's PeerId in, signed response bytes out,
//! after the whole verification order, policy and an audit entry. Outbound:
//! a signed request for a named peer (audited before it is sent), and the
//! checks on its response (audited before anything is handed on).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use careweave_protocol::envelope::{self, Opened, ProtocolId, Receive, Seal, VerifyError};
use careweave_protocol::message::{
    ErrorCode, ErrorMessage, FetchRequest, FetchResponse, LocateRequest, LocateResponse, Message,
    Payload, RequesterContext, Section, TrustRequest, TrustResponse, WithheldReason,
};
use careweave_protocol::record::{self, VerifiedRecord};
use careweave_protocol::trust::{self, AcceptedList, AcceptedRoot, Member, Role, TrustError};
use careweave_protocol::{NhsNumber, OdsCode, PeerIdBytes};

use crate::audit::{AuditEntry, AuditError, AuditLog, Direction};
use crate::config::NodeConfig;
use crate::keys::NodeKeys;
use crate::pointers;
use crate::policy::{self, PolicySettings};
use crate::sharing::{Agreement, AgreementError};
use crate::store::{Store, StoreError, StoredRecord};
use crate::strikes::{self, Strikes};

/// Counters an operator watches. Every label set is fixed and small.
#[derive(Debug, Default)]
pub struct Metrics {
    refused: Mutex<BTreeMap<&'static str, u64>>,
    pub answered: AtomicU64,
    pub emergency_alerts: AtomicU64,
    pub equivocations: AtomicU64,
    pub audit_failures: AtomicU64,
    /// Frames refused unread for size (shared with the network codec).
    pub frames_too_large: std::sync::Arc<AtomicU64>,
    /// Connections closed because a peer kept sending bad messages.
    pub connections_closed_for_bad_messages: AtomicU64,
    /// Connections closed because two pings running failed (timed out or broke).
    pub connections_closed_for_missed_pings: AtomicU64,
    /// Times a peer that kept sending past its busy answers was shut out.
    pub flooding_shut_outs: AtomicU64,
}

/// When a member counts as flooding, and for how long it is shut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloodRule {
    /// Busy answers within the window past which a member is flooding.
    pub busy_answers: u32,
    pub window_secs: u64,
    pub cool_down_secs: u64,
}

impl Metrics {
    fn refuse(&self, reason: &'static str) {
        let mut map = self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry(reason).or_default() += 1;
    }

    /// Refusals so far, by reason.
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The trust a node acts under.
#[derive(Debug, Clone)]
pub struct TrustState {
    pub root: AcceptedRoot,
    pub list: Option<Arc<AcceptedList>>,
}

/// Problems opening or running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("trust: {0}")]
    Trust(#[from] TrustError),
    #[error(
        "no trust root is installed; set [trust] root in the config to the coordinator's root file"
    )]
    NoRoot,
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("sharing agreement: {0}")]
    Sharing(#[from] AgreementError),
}

/// What to do with an inbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Send these signed bytes back.
    Reply(Vec<u8>),
    /// Send nothing and close: the sender cannot be answered (not on the
    /// list, or this node has no current trust).
    Drop(String),
}

/// An inbound request handed to [`Node::answer_batch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchedRequest<'a> {
    pub protocol: ProtocolId,
    pub bytes: &'a [u8],
    /// The peer the transport authenticated.
    pub remote: &'a PeerIdBytes,
    /// Over the sender's rate or this node's capacity: answered "busy".
    pub busy: bool,
}

/// Why an outbound request could not be prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("this node holds no current trust list, so it sends no requests")]
    NoTrust,
    #[error("{0} is not an active member of the trust list")]
    UnknownPeer(String),
    #[error("{0} does not hold the provider role")]
    NotProvider(String),
    #[error("{0} has no PeerId on the trust list")]
    NoPeerId(String),
    #[error("request is invalid: {0}")]
    Invalid(String),
    #[error("the request could not be audited, so it was not sent: {0}")]
    Audit(String),
}

/// Why a response was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response refused: {0}")]
    Verify(#[from] VerifyError),
    #[error("response does not answer our request (request hash differs)")]
    NotOurRequest,
    #[error("response is a {0:?}, not an answer to this request")]
    WrongKind(careweave_protocol::message::MessageKind),
    #[error("response names custodian {found}, but came from {expected}")]
    WrongCustodian { expected: String, found: String },
    #[error("record {index} failed its custodian check: {message}")]
    BadRecord { index: usize, message: String },
    #[error("record {index} is about another patient")]
    OtherPatient { index: usize },
    #[error("this node holds no current trust list")]
    NoTrust,
    #[error("the response could not be audited, so it was not handed on: {0}")]
    Audit(String),
}

/// A prepared, signed, audited outbound request.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    pub protocol: ProtocolId,
    pub bytes: Vec<u8>,
    pub hash: [u8; 32],
    pub peer_ods: OdsCode,
    pub peer_id: PeerIdBytes,
    /// The patient asked about (none for trust pulls).
    pub nhs_number: Option<NhsNumber>,
    /// Who asked and why (none for trust pulls).
    pub context: Option<RequesterContext>,
    /// Set once an answer has been accepted: a request takes one answer,
    /// so a copy of it is refused as a replay without the replay cache.
    answered: Arc<std::sync::atomic::AtomicBool>,
}

/// Signed requests whose audit entries are not yet durable. They cannot be
/// sent from here; [`Node::sync_signed`] opens them after the sync.
#[derive(Debug)]
pub struct UnsyncedRequests(Vec<Result<OutboundRequest, RequestError>>);

impl UnsyncedRequests {
    /// Appends another batch signed for the same locate, keeping the order.
    pub fn append(&mut self, mut other: UnsyncedRequests) {
        self.0.append(&mut other.0);
    }
}

/// A peer's answer to a locate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocateAnswer {
    Answered(LocateResponse),
    Refused(ErrorMessage),
}

/// A peer's answer to a fetch: records whose custodian signatures checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAnswer {
    Records {
        custodian: OdsCode,
        records: Vec<VerifiedRecord>,
        withheld: Vec<WithheldReason>,
        /// Sections the custodian's agreement does not share with us.
        not_shared: Vec<Section>,
    },
    Refused(ErrorMessage),
}

fn random_cti() -> Result<[u8; 16], NodeError> {
    let mut cti = [0u8; 16];
    getrandom::fill(&mut cti).map_err(|e| NodeError::Random(e.to_string()))?;
    Ok(cti)
}

/// When an audit entry must be on disk: before the call returns, or
/// before the caller hands anything on (it then calls [`Node::sync_audit`]),
/// so that several entries share one sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Now,
    Deferred,
}

fn protocol_name(protocol: ProtocolId) -> &'static str {
    match protocol {
        ProtocolId::Locate => "locate",
        ProtocolId::Fetch => "fetch",
        ProtocolId::Trust => "trust",
    }
}

/// One verified inbound request: who sent it, on which connection and
/// protocol, its hash and the moment, so answers and refusals need not
/// repeat them.
struct Exchange<'a> {
    protocol: ProtocolId,
    list: &'a AcceptedList,
    remote: &'a PeerIdBytes,
    requester: &'a Member,
    hash: [u8; 32],
    now: u64,
    durability: Durability,
}

/// What the node holds about a patient, read once per request.
struct PatientView {
    records: Vec<StoredRecord>,
    flags: crate::store::PatientFlags,
    salt: [u8; 32],
}

/// What a response to one of our requests brought, for the audit log.
enum Seen<'a> {
    /// Pointer ids or record keys released, and reasons for what was withheld.
    /// Released ids, withheld reasons, and sections not shared with us.
    Released(Vec<String>, &'a [WithheldReason], &'a [Section]),
    Refused(&'a ErrorMessage),
    Failed(&'a ResponseError),
}

/// A careweave node without its network.
#[derive(Debug)]
pub struct Node {
    pub config: NodeConfig,
    pub keys: NodeKeys,
    pub store: Store,
    pub audit: AuditLog,
    pub metrics: Metrics,
    /// Shared, never copied: every request reads it, and a 42-member list
    /// is hundreds of allocations to clone.
    trust: RwLock<Option<Arc<TrustState>>>,
    ods: OdsCode,
    peer_id: PeerIdBytes,
    /// Bad messages per peer; past the limit, connections are closed.
    strikes: Strikes,
    /// The sharing agreement in force; replaced whole when the operator
    /// changes it, never edited in place.
    sharing: RwLock<Arc<Agreement>>,
    /// When the agreement in force took effect (Unix seconds).
    sharing_since: AtomicU64,
}

impl Node {
    /// Builds a node from its parts and loads any stored trust state.
    pub fn new(
        config: NodeConfig,
        keys: NodeKeys,
        store: Store,
        now: u64,
    ) -> Result<Self, NodeError> {
        let ods = config.node.ods.clone();
        let log_key = careweave_protocol::KeyPair::from_secret_bytes(&keys.log.secret_bytes());
        let network = store
            .trust_bytes("network")?
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_else(|| "unset".to_owned());
        let audit = AuditLog::open(
            store.clone(),
            log_key,
            ods.clone(),
            crate::audit::origin(&network, &ods),
            config.audit.checkpoint_every_entries,
            config.audit.checkpoint_every_secs,
        )?;
        let sharing = Agreement::from_config(&config.sharing)?;
        let node = Self {
            sharing: RwLock::new(Arc::new(sharing)),
            sharing_since: AtomicU64::new(now),
            peer_id: keys.peer_id(),
            ods,
            config,
            keys,
            audit,
            metrics: Metrics::default(),
            trust: RwLock::new(None),
            strikes: Strikes::default(),
            store,
        };
        node.load_stored_trust(now);
        node.store.purge_replay(now)?;
        Ok(node)
    }

    /// The sharing agreement in force.
    pub fn sharing(&self) -> Arc<Agreement> {
        Arc::clone(
            &self
                .sharing
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// When the agreement in force took effect (Unix seconds).
    pub fn sharing_since(&self) -> u64 {
        self.sharing_since.load(Ordering::Relaxed)
    }

    /// Puts `agreement` in force from the next request on. Returns whether
    /// it differs from the one it replaces.
    pub fn set_sharing(&self, agreement: Agreement, now: u64) -> bool {
        let mut held = self
            .sharing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if **held == agreement {
            return false;
        }
        tracing::info!(
            agreement = %agreement.describe().join("; "),
            "the sharing agreement changed; it applies from the next request"
        );
        *held = Arc::new(agreement);
        self.sharing_since.store(now, Ordering::Relaxed);
        true
    }

    /// This node's ODS code.
    pub fn ods(&self) -> &OdsCode {
        &self.ods
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> &PeerIdBytes {
        &self.peer_id
    }

    fn load_stored_trust(&self, now: u64) {
        let Ok(Some(first)) = self.store.trust_bytes("root/1") else {
            return;
        };
        let Ok(mut root) = trust::accept_first_root(&first, now) else {
            tracing::warn!("the stored trust root no longer verifies; trust must be reinstalled");
            return;
        };
        let mut version = 2u64;
        while let Ok(Some(bytes)) = self.store.trust_bytes(&format!("root/{version}")) {
            match trust::accept_next_root(&root, &bytes, now) {
                Ok(next) => root = next,
                Err(e) => {
                    tracing::warn!(version, error = %e, "a stored root version no longer verifies");
                    break;
                }
            }
            version += 1;
        }
        let list = self
            .store
            .trust_bytes("list")
            .ok()
            .flatten()
            .and_then(|bytes| match trust::accept_list(&root, None, &bytes, now) {
                Ok(list) => Some(Arc::new(list)),
                Err(e) => {
                    tracing::warn!(error = %e, "the stored trust list is not current; this node answers nothing until a new list arrives");
                    None
                }
            });
        self.set_trust(Some(TrustState { root, list }));
    }

    fn set_trust(&self, state: Option<TrustState>) {
        *self
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = state.map(Arc::new);
    }

    /// The trust state now.
    pub fn trust(&self) -> Option<Arc<TrustState>> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Installs a root: the first root if none is held, else the next version.
    pub fn install_root(&self, bytes: &[u8], now: u64) -> Result<u64, NodeError> {
        let held = self.trust();
        let accepted = match &held {
            None => trust::accept_first_root(bytes, now)?,
            Some(state) => trust::accept_next_root(&state.root, bytes, now)?,
        };
        let version = accepted.root().version;
        self.store
            .set_trust_bytes(&format!("root/{version}"), bytes)?;
        self.store
            .set_trust_bytes("network", accepted.root().network.as_bytes())?;
        // A list signed under the old root stays until a new one arrives.
        let list = held
            .and_then(|s| s.list.clone())
            .filter(|l| l.list().root_version == version);
        self.set_trust(Some(TrustState {
            root: accepted,
            list,
        }));
        Ok(version)
    }

    /// Installs a trust list under the held root. Returns its seq.
    pub fn install_list(&self, bytes: &[u8], now: u64) -> Result<u64, NodeError> {
        let state = self.trust().ok_or(NodeError::NoRoot)?;
        let accepted = match trust::accept_list(&state.root, state.list.as_deref(), bytes, now) {
            Ok(list) => list,
            Err(e @ TrustError::Equivocation { .. }) => {
                self.metrics.equivocations.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "ALERT: two different trust lists carry the same seq; the newer one was refused");
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let seq = accepted.list().seq;
        self.store.set_trust_bytes("list", bytes)?;
        self.set_trust(Some(TrustState {
            root: state.root.clone(),
            list: Some(Arc::new(accepted)),
        }));
        Ok(seq)
    }

    /// The current list, if it is in force at `now`.
    pub fn current_list(&self, now: u64) -> Option<Arc<AcceptedList>> {
        self.trust()
            .and_then(|s| s.list.clone())
            .filter(|l| l.is_current(now))
    }

    /// Why this node is not ready to answer, if it is not.
    pub fn not_ready_reason(&self, now: u64) -> Option<String> {
        if self.store.health().failed {
            return Some(
                "the store's database closed when a write failed (is the disk full?); requests that need it are refused until it opens again"
                    .to_owned(),
            );
        }
        match self.trust().as_deref() {
            None => Some("no trust root is installed".to_owned()),
            Some(TrustState { list: None, .. }) => Some("no trust list is held".to_owned()),
            Some(TrustState {
                list: Some(list), ..
            }) if !list.is_current(now) => Some(format!(
                "the trust list (seq {}) expired at {}; failing closed until a newer list arrives",
                list.list().seq,
                list.list().expires
            )),
            Some(TrustState {
                list: Some(list), ..
            }) if list.member_by_ods(&self.ods).is_none() => Some(format!(
                "this node ({}) is not on the trust list (seq {})",
                self.ods,
                list.list().seq
            )),
            _ => None,
        }
    }

    fn policy_settings(&self) -> PolicySettings {
        PolicySettings {
            emergency_overrides_objection: self.config.policy.emergency_overrides_objection,
        }
    }

    // Inbound.

    /// Handles one inbound request from the peer authenticated as `remote`.
    /// Its audit entry is durable before the answer is returned.
    pub fn handle_request(
        &self,
        protocol: ProtocolId,
        bytes: &[u8],
        remote: &PeerIdBytes,
        now: u64,
    ) -> Inbound {
        self.handle_request_with(protocol, bytes, remote, now, Durability::Now)
    }

    /// Answers a batch of inbound requests with one audit sync for all of
    /// them. Nothing is returned for release until every entry is durable;
    /// if the sync fails, no answer is released.
    pub fn answer_batch<'a>(
        &self,
        requests: impl IntoIterator<Item = BatchedRequest<'a>>,
        now: u64,
    ) -> Vec<Inbound> {
        let answers: Vec<Inbound> = requests
            .into_iter()
            .map(|r| {
                if r.busy {
                    self.refuse_busy(
                        r.protocol,
                        r.bytes,
                        r.remote,
                        1000,
                        now,
                        Durability::Deferred,
                    )
                } else {
                    self.handle_request_with(
                        r.protocol,
                        r.bytes,
                        r.remote,
                        now,
                        Durability::Deferred,
                    )
                }
            })
            .collect();
        if self.sync_audit().is_err() {
            return answers
                .iter()
                .map(|_| Inbound::Drop("audit unavailable".to_owned()))
                .collect();
        }
        answers
    }

    fn handle_request_with(
        &self,
        protocol: ProtocolId,
        bytes: &[u8],
        remote: &PeerIdBytes,
        now: u64,
        durability: Durability,
    ) -> Inbound {
        let request_hash = envelope::message_hash(bytes);
        let Some(list) = self.current_list(now) else {
            let reason = self
                .not_ready_reason(now)
                .unwrap_or_else(|| "no current trust list".to_owned());
            self.metrics.refuse("trust-unavailable");
            let _ = self.audit_refusal(
                protocol,
                None,
                remote,
                None,
                request_hash,
                "trust-unavailable",
                &reason,
                now,
                durability,
            );
            return Inbound::Drop(reason);
        };
        let Some(local) = list.member_by_ods(&self.ods) else {
            self.metrics.refuse("not-on-list");
            return Inbound::Drop(format!("this node ({}) is not on the trust list", self.ods));
        };
        let remote_member = list.member_by_peer(remote);
        let policy = list_policy(self.trust().as_deref());
        let ctx = Receive {
            trust: &list,
            policy: &policy,
            protocol,
            local_ods: &self.ods,
            local_peer: &self.peer_id,
            remote_peer: remote,
            now,
            max_bytes: self.config.network.max_frame_bytes,
        };
        let store_error: Mutex<Option<StoreError>> = Mutex::new(None);
        let opened = envelope::open(bytes, &ctx, |iss, cti, exp| {
            match self.store.seen_before(iss, cti, exp) {
                Ok(seen) => seen,
                Err(e) => {
                    if let Ok(mut slot) = store_error.lock() {
                        *slot = Some(e);
                    }
                    true
                }
            }
        });
        if let Ok(mut slot) = store_error.lock()
            && let Some(e) = slot.take()
        {
            tracing::error!(error = %e, "replay cache write failed; refusing the request");
            return self.refuse(
                protocol,
                &list,
                remote_member,
                remote,
                None,
                request_hash,
                "internal",
                ErrorCode::Internal,
                "the node could not record the request; try again",
                now,
                durability,
            );
        }
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                let code = match e {
                    VerifyError::TooLarge { .. }
                    | VerifyError::Malformed(_)
                    | VerifyError::BadPayload(_) => ErrorCode::BadRequest,
                    _ => ErrorCode::Unauthorised,
                };
                tracing::info!(reason = e.reason(), detail = %e, "inbound request refused");
                return self.refuse(
                    protocol,
                    &list,
                    remote_member,
                    remote,
                    None,
                    request_hash,
                    e.reason(),
                    code,
                    &e.to_string(),
                    now,
                    durability,
                );
            }
        };
        let Some(requester) = list.member_by_ods(&opened.sender) else {
            return Inbound::Drop("sender vanished from the list".to_owned());
        };
        match &opened.message {
            Message::LocateRequest(request) => self.answer_locate(
                &Exchange {
                    protocol,
                    list: &list,
                    remote,
                    requester,
                    hash: opened.hash,
                    now,
                    durability,
                },
                local,
                request,
            ),
            Message::FetchRequest(request) => self.answer_fetch(
                &Exchange {
                    protocol,
                    list: &list,
                    remote,
                    requester,
                    hash: opened.hash,
                    now,
                    durability,
                },
                local,
                request,
            ),
            Message::TrustRequest(request) => {
                self.answer_trust(&list, remote, requester, &opened, *request, now)
            }
            other => self.refuse(
                protocol,
                &list,
                Some(requester),
                remote,
                None,
                request_hash,
                "not-a-request",
                ErrorCode::BadRequest,
                &format!("{:?} is not a request", other.kind()),
                now,
                durability,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_refusal(
        &self,
        protocol: ProtocolId,
        peer: Option<&Member>,
        remote: &PeerIdBytes,
        context: Option<(&RequesterContext, &NhsNumber)>,
        request_hash: [u8; 32],
        reason: &str,
        detail: &str,
        now: u64,
        durability: Durability,
    ) -> Result<u64, AuditError> {
        if protocol == ProtocolId::Trust {
            return Ok(0);
        }
        let entry = AuditEntry {
            time: now,
            direction: Direction::Inbound,
            protocol: protocol_name(protocol).to_owned(),
            peer_ods: peer.map(|m| m.ods.clone()),
            peer_id: remote.to_base58(),
            context: context.map(|(c, _)| c.clone()),
            nhs_number: context.map(|(_, n)| *n),
            outcome: "refused".to_owned(),
            reason: Some(format!("{reason}: {detail}")),
            released: vec![],
            withheld: vec![],
            request_hash: request_hash.to_vec(),
            emergency: context.is_some_and(|(c, _)| c.break_glass_reason.is_some()),
            not_shared: vec![],
        };
        self.append_audit_with(&entry, durability)
    }

    fn append_audit_with(
        &self,
        entry: &AuditEntry,
        durability: Durability,
    ) -> Result<u64, AuditError> {
        let appended = match durability {
            Durability::Now => self.audit.append(entry),
            Durability::Deferred => self.audit.append_deferred(entry),
        };
        appended.inspect_err(|e| {
            self.metrics.audit_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "audit append failed; nothing will be released");
        })
    }

    /// Counts, audits and answers a refusal with a signed error, when the
    /// sender is a member that can be addressed.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &self,
        protocol: ProtocolId,
        list: &AcceptedList,
        peer: Option<&Member>,
        remote: &PeerIdBytes,
        context: Option<(&RequesterContext, &NhsNumber)>,
        request_hash: [u8; 32],
        reason: &'static str,
        code: ErrorCode,
        detail: &str,
        now: u64,
        durability: Durability,
    ) -> Inbound {
        self.metrics.refuse(reason);
        if self
            .audit_refusal(
                protocol,
                peer,
                remote,
                context,
                request_hash,
                reason,
                detail,
                now,
                durability,
            )
            .is_err()
        {
            return Inbound::Drop("audit unavailable".to_owned());
        }
        let Some(peer) = peer else {
            return Inbound::Drop(format!("refused ({reason}) a peer that is not on the list"));
        };
        if strikes::is_bad_message(reason) && self.strikes.record(remote.as_bytes(), now) {
            self.metrics
                .connections_closed_for_bad_messages
                .fetch_add(1, Ordering::Relaxed);
            return Inbound::Drop(format!(
                "{} ({}) keeps sending bad messages, the last {reason}: more than {} in {} s",
                peer.ods,
                remote.to_base58(),
                strikes::DEFAULT_LIMIT,
                strikes::DEFAULT_WINDOW_SECS
            ));
        }
        let message: String = detail.chars().take(1000).collect();
        self.reply(
            protocol,
            list,
            peer,
            remote,
            request_hash,
            &ErrorMessage {
                code,
                message,
                retry_after_ms: None,
            },
            now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn reply<P: Payload>(
        &self,
        protocol: ProtocolId,
        list: &AcceptedList,
        peer: &Member,
        remote: &PeerIdBytes,
        request_hash: [u8; 32],
        payload: &P,
        now: u64,
    ) -> Inbound {
        let cti = match random_cti() {
            Ok(cti) => cti,
            Err(e) => return Inbound::Drop(e.to_string()),
        };
        let seal = Seal {
            key: &self.keys.message,
            protocol,
            sender_ods: &self.ods,
            receiver_ods: &peer.ods,
            sender_peer: &self.peer_id,
            receiver_peer: remote,
            trust_seq: list.list().seq,
            now,
            lifetime_secs: self.config.network.message_life_secs,
            cti,
            request_hash: Some(request_hash),
        };
        match envelope::seal(payload, &seal) {
            Ok(bytes) => Inbound::Reply(bytes),
            Err(e) => Inbound::Drop(format!("could not sign the response: {e}")),
        }
    }

    fn check_request(
        &self,
        local: &Member,
        requester: &Member,
        nhs: &NhsNumber,
        now: u64,
    ) -> Result<(), (&'static str, ErrorCode, String)> {
        policy::check_parties(requester, local, now)
            .map_err(|r| (r.reason(), ErrorCode::Refused, r.to_string()))?;
        if self.config.node.testnet && !nhs.is_test_range() {
            return Err((
                "outside-test-range",
                ErrorCode::BadRequest,
                "this is a testnet node: NHS numbers must be in 999 000 0000 - 999 999 9999"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    fn emergency_alert(&self, requester: &Member, context: &RequesterContext, protocol: &str) {
        self.metrics
            .emergency_alerts
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            alert = "emergency-access",
            requester = %requester.ods,
            organisation = %context.organisation,
            user = %context.user_id,
            request_id = %context.request_id,
            reason = context.break_glass_reason.as_deref().unwrap_or(""),
            protocol,
            "ALERT: emergency (break-glass) access to records held here"
        );
    }

    /// Refuses within an exchange: counted, audited, answered with a signed error.
    fn refuse_exchange(
        &self,
        ex: &Exchange<'_>,
        who: (&RequesterContext, &NhsNumber),
        reason: &'static str,
        code: ErrorCode,
        detail: &str,
    ) -> Inbound {
        self.refuse(
            ex.protocol,
            ex.list,
            Some(ex.requester),
            ex.remote,
            Some(who),
            ex.hash,
            reason,
            code,
            detail,
            ex.now,
            ex.durability,
        )
    }

    fn reply_exchange<P: Payload>(&self, ex: &Exchange<'_>, payload: &P) -> Inbound {
        self.reply(
            ex.protocol,
            ex.list,
            ex.requester,
            ex.remote,
            ex.hash,
            payload,
            ex.now,
        )
    }

    /// Audits an answer and only then signs it; if the audit append fails,
    /// the requester gets an internal error and no data.
    fn audited_reply<P: Payload>(
        &self,
        ex: &Exchange<'_>,
        entry: &AuditEntry,
        payload: &P,
    ) -> Inbound {
        if self.append_audit_with(entry, ex.durability).is_err() {
            return self.reply_exchange(
                ex,
                &ErrorMessage {
                    code: ErrorCode::Internal,
                    message: "the node could not write its audit log, so it released nothing"
                        .to_owned(),
                    retry_after_ms: Some(1000),
                },
            );
        }
        self.metrics.answered.fetch_add(1, Ordering::Relaxed);
        self.reply_exchange(ex, payload)
    }

    /// The checks and reads every locate and fetch starts with: parties,
    /// test range, the patient's records, flags and the pointer salt, and
    /// the policy's decision. Returns a ready refusal when any fails.
    fn patient_view(
        &self,
        ex: &Exchange<'_>,
        local: &Member,
        context: &RequesterContext,
        nhs: &NhsNumber,
    ) -> Result<PatientView, Inbound> {
        let who = (context, nhs);
        if let Err((reason, code, detail)) = self.check_request(local, ex.requester, nhs, ex.now) {
            return Err(self.refuse_exchange(ex, who, reason, code, &detail));
        }
        let (Ok(records), Ok(flags), Ok(salt)) = (
            self.store.patient_records(nhs),
            self.store.flags(nhs),
            self.store.pointer_salt(),
        ) else {
            return Err(self.refuse_exchange(
                ex,
                who,
                "internal",
                ErrorCode::Internal,
                "the node could not read its store",
            ));
        };
        Ok(PatientView {
            records,
            flags,
            salt,
        })
    }

    fn audit_entry(
        &self,
        ex: &Exchange<'_>,
        (context, nhs): (&RequesterContext, &NhsNumber),
        released: Vec<String>,
        withheld: &[WithheldReason],
        emergency: bool,
    ) -> AuditEntry {
        let outcome = outcome_label(!released.is_empty(), !withheld.is_empty());
        AuditEntry {
            time: ex.now,
            direction: Direction::Inbound,
            protocol: protocol_name(ex.protocol).to_owned(),
            peer_ods: Some(ex.requester.ods.clone()),
            peer_id: ex.remote.to_base58(),
            context: Some(context.clone()),
            nhs_number: Some(*nhs),
            outcome: outcome.to_owned(),
            reason: None,
            released,
            withheld: withheld.to_vec(),
            request_hash: ex.hash.to_vec(),
            emergency,
            not_shared: vec![],
        }
    }

    fn answer_locate(&self, ex: &Exchange<'_>, local: &Member, request: &LocateRequest) -> Inbound {
        let (context, nhs) = (&request.context, &request.nhs_number);
        let view = match self.patient_view(ex, local, context, nhs) {
            Ok(view) => view,
            Err(refusal) => return refusal,
        };
        let records: Vec<StoredRecord> = match &request.sections {
            Some(sections) => view
                .records
                .into_iter()
                .filter(|r| sections.contains(&r.section))
                .collect(),
            None => view.records,
        };
        let agreement = self.sharing();
        let not_shared = agreement.not_shared(
            &ex.requester.ods,
            &ex.requester.predecessors,
            request.sections.as_deref(),
        );
        let (held_back, records): (Vec<StoredRecord>, Vec<StoredRecord>) = records
            .into_iter()
            .partition(|r| not_shared.contains(&r.section));
        let disclosure =
            match policy::disclose(context, &view.flags, &records, self.policy_settings()) {
                Ok(d) => d,
                Err(refusal) => {
                    return self.refuse_exchange(
                        ex,
                        (context, nhs),
                        refusal.reason(),
                        ErrorCode::Refused,
                        &refusal.to_string(),
                    );
                }
            };
        if disclosure.emergency {
            self.emergency_alert(ex.requester, context, "locate");
        }
        let pointers = pointers::build(&self.ods, &view.salt, nhs, &disclosure.released);
        let mut withheld = disclosure.withheld.clone();
        if agreement.disclose_existence && !view.flags.restricted && !held_back.is_empty() {
            withheld.insert(WithheldReason::NoAgreement);
        }
        let withheld: Vec<WithheldReason> = withheld.into_iter().collect();
        let mut entry = self.audit_entry(
            ex,
            (context, nhs),
            pointers.iter().map(|p| p.id.clone()).collect(),
            &withheld,
            disclosure.emergency,
        );
        record_not_shared(&mut entry, &not_shared);
        // The audit log tells the truth the answer must not.
        entry.reason = truth_untold(ex.requester, &view.flags, &held_back);
        self.audited_reply(
            ex,
            &entry,
            &LocateResponse {
                custodian: self.ods.clone(),
                pointers,
                withheld,
                not_shared,
            },
        )
    }

    fn answer_fetch(&self, ex: &Exchange<'_>, local: &Member, request: &FetchRequest) -> Inbound {
        let (context, nhs) = (&request.context, &request.nhs_number);
        let view = match self.patient_view(ex, local, context, nhs) {
            Ok(view) => view,
            Err(refusal) => return refusal,
        };
        let agreement = self.sharing();
        let (requester_ods, predecessors) = (&ex.requester.ods, &ex.requester.predecessors);
        // Policy sees only what the agreement shares, so nothing it says
        // (a withheld reason) is about a section the requester may not see.
        // Sharing everything, the usual case, copies nothing.
        let shared: std::borrow::Cow<'_, [StoredRecord]> = if agreement
            .not_shared(requester_ods, predecessors, None)
            .is_empty()
        {
            std::borrow::Cow::Borrowed(&view.records)
        } else {
            view.records
                .iter()
                .filter(|r| agreement.shares(requester_ods, predecessors, r.section))
                .cloned()
                .collect()
        };
        let disclosure =
            match policy::disclose(context, &view.flags, &shared, self.policy_settings()) {
                Ok(d) => d,
                Err(refusal) => {
                    return self.refuse_exchange(
                        ex,
                        (context, nhs),
                        refusal.reason(),
                        ErrorCode::Refused,
                        &refusal.to_string(),
                    );
                }
            };
        // Every emergency request alerts, whatever it finds, as a locate
        // does: the security team sees each break-glass attempt, not only
        // those that released something.
        if disclosure.emergency {
            self.emergency_alert(ex.requester, context, "fetch");
        }
        let all: Vec<&StoredRecord> = if view.flags.restricted {
            vec![]
        } else {
            view.records.iter().collect()
        };
        if agreement.shares_nothing_with(requester_ods, predecessors) {
            // The same answer for every pointer, real or not.
            let held_back: Vec<StoredRecord> =
                pointers::find(&self.ods, &view.salt, nhs, &all, &request.pointer_id)
                    .map(|g| g.records.into_iter().cloned().collect())
                    .unwrap_or_default();
            return self.answer_fetch_not_shared(
                ex,
                (context, nhs),
                &view.flags,
                Section::ALL.to_vec(),
                &held_back,
                disclosure.emergency,
            );
        }
        if let Some(group) = pointers::find(&self.ods, &view.salt, nhs, &all, &request.pointer_id)
            && !agreement.shares(requester_ods, predecessors, group.section)
        {
            // Only someone once shared with holds a real pointer, so naming
            // its section tells them nothing new.
            let held_back: Vec<StoredRecord> = group.records.into_iter().cloned().collect();
            return self.answer_fetch_not_shared(
                ex,
                (context, nhs),
                &view.flags,
                vec![group.section],
                &held_back,
                disclosure.emergency,
            );
        }
        let released_group = pointers::find(
            &self.ods,
            &view.salt,
            nhs,
            &disclosure.released,
            &request.pointer_id,
        );
        let known = released_group.is_some()
            || pointers::find(&self.ods, &view.salt, nhs, &all, &request.pointer_id).is_some()
            || disclosure.withheld.contains(&WithheldReason::Objection);
        if !known {
            // Unknown pointer, unknown patient and restricted patient look alike.
            return self.refuse_exchange(
                ex,
                (context, nhs),
                "not-found",
                ErrorCode::NotFound,
                "no records behind that pointer",
            );
        }
        let released: Vec<&StoredRecord> = released_group.map(|g| g.records).unwrap_or_default();
        let withheld: Vec<WithheldReason> = disclosure.withheld.iter().copied().collect();
        let entry = self.audit_entry(
            ex,
            (context, nhs),
            released
                .iter()
                .map(|r| format!("{}@{}", r.key(), r.version))
                .collect(),
            &withheld,
            disclosure.emergency,
        );
        self.audited_reply(
            ex,
            &entry,
            &FetchResponse {
                custodian: self.ods.clone(),
                records: released
                    .iter()
                    .map(|r| serde_bytes::ByteBuf::from(r.signed.clone()))
                    .collect(),
                withheld,
                not_shared: vec![],
            },
        )
    }

    /// A fetch the sharing agreement does not allow: no records, the
    /// sections not shared, and (if configured) that records exist.
    fn answer_fetch_not_shared(
        &self,
        ex: &Exchange<'_>,
        (context, nhs): (&RequesterContext, &NhsNumber),
        flags: &crate::store::PatientFlags,
        not_shared: Vec<Section>,
        held_back: &[StoredRecord],
        emergency: bool,
    ) -> Inbound {
        let agreement = self.sharing();
        let withheld = if agreement.disclose_existence && !flags.restricted && !held_back.is_empty()
        {
            vec![WithheldReason::NoAgreement]
        } else {
            vec![]
        };
        let mut entry = self.audit_entry(ex, (context, nhs), vec![], &withheld, emergency);
        record_not_shared(&mut entry, &not_shared);
        entry.reason = truth_untold(ex.requester, flags, held_back);
        self.audited_reply(
            ex,
            &entry,
            &FetchResponse {
                custodian: self.ods.clone(),
                records: vec![],
                withheld,
                not_shared,
            },
        )
    }

    fn answer_trust(
        &self,
        list: &AcceptedList,
        remote: &PeerIdBytes,
        requester: &Member,
        opened: &Opened,
        request: TrustRequest,
        now: u64,
    ) -> Inbound {
        let Some(state) = self.trust() else {
            return Inbound::Drop("no trust held".to_owned());
        };
        let current = state.root.root().version;
        let roots: Vec<_> = (request.root_version.saturating_add(1)..=current)
            .take(careweave_protocol::message::MAX_ROOT_CHAIN)
            .filter_map(|v| self.store.trust_bytes(&format!("root/{v}")).ok().flatten())
            .map(serde_bytes::ByteBuf::from)
            .collect();
        let list_bytes = (request.list_seq < list.list().seq || !roots.is_empty())
            .then(|| serde_bytes::ByteBuf::from(list.bytes().to_vec()));
        self.reply(
            ProtocolId::Trust,
            list,
            requester,
            remote,
            opened.hash,
            &TrustResponse {
                roots,
                list: list_bytes,
            },
            now,
        )
    }

    /// Answers a request this node has no capacity for with a signed
    /// "busy" error (never a silent drop), counted and audited.
    fn refuse_busy(
        &self,
        protocol: ProtocolId,
        bytes: &[u8],
        remote: &PeerIdBytes,
        retry_after_ms: u64,
        now: u64,
        durability: Durability,
    ) -> Inbound {
        let request_hash = envelope::message_hash(bytes);
        let Some(list) = self.current_list(now) else {
            return Inbound::Drop("no current trust list".to_owned());
        };
        let peer = list.member_by_peer(remote).cloned();
        self.metrics.refuse("busy");
        if self
            .audit_refusal(
                protocol,
                peer.as_ref(),
                remote,
                None,
                request_hash,
                "busy",
                "over the rate or in-flight limit",
                now,
                durability,
            )
            .is_err()
        {
            return Inbound::Drop("audit unavailable".to_owned());
        }
        let Some(peer) = peer else {
            return Inbound::Drop("busy, and the peer is not on the list".to_owned());
        };
        self.reply(
            protocol,
            &list,
            &peer,
            remote,
            request_hash,
            &ErrorMessage {
                code: ErrorCode::Busy,
                message: "this node is busy: over your request rate or its capacity; retry later"
                    .to_owned(),
                retry_after_ms: Some(retry_after_ms),
            },
            now,
        )
    }

    /// Shuts out a member that keeps sending after being told it is busy:
    /// counted and audited once per shutting out. Its requests are then
    /// held unanswered by the network (a signed answer to each would let
    /// the flood spend our CPU and disk).
    pub fn refuse_flooding(
        &self,
        protocol: ProtocolId,
        bytes: &[u8],
        remote: &PeerIdBytes,
        rule: &FloodRule,
        now: u64,
    ) {
        let request_hash = envelope::message_hash(bytes);
        let peer = self
            .current_list(now)
            .and_then(|list| list.member_by_peer(remote).cloned());
        self.metrics.refuse("flooding");
        self.metrics
            .flooding_shut_outs
            .fetch_add(1, Ordering::Relaxed);
        let detail = format!(
            "kept sending after {} busy answers in {} s; its requests are held unanswered for {} s",
            rule.busy_answers, rule.window_secs, rule.cool_down_secs
        );
        let who = peer
            .as_ref()
            .map_or_else(|| remote.to_base58(), |m| m.ods.to_string());
        tracing::warn!(peer = %who, "{detail}");
        // If the audit append fails the node already refuses everything
        // that needs it; the shutting out stands either way.
        let _ = self.audit_refusal(
            protocol,
            peer.as_ref(),
            remote,
            None,
            request_hash,
            "flooding",
            &detail,
            now,
            Durability::Now,
        );
    }

    /// Counts a request held unanswered from a member shut out for
    /// flooding.
    pub fn record_shed(&self) {
        self.metrics.refuse("flooding");
    }

    /// Counts and audits a request the transport refused before it could be
    /// read (an oversized frame, a broken stream).
    pub fn record_unread_refusal(
        &self,
        protocol: ProtocolId,
        remote: &PeerIdBytes,
        reason: &'static str,
        detail: &str,
        now: u64,
    ) {
        self.metrics.refuse(reason);
        let peer = self
            .current_list(now)
            .and_then(|l| l.member_by_peer(remote).cloned());
        let _ = self.audit_refusal(
            protocol,
            peer.as_ref(),
            remote,
            None,
            [0; 32],
            reason,
            detail,
            now,
            Durability::Now,
        );
    }

    /// Signs a trust pull for a peer: "send me anything newer than what I hold".
    pub fn prepare_trust_pull(
        &self,
        peer_ods: &OdsCode,
        now: u64,
    ) -> Result<OutboundRequest, RequestError> {
        let state = self.trust().ok_or(RequestError::NoTrust)?;
        let list = state.list.clone().ok_or(RequestError::NoTrust)?;
        let peer = list
            .member_by_ods(peer_ods)
            .ok_or_else(|| RequestError::UnknownPeer(peer_ods.to_string()))?;
        let peer_id = peer
            .peers
            .first()
            .map(|p| p.peer_id.clone())
            .ok_or_else(|| RequestError::NoPeerId(peer_ods.to_string()))?;
        let request = TrustRequest {
            root_version: state.root.root().version,
            list_seq: list.list().seq,
        };
        let cti = random_cti().map_err(|e| RequestError::Invalid(e.to_string()))?;
        let bytes = envelope::seal(
            &request,
            &Seal {
                key: &self.keys.message,
                protocol: ProtocolId::Trust,
                sender_ods: &self.ods,
                receiver_ods: peer_ods,
                sender_peer: &self.peer_id,
                receiver_peer: &peer_id,
                trust_seq: list.list().seq,
                now,
                lifetime_secs: self.config.network.message_life_secs,
                cti,
                request_hash: None,
            },
        )
        .map_err(|e| RequestError::Invalid(e.to_string()))?;
        Ok(OutboundRequest {
            protocol: ProtocolId::Trust,
            hash: envelope::message_hash(&bytes),
            bytes,
            peer_ods: peer_ods.clone(),
            peer_id,
            nhs_number: None,
            context: None,
            answered: Arc::default(),
        })
    }

    /// Installs whatever newer roots and list a trust pull brought. Returns
    /// the list seq held afterwards if it changed.
    pub fn accept_trust_response(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
    ) -> Result<Option<u64>, ResponseError> {
        let (_, opened) = self.open_response(request, bytes, now)?;
        let response = match opened.message {
            Message::TrustResponse(r) => r,
            Message::Error(_) => return Ok(None),
            other => return Err(ResponseError::WrongKind(other.kind())),
        };
        for root in &response.roots {
            if let Err(e) = self.install_root(root, now) {
                tracing::warn!(error = %e, peer = %request.peer_ods, "a pulled trust root was refused");
                return Ok(None);
            }
        }
        match response.list {
            None => Ok(None),
            Some(list) => match self.install_list(&list, now) {
                Ok(seq) => Ok(Some(seq)),
                Err(NodeError::Trust(
                    TrustError::AlreadyHeld { .. } | TrustError::NotNewer { .. },
                )) => Ok(None),
                Err(e) => {
                    tracing::warn!(error = %e, peer = %request.peer_ods, "a pulled trust list was refused");
                    Ok(None)
                }
            },
        }
    }

    // Outbound.

    /// Signs a locate request for `peer_ods` and audits it before it is sent.
    pub fn prepare_locate(
        &self,
        peer_ods: &OdsCode,
        request: &LocateRequest,
        now: u64,
    ) -> Result<OutboundRequest, RequestError> {
        self.prepare(
            ProtocolId::Locate,
            peer_ods,
            request,
            request.nhs_number,
            &request.context,
            now,
            Durability::Now,
        )
    }

    /// Signs and audits a locate request for each of `peers`. The audit
    /// entries are written but not yet durable, so the requests come back
    /// sealed: only [`Node::sync_signed`] hands them out for sending.
    pub fn sign_locates(
        &self,
        peers: &[OdsCode],
        request: &LocateRequest,
        now: u64,
    ) -> UnsyncedRequests {
        UnsyncedRequests(
            peers
                .iter()
                .map(|peer| {
                    self.prepare(
                        ProtocolId::Locate,
                        peer,
                        request,
                        request.nhs_number,
                        &request.context,
                        now,
                        Durability::Deferred,
                    )
                })
                .collect(),
        )
    }

    /// Makes the audit entries of signed requests durable with one sync, and
    /// only then hands the requests out: each is durably audited before any
    /// is sent. If the sync fails, every request becomes that error.
    pub fn sync_signed(
        &self,
        signed: UnsyncedRequests,
    ) -> Vec<Result<OutboundRequest, RequestError>> {
        match self.sync_audit() {
            Ok(()) => signed.0,
            Err(e) => signed
                .0
                .iter()
                .map(|_| Err(RequestError::Audit(e.to_string())))
                .collect(),
        }
    }

    /// Signs a fetch request for `peer_ods` and audits it before it is sent.
    pub fn prepare_fetch(
        &self,
        peer_ods: &OdsCode,
        request: &FetchRequest,
        now: u64,
    ) -> Result<OutboundRequest, RequestError> {
        self.prepare(
            ProtocolId::Fetch,
            peer_ods,
            request,
            request.nhs_number,
            &request.context,
            now,
            Durability::Now,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn prepare<P: Payload>(
        &self,
        protocol: ProtocolId,
        peer_ods: &OdsCode,
        payload: &P,
        nhs_number: NhsNumber,
        context: &RequesterContext,
        now: u64,
        durability: Durability,
    ) -> Result<OutboundRequest, RequestError> {
        let list = self.current_list(now).ok_or(RequestError::NoTrust)?;
        let peer = list
            .member_by_ods(peer_ods)
            .filter(|m| m.is_active_at(now))
            .ok_or_else(|| RequestError::UnknownPeer(peer_ods.to_string()))?;
        if !peer.has_role(Role::Provider) {
            return Err(RequestError::NotProvider(peer_ods.to_string()));
        }
        let peer_id = peer
            .peers
            .first()
            .map(|p| p.peer_id.clone())
            .ok_or_else(|| RequestError::NoPeerId(peer_ods.to_string()))?;
        let cti = random_cti().map_err(|e| RequestError::Invalid(e.to_string()))?;
        let seal = Seal {
            key: &self.keys.message,
            protocol,
            sender_ods: &self.ods,
            receiver_ods: peer_ods,
            sender_peer: &self.peer_id,
            receiver_peer: &peer_id,
            trust_seq: list.list().seq,
            now,
            lifetime_secs: self.config.network.message_life_secs,
            cti,
            request_hash: None,
        };
        let bytes =
            envelope::seal(payload, &seal).map_err(|e| RequestError::Invalid(e.to_string()))?;
        let hash = envelope::message_hash(&bytes);
        self.append_audit_with(
            &AuditEntry {
                time: now,
                direction: Direction::OutboundRequest,
                protocol: protocol_name(protocol).to_owned(),
                peer_ods: Some(peer_ods.clone()),
                peer_id: peer_id.to_base58(),
                context: Some(context.clone()),
                nhs_number: Some(nhs_number),
                outcome: "sent".to_owned(),
                reason: None,
                released: vec![],
                withheld: vec![],
                request_hash: hash.to_vec(),
                emergency: context.break_glass_reason.is_some(),
                not_shared: vec![],
            },
            durability,
        )
        .map_err(|e| RequestError::Audit(e.to_string()))?;
        Ok(OutboundRequest {
            protocol,
            bytes,
            hash,
            peer_ods: peer_ods.clone(),
            peer_id,
            nhs_number: Some(nhs_number),
            context: Some(context.clone()),
            answered: Arc::default(),
        })
    }

    fn open_response(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
    ) -> Result<(Arc<AcceptedList>, Opened), ResponseError> {
        let list = self.current_list(now).ok_or(ResponseError::NoTrust)?;
        let state = self.trust();
        let policy = list_policy(state.as_deref());
        let ctx = Receive {
            trust: &list,
            policy: &policy,
            protocol: request.protocol,
            local_ods: &self.ods,
            local_peer: &self.peer_id,
            remote_peer: &request.peer_id,
            now,
            max_bytes: self.config.network.max_frame_bytes,
        };
        // A response is bound to its request by the request's hash, and a
        // request takes one answer, so a replayed response is refused here
        // without the persisted replay cache: no request made before a
        // restart is waiting afterwards (decision 0013).
        let opened = envelope::open(bytes, &ctx, |_, _, _| false)?;
        if opened.request_hash != Some(request.hash) {
            return Err(ResponseError::NotOurRequest);
        }
        if request
            .answered
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ResponseError::Verify(VerifyError::Replayed {
                iss: opened.sender,
            }));
        }
        Ok((list, opened))
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_response(
        &self,
        request: &OutboundRequest,
        outcome: &str,
        reason: Option<String>,
        released: Vec<String>,
        kept_back: (Vec<WithheldReason>, Vec<Section>),
        now: u64,
        durability: Durability,
    ) -> Result<(), ResponseError> {
        let (withheld, not_shared) = kept_back;
        self.append_audit_with(
            &AuditEntry {
                time: now,
                direction: Direction::OutboundResponse,
                protocol: protocol_name(request.protocol).to_owned(),
                peer_ods: Some(request.peer_ods.clone()),
                peer_id: request.peer_id.to_base58(),
                context: request.context.clone(),
                nhs_number: request.nhs_number,
                outcome: outcome.to_owned(),
                reason,
                released,
                withheld,
                request_hash: request.hash.to_vec(),
                emergency: request
                    .context
                    .as_ref()
                    .is_some_and(|c| c.break_glass_reason.is_some()),
                not_shared,
            },
            durability,
        )
        .map(|_| ())
        .map_err(|e| ResponseError::Audit(e.to_string()))
    }

    /// Records that an outbound request got no usable answer (timeout,
    /// unreachable peer, refused response).
    pub fn record_outbound_failure(
        &self,
        request: &OutboundRequest,
        reason: &str,
        now: u64,
    ) -> Result<(), ResponseError> {
        self.record_outbound_failure_with(request, reason, now, Durability::Now)
    }

    /// As [`Node::record_outbound_failure`], but not yet durable: the
    /// caller calls [`Node::sync_audit`] before handing anything on.
    pub fn record_outbound_failure_deferred(
        &self,
        request: &OutboundRequest,
        reason: &str,
        now: u64,
    ) -> Result<(), ResponseError> {
        self.record_outbound_failure_with(request, reason, now, Durability::Deferred)
    }

    fn record_outbound_failure_with(
        &self,
        request: &OutboundRequest,
        reason: &str,
        now: u64,
        durability: Durability,
    ) -> Result<(), ResponseError> {
        self.audit_response(
            request,
            "failed",
            Some(reason.to_owned()),
            vec![],
            (vec![], vec![]),
            now,
            durability,
        )
    }

    /// Makes every audit entry written so far durable. Callers of the
    /// `_deferred` functions call this before they hand anything on.
    pub fn sync_audit(&self) -> Result<(), AuditError> {
        self.audit.sync().inspect_err(|e| {
            self.metrics.audit_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "audit sync failed; nothing will be released");
        })
    }

    /// Checks a locate response and audits it before handing it on.
    pub fn accept_locate_response(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
    ) -> Result<LocateAnswer, ResponseError> {
        self.accept_locate_response_with(request, bytes, now, Durability::Now)
    }

    /// As [`Node::accept_locate_response`], but the audit entry is not yet
    /// durable: the caller calls [`Node::sync_audit`] before handing the
    /// answer on, so the answers of one locate share one sync.
    pub fn accept_locate_response_deferred(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
    ) -> Result<LocateAnswer, ResponseError> {
        self.accept_locate_response_with(request, bytes, now, Durability::Deferred)
    }

    fn accept_locate_response_with(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
        durability: Durability,
    ) -> Result<LocateAnswer, ResponseError> {
        let result = self.check_locate_response(request, bytes, now);
        let seen = match &result {
            Ok(LocateAnswer::Answered(r)) => Seen::Released(
                r.pointers.iter().map(|p| p.id.clone()).collect(),
                &r.withheld,
                &r.not_shared,
            ),
            Ok(LocateAnswer::Refused(e)) => Seen::Refused(e),
            Err(e) => Seen::Failed(e),
        };
        self.audit_seen(request, seen, now, durability)?;
        result
    }

    /// Audits what a response brought, before anything is handed on.
    fn audit_seen(
        &self,
        request: &OutboundRequest,
        seen: Seen<'_>,
        now: u64,
        durability: Durability,
    ) -> Result<(), ResponseError> {
        match seen {
            Seen::Released(released, withheld, not_shared) => {
                let outcome = match outcome_label(!released.is_empty(), !withheld.is_empty()) {
                    "no-records" if !not_shared.is_empty() => "not-shared",
                    other => other,
                };
                self.audit_response(
                    request,
                    outcome,
                    None,
                    released,
                    (withheld.to_vec(), not_shared.to_vec()),
                    now,
                    durability,
                )
            }
            Seen::Refused(e) => self.audit_response(
                request,
                "refused",
                Some(e.message.clone()),
                vec![],
                (vec![], vec![]),
                now,
                durability,
            ),
            Seen::Failed(e) => {
                self.record_outbound_failure_with(request, &e.to_string(), now, durability)
            }
        }
    }

    fn check_locate_response(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
    ) -> Result<LocateAnswer, ResponseError> {
        let (_, opened) = self.open_response(request, bytes, now)?;
        match opened.message {
            Message::LocateResponse(response) => {
                if response.custodian != opened.sender {
                    return Err(ResponseError::WrongCustodian {
                        expected: opened.sender.to_string(),
                        found: response.custodian.to_string(),
                    });
                }
                Ok(LocateAnswer::Answered(response))
            }
            Message::Error(e) => Ok(LocateAnswer::Refused(e)),
            other => Err(ResponseError::WrongKind(other.kind())),
        }
    }

    /// Checks a fetch response, including every record's custodian
    /// signature and patient, and audits it before handing it on.
    pub fn accept_fetch_response(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
    ) -> Result<FetchAnswer, ResponseError> {
        let result = self.check_fetch_response(request, bytes, now);
        let seen = match &result {
            Ok(FetchAnswer::Records {
                records,
                withheld,
                not_shared,
                ..
            }) => Seen::Released(
                records
                    .iter()
                    .map(|r| {
                        format!(
                            "{}/{}@{}",
                            r.label.resource_type, r.label.resource_id, r.label.version
                        )
                    })
                    .collect(),
                withheld,
                not_shared,
            ),
            Ok(FetchAnswer::Refused(e)) => Seen::Refused(e),
            Err(e) => Seen::Failed(e),
        };
        self.audit_seen(request, seen, now, Durability::Now)?;
        result
    }

    fn check_fetch_response(
        &self,
        request: &OutboundRequest,
        bytes: &[u8],
        now: u64,
    ) -> Result<FetchAnswer, ResponseError> {
        let (list, opened) = self.open_response(request, bytes, now)?;
        let response = match opened.message {
            Message::FetchResponse(response) => response,
            Message::Error(e) => return Ok(FetchAnswer::Refused(e)),
            other => return Err(ResponseError::WrongKind(other.kind())),
        };
        if response.custodian != opened.sender {
            return Err(ResponseError::WrongCustodian {
                expected: opened.sender.to_string(),
                found: response.custodian.to_string(),
            });
        }
        let sender = list.member_by_ods(&opened.sender);
        let mut records = Vec::with_capacity(response.records.len());
        for (index, signed) in response.records.iter().enumerate() {
            let verified =
                record::verify_record(signed, &list).map_err(|e| ResponseError::BadRecord {
                    index,
                    message: e.to_string(),
                })?;
            let custodian_ok = verified.label.custodian == response.custodian
                || sender.is_some_and(|m| m.predecessors.contains(&verified.label.custodian));
            if !custodian_ok {
                return Err(ResponseError::BadRecord {
                    index,
                    message: format!(
                        "record's custodian is {}, not {}",
                        verified.label.custodian, response.custodian
                    ),
                });
            }
            if Some(verified.label.nhs_number) != request.nhs_number {
                return Err(ResponseError::OtherPatient { index });
            }
            records.push(verified);
        }
        Ok(FetchAnswer::Records {
            custodian: response.custodian,
            records,
            withheld: response.withheld,
            not_shared: response.not_shared,
        })
    }
}

fn list_policy(state: Option<&TrustState>) -> trust::Policy {
    state.map(|s| s.root.root().policy).unwrap_or_default()
}

/// What the audit entry records beyond the answer: a restricted patient
/// answered as unknown, and records held back for want of an agreement.
fn truth_untold(
    requester: &Member,
    flags: &crate::store::PatientFlags,
    held_back: &[StoredRecord],
) -> Option<String> {
    let mut said = Vec::new();
    if flags.restricted {
        said.push("restricted patient: answered as unknown".to_owned());
    }
    if !held_back.is_empty() {
        let sections: BTreeSet<Section> = held_back.iter().map(|r| r.section).collect();
        said.push(format!(
            "no sharing agreement with {} for {}: {} record(s) held back",
            requester.ods,
            sections
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            held_back.len()
        ));
    }
    (!said.is_empty()).then(|| said.join("; "))
}

fn outcome_label(released: bool, withheld: bool) -> &'static str {
    match (released, withheld) {
        (true, _) => "answered",
        (false, true) => "withheld",
        (false, false) => "no-records",
    }
}

/// Marks an entry whose answer held nothing because of the agreement: what
/// the requester was told was "not shared", not "no records".
fn record_not_shared(entry: &mut AuditEntry, not_shared: &[Section]) {
    entry.not_shared = not_shared.to_vec();
    if entry.outcome == "no-records" && !not_shared.is_empty() {
        entry.outcome = "not-shared".to_owned();
    }
}
