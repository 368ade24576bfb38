//! Replays every committed fuzz input on stable: each file of
//! `fuzz/corpus/<target>/` (and of `fuzz/artifacts/<target>/`, where the
//! inputs of fixed crashes are kept) through the target's function, so a
//! change that makes one of them panic fails CI. A target without corpus
//! files fails too, so a corpus cannot silently disappear.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reprise_fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_corpus_file_replays_clean() {
    let mut empty = Vec::new();
    for (name, target) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        if corpus.is_empty() {
            empty.push(*name);
        }
        let artifacts = files(&fuzz_dir().join("artifacts").join(name));
        for file in corpus.iter().chain(&artifacts) {
            let data = std::fs::read(file).expect("a corpus file reads");
            let replay = std::panic::catch_unwind(|| target(&data));
            assert!(replay.is_ok(), "{name} panicked on {}", file.display());
        }
    }
    assert!(empty.is_empty(), "no corpus files for {empty:?}");
}

#[test]
fn every_fuzz_target_has_a_body_and_every_body_a_target() {
    let declared: BTreeSet<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    let bodies: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(declared, bodies, "fuzz/fuzz_targets/ and TARGETS differ");
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for name in &bodies {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "{name} is not a [[bin]] of fuzz/Cargo.toml"
        );
    }
}
