//! The clinical API with a real HTTPS client holding real certificates,
//! against real nodes on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use careweave_node::api::{self, ApiState};
use careweave_node::daemon;
use careweave_node::import::Importer;
use careweave_node::net::NetworkHandle;
use careweave_node::node::Node;
use careweave_node::store::Store;
use careweave_protocol::trust::Role;
use common::{Coordinator, DAY, keys, member_at};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

struct Pki {
    ca_pem: String,
    server: (String, String),
    clinical: (String, String),
    admin: (String, String),
    stranger: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test API CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |issuer: &Issuer<'_, KeyPair>, sans: Vec<SanType>, client: bool| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "test");
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    let other_key = KeyPair::generate().unwrap();
    let mut other_params = CertificateParams::default();
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = Issuer::new(other_params, other_key);
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(
            &issuer,
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
            false,
        ),
        clinical: leaf(
            &issuer,
            vec![
                uri("urn:careweave:ods:QHG"),
                uri("urn:careweave:role:clinical"),
            ],
            true,
        ),
        admin: leaf(
            &issuer,
            vec![
                uri("urn:careweave:ods:QHG"),
                uri("urn:careweave:role:admin"),
            ],
            true,
        ),
        stranger: leaf(
            &other,
            vec![
                uri("urn:careweave:ods:QHG"),
                uri("urn:careweave:role:admin"),
            ],
            true,
        ),
    }
}

struct Cluster {
    nodes: Vec<(Arc<Node>, NetworkHandle, tempfile::TempDir)>,
    coordinator: Coordinator,
    members: Vec<careweave_protocol::trust::Member>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn cluster(codes: &[&str]) -> Cluster {
    let mut coordinator = Coordinator::new();
    let now = careweave_node::net::unix_now();
    coordinator.root.issued = now - DAY;
    coordinator.root.expires = now + 365 * DAY;
    coordinator.at = Some(now);
    let ports: Vec<u16> = codes.iter().map(|_| free_port()).collect();
    let members: Vec<_> = codes
        .iter()
        .zip(&ports)
        .map(|(ods, port)| {
            let mut m = member_at(
                ods,
                vec![Role::Provider, Role::Consumer],
                &format!("/ip4/127.0.0.1/tcp/{port}"),
            );
            m.contact = Some(format!("scr-{}@example.invalid", ods.to_lowercase()));
            m
        })
        .collect();
    let list = coordinator.list_bytes(1, None, members.clone(), vec![]);
    let mut nodes = Vec::new();
    for (ods, port) in codes.iter().zip(&ports) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store"), 4 << 20).unwrap();
        let mut config = common::config(ods);
        config.network.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}")];
        config.network.request_deadline_ms = 1500;
        let node = Arc::new(Node::new(config, keys(ods), store, now).unwrap());
        node.install_root(&coordinator.root_bytes(), now).unwrap();
        node.install_list(&list, now).unwrap();
        let handle =
            daemon::start_network(Arc::clone(&node), daemon::net_config(&node.config).unwrap())
                .unwrap();
        nodes.push((node, handle, dir));
    }
    for _ in 0..200 {
        let mut all = true;
        for (_, h, _) in &nodes {
            all &= h.status().await.unwrap().connected.len() == codes.len() - 1;
        }
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Cluster {
        nodes,
        coordinator,
        members,
    }
}

fn load(node: &Node) {
    Importer {
        store: &node.store,
        record_key: &node.keys.record,
        custodian: node.ods(),
        config: &node.config,
        now: careweave_node::net::unix_now(),
    }
    .import_bytes("bundle", common::BUNDLE.as_bytes(), &mut |_, _| {})
    .unwrap();
}

async fn serve_api(
    node: Arc<Node>,
    handle: NetworkHandle,
    pki: &Pki,
    dir: &std::path::Path,
) -> u16 {
    for (name, text) in [
        ("cert.pem", &pki.server.0),
        ("key.pem", &pki.server.1),
        ("ca.pem", &pki.ca_pem),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let tls = api::tls_config(
        &dir.join("cert.pem"),
        &dir.join("key.pem"),
        &dir.join("ca.pem"),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let state = Arc::new(ApiState::new(
        node,
        handle,
        format!("https://127.0.0.1:{port}"),
    ));
    tokio::spawn(api::serve(listener, tls, state, 1 << 20, 16));
    port
}

struct Answer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn code(&self) -> String {
        self.json()["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// Opens `count` TCP connections to `port` that the server keeps open. The
/// server's connections from earlier requests may still be closing and
/// count against the address, in which case it closes new ones at once; so
/// try until none of them has been closed after a moment.
async fn hold_open(port: u16, count: usize) -> Vec<tokio::net::TcpStream> {
    for _ in 0..50 {
        let held: Vec<_> = futures::future::join_all(
            (0..count).map(|_| tokio::net::TcpStream::connect(("127.0.0.1", port))),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let still_open = held.iter().all(|stream| {
            matches!(stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        if still_open {
            return held;
        }
    }
    panic!("the server never kept {count} connections open");
}

async fn call(
    port: u16,
    pki: &Pki,
    client: Option<&(String, String)>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Answer, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(
            ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
            tcp,
        )
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("Host", "127.0.0.1");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

const RID: &str = "3b2c1d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d";

fn clinician() -> Vec<(&'static str, &'static str)> {
    vec![
        ("X-Request-ID", RID),
        ("X-Correlation-ID", "corr-77"),
        ("NHSD-End-User-Organisation-ODS", "QHG"),
        ("NHSD-User-ID", "555021935107"),
        ("NHSD-Session-URID", "555021936108"),
        ("NHSD-Role-Code", "R8000"),
    ]
}

const SEARCH: &str =
    "/fhir/DocumentReference?subject:identifier=https://fhir.nhs.uk/Id/nhs-number%7C9990000018";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinical_system_locates_and_fetches_across_icbs() {
    let pki = pki();
    let c = cluster(&["QHG", "QUE", "QM7"]).await;
    load(&c.nodes[1].0);
    load(&c.nodes[2].0);
    let dir = tempfile::tempdir().unwrap();
    let port = serve_api(
        Arc::clone(&c.nodes[0].0),
        c.nodes[0].1.clone(),
        &pki,
        dir.path(),
    )
    .await;

    let found = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        SEARCH,
        &clinician(),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(
        found.status,
        200,
        "{}",
        String::from_utf8_lossy(&found.body)
    );
    assert_eq!(found.headers["X-Request-ID"], RID);
    assert_eq!(found.headers["X-Correlation-ID"], "corr-77");
    let bundle = found.json();
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(
        bundle["total"], 14,
        "seven pointers from each of QUE and QM7"
    );
    assert_eq!(bundle["link"][0]["relation"], "self");
    let entries = bundle["entry"].as_array().unwrap();
    let matches: Vec<_> = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .collect();
    let outcomes: Vec<_> = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "outcome")
        .collect();
    assert_eq!(matches.len(), 14);
    assert_eq!(
        outcomes.len(),
        2,
        "each ICB withheld sensitive and very restricted records"
    );
    let withheld = outcomes[0]["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert!(
        withheld.contains("legally sensitive") && withheld.contains("Contact: scr-"),
        "{withheld}"
    );
    let pointer = &matches[0]["resource"];
    assert_eq!(pointer["resourceType"], "DocumentReference");
    assert_eq!(pointer["subject"]["identifier"]["value"], "9990000018");
    let id = pointer["id"].as_str().unwrap();

    // POST _search keeps the NHS number out of the URL.
    let mut form_headers = clinician();
    form_headers.push(("Content-Type", "application/x-www-form-urlencoded"));
    let posted = call(
        port,
        &pki,
        Some(&pki.clinical),
        "POST",
        "/fhir/DocumentReference/_search",
        &form_headers,
        b"subject%3Aidentifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9990000018&custodian%3Aidentifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fods-organization-code%7CQUE".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(
        posted.status,
        200,
        "{}",
        String::from_utf8_lossy(&posted.body)
    );
    assert_eq!(posted.json()["total"], 7, "narrowed to QUE");

    // Read the pointer and fetch its records with provenance checked.
    let read = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        &format!("/fhir/DocumentReference/{id}"),
        &clinician(),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(read.status, 200);
    let url = format!("/fhir/DocumentReference/{id}/$records");
    let records = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        &url,
        &clinician(),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(
        records.status,
        200,
        "{}",
        String::from_utf8_lossy(&records.body)
    );
    let bundle = records.json();
    assert_eq!(bundle["type"], "collection");
    assert!(!bundle["entry"].as_array().unwrap().is_empty());
    let mut cose_headers = clinician();
    cose_headers.push(("Accept", "application/cose"));
    let raw = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        &url,
        &cose_headers,
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(raw.headers["content-type"], "application/cose");
    let signed: Vec<serde_bytes::ByteBuf> =
        careweave_protocol::cbor::decode(&raw.body, careweave_protocol::cbor::Limits::MESSAGE)
            .unwrap();
    let list = c.nodes[0]
        .0
        .current_list(careweave_node::net::unix_now())
        .unwrap();
    for record in &signed {
        careweave_protocol::record::verify_record(record, &list).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_status_nhs_code_and_the_request_id() {
    let pki = pki();
    let c = cluster(&["QHG", "QUE"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = serve_api(
        Arc::clone(&c.nodes[0].0),
        c.nodes[0].1.clone(),
        &pki,
        dir.path(),
    )
    .await;
    let get = |path: String, headers: Vec<(&'static str, &'static str)>| {
        let pki = &pki;
        async move {
            call(
                port,
                pki,
                Some(&pki.clinical),
                "GET",
                &path,
                &headers,
                vec![],
            )
            .await
            .unwrap()
        }
    };
    let bad_nhs = get(
        "/fhir/DocumentReference?subject:identifier=https://fhir.nhs.uk/Id/nhs-number%7C9990000019"
            .into(),
        clinician(),
    )
    .await;
    assert_eq!(
        (bad_nhs.status, bad_nhs.code().as_str()),
        (400, "INVALID_NHS_NUMBER")
    );
    assert_eq!(bad_nhs.headers["X-Request-ID"], RID);
    let wrong_system = get(
        "/fhir/DocumentReference?subject:identifier=https://example.invalid/id%7C9990000018".into(),
        clinician(),
    )
    .await;
    assert_eq!(
        (wrong_system.status, wrong_system.code().as_str()),
        (400, "INVALID_IDENTIFIER_SYSTEM")
    );
    let mut missing = clinician();
    missing.retain(|(k, _)| *k != "NHSD-User-ID");
    let no_user = get(SEARCH.into(), missing).await;
    assert_eq!(
        (no_user.status, no_user.code().as_str()),
        (400, "MISSING_OR_INVALID_HEADER")
    );
    let mut bad_id = clinician();
    bad_id[0] = ("X-Request-ID", "not-a-uuid");
    assert_eq!(
        get(SEARCH.into(), bad_id).await.code(),
        "MISSING_OR_INVALID_HEADER"
    );
    let mut emergency = clinician();
    emergency.push(("NHSD-Purpose-Of-Use", "ETREAT"));
    let no_reason = get(SEARCH.into(), emergency).await;
    assert_eq!(
        (no_reason.status, no_reason.code().as_str()),
        (403, "ACCESS_DENIED")
    );
    let unknown = get(
        "/fhir/DocumentReference/QUE-000000000000000000000000".into(),
        clinician(),
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (404, "RESOURCE_NOT_FOUND")
    );
    // A node without a current trust list answers 503 and says why.
    let dir2 = tempfile::tempdir().unwrap();
    let store = Store::open(&dir2.path().join("store"), 4 << 20).unwrap();
    let lonely = Arc::new(
        Node::new(
            common::config("QM7"),
            keys("QM7"),
            store,
            careweave_node::net::unix_now(),
        )
        .unwrap(),
    );
    let handle = daemon::start_network(
        Arc::clone(&lonely),
        daemon::net_config(&lonely.config).unwrap(),
    )
    .unwrap();
    let port2 = serve_api(lonely, handle, &pki, dir2.path()).await;
    let unready = call(
        port2,
        &pki,
        Some(&pki.clinical),
        "GET",
        SEARCH,
        &clinician(),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(unready.status, 503);
    let ready = call(
        port2,
        &pki,
        Some(&pki.clinical),
        "GET",
        "/readyz",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(ready.status, 503);
    assert!(
        ready.json()["reason"]
            .as_str()
            .unwrap()
            .contains("no trust root")
    );
    let _ = &c.coordinator;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_right_certificates_get_in() {
    let pki = pki();
    let c = cluster(&["QHG", "QUE"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = serve_api(
        Arc::clone(&c.nodes[0].0),
        c.nodes[0].1.clone(),
        &pki,
        dir.path(),
    )
    .await;
    // No certificate, or one from another CA: refused at the handshake (or the first read).
    for client in [None, Some(&pki.stranger)] {
        let result = call(port, &pki, client, "GET", "/healthz", &[], vec![]).await;
        assert!(
            result.is_err(),
            "got in without a valid client certificate: {}",
            result.map(|a| a.status).unwrap_or(0)
        );
    }
    let ok = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        "/healthz",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
    // A clinical certificate cannot use admin endpoints.
    let denied = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        "/admin/status",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(
        (denied.status, denied.code().as_str()),
        (403, "ACCESS_DENIED")
    );
    let status = call(
        port,
        &pki,
        Some(&pki.admin),
        "GET",
        "/admin/status",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["ods"], "QHG");
    assert_eq!(status.json()["sharing"]["default"]["scope"], "national");
    let metrics = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        "/metrics",
        &[],
        vec![],
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains("careweave_trust_list_seq 1")
            && text.contains("careweave_peers_connected 1")
            && text.contains("careweave_peer_connections "),
        "{text}"
    );
    for metric in [
        "careweave_trust_list_expires_in_seconds",
        "careweave_audit_checkpoint_age_seconds",
        "careweave_store_bytes",
        "careweave_api_request_seconds_bucket{kind=\"search\",le=\"+Inf\"}",
        "careweave_sharing_scope{section=\"care-plans\",scope=\"national\"} 1",
        "careweave_sharing_discloses_existence 0",
    ] {
        assert!(text.contains(metric), "{metric} missing from {text}");
    }
    let cap = call(
        port,
        &pki,
        Some(&pki.clinical),
        "GET",
        "/fhir/metadata",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(cap.json()["resourceType"], "CapabilityStatement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_publishes_a_list_that_reaches_the_others_and_unreachable_icbs_show() {
    let pki = pki();
    let mut c = cluster(&["QHG", "QUE", "QM7"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = serve_api(
        Arc::clone(&c.nodes[0].0),
        c.nodes[0].1.clone(),
        &pki,
        dir.path(),
    )
    .await;
    // Import through the API.
    let bundle = common::BUNDLE.replace("\"type\": \"transaction\"", "\"type\": \"batch\"");
    let imported = call(
        port,
        &pki,
        Some(&pki.clinical),
        "POST",
        "/fhir",
        &clinician(),
        bundle.into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(
        imported.status,
        200,
        "{}",
        String::from_utf8_lossy(&imported.body)
    );
    assert_eq!(imported.json()["type"], "batch-response");
    assert_eq!(c.nodes[0].0.store.record_count(), Some(9));

    // The coordinator's new list, handed to QHG's admin endpoint, reaches QUE.
    let prev = careweave_protocol::trust::sha256(
        c.nodes[0]
            .0
            .current_list(careweave_node::net::unix_now())
            .unwrap()
            .bytes(),
    );
    let list2 = c
        .coordinator
        .list_bytes(2, Some(prev), c.members.clone(), vec![]);
    let denied = call(
        port,
        &pki,
        Some(&pki.clinical),
        "POST",
        "/admin/trust-list",
        &[],
        list2.clone(),
    )
    .await
    .unwrap();
    assert_eq!(denied.status, 403);
    let installed = call(
        port,
        &pki,
        Some(&pki.admin),
        "POST",
        "/admin/trust-list",
        &[],
        list2,
    )
    .await
    .unwrap();
    assert_eq!(
        installed.status,
        200,
        "{}",
        String::from_utf8_lossy(&installed.body)
    );
    let que = Arc::clone(&c.nodes[1].0);
    let mut reached = false;
    for _ in 0..200 {
        if que
            .current_list(careweave_node::net::unix_now())
            .map(|l| l.list().seq)
            == Some(2)
        {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reached,
        "the list published through the API did not reach QUE"
    );

    // Stop QM7: the search still answers, with QM7 flagged.
    let (qm7, handle, _d) = c.nodes.pop().unwrap();
    drop(handle);
    drop(qm7);
    let mut gone = false;
    for _ in 0..100 {
        if c.nodes[0].1.status().await.unwrap().connected.len() == 1 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "QM7's node did not stop");
    {
        let found = call(
            port,
            &pki,
            Some(&pki.clinical),
            "GET",
            SEARCH,
            &clinician(),
            vec![],
        )
        .await
        .unwrap();
        let text = found.json().to_string();
        assert!(
            text.contains("NHS QM7 ICB (QM7) could not be reached")
                || text.contains("did not answer in time"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custodian_outside_the_agreement_is_shown_with_its_contact_and_counted_in_public() {
    use careweave_node::sharing::Agreement;
    let pki = pki();
    let c = cluster(&["QHG", "QUE"]).await;
    let que = Arc::clone(&c.nodes[1].0);
    load(&que);
    que.set_sharing(Agreement::none(), careweave_node::net::unix_now());
    let dir = tempfile::tempdir().unwrap();
    let port = serve_api(
        Arc::clone(&c.nodes[0].0),
        c.nodes[0].1.clone(),
        &pki,
        dir.path(),
    )
    .await;

    // The clinician sees no pointers, why, and whom to ask.
    for _ in 0..5 {
        let found = call(
            port,
            &pki,
            Some(&pki.clinical),
            "GET",
            SEARCH,
            &clinician(),
            vec![],
        )
        .await
        .unwrap();
        assert_eq!(found.status, 200);
        let bundle = found.json();
        assert_eq!(bundle["total"], 0);
        let issue = &bundle["entry"][0]["resource"]["issue"][0];
        assert_eq!(issue["code"], "suppressed");
        assert_eq!(
            issue["diagnostics"],
            "NHS QUE ICB (QUE) has no sharing agreement with ICB QHG for any section. \
             Contact: scr-que@example.invalid."
        );
    }

    // QUE's public report, with no client certificate at all.
    let public_dir = tempfile::tempdir().unwrap();
    std::fs::write(public_dir.path().join("cert.pem"), &pki.server.0).unwrap();
    std::fs::write(public_dir.path().join("key.pem"), &pki.server.1).unwrap();
    let tls = api::public_tls_config(
        &public_dir.path().join("cert.pem"),
        &public_dir.path().join("key.pem"),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public_port = listener.local_addr().unwrap().port();
    let state = Arc::new(ApiState::new(
        Arc::clone(&que),
        c.nodes[1].1.clone(),
        "https://127.0.0.1".into(),
    ));
    tokio::spawn(api::serve_public(listener, tls, state, 8, 2));
    let report = call(public_port, &pki, None, "GET", "/transparency", &[], vec![])
        .await
        .unwrap();
    assert_eq!(report.status, 200);
    let json = report.json();
    let rows = json["counts"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r["requesting_icb"] == "QHG"
            && r["protocol"] == "locate"
            && r["outcome"] == "not-shared"
            && r["count"] == 5),
        "{rows:#?}"
    );
    assert_eq!(json["sharing_agreement"]["default"]["scope"], "none");
    let text = String::from_utf8_lossy(&report.body);
    assert!(!text.contains("9990000018") && !text.contains("555021935107"));
    // The public listener serves the report and nothing else.
    for path in ["/fhir/metadata", "/admin/status", "/metrics"] {
        let other = call(public_port, &pki, None, "GET", path, &[], vec![])
            .await
            .unwrap();
        assert_eq!(other.status, 404, "{path}");
    }
    // One address holding its two connections open (here, idle before the
    // TLS handshake) is refused a third at once, and served again once it
    // lets them go.
    let held = hold_open(public_port, 2).await;
    let mut refused = false;
    for _ in 0..50 {
        match call(public_port, &pki, None, "GET", "/transparency", &[], vec![]).await {
            Err(_) => {
                refused = true;
                break;
            }
            // The held connections may not have been accepted yet.
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert!(refused, "a third connection from one address was served");
    drop(held);
    let mut served = false;
    for _ in 0..100 {
        if let Ok(report) = call(public_port, &pki, None, "GET", "/transparency", &[], vec![]).await
        {
            assert_eq!(report.status, 200);
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        served,
        "the address was not served again after closing its connections"
    );
}
