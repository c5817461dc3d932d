//! `careweave-node run`: the node, its network, the local control socket
//! and the trust-list file watcher, together.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use careweave_protocol::message::{
    FetchRequest, LocateRequest, RequesterContext, Section, WithheldReason,
};
use careweave_protocol::{NhsNumber, OdsCode};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::{LoadedConfig, NodeConfig};
use crate::net::{self, IcbOutcome, NetConfig, NetError, NetworkHandle};
use crate::node::{FetchAnswer, Node};

/// Longest control request accepted, in bytes.
const MAX_CONTROL_REQUEST: u64 = 64 * 1024;
/// Control connections served at once.
const MAX_CONTROL_CONNECTIONS: usize = 16;

/// The peer-plane settings from a node's configuration.
pub fn net_config(config: &NodeConfig) -> Result<NetConfig, String> {
    let listen = config
        .network
        .listen
        .iter()
        .map(|a| a.parse().map_err(|e| format!("network.listen {a:?}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(NetConfig {
        listen,
        max_frame_bytes: config.network.max_frame_bytes,
        request_deadline: Duration::from_millis(config.network.request_deadline_ms),
        max_inflight_total: config.network.max_inflight_total,
        max_inflight_per_peer: config.network.max_inflight_per_peer,
        rate_per_sec: f64::from(config.network.peer_rate_per_sec),
        burst: f64::from(config.network.peer_burst),
        idle_timeout: Duration::from_secs(config.network.idle_timeout_secs),
        ping_every: Duration::from_secs(config.network.ping_every_secs),
        ping_timeout: Duration::from_secs(config.network.ping_timeout_secs),
        mdns: config.network.mdns,
    })
}

/// Starts the network for a node on a thread of its own: the swarm, its
/// connections and the event loop share one single-threaded runtime, and
/// the returned handle works from any runtime.
///
/// Answering a request passes it from the connection to the event loop and
/// back several times. On one thread those hand-offs wake nothing; on a
/// pool each can wake a second worker, which cost 9% of an answering node's
/// CPU (docs/benchmarks.md). Outbound signing and answer checks stay on the
/// caller's runtime, so a node asking 41 ICBs still uses every core.
pub fn start_network(node: Arc<Node>, config: NetConfig) -> Result<NetworkHandle, NetError> {
    let (started_tx, started) = std::sync::mpsc::sync_channel(1);
    let run = move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(BLOCKING_THREADS)
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = started_tx.send(Err(NetError::Task(format!(
                    "could not start the network runtime: {e}"
                ))));
                return;
            }
        };
        runtime.block_on(async move {
            match net::start(node, config) {
                Ok((handle, event_loop)) => {
                    let _ = started_tx.send(Ok(handle));
                    event_loop.run().await;
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            }
        });
    };
    std::thread::Builder::new()
        .name("careweave-net".to_owned())
        .spawn(run)
        .map_err(|e| NetError::Task(format!("could not start the network thread: {e}")))?;
    started.recv().map_err(|_| {
        NetError::Task("the network thread stopped before the network started".to_owned())
    })?
}

/// A request on the control socket: one JSON object on one line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    Locate {
        nhs_number: NhsNumber,
        context: RequesterContext,
    },
    Fetch {
        nhs_number: NhsNumber,
        pointer_id: String,
        context: RequesterContext,
    },
    Status,
}

/// One ICB's answer, for people and scripts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IcbReport {
    pub ods: String,
    pub name: String,
    /// `pointers`, `no-records`, `withheld`, `timed-out`, `unreachable`, `refused`.
    pub outcome: String,
    pub pointers: Vec<careweave_protocol::message::Pointer>,
    pub withheld: Vec<WithheldReason>,
    /// Sections its sharing agreement does not share with this ICB.
    #[serde(default)]
    pub not_shared: Vec<Section>,
    /// Its shared care records team, from the trust list.
    #[serde(default)]
    pub contact: Option<String>,
    pub detail: Option<String>,
}

/// The answer on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum ControlResponse {
    Located {
        icbs: Vec<IcbReport>,
    },
    Fetched {
        custodian: String,
        withheld: Vec<WithheldReason>,
        /// Sections the custodian's agreement does not share with this ICB.
        #[serde(default)]
        not_shared: Vec<Section>,
        /// The custodian's shared care records team, from the trust list.
        #[serde(default)]
        contact: Option<String>,
        /// Each record's FHIR JSON, custodian signature checked.
        records: Vec<serde_json::Value>,
    },
    Status {
        ods: String,
        peer_id: String,
        listen: Vec<String>,
        connected: usize,
        /// Open peer connections; above `connected` only while a restarted
        /// peer's old connection is still open.
        #[serde(default)]
        connections: usize,
        ready: bool,
        not_ready_reason: Option<String>,
        /// The sharing agreement in force, one line per scope.
        #[serde(default)]
        sharing: Vec<String>,
        /// When it took effect (Unix seconds).
        #[serde(default)]
        sharing_since: u64,
    },
    Error {
        message: String,
    },
}

/// Turns locate results into reports; `contact` finds an ICB's contact.
pub fn reports(
    results: Vec<net::IcbResult>,
    contact: impl Fn(&OdsCode) -> Option<String>,
) -> Vec<IcbReport> {
    results
        .into_iter()
        .map(|r| {
            let (outcome, pointers, withheld, detail) = match r.outcome {
                IcbOutcome::Pointers { pointers, withheld } => {
                    ("pointers", pointers, withheld, None)
                }
                IcbOutcome::NoRecords => ("no-records", vec![], vec![], None),
                IcbOutcome::NotShared => ("not-shared", vec![], vec![], None),
                IcbOutcome::Withheld(w) => ("withheld", vec![], w, None),
                IcbOutcome::TimedOut => ("timed-out", vec![], vec![], None),
                IcbOutcome::Unreachable(d) => ("unreachable", vec![], vec![], Some(d)),
                IcbOutcome::Refused(d) => ("refused", vec![], vec![], Some(d)),
            };
            IcbReport {
                contact: contact(&r.ods),
                ods: r.ods.to_string(),
                name: r.name,
                outcome: outcome.to_owned(),
                pointers,
                withheld,
                not_shared: r.not_shared,
                detail,
            }
        })
        .collect()
}

async fn answer(handle: &NetworkHandle, node: &Node, request: ControlRequest) -> ControlResponse {
    match request {
        ControlRequest::Locate {
            nhs_number,
            context,
        } => {
            let request = LocateRequest {
                nhs_number,
                context,
                sections: None,
            };
            match handle.locate(request).await {
                Ok(results) => {
                    let list = node.current_list(net::unix_now());
                    ControlResponse::Located {
                        icbs: reports(results, |ods| {
                            list.as_ref()?.member_by_ods(ods)?.contact.clone()
                        }),
                    }
                }
                Err(e) => ControlResponse::Error {
                    message: node
                        .not_ready_reason(net::unix_now())
                        .unwrap_or_else(|| e.to_string()),
                },
            }
        }
        ControlRequest::Fetch {
            nhs_number,
            pointer_id,
            context,
        } => match handle
            .fetch(FetchRequest {
                nhs_number,
                pointer_id,
                context,
            })
            .await
        {
            Ok(FetchAnswer::Records {
                custodian,
                records,
                withheld,
                not_shared,
            }) => ControlResponse::Fetched {
                contact: node
                    .current_list(net::unix_now())
                    .and_then(|l| l.member_by_ods(&custodian)?.contact.clone()),
                custodian: custodian.to_string(),
                withheld,
                not_shared,
                records: records
                    .iter()
                    .filter_map(|r| serde_json::from_slice(&r.json).ok())
                    .collect(),
            },
            Ok(FetchAnswer::Refused(e)) => ControlResponse::Error {
                message: format!("refused by the custodian ({:?}): {}", e.code, e.message),
            },
            Err(e) => ControlResponse::Error {
                message: e.to_string(),
            },
        },
        ControlRequest::Status => {
            let status = handle.status().await.unwrap_or_default();
            let now = net::unix_now();
            ControlResponse::Status {
                ods: node.ods().to_string(),
                peer_id: node.peer_id().to_base58(),
                listen: status
                    .listen_addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                connected: status.connected.len(),
                connections: status.connections,
                ready: node.not_ready_reason(now).is_none(),
                not_ready_reason: node.not_ready_reason(now),
                sharing: node.sharing().describe(),
                sharing_since: node.sharing_since(),
            }
        }
    }
}

async fn serve_one(stream: UnixStream, handle: NetworkHandle, node: Arc<Node>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_CONTROL_REQUEST));
    let response = match reader.read_line(&mut line).await {
        Ok(_) => match serde_json::from_str::<ControlRequest>(&line) {
            Ok(request) => answer(&handle, &node, request).await,
            Err(e) => ControlResponse::Error {
                message: format!("bad control request: {e}"),
            },
        },
        Err(e) => ControlResponse::Error {
            message: format!("cannot read control request: {e}"),
        },
    };
    if let Ok(mut text) = serde_json::to_string(&response) {
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
    }
}

/// Serves the control socket (mode 0600) until the process ends.
pub async fn serve_control(
    path: PathBuf,
    handle: NetworkHandle,
    node: Arc<Node>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    loop {
        let (stream, _) = listener.accept().await?;
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            serve_one(stream, handle, node).await;
            drop(permit);
        });
    }
}

/// Sends one control request to a running node and waits for its answer.
pub async fn control(
    path: &std::path::Path,
    request: &ControlRequest,
) -> std::io::Result<ControlResponse> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).map_err(std::io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read.take(64 * 1024 * 1024))
        .read_line(&mut line)
        .await?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// Threads for blocking work (outbound signing and checks, API requests,
/// audit syncs): bounded like every other pool (tokio's default is 512).
/// Inbound requests have a thread of their own (`net::answerer`).
const BLOCKING_THREADS: usize = 32;

/// How often expired replay-cache entries are dropped.
const REPLAY_PURGE_EVERY: Duration = Duration::from_secs(60);

/// Drops replay-cache entries whose messages have expired, every `every`
/// (a minute in a running node). Without this the cache grew by one entry
/// per message until a restart.
pub async fn purge_replay_cache(node: Arc<Node>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let node = Arc::clone(&node);
        match tokio::task::spawn_blocking(move || node.store.purge_replay(net::unix_now())).await {
            Ok(Ok(removed)) => tracing::debug!(removed, "expired replay-cache entries dropped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not purge the replay cache"),
            Err(e) => tracing::warn!(error = %e, "replay-cache purge task failed"),
        }
    }
}

/// Watches the configured trust-list file and installs it when it changes.
pub async fn watch_trust_file(loaded: LoadedConfig, handle: NetworkHandle, node: Arc<Node>) {
    let Some(list) = loaded.config.trust.list.as_ref().map(|p| loaded.resolve(p)) else {
        return;
    };
    let mut last: Option<SystemTime> = std::fs::metadata(&list).and_then(|m| m.modified()).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let modified = std::fs::metadata(&list).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified == last {
            continue;
        }
        last = modified;
        let Ok(bytes) = std::fs::read(&list) else {
            continue;
        };
        let n = Arc::clone(&node);
        match tokio::task::spawn_blocking(move || n.install_list(&bytes, net::unix_now())).await {
            Ok(Ok(seq)) => {
                tracing::info!(seq, file = %list.display(), "installed the trust list dropped in by the operator");
                let _ = handle.trust_changed().await;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, file = %list.display(), "the trust list file was not installed")
            }
            Err(e) => tracing::error!(error = %e, "trust list install task failed"),
        }
    }
}

/// Watches the node's configuration file and puts a changed `[sharing]`
/// agreement in force without a restart. A file that no longer loads leaves
/// the agreement in force as it was, and says why. Other settings take
/// effect at the next start, and the log says so.
pub async fn watch_sharing(loaded: LoadedConfig, node: Arc<Node>) {
    let path = loaded.path.clone();
    let mut last: Option<SystemTime> = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let mut running = loaded.config.clone();
    let mut tick = tokio::time::interval(SHARING_CHECK_EVERY);
    loop {
        tick.tick().await;
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified == last {
            continue;
        }
        last = modified;
        let reloaded = match crate::config::load(&path, std::env::vars()) {
            Ok(reloaded) => reloaded.config,
            Err(e) => {
                tracing::error!(error = %e, "the changed configuration was not applied; the sharing agreement in force is unchanged");
                continue;
            }
        };
        match crate::sharing::Agreement::from_config(&reloaded.sharing) {
            Ok(agreement) => {
                node.set_sharing(agreement, net::unix_now());
            }
            Err(e) => {
                tracing::error!(error = %e, "the changed sharing agreement was not applied");
                continue;
            }
        }
        let mut others_then = running.clone();
        let mut others_now = reloaded.clone();
        others_then.sharing = Default::default();
        others_now.sharing = Default::default();
        if serde_json::to_value(&others_then).ok() != serde_json::to_value(&others_now).ok() {
            tracing::warn!(
                "settings outside [sharing] changed in the configuration file; they take effect when the node restarts"
            );
        }
        running = reloaded;
    }
}

/// How often `run` looks for a changed configuration file.
pub const SHARING_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Open(#[from] crate::opening::OpenError),
    #[error("network: {0}")]
    Net(#[from] NetError),
    #[error("clinical API: {0}")]
    Api(#[from] crate::api::ApiError),
    #[error("runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("control socket {path}: {source}")]
    Control {
        path: String,
        source: std::io::Error,
    },
}

/// Runs a node until SIGINT or SIGTERM: network, clinical API, control
/// socket and trust-file watcher. `careweave-node run` and the testnet use it.
pub fn run(loaded: LoadedConfig) -> Result<(), RunError> {
    // Two rustls providers in the tree make rustls panic unless one is chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let net_config = net_config(&loaded.config).map_err(RunError::Config)?;
    // A command such as `status` may hold the store for a moment; wait for
    // it briefly rather than fail, but never for long.
    let mut attempts = 0;
    let node = loop {
        match crate::opening::open_node(&loaded, net::unix_now()) {
            Ok(node) => break Arc::new(node),
            Err(crate::opening::OpenError::Store(crate::store::StoreError::Locked { .. }))
                if attempts < 50 =>
            {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(reason) = node.not_ready_reason(net::unix_now()) {
        tracing::warn!(%reason, "starting, but not ready to answer");
    }
    let control_path = loaded.resolve(&loaded.config.network.control_socket);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let handle = start_network(Arc::clone(&node), net_config)?;
        crate::api::start(&loaded, Arc::clone(&node), handle.clone()).await?;
        tracing::info!(ods = %node.ods(), peer_id = %node.peer_id(), "careweave node running");
        let control = tokio::spawn(serve_control(control_path.clone(), handle.clone(), Arc::clone(&node)));
        tokio::spawn(watch_trust_file(loaded.clone(), handle.clone(), Arc::clone(&node)));
        tokio::spawn(watch_sharing(loaded.clone(), Arc::clone(&node)));
        tokio::spawn(purge_replay_cache(Arc::clone(&node), REPLAY_PURGE_EVERY));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let result = tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; stopping"); Ok(()) }
            _ = term.recv() => { tracing::info!("terminated; stopping"); Ok(()) }
            result = control => match result {
                Ok(Err(source)) => Err(RunError::Control { path: control_path.display().to_string(), source }),
                _ => Ok(()),
            }
        };
        let _ = node.audit.checkpoint(net::unix_now());
        let _ = std::fs::remove_file(&control_path);
        result
    })
}
