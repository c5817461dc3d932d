//! `careweave-node run` as operators run it: two processes made by `init`,
//! trust files from the coordinator, records imported, then `locate` and
//! `fetch` through the running node's control socket, and a new trust list
//! dropped into the watched file.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use careweave_node::keys::{KEY_USES, NodeKeys};
use careweave_protocol::OdsCode;
use careweave_protocol::trust::{KeyUse, Member, MemberKey, MemberStatus, PeerEntry, Role};
use common::{Coordinator, DAY};

const BIN: &str = env!("CARGO_BIN_EXE_careweave-node");
const BUNDLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/multi-section.json");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        for _ in 0..50 {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn member(dir: &Path, ods: &str, port: u16, status: MemberStatus) -> Member {
    let keys = NodeKeys::load(&dir.join("keys")).unwrap();
    let now = careweave_node::net::unix_now();
    Member {
        ods: OdsCode::parse(ods).unwrap(),
        name: format!("NHS {ods} ICB"),
        status,
        roles: vec![Role::Provider, Role::Consumer],
        valid_from: now - DAY,
        valid_until: now + 30 * DAY,
        peers: vec![PeerEntry {
            peer_id: keys.peer_id(),
            addrs: vec![format!("/ip4/127.0.0.1/tcp/{port}")],
        }],
        keys: KEY_USES
            .iter()
            .map(|u| MemberKey {
                kid: keys.get(*u).kid(),
                key_use: *u,
                public: keys.get(*u).public_key(),
                valid_from: now - DAY,
                valid_until: now + 30 * DAY,
            })
            .collect::<Vec<_>>(),
        predecessors: vec![],
        contact: Some(format!(
            "shared-care-records@{}.example.invalid",
            ods.to_lowercase()
        )),
    }
}

fn init(dir: &Path, ods: &str, port: u16) -> PathBuf {
    let out = Command::new(BIN)
        .args([
            "init",
            "--ods",
            ods,
            "--name",
            &format!("NHS {ods} ICB"),
            "--testnet",
        ])
        .arg("--dir")
        .arg(dir)
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{port}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.join("config.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("# root = \"trust/root.cose\"", "root = \"trust/root.cose\"")
        .replace("# list = \"trust/list.cose\"", "list = \"trust/list.cose\"")
        .replace("\nscope = \"none\"", "\nscope = \"national\"");
    std::fs::write(&config, text).unwrap();
    std::fs::create_dir_all(dir.join("trust")).unwrap();
    config
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool, logs: &dyn Fn()) {
    for _ in 0..300 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    logs();
    panic!("never happened: {what}");
}

fn connected_peers(config: &Path) -> Option<u64> {
    // Only ask once the node serves its socket, so the store is not touched.
    if !config.with_file_name("control.sock").exists() {
        return None;
    }
    let out = cli(config, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["connected_peers"].as_u64()
}

#[test]
fn two_operators_run_nodes_that_find_each_others_records() {
    let _ = KeyUse::Transport;
    let dir = tempfile::tempdir().unwrap();
    let (a_port, b_port) = (free_port(), free_port());
    let a = init(&dir.path().join("qhg"), "QHG", a_port);
    let b = init(&dir.path().join("que"), "QUE", b_port);
    let mut coordinator = Coordinator::new();
    let now = careweave_node::net::unix_now();
    coordinator.root.issued = now - DAY;
    coordinator.root.expires = now + 365 * DAY;
    coordinator.at = Some(now);
    let members = |suspended: bool| {
        vec![
            member(&dir.path().join("qhg"), "QHG", a_port, MemberStatus::Active),
            member(
                &dir.path().join("que"),
                "QUE",
                b_port,
                if suspended {
                    MemberStatus::Suspended
                } else {
                    MemberStatus::Active
                },
            ),
        ]
    };
    let list1 = coordinator.list_bytes(1, None, members(false), vec![]);
    for node in ["qhg", "que"] {
        std::fs::write(
            dir.path().join(node).join("trust/root.cose"),
            coordinator.root_bytes(),
        )
        .unwrap();
        std::fs::write(dir.path().join(node).join("trust/list.cose"), &list1).unwrap();
    }
    let out = cli(&b, &["import", BUNDLE]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let spawn = |config: &Path, log: &str| {
        Proc(
            Command::new(BIN)
                .arg("--config")
                .arg(config)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let _a = spawn(&a, "qhg.log");
    let _b = spawn(&b, "que.log");
    let logs = || {
        for log in ["qhg.log", "que.log"] {
            eprintln!(
                "--- {log}\n{}",
                std::fs::read_to_string(dir.path().join(log)).unwrap_or_default()
            );
        }
    };
    wait_for(
        "both nodes connected",
        || connected_peers(&a) == Some(1) && connected_peers(&b) == Some(1),
        &logs,
    );

    let requester = [
        "--user",
        "555021935107",
        "--role-profile",
        "555021936108",
        "--role-code",
        "R8000",
    ];
    let mut args = vec!["locate", "9990000018", "--json"];
    args.extend(requester);
    let out = cli(&a, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let located: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let que = located["icbs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["ods"] == "QUE")
        .unwrap()
        .clone();
    assert_eq!(que["ods"], "QUE");
    assert_eq!(que["outcome"], "pointers");
    let pointer = que["pointers"][0]["id"].as_str().unwrap().to_owned();

    // The human form names the ICB and its sections.
    let mut args = vec!["locate", "999 000 0018"];
    args.extend(requester);
    let text = String::from_utf8_lossy(&cli(&a, &args).stdout).into_owned();
    assert!(
        text.contains("QUE") && text.contains("pointer(s)"),
        "{text}"
    );

    let mut args = vec!["fetch", "9990000018", pointer.as_str(), "--json"];
    args.extend(requester);
    let out = cli(&a, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fetched["custodian"], "QUE");
    assert!(!fetched["records"].as_array().unwrap().is_empty());

    // Emergency access without a reason is refused before it leaves.
    let mut args = vec!["locate", "9990000018", "--purpose", "ETREAT"];
    args.extend(requester);
    let out = cli(&a, &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("break-glass"));

    // QUE's operator narrows its sharing agreement to QUE alone by editing
    // the config file; the running node applies it without a restart.
    let narrowed = std::fs::read_to_string(&b)
        .unwrap()
        .replace("\nscope = \"national\"", "\nscope = \"none\"");
    std::fs::write(&b, narrowed).unwrap();
    wait_for(
        "QUE's status shows the narrowed agreement",
        || {
            String::from_utf8_lossy(&cli(&b, &["status"]).stdout)
                .contains("no one outside this ICB: every section")
        },
        &logs,
    );
    let mut args = vec!["locate", "999 000 0018"];
    args.extend(requester);
    let text = String::from_utf8_lossy(&cli(&a, &args).stdout).into_owned();
    assert!(
        text.contains("nothing shared with this ICB")
            && text.contains(
                "QUE has no sharing agreement with ICB QHG for any section. \
                 Contact: shared-care-records@que.example.invalid."
            ),
        "{text}"
    );
    // A config file that no longer loads changes nothing, and says why.
    let broken = std::fs::read_to_string(&b)
        .unwrap()
        .replace("\nscope = \"none\"", "\nscope = \"icbs\"");
    std::fs::write(&b, broken).unwrap();
    wait_for(
        "QUE's log names the refused change",
        || {
            std::fs::read_to_string(dir.path().join("que.log"))
                .unwrap_or_default()
                .contains("needs at least one ODS code")
        },
        &logs,
    );
    let text = String::from_utf8_lossy(&cli(&a, &args).stdout).into_owned();
    assert!(
        text.contains("QUE has no sharing agreement with ICB QHG for any section"),
        "the agreement in force stays as it was: {text}"
    );

    // The coordinator suspends QUE; QHG's operator drops the list into the watched file.
    let list2 = coordinator.list_bytes(
        2,
        Some(careweave_protocol::trust::sha256(&list1)),
        members(true),
        vec![],
    );
    std::fs::write(dir.path().join("qhg/trust/list.cose"), &list2).unwrap();
    wait_for(
        "QUE cut off after the new list",
        || connected_peers(&a) == Some(0),
        &logs,
    );
    let mut args = vec!["locate", "9990000018", "--json"];
    args.extend(requester);
    let out = cli(&a, &args);
    let located: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let asked: Vec<&str> = located["icbs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["ods"].as_str().unwrap())
        .collect();
    assert_eq!(
        asked,
        ["QHG"],
        "a suspended ICB is not asked; only this node's own records remain"
    );
}

/// A CA, a server certificate for 127.0.0.1 and an admin client certificate.
fn api_pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "operator CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    std::fs::create_dir_all(dir.join("api")).unwrap();
    std::fs::write(dir.join("api/ca.pem"), ca_cert.pem()).unwrap();
    for (name, sans, client) in [
        (
            "server",
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
            false,
        ),
        (
            "cli",
            vec![SanType::URI("urn:careweave:role:admin".try_into().unwrap())],
            true,
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("api/{name}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("api/{name}-key.pem")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn the_command_line_uses_the_running_nodes_api_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (a_port, b_port, api_port) = (free_port(), free_port(), free_port());
    let a = init(&dir.path().join("qhg"), "QHG", a_port);
    let b = init(&dir.path().join("que"), "QUE", b_port);
    api_pki(&dir.path().join("qhg"));
    let text = std::fs::read_to_string(&a)
        .unwrap()
        .replace(
            "# listen = \"0.0.0.0:8443\"",
            &format!("listen = \"127.0.0.1:{api_port}\""),
        )
        .replace(
            "# cert = \"api/cert.pem\"",
            "cert = \"api/server-cert.pem\"",
        )
        .replace("# key = \"api/key.pem\"", "key = \"api/server-key.pem\"")
        .replace(
            "# client_ca = \"api/client-ca.pem\"",
            "client_ca = \"api/ca.pem\"",
        )
        .replace(
            "# cli_cert = \"api/cli-cert.pem\"",
            "cli_cert = \"api/cli-cert.pem\"",
        )
        .replace(
            "# cli_key = \"api/cli-key.pem\"",
            "cli_key = \"api/cli-key.pem\"",
        );
    std::fs::write(&a, text).unwrap();
    let mut coordinator = Coordinator::new();
    let now = careweave_node::net::unix_now();
    coordinator.root.issued = now - DAY;
    coordinator.root.expires = now + 365 * DAY;
    coordinator.at = Some(now);
    let list = coordinator.list_bytes(
        1,
        None,
        vec![
            member(&dir.path().join("qhg"), "QHG", a_port, MemberStatus::Active),
            member(&dir.path().join("que"), "QUE", b_port, MemberStatus::Active),
        ],
        vec![],
    );
    for node in ["qhg", "que"] {
        std::fs::write(
            dir.path().join(node).join("trust/root.cose"),
            coordinator.root_bytes(),
        )
        .unwrap();
        std::fs::write(dir.path().join(node).join("trust/list.cose"), &list).unwrap();
    }
    let spawn = |config: &Path, log: &str| {
        Proc(
            Command::new(BIN)
                .arg("--config")
                .arg(config)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let _a = spawn(&a, "qhg.log");
    let _b = spawn(&b, "que.log");
    let logs = || {
        for log in ["qhg.log", "que.log"] {
            eprintln!(
                "--- {log}\n{}",
                std::fs::read_to_string(dir.path().join(log)).unwrap_or_default()
            );
        }
    };
    // status now goes through the API (admin certificate) and shows peers.
    wait_for(
        "QHG connected, seen through its API",
        || {
            let out = cli(&a, &["status"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|v| v["connected_peers"] == 1)
                .unwrap_or(false)
        },
        &logs,
    );
    // Import while running goes through POST /fhir.
    let out = cli(&a, &["import", BUNDLE]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("through the running node"));
    let requester = [
        "--user",
        "555021935107",
        "--role-profile",
        "555021936108",
        "--role-code",
        "R8000",
    ];
    let mut args = vec!["locate", "9990000018"];
    args.extend(requester);
    let out = cli(&a, &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("QHG    QHG-"),
        "this ICB's own records, found through the API: {text}"
    );
    let out = cli(&a, &["patient", "flag", "9990000018", "--restricted"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&a, &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("QHG    QHG-"),
        "a restricted patient shows nothing: {text}"
    );
}
