//! Benchmark of the orchestrator: a replay through it beside a local
//! replay, lookup latency with many connected executors, the relay's
//! transfer rate beside plain quinn on the same loopback, and the
//! orchestrator's memory per connected executor. Prints medians (and
//! percentiles for lookups); asserts nothing about them, only that every
//! replay really came through the orchestrator and every lookup answered
//! what it should.
//!
//! Usage: `peer_bench [--runs N] [--clients N] [--lookups M]
//! [--resume-rounds N] [--resume-only]` (defaults 7, 1,000, 2,000 and 3). Build first with `cargo build --release --workspace`:
//! `reprise` and `reprise-orchestrator` are looked for next to this binary.
//! Everything runs on 127.0.0.1 in temp folders, with a real
//! `reprise-orchestrator serve` process (killed when the bench ends), a
//! producer executor in this process, and the real `reprise run
//! --no-serve` as the consumer; no VM is booted.
//!
//! What is measured:
//! 1. `reprise run --no-serve` replaying a result of 1 MiB of output and
//!    20 MiB of artifacts from its local store, beside the same run with a
//!    fresh empty store fetching it from a peer through the orchestrator.
//! 2. With `--clients` light clients connected (QUIC, mTLS, `Hello`, an
//!    `Announce` of a few keys each; 10 identities, each reused across many
//!    connections), the latency of `Lookup` requests from one more client,
//!    half hits and half misses, and the time to connect them all.
//! 3. The relayed transfer's rate (the fetch alone, in process) beside a
//!    plain quinn transfer of the same bytes, direct and through a trivial
//!    in-process relay.
//! 4. The orchestrator's resident memory before and after the light clients
//!    connected, per client.
//! 5. A 1 GiB artifact fetched through the orchestrator (in process, from
//!    an in-process producer) whole, beside the rest of the same transfer
//!    cut at 50 % (the producer told to stop there): the resumed fetch
//!    alone is timed, `--resume-rounds` rounds each (default 3),
//!    interleaved. `--resume-only` runs this case alone. It needs about
//!    3 GiB of free disk in the temp folder while it runs (the producer's
//!    copy, one fetched copy at a time), all removed at the end.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream};
use reprise_bench::{hello_repo, median, ms, sibling_bin, store_large_result};
use reprise_executor::link::{Credentials, Found, Link, read_message, write_message};
use reprise_executor::pipeline;
use reprise_executor::store::{Sealer, Store};
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::key::KeyInputs;
use reprise_protocol::manifest::ResultManifest;
use reprise_protocol::wire::{Held, Message, PROTOCOL_VERSION, Sealed};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Identities issued for the light clients; each is used by many
/// connections (issuing one per client through the CLI is slow).
const IDENTITIES: usize = 10;
/// Keys each light client announces.
const KEYS_PER_CLIENT: usize = 3;
/// Light clients that connect at the same time.
const CONNECT_CONCURRENCY: usize = 64;
/// Client endpoints (UDP sockets) the light clients share.
const CLIENT_ENDPOINTS: usize = 10;
/// A replay that takes longer missed and started a real run.
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// Write size of the plain quinn sender.
const PLAIN_CHUNK: usize = 64 << 10;

struct Options {
    runs: usize,
    clients: usize,
    lookups: usize,
    resume_rounds: usize,
    resume_only: bool,
}

const USAGE: &str =
    "usage: peer_bench [--runs N] [--clients N] [--lookups M] [--resume-rounds N] [--resume-only]";

fn options() -> Options {
    let mut o = Options {
        runs: 7,
        clients: 1_000,
        lookups: 2_000,
        resume_rounds: 3,
        resume_only: false,
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
            "--clients" => o.clients = number().max(1),
            "--lookups" => o.lookups = number().max(2),
            "--resume-rounds" => o.resume_rounds = number().max(1),
            "--resume-only" => o.resume_only = true,
            _ => reprise_bench::usage_exit(&a, USAGE),
        }
    }
    o
}

/// The nearest-rank percentile `p` (0–100) of `sorted`.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms3(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn progress(what: &str) {
    eprintln!("peer_bench: {what}");
}

/// `reprise key --json` in `dir`: (key, namespace).
fn reprise_key(bin: &Path, dir: &Path, data: &Path) -> (String, String) {
    let out = Command::new(bin)
        .args(["key", "--json"])
        .current_dir(dir)
        .env("XDG_DATA_HOME", data)
        .output()
        .expect("reprise key runs");
    assert!(
        out.status.success(),
        "reprise key --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("key --json is JSON");
    let field = |v: &serde_json::Value| v.as_str().expect("a string").to_string();
    (field(&v["key"]), field(&v["inputs"]["namespace"]))
}

/// Runs `reprise run --no-serve` in `dir` with the store under `data` and
/// `env` added (the orchestrator settings, if any); stdout is discarded,
/// stderr kept. Returns the wall time and the stderr; panics with it unless
/// the run exited 0 and its stderr contains `expect`.
async fn time_replay(
    bin: &Path,
    dir: &Path,
    data: &Path,
    env: &[(&str, &str)],
    expect: &str,
) -> Duration {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["run", "--no-serve"])
        .current_dir(dir)
        .env("XDG_DATA_HOME", data)
        .env_remove("REPRISE_ORCHESTRATOR")
        .env_remove("REPRISE_CREDENTIALS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let start = Instant::now();
    let child = cmd.spawn().expect("reprise starts");
    let out = tokio::time::timeout(RUN_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "reprise run in {} took over {RUN_DEADLINE:?}: it probably missed and started a real run",
                dir.display()
            )
        })
        .expect("reprise run");
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains(expect),
        "reprise run in {} exited {:?} without saying {expect:?}:\n{stderr}",
        dir.display(),
        out.status.code()
    );
    took
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port()
}

/// `reprise-orchestrator` with `args`, which must succeed.
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

/// Issues credentials to `name` for `namespace` and returns their path.
fn issue(bin: &Path, state: &Path, out_dir: &Path, name: &str, ns: &str, trusted: bool) -> PathBuf {
    let out = out_dir.join(format!("{name}.pem"));
    let mut args = vec![
        "issue",
        "--dir",
        state.to_str().expect("utf-8 path"),
        "--name",
        name,
        "--repo",
        ns,
        "--out",
        out.to_str().expect("utf-8 path"),
    ];
    if trusted {
        args.push("--trusted");
    }
    orchestrator_cli(bin, &args);
    out
}

/// A `reprise-orchestrator serve` process, killed when dropped.
struct Orchestrator {
    child: std::process::Child,
    addr: String,
}

impl Orchestrator {
    /// Starts serving `state` on a free loopback port, its log in `log`;
    /// returns once it listens.
    fn start(bin: &Path, state: &Path, log: &Path) -> Orchestrator {
        let addr = format!("127.0.0.1:{}", free_udp_port());
        let child = Command::new(bin)
            .args(["serve", "--dir"])
            .arg(state)
            .args(["--listen", &addr])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log).expect("orchestrator log"))
            .spawn()
            .expect("reprise-orchestrator serve starts");
        let mut o = Orchestrator { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if text.contains("serving on") {
                return o;
            }
            let exited = o.child.try_wait().expect("try_wait").is_some();
            assert!(
                !exited && Instant::now() < deadline,
                "reprise-orchestrator serve did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident memory, KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status of the orchestrator");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(path: &Path) -> Arc<Credentials> {
    Arc::new(Credentials::load(path).expect("credentials load"))
}

/// Reads a stream to its end with quinn's own chunks; the bytes read.
async fn drain(recv: &mut RecvStream) -> u64 {
    let mut n = 0;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
        n += chunk.bytes.len() as u64;
    }
    n
}

/// Fetches `key` through the orchestrator on a raw stream and reads the
/// data to its end without checking or storing it: the relay alone.
/// Returns the bytes after the header and the time.
async fn raw_relay_fetch(peer: &Link, held: &Held) -> (u64, Duration) {
    let start = Instant::now();
    let (mut send, mut recv) = peer.connection().open_bi().await.expect("open");
    let fetch = Message::Fetch {
        key: held.key,
        namespace: held.namespace.clone(),
        resume: None,
    };
    write_message(&mut send, &fetch).await.expect("write fetch");
    let _ = send.finish();
    match read_message(&mut recv).await.expect("transfer header") {
        Message::Transfer { .. } => {}
        other => panic!("the orchestrator answered {other:?} to a fetch"),
    }
    let n = drain(&mut recv).await;
    (n, start.elapsed())
}

/// Plain quinn on loopback: a server that answers each stream with
/// `bytes` bytes, and a relay in front of it.
struct Plain {
    client: Endpoint,
    direct: Connection,
    relayed: Connection,
    _server: Endpoint,
    _relay: Endpoint,
}

impl Plain {
    async fn start(bytes: u64) -> Plain {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("self-signed certificate");
        let cert: CertificateDer<'static> = ck.cert.der().clone();
        let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let server_config = || {
            quinn::ServerConfig::with_single_cert(vec![cert.clone()], key()).expect("server config")
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).expect("root");
        let client_config =
            quinn::ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config");
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");

        let server = Endpoint::server(server_config(), loopback).expect("server endpoint");
        let server_addr = server.local_addr().expect("addr");
        let accepting = server.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        send_bytes_on_request(conn, bytes).await;
                    }
                });
            }
        });

        let relay = Endpoint::server(server_config(), loopback).expect("relay endpoint");
        let relay_addr = relay.local_addr().expect("addr");
        let upstream = relay
            .connect_with(client_config.clone(), server_addr, "localhost")
            .expect("relay connects")
            .await
            .expect("relay connected");
        let accepting = relay.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        relay_streams(conn, upstream).await;
                    }
                });
            }
        });

        let mut client = Endpoint::client(loopback).expect("client endpoint");
        client.set_default_client_config(client_config);
        let direct = client
            .connect(server_addr, "localhost")
            .expect("connect")
            .await
            .expect("connected");
        let relayed = client
            .connect(relay_addr, "localhost")
            .expect("connect")
            .await
            .expect("connected");
        Plain {
            client: client.clone(),
            direct,
            relayed,
            _server: server,
            _relay: relay,
        }
    }

    /// Asks for the bytes on `conn` (`mode` tells a relay how to copy) and
    /// reads them to the end; returns how many and the time.
    async fn fetch(conn: &Connection, mode: u8) -> (u64, Duration) {
        let start = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(&[mode]).await.expect("request");
        let _ = send.finish();
        let n = drain(&mut recv).await;
        (n, start.elapsed())
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        self.client.close(0u32.into(), b"done");
    }
}

/// Answers every stream of `conn` with `bytes` bytes written in
/// [`PLAIN_CHUNK`] writes.
async fn send_bytes_on_request(conn: Connection, bytes: u64) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            let _ = recv.read_to_end(16).await;
            let buf = vec![0x5a_u8; PLAIN_CHUNK];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(PLAIN_CHUNK as u64) as usize;
                if send.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = send.finish();
        });
    }
}

/// Relays every stream of `conn` to a new stream on `upstream`: the
/// request up, the answer down, copied with `tokio::io::copy` as the
/// orchestrator does (mode `c`) or chunk by chunk as quinn hands them over.
async fn relay_streams(conn: Connection, upstream: Connection) {
    while let Ok((mut down_send, mut down_recv)) = conn.accept_bi().await {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let request = down_recv.read_to_end(16).await.expect("request");
            let (mut up_send, mut up_recv) = upstream.open_bi().await.expect("upstream");
            up_send.write_all(&request).await.expect("forward");
            let _ = up_send.finish();
            if request == b"c" {
                tokio::io::copy(&mut up_recv, &mut down_send)
                    .await
                    .expect("copy");
            } else {
                while let Some(chunk) = up_recv.read_chunk(usize::MAX, true).await.expect("read") {
                    down_send.write_chunk(chunk.bytes).await.expect("write");
                }
            }
            let _ = down_send.finish();
        });
    }
}

/// The keys light client `i` announces.
/// The results light client `i` holds, sealed by `creds`: small passed
/// results of made-up trees.
fn client_results(i: usize, namespace: &str, creds: &Credentials) -> Vec<Sealed> {
    (0..KEYS_PER_CLIENT)
        .map(|j| {
            let manifest = light_manifest(i, j, namespace);
            Sealed {
                seal: creds.seal(&manifest),
                manifest,
            }
        })
        .collect()
}

fn light_manifest(i: usize, j: usize, namespace: &str) -> ResultManifest {
    let inputs = KeyInputs {
        version: reprise_protocol::key::KEY_VERSION,
        namespace: namespace.to_string(),
        tree: format!("light-{i}-{j}"),
        target: "test".into(),
        env: Default::default(),
        image_digest: "bench".into(),
        driver: "qemu".into(),
        network: false,
    };
    ResultManifest {
        version: reprise_protocol::manifest::MANIFEST_VERSION,
        key: inputs.key(),
        inputs,
        commit: "bench".into(),
        outcome: reprise_protocol::manifest::Outcome::Passed,
        exit_code: 0,
        phases: Vec::new(),
        total_ms: 1,
        accel: "bench".into(),
        tool_version: "bench".into(),
        producer: reprise_protocol::manifest::Producer {
            host: "bench".into(),
            user: "bench".into(),
        },
        created_at: 1,
        snapshot: reprise_protocol::manifest::Snapshot::Fresh,
        output_sha256: Sha256Digest::of(b""),
        output_blake3: None,
        output_bytes: 0,
        artifacts: Vec::new(),
        crontab: None,
        container_image: None,
    }
}

/// The key of light client `i`'s `j`th result.
fn client_key(i: usize, j: usize, namespace: &str) -> RunKey {
    light_manifest(i, j, namespace).key
}

/// A key nobody announced.
fn missing_key(n: usize) -> RunKey {
    RunKey::from_bytes(*Sha256Digest::of(format!("missing {n}").as_bytes()).as_bytes())
}

/// Connects `count` light clients: QUIC with a certificate of one of
/// `creds`, `Hello`, and an `Announce` of their keys. Returns them (their
/// connections stay open while they are held).
async fn connect_light_clients(
    addr: &str,
    creds: &[Arc<Credentials>],
    count: usize,
    namespace: &str,
) -> Vec<Link> {
    let remote: SocketAddr = addr.parse().expect("loopback address");
    let endpoints: Vec<Endpoint> = (0..CLIENT_ENDPOINTS.min(count))
        .map(|_| Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint"))
        .collect();
    let configs: Vec<quinn::ClientConfig> = creds
        .iter()
        .map(|c| c.client_config().expect("client config"))
        .collect();
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let config = configs[i % configs.len()].clone();
        let creds = creds[i % creds.len()].clone();
        let gate = gate.clone();
        let results = client_results(i, namespace, &creds);
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            let conn = endpoint
                .connect_with(config, remote, "127.0.0.1")
                .expect("connect")
                .await
                .unwrap_or_else(|e| panic!("light client {i} could not connect: {e}"));
            let peer = Link::hello(endpoint, conn, creds, PROTOCOL_VERSION)
                .await
                .unwrap_or_else(|e| panic!("light client {i} was refused: {e}"));
            let wanted = results.len() as u32;
            match peer.request(&Message::Announce { results }).await {
                Ok(Message::Announced { accepted, .. }) if accepted == wanted => {}
                other => panic!("light client {i}'s announce was answered {other:?}"),
            }
            (i, peer)
        });
    }
    let mut peers: Vec<Option<Link>> = (0..count).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, peer) = joined.expect("a light client task");
        peers[i] = Some(peer);
    }
    peers.into_iter().map(|p| p.expect("connected")).collect()
}

struct Table {
    rows: Vec<(String, String, String)>,
}

impl Table {
    fn row(&mut self, name: impl Into<String>, value: impl Into<String>, note: impl Into<String>) {
        self.rows.push((name.into(), value.into(), note.into()));
    }

    fn print(&self) {
        let w0 = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = self
            .rows
            .iter()
            .map(|r| r.1.len())
            .max()
            .unwrap_or(0)
            .max(5);
        println!("{:<w0$}  {:>w1$}  notes", "measure", "value");
        for (name, value, note) in &self.rows {
            println!("{name:<w0$}  {value:>w1$}  {note}");
        }
    }
}

#[tokio::main]
async fn main() {
    let o = options();
    let started = Instant::now();
    let reprise = sibling_bin("reprise");
    let orch_bin = sibling_bin("reprise-orchestrator");
    let tmp = tempfile::Builder::new()
        .prefix("peer-bench-")
        .tempdir()
        .expect("temp dir");
    let t = tmp.path();
    let mut table = Table { rows: Vec::new() };
    if o.resume_only {
        resume_case(&orch_bin, t, o.resume_rounds, &mut table).await;
        println!("{}", RESUME_HEADER);
        table.print();
        eprintln!("peer_bench: took {:.1} s", started.elapsed().as_secs_f64());
        return;
    }

    // The repository, the producer's store, and a clone for the consumer.
    progress("storing a result of 1 MiB output + 20 MiB artifacts");
    let repo = t.join("repo");
    let clone = t.join("clone");
    let producer_data = t.join("producer-data");
    hello_repo(&repo);
    // The namespace, for the identities; the result is stored once the
    // producer's credentials exist, sealed by them.
    let namespace = pipeline::compute_key(
        &pipeline::KeyRequest::at(&repo),
        &reprise_executor::inputs::process_env(),
    )
    .expect("key")
    .inputs
    .namespace;
    let ns = namespace.as_str();
    let cloned = Command::new("git")
        .arg("clone")
        .arg("-q")
        .arg(&repo)
        .arg(&clone)
        .status()
        .expect("git clone");
    assert!(cloned.success(), "git clone failed");

    // The orchestrator's folder and identities.
    let state = t.join("orchestrator");
    let creds_dir = t.join("creds");
    fs::create_dir_all(&creds_dir).expect("creds dir");
    orchestrator_cli(
        &orch_bin,
        &["init", "--dir", state.to_str().expect("utf-8 path")],
    );
    let producer_pem = issue(&orch_bin, &state, &creds_dir, "producer", ns, true);
    let keyed = store_large_result(&repo, &producer_data, Some(&*load(&producer_pem)));
    let held = Held {
        key: keyed.inputs.key(),
        namespace: keyed.inputs.namespace.clone(),
    };
    for dir in [&repo, &clone] {
        let got = reprise_key(&reprise, dir, &t.join("key-data"));
        assert_eq!(
            got,
            (held.key.to_string(), held.namespace.clone()),
            "reprise key in {} differs from the stored result's",
            dir.display()
        );
    }

    let consumer_pem = issue(&orch_bin, &state, &creds_dir, "consumer", ns, false);
    let asker_pem = issue(&orch_bin, &state, &creds_dir, "asker", ns, false);
    let light_pems: Vec<PathBuf> = (0..IDENTITIES.min(o.clients))
        .map(|i| {
            issue(
                &orch_bin,
                &state,
                &creds_dir,
                &format!("light-{i}"),
                ns,
                true,
            )
        })
        .collect();

    // 1. End-to-end replay: local, then through the orchestrator.
    progress(&format!("{} local replays", o.runs));
    let mut local = Vec::new();
    for _ in 0..o.runs {
        local.push(time_replay(&reprise, &repo, &producer_data, &[], "from the local store").await);
    }
    let orch = Orchestrator::start(&orch_bin, &state, &t.join("orchestrator-1.log"));
    let producer = Arc::new(
        Link::connect(&orch.addr, load(&producer_pem))
            .await
            .expect("the producer connects"),
    );
    assert_eq!(
        producer
            .announce(&Store::new(producer_data.join("reprise/store")))
            .await
            .expect("announce")
            .0,
        1,
        "the producer's result was not indexed"
    );
    let serving = {
        let producer = producer.clone();
        let store = Store::new(producer_data.join("reprise/store"));
        tokio::spawn(async move { producer.serve(&store).await })
    };
    progress(&format!("{} replays through the orchestrator", o.runs));
    let consumer_pem_s = consumer_pem.to_str().expect("utf-8 path");
    let mut remote = Vec::new();
    for i in 0..o.runs {
        let data = t.join(format!("consumer-data-{i}"));
        let env = [
            ("REPRISE_ORCHESTRATOR", orch.addr.as_str()),
            ("REPRISE_CREDENTIALS", consumer_pem_s),
        ];
        remote.push(time_replay(&reprise, &clone, &data, &env, "through the orchestrator").await);
        let _ = fs::remove_dir_all(&data);
    }
    let (local_m, remote_m) = (median(local), median(remote));
    table.row(
        "replay, local store",
        ms(local_m),
        "reprise run --no-serve; 1 MiB output + 20 MiB artifacts",
    );
    table.row(
        "replay through the orchestrator",
        ms(remote_m),
        "same, fresh empty store: connect, lookup, fetch, verify, commit, replay",
    );
    table.row(
        "  orchestrator / local",
        format!("{:.2}x", remote_m.as_secs_f64() / local_m.as_secs_f64()),
        "",
    );

    // Where the replay's extra time goes, as the executor's side does it.
    let (mut connects, mut lookups, mut closes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let start = Instant::now();
        let peer = Link::connect(&orch.addr, load(&consumer_pem))
            .await
            .expect("the consumer connects");
        connects.push(start.elapsed());
        let start = Instant::now();
        let offer = peer.lookup(&held.key, ns).await.expect("lookup");
        lookups.push(start.elapsed());
        assert!(
            matches!(offer, Found::Offer { .. }),
            "the producer's result is not offered: {offer:?}"
        );
        let start = Instant::now();
        peer.close().await;
        closes.push(start.elapsed());
    }
    table.row(
        "  in process: connect + hello",
        ms(median(connects)),
        "Link::connect: new endpoint, QUIC + mTLS handshake, Hello",
    );
    table.row("  in process: lookup", ms(median(lookups)), "");
    table.row(
        "  in process: close",
        ms(median(closes)),
        "Link::close (as --no-serve does): the close leaves, a bounded wait",
    );

    // 3. Transfer rates: the relay, then plain quinn.
    progress("transfer rates");
    let consumer = Link::connect(&orch.addr, load(&consumer_pem))
        .await
        .expect("the consumer connects");
    let payload = keyed_payload(&producer_data, &held.key);
    let mut fetches = Vec::new();
    for i in 0..o.runs {
        let store = Store::new(t.join(format!("fetch-{i}")));
        let start = Instant::now();
        consumer
            .fetch_into(&held.key, ns, &keyed.inputs, &store)
            .await
            .expect("fetch through the orchestrator");
        fetches.push(start.elapsed());
        let _ = fs::remove_dir_all(store.root());
    }
    let mut raw = Vec::new();
    let mut stream_bytes = 0;
    for _ in 0..o.runs {
        let (n, d) = raw_relay_fetch(&consumer, &held).await;
        stream_bytes = n;
        raw.push(d);
    }
    consumer.close().await;
    serving.abort();
    producer.close().await;
    drop(orch);

    let plain = Plain::start(stream_bytes).await;
    let mut direct = Vec::new();
    let mut relay_copy = Vec::new();
    let mut relay_chunks = Vec::new();
    for _ in 0..o.runs {
        for (conn, mode, times) in [
            (&plain.direct, b'd', &mut direct),
            (&plain.relayed, b'c', &mut relay_copy),
            (&plain.relayed, b'z', &mut relay_chunks),
        ] {
            let (n, d) = Plain::fetch(conn, mode).await;
            assert_eq!(n, stream_bytes, "plain quinn transfer came short");
            times.push(d);
        }
    }
    drop(plain);
    let rate = |times: Vec<Duration>, bytes: u64| mb_per_s(bytes, median(times));
    let fetch_rate = rate(fetches, payload);
    let raw_rate = rate(raw, stream_bytes);
    let direct_rate = rate(direct, stream_bytes);
    let copy_rate = rate(relay_copy, stream_bytes);
    let chunk_rate = rate(relay_chunks, stream_bytes);
    let mbs = |r: f64| format!("{r:.0} MB/s");
    table.row(
        "fetch_into through the orchestrator",
        mbs(fetch_rate),
        format!(
            "{:.1} MB payload; verify + stage + fsync + commit",
            payload as f64 / 1e6
        ),
    );
    table.row(
        "relayed stream only",
        mbs(raw_rate),
        format!(
            "the same fetch read to its end, nothing checked or stored ({:.1} MB)",
            stream_bytes as f64 / 1e6
        ),
    );
    table.row(
        "plain quinn, direct",
        mbs(direct_rate),
        "one bi stream, 64 KiB writes, self-signed rcgen cert",
    );
    table.row(
        "plain quinn, via relay (io::copy)",
        mbs(copy_rate),
        "in-process relay copying with tokio::io::copy, as the orchestrator",
    );
    table.row(
        "plain quinn, via relay (chunks)",
        mbs(chunk_rate),
        "in-process relay forwarding quinn's chunks (read_chunk/write_chunk)",
    );
    table.row(
        "  relayed stream / plain direct",
        format!("{:.2}x", raw_rate / direct_rate),
        "",
    );
    table.row(
        "  relayed stream / plain relay (io::copy)",
        format!("{:.2}x", raw_rate / copy_rate),
        "",
    );
    table.row(
        "  fetch_into / plain direct",
        format!("{:.2}x", fetch_rate / direct_rate),
        "",
    );

    // 2 and 4. Many connected executors: memory, then lookups.
    progress(&format!("connecting {} light clients", o.clients));
    let orch = Orchestrator::start(&orch_bin, &state, &t.join("orchestrator-2.log"));
    let asker = Link::connect(&orch.addr, load(&asker_pem))
        .await
        .expect("the asker connects");
    let _ = asker.lookup(&missing_key(0), ns).await.expect("lookup");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = orch.rss_kib();
    let light_creds: Vec<Arc<Credentials>> = light_pems.iter().map(|p| load(p)).collect();
    let start = Instant::now();
    let clients = connect_light_clients(&orch.addr, &light_creds, o.clients, ns).await;
    let setup = start.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_after = orch.rss_kib();

    progress(&format!("{} lookups", o.lookups));
    let mut lat = Vec::with_capacity(o.lookups);
    let mut hit_lat = Vec::new();
    let mut miss_lat = Vec::new();
    for n in 0..o.lookups {
        let hit = n % 2 == 0;
        let wanted = if hit {
            let i = (n / 2 * 7919) % o.clients;
            client_key(i, (n / 2) % KEYS_PER_CLIENT, ns)
        } else {
            missing_key(n)
        };
        let start = Instant::now();
        let answer = asker.lookup(&wanted, ns).await.expect("lookup");
        let d = start.elapsed();
        assert_eq!(
            matches!(answer, Found::Offer { .. }),
            hit,
            "lookup {n} of {wanted} answered {answer:?}"
        );
        lat.push(d);
        if hit {
            hit_lat.push(d);
        } else {
            miss_lat.push(d);
        }
    }
    // Every light client is still connected (several per identity).
    let dropped = clients
        .iter()
        .filter(|c| c.connection().close_reason().is_some())
        .count();
    assert_eq!(dropped, 0, "{dropped} light clients were disconnected");
    drop(clients);
    asker.close().await;
    drop(orch);
    lat.sort();
    hit_lat.sort();
    miss_lat.sort();
    let per_client = (rss_after as f64 - rss_before as f64) / o.clients as f64;
    let who = format!("{} clients connected", o.clients);
    table.row(
        "connect + hello + announce, all clients",
        ms(setup),
        format!(
            "{} clients, {} identities, {} endpoints, {CONNECT_CONCURRENCY} at a time",
            o.clients,
            light_pems.len(),
            CLIENT_ENDPOINTS.min(o.clients)
        ),
    );
    table.row(
        "lookup p50",
        ms3(percentile(&lat, 50)),
        format!("{} lookups, half hits; {who}", o.lookups),
    );
    table.row("lookup p99", ms3(percentile(&lat, 99)), "");
    table.row(
        "  hits p50 / p99",
        format!(
            "{} / {}",
            ms3(percentile(&hit_lat, 50)),
            ms3(percentile(&hit_lat, 99))
        ),
        "",
    );
    table.row(
        "  misses p50 / p99",
        format!(
            "{} / {}",
            ms3(percentile(&miss_lat, 50)),
            ms3(percentile(&miss_lat, 99))
        ),
        "",
    );
    table.row(
        "orchestrator RSS before / after",
        format!("{} / {} KiB", rss_before, rss_after),
        "VmRSS from /proc/PID/status",
    );
    table.row(
        "orchestrator memory per executor",
        format!("{per_client:.1} KiB"),
        format!("(after - before) / {}", o.clients),
    );

    // 5. A cut transfer resumed, beside a whole one.
    resume_case(&orch_bin, t, o.resume_rounds, &mut table).await;

    println!(
        "peer_bench: reprise's orchestrator on 127.0.0.1, {} runs per median.\n\
         Replays: wall time of the real `reprise run --no-serve`, local store vs a fresh store\n\
         fetching through a real `reprise-orchestrator serve` from an in-process producer.\n\
         Transfers: MB/s (10^6 bytes) of the relayed fetch vs plain quinn in this process.\n\
         Lookups: one request stream each from one client while the others stay connected.\n\
         Memory: the orchestrator's resident set before and after the clients connected.\n\
         {RESUME_HEADER}",
        o.runs
    );
    table.print();
    eprintln!("peer_bench: took {:.1} s", started.elapsed().as_secs_f64());
}

/// Bytes of the stored result's output record and artifacts.
fn keyed_payload(data: &Path, key: &RunKey) -> u64 {
    let stored = Store::new(data.join("reprise/store"))
        .get(key)
        .expect("the stored result");
    let m = &stored.manifest;
    m.output_bytes + m.artifacts.iter().map(|a| a.bytes).sum::<u64>()
}

const RESUME_HEADER: &str = "Resume: a 1 GiB artifact fetched through a real orchestrator in this process, whole vs\n\
     the rest of the same transfer cut at 50 % (only the resumed fetch timed; verify, stage, commit included).\n";

/// Size of the artifact of the resume case.
const RESUME_BYTES: usize = 1 << 30;

/// Writes `bytes` incompressible bytes to `path` (xorshift, 1 MiB writes).
fn write_noise(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(path).expect("artifact"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..bytes / block.len() {
        for word in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).expect("write artifact");
    }
    f.flush().expect("flush artifact");
}

/// Case 5: a 1 GiB artifact fetched whole, beside the rest of the same
/// transfer cut at 50 %, through a real orchestrator of its own (its own
/// folder, a producer and a consumer identity), `rounds` of each,
/// interleaved. Adds its rows to `table`.
async fn resume_case(orch_bin: &Path, t: &Path, rounds: usize, table: &mut Table) {
    progress("resume: storing a result with a 1 GiB artifact");
    let dir = t.join("resume");
    let state = dir.join("orchestrator");
    let creds_dir = dir.join("creds");
    fs::create_dir_all(&creds_dir).expect("creds dir");
    orchestrator_cli(
        orch_bin,
        &["init", "--dir", state.to_str().expect("utf-8 path")],
    );
    let ns = "bench.example/resume";
    let producer_pem = issue(orch_bin, &state, &creds_dir, "resume-producer", ns, true);
    let consumer_pem = issue(orch_bin, &state, &creds_dir, "resume-consumer", ns, false);
    let producer_creds = load(&producer_pem);
    let arts = dir.join("arts");
    fs::create_dir_all(&arts).expect("artifacts dir");
    write_noise(&arts.join("big.bin"), RESUME_BYTES);
    let mut manifest = light_manifest(usize::MAX, 0, ns);
    manifest.inputs.tree = "resume-1gib".into();
    manifest.key = manifest.inputs.key();
    let producer_store = Store::new(dir.join("producer-store"));
    let stored = producer_store
        .commit(manifest, b"", Some(&arts), Some(&*producer_creds))
        .expect("commit the 1 GiB result");
    fs::remove_dir_all(&arts).expect("remove the artifact's staging");
    let expected = stored.manifest.inputs.clone();
    let key = stored.manifest.key;
    let total = stored.sealed().expect("sealed").bytes_from(&[0, 0]);
    let chunks = total.div_ceil(reprise_protocol::wire::CHUNK_BYTES);

    let orch = Orchestrator::start(orch_bin, &state, &dir.join("orchestrator.log"));
    let producer = Arc::new(
        Link::connect(&orch.addr, producer_creds.clone())
            .await
            .expect("the producer connects"),
    );
    assert_eq!(
        producer
            .announce(&producer_store)
            .await
            .expect("announce")
            .0,
        1
    );
    let serving = {
        let (producer, store) = (producer.clone(), producer_store.clone());
        tokio::spawn(async move { producer.serve(&store).await })
    };
    let consumer = Link::connect(&orch.addr, load(&consumer_pem))
        .await
        .expect("the consumer connects");
    // The record is empty: chunk 0 of the result is the artifact's first.
    let half = chunks / 2;
    let (mut whole, mut rest, mut cut) = (Vec::new(), Vec::new(), Vec::new());
    let mut resumed_bytes = 0;
    for round in 0..rounds {
        progress(&format!("resume: round {} of {rounds}", round + 1));
        let store = Store::new(dir.join("consumer-store"));
        producer.stop_serving_at(None);
        let start = Instant::now();
        let f = consumer
            .fetch(&key, ns, &expected, &store)
            .await
            .expect("a whole fetch");
        whole.push(start.elapsed());
        assert_eq!((f.received, f.resumed), (total, 0), "a whole fetch");
        drop(f);
        fs::remove_dir_all(store.root()).expect("remove the fetched copy");

        producer.stop_serving_at(Some(half));
        let start = Instant::now();
        let err = consumer
            .fetch(&key, ns, &expected, &store)
            .await
            .expect_err("the transfer is cut");
        cut.push(start.elapsed());
        assert!(
            matches!(err, reprise_executor::link::FetchError::Truncated { .. }),
            "cut: {err:?}"
        );
        producer.stop_serving_at(None);
        let start = Instant::now();
        let f = consumer
            .fetch(&key, ns, &expected, &store)
            .await
            .expect("the rest");
        rest.push(start.elapsed());
        assert_eq!(f.resumed + f.received, total, "resumed + received");
        assert!(f.resumed > 0, "nothing of the cut transfer was kept");
        resumed_bytes = f.resumed;
        drop(f);
        fs::remove_dir_all(store.root()).expect("remove the fetched copy");
    }
    consumer.close().await;
    serving.abort();
    producer.close().await;
    drop(orch);
    let _ = fs::remove_dir_all(&dir);
    let (whole_m, rest_m) = (median(whole), median(rest));
    table.row(
        "1 GiB artifact, whole fetch",
        ms(whole_m),
        format!("Link::fetch through the orchestrator; {rounds} rounds"),
    );
    table.row(
        "1 GiB artifact, rest after a cut at 50 %",
        ms(rest_m),
        format!(
            "the same fetch again after one cut at chunk {half} of {chunks}; {:.0} % kept from the cut one",
            resumed_bytes as f64 * 100.0 / total as f64
        ),
    );
    table.row("  the cut transfer itself", ms(median(cut)), "");
    table.row(
        "  rest / whole",
        format!("{:.2}x", rest_m.as_secs_f64() / whole_m.as_secs_f64()),
        "",
    );
}
