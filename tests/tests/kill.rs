//! The kill matrix: `reprise` is killed with SIGKILL at each phase of a
//! run, of a fetch and of a replay, and a producer while it serves. After
//! each kill the store verifies (`results verify` quarantines nothing),
//! nothing of the killed command is stored, replayed or served, no work
//! folder of a dead owner is left once the next command has started, and
//! the next run succeeds.
//!
//! Phases inside the guest are reached by watching the run's output (a VM
//! in the process tree, a phase announced, the tests' own output); phases
//! that pass in milliseconds by `REPRISE_PAUSE_AT` (`executor/src/faults.rs`),
//! which makes the command wait there to be killed.
//!
//! "Left behind" covers every work folder of a dead owner (the run's, the
//! VM's, a fetch's staging, a snapshot generation or saved guest being
//! made) and the OS container of a killed podman-driver run.

#[expect(
    dead_code,
    reason = "the support module is shared with run.rs; this file uses part of it"
)]
mod run_support;
#[expect(
    dead_code,
    reason = "the support module is shared with peer.rs; this file uses part of it"
)]
mod team_support;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use run_support::{Run, Sandbox, alive, children_named, example_hello, vm_lock, wait_until};
use team_support::{Team, clone_of, free_udp_port, serve_logged, with_orchestrator};

/// A command started in the background, its output in files.
struct Started {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// The commands started in the background so far: their `TMPDIR` (which
/// names the sandbox) and pid, so what a killed one left (its OS container
/// is named by its pid) is told apart from another test's.
static STARTED: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());

impl Started {
    fn new(mut cmd: Command, dir: &Path, name: &str) -> Started {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = cmd
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("reprise starts");
        let tmpdir = cmd
            .get_envs()
            .find(|(k, _)| *k == "TMPDIR")
            .and_then(|(_, v)| v)
            .map(PathBuf::from)
            .unwrap_or_default();
        STARTED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((tmpdir, child.id()));
        Started {
            child,
            stdout,
            stderr,
        }
    }

    fn out(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn err(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until `reached` holds of (stdout, stderr), then SIGKILLs the
    /// command and reaps it. Panics if it ends or never gets there.
    fn kill_when(mut self, what: &str, mut reached: impl FnMut(&str, &str) -> bool) -> String {
        let got_there = wait_until(Duration::from_secs(300), || {
            reached(&self.out(), &self.err()) || self.child.try_wait().ok().flatten().is_some()
        });
        let ended = self.child.try_wait().ok().flatten();
        if !got_there || ended.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{what}: never reached ({ended:?}):\n--- stdout\n{}\n--- stderr\n{}",
                self.out(),
                self.err()
            );
        }
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
        self.err()
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `reprise` with the sandbox's own temporary folder, so what a killed run
/// leaves there is this test's to see.
fn reprise(s: &Sandbox, args: &[&str]) -> Command {
    let mut cmd = s.reprise(args);
    cmd.env("TMPDIR", tmp(s));
    cmd
}

fn tmp(s: &Sandbox) -> PathBuf {
    let t = s.dir.path().join("tmp");
    fs::create_dir_all(&t).expect("tmp");
    t
}

/// The folders in `dir`.
fn folders(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// The cache the sandboxes share (the base image, snapshots, VMs).
fn reprise_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache"))
        .join("reprise")
}

/// Where the snapshot caches stage: the folders and the name prefix.
fn snapshot_stage_places(cache: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut places = Vec::new();
    for snapshots in [cache.join("snapshots"), cache.join("snapshots-podman")] {
        for repo in folders(&snapshots) {
            places.push((repo, ".stage-"));
        }
        places.push((snapshots, ".stage-"));
    }
    places
}

/// The pid a work folder's `.owner` file names.
fn owner_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path.join(".owner"))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
}

/// The snapshot stages whose owner is the process `pid`.
fn stages_owned_by(pid: u32) -> Vec<PathBuf> {
    snapshot_stage_places(&reprise_cache())
        .into_iter()
        .flat_map(|(dir, prefix)| {
            folders(&dir).into_iter().filter(move |p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
        })
        .filter(|p| owner_pid(p) == Some(pid))
        .collect()
}

/// Every work folder whose owner is gone, in the places commands make
/// them (a snapshot generation or a saved guest is made in a `.stage-*`
/// folder beside the others), and every OS container of a command of
/// this sandbox that is dead (`podman ps -a`, named
/// `reprise-run-<pid>-<key>`).
fn abandoned(s: &Sandbox) -> Vec<PathBuf> {
    let cache = reprise_cache();
    let mut places = vec![
        (tmp(s), "reprise-work-"),
        (cache.join("vms"), "vm-"),
        (PathBuf::from("/tmp"), "reprise-vm-"),
        (PathBuf::from("/tmp"), "reprise-net-"),
        (s.store().join("tmp"), ""),
        (cache.join("saved-guests"), ".stage-"),
    ];
    places.extend(snapshot_stage_places(&cache));
    // The cache is shared with the other tests running meanwhile: a
    // command another sandbox killed left its folders for that test's
    // next command to sweep and that test to check, not this one.
    let others: Vec<u32> = STARTED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(tmpdir, _)| *tmpdir != tmp(s))
        .map(|(_, pid)| *pid)
        .collect();
    let mut out = Vec::new();
    for (dir, prefix) in places {
        for path in folders(&dir) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(prefix)
                && reprise_executor::workdir::abandoned(&path)
                && !owner_pid(&path).is_some_and(|pid| others.contains(&pid))
            {
                out.push(path);
            }
        }
    }
    let dead: Vec<u32> = STARTED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(tmpdir, pid)| *tmpdir == tmp(s) && !alive(*pid))
        .map(|(_, pid)| *pid)
        .collect();
    for name in os_containers() {
        let pid = name
            .strip_prefix("reprise-run-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|pid| dead.contains(&pid)) {
            out.push(PathBuf::from(format!("podman container {name}")));
        }
    }
    out
}

/// The names of the podman driver's OS containers on this host, running
/// or not.
fn os_containers() -> Vec<String> {
    let out = Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            "name=reprise-run-",
            "--format",
            "{{.Names}}",
        ])
        .output()
        .expect("podman runs");
    assert!(
        out.status.success(),
        "podman ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// What must hold after a kill: the next command (`results verify`)
/// removes what the killed one left, finds the store sound, and nothing of
/// the killed run is stored.
fn after_kill(s: &Sandbox, what: &str, stored_before: usize) {
    let verify = Run::from(reprise(s, &["results", "verify"]).output().expect("verify"));
    verify.expect_code(0, &format!("{what}: results verify"));
    assert!(
        verify.stdout.contains(", 0 quarantined"),
        "{what}: {}",
        verify.stdout
    );
    assert_eq!(
        abandoned(s),
        Vec::<PathBuf>::new(),
        "{what}: work folders of dead owners after the next command"
    );
    assert_eq!(
        s.results_list().len(),
        stored_before,
        "{what}: the killed command stored nothing"
    );
}

/// Whether the sandbox's temporary folder holds a run's work folder now.
fn has_work_folder(s: &Sandbox) -> bool {
    fs::read_dir(tmp(s))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("reprise-work-"))
}

#[test]
fn a_run_killed_in_the_vm_at_any_phase_leaves_nothing_and_the_next_run_passes() {
    let _vm = vm_lock();
    let s = Sandbox::new();
    s.copy_from(&example_hello()).git_init().commit("hello");

    // Restore or boot: qemu has started, the guest is not up yet.
    let run = Started::new(reprise(&s, &["run", "--no-serve"]), s.dir.path(), "boot");
    let pid = run.child.id();
    let mut qemus = Vec::new();
    let err = run.kill_when("boot", |_, err| {
        qemus = children_named(pid, "qemu-system");
        !qemus.is_empty() && !err.contains(" done in ")
    });
    assert!(has_work_folder(&s), "the killed run had a work folder");
    assert!(
        wait_until(Duration::from_secs(10), || !qemus.iter().any(|q| alive(*q))),
        "qemu outlived the killed run:\n{err}"
    );
    after_kill(&s, "killed while booting", 0);

    // prepare-runtime, in the guest, which has the network: passt must go
    // with the run too. (This passed before passt got `--one-off`; the
    // unit test in `vm/net.rs` is the one that shows why it needs it.)
    let run = Started::new(reprise(&s, &["run", "--no-serve"]), s.dir.path(), "prepare");
    let pid = run.child.id();
    let (mut passts, mut qemus) = (Vec::new(), Vec::new());
    let err = run.kill_when("prepare-runtime", |_, err| {
        passts = children_named(pid, "passt");
        qemus = children_named(pid, "qemu-system");
        (err.contains("restore done") || err.contains("boot done"))
            && !err.contains("prepare-runtime done")
    });
    assert!(
        !passts.is_empty() && !qemus.is_empty(),
        "the killed run had its passt and qemu:\n{err}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            !passts.iter().chain(&qemus).any(|p| alive(*p))
        }),
        "passt or qemu outlived the run killed in prepare-runtime:\n{err}"
    );
    after_kill(&s, "killed in prepare-runtime", 0);

    // The tests, in the container.
    let test_sh = fs::read_to_string(s.repo().join("test.sh")).expect("test.sh");
    s.write("test.sh", &format!("echo sleeping\nsleep 120\n{test_sh}"))
        .commit("slow tests");
    let run = Started::new(reprise(&s, &["run", "--no-serve"]), s.dir.path(), "test");
    run.kill_when("test", |out, _| out.contains("sleeping"));
    after_kill(&s, "killed in the tests", 0);

    // The next run, of the same tree as the first kills, passes and
    // leaves nothing behind; a second one replays it.
    s.write("test.sh", &test_sh).commit("quick tests");
    let next = Run::from(reprise(&s, &["run", "--no-serve"]).output().expect("run"));
    next.expect_code(0, "the run after the kills");
    assert!(!next.replayed(), "{}", next.stderr);
    assert_eq!(abandoned(&s), Vec::<PathBuf>::new(), "after the good run");
    let again = Run::from(reprise(&s, &["run", "--no-serve"]).output().expect("run"));
    again.expect_code(0, "its replay");
    assert!(again.replayed(), "{}", again.stderr);
}

#[test]
fn a_podman_run_killed_in_its_tests_or_while_collecting_or_committing_leaves_nothing() {
    let s = Sandbox::new();
    s.copy_from(&example_hello()).git_init().commit("hello");

    // In the tests: the OS container runs, and the repository's snapshot
    // is being made in a `.stage-*` folder (regression: both were left
    // for ever).
    let test_sh = fs::read_to_string(s.repo().join("test.sh")).expect("test.sh");
    s.write("test.sh", &format!("echo sleeping\nsleep 120\n{test_sh}"))
        .commit("slow tests");
    let run = Started::new(
        reprise(&s, &["run", "--no-serve", "--driver", "podman"]),
        s.dir.path(),
        "podman-test",
    );
    let pid = run.child.id();
    // Seen while the run lives: once it is killed, another test's command
    // may sweep the shared cache's abandoned stages before this one looks.
    let mut staged = Vec::new();
    run.kill_when("podman test", |out, _| {
        out.contains("sleeping") && {
            staged = stages_owned_by(pid);
            true
        }
    });
    let container = format!("reprise-run-{pid}-");
    assert!(
        os_containers().iter().any(|n| n.starts_with(&container)),
        "the killed run's OS container is there until the next command: {:?}",
        os_containers()
    );
    assert!(
        staged
            .iter()
            .any(|p| p.to_string_lossy().contains("/snapshots-podman/")),
        "the run in its tests stages the repository's snapshot: {staged:?}"
    );
    after_kill(&s, "podman run killed in the tests", 0);
    s.write("test.sh", &test_sh).commit("quick tests");

    for point in ["collect", "commit"] {
        let mut cmd = reprise(&s, &["run", "--no-serve", "--driver", "podman"]);
        cmd.env("REPRISE_PAUSE_AT", point);
        let run = Started::new(cmd, s.dir.path(), point);
        run.kill_when(point, |_, err| {
            err.contains(&format!("reprise: paused at {point}"))
        });
        assert!(has_work_folder(&s), "{point}: the killed run's work folder");
        after_kill(&s, &format!("killed at {point}"), 0);
        // The artifacts folder got nothing of it.
        assert!(
            !s.repo().join("reprise-artifacts/report.txt").exists(),
            "{point}: an artifact of a killed run was restored"
        );
    }
    let next = Run::from(
        reprise(&s, &["run", "--no-serve", "--driver", "podman"])
            .output()
            .expect("run"),
    );
    next.expect_code(0, "the run after the kills");
    assert!(!next.replayed(), "{}", next.stderr);
    assert_eq!(s.results_list().len(), 1);
    assert_eq!(abandoned(&s), Vec::<PathBuf>::new(), "after the good run");
}

#[test]
fn fetches_replays_and_producers_killed_midway_leave_nothing_half_received() {
    let team = Team::new();
    let a = &team.a;
    // Three artifacts, so a transfer and a replay have a middle.
    let test_sh = fs::read_to_string(a.repo().join("test.sh")).expect("test.sh");
    a.write(
        "test.sh",
        &format!(
            "{test_sh}mkdir -p more\nhead -c 3000000 /dev/urandom > more/one.bin\nhead -c 3000000 /dev/urandom > more/two.bin\n"
        ),
    )
    .write(
        "reprise.toml",
        "artifacts = [\"report.txt\", \"more/one.bin\", \"more/two.bin\"]\n",
    )
    .commit("three artifacts");
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_logged(&team.state, &addr, &team.dir.path().join("orch.log"));
    let as_ = |s: &Sandbox, args: &[&str], creds: &Path| {
        let mut cmd = reprise(s, args);
        with_orchestrator(&mut cmd, &addr, creds);
        cmd
    };
    let made = Run::from(
        as_(a, &["run", "--no-serve", "--driver", "podman"], &team.alice)
            .output()
            .expect("run"),
    );
    made.expect_code(0, "alice's run");
    let daemon = |pause: Option<&str>, name: &str| {
        let mut cmd = as_(a, &["daemon"], &team.alice);
        if let Some(p) = pause {
            cmd.env("REPRISE_PAUSE_AT", p);
        }
        let d = Started::new(cmd, team.dir.path(), name);
        assert!(
            wait_until(Duration::from_secs(30), || d
                .err()
                .contains("serving 1 result(s)")),
            "{name}: {}",
            d.err()
        );
        d
    };

    // The daemon, killed while it serves; the next one serves again.
    let d = daemon(None, "daemon-1");
    d.kill_when("a serving daemon", |_, _| true);
    after_kill(a, "the daemon killed while serving", 1);

    // A consumer killed in the middle of receiving: nothing is committed
    // (what it checked stays in its partial folder, for the next fetch to
    // resume; no sweep takes it for an abandoned work folder).
    let d = daemon(None, "daemon-2");
    let b = clone_of(a);
    let mut cmd = as_(&b, &["run", "--no-serve", "--driver", "podman"], &team.ci);
    cmd.env("REPRISE_PAUSE_AT", "fetch");
    Started::new(cmd, b.dir.path(), "fetch")
        .kill_when("fetch", |_, err| err.contains("reprise: paused at fetch"));
    assert!(
        fs::read_dir(b.store().join("tmp"))
            .into_iter()
            .flatten()
            .count()
            > 0,
        "the killed fetch had a staging folder"
    );
    after_kill(&b, "killed while fetching", 0);
    let partials = fs::read_dir(b.store().join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("partial-"))
        .count();
    assert_eq!(partials, 1, "the killed fetch's checked chunks are kept");
    drop(d);

    // The producer killed in the middle of sending: the consumer takes
    // nothing of it and runs the tests itself.
    let d = daemon(Some("serve"), "daemon-3");
    let consumer = Started::new(
        as_(&b, &["run", "--no-serve", "--driver", "podman"], &team.ci),
        b.dir.path(),
        "consumer",
    );
    let d_err = d.stderr.clone();
    let paused = wait_until(Duration::from_secs(60), || {
        fs::read_to_string(&d_err)
            .unwrap_or_default()
            .contains("reprise: paused at serve")
    });
    assert!(paused, "the producer never paused: {}", consumer.err());
    d.kill_when("the producer mid-transfer", |_, _| true);
    let mut consumer = consumer;
    let status = consumer.child.wait().expect("consumer ends");
    let said = consumer.err();
    assert_eq!(status.code(), Some(0), "the consumer's run:\n{said}");
    assert!(
        !said.contains("reprise: replayed result"),
        "a half-sent result was replayed:\n{said}"
    );
    after_kill(&b, "its producer killed mid-transfer", 1);
    after_kill(a, "killed mid-transfer", 1);

    // The producer back: a new consumer replays its whole result, then is
    // killed in the middle of restoring it from its own store.
    let _d = daemon(None, "daemon-4");
    let c = clone_of(a);
    let fetched = Run::from(
        as_(&c, &["run", "--no-serve", "--driver", "podman"], &team.ci)
            .output()
            .expect("run"),
    );
    fetched.expect_code(0, "a replay from the producer");
    assert!(fetched.replayed(), "{}", fetched.stderr);
    let arts = c.repo().join("reprise-artifacts");
    let whole: Vec<Vec<u8>> = ["report.txt", "more/one.bin", "more/two.bin"]
        .iter()
        .map(|p| fs::read(arts.join(p)).expect("restored artifact"))
        .collect();
    fs::remove_dir_all(&arts).expect("clear artifacts");
    let mut cmd = as_(&c, &["run", "--no-serve", "--driver", "podman"], &team.ci);
    cmd.env("REPRISE_PAUSE_AT", "replay");
    Started::new(cmd, c.dir.path(), "replay")
        .kill_when("replay", |_, err| err.contains("reprise: paused at replay"));
    let mut pending = Vec::new();
    run_support::walk(&arts, &mut pending);
    assert!(
        pending
            .iter()
            .any(|p| p.to_string_lossy().contains(".reprise-tmp-")),
        "the killed replay had files pending: {pending:?}"
    );
    after_kill(&c, "killed while replaying", 1);
    let again = Run::from(
        as_(&c, &["run", "--no-serve", "--driver", "podman"], &team.ci)
            .output()
            .expect("run"),
    );
    again.expect_code(0, "the replay after the kill");
    assert!(again.replayed(), "{}", again.stderr);
    let mut files = Vec::new();
    run_support::walk(&arts, &mut files);
    files.sort();
    assert_eq!(
        files,
        ["more/one.bin", "more/two.bin", "report.txt"]
            .iter()
            .map(|p| arts.join(p))
            .collect::<Vec<_>>(),
        "the artifacts and nothing pending"
    );
    for (p, bytes) in ["report.txt", "more/one.bin", "more/two.bin"]
        .iter()
        .zip(&whole)
    {
        assert_eq!(&fs::read(arts.join(p)).expect("artifact"), bytes, "{p}");
    }
}

#[test]
fn a_damaged_result_is_quarantined_and_the_run_goes_on_as_a_miss() {
    let s = Sandbox::new();
    s.copy_from(&example_hello()).git_init().commit("hello");
    let podman = |s: &Sandbox| {
        Run::from(
            reprise(s, &["run", "--no-serve", "--driver", "podman"])
                .output()
                .expect("run"),
        )
    };
    podman(&s).expect_code(0, "the first run");
    // One flipped bit in the artifact's blob.
    let mut blobs = Vec::new();
    run_support::walk(&s.store().join("blobs"), &mut blobs);
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    let mut bytes = fs::read(&blobs[0]).expect("blob");
    bytes[0] ^= 1;
    fs::write(&blobs[0], &bytes).expect("damage the blob");

    let next = podman(&s);
    next.expect_code(0, "the run after the damage");
    let notes: Vec<&str> = next
        .stderr
        .lines()
        .filter(|l| l.contains("is damaged"))
        .collect();
    assert_eq!(notes.len(), 1, "one line says so:\n{}", next.stderr);
    assert!(
        notes[0].contains("quarantined in") && notes[0].contains("running as a miss"),
        "{}",
        notes[0]
    );
    assert!(!next.replayed(), "{}", next.stderr);
    assert_eq!(
        fs::read_to_string(s.repo().join("reprise-artifacts/report.txt")).unwrap_or_default(),
        "greet: 1 passed, 0 failed\n",
        "the artifact, from the new run"
    );
    let quarantine = s.store().join("quarantine");
    let aside: Vec<_> = fs::read_dir(&quarantine)
        .expect("a quarantine folder")
        .flatten()
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(
        fs::read_to_string(aside[0].path().join("reason.txt"))
            .unwrap_or_default()
            .contains("report.txt"),
        "the reason names the artifact"
    );

    // The new result's output record damaged: `results verify` finds it,
    // moves it aside, says so and exits 9; then the store is sound.
    let records: Vec<PathBuf> = fs::read_dir(s.store().join("results"))
        .expect("results")
        .flatten()
        .map(|e| e.path().join("output.rec"))
        .collect();
    assert_eq!(records.len(), 1);
    let mut rec = fs::read(&records[0]).expect("record");
    let last = rec.len() - 2;
    rec[last] ^= 0x20;
    fs::write(&records[0], &rec).expect("damage the record");
    let verify = Run::from(
        reprise(&s, &["results", "verify"])
            .output()
            .expect("verify"),
    );
    verify.expect_code(9, "results verify of a damaged store");
    assert!(
        verify.stdout.contains("quarantined ")
            && verify.stdout.contains("0 result(s) sound, 1 quarantined"),
        "{}",
        verify.stdout
    );
    assert_eq!(
        s.results_list(),
        Vec::<String>::new(),
        "nothing left to replay"
    );
    let verify = Run::from(
        reprise(&s, &["results", "verify"])
            .output()
            .expect("verify"),
    );
    verify.expect_code(0, "results verify of a sound store");
    podman(&s).expect_code(0, "a run after the quarantine");
}
