//! Helpers for the system tests that involve an orchestrator: the real
//! `reprise-orchestrator` binary, a team of identities, results committed
//! to a store as a real run would (sealed or not), and clones.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::run_support::{Run, Sandbox, example_hello, reprise_bin};

pub fn orchestrator_bin() -> PathBuf {
    let bin = reprise_bin().with_file_name("reprise-orchestrator");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace` first",
        bin.display()
    );
    bin
}

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn orchestrator(args: &[&str]) {
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

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port()
}

pub fn namespace(s: &Sandbox) -> String {
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

/// An mkfile that passes `reprise run`'s check (which comes before any
/// lookup) and whose tests fail: for repositories whose results the tests
/// make by hand. Their runs use `--mode replay-only`, so when no result
/// counts they stop with exit 10 instead of starting anything.
pub const CHECKED_MKFILE: &str =
    "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/never-built\ntest:V:\n\tfalse\n";

/// The exit code of `--mode replay-only` when no result counts.
pub const NOT_COUNTED: i32 = 10;

pub fn with_orchestrator(cmd: &mut Command, addr: &str, creds: &Path) {
    cmd.env("REPRISE_ORCHESTRATOR", addr)
        .env("REPRISE_CREDENTIALS", creds);
}

/// An orchestrator state folder, executor A's repository (the hello
/// example over an empty root commit) and two identities for its
/// namespace: `alice` (trusted) and `ci` (not).
pub struct Team {
    pub dir: tempfile::TempDir,
    pub state: String,
    pub a: Sandbox,
    pub alice: PathBuf,
    pub ci: PathBuf,
}

impl Team {
    pub fn new() -> Team {
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

/// Commits a passed result for the repository's HEAD to `sandbox`'s store,
/// as a real run would have, without booting a VM, sealed with the
/// credentials in `sealer` (none: unsealed). Returns its stdout.
pub fn fabricate_result(sandbox: &Sandbox, text: &str, sealer: Option<&Path>) -> Vec<u8> {
    fabricate_result_for(sandbox, text, sealer, "qemu")
}

/// [`fabricate_result`] for the key of a run with driver class `driver`.
pub fn fabricate_result_for(
    sandbox: &Sandbox,
    text: &str,
    sealer: Option<&Path>,
    driver: &str,
) -> Vec<u8> {
    fabricate_result_with(sandbox, text, sealer, driver, &[])
}

/// [`fabricate_result_for`] with `more` artifacts (path, content) beside
/// `report.txt`.
pub fn fabricate_result_with(
    sandbox: &Sandbox,
    text: &str,
    sealer: Option<&Path>,
    driver: &str,
    more: &[(&str, &[u8])],
) -> Vec<u8> {
    use reprise_protocol::manifest::{MANIFEST_VERSION, Outcome, Phase, Producer, ResultManifest};
    use reprise_protocol::record::{self, StreamId};
    let mut request = reprise_executor::pipeline::KeyRequest::at(&sandbox.repo());
    request.driver = driver.into();
    let keyed =
        reprise_executor::pipeline::compute_key(&request, &reprise_executor::inputs::process_env())
            .expect("key");
    let stdout = format!("{text}\n").into_bytes();
    let mut rec = Vec::new();
    record::push(&mut rec, StreamId::Stdout, 0, &stdout);
    let arts = sandbox.dir.path().join("staged-artifacts");
    fs::create_dir_all(&arts).expect("artifacts");
    fs::write(arts.join("report.txt"), format!("report of {text}\n")).expect("artifact");
    for (path, bytes) in more {
        fs::write(arts.join(path), bytes).expect("artifact");
    }
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
        snapshot: reprise_protocol::manifest::Snapshot::Fresh,
        output_sha256: reprise_protocol::digest::Sha256Digest::of(b""),
        output_blake3: None,
        output_bytes: 0,
        artifacts: Vec::new(),
        crontab: None,
        container_image: None,
    };
    let creds = sealer.map(|p| reprise_executor::link::Credentials::load(p).expect("credentials"));
    reprise_executor::store::Store::new(sandbox.store())
        .commit(
            manifest,
            &rec,
            Some(&arts),
            creds
                .as_ref()
                .map(|c| c as &dyn reprise_executor::store::Sealer),
        )
        .expect("commit");
    fs::remove_dir_all(&arts).expect("remove staging");
    stdout
}

/// `reprise-orchestrator serve` on `addr`, its log (info level) in `log`.
pub fn serve_logged(state: &str, addr: &str, log: &Path) -> Killed {
    Killed(
        Command::new(orchestrator_bin())
            .args(["serve", "--dir", state, "--listen", addr])
            .env("REPRISE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).expect("orchestrator log"))
            .spawn()
            .expect("orchestrator serves"),
    )
}

/// Issues credentials for `name` on `repos` into `out`.
pub fn issue(state: &str, name: &str, repos: &[&str], trusted: bool, out: &Path) {
    let out = out.to_str().expect("utf-8 path");
    let mut args = vec!["issue", "--dir", state, "--name", name, "--out", out];
    for r in repos {
        args.extend(["--repo", r]);
    }
    if trusted {
        args.push("--trusted");
    }
    orchestrator(&args);
}

pub fn serve_on(state: &str, addr: &str) -> Killed {
    Killed(
        Command::new(orchestrator_bin())
            .args(["serve", "--dir", state, "--listen", addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("orchestrator serves"),
    )
}

pub fn clone_of(a: &Sandbox) -> Sandbox {
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

pub fn nix_kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid}");
}

/// `reprise daemon` in `s` with credentials `creds`, its stderr in `log`;
/// returns it once it says it is serving, with what it said by then.
pub fn serving_daemon(s: &Sandbox, addr: &str, creds: &Path, log: &Path) -> (Killed, String) {
    let mut cmd = s.reprise(&["daemon"]);
    with_orchestrator(&mut cmd, addr, creds);
    cmd.stderr(fs::File::create(log).expect("daemon log"));
    let daemon = Killed(cmd.spawn().expect("daemon"));
    let read_log = || fs::read_to_string(log).unwrap_or_default();
    assert!(
        crate::run_support::wait_until(Duration::from_secs(30), || read_log().contains("serving")),
        "{}",
        read_log()
    );
    (daemon, read_log())
}

/// `reprise daemon --direct 127.0.0.1:0` in `s` with credentials `creds`,
/// its stderr in `log`; returns it once it says it is serving and which
/// port peers fetch straight from, with that port.
pub fn direct_daemon(s: &Sandbox, addr: &str, creds: &Path, log: &Path) -> (Killed, u16) {
    let mut cmd = s.reprise(&["daemon", "--direct", "127.0.0.1:0"]);
    with_orchestrator(&mut cmd, addr, creds);
    cmd.stderr(fs::File::create(log).expect("daemon log"));
    let daemon = Killed(cmd.spawn().expect("daemon"));
    let read_log = || fs::read_to_string(log).unwrap_or_default();
    let port = || -> Option<u16> {
        let text = read_log();
        let after = text.split("fetch straight from here (127.0.0.1:").nth(1)?;
        after.split(')').next()?.parse().ok()
    };
    assert!(
        crate::run_support::wait_until(Duration::from_secs(30), || read_log().contains("serving")
            && port().is_some()),
        "the daemon serves and says where peers fetch from:\n{}",
        read_log()
    );
    (daemon, port().expect("the direct port"))
}

/// `reprise-orchestrator serve` on `addr` with its HTTP listener on a port
/// of its choosing (`--http 127.0.0.1:0`), its log in `log`; returns it
/// once it says where the dashboard is, with that address.
pub fn serve_with_http(state: &str, addr: &str, log: &Path) -> (Killed, std::net::SocketAddr) {
    let server = Killed(
        Command::new(orchestrator_bin())
            .args(["serve", "--dir", state, "--listen", addr])
            .args(["--http", "127.0.0.1:0"])
            .env("REPRISE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).expect("orchestrator log"))
            .spawn()
            .expect("orchestrator serves"),
    );
    let read_log = || fs::read_to_string(log).unwrap_or_default();
    let http = |text: &str| -> Option<std::net::SocketAddr> {
        text.split("dashboard on http://")
            .nth(1)?
            .split('/')
            .next()?
            .parse()
            .ok()
    };
    assert!(
        crate::run_support::wait_until(Duration::from_secs(30), || http(&read_log()).is_some()),
        "the orchestrator did not say where its dashboard is:\n{}",
        read_log()
    );
    let at = http(&read_log()).expect("the dashboard's address");
    (server, at)
}

/// A GET of `path` over plain HTTP/1.1: (status code, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head}"));
    (code, body.to_string())
}

/// The value of the sample `name` (with its labels, if any) in an
/// OpenMetrics text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The request token the stand-in runner hands the job.
pub const REQUEST_TOKEN: &str = "runner-request-token";

/// GitHub Actions' ID token endpoint, as the runner serves it to a job
/// with `id-token: write`: answers `token` to a bearer of
/// [`REQUEST_TOKEN`] that asks for `audience`; 401/400 otherwise. Records
/// each request line.
pub struct TokenEndpoint {
    pub url: String,
    pub asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl TokenEndpoint {
    pub fn serve(token: String, audience: String) -> TokenEndpoint {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/_apis/token?api-version=2.0",
            listener.local_addr().expect("addr")
        );
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut bearer = None;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':')
                        && name.eq_ignore_ascii_case("authorization")
                    {
                        bearer = Some(value.trim().to_string());
                    }
                }
                log.lock().expect("log").push(line.trim().to_string());
                let wanted = format!(
                    "audience={}",
                    audience.replace(':', "%3A").replace('/', "%2F")
                );
                let (status, body) =
                    if bearer.as_deref() != Some(&format!("Bearer {REQUEST_TOKEN}")) {
                        (
                            "401 Unauthorized",
                            serde_json::json!({"message": "bad request token"}),
                        )
                    } else if !line.contains(&wanted) {
                        (
                            "400 Bad Request",
                            serde_json::json!({"message": "unexpected audience"}),
                        )
                    } else {
                        (
                            "200 OK",
                            serde_json::json!({"count": token.len(), "value": token}),
                        )
                    };
                let body = body.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        TokenEndpoint { url, asked }
    }
}

/// A running orchestrator that takes CI logins: its state folder, address,
/// team CA fingerprint and log.
pub struct CiOrchestrator {
    pub state: String,
    pub addr: String,
    pub fingerprint: String,
    pub log: PathBuf,
    _server: Killed,
}

/// An orchestrator in `dir` on loopback whose `[ci.FORGE]` (`github` or
/// `gitlab`) takes tokens of the issuer at `issuer_url` with the audience
/// `reprise login` asks for by default, granting namespaces on the host
/// `example.com`.
pub fn ci_orchestrator(dir: &Path, forge: &str, issuer_url: &str) -> CiOrchestrator {
    let state = dir
        .join("orchestrator")
        .to_str()
        .expect("utf-8")
        .to_string();
    orchestrator(&["init", "--dir", &state]);
    let addr = format!("127.0.0.1:{}", free_udp_port());
    fs::write(
        Path::new(&state).join("orchestrator.toml"),
        format!(
            "[ci.{forge}]\nissuer = \"{issuer_url}\"\naudience = \"reprise://{addr}\"\nallow_http_loopback = true\nhost = \"example.com\"\n"
        ),
    )
    .expect("settings");
    let out = Command::new(orchestrator_bin())
        .args(["fingerprint", "--dir", &state])
        .output()
        .expect("reprise-orchestrator fingerprint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fingerprint = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    let log = dir.join("orchestrator.log");
    let server = serve_logged(&state, &addr, &log);
    CiOrchestrator {
        state,
        addr,
        fingerprint,
        log,
        _server: server,
    }
}
