//! `careweave-testnet bench --quick`, as CI runs it: every figure measured
//! on real processes, written as JSON and Markdown, nothing left running.
//! Timings are reported by the benchmark, never asserted here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_careweave-testnet");

#[test]
fn the_quick_benchmark_measures_every_figure_and_writes_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let out = dir.path().join("out");
    let run = Command::new(BIN)
        .args(["bench", "--quick", "--dir"])
        .arg(&work)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["quick"], true);
    assert_eq!(
        json["parts"],
        serde_json::json!(["ingest", "locate", "growth", "fetch"])
    );
    assert!(json["machine"]["cores"].as_u64().unwrap() > 0);
    for part in ["ingest", "locate", "growth", "fetch"] {
        // Linux always reports steal, as 0 on bare metal.
        let steal = json["steal_percent"][part].as_f64();
        assert!(steal.is_some_and(|p| (0.0..=100.0).contains(&p)), "{json}");
    }
    let figures = json["figures"].as_array().unwrap();
    let named = |part: &str| {
        figures
            .iter()
            .find(|f| f["name"].as_str().unwrap().contains(part))
            .unwrap_or_else(|| panic!("no figure {part:?} in {json}"))
    };
    for part in [
        "ingest",
        "store size per record",
        "start-up to ready",
        "locate p50, 5 ICBs, sequential",
        "locate p99, 5 ICBs, 8 in parallel",
        "locate p99.9",
        "node RSS under locate load",
        "one of 5 ICBs killed",
        "locate p50 on a fresh testnet of 3 ICBs",
        "locate p50 on a fresh testnet of 5 ICBs",
        "locate p50 growth from 3 to 5 ICBs",
        "records per node",
        "fetch throughput",
        "fetch p99 at 80%",
        "CPU per locate, 5 ICBs, sequential",
        "CPU per locate, 5 ICBs, 8 in parallel",
        "signed and audited floor, p50, 5 ICBs, sequential",
        "signed and audited floor, p99, 5 ICBs, sequential",
        "CPU per signed and audited floor locate, 5 ICBs, sequential",
        "protocol floor, p50, 5 ICBs, sequential",
        "protocol floor, p99, 5 ICBs, sequential",
        "CPU per protocol floor locate, 5 ICBs, sequential",
    ] {
        let f = named(part);
        assert!(f["value"].as_f64().unwrap().is_finite(), "{f}");
    }
    // The floors were measured in the same run.
    for part in [
        "ingest",
        "locate p50, 5 ICBs, sequential",
        "fetch throughput",
        "CPU per locate, 5 ICBs, 8 in parallel",
        "signed and audited floor, p99, 5 ICBs, sequential",
        "protocol floor, p99, 5 ICBs, sequential",
    ] {
        assert!(named(part)["floor"].as_f64().unwrap() > 0.0, "{part}");
    }
    // A locate costs its processes some CPU, and the figure counts it.
    assert!(
        named("CPU per locate, 5 ICBs, sequential")["value"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Correctness is not a timing: every locate was answered, no fetch
    // failed and the killed ICB was flagged each time.
    assert_eq!(named("not answers")["value"], 0.0);
    assert_eq!(named("fetches that failed")["value"], 0.0);
    assert!(
        named("one of 5 ICBs killed")["target"]
            .as_str()
            .unwrap()
            .ends_with("every time"),
        "{json}"
    );

    let table = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(table.contains("| figure | measured (median) |"), "{table}");
    assert!(table.contains("Machine: "), "{table}");

    // Nothing left running: every node and floor process has gone.
    let work = work.display().to_string();
    let leftover: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&work) && c.contains("careweave-testnet"))
        .collect();
    assert!(leftover.is_empty(), "left running: {leftover:?}");
}

#[test]
fn bad_sizes_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, says) in [
        ("--nodes", "1", "--nodes must be between 2 and 42, not 1"),
        ("--nodes", "43", "--nodes must be between 2 and 42, not 43"),
        ("--records", "5", "--records must be at least 20, not 5"),
    ] {
        let run = Command::new(BIN)
            .args(["bench", "--quick", flag, value, "--dir"])
            .arg(dir.path().join("work"))
            .arg("--out")
            .arg(dir.path().join("out"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(!dir.path().join("work").join("main").exists());
    }
}

#[test]
fn only_the_parts_asked_for_are_run() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let out = dir.path().join("out");
    let run = Command::new(BIN)
        .args(["bench", "--quick", "--only", "ingest,fetch", "--dir"])
        .arg(&work)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bench.json")).unwrap()).unwrap();
    assert_eq!(json["parts"], serde_json::json!(["ingest", "fetch"]));
    let steal = json["steal_percent"].as_object().unwrap();
    assert_eq!(steal.keys().collect::<Vec<_>>(), ["fetch", "ingest"]);
    let names: Vec<&str> = json["figures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("ingest")), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("fetch throughput")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("locate")), "{names:?}");
    assert!(!work.join("main").exists());

    let unknown = Command::new(BIN)
        .args(["bench", "--quick", "--only", "ingest,locat", "--dir"])
        .arg(&work)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no benchmark part 'locat'; the parts are ingest, locate, growth, fetch"),
        "{stderr}"
    );
}
