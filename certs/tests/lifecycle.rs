//! The coordinator's lifecycle from the command line: start a network,
//! onboard ICBs, co-sign, suspend, revoke, rotate the root, issue API
//! certificates, and every refusal on the way.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use careweave_node::keys::NodeKeys;
use careweave_protocol::OdsCode;
use careweave_protocol::trust;

const BIN: &str = env!("CARGO_BIN_EXE_careweave-certs");
const PASS: &str = "correct horse battery staple";

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn certs(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .current_dir(self.dir.path())
            .env("CAREWEAVE_PASSPHRASE", PASS)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.certs(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.certs(args);
        assert!(!out.status.success(), "{args:?} should have failed");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// A new ICB node's keys and the member entry `careweave-node init` prints.
    fn onboard(&self, ods: &str) -> String {
        let keys = NodeKeys::generate().unwrap();
        keys.write_new(&self.path(&format!("nodes/{ods}/keys")))
            .unwrap();
        keys.member_entry(
            &OdsCode::parse(ods).unwrap(),
            &format!("NHS {ods} ICB"),
            &[format!(
                "/dns4/careweave.{}.example/tcp/7000",
                ods.to_lowercase()
            )],
        )
    }

    fn start_network(&self) {
        self.ok(&[
            "root",
            "init",
            "--network",
            "careweave-test",
            "--root-keys",
            "3",
            "--root-threshold",
            "2",
            "--list-keys",
            "3",
            "--list-threshold",
            "2",
            "--expires",
            "730d",
            "--out",
            "coord",
        ]);
    }

    fn signed_list(&self, members: &str, seq: u64, prev: Option<&str>, out: &str) {
        std::fs::write(self.path("members.toml"), members).unwrap();
        let seq = seq.to_string();
        let mut args = vec![
            "list",
            "build",
            "--root",
            "coord/root.cose",
            "--members",
            "members.toml",
            "--seq",
            &seq,
            "--expires",
            "7d",
            "--out",
            out,
        ];
        if let Some(prev) = prev {
            args.extend(["--prev", prev]);
        }
        self.ok(&args);
        self.ok(&["list", "sign", "--key", "coord/keys/list-v1-1.pem", out]);
        self.ok(&["list", "sign", "--key", "coord/keys/list-v1-3.pem", out]);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_whole_lifecycle() {
    let run = Run::new();
    run.start_network();
    for i in 1..=3 {
        for kind in ["root", "list"] {
            let key = run.path(&format!("coord/keys/{kind}-v1-{i}.pem"));
            assert_eq!(mode(&key), 0o600);
            let text = std::fs::read_to_string(&key).unwrap();
            assert!(
                text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
                "keys are never stored in the clear"
            );
        }
    }
    let root_bytes = std::fs::read(run.path("coord/root.cose")).unwrap();
    let root = trust::accept_first_root(&root_bytes, careweave_certs::time::now()).unwrap();
    assert_eq!(root.root().root_keys.len(), 3);
    assert!(
        run.fails(&[
            "root",
            "init",
            "--network",
            "x",
            "--root-keys",
            "1",
            "--root-threshold",
            "1",
            "--list-keys",
            "1",
            "--list-threshold",
            "1",
            "--expires",
            "1d",
            "--out",
            "coord"
        ])
        .contains("already exists")
    );

    // Onboard two ICBs; the list needs two of three list keys.
    let members = format!("{}\n{}", run.onboard("QHG"), run.onboard("QUE"));
    std::fs::write(run.path("members.toml"), &members).unwrap();
    run.ok(&[
        "list",
        "build",
        "--root",
        "coord/root.cose",
        "--members",
        "members.toml",
        "--seq",
        "1",
        "--expires",
        "7d",
        "--out",
        "list1.cose",
    ]);
    run.ok(&[
        "list",
        "sign",
        "--key",
        "coord/keys/list-v1-1.pem",
        "list1.cose",
    ]);
    let verify = run.certs(&["list", "verify", "--root", "coord/root.cose", "list1.cose"]);
    assert_eq!(verify.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("threshold 1 of 2: NOT met"));
    // A node's trust logic agrees: one signature is not enough.
    let one_sig = std::fs::read(run.path("list1.cose")).unwrap();
    assert!(matches!(
        trust::accept_list(&root, None, &one_sig, careweave_certs::time::now()),
        Err(trust::TrustError::ThresholdNotMet { .. })
    ));
    // Refusals while co-signing.
    assert!(
        run.fails(&[
            "list",
            "sign",
            "--key",
            "coord/keys/list-v1-1.pem",
            "list1.cose"
        ])
        .contains("already signed")
    );
    assert!(
        run.fails(&[
            "list",
            "sign",
            "--key",
            "coord/keys/root-v1-1.pem",
            "list1.cose"
        ])
        .contains("not authorised")
    );
    let wrong = Command::new(BIN)
        .current_dir(run.dir.path())
        .env("CAREWEAVE_PASSPHRASE", "wrong passphrase here")
        .args([
            "list",
            "sign",
            "--key",
            "coord/keys/list-v1-2.pem",
            "list1.cose",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong passphrase"));
    run.ok(&[
        "list",
        "sign",
        "--key",
        "coord/keys/list-v1-2.pem",
        "list1.cose",
    ]);
    assert!(
        run.ok(&["list", "verify", "--root", "coord/root.cose", "list1.cose"])
            .contains("ACCEPTABLE")
    );

    // The node's trust logic accepts what the CLI made.
    let list1 = std::fs::read(run.path("list1.cose")).unwrap();
    let accepted = trust::accept_list(&root, None, &list1, careweave_certs::time::now()).unwrap();
    assert_eq!(accepted.list().members.len(), 2);

    // show, in both forms.
    assert!(run.ok(&["list", "show", "list1.cose"]).contains("QHG"));
    let json: serde_json::Value =
        serde_json::from_str(&run.ok(&["list", "show", "--json", "list1.cose"])).unwrap();
    assert_eq!(json["seq"], 1);
    assert_eq!(json["members"].as_array().unwrap().len(), 2);

    // Suspend QUE and revoke QHG's compromised message key.
    let qhg_keys = NodeKeys::load(&run.path("nodes/QHG/keys")).unwrap();
    let members2 = members.replace(
        "name = \"NHS QUE ICB\"",
        "name = \"NHS QUE ICB\"\nstatus = \"suspended\"",
    ) + &format!(
        "\n[[revoked]]\nkid = \"{}\"\nods = \"QHG\"\nrevoked_at = \"2026-11-28\"\nreason = \"laptop stolen\"\ncompromised_since = \"2026-11-20\"\n",
        qhg_keys.message.kid()
    );
    // A second later, so a validity window rebuilt from "now" instead of
    // kept from list 1 would show in the diff below.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    run.signed_list(&members2, 2, Some("list1.cose"), "list2.cose");
    assert!(
        run.ok(&[
            "list",
            "verify",
            "--root",
            "coord/root.cose",
            "--prev",
            "list1.cose",
            "list2.cose"
        ])
        .contains("ACCEPTABLE")
    );
    let diff = run.ok(&["list", "diff", "list1.cose", "list2.cose"]);
    assert!(diff.contains("member QUE SUSPENDED"), "{diff}");
    assert!(
        diff.contains("REVOKED: laptop stolen (compromised since 2026-11-20"),
        "{diff}"
    );
    assert!(
        !diff.contains("validity"),
        "unchanged windows stay unchanged: {diff}"
    );
    let list2 = std::fs::read(run.path("list2.cose")).unwrap();
    let accepted2 =
        trust::accept_list(&root, Some(&accepted), &list2, careweave_certs::time::now()).unwrap();
    assert!(accepted2.revocation(&qhg_keys.message.kid()).is_some());

    // Publish to where nodes pick lists up; an unacceptable list is not published.
    run.ok(&[
        "list",
        "publish",
        "--root",
        "coord/root.cose",
        "list2.cose",
        "--to",
        "published.cose",
    ]);
    assert_eq!(std::fs::read(run.path("published.cose")).unwrap(), list2);
    assert!(
        run.fails(&[
            "list",
            "publish",
            "--root",
            "coord/root.cose",
            "list1.cose.missing",
            "--to",
            "x.cose"
        ])
        .contains("list1.cose.missing")
    );

    // Rotate the root: version 2, signed by two old root keys and all new ones.
    run.ok(&[
        "root",
        "rotate",
        "--dir",
        "coord",
        "--root-keys",
        "3",
        "--root-threshold",
        "2",
        "--list-keys",
        "2",
        "--list-threshold",
        "1",
        "--expires",
        "365d",
    ]);
    let v2 = std::fs::read(run.path("coord/root-v2.cose")).unwrap();
    let root2 = trust::accept_next_root(&root, &v2, careweave_certs::time::now()).unwrap();
    assert_eq!(root2.root().version, 2);
    // Lists under root 2 are signed with the new list keys; the old ones are refused.
    std::fs::write(run.path("members.toml"), &members).unwrap();
    run.ok(&[
        "list",
        "build",
        "--root",
        "coord/root.cose",
        "--members",
        "members.toml",
        "--seq",
        "3",
        "--expires",
        "7d",
        "--prev",
        "list2.cose",
        "--out",
        "list3.cose",
    ]);
    assert!(
        run.fails(&[
            "list",
            "sign",
            "--key",
            "coord/keys/list-v1-1.pem",
            "list3.cose"
        ])
        .contains("not authorised")
    );
    run.ok(&[
        "list",
        "sign",
        "--key",
        "coord/keys/list-v2-1.pem",
        "list3.cose",
    ]);
    let list3 = std::fs::read(run.path("list3.cose")).unwrap();
    trust::accept_list(&root2, None, &list3, careweave_certs::time::now()).unwrap();
}

#[test]
fn list_build_refusals_name_what_is_wrong() {
    let run = Run::new();
    run.start_network();
    let good = format!("{}\n{}", run.onboard("QHG"), run.onboard("QUE"));
    run.signed_list(&good, 1, None, "list1.cose");
    let build = |members: &str, seq: &str, prev: Option<&str>, expires: &str| {
        std::fs::write(run.path("m.toml"), members).unwrap();
        let mut args = vec![
            "list",
            "build",
            "--root",
            "coord/root.cose",
            "--members",
            "m.toml",
            "--seq",
            seq,
            "--expires",
            expires,
            "--out",
            "out.cose",
        ];
        if let Some(p) = prev {
            args.extend(["--prev", p]);
        }
        let _ = std::fs::remove_file(run.path("out.cose"));
        run.fails(&args)
    };
    assert!(build(&good, "1", Some("list1.cose"), "7d").contains("does not rise"));
    assert!(build(&good, "2", None, "7d").contains("needs --prev"));
    assert!(build(&good, "2", Some("list1.cose"), "15d").contains("longer than the root allows"));
    let bad_ods = good.replacen("ods = \"QHG\"", "ods = \"qhg\"", 1);
    let err = build(&bad_ods, "2", Some("list1.cose"), "7d");
    assert!(err.contains("member[0] (qhg): ods"), "{err}");
    let bad_kid = good.replacen("kid = \"", "kid = \"00", 1);
    let err = build(&bad_kid, "2", Some("list1.cose"), "7d");
    assert!(
        err.contains("member[0] (QHG): keys.") && err.contains(".kid"),
        "{err}"
    );
    let no_log = good
        .lines()
        .filter(|l| !l.starts_with("keys.log"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(build(&no_log, "2", Some("list1.cose"), "7d").contains("keys.log: is missing"));
    let dup = format!("{good}\n{}", good.split("\n[[member]]").next().unwrap());
    assert!(build(&dup, "2", Some("list1.cose"), "7d").contains("appears twice"));
    let bad_status = good.replacen(
        "name = \"NHS QHG ICB\"",
        "name = \"NHS QHG ICB\"\nstatus = \"paused\"",
        1,
    );
    assert!(build(&bad_status, "2", Some("list1.cose"), "7d").contains("status: \"paused\""));
    // A weak passphrase is refused for new keys.
    let weak = Command::new(BIN)
        .current_dir(run.dir.path())
        .env("CAREWEAVE_PASSPHRASE", "short")
        .args([
            "root",
            "init",
            "--network",
            "n",
            "--root-keys",
            "1",
            "--root-threshold",
            "1",
            "--list-keys",
            "1",
            "--list-threshold",
            "1",
            "--expires",
            "1d",
            "--out",
            "other",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&weak.stderr).contains("shorter than"));
}

#[test]
fn api_certificates_carry_ods_and_role() {
    let run = Run::new();
    run.ok(&["ca", "init", "--out", "ca"]);
    assert_eq!(mode(&run.path("ca/ca.key")), 0o600);
    run.ok(&[
        "ca",
        "issue",
        "--ca",
        "ca",
        "--server",
        "--dns",
        "careweave.qhg.example",
        "--ip",
        "127.0.0.1",
        "--out",
        "server",
    ]);
    run.ok(&[
        "ca", "issue", "--ca", "ca", "--client", "--name", "EPR", "--ods", "QHG", "--admin",
        "--out", "admin",
    ]);
    run.ok(&[
        "ca", "issue", "--ca", "ca", "--client", "--name", "EPR", "--ods", "QHG", "--out",
        "clinical",
    ]);
    assert_eq!(mode(&run.path("admin/key.pem")), 0o600);
    let der = |p: &str| {
        let text = std::fs::read_to_string(run.path(p)).unwrap();
        let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        String::from_utf8_lossy(&base64_decode(&b64)).into_owned()
    };
    assert!(der("admin/cert.pem").contains("urn:careweave:ods:QHG"));
    assert!(der("admin/cert.pem").contains("urn:careweave:role:admin"));
    assert!(der("clinical/cert.pem").contains("urn:careweave:role:clinical"));
    assert!(der("server/cert.pem").contains("careweave.qhg.example"));
    assert!(
        run.fails(&[
            "ca", "issue", "--ca", "ca", "--client", "--name", "EPR", "--ods", "qhg", "--out",
            "bad"
        ])
        .contains("--ods")
    );
    assert!(
        run.fails(&["ca", "issue", "--ca", "ca", "--server", "--out", "nameless"])
            .contains("--dns or --ip")
    );
    assert!(
        run.fails(&[
            "ca",
            "issue",
            "--ca",
            "ca",
            "--server",
            "--dns",
            "x.example",
            "--out",
            "server"
        ])
        .contains("already exists")
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = text.bytes().filter(|b| *b != b'=').map(value).collect();
    bytes
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, v)| acc | (u32::from(*v) << (18 - 6 * i)));
            let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.into_iter().take(c.len().saturating_sub(1))
        })
        .collect()
}
