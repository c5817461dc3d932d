//! Replays every seed and every saved input through its fuzz target, so an
//! input that once crashed a target stays a test, and checks that the seeds
//! are accepted (fuzzing that starts from rejected inputs explores little).

use std::path::{Path, PathBuf};

use careweave_fuzzing::{TARGETS, seeds};

fn corpus_dirs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    vec![
        root.join("corpus").join(target),
        root.join("regressions").join(target),
    ]
}

#[test]
fn every_saved_input_runs_through_its_target() {
    let mut ran = 0;
    for (name, target) in TARGETS {
        for dir in corpus_dirs(name) {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                // Accepted or not, it must come back.
                let _ = target(&bytes);
                ran += 1;
            }
        }
    }
    assert!(
        ran >= TARGETS.len(),
        "only {ran} saved inputs; the seed corpora are missing"
    );
}

#[test]
fn the_seeds_are_accepted_and_cover_every_target() {
    let seeds = seeds();
    for (name, target) in TARGETS {
        let mine: Vec<_> = seeds.iter().filter(|(n, _)| n == name).collect();
        assert!(!mine.is_empty(), "no seed for {name}");
        for (_, bytes) in mine {
            assert!(target(bytes), "a seed for {name} is refused");
        }
    }
}

#[test]
fn the_committed_seed_corpora_match_the_seeds() {
    // `CAREWEAVE_WRITE_SEEDS=1 cargo test -p careweave-fuzzing` rewrites them.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = std::env::var_os("CAREWEAVE_WRITE_SEEDS").is_some();
    for (i, (name, bytes)) in seeds().into_iter().enumerate() {
        let path = root.join(name).join(format!("seed-{i}"));
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).ok().as_deref(),
            Some(bytes.as_slice()),
            "{} is missing or stale; run with CAREWEAVE_WRITE_SEEDS=1",
            path.display()
        );
    }
}
