//! The COSE structures careweave signs with (RFC 9052): tagged COSE_Sign1
//! for messages, records and checkpoints, tagged COSE_Sign for trust roots and
//! trust lists.
//!
//! This module knows the envelope only: it builds, decodes and checks
//! signatures over the exact bytes received. Which key is allowed to sign what
//! is decided by [`crate::envelope`], [`crate::record`] and [`crate::trust`].
//!
//! ```
//! use careweave_protocol::cose::{ProtectedHeader, Sign1};
//! use careweave_protocol::keys::KeyPair;
//!
//! let key = KeyPair::from_secret_bytes(&[9u8; 32]);
//! let header = ProtectedHeader::new(key.kid(), "text/plain");
//! let bytes = Sign1::sign(&header, b"hello", b"", &key)?;
//! let decoded = Sign1::decode(&bytes, 1024)?;
//! assert!(decoded.verify_signature(&key.public_key(), b"").is_ok());
//! assert!(decoded.verify_signature(&key.public_key(), b"other aad").is_err());
//! # Ok::<(), careweave_protocol::cose::CoseError>(())
//! ```

use std::collections::BTreeMap;

use crate::cbor::{self, CborError, Limits, Value};
use crate::keys::{KeyId, KeyPair, PublicKey};

/// CBOR tag of COSE_Sign1.
pub const TAG_SIGN1: u64 = 18;
/// CBOR tag of COSE_Sign.
pub const TAG_SIGN: u64 = 98;

/// EdDSA (RFC 9053), the algorithm careweave signs with.
pub const ALG_EDDSA: i64 = -8;
/// Ed25519 as a fully specified algorithm (RFC 9864); accepted on input.
pub const ALG_ED25519: i64 = -19;

/// Header label: algorithm.
pub const LABEL_ALG: i64 = 1;
/// Header label: content type.
pub const LABEL_CONTENT_TYPE: i64 = 3;
/// Header label: key id.
pub const LABEL_KID: i64 = 4;
/// Header label: CWT claims (RFC 9597).
pub const LABEL_CWT_CLAIMS: i64 = 15;
/// Private label: the trust-list `seq` the sender acted under.
pub const LABEL_TRUST_SEQ: i64 = -65537;
/// Private label: SHA-256 of the request's bytes, in responses.
pub const LABEL_REQUEST_HASH: i64 = -65538;
/// Private label: FHIR resource type of a signed record.
pub const LABEL_RESOURCE_TYPE: i64 = -65539;
/// Private label: FHIR resource id of a signed record.
pub const LABEL_RESOURCE_ID: i64 = -65540;
/// Private label: FHIR resource version of a signed record.
pub const LABEL_RESOURCE_VERSION: i64 = -65541;

/// CWT claim keys (RFC 8392).
pub mod claim {
    /// Issuer: the sender's or custodian's ODS code.
    pub const ISS: i64 = 1;
    /// Subject: the NHS number a record is about.
    pub const SUB: i64 = 2;
    /// Audience: the receiver's ODS code.
    pub const AUD: i64 = 3;
    /// Expiry, seconds since the Unix epoch.
    pub const EXP: i64 = 4;
    /// Issued at, seconds since the Unix epoch.
    pub const IAT: i64 = 6;
    /// CWT id: 16 random bytes, the replay key.
    pub const CTI: i64 = 7;
}

/// Problems with a COSE envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoseError {
    #[error("COSE object is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("COSE object is malformed: {0}")]
    Cbor(#[from] CborError),
    #[error("COSE object has the wrong shape: {0}")]
    Shape(String),
    #[error("COSE unprotected header must be empty in careweave's profile")]
    UnprotectedNotEmpty,
    #[error("COSE algorithm {0} is not accepted (only EdDSA -8 and Ed25519 -19)")]
    UnsupportedAlgorithm(i64),
    #[error("COSE signature does not verify")]
    BadSignature,
}

fn shape(msg: impl Into<String>) -> CoseError {
    CoseError::Shape(msg.into())
}

/// CWT claims carried in a protected header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    pub aud: Option<String>,
    pub exp: Option<u64>,
    pub iat: Option<u64>,
    pub cti: Option<Vec<u8>>,
}

/// The protected header of a COSE_Sign1 in careweave's profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedHeader {
    pub alg: i64,
    pub kid: KeyId,
    pub content_type: String,
    pub claims: Claims,
    pub trust_seq: Option<u64>,
    pub request_hash: Option<[u8; 32]>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub resource_version: Option<String>,
}

impl ProtectedHeader {
    /// A header with EdDSA, the key id and content type, and nothing else.
    pub fn new(kid: KeyId, content_type: &str) -> Self {
        Self {
            alg: ALG_EDDSA,
            kid,
            content_type: content_type.to_owned(),
            claims: Claims::default(),
            trust_seq: None,
            request_hash: None,
            resource_type: None,
            resource_id: None,
            resource_version: None,
        }
    }

    /// Encodes the header map. Keys are integers held in a `BTreeMap<Value>`,
    /// whose order is CBOR's length-first canonical order, so the bytes are
    /// deterministic.
    pub fn encode(&self) -> Result<Vec<u8>, CoseError> {
        let mut map = BTreeMap::new();
        map.insert(int(LABEL_ALG), int(self.alg));
        map.insert(int(LABEL_KID), Value::Bytes(self.kid.as_bytes().to_vec()));
        map.insert(
            int(LABEL_CONTENT_TYPE),
            Value::Text(self.content_type.clone()),
        );
        let claims = encode_claims(&self.claims);
        if let Value::Map(m) = &claims
            && !m.is_empty()
        {
            map.insert(int(LABEL_CWT_CLAIMS), claims);
        }
        if let Some(seq) = self.trust_seq {
            map.insert(int(LABEL_TRUST_SEQ), Value::Integer(i128::from(seq)));
        }
        if let Some(hash) = self.request_hash {
            map.insert(int(LABEL_REQUEST_HASH), Value::Bytes(hash.to_vec()));
        }
        for (label, value) in [
            (LABEL_RESOURCE_TYPE, &self.resource_type),
            (LABEL_RESOURCE_ID, &self.resource_id),
            (LABEL_RESOURCE_VERSION, &self.resource_version),
        ] {
            if let Some(text) = value {
                map.insert(int(label), Value::Text(text.clone()));
            }
        }
        Ok(cbor::encode(&Value::Map(map))?)
    }

    /// Decodes and checks a header map. Unknown labels are refused: the
    /// profile is closed, so nothing unsigned-for can ride along.
    pub fn decode(bytes: &[u8]) -> Result<Self, CoseError> {
        let Value::Map(map) = cbor::decode_value(bytes, Limits::HEADER)? else {
            return Err(shape("protected header is not a map"));
        };
        let mut header = ProtectedHeader::new(KeyId([0; 16]), "");
        let mut seen_alg = false;
        let mut seen_kid = false;
        let mut seen_content_type = false;
        for (key, value) in map {
            let Value::Integer(label) = key else {
                return Err(shape("protected header has a non-integer label"));
            };
            match i64::try_from(label).unwrap_or(i64::MIN) {
                LABEL_ALG => {
                    header.alg = as_i64(&value, "alg")?;
                    seen_alg = true;
                }
                LABEL_KID => {
                    let bytes = as_bytes(value, "kid")?;
                    header.kid = KeyId::from_slice(&bytes).map_err(|e| shape(e.to_string()))?;
                    seen_kid = true;
                }
                LABEL_CONTENT_TYPE => {
                    header.content_type = as_text(value, "content type")?;
                    seen_content_type = true;
                }
                LABEL_CWT_CLAIMS => header.claims = decode_claims(value)?,
                LABEL_TRUST_SEQ => header.trust_seq = Some(as_u64(&value, "trust seq")?),
                LABEL_REQUEST_HASH => {
                    let bytes = as_bytes(value, "request hash")?;
                    header.request_hash = Some(
                        bytes
                            .as_slice()
                            .try_into()
                            .map_err(|_| shape("request hash is not 32 bytes"))?,
                    );
                }
                LABEL_RESOURCE_TYPE => {
                    header.resource_type = Some(as_text(value, "resource type")?)
                }
                LABEL_RESOURCE_ID => header.resource_id = Some(as_text(value, "resource id")?),
                LABEL_RESOURCE_VERSION => {
                    header.resource_version = Some(as_text(value, "resource version")?)
                }
                other => {
                    return Err(shape(format!(
                        "protected header label {other} is not in the profile"
                    )));
                }
            }
        }
        if !seen_alg {
            return Err(shape("protected header has no alg"));
        }
        if !seen_kid {
            return Err(shape("protected header has no kid"));
        }
        if !seen_content_type {
            return Err(shape("protected header has no content type"));
        }
        Ok(header)
    }
}

fn int(v: i64) -> Value {
    Value::Integer(i128::from(v))
}

fn as_i64(value: &Value, what: &str) -> Result<i64, CoseError> {
    match value {
        Value::Integer(i) => i64::try_from(*i).map_err(|_| shape(format!("{what} out of range"))),
        _ => Err(shape(format!("{what} is not an integer"))),
    }
}

fn as_u64(value: &Value, what: &str) -> Result<u64, CoseError> {
    match value {
        Value::Integer(i) => u64::try_from(*i).map_err(|_| shape(format!("{what} out of range"))),
        _ => Err(shape(format!("{what} is not an unsigned integer"))),
    }
}

fn as_text(value: Value, what: &str) -> Result<String, CoseError> {
    match value {
        Value::Text(t) => Ok(t),
        _ => Err(shape(format!("{what} is not text"))),
    }
}

fn as_bytes(value: Value, what: &str) -> Result<Vec<u8>, CoseError> {
    match value {
        Value::Bytes(b) => Ok(b),
        _ => Err(shape(format!("{what} is not a byte string"))),
    }
}

fn encode_claims(claims: &Claims) -> Value {
    let mut map = BTreeMap::new();
    for (key, text) in [
        (claim::ISS, &claims.iss),
        (claim::SUB, &claims.sub),
        (claim::AUD, &claims.aud),
    ] {
        if let Some(t) = text {
            map.insert(int(key), Value::Text(t.clone()));
        }
    }
    for (key, time) in [(claim::EXP, claims.exp), (claim::IAT, claims.iat)] {
        if let Some(t) = time {
            map.insert(int(key), Value::Integer(i128::from(t)));
        }
    }
    if let Some(cti) = &claims.cti {
        map.insert(int(claim::CTI), Value::Bytes(cti.clone()));
    }
    Value::Map(map)
}

fn decode_claims(value: Value) -> Result<Claims, CoseError> {
    let Value::Map(map) = value else {
        return Err(shape("CWT claims are not a map"));
    };
    let mut claims = Claims::default();
    for (key, value) in map {
        let Value::Integer(label) = key else {
            return Err(shape("CWT claims have a non-integer key"));
        };
        match i64::try_from(label).unwrap_or(i64::MIN) {
            claim::ISS => claims.iss = Some(as_text(value, "iss")?),
            claim::SUB => claims.sub = Some(as_text(value, "sub")?),
            claim::AUD => claims.aud = Some(as_text(value, "aud")?),
            claim::EXP => claims.exp = Some(as_u64(&value, "exp")?),
            claim::IAT => claims.iat = Some(as_u64(&value, "iat")?),
            claim::CTI => claims.cti = Some(as_bytes(value, "cti")?),
            other => return Err(shape(format!("CWT claim {other} is not in the profile"))),
        }
    }
    Ok(claims)
}

/// Builds COSE's `Sig_structure` for COSE_Sign1 around the exact bytes.
pub fn sign1_tbs(protected: &[u8], external_aad: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(protected.len() + external_aad.len() + payload.len() + 32);
    cbor::write_array_head(&mut out, 4);
    cbor::write_text(&mut out, "Signature1");
    cbor::write_bytes(&mut out, protected);
    cbor::write_bytes(&mut out, external_aad);
    cbor::write_bytes(&mut out, payload);
    out
}

/// Builds COSE's `Sig_structure` for one signer of a COSE_Sign.
pub fn sign_tbs(
    body_protected: &[u8],
    signer_protected: &[u8],
    external_aad: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        body_protected.len() + signer_protected.len() + external_aad.len() + payload.len() + 32,
    );
    cbor::write_array_head(&mut out, 5);
    cbor::write_text(&mut out, "Signature");
    cbor::write_bytes(&mut out, body_protected);
    cbor::write_bytes(&mut out, signer_protected);
    cbor::write_bytes(&mut out, external_aad);
    cbor::write_bytes(&mut out, payload);
    out
}

fn check_alg(alg: i64) -> Result<(), CoseError> {
    if alg == ALG_EDDSA || alg == ALG_ED25519 {
        Ok(())
    } else {
        Err(CoseError::UnsupportedAlgorithm(alg))
    }
}

/// Splits a decoded COSE array into its parts and checks the common shape:
/// protected bstr, empty unprotected map, embedded payload bstr.
fn split_envelope(
    items: Vec<Value>,
    expected_len: usize,
) -> Result<(Vec<u8>, Vec<u8>, Value), CoseError> {
    if items.len() != expected_len {
        return Err(shape(format!(
            "expected an array of {expected_len} items, found {}",
            items.len()
        )));
    }
    let mut items = items.into_iter();
    let protected = match items.next() {
        Some(Value::Bytes(b)) => b,
        _ => return Err(shape("protected header is not a byte string")),
    };
    match items.next() {
        Some(Value::Map(m)) if m.is_empty() => {}
        Some(Value::Map(_)) => return Err(CoseError::UnprotectedNotEmpty),
        _ => return Err(shape("unprotected header is not a map")),
    }
    let payload = match items.next() {
        Some(Value::Bytes(b)) => b,
        Some(Value::Null) => return Err(shape("detached payloads are not used")),
        _ => return Err(shape("payload is not a byte string")),
    };
    let last = items.next().ok_or_else(|| shape("missing last item"))?;
    Ok((protected, payload, last))
}

fn decode_tagged_array(bytes: &[u8], tag: u64, max_bytes: usize) -> Result<Vec<Value>, CoseError> {
    if bytes.len() > max_bytes {
        return Err(CoseError::TooLarge {
            len: bytes.len(),
            max: max_bytes,
        });
    }
    let inner = cbor::strip_tag(bytes, tag)?;
    let limits = Limits {
        max_bytes,
        ..Limits::MESSAGE
    };
    match cbor::decode_value(inner, limits)? {
        Value::Array(items) => Ok(items),
        _ => Err(shape("COSE object is not an array")),
    }
}

/// A decoded COSE_Sign1 whose signature has not yet been checked.
#[derive(Debug, Clone)]
pub struct Sign1 {
    /// The protected header bytes exactly as received.
    pub protected_bytes: Vec<u8>,
    /// The decoded protected header.
    pub header: ProtectedHeader,
    /// The payload bytes exactly as received.
    pub payload: Vec<u8>,
    signature: [u8; 64],
}

impl Sign1 {
    /// Signs and returns the tagged COSE_Sign1 bytes.
    pub fn sign(
        header: &ProtectedHeader,
        payload: &[u8],
        external_aad: &[u8],
        key: &KeyPair,
    ) -> Result<Vec<u8>, CoseError> {
        let protected = header.encode()?;
        let signature = key.sign(&sign1_tbs(&protected, external_aad, payload));
        let mut out = cbor::tag_head(TAG_SIGN1);
        cbor::write_array_head(&mut out, 4);
        cbor::write_bytes(&mut out, &protected);
        out.push(0xa0); // empty unprotected map
        cbor::write_bytes(&mut out, payload);
        cbor::write_bytes(&mut out, &signature);
        Ok(out)
    }

    /// Decodes the tag, the shape and the protected header, and checks the
    /// algorithm. The signature is not checked here.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Self, CoseError> {
        let items = decode_tagged_array(bytes, TAG_SIGN1, max_bytes)?;
        let (protected_bytes, payload, signature) = split_envelope(items, 4)?;
        let signature = match signature {
            Value::Bytes(b) => <[u8; 64]>::try_from(b.as_slice())
                .map_err(|_| shape("signature is not 64 bytes"))?,
            _ => return Err(shape("signature is not a byte string")),
        };
        let header = ProtectedHeader::decode(&protected_bytes)?;
        check_alg(header.alg)?;
        Ok(Self {
            protected_bytes,
            header,
            payload,
            signature,
        })
    }

    /// Checks the signature over the bytes as received.
    pub fn verify_signature(&self, key: &PublicKey, external_aad: &[u8]) -> Result<(), CoseError> {
        let tbs = sign1_tbs(&self.protected_bytes, external_aad, &self.payload);
        if key.verify_strict(&tbs, &self.signature) {
            Ok(())
        } else {
            Err(CoseError::BadSignature)
        }
    }
}

/// One signer's entry in a COSE_Sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The signer's protected header bytes exactly as received.
    pub protected_bytes: Vec<u8>,
    pub alg: i64,
    pub kid: KeyId,
    pub signature: Vec<u8>,
}

/// A COSE_Sign with any number of signatures, so co-signers can add theirs
/// one after another without touching the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sign {
    /// Body protected header bytes (holds the content type).
    pub protected_bytes: Vec<u8>,
    pub content_type: String,
    pub payload: Vec<u8>,
    pub signers: Vec<Signer>,
}

impl Sign {
    /// Most signatures a trust document may carry.
    pub const MAX_SIGNERS: usize = 32;

    /// An unsigned document with the given content type and payload.
    pub fn new(content_type: &str, payload: Vec<u8>) -> Result<Self, CoseError> {
        let mut map = BTreeMap::new();
        map.insert(
            int(LABEL_CONTENT_TYPE),
            Value::Text(content_type.to_owned()),
        );
        Ok(Self {
            protected_bytes: cbor::encode(&Value::Map(map))?,
            content_type: content_type.to_owned(),
            payload,
            signers: Vec::new(),
        })
    }

    /// Adds one signature. Refuses a second signature by the same key.
    pub fn add_signature(&mut self, key: &KeyPair) -> Result<(), CoseError> {
        if self.signers.iter().any(|s| s.kid == key.kid()) {
            return Err(shape(format!("already signed by key {}", key.kid())));
        }
        if self.signers.len() >= Self::MAX_SIGNERS {
            return Err(shape("too many signatures"));
        }
        let mut map = BTreeMap::new();
        map.insert(int(LABEL_ALG), int(ALG_EDDSA));
        map.insert(int(LABEL_KID), Value::Bytes(key.kid().as_bytes().to_vec()));
        let protected_bytes = cbor::encode(&Value::Map(map))?;
        let tbs = sign_tbs(&self.protected_bytes, &protected_bytes, b"", &self.payload);
        self.signers.push(Signer {
            protected_bytes,
            alg: ALG_EDDSA,
            kid: key.kid(),
            signature: key.sign(&tbs).to_vec(),
        });
        Ok(())
    }

    /// Checks one signer's signature with the given key.
    pub fn verify_signer(&self, signer: &Signer, key: &PublicKey) -> Result<(), CoseError> {
        check_alg(signer.alg)?;
        let tbs = sign_tbs(
            &self.protected_bytes,
            &signer.protected_bytes,
            b"",
            &self.payload,
        );
        if key.verify_strict(&tbs, &signer.signature) {
            Ok(())
        } else {
            Err(CoseError::BadSignature)
        }
    }

    /// The tagged COSE_Sign bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = cbor::tag_head(TAG_SIGN);
        cbor::write_array_head(&mut out, 4);
        cbor::write_bytes(&mut out, &self.protected_bytes);
        out.push(0xa0);
        cbor::write_bytes(&mut out, &self.payload);
        cbor::write_array_head(&mut out, self.signers.len());
        for signer in &self.signers {
            cbor::write_array_head(&mut out, 3);
            cbor::write_bytes(&mut out, &signer.protected_bytes);
            out.push(0xa0);
            cbor::write_bytes(&mut out, &signer.signature);
        }
        out
    }

    /// Decodes a tagged COSE_Sign: shape, empty unprotected headers, each
    /// signer's alg and kid. Signatures are not checked here.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Self, CoseError> {
        let items = decode_tagged_array(bytes, TAG_SIGN, max_bytes)?;
        let (protected_bytes, payload, signers) = split_envelope(items, 4)?;
        let Value::Map(body) = cbor::decode_value(&protected_bytes, Limits::HEADER)? else {
            return Err(shape("body protected header is not a map"));
        };
        let mut content_type = None;
        for (key, value) in body {
            if key == int(LABEL_CONTENT_TYPE) {
                content_type = Some(as_text(value, "content type")?);
            } else {
                return Err(shape(
                    "body protected header has a label outside the profile",
                ));
            }
        }
        let content_type = content_type.ok_or_else(|| shape("body has no content type"))?;
        let Value::Array(signer_items) = signers else {
            return Err(shape("signatures are not an array"));
        };
        if signer_items.len() > Self::MAX_SIGNERS {
            return Err(shape("too many signatures"));
        }
        let mut parsed = Vec::with_capacity(signer_items.len());
        for item in signer_items {
            let Value::Array(parts) = item else {
                return Err(shape("a signature is not an array"));
            };
            let (signer_protected, signature, extra) = match <[Value; 3]>::try_from(parts) {
                Ok([Value::Bytes(p), Value::Map(u), Value::Bytes(s)]) => (p, s, u),
                _ => return Err(shape("a signature is not [protected, {}, signature]")),
            };
            if !extra.is_empty() {
                return Err(CoseError::UnprotectedNotEmpty);
            }
            let Value::Map(map) = cbor::decode_value(&signer_protected, Limits::HEADER)? else {
                return Err(shape("signer protected header is not a map"));
            };
            let (mut alg, mut kid) = (None, None);
            for (key, value) in map {
                if key == int(LABEL_ALG) {
                    alg = Some(as_i64(&value, "alg")?);
                } else if key == int(LABEL_KID) {
                    kid = Some(
                        KeyId::from_slice(&as_bytes(value, "kid")?)
                            .map_err(|e| shape(e.to_string()))?,
                    );
                } else {
                    return Err(shape("signer header has a label outside the profile"));
                }
            }
            let alg = alg.ok_or_else(|| shape("signer header has no alg"))?;
            check_alg(alg)?;
            parsed.push(Signer {
                protected_bytes: signer_protected,
                alg,
                kid: kid.ok_or_else(|| shape("signer header has no kid"))?,
                signature,
            });
        }
        Ok(Self {
            protected_bytes,
            content_type,
            payload,
            signers: parsed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyPair {
        KeyPair::from_secret_bytes(&[4u8; 32])
    }

    fn full_header(kid: KeyId) -> ProtectedHeader {
        let mut h = ProtectedHeader::new(kid, "application/test");
        h.claims = Claims {
            iss: Some("QE1".into()),
            sub: Some("9990000018".into()),
            aud: Some("QWO".into()),
            exp: Some(1_800_000_300),
            iat: Some(1_800_000_000),
            cti: Some(vec![1; 16]),
        };
        h.trust_seq = Some(7);
        h.request_hash = Some([2; 32]);
        h.resource_type = Some("Condition".into());
        h.resource_id = Some("c1".into());
        h.resource_version = Some("3".into());
        h
    }

    #[test]
    fn header_round_trips() {
        let h = full_header(key().kid());
        let bytes = h.encode().unwrap();
        assert_eq!(ProtectedHeader::decode(&bytes).unwrap(), h);
        // Deterministic.
        assert_eq!(h.encode().unwrap(), bytes);
    }

    #[test]
    fn header_refuses_unknown_labels_and_missing_fields() {
        let mut map = BTreeMap::new();
        map.insert(int(LABEL_ALG), int(ALG_EDDSA));
        let no_kid = cbor::encode(&Value::Map(map.clone())).unwrap();
        assert!(matches!(
            ProtectedHeader::decode(&no_kid),
            Err(CoseError::Shape(_))
        ));
        map.insert(int(LABEL_KID), Value::Bytes(vec![0; 16]));
        map.insert(int(LABEL_CONTENT_TYPE), Value::Text("x".into()));
        assert!(ProtectedHeader::decode(&cbor::encode(&Value::Map(map.clone())).unwrap()).is_ok());
        map.insert(int(99), int(1));
        assert!(matches!(
            ProtectedHeader::decode(&cbor::encode(&Value::Map(map)).unwrap()),
            Err(CoseError::Shape(_))
        ));
    }

    #[test]
    fn sign1_round_trip_and_tamper() {
        let k = key();
        let bytes = Sign1::sign(&full_header(k.kid()), b"payload", b"aad", &k).unwrap();
        let s = Sign1::decode(&bytes, 4096).unwrap();
        assert_eq!(s.payload, b"payload");
        s.verify_signature(&k.public_key(), b"aad").unwrap();
        assert_eq!(
            s.verify_signature(&k.public_key(), b"aaX"),
            Err(CoseError::BadSignature)
        );
        let other = KeyPair::from_secret_bytes(&[5u8; 32]);
        assert_eq!(
            s.verify_signature(&other.public_key(), b"aad"),
            Err(CoseError::BadSignature)
        );
    }

    #[test]
    fn sign1_refuses_bad_envelopes() {
        let k = key();
        let good = Sign1::sign(&ProtectedHeader::new(k.kid(), "x"), b"p", b"", &k).unwrap();
        assert!(matches!(
            Sign1::decode(&good, good.len() - 1),
            Err(CoseError::TooLarge { .. })
        ));
        assert!(matches!(
            Sign1::decode(&good[1..], 4096),
            Err(CoseError::Cbor(CborError::WrongTag { .. }))
        ));
        // Unprotected header with an entry: swap a0 for a1 01 01.
        let protected = ProtectedHeader::new(k.kid(), "x").encode().unwrap();
        let mut prefix = vec![0xd2, 0x84];
        cbor::write_bytes(&mut prefix, &protected);
        let pos = prefix.len();
        assert_eq!(good[pos], 0xa0);
        let mut with_unprotected = good[..pos].to_vec();
        with_unprotected.extend_from_slice(&[0xa1, 0x01, 0x27]);
        with_unprotected.extend_from_slice(&good[pos + 1..]);
        assert_eq!(
            Sign1::decode(&with_unprotected, 4096).unwrap_err(),
            CoseError::UnprotectedNotEmpty
        );
        let mut h = ProtectedHeader::new(k.kid(), "x");
        h.alg = -7;
        let es256 = Sign1::sign(&h, b"p", b"", &k).unwrap();
        assert_eq!(
            Sign1::decode(&es256, 4096).unwrap_err(),
            CoseError::UnsupportedAlgorithm(-7)
        );
        h.alg = ALG_ED25519;
        let ed = Sign1::sign(&h, b"p", b"", &k).unwrap();
        Sign1::decode(&ed, 4096)
            .unwrap()
            .verify_signature(&k.public_key(), b"")
            .unwrap();
    }

    #[test]
    fn sign_collects_signatures_one_at_a_time() {
        let a = KeyPair::from_secret_bytes(&[1; 32]);
        let b = KeyPair::from_secret_bytes(&[2; 32]);
        let mut doc = Sign::new("application/x", b"list".to_vec()).unwrap();
        doc.add_signature(&a).unwrap();
        let bytes = doc.encode();
        let mut doc = Sign::decode(&bytes, 4096).unwrap();
        doc.add_signature(&b).unwrap();
        assert!(doc.add_signature(&a).is_err());
        let doc = Sign::decode(&doc.encode(), 4096).unwrap();
        assert_eq!(doc.signers.len(), 2);
        doc.verify_signer(&doc.signers[0], &a.public_key()).unwrap();
        doc.verify_signer(&doc.signers[1], &b.public_key()).unwrap();
        assert!(doc.verify_signer(&doc.signers[1], &a.public_key()).is_err());
    }
}
