//! Custodian-signed records: a FHIR R4 resource's JSON bytes in a tagged
//! COSE_Sign1, signed once at ingest by the custodian's record key and
//! carried unchanged wherever the record goes.
//!
//! The protected header binds the record to its custodian (`iss`), patient
//! (`sub`, the NHS number), time (`iat`) and resource type, id and version,
//! and [`verify_record`] checks the JSON says the same, so a signed record can
//! never be passed off as another patient's or as a newer version.

use serde::Deserialize;

use crate::cose::{Claims, CoseError, ProtectedHeader, Sign1};
use crate::keys::{KeyId, KeyPair};
use crate::nhs::NhsNumber;
use crate::ods::OdsCode;
use crate::trust::{AcceptedList, KeyLookupError};

/// Content type of a signed record's payload.
pub const RECORD_CONTENT_TYPE: &str = "application/fhir+json";
/// Largest signed record accepted.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// What the custodian vouches for about a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLabel {
    pub custodian: OdsCode,
    pub nhs_number: NhsNumber,
    pub signed_at: u64,
    pub resource_type: String,
    pub resource_id: String,
    pub version: String,
}

/// Why a signed record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record envelope: {0}")]
    Envelope(#[from] CoseError),
    #[error("record header: {0}")]
    Header(String),
    #[error("record key: {0}")]
    Key(#[from] KeyLookupError),
    #[error("record is signed by {key_owner}'s key but claims custodian {claimed}")]
    WrongCustodian {
        key_owner: OdsCode,
        claimed: OdsCode,
    },
    #[error("record signature does not verify")]
    BadSignature,
    #[error("record content does not match its signed label: {0}")]
    ContentMismatch(String),
}

#[derive(Deserialize)]
struct ResourceIdentity {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: String,
    meta: Option<ResourceMeta>,
}

#[derive(Deserialize)]
struct ResourceMeta {
    #[serde(rename = "versionId")]
    version_id: Option<String>,
}

fn identity(json: &[u8]) -> Result<(String, String, Option<String>), RecordError> {
    let parsed: ResourceIdentity = serde_json::from_slice(json)
        .map_err(|e| RecordError::ContentMismatch(format!("not a FHIR resource: {e}")))?;
    Ok((
        parsed.resource_type,
        parsed.id,
        parsed.meta.and_then(|m| m.version_id),
    ))
}

fn check_content(json: &[u8], label: &RecordLabel) -> Result<(), RecordError> {
    let (resource_type, id, version) = identity(json)?;
    if resource_type != label.resource_type {
        return Err(RecordError::ContentMismatch("resourceType".into()));
    }
    if id != label.resource_id {
        return Err(RecordError::ContentMismatch("id".into()));
    }
    if version.as_deref() != Some(label.version.as_str()) {
        return Err(RecordError::ContentMismatch("meta.versionId".into()));
    }
    Ok(())
}

/// Signs a record's JSON bytes with the custodian's record key. The JSON must
/// name the same resource type, id and `meta.versionId` as the label.
pub fn sign_record(
    json: &[u8],
    label: &RecordLabel,
    key: &KeyPair,
) -> Result<Vec<u8>, RecordError> {
    check_content(json, label)?;
    let mut header = ProtectedHeader::new(key.kid(), RECORD_CONTENT_TYPE);
    header.claims = Claims {
        iss: Some(label.custodian.to_string()),
        sub: Some(label.nhs_number.digits()),
        iat: Some(label.signed_at),
        ..Claims::default()
    };
    header.resource_type = Some(label.resource_type.clone());
    header.resource_id = Some(label.resource_id.clone());
    header.resource_version = Some(label.version.clone());
    Ok(Sign1::sign(&header, json, b"", key)?)
}

/// A record whose custodian signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord {
    pub label: RecordLabel,
    pub kid: KeyId,
    /// The FHIR resource's JSON bytes, exactly as signed.
    pub json: Vec<u8>,
    /// The whole custodian-signed record (COSE_Sign1) as it travelled.
    pub signed: Vec<u8>,
}

fn header_text(value: &Option<String>, what: &str) -> Result<String, RecordError> {
    value
        .clone()
        .ok_or_else(|| RecordError::Header(format!("{what} is missing")))
}

/// Verifies a custodian-signed record against the trust list: a record key
/// that was good when the record was signed, held by the custodian (or by
/// the ICB that succeeded it), a valid signature, and JSON that matches the
/// signed label.
pub fn verify_record(bytes: &[u8], trust: &AcceptedList) -> Result<VerifiedRecord, RecordError> {
    let sign1 = Sign1::decode(bytes, MAX_RECORD_BYTES)?;
    let header = &sign1.header;
    if header.content_type != RECORD_CONTENT_TYPE {
        return Err(RecordError::Header(
            "content type is not application/fhir+json".into(),
        ));
    }
    if header.trust_seq.is_some() || header.request_hash.is_some() {
        return Err(RecordError::Header(
            "records carry no message labels".into(),
        ));
    }
    let claims = &header.claims;
    if claims.aud.is_some() || claims.exp.is_some() || claims.cti.is_some() {
        return Err(RecordError::Header(
            "records carry only iss, sub and iat".into(),
        ));
    }
    let custodian = OdsCode::parse(&header_text(&claims.iss, "iss")?)
        .map_err(|e| RecordError::Header(format!("iss: {e}")))?;
    let nhs_number = NhsNumber::parse(&header_text(&claims.sub, "sub")?)
        .map_err(|e| RecordError::Header(format!("sub: {e}")))?;
    let signed_at = claims
        .iat
        .ok_or_else(|| RecordError::Header("iat is missing".into()))?;
    let label = RecordLabel {
        custodian,
        nhs_number,
        signed_at,
        resource_type: header_text(&header.resource_type, "resource type")?,
        resource_id: header_text(&header.resource_id, "resource id")?,
        version: header_text(&header.resource_version, "resource version")?,
    };
    let (member, key) = trust.record_key_at(&header.kid, signed_at)?;
    if member.ods != label.custodian && !member.predecessors.contains(&label.custodian) {
        return Err(RecordError::WrongCustodian {
            key_owner: member.ods.clone(),
            claimed: label.custodian,
        });
    }
    sign1
        .verify_signature(&key.public, b"")
        .map_err(|_| RecordError::BadSignature)?;
    check_content(&sign1.payload, &label)?;
    Ok(VerifiedRecord {
        label,
        kid: header.kid,
        json: sign1.payload,
        signed: bytes.to_vec(),
    })
}
