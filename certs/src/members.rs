//! The members file: a human-editable TOML list of ICBs, one `[[member]]`
//! per node as `careweave-node init` prints it, plus status, roles,
//! validity, predecessors and contact, and `[[revoked]]` keys.
//!
//! ```toml
//! [[member]]
//! ods = "QHG"
//! name = "NHS Bedfordshire, Luton and Milton Keynes ICB"
//! peer_id = "12D3KooW..."
//! addrs = ["/dns4/careweave.example.nhs.uk/tcp/7000"]
//! keys.transport = { kid = "...", public = "..." }
//! keys.message = { kid = "...", public = "..." }
//! keys.record = { kid = "...", public = "..." }
//! keys.log = { kid = "...", public = "..." }
//! status = "active"                 # or "suspended"; default active
//! roles = ["provider", "consumer"]  # default both
//! valid_from = "2026-04-01"         # default: when the list is built
//! valid_until = "2027-04-01"        # default: a year after valid_from
//! predecessors = []                 # ODS codes this ICB succeeded
//! contact = "scr-team@example.nhs.uk"
//!
//! [[revoked]]
//! kid = "..."
//! ods = "QHG"
//! revoked_at = "2026-11-28"
//! reason = "laptop stolen"
//! compromised_since = "2026-11-20"  # when known
//! ```

use std::collections::BTreeMap;

use careweave_protocol::trust::{
    KeyUse, Member, MemberKey, MemberStatus, PeerEntry, Revocation, Role,
};
use careweave_protocol::{KeyId, OdsCode, PeerIdBytes, PublicKey};
use serde::Deserialize;

use crate::time::parse_time;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    member: Vec<RawMember>,
    #[serde(default)]
    revoked: Vec<RawRevocation>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    ods: String,
    name: String,
    peer_id: String,
    #[serde(default)]
    addrs: Vec<String>,
    keys: BTreeMap<String, RawKey>,
    status: Option<String>,
    roles: Option<Vec<String>>,
    valid_from: Option<String>,
    valid_until: Option<String>,
    #[serde(default)]
    predecessors: Vec<String>,
    contact: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: String,
    public: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevocation {
    kid: String,
    ods: String,
    revoked_at: String,
    reason: String,
    compromised_since: Option<String>,
}

/// The members file read and checked.
#[derive(Debug, Clone)]
pub struct Members {
    pub members: Vec<Member>,
    pub revoked: Vec<Revocation>,
    /// For each member, whether the file gave its validity window; when it
    /// did not, a new list keeps the window the previous list gave.
    pub validity_given: Vec<bool>,
}

impl Members {
    /// Keeps each member's validity window from the previous list unless
    /// the members file sets it, so lists do not change for no reason.
    pub fn inherit_validity(&mut self, previous: &[Member]) {
        for (member, given) in self.members.iter_mut().zip(&self.validity_given) {
            if *given {
                continue;
            }
            if let Some(old) = previous.iter().find(|o| o.ods == member.ods) {
                member.valid_from = old.valid_from;
                member.valid_until = old.valid_until;
                for key in &mut member.keys {
                    if let Some(old_key) = old.keys.iter().find(|k| k.kid == key.kid) {
                        key.valid_from = old_key.valid_from;
                        key.valid_until = old_key.valid_until;
                    } else {
                        key.valid_from = old.valid_from.max(key.valid_from.min(old.valid_until));
                        key.valid_until = old.valid_until;
                    }
                }
            }
        }
    }
}

/// Every problem found in a members file, each naming entry and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the members file has {} error(s):\n  {}", .0.len(), .0.join("\n  "))]
pub struct MembersError(pub Vec<String>);

fn key_use(name: &str) -> Option<KeyUse> {
    match name {
        "transport" => Some(KeyUse::Transport),
        "message" => Some(KeyUse::Message),
        "record" => Some(KeyUse::Record),
        "log" => Some(KeyUse::Log),
        _ => None,
    }
}

/// Parses and checks a members file. `now` is the default start of validity.
pub fn parse(text: &str, now: u64) -> Result<Members, MembersError> {
    let file: File =
        toml::from_str(text).map_err(|e| MembersError(vec![e.to_string().replace('\n', " ")]))?;
    let mut errors = Vec::new();
    let mut members = Vec::new();
    let mut validity_given = Vec::new();
    for (i, raw) in file.member.into_iter().enumerate() {
        let given = raw.valid_from.is_some() || raw.valid_until.is_some();
        let at = format!("member[{i}] ({})", raw.ods);
        let mut err =
            |field: &str, problem: String| errors.push(format!("{at}: {field}: {problem}"));
        let ods = OdsCode::parse(&raw.ods)
            .map_err(|e| err("ods", e.to_string()))
            .ok();
        if raw.name.trim().is_empty() {
            err("name", "is empty".into());
        }
        let valid_from = match &raw.valid_from {
            Some(t) => parse_time(t)
                .map_err(|e| err("valid_from", e.to_string()))
                .unwrap_or(now),
            None => now,
        };
        let valid_until = match &raw.valid_until {
            Some(t) => parse_time(t)
                .map_err(|e| err("valid_until", e.to_string()))
                .unwrap_or(0),
            None => valid_from + 365 * 86_400,
        };
        if valid_until <= valid_from {
            err("valid_until", "is not after valid_from".into());
        }
        let status = match raw.status.as_deref() {
            None | Some("active") => MemberStatus::Active,
            Some("suspended") => MemberStatus::Suspended,
            Some(other) => {
                err("status", format!("{other:?} is not active or suspended"));
                MemberStatus::Active
            }
        };
        let roles = match &raw.roles {
            None => vec![Role::Provider, Role::Consumer],
            Some(list) => list
                .iter()
                .filter_map(|r| match r.as_str() {
                    "provider" => Some(Role::Provider),
                    "consumer" => Some(Role::Consumer),
                    other => {
                        err("roles", format!("{other:?} is not provider or consumer"));
                        None
                    }
                })
                .collect(),
        };
        let mut keys = Vec::new();
        for (name, key) in &raw.keys {
            let Some(use_) = key_use(name) else {
                err(
                    &format!("keys.{name}"),
                    "is not transport, message, record or log".into(),
                );
                continue;
            };
            let public = hex::decode(&key.public)
                .map_err(|e| e.to_string())
                .and_then(|b| PublicKey::from_slice(&b).map_err(|e| e.to_string()));
            let kid = hex::decode(&key.kid)
                .map_err(|e| e.to_string())
                .and_then(|b| KeyId::from_slice(&b).map_err(|e| e.to_string()));
            match (public, kid) {
                (Ok(public), Ok(kid)) if public.kid() == kid => keys.push(MemberKey {
                    kid,
                    key_use: use_,
                    public,
                    valid_from,
                    valid_until,
                }),
                (Ok(_), Ok(_)) => err(
                    &format!("keys.{name}.kid"),
                    "does not match the public key".into(),
                ),
                (Err(e), _) => err(&format!("keys.{name}.public"), e),
                (_, Err(e)) => err(&format!("keys.{name}.kid"), e),
            }
        }
        for required in ["transport", "message", "record", "log"] {
            if !raw.keys.contains_key(required) {
                err(&format!("keys.{required}"), "is missing".into());
            }
        }
        let peer_id = PeerIdBytes::from_base58(&raw.peer_id)
            .map_err(|e| err("peer_id", e.to_string()))
            .ok();
        let predecessors: Vec<OdsCode> = raw
            .predecessors
            .iter()
            .filter_map(|p| {
                OdsCode::parse(p)
                    .map_err(|e| err("predecessors", e.to_string()))
                    .ok()
            })
            .collect();
        for addr in &raw.addrs {
            if !addr.starts_with('/') {
                err(
                    "addrs",
                    format!("{addr:?} is not a multiaddr (e.g. /dns4/host/tcp/7000)"),
                );
            }
        }
        if let (Some(ods), Some(peer_id)) = (ods, peer_id) {
            validity_given.push(given);
            members.push(Member {
                ods,
                name: raw.name,
                status,
                roles,
                valid_from,
                valid_until,
                peers: vec![PeerEntry {
                    peer_id,
                    addrs: raw.addrs,
                }],
                keys,
                predecessors,
                contact: raw.contact,
            });
        }
    }
    let mut revoked = Vec::new();
    for (i, raw) in file.revoked.into_iter().enumerate() {
        let at = format!("revoked[{i}]");
        let mut err =
            |field: &str, problem: String| errors.push(format!("{at}: {field}: {problem}"));
        let kid = hex::decode(&raw.kid)
            .map_err(|e| e.to_string())
            .and_then(|b| KeyId::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| err("kid", e))
            .ok();
        let ods = OdsCode::parse(&raw.ods)
            .map_err(|e| err("ods", e.to_string()))
            .ok();
        let revoked_at = parse_time(&raw.revoked_at)
            .map_err(|e| err("revoked_at", e.to_string()))
            .ok();
        let compromised_since = match &raw.compromised_since {
            None => Some(None),
            Some(t) => parse_time(t)
                .map(Some)
                .map_err(|e| err("compromised_since", e.to_string()))
                .ok(),
        };
        if raw.reason.trim().is_empty() {
            err("reason", "is empty".into());
        }
        if let (Some(kid), Some(ods), Some(revoked_at), Some(compromised_since)) =
            (kid, ods, revoked_at, compromised_since)
        {
            revoked.push(Revocation {
                kid,
                ods,
                revoked_at,
                reason: raw.reason,
                compromised_since,
            });
        }
    }
    if errors.is_empty() {
        Ok(Members {
            members,
            revoked,
            validity_given,
        })
    } else {
        Err(MembersError(errors))
    }
}
