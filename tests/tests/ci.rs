//! `reprise run` in a CI job: CI mode (`CI=true`) replays only what counts
//! for CI, never stays connected, and ends with a summary (text, JSON,
//! GitHub's job summary); `--mode replay-only` fails without a counting
//! result; `--mode verify` runs a replayed result's tests again and catches
//! a producer whose result they contradict. Real orchestrator, real QUIC,
//! results committed as a real run would (the verify run uses the podman
//! driver, no VM).

#[expect(
    dead_code,
    reason = "the support module is shared with run.rs; this file uses part of it"
)]
mod run_support;
#[expect(
    dead_code,
    reason = "the support module is shared with trust.rs; this file uses part of it"
)]
mod team_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reprise_protocol::exit as code;
use run_support::{Run, Sandbox, vm_lock, wait_until};
use team_support::{
    Killed, Team, clone_of, fabricate_result, fabricate_result_for, free_udp_port, issue,
    namespace, serve_logged, serving_daemon, with_orchestrator,
};

/// `reprise ARGS` in `s` as a CI job of `creds` on `addr`, which must
/// return by itself (CI mode never stays connected) within `limit`.
fn ci_job(s: &Sandbox, args: &[&str], addr: &str, creds: &Path, limit: Duration) -> Run {
    let mut cmd = s.reprise(args);
    with_orchestrator(&mut cmd, addr, creds);
    cmd.env("CI", "true")
        .env("GITHUB_STEP_SUMMARY", s.dir.path().join("step-summary.md"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("reprise starts");
    let returned = wait_until(limit, || child.try_wait().is_ok_and(|s| s.is_some()));
    if !returned {
        let _ = child.kill();
    }
    let run = Run::from(child.wait_with_output().expect("reprise output"));
    assert!(
        returned,
        "a CI job returns by itself: reprise {args:?}\n{}",
        run.stderr
    );
    run
}

fn report(s: &Sandbox) -> serde_json::Value {
    let text = fs::read_to_string(s.dir.path().join("report.json")).expect("the report");
    serde_json::from_str(&text).expect("the report is JSON")
}

/// A team whose orchestrator serves on loopback (its log in `log`), and
/// whose trusted `alice` holds a result of HEAD of `team.a` (after
/// `change`; the key of driver class `driver`) that her daemon serves.
struct Served {
    team: Team,
    addr: String,
    log: PathBuf,
    _orchestrator: Killed,
    _daemon: Killed,
}

fn alice_serves(change: impl FnOnce(&Sandbox), driver: &str, text: &str) -> Served {
    let team = Team::new();
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let log = team.dir.path().join("orchestrator.log");
    let orchestrator = serve_logged(&team.state, &addr, &log);
    change(&team.a);
    fabricate_result_for(&team.a, text, Some(&team.alice), driver);
    let (daemon, _) = serving_daemon(
        &team.a,
        &addr,
        &team.alice,
        &team.dir.path().join("daemon.log"),
    );
    Served {
        team,
        addr,
        log,
        _orchestrator: orchestrator,
        _daemon: daemon,
    }
}

#[test]
fn a_ci_job_replays_what_counts_says_why_and_returns() {
    // alice (trusted) produced the result of HEAD; her daemon serves it.
    let served = alice_serves(|_| {}, "qemu", "hello from alice");
    let (team, addr) = (&served.team, &served.addr);

    // The CI job: a clone, its own credentials (`ci`, granted the
    // repository, not trusted: its own runs would not count).
    let job = clone_of(&team.a);
    let report_path = job.dir.path().join("report.json");
    let run = ci_job(
        &job,
        &["run", "--report", report_path.to_str().expect("utf-8")],
        addr,
        &team.ci,
        Duration::from_secs(60),
    );
    run.expect_code(code::SUCCESS, "CI replay");
    assert!(run.replayed() && !run.ran_here(), "{}", run.stderr);
    assert_eq!(run.stdout, "hello from alice\n");
    assert!(
        run.stderr.contains("reprise: summary\n")
            && run.stderr.contains("counts    yes: alice is trusted for"),
        "{}",
        run.stderr
    );
    let r = report(&job);
    assert_eq!(r["how"], "replayed", "{r}");
    assert_eq!(r["source"]["from"], "orchestrator", "{r}");
    assert_eq!(r["source"]["producer"], "alice", "{r}");
    assert_eq!(r["source"]["counts"]["answer"], "yes", "{r}");
    assert_eq!(r["result"]["isolation"], "tcg", "{r}");
    let md = fs::read_to_string(job.dir.path().join("step-summary.md")).expect("job summary");
    assert!(
        md.contains("### Reprise") && md.contains("| counts | yes: alice is trusted"),
        "{md}"
    );

    // The same job again: now the result is in the job's own store, and
    // it is replayed because the orchestrator says it counts.
    let again = ci_job(&job, &["run"], addr, &team.ci, Duration::from_secs(60));
    again.expect_code(code::SUCCESS, "CI local replay");
    assert!(
        again.stderr.contains("from the local store") && again.stderr.contains("counts for CI:"),
        "{}",
        again.stderr
    );

    // A new commit of which only an unsealed local result exists (made on
    // this machine without credentials): it does not count, and
    // replay-only fails fast, saying what would produce one.
    job.write("NOTES", "a change\n").commit("a change");
    fabricate_result(&job, "made here", None);
    let commit = job.git(&["rev-parse", "HEAD"]);
    let only = ci_job(
        &job,
        &["run", "--mode", "replay-only"],
        addr,
        &team.ci,
        Duration::from_secs(60),
    );
    only.expect_code(code::NOT_COUNTED, "replay-only without a counting result");
    assert!(
        !only.ran_here() && only.stdout.is_empty(),
        "{}",
        only.stderr
    );
    assert!(
        only.stderr
            .contains(&format!("reprise run --rev {commit} --target test"))
            && only.stderr.contains("does not count"),
        "{}",
        only.stderr
    );
    // Outside CI (a developer's run) the local result replays as always.
    let mut dev = job.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut dev, addr, &team.ci);
    let dev = Run::from(dev.output().expect("reprise"));
    dev.expect_code(code::SUCCESS, "developer replay");
    assert_eq!(dev.stdout, "made here\n");
    let bad = job.run(&["run", "--mode", "replay-or-run", "--sample", "0.5"]);
    bad.expect_code(code::USAGE, "--sample without verify");
}

#[test]
fn verify_catches_a_producer_whose_result_the_tests_contradict() {
    // The tests of HEAD fail, yet alice (trusted) announces a pass.
    let broken = |a: &Sandbox| {
        a.write("greet.sh", "#!/bin/sh\necho \"goodbye, $1\"\n")
            .commit("a broken greeting");
    };
    let served = alice_serves(broken, "podman", "all good, trust me");
    let (team, addr, log) = (&served.team, &served.addr, &served.log);
    // A trusted CI identity verifies every replay (sample 1).
    let ci_bot = team.dir.path().join("ci-bot.pem");
    issue(&team.state, "ci-bot", &[&namespace(&team.a)], true, &ci_bot);
    let job = clone_of(&team.a);
    let report_path = job.dir.path().join("report.json");
    let _vm = vm_lock();
    let run = ci_job(
        &job,
        &[
            "run",
            "--driver",
            "podman",
            "--mode",
            "verify",
            "--sample",
            "1",
            "--report",
            report_path.to_str().expect("utf-8"),
        ],
        addr,
        &ci_bot,
        Duration::from_secs(300),
    );
    run.expect_code(code::MISMATCH, "verify against a lying producer");
    assert!(run.replayed() && run.ran_here(), "{}", run.stderr);
    assert!(
        run.stderr.contains("verify failed: the replayed result")
            && run
                .stderr
                .contains("of alice says Passed (exit 0), and here the tests Failed")
            && run.stderr.contains("reported to the orchestrator"),
        "{}",
        run.stderr
    );
    let r = report(&job);
    assert_eq!(r["how"], "verified", "{r}");
    assert!(r["verify"]["mismatch"].is_string(), "{r}");
    assert_eq!(r["exit_code"], code::MISMATCH, "{r}");
    // The orchestrator recorded the disagreement against alice.
    let logged = || fs::read_to_string(log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || logged()
            .contains("trusted producers disagree")),
        "{}",
        logged()
    );
    assert!(
        logged().contains("alice") && logged().contains("ci-bot"),
        "{}",
        logged()
    );
    // The next job is told the producers disagree, and nothing counts.
    let next = clone_of(&team.a);
    let run = ci_job(
        &next,
        &["run", "--driver", "podman", "--mode", "replay-only"],
        addr,
        &team.ci,
        Duration::from_secs(60),
    );
    run.expect_code(code::NOT_COUNTED, "nothing counts during a conflict");
    assert!(
        run.stderr.contains("trusted producers disagree on result")
            && run.stderr.contains("alice")
            && run.stderr.contains("ci-bot"),
        "{}",
        run.stderr
    );
    assert!(!run.replayed(), "{}", run.stderr);
}

#[test]
fn the_shell_stub_runs_only_a_pinned_executor_and_replays_what_counts() {
    let served = alice_serves(|_| {}, "qemu", "hello from alice");
    let (team, addr) = (&served.team, &served.addr);
    // A release archive of the binaries under test, as scripts/release.sh
    // makes it, served from a file:// mirror.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let archive = team.dir.path().join("reprise.tar.gz");
    let made = std::process::Command::new("bash")
        .arg(root.join("scripts/release.sh"))
        .arg(&archive)
        // Debug binaries are large: compress fast.
        .env("GZIP_LEVEL", "1")
        .env(
            "PROFILE_DIR",
            run_support::reprise_bin().parent().expect("bin dir"),
        )
        .output()
        .expect("release.sh");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let sha256 = String::from_utf8_lossy(&made.stdout).trim().to_string();
    assert_eq!(sha256.len(), 64, "{sha256}");

    let job = clone_of(&team.a);
    let stub = |sha: &str, vars: &str| {
        let env = job.reprise(&[]);
        let out = std::process::Command::new("sh")
            .arg(root.join("shims/ci.sh"))
            .current_dir(job.repo())
            .envs(
                env.get_envs()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
            )
            .env_remove("CI")
            .env("XDG_CACHE_HOME", job.dir.path().join("cache"))
            .env("REPRISE_URL", format!("file://{}", archive.display()))
            .env("REPRISE_SHA256", sha)
            .env("REPRISE_VARS", vars)
            .env("REPRISE_REPORT", job.dir.path().join("report.json"))
            .env("REPRISE_ORCHESTRATOR", addr)
            .env("REPRISE_CREDENTIALS", &team.ci)
            .stdin(Stdio::null())
            .output()
            .expect("ci.sh");
        Run::from(out)
    };
    // A different sha256: the download is not run, nothing is reported.
    let wrong = stub(&"0".repeat(64), "");
    wrong.expect_code(code::INFRA, "a download whose sha256 differs");
    assert!(wrong.stderr.contains("not running it"), "{}", wrong.stderr);
    assert!(!job.dir.path().join("report.json").exists());
    let bad = stub(&sha256, "NOT-A-PAIR");
    bad.expect_code(code::USAGE, "REPRISE_VARS without =");
    // The pinned one: CI mode, replayed from alice through the orchestrator.
    let run = stub(&sha256, "");
    run.expect_code(code::SUCCESS, "ci.sh");
    assert!(run.replayed(), "{}", run.stderr);
    assert_eq!(run.stdout, "hello from alice\n");
    assert!(run.stderr.contains("reprise: summary"), "{}", run.stderr);
    let r = report(&job);
    assert_eq!(r["source"]["counts"]["answer"], "yes", "{r}");
    assert_eq!(r["mode"], "replay-or-run", "{r}");
}
