//! Sharing agreements: which ICBs may receive this ICB's records, per
//! section. The custodian decides on every request, beside the policy of
//! [`crate::policy`]: a section is shared nationally (every active member of
//! the trust list), with a named set of ICBs, or with no one outside this ICB.
//!
//! What is not shared follows from the agreement alone, so it can be said to
//! anyone without saying anything about the patient. Whether an answer also
//! says that records exist in those sections is a separate switch, off by
//! default.
//!
//! Pure: no store, no clock, no I/O.
//!
//! ```
//! use careweave_node::config::SharingSection;
//! use careweave_node::sharing::Agreement;
//! use careweave_protocol::message::Section;
//! use careweave_protocol::OdsCode;
//!
//! let config: SharingSection = toml::from_str(r#"
//!     scope = "national"
//!     [sections.care-plans]
//!     scope = "icbs"
//!     icbs = ["QUE"]
//! "#).unwrap();
//! let agreement = Agreement::from_config(&config).unwrap();
//! let qhg = OdsCode::parse("QHG").unwrap();
//! assert_eq!(agreement.not_shared(&qhg, &[], None), vec![Section::CarePlans]);
//! let que = OdsCode::parse("QUE").unwrap();
//! assert!(agreement.not_shared(&que, &[], None).is_empty());
//! ```

use std::collections::{BTreeMap, BTreeSet};

use careweave_protocol::OdsCode;
use careweave_protocol::message::Section;
use serde::Serialize;

use crate::config::{ScopeKind, SharingSection};

/// ICBs named in one scope, at most. There are 42 ICBs (36 after the April
/// 2026 merges); the room is for predecessor codes.
pub const MAX_NAMED_ICBS: usize = 128;

/// Who receives one section's records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "scope", content = "icbs", rename_all = "kebab-case")]
pub enum Scope {
    /// Every active member of the trust list.
    National,
    /// Only these ICBs (an ICB also matches through a predecessor code the
    /// trust list gives it).
    Icbs(BTreeSet<OdsCode>),
    /// No one outside this ICB.
    None,
}

impl Scope {
    fn includes(&self, requester: &OdsCode, predecessors: &[OdsCode]) -> bool {
        match self {
            Scope::National => true,
            Scope::Icbs(named) => {
                named.contains(requester) || predecessors.iter().any(|p| named.contains(p))
            }
            Scope::None => false,
        }
    }

    /// `national`, `icbs` or `none`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::National => "national",
            Scope::Icbs(_) => "icbs",
            Scope::None => "none",
        }
    }

    /// One line for people: `national`, `QUE, QM7 only`, `no one outside this ICB`.
    pub fn describe(&self) -> String {
        match self {
            Scope::National => "national (every active member)".to_owned(),
            Scope::Icbs(named) => format!(
                "{} only",
                named
                    .iter()
                    .map(OdsCode::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Scope::None => "no one outside this ICB".to_owned(),
        }
    }
}

/// Why a `[sharing]` section is not a valid agreement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgreementError {
    #[error("sharing.sections.{0} is not a section (expected one of {sections})", sections = section_names())]
    UnknownSection(String),
    #[error("{at}: scope \"icbs\" needs at least one ODS code in icbs")]
    NoIcbsNamed { at: String },
    #[error(
        "{at}: icbs is set but scope is \"{scope}\"; use scope = \"icbs\" to share with named ICBs"
    )]
    IcbsWithoutIcbsScope { at: String, scope: &'static str },
    #[error("{at}: at most {MAX_NAMED_ICBS} ICBs may be named")]
    TooManyIcbs { at: String },
}

fn section_names() -> String {
    Section::ALL
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The agreement in force: a scope for each section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// For every section not named in `sections`.
    pub default: Scope,
    pub sections: BTreeMap<Section, Scope>,
    /// Whether an answer outside the agreement says records exist.
    pub disclose_existence: bool,
}

impl Agreement {
    /// Shares nothing with anyone: a new node's agreement.
    pub fn none() -> Self {
        Self {
            default: Scope::None,
            sections: BTreeMap::new(),
            disclose_existence: false,
        }
    }

    /// Shares everything with every active member.
    pub fn national() -> Self {
        Self {
            default: Scope::National,
            ..Self::none()
        }
    }

    /// The agreement a node's `[sharing]` configuration describes.
    pub fn from_config(config: &SharingSection) -> Result<Self, AgreementError> {
        let default = scope(config.scope, &config.icbs, "sharing")?;
        let mut sections = BTreeMap::new();
        for (name, section_config) in &config.sections {
            let section = Section::from_name(name)
                .ok_or_else(|| AgreementError::UnknownSection(name.clone()))?;
            let at = format!("sharing.sections.{name}");
            sections.insert(
                section,
                scope(section_config.scope, &section_config.icbs, &at)?,
            );
        }
        Ok(Self {
            default,
            sections,
            disclose_existence: config.disclose_existence,
        })
    }

    /// Who receives `section`.
    pub fn scope(&self, section: Section) -> &Scope {
        self.sections.get(&section).unwrap_or(&self.default)
    }

    /// Whether `section` is shared with the ICB `requester` (whose earlier
    /// codes, from the trust list, are `predecessors`).
    pub fn shares(&self, requester: &OdsCode, predecessors: &[OdsCode], section: Section) -> bool {
        self.scope(section).includes(requester, predecessors)
    }

    /// The sections of `asked` (every section when `None`) not shared with
    /// `requester`, in order.
    pub fn not_shared(
        &self,
        requester: &OdsCode,
        predecessors: &[OdsCode],
        asked: Option<&[Section]>,
    ) -> Vec<Section> {
        Section::ALL
            .into_iter()
            .filter(|s| asked.is_none_or(|asked| asked.contains(s)))
            .filter(|s| !self.shares(requester, predecessors, *s))
            .collect()
    }

    /// Whether nothing at all is shared with `requester`.
    pub fn shares_nothing_with(&self, requester: &OdsCode, predecessors: &[OdsCode]) -> bool {
        self.not_shared(requester, predecessors, None).len() == Section::ALL.len()
    }

    /// Each section's scope, in order, as the status, metrics and the public
    /// transparency report show it.
    pub fn by_section(&self) -> Vec<(Section, &Scope)> {
        Section::ALL
            .into_iter()
            .map(|s| (s, self.scope(s)))
            .collect()
    }

    /// The agreement as JSON: `{"default": …, "sections": {…}, "disclose_existence": …}`,
    /// every section listed.
    pub fn to_json(&self) -> serde_json::Value {
        let sections: serde_json::Map<String, serde_json::Value> = self
            .by_section()
            .into_iter()
            .map(|(section, scope)| (section.as_str().to_owned(), scope_json(scope)))
            .collect();
        serde_json::json!({
            "default": scope_json(&self.default),
            "sections": sections,
            "disclose_existence": self.disclose_existence,
        })
    }

    /// Lines for people, one per distinct scope: `national: allergies, medications`.
    pub fn describe(&self) -> Vec<String> {
        let mut grouped: Vec<(String, Vec<&'static str>)> = Vec::new();
        for (section, scope) in self.by_section() {
            let text = scope.describe();
            match grouped.iter_mut().find(|(t, _)| *t == text) {
                Some((_, sections)) => sections.push(section.as_str()),
                None => grouped.push((text, vec![section.as_str()])),
            }
        }
        let mut lines: Vec<String> = grouped
            .into_iter()
            .map(|(text, sections)| {
                if sections.len() == Section::ALL.len() {
                    format!("{text}: every section")
                } else {
                    format!("{text}: {}", sections.join(", "))
                }
            })
            .collect();
        lines.push(format!(
            "answers outside the agreement {} whether records exist",
            if self.disclose_existence {
                "say"
            } else {
                "never say"
            }
        ));
        lines
    }
}

/// What a clinician reads when a custodian's agreement kept sections from
/// them: `NHS X ICB (QUE) has no sharing agreement with ICB QHG for care
/// plans. Contact: ….`
pub fn not_shared_text(
    custodian: &str,
    asker: &OdsCode,
    sections: &[Section],
    contact: Option<&str>,
) -> String {
    let which = if sections.len() == Section::ALL.len() {
        "any section".to_owned()
    } else {
        sections
            .iter()
            .map(|s| s.label())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let contact = contact
        .map(|c| format!(" Contact: {c}."))
        .unwrap_or_default();
    format!("{custodian} has no sharing agreement with ICB {asker} for {which}.{contact}")
}

fn scope_json(scope: &Scope) -> serde_json::Value {
    match scope {
        Scope::Icbs(named) => serde_json::json!({
            "scope": "icbs",
            "icbs": named.iter().map(OdsCode::as_str).collect::<Vec<_>>(),
        }),
        other => serde_json::json!({ "scope": other.kind() }),
    }
}

fn scope(kind: ScopeKind, icbs: &[OdsCode], at: &str) -> Result<Scope, AgreementError> {
    if icbs.len() > MAX_NAMED_ICBS {
        return Err(AgreementError::TooManyIcbs { at: at.to_owned() });
    }
    match kind {
        ScopeKind::Icbs if icbs.is_empty() => {
            Err(AgreementError::NoIcbsNamed { at: at.to_owned() })
        }
        ScopeKind::Icbs => Ok(Scope::Icbs(icbs.iter().cloned().collect())),
        ScopeKind::National | ScopeKind::None if !icbs.is_empty() => {
            Err(AgreementError::IcbsWithoutIcbsScope {
                at: at.to_owned(),
                scope: kind.as_str(),
            })
        }
        ScopeKind::National => Ok(Scope::National),
        ScopeKind::None => Ok(Scope::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ods(code: &str) -> OdsCode {
        OdsCode::parse(code).unwrap()
    }

    fn agreement(text: &str) -> Result<Agreement, AgreementError> {
        let config: SharingSection = toml::from_str(text).unwrap();
        Agreement::from_config(&config)
    }

    #[test]
    fn a_missing_section_shares_nothing() {
        let config: SharingSection = toml::from_str("").unwrap();
        let agreement = Agreement::from_config(&config).unwrap();
        assert_eq!(agreement, Agreement::none());
        assert!(agreement.shares_nothing_with(&ods("QHG"), &[]));
        assert_eq!(
            agreement.not_shared(&ods("QHG"), &[], None),
            Section::ALL.to_vec()
        );
    }

    #[test]
    fn national_shares_everything_with_everyone() {
        let agreement = agreement(r#"scope = "national""#).unwrap();
        assert!(agreement.not_shared(&ods("QHG"), &[], None).is_empty());
    }

    #[test]
    fn a_named_set_shares_only_with_those_icbs_and_their_predecessors() {
        let agreement = agreement(
            r#"
            scope = "icbs"
            icbs = ["QUE", "QM7"]
            "#,
        )
        .unwrap();
        assert!(agreement.not_shared(&ods("QUE"), &[], None).is_empty());
        assert!(agreement.shares_nothing_with(&ods("QHG"), &[]));
        // A merged ICB keeps the agreements its predecessors held.
        assert!(
            agreement
                .not_shared(&ods("Q1A2B"), &[ods("QM7")], None)
                .is_empty()
        );
    }

    #[test]
    fn sections_override_the_default() {
        let agreement = agreement(
            r#"
            scope = "icbs"
            icbs = ["QUE"]
            [sections.medications]
            scope = "national"
            [sections.allergies]
            scope = "national"
            [sections.care-plans]
            scope = "none"
            "#,
        )
        .unwrap();
        let qhg = ods("QHG");
        let not_for_qhg = agreement.not_shared(&qhg, &[], None);
        assert!(!not_for_qhg.contains(&Section::Medications));
        assert!(!not_for_qhg.contains(&Section::Allergies));
        assert!(not_for_qhg.contains(&Section::Problems));
        assert_eq!(
            agreement.not_shared(&ods("QUE"), &[], None),
            vec![Section::CarePlans]
        );
        assert_eq!(
            agreement.not_shared(&qhg, &[], Some(&[Section::Medications, Section::Problems])),
            vec![Section::Problems],
            "only the sections asked for"
        );
        assert!(!agreement.shares_nothing_with(&qhg, &[]));
    }

    #[test]
    fn mistakes_are_named() {
        let unknown = agreement("scope = \"national\"\n[sections.careplans]\nscope = \"none\"");
        assert!(matches!(unknown, Err(AgreementError::UnknownSection(ref s)) if s == "careplans"));
        assert!(
            unknown.unwrap_err().to_string().contains("care-plans"),
            "the message lists the real names"
        );
        assert!(matches!(
            agreement(r#"scope = "icbs""#),
            Err(AgreementError::NoIcbsNamed { .. })
        ));
        let stray = agreement("scope = \"national\"\nicbs = [\"QUE\"]").unwrap_err();
        assert!(
            stray.to_string().contains("use scope = \"icbs\""),
            "{stray}"
        );
        assert!(matches!(
            agreement(&format!(
                "scope = \"icbs\"\nicbs = [{}]",
                vec!["\"QUE\""; MAX_NAMED_ICBS + 1].join(",")
            )),
            Err(AgreementError::TooManyIcbs { .. })
        ));
    }

    #[test]
    fn it_describes_itself() {
        let agreement = agreement(
            r#"
            scope = "icbs"
            icbs = ["QUE", "QM7"]
            [sections.medications]
            scope = "national"
            "#,
        )
        .unwrap();
        let lines = agreement.describe();
        assert_eq!(
            lines[0],
            "QM7, QUE only: allergies, problems, procedures, investigations, vaccinations, alerts, care-plans, documents, encounters"
        );
        assert_eq!(lines[1], "national (every active member): medications");
        assert!(lines[2].contains("never say"));
        let json = agreement.to_json();
        assert_eq!(json["sections"]["medications"]["scope"], "national");
        assert_eq!(json["sections"]["care-plans"]["icbs"][1], "QUE");
        assert_eq!(json["disclose_existence"], false);
    }
}
