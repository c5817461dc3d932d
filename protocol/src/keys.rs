//! Ed25519 keys, key ids and libp2p PeerIds.
//!
//! A key id (`kid`) is the first 16 bytes of
//! `SHA-256("careweave-kid/1" || 0x00 || public key)`. It names a key in COSE
//! headers and in the trust list; the public key itself is looked up there.
//!
//! ```
//! use careweave_protocol::keys::{KeyPair, KeyId};
//!
//! let pair = KeyPair::from_secret_bytes(&[7u8; 32]);
//! assert_eq!(pair.kid(), KeyId::for_public_key(&pair.public_key()));
//! assert_eq!(pair.kid().to_string().len(), 32);
//! ```

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Domain separation for key ids.
pub const KID_DOMAIN: &[u8] = b"careweave-kid/1";
/// Length of a key id in bytes.
pub const KID_LEN: usize = 16;

/// A key id: 16 bytes derived from the public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KID_LEN]);

impl KeyId {
    /// Derives the key id of an Ed25519 public key.
    pub fn for_public_key(key: &PublicKey) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(KID_DOMAIN);
        hasher.update([0u8]);
        hasher.update(key.as_bytes());
        let digest = hasher.finalize();
        let mut kid = [0u8; KID_LEN];
        kid.copy_from_slice(digest.get(..KID_LEN).unwrap_or(&[0u8; KID_LEN]));
        Self(kid)
    }

    /// Wraps bytes received on the wire; they must be exactly 16 long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let kid: [u8; KID_LEN] = bytes
            .try_into()
            .map_err(|_| KeyError::KidLength { len: bytes.len() })?;
        Ok(Self(kid))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KID_LEN] {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl Serialize for KeyId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        Self::from_slice(&bytes).map_err(serde::de::Error::custom)
    }
}

/// Problems with key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key id has {len} bytes; it must have 16")]
    KidLength { len: usize },
    #[error("public key has {len} bytes; an Ed25519 key has 32")]
    PublicKeyLength { len: usize },
    #[error("public key is not a valid Ed25519 point")]
    InvalidPoint,
    #[error("public key is a weak (small-order) Ed25519 key and is refused")]
    WeakKey,
    #[error("PeerId is not the identity multihash of an Ed25519 key")]
    PeerIdNotEd25519,
}

/// An Ed25519 public key that decodes to a valid point and is not weak.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Checks and wraps 32 bytes. Weak (small-order) keys are refused, because
    /// a signature by such a key can be valid for many messages.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::PublicKeyLength { len: bytes.len() })?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::InvalidPoint)?;
        if key.is_weak() {
            return Err(KeyError::WeakKey);
        }
        Ok(Self(key))
    }

    /// The 32 bytes of the key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// The key id of this key.
    pub fn kid(&self) -> KeyId {
        KeyId::for_public_key(self)
    }

    /// Checks a signature with `verify_strict`, which also refuses
    /// non-canonical signatures and small-order components.
    pub fn verify_strict(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(raw): Result<[u8; 64], _> = signature.try_into() else {
            return false;
        };
        let signature = Signature::from_bytes(&raw);
        self.0.verify_strict(message, &signature).is_ok()
    }

    /// The libp2p PeerId this key yields when used as a transport key.
    pub fn peer_id(&self) -> PeerIdBytes {
        PeerIdBytes::from_ed25519(self)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        Self::from_slice(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A signing key with its key id. The secret never appears in `Debug`.
pub struct KeyPair {
    signing: SigningKey,
    kid: KeyId,
}

impl KeyPair {
    /// Builds a key pair from 32 secret bytes. The caller supplies the
    /// randomness, so this crate never reaches for an RNG of its own.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(secret);
        let public = PublicKey(signing.verifying_key());
        Self {
            kid: public.kid(),
            signing,
        }
    }

    /// The 32 secret bytes, for the caller to store (encrypted or mode 0600).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key())
    }

    /// The key id.
    pub fn kid(&self) -> KeyId {
        self.kid
    }

    /// Signs bytes (deterministic Ed25519).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The prefix of an Ed25519 PeerId: identity multihash (0x00), length 36,
/// then the protobuf `PublicKey { Type: Ed25519, Data: <32 bytes> }`.
const PEER_ID_ED25519_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

/// A libp2p PeerId as bytes. careweave PeerIds always come from an Ed25519
/// transport key, so the key can be recovered from the id.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIdBytes(Vec<u8>);

impl PeerIdBytes {
    /// The PeerId libp2p derives from an Ed25519 transport key.
    pub fn from_ed25519(key: &PublicKey) -> Self {
        let mut bytes = Vec::with_capacity(PEER_ID_ED25519_PREFIX.len() + 32);
        bytes.extend_from_slice(&PEER_ID_ED25519_PREFIX);
        bytes.extend_from_slice(key.as_bytes());
        Self(bytes)
    }

    /// Checks that the bytes are an Ed25519 PeerId with a usable key.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let key = bytes
            .strip_prefix(&PEER_ID_ED25519_PREFIX)
            .ok_or(KeyError::PeerIdNotEd25519)?;
        PublicKey::from_slice(key)?;
        Ok(Self(bytes.to_vec()))
    }

    /// The transport key inside the PeerId.
    pub fn public_key(&self) -> Result<PublicKey, KeyError> {
        let key = self
            .0
            .strip_prefix(&PEER_ID_ED25519_PREFIX)
            .ok_or(KeyError::PeerIdNotEd25519)?;
        PublicKey::from_slice(key)
    }

    /// The raw multihash bytes, as libp2p's `PeerId::from_bytes` takes them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The usual base58btc text form (`12D3KooW...`).
    pub fn to_base58(&self) -> String {
        base58_encode(&self.0)
    }

    /// Parses the base58btc text form, checking it is an Ed25519 PeerId.
    pub fn from_base58(text: &str) -> Result<Self, KeyError> {
        let bytes = base58_decode(text).ok_or(KeyError::PeerIdNotEd25519)?;
        Self::from_slice(&bytes)
    }
}

impl fmt::Display for PeerIdBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base58())
    }
}

impl fmt::Debug for PeerIdBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.to_base58())
    }
}

impl Serialize for PeerIdBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for PeerIdBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
        Self::from_slice(&bytes).map_err(serde::de::Error::custom)
    }
}

const BASE58_ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// Bitcoin-alphabet base58, for displaying PeerIds the way libp2p prints them.
fn base58_encode(input: &[u8]) -> String {
    let zeros = input.iter().take_while(|b| **b == 0).count();
    // Base-58 digits, least significant first.
    let mut digits: Vec<u8> = Vec::with_capacity(input.len() * 138 / 100 + 1);
    for byte in input {
        let mut carry = u32::from(*byte);
        for digit in digits.iter_mut() {
            carry += u32::from(*digit) << 8;
            *digit = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let mut out = String::with_capacity(zeros + digits.len());
    out.extend(std::iter::repeat_n('1', zeros));
    out.extend(digits.iter().rev().map(|d| {
        char::from(
            BASE58_ALPHABET
                .get(usize::from(*d))
                .copied()
                .unwrap_or(b'1'),
        )
    }));
    out
}

/// Decodes bitcoin-alphabet base58; `None` on a character outside it.
fn base58_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() > 128 {
        return None;
    }
    let zeros = text.bytes().take_while(|b| *b == b'1').count();
    // Bytes, least significant first.
    let mut bytes: Vec<u8> = Vec::with_capacity(text.len());
    for ch in text.bytes() {
        let mut carry = u32::try_from(BASE58_ALPHABET.iter().position(|a| *a == ch)?).ok()?;
        for byte in bytes.iter_mut() {
            carry += u32::from(*byte) * 58;
            *byte = (carry & 0xff) as u8;
            carry >>= 8;
        }
        while carry > 0 {
            bytes.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    let mut out = vec![0u8; zeros];
    out.extend(bytes.iter().rev());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base58_round_trips_peer_ids() {
        let peer = KeyPair::from_secret_bytes(&[11u8; 32])
            .public_key()
            .peer_id();
        assert_eq!(PeerIdBytes::from_base58(&peer.to_base58()).unwrap(), peer);
        assert!(PeerIdBytes::from_base58("12D3KooW0OIl").is_err());
        assert_eq!(base58_decode("1112").unwrap(), vec![0, 0, 0, 1]);
    }

    #[test]
    fn kid_is_truncated_domain_separated_hash() {
        let pair = KeyPair::from_secret_bytes(&[1u8; 32]);
        let mut hasher = Sha256::new();
        hasher.update(b"careweave-kid/1\x00");
        hasher.update(pair.public_key().as_bytes());
        let full = hasher.finalize();
        assert_eq!(&pair.kid().0[..], &full[..16]);
    }

    #[test]
    fn kid_must_be_sixteen_bytes() {
        assert_eq!(
            KeyId::from_slice(&[0u8; 15]),
            Err(KeyError::KidLength { len: 15 })
        );
        assert!(KeyId::from_slice(&[0u8; 16]).is_ok());
    }

    #[test]
    fn weak_and_malformed_public_keys_are_refused() {
        // The identity point (all zero but the first byte 1) has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::from_slice(&identity), Err(KeyError::WeakKey));
        assert_eq!(
            PublicKey::from_slice(&[0u8; 31]),
            Err(KeyError::PublicKeyLength { len: 31 })
        );
        // y = 2 is not on the curve.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert_eq!(
            PublicKey::from_slice(&off_curve),
            Err(KeyError::InvalidPoint)
        );
    }

    #[test]
    fn peer_id_matches_libp2p_text_form() {
        // libp2p prints Ed25519 PeerIds starting with "12D3KooW".
        let pair = KeyPair::from_secret_bytes(&[3u8; 32]);
        let peer = pair.public_key().peer_id();
        assert!(peer.to_base58().starts_with("12D3KooW"), "{peer}");
        assert_eq!(peer.public_key().unwrap(), pair.public_key());
        assert!(PeerIdBytes::from_slice(peer.as_bytes()).is_ok());
        assert_eq!(
            PeerIdBytes::from_slice(&[0x12, 0x20, 1, 2]),
            Err(KeyError::PeerIdNotEd25519)
        );
    }

    #[test]
    fn signature_checks_are_strict() {
        let pair = KeyPair::from_secret_bytes(&[5u8; 32]);
        let sig = pair.sign(b"hello");
        assert!(pair.public_key().verify_strict(b"hello", &sig));
        assert!(!pair.public_key().verify_strict(b"hellO", &sig));
        assert!(!pair.public_key().verify_strict(b"hello", &sig[..63]));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let pair = KeyPair::from_secret_bytes(&[0xab; 32]);
        assert!(!format!("{pair:?}").contains("abab"));
    }
}
