//! `careweave-testnet soak`: mixed locate, fetch and import on a five-ICB
//! testnet for a set time, watching every node's memory, then `audit verify`
//! on every node. It passes when no request failed, no node's RSS grew by
//! 10% or more after warm-up (the first half; judged in runs of an hour or
//! more, on five-minute means), and every audit log verifies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use careweave_node::api::client::ApiClient;
use careweave_node::config;
use careweave_node::daemon::{self, ControlRequest, ControlResponse};
use careweave_node::keys::NodeKeys;
use careweave_node::store::Store;
use careweave_protocol::NhsNumber;
use serde_json::{Value, json};

use crate::bench::{self, Cleanup, err};
use crate::data;
use crate::setup::{self, NodeInfo, Testnet};

/// ICBs in the soak's testnet.
const ICBS: usize = 5;
/// Synthetic patients per ICB.
const PATIENTS_PER_ICB: u32 = 20;
/// Locates in flight at once from the first node.
const LOCATE_CLIENTS: usize = 2;
/// Records per import, one import every `IMPORT_EVERY`.
const IMPORT_RECORDS: usize = 20;
/// Distinct records the imports write; after the first hundred imports (in
/// the warm-up) each one replaces records. With ever new ids, each
/// patient's records at the importing node grew all run (about 120 more
/// per patient in twenty minutes), and so did every fetch's answer: RSS then
/// climbed with the data, which hid whether anything leaked.
const IMPORT_WORKING_SET: u64 = 2_000;
const IMPORT_EVERY: Duration = Duration::from_secs(2);
/// How often every node's RSS is read.
pub const RSS_EVERY: Duration = Duration::from_secs(2);
/// How often the RSS series takes a point.
pub const SERIES_EVERY: Duration = Duration::from_secs(10);

/// Largest RSS growth after warm-up that passes.
const MAX_GROWTH: f64 = 0.10;
/// RSS is judged on its mean over this long, just after warm-up and at the
/// end: with jemalloc a node's RSS moves by up to 10% from one minute to
/// the next as freed pages are returned, so two single readings judged
/// that movement, not growth.
pub const JUDGE_WINDOW: Duration = Duration::from_secs(300);
/// Shorter runs report memory but are not judged on it. Until glibc's
/// retention and sled's checkpoint tree were dealt with (decisions 0017,
/// 0018), memory filled for 40 to 50 minutes at this load; since then an
/// hour-long run has been flat from the fifth minute, but no shorter run
/// has been measured to show it. 59 minutes, so that a `--minutes 60` run
/// always counts.
const MIN_SECONDS_FOR_MEMORY: f64 = 3540.0;

/// What `careweave-testnet soak` is asked for.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub minutes: f64,
    pub dir: PathBuf,
    pub out: PathBuf,
}

/// What a soak saw.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub seconds: f64,
    pub locates: u64,
    pub locate_failures: u64,
    pub fetches: u64,
    pub fetch_failures: u64,
    pub imports: u64,
    pub imported_records: u64,
    pub import_failures: u64,
    /// Seconds of warm-up, after which memory must hold.
    pub warm_up_seconds: f64,
    /// Every node's memory over the run.
    pub memory: Vec<NodeMemory>,
    /// Per node: ODS and `audit verify`'s verdict.
    pub audit: Vec<(String, Result<u64, String>)>,
}

impl SoakReport {
    /// Why the soak failed, if it did.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (what, failures) in [
            ("locates", self.locate_failures),
            ("fetches", self.fetch_failures),
            ("imports", self.import_failures),
        ] {
            if failures > 0 {
                problems.push(format!("{failures} {what} failed"));
            }
        }
        if self.locates == 0 || self.fetches == 0 || self.imports == 0 {
            problems.push("some kind of request never ran".into());
        }
        for node in self.memory.iter().filter(|_| self.judges_memory()) {
            let (Some(warm), Some(end)) = self.window_means(&node.rss) else {
                problems.push(format!("{}: too few RSS readings to judge", node.ods));
                continue;
            };
            if warm > 0.0 && end / warm - 1.0 >= MAX_GROWTH {
                problems.push(format!(
                    "{} grew from {warm:.1} to {end:.1} MiB after warm-up (five-minute means)",
                    node.ods
                ));
            }
        }
        for (ods, verdict) in &self.audit {
            if let Err(e) = verdict {
                problems.push(format!("{ods}: audit verify failed: {e}"));
            }
        }
        problems
    }

    /// Whether the run was long enough for memory growth to mean anything:
    /// in a short run the caches are still filling after warm-up.
    pub fn judges_memory(&self) -> bool {
        self.seconds >= MIN_SECONDS_FOR_MEMORY
    }

    /// The mean of `series` over [`JUDGE_WINDOW`] just after warm-up, and
    /// over the last [`JUDGE_WINDOW`]. In a run too short for two whole
    /// windows after warm-up, each window is half of what follows it.
    pub fn window_means(&self, series: &[Option<f64>]) -> (Option<f64>, Option<f64>) {
        let every = SERIES_EVERY.as_secs_f64();
        let start = ((self.warm_up_seconds / every).ceil() as usize).min(series.len());
        let after = series.len() - start;
        let width = ((JUDGE_WINDOW.as_secs_f64() / every) as usize)
            .min(after / 2)
            .max(1);
        let mean = |points: &[Option<f64>]| {
            let read: Vec<f64> = points.iter().flatten().copied().collect();
            (!read.is_empty()).then(|| read.iter().sum::<f64>() / read.len() as f64)
        };
        if after == 0 {
            return (None, None);
        }
        let first = series.get(start..start + width.min(after)).and_then(mean);
        let last = series.get(series.len() - width.min(after)..).and_then(mean);
        (first, last)
    }

    fn to_json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "locates": self.locates,
            "locate_failures": self.locate_failures,
            "fetches": self.fetches,
            "fetch_failures": self.fetch_failures,
            "imports": self.imports,
            "imported_records": self.imported_records,
            "import_failures": self.import_failures,
            "warm_up_seconds": self.warm_up_seconds,
            "judged_on": format!(
                "mean RSS over {} s after warm-up against the last {} s",
                JUDGE_WINDOW.as_secs(),
                JUDGE_WINDOW.as_secs()
            ),
            "rss_mib": self.memory.iter().map(|node| {
                let (warm, end) = self.window_means(&node.rss);
                let (allocated_warm, allocated_end) = self.window_means(&node.allocated);
                json!({
                    "ods": node.ods, "after_warm_up": warm, "end": end, "peak": node.peak,
                    "allocated_after_warm_up": allocated_warm,
                    "allocated_end": allocated_end,
                })
            }).collect::<Vec<_>>(),
            "rss_series_every_seconds": SERIES_EVERY.as_secs(),
            "rss_series_mib": self.memory.iter().map(|node| json!({
                "ods": node.ods, "mib": node.rss,
            })).collect::<Vec<_>>(),
            "allocated_series_mib": self.memory.iter().map(|node| json!({
                "ods": node.ods, "mib": node.allocated,
            })).collect::<Vec<_>>(),
            "allocator_resident_series_mib": self.memory.iter().map(|node| json!({
                "ods": node.ods, "mib": node.allocator_resident,
            })).collect::<Vec<_>>(),
            "audit": self.audit.iter().map(|(ods, v)| json!({
                "ods": ods,
                "entries": v.as_ref().ok(),
                "error": v.as_ref().err(),
            })).collect::<Vec<_>>(),
            "memory_judged": self.judges_memory(),
            "problems": self.problems(),
        })
    }
}

/// Counters shared by the load tasks.
#[derive(Debug, Default)]
struct Counts {
    locates: AtomicU64,
    locate_failures: AtomicU64,
    fetches: AtomicU64,
    fetch_failures: AtomicU64,
    imports: AtomicU64,
    imported_records: AtomicU64,
    import_failures: AtomicU64,
}

/// Runs the soak and writes `soak.json` to `out`.
pub async fn run(options: &SoakOptions, say: &dyn Fn(&str)) -> Result<SoakReport, String> {
    if !(options.minutes > 0.0 && options.minutes <= 24.0 * 60.0) {
        return Err(format!(
            "--minutes must be more than 0 and at most a day, not {}",
            options.minutes
        ));
    }
    let t = bench::build(&options.dir, ICBS, PATIENTS_PER_ICB, say)?;
    let _cleanup = Cleanup {
        testnets: vec![t.dir.clone()],
        children: Vec::new(),
    };
    bench::start(&t, say).await?;
    let patients = bench::testnet_patients(&t, PATIENTS_PER_ICB);
    let duration = Duration::from_secs_f64(options.minutes * 60.0);
    // Warm-up: the first half, generous now that memory is flat after five
    // minutes (docs/security.md). Shorter runs report memory but are not
    // judged on it (`MIN_SECONDS_FOR_MEMORY`).
    let warm_up = duration / 2;
    let started = Instant::now();
    let until = started + duration;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));

    let mut tasks = Vec::new();
    for client in 0..LOCATE_CLIENTS {
        tasks.push(tokio::spawn(locate_loop(
            first(&t)?.clone(),
            patients.clone(),
            client,
            until,
            Arc::clone(&counts),
        )));
    }
    tasks.push(tokio::spawn(fetch_loop(
        t.clone(),
        patients.clone(),
        until,
        Arc::clone(&counts),
    )));
    tasks.push(tokio::spawn(import_loop(
        t.clone(),
        patients.clone(),
        until,
        Arc::clone(&counts),
    )));
    let sampler = tokio::spawn(sample_all(t.clone(), started, Arc::clone(&stop)));
    let mut last_said = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if last_said.elapsed() >= Duration::from_secs(30) {
            last_said = Instant::now();
            say(&format!(
                "{:.0} s: {} locates, {} fetches, {} imports, {} failures",
                started.elapsed().as_secs_f64(),
                counts.locates.load(Ordering::Relaxed),
                counts.fetches.load(Ordering::Relaxed),
                counts.imports.load(Ordering::Relaxed),
                counts.locate_failures.load(Ordering::Relaxed)
                    + counts.fetch_failures.load(Ordering::Relaxed)
                    + counts.import_failures.load(Ordering::Relaxed),
            ));
        }
    }
    for task in tasks {
        task.await.map_err(err)?;
    }
    stop.store(true, Ordering::Relaxed);
    let memory = sampler
        .await
        .map_err(|_| "the memory sampler panicked".to_owned())?;
    let seconds = started.elapsed().as_secs_f64();
    setup::stop_all(&t.dir);
    let audit = t
        .nodes
        .iter()
        .map(|node| (node.ods.clone(), verify_audit(node)))
        .collect();
    let report = SoakReport {
        seconds,
        locates: counts.locates.load(Ordering::Relaxed),
        locate_failures: counts.locate_failures.load(Ordering::Relaxed),
        fetches: counts.fetches.load(Ordering::Relaxed),
        fetch_failures: counts.fetch_failures.load(Ordering::Relaxed),
        imports: counts.imports.load(Ordering::Relaxed),
        imported_records: counts.imported_records.load(Ordering::Relaxed),
        import_failures: counts.import_failures.load(Ordering::Relaxed),
        warm_up_seconds: warm_up.as_secs_f64(),
        memory,
        audit,
    };
    std::fs::create_dir_all(&options.out).map_err(err)?;
    let mut out = report.to_json();
    if let Some(fields) = out.as_object_mut() {
        fields.insert("machine".into(), bench::machine());
    }
    std::fs::write(
        options.out.join("soak.json"),
        serde_json::to_vec_pretty(&out).map_err(err)?,
    )
    .map_err(err)?;
    Ok(report)
}

fn first(t: &Testnet) -> Result<&NodeInfo, String> {
    t.nodes
        .first()
        .ok_or_else(|| "the testnet has no nodes".to_owned())
}

async fn locate_loop(
    asker: NodeInfo,
    patients: Vec<NhsNumber>,
    client: usize,
    until: Instant,
    counts: Arc<Counts>,
) {
    let socket = asker.dir.join("control.sock");
    let Ok(ctx) = bench::context(&asker.ods) else {
        counts.locate_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut i = client;
    while Instant::now() < until {
        let Some(nhs) = patients.get(i % patients.len().max(1)) else {
            return;
        };
        i += LOCATE_CLIENTS;
        match bench::locate_once(&socket, *nhs, &ctx).await {
            Ok((_, reports)) if bench::failed(&reports, None) == 0 => {
                counts.locates.fetch_add(1, Ordering::Relaxed)
            }
            _ => counts.locate_failures.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Locates through the second node, then fetches each pointer another ICB
/// returned, round and round.
async fn fetch_loop(t: Testnet, patients: Vec<NhsNumber>, until: Instant, counts: Arc<Counts>) {
    let Some(asker) = t.nodes.get(1) else { return };
    let socket = asker.dir.join("control.sock");
    let Ok(ctx) = bench::context(&asker.ods) else {
        counts.fetch_failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut i = 0;
    while Instant::now() < until {
        let Some(nhs) = patients.get(i % patients.len().max(1)) else {
            return;
        };
        i += 1;
        let Ok((_, reports)) = bench::locate_once(&socket, *nhs, &ctx).await else {
            counts.fetch_failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let pointers: Vec<String> = reports
            .iter()
            .filter(|r| r.ods != asker.ods)
            .flat_map(|r| r.pointers.iter().map(|p| p.id.clone()))
            .collect();
        for pointer in pointers {
            if Instant::now() >= until {
                break;
            }
            let request = ControlRequest::Fetch {
                nhs_number: *nhs,
                pointer_id: pointer,
                context: ctx.clone(),
            };
            match daemon::control(&socket, &request).await {
                Ok(ControlResponse::Fetched { records, .. }) if !records.is_empty() => {
                    counts.fetches.fetch_add(1, Ordering::Relaxed)
                }
                _ => counts.fetch_failures.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

/// Imports a small transaction Bundle into the third node through its
/// clinical API every `IMPORT_EVERY`.
async fn import_loop(t: Testnet, patients: Vec<NhsNumber>, until: Instant, counts: Arc<Counts>) {
    let Some(node) = t.nodes.get(2) else { return };
    let client = match ApiClient::new(
        &t.dir.join("api-ca/ca.pem"),
        &t.dir.join("api-ca/client/cert.pem"),
        &t.dir.join("api-ca/client/key.pem"),
    ) {
        Ok(client) => client,
        Err(_) => {
            counts.import_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let headers = [
        ("X-Request-ID", "1c9e5d2a-7b3f-4e8a-9c6d-0f2b4a6c8e0a"),
        ("NHSD-End-User-Organisation-ODS", node.ods.as_str()),
        ("NHSD-User-ID", "555021935107"),
        ("NHSD-Session-URID", "555021936108"),
        ("NHSD-Role-Code", "R8000"),
        ("Content-Type", "application/fhir+json"),
    ];
    let mut n = 0u64;
    while Instant::now() < until {
        let entries: Vec<Value> = (0..IMPORT_RECORDS)
            .filter_map(|k| {
                let nhs = patients.get((n as usize + k) % patients.len().max(1))?;
                let slot = (n + k as u64) % IMPORT_WORKING_SET;
                let resource = data::sized_observation(nhs, &node.ods, slot, 1024);
                Some(json!({
                    "resource": resource,
                    "request": {"method": "PUT", "url": format!(
                        "Observation/{}",
                        resource.get("id").and_then(Value::as_str).unwrap_or_default()
                    )},
                }))
            })
            .collect();
        n += IMPORT_RECORDS as u64;
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let Ok(body) = serde_json::to_vec(&bundle) else {
            counts.import_failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match client
            .call(node.api_port, "POST", "/fhir", &headers, body)
            .await
        {
            Ok(answer) if answer.status == 200 => {
                counts.imports.fetch_add(1, Ordering::Relaxed);
                counts
                    .imported_records
                    .fetch_add(IMPORT_RECORDS as u64, Ordering::Relaxed);
            }
            _ => {
                counts.import_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(IMPORT_EVERY).await;
    }
}

/// One node's memory over a soak. Series points are `None` where a
/// reading failed.
#[derive(Debug, Clone, Default)]
pub struct NodeMemory {
    pub ods: String,
    /// RSS every [`SERIES_EVERY`], MiB.
    pub rss: Vec<Option<f64>>,
    /// What the node's allocator holds for the program (jemalloc's
    /// `allocated`, from `/metrics`) at the same points, MiB: it climbs only
    /// if the node keeps more data, where RSS also climbs when the
    /// allocator keeps freed pages.
    pub allocated: Vec<Option<f64>>,
    /// The allocator's resident memory at the same points, MiB.
    pub allocator_resident: Vec<Option<f64>>,
    /// The highest RSS read (every [`RSS_EVERY`]), MiB.
    pub peak: f64,
}

/// Reads every node's memory until stopped: RSS every [`RSS_EVERY`] for
/// the peak, and every [`SERIES_EVERY`] RSS and the allocator's figures.
async fn sample_all(t: Testnet, started: Instant, stop: Arc<AtomicBool>) -> Vec<NodeMemory> {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let tenth = |value: f64| (value * 10.0).round() / 10.0;
    let client = ApiClient::new(
        &t.dir.join("api-ca/ca.pem"),
        &t.dir.join("api-ca/client/cert.pem"),
        &t.dir.join("api-ca/client/key.pem"),
    )
    .ok();
    let mut memory: Vec<NodeMemory> = t
        .nodes
        .iter()
        .map(|node| NodeMemory {
            ods: node.ods.clone(),
            ..NodeMemory::default()
        })
        .collect();
    let mut next_point = started;
    while !stop.load(Ordering::Relaxed) {
        let point = Instant::now() >= next_point;
        if point {
            next_point += SERIES_EVERY;
        }
        for (node, seen) in t.nodes.iter().zip(memory.iter_mut()) {
            let rss = bench::pid(node).and_then(bench::rss_bytes).map(mib);
            if let Some(rss) = rss {
                seen.peak = seen.peak.max(tenth(rss));
            }
            if point {
                let figures = match &client {
                    Some(client) => allocator_figures(client, node).await,
                    None => None,
                };
                seen.rss.push(rss.map(tenth));
                seen.allocated
                    .push(figures.map(|(allocated, _)| tenth(mib(allocated))));
                seen.allocator_resident
                    .push(figures.map(|(_, resident)| tenth(mib(resident))));
            }
        }
        tokio::time::sleep(RSS_EVERY).await;
    }
    memory
}

/// The node's allocator figures from `/metrics`: allocated and resident
/// bytes, or `None` when the node does not report them.
async fn allocator_figures(client: &ApiClient, node: &NodeInfo) -> Option<(u64, u64)> {
    let answer = client
        .call(node.api_port, "GET", "/metrics", &[], Vec::new())
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&answer.body);
    let figure = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    Some((
        figure("careweave_allocator_allocated_bytes")?,
        figure("careweave_allocator_resident_bytes")?,
    ))
}

/// `audit verify` on a stopped node's store: entries on success.
fn verify_audit(node: &NodeInfo) -> Result<u64, String> {
    let loaded = config::load(&node.config(), []).map_err(err)?;
    let keys = NodeKeys::load(&loaded.keys_dir()).map_err(err)?;
    let store = Store::open(&loaded.store_dir(), 4 << 20).map_err(err)?;
    careweave_node::audit::verify(&store, &keys.log.public_key())
        .map(|report| report.entries)
        .map_err(err)
}

/// The report as a few lines for the terminal.
pub fn summary(report: &SoakReport, out: &Path) -> String {
    let mut lines = vec![format!(
        "{:.0} s: {} locates ({} failed), {} fetches ({} failed), {} imports of {} records ({} failed)",
        report.seconds,
        report.locates,
        report.locate_failures,
        report.fetches,
        report.fetch_failures,
        report.imports,
        report.imported_records,
        report.import_failures
    )];
    let shown = |mean: Option<f64>| mean.map_or("?".to_owned(), |mib| format!("{mib:.1}"));
    for node in &report.memory {
        let (warm, end) = report.window_means(&node.rss);
        let (allocated_warm, allocated_end) = report.window_means(&node.allocated);
        lines.push(format!(
            "{}: RSS {} MiB after warm-up, {} MiB at the end (five-minute means), peak {:.1} MiB; allocated {} then {} MiB",
            node.ods,
            shown(warm),
            shown(end),
            node.peak,
            shown(allocated_warm),
            shown(allocated_end),
        ));
    }
    for (ods, verdict) in &report.audit {
        lines.push(match verdict {
            Ok(entries) => format!("{ods}: audit verified, {entries} entries"),
            Err(e) => format!("{ods}: audit verify FAILED: {e}"),
        });
    }
    if !report.judges_memory() {
        lines.push(format!(
            "memory growth not judged: only runs of {:.0} minutes or more are judged",
            MIN_SECONDS_FOR_MEMORY / 60.0
        ));
    }
    lines.push(format!("written: {}", out.join("soak.json").display()));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An hour-long run, warm after 30 minutes, with one node whose RSS
    /// follows `rss(minute)` and every other count fine.
    fn hour(rss: impl Fn(f64) -> Option<f64>) -> SoakReport {
        let points = 3600 / SERIES_EVERY.as_secs() as usize;
        let every = SERIES_EVERY.as_secs_f64() / 60.0;
        SoakReport {
            seconds: 3600.0,
            locates: 1,
            fetches: 1,
            imports: 1,
            warm_up_seconds: 1800.0,
            memory: vec![NodeMemory {
                ods: "QHG".into(),
                rss: (0..points).map(|i| rss(i as f64 * every)).collect(),
                ..NodeMemory::default()
            }],
            ..SoakReport::default()
        }
    }

    #[test]
    fn means_cover_five_minutes_after_warm_up_and_the_last_five() {
        let report = hour(Some);
        let (warm, end) = report.window_means(&report.memory[0].rss);
        // Minutes 30 to 35 and 55 to 60, sampled every 10 s.
        assert!((warm.unwrap() - 32.4167).abs() < 0.01, "{warm:?}");
        assert!((end.unwrap() - 57.4167).abs() < 0.01, "{end:?}");
    }

    #[test]
    fn swings_that_average_out_pass_and_steady_growth_fails() {
        // ±10% from one reading to the next, level on average.
        let swinging = hour(|minute| {
            Some(if ((minute * 6.0) as u64).is_multiple_of(2) {
                55.0
            } else {
                45.0
            })
        });
        assert!(swinging.problems().is_empty(), "{:?}", swinging.problems());

        // 50 MiB at warm-up and 0.3 MiB more every minute: 15% between
        // the two windows.
        let growing = hour(|minute| Some(50.0 + (minute - 30.0).max(0.0) * 0.3));
        let problems = growing.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("QHG grew"), "{problems:?}");
    }

    #[test]
    fn missing_readings_are_skipped_and_none_at_all_is_a_problem() {
        let gappy = hour(|minute| (!(minute as u64).is_multiple_of(3)).then_some(50.0));
        assert!(gappy.problems().is_empty(), "{:?}", gappy.problems());

        let unread = hour(|_| None);
        let problems = unread.problems();
        assert!(
            problems.iter().any(|p| p.contains("too few RSS readings")),
            "{problems:?}"
        );
    }

    #[test]
    fn short_runs_are_not_judged_on_memory() {
        let mut short = hour(|minute| Some(10.0 + minute * 10.0));
        short.seconds = 600.0;
        assert!(!short.judges_memory());
        assert!(short.problems().is_empty(), "{:?}", short.problems());
    }
}
