//! `careweave-certs`: run trust for a careweave network (roots, lists,
//! co-signing) and issue the clinical API's certificates.

#![forbid(unsafe_code)]

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

use anyhow::{Context, Result, bail};
use careweave_certs::keystore::{self, Passphrase};
use careweave_certs::time::{format_time, now, parse_duration};
use careweave_certs::{ca, members};
use careweave_protocol::trust::{
    self, ListDocument, MemberStatus, Policy, Role, Root, RootDocument, SignatureStatus, TrustList,
};
use careweave_protocol::{KeyPair, OdsCode};
use clap::{Args, Parser, Subcommand};

/// Run trust for a careweave network and issue clinical API certificates.
#[derive(Debug, Parser)]
#[command(name = "careweave-certs", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The trust root: who may sign roots and lists.
    #[command(subcommand)]
    Root(RootCommand),
    /// Trust lists: build, co-sign, check, compare, publish.
    #[command(subcommand)]
    List(ListCommand),
    /// A CA for the clinical API's mutual TLS.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum RootCommand {
    /// Create root and list signing keys and root version 1, signed by every root key.
    Init(RootInitArgs),
    /// Make root version N+1 with new keys, signed by a threshold of the old root keys and all new ones.
    Rotate(RootRotateArgs),
}

#[derive(Debug, Args)]
struct Thresholds {
    /// Number of root keys.
    #[arg(long)]
    root_keys: u32,
    /// Root signatures needed to make the next root.
    #[arg(long)]
    root_threshold: u32,
    /// Number of list signing keys.
    #[arg(long)]
    list_keys: u32,
    /// List signatures needed for a list to be accepted.
    #[arg(long)]
    list_threshold: u32,
    /// How long the root is valid, e.g. 730d.
    #[arg(long)]
    expires: String,
}

#[derive(Debug, Args)]
struct RootInitArgs {
    /// The network's name, e.g. careweave-england.
    #[arg(long)]
    network: String,
    #[command(flatten)]
    thresholds: Thresholds,
    /// Directory for root.cose and the encrypted keys.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct RootRotateArgs {
    /// The directory `root init` made.
    #[arg(long)]
    dir: PathBuf,
    #[command(flatten)]
    thresholds: Thresholds,
}

#[derive(Debug, Subcommand)]
enum ListCommand {
    /// Build an unsigned trust list from the members file.
    Build(ListBuildArgs),
    /// Add one signature to a list, in place.
    Sign {
        /// The encrypted list signing key.
        #[arg(long)]
        key: PathBuf,
        /// The root (default: root.cose in the key directory's parent).
        #[arg(long)]
        root: Option<PathBuf>,
        list: PathBuf,
    },
    /// Check a list as a node would, and show each signature.
    Verify {
        #[arg(long)]
        root: PathBuf,
        /// The list it follows, to check the prev chain and that seq rises.
        #[arg(long)]
        prev: Option<PathBuf>,
        list: PathBuf,
    },
    /// Show a list's contents.
    Show {
        list: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show what changed between two lists.
    Diff { old: PathBuf, new: PathBuf },
    /// Check a list and hand it out: to files nodes watch (written
    /// atomically) or to running nodes' admin endpoints (https://host:port).
    Publish {
        #[arg(long)]
        root: PathBuf,
        list: PathBuf,
        /// Files to write, or https://host:port of nodes' clinical APIs.
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        /// For https targets: the CA that issued the nodes' certificates.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// For https targets: an admin client certificate and its key.
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ListBuildArgs {
    #[arg(long)]
    root: PathBuf,
    /// The members file (TOML).
    #[arg(long)]
    members: PathBuf,
    /// The list's sequence number; must rise above --prev's.
    #[arg(long)]
    seq: u64,
    /// How long the list is valid, at most 14d.
    #[arg(long)]
    expires: String,
    /// The list this one follows (required after seq 1).
    #[arg(long)]
    prev: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a CA (ca.pem, ca.key mode 0600).
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "careweave clinical API CA")]
        name: String,
    },
    /// Issue a server or client certificate.
    Issue(CaIssueArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("kind").required(true).args(["server", "client"])))]
struct CaIssueArgs {
    #[arg(long)]
    ca: PathBuf,
    /// A node's HTTPS server certificate.
    #[arg(long)]
    server: bool,
    /// A clinical system's client certificate.
    #[arg(long)]
    client: bool,
    /// Server DNS names (repeatable).
    #[arg(long, requires = "server")]
    dns: Vec<String>,
    /// Server IP addresses (repeatable).
    #[arg(long, requires = "server")]
    ip: Vec<std::net::IpAddr>,
    /// The client system's name.
    #[arg(long, requires = "client")]
    name: Option<String>,
    /// The client's organisation ODS code.
    #[arg(long, requires = "client")]
    ods: Option<String>,
    /// The client may use the admin endpoints.
    #[arg(long, requires = "client")]
    admin: bool,
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            let mut out = String::new();
            for cause in e.chain() {
                let message = cause.to_string();
                if !out.ends_with(&message) {
                    if !out.is_empty() {
                        out.push_str(": ");
                    }
                    out.push_str(&message);
                }
            }
            eprintln!("error: {out}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Root(RootCommand::Init(args)) => root_init(args),
        Command::Root(RootCommand::Rotate(args)) => root_rotate(args),
        Command::List(ListCommand::Build(args)) => list_build(args),
        Command::List(ListCommand::Sign { key, root, list }) => list_sign(&key, root, &list),
        Command::List(ListCommand::Verify { root, prev, list }) => {
            list_verify(&root, prev.as_deref(), &list)
        }
        Command::List(ListCommand::Show { list, json }) => list_show(&list, json),
        Command::List(ListCommand::Diff { old, new }) => list_diff(&old, &new),
        Command::List(ListCommand::Publish {
            root,
            list,
            to,
            ca,
            cert,
            key,
        }) => list_publish(
            &root,
            &list,
            &to,
            (ca.as_deref(), cert.as_deref(), key.as_deref()),
        ),
        Command::Ca(CaCommand::Init { out, name }) => {
            ca::init(&out, &name)?;
            say!(
                "CA created: {} (certificate), {} (key, mode 0600)",
                out.join("ca.pem").display(),
                out.join("ca.key").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(CaCommand::Issue(args)) => ca_issue(args),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes a file atomically: a temporary file beside it, then a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-careweave");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn new_keys(dir: &Path, prefix: &str, count: u32, passphrase: &str) -> Result<Vec<KeyPair>> {
    (1..=count)
        .map(|i| {
            let key = keystore::generate()?;
            keystore::write(&dir.join(format!("{prefix}-{i}.pem")), &key, passphrase)?;
            Ok(key)
        })
        .collect()
}

fn make_root(
    network: &str,
    version: u64,
    t: &Thresholds,
    root_keys: &[KeyPair],
    list_keys: &[KeyPair],
) -> Result<Root> {
    let issued = now();
    Ok(Root {
        network: network.to_owned(),
        version,
        issued,
        expires: issued + parse_duration(&t.expires)?,
        root_keys: root_keys.iter().map(KeyPair::public_key).collect(),
        root_threshold: t.root_threshold,
        list_keys: list_keys.iter().map(KeyPair::public_key).collect(),
        list_threshold: t.list_threshold,
        policy: Policy::default(),
    })
}

fn print_root(root: &Root) {
    say!("network   {}", root.network);
    say!("version   {}", root.version);
    say!(
        "valid     {} to {}",
        format_time(root.issued),
        format_time(root.expires)
    );
    say!(
        "root keys ({} of {} to rotate):",
        root.root_threshold,
        root.root_keys.len()
    );
    for k in &root.root_keys {
        say!("  {}  {}", k.kid(), hex::encode(k.as_bytes()));
    }
    say!(
        "list keys ({} of {} to sign a list):",
        root.list_threshold,
        root.list_keys.len()
    );
    for k in &root.list_keys {
        say!("  {}  {}", k.kid(), hex::encode(k.as_bytes()));
    }
}

fn root_init(args: RootInitArgs) -> Result<ExitCode> {
    let keys_dir = args.out.join("keys");
    if args.out.join("root.cose").exists() {
        bail!(
            "{} already exists; use `root rotate` to make the next version",
            args.out.join("root.cose").display()
        );
    }
    std::fs::create_dir_all(&keys_dir)
        .with_context(|| format!("creating {}", keys_dir.display()))?;
    let passphrase =
        Passphrase::from_env_or_prompt().read("Passphrase for the new keys: ", true)?;
    let t = &args.thresholds;
    let root_keys = new_keys(&keys_dir, "root-v1", t.root_keys, &passphrase)?;
    let list_keys = new_keys(&keys_dir, "list-v1", t.list_keys, &passphrase)?;
    let root = make_root(&args.network, 1, t, &root_keys, &list_keys)?;
    let mut doc = RootDocument::unsigned(&root)?;
    for key in &root_keys {
        doc.sign(key)?;
    }
    let bytes = doc.encode();
    trust::accept_first_root(&bytes, now()).context("the new root does not verify")?;
    write_atomic(&args.out.join("root-v1.cose"), &bytes)?;
    write_atomic(&args.out.join("root.cose"), &bytes)?;
    say!(
        "Root version 1 written to {} (give it to every node out of band).",
        args.out.join("root.cose").display()
    );
    say!("Encrypted keys in {}.", keys_dir.display());
    print_root(&root);
    Ok(ExitCode::SUCCESS)
}

fn root_rotate(args: RootRotateArgs) -> Result<ExitCode> {
    let current_bytes = read(&args.dir.join("root.cose"))?;
    let (_, current) = RootDocument::decode(&current_bytes)?;
    let held = trust::accept_first_root(&read(&args.dir.join("root-v1.cose"))?, now())
        .or_else(|_| trust::accept_first_root(&current_bytes, now()));
    let passphrase = Passphrase::from_env_or_prompt().read("Passphrase for the keys: ", false)?;
    let keys_dir = args.dir.join("keys");
    let v = current.version;
    let mut old_keys = Vec::new();
    for i in 1.. {
        let path = keys_dir.join(format!("root-v{v}-{i}.pem"));
        if !path.exists() {
            break;
        }
        old_keys.push(keystore::read(&path, &passphrase)?);
    }
    let old_signers: Vec<&KeyPair> = old_keys
        .iter()
        .filter(|k| current.root_keys.contains(&k.public_key()))
        .take(current.root_threshold as usize)
        .collect();
    if old_signers.len() < current.root_threshold as usize {
        bail!(
            "only {} of the {} old root keys needed to sign version {} are in {}",
            old_signers.len(),
            current.root_threshold,
            v + 1,
            keys_dir.display()
        );
    }
    let t = &args.thresholds;
    let root_keys = new_keys(
        &keys_dir,
        &format!("root-v{}", v + 1),
        t.root_keys,
        &passphrase,
    )?;
    let list_keys = new_keys(
        &keys_dir,
        &format!("list-v{}", v + 1),
        t.list_keys,
        &passphrase,
    )?;
    let root = make_root(&current.network, v + 1, t, &root_keys, &list_keys)?;
    let mut doc = RootDocument::unsigned(&root)?;
    for key in old_signers.into_iter().chain(root_keys.iter()) {
        doc.sign(key)?;
    }
    let bytes = doc.encode();
    // Check it the way a node holding the current root will.
    let mut chain_held = match held {
        Ok(h) => h,
        Err(e) => bail!("the current root does not verify: {e}"),
    };
    for version in 2..=v {
        chain_held = trust::accept_next_root(
            &chain_held,
            &read(&args.dir.join(format!("root-v{version}.cose")))?,
            now(),
        )?;
    }
    trust::accept_next_root(&chain_held, &bytes, now())
        .context("the rotated root would not be accepted")?;
    write_atomic(&args.dir.join(format!("root-v{}.cose", v + 1)), &bytes)?;
    write_atomic(&args.dir.join("root.cose"), &bytes)?;
    say!(
        "Root version {} written; nodes accept it from peers or from their [trust] root file.",
        v + 1
    );
    say!(
        "Lists must now be signed with the new list keys and name root_version {}.",
        v + 1
    );
    print_root(&root);
    Ok(ExitCode::SUCCESS)
}

fn decode_list(path: &Path) -> Result<(ListDocument, TrustList)> {
    ListDocument::decode(&read(path)?)
        .with_context(|| format!("{} is not a trust list", path.display()))
}

fn list_build(args: ListBuildArgs) -> Result<ExitCode> {
    let (_, root) = RootDocument::decode(&read(&args.root)?)?;
    let text = std::fs::read_to_string(&args.members)
        .with_context(|| format!("reading {}", args.members.display()))?;
    let issued = now();
    let mut parsed =
        members::parse(&text, issued).with_context(|| format!("{}", args.members.display()))?;
    let prev = match &args.prev {
        Some(path) => {
            let bytes = read(path)?;
            let (_, prev) = ListDocument::decode(&bytes)?;
            if args.seq <= prev.seq {
                bail!(
                    "--seq {} does not rise above the previous list's seq {}",
                    args.seq,
                    prev.seq
                );
            }
            // Members whose file gives no validity keep the window they had,
            // rather than a new one starting now.
            parsed.inherit_validity(&prev.members);
            Some(trust::sha256(&bytes))
        }
        None if args.seq != 1 => bail!("--seq {} needs --prev: the list it follows", args.seq),
        None => None,
    };
    let validity = parse_duration(&args.expires)?;
    if validity > root.policy.max_list_validity_secs {
        bail!(
            "--expires {} is longer than the root allows ({} days)",
            args.expires,
            root.policy.max_list_validity_secs / 86_400
        );
    }
    let list = TrustList {
        network: root.network.clone(),
        seq: args.seq,
        root_version: root.version,
        issued,
        expires: issued + validity,
        prev,
        members: parsed.members,
        revoked: parsed.revoked,
    };
    let doc = ListDocument::unsigned(&list)?;
    if args.out.exists() {
        bail!("{} already exists", args.out.display());
    }
    write_atomic(&args.out, &doc.encode())?;
    say!(
        "Unsigned list seq {} with {} members written to {}; it needs {} signature(s) (careweave-certs list sign).",
        list.seq,
        list.members.len(),
        args.out.display(),
        root.list_threshold
    );
    Ok(ExitCode::SUCCESS)
}

fn list_sign(key_path: &Path, root: Option<PathBuf>, list_path: &Path) -> Result<ExitCode> {
    let root_path = root.unwrap_or_else(|| {
        key_path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .join("root.cose")
    });
    let (_, root) = RootDocument::decode(&read(&root_path)?)
        .with_context(|| format!("root {}", root_path.display()))?;
    let (mut doc, list) = decode_list(list_path)?;
    if list.root_version != root.version {
        bail!(
            "the list names root version {}, but {} is version {}",
            list.root_version,
            root_path.display(),
            root.version
        );
    }
    let passphrase = Passphrase::from_env_or_prompt()
        .read(&format!("Passphrase for {}: ", key_path.display()), false)?;
    let key = keystore::read(key_path, &passphrase)?;
    doc.sign(&key, &root)?;
    write_atomic(list_path, &doc.encode())?;
    let signed = doc.cose().signers.len();
    say!(
        "Signed list seq {} with key {}; {} of {} signature(s) needed.",
        list.seq,
        key.kid(),
        signed,
        root.list_threshold
    );
    Ok(ExitCode::SUCCESS)
}

fn list_verify(root_path: &Path, prev: Option<&Path>, list_path: &Path) -> Result<ExitCode> {
    let root_bytes = read(root_path)?;
    let (_, root) = RootDocument::decode(&root_bytes)?;
    let (doc, list) = decode_list(list_path)?;
    say!(
        "list seq {} for network {} under root version {}",
        list.seq,
        list.network,
        list.root_version
    );
    say!(
        "valid {} to {}",
        format_time(list.issued),
        format_time(list.expires)
    );
    let report = trust::signature_report(doc.cose(), &root.list_keys);
    let valid = report
        .iter()
        .filter(|(_, s)| *s == SignatureStatus::Valid)
        .count();
    for (kid, status) in &report {
        let text = match status {
            SignatureStatus::Valid => "valid",
            SignatureStatus::Invalid => "INVALID signature",
            SignatureStatus::NotAuthorised => "key NOT AUTHORISED by this root",
            SignatureStatus::Duplicate => "DUPLICATE signature by one key",
        };
        say!("  signature by {kid}: {text}");
    }
    say!(
        "threshold {} of {}: {}",
        valid,
        root.list_threshold,
        if valid >= root.list_threshold as usize {
            "met"
        } else {
            "NOT met"
        }
    );
    let accepted_root = match trust::accept_first_root(&root_bytes, now()) {
        Ok(r) => r,
        Err(e) => {
            say!("NOT ACCEPTABLE: root: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let held = match prev {
        Some(path) => {
            let bytes = read(path)?;
            let (_, prev_list) = ListDocument::decode(&bytes)?;
            // The previous list is judged as it was when issued.
            match trust::accept_list(&accepted_root, None, &bytes, prev_list.issued) {
                Ok(p) => Some(p),
                Err(e) => {
                    say!("NOT ACCEPTABLE: the previous list does not verify: {e}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        None => None,
    };
    match trust::accept_list(&accepted_root, held.as_ref(), &read(list_path)?, now()) {
        Ok(_) => {
            say!("ACCEPTABLE: a node holding this root would accept this list now.");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            say!("NOT ACCEPTABLE: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn role_names(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| match r {
            Role::Provider => "provider",
            Role::Consumer => "consumer",
        })
        .collect::<Vec<_>>()
        .join("+")
}

fn list_show(path: &Path, json: bool) -> Result<ExitCode> {
    let (doc, list) = decode_list(path)?;
    if json {
        let value = serde_json::json!({
            "network": list.network,
            "seq": list.seq,
            "root_version": list.root_version,
            "issued": format_time(list.issued),
            "expires": format_time(list.expires),
            "prev": list.prev.map(hex::encode),
            "signatures": doc.cose().signers.iter().map(|s| s.kid.to_string()).collect::<Vec<_>>(),
            "members": list.members.iter().map(|m| serde_json::json!({
                "ods": m.ods.as_str(),
                "name": m.name,
                "status": if m.status == MemberStatus::Active { "active" } else { "suspended" },
                "roles": role_names(&m.roles),
                "valid_from": format_time(m.valid_from),
                "valid_until": format_time(m.valid_until),
                "peer_ids": m.peers.iter().map(|p| p.peer_id.to_base58()).collect::<Vec<_>>(),
                "addrs": m.peers.iter().flat_map(|p| p.addrs.clone()).collect::<Vec<_>>(),
                "keys": m.keys.iter().map(|k| serde_json::json!({"kid": k.kid.to_string(), "use": format!("{:?}", k.key_use).to_lowercase()})).collect::<Vec<_>>(),
                "predecessors": m.predecessors.iter().map(OdsCode::as_str).collect::<Vec<_>>(),
                "contact": m.contact,
            })).collect::<Vec<_>>(),
            "revoked": list.revoked.iter().map(|r| serde_json::json!({
                "kid": r.kid.to_string(), "ods": r.ods.as_str(), "revoked_at": format_time(r.revoked_at),
                "reason": r.reason, "compromised_since": r.compromised_since.map(format_time),
            })).collect::<Vec<_>>(),
        });
        say!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "trust list seq {} for {} (root version {})",
        list.seq,
        list.network,
        list.root_version
    );
    say!(
        "valid {} to {}",
        format_time(list.issued),
        format_time(list.expires)
    );
    say!(
        "{} signature(s): {}",
        doc.cose().signers.len(),
        doc.cose()
            .signers
            .iter()
            .map(|s| s.kid.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    say!("{} member(s):", list.members.len());
    for m in &list.members {
        let status = if m.status == MemberStatus::Active {
            "active"
        } else {
            "SUSPENDED"
        };
        say!(
            "  {:<6} {:<50} {:<9} {}",
            m.ods,
            m.name,
            status,
            role_names(&m.roles)
        );
        for p in &m.peers {
            say!("         {}  {}", p.peer_id, p.addrs.join(" "));
        }
        if !m.predecessors.is_empty() {
            say!(
                "         succeeded {}",
                m.predecessors
                    .iter()
                    .map(OdsCode::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    for r in &list.revoked {
        say!(
            "  revoked key {} of {} at {}: {}{}",
            r.kid,
            r.ods,
            format_time(r.revoked_at),
            r.reason,
            r.compromised_since
                .map(|t| format!(" (compromised since {})", format_time(t)))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn list_diff(old: &Path, new: &Path) -> Result<ExitCode> {
    let (_, a) = decode_list(old)?;
    let (_, b) = decode_list(new)?;
    say!("seq {} -> {}", a.seq, b.seq);
    let mut changes = 0;
    let mut say = |line: String| {
        changes += 1;
        say!("  {line}");
    };
    for m in &b.members {
        match a.members.iter().find(|o| o.ods == m.ods) {
            None => say(format!("+ member {} ({}) added", m.ods, m.name)),
            Some(o) => {
                if o.status != m.status {
                    say(format!(
                        "~ member {} {}",
                        m.ods,
                        if m.status == MemberStatus::Suspended {
                            "SUSPENDED"
                        } else {
                            "reinstated"
                        }
                    ));
                }
                if o.roles != m.roles {
                    say(format!(
                        "~ member {} roles {} -> {}",
                        m.ods,
                        role_names(&o.roles),
                        role_names(&m.roles)
                    ));
                }
                let addrs = |x: &careweave_protocol::trust::Member| {
                    x.peers
                        .iter()
                        .flat_map(|p| p.addrs.clone())
                        .collect::<Vec<_>>()
                };
                if addrs(o) != addrs(m) {
                    say(format!(
                        "~ member {} addresses {:?} -> {:?}",
                        m.ods,
                        addrs(o),
                        addrs(m)
                    ));
                }
                if o.peers
                    .iter()
                    .map(|p| &p.peer_id)
                    .ne(m.peers.iter().map(|p| &p.peer_id))
                {
                    say(format!("~ member {} PeerId changed", m.ods));
                }
                for k in m
                    .keys
                    .iter()
                    .filter(|k| !o.keys.iter().any(|ok| ok.kid == k.kid))
                {
                    say(format!(
                        "+ key {} ({:?}) added for {}",
                        k.kid, k.key_use, m.ods
                    ));
                }
                for k in o
                    .keys
                    .iter()
                    .filter(|k| !m.keys.iter().any(|nk| nk.kid == k.kid))
                {
                    say(format!(
                        "- key {} ({:?}) removed from {}",
                        k.kid, k.key_use, m.ods
                    ));
                }
                if o.valid_until != m.valid_until || o.valid_from != m.valid_from {
                    say(format!(
                        "~ member {} validity now {} to {}",
                        m.ods,
                        format_time(m.valid_from),
                        format_time(m.valid_until)
                    ));
                }
                if o.predecessors != m.predecessors {
                    say(format!(
                        "~ member {} predecessors {:?}",
                        m.ods,
                        m.predecessors
                            .iter()
                            .map(OdsCode::as_str)
                            .collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    for o in a
        .members
        .iter()
        .filter(|o| !b.members.iter().any(|m| m.ods == o.ods))
    {
        say(format!("- member {} ({}) removed", o.ods, o.name));
    }
    for r in b
        .revoked
        .iter()
        .filter(|r| !a.revoked.iter().any(|o| o.kid == r.kid))
    {
        say(format!(
            "! key {} of {} REVOKED: {}{}",
            r.kid,
            r.ods,
            r.reason,
            r.compromised_since
                .map(|t| format!(" (compromised since {})", format_time(t)))
                .unwrap_or_default()
        ));
    }
    if changes == 0 {
        say!("  no changes to members, keys or revocations");
    }
    Ok(ExitCode::SUCCESS)
}

fn list_publish(
    root_path: &Path,
    list_path: &Path,
    to: &[String],
    (ca, cert, key): (Option<&Path>, Option<&Path>, Option<&Path>),
) -> Result<ExitCode> {
    let root =
        trust::accept_first_root(&read(root_path)?, now()).context("the root does not verify")?;
    let bytes = read(list_path)?;
    trust::accept_list(&root, None, &bytes, now())
        .context("the list would not be accepted; not published")?;
    for target in to {
        if target.starts_with("https://") {
            let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
                bail!(
                    "publishing to {target} needs --ca, --cert and --key (an admin client certificate)"
                );
            };
            let answer = careweave_certs::publish::to_node(target, &bytes, ca, cert, key)?;
            say!("published to {target}: {}", answer.trim());
        } else {
            write_atomic(Path::new(target), &bytes)?;
            say!("published to {target}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ca_issue(args: CaIssueArgs) -> Result<ExitCode> {
    let leaf = if args.server {
        ca::Leaf::Server {
            dns: args.dns,
            ips: args.ip,
        }
    } else {
        let name = args.name.context("--client needs --name")?;
        let ods = OdsCode::parse(args.ods.as_deref().context("--client needs --ods")?)
            .context("--ods")?;
        ca::Leaf::Client {
            name,
            ods,
            admin: args.admin,
        }
    };
    ca::issue(&args.ca, &leaf, &args.out)?;
    say!(
        "issued {} and {} (mode 0600)",
        args.out.join("cert.pem").display(),
        args.out.join("key.pem").display()
    );
    Ok(ExitCode::SUCCESS)
}
