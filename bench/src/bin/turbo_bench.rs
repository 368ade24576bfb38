//! Reprise beside Turborepo on the same workload: a remote-cache hit with
//! an empty local cache, and then a local hit, each tool interleaved with
//! the other round by round on loopback. Prints medians and the ratios;
//! asserts nothing about times, only that every timed round really was the
//! hit it is counted as and restored exactly the workload.
//!
//! Usage: `turbo_bench [--rounds N] [--npm-dir DIR] [--hold SECONDS]
//! [--against REPRISE] [--here]` (at least 11 rounds; default 11). `--against`
//! also times another `reprise` binary's remote direct hit, and the local
//! hit from the store it fetched into, beside this build's, alternated
//! round by round against the same holder (how each speed change is
//! measured against the build before it). Build first with `cargo build --release --workspace`:
//! `reprise` and `reprise-orchestrator` are looked for next to this binary.
//! Needs `node` and `npm` (`bench/scripts/install-node.sh` installs
//! Debian's); `turbo` and `turborepo-remote-cache`, at the versions pinned
//! below, are installed from npm into `--npm-dir` (default: a folder of the
//! system's temp folder named by the versions, reused by later runs).
//!
//! The workload, the same bytes for both: 1 MiB of test output on stdout
//! and 20 incompressible artifacts of 1 MiB.
//!
//! Every file of the rounds (both tools' workspaces, caches, stores and
//! restored outputs) is on a fresh ext4 with a journal made for the run
//! on a loop device over an image in the temporary folder, read and
//! written directly (which needs root; the report names it): on this
//! machine's root file system, an ext4 without a journal, each round's
//! removals made the next rounds' new files slower, Reprise's more than
//! Turborepo's ([`RoundsFs`]). `--here` runs them in the temporary folder
//! itself, as does a run that cannot make the file system. A run killed by a signal other than SIGINT or SIGTERM during
//! `--hold`, or during the rounds, leaves it mounted:
//! `umount /tmp/turbo-bench-fs-*/mnt` (its loop device goes with it), then
//! remove that folder.
//!
//! - **Turborepo**: a one-package npm workspace whose `build` task prints
//!   the output and copies the artifacts into `out/` (its `outputs`), run
//!   with the native `turbo` binary (no node shim in front of it) against
//!   `turborepo-remote-cache` (local file storage, plain HTTP, bearer
//!   token) on 127.0.0.1. Remote hit: `.turbo/cache` and `out/` removed
//!   first; checked by `cache hit, replaying logs HASH` on stdout, the
//!   task not run (it leaves a mark when it runs), and one more
//!   `GET /v8/artifacts/HASH` answered 200 in the cache server's log. Local
//!   hit: `out/` removed, the same checks, and no request to the server.
//! - **Reprise**: a result of the same output and artifacts committed to a
//!   producer's store as a real run would commit it (no VM is booted),
//!   sealed by a trusted identity and served by a real `reprise daemon
//!   --direct` that a real `reprise-orchestrator serve` introduces (mutual
//!   TLS over TCP, QUIC if TCP fails; the orchestrator's links QUIC). Remote hit: the real `reprise run --no-serve` in a clone,
//!   with a fresh empty store and the consumer's credentials; checked by
//!   "straight from the executor holding it" on stderr and one more direct
//!   transfer the holder reported in the orchestrator's log. The same
//!   remote hit is also timed through the relay, from a second
//!   orchestrator and daemon without `--direct` (checked by one more relay
//!   in its log). Local hit: the same command again on the store the
//!   remote hit filled; checked by "from the local store" and no transfer.
//!
//! Every round of both tools checks that stdout carried the whole output
//! (Reprise: byte for byte; Turborepo: every line, behind its
//! `app:build: ` prefix) and that every artifact was restored with the
//! workload's bytes. One untimed round of each comes first (page cache,
//! binaries). The order of the tools alternates from round to round.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use reprise_bench::{git, hello_repo, incompressible, median, ms, sibling_bin, store_result};
use reprise_protocol::record::{self, StreamId};

/// The pinned npm packages.
const TURBO: &str = "turbo@2.11.11";
const TURBO_VERSION: &str = "2.11.11";
const REMOTE_CACHE: &str = "turborepo-remote-cache@2.12.0";
/// Lines of the workload's test output, at least this many bytes.
const OUTPUT_BYTES: usize = 1 << 20;
const ARTIFACTS: usize = 20;
const ARTIFACT_BYTES: usize = 1 << 20;
const MIN_ROUNDS: usize = 11;
/// A hit that takes longer missed and ran for real.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// The bearer token of the Turborepo remote cache (loopback only).
const TOKEN: &str = "turbo-bench-token";

fn progress(what: &str) {
    eprintln!("turbo_bench: {what}");
}

struct Options {
    rounds: usize,
    npm_dir: PathBuf,
    /// Keep everything running this long after the rounds, for profiling
    /// one tool by hand (the commands are printed).
    hold: Option<Duration>,
    /// Another `reprise` binary whose remote direct and local hits are
    /// timed against this build's, alternated against the same holder.
    against: Option<PathBuf>,
    /// Run the rounds in the temporary folder's own file system, not on
    /// one made for the run ([`RoundsFs`]).
    here: bool,
}

const USAGE: &str =
    "usage: turbo_bench [--rounds N] [--npm-dir DIR] [--hold SECONDS] [--against REPRISE] [--here]";

fn options() -> Options {
    let mut o = Options {
        rounds: MIN_ROUNDS,
        npm_dir: std::env::temp_dir().join(format!(
            "reprise-turbo-bench-npm-{}-{}",
            TURBO.replace('@', "-"),
            REMOTE_CACHE.replace('@', "-")
        )),
        hold: None,
        against: None,
        here: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| reprise_bench::value_exit(&a, "a value", USAGE))
        };
        match a.as_str() {
            "--rounds" => {
                o.rounds = value()
                    .parse()
                    .ok()
                    .filter(|n| *n >= MIN_ROUNDS)
                    .unwrap_or_else(|| {
                        reprise_bench::value_exit(
                            &a,
                            &format!("a number, at least {MIN_ROUNDS}"),
                            USAGE,
                        )
                    });
            }
            "--npm-dir" => o.npm_dir = PathBuf::from(value()),
            "--against" => {
                let bin = PathBuf::from(value());
                if !bin.is_file() {
                    reprise_bench::value_exit(&a, "a reprise binary that exists", USAGE);
                }
                o.against = Some(bin);
            }
            "--here" => o.here = true,
            "--hold" => {
                let secs: u64 = value()
                    .parse()
                    .unwrap_or_else(|_| reprise_bench::value_exit(&a, "seconds", USAGE));
                o.hold = Some(Duration::from_secs(secs));
            }
            _ => reprise_bench::usage_exit(&a, USAGE),
        }
    }
    o
}

/// The workload both tools restore.
struct Workload {
    dir: PathBuf,
    stdout: Vec<u8>,
    /// (file name, bytes)
    artifacts: Vec<(String, Vec<u8>)>,
}

impl Workload {
    fn write(dir: &Path) -> Workload {
        let mut stdout = Vec::with_capacity(OUTPUT_BYTES + 128);
        let mut n = 0;
        while stdout.len() < OUTPUT_BYTES {
            writeln!(
                stdout,
                "ok {n} tests::case_{n} passed with a reasonably long line of output"
            )
            .expect("in memory");
            n += 1;
        }
        let artifacts: Vec<(String, Vec<u8>)> = (0..ARTIFACTS)
            .map(|i| {
                let seed = 0x51ed_2701_f00d_cafe_u64 ^ ((i as u64) << 32);
                (
                    format!("artifact-{i:02}.bin"),
                    incompressible(seed, ARTIFACT_BYTES),
                )
            })
            .collect();
        fs::create_dir_all(dir.join("artifacts")).expect("workload dir");
        fs::write(dir.join("stdout.txt"), &stdout).expect("workload stdout");
        for (name, bytes) in &artifacts {
            fs::write(dir.join("artifacts").join(name), bytes).expect("workload artifact");
        }
        Workload {
            dir: dir.to_path_buf(),
            stdout,
            artifacts,
        }
    }

    /// Panics unless `dir` holds exactly the workload's artifacts.
    fn check_restored(&self, dir: &Path, who: &str) {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{who}: no artifacts in {}: {e}", dir.display()))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let expected: Vec<&String> = self.artifacts.iter().map(|(n, _)| n).collect();
        assert_eq!(
            names.iter().collect::<Vec<_>>(),
            expected,
            "{who}: the restored files differ"
        );
        for (name, bytes) in &self.artifacts {
            let got = fs::read(dir.join(name)).expect("restored artifact");
            assert!(got == *bytes, "{who}: {name} was not restored identically");
        }
    }
}

/// Runs `cmd` to its end with stdout and stderr captured; returns the wall
/// time and the output. Panics past [`RUN_DEADLINE`] or on a failure.
fn timed(mut cmd: Command, who: &str) -> (Duration, Output) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("{who} starts: {e}"));
    let out = wait_bounded(child, who);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{who} exited {:?}:\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        tail(&out.stdout)
    );
    (took, out)
}

fn wait_bounded(child: Child, who: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_DEADLINE) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{who}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("{who} took over {RUN_DEADLINE:?}: it probably missed and ran for real");
        }
    }
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A child process killed when dropped.
struct Killed(Child);

impl Killed {
    /// Starts `cmd`, a service the rounds use, to be killed when dropped,
    /// or sent SIGTERM by the kernel when this process dies some other way
    /// (a `kill`, a panic that aborts, `timeout`), so none outlives the
    /// benchmark.
    fn spawn(cmd: &mut Command, what: &str) -> Killed {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the
        // parent; it is all the child runs before its exec.
        #[expect(unsafe_code, reason = "pre_exec is unsafe; prctl is async-signal-safe")]
        unsafe {
            cmd.pre_exec(
                || match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                },
            );
        }
        Killed(cmd.spawn().unwrap_or_else(|e| panic!("{what} starts: {e}")))
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free port")
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free port")
            .port()
    }
}

fn check_tool(cmd: &str) {
    let found = Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{cmd}` is not installed: run bench/scripts/install-node.sh (Debian's nodejs and npm)"
    );
}

// ---------------------------------------------------------------- Turborepo

/// The pinned npm packages in `dir`, installed if missing; returns the
/// native `turbo` binary and the cache server's entry point.
fn install_npm_tools(dir: &Path) -> (PathBuf, PathBuf) {
    let platform = match std::env::consts::ARCH {
        "x86_64" => "linux-64",
        "aarch64" => "linux-arm64",
        other => panic!("turbo has no package for {other}"),
    };
    let turbo = dir.join(format!("node_modules/@turbo/{platform}/bin/turbo"));
    let server = dir.join("node_modules/turborepo-remote-cache/dist/cli.js");
    let version = |turbo: &Path| {
        Command::new(turbo)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if version(&turbo).as_deref() != Some(TURBO_VERSION) || !server.is_file() {
        progress(&format!(
            "installing {TURBO} and {REMOTE_CACHE} from npm into {}",
            dir.display()
        ));
        fs::create_dir_all(dir).expect("npm dir");
        let status = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(dir)
            .args([TURBO, REMOTE_CACHE])
            .status()
            .expect("npm runs");
        assert!(
            status.success(),
            "npm install {TURBO} {REMOTE_CACHE} failed"
        );
    }
    assert_eq!(
        version(&turbo).as_deref(),
        Some(TURBO_VERSION),
        "{} is not turbo {TURBO_VERSION}",
        turbo.display()
    );
    (turbo, server)
}

/// The npm workspace of one package whose `build` prints the workload's
/// output and copies its artifacts into `out/`, committed to git.
fn turbo_workspace(dir: &Path, workload: &Workload) {
    let app = dir.join("packages/app");
    fs::create_dir_all(&app).expect("workspace");
    let npm_version = String::from_utf8_lossy(
        &Command::new("npm")
            .arg("--version")
            .output()
            .expect("npm --version")
            .stdout,
    )
    .trim()
    .to_string();
    let files = [
        (
            dir.join("package.json"),
            format!(
                r#"{{"name":"bench-root","private":true,"packageManager":"npm@{npm_version}","workspaces":["packages/*"]}}"#
            ),
        ),
        (
            dir.join("turbo.json"),
            r#"{"$schema":"https://turbo.build/schema.json","tasks":{"build":{"outputs":["out/**"]}}}"#
                .to_string(),
        ),
        (
            dir.join(".gitignore"),
            "node_modules/\n.turbo/\nout/\n".to_string(),
        ),
        (
            app.join("package.json"),
            r#"{"name":"app","version":"1.0.0","private":true,"scripts":{"build":"node build.js"}}"#
                .to_string(),
        ),
        (
            app.join("build.js"),
            format!(
                "// The bench's task: the workload's output and artifacts.\n\
                 const fs = require('fs');\n\
                 const wl = {:?};\n\
                 fs.appendFileSync(wl + '/ran', 'ran\\n');\n\
                 fs.mkdirSync('out', {{ recursive: true }});\n\
                 for (const f of fs.readdirSync(wl + '/artifacts')) fs.copyFileSync(wl + '/artifacts/' + f, 'out/' + f);\n\
                 process.stdout.write(fs.readFileSync(wl + '/stdout.txt'));\n",
                workload.dir.to_str().expect("utf-8 path")
            ),
        ),
    ];
    for (path, text) in files {
        fs::write(&path, text).expect("workspace file");
    }
    let status = Command::new("npm")
        .args([
            "install",
            "--offline",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .expect("npm install in the workspace");
    assert!(status.success(), "npm install in the workspace failed");
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "bench workspace"]);
}

/// `turborepo-remote-cache` on 127.0.0.1, storing in `storage`, logging
/// requests into `log`.
struct CacheServer {
    _child: Killed,
    url: String,
    log: PathBuf,
}

impl CacheServer {
    fn start(server: &Path, storage: &Path, log: &Path) -> CacheServer {
        let port = free_port(false);
        let mut child = Command::new("node");
        child
            .arg(server)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("TURBO_TOKEN", TOKEN)
            .env("STORAGE_PROVIDER", "local")
            .env("STORAGE_PATH", storage)
            .env("STORAGE_PATH_USE_TMP_FOLDER", "false")
            .env("LOG_LEVEL", "info")
            .env("NODE_ENV", "production")
            .stdin(Stdio::null())
            .stdout(fs::File::create(log).expect("cache server log"))
            .stderr(Stdio::null());
        let server = CacheServer {
            _child: Killed::spawn(&mut child, "turborepo-remote-cache"),
            url: format!("http://127.0.0.1:{port}"),
            log: log.to_path_buf(),
        };
        wait_until(
            "turborepo-remote-cache answers",
            Duration::from_secs(30),
            || http_status(port, "/v8/artifacts/status") == Some(200),
        );
        server
    }

    /// Requests `GET /v8/artifacts/HASH` answered 200, from its log.
    fn hits(&self, hash: &str) -> usize {
        let wanted = format!("/v8/artifacts/{hash}");
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        // pino logs the request and, in another line with its id, the reply.
        let mut asked = std::collections::BTreeSet::new();
        let mut answered = 0;
        for line in log.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let id = v["reqId"].to_string();
            if v["req"]["method"] == "GET"
                && v["req"]["url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with(&wanted))
            {
                asked.insert(id);
            } else if v["res"]["statusCode"] == 200 && asked.contains(&id) {
                answered += 1;
            }
        }
        answered
    }
}

/// The status of `GET path` on 127.0.0.1:`port`, with the bearer token.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

struct Turbo {
    bin: PathBuf,
    ws: PathBuf,
    workload_dir: PathBuf,
    server: CacheServer,
    hash: String,
}

impl Turbo {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "build"])
            .current_dir(&self.ws)
            .env("TURBO_API", &self.server.url)
            .env("TURBO_TOKEN", TOKEN)
            .env("TURBO_TEAM", "bench")
            .env("TURBO_TELEMETRY_DISABLED", "1")
            .env("TURBO_NO_UPDATE_NOTIFIER", "1")
            .env("DO_NOT_TRACK", "1");
        cmd
    }

    fn marker(&self) -> PathBuf {
        self.workload_dir.join("ran")
    }

    /// The first run: a miss that fills both caches. Returns the task hash.
    fn prime(&mut self) {
        let (_, out) = timed(self.command(), "turbo (first run)");
        let text = String::from_utf8_lossy(&out.stdout);
        let hash = text
            .lines()
            .find_map(|l| {
                l.split_once("cache miss, executing ")
                    .map(|(_, h)| h.trim())
            })
            .unwrap_or_else(|| panic!("turbo's first run did not miss:\n{}", tail(&out.stdout)))
            .to_string();
        assert!(
            self.marker().is_file(),
            "turbo's first run did not run the task"
        );
        // The upload ends before turbo exits; the stored artifact shows it.
        let stored = self.ws.parent().expect("parent").join("turbo-remote/bench");
        assert!(
            fs::read_dir(&stored).is_ok_and(|d| d
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&hash))),
            "turbo's first run did not upload {hash} to the remote cache"
        );
        self.hash = hash;
    }

    /// One hit: `remote` with the local cache emptied first. Checks it and
    /// returns its wall time.
    fn hit(&self, remote: bool, workload: &Workload) -> Duration {
        let _ = fs::remove_dir_all(self.ws.join("packages/app/out"));
        if remote {
            let _ = fs::remove_dir_all(self.ws.join(".turbo/cache"));
        }
        let _ = fs::remove_file(self.marker());
        let before = self.server.hits(&self.hash);
        let who = if remote {
            "turbo (remote hit)"
        } else {
            "turbo (local hit)"
        };
        let (took, out) = timed(self.command(), who);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("cache hit, replaying logs {}", self.hash)),
            "{who} did not hit:\n{}",
            tail(&out.stdout)
        );
        assert!(!self.marker().exists(), "{who} ran the task");
        let expected_hits = before + usize::from(remote);
        wait_until(
            &format!(
                "{who}: the cache server logs {expected_hits} hits of {}",
                self.hash
            ),
            Duration::from_secs(5),
            || self.server.hits(&self.hash) >= expected_hits,
        );
        assert_eq!(
            self.server.hits(&self.hash),
            expected_hits,
            "{who}: remote cache requests"
        );
        // Every line of the output, behind turbo's prefix, in order.
        let replayed: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("app:build: "))
            .fold(String::new(), |mut s, l| {
                s.push_str(l);
                s.push('\n');
                s
            });
        assert!(
            replayed.contains(std::str::from_utf8(&workload.stdout).expect("utf-8")),
            "{who}: the replayed output is not the workload's"
        );
        workload.check_restored(&self.ws.join("packages/app/out"), who);
        took
    }
}

// ------------------------------------------------------------------ Reprise

fn orchestrator_cli(bin: &Path, args: &[&str]) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("reprise-orchestrator runs");
    assert!(
        out.status.success(),
        "reprise-orchestrator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Reprise {
    bin: PathBuf,
    clone: PathBuf,
    config: PathBuf,
    addr: String,
    consumer_pem: PathBuf,
    orchestrator_log: PathBuf,
    /// Whether the producer's daemon takes direct fetches.
    direct: bool,
    _orchestrator: Killed,
    _daemon: Killed,
}

impl Reprise {
    /// Transfers the orchestrator logged: relayed ones, or direct ones the
    /// holder reported served.
    fn relays(&self) -> usize {
        let marker = if self.direct {
            "served directly"
        } else {
            "relayed"
        };
        fs::read_to_string(&self.orchestrator_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(marker))
            .count()
    }

    /// One hit in the clone with the store under `data`: `remote` when it
    /// is empty. Checks it and returns its wall time.
    fn hit(&self, remote: bool, data: &Path, workload: &Workload) -> Duration {
        self.hit_by(&self.bin, remote, data, workload)
    }

    /// [`Reprise::hit`] by the `reprise` binary `bin`.
    fn hit_by(&self, bin: &Path, remote: bool, data: &Path, workload: &Workload) -> Duration {
        let artifacts = self.clone.join("reprise-artifacts");
        let _ = fs::remove_dir_all(&artifacts);
        let before = self.relays();
        let who = match (remote, self.direct) {
            (true, true) => "reprise (remote hit, direct)",
            (true, false) => "reprise (remote hit, relayed)",
            (false, _) => "reprise (local hit)",
        };
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--no-serve"])
            .current_dir(&self.clone)
            .env("XDG_DATA_HOME", data)
            .env("XDG_CONFIG_HOME", &self.config)
            .env("REPRISE_ORCHESTRATOR", &self.addr)
            .env("REPRISE_CREDENTIALS", &self.consumer_pem);
        let (took, out) = timed(cmd, who);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = if remote {
            "through the orchestrator"
        } else {
            "from the local store"
        };
        assert!(
            stderr.contains(said),
            "{who} did not say {said:?}:\n{stderr}"
        );
        let straight = "straight from the executor holding it";
        assert_eq!(
            stderr.contains(straight),
            remote && self.direct,
            "{who}: {straight:?} said or not as it should be:\n{stderr}"
        );
        let expected = before + usize::from(remote);
        wait_until(
            &format!("{who}: the orchestrator logs {expected} relays"),
            Duration::from_secs(5),
            || self.relays() >= expected,
        );
        assert_eq!(self.relays(), expected, "{who}: relays");
        assert!(
            out.stdout == workload.stdout,
            "{who}: stdout is not the workload's output"
        );
        workload.check_restored(&artifacts, who);
        took
    }
}

/// Times the remote direct hit of this build's `reprise` against `other`'s,
/// and then the local hit from the store each fetched into, `rounds` of
/// each alternated (the order swapped every round) against the same
/// orchestrator and holder, each checked as [`Reprise::hit`] does, and
/// prints the medians and their ratios: how a change is measured beside
/// the build before it on a machine whose speed drifts from run to run
/// (the bench's own runs, minutes apart, cannot resolve a 10 % change
/// there).
fn against(reprise: &Reprise, other: &Path, rounds: usize, t: &Path, workload: &Workload) {
    let data = |i: usize, which: &str| t.join(format!("against-{which}-{i}"));
    let builds = [("this", reprise.bin.as_path()), ("against", other)];
    // One untimed round of the other binary (page cache, its first start).
    reprise.hit_by(other, true, &data(0, "against"), workload);
    reprise.hit_by(other, false, &data(0, "against"), workload);
    let _ = fs::remove_dir_all(data(0, "against"));
    let (mut remote, mut local) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for i in 1..=rounds {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for b in order {
            let (which, bin) = builds[b];
            let dir = data(i, which);
            remote[b].push(reprise.hit_by(bin, true, &dir, workload));
            local[b].push(reprise.hit_by(bin, false, &dir, workload));
            let _ = fs::remove_dir_all(&dir);
        }
    }
    println!();
    for (what, times) in [("remote hit direct", remote), ("local hit", local)] {
        let [this, theirs] = times.map(median);
        println!(
            "{what}, alternated hit by hit ({rounds} each, one holder): this build {} \
             against {} {} ({})",
            ms(this),
            other.display(),
            ms(theirs),
            ratio(this, theirs)
        );
    }
}

/// An orchestrator, a producer's result and its daemon under `t`; with
/// `direct`, the daemon takes direct fetches on loopback.
fn setup_reprise(t: &Path, workload: &Workload, direct: bool) -> Reprise {
    fs::create_dir_all(t).expect("setup dir");
    let bin = sibling_bin("reprise");
    let orch_bin = sibling_bin("reprise-orchestrator");
    let repo = t.join("repo");
    let clone = t.join("clone");
    let producer_data = t.join("producer-data");
    let config = t.join("config");
    fs::create_dir_all(&config).expect("config dir");
    hello_repo(&repo);
    let cloned = Command::new("git")
        .args(["clone", "-q"])
        .arg(&repo)
        .arg(&clone)
        .status()
        .expect("git clone");
    assert!(cloned.success(), "git clone failed");
    let namespace = reprise_executor::pipeline::compute_key(
        &reprise_executor::pipeline::KeyRequest::at(&repo),
        &reprise_executor::inputs::process_env(),
    )
    .expect("key")
    .inputs
    .namespace;

    let state = t.join("orchestrator");
    let state_s = state.to_str().expect("utf-8 path");
    orchestrator_cli(&orch_bin, &["init", "--dir", state_s]);
    let issue = |name: &str, trusted: bool| {
        let out = t.join(format!("{name}.pem"));
        let mut args = vec![
            "issue",
            "--dir",
            state_s,
            "--name",
            name,
            "--repo",
            &namespace,
            "--out",
            out.to_str().expect("utf-8 path"),
        ];
        if trusted {
            args.push("--trusted");
        }
        orchestrator_cli(&orch_bin, &args);
        out
    };
    let producer_pem = issue("producer", true);
    let consumer_pem = issue("consumer", false);

    let mut rec = Vec::new();
    for (at, chunk) in workload.stdout.chunks(4096).enumerate() {
        record::push(&mut rec, StreamId::Stdout, at as u32, chunk);
    }
    let creds =
        reprise_executor::link::Credentials::load(&producer_pem).expect("producer credentials");
    store_result(
        &repo,
        &producer_data,
        Some(&creds),
        &rec,
        &workload.dir.join("artifacts"),
    );

    let addr = format!("127.0.0.1:{}", free_port(true));
    let orchestrator_log = t.join("orchestrator.log");
    let orchestrator = Killed::spawn(
        Command::new(&orch_bin)
            .args(["serve", "--dir", state_s, "--listen", &addr])
            .env("REPRISE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&orchestrator_log).expect("orchestrator log")),
        "reprise-orchestrator serve",
    );
    wait_until(
        "reprise-orchestrator serves",
        Duration::from_secs(10),
        || {
            fs::read_to_string(&orchestrator_log)
                .unwrap_or_default()
                .contains("serving on")
        },
    );
    let daemon_log = t.join("daemon.log");
    let mut daemon = Command::new(&bin);
    daemon.arg("daemon");
    if direct {
        daemon.args(["--direct", "127.0.0.1:0"]);
    }
    let daemon = Killed::spawn(
        daemon
            .env("XDG_DATA_HOME", &producer_data)
            .env("XDG_CONFIG_HOME", &config)
            .env("REPRISE_ORCHESTRATOR", &addr)
            .env("REPRISE_CREDENTIALS", &producer_pem)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&daemon_log).expect("daemon log")),
        "reprise daemon",
    );
    wait_until(
        "the producer's reprise daemon serves its result",
        Duration::from_secs(30),
        || {
            fs::read_to_string(&daemon_log)
                .unwrap_or_default()
                .contains("serving 1 result")
        },
    );
    if direct {
        let log = fs::read_to_string(&daemon_log).unwrap_or_default();
        assert!(
            log.contains("fetch straight from here"),
            "the daemon does not take direct fetches:\n{log}"
        );
    }
    Reprise {
        bin,
        clone,
        config,
        addr,
        consumer_pem,
        orchestrator_log,
        direct,
        _orchestrator: orchestrator,
        _daemon: daemon,
    }
}

// ------------------------------------------------------ the rounds' files

/// The file system every file of the rounds is made and removed on: by
/// default a fresh ext4 made for the run (as `mkfs.ext4` makes one, with
/// a journal) on a loop device ([`LoopMount`]), which needs root; with
/// `--here`, or where it cannot be made, the temporary folder's own.
///
/// Why: the rounds make and remove thousands of files a minute (each
/// round's stores, restored artifacts and Turborepo's outputs), and on an
/// ext4 without a journal, as this machine's root is, the kernel does not
/// reuse an inode freed in the last minute (six, while its inode table
/// block is not yet written back): every new file scans its group's
/// inode bitmap from the start past all of them (`recently_deleted` in
/// `find_inode_bit`, for file systems without a journal only). So each
/// round made the next ones slower, Reprise's (more files a round) more
/// than Turborepo's: on a fresh ext4 without a journal, three runs in a row
/// gave a local hit of 9.8, 11.6 and 12.7 ms, alternated with 9.5, 9.2
/// and 9.6 ms on one with a journal. A journaled ext4 skips that scan, as
/// most machines' file systems do; the bench then measures the tools,
/// not how many files it removed in the last minutes.
struct RoundsFs {
    /// Where the bench's folder is made.
    root: PathBuf,
    /// What it is, for the report.
    what: String,
    /// The loop mount, unmounted when dropped.
    _mounted: Option<LoopMount>,
}

/// Size of the file system made for the rounds: they keep under 300 MiB.
const ROUNDS_FS_BYTES: u64 = 2 << 30;

impl RoundsFs {
    fn new(here: bool) -> RoundsFs {
        let tmp = std::env::temp_dir();
        let own = |why: &str| RoundsFs {
            what: format!("{}'s own ({}){why}", tmp.display(), describe_fs(&tmp)),
            root: tmp.clone(),
            _mounted: None,
        };
        if here {
            return own("");
        }
        match LoopMount::make(&tmp) {
            Ok(m) => RoundsFs {
                root: m.mnt.clone(),
                what: format!(
                    "a fresh {} MiB ext4 with a journal on {} (direct I/O), made for this run \
                     (--here: {}'s own, {})",
                    ROUNDS_FS_BYTES >> 20,
                    m.device,
                    tmp.display(),
                    describe_fs(&tmp)
                ),
                _mounted: Some(m),
            },
            Err(e) => {
                progress(&format!(
                    "no file system made for the rounds ({e}); they run in {}",
                    tmp.display()
                ));
                own(&format!("; a fresh one could not be made: {e}"))
            }
        }
    }
}

/// A file system image in a temporary folder, on a loop device that reads
/// and writes it directly (not through the page cache of the file system
/// it is on), mounted on a folder beside it until dropped. Through the
/// page cache instead (`mount -o loop`), every flush of the file system
/// became an `fsync` of the image's cached pages: Reprise's remote hit,
/// which syncs what it fetched, took 53–68 ms against 39–43 ms directly
/// (three runs each, alternated), Turborepo's, which syncs nothing, the
/// same.
struct LoopMount {
    mnt: PathBuf,
    device: String,
    /// Whether the device goes by itself at the unmount.
    detached: bool,
    /// Holds the image and the mount point; removed after the unmount.
    _dir: tempfile::TempDir,
}

/// Runs `cmd`, a system tool (looked for in the sbin folders too, which a
/// user's `PATH` may lack); its standard output, or what went wrong.
fn run_tool(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{path}:/usr/sbin:/sbin"));
    match cmd.output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(format!(
            "{shown}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

impl LoopMount {
    fn make(under: &Path) -> Result<LoopMount, String> {
        let dir = tempfile::Builder::new()
            .prefix("turbo-bench-fs-")
            .tempdir_in(under)
            .map_err(|e| format!("a folder in {}: {e}", under.display()))?;
        let image = dir.path().join("ext4.img");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
        fs::File::create(&image)
            .and_then(|f| f.set_len(ROUNDS_FS_BYTES))
            .map_err(|e| format!("{}: {e}", image.display()))?;
        // Inode tables and journal written now, not by a kernel thread
        // while the rounds run.
        run_tool(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&image),
        )?;
        let device = run_tool(
            Command::new("losetup")
                .args(["--find", "--show", "--direct-io=on"])
                .arg(&image),
        )?;
        let mounted = run_tool(Command::new("mount").arg(&device).arg(&mnt));
        // Detached while mounted, the device is let go at the unmount,
        // even that of a run killed before its own cleanup.
        let detached = run_tool(Command::new("losetup").arg("--detach").arg(&device)).is_ok();
        mounted?;
        Ok(LoopMount {
            mnt,
            device,
            detached,
            _dir: dir,
        })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("--lazy");
            }
            run_tool(cmd.arg(&self.mnt)).is_ok()
        };
        // A process the rounds started may still hold a file there (a
        // Turborepo daemon): then it goes once that process is gone, and
        // the device with it.
        if !umount(false) && !umount(true) {
            progress(&format!("could not unmount {}", self.mnt.display()));
        }
        if !self.detached
            && let Err(e) = run_tool(Command::new("losetup").arg("--detach").arg(&self.device))
        {
            progress(&format!("could not detach {}: {e}", self.device));
        }
    }
}

/// `dir`'s file system as the report names it ([`describe_mount`]).
fn describe_fs(dir: &Path) -> String {
    let Ok(dir) = dir.canonicalize() else {
        return "unknown file system".into();
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let journals: Vec<String> = fs::read_dir("/proc/fs/jbd2")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    describe_mount(&mountinfo, &journals, &dir)
}

/// The file system `dir` is on, from `mountinfo` (`/proc/self/mountinfo`:
/// the mount with the longest mount point holding `dir`): its type and
/// source, and for ext4 whether it has a journal (one of `journals`, the
/// entries of `/proc/fs/jbd2`, is named after its device).
fn describe_mount(mountinfo: &str, journals: &[String], dir: &Path) -> String {
    // Fields: id parent major:minor root mount-point options ... - type source ...
    let mount = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let (kind, source) = (right.next()?, right.next()?);
            dir.starts_with(point)
                .then_some((point.len(), kind, source))
        })
        .max_by_key(|(len, ..)| *len);
    let Some((_, kind, source)) = mount else {
        return "unknown file system".into();
    };
    if kind != "ext4" {
        return format!("{kind} on {source}");
    }
    let device = source.rsplit('/').next().unwrap_or(source);
    match journals
        .iter()
        .any(|j| j.starts_with(&format!("{device}-")))
    {
        true => format!("ext4 with a journal on {source}"),
        false => format!("ext4 without a journal on {source}"),
    }
}

/// Sleeps `hold`, or until SIGINT or SIGTERM, so that what the rounds set
/// up (the services, the file system made for them) is taken down either
/// way.
fn hold_until_signalled(hold: Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime to wait on");
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::time::sleep(hold) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
}

// -------------------------------------------------------------------- main

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64())
}

fn main() {
    let o = options();
    let started = Instant::now();
    check_tool("node");
    check_tool("npm");
    let (turbo_bin, server_js) = install_npm_tools(&o.npm_dir);
    // Dropped last: everything on it is gone by then.
    let rounds_fs = RoundsFs::new(o.here);
    progress(&format!("the rounds' files: {}", rounds_fs.what));
    let tmp = tempfile::Builder::new()
        .prefix("turbo-bench-")
        .tempdir_in(&rounds_fs.root)
        .expect("temp dir");
    let t = tmp.path();

    progress("writing the workload: 1 MiB of output, 20 x 1 MiB incompressible artifacts");
    let workload = Workload::write(&t.join("workload"));

    progress("Turborepo: workspace, remote cache server, first run");
    let ws = t.join("turbo");
    turbo_workspace(&ws, &workload);
    let server = CacheServer::start(
        &server_js,
        &t.join("turbo-remote"),
        &t.join("turbo-remote.log"),
    );
    let mut turbo = Turbo {
        bin: turbo_bin,
        ws,
        workload_dir: workload.dir.clone(),
        server,
        hash: String::new(),
    };
    turbo.prime();

    progress("Reprise: orchestrators, producers' results and daemons (direct, relayed)");
    let reprise = setup_reprise(&t.join("reprise-direct"), &workload, true);
    let relayed = setup_reprise(&t.join("reprise-relayed"), &workload, false);

    progress("one untimed round of each");
    let data = |i: usize| t.join(format!("consumer-{i}"));
    let data_relayed = |i: usize| t.join(format!("consumer-relayed-{i}"));
    turbo.hit(true, &workload);
    turbo.hit(false, &workload);
    reprise.hit(true, &data(0), &workload);
    reprise.hit(false, &data(0), &workload);
    relayed.hit(true, &data_relayed(0), &workload);
    let _ = fs::remove_dir_all(data(0));
    let _ = fs::remove_dir_all(data_relayed(0));

    let (mut t_remote, mut t_local, mut r_remote, mut r_local, mut r_relayed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 1..=o.rounds {
        let mut turbo_round = || {
            t_remote.push(turbo.hit(true, &workload));
            t_local.push(turbo.hit(false, &workload));
        };
        let mut reprise_round = || {
            r_remote.push(reprise.hit(true, &data(i), &workload));
            r_local.push(reprise.hit(false, &data(i), &workload));
            let _ = fs::remove_dir_all(data(i));
        };
        let mut relayed_round = || {
            r_relayed.push(relayed.hit(true, &data_relayed(i), &workload));
            let _ = fs::remove_dir_all(data_relayed(i));
        };
        if i % 2 == 0 {
            turbo_round();
            reprise_round();
            relayed_round();
        } else {
            relayed_round();
            reprise_round();
            turbo_round();
        }
        progress(&format!(
            "round {i}/{}: remote turbo {} reprise {} (relayed {}); local turbo {} reprise {}",
            o.rounds,
            ms(*t_remote.last().expect("timed")),
            ms(*r_remote.last().expect("timed")),
            ms(*r_relayed.last().expect("timed")),
            ms(*t_local.last().expect("timed")),
            ms(*r_local.last().expect("timed")),
        ));
    }
    let spread = |v: &[Duration]| {
        let min = v.iter().min().expect("rounds");
        let max = v.iter().max().expect("rounds");
        format!("{} – {}", ms(*min), ms(*max))
    };
    let rows = [
        ("remote hit", &t_remote, &r_remote),
        ("remote relay", &t_remote, &r_relayed),
        ("local hit", &t_local, &r_local),
    ];
    println!(
        "turbo_bench: {} interleaved rounds on 127.0.0.1; {}.\n\
         Workload: {} bytes of output on stdout, {ARTIFACTS} x {ARTIFACT_BYTES} bytes of incompressible artifacts.\n\
         Turborepo {TURBO_VERSION} (native binary) with {REMOTE_CACHE} (HTTP, local storage);\n\
         Reprise: `reprise run --no-serve` in a clone, remote = a fresh store fetched from a\n\
         `reprise daemon --direct` that `reprise-orchestrator serve` introduced (mutual TLS over TCP),\n\
         relayed = the same through the orchestrator's relay from a daemon without --direct.\n\
         Files of the rounds (workspaces, stores, caches, restored outputs): {}.\n",
        o.rounds,
        machine(),
        workload.stdout.len(),
        rounds_fs.what,
    );
    println!(
        "{:<12}  {:>10}  {:>10}  {:>7}   {:<21}  {:<21}",
        "what", "turborepo", "reprise", "ratio", "turborepo min – max", "reprise min – max"
    );
    for (what, turbo_times, reprise_times) in rows {
        let (tm, rm) = (median(turbo_times.clone()), median(reprise_times.clone()));
        println!(
            "{what:<12}  {:>10}  {:>10}  {:>7}   {:<21}  {:<21}",
            ms(tm),
            ms(rm),
            ratio(rm, tm),
            spread(turbo_times),
            spread(reprise_times)
        );
    }
    println!("\nratio = Reprise's median / Turborepo's median (lower is faster).");
    if let Some(other) = &o.against {
        against(&reprise, other, o.rounds, t, &workload);
    }
    if let Some(hold) = o.hold {
        eprintln!(
            "turbo_bench: holding for {hold:?} (SIGINT or SIGTERM ends it); a remote hit by hand:\n  \
             cd {} && rm -rf reprise-artifacts && XDG_DATA_HOME=$(mktemp -d) XDG_CONFIG_HOME={} \
             REPRISE_ORCHESTRATOR={} REPRISE_CREDENTIALS={} {} run --no-serve >/dev/null\n  \
             turbo: cd {} && rm -rf .turbo/cache packages/app/out && TURBO_API={} TURBO_TOKEN={TOKEN} \
             TURBO_TEAM=bench {} run build >/dev/null",
            reprise.clone.display(),
            reprise.config.display(),
            reprise.addr,
            reprise.consumer_pem.display(),
            reprise.bin.display(),
            turbo.ws.display(),
            turbo.server.url,
            turbo.bin.display(),
        );
        hold_until_signalled(hold);
    }
    progress(&format!("took {:.1} s", started.elapsed().as_secs_f64()));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
30 22 0:26 / /tmp/x rw shared:9 - tmpfs tmpfs rw
41 22 7:0 / /tmp/fs/mnt rw,relatime shared:20 - ext4 /dev/loop0 rw
";

    #[test]
    fn a_folder_is_on_the_mount_with_the_longest_point_holding_it() {
        let journals = ["loop0-8".to_string()];
        let of = |dir: &str| describe_mount(MOUNTINFO, &journals, Path::new(dir));
        assert_eq!(of("/tmp/fs/mnt/bench"), "ext4 with a journal on /dev/loop0");
        assert_eq!(of("/tmp/x/y"), "tmpfs on tmpfs");
        // Not a mount point by a prefix of its name: /tmp/xy is on /.
        assert_eq!(of("/tmp/xy"), "ext4 without a journal on /dev/vda");
        assert_eq!(of("/home"), "ext4 without a journal on /dev/vda");
        assert_eq!(
            describe_mount("", &journals, Path::new("/tmp")),
            "unknown file system"
        );
    }

    #[test]
    fn the_rounds_file_system_is_a_fresh_journaled_ext4_gone_after_the_run() {
        use std::os::unix::fs::MetadataExt;
        let under = tempfile::tempdir().unwrap();
        let made = LoopMount::make(under.path());
        let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if !root {
            // Not root: the loop device cannot be set up, and the bench
            // says so and runs in the temporary folder.
            assert!(made.is_err(), "a loop device set up without root");
            return;
        }
        let m = made.expect("as root, the file system is made");
        assert_eq!(
            describe_fs(&m.mnt),
            format!("ext4 with a journal on {}", m.device)
        );
        fs::write(m.mnt.join("file"), b"kept here").unwrap();
        assert!(
            fs::read_dir(under.path()).unwrap().count() == 1,
            "the image and the mount point are in one folder"
        );
        let (mnt, device) = (m.mnt.clone(), m.device.clone());
        drop(m);
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mountinfo.contains(&*mnt.to_string_lossy()),
            "{} is still mounted",
            mnt.display()
        );
        assert!(!mnt.exists(), "the image's folder is removed");
        let name = device.rsplit('/').next().unwrap();
        let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
        assert!(!backing.exists(), "{device} still holds the image");
    }
}
