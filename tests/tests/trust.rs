//! System tests of the trust chain, each performing an attack on it with
//! the real binaries and showing that it fails closed:
//!
//! - a stand-in orchestrator asks a connected executor to serve path-like
//!   keys and a result whose manifest names a path for a digest, and sends
//!   a fetching executor a manifest whose artifact path climbs out;
//! - a repository's tracked `.env` names a foreign orchestrator and
//!   credentials;
//! - a trusted executor relays a hand-made result and one sealed by a
//!   producer revoked since.
//!
//! The attacks on artifacts folders and snapshots need real runs in a VM
//! and live in `run.rs`.

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

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use reprise_orchestrator::Folder;
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::wire::{self, Message};
use run_support::{Run, Sandbox, wait_until};
use team_support::{
    CHECKED_MKFILE, Killed, NOT_COUNTED, Team, clone_of, fabricate_result, free_udp_port, issue,
    namespace, nix_kill, orchestrator, serve_logged, serving_daemon, with_orchestrator,
};

/// Writes credentials where a user keeps them: readable by the user only.
fn private_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path.parent().expect("a parent")).expect("folder");
    fs::write(path, text).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A frame with `body` as it is, however hostile.
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// A QUIC server with a real team's certificates that speaks the protocol
/// as a hostile orchestrator would: it answers what it must to keep an
/// executor talking, and asks for what it should not have.
struct StandIn {
    _dir: tempfile::TempDir,
    folder: Folder,
    endpoint: quinn::Endpoint,
}

impl StandIn {
    fn new() -> StandIn {
        let dir = tempfile::tempdir().expect("temp dir");
        let folder = Folder::init(&dir.path().join("orch"), &[]).expect("init");
        let endpoint = quinn::Endpoint::server(
            folder.server_config().expect("server config"),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .expect("bind");
        StandIn {
            _dir: dir,
            folder,
            endpoint,
        }
    }

    fn addr(&self) -> String {
        self.endpoint.local_addr().expect("addr").to_string()
    }

    /// Credentials of this team for `name` on `repos`, written to `path`.
    fn issue(&self, name: &str, repos: &[&str], path: &Path) {
        let repos: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
        let pem = self.folder.issue(name, &repos, true, None).expect("issue");
        private_file(path, &pem);
    }

    /// The next executor: its `Hello` answered with a `Welcome` for
    /// `identity` on `repos`.
    async fn accept(&self, identity: &str, repos: &[&str]) -> Connection {
        let incoming = tokio::time::timeout(Duration::from_secs(30), self.endpoint.accept())
            .await
            .expect("an executor connects within 30 s")
            .expect("endpoint open");
        let conn = incoming.await.expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("hello stream");
        let hello = read_frame(&mut recv).await;
        assert!(matches!(hello, Message::Hello { .. }), "{hello:?}");
        let welcome = Message::Welcome {
            identity: identity.into(),
            repos: repos.iter().map(|r| r.to_string()).collect(),
            trusted: true,
            revoked: Vec::new(),
            counts: None,
        };
        send.write_all(&wire::encode(&welcome).expect("encode"))
            .await
            .expect("welcome");
        send.finish().expect("finish");
        conn
    }
}

async fn read_frame(recv: &mut RecvStream) -> Message {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.expect("frame header");
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    recv.read_exact(&mut body).await.expect("frame body");
    wire::decode(&body).expect("a message")
}

async fn answer(send: &mut SendStream, m: &Message) {
    send.write_all(&wire::encode(m).expect("encode"))
        .await
        .expect("answer");
    let _ = send.finish();
}

/// Sends `frame` on a new stream of `conn` (as the orchestrator asking its
/// executor to serve) and returns every byte that comes back.
async fn ask(conn: &Connection, frame: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(frame).await.expect("write");
    send.finish().expect("finish");
    tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(64 << 20))
        .await
        .expect("an answer within 20 s")
        .unwrap_or_default()
}

fn first_message(bytes: &[u8]) -> Option<Message> {
    wire::decode_frame(bytes).ok().flatten().map(|(m, _)| m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_orchestrator_gets_nothing_outside_the_store_and_cannot_plant_files() {
    let stand_in = StandIn::new();
    let a = Sandbox::new();
    a.git_init();
    a.write("README", "a repository whose results are served\n")
        .write("mkfile", CHECKED_MKFILE)
        .commit("one");
    let ns = namespace(&a);
    // The victim's credentials, kept as a user would, and the secret in
    // them that a path-like key would make the executor read.
    let creds = a.config().join("reprise/credentials.pem");
    stand_in.issue("victim", &[&ns], &creds);
    // The store also holds a result of a private repository this
    // certificate does not grant (the same machine works on both).
    let private = "example.com/private/secret";
    a.write("reprise.toml", &format!("namespace = \"{private}\"\n"))
        .commit("private");
    fabricate_result(&a, "private output", Some(&creds));
    let private_key = Run::from(a.reprise(&["key"]).output().expect("key"))
        .stdout
        .trim()
        .to_string();
    a.git(&["rm", "-q", "reprise.toml"]);
    a.commit("public again");
    let secret_line = fs::read_to_string(&creds)
        .expect("credentials")
        .lines()
        .skip_while(|l| !l.contains("PRIVATE KEY"))
        .nth(1)
        .expect("a key line")
        .to_string();
    fabricate_result(&a, "the legit result", Some(&creds));
    let key = Run::from(a.reprise(&["key"]).output().expect("key"))
        .stdout
        .trim()
        .to_string();
    // A result planted in the store by hand whose artifact "digest" is a
    // path to the credentials.
    let results = a.store().join("results");
    let planted_key = "ab".repeat(32);
    let legit = fs::read_to_string(results.join(&key).join("manifest.json")).expect("manifest");
    let sha = legit
        .split("\"sha256\": \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("an artifact sha256")
        .to_string();
    fs::create_dir_all(results.join(&planted_key)).expect("planted folder");
    fs::write(
        results.join(&planted_key).join("manifest.json"),
        legit
            .replace(&key, &planted_key)
            .replace(&sha, "../../../../config/reprise/credentials.pem"),
    )
    .expect("plant");

    // The victim's daemon connects to the stand-in.
    let mut cmd = a.reprise(&["daemon"]);
    with_orchestrator(&mut cmd, &stand_in.addr(), &creds);
    let log = a.dir.path().join("daemon.log");
    cmd.stderr(fs::File::create(&log).expect("log"));
    let daemon = Killed(cmd.spawn().expect("daemon starts"));
    // The stand-in's Welcome also names the private repository: the
    // certificate does not grant it, so the executor serves it no more
    // than before (the grant is read from the certificate itself).
    let conn = stand_in.accept("victim", &[&ns, private]).await;
    // Its announcements, answered as accepted.
    let announced = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (conn, announced) = (conn.clone(), announced.clone());
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                if let Message::Announce { results } = read_frame(&mut recv).await {
                    let n = results.len() as u32;
                    announced.lock().unwrap().extend(results);
                    answer(
                        &mut send,
                        &Message::Announced {
                            accepted: n,
                            refused: 0,
                        },
                    )
                    .await;
                }
            }
        });
    }
    assert!(
        wait_until(Duration::from_secs(30), || fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("serving 1 result(s)")),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        announced.lock().unwrap().len(),
        1,
        "neither the planted result nor the private one is announced"
    );
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains("do not grant") && said.contains(private),
        "the executor says it refused the orchestrator's extra repository:\n{said}"
    );

    let serve = |key: &str, namespace: &str| {
        raw_frame(
            format!(r#"{{"type":"serve","key":"{key}","namespace":"{namespace}"}}"#).as_bytes(),
        )
    };
    let attacks = [
        (
            "a relative path to the credentials",
            serve("../../../../config/reprise/credentials.pem", &ns),
        ),
        ("an absolute path", serve(&creds.display().to_string(), &ns)),
        ("/etc/passwd", serve("/etc/passwd", &ns)),
        (
            "a key whose stored manifest names a path for a digest",
            serve(&planted_key, &ns),
        ),
        (
            "a real result under another namespace than its own",
            serve(&key, "example.com/someone/else"),
        ),
        (
            "a real result of a repository this certificate does not grant",
            serve(&private_key, private),
        ),
    ];
    for (name, frame) in attacks {
        let got = ask(&conn, &frame).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            matches!(first_message(&got), Some(Message::Error { .. })),
            "{name}: answered {text}"
        );
        assert!(
            !text.contains(&secret_line),
            "{name}: the private key leaked"
        );
        assert!(!text.contains("root:x:0:0"), "{name}: /etc/passwd leaked");
        assert!(
            !text.contains("private output"),
            "{name}: a private result leaked"
        );
    }
    // The victim is told, in the daemon's log, what was refused and why.
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains("refused a request to serve that does not decode")
            && said.contains(&format!("this certificate does not grant {private}"))
            && said.contains("this certificate does not grant example.com/someone/else"),
        "{said}"
    );
    // The same stream, asked for what it may serve, serves it: the
    // refusals above are refusals, not a broken executor.
    let got = ask(&conn, &serve(&key, &ns)).await;
    assert!(
        matches!(first_message(&got), Some(Message::Transfer { .. })),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // Another executor fetches from the stand-in, which sends the real
    // result's header with an artifact path that climbs out of the
    // artifacts folder.
    let b = clone_of(&a);
    let b_creds = b.config().join("reprise/credentials.pem");
    stand_in.issue("consumer", &[&ns], &b_creds);
    let outside = b.dir.path().join("outside");
    fs::create_dir_all(&outside).expect("outside");
    let sealed = announced.lock().unwrap()[0].clone();
    let header = serde_json::to_string(&Message::Transfer {
        result: Box::new(sealed.clone()),
        from: vec![0; sealed.parts().len()],
    })
    .expect("json")
    .replace("\"report.txt\"", "\"../../outside/evil.txt\"");
    assert!(header.contains("outside/evil.txt"));
    let data: Vec<Vec<u8>> = {
        let dir = a.store().join("results").join(&key);
        let report = sealed.manifest.artifacts[0].sha256.to_string();
        vec![
            fs::read(dir.join("output.rec")).expect("record"),
            fs::read(a.store().join("blobs").join(report)).expect("blob"),
        ]
    };
    let mut cmd = b.reprise(&["run", "--no-serve", "--mode", "replay-only"]);
    with_orchestrator(&mut cmd, &stand_in.addr(), &b_creds);
    let run = tokio::task::spawn_blocking(move || Run::from(cmd.output().expect("run")));
    let conn_b = stand_in.accept("consumer", &[&ns]).await;
    loop {
        let Ok((mut send, mut recv)) = conn_b.accept_bi().await else {
            break;
        };
        match read_frame(&mut recv).await {
            Message::Lookup { .. } => {
                answer(
                    &mut send,
                    &Message::Offer {
                        producer: "victim".into(),
                        counts: "trust me".into(),
                    },
                )
                .await;
            }
            // As an orchestrator without the direct path: the fetch
            // comes through the relay, which this one controls.
            Message::Introduce { .. } => {
                answer(
                    &mut send,
                    &Message::error(wire::ErrorCode::UnknownMessage, "unknown message type"),
                )
                .await;
            }
            Message::Fetch { .. } => {
                let mut out = raw_frame(header.as_bytes());
                for part in &data {
                    for chunk in part.chunks(wire::CHUNK_BYTES as usize) {
                        out.extend_from_slice(&wire::chunk_header(chunk.len()));
                        out.extend_from_slice(Sha256Digest::of(chunk).as_bytes());
                        out.extend_from_slice(chunk);
                    }
                }
                let _ = send.write_all(&out).await;
                let _ = send.finish();
                break;
            }
            other => panic!("unexpected request {other:?}"),
        }
    }
    let run = run.await.expect("run");
    run.expect_code(NOT_COUNTED, "refused, and nothing else counts");
    assert!(
        run.stderr.contains("refused") && run.stderr.contains("not a plain relative path"),
        "{}",
        run.stderr
    );
    assert!(!run.replayed(), "{}", run.stderr);
    assert_eq!(
        fs::read_dir(&outside).expect("outside").count(),
        0,
        "nothing written outside"
    );
    assert!(b.stored_files().is_empty(), "nothing stored");
    drop(daemon);
}

#[test]
fn a_tracked_env_file_cannot_choose_the_orchestrator_or_the_credentials() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("foreign");
    let state = state.to_str().expect("utf-8");
    orchestrator(&["init", "--dir", state]);
    // The victim's repository: its tests would fail. Its runs ask for a
    // replay only, so they stop (exit 10) instead of running the tests
    // when no result counts.
    let victim = Sandbox::new();
    victim.git_init();
    victim
        .write("README", "tests that do not pass\n")
        .write("mkfile", CHECKED_MKFILE)
        .commit("root");
    let ns = namespace(&victim);
    // The attacker's team trusts its own producer for the namespace, and
    // commits credentials of its team and a .env naming its orchestrator.
    let mallory = dir.path().join("mallory.pem");
    issue(state, "mallory", &[&ns], true, &mallory);
    issue(
        state,
        "planted",
        &[&ns],
        false,
        &victim.repo().join("planted.pem"),
    );
    let addr = format!("127.0.0.1:{}", free_udp_port());
    victim.write(
        ".env",
        &format!("REPRISE_ORCHESTRATOR={addr}\nREPRISE_CREDENTIALS=planted.pem\n"),
    );
    victim.commit("point at a friendly orchestrator");
    let log = dir.path().join("foreign.log");
    let _server = serve_logged(state, &addr, &log);
    // A passing result for the victim's tree, sealed by the attacker's
    // producer and served by its daemon.
    let m = clone_of(&victim);
    fabricate_result(&m, "all green, trust me", Some(&mallory));
    let mut cmd = m.reprise(&["daemon"]);
    with_orchestrator(&mut cmd, &addr, &mallory);
    let mlog = dir.path().join("mallory.log");
    cmd.stderr(fs::File::create(&mlog).expect("log"));
    let _daemon = Killed(cmd.spawn().expect("daemon"));
    assert!(
        wait_until(Duration::from_secs(30), || fs::read_to_string(&mlog)
            .unwrap_or_default()
            .contains("serving 1 result(s)")),
        "{}",
        fs::read_to_string(&mlog).unwrap_or_default()
    );

    // The victim runs its tests. The .env is ignored, and said to be.
    let r = victim.run(&["run", "--no-serve", "--mode", "replay-only"]);
    r.expect_code(
        NOT_COUNTED,
        "not replayed: nothing counts without an orchestrator",
    );
    assert!(!r.replayed(), "{}", r.stderr);
    assert!(
        r.stderr.contains(".env") && r.stderr.contains("git tracks it"),
        "one line says the .env was ignored:\n{}",
        r.stderr
    );
    assert!(victim.stored_files().is_empty());
    // The foreign orchestrator never heard from the victim.
    let seen = fs::read_to_string(&log).unwrap_or_default();
    assert!(seen.contains("mallory"), "the log is read: {seen}");
    assert!(!seen.contains("planted"), "the victim connected:\n{seen}");

    // The same setup chosen by the user (environment) does replay: the
    // attack above was real, and only the source of the settings changed.
    let mut cmd = victim.reprise(&["run", "--no-serve", "--mode", "replay-only"]);
    with_orchestrator(&mut cmd, &addr, &victim.repo().join("planted.pem"));
    let chosen = Run::from(cmd.output().expect("run"));
    chosen.expect_code(0, "replayed when the user points at it");
    assert!(
        chosen.stderr.contains("from producer 'mallory'"),
        "{}",
        chosen.stderr
    );
}

/// The key of `rev` in `s`.
fn key_of(s: &Sandbox, rev: &str) -> String {
    let r = s.run(&["key", "--rev", rev]);
    r.expect_code(0, "reprise key");
    r.stdout.trim().to_string()
}

#[test]
fn a_trusted_relayer_cannot_launder_a_hand_made_or_a_revoked_producers_result() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("team");
    let state = state.to_str().expect("utf-8");
    orchestrator(&["init", "--dir", state]);
    let carol = Sandbox::new();
    carol.git_init();
    carol
        .write("README", "one\n")
        .write("mkfile", CHECKED_MKFILE)
        .commit("root");
    let ns = namespace(&carol);
    let cred = |name: &str, trusted: bool| {
        let path = dir.path().join(format!("{name}.pem"));
        issue(state, name, &[&ns], trusted, &path);
        path
    };
    let (carol_pem, bob, alice, ci) = (
        cred("carol", true),
        cred("bob", true),
        cred("alice", true),
        cred("ci", false),
    );
    // Carol's store: a hand-made result, one sealed by bob, one by alice,
    // each for its own commit.
    fabricate_result(&carol, "made by hand", None);
    let hand_made = carol.git(&["rev-parse", "HEAD"]);
    carol.write("README", "two\n").commit("two");
    fabricate_result(&carol, "bob's", Some(&bob));
    let bobs = carol.git(&["rev-parse", "HEAD"]);
    carol.write("README", "three\n").commit("three");
    fabricate_result(&carol, "alice's", Some(&alice));
    let alices = carol.git(&["rev-parse", "HEAD"]);
    // Bob leaves the team.
    orchestrator(&["revoke", "--dir", state, "--name", "bob"]);

    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_logged(state, &addr, &dir.path().join("orch.log"));
    let (daemon, text) = serving_daemon(&carol, &addr, &carol_pem, &dir.path().join("carol.log"));
    assert!(text.contains("serving 1 result(s)"), "only alice's: {text}");
    assert!(text.contains("refused 1 result(s)"), "bob's: {text}");

    // CI asks for each: only alice's result is replayed.
    let consumer = clone_of(&carol);
    let at = |commit: &str| {
        consumer.git(&["checkout", "-q", commit]);
        let mut cmd = consumer.reprise(&["run", "--no-serve", "--mode", "replay-only"]);
        with_orchestrator(&mut cmd, &addr, &ci);
        Run::from(cmd.output().expect("run"))
    };
    for (name, commit) in [("hand-made", &hand_made), ("bob's", &bobs)] {
        let r = at(commit);
        r.expect_code(NOT_COUNTED, name);
        assert!(!r.replayed(), "{name} was replayed:\n{}", r.stderr);
        // Told that nothing counts (the same answer whether a result
        // exists or not: no oracle), and why the tests run here.
        assert!(
            r.stderr.contains("the orchestrator offers no result of")
                && r.stderr.contains("running the tests here"),
            "{name}:\n{}",
            r.stderr
        );
    }
    let r = at(&alices);
    r.expect_code(0, "alice's result replays");
    assert!(
        r.stderr.contains("from producer 'alice'") && r.stderr.contains("sealed by alice"),
        "the producer, not the relayer:\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("carol"), "{}", r.stderr);

    // `results show` says who produced each and whether it counts.
    let show = |commit: &str| {
        let key = key_of(&carol, commit);
        let mut cmd = carol.reprise(&["results", "show", &key]);
        with_orchestrator(&mut cmd, &addr, &carol_pem);
        let r = Run::from(cmd.output().expect("show"));
        r.expect_code(0, "results show");
        r.stdout
    };
    let out = show(&hand_made);
    assert!(
        out.contains("sealed by:   nobody") && out.contains("counts:      no"),
        "{out}"
    );
    let out = show(&bobs);
    assert!(
        out.contains("counts:      no") && out.contains("revoked"),
        "{out}"
    );
    let out = show(&alices);
    assert!(
        out.contains("sealed by:   alice") && out.contains("counts:      yes"),
        "{out}"
    );
    nix_kill(daemon.0.id(), "TERM");
}

#[test]
fn a_result_whose_artifact_holds_a_secret_stays_on_this_machine() {
    const TOKEN: &str = "tok-3x4mple/value";
    let team = Team::new();
    let a = &team.a;
    let test_sh = fs::read_to_string(a.repo().join("test.sh")).expect("test.sh");
    // The tests print the token URL-encoded and write it base64-encoded
    // into an artifact, as a careless test might.
    a.write(
        "test.sh",
        &format!(
            "{test_sh}printf 'url: https://x.invalid/?t=%s\\n' \"$(printf '%s' \"$HELLO_TOKEN\" | sed 's|/|%2F|g')\"\n\
             printf 'auth: %s\\n' \"$(printf 'user:%s' \"$HELLO_TOKEN\" | base64)\" > leak.txt\n"
        ),
    )
    .write(
        "reprise.toml",
        "secrets = [\"HELLO_TOKEN\"]\nartifacts = [\"report.txt\", \"leak.txt\"]\n",
    )
    .commit("leaks its token into an artifact");
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let _server = serve_logged(&team.state, &addr, &team.dir.path().join("orch.log"));

    let mut cmd = a.reprise(&["run", "--no-serve", "--driver", "podman"]);
    with_orchestrator(&mut cmd, &addr, &team.alice);
    cmd.env("HELLO_TOKEN", TOKEN);
    let run = Run::from(cmd.output().expect("run"));
    run.expect_code(0, "a passing run whose artifact holds its secret");
    assert!(
        run.stdout.contains("url: https://x.invalid/?t=[redacted]"),
        "the URL-encoded token is masked:\n{}",
        run.stdout
    );
    assert!(
        run.stderr
            .contains("leak.txt holds the value of the secret HELLO_TOKEN (base64-encoded)")
            && run.stderr.contains("kept on this machine"),
        "the run names the artifact:\n{}",
        run.stderr
    );
    let key = run
        .stderr
        .split("; result ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the stored result's key")
        .to_string();
    let shown = a.run(&["results", "show", &key]);
    shown.expect_code(0, "results show");
    assert!(
        shown
            .stdout
            .contains("shared:      no, kept on this machine: artifact leak.txt")
            && shown.stdout.contains("sealed by:   nobody"),
        "{}",
        shown.stdout
    );

    // A's daemon, with credentials, does not announce it...
    let (daemon, said) =
        serving_daemon(a, &addr, &team.alice, &team.dir.path().join("a-daemon.log"));
    assert!(
        said.contains("serving 0 result(s)"),
        "nothing to announce: {said}"
    );
    // ...so a peer runs the tests itself rather than receive the artifact.
    let b = clone_of(a);
    let mut cmd = b.reprise(&["run", "--no-serve", "--driver", "podman"]);
    with_orchestrator(&mut cmd, &addr, &team.ci);
    cmd.env("HELLO_TOKEN", TOKEN);
    let r = Run::from(cmd.output().expect("run"));
    r.expect_code(0, "the peer's own run");
    assert!(
        !r.replayed() && r.stderr.contains("start done"),
        "the peer ran it:\n{}",
        r.stderr
    );
    nix_kill(daemon.0.id(), "TERM");
    // The service's log (REPRISE_LOG=info, to a file): plain text.
    let log = fs::read_to_string(team.dir.path().join("orch.log")).expect("orchestrator log");
    assert!(log.contains("INFO"), "REPRISE_LOG=info is read:\n{log}");
    assert!(!log.contains('\x1b'), "no colour codes in a file:\n{log}");
}
