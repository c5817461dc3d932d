//! `careweave-testnet soak`: mixed locate, fetch and import on a five-ICB
//! testnet for a set time, watching every node's memory, then `audit verify`
//! on every node. It passes when no request failed, no node's RSS grew by
//! 10% or more after warm-up (the first half; judged in runs of an hour or
//! more), and every audit log verifies.

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
const RSS_EVERY: Duration = Duration::from_secs(2);
/// How often the RSS series takes a point.
pub const SERIES_EVERY: Duration = Duration::from_secs(10);

/// Largest RSS growth after warm-up that passes.
const MAX_GROWTH: f64 = 0.10;
/// Shorter runs report memory but are not judged on it: at the soak's load
/// memory is still filling for 40 to 50 minutes. 59 minutes, so that a
/// `--minutes 60` run always counts.
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
    /// Per node: ODS, RSS at the end of warm-up, at the end, and the peak (MiB).
    pub rss: Vec<(String, f64, f64, f64)>,
    /// Per node: ODS and its RSS (MiB) every [`SERIES_EVERY`], to show
    /// whether memory levels off or keeps climbing.
    pub rss_series: Vec<(String, Vec<f64>)>,
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
        for (ods, warm, end, _) in self.rss.iter().filter(|_| self.judges_memory()) {
            if *warm > 0.0 && end / warm - 1.0 >= MAX_GROWTH {
                problems.push(format!(
                    "{ods} grew from {warm:.1} to {end:.1} MiB after warm-up"
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
            "rss_mib": self.rss.iter().map(|(ods, warm, end, peak)| json!({
                "ods": ods, "after_warm_up": warm, "end": end, "peak": peak,
            })).collect::<Vec<_>>(),
            "rss_series_every_seconds": SERIES_EVERY.as_secs(),
            "rss_series_mib": self.rss_series.iter().map(|(ods, series)| json!({
                "ods": ods, "mib": series,
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
    // Warm-up: the first half. Measured in an hour at this load: every
    // node's RSS climbs for 40 to 50 minutes, ever more slowly, and then
    // holds (under 1% in the last ten). Shorter runs report memory but
    // cannot judge it (`MIN_SECONDS_FOR_MEMORY`).
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
    let sampler = {
        let nodes = t.nodes.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || sample_all(&nodes, started, warm_up, &stop))
    };
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
    let (rss, rss_series) = sampler
        .join()
        .map_err(|_| "the RSS sampler panicked".to_owned())?;
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
        rss,
        rss_series,
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

/// One node's RSS readings: at the end of warm-up, the last and the peak
/// (MiB).
type RssReadings = Vec<(String, f64, f64, f64)>;

/// Reads every node's RSS until stopped. Per node: RSS at the end of
/// warm-up, the last reading and the peak, in MiB; and a reading every
/// [`SERIES_EVERY`].
fn sample_all(
    nodes: &[NodeInfo],
    started: Instant,
    warm_up: Duration,
    stop: &AtomicBool,
) -> (RssReadings, Vec<(String, Vec<f64>)>) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let mut seen: RssReadings = nodes
        .iter()
        .map(|n| (n.ods.clone(), 0.0, 0.0, 0.0))
        .collect();
    let mut series: Vec<(String, Vec<f64>)> =
        nodes.iter().map(|n| (n.ods.clone(), Vec::new())).collect();
    let mut next_point = started;
    while !stop.load(Ordering::Relaxed) {
        let warm = started.elapsed() >= warm_up;
        let point = Instant::now() >= next_point;
        if point {
            next_point += SERIES_EVERY;
        }
        for ((node, slot), (_, points)) in nodes.iter().zip(seen.iter_mut()).zip(series.iter_mut())
        {
            let Some(rss) = bench::pid(node).and_then(bench::rss_bytes) else {
                continue;
            };
            let rss = mib(rss);
            if !warm || slot.1 == 0.0 {
                slot.1 = rss;
            }
            slot.2 = rss;
            slot.3 = slot.3.max(rss);
            if point {
                points.push((rss * 10.0).round() / 10.0);
            }
        }
        std::thread::sleep(RSS_EVERY);
    }
    (seen, series)
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
    for (ods, warm, end, peak) in &report.rss {
        lines.push(format!(
            "{ods}: RSS {warm:.1} MiB after warm-up, {end:.1} MiB at the end, peak {peak:.1} MiB"
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
            "memory growth not judged: at this load memory fills for 40 to 50 minutes, so only runs of {:.0} minutes or more are judged",
            MIN_SECONDS_FOR_MEMORY / 60.0
        ));
    }
    lines.push(format!("written: {}", out.join("soak.json").display()));
    lines.join("\n")
}
