//! Helpers for the `reprise run` system tests: locating the binary, making
//! git repositories in temp folders, running `reprise` with a private result
//! store, and polling instead of sleeping.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The `reprise` binary beside the test binary (`<target>/<triple>/debug/`),
/// with `reprise-guest` and `mk` next to it.
pub fn reprise_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/x86_64-unknown-linux-gnu/debug/deps/run-<hash>
    let debug = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary sits in <target>/<triple>/debug/deps");
    for name in ["reprise", "reprise-guest", "mk"] {
        let path = debug.join(name);
        assert!(
            path.is_file(),
            "{} is missing: build the workspace first (`cargo build --workspace` with the same CARGO_TARGET_DIR)",
            path.display()
        );
    }
    debug.join("reprise")
}

/// Serialises the tests that boot a VM: the host has few cores, and runs in
/// parallel would only slow each other down past their timeouts.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The example repository shipped with the workspace.
pub fn example_hello() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello")
}

/// A temp folder holding a repository (`repo/`) and a private data home
/// (`data/`, the result store) for one test.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("reprise-run-test-")
            .tempdir()
            .expect("temp dir");
        fs::create_dir_all(dir.path().join("repo")).expect("repo dir");
        fs::create_dir_all(dir.path().join("data")).expect("data dir");
        Sandbox { dir }
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The user's config home (`XDG_CONFIG_HOME`): empty unless a test
    /// writes a user config there.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn store(&self) -> PathBuf {
        self.data().join("reprise/store")
    }

    /// Copies every file of `from` (not recursive) into the repository.
    pub fn copy_from(&self, from: &Path) -> &Sandbox {
        for entry in fs::read_dir(from).expect("read example") {
            let entry = entry.expect("entry");
            if entry.file_type().expect("type").is_file() {
                fs::copy(entry.path(), self.repo().join(entry.file_name())).expect("copy");
            }
        }
        self
    }

    /// Writes a file of the repository.
    pub fn write(&self, name: &str, text: &str) -> &Sandbox {
        fs::write(self.repo().join(name), text).expect("write file");
        self
    }

    /// `git init -b main` in the repository.
    pub fn git_init(&self) -> &Sandbox {
        self.git(&["init", "-q", "-b", "main"]);
        self
    }

    /// Stages everything and commits.
    pub fn commit(&self, message: &str) -> &Sandbox {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self
    }

    /// Runs git in the repository and returns its trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=Reprise Test",
                "-c",
                "user.email=test@reprise.invalid",
            ])
            .args(args)
            .current_dir(self.repo())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", self.dir.path())
            .output()
            .expect("git runs");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A `reprise` command in the repository with this sandbox's store. The
    /// image cache stays the default one so the base image is shared.
    pub fn reprise(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(reprise_bin());
        cmd.args(args)
            .current_dir(self.repo())
            .env("XDG_DATA_HOME", self.data())
            .env("XDG_CONFIG_HOME", self.config())
            .env_remove("REPRISE_ORCHESTRATOR")
            .env_remove("REPRISE_CREDENTIALS")
            // A developer's REPRISE_DRIVER=podman would turn the VM runs
            // into podman runs (and their keys into others) unnoticed: the
            // tests that want a driver say so with --driver.
            .env_remove("REPRISE_DRIVER")
            .env_remove("GREETING_STYLE")
            .env_remove("HELLO_TOKEN")
            .env_remove("REPRISE_KEEP")
            .env_remove("REPRISE_MAX_AGE")
            .env_remove("REPRISE_COLD_BOOT")
            // The machine running the tests may be a CI job: CI mode is
            // asked for by the tests that test it.
            .env_remove("CI")
            .env_remove("GITHUB_STEP_SUMMARY")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `reprise` to completion.
    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.reprise(args).output().expect("reprise starts"))
    }

    /// The lines of `reprise results list`.
    pub fn results_list(&self) -> Vec<String> {
        let r = self.run(&["results", "list"]);
        assert_eq!(r.code, 0, "results list failed:\n{}", r.stderr);
        // Without the header line.
        r.stdout.lines().skip(1).map(String::from).collect()
    }

    /// Every file under the store's `results/` and `failed/` folders.
    pub fn stored_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in ["results", "failed"] {
            walk(&self.store().join(sub), &mut out);
        }
        out
    }
}

/// Every regular file under `dir`.
pub fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A finished `reprise` process.
#[derive(Debug, Clone)]
pub struct Run {
    pub code: i32,
    pub stdout_bytes: Vec<u8>,
    pub stderr_bytes: Vec<u8>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout_bytes: out.stdout,
            stderr_bytes: out.stderr,
        }
    }
}

impl Run {
    /// Panics with the run's output unless it exited with `code`.
    pub fn expect_code(&self, code: i32, what: &str) -> &Run {
        assert_eq!(
            self.code, code,
            "{what}: expected exit {code}, got {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Whether a VM was started, booted cold or restored from the saved
    /// guest state, or a daemon's warm guest taken (the pipeline reports
    /// that phase).
    pub fn booted(&self) -> bool {
        self.stderr.lines().any(|l| {
            l.starts_with("reprise: boot done")
                || l.starts_with("reprise: restore done")
                || l.starts_with("reprise: warm done")
        })
    }

    /// Whether the run used a `reprise daemon --warm`'s warm guest.
    pub fn warm(&self) -> bool {
        self.stderr
            .lines()
            .any(|l| l.starts_with("reprise: warm done"))
    }

    /// Whether the tests ran here: a VM booted or restored, or the podman
    /// driver's OS container started.
    pub fn ran_here(&self) -> bool {
        self.booted()
            || self
                .stderr
                .lines()
                .any(|l| l.starts_with("reprise: start done"))
    }

    /// Whether the VM was restored from the saved guest.
    pub fn restored(&self) -> bool {
        self.stderr
            .lines()
            .any(|l| l.starts_with("reprise: restore done"))
    }

    /// Whether a stored result was replayed.
    pub fn replayed(&self) -> bool {
        self.stderr
            .lines()
            .any(|l| l.starts_with("reprise: replayed result "))
    }

    /// The tests' own stderr: between the prepare-runtime and the test
    /// phases for a real run (everything for a replay; preparation,
    /// artifacts and post-test print on stderr too), without reprise's own
    /// lines.
    pub fn test_stderr(&self) -> Vec<u8> {
        let text = &self.stderr_bytes;
        let find = |marker: &[u8]| text.windows(marker.len()).position(|w| w == marker);
        let start = find(b"reprise: prepare-runtime done")
            .map_or(0, |at| at + b"reprise: prepare-runtime done".len());
        let end = find(b"reprise: test done").unwrap_or(text.len());
        text[start..end.max(start)]
            .split_inclusive(|b| *b == b'\n')
            .skip(usize::from(start > 0))
            .filter(|line| !line.starts_with(b"reprise: "))
            .flatten()
            .copied()
            .collect()
    }
}

/// Polls `cond` every 100 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The live (not zombie) child processes of `pid` whose command name starts
/// with `prefix`.
pub fn children_named(pid: u32, prefix: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((comm, state, ppid)) = proc_stat(child)
            && ppid == pid
            && state != 'Z'
            && comm.starts_with(prefix)
        {
            out.push(child);
        }
    }
    out
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, state, _)| state != 'Z')
}

/// (comm, state, ppid) from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(String, char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let mut rest = stat[close + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}
