//! `careweave-testnet bench`: careweave's speed and cost, measured on real
//! node processes, each figure beside the floor it stands on.
//!
//! Every figure is the median of several runs. The JSON file holds every
//! run; the Markdown table holds the medians, targets, floors and ratios.
//! Targets are checked here and nowhere else: tests never assert timings.

// serde_json's `Value[&str]` answers Null for anything missing and inserts
// into objects; it never panics on the values built here.
#![allow(clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use careweave_node::config::{self, LoadedConfig};
use careweave_node::daemon::{self, ControlRequest, ControlResponse, IcbReport};
use careweave_node::import::Importer;
use careweave_node::keys::NodeKeys;
use careweave_node::store::Store;
use careweave_protocol::envelope::ProtocolId;
use careweave_protocol::envelope::{self, Seal};
use careweave_protocol::message::{
    FetchRequest, FetchResponse, LocateRequest, LocateResponse, RequesterContext,
};
use careweave_protocol::record::{self, RecordLabel};
use careweave_protocol::{KeyPair, NhsNumber, OdsCode, PeerIdBytes};
use serde_json::{Value, json};

use crate::data;
use crate::floor::{self, AskingWork, FloorClient, FloorPeer};
use crate::setup::{self, NodeInfo, Options, Testnet};

/// What to run and where.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A small version, fit for CI: a few nodes, a few thousand records.
    pub quick: bool,
    /// Working directory for testnets and stores (emptied first).
    pub dir: PathBuf,
    /// Where `bench.json` and `bench.md` go.
    pub out: PathBuf,
    /// ICBs in the main testnet, instead of 42 (full) or 5 (quick).
    pub nodes: Option<usize>,
    /// Records in the main testnet's first node, instead of a million
    /// (full) or 20 000 (quick).
    pub records: Option<usize>,
    /// The parts to run; every part when empty.
    pub only: Vec<Part>,
}

impl BenchOptions {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

/// A part of the benchmark, each on testnets of its own, so that a tester
/// can run one alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Ingest against raw sled.
    Ingest,
    /// The main testnet: store size, start-up, locate against the floor,
    /// memory, and locate with one ICB dead.
    Locate,
    /// Locate latency as ICBs and records grow.
    Growth,
    /// Fetch throughput and latency against the floor.
    Fetch,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Ingest, Part::Locate, Part::Growth, Part::Fetch];

    pub fn name(self) -> &'static str {
        match self {
            Part::Ingest => "ingest",
            Part::Locate => "locate",
            Part::Growth => "growth",
            Part::Fetch => "fetch",
        }
    }
}

impl std::str::FromStr for Part {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Part::ALL
            .into_iter()
            .find(|part| part.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Part::ALL.iter().map(|p| p.name()).collect();
                format!(
                    "no benchmark part '{s}'; the parts are {}",
                    names.join(", ")
                )
            })
    }
}

/// How big a run is.
#[derive(Debug, Clone)]
struct Scale {
    icbs: usize,
    growth_icbs: Vec<usize>,
    big_records: usize,
    growth_nodes: usize,
    growth_records: [usize; 2],
    ingest_records: usize,
    runs: usize,
    locate_sequential: usize,
    locate_parallel: usize,
    /// Locates in each block of a run; careweave's and the floor's blocks
    /// alternate (see `LocateRuns`).
    locate_block_sequential: usize,
    locate_block_parallel: usize,
    fetch_secs: f64,
    fetch_patients: usize,
    patients_per_icb: u32,
}

impl Scale {
    fn full() -> Self {
        Self {
            icbs: 42,
            growth_icbs: vec![5, 10, 20],
            big_records: 1_000_000,
            growth_nodes: 5,
            growth_records: [100_000, 1_000_000],
            ingest_records: 100_000,
            runs: 3,
            locate_sequential: 1000,
            locate_parallel: 2000,
            locate_block_sequential: 100,
            locate_block_parallel: 500,
            fetch_secs: 5.0,
            fetch_patients: 2000,
            patients_per_icb: 50,
        }
    }

    fn quick() -> Self {
        Self {
            icbs: 5,
            growth_icbs: vec![3],
            big_records: 20_000,
            growth_nodes: 3,
            growth_records: [2_000, 10_000],
            ingest_records: 5_000,
            runs: 1,
            locate_sequential: 100,
            locate_parallel: 200,
            locate_block_sequential: 25,
            locate_block_parallel: 100,
            fetch_secs: 1.0,
            fetch_patients: 100,
            patients_per_icb: 10,
        }
    }
}

/// Records per synthetic patient in the large stores.
const RECORDS_PER_PATIENT: usize = 20;
/// Size of each record in the ingest and large-store figures.
const INGEST_RECORD_BYTES: usize = 1024;
/// Size of each record served in the fetch figures.
const FETCH_RECORD_BYTES: usize = 4096;
/// Locates in flight at once in the parallel figures.
const PARALLEL: usize = 8;
/// Fetch clients at once; below the node's limit of 16 control connections.
const FETCH_CLIENTS: usize = 12;
/// Warm-up requests before anything is timed.
const WARM_UP: usize = 50;
/// The deadline configured for each outbound request (the node default).
const DEADLINE_MS: f64 = 2000.0;

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    pub unit: &'static str,
    /// Median of the runs.
    pub value: f64,
    pub runs: Vec<f64>,
    pub target: String,
    pub floor: Option<f64>,
    pub ratio: Option<f64>,
    /// Whether the target was met; None when there is no target.
    pub met: Option<bool>,
}

impl Figure {
    fn new(name: impl Into<String>, unit: &'static str, runs: Vec<f64>) -> Self {
        Self {
            name: name.into(),
            unit,
            value: median(&runs),
            runs,
            target: String::new(),
            floor: None,
            ratio: None,
            met: None,
        }
    }

    fn target(mut self, text: impl Into<String>, met: bool) -> Self {
        self.target = text.into();
        self.met = Some(met);
        self
    }

    fn floor(mut self, floor: f64) -> Self {
        self.floor = Some(floor);
        self.ratio = (floor > 0.0).then(|| self.value / floor);
        self
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name, "unit": self.unit, "value": self.value, "runs": self.runs,
            "target": self.target, "floor": self.floor, "ratio": self.ratio, "met": self.met,
        })
    }
}

/// The machine a run was measured on.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(kib))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let rustc = command_output("rustc", &["--version"]);
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": (memory_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "rustc": rustc,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "careweave": env!("CARGO_PKG_VERSION"),
        "date": command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn kib(text: &str) -> u64 {
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Resident set size of a process in bytes, if it is running.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(kib))
        .map(|k| k * 1024)
}

/// CPU time (user and system) a process has used, in seconds. `/proc`
/// counts it in USER_HZ ticks, which Linux fixes at 100 a second.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    cpu_seconds_in(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn cpu_seconds_in(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses; the fields follow
    // the last ')'. utime and stime are fields 14 and 15 of the line.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// The CPU used by a set of processes and by this one (the client), so a
/// figure counts everything a request costs the machine.
struct CpuMeter {
    pids: Vec<String>,
}

impl CpuMeter {
    fn new(pids: impl IntoIterator<Item = u32>) -> Self {
        let mut pids: Vec<String> = pids.into_iter().map(|p| p.to_string()).collect();
        pids.push("self".to_owned());
        Self { pids }
    }

    fn seconds(&self) -> f64 {
        self.pids.iter().filter_map(|p| cpu_seconds(p)).sum()
    }

    /// Runs `work` and returns its result with the CPU it cost, in ms per
    /// one of `count` requests.
    async fn per_request<T>(
        &self,
        count: usize,
        work: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<(T, f64), String> {
        let before = self.seconds();
        let out = work.await?;
        let used = (self.seconds() - before).max(0.0);
        Ok((out, used * 1000.0 / count.max(1) as f64))
    }
}

/// The share of the machine's CPU time that the hypervisor took for other
/// guests ("steal") since the meter started. On a virtual machine it moves
/// every figure, so each part and each fetch run reports it.
#[derive(Debug, Clone, Copy)]
struct StealMeter {
    start: Option<CpuTicks>,
}

#[derive(Debug, Clone, Copy)]
struct CpuTicks {
    steal: u64,
    total: u64,
}

impl CpuTicks {
    /// The machine-wide line of `/proc/stat`: user nice system idle iowait
    /// irq softirq steal ...
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        Self::parse(stat.lines().next()?)
    }

    fn parse(line: &str) -> Option<Self> {
        let ticks: Vec<u64> = line
            .strip_prefix("cpu ")?
            .split_whitespace()
            .take(8)
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        Some(Self {
            steal: *ticks.get(7)?,
            total: ticks.iter().sum(),
        })
    }
}

impl StealMeter {
    fn start() -> Self {
        Self {
            start: CpuTicks::read(),
        }
    }

    /// Percent of CPU time stolen since the start; `None` where the kernel
    /// does not say.
    fn percent(&self) -> Option<f64> {
        let (start, now) = (self.start?, CpuTicks::read()?);
        let total = now.total.checked_sub(start.total)?;
        let steal = now.steal.checked_sub(start.steal)?;
        (total > 0).then(|| 100.0 * steal as f64 / total as f64)
    }

    fn shown(&self) -> String {
        shown_steal(self.percent())
    }
}

fn shown_steal(percent: Option<f64>) -> String {
    percent.map_or_else(|| "unknown".to_owned(), |p| format!("{p:.1}%"))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted.get(n / 2).copied().unwrap_or(f64::NAN),
        n => {
            let a = sorted.get(n / 2 - 1).copied().unwrap_or(f64::NAN);
            let b = sorted.get(n / 2).copied().unwrap_or(f64::NAN);
            (a + b) / 2.0
        }
    }
}

/// Nearest-rank percentile of latencies, in milliseconds.
fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    // The small margin keeps 99.9% of 1000 at rank 999 despite rounding.
    let rank = (p / 100.0 * sorted_ms.len() as f64 - 1e-9).ceil() as usize;
    sorted_ms
        .get(rank.clamp(1, sorted_ms.len()) - 1)
        .copied()
        .unwrap_or(f64::NAN)
}

/// p50, p99 and p99.9 of one run.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

fn latency(mut ms: Vec<f64>) -> Latency {
    ms.sort_by(f64::total_cmp);
    Latency {
        p50: percentile(&ms, 50.0),
        p99: percentile(&ms, 99.0),
        p999: percentile(&ms, 99.9),
    }
}

pub(crate) fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Stops a testnet's nodes and any floor nodes when dropped, whatever happened.
#[derive(Default)]
pub(crate) struct Cleanup {
    pub(crate) testnets: Vec<PathBuf>,
    pub(crate) children: Vec<Child>,
}

impl Cleanup {
    /// Builds a testnet (see [`build`]) whose nodes are stopped when this
    /// clean-up runs.
    fn build(
        &mut self,
        dir: &Path,
        nodes: usize,
        patients: u32,
        say: &dyn Fn(&str),
    ) -> Result<Testnet, String> {
        let t = build(dir, nodes, patients, say)?;
        self.testnets.push(dir.to_path_buf());
        Ok(t)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.testnets {
            setup::stop_all(dir);
        }
    }
}

pub(crate) fn context(ods: &str) -> Result<RequesterContext, String> {
    Ok(data::clinician(
        OdsCode::parse(ods).map_err(err)?,
        "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f",
    ))
}

/// Sizes of real signed messages, so the floor carries the same bytes.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    locate_request: usize,
    locate_response: usize,
    fetch_request: usize,
    fetch_response: usize,
}

fn message_sizes() -> Result<Sizes, String> {
    let key = KeyPair::from_secret_bytes(&[7; 32]);
    let peer = PeerIdBytes::from_ed25519(&key.public_key());
    let a = OdsCode::parse("QHG").map_err(err)?;
    let b = OdsCode::parse("QMM").map_err(err)?;
    let nhs = data::nhs_number(100);
    let seal = |protocol, request_hash| Seal {
        key: &key,
        protocol,
        sender_ods: &a,
        receiver_ods: &b,
        sender_peer: &peer,
        receiver_peer: &peer,
        trust_seq: 1,
        now: 1_800_000_000,
        lifetime_secs: 60,
        cti: [1; 16],
        request_hash,
    };
    let ctx = context("QHG")?;
    let locate_request = envelope::seal(
        &LocateRequest {
            nhs_number: nhs,
            context: ctx.clone(),
            sections: None,
        },
        &seal(ProtocolId::Locate, None),
    )
    .map_err(err)?;
    let locate_response = envelope::seal(
        &LocateResponse {
            custodian: b.clone(),
            pointers: vec![],
            withheld: vec![],
            not_shared: vec![],
        },
        &seal(ProtocolId::Locate, Some([9; 32])),
    )
    .map_err(err)?;
    let fetch_request = envelope::seal(
        &FetchRequest {
            nhs_number: nhs,
            pointer_id: "QMM-0123456789abcdef0123456789abcdef".into(),
            context: ctx,
        },
        &seal(ProtocolId::Fetch, None),
    )
    .map_err(err)?;
    let mut resource = data::sized_observation(&nhs, "QMM", 1, FETCH_RECORD_BYTES);
    // As stored: the importer gives every record its version.
    resource["meta"] = json!({"versionId": "1"});
    let json = serde_json::to_vec(&resource).map_err(err)?;
    let signed = record::sign_record(
        &json,
        &RecordLabel {
            custodian: b.clone(),
            nhs_number: nhs,
            signed_at: 1_800_000_000,
            resource_type: "Observation".into(),
            resource_id: resource["id"].as_str().unwrap_or("").to_owned(),
            version: "1".into(),
        },
        &key,
    )
    .map_err(err)?;
    let fetch_response = envelope::seal(
        &FetchResponse {
            custodian: b.clone(),
            records: vec![serde_bytes::ByteBuf::from(signed)],
            withheld: vec![],
            not_shared: vec![],
        },
        &seal(ProtocolId::Fetch, Some([9; 32])),
    )
    .map_err(err)?;
    Ok(Sizes {
        locate_request: locate_request.len(),
        locate_response: locate_response.len(),
        fetch_request: fetch_request.len(),
        fetch_response: fetch_response.len(),
    })
}

/// `count` valid test-range NHS numbers, in order, from `start` on.
fn numbers(start: u32, count: usize) -> Vec<NhsNumber> {
    (start..)
        .filter_map(|offset| NhsNumber::from_stem(999_000_000u32.saturating_add(offset)))
        .take(count)
        .collect()
}

/// Imports `count` records of `bytes` each, `RECORDS_PER_PATIENT` per
/// patient, into a stopped node's store. Returns stored records, raw FHIR
/// bytes and seconds taken.
fn import_sized(node: &NodeInfo, batch: &Synthetic<'_>) -> Result<(usize, u64, f64), String> {
    let loaded = config::load(&node.config(), []).map_err(err)?;
    let keys = NodeKeys::load(&loaded.keys_dir()).map_err(err)?;
    let store = Store::open(
        &loaded.store_dir(),
        loaded.config.store.cache_mb * 1024 * 1024,
    )
    .map_err(err)?;
    let imported = import_into(&store, &loaded, &keys, &node.ods, batch)?;
    // The node process opens this store next.
    store.close(STORE_RELEASE_WAIT).map_err(err)?;
    Ok(imported)
}

/// How long a closed store may keep its lock before the bench gives up.
const STORE_RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Synthetic records to import: `count` records of about `bytes` each,
/// numbered from `first`, `per_patient` to a patient.
#[derive(Debug, Clone, Copy)]
struct Synthetic<'a> {
    patients: &'a [NhsNumber],
    per_patient: usize,
    first: usize,
    count: usize,
    bytes: usize,
}

fn import_into(
    store: &Store,
    loaded: &LoadedConfig,
    keys: &NodeKeys,
    ods: &str,
    batch: &Synthetic<'_>,
) -> Result<(usize, u64, f64), String> {
    let importer = Importer {
        store,
        record_key: &keys.record,
        custodian: &loaded.config.node.ods,
        config: &loaded.config,
        now: careweave_node::net::unix_now(),
    };
    let chunk = 10_000;
    let mut stored = 0;
    let mut raw = 0u64;
    let mut elapsed = 0.0;
    let mut n = batch.first;
    let end = batch.first + batch.count;
    while n < end {
        let upto = (n + chunk).min(end);
        let mut ndjson = Vec::with_capacity((upto - n) * (batch.bytes + 1));
        for i in n..upto {
            let patient = i / batch.per_patient.max(1) % batch.patients.len().max(1);
            let Some(nhs) = batch.patients.get(patient) else {
                return Err("no patients to import for".into());
            };
            let resource = data::sized_observation(nhs, ods, i as u64, batch.bytes);
            let line = serde_json::to_vec(&resource).map_err(err)?;
            raw += line.len() as u64;
            ndjson.extend_from_slice(&line);
            ndjson.push(b'\n');
        }
        let started = Instant::now();
        let (report, _, _) = importer
            .import_bytes("bench", &ndjson, &mut |_, _| {})
            .map_err(err)?;
        elapsed += started.elapsed().as_secs_f64();
        if let Some(rejected) = report.rejected.first() {
            return Err(format!("bench record rejected: {rejected:?}"));
        }
        stored += report.stored + report.replaced;
        n = upto;
    }
    Ok((stored, raw, elapsed))
}

/// Builds a testnet with the per-peer rate limit raised: the benchmark
/// measures capacity, not the limiter.
pub(crate) fn build(
    dir: &Path,
    nodes: usize,
    patients: u32,
    say: &dyn Fn(&str),
) -> Result<Testnet, String> {
    let _ = std::fs::remove_dir_all(dir);
    let t = setup::build(
        dir,
        &data::icbs_2022(),
        &Options {
            nodes,
            patients_per_icb: patients,
            seed: 2026,
            sharing: setup::SharingMix::National,
        },
        &|_| {},
    )
    .map_err(err)?;
    for node in &t.nodes {
        let path = node.config();
        let text = std::fs::read_to_string(&path).map_err(err)?;
        let text = text
            .replace("peer_rate_per_sec = 200", "peer_rate_per_sec = 100000")
            .replace("peer_burst = 400", "peer_burst = 100000");
        std::fs::write(&path, text).map_err(err)?;
    }
    say(&format!(
        "built a testnet of {nodes} ICBs in {}",
        dir.display()
    ));
    Ok(t)
}

pub(crate) async fn start(t: &Testnet, say: &dyn Fn(&str)) -> Result<(), String> {
    setup::start_all(t).map_err(err)?;
    setup::wait_connected(t, Duration::from_secs(180))
        .await
        .map_err(err)?;
    say(&format!("{} nodes up, full mesh", t.nodes.len()));
    Ok(())
}

pub(crate) fn pid(node: &NodeInfo) -> Option<u32> {
    std::fs::read_to_string(node.dir.join("node.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn kill_hard(node: &NodeInfo) {
    if let Some(pid) = pid(node) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

/// The patients a testnet's build gave each ICB (see `setup::build`).
pub(crate) fn testnet_patients(t: &Testnet, per_icb: u32) -> Vec<NhsNumber> {
    let total = per_icb as usize * t.nodes.len();
    (0..total)
        .map(|k| data::nhs_number(100 + 13 * k as u32))
        .collect()
}

/// One locate through a node's control socket: latency in ms and the reports.
pub(crate) async fn locate_once(
    socket: &Path,
    nhs: NhsNumber,
    ctx: &RequesterContext,
) -> Result<(f64, Vec<IcbReport>), String> {
    let started = Instant::now();
    let answer = daemon::control(
        socket,
        &ControlRequest::Locate {
            nhs_number: nhs,
            context: ctx.clone(),
        },
    )
    .await
    .map_err(err)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match answer {
        ControlResponse::Located { icbs } => Ok((ms, icbs)),
        ControlResponse::Error { message } => Err(message),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

pub(crate) fn failed(reports: &[IcbReport], dead: Option<&str>) -> usize {
    reports
        .iter()
        .filter(|r| Some(r.ods.as_str()) != dead)
        .filter(|r| !matches!(r.outcome.as_str(), "pointers" | "no-records" | "withheld"))
        .count()
}

/// Locates `count` patients with `parallel` in flight; latencies in ms and
/// the number of ICB answers that were not answers.
async fn locate_run(
    node: &NodeInfo,
    patients: &[NhsNumber],
    count: usize,
    parallel: usize,
    dead: Option<&str>,
) -> Result<(Vec<f64>, usize, usize), String> {
    locate_block(node, patients, 0..count, parallel, dead).await
}

/// Locates the patients numbered `block` in the run's sequence, so that the
/// blocks of one run ask about the same patients as one unbroken run would.
async fn locate_block(
    node: &NodeInfo,
    patients: &[NhsNumber],
    block: std::ops::Range<usize>,
    parallel: usize,
    dead: Option<&str>,
) -> Result<(Vec<f64>, usize, usize), String> {
    let count = block.len();
    let socket = Arc::new(node.dir.join("control.sock"));
    let ctx = Arc::new(context(&node.ods)?);
    let patients = Arc::new(patients.to_vec());
    let next = Arc::new(AtomicUsize::new(block.start));
    let end = block.end;
    let dead = dead.map(str::to_owned);
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let (socket, ctx, patients, next, dead) = (
            Arc::clone(&socket),
            Arc::clone(&ctx),
            Arc::clone(&patients),
            Arc::clone(&next),
            dead.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0;
            let mut dead_flagged = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, String>((latencies, failures, dead_flagged));
                }
                let Some(nhs) = patients.get(i * 7919 % patients.len().max(1)) else {
                    return Err("no patients".into());
                };
                let (ms, reports) = locate_once(&socket, *nhs, &ctx).await?;
                latencies.push(ms);
                failures += failed(&reports, dead.as_deref());
                if let Some(dead) = &dead
                    && reports.iter().any(|r| {
                        &r.ods == dead && matches!(r.outcome.as_str(), "unreachable" | "timed-out")
                    })
                {
                    dead_flagged += 1;
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(count);
    let mut failures = 0;
    let mut flagged = 0;
    for worker in workers {
        let (latencies, f, d) = worker.await.map_err(err)??;
        all.extend(latencies);
        failures += f;
        flagged += d;
    }
    Ok((all, failures, flagged))
}

/// Floor nodes with a client connected to all of them.
struct FloorNet {
    client: FloorClient,
    peers: Vec<FloorPeer>,
    pids: Vec<u32>,
    /// The client's part of the required work (`floor` module).
    work: AskingWork,
}

impl FloorNet {
    fn ids(&self) -> Vec<libp2p::PeerId> {
        self.peers.iter().map(|p| p.id).collect()
    }
}

/// Which floor a set of floor nodes makes (`floor` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloorKind {
    /// Request-response alone, each node connected only to the client.
    Plain,
    /// The other protocols DESIGN puts on every connection too, and the
    /// nodes connected to each other as well.
    WithProtocols,
}

/// Starts `count` floor nodes of `kind` and connects a floor client to them.
async fn floor_net(
    dir: &Path,
    count: usize,
    kind: FloorKind,
    cleanup: &mut Cleanup,
) -> Result<FloorNet, String> {
    let protocols = kind == FloorKind::WithProtocols;
    std::fs::create_dir_all(dir).map_err(err)?;
    let exe = std::env::current_exe().map_err(err)?;
    let work = AskingWork::new(floor::fresh_key()?, &dir.join("client.audit"))?;
    let client_key = hex::encode(work.public_key().as_bytes());
    let mut ready_files = Vec::new();
    let mut pids = Vec::new();
    let mesh = dir.join("mesh");
    let _ = std::fs::remove_file(&mesh);
    for i in 0..count {
        let ready = dir.join(format!("floor-{i}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut command = Command::new(&exe);
        command
            .arg("floor-node")
            .arg("--ready")
            .arg(&ready)
            .arg("--client-key")
            .arg(&client_key)
            .arg("--audit")
            .arg(dir.join(format!("floor-{i}.audit")));
        if protocols {
            command.arg("--mesh").arg(&mesh);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err)?;
        pids.push(child.id());
        cleanup.children.push(child);
        ready_files.push(ready);
    }
    let client = if protocols {
        FloorClient::start_with_protocols()?
    } else {
        FloorClient::start()?
    };
    let mut peers = Vec::new();
    let mut listed = Vec::new();
    for ready in ready_files {
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            match std::fs::read_to_string(&ready) {
                Ok(text) if !text.is_empty() => break text,
                _ if Instant::now() > deadline => {
                    return Err(format!("floor node {} did not start", ready.display()));
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (peer, addr) = floor::read_ready(&text)
            .ok_or_else(|| format!("bad floor ready file {}: {text:?}", ready.display()))?;
        client
            .dial(peer.id, addr.clone())
            .await
            .map_err(|e| format!("floor dial: {e}"))?;
        listed.push((peer.id, addr));
        peers.push(peer);
    }
    if protocols {
        // Written whole and then renamed, so no node reads half of it.
        let partial = dir.join("mesh.partial");
        std::fs::write(&partial, floor::mesh_text(&listed)).map_err(err)?;
        std::fs::rename(&partial, &mesh).map_err(err)?;
        // Time for the nodes to find the file, make their connections and
        // let gossipsub form its mesh: 41 nodes took about 10 s of busy
        // CPU here before settling at the idle rate of careweave's own.
        let settle = Duration::from_millis(300) * u32::try_from(count).unwrap_or(u32::MAX);
        tokio::time::sleep(Duration::from_secs(2) + settle).await;
    }
    Ok(FloorNet {
        client,
        peers,
        pids,
        work,
    })
}

/// Sequential floor fan-outs with the required work (`floor` module):
/// latencies in ms.
async fn floor_required_work_run(
    floor: &FloorNet,
    sizes: &Sizes,
    count: usize,
) -> Result<Vec<f64>, String> {
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        floor
            .client
            .fan_out_with_required_work(
                &floor.peers,
                &floor.work,
                sizes.locate_request,
                sizes.locate_response,
            )
            .await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(latencies)
}

/// Floor fan-outs: latencies in ms.
async fn floor_fan_out_run(
    client: &FloorClient,
    peers: &[libp2p::PeerId],
    request: &[u8],
    count: usize,
    parallel: usize,
) -> Result<Vec<f64>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let peers = Arc::new(peers.to_vec());
    let request = Arc::new(request.to_vec());
    let mut workers = Vec::new();
    for _ in 0..parallel {
        let (client, peers, request, next) = (
            client.clone(),
            Arc::clone(&peers),
            Arc::clone(&request),
            Arc::clone(&next),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let started = Instant::now();
                client.fan_out(&peers, &request).await?;
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.map_err(err)??);
    }
    Ok(all)
}

/// One kind of locate run (sequential or parallel) and what its runs and
/// the floor's runs beside them measured.
struct LocateRuns {
    label: &'static str,
    count: usize,
    parallel: usize,
    /// Each run is made of blocks of this many locates, careweave's and the
    /// floor's in turn, so that both see the machine in the same moments.
    block: usize,
    ours: Vec<Latency>,
    floor: Vec<Latency>,
    /// CPU per locate in ms, careweave's and the floor's.
    cpu: Vec<f64>,
    floor_cpu: Vec<f64>,
    /// The signed and audited floor's latencies and CPU (`floor` module),
    /// in a third block beside each pair; sequential runs only.
    signed: Vec<Latency>,
    signed_cpu: Vec<f64>,
    /// The protocol floor's (`floor` module), in a fourth block.
    protocol: Vec<Latency>,
    protocol_cpu: Vec<f64>,
}

impl LocateRuns {
    fn new(label: &'static str, count: usize, parallel: usize, block: usize) -> Self {
        Self {
            label,
            count,
            parallel,
            block,
            ours: Vec::new(),
            floor: Vec::new(),
            cpu: Vec::new(),
            floor_cpu: Vec::new(),
            signed: Vec::new(),
            signed_cpu: Vec::new(),
            protocol: Vec::new(),
            protocol_cpu: Vec::new(),
        }
    }
}

/// Splits `0..count` into consecutive blocks of at most `size`.
fn blocks(count: usize, size: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let size = size.max(1);
    (0..count)
        .step_by(size)
        .map(move |start| start..(start + size).min(count))
}

/// Samples a process's RSS every 100 ms until stopped; returns the peak.
fn sample_rss(pid: u32) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    });
    (stop, handle)
}

/// Restarts a node and times process start to ready.
async fn restart_timed(node: &NodeInfo) -> Result<f64, String> {
    if let Some(pid) = pid(node) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while setup::is_running(&pid.to_string()) {
            if Instant::now() > deadline {
                return Err(format!("node {} did not stop", node.ods));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = std::fs::remove_file(node.dir.join("control.sock"));
    let started = Instant::now();
    setup::start_one(node)?;
    let deadline = started + Duration::from_secs(120);
    loop {
        if let Some((_, true)) = setup::node_status(node).await {
            return Ok(started.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            return Err(format!("node {} not ready after 120 s", node.ods));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fetch clients in a closed loop for `secs`: completed fetches per second,
/// and failures.
async fn fetch_closed_loop(
    node: &NodeInfo,
    targets: &[(NhsNumber, String)],
    secs: f64,
) -> Result<(f64, usize), String> {
    let socket = Arc::new(node.dir.join("control.sock"));
    let ctx = Arc::new(context(&node.ods)?);
    let targets = Arc::new(targets.to_vec());
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..FETCH_CLIENTS {
        let (socket, ctx, targets, done, failures) = (
            Arc::clone(&socket),
            Arc::clone(&ctx),
            Arc::clone(&targets),
            Arc::clone(&done),
            Arc::clone(&failures),
        );
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < until {
                let Some((nhs, pointer)) = targets.get(i % targets.len().max(1)) else {
                    return;
                };
                i += FETCH_CLIENTS;
                match fetch_once(&socket, *nhs, pointer, &ctx).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for worker in workers {
        worker.await.map_err(err)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((
        done.load(Ordering::Relaxed) as f64 / elapsed,
        failures.load(Ordering::Relaxed) as usize,
    ))
}

pub(crate) async fn fetch_once(
    socket: &Path,
    nhs: NhsNumber,
    pointer: &str,
    ctx: &RequesterContext,
) -> Result<(), String> {
    match daemon::control(
        socket,
        &ControlRequest::Fetch {
            nhs_number: nhs,
            pointer_id: pointer.to_owned(),
            context: ctx.clone(),
        },
    )
    .await
    .map_err(err)?
    {
        ControlResponse::Fetched { records, .. } if records.len() == 1 => Ok(()),
        ControlResponse::Error { message } => Err(message),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Fetches at a fixed `rate` for `secs`; latency of each from its scheduled
/// start (so queueing counts), in ms, and failures.
async fn fetch_paced(
    node: &NodeInfo,
    targets: &[(NhsNumber, String)],
    rate: f64,
    secs: f64,
) -> Result<(Vec<f64>, usize), String> {
    let socket = Arc::new(node.dir.join("control.sock"));
    let ctx = Arc::new(context(&node.ods)?);
    let slots = Arc::new(tokio::sync::Semaphore::new(FETCH_CLIENTS));
    let total = (rate * secs) as usize;
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let Some((nhs, pointer)) = targets.get(i % targets.len().max(1)).cloned() else {
            break;
        };
        let (socket, ctx, slots) = (Arc::clone(&socket), Arc::clone(&ctx), Arc::clone(&slots));
        tasks.push(tokio::spawn(async move {
            let _permit = slots.acquire_owned().await.map_err(err)?;
            fetch_once(&socket, nhs, &pointer, &ctx).await?;
            Ok::<_, String>(due.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failures = 0;
    for task in tasks {
        match task.await.map_err(err)? {
            Ok(ms) => latencies.push(ms),
            Err(_) => failures += 1,
        }
    }
    Ok((latencies, failures))
}

/// Floor request-response in a closed loop for `secs`: answers per second.
async fn floor_closed_loop(
    client: &FloorClient,
    peer: libp2p::PeerId,
    request: &[u8],
    secs: f64,
) -> Result<f64, String> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..FETCH_CLIENTS {
        let (client, request, done) = (client.clone(), request.to_vec(), Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                client.request(peer, request.clone()).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, String>(())
        }));
    }
    for worker in workers {
        worker.await.map_err(err)??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Ingest: careweave's importer against raw sled inserts of the same bytes
/// with the same flushing. Records per second for each.
fn ingest_run(dir: &Path, records: usize) -> Result<(f64, f64), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(err)?;
    let ods = OdsCode::parse("QHG").map_err(err)?;
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config::template(&ods, "bench ingest")).map_err(err)?;
    let loaded = config::load(&config_path, []).map_err(err)?;
    let keys = NodeKeys::generate().map_err(err)?;
    let store = Store::open(
        &dir.join("careweave"),
        loaded.config.store.cache_mb * 1024 * 1024,
    )
    .map_err(err)?;
    let patients = numbers(900_000, records / RECORDS_PER_PATIENT + 1);
    let (stored, _, secs) = import_into(
        &store,
        &loaded,
        &keys,
        "QHG",
        &Synthetic {
            patients: &patients,
            per_patient: RECORDS_PER_PATIENT,
            first: 0,
            count: records,
            bytes: INGEST_RECORD_BYTES,
        },
    )?;
    let careweave = stored as f64 / secs;

    // The floor: the same bytes, raw, flushed every batch.
    let lines: Vec<Vec<u8>> = (0..records)
        .map(|i| {
            let nhs = patients
                .get(i / RECORDS_PER_PATIENT)
                .copied()
                .unwrap_or(data::nhs_number(0));
            serde_json::to_vec(&data::sized_observation(
                &nhs,
                "QHG",
                i as u64,
                INGEST_RECORD_BYTES,
            ))
            .unwrap_or_default()
        })
        .collect();
    let db = sled::Config::new()
        .path(dir.join("raw"))
        .cache_capacity(loaded.config.store.cache_mb * 1024 * 1024)
        .open()
        .map_err(err)?;
    let batch = loaded.config.import.batch_records;
    let started = Instant::now();
    for (i, line) in lines.iter().enumerate() {
        db.insert((i as u64).to_be_bytes(), line.as_slice())
            .map_err(err)?;
        if (i + 1) % batch == 0 {
            db.flush().map_err(err)?;
        }
    }
    db.flush().map_err(err)?;
    let raw = records as f64 / started.elapsed().as_secs_f64();
    drop(db);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
    Ok((careweave, raw))
}

/// Locates resolving to pointer ids at `custodian`, for the fetch figures.
async fn fetch_targets(
    asker: &NodeInfo,
    custodian: &str,
    patients: &[NhsNumber],
) -> Result<Vec<(NhsNumber, String)>, String> {
    let ctx = context(&asker.ods)?;
    let socket = asker.dir.join("control.sock");
    let mut targets = Vec::new();
    for nhs in patients {
        let (_, reports) = locate_once(&socket, *nhs, &ctx).await?;
        let pointer = reports
            .iter()
            .filter(|r| r.ods == custodian)
            .flat_map(|r| r.pointers.iter())
            .next()
            .map(|p| p.id.clone())
            .ok_or_else(|| format!("no pointer at {custodian} for {nhs}"))?;
        targets.push((*nhs, pointer));
    }
    Ok(targets)
}

/// Runs the benchmark and writes `bench.json` and `bench.md` to `out`.
/// Returns the figures; `say` reports progress.
pub async fn run(options: &BenchOptions, say: &dyn Fn(&str)) -> Result<Vec<Figure>, String> {
    let mut scale = if options.quick {
        Scale::quick()
    } else {
        Scale::full()
    };
    if let Some(nodes) = options.nodes {
        if !(2..=42).contains(&nodes) {
            return Err(format!("--nodes must be between 2 and 42, not {nodes}"));
        }
        scale.icbs = nodes;
        scale.growth_icbs.retain(|n| *n < scale.icbs);
    }
    if let Some(records) = options.records {
        if records < RECORDS_PER_PATIENT {
            return Err(format!(
                "--records must be at least {RECORDS_PER_PATIENT}, not {records}"
            ));
        }
        scale.big_records = records;
    }
    for dir in [&options.dir, &options.out] {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let machine = machine();
    say(&format!("machine: {machine}"));
    let sizes = message_sizes()?;
    let mut figures = Vec::new();
    let mut steal = Vec::new();
    for part in Part::ALL.into_iter().filter(|part| options.runs(*part)) {
        let meter = StealMeter::start();
        figures.extend(match part {
            Part::Ingest => ingest_figures(&scale, options, say)?,
            Part::Locate => locate_figures(&scale, options, &sizes, say).await?,
            Part::Growth => growth_figures(&scale, options, say).await?,
            Part::Fetch => fetch_figures(&scale, options, &sizes, say).await?,
        });
        say(&format!(
            "{} part done; CPU steal during it {}",
            part.name(),
            meter.shown()
        ));
        steal.push((part, meter.percent()));
    }
    write_results(options, &machine, &sizes, &figures, &steal)?;
    Ok(figures)
}

/// Ingest, in this process: careweave's importer and raw sled.
fn ingest_figures(
    scale: &Scale,
    options: &BenchOptions,
    say: &dyn Fn(&str),
) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    let mut ours = Vec::new();
    let mut raw = Vec::new();
    for run in 0..scale.runs {
        let (c, r) = ingest_run(&options.dir.join("ingest"), scale.ingest_records)?;
        say(&format!(
            "ingest run {}: careweave {c:.0} records/s, raw sled {r:.0} records/s",
            run + 1
        ));
        ours.push(c);
        raw.push(r);
    }
    let raw_median = median(&raw);
    let ingest = Figure::new(
        "ingest, 1 KiB FHIR resources signed and indexed",
        "records/s",
        ours,
    );
    let met = ingest.value >= 20_000.0 && ingest.value >= 0.5 * raw_median;
    figures.push(
        ingest
            .floor(raw_median)
            .target("≥ 20 000/s and ≥ 50% of raw sled", met),
    );
    Ok(figures)
}

/// The main testnet of `scale.icbs` ICBs, its first node holding the large
/// store: store size, start-up, locate against the floor, memory under
/// load, and locate with one ICB dead.
async fn locate_figures(
    scale: &Scale,
    options: &BenchOptions,
    sizes: &Sizes,
    say: &dyn Fn(&str),
) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    let mut cleanup = Cleanup::default();
    let main_dir = options.dir.join("main");
    let t = cleanup.build(&main_dir, scale.icbs, scale.patients_per_icb, say)?;
    let first = t.nodes.first().cloned().ok_or("empty testnet")?;
    let big_patients = numbers(100_000, scale.big_records / RECORDS_PER_PATIENT);
    say(&format!(
        "importing {} records into {}",
        scale.big_records, first.ods
    ));
    let (stored, raw_bytes, secs) = import_sized(
        &first,
        &Synthetic {
            patients: &big_patients,
            per_patient: RECORDS_PER_PATIENT,
            first: 0,
            count: scale.big_records,
            bytes: INGEST_RECORD_BYTES,
        },
    )?;
    say(&format!(
        "imported {stored} records ({:.0}/s)",
        stored as f64 / secs
    ));
    let store_bytes = dir_size(&first.dir.join("store"));
    let per_record = store_bytes as f64 / stored.max(1) as f64;
    let raw_per_record = raw_bytes as f64 / stored.max(1) as f64;
    figures.push(
        Figure::new(
            format!("store size per record ({} records)", stored),
            "bytes",
            vec![per_record],
        )
        .floor(raw_per_record)
        .target(
            "≤ 2× the raw record bytes",
            per_record <= 2.0 * raw_per_record,
        ),
    );
    start(&t, say).await?;

    let mut startups = Vec::new();
    for _ in 0..scale.runs {
        startups.push(restart_timed(&first).await?);
    }
    setup::wait_connected(&t, Duration::from_secs(120))
        .await
        .map_err(err)?;
    let startup = Figure::new(
        format!("start-up to ready, {} records", stored),
        "s",
        startups,
    );
    let met = startup.value <= 2.0;
    figures.push(startup.target("≤ 2 s", met));

    // Locate, sequential and 8 in parallel, with the RSS of the large node.
    let mut patients = testnet_patients(&t, scale.patients_per_icb);
    patients.extend(big_patients.iter().step_by(7).take(2000));
    let first_pid = pid(&first).ok_or("first node has no pid")?;
    let rss_before = rss_bytes(first_pid).unwrap_or(0);
    let (stop_sampling, sampler) = sample_rss(first_pid);
    // The floor: plain request-response fan-out to as many peers. Within
    // each run, blocks of careweave's locates alternate with blocks of the
    // floor's, so that both see the machine in the same moments: run apart,
    // the floor's figures moved by a fifth between runs, and whole runs in
    // turn still left its p50 moving from 11.8 to 18.9 ms in 20 minutes.
    say("starting the plain libp2p floor");
    let floor = floor_net(
        &options.dir.join("floor"),
        scale.icbs - 1,
        FloorKind::Plain,
        &mut cleanup,
    )
    .await?;
    let floor_cpu = CpuMeter::new(floor.pids.iter().copied());
    let floor_ids = floor.ids();
    let locate_request = floor::request_bytes(sizes.locate_request, sizes.locate_response);
    let floor_run = |count: usize, parallel: usize| {
        floor_cpu.per_request(
            count,
            floor_fan_out_run(&floor.client, &floor_ids, &locate_request, count, parallel),
        )
    };
    // The same floor nodes also measure the required work alone, so what
    // is left between it and careweave is careweave's own.
    let signed_run =
        |count: usize| floor_cpu.per_request(count, floor_required_work_run(&floor, sizes, count));
    // Separate floor nodes add the other protocols and the full mesh, so
    // the plain floor stays plain.
    say("starting the protocol floor");
    let protocol_floor = floor_net(
        &options.dir.join("floor-protocols"),
        scale.icbs - 1,
        FloorKind::WithProtocols,
        &mut cleanup,
    )
    .await?;
    let protocol_floor_cpu = CpuMeter::new(protocol_floor.pids.iter().copied());
    let protocol_run = |count: usize| {
        protocol_floor_cpu.per_request(
            count,
            floor_required_work_run(&protocol_floor, sizes, count),
        )
    };
    locate_run(&first, &patients, WARM_UP, PARALLEL, None).await?;
    floor_run(WARM_UP, PARALLEL).await?;
    signed_run(WARM_UP).await?;
    protocol_run(WARM_UP).await?;
    let nodes_cpu = CpuMeter::new(t.nodes.iter().filter_map(pid));
    let mut kinds = [
        LocateRuns::new(
            "sequential",
            scale.locate_sequential,
            1,
            scale.locate_block_sequential,
        ),
        LocateRuns::new(
            "8 in parallel",
            scale.locate_parallel,
            PARALLEL,
            scale.locate_block_parallel,
        ),
    ];
    let mut failures = 0;
    for run in 0..scale.runs {
        for kind in &mut kinds {
            let (count, parallel) = (kind.count, kind.parallel);
            let (mut ours_ms, mut floor_ms, mut signed_ms) = (Vec::new(), Vec::new(), Vec::new());
            let (mut cpu_total, mut floor_cpu_total, mut signed_cpu_total) = (0.0, 0.0, 0.0);
            let (mut protocol_ms, mut protocol_cpu_total) = (Vec::new(), 0.0);
            for block in blocks(count, kind.block) {
                let size = block.len();
                let ((ms, f, _), cpu) = nodes_cpu
                    .per_request(size, locate_block(&first, &patients, block, parallel, None))
                    .await?;
                failures += f;
                ours_ms.extend(ms);
                cpu_total += cpu * size as f64;
                let (ms, floor_cpu) = floor_run(size, parallel).await?;
                floor_ms.extend(ms);
                floor_cpu_total += floor_cpu * size as f64;
                if parallel == 1 {
                    let (ms, cpu) = signed_run(size).await?;
                    signed_ms.extend(ms);
                    signed_cpu_total += cpu * size as f64;
                    let (ms, cpu) = protocol_run(size).await?;
                    protocol_ms.extend(ms);
                    protocol_cpu_total += cpu * size as f64;
                }
            }
            let (ours, floor) = (latency(ours_ms), latency(floor_ms));
            let cpu = cpu_total / count.max(1) as f64;
            let floor_cpu_ms = floor_cpu_total / count.max(1) as f64;
            say(&format!(
                "locate run {}: {} p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms, {cpu:.1} ms CPU; \
                 floor p50 {:.2} ms p99 {:.2} ms, {floor_cpu_ms:.1} ms CPU",
                run + 1,
                kind.label,
                ours.p50,
                ours.p99,
                ours.p999,
                floor.p50,
                floor.p99,
            ));
            kind.ours.push(ours);
            kind.floor.push(floor);
            kind.cpu.push(cpu);
            kind.floor_cpu.push(floor_cpu_ms);
            if !signed_ms.is_empty() {
                let signed = latency(signed_ms);
                let signed_cpu = signed_cpu_total / count.max(1) as f64;
                say(&format!(
                    "locate run {}: signed and audited floor p50 {:.2} ms p99 {:.2} ms, \
                     {signed_cpu:.1} ms CPU",
                    run + 1,
                    signed.p50,
                    signed.p99,
                ));
                kind.signed.push(signed);
                kind.signed_cpu.push(signed_cpu);
            }
            if !protocol_ms.is_empty() {
                let protocol = latency(protocol_ms);
                let protocol_cpu = protocol_cpu_total / count.max(1) as f64;
                say(&format!(
                    "locate run {}: protocol floor p50 {:.2} ms p99 {:.2} ms, \
                     {protocol_cpu:.1} ms CPU",
                    run + 1,
                    protocol.p50,
                    protocol.p99,
                ));
                kind.protocol.push(protocol);
                kind.protocol_cpu.push(protocol_cpu);
            }
        }
    }
    stop_sampling.store(true, Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let rss_after = rss_bytes(first_pid).unwrap_or(0);
    say(&format!(
        "RSS of {}: {} MiB before locate load, peak {} MiB, {} MiB after",
        first.ods,
        rss_before / 1024 / 1024,
        peak / 1024 / 1024,
        rss_after / 1024 / 1024
    ));
    for kind in &kinds {
        let (label, ours, floor) = (kind.label, &kind.ours, &kind.floor);
        let pick = |l: &[Latency], f: fn(&Latency) -> f64| l.iter().map(f).collect::<Vec<_>>();
        let p50 = Figure::new(
            format!("locate p50, {} ICBs, {label}", scale.icbs),
            "ms",
            pick(ours, |l| l.p50),
        );
        let floor_p50 = median(&pick(floor, |l| l.p50));
        let met = p50.value <= 10.0 && p50.value <= 1.5 * floor_p50;
        figures.push(p50.floor(floor_p50).target("≤ 10 ms and ≤ 1.5× floor", met));
        let p99 = Figure::new(
            format!("locate p99, {} ICBs, {label}", scale.icbs),
            "ms",
            pick(ours, |l| l.p99),
        );
        let floor_p99 = median(&pick(floor, |l| l.p99));
        let met = p99.value <= 20.0 && p99.value <= 2.0 * floor_p99;
        figures.push(p99.floor(floor_p99).target("≤ 20 ms and ≤ 2× floor", met));
        let floor_p999 = median(&pick(floor, |l| l.p999));
        figures.push(
            Figure::new(
                format!("locate p99.9, {} ICBs, {label}", scale.icbs),
                "ms",
                pick(ours, |l| l.p999),
            )
            .floor(floor_p999),
        );
        for (which, runs) in [
            ("signed and audited floor", &kind.signed),
            ("protocol floor", &kind.protocol),
        ] {
            if runs.is_empty() {
                continue;
            }
            for (name, floor, part) in [
                (
                    "p50",
                    floor_p50,
                    (|l: &Latency| l.p50) as fn(&Latency) -> f64,
                ),
                ("p99", floor_p99, |l: &Latency| l.p99),
            ] {
                figures.push(
                    Figure::new(
                        format!("{which}, {name}, {} ICBs, {label}", scale.icbs),
                        "ms",
                        pick(runs, part),
                    )
                    .floor(floor),
                );
            }
        }
    }
    for kind in &kinds {
        figures.push(
            Figure::new(
                format!(
                    "CPU per locate, {} ICBs, {} (every process, client included)",
                    scale.icbs, kind.label
                ),
                "ms",
                kind.cpu.clone(),
            )
            .floor(median(&kind.floor_cpu)),
        );
        for (which, cpu) in [
            ("signed and audited floor", &kind.signed_cpu),
            ("protocol floor", &kind.protocol_cpu),
        ] {
            if cpu.is_empty() {
                continue;
            }
            figures.push(
                Figure::new(
                    format!(
                        "CPU per {which} locate, {} ICBs, {}",
                        scale.icbs, kind.label
                    ),
                    "ms",
                    cpu.clone(),
                )
                .floor(median(&kind.floor_cpu)),
            );
        }
    }
    figures.push(
        Figure::new(
            "locate answers that were not answers (refused, timed out, unreachable)",
            "count",
            vec![failures as f64],
        )
        .target("0", failures == 0),
    );
    let memory = Figure::new(
        format!(
            "node RSS under locate load, {} records, {} peers",
            stored,
            scale.icbs - 1
        ),
        "MiB",
        vec![peak as f64 / 1024.0 / 1024.0],
    );
    let met = memory.value <= 256.0;
    figures.push(memory.target("≤ 256 MiB", met));

    // One ICB dead.
    let dead = t.nodes.last().cloned().ok_or("empty testnet")?;
    kill_hard(&dead);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut dead_p99 = Vec::new();
    let mut flagged_all = true;
    for _ in 0..scale.runs {
        let count = scale.locate_sequential / 2;
        let (ms, f, flagged) =
            locate_run(&first, &patients, count, 1, Some(dead.ods.as_str())).await?;
        flagged_all &= flagged == count && f == 0;
        dead_p99.push(latency(ms).p99);
    }
    let dead_fig = Figure::new(
        format!("locate p99 with one of {} ICBs killed", scale.icbs),
        "ms",
        dead_p99,
    );
    let met = dead_fig.value <= DEADLINE_MS + 5.0 && flagged_all;
    figures.push(dead_fig.target(
        format!(
            "≤ deadline ({DEADLINE_MS:.0} ms) + 5 ms, dead ICB flagged every time{}",
            if flagged_all { "" } else { " (it was not)" }
        ),
        met,
    ));
    setup::stop_all(&main_dir);
    let _ = std::fs::remove_dir_all(main_dir.join("nodes"));
    Ok(figures)
}

/// Growth with ICBs (every size on a fresh testnet built the same way, the
/// largest too, so no size carries the main testnet's million records), and
/// with records per node.
async fn growth_figures(
    scale: &Scale,
    options: &BenchOptions,
    say: &dyn Fn(&str),
) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    let mut cleanup = Cleanup::default();
    let mut growth: Vec<(usize, f64)> = Vec::new();
    let mut icb_counts = scale.growth_icbs.clone();
    icb_counts.push(scale.icbs);
    for &n in &icb_counts {
        let dir = options.dir.join(format!("growth-{n}"));
        let t = cleanup.build(&dir, n, scale.patients_per_icb, say)?;
        start(&t, say).await?;
        let node = t.nodes.first().cloned().ok_or("empty testnet")?;
        let patients = testnet_patients(&t, scale.patients_per_icb);
        locate_run(&node, &patients, WARM_UP, 1, None).await?;
        let mut p50s = Vec::new();
        for _ in 0..scale.runs {
            let (ms, _, _) = locate_run(&node, &patients, scale.locate_sequential, 1, None).await?;
            p50s.push(latency(ms).p50);
        }
        growth.push((n, median(&p50s)));
        setup::stop_all(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
    growth.sort_by_key(|(n, _)| *n);
    for (n, p50) in &growth {
        figures.push(Figure::new(
            format!("locate p50 on a fresh testnet of {n} ICBs, sequential"),
            "ms",
            vec![*p50],
        ));
    }
    if let (Some((n0, p0)), Some((n1, p1))) = (growth.first(), growth.last()) {
        let ratio = p1 / p0;
        let allowed = *n1 as f64 / *n0 as f64;
        figures.push(
            Figure::new(
                format!("locate p50 growth from {n0} to {n1} ICBs"),
                "×",
                vec![ratio],
            )
            .target(format!("≤ {allowed:.1}× (linear)"), ratio <= allowed),
        );
    }

    // Growth with records per node.
    let dir = options.dir.join("growth-records");
    let t = cleanup.build(&dir, scale.growth_nodes, scale.patients_per_icb, say)?;
    let per_node_patients: Vec<Vec<NhsNumber>> = (0..t.nodes.len())
        .map(|i| {
            let count = scale.growth_records[1] / RECORDS_PER_PATIENT;
            numbers(200_000 + (i * 140_000) as u32, count)
        })
        .collect();
    let mut record_p50 = Vec::new();
    let mut imported = 0;
    for &target in &scale.growth_records {
        say(&format!(
            "importing up to {target} records into each of {} nodes",
            t.nodes.len()
        ));
        import_all(&t, &per_node_patients, imported, target - imported)?;
        imported = target;
        start(&t, say).await?;
        let node = t.nodes.first().cloned().ok_or("empty testnet")?;
        let mut patients: Vec<NhsNumber> = per_node_patients
            .iter()
            .flat_map(|p| p.iter().take(target / RECORDS_PER_PATIENT).step_by(11))
            .copied()
            .collect();
        patients.truncate(5000);
        locate_run(&node, &patients, WARM_UP, 1, None).await?;
        let mut p50s = Vec::new();
        for _ in 0..scale.runs {
            let (ms, _, _) = locate_run(&node, &patients, scale.locate_sequential, 1, None).await?;
            p50s.push(latency(ms).p50);
        }
        let p50 = median(&p50s);
        say(&format!(
            "locate p50 with {target} records per node: {p50:.2} ms"
        ));
        figures.push(Figure::new(
            format!(
                "locate p50, {} ICBs, {target} records per node",
                t.nodes.len()
            ),
            "ms",
            p50s,
        ));
        record_p50.push(p50);
        setup::stop_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let [small, large] = record_p50.as_slice() {
        let ratio = large / small;
        figures.push(
            Figure::new(
                format!(
                    "locate p50 growth from {} to {} records per node",
                    scale.growth_records[0], scale.growth_records[1]
                ),
                "×",
                vec![ratio],
            )
            .target("≤ 1.5×", ratio <= 1.5),
        );
    }
    Ok(figures)
}

/// Fetch: one node serving 4 KiB records to another, against the floor.
async fn fetch_figures(
    scale: &Scale,
    options: &BenchOptions,
    sizes: &Sizes,
    say: &dyn Fn(&str),
) -> Result<Vec<Figure>, String> {
    let mut figures = Vec::new();
    let mut cleanup = Cleanup::default();
    let dir = options.dir.join("fetch");
    let t = cleanup.build(&dir, 2, 5, say)?;
    let (asker, custodian) = match t.nodes.as_slice() {
        [a, b] => (a.clone(), b.clone()),
        _ => return Err("fetch testnet needs two nodes".into()),
    };
    let fetch_patients = numbers(800_000, scale.fetch_patients);
    import_sized(
        &custodian,
        &Synthetic {
            patients: &fetch_patients,
            per_patient: 1,
            first: 0,
            count: scale.fetch_patients,
            bytes: FETCH_RECORD_BYTES,
        },
    )?;
    start(&t, say).await?;
    let targets = fetch_targets(&asker, &custodian.ods, &fetch_patients).await?;
    fetch_closed_loop(&asker, &targets, 0.5).await?;
    let mut throughput = Vec::new();
    let mut fetch_failures = 0;
    for run in 0..scale.runs {
        let meter = StealMeter::start();
        let (rate, f) = fetch_closed_loop(&asker, &targets, scale.fetch_secs).await?;
        say(&format!(
            "fetch run {}: {rate:.0} fetches/s, CPU steal {}",
            run + 1,
            meter.shown()
        ));
        throughput.push(rate);
        fetch_failures += f;
    }
    let rate = median(&throughput);
    let mut p99s = Vec::new();
    for run in 0..scale.runs {
        let meter = StealMeter::start();
        let (ms, f) = fetch_paced(&asker, &targets, rate * 0.8, scale.fetch_secs).await?;
        let p99 = latency(ms).p99;
        say(&format!(
            "fetch run {} at {:.0}/s: p99 {p99:.2} ms, CPU steal {}",
            run + 1,
            rate * 0.8,
            meter.shown()
        ));
        fetch_failures += f;
        p99s.push(p99);
    }
    setup::stop_all(&dir);
    let floor_fetch = floor_net(
        &options.dir.join("floor-fetch"),
        1,
        FloorKind::Plain,
        &mut cleanup,
    )
    .await?;
    let floor_client = &floor_fetch.client;
    let floor_peer = floor_fetch.peers.first().ok_or("no floor node")?.id;
    let fetch_request = floor::request_bytes(sizes.fetch_request, sizes.fetch_response);
    let mut floor_rates = Vec::new();
    for _ in 0..scale.runs {
        floor_rates.push(
            floor_closed_loop(floor_client, floor_peer, &fetch_request, scale.fetch_secs).await?,
        );
    }
    let floor_rate = median(&floor_rates);
    let fetch = Figure::new(
        format!("fetch throughput, {FETCH_RECORD_BYTES}-byte records, {FETCH_CLIENTS} clients"),
        "fetches/s",
        throughput,
    );
    let met = fetch.value >= 5000.0;
    figures.push(fetch.floor(floor_rate).target("≥ 5 000/s", met));
    let p99 = Figure::new("fetch p99 at 80% of that rate", "ms", p99s);
    let met = p99.value <= 20.0;
    figures.push(p99.target("≤ 20 ms", met));
    figures.push(
        Figure::new("fetches that failed", "count", vec![fetch_failures as f64])
            .target("0", fetch_failures == 0),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(figures)
}

/// Imports `count` more records into every node of a stopped testnet, two
/// nodes at a time (the machine's cores).
fn import_all(
    t: &Testnet,
    patients: &[Vec<NhsNumber>],
    first_record: usize,
    count: usize,
) -> Result<(), String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for chunk in t
        .nodes
        .iter()
        .zip(patients)
        .collect::<Vec<_>>()
        .chunks(threads)
    {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(node, patients)| {
                    s.spawn(move || {
                        import_sized(
                            node,
                            &Synthetic {
                                patients,
                                per_patient: RECORDS_PER_PATIENT,
                                first: first_record,
                                count,
                                bytes: INGEST_RECORD_BYTES,
                            },
                        )
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| "import thread failed".to_owned())?
                    .map(|_| ())
            })
        })?;
    }
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn format_value(value: f64) -> String {
    if !value.is_finite() {
        "—".into()
    } else if value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// The Markdown table of a run.
pub fn markdown(machine: &Value, figures: &[Figure]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Machine: {} ({} cores, {} GiB), Linux {}, {}, {} build, {}.\n\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["rustc"].as_str().unwrap_or("?"),
        machine["build"].as_str().unwrap_or("?"),
        machine["date"].as_str().unwrap_or("?"),
    ));
    out.push_str(
        "| figure | measured (median) | runs | target | floor, same run | ratio | met |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|\n");
    for f in figures {
        out.push_str(&format!(
            "| {} | {} {} | {} | {} | {} | {} | {} |\n",
            f.name,
            format_value(f.value),
            f.unit,
            f.runs
                .iter()
                .map(|v| format_value(*v))
                .collect::<Vec<_>>()
                .join(", "),
            if f.target.is_empty() {
                "—"
            } else {
                &f.target
            },
            f.floor
                .map_or("—".into(), |v| format!("{} {}", format_value(v), f.unit)),
            f.ratio.map_or("—".into(), |r| format!("{r:.2}×")),
            match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            }
        ));
    }
    out
}

fn write_results(
    options: &BenchOptions,
    machine: &Value,
    sizes: &Sizes,
    figures: &[Figure],
    steal: &[(Part, Option<f64>)],
) -> Result<(), String> {
    let parts: Vec<&str> = Part::ALL
        .into_iter()
        .filter(|part| options.runs(*part))
        .map(Part::name)
        .collect();
    let json = json!({
        "quick": options.quick,
        "parts": parts,
        "steal_percent": steal
            .iter()
            .map(|(part, percent)| (part.name().to_owned(), json!(percent)))
            .collect::<serde_json::Map<_, _>>(),
        "machine": machine,
        "message_bytes": {
            "locate_request": sizes.locate_request,
            "locate_response": sizes.locate_response,
            "fetch_request": sizes.fetch_request,
            "fetch_response": sizes.fetch_response,
        },
        "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
    });
    std::fs::write(
        options.out.join("bench.json"),
        serde_json::to_vec_pretty(&json).map_err(err)?,
    )
    .map_err(err)?;
    let mut table = markdown(machine, figures);
    let stolen: Vec<String> = steal
        .iter()
        .map(|(part, percent)| format!("{} {}", part.name(), shown_steal(*percent)))
        .collect();
    table.push_str(&format!(
        "\nCPU time the hypervisor took for other guests (steal), by part: {}.\n",
        stolen.join(", ")
    ));
    std::fs::write(options.out.join("bench.md"), table).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_column_of_the_cpu_line() {
        let ticks = CpuTicks::parse("cpu  100 5 50 800 20 0 10 15 0 0").unwrap();
        assert_eq!((ticks.steal, ticks.total), (15, 1000));
        assert!(CpuTicks::parse("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(CpuTicks::parse("cpu  1 2 3").is_none());
        assert!(CpuTicks::parse("cpu  1 2 3 4 5 6 7 x").is_none());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&ms, 50.0), 500.0);
        assert_eq!(percentile(&ms, 99.0), 990.0);
        assert_eq!(percentile(&ms, 99.9), 999.0);
        assert_eq!(percentile(&[3.0], 99.9), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_brackets() {
        let stat = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0";
        assert_eq!(cpu_seconds_in(stat), Some(3.25));
        assert_eq!(cpu_seconds_in("4242 (cut) S 1 2"), None);
        assert!(cpu_seconds("self").is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn blocks_cover_a_run_once_in_order() {
        let all: Vec<_> = blocks(1000, 100).collect();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0], 0..100);
        assert_eq!(all[9], 900..1000);
        let uneven: Vec<_> = blocks(250, 100).collect();
        assert_eq!(uneven, [0..100, 100..200, 200..250]);
        assert_eq!(blocks(0, 100).count(), 0);
        assert_eq!(blocks(3, 0).collect::<Vec<_>>(), [0..1, 1..2, 2..3]);
    }

    #[test]
    fn median_of_even_and_odd_runs() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn floor_sets_the_ratio_and_targets_say_whether_met() {
        let f = Figure::new("x", "ms", vec![3.5, 6.5, 4.5])
            .floor(1.5)
            .target("≤ 4", false);
        assert_eq!(f.value, 4.5);
        assert_eq!(f.ratio, Some(3.0));
        assert_eq!(f.met, Some(false));
        let table = markdown(&machine(), &[f]);
        assert!(
            table.contains("| x | 4.50 ms | 3.50, 6.50, 4.50 | ≤ 4 | 1.50 ms | 3.00× | **no** |"),
            "{table}"
        );
    }

    #[test]
    fn message_sizes_come_from_real_messages() {
        let s = message_sizes().unwrap();
        assert!(s.locate_request > 300 && s.locate_request < 1000, "{s:?}");
        assert!(s.fetch_response > FETCH_RECORD_BYTES, "{s:?}");
    }

    #[test]
    fn numbers_are_distinct_and_valid() {
        let n = numbers(5, 500);
        assert_eq!(n.len(), 500);
        let mut unique = n.clone();
        unique.dedup();
        assert_eq!(unique.len(), 500);
        assert!(n.iter().all(NhsNumber::is_test_range));
    }
}
