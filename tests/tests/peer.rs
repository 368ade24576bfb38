//! System test of replay through the orchestrator: a real orchestrator and
//! two executors with separate stores on loopback. Executor A runs the hello
//! example for real in a VM and stays connected serving it; executor B, on
//! another clone of the same commit, replays A's result without booting.

#[expect(
    dead_code,
    reason = "the support module is shared with run.rs; this file uses part of it"
)]
mod run_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use run_support::{Run, Sandbox, example_hello, reprise_bin, wait_until};

/// What the hello example's test target records on stdout.
const HELLO_STDOUT: &[u8] =
    b"sh ./test.sh\n\x1b[32mok\x1b[0m greet.sh says: hello, world\n1 passed, 0 failed\n";

fn orchestrator_bin() -> PathBuf {
    let bin = reprise_bin().with_file_name("reprise-orchestrator");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn orchestrator(args: &[&str]) {
    let out = Command::new(orchestrator_bin())
        .args(args)
        .output()
        .expect("orchestrator runs");
    assert!(
        out.status.success(),
        "reprise-orchestrator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port()
}

fn namespace(s: &Sandbox) -> String {
    let r = Run::from(s.reprise(&["key", "--json"]).output().expect("key"));
    r.expect_code(0, "reprise key --json");
    let at = r
        .stdout
        .find("\"namespace\": \"")
        .expect("namespace in key --json")
        + 14;
    r.stdout[at..]
        .split('"')
        .next()
        .expect("quoted")
        .to_string()
}

fn with_orchestrator(cmd: &mut Command, addr: &str, creds: &Path) {
    cmd.env("REPRISE_ORCHESTRATOR", addr)
        .env("REPRISE_CREDENTIALS", creds);
}

#[test]
fn a_second_executor_replays_a_peer_result_through_the_orchestrator() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("orchestrator");
    let state_s = state.to_str().expect("utf-8 path");
    orchestrator(&["init", "--dir", state_s]);

    let a = Sandbox::new();
    a.git_init();
    a.git(&["commit", "-q", "--allow-empty", "-m", "root"]);
    a.copy_from(&example_hello()).commit("hello");
    let ns = namespace(&a);
    let alice = dir.path().join("alice.pem");
    let ci = dir.path().join("ci.pem");
    orchestrator(&[
        "issue",
        "--dir",
        state_s,
        "--name",
        "alice",
        "--repo",
        &ns,
        "--trusted",
        "--out",
        alice.to_str().expect("utf-8"),
    ]);
    orchestrator(&[
        "issue",
        "--dir",
        state_s,
        "--name",
        "ci",
        "--repo",
        &ns,
        "--out",
        ci.to_str().expect("utf-8"),
    ]);
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = Killed(
        Command::new(orchestrator_bin())
            .args(["serve", "--dir", state_s, "--listen", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("orchestrator serves"),
    );

    // A: a real run, then connected mode until SIGINT.
    let a_err = dir.path().join("a.err");
    let a_out = dir.path().join("a.out");
    let mut cmd = a.reprise(&["run"]);
    with_orchestrator(&mut cmd, &addr, &alice);
    cmd.stdout(fs::File::create(&a_out).expect("a.out"))
        .stderr(fs::File::create(&a_err).expect("a.err"));
    let mut producer = Killed(cmd.spawn().expect("reprise run starts"));
    let serving = wait_until(Duration::from_secs(600), || {
        fs::read_to_string(&a_err)
            .is_ok_and(|t| t.contains("serving 1 result(s) to peers as alice"))
            || producer.0.try_wait().ok().flatten().is_some()
    });
    let a_stderr = fs::read_to_string(&a_err).unwrap_or_default();
    assert!(
        serving && a_stderr.contains("serving 1 result(s)"),
        "A runs for real and then serves:\n{a_stderr}"
    );
    assert!(
        a_stderr.contains("reprise: boot done"),
        "A booted a VM:\n{a_stderr}"
    );

    // B: another clone of the same commit, its own store.
    let b = Sandbox::new();
    let cloned = Command::new("git")
        .arg("clone")
        .arg("-q")
        .arg(a.repo())
        .arg(".")
        .current_dir(b.repo())
        .status()
        .expect("git clone");
    assert!(cloned.success());
    let mut cmd = b.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, &addr, &ci);
    let replay = Run::from(cmd.output().expect("reprise run"));
    replay.expect_code(0, "B replays");
    assert!(!replay.booted(), "no VM for B:\n{}", replay.stderr);
    assert!(
        replay
            .stderr
            .contains("from peer 'alice' through the orchestrator"),
        "provenance names the producer:\n{}",
        replay.stderr
    );
    assert!(replay.stderr.contains("counts for CI"), "{}", replay.stderr);
    assert_eq!(replay.stdout_bytes, HELLO_STDOUT, "byte-identical output");
    assert_eq!(
        fs::read(b.repo().join("reprise-artifacts/report.txt")).ok(),
        fs::read(a.repo().join("reprise-artifacts/report.txt")).ok(),
        "byte-identical artifacts"
    );
    // The fetched result is in B's own store now: a second run is local.
    let again = Run::from(b.reprise(&["run"]).output().expect("reprise run"));
    again.expect_code(0, "B again");
    assert!(
        again.stderr.contains("from the local store"),
        "{}",
        again.stderr
    );

    // SIGINT ends A's connected mode with the run's own exit code.
    nix_kill(producer.0.id(), "INT");
    let ended = wait_until(Duration::from_secs(20), || {
        producer.0.try_wait().ok().flatten().is_some()
    });
    assert!(ended, "A stops serving on SIGINT");
    let status = producer.0.wait().expect("status");
    assert_eq!(status.code(), Some(0), "A exits 0: its run passed");
}

#[test]
fn an_unreachable_orchestrator_falls_back_to_running_with_a_notice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("orchestrator");
    let state_s = state.to_str().expect("utf-8 path");
    orchestrator(&["init", "--dir", state_s]);
    let creds = dir.path().join("x.pem");
    orchestrator(&[
        "issue",
        "--dir",
        state_s,
        "--name",
        "x",
        "--repo",
        "any/ns",
        "--out",
        creds.to_str().expect("utf-8"),
    ]);
    // A repository without a mkfile: reaching the contract check (exit 5)
    // proves the run went on without the orchestrator, without a VM.
    let s = Sandbox::new();
    s.git_init();
    s.write("README", "no mkfile here\n").commit("one");
    let mut cmd = s.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, &format!("127.0.0.1:{}", free_udp_port()), &creds);
    let r = Run::from(cmd.output().expect("reprise run"));
    r.expect_code(5, "no mkfile, after the orchestrator notice");
    assert!(
        r.stderr.contains("running without it"),
        "a one-line notice:\n{}",
        r.stderr
    );
    // Credentials that cannot be read are a notice too.
    let mut cmd = s.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, "127.0.0.1:1", Path::new("/nonexistent.pem"));
    let r = Run::from(cmd.output().expect("reprise run"));
    r.expect_code(5, "bad credentials path");
    assert!(
        r.stderr.contains("cannot use the credentials"),
        "{}",
        r.stderr
    );
}

fn nix_kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid}");
}
