//! `careweave-testnet`: start, inspect and stop local careweave networks,
//! and run the guided demo.

#![forbid(unsafe_code)]
// serde_json's `Value[&str]` answers Null for anything missing; it never panics.
#![allow(clippy::indexing_slicing)]

/// jemalloc, not glibc's allocator: glibc kept the memory that sled's
/// background thread freed, so a node's RSS stepped up and stayed up
/// (decision 0017).
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `println!` that ignores a closed stdout (`| head`), where `println!`
/// would panic; the command still finishes its work and cleans up.
macro_rules! say {
    () => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout());
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use careweave_node::api::client::ApiClient;
use careweave_testnet::setup::{self, Options, SharingMix, Testnet};
use careweave_testnet::{data, floor};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

/// Local careweave networks: real node processes, keys, a co-signed trust
/// list, mutual TLS and synthetic patients.
#[derive(Debug, Parser)]
#[command(name = "careweave-testnet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring up five ICBs in a temporary directory, show what careweave
    /// does through one node's clinical API, and stop everything.
    Demo,
    /// Build a testnet and start its nodes.
    Up(UpArgs),
    /// Show each node of a running testnet.
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Break a running testnet on purpose and check it copes (bringing one
    /// up first if `--dir` holds none).
    Scenario {
        #[arg(value_parser = ["node-down", "revoke", "stale-trust", "replay", "rogue-peer", "flood"])]
        name: String,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop every node of a testnet (also after an interrupted `up`).
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Measure locate, fetch, ingest, memory, start-up and store size on
    /// real node processes, each beside its floor; writes bench.json and
    /// bench.md. Exits 4 when a full run misses a target.
    Bench(BenchArgs),
    /// Run mixed locate, fetch and import on a five-ICB testnet for a while,
    /// watching every node's memory, then verify every audit log. Exits 4
    /// when a request failed, a node's RSS grew 10% or more after warm-up
    /// (the first half; judged in runs of an hour or more, on five-minute
    /// means), or an audit log did not verify
    Soak(SoakArgs),
    /// Run one plain libp2p request-response node (the benchmark's floor;
    /// not for people).
    #[command(hide = true)]
    FloorNode {
        #[arg(long)]
        ready: PathBuf,
        /// The asking end's public key (hex), for requests that ask for the
        /// required work: signatures and synced audit entries.
        #[arg(long, requires = "audit")]
        client_key: Option<String>,
        /// The file this node appends its audit entries to.
        #[arg(long, requires = "client_key")]
        audit: Option<PathBuf>,
        /// Run the other protocols too, and join the mesh of floor nodes
        /// this file lists once it appears (`<peer id> <address>` lines).
        #[arg(long)]
        mesh: Option<PathBuf>,
    },
    /// Run one node (used by `up`; not for people).
    #[command(hide = true)]
    NodeRun {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
struct SoakArgs {
    /// How long to run, in minutes (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Working directory for the testnet; a temporary directory when absent.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where soak.json is written.
    #[arg(long, default_value = "soak-results")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// A small run fit for CI: five ICBs, thousands rather than millions of
    /// records, one run per figure. Targets are reported, not enforced.
    #[arg(long)]
    quick: bool,
    /// Working directory for the testnets and stores (needs tens of GB for
    /// a full run); a temporary directory when absent.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where bench.json and bench.md are written.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// ICBs in the main testnet (2 to 42), instead of 42 for a full run
    /// and 5 for a quick one.
    #[arg(long)]
    nodes: Option<usize>,
    /// Records in the first node's store (the memory, start-up and store
    /// size figures), instead of 1 000 000 for a full run and 20 000 for a
    /// quick one.
    #[arg(long)]
    records: Option<usize>,
    /// Run only these parts, comma-separated: ingest, locate (the main
    /// testnet: store size, start-up, locate, memory, one ICB dead),
    /// growth, fetch. Every part when absent.
    #[arg(long, value_delimiter = ',')]
    only: Vec<careweave_testnet::bench::Part>,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Number of ICB nodes (1 to 42).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    #[arg(long)]
    dir: PathBuf,
    /// Synthetic patients per ICB.
    #[arg(long, default_value_t = 50)]
    patients: u32,
    /// Seed for the synthetic data.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// The ICBs of 2022 (42) or after the April 2026 merges (36).
    #[arg(long, default_value = "2022", value_parser = ["2022", "2026"])]
    icb_set: String,
    /// Sharing agreements: "mixed" (most national, some only with their
    /// region's ICBs or with care plans for their region only, and the
    /// fourth, eighth, eighteenth… ICB with no one) or "national" (every ICB
    /// shares everything).
    #[arg(long, default_value = "mixed", value_parser = ["mixed", "national"])]
    sharing: String,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn soak(args: SoakArgs) -> Result<ExitCode> {
    let temporary = args.dir.is_none();
    let dir = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("careweave-soak-{}", std::process::id()))
    });
    let options = careweave_testnet::soak::SoakOptions {
        minutes: args.minutes,
        dir: dir.clone(),
        out: args.out.clone(),
    };
    let started = Instant::now();
    let report = runtime()?
        .block_on(careweave_testnet::soak::run(&options, &|line| {
            eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
        }))
        .map_err(anyhow::Error::msg);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = report?;
    say!("{}", careweave_testnet::soak::summary(&report, &args.out));
    let problems = report.problems();
    if problems.is_empty() {
        say!("soak passed");
        Ok(ExitCode::SUCCESS)
    } else {
        say!("soak FAILED: {}", problems.join("; "));
        Ok(ExitCode::from(4))
    }
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    let temporary = args.dir.is_none();
    let dir = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("careweave-bench-{}", std::process::id()))
    });
    let options = careweave_testnet::bench::BenchOptions {
        quick: args.quick,
        dir: dir.clone(),
        out: args.out.clone(),
        nodes: args.nodes,
        records: args.records,
        only: args.only,
    };
    let started = Instant::now();
    let figures = runtime()?
        .block_on(careweave_testnet::bench::run(&options, &|line| {
            eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
        }))
        .map_err(anyhow::Error::msg);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let figures = figures?;
    let table = std::fs::read_to_string(args.out.join("bench.md"))?;
    say!("{table}");
    say!(
        "written: {} and {}",
        args.out.join("bench.json").display(),
        args.out.join("bench.md").display()
    );
    let missed: Vec<&str> = figures
        .iter()
        .filter(|f| f.met == Some(false))
        .map(|f| f.name.as_str())
        .collect();
    if missed.is_empty() {
        say!("every target met");
        Ok(ExitCode::SUCCESS)
    } else if args.quick {
        say!(
            "{} target(s) missed; a quick run is too small to judge targets",
            missed.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        say!("targets missed: {}", missed.join("; "));
        Ok(ExitCode::from(4))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A testnet node whose directory was removed while it ran (`rm -rf`
/// without `down`) has no store, keys or logs left: it exits instead of
/// running on unseen, holding ports and CPU. Checked every 2 s; gone twice
/// in a row counts, so a config being rewritten in place does not.
fn stop_when_removed(config: PathBuf) {
    let watch = move || {
        let mut missing = 0;
        loop {
            std::thread::sleep(Duration::from_secs(2));
            if config.exists() {
                missing = 0;
                continue;
            }
            missing += 1;
            if missing >= 2 {
                eprintln!(
                    "{} was removed while this testnet node ran; stopping",
                    config.display()
                );
                std::process::exit(0);
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("testnet-dir-watch".into())
        .spawn(watch)
    {
        eprintln!("cannot watch the testnet directory: {e}");
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::NodeRun { config } => {
            let loaded = careweave_node::config::load(&config, std::env::vars())?;
            let filter = tracing_subscriber::EnvFilter::try_new(&loaded.config.log.level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init();
            stop_when_removed(config);
            #[cfg(unix)]
            if let Err(e) = careweave_node::allocator::jemalloc::start() {
                tracing::warn!("{e}; freed memory may be returned late");
            }
            careweave_node::daemon::run(loaded)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => {
            let options = Options {
                nodes: args.nodes,
                patients_per_icb: args.patients,
                seed: args.seed,
                sharing: if args.sharing == "national" {
                    SharingMix::National
                } else {
                    SharingMix::Mixed
                },
            };
            let icbs = if args.icb_set == "2026" {
                data::icbs_2026()
            } else {
                data::icbs_2022()
            };
            let t = up_with(&args.dir, &icbs, &options)?;
            say!(
                "testnet of {} ICBs running in {}",
                t.nodes.len(),
                args.dir.display()
            );
            for n in &t.nodes {
                say!(
                    "  {:<6} {:<55} API https://127.0.0.1:{}",
                    n.ods,
                    n.name,
                    n.api_port
                );
            }
            say!("try:");
            say!(
                "  careweave-node --config {} locate {} --user 555021935107 --role-profile 555021936108 --role-code R8000",
                t.nodes[0].config().display(),
                t.demo.shared.digits()
            );
            say!("  careweave-testnet status --dir {}", args.dir.display());
            say!("  careweave-testnet down --dir {}", args.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { dir } => {
            let t = setup::load(&dir)?;
            let rt = runtime()?;
            let mut all = true;
            for n in &t.nodes {
                let status = rt.block_on(setup::node_status(n));
                let text = match status {
                    Some((connected, ready)) => format!(
                        "running, {connected} peer(s), {}",
                        if ready { "ready" } else { "NOT ready" }
                    ),
                    None => {
                        all = false;
                        "not running".to_owned()
                    }
                };
                say!("  {:<6} {:<55} {text}", n.ods, n.name);
            }
            Ok(if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::Down { dir } => {
            let stopped = setup::stop_all(&dir);
            say!("stopped {stopped} node process(es) in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => demo(),
        Command::Bench(args) => bench(args),
        Command::Soak(args) => soak(args),
        Command::FloorNode {
            ready,
            client_key,
            audit,
            mesh,
        } => {
            let work = match (client_key, audit) {
                (Some(key), Some(audit)) => {
                    let key = floor::public_key_from_hex(&key).ok_or_else(|| {
                        anyhow::anyhow!("--client-key is not an Ed25519 public key in hex")
                    })?;
                    Some(floor::AnsweringWork::new(key, &audit).map_err(anyhow::Error::msg)?)
                }
                _ => None,
            };
            runtime()?
                .block_on(floor::serve(&ready, work, mesh.as_deref()))
                .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scenario { name, dir } => {
            let t = if dir.join("testnet.json").exists() {
                setup::load(&dir)?
            } else {
                up(
                    &dir,
                    &Options {
                        nodes: 5,
                        patients_per_icb: 20,
                        seed: 2026,
                        sharing: SharingMix::Mixed,
                    },
                )?
            };
            let rt = runtime()?;
            let result = rt.block_on(async {
                match name.as_str() {
                    "node-down" => careweave_testnet::scenarios::node_down(&t).await,
                    "revoke" => careweave_testnet::scenarios::revoke(&t).await,
                    "replay" => careweave_testnet::scenarios::replay(&t).await,
                    "rogue-peer" => careweave_testnet::scenarios::rogue_peer(&t).await,
                    "flood" => careweave_testnet::scenarios::flood(&t).await,
                    _ => careweave_testnet::scenarios::stale_trust(&t).await,
                }
            });
            match result {
                Ok(said) => {
                    for line in said {
                        say!("  {line}");
                    }
                    say!("scenario {name}: as expected");
                    Ok(ExitCode::SUCCESS)
                }
                Err(said) => {
                    say!("{said}");
                    say!("scenario {name}: NOT as expected");
                    Ok(ExitCode::from(4))
                }
            }
        }
    }
}

fn up(dir: &Path, options: &Options) -> Result<Testnet> {
    up_with(dir, &data::icbs_2022(), options)
}

fn up_with(dir: &Path, icbs: &[data::Icb], options: &Options) -> Result<Testnet> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let t = setup::build(dir, icbs, options, &|step| bar.set_message(step.to_owned()))?;
    bar.set_message("starting node processes");
    setup::start_all(&t)?;
    bar.set_message("waiting for every node to hold the list and connect to every other");
    let connected = runtime()?.block_on(setup::wait_connected(&t, Duration::from_secs(60)));
    bar.finish_and_clear();
    if let Err(e) = connected {
        setup::stop_all(dir);
        bail!("{e}");
    }
    Ok(t)
}

const RID: &str = "7d3e1f52-8a4b-4c6d-9e0f-1a2b3c4d5e6f";

fn headers(emergency: Option<&'static str>) -> Vec<(&'static str, &'static str)> {
    let mut h = vec![
        ("X-Request-ID", RID),
        ("NHSD-End-User-Organisation-ODS", "QHG"),
        ("NHSD-User-ID", "555021935107"),
        ("NHSD-Session-URID", "555021936108"),
        ("NHSD-Role-Code", "R8000"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    if let Some(reason) = emergency {
        h.push(("NHSD-Purpose-Of-Use", "ETREAT"));
        h.push(("NHSD-Break-Glass-Reason", reason));
    }
    h
}

fn search_body(nhs: &careweave_protocol::NhsNumber) -> Vec<u8> {
    format!(
        "subject%3Aidentifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{}",
        nhs.digits()
    )
    .into_bytes()
}

/// Per ICB in a searchset: how many pointers, and any outcome text.
fn summarise(bundle: &Value) -> (Vec<(String, usize)>, Vec<String>) {
    let mut per_icb: Vec<(String, usize)> = Vec::new();
    let mut outcomes = Vec::new();
    for e in bundle["entry"].as_array().into_iter().flatten() {
        if e["search"]["mode"] == "match" {
            let ods = e["resource"]["custodian"]["identifier"]["value"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            match per_icb.iter_mut().find(|(o, _)| *o == ods) {
                Some((_, n)) => *n += 1,
                None => per_icb.push((ods, 1)),
            }
        } else if let Some(text) = e["resource"]["issue"][0]["diagnostics"].as_str() {
            outcomes.push(text.to_owned());
        }
    }
    (per_icb, outcomes)
}

fn demo() -> Result<ExitCode> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("careweave-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    say!("careweave demo: five ICBs on this machine, each its own process, talking over");
    say!("mutually authenticated libp2p under a co-signed trust list. Synthetic patients only.");
    say!();
    let t = up(
        &dir,
        &Options {
            nodes: 5,
            patients_per_icb: 20,
            seed: 2026,
            sharing: SharingMix::Mixed,
        },
    )?;
    let result = runtime()?.block_on(demo_story(&t));
    setup::stop_all(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    say!("{report}");
    say!(
        "All five nodes stopped. Demo took {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

async fn demo_story(t: &Testnet) -> Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let asker = &t.nodes[0];
    let client = ApiClient::new(
        &t.dir.join("api-ca/ca.pem"),
        &t.dir.join("api-ca/client/cert.pem"),
        &t.dir.join("api-ca/client/key.pem"),
    )
    .map_err(anyhow::Error::msg)?;
    writeln!(
        out,
        "Network up: {}.",
        t.nodes
            .iter()
            .map(|n| format!("{} {}", n.ods, n.name))
            .collect::<Vec<_>>()
            .join("; ")
    )?;
    writeln!(
        out,
        "A clinician at {} asks through {}'s clinical API (HTTPS, client certificate).",
        asker.name, asker.ods
    )?;
    writeln!(out)?;

    // 1. A patient with records in three ICBs.
    let search = |nhs: careweave_protocol::NhsNumber, emergency: Option<&'static str>| {
        let client = client.clone();
        let port = asker.api_port;
        async move {
            let answer = client
                .call(
                    port,
                    "POST",
                    "/fhir/DocumentReference/_search",
                    &headers(emergency),
                    search_body(&nhs),
                )
                .await
                .map_err(anyhow::Error::msg)?;
            if answer.status != 200 {
                bail!(
                    "search answered {}: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
            }
            Ok::<Value, anyhow::Error>(answer.json())
        }
    };
    let bundle = search(t.demo.shared, None).await?;
    let (per_icb, outcomes) = summarise(&bundle);
    writeln!(out, "1. Where does patient {} have records?", t.demo.shared)?;
    for (ods, n) in &per_icb {
        let name = t
            .nodes
            .iter()
            .find(|x| &x.ods == ods)
            .map_or("", |x| x.name.as_str());
        writeln!(out, "   {ods:<6} {name}: {n} pointer(s)")?;
    }
    for o in &outcomes {
        writeln!(out, "   note: {o}")?;
    }
    // The fourth ICB holds records too, but shares with no one outside itself.
    if per_icb.len() != 2 {
        bail!(
            "expected pointers from two ICBs (the third holder shares with no one), found {}",
            per_icb.len()
        );
    }
    let refusal = outcomes
        .iter()
        .find(|o| o.contains("no sharing agreement") && o.contains("Contact:"))
        .context("the ICB without a sharing agreement was not shown, with whom to contact")?;
    writeln!(
        out,
        "   {} holds records for this patient too, but its sharing agreement covers only its own ICB: \
         the clinician is told so and whom to ask ({}).",
        t.nodes[3].ods,
        refusal
            .split("Contact: ")
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches('.')
    )?;

    // 2. Fetch one pointer's records, provenance checked.
    let pointer = bundle["entry"]
        .as_array()
        .and_then(|e| e.iter().find(|x| x["search"]["mode"] == "match"))
        .and_then(|x| x["resource"]["id"].as_str())
        .context("no pointer to fetch")?
        .to_owned();
    let fetched = client
        .call(
            asker.api_port,
            "GET",
            &format!("/fhir/DocumentReference/{pointer}/$records"),
            &headers(None),
            vec![],
        )
        .await
        .map_err(anyhow::Error::msg)?;
    let records = fetched.json()["entry"].as_array().map_or(0, Vec::len);
    if fetched.status != 200 || records == 0 {
        bail!("fetch answered {} with {records} records", fetched.status);
    }
    writeln!(
        out,
        "2. Opened pointer {pointer}: {records} record(s), each custodian's signature checked before it was shown."
    )?;

    // 3. Objection.
    let bundle = search(t.demo.objecting, None).await?;
    let (_, outcomes) = summarise(&bundle);
    let objection = outcomes
        .iter()
        .find(|o| o.contains("objected"))
        .context("the objection was not visible")?;
    writeln!(
        out,
        "3. Patient {} objected to sharing at {}: {objection}",
        t.demo.objecting, t.nodes[1].ods
    )?;

    // 4. Restricted patient: answers exactly like an unknown one.
    let bundle = search(t.demo.restricted, None).await?;
    let (per_icb, outcomes) = summarise(&bundle);
    // The only note left is the agreement's, which every search carries.
    let about_the_patient: Vec<&String> = outcomes
        .iter()
        .filter(|o| !o.contains("no sharing agreement"))
        .collect();
    if !per_icb.is_empty() || !about_the_patient.is_empty() {
        bail!("the restricted patient was visible: {per_icb:?} {outcomes:?}");
    }
    writeln!(
        out,
        "4. Patient {} is restricted at {}: the search shows nothing about them, exactly as for a patient nobody holds.",
        t.demo.restricted, t.nodes[2].ods
    )?;

    // 5. Emergency access, with its reason and alert.
    let reason = "Unconscious patient in the emergency department";
    let bundle = search(t.demo.shared, Some(reason)).await?;
    let (per_icb, _) = summarise(&bundle);
    let custodian = &t.nodes[1];
    let metrics = client
        .call(custodian.api_port, "GET", "/metrics", &[], vec![])
        .await
        .map_err(anyhow::Error::msg)?;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let alerts = text
        .lines()
        .find(|l| l.starts_with("careweave_emergency_access_total "))
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("0")
        .to_owned();
    if alerts == "0" {
        bail!("no emergency alert was raised at {}", custodian.ods);
    }
    writeln!(
        out,
        "5. Emergency access (\"{reason}\"): {} ICB(s) answered; {} raised an alert (emergency accesses so far: {alerts}), and both ends audited the reason.",
        per_icb.len(),
        custodian.ods
    )?;
    Ok(out)
}
