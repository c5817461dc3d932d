//! `careweave-node`: set up and operate an ICB's careweave node.

#![forbid(unsafe_code)]

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

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use careweave_node::config::{self, LoadedConfig, LogFormat};
use careweave_node::daemon::{self, ControlRequest, ControlResponse};
use careweave_node::import::Importer;
use careweave_node::keys::NodeKeys;
use careweave_node::node::Node;
use careweave_node::store::{PatientFlags, Store};
use careweave_node::{audit, opening};
use careweave_protocol::message::{Purpose, RequesterContext};
use careweave_protocol::{NhsNumber, OdsCode};
use clap::{Args, Parser, Subcommand};

/// Operate an ICB's careweave node: keys, records, patients and audit.
#[derive(Debug, Parser)]
#[command(name = "careweave-node", version)]
struct Cli {
    /// The node's configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "CAREWEAVE_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new node: four keys, a commented config.toml, and the member
    /// entry the national coordinator needs to add this node.
    Init(InitArgs),
    /// Load FHIR R4 records (Bundles or NDJSON) into the node's store.
    Import(ImportArgs),
    /// Patient-level flags.
    #[command(subcommand)]
    Patient(PatientCommand),
    /// Check and export the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Run the node: join the network, answer other ICBs, serve the local
    /// control socket, and watch the trust-list file.
    Run,
    /// Ask every ICB on the network which holds records for a patient
    /// (through the running node).
    Locate(LocateArgs),
    /// Fetch the records behind a pointer from its custodian (through the
    /// running node); every record's custodian signature is checked.
    Fetch(FetchArgs),
    /// Show the node's identity, store, audit log and trust state.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Directory to create the node in (keys/, config.toml).
    #[arg(long)]
    dir: PathBuf,
    /// The ICB's ODS code, as on the trust list.
    #[arg(long)]
    ods: String,
    /// The ICB's name.
    #[arg(long)]
    name: String,
    /// Addresses other nodes dial, as libp2p multiaddrs (repeatable).
    #[arg(long = "listen")]
    listen: Vec<String>,
    /// Mark the node as a testnet node (NHS numbers only from the test range).
    #[arg(long)]
    testnet: bool,
}

#[derive(Debug, Args)]
struct RequesterArgs {
    /// The requesting user's SDS user id.
    #[arg(long)]
    user: String,
    /// The user's SDS role profile id.
    #[arg(long)]
    role_profile: String,
    /// The user's role code (for example R8000).
    #[arg(long)]
    role_code: String,
    /// Purpose of use: TREAT, or ETREAT for emergency access (needs --reason).
    #[arg(long, default_value = "TREAT", value_parser = ["TREAT", "ETREAT"])]
    purpose: String,
    /// Break-glass reason, required with --purpose ETREAT.
    #[arg(long)]
    reason: Option<String>,
    /// The basis of the legitimate relationship with the patient.
    #[arg(long, default_value = "direct-care")]
    relationship: String,
    /// The end user's organisation ODS code (default: this node's).
    #[arg(long)]
    organisation: Option<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct LocateArgs {
    /// The patient's NHS number.
    nhs_number: String,
    #[command(flatten)]
    requester: RequesterArgs,
}

#[derive(Debug, Args)]
struct FetchArgs {
    /// The patient's NHS number.
    nhs_number: String,
    /// The pointer id from a locate (`<custodian ODS>-<id>`).
    pointer: String,
    #[command(flatten)]
    requester: RequesterArgs,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// FHIR R4 JSON files: Bundles (transaction, batch, collection), single
    /// resources, or NDJSON with one resource per line.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Print a line each time a batch is flushed to disk (for scripts).
    #[arg(long)]
    log_batches: bool,
}

#[derive(Debug, Subcommand)]
enum PatientCommand {
    /// Set or clear a patient's restriction or objection.
    Flag(FlagArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("flag").required(true).args(["restricted", "objection", "clear"])))]
struct FlagArgs {
    /// The patient's NHS number.
    nhs_number: String,
    /// Restricted (S-flagged): the node answers as if it held nothing.
    #[arg(long)]
    restricted: bool,
    /// The patient objects to sharing: records are withheld, visibly.
    #[arg(long)]
    objection: bool,
    /// Why, for the objection (kept locally, never sent).
    #[arg(long, requires = "objection")]
    reason: Option<String>,
    /// Remove all flags.
    #[arg(long)]
    clear: bool,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the Merkle tree and check every checkpoint.
    Verify,
    /// Print one patient's audit entries as JSON with inclusion proofs.
    Export {
        /// The patient's NHS number.
        #[arg(long)]
        nhs_number: String,
    },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, each once: library errors already include
/// their cause in their message, so a cause the message ends with is skipped.
fn report(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if out.ends_with(&message) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&message);
    }
    out
}

fn run(cli: Cli) -> Result<ExitCode> {
    if std::env::var_os("SSLKEYLOGFILE").is_some() {
        bail!(
            "SSLKEYLOGFILE is set: careweave refuses to run while TLS secrets could be written to disk; unset it"
        );
    }
    match cli.command {
        Command::Init(args) => init(args),
        Command::Import(args) => {
            let loaded = load_config(&cli.config)?;
            import(&loaded, args)
        }
        Command::Patient(PatientCommand::Flag(args)) => {
            let loaded = load_config(&cli.config)?;
            flag(&loaded, args)
        }
        Command::Audit(AuditCommand::Verify) => {
            let loaded = load_config(&cli.config)?;
            audit_verify(&loaded)
        }
        Command::Audit(AuditCommand::Export { nhs_number }) => {
            let loaded = load_config(&cli.config)?;
            audit_export(&loaded, &nhs_number)
        }
        Command::Run => {
            let loaded = load_config(&cli.config)?;
            run_node(loaded)
        }
        Command::Locate(args) => {
            let loaded = load_config(&cli.config)?;
            locate(&loaded, args)
        }
        Command::Fetch(args) => {
            let loaded = load_config(&cli.config)?;
            fetch(&loaded, args)
        }
        Command::Status { json } => {
            let loaded = load_config(&cli.config)?;
            status(&loaded, json)
        }
    }
}

fn load_config(path: &Path) -> Result<LoadedConfig> {
    let loaded = config::load(path, std::env::vars())?;
    init_logging(&loaded);
    Ok(loaded)
}

fn init_logging(loaded: &LoadedConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&loaded.config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match loaded.config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

fn init(args: InitArgs) -> Result<ExitCode> {
    let ods = OdsCode::parse(&args.ods).context("--ods")?;
    if args.name.trim().is_empty() {
        bail!("--name is empty");
    }
    let config_path = args.dir.join("config.toml");
    if config_path.exists() {
        bail!(
            "{} already exists; careweave-node init never overwrites a node",
            config_path.display()
        );
    }
    let keys = NodeKeys::generate()?;
    keys.write_new(&args.dir.join("keys"))?;
    let mut text = config::template(&ods, &args.name);
    if args.testnet {
        text = text.replace("testnet = false", "testnet = true");
    }
    let listen = if args.listen.is_empty() {
        vec![
            "/ip4/0.0.0.0/tcp/7000".to_owned(),
            "/ip4/0.0.0.0/udp/7000/quic-v1".to_owned(),
        ]
    } else {
        args.listen.clone()
    };
    let listed: Vec<String> = listen.iter().map(|a| format!("\"{a}\"")).collect();
    text = text.replace(
        "listen = [\"/ip4/0.0.0.0/tcp/7000\", \"/ip4/0.0.0.0/udp/7000/quic-v1\"]",
        &format!("listen = [{}]", listed.join(", ")),
    );
    std::fs::write(&config_path, text)
        .with_context(|| format!("writing {}", config_path.display()))?;
    say!("# careweave node created in {}", args.dir.display());
    say!(
        "# Keys: {}/keys (mode 0600; never share them).",
        args.dir.display()
    );
    say!("# Send this member entry to the national coordinator:");
    say!();
    print!("{}", keys.member_entry(&ods, &args.name, &listen));
    Ok(ExitCode::SUCCESS)
}

fn open_node(loaded: &LoadedConfig) -> Result<Node> {
    Ok(opening::open_node(loaded, now())?)
}

/// Import while the node runs: each input goes to POST /fhir as batch
/// Bundles (NDJSON in Bundles of 500 lines); the node holds the store.
fn import_via_api(loaded: &LoadedConfig, api: &RunningApi, args: &ImportArgs) -> Result<ExitCode> {
    let mut rejected = 0;
    let mut stored = 0;
    for file in &args.files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {name}"))?;
        let bundles: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text)
        {
            Ok(mut value)
                if value
                    .get("resourceType")
                    .and_then(serde_json::Value::as_str)
                    == Some("Bundle") =>
            {
                if value.get("type").and_then(serde_json::Value::as_str) == Some("collection")
                    && let Some(kind) = value.get_mut("type")
                {
                    *kind = serde_json::json!("batch");
                }
                vec![value]
            }
            Ok(value) => vec![
                serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [{"resource": value}]}),
            ],
            Err(_) => {
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                let mut out = Vec::new();
                for chunk in lines.chunks(500) {
                    let entries: Vec<serde_json::Value> = chunk
                        .iter()
                        .map(|l| {
                            serde_json::from_str::<serde_json::Value>(l)
                                .map(|r| serde_json::json!({"resource": r}))
                        })
                        .collect::<Result<_, _>>()
                        .with_context(|| format!("{name}: a line is not JSON"))?;
                    out.push(serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": entries}));
                }
                out
            }
        };
        // The operator loading records is the requester: this node's ICB and the OS user.
        let operator = RequesterArgs {
            user: std::env::var("USER").unwrap_or_else(|_| "operator".to_owned()),
            role_profile: "careweave-node-cli".to_owned(),
            role_code: "operator".to_owned(),
            purpose: "TREAT".to_owned(),
            reason: None,
            relationship: "record-load".to_owned(),
            organisation: None,
            json: false,
        };
        let mut headers = api_headers(&context(loaded, &operator)?);
        headers.retain(|(k, _)| k != "Content-Type");
        headers.push((
            "Content-Type".to_owned(),
            "application/fhir+json".to_owned(),
        ));
        for bundle in bundles {
            let answer = call_api(api, "POST", "/fhir", &headers, serde_json::to_vec(&bundle)?)?;
            if answer.status != 200 {
                return Err(api_error(&answer).context(name.clone()));
            }
            for (i, e) in answer
                .json()
                .get("entry")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let status = e
                    .pointer("/response/status")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("");
                if status.starts_with('2') {
                    stored += 1;
                } else {
                    rejected += 1;
                    let reason = e
                        .pointer("/response/outcome/issue/0/diagnostics")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or(status);
                    say!("rejected {name} entry[{i}]: {reason}");
                }
            }
        }
    }
    say!("stored or replaced {stored}, rejected {rejected} (through the running node)");
    Ok(if rejected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn import(loaded: &LoadedConfig, args: ImportArgs) -> Result<ExitCode> {
    if let Some(api) = running_api(loaded)? {
        return import_via_api(loaded, &api, &args);
    }
    let keys = NodeKeys::load(&loaded.keys_dir())?;
    let store = Store::open(
        &loaded.store_dir(),
        loaded.config.store.cache_mb * 1024 * 1024,
    )?;
    let importer = Importer {
        store: &store,
        record_key: &keys.record,
        custodian: &loaded.config.node.ods,
        config: &loaded.config,
        now: now(),
    };
    let mut total = careweave_node::import::ImportReport::default();
    let terminal = std::io::stderr().is_terminal();
    for file in &args.files {
        let name = file.display().to_string();
        let meta = std::fs::metadata(file).with_context(|| format!("reading {name}"))?;
        if meta.len() > loaded.config.import.max_file_bytes {
            bail!(
                "{name} is {} bytes, over import.max_file_bytes ({})",
                meta.len(),
                loaded.config.import.max_file_bytes
            );
        }
        let bytes = std::fs::read(file).with_context(|| format!("reading {name}"))?;
        let bar = indicatif::ProgressBar::new(0);
        if terminal {
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} entries")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(name.clone());
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let log_batches = args.log_batches;
        let mut progress = |done: usize, of: usize| {
            bar.set_length(of as u64);
            bar.set_position(done as u64);
            if log_batches {
                say!("flushed {done} of {of} entries from {name}");
                let _ = std::io::stdout().flush();
            }
        };
        let (report, _, _) = importer.import_bytes(&name, &bytes, &mut progress)?;
        bar.finish_and_clear();
        total.merge(report);
    }
    if args.json {
        say!("{}", serde_json::to_string_pretty(&total)?);
    } else {
        say!(
            "stored {}, replaced {}, removed {}, rejected {}{}",
            total.stored,
            total.replaced,
            total.removed,
            total.rejected.len(),
            if total.patients_linked > 0 {
                format!(
                    " ({} Patient resources used for references, not stored)",
                    total.patients_linked
                )
            } else {
                String::new()
            }
        );
        if total.transaction_aborted {
            say!(
                "a transaction Bundle was refused as a whole because of the rejections below; nothing from it was stored"
            );
        }
        for r in &total.rejected {
            say!("rejected {} {}: {}", r.source, r.entry, r.reason);
        }
    }
    Ok(if total.rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn flag(loaded: &LoadedConfig, args: FlagArgs) -> Result<ExitCode> {
    let nhs = NhsNumber::parse(&args.nhs_number)?;
    if loaded.config.node.testnet && !nhs.is_test_range() {
        bail!("this is a testnet node: NHS numbers must be in 999 000 0000 - 999 999 9999");
    }
    if let Some(api) = running_api(loaded)? {
        // Through the running node, the flags given are the patient's flags.
        let body = serde_json::json!({
            "restricted": args.restricted,
            "objection": args.objection,
            "reason": args.reason,
        });
        let path = format!("/admin/patients/{}/flags", nhs.digits());
        let headers = [("Content-Type".to_owned(), "application/json".to_owned())];
        let answer = call_api(&api, "PUT", &path, &headers, body.to_string().into_bytes())?;
        if answer.status != 200 {
            return Err(api_error(&answer));
        }
        say!("patient {nhs}: {}", answer.json());
        return Ok(ExitCode::SUCCESS);
    }
    let store = Store::open(
        &loaded.store_dir(),
        loaded.config.store.cache_mb * 1024 * 1024,
    )?;
    let mut flags = store.flags(&nhs)?;
    if args.clear {
        flags = PatientFlags::default();
    }
    if args.restricted {
        flags.restricted = true;
    }
    if args.objection {
        flags.objected = true;
        flags.objection = args.reason.clone();
    }
    flags.updated_at = now();
    store.set_flags(&nhs, &flags)?;
    say!(
        "patient {nhs}: restricted {}, objection {}",
        if flags.restricted { "yes" } else { "no" },
        if flags.objected { "yes" } else { "no" }
    );
    Ok(ExitCode::SUCCESS)
}

fn audit_verify(loaded: &LoadedConfig) -> Result<ExitCode> {
    let keys = NodeKeys::load(&loaded.keys_dir())?;
    let store = Store::open(
        &loaded.store_dir(),
        loaded.config.store.cache_mb * 1024 * 1024,
    )?;
    match audit::verify(&store, &keys.log.public_key()) {
        Ok(report) => {
            say!(
                "audit log verified: {} entries, {} signed checkpoints, root {}",
                report.entries,
                report.checkpoints,
                report.root
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            say!("audit log FAILED verification: {failure}");
            Ok(ExitCode::from(3))
        }
    }
}

fn audit_export(loaded: &LoadedConfig, nhs_number: &str) -> Result<ExitCode> {
    let nhs = NhsNumber::parse(nhs_number)?;
    let store = Store::open(
        &loaded.store_dir(),
        loaded.config.store.cache_mb * 1024 * 1024,
    )?;
    let export = audit::export(&store, &nhs)?;
    say!("{}", serde_json::to_string_pretty(&export)?);
    Ok(ExitCode::SUCCESS)
}

fn status(loaded: &LoadedConfig, json: bool) -> Result<ExitCode> {
    if let Some(api) = running_api(loaded)? {
        let answer = call_api(&api, "GET", "/admin/status", &[], vec![])?;
        if answer.status != 200 {
            return Err(api_error(&answer));
        }
        say!("{}", serde_json::to_string_pretty(&answer.json())?);
        let _ = json;
        return Ok(ExitCode::SUCCESS);
    }
    // A running node holds the store; ask it through its control socket.
    let socket = loaded.resolve(&loaded.config.network.control_socket);
    if socket.exists()
        && let Ok(ControlResponse::Status {
            ods,
            peer_id,
            listen,
            connected,
            connections,
            ready,
            not_ready_reason,
            sharing,
            sharing_since,
        }) = runtime()?.block_on(daemon::control(&socket, &ControlRequest::Status))
    {
        if json {
            say!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "running": true, "ods": ods, "peer_id": peer_id, "listen": listen,
                    "connected_peers": connected, "connections": connections, "ready": ready, "not_ready_reason": not_ready_reason,
                    "sharing": sharing, "sharing_since": sharing_since,
                }))?
            );
        } else {
            say!("node        {ods} (running)");
            say!("peer id     {peer_id}");
            say!("listening   {}", listen.join(", "));
            say!("connected   {connected} peer(s) over {connections} connection(s)");
            match not_ready_reason {
                None => say!("ready       yes"),
                Some(reason) => say!("ready       no: {reason}"),
            }
            print_sharing(&sharing, Some(sharing_since));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let node = open_node(loaded)?;
    let now = now();
    let trust = node.trust();
    let list = trust.as_ref().and_then(|t| t.list.as_ref());
    let value = serde_json::json!({
        "ods": node.ods().as_str(),
        "name": loaded.config.node.name,
        "peer_id": node.peer_id().to_base58(),
        "testnet": loaded.config.node.testnet,
        "records": node.store.record_count(),
        "patients": node.store.patient_count()?,
        "audit_entries": node.audit.len(),
        "trust_root_version": trust.as_ref().map(|t| t.root.root().version),
        "trust_list_seq": list.map(|l| l.list().seq),
        "trust_list_expires": list.map(|l| l.list().expires),
        "ready": node.not_ready_reason(now).is_none(),
        "not_ready_reason": node.not_ready_reason(now),
        "sharing": node.sharing().to_json(),
    });
    if json {
        say!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        say!("node        {} ({})", node.ods(), loaded.config.node.name);
        say!("peer id     {}", node.peer_id());
        say!(
            "records     {} for {} patients",
            node.store
                .record_count()
                .map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
            node.store.patient_count()?
        );
        say!("audit log   {} entries", node.audit.len());
        match (&trust, list) {
            (None, _) => say!("trust       no root installed"),
            (Some(t), None) => say!("trust       root v{}, no list", t.root.root().version),
            (Some(t), Some(l)) => say!(
                "trust       root v{}, list seq {} expiring at {}",
                t.root.root().version,
                l.list().seq,
                l.list().expires
            ),
        }
        match node.not_ready_reason(now) {
            None => say!("ready       yes"),
            Some(reason) => say!("ready       no: {reason}"),
        }
        print_sharing(&node.sharing().describe(), None);
    }
    Ok(ExitCode::SUCCESS)
}

/// The agreement's lines under a `sharing` heading; `since` is when a
/// running node put it in force.
fn print_sharing(lines: &[String], since: Option<u64>) {
    match since {
        Some(since) => say!("sharing     in force since {since} (Unix time):"),
        None => say!("sharing     as configured (the node is not running):"),
    }
    for line in lines {
        say!("              {line}");
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_node(loaded: LoadedConfig) -> Result<ExitCode> {
    #[cfg(unix)]
    if let Err(e) = careweave_node::allocator::jemalloc::start() {
        tracing::warn!("{e}; freed memory may be returned late");
    }
    daemon::run(loaded)?;
    Ok(ExitCode::SUCCESS)
}

fn context(loaded: &LoadedConfig, args: &RequesterArgs) -> Result<RequesterContext> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    let h = hex::encode(id);
    let request_id = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    let organisation = match &args.organisation {
        Some(o) => OdsCode::parse(o).context("--organisation")?,
        None => loaded.config.node.ods.clone(),
    };
    let context = RequesterContext {
        organisation,
        user_id: args.user.clone(),
        role_profile_id: args.role_profile.clone(),
        role_code: args.role_code.clone(),
        purpose: if args.purpose == "ETREAT" {
            Purpose::EmergencyTreat
        } else {
            Purpose::Treat
        },
        relationship: args.relationship.clone(),
        break_glass_reason: args.reason.clone(),
        request_id,
        correlation_id: None,
    };
    context.validate()?;
    Ok(context)
}

fn ask(loaded: &LoadedConfig, request: &ControlRequest) -> Result<ControlResponse> {
    let path = loaded.resolve(&loaded.config.network.control_socket);
    runtime()?
        .block_on(daemon::control(&path, request))
        .with_context(|| {
            format!(
                "cannot reach the running node at {} (is `careweave-node run` running?)",
                path.display()
            )
        })
}

fn locate(loaded: &LoadedConfig, args: LocateArgs) -> Result<ExitCode> {
    let nhs_number = NhsNumber::parse(&args.nhs_number)?;
    if let Some(api) = running_api(loaded)? {
        let context = context(loaded, &args.requester)?;
        return locate_via_api(&api, &nhs_number, &context, args.requester.json);
    }
    let request = ControlRequest::Locate {
        nhs_number,
        context: context(loaded, &args.requester)?,
    };
    let response = ask(loaded, &request)?;
    if args.requester.json {
        say!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(ExitCode::SUCCESS);
    }
    match response {
        ControlResponse::Located { icbs } => {
            say!("Records for NHS number {nhs_number}:");
            for icb in icbs {
                let detail = match icb.outcome.as_str() {
                    "pointers" => format!("{} pointer(s)", icb.pointers.len()),
                    "withheld" => format!("records withheld: {}", withheld_text(&icb.withheld)),
                    "no-records" => "no records".to_owned(),
                    "not-shared" => "nothing shared with this ICB".to_owned(),
                    "timed-out" => "did not answer in time".to_owned(),
                    other => format!("{other}: {}", icb.detail.clone().unwrap_or_default()),
                };
                say!("  {:<6} {:<50} {}", icb.ods, icb.name, detail);
                for p in &icb.pointers {
                    say!(
                        "         {}  {:<16} {} record(s){}",
                        p.id,
                        careweave_node::fhir::section_name(p.section).0,
                        p.count,
                        match (&p.date_from, &p.date_to) {
                            (Some(a), Some(b)) => format!(", {a} to {b}"),
                            _ => String::new(),
                        }
                    );
                }
                if icb.outcome == "pointers" && !icb.withheld.is_empty() {
                    say!(
                        "         some records withheld: {}",
                        withheld_text(&icb.withheld)
                    );
                }
                if !icb.not_shared.is_empty() {
                    say!(
                        "         {}",
                        careweave_node::sharing::not_shared_text(
                            &icb.ods,
                            &loaded.config.node.ods,
                            &icb.not_shared,
                            icb.contact.as_deref(),
                        )
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the node: {other:?}"),
    }
}

fn withheld_text(reasons: &[careweave_protocol::message::WithheldReason]) -> String {
    use careweave_protocol::message::WithheldReason::*;
    reasons
        .iter()
        .map(|r| match r {
            Objection => "the patient objected to sharing",
            SensitiveCategory => "legally sensitive category",
            VeryRestricted => "labelled very restricted",
            NoAgreement => "held in sections not shared with this ICB",
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn fetch(loaded: &LoadedConfig, args: FetchArgs) -> Result<ExitCode> {
    let nhs_number = NhsNumber::parse(&args.nhs_number)?;
    if let Some(api) = running_api(loaded)? {
        let context = context(loaded, &args.requester)?;
        let path = format!("/fhir/DocumentReference/{}/$records", args.pointer);
        let answer = call_api(&api, "GET", &path, &api_headers(&context), vec![])?;
        if answer.status != 200 {
            return Err(api_error(&answer));
        }
        say!("{}", serde_json::to_string_pretty(&answer.json())?);
        return Ok(ExitCode::SUCCESS);
    }
    let request = ControlRequest::Fetch {
        nhs_number,
        pointer_id: args.pointer.clone(),
        context: context(loaded, &args.requester)?,
    };
    match ask(loaded, &request)? {
        ControlResponse::Fetched {
            custodian,
            withheld,
            not_shared,
            contact,
            records,
        } => {
            if args.requester.json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "custodian": custodian, "withheld": withheld,
                        "not_shared": not_shared, "contact": contact, "records": records
                    }))?
                );
            } else {
                say!(
                    "{} record(s) from {custodian}, each custodian signature checked:",
                    records.len()
                );
                for r in &records {
                    say!("{}", serde_json::to_string(r)?);
                }
                if !withheld.is_empty() {
                    say!("withheld: {}", withheld_text(&withheld));
                }
                if !not_shared.is_empty() {
                    say!(
                        "{}",
                        careweave_node::sharing::not_shared_text(
                            &custodian,
                            &loaded.config.node.ods,
                            &not_shared,
                            contact.as_deref(),
                        )
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ControlResponse::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the node: {other:?}"),
    }
}

/// The running node's clinical API, when the config names a command-line
/// client certificate and the node is running.
struct RunningApi {
    client: careweave_node::api::client::ApiClient,
    port: u16,
}

fn running_api(loaded: &LoadedConfig) -> Result<Option<RunningApi>> {
    let api = &loaded.config.api;
    let (Some(listen), Some(cert), Some(key), Some(ca)) =
        (&api.listen, &api.cli_cert, &api.cli_key, &api.client_ca)
    else {
        return Ok(None);
    };
    if !loaded
        .resolve(&loaded.config.network.control_socket)
        .exists()
    {
        return Ok(None);
    }
    let port: u16 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("api.listen {listen:?} has no port"))?;
    let client = careweave_node::api::client::ApiClient::new(
        &loaded.resolve(ca),
        &loaded.resolve(cert),
        &loaded.resolve(key),
    )
    .map_err(anyhow::Error::msg)
    .context("api.cli_cert")?;
    Ok(Some(RunningApi { client, port }))
}

fn api_headers(context: &RequesterContext) -> Vec<(String, String)> {
    let mut h = vec![
        ("X-Request-ID".to_owned(), context.request_id.clone()),
        (
            "NHSD-End-User-Organisation-ODS".to_owned(),
            context.organisation.to_string(),
        ),
        ("NHSD-User-ID".to_owned(), context.user_id.clone()),
        (
            "NHSD-Session-URID".to_owned(),
            context.role_profile_id.clone(),
        ),
        ("NHSD-Role-Code".to_owned(), context.role_code.clone()),
        (
            "NHSD-Legitimate-Relationship".to_owned(),
            context.relationship.clone(),
        ),
        (
            "NHSD-Purpose-Of-Use".to_owned(),
            if context.purpose == Purpose::EmergencyTreat {
                "ETREAT"
            } else {
                "TREAT"
            }
            .to_owned(),
        ),
        (
            "Content-Type".to_owned(),
            "application/x-www-form-urlencoded".to_owned(),
        ),
    ];
    if let Some(reason) = &context.break_glass_reason {
        h.push(("NHSD-Break-Glass-Reason".to_owned(), reason.clone()));
    }
    h
}

fn call_api(
    api: &RunningApi,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Result<careweave_node::api::client::Answer> {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    runtime()?
        .block_on(api.client.call(api.port, method, path, &headers, body))
        .map_err(anyhow::Error::msg)
        .context("the running node's clinical API")
}

fn api_error(answer: &careweave_node::api::client::Answer) -> anyhow::Error {
    let json = answer.json();
    let text = json
        .get("issue")
        .and_then(|i| i.get(0))
        .and_then(|i| i.get("diagnostics"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).into_owned());
    anyhow::anyhow!("the node answered {}: {text}", answer.status)
}

/// Locate through the API: a FHIR searchset, shown as a table per ICB.
fn locate_via_api(
    api: &RunningApi,
    nhs: &NhsNumber,
    context: &RequesterContext,
    json: bool,
) -> Result<ExitCode> {
    let body = format!(
        "subject%3Aidentifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{}",
        nhs.digits()
    );
    let answer = call_api(
        api,
        "POST",
        "/fhir/DocumentReference/_search",
        &api_headers(context),
        body.into_bytes(),
    )?;
    if answer.status != 200 {
        return Err(api_error(&answer));
    }
    let bundle = answer.json();
    if json {
        say!("{}", serde_json::to_string_pretty(&bundle)?);
        return Ok(ExitCode::SUCCESS);
    }
    say!("Records for NHS number {nhs}:");
    let entries = bundle
        .get("entry")
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    for e in &entries {
        let r = e.get("resource").cloned().unwrap_or_default();
        if e.pointer("/search/mode")
            .and_then(serde_json::Value::as_str)
            == Some("match")
        {
            say!(
                "  {:<6} {}  {}",
                r.pointer("/custodian/identifier/value")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or(""),
                r.get("id")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or(""),
                r.get("description")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
            );
        } else if let Some(text) = r
            .pointer("/issue/0/diagnostics")
            .and_then(serde_json::Value::as_str)
        {
            say!("  note: {text}");
        }
    }
    if entries.is_empty() {
        say!("  no ICB holds records it may share");
    }
    Ok(ExitCode::SUCCESS)
}
