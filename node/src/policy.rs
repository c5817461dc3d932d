//! What may leave the node: one place decides, per request and per record.
//!
//! The custodian decides every time:
//! - a restricted (S-flagged) patient answers exactly like an unknown one;
//! - a patient's objection withholds their records and says so (emergency
//!   access overrides it only if the operator configured that);
//! - records in legally sensitive categories, and records labelled very
//!   restricted, never leave;
//! - emergency access (ETREAT) needs a reason and raises an alert;
//! - the requester must be an active member with the consumer role, and
//!   this node must hold the provider role.
//!
//! Everything here is pure: no store, no clock, so the whole matrix is tested.

use std::collections::BTreeSet;

use careweave_protocol::message::{Purpose, RequesterContext, WithheldReason};
use careweave_protocol::trust::{Member, Role};

use crate::store::{PatientFlags, StoredRecord};

/// Why a request is refused outright.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{ods} is not an active member of the trust list")]
    RequesterNotActive { ods: String },
    #[error("{ods} does not hold the consumer role, so it may not ask for records")]
    RequesterNotConsumer { ods: String },
    #[error("this node does not hold the provider role, so it answers no requests")]
    NotProvider,
    #[error("emergency access (ETREAT) needs a break-glass reason")]
    EmergencyWithoutReason,
}

impl Refusal {
    /// A stable label for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::RequesterNotActive { .. } => "requester-not-active",
            Refusal::RequesterNotConsumer { .. } => "requester-not-consumer",
            Refusal::NotProvider => "not-provider",
            Refusal::EmergencyWithoutReason => "emergency-without-reason",
        }
    }
}

/// The policy settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicySettings {
    pub emergency_overrides_objection: bool,
}

/// Checks who is asking and who answers. `requester` is the trust-list
/// member that signed the request; `local` is this node's own entry.
pub fn check_parties(requester: &Member, local: &Member, now: u64) -> Result<(), Refusal> {
    if !requester.is_active_at(now) {
        return Err(Refusal::RequesterNotActive {
            ods: requester.ods.to_string(),
        });
    }
    if !requester.has_role(Role::Consumer) {
        return Err(Refusal::RequesterNotConsumer {
            ods: requester.ods.to_string(),
        });
    }
    if !local.has_role(Role::Provider) {
        return Err(Refusal::NotProvider);
    }
    // The end user's organisation (a practice or trust inside the requesting
    // ICB) is recorded in the audit log rather than matched here.
    Ok(())
}

/// What leaves for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disclosure<'a> {
    /// Records that may leave.
    pub released: Vec<&'a StoredRecord>,
    /// Why others did not (never mentions a restricted patient).
    pub withheld: BTreeSet<WithheldReason>,
    /// Emergency access: raise an alert at this end.
    pub emergency: bool,
}

/// Decides, record by record, what leaves for a patient.
pub fn disclose<'a>(
    context: &RequesterContext,
    flags: &PatientFlags,
    records: &'a [StoredRecord],
    settings: PolicySettings,
) -> Result<Disclosure<'a>, Refusal> {
    let emergency = context.purpose == Purpose::EmergencyTreat;
    if emergency
        && context
            .break_glass_reason
            .as_deref()
            .is_none_or(|r| r.trim().is_empty())
    {
        return Err(Refusal::EmergencyWithoutReason);
    }
    let mut out = Disclosure {
        released: Vec::new(),
        withheld: BTreeSet::new(),
        emergency,
    };
    // Restricted: exactly as unknown. Nothing released, nothing said.
    if flags.restricted || records.is_empty() {
        return Ok(out);
    }
    if flags.objected && !(emergency && settings.emergency_overrides_objection) {
        out.withheld.insert(WithheldReason::Objection);
        return Ok(out);
    }
    for record in records {
        if record.very_restricted {
            out.withheld.insert(WithheldReason::VeryRestricted);
        } else if !record.sensitive_categories.is_empty() {
            out.withheld.insert(WithheldReason::SensitiveCategory);
        } else {
            out.released.push(record);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use careweave_protocol::message::Section;
    use careweave_protocol::trust::MemberStatus;
    use careweave_protocol::{NhsNumber, OdsCode};

    fn context(purpose: Purpose, reason: Option<&str>) -> RequesterContext {
        RequesterContext {
            organisation: OdsCode::parse("QHG").unwrap(),
            user_id: "u".into(),
            role_profile_id: "r".into(),
            role_code: "R8000".into(),
            purpose,
            relationship: "direct-care".into(),
            break_glass_reason: reason.map(str::to_owned),
            request_id: "60ef4f6e-1d35-4ec4-9b8e-7f5b1f2e9c1a".into(),
            correlation_id: None,
        }
    }

    fn record(id: &str, very_restricted: bool, sensitive: &[&str]) -> StoredRecord {
        StoredRecord {
            nhs_number: NhsNumber::parse("9990000018").unwrap(),
            section: Section::Problems,
            resource_type: "Condition".into(),
            id: id.into(),
            version: "1".into(),
            date: None,
            very_restricted,
            sensitive_categories: sensitive.iter().map(|s| s.to_string()).collect(),
            document_type: None,
            signed: vec![],
        }
    }

    fn member(ods: &str, roles: Vec<Role>, status: MemberStatus) -> Member {
        Member {
            ods: OdsCode::parse(ods).unwrap(),
            name: ods.into(),
            status,
            roles,
            valid_from: 0,
            valid_until: 100,
            peers: vec![],
            keys: vec![],
            predecessors: vec![],
            contact: None,
        }
    }

    const TREAT: PolicySettings = PolicySettings {
        emergency_overrides_objection: false,
    };

    #[test]
    fn ordinary_records_are_released() {
        let records = [record("a", false, &[]), record("b", false, &[])];
        let d = disclose(
            &context(Purpose::Treat, None),
            &PatientFlags::default(),
            &records,
            TREAT,
        )
        .unwrap();
        assert_eq!(d.released.len(), 2);
        assert!(d.withheld.is_empty());
        assert!(!d.emergency);
    }

    #[test]
    fn restricted_patient_looks_unknown() {
        let records = [record("a", false, &[]), record("b", true, &[])];
        let flags = PatientFlags {
            restricted: true,
            objected: true,
            ..PatientFlags::default()
        };
        let restricted = disclose(&context(Purpose::Treat, None), &flags, &records, TREAT).unwrap();
        let unknown = disclose(
            &context(Purpose::Treat, None),
            &PatientFlags::default(),
            &[],
            TREAT,
        )
        .unwrap();
        assert_eq!(restricted, unknown);
        // Even emergency access does not reveal a restricted patient.
        let e = disclose(
            &context(Purpose::EmergencyTreat, Some("collapse")),
            &flags,
            &records,
            TREAT,
        )
        .unwrap();
        assert!(e.released.is_empty() && e.withheld.is_empty());
    }

    #[test]
    fn objection_withholds_with_a_reason() {
        let records = [record("a", false, &[])];
        let flags = PatientFlags {
            objected: true,
            objection: Some("asked in clinic".into()),
            ..PatientFlags::default()
        };
        let d = disclose(&context(Purpose::Treat, None), &flags, &records, TREAT).unwrap();
        assert!(d.released.is_empty());
        assert_eq!(d.withheld, BTreeSet::from([WithheldReason::Objection]));
    }

    #[test]
    fn emergency_overrides_objection_only_when_configured() {
        let records = [record("a", false, &[])];
        let flags = PatientFlags {
            objected: true,
            ..PatientFlags::default()
        };
        let ctx = context(Purpose::EmergencyTreat, Some("unconscious in ED"));
        let off = disclose(&ctx, &flags, &records, TREAT).unwrap();
        assert!(off.released.is_empty());
        assert!(off.withheld.contains(&WithheldReason::Objection));
        let on = disclose(
            &ctx,
            &flags,
            &records,
            PolicySettings {
                emergency_overrides_objection: true,
            },
        )
        .unwrap();
        assert_eq!(on.released.len(), 1);
        assert!(on.emergency);
    }

    #[test]
    fn sensitive_and_very_restricted_records_never_leave() {
        let records = [
            record("ok", false, &[]),
            record("sti", false, &["sexually-transmitted-infection"]),
            record("v", true, &[]),
        ];
        for ctx in [
            context(Purpose::Treat, None),
            context(Purpose::EmergencyTreat, Some("cardiac arrest")),
        ] {
            let d = disclose(
                &ctx,
                &PatientFlags::default(),
                &records,
                PolicySettings {
                    emergency_overrides_objection: true,
                },
            )
            .unwrap();
            assert_eq!(d.released.len(), 1);
            assert_eq!(d.released[0].id, "ok");
            assert_eq!(
                d.withheld,
                BTreeSet::from([
                    WithheldReason::SensitiveCategory,
                    WithheldReason::VeryRestricted
                ])
            );
        }
    }

    #[test]
    fn emergency_needs_a_reason_and_raises_an_alert() {
        let records = [record("a", false, &[])];
        assert_eq!(
            disclose(
                &context(Purpose::EmergencyTreat, None),
                &PatientFlags::default(),
                &records,
                TREAT
            ),
            Err(Refusal::EmergencyWithoutReason)
        );
        assert_eq!(
            disclose(
                &context(Purpose::EmergencyTreat, Some("  ")),
                &PatientFlags::default(),
                &records,
                TREAT
            ),
            Err(Refusal::EmergencyWithoutReason)
        );
        let d = disclose(
            &context(Purpose::EmergencyTreat, Some("anaphylaxis")),
            &PatientFlags::default(),
            &records,
            TREAT,
        )
        .unwrap();
        assert!(d.emergency);
        assert_eq!(d.released.len(), 1);
    }

    #[test]
    fn requester_must_be_an_active_consumer_and_we_a_provider() {
        let both = vec![Role::Provider, Role::Consumer];
        let local = member("QUE", both.clone(), MemberStatus::Active);
        check_parties(
            &member("QHG", both.clone(), MemberStatus::Active),
            &local,
            50,
        )
        .unwrap();
        assert_eq!(
            check_parties(
                &member("QHG", vec![Role::Provider], MemberStatus::Active),
                &local,
                50
            )
            .unwrap_err()
            .reason(),
            "requester-not-consumer"
        );
        assert_eq!(
            check_parties(
                &member("QHG", both.clone(), MemberStatus::Suspended),
                &local,
                50
            )
            .unwrap_err()
            .reason(),
            "requester-not-active"
        );
        assert_eq!(
            check_parties(
                &member("QHG", both.clone(), MemberStatus::Active),
                &local,
                500
            )
            .unwrap_err()
            .reason(),
            "requester-not-active"
        );
        let consumer_only = member("QUE", vec![Role::Consumer], MemberStatus::Active);
        assert_eq!(
            check_parties(
                &member("QHG", both, MemberStatus::Active),
                &consumer_only,
                50
            ),
            Err(Refusal::NotProvider)
        );
    }
}
