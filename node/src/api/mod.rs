//! The clinical API plane: HTTPS with mutual TLS, speaking FHIR R4 (JSON).
//!
//! Only clients whose certificate chains to the configured CA complete the
//! handshake. The certificate names the calling system's organisation
//! (`urn:careweave:ods:<ODS>`) and role (`urn:careweave:role:admin`); admin
//! endpoints need the admin role. Every answer echoes `X-Request-ID` and
//! `X-Correlation-ID`; every error is an OperationOutcome with an NHS code.

pub mod client;
pub mod fhir;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use careweave_protocol::message::{
    FetchRequest, LocateRequest, Pointer, Purpose, RequesterContext, is_uuid,
};
use careweave_protocol::{NhsNumber, OdsCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::LoadedConfig;
use crate::import::{EntryOutcome, Importer, InputKind};
use crate::net::{IcbOutcome, NetworkHandle, unix_now};
use crate::node::{FetchAnswer, Node};
use crate::store::PatientFlags;
use fhir::{FHIR_JSON, outcome};

/// Pointers remembered from searches, so a pointer can be read or followed.
const POINTER_CACHE: usize = 10_000;

/// Who is calling, from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub name: String,
    pub ods: Option<OdsCode>,
    pub admin: bool,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// Upper bounds (seconds) of the latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A Prometheus histogram of request latency.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [std::sync::atomic::AtomicU64; 10],
    count: std::sync::atomic::AtomicU64,
    sum_micros: std::sync::atomic::AtomicU64,
}

impl Latency {
    fn observe(&self, elapsed: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    fn render(&self, out: &mut String, kind: &str) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "careweave_api_request_seconds_bucket{{kind=\"{kind}\",le=\"{bound}\"}} {}",
                bucket.load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(
            out,
            "careweave_api_request_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "careweave_api_request_seconds_sum{{kind=\"{kind}\"}} {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "careweave_api_request_seconds_count{{kind=\"{kind}\"}} {count}"
        );
    }
}

/// Shared state of the API.
pub struct ApiState {
    pub node: Arc<Node>,
    pub network: NetworkHandle,
    pub base_url: String,
    pointers: Mutex<PointerCache>,
    search_latency: Latency,
    records_latency: Latency,
    /// Counts for the public transparency report, read on from the audit log.
    transparency: Arc<Mutex<crate::transparency::Tally>>,
}

/// Pointers by id, and their ids oldest first for eviction.
type PointerCache = (HashMap<String, (NhsNumber, Pointer)>, VecDeque<String>);

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    fn remember(&self, nhs: NhsNumber, pointer: &Pointer) {
        let mut guard = self
            .pointers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (map, order) = &mut *guard;
        if map
            .insert(pointer.id.clone(), (nhs, pointer.clone()))
            .is_none()
        {
            order.push_back(pointer.id.clone());
            while order.len() > POINTER_CACHE {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    fn pointer(&self, id: &str) -> Option<(NhsNumber, Pointer)> {
        self.pointers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .get(id)
            .cloned()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ApiError> {
    std::fs::read(path).map_err(|e| ApiError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The server's certificate chain and key, from PEM files.
type ServerIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn server_identity(cert: &Path, key: &Path) -> Result<ServerIdentity, ApiError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read_file(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&read_file(key)?)
        .map_err(|e| ApiError::Tls(format!("{}: {e}", key.display())))?;
    Ok((certs, key))
}

/// The rustls server configuration: our certificate, and client
/// certificates required from the configured CA.
pub fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<rustls::ServerConfig, ApiError> {
    let (certs, key) = server_identity(cert, key)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read_file(client_ca)?) {
        let ca = ca.map_err(|e| ApiError::Tls(format!("{}: {e}", client_ca.display())))?;
        roots.add(ca).map_err(|e| ApiError::Tls(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| ApiError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| ApiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Reads the caller's identity from its (already verified) certificate.
pub fn identity(cert: &CertificateDer<'_>) -> ClientIdentity {
    let mut id = ClientIdentity {
        name: String::new(),
        ods: None,
        admin: false,
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return id;
    };
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
    {
        id.name = cn.to_owned();
    }
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(ods) = uri.strip_prefix("urn:careweave:ods:") {
                    id.ods = OdsCode::parse(ods).ok();
                }
                if *uri == "urn:careweave:role:admin" {
                    id.admin = true;
                }
            }
        }
    }
    id
}

/// An error answer: status, NHS code, and what went wrong.
struct Problem {
    status: StatusCode,
    code: &'static str,
    issue: &'static str,
    message: String,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let issue = match status {
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::SERVICE_UNAVAILABLE => "transient",
            StatusCode::CONFLICT => "conflict",
            StatusCode::UNAUTHORIZED => "security",
            StatusCode::INTERNAL_SERVER_ERROR => "exception",
            _ => "invalid",
        };
        Self {
            status,
            code,
            issue,
            message: message.into(),
        }
    }

    /// A fault in the node itself, not in the request.
    fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_SERVER_ERROR",
            message,
        )
    }
}

/// Runs store, signing or audit work off the async threads. A task that
/// panicked or was cancelled is a fault in the node: a 500.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Problem::internal(format!("the node's worker task failed: {e}")))
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = outcome("error", self.issue, self.code, &self.message);
        (
            self.status,
            [(header::CONTENT_TYPE, FHIR_JSON)],
            body.to_string(),
        )
            .into_response()
    }
}

fn fhir(status: StatusCode, value: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        value.to_string(),
    )
        .into_response()
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn bad_header(message: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "MISSING_OR_INVALID_HEADER",
        message,
    )
}

/// The requester context from the request headers.
fn context(headers: &HeaderMap) -> Result<RequesterContext, Problem> {
    let required = |name: &str| {
        header_text(headers, name).ok_or_else(|| bad_header(format!("header {name} is required")))
    };
    let request_id = required("X-Request-ID")?;
    if !is_uuid(request_id) {
        return Err(bad_header("X-Request-ID must be a UUID"));
    }
    let organisation = OdsCode::parse(required("NHSD-End-User-Organisation-ODS")?)
        .map_err(|e| bad_header(format!("NHSD-End-User-Organisation-ODS: {e}")))?;
    let purpose = match header_text(headers, "NHSD-Purpose-Of-Use").unwrap_or("TREAT") {
        "TREAT" => Purpose::Treat,
        "ETREAT" => Purpose::EmergencyTreat,
        other => {
            return Err(bad_header(format!(
                "NHSD-Purpose-Of-Use {other:?} is not TREAT or ETREAT"
            )));
        }
    };
    let reason = header_text(headers, "NHSD-Break-Glass-Reason").map(str::to_owned);
    if purpose == Purpose::EmergencyTreat && reason.is_none() {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "ACCESS_DENIED",
            "emergency access (ETREAT) needs a reason in NHSD-Break-Glass-Reason",
        ));
    }
    let context = RequesterContext {
        organisation,
        user_id: required("NHSD-User-ID")?.to_owned(),
        role_profile_id: required("NHSD-Session-URID")?.to_owned(),
        role_code: required("NHSD-Role-Code")?.to_owned(),
        purpose,
        relationship: header_text(headers, "NHSD-Legitimate-Relationship")
            .unwrap_or("direct-care")
            .to_owned(),
        break_glass_reason: reason,
        request_id: request_id.to_owned(),
        correlation_id: header_text(headers, "X-Correlation-ID").map(str::to_owned),
    };
    context.validate().map_err(|e| bad_header(e.to_string()))?;
    Ok(context)
}

/// Parses `system|value` for an NHS number.
fn nhs_identifier(value: &str) -> Result<NhsNumber, Problem> {
    let (system, number) = value.split_once('|').ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_IDENTIFIER_SYSTEM",
            "subject:identifier must be <system>|<NHS number>",
        )
    })?;
    if system != crate::fhir::NHS_NUMBER_SYSTEM {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_IDENTIFIER_SYSTEM",
            format!(
                "the identifier system must be {}",
                crate::fhir::NHS_NUMBER_SYSTEM
            ),
        ));
    }
    NhsNumber::parse(number)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "INVALID_NHS_NUMBER", e.to_string()))
}

/// What the API makes of a request's headers and its search parameter, as
/// `(context accepted, NHS number accepted)`: the parsing every clinical
/// route starts with, without a server. For fuzzing; `headers` is
/// `Name: value` lines, and lines that are not valid headers are skipped,
/// as hyper would refuse them before any handler ran.
#[doc(hidden)]
pub fn parse_clinical_request(headers: &[u8], identifier: &str) -> (bool, bool) {
    let mut map = HeaderMap::new();
    for line in headers.split(|b| *b == b'\n').take(64) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let value = value.get(1..).unwrap_or_default();
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    (context(&map).is_ok(), nhs_identifier(identifier).is_ok())
}

fn ready(state: &ApiState) -> Result<(), Problem> {
    match state.node.not_ready_reason(unix_now()) {
        None => Ok(()),
        Some(reason) => Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            reason,
        )),
    }
}

async fn search(
    state: &ApiState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    self_url: String,
) -> Result<Response, Problem> {
    let started = std::time::Instant::now();
    let result = search_inner(state, headers, params, self_url).await;
    state.search_latency.observe(started.elapsed());
    result
}

async fn search_inner(
    state: &ApiState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    self_url: String,
) -> Result<Response, Problem> {
    let context = context(headers)?;
    let subject = params.get("subject:identifier").ok_or_else(|| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER",
            "subject:identifier is required",
        )
    })?;
    let nhs = nhs_identifier(subject)?;
    if state.node.config.node.testnet && !nhs.is_test_range() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_NHS_NUMBER",
            "this is a testnet node: NHS numbers must be in 999 000 0000 - 999 999 9999",
        ));
    }
    let custodian = match params.get("custodian:identifier") {
        None => None,
        Some(v) => {
            let code = v
                .strip_prefix(&format!("{}|", fhir::ODS_SYSTEM))
                .ok_or_else(|| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "INVALID_IDENTIFIER_SYSTEM",
                        format!(
                            "custodian:identifier must be {}|<ODS code>",
                            fhir::ODS_SYSTEM
                        ),
                    )
                })?;
            Some(OdsCode::parse(code).map_err(|e| {
                Problem::new(StatusCode::BAD_REQUEST, "INVALID_PARAMETER", e.to_string())
            })?)
        }
    };
    let type_filter = params.get("type").map(|t| {
        t.split_once('|').map_or((None, t.clone()), |(s, c)| {
            (Some(s.to_owned()), c.to_owned())
        })
    });
    ready(state)?;
    let mut results = state
        .network
        .locate(LocateRequest {
            nhs_number: nhs,
            context,
            sections: None,
        })
        .await
        .map_err(|e| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVICE_UNAVAILABLE",
                e.to_string(),
            )
        })?;
    if let Some(custodian) = &custodian {
        results.retain(|r| &r.ods == custodian);
    }
    if let Some((system, code)) = &type_filter {
        for r in &mut results {
            if let IcbOutcome::Pointers { pointers, .. } = &mut r.outcome {
                pointers.retain(|p| {
                    &p.type_code.code == code
                        && system.as_ref().is_none_or(|s| s == &p.type_code.system)
                });
            }
        }
    }
    for r in &results {
        if let IcbOutcome::Pointers { pointers, .. } = &r.outcome {
            for p in pointers {
                state.remember(nhs, p);
            }
        }
    }
    let list = state.node.current_list(unix_now());
    let contact = |ods: &str| {
        let ods = OdsCode::parse(ods).ok()?;
        list.as_ref()?.member_by_ods(&ods)?.contact.clone()
    };
    Ok(fhir(
        StatusCode::OK,
        &fhir::searchset(
            &results,
            &nhs,
            &state.base_url,
            &self_url,
            state.node.ods(),
            contact,
        ),
    ))
}

async fn search_get(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    request_uri: axum::http::Uri,
) -> Result<Response, Problem> {
    // The self link must not carry the NHS number into logs twice; it is the request as made.
    let self_url = format!("{}{}", state.base_url, request_uri);
    search(&state, &headers, &params, self_url).await
}

async fn search_post(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::Form(params): axum::Form<HashMap<String, String>>,
) -> Result<Response, Problem> {
    let self_url = format!("{}/fhir/DocumentReference/_search", state.base_url);
    search(&state, &headers, &params, self_url).await
}

async fn read_pointer(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, Problem> {
    context(&headers)?;
    let (nhs, pointer) = state.pointer(&id).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_FOUND",
            format!("no pointer {id} from a recent search"),
        )
    })?;
    Ok(fhir(
        StatusCode::OK,
        &fhir::document_reference(&pointer, &nhs, &state.base_url),
    ))
}

async fn records(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, Problem> {
    let started = std::time::Instant::now();
    let result = records_inner(&state, &headers, id).await;
    state.records_latency.observe(started.elapsed());
    result
}

async fn records_inner(
    state: &Arc<ApiState>,
    headers: &HeaderMap,
    id: String,
) -> Result<Response, Problem> {
    let headers = headers.clone();
    let state = Arc::clone(state);
    let context = context(&headers)?;
    let id = id.strip_suffix("/$records").unwrap_or(&id).to_owned();
    let (nhs, _) = state.pointer(&id).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_FOUND",
            format!("no pointer {id} from a recent search"),
        )
    })?;
    ready(&state)?;
    let answer = state
        .network
        .fetch(FetchRequest {
            nhs_number: nhs,
            pointer_id: id.clone(),
            context,
        })
        .await
        .map_err(|e| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVICE_UNAVAILABLE",
                e.to_string(),
            )
        })?;
    match answer {
        FetchAnswer::Refused(e) => {
            let status = match e.code {
                careweave_protocol::message::ErrorCode::NotFound => StatusCode::NOT_FOUND,
                careweave_protocol::message::ErrorCode::Busy
                | careweave_protocol::message::ErrorCode::TrustUnavailable => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::FORBIDDEN,
            };
            let code = if status == StatusCode::NOT_FOUND {
                "RESOURCE_NOT_FOUND"
            } else {
                "ACCESS_DENIED"
            };
            Err(Problem::new(status, code, e.message))
        }
        FetchAnswer::Records {
            custodian,
            records,
            withheld,
            not_shared,
        } => {
            let not_shared = (!not_shared.is_empty()).then(|| {
                let list = state.node.current_list(unix_now());
                let member = list.as_ref().and_then(|l| l.member_by_ods(&custodian));
                let who = member.map_or_else(
                    || custodian.to_string(),
                    |m| format!("{} ({})", m.name, m.ods),
                );
                crate::sharing::not_shared_text(
                    &who,
                    state.node.ods(),
                    &not_shared,
                    member.and_then(|m| m.contact.as_deref()),
                )
            });
            let wants_cose =
                header_text(&headers, "Accept").is_some_and(|a| a.contains("application/cose"));
            if wants_cose {
                let signed: Vec<serde_bytes::ByteBuf> = records
                    .iter()
                    .map(|r| serde_bytes::ByteBuf::from(r.signed.clone()))
                    .collect();
                let body = careweave_protocol::cbor::encode(&signed)
                    .map_err(|e| Problem::internal(e.to_string()))?;
                return Ok((
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/cose")],
                    body,
                )
                    .into_response());
            }
            let json: Vec<Value> = records
                .iter()
                .filter_map(|r| serde_json::from_slice(&r.json).ok())
                .collect();
            Ok(fhir(
                StatusCode::OK,
                &fhir::collection(json, &withheld, not_shared, &state.base_url),
            ))
        }
    }
}

async fn import(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    context(&headers)?;
    let bundle: Value = serde_json::from_slice(&body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_RESOURCE",
            format!("invalid JSON: {e}"),
        )
    })?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_RESOURCE",
            "POST /fhir takes a transaction or batch Bundle",
        ));
    }
    let node = Arc::clone(&state.node);
    let result = blocking(move || {
        Importer {
            store: &node.store,
            record_key: &node.keys.record,
            custodian: node.ods(),
            config: &node.config,
            now: unix_now(),
        }
        .import_bundle("POST /fhir", &bundle)
        .map(|(report, outcomes, kind)| (report.transaction_aborted, outcomes, kind))
    })
    .await?;
    let (aborted, outcomes, kind) = match result {
        Ok(r) => r,
        Err(crate::import::ImportError::Store(e)) => {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVICE_UNAVAILABLE",
                format!(
                    "the store could not be written, so the Bundle was not acknowledged; send it again once the node is ready (the same resources replace themselves, never duplicate): {e}"
                ),
            ));
        }
        Err(e) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "INVALID_RESOURCE",
                e.to_string(),
            ));
        }
    };
    if kind != InputKind::Transaction && kind != InputKind::Batch {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_RESOURCE",
            "the Bundle type must be transaction or batch",
        ));
    }
    if aborted {
        let reasons: Vec<String> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                EntryOutcome::Rejected { reason } => Some(format!("entry[{i}]: {reason}")),
                _ => None,
            })
            .collect();
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "INVALID_RESOURCE",
            format!(
                "the transaction was refused as a whole: {}",
                reasons.join("; ")
            ),
        ));
    }
    let entries: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            let (status, location, issue) = match o {
                EntryOutcome::Stored { key, version } => (
                    "201 Created",
                    Some(format!("{key}/_history/{version}")),
                    None,
                ),
                EntryOutcome::Replaced { key, version } => {
                    ("200 OK", Some(format!("{key}/_history/{version}")), None)
                }
                EntryOutcome::Removed { .. } => ("204 No Content", None, None),
                EntryOutcome::NotFound { .. } => ("404 Not Found", None, Some("no such record")),
                EntryOutcome::PatientLinked => ("200 OK", None, None),
                EntryOutcome::Rejected { reason } => {
                    ("400 Bad Request", None, Some(reason.as_str()))
                }
                EntryOutcome::NotApplied => ("400 Bad Request", None, Some("not applied")),
            };
            let mut response = serde_json::Map::new();
            response.insert("status".into(), json!(status));
            if let Some(location) = location {
                response.insert("location".into(), json!(location));
            }
            if let Some(issue) = issue {
                response.insert(
                    "outcome".into(),
                    outcome("error", "invalid", "INVALID_RESOURCE", issue),
                );
            }
            json!({"response": Value::Object(response)})
        })
        .collect();
    let kind = if kind == InputKind::Transaction {
        "transaction-response"
    } else {
        "batch-response"
    };
    Ok(fhir(
        StatusCode::OK,
        &json!({"resourceType": "Bundle", "type": kind, "entry": entries}),
    ))
}

fn require_admin(identity: &ClientIdentity) -> Result<(), Problem> {
    if identity.admin {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "ACCESS_DENIED",
            "this endpoint needs an admin client certificate",
        ))
    }
}

async fn admin_trust_list(
    State(state): State<Arc<ApiState>>,
    Extension(identity): Extension<ClientIdentity>,
    body: Bytes,
) -> Result<Response, Problem> {
    require_admin(&identity)?;
    let node = Arc::clone(&state.node);
    let bytes = body.to_vec();
    let seq = blocking(move || node.install_list(&bytes, unix_now()))
        .await?
        .map_err(|e| Problem::new(StatusCode::CONFLICT, "INVALID_RESOURCE", e.to_string()))?;
    let _ = state.network.trust_changed().await;
    Ok(Json(json!({"installed": true, "seq": seq})).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagsBody {
    #[serde(default)]
    restricted: bool,
    #[serde(default)]
    objection: bool,
    reason: Option<String>,
}

async fn admin_flags(
    State(state): State<Arc<ApiState>>,
    Extension(identity): Extension<ClientIdentity>,
    UrlPath(nhs): UrlPath<String>,
    Json(body): Json<FlagsBody>,
) -> Result<Response, Problem> {
    require_admin(&identity)?;
    let nhs = NhsNumber::parse(&nhs)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "INVALID_NHS_NUMBER", e.to_string()))?;
    let flags = PatientFlags {
        restricted: body.restricted,
        objected: body.objection,
        objection: body.reason,
        updated_at: unix_now(),
    };
    state.node.store.set_flags(&nhs, &flags).map_err(|e| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            e.to_string(),
        )
    })?;
    Ok(Json(json!({"restricted": flags.restricted, "objection": flags.objected})).into_response())
}

async fn admin_status(
    State(state): State<Arc<ApiState>>,
    Extension(identity): Extension<ClientIdentity>,
) -> Result<Response, Problem> {
    require_admin(&identity)?;
    let status = state.network.status().await.unwrap_or_default();
    let now = unix_now();
    let list = state.node.current_list(now);
    Ok(Json(json!({
        "ods": state.node.ods().as_str(),
        "peer_id": state.node.peer_id().to_base58(),
        "connected_peers": status.connected.len(),
        "connections": status.connections,
        "records": state.node.store.record_count(),
        "audit_entries": state.node.audit.len(),
        "trust_list_seq": list.as_ref().map(|l| l.list().seq),
        "ready": state.node.not_ready_reason(now).is_none(),
        "not_ready_reason": state.node.not_ready_reason(now),
        "sharing": state.node.sharing().to_json(),
        "sharing_since": state.node.sharing_since(),
        "store_failed": state.node.store.health().failed,
        "store_reopened": state.node.store.health().reopened,
    }))
    .into_response())
}

/// The public transparency report. No client certificate is needed on the
/// public listener, and nothing in it names a patient or a member of staff.
async fn transparency(State(state): State<Arc<ApiState>>) -> Result<Response, Problem> {
    let node = Arc::clone(&state.node);
    let tally = Arc::clone(&state.transparency);
    let suppress_below = node.config.transparency.suppress_below;
    let report = blocking(move || {
        let mut tally = tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::transparency::report(&node, &mut tally, suppress_below, unix_now())
    })
    .await?
    .map_err(|e| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            format!("the audit log could not be read: {e}"),
        )
    })?;
    let mut response = Json(report).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    Ok(response)
}

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    match state.node.not_ready_reason(unix_now()) {
        None => Json(json!({"ready": true})).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering;
    let node = &state.node;
    let now = unix_now();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    let list = node.current_list(now);
    gauge(
        "careweave_trust_list_seq",
        "Sequence number of the trust list held.",
        list.as_ref().map_or(0, |l| l.list().seq).to_string(),
    );
    gauge(
        "careweave_trust_list_expires_in_seconds",
        "Seconds until the trust list expires (0 when none is current).",
        list.as_ref()
            .map_or(0, |l| l.list().expires.saturating_sub(now))
            .to_string(),
    );
    let (connected, connections) = state
        .network
        .status()
        .await
        .map(|s| (s.connected.len(), s.connections))
        .unwrap_or((0, 0));
    gauge(
        "careweave_peers_connected",
        "Peers connected now.",
        connected.to_string(),
    );
    gauge(
        "careweave_peer_connections",
        "Open peer connections now (one per peer, more while a restarted peer's old connection lingers).",
        connections.to_string(),
    );
    // Left out while the store's database is closed: unknown is not zero.
    if let Some(records) = node.store.record_count() {
        gauge("careweave_records", "Records held.", records.to_string());
    }
    gauge(
        "careweave_audit_entries",
        "Entries in the audit log.",
        node.audit.len().to_string(),
    );
    let last = node.audit.last_checkpoint_time();
    gauge(
        "careweave_audit_checkpoint_age_seconds",
        "Seconds since the last signed audit checkpoint (0 before the first).",
        if last == 0 {
            0
        } else {
            now.saturating_sub(last)
        }
        .to_string(),
    );
    gauge(
        "careweave_store_bytes",
        "Bytes the store takes on disk.",
        node.store.size_on_disk().to_string(),
    );
    let store = node.store.health();
    gauge(
        "careweave_store_failed",
        "1 while the store's database is closed after a write failure (a full disk).",
        u8::from(store.failed).to_string(),
    );
    gauge(
        "careweave_ready",
        "1 when the node answers requests.",
        u8::from(node.not_ready_reason(now).is_none()).to_string(),
    );
    if let Some(memory) = crate::allocator::stats() {
        gauge(
            "careweave_allocator_allocated_bytes",
            "Bytes the node has allocated and not freed.",
            memory.allocated.to_string(),
        );
        gauge(
            "careweave_allocator_active_bytes",
            "Bytes in the allocator's pages that hold allocations.",
            memory.active.to_string(),
        );
        gauge(
            "careweave_allocator_resident_bytes",
            "Bytes the allocator holds in memory, freed pages not yet returned included.",
            memory.resident.to_string(),
        );
    }
    let _ = writeln!(
        out,
        "# HELP careweave_store_reopened_total Times the store's database was opened again after a write failure.\n# TYPE careweave_store_reopened_total counter\ncareweave_store_reopened_total {}",
        store.reopened
    );
    let _ = writeln!(
        out,
        "# HELP careweave_requests_answered_total Inbound requests answered.\n# TYPE careweave_requests_answered_total counter"
    );
    let _ = writeln!(
        out,
        "careweave_requests_answered_total {}",
        node.metrics.answered.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP careweave_requests_refused_total Inbound requests refused, by reason.\n# TYPE careweave_requests_refused_total counter"
    );
    for (reason, count) in node.metrics.refused() {
        let _ = writeln!(
            out,
            "careweave_requests_refused_total{{reason=\"{reason}\"}} {count}"
        );
    }
    let agreement = node.sharing();
    let _ = writeln!(
        out,
        "# HELP careweave_sharing_scope The sharing agreement in force: 1 for each section's scope (national, icbs or none).\n# TYPE careweave_sharing_scope gauge"
    );
    for (section, scope) in agreement.by_section() {
        let _ = writeln!(
            out,
            "careweave_sharing_scope{{section=\"{section}\",scope=\"{}\"}} 1",
            scope.kind()
        );
    }
    let _ = writeln!(
        out,
        "# HELP careweave_sharing_named_icbs ICBs a section is shared with when its scope is a named set.\n# TYPE careweave_sharing_named_icbs gauge"
    );
    for (section, scope) in agreement.by_section() {
        if let crate::sharing::Scope::Icbs(named) = scope {
            let _ = writeln!(
                out,
                "careweave_sharing_named_icbs{{section=\"{section}\"}} {}",
                named.len()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP careweave_sharing_discloses_existence Whether answers outside the agreement say records exist.\n# TYPE careweave_sharing_discloses_existence gauge\ncareweave_sharing_discloses_existence {}\n# HELP careweave_sharing_since_seconds When the agreement in force took effect (Unix time).\n# TYPE careweave_sharing_since_seconds gauge\ncareweave_sharing_since_seconds {}",
        u8::from(agreement.disclose_existence),
        node.sharing_since()
    );
    for (name, help, value) in [
        (
            "careweave_emergency_access_total",
            "Emergency (break-glass) accesses answered.",
            node.metrics.emergency_alerts.load(Ordering::Relaxed),
        ),
        (
            "careweave_trust_equivocations_total",
            "Trust lists refused as equivocation.",
            node.metrics.equivocations.load(Ordering::Relaxed),
        ),
        (
            "careweave_connections_closed_for_bad_messages_total",
            "Connections closed because a member kept sending bad messages.",
            node.metrics
                .connections_closed_for_bad_messages
                .load(Ordering::Relaxed),
        ),
        (
            "careweave_connections_closed_for_missed_pings_total",
            "Connections closed because two pings running failed (timed out or broke).",
            node.metrics
                .connections_closed_for_missed_pings
                .load(Ordering::Relaxed),
        ),
        (
            "careweave_flooding_shut_outs_total",
            "Times a member that kept sending after busy answers was shut out: its requests held unanswered for the cool-down.",
            node.metrics.flooding_shut_outs.load(Ordering::Relaxed),
        ),
        (
            "careweave_audit_failures_total",
            "Audit appends that failed (nothing was released).",
            node.metrics.audit_failures.load(Ordering::Relaxed),
        ),
        (
            "careweave_frames_too_large_total",
            "Frames refused unread for size.",
            node.metrics.frames_too_large.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP careweave_api_request_seconds Clinical API request latency.\n# TYPE careweave_api_request_seconds histogram"
    );
    state.search_latency.render(&mut out, "search");
    state.records_latency.render(&mut out, "records");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn metadata() -> Response {
    fhir(StatusCode::OK, &fhir::capability_statement())
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "RESOURCE_NOT_FOUND",
        "no such endpoint",
    )
}

/// Echoes X-Request-ID and X-Correlation-ID on every answer.
async fn echo_ids(request: Request, next: Next) -> Response {
    let request_id = request.headers().get("X-Request-ID").cloned();
    let correlation_id = request.headers().get("X-Correlation-ID").cloned();
    let mut response = next.run(request).await;
    for (name, value) in [
        ("X-Request-ID", request_id),
        ("X-Correlation-ID", correlation_id),
    ] {
        if let Some(value) = value {
            response.headers_mut().insert(name, value);
        }
    }
    response
        .headers_mut()
        .insert("Cache-Control", HeaderValue::from_static("no-store"));
    response
}

/// The API's routes.
pub fn router(state: Arc<ApiState>, max_body: usize) -> Router {
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/DocumentReference", get(search_get))
        .route("/fhir/DocumentReference/_search", post(search_post))
        .route("/fhir/DocumentReference/{id}", get(read_pointer))
        .route(
            "/fhir/DocumentReference/{id}/{op}",
            get(
                |s, h, UrlPath((id, op)): UrlPath<(String, String)>| async move {
                    if op == "$records" {
                        records(s, h, UrlPath(id)).await
                    } else {
                        Err(not_found().await)
                    }
                },
            ),
        )
        .route("/fhir", post(import))
        .route("/admin/trust-list", post(admin_trust_list))
        .route("/admin/patients/{nhs}/flags", put(admin_flags))
        .route("/admin/status", get(admin_status))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/transparency", get(transparency))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(echo_ids))
        .with_state(state)
}

/// The public listener's routes: the transparency report and nothing else.
pub fn public_router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/transparency", get(transparency))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(1024))
        .with_state(state)
}

/// TLS for the public listener: the API's server certificate, and no
/// client certificate asked for.
pub fn public_tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ApiError> {
    let (certs, key) = server_identity(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ApiError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    state: Arc<ApiState>,
    max_body: usize,
    max_concurrent: usize,
) {
    // Clinical clients all hold certificates from the ICB's CA, and many may
    // come through one integration engine's address: no per-address limit.
    serve_app(listener, tls, router(state, max_body), max_concurrent, None).await;
}

/// Serves the public transparency report on `listener` until the process
/// ends. Anyone can connect, so one address may hold at most `per_client`
/// of the `max_concurrent` connections; past that its connections are
/// closed at once, and the others' still get through.
pub async fn serve_public(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    state: Arc<ApiState>,
    max_concurrent: usize,
    per_client: usize,
) {
    serve_app(
        listener,
        tls,
        public_router(state),
        max_concurrent,
        Some(per_client),
    )
    .await;
}

/// Open connections per client address, on a listener that limits them.
/// An address is in the map only while it has a connection open, so the
/// map never holds more than the listener's connections.
#[derive(Debug, Default)]
struct OpenPerClient {
    open: std::sync::Mutex<HashMap<std::net::IpAddr, usize>>,
}

/// One connection's place in [`OpenPerClient`], given back when dropped.
struct ClientSlot {
    clients: Arc<OpenPerClient>,
    addr: std::net::IpAddr,
}

impl OpenPerClient {
    fn take(self: &Arc<Self>, addr: std::net::IpAddr, limit: usize) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(addr).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            clients: Arc::clone(self),
            addr,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.addr) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

async fn serve_app(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    app: Router,
    max_concurrent: usize,
    per_client: Option<usize>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_concurrent));
    let clients = Arc::new(OpenPerClient::default());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        // Checked before waiting for a free slot, so that one address
        // holding its share cannot stall the accept loop for everyone.
        let client_slot = match per_client {
            Some(limit) => match clients.take(peer.ip(), limit) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%peer, "connection refused: this address has its share open");
                    continue;
                }
            },
            None => None,
        };
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream))
                    .await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "API TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(identity)
                .unwrap_or(ClientIdentity {
                    name: String::new(),
                    ods: None,
                    admin: false,
                });
            let service =
                hyper_util::service::TowerToHyperService::new(app.layer(Extension(identity)));
            let io = hyper_util::rt::TokioIo::new(tls);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, service)
                .await;
            drop(permit);
            drop(client_slot);
        });
    }
}

/// Starts the API from the node's configuration, if it is configured.
pub async fn start(
    loaded: &LoadedConfig,
    node: Arc<Node>,
    network: NetworkHandle,
) -> Result<Option<SocketAddr>, ApiError> {
    let api = &loaded.config.api;
    let (Some(listen), Some(cert), Some(key), Some(ca)) =
        (&api.listen, &api.cert, &api.key, &api.client_ca)
    else {
        return Ok(None);
    };
    let tls = tls_config(
        &loaded.resolve(cert),
        &loaded.resolve(key),
        &loaded.resolve(ca),
    )?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ApiError::Listen {
            addr: listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ApiError::Listen {
        addr: listen.clone(),
        source,
    })?;
    let state = Arc::new(ApiState::new(node, network, format!("https://{addr}")));
    if let Some(public) = &loaded.config.transparency.listen {
        let tls = public_tls_config(&loaded.resolve(cert), &loaded.resolve(key))?;
        let listener = TcpListener::bind(public)
            .await
            .map_err(|source| ApiError::Listen {
                addr: public.clone(),
                source,
            })?;
        let public_addr = listener.local_addr().map_err(|source| ApiError::Listen {
            addr: public.clone(),
            source,
        })?;
        tokio::spawn(serve_public(
            listener,
            tls,
            Arc::clone(&state),
            api.max_concurrent,
            loaded.config.transparency.max_connections_per_client,
        ));
        tracing::info!(addr = %public_addr, "public transparency report listening (HTTPS, no client certificate)");
    }
    tokio::spawn(serve(
        listener,
        tls,
        state,
        api.max_body_bytes,
        api.max_concurrent,
    ));
    tracing::info!(%addr, "clinical API listening (mutual TLS)");
    Ok(Some(addr))
}

impl ApiState {
    /// State for a node and its network, with `base_url` for links.
    pub fn new(node: Arc<Node>, network: NetworkHandle, base_url: String) -> Self {
        Self {
            node,
            network,
            base_url,
            pointers: Mutex::new((HashMap::new(), VecDeque::new())),
            search_latency: Latency::default(),
            records_latency: Latency::default(),
            transparency: Arc::new(Mutex::new(crate::transparency::Tally::new(
                crate::transparency::REPORT_DAYS,
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_status_gets_the_fhir_issue_type_a_client_acts_on() {
        for (status, issue) in [
            (StatusCode::BAD_REQUEST, "invalid"),
            (StatusCode::UNAUTHORIZED, "security"),
            (StatusCode::FORBIDDEN, "forbidden"),
            (StatusCode::NOT_FOUND, "not-found"),
            (StatusCode::CONFLICT, "conflict"),
            (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
            (StatusCode::SERVICE_UNAVAILABLE, "transient"),
        ] {
            assert_eq!(Problem::new(status, "X", "m").issue, issue, "{status}");
        }
        let internal = Problem::internal("the worker failed");
        assert_eq!(internal.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(internal.code, "INTERNAL_SERVER_ERROR");
    }

    #[tokio::test]
    async fn a_worker_task_that_panics_is_a_500_not_a_crash() {
        let problem = blocking(|| -> () { panic!("a fault in the node") })
            .await
            .err()
            .map(|p| (p.status, p.issue));
        assert_eq!(
            problem,
            Some((StatusCode::INTERNAL_SERVER_ERROR, "exception"))
        );
    }
}
