//! `reprise check` over a corpus of broken repositories
//! (`tests/check_corpus/*/`): each is committed to a fresh git repository,
//! the real binary checks it, and its first problem must be the expected
//! `FILE:LINE:` message, with exit code 5 (contract). The examples pass.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .status()
        .expect("git")
        .success();
    assert!(ok, "git {args:?}");
}

/// A repository holding a copy of `case`'s files (not `expected`); returns
/// `reprise check`'s exit code and stdout.
fn check(case: &Path) -> (i32, String) {
    let repo = tempfile::tempdir().expect("temp dir");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(case.join("."))
        .arg(repo.path())
        .status()
        .expect("cp");
    assert!(copied.success());
    let _ = std::fs::remove_file(repo.path().join("expected"));
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "case"]);
    let out = Command::new(env!("CARGO_BIN_EXE_reprise"))
        .arg("check")
        .current_dir(repo.path())
        .env("XDG_DATA_HOME", repo.path().join(".data"))
        .output()
        .expect("reprise check runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn every_broken_repository_gets_its_file_and_line() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_corpus");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .expect("the corpus")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let expected = std::fs::read_to_string(case.join("expected")).expect("expected");
        let expected = expected.trim_end();
        let (code, stdout) = check(case);
        let first = stdout.lines().next().unwrap_or("");
        if code != 5 || !first.starts_with(expected) {
            failures.push(format!(
                "{}: exit {code}, first line {first:?}, expected {expected:?}",
                case.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn the_examples_pass_the_check() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in ["hello", "wordfreq"] {
        let (code, stdout) = check(&examples.join(name));
        assert_eq!(code, 0, "{name}: {stdout}");
        assert!(stdout.starts_with("ok:"), "{name}: {stdout}");
    }
}

#[test]
fn a_broken_mkfile_fails_a_run_before_anything_starts() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_corpus/recipe-unclosed-if");
    let repo = tempfile::tempdir().expect("temp dir");
    std::fs::copy(case.join("mkfile"), repo.path().join("mkfile")).expect("copy");
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "broken"]);
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_reprise"))
        .args(["run", "--no-serve"])
        .current_dir(repo.path())
        .env("XDG_DATA_HOME", repo.path().join(".data"))
        .env("XDG_CONFIG_HOME", repo.path().join(".config"))
        .env_remove("REPRISE_ORCHESTRATOR")
        .env_remove("REPRISE_CREDENTIALS")
        .output()
        .expect("reprise run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("mkfile:6: the recipe of test"), "{stderr}");
    assert!(
        !stderr.contains("boot done") && !stderr.contains("restore done"),
        "{stderr}"
    );
    eprintln!("refused in {:?}", started.elapsed());
}
