//! Node configuration: built-in defaults, then the node's TOML file, then
//! environment variables `CAREWEAVE__SECTION__KEY` (double underscores, so a
//! key such as `cache_mb` stays one word).
//!
//! Unknown keys are errors, so a misspelt setting is never silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use careweave_protocol::OdsCode;
use serde::{Deserialize, Serialize};

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "CAREWEAVE";

/// Sensitive categories whose records never leave the custodian.
pub const SENSITIVE_CATEGORIES: [&str; 4] = [
    "assisted-fertilisation",
    "gender-identity",
    "sexually-transmitted-infection",
    "termination-of-pregnancy",
];

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node: NodeSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub network: NetworkSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub trust: TrustSection,
    #[serde(default)]
    pub import: ImportSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub sharing: SharingSection,
    #[serde(default)]
    pub transparency: TransparencySection,
}

/// The public transparency report, `GET /transparency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransparencySection {
    /// Socket address for a public HTTPS listener that serves only the
    /// report, with no client certificate; unset, the report is served on
    /// the clinical API alone. Uses the API's server certificate.
    pub listen: Option<String>,
    /// Counts below this are not published.
    pub suppress_below: u64,
    /// Connections one client address may hold open on the public listener.
    pub max_connections_per_client: usize,
}

impl Default for TransparencySection {
    fn default() -> Self {
        Self {
            listen: None,
            suppress_below: 5,
            max_connections_per_client: 4,
        }
    }
}

/// The sharing agreement: who receives this ICB's records (see
/// [`crate::sharing`]). Missing, it shares with no one outside this ICB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharingSection {
    /// Who receives every section not named in `sections`.
    pub scope: ScopeKind,
    /// The ICBs (ODS codes) when `scope = "icbs"`.
    pub icbs: Vec<OdsCode>,
    /// Whether an answer outside the agreement says records exist.
    pub disclose_existence: bool,
    /// Per-section exceptions, keyed by section name (`care-plans`).
    pub sections: BTreeMap<String, SectionSharing>,
}

/// One section's exception to the default scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionSharing {
    pub scope: ScopeKind,
    #[serde(default)]
    pub icbs: Vec<OdsCode>,
}

/// `national`, `icbs` or `none`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    /// Every active member of the trust list.
    National,
    /// Only the ICBs named in `icbs`.
    Icbs,
    /// No one outside this ICB.
    #[default]
    None,
}

impl ScopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::National => "national",
            ScopeKind::Icbs => "icbs",
            ScopeKind::None => "none",
        }
    }
}

/// The clinical HTTPS API (mutual TLS).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Socket address to serve on, e.g. `0.0.0.0:8443`; unset disables the API.
    pub listen: Option<String>,
    /// The node's server certificate and key (PEM).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The CA whose client certificates may call the API (PEM).
    pub client_ca: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Requests handled at once.
    pub max_concurrent: usize,
    /// A client certificate and key (from the same CA) the command line
    /// uses to reach the running node through this API.
    pub cli_cert: Option<PathBuf>,
    pub cli_key: Option<PathBuf>,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: None,
            cert: None,
            key: None,
            client_ca: None,
            max_body_bytes: 8 * 1024 * 1024,
            max_concurrent: 128,
            cli_cert: None,
            cli_key: None,
        }
    }
}

/// Who this node is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub ods: OdsCode,
    pub name: String,
    /// Directory holding the four key files, relative to the config file.
    #[serde(default = "default_keys_dir")]
    pub keys_dir: PathBuf,
    /// A testnet node refuses NHS numbers outside 999 000 0000–999 999 9999.
    #[serde(default)]
    pub testnet: bool,
}

fn default_keys_dir() -> PathBuf {
    PathBuf::from("keys")
}

/// The sled store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Directory of the database, relative to the config file.
    pub path: PathBuf,
    /// sled page cache in MiB (sled's own default is 1 GiB).
    pub cache_mb: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            path: PathBuf::from("store"),
            cache_mb: 16,
        }
    }
}

/// Peer plane settings (used by `careweave-node run`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// libp2p multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Largest request or response frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// How long a signed message we send stays valid, in seconds (≤ 300).
    pub message_life_secs: u64,
    /// Each outbound request's deadline, in milliseconds.
    pub request_deadline_ms: u64,
    /// Inbound requests being handled at once, in total and per peer.
    pub max_inflight_total: usize,
    pub max_inflight_per_peer: usize,
    /// Per-peer token bucket: sustained requests per second, and burst.
    pub peer_rate_per_sec: u32,
    pub peer_burst: u32,
    /// Seconds an idle connection stays open (libp2p's default is 10).
    pub idle_timeout_secs: u64,
    /// Each connection is pinged about this often (each at its own interval
    /// within a quarter of it either way), in seconds.
    pub ping_every_secs: u64,
    /// A ping unanswered for this long has failed; a connection whose pings
    /// fail twice running is closed and dialled again.
    pub ping_timeout_secs: u64,
    /// mDNS discovery; allowed only on testnet nodes, off by default.
    pub mdns: bool,
    /// The local control socket `careweave-node locate` and `fetch` use.
    pub control_socket: PathBuf,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/7000".to_owned(),
                "/ip4/0.0.0.0/udp/7000/quic-v1".to_owned(),
            ],
            max_frame_bytes: 4 * 1024 * 1024,
            message_life_secs: 60,
            request_deadline_ms: 2000,
            max_inflight_total: 256,
            max_inflight_per_peer: 32,
            peer_rate_per_sec: 200,
            peer_burst: 400,
            idle_timeout_secs: 3600,
            ping_every_secs: 15,
            ping_timeout_secs: 20,
            mdns: false,
            control_socket: PathBuf::from("control.sock"),
        }
    }
}

/// What may leave the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// Whether emergency access (ETREAT) overrides a patient's objection.
    pub emergency_overrides_objection: bool,
    /// SNOMED CT codes per sensitive category; a record carrying any of
    /// them in `code`, `type` or `category` never leaves the node.
    pub sensitive_codes: BTreeMap<String, Vec<String>>,
}

impl Default for PolicySection {
    fn default() -> Self {
        // A starting set; each ICB's information governance team owns the list.
        let mut codes = BTreeMap::new();
        codes.insert(
            "assisted-fertilisation".to_owned(),
            vec!["63487001".into(), "52637005".into(), "265063003".into()],
        );
        codes.insert(
            "gender-identity".to_owned(),
            vec!["93461009".into(), "407377005".into(), "407378000".into()],
        );
        codes.insert(
            "sexually-transmitted-infection".to_owned(),
            vec![
                "8098009".into(),
                "186946009".into(),
                "15628003".into(),
                "76272004".into(),
            ],
        );
        codes.insert(
            "termination-of-pregnancy".to_owned(),
            vec!["386639001".into(), "57797005".into()],
        );
        Self {
            emergency_overrides_objection: false,
            sensitive_codes: codes,
        }
    }
}

/// Audit log checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Sign a checkpoint after this many entries…
    pub checkpoint_every_entries: u64,
    /// …or when this many seconds have passed since the last one.
    pub checkpoint_every_secs: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            checkpoint_every_entries: 100,
            checkpoint_every_secs: 60,
        }
    }
}

/// Where the node's first trust root and the coordinator's list come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustSection {
    /// The first trust root, given out of band (relative to the config file).
    pub root: Option<PathBuf>,
    /// A trust list to load at start, if newer than the stored one.
    pub list: Option<PathBuf>,
}

/// Import limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportSection {
    /// Largest single FHIR resource accepted, in bytes.
    pub max_resource_bytes: usize,
    /// Largest input file, in bytes.
    pub max_file_bytes: u64,
    /// Records written per batch before a flush.
    pub batch_records: usize,
}

impl Default for ImportSection {
    fn default() -> Self {
        Self {
            max_resource_bytes: 256 * 1024,
            max_file_bytes: 256 * 1024 * 1024,
            batch_records: 1000,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `careweave_node=debug`.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".to_owned(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration in {path} (or CAREWEAVE__* environment) is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A loaded configuration and the directory its relative paths start from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: NodeConfig,
    pub path: PathBuf,
    pub base_dir: PathBuf,
}

impl LoadedConfig {
    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The key directory.
    pub fn keys_dir(&self) -> PathBuf {
        self.resolve(&self.config.node.keys_dir)
    }

    /// The store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.resolve(&self.config.store.path)
    }
}

/// Loads defaults, then the file, then `CAREWEAVE__SECTION__KEY` variables
/// from `env` (pass `std::env::vars()` in production).
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<LoadedConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .collect();
    let built = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("network.listen")
                .with_list_parse_key("sharing.icbs")
                .source(Some(env)),
        )
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let config: NodeConfig = built
        .try_deserialize()
        .map_err(|e| invalid(e.to_string()))?;
    validate(&config).map_err(invalid)?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(LoadedConfig {
        config,
        path: path.to_path_buf(),
        base_dir,
    })
}

fn validate(config: &NodeConfig) -> Result<(), String> {
    if config.node.name.trim().is_empty() {
        return Err("node.name is empty".into());
    }
    if config.store.cache_mb == 0 || config.store.cache_mb > 4096 {
        return Err("store.cache_mb must be between 1 and 4096".into());
    }
    if config.network.message_life_secs == 0 || config.network.message_life_secs > 300 {
        return Err("network.message_life_secs must be between 1 and 300".into());
    }
    if config.network.max_frame_bytes < 1024 || config.network.max_frame_bytes > 16 * 1024 * 1024 {
        return Err("network.max_frame_bytes must be between 1 KiB and 16 MiB".into());
    }
    if config.network.mdns && !config.node.testnet {
        return Err("network.mdns is allowed only on testnet nodes (node.testnet = true)".into());
    }
    let n = &config.network;
    if n.request_deadline_ms < 10 || n.request_deadline_ms > 60_000 {
        return Err("network.request_deadline_ms must be between 10 and 60000".into());
    }
    if n.max_inflight_total == 0
        || n.max_inflight_per_peer == 0
        || n.max_inflight_per_peer > n.max_inflight_total
    {
        return Err(
            "network.max_inflight_per_peer must be between 1 and network.max_inflight_total".into(),
        );
    }
    if n.ping_every_secs == 0 || n.ping_every_secs > 3600 {
        return Err("network.ping_every_secs must be between 1 and 3600".into());
    }
    if n.ping_timeout_secs == 0 || n.ping_timeout_secs > 300 {
        return Err("network.ping_timeout_secs must be between 1 and 300".into());
    }
    if n.peer_rate_per_sec == 0 || n.peer_burst == 0 {
        return Err("network.peer_rate_per_sec and network.peer_burst must be at least 1".into());
    }
    if config.audit.checkpoint_every_entries == 0 {
        return Err("audit.checkpoint_every_entries must be at least 1".into());
    }
    if config.import.batch_records == 0 || config.import.batch_records > 100_000 {
        return Err("import.batch_records must be between 1 and 100000".into());
    }
    if config.import.max_resource_bytes == 0
        || config.import.max_resource_bytes > careweave_protocol::record::MAX_RECORD_BYTES
    {
        return Err("import.max_resource_bytes must be between 1 and 1048576".into());
    }
    let api = &config.api;
    if api.listen.is_some() && (api.cert.is_none() || api.key.is_none() || api.client_ca.is_none())
    {
        return Err("api.listen needs api.cert, api.key and api.client_ca".into());
    }
    if api.max_body_bytes < 1024 || api.max_concurrent == 0 {
        return Err(
            "api.max_body_bytes must be at least 1024 and api.max_concurrent at least 1".into(),
        );
    }
    crate::sharing::Agreement::from_config(&config.sharing).map_err(|e| e.to_string())?;
    let t = &config.transparency;
    if !(2..=100).contains(&t.suppress_below) {
        return Err("transparency.suppress_below must be between 2 and 100".into());
    }
    if !(1..=api.max_concurrent.max(1)).contains(&t.max_connections_per_client) {
        return Err(
            "transparency.max_connections_per_client must be at least 1 and at most api.max_concurrent"
                .into(),
        );
    }
    if t.listen.is_some() && (api.cert.is_none() || api.key.is_none()) {
        return Err(
            "transparency.listen needs api.cert and api.key (the report is served over HTTPS)"
                .into(),
        );
    }
    for category in config.policy.sensitive_codes.keys() {
        if !SENSITIVE_CATEGORIES.contains(&category.as_str()) {
            return Err(format!(
                "policy.sensitive_codes.{category} is not a sensitive category (expected one of {})",
                SENSITIVE_CATEGORIES.join(", ")
            ));
        }
    }
    Ok(())
}

/// The commented `config.toml` that `careweave-node init` writes.
pub fn template(ods: &OdsCode, name: &str) -> String {
    let name = name.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"# careweave node configuration.
# Precedence: built-in defaults, then this file, then environment variables
# named CAREWEAVE__SECTION__KEY (for example CAREWEAVE__STORE__CACHE_MB=32).
# Unknown keys are errors. Relative paths are relative to this file.

[node]
# This ICB's ODS code and name, exactly as on the trust list.
ods = "{ods}"
name = "{name}"
# The four key files (transport, message, record, log), PKCS#8 PEM, mode 0600.
keys_dir = "keys"
# A testnet node refuses NHS numbers outside 999 000 0000 - 999 999 9999.
testnet = false

[store]
path = "store"
# sled page cache in MiB. sled's default is 1 GiB; keep this small when many
# nodes share a machine.
cache_mb = 16

[network]
listen = ["/ip4/0.0.0.0/tcp/7000", "/ip4/0.0.0.0/udp/7000/quic-v1"]
# Largest request or response frame accepted; larger frames are refused unread.
max_frame_bytes = 4194304
# How long messages this node signs stay valid (at most 300 seconds).
message_life_secs = 60
# Deadline for each request this node sends to another ICB.
request_deadline_ms = 2000
# Inbound requests handled at once, in total and per peer; past these, and
# past a peer's rate, the peer gets a signed "busy" answer.
max_inflight_total = 256
max_inflight_per_peer = 32
peer_rate_per_sec = 200
peer_burst = 400
# Connections to other ICBs are kept open; idle ones close after this.
idle_timeout_secs = 3600
# Each connection is pinged about this often (each at its own interval, up
# to a quarter either side, so that a node's pings do not all fall together).
# A connection whose pings go unanswered twice running is closed and dialled
# again, so a peer that vanished is reported unreachable at once.
ping_every_secs = 15
ping_timeout_secs = 20
# mDNS discovery, for testnets only.
mdns = false
# Local socket for `careweave-node locate` and `fetch` (mode 0600).
control_socket = "control.sock"

[policy]
# Whether emergency access (ETREAT, with a reason) overrides a patient's
# objection to sharing. Off: the objection always holds.
emergency_overrides_objection = false

# SNOMED CT codes per legally sensitive category. Records carrying any of
# these codes never leave this ICB. Your information governance team owns
# these lists; the defaults are a starting point, not a complete set.
[policy.sensitive_codes]
assisted-fertilisation = ["63487001", "52637005", "265063003"]
gender-identity = ["93461009", "407377005", "407378000"]
sexually-transmitted-infection = ["8098009", "186946009", "15628003", "76272004"]
termination-of-pregnancy = ["386639001", "57797005"]

[audit]
# Sign an audit checkpoint after this many entries, or this many seconds.
checkpoint_every_entries = 100
checkpoint_every_secs = 60

[trust]
# The first trust root, from the national coordinator, out of band.
# root = "trust/root.cose"
# A trust list to load at start when it is newer than the one held.
# list = "trust/list.cose"

[import]
max_resource_bytes = 262144
batch_records = 1000

[api]
# The clinical HTTPS API, mutual TLS only. Unset listen to disable it.
# listen = "0.0.0.0:8443"
# cert = "api/cert.pem"
# key = "api/key.pem"
# client_ca = "api/client-ca.pem"
max_body_bytes = 8388608
max_concurrent = 128
# An admin client certificate the careweave-node command line uses to talk
# to the running node through this API (locate, fetch, status, import,
# patient flag). Without it the command line uses the local control socket.
# cli_cert = "api/cli-cert.pem"
# cli_key = "api/cli-key.pem"

[sharing]
# Who receives this ICB's records. The custodian applies it to every locate
# and fetch from another ICB, beside the policy above.
#   "national"  every active member of the trust list
#   "icbs"      only the ICBs named in icbs (ODS codes), e.g. your neighbours
#   "none"      no one outside this ICB
# A new node shares with no one until its sharing agreements are in place.
# Changes to this section take effect within seconds, without a restart.
scope = "none"
icbs = []
# Whether an answer to an ICB outside the agreement says that records exist
# in the sections it may not see. Off: the answer is the same whether or not
# the patient has records there.
disclose_existence = false
# Per-section exceptions (allergies, medications, problems, procedures,
# investigations, vaccinations, alerts, care-plans, documents, encounters):
# [sharing.sections.medications]
# scope = "national"
# [sharing.sections.care-plans]
# scope = "icbs"
# icbs = ["QUE", "QM7"]

[transparency]
# GET /transparency: public counts of the locates and fetches this node
# answered for other ICBs, per day, by requesting ICB, purpose and outcome,
# with the sharing agreement and the latest signed audit checkpoint. It names
# no patient and no member of staff. The clinical API serves it; set listen to
# also serve it, and nothing else, over HTTPS without a client certificate.
# listen = "0.0.0.0:8444"
# Counts below this are not published, so no individual can be singled out.
suppress_below = 5
# Connections one client address may hold open on the public listener (of
# api.max_concurrent); past that its new connections are closed at once.
max_connections_per_client = 4

[log]
# "human" or "json".
format = "human"
level = "info"
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_template_loads_with_its_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let ods = OdsCode::parse("QHG").unwrap();
        let path = write(dir.path(), &template(&ods, "NHS \"Test\" ICB"));
        let loaded = load(&path, []).unwrap();
        assert_eq!(loaded.config.node.ods, ods);
        assert_eq!(loaded.config.node.name, "NHS \"Test\" ICB");
        assert_eq!(loaded.config.store.cache_mb, 16);
        assert_eq!(loaded.store_dir(), dir.path().join("store"));
        assert_eq!(loaded.config.policy.sensitive_codes.len(), 4);
        // A new node shares with no one until its agreements are in place.
        assert_eq!(
            crate::sharing::Agreement::from_config(&loaded.config.sharing).unwrap(),
            crate::sharing::Agreement::none()
        );
        assert_eq!(loaded.config.transparency.suppress_below, 5);
    }

    #[test]
    fn a_wrong_sharing_agreement_is_refused_with_its_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let ods = OdsCode::parse("QHG").unwrap();
        for (from, to, expected) in [
            (
                "scope = \"none\"\nicbs = []",
                "scope = \"icbs\"\nicbs = []",
                "sharing: scope \"icbs\" needs at least one ODS code",
            ),
            (
                "scope = \"none\"\nicbs = []",
                "scope = \"everyone\"\nicbs = []",
                "everyone",
            ),
            (
                "# [sharing.sections.medications]\n# scope = \"national\"",
                "[sharing.sections.meds]\nscope = \"national\"",
                "sharing.sections.meds is not a section",
            ),
            (
                "scope = \"none\"\nicbs = []",
                "scope = \"icbs\"\nicbs = [\"not an ods code\"]",
                "sharing",
            ),
            ("suppress_below = 5", "suppress_below = 1", "suppress_below"),
        ] {
            let text = template(&ods, "NHS Test ICB").replace(from, to);
            assert!(text.contains(to), "the template changed: {from}");
            let err = load(&write(dir.path(), &text), []).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in {err}");
        }
        let text = template(&ods, "NHS Test ICB");
        let loaded = load(
            &write(dir.path(), &text),
            [
                ("CAREWEAVE__SHARING__SCOPE".to_owned(), "icbs".to_owned()),
                ("CAREWEAVE__SHARING__ICBS".to_owned(), "QUE,QM7".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(
            loaded.config.sharing.icbs.len(),
            2,
            "set from the environment"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[node]\nods = \"QHG\"\nname = \"x\"\n[store]\ncache_mb = 8\n",
        );
        let loaded = load(
            &path,
            [
                ("CAREWEAVE__STORE__CACHE_MB".to_owned(), "32".to_owned()),
                ("CAREWEAVE__NODE__TESTNET".to_owned(), "true".to_owned()),
                (
                    "CAREWEAVE__NETWORK__LISTEN".to_owned(),
                    "/ip4/127.0.0.1/tcp/1,/ip4/127.0.0.1/tcp/2".to_owned(),
                ),
                ("OTHER__STORE__CACHE_MB".to_owned(), "1".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(loaded.config.store.cache_mb, 32);
        assert!(loaded.config.node.testnet);
        assert_eq!(loaded.config.network.listen.len(), 2);
    }

    #[test]
    fn unknown_keys_are_errors_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[node]\nods = \"QHG\"\nname = \"x\"\n[store]\ncache_size = 8\n",
        );
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("cache_size"), "{err}");
        assert!(err.contains("config.toml"), "{err}");
        let path = write(dir.path(), "[node]\nods = \"QHG\"\nname = \"x\"\n[nodes]\n");
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("nodes"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[node]\nods = \"qhg\"\nname = \"x\"\n");
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("ODS") || err.contains("ods"), "{err}");
        let path = write(dir.path(), "[node]\nods = \"QHG\"\nname = \"x\"\n");
        let err = load(
            &path,
            [("CAREWEAVE__STORE__CACHE_MB".to_owned(), "lots".to_owned())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cache_mb"), "{err}");
        let path = write(
            dir.path(),
            "[node]\nods = \"QHG\"\nname = \"x\"\n[network]\nmessage_life_secs = 900\n",
        );
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("message_life_secs"), "{err}");
        for bad in [
            "ping_every_secs = 0",
            "ping_timeout_secs = 0",
            "ping_every_secs = 86400",
        ] {
            let path = write(
                dir.path(),
                &format!("[node]\nods = \"QHG\"\nname = \"x\"\n[network]\n{bad}\n"),
            );
            let err = load(&path, []).unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(key), "{bad}: {err}");
        }
        let path = write(
            dir.path(),
            "[node]\nods = \"QHG\"\nname = \"x\"\n[policy.sensitive_codes]\nhobbies = [\"1\"]\n",
        );
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("hobbies"), "{err}");
        let path = write(
            dir.path(),
            "[node]\nods = \"QHG\"\nname = \"x\"\n[transparency]\nmax_connections_per_client = 0\n",
        );
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("max_connections_per_client"), "{err}");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = load(Path::new("/nonexistent/careweave.toml"), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/careweave.toml"), "{err}");
    }
}
