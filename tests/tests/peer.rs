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

/// An orchestrator state folder, executor A's repository (the hello
/// example over an empty root commit) and two identities for its
/// namespace: `alice` (trusted) and `ci` (not).
struct Team {
    dir: tempfile::TempDir,
    state: String,
    a: Sandbox,
    alice: PathBuf,
    ci: PathBuf,
}

impl Team {
    fn new() -> Team {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir
            .path()
            .join("orchestrator")
            .to_str()
            .expect("utf-8 path")
            .to_string();
        orchestrator(&["init", "--dir", &state]);
        let a = Sandbox::new();
        a.git_init();
        a.git(&["commit", "-q", "--allow-empty", "-m", "root"]);
        a.copy_from(&example_hello()).commit("hello");
        let ns = namespace(&a);
        let issue = |name: &str, trusted: bool| {
            let file = dir.path().join(format!("{name}.pem"));
            let out = file.to_str().expect("utf-8");
            let mut args = vec![
                "issue", "--dir", &state, "--name", name, "--repo", &ns, "--out", out,
            ];
            if trusted {
                args.push("--trusted");
            }
            orchestrator(&args);
            file
        };
        let alice = issue("alice", true);
        let ci = issue("ci", false);
        Team {
            dir,
            state,
            a,
            alice,
            ci,
        }
    }
}

#[test]
fn a_second_executor_replays_a_peer_result_through_the_orchestrator() {
    let Team {
        dir,
        state,
        a,
        alice,
        ci,
    } = Team::new();
    let state_s = state.as_str();
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_on(state_s, &addr);

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
        a_stderr.contains("reprise: boot done") || a_stderr.contains("reprise: restore done"),
        "A started a VM:\n{a_stderr}"
    );

    // B: another clone of the same commit, its own store.
    let b = clone_of(&a);
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

/// Commits a passed result for the repository's HEAD to `sandbox`'s store,
/// as a real run would have, without booting a VM. Returns its stdout.
fn fabricate_result(sandbox: &Sandbox, text: &str) -> Vec<u8> {
    use reprise_protocol::manifest::{MANIFEST_VERSION, Outcome, Phase, Producer, ResultManifest};
    use reprise_protocol::record::{self, StreamId};
    let keyed = reprise_executor::pipeline::compute_key(&sandbox.repo(), None, "test", &[], None)
        .expect("key");
    let stdout = format!("{text}\n").into_bytes();
    let mut rec = Vec::new();
    record::push(&mut rec, StreamId::Stdout, 0, &stdout);
    let arts = sandbox.dir.path().join("staged-artifacts");
    fs::create_dir_all(&arts).expect("artifacts");
    fs::write(arts.join("report.txt"), format!("report of {text}\n")).expect("artifact");
    let manifest = ResultManifest {
        version: MANIFEST_VERSION,
        key: keyed.inputs.key(),
        inputs: keyed.inputs.clone(),
        commit: keyed.revision.commit.clone(),
        outcome: Outcome::Passed,
        exit_code: 0,
        phases: vec![Phase {
            name: "test".into(),
            ms: 1200,
        }],
        total_ms: 1200,
        accel: "tcg".into(),
        tool_version: "test".into(),
        producer: Producer {
            host: "laptop".into(),
            user: "alice".into(),
        },
        created_at: reprise_executor::store::now_secs(),
        output_sha256: String::new(),
        output_bytes: 0,
        artifacts: Vec::new(),
    };
    reprise_executor::store::Store::new(sandbox.store())
        .commit(manifest, &rec, Some(&arts))
        .expect("commit");
    fs::remove_dir_all(&arts).expect("remove staging");
    stdout
}

fn serve_on(state: &str, addr: &str) -> Killed {
    Killed(
        Command::new(orchestrator_bin())
            .args(["serve", "--dir", state, "--listen", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("orchestrator serves"),
    )
}

fn clone_of(a: &Sandbox) -> Sandbox {
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
    b
}

#[test]
fn a_daemon_serves_its_store_takes_handed_results_and_reconnects_after_a_restart() {
    let Team {
        dir,
        state,
        a,
        alice,
        ci,
    } = Team::new();
    let state_s = state.as_str();
    let first_stdout = fabricate_result(&a, "first result");
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let server = serve_on(state_s, &addr);

    // Without an orchestrator configured, the daemon says what it needs.
    let r = Run::from(a.reprise(&["daemon"]).output().expect("daemon"));
    r.expect_code(2, "daemon without an orchestrator");
    assert!(r.stderr.contains("--orchestrator"), "{}", r.stderr);

    let log = dir.path().join("daemon.log");
    let mut cmd = a.reprise(&["daemon"]);
    with_orchestrator(&mut cmd, &addr, &alice);
    cmd.stderr(fs::File::create(&log).expect("log"));
    let mut daemon = Killed(cmd.spawn().expect("daemon starts"));
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || read_log()
            .contains("serving 1 result(s) to peers as alice")),
        "the daemon connects and announces the store:\n{}",
        read_log()
    );
    let status = Run::from(a.reprise(&["daemon", "status"]).output().expect("status"));
    status.expect_code(0, "daemon status");
    assert!(
        status.stdout.contains("connected as alice, 1 result(s)"),
        "{}",
        status.stdout
    );
    // One daemon per store.
    let mut cmd = a.reprise(&["daemon"]);
    with_orchestrator(&mut cmd, &addr, &alice);
    let second = Run::from(cmd.output().expect("second daemon"));
    second.expect_code(2, "a second daemon for the same store");
    assert!(
        second.stderr.contains("already serves the store"),
        "{}",
        second.stderr
    );

    // B, another clone with its own store, replays from the daemon.
    let b = clone_of(&a);
    let mut cmd = b.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, &addr, &ci);
    let replay = Run::from(cmd.output().expect("reprise run"));
    replay.expect_code(0, "B replays from the daemon");
    assert!(!replay.booted(), "{}", replay.stderr);
    assert!(
        replay.stderr.contains("from peer 'alice'"),
        "{}",
        replay.stderr
    );
    assert_eq!(replay.stdout_bytes, first_stdout);

    // The orchestrator restarts: the daemon notices, reconnects with
    // backoff, and announces its store again.
    drop(server);
    assert!(
        wait_until(Duration::from_secs(30), || read_log()
            .contains("orchestrator connection was lost")),
        "{}",
        read_log()
    );
    let _server = serve_on(state_s, &addr);
    assert!(
        wait_until(Duration::from_secs(60), || read_log()
            .contains("reconnected; serving 1 result(s)")),
        "{}",
        read_log()
    );

    // A new result in A's store, handed over by `reprise run` (here a
    // local replay, so no VM): the daemon announces it at once, and the
    // run returns instead of staying connected.
    a.write("extra.txt", "another tree\n")
        .commit("another tree");
    let second_stdout = fabricate_result(&a, "second result");
    let mut cmd = a.reprise(&["run"]);
    with_orchestrator(&mut cmd, &addr, &alice);
    let handed = Run::from(cmd.output().expect("reprise run"));
    handed.expect_code(0, "A replays locally and hands over");
    assert!(
        handed
            .stderr
            .contains("handed the result to the reprise daemon, which serves it (connected as alice, 2 result(s)"),
        "{}",
        handed.stderr
    );
    let c = clone_of(&a);
    let mut cmd = c.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, &addr, &ci);
    let replay = Run::from(cmd.output().expect("reprise run"));
    replay.expect_code(0, "C replays the handed-over result");
    assert!(
        replay.stderr.contains("from peer 'alice'"),
        "{}",
        replay.stderr
    );
    assert_eq!(replay.stdout_bytes, second_stdout);

    // SIGTERM stops it and removes its socket.
    nix_kill(daemon.0.id(), "TERM");
    assert!(wait_until(Duration::from_secs(20), || daemon
        .0
        .try_wait()
        .ok()
        .flatten()
        .is_some()));
    assert!(!a.data().join("reprise/daemon.sock").exists());
    let status = Run::from(a.reprise(&["daemon", "status"]).output().expect("status"));
    status.expect_code(1, "no daemon any more");
}

fn nix_kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid}");
}
