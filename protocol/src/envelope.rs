//! Signed peer messages: sealing outbound payloads and opening inbound ones.
//!
//! Every peer message is a tagged COSE_Sign1 bound to its connection through
//! `external_aad = ["careweave/msg/1", protocol id, sender PeerId, receiver PeerId]`,
//! so a message lifted from one connection or protocol fails on any other.
//!
//! [`open`] runs the checks in a fixed order and stops at the first failure,
//! returning a distinct [`VerifyError`] for each, so the caller can count and
//! audit refusals by reason:
//!
//! 1. size limit
//! 2. decode: tag, shape, empty unprotected header, known content type
//! 3. algorithm
//! 4. `kid` is a current, unrevoked message key of an active member
//! 5. that member owns the connection's PeerId, and its ODS equals `iss`
//! 6. signature
//! 7. `aud` is us; lifetime at most the policy's; `iat` not in the future
//!    nor too old; not expired
//! 8. `(iss, cti)` not seen before (the caller's replay cache answers)
//! 9. the payload decodes and validates
//!
//! Policy and the audit write come after, in the node.

use sha2::{Digest, Sha256};

use crate::cbor::{self, CborError, Limits};
use crate::cose::{Claims, CoseError, ProtectedHeader, Sign1};
use crate::keys::{KeyId, KeyPair, PeerIdBytes};
use crate::message::{
    ErrorMessage, FetchRequest, FetchResponse, LocateRequest, LocateResponse, Message, MessageKind,
    Payload, PayloadError, TrustRequest, TrustResponse,
};
use crate::ods::OdsCode;
use crate::trust::{AcceptedList, KeyLookupError, KeyUse, Policy};

/// Domain separator at the head of every message's `external_aad`.
pub const MESSAGE_AAD_DOMAIN: &str = "careweave/msg/1";
/// Length of a `cti`.
pub const CTI_LEN: usize = 16;

/// The request-response protocols between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolId {
    Locate,
    Fetch,
    Trust,
}

impl ProtocolId {
    /// The libp2p protocol name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolId::Locate => "/careweave/locate/1",
            ProtocolId::Fetch => "/careweave/fetch/1",
            ProtocolId::Trust => "/careweave/trust/1",
        }
    }

    /// Whether a message kind may travel on this protocol.
    pub fn carries(self, kind: MessageKind) -> bool {
        matches!(
            (self, kind),
            (_, MessageKind::Error)
                | (
                    ProtocolId::Locate,
                    MessageKind::LocateRequest | MessageKind::LocateResponse
                )
                | (
                    ProtocolId::Fetch,
                    MessageKind::FetchRequest | MessageKind::FetchResponse
                )
                | (
                    ProtocolId::Trust,
                    MessageKind::TrustRequest | MessageKind::TrustResponse
                )
        )
    }
}

/// The `external_aad` binding a message to its protocol and both ends.
pub fn message_aad(protocol: ProtocolId, sender: &PeerIdBytes, receiver: &PeerIdBytes) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    cbor::write_array_head(&mut out, 4);
    cbor::write_text(&mut out, MESSAGE_AAD_DOMAIN);
    cbor::write_text(&mut out, protocol.as_str());
    cbor::write_bytes(&mut out, sender.as_bytes());
    cbor::write_bytes(&mut out, receiver.as_bytes());
    out
}

/// SHA-256 of a message's bytes: what a response binds to, and what the
/// audit log records.
pub fn message_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Everything needed to seal one outbound message.
#[derive(Debug)]
pub struct Seal<'a> {
    pub key: &'a KeyPair,
    pub protocol: ProtocolId,
    pub sender_ods: &'a OdsCode,
    pub receiver_ods: &'a OdsCode,
    pub sender_peer: &'a PeerIdBytes,
    pub receiver_peer: &'a PeerIdBytes,
    /// The trust-list `seq` the sender acts under.
    pub trust_seq: u64,
    /// Seconds since the Unix epoch, from the caller's clock.
    pub now: u64,
    /// How long the message lives; at most the policy's maximum.
    pub lifetime_secs: u64,
    /// 16 random bytes from the caller.
    pub cti: [u8; CTI_LEN],
    /// For responses: the hash of the request's bytes.
    pub request_hash: Option<[u8; 32]>,
}

/// Why an outbound message could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("{kind:?} may not be sent on {protocol}")]
    WrongProtocol {
        kind: MessageKind,
        protocol: &'static str,
    },
    #[error("a response must carry the request hash and a request must not")]
    RequestHash,
    #[error("payload is invalid: {0}")]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Cbor(#[from] CborError),
    #[error(transparent)]
    Cose(#[from] CoseError),
}

/// Signs a payload as a message for one connection.
pub fn seal<P: Payload>(payload: &P, seal: &Seal<'_>) -> Result<Vec<u8>, SealError> {
    if !seal.protocol.carries(P::KIND) {
        return Err(SealError::WrongProtocol {
            kind: P::KIND,
            protocol: seal.protocol.as_str(),
        });
    }
    if P::KIND.is_response() != seal.request_hash.is_some() {
        return Err(SealError::RequestHash);
    }
    payload.validate()?;
    let body = cbor::encode(payload)?;
    let mut header = ProtectedHeader::new(seal.key.kid(), P::KIND.content_type());
    header.claims = Claims {
        iss: Some(seal.sender_ods.to_string()),
        sub: None,
        aud: Some(seal.receiver_ods.to_string()),
        exp: Some(seal.now.saturating_add(seal.lifetime_secs)),
        iat: Some(seal.now),
        cti: Some(seal.cti.to_vec()),
    };
    header.trust_seq = Some(seal.trust_seq);
    header.request_hash = seal.request_hash;
    let aad = message_aad(seal.protocol, seal.sender_peer, seal.receiver_peer);
    Ok(Sign1::sign(&header, &body, &aad, seal.key)?)
}

/// What the receiver knows about the connection and the moment.
#[derive(Debug)]
pub struct Receive<'a> {
    pub trust: &'a AcceptedList,
    pub policy: &'a Policy,
    pub protocol: ProtocolId,
    pub local_ods: &'a OdsCode,
    pub local_peer: &'a PeerIdBytes,
    /// The PeerId libp2p authenticated for this connection.
    pub remote_peer: &'a PeerIdBytes,
    /// Seconds since the Unix epoch, from the caller's clock.
    pub now: u64,
    /// Largest message accepted on this protocol.
    pub max_bytes: usize,
}

/// Why an inbound message was refused, one variant per check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("message is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("message is malformed: {0}")]
    Malformed(String),
    #[error("message uses algorithm {0}, which is not accepted")]
    UnsupportedAlgorithm(i64),
    #[error("message key is not usable: {0}")]
    UnknownKey(KeyLookupError),
    #[error("message signed by {signer_ods}'s key, but {reason}")]
    WrongSigner { signer_ods: OdsCode, reason: String },
    #[error("message signature does not verify")]
    BadSignature,
    #[error("message is addressed to {found:?}, not to us ({expected})")]
    WrongAudience { expected: OdsCode, found: String },
    #[error("message lifetime {secs} s is longer than the allowed {max} s")]
    LifetimeTooLong { secs: u64, max: u64 },
    #[error(
        "message is from the future: issued {ahead} s ahead of our clock (allowed skew {skew} s); check clock synchronisation"
    )]
    FromFuture { ahead: u64, skew: u64 },
    #[error(
        "message is too old: issued {behind} s before our clock (allowed skew {skew} s); check clock synchronisation"
    )]
    TooOld { behind: u64, skew: u64 },
    #[error("message expired {ago} s ago")]
    Expired { ago: u64 },
    #[error("message is a replay of one already received from {iss}")]
    Replayed { iss: OdsCode },
    #[error("message payload is invalid: {0}")]
    BadPayload(String),
}

impl VerifyError {
    /// A short stable label for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::TooLarge { .. } => "too-large",
            VerifyError::Malformed(_) => "malformed",
            VerifyError::UnsupportedAlgorithm(_) => "unsupported-algorithm",
            VerifyError::UnknownKey(_) => "unknown-key",
            VerifyError::WrongSigner { .. } => "wrong-signer",
            VerifyError::BadSignature => "bad-signature",
            VerifyError::WrongAudience { .. } => "wrong-audience",
            VerifyError::LifetimeTooLong { .. } => "lifetime-too-long",
            VerifyError::FromFuture { .. } => "from-future",
            VerifyError::TooOld { .. } => "too-old",
            VerifyError::Expired { .. } => "expired",
            VerifyError::Replayed { .. } => "replayed",
            VerifyError::BadPayload(_) => "bad-payload",
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> VerifyError {
    VerifyError::Malformed(e.to_string())
}

/// A verified inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub message: Message,
    /// The sender's ODS code (`iss`), checked against the key's member.
    pub sender: OdsCode,
    pub kid: KeyId,
    pub iat: u64,
    pub exp: u64,
    pub cti: [u8; CTI_LEN],
    /// The trust-list `seq` the sender acted under; if it differs from ours,
    /// the stale side should pull.
    pub sender_trust_seq: Option<u64>,
    /// In responses: the hash of the request they answer.
    pub request_hash: Option<[u8; 32]>,
    /// SHA-256 of the bytes as received.
    pub hash: [u8; 32],
}

/// Verifies an inbound message in DESIGN.md's order. `seen_before` is asked
/// once, only after every other check has passed, whether `(iss, cti)` was
/// already received; the caller records it in its replay cache until `exp`.
pub fn open(
    bytes: &[u8],
    ctx: &Receive<'_>,
    seen_before: impl FnOnce(&OdsCode, &[u8; CTI_LEN], u64) -> bool,
) -> Result<Opened, VerifyError> {
    // 1. Size.
    if bytes.len() > ctx.max_bytes {
        return Err(VerifyError::TooLarge {
            len: bytes.len(),
            max: ctx.max_bytes,
        });
    }
    // 2 and 3. Envelope and algorithm.
    let sign1 = Sign1::decode(bytes, ctx.max_bytes).map_err(|e| match e {
        CoseError::UnsupportedAlgorithm(alg) => VerifyError::UnsupportedAlgorithm(alg),
        other => malformed(other),
    })?;
    let header = &sign1.header;
    let kind = MessageKind::from_content_type(&header.content_type)
        .ok_or_else(|| malformed("unknown content type"))?;
    if !ctx.protocol.carries(kind) {
        return Err(malformed(format!(
            "{kind:?} is not carried on {}",
            ctx.protocol.as_str()
        )));
    }
    let claims = &header.claims;
    let (Some(iss), Some(aud), Some(iat), Some(exp), Some(cti)) = (
        claims.iss.as_deref(),
        claims.aud.as_deref(),
        claims.iat,
        claims.exp,
        claims.cti.as_deref(),
    ) else {
        return Err(malformed("CWT claims must hold iss, aud, iat, exp and cti"));
    };
    if claims.sub.is_some() {
        return Err(malformed("messages carry no sub claim"));
    }
    let cti: [u8; CTI_LEN] = cti
        .try_into()
        .map_err(|_| malformed("cti must be 16 bytes"))?;
    if header.resource_type.is_some()
        || header.resource_id.is_some()
        || header.resource_version.is_some()
    {
        return Err(malformed("messages carry no record labels"));
    }
    if kind.is_response() != header.request_hash.is_some() {
        return Err(malformed(
            "responses must carry the request hash, and requests must not",
        ));
    }
    if header.trust_seq.is_none() {
        return Err(malformed("the sender's trust-list seq is missing"));
    }
    if exp <= iat {
        return Err(malformed("exp is not after iat"));
    }
    // 4. The key.
    let (member, _key) = ctx
        .trust
        .current_key(&header.kid, KeyUse::Message, ctx.now)
        .map_err(VerifyError::UnknownKey)?;
    // 5. The key's member owns this connection and is the issuer.
    match ctx.trust.member_by_peer(ctx.remote_peer) {
        Some(owner) if owner.ods == member.ods => {}
        _ => {
            return Err(VerifyError::WrongSigner {
                signer_ods: member.ods.clone(),
                reason: format!("the connection's PeerId {} is not theirs", ctx.remote_peer),
            });
        }
    }
    if iss != member.ods.as_str() {
        return Err(VerifyError::WrongSigner {
            signer_ods: member.ods.clone(),
            reason: "iss names another organisation".to_owned(),
        });
    }
    // 6. Signature over the exact bytes and this connection.
    let key = member
        .keys
        .iter()
        .find(|k| k.kid == header.kid)
        .map(|k| k.public)
        .ok_or(VerifyError::BadSignature)?;
    let aad = message_aad(ctx.protocol, ctx.remote_peer, ctx.local_peer);
    sign1
        .verify_signature(&key, &aad)
        .map_err(|_| VerifyError::BadSignature)?;
    // 7. Audience and time.
    if aud != ctx.local_ods.as_str() {
        return Err(VerifyError::WrongAudience {
            expected: ctx.local_ods.clone(),
            found: aud.chars().take(16).collect(),
        });
    }
    let life = exp - iat;
    if life > ctx.policy.max_message_life_secs {
        return Err(VerifyError::LifetimeTooLong {
            secs: life,
            max: ctx.policy.max_message_life_secs,
        });
    }
    let skew = ctx.policy.max_clock_skew_secs;
    if iat > ctx.now.saturating_add(skew) {
        return Err(VerifyError::FromFuture {
            ahead: iat - ctx.now,
            skew,
        });
    }
    if iat.saturating_add(skew) < ctx.now {
        return Err(VerifyError::TooOld {
            behind: ctx.now - iat,
            skew,
        });
    }
    if ctx.now >= exp {
        return Err(VerifyError::Expired { ago: ctx.now - exp });
    }
    // 8. Replay.
    let sender = member.ods.clone();
    if seen_before(&sender, &cti, exp) {
        return Err(VerifyError::Replayed { iss: sender });
    }
    // 9. Payload.
    let limits = Limits {
        max_bytes: ctx.max_bytes,
        ..Limits::MESSAGE
    };
    let message = decode_payload(kind, &sign1.payload, limits)?;
    Ok(Opened {
        message,
        sender,
        kid: header.kid,
        iat,
        exp,
        cti,
        sender_trust_seq: header.trust_seq,
        request_hash: header.request_hash,
        hash: message_hash(bytes),
    })
}

fn decode_one<P: Payload>(bytes: &[u8], limits: Limits) -> Result<P, VerifyError> {
    let payload: P =
        cbor::decode(bytes, limits).map_err(|e| VerifyError::BadPayload(e.to_string()))?;
    payload
        .validate()
        .map_err(|e| VerifyError::BadPayload(e.to_string()))?;
    Ok(payload)
}

/// Decodes and validates a payload of the kind its content type names: the
/// last step of [`open`], after the signature. Public so that fuzzing
/// reaches every message decoder without signing each input.
pub fn decode_payload(
    kind: MessageKind,
    bytes: &[u8],
    limits: Limits,
) -> Result<Message, VerifyError> {
    Ok(match kind {
        MessageKind::LocateRequest => {
            Message::LocateRequest(decode_one::<LocateRequest>(bytes, limits)?)
        }
        MessageKind::LocateResponse => {
            Message::LocateResponse(decode_one::<LocateResponse>(bytes, limits)?)
        }
        MessageKind::FetchRequest => {
            Message::FetchRequest(decode_one::<FetchRequest>(bytes, limits)?)
        }
        MessageKind::FetchResponse => {
            Message::FetchResponse(decode_one::<FetchResponse>(bytes, limits)?)
        }
        MessageKind::TrustRequest => {
            Message::TrustRequest(decode_one::<TrustRequest>(bytes, limits)?)
        }
        MessageKind::TrustResponse => {
            Message::TrustResponse(decode_one::<TrustResponse>(bytes, limits)?)
        }
        MessageKind::Error => Message::Error(decode_one::<ErrorMessage>(bytes, limits)?),
    })
}
