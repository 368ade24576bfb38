//! Benchmark of `reprise run` and `reprise key`: replaying a large stored
//! result, computing the key of a 100,000-file repository beside a
//! 1,000-file one, and a trivial real run with each driver (qemu, podman,
//! dry-run) beside `podman run` of a similar image on the host. Prints
//! medians; asserts nothing about them.
//!
//! The second real runs come three ways, interleaved: restoring the saved
//! guest (today's path without a daemon), booted cold, and through a
//! `reprise daemon --warm` of the same store, whose warm guest each run
//! takes (the bench waits until the daemon says one is ready, as a
//! developer's next run would find it after the pause between runs).
//!
//! Also a real project's first and second real runs (six from PyPI,
//! `scripts/pypi-project.sh`; up to 3 second runs).
//!
//! Usage: `run_bench [--runs N] [--real-runs N] [--no-vm] [--no-real-project] [--no-cold-boot]`
//! (`--real-runs` counts the restored second runs; as many cold ones run
//! beside them). The `reprise`
//! binary (with `reprise-guest` and `mk`) is looked for next to this one:
//! build with `cargo build --workspace`. The base image cache is the
//! default one; results go to a temp store.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reprise_bench::{git, hello_repo, median, ms, secs, store_large_result};
use reprise_executor::pipeline;
use reprise_executor::store::Store;

const HOST_IMAGE: &str = "localhost/reprise-bench-busybox";
const PODMAN_FLAGS: &[&str] = &[
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=20000:20000",
    "--ulimit",
    "nproc=32768:32768",
];

struct Options {
    runs: usize,
    real_runs: usize,
    vm: bool,
    real_project: bool,
    cold_boot: bool,
}

const USAGE: &str =
    "usage: run_bench [--runs N] [--real-runs N] [--no-vm] [--no-real-project] [--no-cold-boot]";

fn options() -> Options {
    let mut o = Options {
        runs: 7,
        real_runs: 6,
        vm: true,
        real_project: true,
        cold_boot: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = || -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| reprise_bench::value_exit(&a, "a number", USAGE))
        };
        match a.as_str() {
            "--runs" => o.runs = number().max(1),
            "--real-runs" => o.real_runs = number().max(1),
            "--no-vm" => o.vm = false,
            "--no-real-project" => o.real_project = false,
            "--no-cold-boot" => o.cold_boot = false,
            _ => reprise_bench::usage_exit(&a, USAGE),
        }
    }
    o
}

fn reprise_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("bin dir");
    let bin = dir.join("reprise");
    assert!(
        bin.is_file() && dir.join("reprise-guest").is_file() && dir.join("mk").is_file(),
        "reprise, reprise-guest and mk must sit beside {} (cargo build --workspace)",
        exe.display()
    );
    bin
}

/// Runs `reprise` in `dir` with the store under `data`, output discarded
/// (its stderr is printed if it fails); returns the wall time and the exit
/// code.
fn time_reprise(bin: &Path, dir: &Path, data: &Path, args: &[&str]) -> (Duration, i32) {
    time_reprise_with(bin, dir, data, args, &[])
}

fn time_reprise_with(
    bin: &Path,
    dir: &Path,
    data: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Duration, i32) {
    let start = Instant::now();
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("XDG_DATA_HOME", data)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("reprise starts");
    let took = start.elapsed();
    if !out.status.success() {
        eprintln!(
            "reprise {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (took, out.status.code().unwrap_or(-1))
}

/// A `reprise daemon --warm` of the store under `data`, stopped when
/// dropped.
struct WarmDaemon {
    child: std::process::Child,
    bin: PathBuf,
    data: PathBuf,
}

impl WarmDaemon {
    fn start(bin: &Path, data: &Path, log: &Path) -> WarmDaemon {
        let log = fs::File::create(log).expect("daemon log");
        let child = Command::new(bin)
            .args(["daemon", "--warm"])
            .env("XDG_DATA_HOME", data)
            .env_remove("REPRISE_ORCHESTRATOR")
            .env_remove("REPRISE_CREDENTIALS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("reprise daemon starts");
        WarmDaemon {
            child,
            bin: bin.to_path_buf(),
            data: data.to_path_buf(),
        }
    }

    /// Waits (up to 10 minutes) until the daemon has a warm guest ready.
    fn wait_ready(&self) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(600) {
            let out = Command::new(&self.bin)
                .args(["daemon", "status", "--json"])
                .env("XDG_DATA_HOME", &self.data)
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = out {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if v["warm"].as_str().is_some_and(|w| w.starts_with("ready")) {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }
}

impl Drop for WarmDaemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Adds the phase durations of the result just stored for `repo` (the
/// latest run of its HEAD) to `into`, by phase name.
fn record_phases(repo: &Path, data: &Path, into: &mut BTreeMap<String, Vec<Duration>>) {
    let keyed = pipeline::compute_key(
        &pipeline::KeyRequest::at(repo),
        &reprise_executor::inputs::process_env(),
    )
    .expect("key");
    let store = Store::new(data.join("reprise").join("store"));
    let result = store
        .get(&keyed.inputs.key())
        .expect("the run's result is stored");
    for phase in result.manifest.phases {
        into.entry(phase.name)
            .or_default()
            .push(Duration::from_millis(phase.ms));
    }
}

/// A repository of `files` files in folders of 1,000 and an mkfile, made
/// with `git fast-import` (one shared blob) and no working tree files.
fn big_repo(dir: &Path, files: usize) {
    fs::create_dir_all(dir).expect("repo dir");
    git(dir, &["init", "-q", "-b", "main"]);
    let mkfile = "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/big\n\ntest:V:\n\ttrue\n";
    let mut stream = format!(
        "blob\nmark :1\ndata 6\nhello\nblob\nmark :3\ndata {}\n{mkfile}\n",
        mkfile.len()
    );
    stream.push_str(
        "commit refs/heads/main\nmark :2\ncommitter Bench <bench@reprise.invalid> 0 +0000\ndata 4\nbig\nM 100644 :3 mkfile\n",
    );
    for i in 0..files {
        stream.push_str(&format!("M 100644 :1 d{}/f{i}.txt\n", i / 1000));
    }
    stream.push('\n');
    fast_import(dir, &stream);
}

/// Feeds `stream` to `git fast-import` in `dir`.
fn fast_import(dir: &Path, stream: &str) {
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stream.as_bytes())
        .expect("feed fast-import");
    assert!(child.wait().expect("fast-import").success());
}

/// A repository of `commits` commits in a line, one file changed in
/// each, cloned from an origin as a team's checkout is.
fn long_repo(dir: &Path, commits: usize) {
    fs::create_dir_all(dir).expect("repo dir");
    git(dir, &["init", "-q", "-b", "main"]);
    let mut stream = String::new();
    for i in 0..commits {
        let text = format!("commit {i}\n");
        stream.push_str(&format!(
            "commit refs/heads/main\nmark :{}\ncommitter Bench <bench@reprise.invalid> {i} +0000\ndata 2\nc\n",
            i + 1
        ));
        if i > 0 {
            stream.push_str(&format!("from :{i}\n"));
        }
        stream.push_str(&format!(
            "M 100644 inline f.txt\ndata {}\n{text}\n",
            text.len()
        ));
    }
    fast_import(dir, &stream);
    git(
        dir,
        &[
            "remote",
            "add",
            "origin",
            "https://example.com/bench/long.git",
        ],
    );
}

/// Builds a busybox image on the host with `podman import`.
fn host_image(dir: &Path) -> bool {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("bin")).expect("rootfs");
    fs::create_dir_all(root.join("tmp")).expect("rootfs tmp");
    if fs::copy("/bin/busybox", root.join("bin/busybox")).is_err() {
        return false;
    }
    let Ok(list) = Command::new("/bin/busybox").arg("--list").output() else {
        return false;
    };
    for name in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|n| *n != "busybox")
    {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(name));
    }
    let tar = dir.join("rootfs.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .is_ok_and(|s| s.success());
    ok && Command::new("podman")
        .arg("import")
        .arg(&tar)
        .arg(HOST_IMAGE)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `podman run --rm` of a similar image on the host: the floor a run is
/// compared with. `None` when it cannot run here.
fn host_podman(tmp: &Path, runs: usize) -> Option<Duration> {
    if !host_image(tmp) {
        return None;
    }
    let mut host = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let ok = Command::new("podman")
            .args(["run", "--rm", "--network", "none"])
            .args(PODMAN_FLAGS)
            .args([HOST_IMAGE, "sh", "-c", "echo hello, world"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            host.push(start.elapsed());
        }
    }
    let _ = Command::new("podman")
        .args(["rmi", "-f", HOST_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    (!host.is_empty()).then(|| median(host))
}

/// A real project: six from PyPI with its mkfile (`scripts/pypi-project.sh`),
/// its first run building the test image from Debian's mirror, then
/// `later` real runs of new commits on the repository's snapshot.
fn real_project(bin: &Path, tmp: &Path, later: usize) -> Vec<(String, String, String)> {
    let repo = tmp.join("six-repo");
    let data = tmp.join("six-data");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pypi-project.sh");
    let made = Command::new("bash")
        .arg(&script)
        .arg(&repo)
        .stdout(Stdio::null())
        .status()
        .expect("pypi-project.sh runs");
    assert!(made.success(), "fetching six from PyPI failed");
    let (first, code) = time_reprise(bin, &repo, &data, &["run", "--fresh", "--no-serve"]);
    assert_eq!(code, 0, "six's first run failed");
    let mut first_phases = BTreeMap::new();
    record_phases(&repo, &data, &mut first_phases);
    let mut times = Vec::new();
    for i in 0..later.max(1) {
        fs::write(repo.join("NOTES"), format!("tree {i}\n")).expect("notes");
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "another tree"]);
        let (t, code) = time_reprise(bin, &repo, &data, &["run", "--no-serve"]);
        assert_eq!(code, 0, "six's real run {i} failed");
        times.push(t);
    }
    let _ = Command::new(bin)
        .args(["cache", "drop"])
        .current_dir(&repo)
        .env("XDG_DATA_HOME", &data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let mut rows = vec![(
        "six from PyPI: first real run".into(),
        secs(first),
        "one run; base-image builds python3 + pytest from Debian's mirror".into(),
    )];
    if let Some(prepare) = first_phases.get("prepare-runtime") {
        rows.push((
            "  of which prepare-runtime (the image)".into(),
            secs(prepare[0]),
            String::new(),
        ));
    }
    let n = times.len();
    rows.push((
        "six from PyPI: second real run (snapshot)".into(),
        secs(median(times)),
        format!("median of {n}, each a new commit, the image from the snapshot"),
    ));
    rows
}

/// Real runs of the hello repository with `driver`: the first from a blank
/// snapshot, then `later` more, each on another tree. Returns the first
/// run's time and the median of the later ones.
fn driver_runs(bin: &Path, tmp: &Path, driver: &str, later: usize) -> (Duration, Duration) {
    let repo = tmp.join(format!("{driver}-repo"));
    let data = tmp.join(format!("{driver}-data"));
    hello_repo(&repo);
    let (first, code) = time_reprise(bin, &repo, &data, &["run", "--fresh", "--driver", driver]);
    assert_eq!(code, 0, "the first {driver} run failed");
    let mut times = Vec::new();
    for i in 0..later.max(1) {
        fs::write(repo.join("NOTES"), format!("tree {i}\n")).expect("notes");
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "another tree"]);
        let (t, code) = time_reprise(bin, &repo, &data, &["run", "--driver", driver]);
        assert_eq!(code, 0, "{driver} run {i} failed");
        times.push(t);
    }
    let _ = Command::new(bin)
        .args(["cache", "drop"])
        .current_dir(&repo)
        .env("XDG_DATA_HOME", &data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    (first, median(times))
}

/// The median time of `reprise key` in `repo`, over `runs`.
fn key_median(bin: &Path, repo: &Path, data: &Path, runs: usize) -> Duration {
    reprise_median(bin, repo, data, &["key"], runs)
}

/// The median time of `reprise ARGS` in `repo`, over `runs`, each of
/// which must succeed.
fn reprise_median(bin: &Path, repo: &Path, data: &Path, args: &[&str], runs: usize) -> Duration {
    let times = (0..runs)
        .map(|_| {
            let (t, code) = time_reprise(bin, repo, data, args);
            assert_eq!(code, 0, "reprise {args:?} failed in {}", repo.display());
            t
        })
        .collect();
    median(times)
}

fn main() {
    let o = options();
    let bin = reprise_bin();
    let tmp = tempfile::Builder::new()
        .prefix("run-bench-")
        .tempdir()
        .expect("temp dir");
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // Replay of a large stored result.
    let repo = tmp.path().join("replay-repo");
    let data = tmp.path().join("replay-data");
    hello_repo(&repo);
    store_large_result(&repo, &data, None);
    let small = reprise_median(&bin, &repo, &data, &["run"], o.runs);
    rows.push((
        "replay: 1 MiB output + 20 MiB artifacts".into(),
        ms(small),
        format!("median of {}; target < 50 ms", o.runs),
    ));

    // Key computation against the repository's size.
    let mut key_medians = Vec::new();
    for files in [1_000, 100_000] {
        let repo = tmp.path().join(format!("key-{files}"));
        big_repo(&repo, files);
        let data = tmp.path().join(format!("key-data-{files}"));
        let m = key_median(&bin, &repo, &data, o.runs);
        key_medians.push(m);
        rows.push((
            format!("reprise key: {files}-file repository"),
            ms(m),
            format!("median of {}", o.runs),
        ));
    }
    rows.push((
        "  100,000 files / 1,000 files".into(),
        format!(
            "{:.2}x",
            key_medians[1].as_secs_f64() / key_medians[0].as_secs_f64()
        ),
        "reads the tree id, not the files".into(),
    ));
    // A replay in the large checkout, its files written out and one more
    // untracked: the working tree's check (a `git status` of 100,000
    // files) runs beside the replay, which waits for it before its verdict.
    let repo = tmp.path().join("key-100000");
    git(&repo, &["reset", "-q", "--hard"]);
    fs::write(repo.join("untracked.txt"), "not committed\n").expect("untracked file");
    let data = tmp.path().join("replay-data-100000");
    store_large_result(&repo, &data, None);
    let large = reprise_median(&bin, &repo, &data, &["run"], o.runs);
    rows.push((
        "replay: the same in a 100,000-file checkout".into(),
        ms(large),
        format!("median of {}; one file untracked", o.runs),
    ));
    let repo = tmp.path().join("key-history");
    long_repo(&repo, 50_000);
    let data = tmp.path().join("key-data-history");
    let m = key_median(&bin, &repo, &data, o.runs);
    rows.push((
        "reprise key: 50,000-commit history".into(),
        ms(m),
        format!("median of {}; a clone with an origin", o.runs),
    ));
    rows.push((
        "  50,000 commits / 1 commit".into(),
        format!("{:.2}x", m.as_secs_f64() / key_medians[0].as_secs_f64()),
        "reads no history (only a real run walks it, for its snapshots)".into(),
    ));

    let (mut qemu_first, mut qemu_second, mut qemu_warm) = (None, None, None);
    if o.vm {
        // Real runs: each a different tree, so each misses and boots.
        let repo = tmp.path().join("real-repo");
        let data = tmp.path().join("real-data");
        hello_repo(&repo);
        // The first run starts from a blank snapshot; later ones alternate
        // between restoring the saved guest and a cold boot
        // (REPRISE_COLD_BOOT=1), side by side, each on another tree.
        let mut times = Vec::new();
        let mut cold = Vec::new();
        let mut restored_phases = BTreeMap::new();
        let mut cold_phases = BTreeMap::new();
        let commit = |i: usize| {
            fs::write(repo.join("NOTES"), format!("tree {i}\n")).expect("notes");
            git(&repo, &["add", "-A"]);
            git(&repo, &["commit", "-q", "-m", "another tree"]);
        };
        let (t, code) = time_reprise(&bin, &repo, &data, &["run", "--fresh"]);
        assert_eq!(code, 0, "the first real run failed");
        times.push(t);
        // Then round by round: a run restoring its own guest (this store
        // has no daemon), a cold boot if asked, and a run through the warm
        // guest of a `reprise daemon --warm` of a second store (same
        // repository, so the same snapshot), each on another tree. Every
        // round starts once the daemon's next guest is ready, so no run
        // shares the CPU with the making of one.
        let mut warm = Vec::new();
        let mut warm_phases = BTreeMap::new();
        let mut not_warm = 0;
        let warm_data = tmp.path().join("warm-data");
        let daemon_log = tmp.path().join("daemon.log");
        let daemon = WarmDaemon::start(&bin, &warm_data, &daemon_log);
        for i in 1..o.real_runs {
            if !daemon.wait_ready() {
                eprintln!(
                    "the daemon made no warm guest:\n{}",
                    fs::read_to_string(&daemon_log).unwrap_or_default()
                );
                break;
            }
            commit(3 * i);
            let (t, code) = time_reprise(&bin, &repo, &data, &["run"]);
            assert_eq!(code, 0, "real run {i} failed");
            times.push(t);
            record_phases(&repo, &data, &mut restored_phases);
            if o.cold_boot {
                commit(3 * i + 1);
                let env = [("REPRISE_COLD_BOOT", "1")];
                let (t, code) = time_reprise_with(&bin, &repo, &data, &["run"], &env);
                assert_eq!(code, 0, "cold real run {i} failed");
                cold.push(t);
                record_phases(&repo, &data, &mut cold_phases);
            }
            commit(3 * i + 2);
            let start = Instant::now();
            let out = Command::new(&bin)
                .args(["run"])
                .current_dir(&repo)
                .env("XDG_DATA_HOME", &warm_data)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .expect("reprise starts");
            let t = start.elapsed();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "warm run {i} failed:\n{stderr}");
            if stderr.lines().any(|l| l.starts_with("reprise: warm done")) {
                warm.push(t);
                record_phases(&repo, &warm_data, &mut warm_phases);
            } else {
                not_warm += 1;
                eprintln!("warm run {i} did not get the warm guest:\n{stderr}");
            }
        }
        drop(daemon);
        // The repository's snapshot lives in the shared cache: drop it.
        let _ = Command::new(&bin)
            .args(["cache", "drop"])
            .current_dir(&repo)
            .env("XDG_DATA_HOME", &data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        rows.push((
            "qemu driver: first real run (blank snapshot)".into(),
            secs(times[0]),
            "one run; builds the container image".into(),
        ));
        qemu_first = Some(times[0]);
        let later = times[1..].to_vec();
        let second = (!later.is_empty()).then(|| median(later.clone()));
        qemu_second = second;
        if let Some(second) = second {
            rows.push((
                "qemu driver: second real run (snapshot)".into(),
                secs(second),
                format!(
                    "median of {}, each another tree, saved guest restored (no daemon)",
                    later.len()
                ),
            ));
            if !cold.is_empty() {
                let cold = median(cold.clone());
                rows.push((
                    "qemu driver: second, booted cold".into(),
                    secs(cold),
                    "REPRISE_COLD_BOOT=1, alternating with the restored runs".into(),
                ));
                rows.push((
                    "  cold boot / restored".into(),
                    format!("{:.2}x", cold.as_secs_f64() / second.as_secs_f64()),
                    String::new(),
                ));
            }
            if !warm.is_empty() {
                let m = median(warm.clone());
                qemu_warm = Some(m);
                rows.push((
                    "qemu driver: second, daemon's warm guest".into(),
                    secs(m),
                    format!(
                        "median of {}, `reprise daemon --warm`, interleaved with the restored runs{}; target < 4 s under TCG",
                        warm.len(),
                        match not_warm {
                            0 => String::new(),
                            n => format!(", {n} run(s) found no warm guest and are left out"),
                        }
                    ),
                ));
                rows.push((
                    "  restored / warm guest".into(),
                    format!("{:.2}x", second.as_secs_f64() / m.as_secs_f64()),
                    String::new(),
                ));
            }
            for (label, phases) in [
                ("restored", restored_phases),
                ("cold", cold_phases),
                ("warm", warm_phases),
            ] {
                for (phase, samples) in phases {
                    rows.push((
                        format!("  {label}: phase {phase}"),
                        secs(median(samples)),
                        "median, from the stored results' manifests".into(),
                    ));
                }
            }
        }
    }

    if o.vm && o.real_project {
        rows.extend(real_project(&bin, tmp.path(), o.real_runs.min(3)));
    }

    // Per driver, beside plain podman on the host.
    let host = host_podman(tmp.path(), o.runs);
    let (podman_first, podman_second) = driver_runs(&bin, tmp.path(), "podman", o.real_runs);
    rows.push((
        "podman driver: first real run (blank snapshot)".into(),
        secs(podman_first),
        "no VM: a privileged container of the base image".into(),
    ));
    rows.push((
        "podman driver: second real run (snapshot)".into(),
        secs(podman_second),
        format!("median of {}, each another tree", o.real_runs.max(1)),
    ));
    let (_, dry) = driver_runs(&bin, tmp.path(), "dry-run", o.runs);
    rows.push((
        "dry-run driver: plan of a new tree".into(),
        ms(dry),
        format!("median of {}", o.runs),
    ));
    match host {
        Some(h) => {
            rows.push((
                "podman run --rm on the host".into(),
                ms(h),
                format!("median of {}", o.runs),
            ));
            let mut ratio = |name: &str, t: Duration| {
                rows.push((
                    format!("  {name} / host podman"),
                    format!("{:.0}x", t.as_secs_f64() / h.as_secs_f64()),
                    String::new(),
                ));
            };
            if let Some(first) = qemu_first {
                ratio("qemu first real run", first);
            }
            if let Some(second) = qemu_second {
                ratio("qemu second real run", second);
            }
            if let Some(warm) = qemu_warm {
                ratio("qemu second run, warm guest", warm);
            }
            ratio("podman driver first real run", podman_first);
            ratio("podman driver second real run", podman_second);
        }
        None => rows.push((
            "podman run --rm on the host".into(),
            "skipped".into(),
            "no /bin/busybox or podman import failed".into(),
        )),
    }

    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("{:<width$}  {:>10}  notes", "measure", "time");
    for (name, value, note) in rows {
        println!("{name:<width$}  {value:>10}  {note}");
    }
}
