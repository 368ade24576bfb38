//! System test of replay through the orchestrator: a real orchestrator and
//! two executors with separate stores on loopback. Executor A runs the hello
//! example for real in a VM and stays connected serving it; executor B, on
//! another clone of the same commit, replays A's result without booting.

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
use std::path::Path;
use std::time::Duration;

use run_support::{Run, Sandbox, wait_until};
use team_support::{
    CHECKED_MKFILE, Killed, NOT_COUNTED, Team, clone_of, direct_daemon, fabricate_result,
    fabricate_result_with, free_udp_port, issue, namespace, nix_kill, orchestrator, serve_on,
    serving_daemon, with_orchestrator,
};

/// What the hello example's test target records on stdout.
const HELLO_STDOUT: &[u8] =
    b"sh ./test.sh\n\x1b[32mok\x1b[0m greet.sh says: hello, world\n1 passed, 0 failed\n";

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
            .contains("from producer 'alice' through the orchestrator"),
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
fn an_unreachable_orchestrator_is_a_notice_and_the_run_goes_on_without_it() {
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
    // A repository whose mkfile passes the check (made before any lookup),
    // run in replay-only mode: reaching "nothing counts" (exit 10) proves
    // the run went on past the lookup without the orchestrator, where a
    // replay-or-run would start the tests, and starts nothing.
    let s = Sandbox::new();
    s.git_init();
    s.write("mkfile", CHECKED_MKFILE).commit("one");
    let args = ["run", "--no-serve", "--mode", "replay-only"];
    let mut cmd = s.reprise(&args);
    with_orchestrator(&mut cmd, &format!("127.0.0.1:{}", free_udp_port()), &creds);
    let r = Run::from(cmd.output().expect("reprise run"));
    r.expect_code(NOT_COUNTED, "nothing counts, after the orchestrator notice");
    assert!(
        r.stderr.contains("cannot reach the orchestrator")
            && r.stderr.contains("running without it"),
        "a one-line notice:\n{}",
        r.stderr
    );
    // Credentials that cannot be read are a notice too.
    let mut cmd = s.reprise(&args);
    with_orchestrator(&mut cmd, "127.0.0.1:1", Path::new("/nonexistent.pem"));
    let r = Run::from(cmd.output().expect("reprise run"));
    r.expect_code(NOT_COUNTED, "bad credentials path");
    assert!(
        r.stderr.contains("cannot use the credentials"),
        "{}",
        r.stderr
    );
}

/// Regression (issue 10): a fetch that ran out of disk was refused with
/// "the disk is full", and nothing showed that the run then went on. Here
/// the asker's store is on a 1 MiB tmpfs and the offered result holds a
/// 3 MiB artifact; the run says "disk full", runs the tests itself (podman
/// driver, no VM) and keeps its own, smaller result.
#[test]
fn a_fetch_that_fills_the_disk_says_disk_full_and_the_run_goes_on() {
    let team = Team::new();
    let a = &team.a;
    let big = vec![7u8; 3 << 20];
    fabricate_result_with(
        a,
        "alice's",
        Some(&team.alice),
        "podman",
        &[("big.bin", &big)],
    );
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_on(&team.state, &addr);
    let (_daemon, said) = serving_daemon(a, &addr, &team.alice, &team.dir.path().join("a.log"));
    assert!(said.contains("serving 1 result(s)"), "{said}");

    let b = clone_of(a);
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(b.data())
        .output();
    if !mount.as_ref().is_ok_and(|o| o.status.success()) {
        // /proc/self belongs to this process's effective user.
        let root = std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").unwrap()) == 0;
        assert!(
            !root,
            "mounting a 1 MiB tmpfs failed as root (CI runs this as root, so it must not skip): {mount:?}"
        );
        eprintln!("skipped: mounting a tmpfs needs root, and this test does not run as root");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(b.data());

    let mut cmd = b.reprise(&["run", "--no-serve", "--driver", "podman"]);
    with_orchestrator(&mut cmd, &addr, &team.ci);
    let r = Run::from(cmd.output().expect("reprise run"));
    r.expect_code(0, "B runs the tests itself after the fetch ran out of disk");
    let notes: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("disk full"))
        .collect();
    assert_eq!(notes.len(), 1, "one line says so:\n{}", r.stderr);
    assert!(
        notes[0].contains("offered by alice") && notes[0].contains("running the tests here"),
        "{}",
        notes[0]
    );
    assert!(!r.replayed(), "{}", r.stderr);
    assert!(r.ran_here(), "{}", r.stderr);
    assert_eq!(
        fs::read_to_string(b.repo().join("reprise-artifacts/report.txt")).unwrap_or_default(),
        "greet: 1 passed, 0 failed\n",
        "B's own artifact"
    );
    assert!(
        !b.repo().join("reprise-artifacts/big.bin").exists(),
        "nothing of the fetched result was restored"
    );
    assert_eq!(b.results_list().len(), 1, "B's own result is stored");
    assert_eq!(
        fs::read_dir(b.store().join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "no staging is left"
    );
}

/// Regression of nothing: a transfer cut midway used to be thrown away
/// whole. Now the producer's daemon stops serving at chunk 4 of the result
/// (as if killed there); B's fetch is cut, keeps the chunks it checked,
/// and once the daemon is back the next run fetches only the rest.
#[test]
fn a_transfer_cut_midway_resumes_from_its_last_checked_chunk() {
    let team = Team::new();
    let a = &team.a;
    // Parts in order: the record (1 chunk), big.bin (8 chunks), report.txt.
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    fabricate_result_with(
        a,
        "alice's",
        Some(&team.alice),
        "podman",
        &[("big.bin", &big)],
    );
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_on(&team.state, &addr);
    let log = team.dir.path().join("a.log");
    let mut cmd = a.reprise(&["daemon"]);
    with_orchestrator(&mut cmd, &addr, &team.alice);
    cmd.env("REPRISE_TEST_STOP_SERVING_AT", "4")
        .stderr(fs::File::create(&log).expect("daemon log"));
    let daemon = Killed(cmd.spawn().expect("daemon"));
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || read_log().contains("serving")),
        "{}",
        read_log()
    );

    let b = clone_of(a);
    let replay = || {
        let mut cmd = b.reprise(&[
            "run",
            "--no-serve",
            "--driver",
            "podman",
            "--mode",
            "replay-only",
        ]);
        with_orchestrator(&mut cmd, &addr, &team.ci);
        Run::from(cmd.output().expect("reprise run"))
    };
    let cut = replay();
    cut.expect_code(
        NOT_COUNTED,
        "the cut fetch is refused, and replay-only runs nothing",
    );
    assert!(!cut.replayed(), "{}", cut.stderr);
    assert!(cut.stderr.contains("broke off"), "{}", cut.stderr);
    let partials: Vec<_> = fs::read_dir(b.store().join("tmp"))
        .expect("B's staging")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        partials.len() == 1 && partials[0].starts_with("partial-"),
        "{partials:?}"
    );
    assert!(b.results_list().is_empty(), "nothing committed");

    // The producer's daemon, killed and started again (telling it nothing).
    drop(daemon);
    let (_daemon, said) = serving_daemon(a, &addr, &team.alice, &team.dir.path().join("a2.log"));
    assert!(said.contains("serving 1 result(s)"), "{said}");
    let mut rest = None;
    for _ in 0..50 {
        let r = replay();
        if r.replayed() {
            rest = Some(r);
            break;
        }
        // The orchestrator may still offer the killed daemon's connection.
        std::thread::sleep(Duration::from_millis(200));
    }
    let rest = rest.expect("B replays once the producer is back");
    rest.expect_code(0, "B replays the resumed result");
    let note = rest
        .stderr
        .lines()
        .find(|l| l.contains("resumed a transfer that was cut"))
        .unwrap_or_else(|| panic!("the run says it resumed:\n{}", rest.stderr));
    let number = |after: &str| -> u64 {
        note.split(after)
            .next()
            .and_then(|t| t.split_whitespace().last())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{note}"))
    };
    let (kept, fetched) = (number(" bytes kept"), number(" bytes fetched"));
    let record_len = fs::metadata(
        a.store()
            .join("results")
            .join(
                fs::read_dir(a.store().join("results"))
                    .unwrap()
                    .next()
                    .unwrap()
                    .unwrap()
                    .file_name(),
            )
            .join("output.rec"),
    )
    .unwrap()
    .len();
    let report_len = "report of alice's\n".len() as u64;
    assert_eq!(kept, record_len + (3 << 20), "{note}");
    assert_eq!(
        fetched,
        (5 << 20) + report_len,
        "only the rest came: {note}"
    );
    assert_eq!(
        fs::read(b.repo().join("reprise-artifacts/big.bin")).expect("restored"),
        big,
        "byte-identical artifact"
    );
    assert_eq!(
        fs::read_dir(b.store().join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the partial became the result"
    );
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
    let first_stdout = fabricate_result(&a, "first result", Some(&alice));
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let server = serve_on(state_s, &addr);

    // Without an orchestrator configured, the daemon says what it needs.
    let r = Run::from(a.reprise(&["daemon"]).output().expect("daemon"));
    r.expect_code(2, "daemon without an orchestrator");
    assert!(r.stderr.contains("--orchestrator"), "{}", r.stderr);

    // The daemon takes direct fetches too (peers fetch straight from it).
    let log = dir.path().join("daemon.log");
    let (mut daemon, _) = direct_daemon(&a, &addr, &alice, &log);
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    assert!(
        read_log().contains("serving 1 result(s) to peers as alice"),
        "the daemon connects and announces the store:\n{}",
        read_log()
    );
    assert!(
        read_log()
            .contains("peers the orchestrator introduces fetch straight from here (127.0.0.1:"),
        "{}",
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
        replay.stderr.contains("from producer 'alice'")
            && replay
                .stderr
                .contains("straight from the executor holding it"),
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
    let second_stdout = fabricate_result(&a, "second result", Some(&alice));
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
    // Straight from the daemon again: it told the restarted orchestrator.
    assert!(
        replay.stderr.contains("from producer 'alice'")
            && replay
                .stderr
                .contains("straight from the executor holding it"),
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

/// A firewall rule dropping every packet of one protocol (`tcp`, `udp`)
/// to one port of this machine (`iptables`, as root; podman's
/// dependencies install it), removed again when dropped.
struct Filtered(&'static str, u16);

impl Filtered {
    fn port(protocol: &'static str, port: u16) -> Filtered {
        let filtered = Filtered(protocol, port);
        let out = filtered.iptables("-I").expect("iptables runs (as root)");
        assert!(
            out.status.success(),
            "a rule dropping {protocol} to port {port} (iptables, as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        filtered
    }

    fn iptables(&self, action: &str) -> std::io::Result<std::process::Output> {
        let (protocol, port) = (self.0, self.1.to_string());
        std::process::Command::new("iptables")
            .args([action, "OUTPUT", "-o", "lo", "-p", protocol])
            .args(["--dport", &port, "-j", "DROP"])
            .output()
    }
}

impl Drop for Filtered {
    fn drop(&mut self) {
        let _ = self.iptables("-D");
    }
}

#[test]
fn a_holder_whose_tcp_port_is_filtered_serves_over_quic_and_one_filtered_whole_through_the_relay() {
    let Team {
        dir,
        state,
        a,
        alice,
        ci,
    } = Team::new();
    let stdout = fabricate_result(&a, "served over QUIC", Some(&alice));
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_on(&state, &addr);
    let (_daemon, port) = direct_daemon(&a, &addr, &alice, &dir.path().join("daemon.log"));

    // Its TCP port filtered (packets dropped, as a firewall letting only
    // UDP through does): a connection neither succeeds nor is refused.
    let _tcp = Filtered::port("tcp", port);
    let tried = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    );
    assert!(
        tried
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "a filtered port does not answer: {tried:?}"
    );

    // B still fetches straight from the holder, over QUIC.
    let b = clone_of(&a);
    let mut cmd = b.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, &addr, &ci);
    cmd.env("REPRISE_LOG", "reprise_executor::link=debug");
    let replay = Run::from(cmd.output().expect("reprise run"));
    replay.expect_code(0, "B replays from the holder");
    assert!(
        replay
            .stderr
            .contains("straight from the executor holding it")
            && replay.stderr.contains("connected to the holder over QUIC")
            && !replay.stderr.contains("connected to the holder over TCP"),
        "{}",
        replay.stderr
    );
    assert_eq!(replay.stdout_bytes, stdout);

    // UDP filtered too, the holder cannot be reached at all: C gives the
    // direct path up and fetches through the orchestrator's relay, from
    // the same daemon.
    let _udp = Filtered::port("udp", port);
    let c = clone_of(&a);
    let mut cmd = c.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, &addr, &ci);
    cmd.env("REPRISE_LOG", "reprise_executor::link=info");
    let replay = Run::from(cmd.output().expect("reprise run"));
    replay.expect_code(0, "C replays through the relay");
    assert!(
        replay.stderr.contains("the direct fetch failed")
            && replay.stderr.contains("fetching through the orchestrator")
            && replay
                .stderr
                .contains("from producer 'alice' through the orchestrator")
            && !replay
                .stderr
                .contains("straight from the executor holding it"),
        "{}",
        replay.stderr
    );
    assert_eq!(replay.stdout_bytes, stdout);
}

#[test]
fn the_daemon_runs_a_scheduled_target_at_its_time_and_announces_its_result() {
    let Team { dir, state, .. } = Team::new();
    // A repository whose prepare-runtime schedules `lint` every minute.
    let s = Sandbox::new();
    s.write(
        "mkfile",
        "</usr/lib/reprise/ci.mk\n\
         CONTAINERIMAGE=localhost/scheduled-test\n\
         base-image:V:\n\
         \tif ! podman image exists $CONTAINERIMAGE; then\n\
         \t\troot=`mktemp -d`\n\
         \t\tmkdir -p $root/bin\n\
         \t\tcp /bin/busybox $root/bin/busybox\n\
         \t\tln -s busybox $root/bin/sh\n\
         \t\tln -s busybox $root/bin/echo\n\
         \t\ttar -C $root -c . | podman import - $CONTAINERIMAGE\n\
         \tfi\n\
         prepare-runtime:V:\n\
         \techo '* * * * * lint' > /var/run/ci/crontab\n\
         test:V:\n\
         \techo tests pass\n\
         lint:V:\n\
         \techo lint ran on schedule\n",
    )
    .git_init()
    .commit("scheduled lint");
    let run = s.run(&["run", "--no-serve", "--driver", "podman"]);
    run.expect_code(0, "the run that records the schedule");
    assert!(
        run.stderr
            .contains("1 scheduled target(s) of main recorded"),
        "{}",
        run.stderr
    );
    let listed = s.run(&["daemon", "schedule"]);
    assert!(
        listed.stdout.contains("lint") && listed.stdout.contains("* * * * *"),
        "{}",
        listed.stdout
    );
    // The daemon's identity is trusted for this repository (its results
    // count); another executor's may only look them up.
    let ns = namespace(&s);
    let scheduler = dir.path().join("scheduler.pem");
    issue(&state, "scheduler", &[&ns], true, &scheduler);
    let asker = dir.path().join("asker.pem");
    issue(&state, "asker", &[&ns], false, &asker);

    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_on(&state, &addr);
    let log = dir.path().join("daemon.log");
    let mut cmd = s.reprise(&["daemon"]);
    with_orchestrator(&mut cmd, &addr, &scheduler);
    cmd.stderr(fs::File::create(&log).expect("log"));
    let _daemon = Killed(cmd.spawn().expect("daemon starts"));
    let read_log = || fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(150), || read_log()
            .contains("scheduled lint of")
            && read_log().contains("ended with exit code")),
        "the scheduled target ran within a minute and a half:\n{}",
        read_log()
    );
    let text = read_log();
    assert!(text.contains("ended with exit code 0"), "{text}");
    assert!(
        text.contains("lint ran on schedule"),
        "its output is in the daemon log:\n{text}"
    );
    let listed = s.run(&["daemon", "schedule"]);
    assert!(
        listed.stdout.contains("(exit 0)"),
        "the last run is listed:\n{}",
        listed.stdout
    );
    assert!(
        s.results_list().iter().any(|l| l.contains(" lint ")),
        "the scheduled run's result is stored: {:?}",
        s.results_list()
    );
    // It was announced like any run's: a clone of the repository, with
    // its own store, replays it through the orchestrator (replay-only, so
    // a result that was not announced fails here instead of running).
    let b = clone_of(&s);
    let mut cmd = b.reprise(&[
        "run",
        "--no-serve",
        "--driver",
        "podman",
        "--target",
        "lint",
        "--mode",
        "replay-only",
    ]);
    with_orchestrator(&mut cmd, &addr, &asker);
    let replay = Run::from(cmd.output().expect("reprise run"));
    replay.expect_code(0, "a clone replays the scheduled run's result");
    assert!(replay.replayed() && !replay.ran_here(), "{}", replay.stderr);
    assert!(
        replay
            .stderr
            .contains("from producer 'scheduler' through the orchestrator"),
        "{}",
        replay.stderr
    );
    assert!(
        replay.stdout.contains("lint ran on schedule"),
        "{}",
        replay.stdout
    );
}
