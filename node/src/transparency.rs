//! The public transparency report: how often this node answered other ICBs'
//! locates and fetches, per day, by requesting ICB, purpose and outcome,
//! counted from the audit log.
//!
//! It names organisations only: never a patient, an NHS number or a member
//! of staff. Counts from 1 to `suppress_below - 1` are suppressed, and no
//! totals are published, so a suppressed count cannot be worked out from
//! the others.
//!
//! The tally reads the audit log forward from where it stopped, so each
//! report costs only the entries written since the last one.
//!
//! ```
//! use careweave_node::transparency::{Cell, Tally};
//!
//! let mut tally = Tally::new(31);
//! let cell = Cell {
//!     protocol: "locate".into(),
//!     requesting_icb: "QHG".into(),
//!     purpose: "TREAT".into(),
//!     outcome: "answered".into(),
//! };
//! for _ in 0..6 {
//!     tally.add(1_800_000_000, cell.clone());
//! }
//! tally.add(1_800_000_000, Cell { outcome: "refused".into(), ..cell });
//! let rows = tally.rows(5);
//! assert_eq!(rows[0].count, Some(6));
//! assert_eq!(rows[1].count, None, "one refusal is too few to publish");
//! ```

use std::collections::BTreeMap;

use careweave_protocol::cbor::{self, Limits};
use careweave_protocol::message::Purpose;
use serde::Serialize;
use serde_json::{Value, json};

use crate::audit::{AuditEntry, Direction};
use crate::node::Node;
use crate::store::{Store, StoreError};

/// Days the report covers, today included.
pub const REPORT_DAYS: u64 = 31;
/// Audit entries one report reads at most; a longer backlog is read over
/// the next reports, and the report says how far it got.
pub const MAX_ENTRIES_PER_REPORT: u64 = 2_000_000;

const DAY: u64 = 86_400;

/// What one count is of.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Cell {
    /// `locate` or `fetch`.
    pub protocol: String,
    /// The ODS code of the ICB that asked, or `unidentified` when the
    /// request was refused before its sender could be known.
    pub requesting_icb: String,
    /// `TREAT`, `ETREAT`, or `unknown` when the request was refused unread.
    pub purpose: String,
    /// `answered`, `no-records`, `not-shared`, `withheld:<reason>` or `refused`.
    pub outcome: String,
}

/// One published row. `count` is `None` when suppressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub day: String,
    #[serde(flatten)]
    pub cell: Cell,
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub suppressed: bool,
}

/// The cell an audit entry counts in, if it is an answer to another ICB.
/// The outcome is what the requester was told, never more: a restricted
/// patient counts as "no-records", and records kept back by the agreement
/// count as "not-shared" unless the answer said they exist.
pub fn cell_of(entry: &AuditEntry) -> Option<Cell> {
    if entry.direction != Direction::Inbound
        || !(entry.protocol == "locate" || entry.protocol == "fetch")
    {
        return None;
    }
    let outcome = match entry.outcome.as_str() {
        "answered" => "answered".to_owned(),
        "no-records" => "no-records".to_owned(),
        "not-shared" => "not-shared".to_owned(),
        "withheld" => {
            let first = entry.withheld.first()?;
            format!("withheld:{}", withheld_name(*first))
        }
        "refused" => "refused".to_owned(),
        _ => return None,
    };
    Some(Cell {
        protocol: entry.protocol.clone(),
        requesting_icb: entry
            .peer_ods
            .as_ref()
            .map_or_else(|| "unidentified".to_owned(), ToString::to_string),
        purpose: match entry.context.as_ref().map(|c| c.purpose) {
            Some(Purpose::Treat) => "TREAT".to_owned(),
            Some(Purpose::EmergencyTreat) => "ETREAT".to_owned(),
            None => "unknown".to_owned(),
        },
        outcome,
    })
}

fn withheld_name(reason: careweave_protocol::message::WithheldReason) -> &'static str {
    use careweave_protocol::message::WithheldReason::*;
    match reason {
        Objection => "objection",
        SensitiveCategory => "sensitive-category",
        VeryRestricted => "very-restricted",
        NoAgreement => "no-agreement",
    }
}

/// Counts per day and cell, for a sliding window of days.
#[derive(Debug, Clone)]
pub struct Tally {
    days_kept: u64,
    /// Day number (days since 1970-01-01) → cell → count.
    days: BTreeMap<u64, BTreeMap<Cell, u64>>,
    /// The next audit index to read, once reading has started.
    next_index: Option<u64>,
}

impl Tally {
    pub fn new(days_kept: u64) -> Self {
        Self {
            days_kept: days_kept.max(1),
            days: BTreeMap::new(),
            next_index: None,
        }
    }

    /// Counts one answer made at `time` (Unix seconds).
    pub fn add(&mut self, time: u64, cell: Cell) {
        *self
            .days
            .entry(time / DAY)
            .or_default()
            .entry(cell)
            .or_default() += 1;
    }

    /// Forgets days before the window that ends today (`now`).
    pub fn prune(&mut self, now: u64) {
        let first = self.first_day(now);
        self.days.retain(|day, _| *day >= first);
    }

    /// The first day (Unix seconds) the window ending at `now` holds.
    pub fn window_start(&self, now: u64) -> u64 {
        self.first_day(now) * DAY
    }

    fn first_day(&self, now: u64) -> u64 {
        (now / DAY).saturating_sub(self.days_kept - 1)
    }

    /// Every count, oldest day first, with counts below `suppress_below`
    /// suppressed.
    pub fn rows(&self, suppress_below: u64) -> Vec<Row> {
        let mut rows = Vec::new();
        for (day, cells) in &self.days {
            for (cell, count) in cells {
                let suppressed = *count < suppress_below;
                rows.push(Row {
                    day: date(*day),
                    cell: cell.clone(),
                    count: (!suppressed).then_some(*count),
                    suppressed,
                });
            }
        }
        rows
    }
}

/// How far a tally has read the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Entries read up to (exclusive).
    pub counted_to: u64,
    /// Entries in the log.
    pub entries: u64,
}

/// Reads the audit entries written since the tally last read, at most
/// [`MAX_ENTRIES_PER_REPORT`] of them. The first time, it starts at the
/// segment holding the window's first day, found by its entries' times.
pub fn catch_up(tally: &mut Tally, store: &Store, now: u64) -> Result<Progress, StoreError> {
    let window_start = tally.window_start(now);
    let start = match tally.next_index {
        Some(next) => next,
        None => first_segment_in_window(store, window_start)?,
    };
    let mut next = start;
    for item in store
        .audit_entries_from(start)
        .take(usize::try_from(MAX_ENTRIES_PER_REPORT).unwrap_or(usize::MAX))
    {
        let (index, bytes) = item?;
        next = index + 1;
        // Damage is `audit verify`'s to report; the count skips what it cannot read.
        let Ok(entry) = cbor::decode::<AuditEntry>(&bytes, Limits::MESSAGE) else {
            continue;
        };
        if entry.time < window_start {
            continue;
        }
        if let Some(cell) = cell_of(&entry) {
            tally.add(entry.time, cell);
        }
    }
    tally.next_index = Some(next);
    tally.prune(now);
    Ok(Progress {
        counted_to: next,
        entries: store.audit_len()?,
    })
}

/// The start of the newest segment whose first entry is older than
/// `window_start`: nothing before it can fall in the window.
fn first_segment_in_window(store: &Store, window_start: u64) -> Result<u64, StoreError> {
    let starts = store.audit_segment_starts();
    let time_at = |index: u64| -> Result<Option<u64>, StoreError> {
        Ok(store
            .audit_entry(index)?
            .and_then(|bytes| cbor::decode::<AuditEntry>(&bytes, Limits::MESSAGE).ok())
            .map(|entry| entry.time))
    };
    // Segments are in time order; find the last that starts before the window.
    let (mut low, mut high) = (0usize, starts.len());
    while low < high {
        let mid = low + (high - low) / 2;
        let before = match starts.get(mid) {
            Some(first) => time_at(*first)?.is_some_and(|t| t < window_start),
            None => false,
        };
        if before {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    Ok(low
        .checked_sub(1)
        .and_then(|i| starts.get(i).copied())
        .unwrap_or(0))
}

/// The public report: counts for the window ending `now`, the sharing
/// agreement in force and the latest signed audit checkpoint.
pub fn report(
    node: &Node,
    tally: &mut Tally,
    suppress_below: u64,
    now: u64,
) -> Result<Value, StoreError> {
    let progress = catch_up(tally, &node.store, now)?;
    let checkpoint = node.store.latest_checkpoint()?;
    let log_key = node.keys.log.public_key();
    let checkpoint =
        checkpoint.map(|(_, bytes)| {
            match careweave_protocol::audit::verify_checkpoint(&bytes, &log_key) {
                Ok(signed) => json!({
                    "origin": signed.checkpoint.origin,
                    "size": signed.checkpoint.size,
                    "root": hex::encode(signed.checkpoint.root),
                    "signed_at": signed.signed_at,
                    "cose_sign1": hex::encode(&bytes),
                }),
                Err(e) => json!({"error": format!("the latest checkpoint does not verify: {e}")}),
            }
        });
    let agreement = node.sharing();
    Ok(json!({
        "custodian": {"ods": node.ods().as_str(), "name": node.config.node.name},
        "generated_at": now,
        "period": {
            "from": date(tally.window_start(now) / DAY),
            "to": date(now / DAY),
            "days": tally.days_kept,
        },
        "what_is_counted": "locate and fetch requests from other ICBs that this node answered or refused, \
            by day (UTC), requesting ICB, purpose and what the requester was told",
        "suppression": {
            "below": suppress_below,
            "rule": format!(
                "counts from 1 to {} are not published (count is null); no totals are published, \
                 so a suppressed count cannot be worked out from others",
                suppress_below.saturating_sub(1)
            ),
        },
        "counts": tally.rows(suppress_below),
        "counted_to_entry": progress.counted_to,
        "complete": progress.counted_to >= progress.entries,
        "sharing_agreement": agreement.to_json(),
        "sharing_agreement_since": node.sharing_since(),
        "audit": {
            "entries": progress.entries,
            "log_key": hex::encode(log_key.as_bytes()),
            "latest_checkpoint": checkpoint,
        },
    }))
}

/// `YYYY-MM-DD` for a day number since 1970-01-01.
pub fn date(day: u64) -> String {
    careweave_protocol::civil::date(i64::try_from(day).unwrap_or(i64::MAX / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use careweave_protocol::message::{RequesterContext, WithheldReason};
    use careweave_protocol::{NhsNumber, OdsCode};

    fn entry(outcome: &str, withheld: Vec<WithheldReason>) -> AuditEntry {
        AuditEntry {
            time: 1_800_000_000,
            direction: Direction::Inbound,
            protocol: "locate".into(),
            peer_ods: Some(OdsCode::parse("QHG").unwrap()),
            peer_id: "peer".into(),
            context: Some(RequesterContext {
                organisation: OdsCode::parse("QHG").unwrap(),
                user_id: "555021935107".into(),
                role_profile_id: "555021936108".into(),
                role_code: "R8000".into(),
                purpose: Purpose::EmergencyTreat,
                relationship: "direct-care".into(),
                break_glass_reason: Some("unconscious".into()),
                request_id: "r".into(),
                correlation_id: None,
            }),
            nhs_number: Some(NhsNumber::parse("9990000018").unwrap()),
            outcome: outcome.into(),
            reason: None,
            released: vec![],
            withheld,
            request_hash: vec![0; 32],
            emergency: true,
            not_shared: vec![],
        }
    }

    #[test]
    fn cells_name_the_icb_purpose_and_what_the_requester_was_told() {
        let cell = cell_of(&entry("withheld", vec![WithheldReason::Objection])).unwrap();
        assert_eq!(cell.requesting_icb, "QHG");
        assert_eq!(cell.purpose, "ETREAT");
        assert_eq!(cell.outcome, "withheld:objection");
        assert_eq!(
            cell_of(&entry("not-shared", vec![])).unwrap().outcome,
            "not-shared"
        );
        let mut refused = entry("refused", vec![]);
        refused.peer_ods = None;
        refused.context = None;
        let cell = cell_of(&refused).unwrap();
        assert_eq!(
            (cell.requesting_icb.as_str(), cell.purpose.as_str()),
            ("unidentified", "unknown")
        );
        let mut outbound = entry("answered", vec![]);
        outbound.direction = Direction::OutboundRequest;
        assert_eq!(cell_of(&outbound), None, "only answers to others count");
        let mut trust = entry("answered", vec![]);
        trust.protocol = "trust".into();
        assert_eq!(cell_of(&trust), None);
    }

    #[test]
    fn small_counts_are_suppressed_and_old_days_forgotten() {
        let mut tally = Tally::new(2);
        let cell = cell_of(&entry("answered", vec![])).unwrap();
        let today = 1_800_000_000;
        for _ in 0..4 {
            tally.add(today, cell.clone());
        }
        for _ in 0..5 {
            tally.add(today - DAY, cell.clone());
        }
        tally.add(today - 2 * DAY, cell.clone());
        tally.prune(today);
        let rows = tally.rows(5);
        assert_eq!(rows.len(), 2, "the day before the window is gone");
        assert_eq!(rows[0].count, Some(5));
        assert_eq!((rows[1].count, rows[1].suppressed), (None, true));
        let json = serde_json::to_value(&rows[1]).unwrap();
        assert_eq!(json["count"], serde_json::Value::Null);
        assert_eq!(json["requesting_icb"], "QHG");
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_800_000_000 / DAY), "2027-01-15");
        assert_eq!(date(20_785), "2026-11-28");
        assert_eq!(date(11_016), "2000-02-29");
    }
}
