//! The payloads of peer messages: locate, fetch, trust pull and errors.
//!
//! Each payload is CBOR inside a signed COSE_Sign1 (see [`crate::envelope`]).
//! The content type in the protected header says which payload it is.
//! Decoding is strict (unknown fields are refused) and every payload is
//! checked by [`Payload::validate`] before anyone acts on it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::nhs::NhsNumber;
use crate::ods::OdsCode;

/// Longest free-text field (ids, codes, displays).
pub const MAX_SHORT_TEXT: usize = 256;
/// Longest break-glass reason or error message.
pub const MAX_LONG_TEXT: usize = 1024;
/// Most pointers in one locate response.
pub const MAX_POINTERS: usize = 1024;
/// Most records in one fetch response.
pub const MAX_RECORDS: usize = 1024;
/// Most roots in one trust pull response.
pub const MAX_ROOT_CHAIN: usize = 16;

/// Why a payload is refused after decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {problem}")]
pub struct PayloadError {
    pub what: &'static str,
    pub problem: String,
}

fn problem(what: &'static str, problem: impl Into<String>) -> PayloadError {
    PayloadError {
        what,
        problem: problem.into(),
    }
}

fn check_text(
    value: &str,
    max: usize,
    what: &'static str,
    field: &str,
) -> Result<(), PayloadError> {
    if value.len() > max {
        return Err(problem(what, format!("{field} is longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(problem(what, format!("{field} holds control characters")));
    }
    Ok(())
}

fn check_required(
    value: &str,
    max: usize,
    what: &'static str,
    field: &str,
) -> Result<(), PayloadError> {
    if value.trim().is_empty() {
        return Err(problem(what, format!("{field} is empty")));
    }
    check_text(value, max, what, field)
}

/// Whether text is a UUID in its 8-4-4-4-12 hexadecimal form.
pub fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Why a record is being looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Purpose {
    /// Direct care.
    #[serde(rename = "TREAT")]
    Treat,
    /// Emergency ("break glass") access: needs a reason, raises an alert at both ends.
    #[serde(rename = "ETREAT")]
    EmergencyTreat,
}

/// Who is asking and why, carried in every locate and fetch request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequesterContext {
    /// The end user's organisation (ODS).
    pub organisation: OdsCode,
    /// SDS user id.
    pub user_id: String,
    pub role_profile_id: String,
    pub role_code: String,
    pub purpose: Purpose,
    /// The basis of the legitimate relationship with the patient.
    pub relationship: String,
    /// Required when `purpose` is emergency access.
    pub break_glass_reason: Option<String>,
    /// The clinical system's `X-Request-ID` (UUID).
    pub request_id: String,
    /// The clinical system's `X-Correlation-ID`, if sent.
    pub correlation_id: Option<String>,
}

impl RequesterContext {
    /// Checks the fields: all present and bounded, a UUID request id, and a
    /// reason whenever access is emergency access.
    pub fn validate(&self) -> Result<(), PayloadError> {
        const W: &str = "requester context";
        check_required(&self.user_id, MAX_SHORT_TEXT, W, "user id")?;
        check_required(&self.role_profile_id, MAX_SHORT_TEXT, W, "role profile id")?;
        check_required(&self.role_code, MAX_SHORT_TEXT, W, "role code")?;
        check_required(&self.relationship, MAX_SHORT_TEXT, W, "relationship basis")?;
        if !is_uuid(&self.request_id) {
            return Err(problem(W, "request id is not a UUID"));
        }
        if let Some(correlation) = &self.correlation_id {
            check_text(correlation, MAX_SHORT_TEXT, W, "correlation id")?;
        }
        match (&self.purpose, &self.break_glass_reason) {
            (Purpose::EmergencyTreat, None) => {
                return Err(problem(
                    W,
                    "emergency access (ETREAT) needs a break-glass reason",
                ));
            }
            (_, Some(reason)) => check_required(reason, MAX_LONG_TEXT, W, "break-glass reason")?,
            (Purpose::Treat, None) => {}
        }
        Ok(())
    }
}

/// PRSB Core Information Standard sections records are filed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Section {
    Allergies,
    Medications,
    Problems,
    Procedures,
    Investigations,
    Vaccinations,
    Alerts,
    CarePlans,
    Documents,
    Encounters,
}

impl Section {
    /// Every section, in order.
    pub const ALL: [Section; 10] = [
        Section::Allergies,
        Section::Medications,
        Section::Problems,
        Section::Procedures,
        Section::Investigations,
        Section::Vaccinations,
        Section::Alerts,
        Section::CarePlans,
        Section::Documents,
        Section::Encounters,
    ];

    /// The wire name, as in configuration files: `care-plans`.
    pub fn as_str(self) -> &'static str {
        match self {
            Section::Allergies => "allergies",
            Section::Medications => "medications",
            Section::Problems => "problems",
            Section::Procedures => "procedures",
            Section::Investigations => "investigations",
            Section::Vaccinations => "vaccinations",
            Section::Alerts => "alerts",
            Section::CarePlans => "care-plans",
            Section::Documents => "documents",
            Section::Encounters => "encounters",
        }
    }

    /// The section with this wire name.
    pub fn from_name(name: &str) -> Option<Section> {
        Section::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The name people read: `care plans`.
    pub fn label(self) -> String {
        self.as_str().replace('-', " ")
    }
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A code with its system, as FHIR's Coding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coding {
    pub system: String,
    pub code: String,
    pub display: String,
}

impl Coding {
    fn validate(&self, field: &str) -> Result<(), PayloadError> {
        check_required(&self.system, MAX_SHORT_TEXT, "pointer", field)?;
        check_required(&self.code, MAX_SHORT_TEXT, "pointer", field)?;
        check_text(&self.display, MAX_SHORT_TEXT, "pointer", field)
    }
}

/// A pointer to records, shaped like an NRL DocumentReference pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pointer {
    /// `<custodian ODS>-<opaque id>`.
    pub id: String,
    pub custodian: OdsCode,
    pub section: Section,
    pub type_code: Coding,
    pub category: Coding,
    /// How many records the pointer leads to.
    pub count: u32,
    /// Earliest record date (`YYYY-MM-DD`), if known.
    pub date_from: Option<String>,
    /// Latest record date (`YYYY-MM-DD`), if known.
    pub date_to: Option<String>,
}

fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

impl Pointer {
    /// Checks the id's custodian prefix, the codes and the dates.
    pub fn validate(&self) -> Result<(), PayloadError> {
        check_required(&self.id, MAX_SHORT_TEXT, "pointer", "id")?;
        let opaque = self
            .id
            .strip_prefix(self.custodian.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .ok_or_else(|| {
                problem(
                    "pointer",
                    "id does not start with the custodian's ODS code and '-'",
                )
            })?;
        if opaque.is_empty()
            || !opaque
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(problem(
                "pointer",
                "opaque id must be letters, digits, '-' or '.'",
            ));
        }
        self.type_code.validate("type")?;
        self.category.validate("category")?;
        for date in [&self.date_from, &self.date_to].into_iter().flatten() {
            if !is_date(date) {
                return Err(problem("pointer", "dates must be YYYY-MM-DD"));
            }
        }
        if let (Some(from), Some(to)) = (&self.date_from, &self.date_to)
            && from > to
        {
            return Err(problem("pointer", "date range ends before it starts"));
        }
        Ok(())
    }
}

/// Why a custodian withheld records. There is deliberately no "restricted
/// patient" reason: a restricted patient answers exactly like an unknown one.
/// No reason carries counts, sections or categories, so a withholding never
/// reveals what was withheld.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WithheldReason {
    /// The patient objected to sharing.
    Objection,
    /// Records in legally sensitive categories never leave the custodian.
    SensitiveCategory,
    /// Records labelled very restricted never leave the custodian.
    VeryRestricted,
    /// Records are held in sections the custodian does not share with the
    /// requester's ICB. Sent only by custodians configured to disclose that
    /// records exist; see `not_shared`.
    NoAgreement,
}

fn check_not_shared(not_shared: &[Section], what: &'static str) -> Result<(), PayloadError> {
    if not_shared.windows(2).any(|w| w.first() >= w.get(1)) {
        return Err(problem(
            what,
            "not_shared must list sections in order, each once",
        ));
    }
    Ok(())
}

fn check_withheld(withheld: &[WithheldReason], what: &'static str) -> Result<(), PayloadError> {
    let mut sorted = withheld.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != withheld.len() {
        return Err(problem(what, "a withheld reason appears twice"));
    }
    Ok(())
}

/// "Which ICBs hold records for this NHS number?"
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocateRequest {
    pub nhs_number: NhsNumber,
    pub context: RequesterContext,
    /// Only these sections, or all when absent.
    pub sections: Option<Vec<Section>>,
}

/// One custodian's answer to a locate. No pointers and nothing withheld
/// means "no records" (or a restricted patient, indistinguishably).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocateResponse {
    pub custodian: OdsCode,
    pub pointers: Vec<Pointer>,
    pub withheld: Vec<WithheldReason>,
    /// The asked-for sections the custodian's sharing agreement does not
    /// share with the requester's ICB, in order. It follows from the
    /// agreement alone, so it says nothing about the patient.
    pub not_shared: Vec<Section>,
}

/// "Give me the records behind this pointer."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    pub nhs_number: NhsNumber,
    pub pointer_id: String,
    pub context: RequesterContext,
}

/// The custodian's records, each still carrying the custodian's signature
/// from ingest (tagged COSE_Sign1 bytes, see [`crate::record`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchResponse {
    pub custodian: OdsCode,
    pub records: Vec<serde_bytes::ByteBuf>,
    pub withheld: Vec<WithheldReason>,
    /// As in [`LocateResponse::not_shared`]: the sections behind the pointer
    /// (or every section) the agreement does not share with the requester.
    pub not_shared: Vec<Section>,
}

/// "Send me anything newer than what I hold."
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustRequest {
    pub root_version: u64,
    pub list_seq: u64,
}

/// Roots after the requester's version, in order, and the newest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustResponse {
    pub roots: Vec<serde_bytes::ByteBuf>,
    pub list: Option<serde_bytes::ByteBuf>,
}

/// Machine-readable class of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Over the peer's rate or the node's capacity; try again later.
    Busy,
    /// The request could not be decoded or was invalid.
    BadRequest,
    /// The request failed verification (signature, key, time, replay).
    Unauthorised,
    /// Policy refused the request.
    Refused,
    /// The pointer is not known to the custodian.
    NotFound,
    /// The node holds no current trust list and answers nothing.
    TrustUnavailable,
    /// The node could not write its audit log or store.
    Internal,
}

/// A refusal, signed like any other response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

/// The kinds of message, each with its own content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    LocateRequest,
    LocateResponse,
    FetchRequest,
    FetchResponse,
    TrustRequest,
    TrustResponse,
    Error,
}

impl MessageKind {
    /// Every kind.
    pub const ALL: [MessageKind; 7] = [
        MessageKind::LocateRequest,
        MessageKind::LocateResponse,
        MessageKind::FetchRequest,
        MessageKind::FetchResponse,
        MessageKind::TrustRequest,
        MessageKind::TrustResponse,
        MessageKind::Error,
    ];

    /// The content type in the protected header.
    pub fn content_type(self) -> &'static str {
        match self {
            MessageKind::LocateRequest => "application/careweave-locate-request+cbor",
            MessageKind::LocateResponse => "application/careweave-locate-response+cbor",
            MessageKind::FetchRequest => "application/careweave-fetch-request+cbor",
            MessageKind::FetchResponse => "application/careweave-fetch-response+cbor",
            MessageKind::TrustRequest => "application/careweave-trust-request+cbor",
            MessageKind::TrustResponse => "application/careweave-trust-response+cbor",
            MessageKind::Error => "application/careweave-error+cbor",
        }
    }

    /// The kind for a content type.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.content_type() == content_type)
    }

    /// Whether this is a response (and so must carry the request's hash).
    pub fn is_response(self) -> bool {
        matches!(
            self,
            MessageKind::LocateResponse
                | MessageKind::FetchResponse
                | MessageKind::TrustResponse
                | MessageKind::Error
        )
    }
}

/// A payload type that travels in a signed message.
pub trait Payload: Serialize + DeserializeOwned {
    /// Which kind it is.
    const KIND: MessageKind;
    /// Checks the decoded fields.
    fn validate(&self) -> Result<(), PayloadError>;
}

impl Payload for LocateRequest {
    const KIND: MessageKind = MessageKind::LocateRequest;
    fn validate(&self) -> Result<(), PayloadError> {
        self.context.validate()?;
        if let Some(sections) = &self.sections
            && (sections.is_empty() || sections.len() > 16)
        {
            return Err(problem(
                "locate request",
                "sections must list 1 to 16 sections",
            ));
        }
        Ok(())
    }
}

impl Payload for LocateResponse {
    const KIND: MessageKind = MessageKind::LocateResponse;
    fn validate(&self) -> Result<(), PayloadError> {
        if self.pointers.len() > MAX_POINTERS {
            return Err(problem(
                "locate response",
                format!("more than {MAX_POINTERS} pointers"),
            ));
        }
        for pointer in &self.pointers {
            pointer.validate()?;
            if pointer.custodian != self.custodian {
                return Err(problem(
                    "locate response",
                    "a pointer names another custodian",
                ));
            }
            if self.not_shared.contains(&pointer.section) {
                return Err(problem(
                    "locate response",
                    "a pointer is in a section the answer says is not shared",
                ));
            }
        }
        check_not_shared(&self.not_shared, "locate response")?;
        check_withheld(&self.withheld, "locate response")
    }
}

impl Payload for FetchRequest {
    const KIND: MessageKind = MessageKind::FetchRequest;
    fn validate(&self) -> Result<(), PayloadError> {
        self.context.validate()?;
        check_required(
            &self.pointer_id,
            MAX_SHORT_TEXT,
            "fetch request",
            "pointer id",
        )
    }
}

impl Payload for FetchResponse {
    const KIND: MessageKind = MessageKind::FetchResponse;
    fn validate(&self) -> Result<(), PayloadError> {
        if self.records.len() > MAX_RECORDS {
            return Err(problem(
                "fetch response",
                format!("more than {MAX_RECORDS} records"),
            ));
        }
        check_not_shared(&self.not_shared, "fetch response")?;
        check_withheld(&self.withheld, "fetch response")
    }
}

impl Payload for TrustRequest {
    const KIND: MessageKind = MessageKind::TrustRequest;
    fn validate(&self) -> Result<(), PayloadError> {
        Ok(())
    }
}

impl Payload for TrustResponse {
    const KIND: MessageKind = MessageKind::TrustResponse;
    fn validate(&self) -> Result<(), PayloadError> {
        if self.roots.len() > MAX_ROOT_CHAIN {
            return Err(problem(
                "trust response",
                format!("more than {MAX_ROOT_CHAIN} roots"),
            ));
        }
        Ok(())
    }
}

impl Payload for ErrorMessage {
    const KIND: MessageKind = MessageKind::Error;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text(&self.message, MAX_LONG_TEXT, "error", "message")
    }
}

/// Any decoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    LocateRequest(LocateRequest),
    LocateResponse(LocateResponse),
    FetchRequest(FetchRequest),
    FetchResponse(FetchResponse),
    TrustRequest(TrustRequest),
    TrustResponse(TrustResponse),
    Error(ErrorMessage),
}

impl Message {
    /// The kind of payload.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::LocateRequest(_) => MessageKind::LocateRequest,
            Message::LocateResponse(_) => MessageKind::LocateResponse,
            Message::FetchRequest(_) => MessageKind::FetchRequest,
            Message::FetchResponse(_) => MessageKind::FetchResponse,
            Message::TrustRequest(_) => MessageKind::TrustRequest,
            Message::TrustResponse(_) => MessageKind::TrustResponse,
            Message::Error(_) => MessageKind::Error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn context() -> RequesterContext {
        RequesterContext {
            organisation: OdsCode::parse("QE1").unwrap(),
            user_id: "555021935107".into(),
            role_profile_id: "555021936108".into(),
            role_code: "R8000".into(),
            purpose: Purpose::Treat,
            relationship: "direct-care".into(),
            break_glass_reason: None,
            request_id: "60ef4f6e-1d35-4ec4-9b8e-7f5b1f2e9c1a".into(),
            correlation_id: None,
        }
    }

    #[test]
    fn emergency_access_needs_a_reason() {
        let mut c = context();
        c.purpose = Purpose::EmergencyTreat;
        assert!(c.validate().unwrap_err().problem.contains("break-glass"));
        c.break_glass_reason = Some("   ".into());
        assert!(c.validate().is_err());
        c.break_glass_reason = Some("unconscious patient in ED".into());
        c.validate().unwrap();
    }

    #[test]
    fn context_fields_are_checked() {
        let mut c = context();
        c.request_id = "not-a-uuid".into();
        assert!(c.validate().is_err());
        let mut c = context();
        c.user_id = String::new();
        assert!(c.validate().is_err());
        let mut c = context();
        c.role_code = "x".repeat(MAX_SHORT_TEXT + 1);
        assert!(c.validate().is_err());
        let mut c = context();
        c.relationship = "a\nb".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn purpose_uses_nhs_codes() {
        assert_eq!(
            serde_json::to_string(&Purpose::EmergencyTreat).unwrap(),
            "\"ETREAT\""
        );
        assert_eq!(serde_json::to_string(&Purpose::Treat).unwrap(), "\"TREAT\"");
    }

    fn pointer() -> Pointer {
        Pointer {
            id: "QE1-a1b2".into(),
            custodian: OdsCode::parse("QE1").unwrap(),
            section: Section::Allergies,
            type_code: Coding {
                system: "http://snomed.info/sct".into(),
                code: "722446000".into(),
                display: "Allergy record".into(),
            },
            category: Coding {
                system: "http://snomed.info/sct".into(),
                code: "734163000".into(),
                display: "Care plan".into(),
            },
            count: 2,
            date_from: Some("2024-01-02".into()),
            date_to: Some("2025-03-04".into()),
        }
    }

    #[test]
    fn pointer_rules() {
        pointer().validate().unwrap();
        let mut p = pointer();
        p.id = "QWO-a1".into();
        assert!(p.validate().is_err());
        let mut p = pointer();
        p.id = "QE1-".into();
        assert!(p.validate().is_err());
        let mut p = pointer();
        p.date_from = Some("2024-1-2".into());
        assert!(p.validate().is_err());
        let mut p = pointer();
        p.date_from = Some("2026-01-01".into());
        assert!(p.validate().is_err());
    }

    #[test]
    fn responses_are_checked() {
        let mut r = LocateResponse {
            custodian: OdsCode::parse("QE1").unwrap(),
            pointers: vec![pointer()],
            withheld: vec![WithheldReason::Objection],
            not_shared: vec![Section::CarePlans, Section::Documents],
        };
        r.validate().unwrap();
        r.withheld.push(WithheldReason::Objection);
        assert!(r.validate().is_err());
        r.withheld.pop();
        r.not_shared = vec![Section::Documents, Section::CarePlans];
        assert!(r.validate().is_err(), "out of order");
        r.not_shared = vec![Section::CarePlans, Section::CarePlans];
        assert!(r.validate().is_err(), "twice");
        r.not_shared = vec![pointer().section];
        assert!(r.validate().is_err(), "a pointer in a section not shared");
        r.not_shared = vec![];
        r.custodian = OdsCode::parse("QWO").unwrap();
        assert!(r.validate().is_err());
    }

    #[test]
    fn section_names_round_trip() {
        for section in Section::ALL {
            assert_eq!(Section::from_name(section.as_str()), Some(section));
            let wire = crate::cbor::encode(&section).unwrap();
            let name: String = crate::cbor::decode(&wire, crate::cbor::Limits::MESSAGE).unwrap();
            assert_eq!(name, section.as_str());
        }
        assert_eq!(Section::from_name("care plans"), None);
        assert_eq!(Section::CarePlans.label(), "care plans");
    }

    #[test]
    fn unknown_fields_are_refused() {
        #[derive(Serialize)]
        struct Extra {
            root_version: u64,
            list_seq: u64,
            surprise: u64,
        }
        let bytes = crate::cbor::encode(&Extra {
            root_version: 1,
            list_seq: 2,
            surprise: 3,
        })
        .unwrap();
        assert!(crate::cbor::decode::<TrustRequest>(&bytes, crate::cbor::Limits::MESSAGE).is_err());
    }

    #[test]
    fn content_types_are_distinct_and_round_trip() {
        for kind in MessageKind::ALL {
            assert_eq!(
                MessageKind::from_content_type(kind.content_type()),
                Some(kind)
            );
        }
        assert_eq!(MessageKind::from_content_type("application/json"), None);
    }
}
