//! `reprise check` over a corpus of broken repositories
//! (`tests/check_corpus/*/`): each is committed to a fresh git repository,
//! the real binary checks it, and its first problem must be the expected
//! `FILE:LINE:` message, with exit code 5 (contract). The examples pass,
//! and `reprise run` of a broken mkfile stops at the same check before it
//! looks anything up or dials the orchestrator.

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

/// Credentials of a team made up here (a CA and a client certificate it
/// issued, made with rcgen): enough for `reprise run` to dial an
/// orchestrator, which is all the test needs of them.
fn credentials(path: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    std::fs::write(
        path,
        format!("{}{}{}", leaf.pem(), key.serialize_pem(), ca.pem()),
    )
    .expect("credentials");
}

/// `reprise run ARGS` in `repo` with an orchestrator configured at `addr`.
fn run_with_orchestrator(repo: &Path, addr: &str, creds: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reprise"))
        .arg("run")
        .args(args)
        .current_dir(repo)
        .env("XDG_DATA_HOME", repo.join(".data"))
        .env("XDG_CONFIG_HOME", repo.join(".config"))
        .env("REPRISE_ORCHESTRATOR", addr)
        .env("REPRISE_CREDENTIALS", creds)
        .env_remove("REPRISE_DRIVER")
        .env_remove("CI")
        .output()
        .expect("reprise run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether anything was sent to `socket` (read without waiting: every
/// sender has exited by the time this is asked).
fn received_anything(socket: &std::net::UdpSocket) -> bool {
    socket.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 2048];
    match socket.recv(&mut buf) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("reading the socket: {e}"),
    }
}

#[test]
fn a_broken_mkfile_fails_a_run_before_anything_starts() {
    // An "orchestrator" that never answers: a UDP socket of the test's own,
    // so whether the run dialled it is read from the socket, not guessed
    // from the run's time.
    let orchestrator = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = orchestrator.local_addr().expect("addr").to_string();
    let keys = tempfile::tempdir().expect("temp dir");
    let creds = keys.path().join("credentials.pem");
    credentials(&creds);
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_corpus/recipe-unclosed-if");
    let repo = tempfile::tempdir().expect("temp dir");
    std::fs::copy(case.join("mkfile"), repo.path().join("mkfile")).expect("copy");
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "broken"]);
    let started = std::time::Instant::now();
    let (code, stderr) = run_with_orchestrator(repo.path(), &addr, &creds, &["--no-serve"]);
    assert_eq!(code, 5, "{stderr}");
    assert!(stderr.contains("mkfile:6: the recipe of test"), "{stderr}");
    assert!(
        !stderr.contains("boot done") && !stderr.contains("restore done"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("orchestrator") && !stderr.contains("no stored result"),
        "nothing was looked up:\n{stderr}"
    );
    assert!(
        !received_anything(&orchestrator),
        "the run dialled the orchestrator before reporting the broken mkfile"
    );
    eprintln!("refused in {:?}", started.elapsed());

    // The same setup with the mkfile mended does dial it (and, in
    // replay-only mode, stops when it does not answer): the silence above
    // is the check's doing, not a setup that never dials.
    std::fs::write(
        repo.path().join("mkfile"),
        "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/x\ntest:V:\n\ttrue\n",
    )
    .expect("mend");
    git(repo.path(), &["commit", "-q", "-am", "mended"]);
    let (code, stderr) = run_with_orchestrator(
        repo.path(),
        &addr,
        &creds,
        &["--no-serve", "--mode", "replay-only"],
    );
    assert_eq!(code, 10, "nothing counts, nothing runs: {stderr}");
    assert!(stderr.contains("cannot reach the orchestrator"), "{stderr}");
    assert!(received_anything(&orchestrator), "{stderr}");
}
