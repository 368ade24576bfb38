//! The orchestrator over real QUIC on loopback, with rcgen certificates:
//! the happy path of a peer replay and every way in that must be refused.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reprise_executor::link::direct::{self, Direct};
use reprise_executor::link::{
    Credentials, FetchError, Found, Link, LinkError, read_message, serve, transfer_files,
    write_message,
};
use reprise_executor::store::{Sealer, Store, StoredResult};
use reprise_orchestrator::state::{AuditEntry, AuditFilter};
use reprise_orchestrator::telemetry::{Refusal, Telemetry};
use reprise_orchestrator::{Folder, FolderError, Limits, server};
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::key::{KEY_VERSION, KeyInputs};
use reprise_protocol::manifest::{
    MANIFEST_VERSION, Outcome, Phase, Producer, ResultManifest, Snapshot,
};
use reprise_protocol::seal::SealError;
use reprise_protocol::wire::{self, ErrorCode, Message, Sealed, Secret};
use tempfile::TempDir;
use tokio::sync::oneshot;

const NS: &str = "example.com/team/app";

struct Team {
    _dir: TempDir,
    folder: Folder,
    addr: SocketAddr,
    /// What the running service counts.
    telemetry: Arc<Telemetry>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), server::ServeError>>>,
}

impl Team {
    async fn start() -> Team {
        Team::with_settings("").await
    }

    /// A team whose `orchestrator.toml` is `settings`.
    async fn with_settings(settings: &str) -> Team {
        Team::with(settings, Limits::default()).await
    }

    /// A team whose service runs with `limits`.
    async fn with(settings: &str, limits: Limits) -> Team {
        Team::prepared(settings, limits, |_| {}).await
    }

    /// A team whose state folder `prepare` adds files to before it serves.
    async fn prepared(settings: &str, limits: Limits, prepare: impl FnOnce(&Path)) -> Team {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::init(&dir.path().join("orch"), &[]).unwrap();
        fs::write(dir.path().join("orch/orchestrator.toml"), settings).unwrap();
        prepare(&dir.path().join("orch"));
        let endpoint = quinn::Endpoint::server(
            folder.server_config_with(&limits).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let mut service = folder.service().unwrap();
        service.limits = limits;
        let telemetry = service.telemetry.clone();
        let task = tokio::spawn(server::run(endpoint, service, async {
            let _ = rx.await;
        }));
        Team {
            _dir: dir,
            folder,
            addr,
            telemetry,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The orchestrator's state folder.
    fn state_dir(&self) -> PathBuf {
        self._dir.path().join("orch")
    }

    fn creds(&self, name: &str, repos: &[&str], trusted: bool) -> Arc<Credentials> {
        let repos: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
        let pem = self.folder.issue(name, &repos, trusted, None).unwrap();
        Arc::new(Credentials::from_pem(&pem).unwrap())
    }

    /// A new certificate for a name that exists (`issue --replace`).
    fn reissued(&self, name: &str, repos: &[&str], trusted: bool) -> Arc<Credentials> {
        let repos: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
        let pem = self.folder.reissue(name, &repos, trusted, None).unwrap();
        Arc::new(Credentials::from_pem(&pem).unwrap())
    }

    async fn connect(&self, creds: &Arc<Credentials>) -> Result<Link, LinkError> {
        Link::connect(&self.addr.to_string(), creds.clone()).await
    }

    /// Stops the service and starts it again on the same address and state.
    async fn restart(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
        let endpoint =
            quinn::Endpoint::server(self.folder.server_config().unwrap(), self.addr).unwrap();
        let (tx, rx) = oneshot::channel();
        let service = self.folder.service().unwrap();
        self.telemetry = service.telemetry.clone();
        self.task = Some(tokio::spawn(server::run(endpoint, service, async {
            let _ = rx.await;
        })));
        self.stop = Some(tx);
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn inputs(tree: &str) -> KeyInputs {
    KeyInputs {
        version: KEY_VERSION,
        namespace: NS.into(),
        tree: tree.into(),
        target: "test".into(),
        env: Default::default(),
        image_digest: "recipe:abc".into(),
        driver: "qemu".into(),
        network: false,
    }
}

/// A store holding one passed result for `inputs("t1")` with two artifacts,
/// sealed by `producer`.
fn producer_store(dir: &Path, producer: &Credentials) -> (Store, StoredResult) {
    producer_store_with(dir, Some(producer), |_| {})
}

/// The same, unsealed if `producer` is `None`, and with `change` made to
/// the manifest before it is committed.
fn producer_store_with(
    dir: &Path,
    producer: Option<&Credentials>,
    change: impl FnOnce(&mut ResultManifest),
) -> (Store, StoredResult) {
    let store = Store::new(dir.join("store-b"));
    let arts = dir.join("arts");
    fs::create_dir_all(arts.join("sub")).unwrap();
    fs::write(arts.join("report.xml"), "<ok/>").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(arts.join("sub/big.bin"), &big).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(arts.join("sub/big.bin"), fs::Permissions::from_mode(0o750)).unwrap();
    let mut record = Vec::new();
    reprise_protocol::record::push(
        &mut record,
        reprise_protocol::record::StreamId::Stdout,
        0,
        b"\x1b[32mtest ok\x1b[0m\n",
    );
    reprise_protocol::record::push(
        &mut record,
        reprise_protocol::record::StreamId::Stderr,
        3,
        b"warning: x\n",
    );
    let inputs = inputs("t1");
    let manifest = ResultManifest {
        version: MANIFEST_VERSION,
        key: inputs.key(),
        inputs,
        commit: "c1".into(),
        outcome: Outcome::Passed,
        exit_code: 0,
        phases: vec![Phase {
            name: "test".into(),
            ms: 40,
        }],
        total_ms: 40,
        accel: "kvm".into(),
        tool_version: "0.1.0".into(),
        producer: Producer {
            host: "ci-box".into(),
            user: "ci".into(),
        },
        created_at: 1_700_000_000,
        snapshot: Snapshot::Fresh,
        output_sha256: Sha256Digest::of(b""),
        output_blake3: None,
        output_bytes: 0,
        artifacts: vec![],
        crontab: None,
        container_image: None,
    };
    let mut manifest = manifest;
    change(&mut manifest);
    let stored = store
        .commit(
            manifest,
            &record,
            Some(&arts),
            producer.map(|p| p as &dyn Sealer),
        )
        .unwrap();
    (store, stored)
}

fn assert_nothing_committed(store: &Store) {
    assert_nothing_committed_but_a_partial(store);
    let tmp = store.root().join("tmp");
    let n = fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "staging was left in {}", tmp.display());
}

/// Nothing committed, and nothing staged but the partial transfer of a
/// result (kept for the rest of a cut transfer).
fn assert_nothing_committed_but_a_partial(store: &Store) {
    assert!(store.list().is_empty(), "a result was committed");
    assert!(store.list_failed().is_empty());
    let blobs = store.root().join("blobs");
    let n = fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "blobs were left in {}", blobs.display());
    let tmp = store.root().join("tmp");
    for e in fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(name.starts_with("partial-"), "staging {name} was left");
    }
}

/// The one partial folder in `store`'s `tmp/`.
fn partial_dir(store: &Store) -> PathBuf {
    let tmp = store.root().join("tmp");
    let dirs: Vec<PathBuf> = fs::read_dir(&tmp)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "one partial in {}", tmp.display());
    dirs[0].clone()
}

/// The lengths of the files of the partial transfer kept in `store`: the
/// output record's, then each artifact's staged so far.
fn partial_files(store: &Store) -> Vec<u64> {
    let dir = partial_dir(store);
    let len = |p: PathBuf| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut out = vec![len(dir.join("output.rec"))];
    for i in 0.. {
        let blob = dir.join("blobs").join(i.to_string());
        if !blob.exists() {
            break;
        }
        out.push(len(blob));
    }
    out
}

#[tokio::test]
async fn a_result_is_replayed_from_a_peer_byte_for_byte() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, stored_b) = producer_store(work.path(), &builder);
    let b = Arc::new(team.connect(&builder).await.unwrap());
    assert_eq!(b.identity(), "builder");
    assert_eq!(b.announce(&store_b).await.unwrap(), (1, 0));
    let serving = {
        let (b, store_b) = (b.clone(), store_b.clone());
        tokio::spawn(async move { b.serve(&store_b).await })
    };

    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();
    match a.lookup(&key, NS).await.unwrap() {
        Found::Offer { producer, counts } => {
            assert_eq!(producer, "builder");
            assert!(counts.contains("builder is trusted for"), "{counts}");
        }
        other => panic!("expected an offer, got {other:?}"),
    }
    assert_eq!(
        a.lookup(&inputs("t2").key(), NS).await.unwrap(),
        Found::NotFound
    );

    let store_a = Store::new(work.path().join("store-a"));
    let (got, who) = a
        .fetch_into(&key, NS, &inputs("t1"), &store_a)
        .await
        .unwrap();
    assert_eq!(who.name, "builder");
    assert_eq!(got.manifest, stored_b.manifest);
    assert_eq!(
        got.seal, stored_b.seal,
        "the producer's seal, byte for byte"
    );
    assert_eq!(
        fs::read(got.output_path()).unwrap(),
        fs::read(stored_b.output_path()).unwrap()
    );
    assert_eq!(got.manifest.artifacts.len(), 2);
    for art in &got.manifest.artifacts {
        assert_eq!(
            fs::read(store_a.blob_path(art)).unwrap(),
            fs::read(store_b.blob_path(art)).unwrap(),
            "{}",
            art.path
        );
    }
    assert!(store_a.get(&key).is_some(), "A now holds it locally");
    // The relay is in the audit log, with the producer's run time and
    // the bytes relayed.
    let audit = team
        .folder
        .state()
        .unwrap()
        .audit(&AuditFilter::default())
        .unwrap();
    let data_bytes: u64 =
        got.manifest.output_bytes + got.manifest.artifacts.iter().map(|a| a.bytes).sum::<u64>();
    match &audit[..] {
        [AuditEntry::Replay(r)] => {
            assert_eq!(
                (r.asker.as_str(), r.producer.as_str()),
                ("asker", "builder")
            );
            assert_eq!(r.relayer.as_deref(), Some("builder"));
            assert_eq!(r.namespace, NS);
            assert_eq!(r.key, key);
            assert_eq!(r.run_ms, Some(40), "the manifest's total_ms");
            assert_eq!(r.bytes, Some(data_bytes));
            assert!(r.relay_ms.is_some());
        }
        other => panic!("one replay expected: {other:?}"),
    }
    // And counted: two lookups (a hit and a miss), the bytes relayed.
    let live = team.telemetry.snapshot();
    assert_eq!((live.lookups, live.hits, live.misses), (2, 1, 1));
    assert_eq!(live.replays, 1);
    assert_eq!(live.relayed_bytes, data_bytes);
    let names: Vec<&str> = live.executors.iter().map(|e| e.identity.as_str()).collect();
    assert_eq!(names, ["builder", "asker"]);
    assert_eq!(live.executors[0].indexed, 1);

    drop(a);
    serving.abort();
    team.stop().await;
}

/// A producer checks a part it serves whole by the store's tag; tags that
/// do not hold (garbled, another key's) are not taken for damage: the
/// part's sha256 decides, and the result is served.
#[tokio::test]
async fn a_producer_whose_tags_do_not_hold_serves_by_sha256() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, stored_b) = producer_store(work.path(), &builder);
    assert!(store_b.tags(&stored_b).is_some(), "the commit kept tags");
    let parts = 1 + stored_b.manifest.artifacts.len();
    fs::write(
        stored_b.dir.join(reprise_executor::tags::TAGS_FILE),
        vec![7u8; 32 * parts],
    )
    .unwrap();
    assert!(store_b.tags(&stored_b).is_some(), "garbled, but read");
    let _b = relayer(&team, &builder, &store_b).await;
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();
    // Twice: the second time, the chunks' sha256s are remembered and only
    // the (garbled) tags would check the parts.
    for round in 0..2 {
        let store_a = Store::new(work.path().join(format!("a{round}")));
        let (got, _) = asker
            .fetch_into(&key, NS, &inputs("t1"), &store_a)
            .await
            .unwrap();
        assert_eq!(got.manifest, stored_b.manifest);
        crate_verify(&store_a, &got);
    }
    assert!(store_b.get(&key).is_some(), "not quarantined");
    team.stop().await;
}

/// A producer checks every byte it sends against the result's sha256s: an
/// artifact changed in its store after it served the result once (then
/// checked by the store's tag), before it served it, or after it served it
/// once its file had settled (then sent unhashed while its file's stamp is
/// the one checked) is never sent whole, and the result is quarantined.
#[tokio::test]
async fn a_producer_never_sends_an_artifact_changed_in_its_store() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();
    let rounds = [
        ("sub/big.bin", true, false),
        ("report.xml", false, false),
        ("sub/big.bin", true, true),
    ];
    for (round, (damaged, served, settled)) in rounds.into_iter().enumerate() {
        let dir = work.path().join(format!("round-{round}"));
        let (store_b, stored_b) = producer_store(&dir, &builder);
        if settled {
            // Past the time a file's last change must lie behind its
            // check for its stamp to be remembered.
            tokio::time::sleep(serve::SETTLED + Duration::from_millis(100)).await;
        }
        let b = Arc::new(team.connect(&builder).await.unwrap());
        b.announce(&store_b).await.unwrap();
        let serving = {
            let (b, store_b) = (b.clone(), store_b.clone());
            tokio::spawn(async move { b.serve(&store_b).await })
        };
        if served {
            // Served once whole: its chunks' sha256s are remembered.
            asker
                .fetch_into(&key, NS, &inputs("t1"), &Store::new(dir.join("first")))
                .await
                .unwrap();
        }
        if settled {
            // Served again, its files unchanged: not hashed by the holder.
            let again = Store::new(dir.join("again"));
            let (got, _) = asker
                .fetch_into(&key, NS, &inputs("t1"), &again)
                .await
                .unwrap();
            crate_verify(&again, &got);
        }
        let art = stored_b
            .manifest
            .artifacts
            .iter()
            .find(|a| a.path.as_str() == damaged)
            .unwrap();
        let blob = store_b.blob_path(art);
        let mut bytes = fs::read(&blob).unwrap();
        let at = bytes.len() - 2;
        bytes[at] ^= 1;
        fs::write(&blob, &bytes).unwrap();
        let store_a = Store::new(dir.join("second"));
        let err = asker
            .fetch_into(&key, NS, &inputs("t1"), &store_a)
            .await
            .unwrap_err();
        // Cut midway, or before the relay began if the producer stopped
        // that soon.
        assert!(
            matches!(&err, FetchError::Truncated { .. })
                || matches!(&err, FetchError::Unavailable(m) if m.contains("could not be served")),
            "{damaged}: {err:?}"
        );
        assert_nothing_committed_but_a_partial(&store_a);
        wait_until(|| store_b.get(&key).is_none()).await;
        serving.abort();
        b.close().await;
    }
    team.stop().await;
}

#[tokio::test]
async fn certificates_from_another_ca_are_refused() {
    let team = Team::start().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = Folder::init(other_dir.path(), &[]).unwrap();
    let pem = other.issue("eve", &[NS.into()], true, None).unwrap();
    // Eve trusts the team's server (so only her own certificate is at fault).
    let team_ca = team.folder.ca_pem().unwrap();
    let pem = format!(
        "{}{team_ca}",
        pem.split("-----BEGIN CERTIFICATE-----")
            .take(2)
            .collect::<Vec<_>>()
            .join("-----BEGIN CERTIFICATE-----")
    );
    let eve = Arc::new(Credentials::from_pem(&pem).unwrap());
    let err = team.connect(&eve).await.unwrap_err();
    assert!(
        matches!(err, LinkError::Connection(_) | LinkError::Connect(_)),
        "{err:?}"
    );
    let chain = format!("{:?}", err);
    assert!(
        chain.contains("UnknownCA")
            || chain.contains("unknown CA")
            || chain.contains("certificate"),
        "{chain}"
    );
    team.stop().await;
}

#[tokio::test]
async fn expired_certificates_are_refused() {
    let team = Team::start().await;
    let pem = team
        .folder
        .issue(
            "old",
            &[NS.into()],
            true,
            Some((
                rcgen::date_time_ymd(2020, 1, 1),
                rcgen::date_time_ymd(2021, 1, 1),
            )),
        )
        .unwrap();
    let old = Arc::new(Credentials::from_pem(&pem).unwrap());
    let err = team.connect(&old).await.unwrap_err();
    let chain = format!("{err:?}");
    assert!(
        chain.contains("Expired") || chain.contains("expired"),
        "{chain}"
    );
    team.stop().await;
}

#[tokio::test]
async fn a_closed_link_says_goodbye_and_the_orchestrator_forgets_it_at_once() {
    let team = Team::start().await;
    let link = team
        .connect(&team.creds("brief", &[NS], true))
        .await
        .unwrap();
    wait_until(|| team.telemetry.snapshot().executors.len() == 1).await;
    // The close frame is seen leaving: a close that only waited out its
    // time limit would leave the orchestrator to find the link gone at
    // its idle timeout (10 s), past `wait_until`'s 5 s.
    assert!(link.close().await, "the close frame was not seen leaving");
    wait_until(|| team.telemetry.snapshot().executors.is_empty()).await;
    team.stop().await;
}

#[tokio::test]
async fn revoked_identities_are_refused_at_connection() {
    let team = Team::start().await;
    let creds = team.creds("leaver", &[NS], true);
    let first = team.connect(&creds).await.unwrap();
    first.close().await;
    team.folder.revoke("leaver").unwrap();
    let err = team.connect(&creds).await.unwrap_err();
    match err {
        LinkError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(server::close::REVOKED)
            );
            assert!(String::from_utf8_lossy(&close.reason).contains("revoked"));
        }
        other => panic!("expected a close for revocation, got {other:?}"),
    }
    assert!(
        team.telemetry
            .snapshot()
            .refusals
            .contains(&(Refusal::Revoked, 1))
    );
    // The name exists: a plain issue is refused, a replacing one makes a
    // new certificate that is admitted again.
    let repos = vec![NS.to_string()];
    assert!(matches!(
        team.folder.issue("leaver", &repos, true, None),
        Err(FolderError::NameTaken(_))
    ));
    team.connect(&team.reissued("leaver", &[NS], true))
        .await
        .unwrap();
    team.stop().await;
}

#[tokio::test]
async fn a_connected_identity_that_is_revoked_is_cut_off_and_no_longer_offered() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let leaver = team.creds("leaver", &[NS], true);
    let (store_b, stored) = producer_store(work.path(), &leaver);
    let producer = team.connect(&leaver).await.unwrap();
    producer.announce(&store_b).await.unwrap();
    let asker = team.connect(&team.creds("ci", &[NS], true)).await.unwrap();
    let key = stored.manifest.key;
    assert!(matches!(
        asker.lookup(&key, NS).await.unwrap(),
        Found::Offer { .. }
    ));

    // `reprise-orchestrator revoke` runs as another process: it only
    // writes the database, whose change the service notices.
    team.folder.revoke("leaver").unwrap();
    let closed = tokio::time::timeout(server::REVOCATION_SWEEP * 5, producer.connection().closed())
        .await
        .expect("the revoked executor's connection is closed");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(server::close::REVOKED)
            );
            assert!(String::from_utf8_lossy(&c.reason).contains("revoked"));
        }
        other => panic!("expected a close for revocation, got {other:?}"),
    }
    assert_eq!(asker.lookup(&key, NS).await.unwrap(), Found::NotFound);
    // Others stay connected.
    assert!(asker.connection().close_reason().is_none());
    team.stop().await;
}

#[tokio::test]
async fn a_namespace_not_granted_looks_exactly_like_no_result() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, _) = producer_store(work.path(), &builder);
    let b = team.connect(&builder).await.unwrap();
    b.announce(&store_b).await.unwrap();
    let c = team
        .connect(&team.creds("other-team", &["example.com/other/x"], false))
        .await
        .unwrap();
    let held = Message::Lookup {
        key: inputs("t1").key(),
        namespace: NS.into(),
    };
    let absent = Message::Lookup {
        key: inputs("nope").key(),
        namespace: NS.into(),
    };
    let a1 = c.request(&held).await.unwrap();
    let a2 = c.request(&absent).await.unwrap();
    assert_eq!(a1, Message::NotFound);
    assert_eq!(a1, a2, "the answer leaks whether the result exists");
    let store_c = Store::new(work.path().join("store-c"));
    let err = c
        .fetch_into(&inputs("t1").key(), NS, &inputs("t1"), &store_c)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::NotFound), "{err:?}");
    assert_nothing_committed(&store_c);
    // An untrusted producer in the same namespace is not offered either.
    let laptop = team.creds("laptop", &[NS], false);
    let u = team.connect(&laptop).await.unwrap();
    let (store_u, _) = producer_store(&work.path().join("u"), &laptop);
    u.announce(&store_u).await.unwrap();
    drop(b);
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    // b's connection may take a moment to be noticed as gone: closing it
    // explicitly would be the same; poll until the index forgot it.
    for _ in 0..100 {
        if asker.lookup(&inputs("t1").key(), NS).await.unwrap() == Found::NotFound {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        asker.lookup(&inputs("t1").key(), NS).await.unwrap(),
        Found::NotFound
    );
    team.stop().await;
}

/// Opens a raw request stream, writes `bytes`, finishes, reads the answer.
async fn raw(peer: &Link, bytes: &[u8]) -> Message {
    let (mut send, mut recv) = peer.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    read_message(&mut recv).await.unwrap()
}

fn code(m: &Message) -> ErrorCode {
    match m {
        Message::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_frames_are_refused_with_a_clear_error() {
    let team = Team::start().await;
    let p = team.connect(&team.creds("p", &[NS], false)).await.unwrap();
    let over = ((wire::MAX_FRAME + 1) as u32).to_be_bytes();
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(b"{\"type\":");
    let unknown = {
        let body = br#"{"type":"steal-keys"}"#;
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    let table: [(&str, Vec<u8>, ErrorCode); 4] = [
        (
            "over the size limit",
            over.to_vec(),
            ErrorCode::FrameTooLarge,
        ),
        ("truncated", truncated, ErrorCode::Malformed),
        ("unknown message", unknown, ErrorCode::UnknownMessage),
        (
            "a message that is not a request",
            wire::encode(&Message::Hello { version: 1 }).unwrap(),
            ErrorCode::Unexpected,
        ),
    ];
    for (name, bytes, want) in table {
        let answer = raw(&p, &bytes).await;
        assert_eq!(code(&answer), want, "{name}: {answer:?}");
    }
    // The connection is still usable after refused requests.
    assert_eq!(
        p.lookup(&inputs("k").key(), NS).await.unwrap(),
        Found::NotFound
    );
    team.stop().await;
}

#[tokio::test]
async fn unknown_versions_and_a_missing_hello_are_refused() {
    let team = Team::start().await;
    let creds = team.creds("p", &[NS], false);
    let connect = || async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(creds.client_config().unwrap());
        let conn = endpoint
            .connect(team.addr, "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        (endpoint, conn)
    };
    let (endpoint, conn) = connect().await;
    let err = Link::hello(endpoint, conn, creds.clone(), 99)
        .await
        .unwrap_err();
    match err {
        LinkError::Refused {
            code: ErrorCode::UnsupportedVersion,
            message,
        } => assert!(
            message.contains("99") && message.contains("[3]"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    let (_endpoint, conn) = connect().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_message(
        &mut send,
        &Message::Lookup {
            key: inputs("k").key(),
            namespace: NS.into(),
        },
    )
    .await
    .unwrap();
    send.finish().unwrap();
    assert_eq!(
        code(&read_message(&mut recv).await.unwrap()),
        ErrorCode::HelloFirst
    );
    team.stop().await;
}

/// What a misbehaving producer does to the honest transfer.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Dies after sending part of the data.
    DieMidway,
    /// Flips one byte of the big artifact (in its second chunk, sent with
    /// the sha256 of the chunk as it should be).
    FlipByte,
    /// Sends a manifest (correctly sealed) with the key asked but the
    /// inputs of another run.
    OtherInputs,
    /// Sends a correctly sealed manifest of another key.
    OtherKey,
    /// Sends a correctly sealed result other than the one it announced.
    OtherOutputs,
    /// Sends no signature.
    Unsigned,
    /// Sends the producer's seal with a manifest whose BLAKE3 digests it
    /// took out.
    StripBlake3,
    /// Seals with another identity's key under its own certificate.
    SignedByAnother,
    /// Presents a certificate (and signature) from another CA.
    ForeignCert,
    /// Sends more data after the last artifact.
    Trailing,
    /// Sends a chunk of the big artifact with one byte changed, and the
    /// sha256 of the changed chunk: every chunk checks, the artifact does not.
    HostileChunkHash,
}

/// Bytes of artifacts staged by a fetch into the store at `root`.
fn staged_bytes(root: &Path) -> u64 {
    let Ok(dirs) = fs::read_dir(root.join("tmp")) else {
        return 0;
    };
    dirs.flatten()
        .filter_map(|d| fs::read_dir(d.path().join("blobs")).ok())
        .flat_map(|files| files.flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not met within 5 s");
}

/// A producer named `name` that announces its honest result and then, asked
/// to serve it, commits `fault`.
async fn rogue_producer(team: &Team, fault: Fault, name: &str, asker_store: PathBuf) -> Arc<Link> {
    let creds = team.creds(name, &[NS], true);
    let other = team.creds(&format!("{name}-someone"), &[NS], true);
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = Folder::init(foreign_dir.path(), &[]).unwrap();
    let foreign = Credentials::from_pem(&foreign.issue("f", &[], true, None).unwrap()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (store, stored) = producer_store(work.path(), &creds);
    let peer = Arc::new(team.connect(&creds).await.unwrap());
    assert_eq!(peer.announce(&store).await.unwrap(), (1, 0));
    let p = peer.clone();
    tokio::spawn(async move {
        let _work = work;
        let (mut send, mut recv) = p.connection().accept_bi().await.unwrap();
        let _serve = read_message(&mut recv).await.unwrap();
        let mut transfer: Sealed = stored.sealed().unwrap();
        let mut data: Vec<Vec<u8>> = transfer_files(&store, &stored)
            .iter()
            .map(|f| fs::read(f).unwrap())
            .collect();
        // The sha256 of every chunk as it should be.
        let honest: Vec<Vec<[u8; 32]>> = data
            .iter()
            .map(|part| {
                part.chunks(wire::CHUNK_BYTES as usize)
                    .map(|c| Sha256Digest::of(c).as_bytes().to_owned())
                    .collect()
            })
            .collect();
        let mut shas = honest.clone();
        match fault {
            Fault::FlipByte => data[2][1_234_567] ^= 0x20,
            Fault::HostileChunkHash => {
                data[2][1_234_567] ^= 0x20;
                let chunk = &data[2][1 << 20..2 << 20];
                shas[2][1] = Sha256Digest::of(chunk).as_bytes().to_owned();
            }
            Fault::OtherInputs => {
                transfer.manifest.inputs = inputs("t-other");
                transfer.seal = creds.seal(&transfer.manifest);
            }
            Fault::OtherKey => {
                transfer.manifest.inputs = inputs("t-other");
                transfer.manifest.key = inputs("t-other").key();
                transfer.seal = creds.seal(&transfer.manifest);
            }
            Fault::OtherOutputs => {
                transfer.manifest.artifacts[0].mode = 0o700;
                transfer.seal = creds.seal(&transfer.manifest);
            }
            Fault::Unsigned => transfer.seal.signature = String::new(),
            Fault::StripBlake3 => {
                assert!(transfer.manifest.blake3().is_some(), "made with them");
                transfer.manifest.output_blake3 = None;
                for a in &mut transfer.manifest.artifacts {
                    a.blake3 = None;
                }
            }
            Fault::SignedByAnother => {
                transfer.seal.signature = other.seal(&transfer.manifest).signature;
            }
            Fault::ForeignCert => transfer.seal = foreign.seal(&transfer.manifest),
            Fault::Trailing | Fault::DieMidway => {}
        }
        let parts = transfer.parts().len();
        let header = Message::Transfer {
            result: Box::new(transfer),
            from: vec![0; parts],
        };
        write_message(&mut send, &header).await.unwrap();
        let mut sent = 0;
        for (part, shas) in data.iter().zip(&shas) {
            for (chunk, sha) in part.chunks(wire::CHUNK_BYTES as usize).zip(shas) {
                if matches!(fault, Fault::DieMidway) && sent > 1_000_000 {
                    // Killed once the asker is streaming the big artifact:
                    // the connection goes away with the data half sent.
                    wait_until(|| staged_bytes(&asker_store) > 0).await;
                    p.connection().close(quinn::VarInt::from_u32(9), b"killed");
                    return;
                }
                let _ = send.write_all(&wire::chunk_header(chunk.len())).await;
                let _ = send.write_all(sha).await;
                let _ = send.write_all(chunk).await;
                sent += chunk.len();
            }
        }
        if matches!(fault, Fault::Trailing) {
            let _ = send.write_all(&wire::chunk_header(4)).await;
            let _ = send.write_all(&[0; 32]).await;
            let _ = send.write_all(b"more").await;
        }
        let _ = send.finish();
        let _ = send.stopped().await;
        drop(foreign_dir);
    });
    peer
}

#[tokio::test]
async fn bad_transfers_are_never_committed() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let key = inputs("t1").key();
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    // The orchestrator checks a relayed header against what was announced
    // (a seal that holds, the same producer and outputs) and refuses before
    // any data; the asker checks everything again, and the data.
    let refused_by_the_orchestrator = |e: &FetchError| matches!(e, FetchError::Unavailable(m) if m.contains("could not be served"));
    type Case = (Fault, Box<dyn Fn(&FetchError) -> bool>);
    let table: Vec<Case> = vec![
        (
            Fault::DieMidway,
            Box::new(|e| matches!(e, FetchError::Truncated { .. })),
        ),
        // A chunk that does not match the sha256 sent with it is taken in
        // (the receiver never checks the holder's sha256s), and the
        // artifact refused as a whole by the BLAKE3 digest its producer
        // sealed; so is a holder's that sends bad bytes with sha256s that
        // match them.
        (
            Fault::FlipByte,
            Box::new(
                |e| matches!(e, FetchError::Blake3 { part, .. } if part == "artifact sub/big.bin"),
            ),
        ),
        (
            Fault::HostileChunkHash,
            Box::new(
                |e| matches!(e, FetchError::Blake3 { part, .. } if part == "artifact sub/big.bin"),
            ),
        ),
        (Fault::OtherInputs, Box::new(refused_by_the_orchestrator)),
        (
            Fault::OtherKey,
            Box::new(|e| matches!(e, FetchError::Unavailable(m) if m.contains("another result"))),
        ),
        (
            Fault::OtherOutputs,
            Box::new(
                |e| matches!(e, FetchError::Unavailable(m) if m.contains("other than the one it announced")),
            ),
        ),
        (Fault::Unsigned, Box::new(refused_by_the_orchestrator)),
        // The BLAKE3 digests are under the seal: a holder dropping them
        // (for the receiver to check what it would by sha256) breaks it.
        (Fault::StripBlake3, Box::new(refused_by_the_orchestrator)),
        (
            Fault::SignedByAnother,
            Box::new(refused_by_the_orchestrator),
        ),
        (Fault::ForeignCert, Box::new(refused_by_the_orchestrator)),
        // The orchestrator walks the chunk frames: bytes after the last
        // part break the relay off, so the asker sees a cut transfer.
        (
            Fault::Trailing,
            Box::new(|e| matches!(e, FetchError::Truncated { .. })),
        ),
    ];
    for (n, (fault, expected)) in table.into_iter().enumerate() {
        let store_a = Store::new(work.path().join(format!("store-a-{n}")));
        let producer = rogue_producer(
            &team,
            fault,
            &format!("builder-{n}"),
            store_a.root().to_path_buf(),
        )
        .await;
        // Producers of earlier rounds may linger in the index until the
        // orchestrator notices they are gone; wait for this one's offer.
        let want = format!("builder-{n}");
        let mut offered = None;
        for _ in 0..100 {
            match asker.lookup(&key, NS).await.unwrap() {
                Found::Offer { producer, .. } if producer == want => {
                    offered = Some(producer);
                    break;
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        assert_eq!(offered.as_deref(), Some(want.as_str()), "{fault:?}");
        let err = asker
            .fetch_into(&key, NS, &inputs("t1"), &store_a)
            .await
            .unwrap_err();
        assert!(expected(&err), "{fault:?}: got {err:?}");
        assert!(!err.to_string().is_empty());
        match fault {
            // Cut: what was checked is kept for the rest, and nothing else.
            Fault::DieMidway => {
                assert_nothing_committed_but_a_partial(&store_a);
                let kept = partial_files(&store_a);
                assert!(kept[0] > 0 && kept[1] == 5, "{kept:?}");
                assert_eq!(kept[2] % wire::CHUNK_BYTES, 0, "whole chunks: {kept:?}");
            }
            // Every part arrived and checked, and then the relay broke the
            // stream off: the parts are kept (each matched the manifest),
            // nothing is committed.
            Fault::Trailing => assert_nothing_committed_but_a_partial(&store_a),
            // The artifact did not match the manifest: the partial goes.
            _ => assert_nothing_committed(&store_a),
        }
        producer.close().await;
    }
    // The relays that completed are audited, though the asker refused them
    // itself once every byte was in: the flipped byte's and the hostile
    // chunk hashes'.
    let replays = team.folder.state().unwrap().replays().unwrap();
    assert_eq!(replays, 2, "relays audited");
    team.stop().await;
}

/// A store holding one passed result for `inputs("t1")` whose big artifact
/// is `mib` MiB, sealed by `producer`; the bytes of its parts.
fn producer_store_of(dir: &Path, producer: &Credentials, mib: usize) -> (Store, StoredResult, u64) {
    let (store, stored) = producer_store_with(dir, Some(producer), |_| {});
    // The same result with a bigger artifact: committed again over it.
    let arts = dir.join("arts");
    let big: Vec<u8> = (0..mib << 20)
        .map(|i| (i % 253) as u8 ^ (i >> 20) as u8)
        .collect();
    fs::write(arts.join("sub/big.bin"), &big).unwrap();
    let record = fs::read(stored.output_path()).unwrap();
    let stored = store
        .commit(
            stored.manifest.clone(),
            &record,
            Some(&arts),
            Some(producer),
        )
        .unwrap();
    let total = stored.sealed().unwrap().bytes_from(&[0, 0, 0]);
    (store, stored, total)
}

#[tokio::test]
async fn a_cut_transfer_resumes_from_its_last_checked_chunk_from_the_same_or_another_holder() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, stored_b, total) = producer_store_of(work.path(), &builder, 8);
    let key = inputs("t1").key();
    let b = relayer(&team, &builder, &store_b).await;
    // Parts: the record (1 chunk), report.xml (1 chunk), big.bin (8
    // chunks). Cut at chunk 6 of the result: 4 chunks of big.bin arrive.
    b.stop_serving_at(Some(6));
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let store_a = Store::new(work.path().join("store-a"));
    let cut = asker
        .fetch(&key, NS, &inputs("t1"), &store_a)
        .await
        .unwrap_err();
    assert!(matches!(cut, FetchError::Truncated { .. }), "{cut:?}");
    assert_nothing_committed_but_a_partial(&store_a);
    let record = stored_b.manifest.output_bytes;
    assert_eq!(partial_files(&store_a), [record, 5, 4 << 20]);

    // Someone changes a byte of big.bin's third chunk on disk, leaving the
    // records alone: the part's sha256, hashed on from the state recorded
    // after chunk 4, would still match. Asked again, the same producer
    // sends the rest at once; the chunks kept are read back meanwhile, the
    // third no longer hashes to its record, so nothing is committed, the
    // part is cut back to two chunks and the rest asked from there.
    let big = partial_dir(&store_a).join("blobs/1");
    let mut bytes = fs::read(&big).unwrap();
    bytes[(2 << 20) + 7] ^= 0x20;
    fs::write(&big, &bytes).unwrap();
    b.stop_serving_at(None);
    let fetched = asker
        .fetch(&key, NS, &inputs("t1"), &store_a)
        .await
        .unwrap();
    assert_eq!(fetched.resumed, record + 5 + (2 << 20));
    assert_eq!(
        fetched.received,
        6 << 20,
        "what was left after the cut back"
    );
    assert_eq!(fetched.resumed + fetched.received, total);
    assert_eq!(fetched.stored.manifest, stored_b.manifest);
    for a in &stored_b.manifest.artifacts {
        assert_eq!(
            fs::read(store_a.blob_path(a)).unwrap(),
            fs::read(store_b.blob_path(a)).unwrap(),
            "{}",
            a.path
        );
    }
    assert_eq!(
        fs::read(fetched.stored.output_path()).unwrap(),
        fs::read(stored_b.output_path()).unwrap()
    );
    assert_eq!(fs::read_dir(store_a.root().join("tmp")).unwrap().count(), 0);

    // Cut again for another asker, and the rest from another executor
    // holding the same result (a copy of the producer's store).
    b.stop_serving_at(Some(3));
    let store_c = Store::new(work.path().join("store-c"));
    let cut = asker
        .fetch(&key, NS, &inputs("t1"), &store_c)
        .await
        .unwrap_err();
    assert!(matches!(cut, FetchError::Truncated { .. }), "{cut:?}");
    assert_eq!(partial_files(&store_c), [record, 5, 1 << 20]);
    b.close().await;
    let mirror = team.creds("mirror", &[NS], false);
    let copy = Store::new(work.path().join("store-copy"));
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(store_b.root())
        .arg(copy.root())
        .status()
        .unwrap();
    assert!(status.success());
    let _m = relayer(&team, &mirror, &copy).await;
    let mut fetched = None;
    for _ in 0..100 {
        match asker.fetch(&key, NS, &inputs("t1"), &store_c).await {
            Ok(f) => {
                fetched = Some(f);
                break;
            }
            // The orchestrator may not have noticed the producer is gone.
            Err(FetchError::NotFound | FetchError::Unavailable(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let fetched = fetched.expect("the mirror serves the rest");
    assert_eq!(fetched.resumed, record + 5 + (1 << 20));
    assert_eq!(fetched.received, 7 << 20);
    assert_eq!(fetched.stored.manifest, stored_b.manifest);
    crate_verify(&store_c, &fetched.stored);
    team.stop().await;
}

/// Every artifact of `stored` in `store` matches its sha256.
fn crate_verify(store: &Store, stored: &StoredResult) {
    for a in &stored.manifest.artifacts {
        let bytes = fs::read(store.blob_path(a)).unwrap();
        assert_eq!(Sha256Digest::of(&bytes), a.sha256, "{}", a.path);
    }
}

#[tokio::test]
async fn a_partial_is_not_resumed_into_another_result_of_the_key() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, _, _) = producer_store_of(work.path(), &builder, 4);
    let key = inputs("t1").key();
    let b = relayer(&team, &builder, &store_b).await;
    b.stop_serving_at(Some(4));
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let store_a = Store::new(work.path().join("store-a"));
    asker
        .fetch(&key, NS, &inputs("t1"), &store_a)
        .await
        .unwrap_err();
    assert_eq!(partial_files(&store_a)[2], 2 << 20);
    b.close().await;
    // The same key produced again (another manifest: another time, other
    // bytes) by another producer: nothing of the partial is used, and it
    // goes.
    let other = team.creds("other", &[NS], true);
    let dir2 = work.path().join("second");
    fs::create_dir_all(&dir2).unwrap();
    let (store_o, stored_o, total) = producer_store_of(&dir2, &other, 3);
    let _o = relayer(&team, &other, &store_o).await;
    let mut fetched = None;
    for _ in 0..100 {
        match asker.fetch(&key, NS, &inputs("t1"), &store_a).await {
            Ok(f) => {
                fetched = Some(f);
                break;
            }
            Err(FetchError::NotFound | FetchError::Unavailable(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let fetched = fetched.expect("fetched from the other producer");
    assert_eq!((fetched.resumed, fetched.received), (0, total));
    assert_eq!(fetched.stored.manifest, stored_o.manifest);
    assert_eq!(fs::read_dir(store_a.root().join("tmp")).unwrap().count(), 0);
    team.stop().await;
}

/// An executor that holds a copy of another's store and serves it.
async fn relayer(team: &Team, creds: &Arc<Credentials>, store: &Store) -> Arc<Link> {
    let peer = Arc::new(team.connect(creds).await.unwrap());
    peer.announce(store).await.unwrap();
    let (p, s) = (peer.clone(), store.clone());
    tokio::spawn(async move { p.serve(&s).await });
    peer
}

/// A GET over plain HTTP/1.1: the status line, the headers and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a header");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

#[tokio::test]
async fn the_http_listener_serves_metrics_and_a_dashboard_of_the_replays() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, _) = producer_store(work.path(), &builder);
    let _b = relayer(&team, &builder, &store_b).await;
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();
    assert!(matches!(
        asker.lookup(&key, NS).await.unwrap(),
        Found::Offer { .. }
    ));
    asker
        .fetch_into(&key, NS, &inputs("t1"), &Store::new(work.path().join("a")))
        .await
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let web = tokio::spawn(reprise_orchestrator::http::run(
        listener,
        team.telemetry.clone(),
        team.folder.state().unwrap(),
        async {
            let _ = stopped.await;
        },
    ));
    let (status, headers, body) = http_get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    for line in [
        "reprise_executors_connected 2",
        "reprise_lookups_total 1",
        "reprise_lookup_hits_total 1",
        "reprise_replays_total 1",
        "reprise_refusals_total{reason=\"revoked\"} 0",
    ] {
        assert!(body.contains(line), "{line:?} missing:\n{body}");
    }
    assert!(
        !body.contains("reprise_relayed_bytes_total 0\n"),
        "bytes were relayed:\n{body}"
    );
    let (status, headers, page) = http_get(addr, "/").await;
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("content-security-policy: default-src 'none'"),
        "{headers}"
    );
    assert!(page.contains(NS), "the repository is listed:\n{page}");
    assert!(page.contains("asker replayed builder's result"), "{page}");
    assert!(
        page.contains("<dd id=\"executors-connected\">2</dd>"),
        "{page}"
    );
    let (status, _, _) = http_get(addr, "/../state.db").await;
    assert!(status.contains("404"), "{status}");
    let _ = stop.send(());
    web.await.unwrap().unwrap();
    team.stop().await;
}

#[tokio::test]
async fn a_result_counts_by_its_producer_never_by_who_relays_it() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let key = inputs("t1").key();
    let alice = team.creds("alice", &[NS], true);
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();

    // Alice's sealed result, held and served by an untrusted laptop while
    // alice is offline: it counts, as alice's.
    let laptop = team.creds("laptop", &[NS], false);
    let (store_l, stored) = producer_store(&work.path().join("l"), &alice);
    let l = relayer(&team, &laptop, &store_l).await;
    match asker.lookup(&key, NS).await.unwrap() {
        Found::Offer { producer, .. } => assert_eq!(producer, "alice"),
        other => panic!("{other:?}"),
    }
    let store_a = Store::new(work.path().join("a1"));
    let (got, who) = asker
        .fetch_into(&key, NS, &inputs("t1"), &store_a)
        .await
        .unwrap();
    assert_eq!(who.name, "alice");
    assert_eq!(got.seal, stored.seal);
    l.close().await;

    // A hand-made result (no seal) in a trusted executor's store is never
    // announced, served, or offered.
    let carol = team.creds("carol", &[NS], true);
    let (store_c, _) = producer_store_with(&work.path().join("c"), None, |_| {});
    let c = relayer(&team, &carol, &store_c).await;
    assert_eq!(
        c.announce(&store_c).await.unwrap(),
        (0, 0),
        "nothing to announce"
    );
    assert_eq!(asker.lookup(&key, NS).await.unwrap(), Found::NotFound);
    c.close().await;

    // A result sealed by bob, who was revoked since: a trusted relayer's
    // announcement of it is refused, and nothing is offered.
    let bob = team.creds("bob", &[NS], true);
    let (store_r, _) = producer_store(&work.path().join("r"), &bob);
    team.folder.revoke("bob").unwrap();
    tokio::time::sleep(server::REVOCATION_SWEEP * 2).await;
    let dave = team.creds("dave", &[NS], true);
    let d = Arc::new(team.connect(&dave).await.unwrap());
    assert_eq!(d.announce(&store_r).await.unwrap(), (0, 1), "refused");
    assert!(d.revoked().contains(&bob.identity().unwrap().fingerprint));
    assert_eq!(asker.lookup(&key, NS).await.unwrap(), Found::NotFound);
    // An executor that connected before the revocation still has bob in
    // no list; a fresh connection gets the list, and its own check refuses
    // bob's seal even if something offered it.
    let sealed = stored.sealed().unwrap();
    let bobs = Sealed {
        seal: bob.seal(&sealed.manifest),
        manifest: sealed.manifest,
    };
    let err = reprise_executor::link::check_transfer(
        &[bob.ca().clone()],
        &bobs,
        &key,
        &inputs("t1"),
        d.revoked(),
        rustls::pki_types::UnixTime::now(),
    )
    .unwrap_err();
    assert!(
        matches!(err, FetchError::Seal(SealError::Revoked { .. })),
        "{err:?}"
    );
    assert_nothing_committed(&Store::new(work.path().join("nothing")));
    team.stop().await;
}

#[tokio::test]
async fn trusted_producers_that_disagree_are_a_conflict_shown_and_audited() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let key = inputs("t1").key();
    let ci = team.creds("ci", &[NS], true);
    let alice = team.creds("alice", &[NS], true);
    let (store_ci, _) = producer_store(&work.path().join("ci"), &ci);
    // Alice's run of the same key failed.
    let (store_al, _) = producer_store_with(&work.path().join("al"), Some(&alice), |m| {
        m.outcome = Outcome::Failed;
        m.exit_code = 1;
    });
    let _c = relayer(&team, &ci, &store_ci).await;
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    assert!(matches!(
        asker.lookup(&key, NS).await.unwrap(),
        Found::Offer { .. }
    ));
    let a = relayer(&team, &alice, &store_al).await;
    assert_eq!(
        asker.lookup(&key, NS).await.unwrap(),
        Found::Conflict {
            producers: vec!["alice".into(), "ci".into()]
        }
    );
    let err = asker
        .fetch_into(&key, NS, &inputs("t1"), &Store::new(work.path().join("a")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::NotFound), "{err:?}");
    // Written to the audit log, once.
    let _ = alice;
    assert_eq!(team.folder.state().unwrap().conflicts().unwrap(), 1);
    let live = team.telemetry.snapshot();
    assert_eq!((live.conflicts, live.lookup_conflicts), (1, 1));
    // Alice goes away (as a CI job that verified and disagreed does): the
    // disagreement stands, ci's result is still not offered...
    a.close().await;
    wait_until(|| team.telemetry.snapshot().executors.len() == 2).await;
    assert_eq!(
        asker.lookup(&key, NS).await.unwrap(),
        Found::Conflict {
            producers: vec!["alice".into(), "ci".into()]
        },
        "a recorded conflict outlives the connection of one side"
    );
    // ... until one side is revoked.
    team.folder.revoke("alice").unwrap();
    assert!(matches!(
        asker.lookup(&key, NS).await.unwrap(),
        Found::Offer { producer, .. } if producer == "ci"
    ));
    team.stop().await;

    // The repository's policy can say which producer wins.
    let team = Team::with_settings("[policy]\nprefer = [\"ci\"]\n").await;
    let ci = team.creds("ci", &[NS], true);
    let alice = team.creds("alice", &[NS], true);
    let (store_ci, _) = producer_store(&work.path().join("ci2"), &ci);
    let (store_al, _) = producer_store_with(&work.path().join("al2"), Some(&alice), |m| {
        m.outcome = Outcome::Failed;
        m.exit_code = 1;
    });
    let _c = relayer(&team, &ci, &store_ci).await;
    let _a = relayer(&team, &alice, &store_al).await;
    let asker = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    match asker.lookup(&key, NS).await.unwrap() {
        Found::Offer { producer, counts } => {
            assert_eq!(producer, "ci");
            assert!(counts.contains("prefers"), "{counts}");
        }
        other => panic!("{other:?}"),
    }
    team.stop().await;
}

/// A case of a policy: its name, the result, whether the asker is offered
/// it (and told it counts), and a word the reason must hold.
type PolicyCase<'a> = (&'a str, &'a (Store, StoredResult), bool, &'a str);

/// Serves each case's result from `producer`, then checks what the asker
/// is offered and told of each.
async fn assert_policy(
    team: &Team,
    producer: &Arc<Credentials>,
    asker: &Link,
    cases: &[PolicyCase<'_>],
) {
    let mut holders = Vec::new();
    for (_, (store, _), _, _) in cases {
        holders.push(relayer(team, producer, store).await);
    }
    for &(name, (_, stored), offered, why) in cases {
        let m = &stored.manifest;
        let found = asker.lookup(&m.key, &m.inputs.namespace).await.unwrap();
        assert_eq!(
            matches!(found, Found::Offer { .. }),
            offered,
            "{name}: {found:?}"
        );
        let (counts, reason) = asker.assess(stored.sealed().unwrap()).await.unwrap();
        assert_eq!(counts, offered, "{name}");
        assert!(reason.contains(why), "{name}: {reason}");
    }
}

#[tokio::test]
async fn the_policy_can_require_fresh_snapshots_and_refuse_networked_runs() {
    let ns_fresh = "example.com/team/strict";
    let team = Team::with_settings(&format!(
        "[policy.repos.\"{ns_fresh}\"]\nrequire_fresh = true\n"
    ))
    .await;
    let work = tempfile::tempdir().unwrap();
    let ci = team.creds("ci", &[NS, ns_fresh], true);
    let asker = team
        .connect(&team.creds("asker", &[NS, ns_fresh], false))
        .await
        .unwrap();
    let generation = Snapshot::Generation(Sha256Digest::of(b"an earlier run's images"));
    let reinputs = |m: &mut ResultManifest, ns: &str, network: bool| {
        m.inputs.namespace = ns.into();
        m.inputs.network = network;
        m.key = m.inputs.key();
    };
    let stale_strict = producer_store_with(&work.path().join("1"), Some(&ci), |m| {
        reinputs(m, ns_fresh, false);
        m.snapshot = generation;
    });
    let stale_default = producer_store_with(&work.path().join("2"), Some(&ci), |m| {
        m.inputs.tree = "t2".into();
        reinputs(m, NS, false);
        m.snapshot = generation;
    });
    let networked = producer_store_with(&work.path().join("3"), Some(&ci), |m| {
        m.inputs.tree = "t3".into();
        reinputs(m, NS, true);
    });
    let cases = [
        (
            "a stale snapshot where fresh is required",
            &stale_strict,
            false,
            "fresh snapshot",
        ),
        (
            "a stale snapshot where the default holds",
            &stale_default,
            true,
            "trusted",
        ),
        ("tests with the network", &networked, false, "network"),
    ];
    assert_policy(&team, &ci, &asker, &cases).await;
    team.stop().await;
}

#[tokio::test]
async fn the_policy_can_count_only_the_results_of_vm_runs() {
    let ns_vm = "example.com/team/vm-only";
    let team = Team::with_settings(&format!(
        "[policy.repos.\"{ns_vm}\"]\ncount_drivers = [\"qemu\"]\n"
    ))
    .await;
    let work = tempfile::tempdir().unwrap();
    let ci = team.creds("ci", &[NS, ns_vm], true);
    let asker = team
        .connect(&team.creds("asker", &[NS, ns_vm], false))
        .await
        .unwrap();
    let reinputs = |m: &mut ResultManifest, ns: &str, tree: &str, driver: &str| {
        m.inputs.namespace = ns.into();
        m.inputs.tree = tree.into();
        m.inputs.driver = driver.into();
        m.key = m.inputs.key();
    };
    let podman_strict = producer_store_with(&work.path().join("1"), Some(&ci), |m| {
        reinputs(m, ns_vm, "t1", "podman")
    });
    let qemu_strict = producer_store_with(&work.path().join("2"), Some(&ci), |m| {
        reinputs(m, ns_vm, "t2", "qemu")
    });
    let podman_default = producer_store_with(&work.path().join("3"), Some(&ci), |m| {
        reinputs(m, NS, "t3", "podman")
    });
    let cases = [
        (
            "a podman run where only qemu counts",
            &podman_strict,
            false,
            "under the podman driver",
        ),
        (
            "a qemu run where only qemu counts",
            &qemu_strict,
            true,
            "under the qemu driver",
        ),
        (
            "a podman run where the default holds",
            &podman_default,
            true,
            "trusted",
        ),
    ];
    assert_policy(&team, &ci, &asker, &cases).await;
    team.stop().await;
}

#[tokio::test]
async fn an_executor_announces_only_what_its_certificate_grants() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let other_ns = "example.com/private/secret";
    let ci = team.creds("ci", &[NS, other_ns], true);
    // A store holding a result of a repository the connecting identity is
    // not granted: the executor does not announce it, and the orchestrator
    // would refuse it if it did.
    let (store, stored) = producer_store_with(&work.path().join("s"), Some(&ci), |m| {
        m.inputs.namespace = other_ns.into();
        m.key = m.inputs.key();
    });
    let narrow = team.creds("narrow", &[NS], true);
    let p = team.connect(&narrow).await.unwrap();
    assert!(!p.grants(other_ns));
    assert_eq!(p.announce(&store).await.unwrap(), (0, 0));
    assert_eq!(
        p.announce_sealed(vec![stored.sealed().unwrap()])
            .await
            .unwrap(),
        (0, 1),
        "the orchestrator refuses it too"
    );
    let asker = team
        .connect(&team.creds("asker", &[other_ns], false))
        .await
        .unwrap();
    assert_eq!(
        asker.lookup(&stored.manifest.key, other_ns).await.unwrap(),
        Found::NotFound
    );
    team.stop().await;
}

#[tokio::test]
async fn a_restarted_orchestrator_keeps_its_state_and_connected_peers_see_a_clear_error() {
    let mut team = Team::start().await;
    let ci = team.creds("ci", &[NS], true);
    let gone = team.creds("leaver", &[NS], true);
    let p = team.connect(&ci).await.unwrap();
    team.connect(&gone).await.unwrap();
    team.folder.revoke("leaver").unwrap();
    team.restart().await;
    // The old connection was closed by the shutdown: a lookup fails with an
    // error the caller can fall back on, and does not hang.
    let err = p.lookup(&inputs("k").key(), NS).await.unwrap_err();
    assert!(
        matches!(
            &err,
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(c))
                if c.error_code == quinn::VarInt::from_u32(server::close::SHUTDOWN)
        ),
        "{err:?}"
    );
    // Identities and revocations survive the restart.
    let again = team.connect(&ci).await.unwrap();
    assert_eq!(again.identity(), "ci");
    assert_eq!(
        again.lookup(&inputs("k").key(), NS).await.unwrap(),
        Found::NotFound
    );
    assert!(team.connect(&gone).await.is_err());
    team.stop().await;
}

#[tokio::test]
async fn a_result_over_the_transfer_limit_is_not_relayed_and_the_asker_is_told() {
    let limits = Limits {
        max_transfer: 1 << 20,
        ..Limits::default()
    };
    let team = Team::with("", limits).await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    // Its artifacts are about 3 MB.
    let (store_b, _) = producer_store(work.path(), &builder);
    let _b = relayer(&team, &builder, &store_b).await;
    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let store_a = Store::new(work.path().join("store-a"));
    let err = a
        .fetch_into(&inputs("t1").key(), NS, &inputs("t1"), &store_a)
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        matches!(&err, FetchError::Unavailable(message)
            if message.contains("over this orchestrator's limit of 1048576")),
        "{err:?}: {text}"
    );
    assert_nothing_committed(&store_a);
    team.stop().await;
}

/// `VmHWM` (peak resident memory) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// What one flooding stream got back.
#[derive(Debug, PartialEq, Eq)]
enum Flooded {
    Refused(ErrorCode),
    Closed,
}

/// Opens a request stream on `conn`, sends the header of a 1 MiB frame and
/// nothing more, and waits for what the service does about it.
async fn stall(conn: quinn::Connection) -> Flooded {
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return Flooded::Closed;
    };
    let header = (wire::MAX_FRAME as u32).to_be_bytes();
    // The write may fail with the service's answer already on its way: a
    // stream is opened at the service as soon as a later one of the same
    // connection arrives (QUIC numbers them), so one refused over the limit
    // may be stopped before this task got to write. The answer is read
    // either way.
    let _ = send.write_all(&header).await;
    match tokio::time::timeout(std::time::Duration::from_secs(60), read_message(&mut recv)).await {
        Ok(Ok(Message::Error { code, .. })) => Flooded::Refused(code),
        _ => Flooded::Closed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_an_untrusted_identity_leaves_replays_working_and_memory_bounded() {
    // The real binary, so that its memory is its own.
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = work.path().join("orchestrator.log");
    let server = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_reprise-orchestrator"))
            .args(["serve", "--dir"])
            .arg(team.state_dir())
            .args(["--listen", &addr])
            .args(["--max-connections", "4", "--max-announced", "2000"])
            .args(["--request-timeout", "3s"])
            .args(["--http", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let connect = |creds: Arc<Credentials>| {
        let addr = addr.clone();
        async move {
            for _ in 0..100 {
                match Link::connect(&addr, creds.clone()).await {
                    Ok(link) => return Ok(link),
                    Err(LinkError::Connection(e)) => return Err(LinkError::Connection(e)),
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
            Link::connect(&addr, creds).await
        }
    };
    let builder = team.creds("builder", &[NS], true);
    let asker = team.creds("asker", &[NS], false);
    let mallory = team.creds("mallory", &[NS], false);
    let (store_b, stored_b) = producer_store(work.path(), &builder);
    let b = Arc::new(connect(builder.clone()).await.unwrap());
    b.announce(&store_b).await.unwrap();
    let serving = {
        let (b, store_b) = (b.clone(), store_b.clone());
        tokio::spawn(async move { b.serve(&store_b).await })
    };
    let a = connect(asker.clone()).await.unwrap();

    // Mallory: as many connections as allowed; one more is refused.
    let mut floods = Vec::new();
    for _ in 0..4 {
        floods.push(connect(mallory.clone()).await.unwrap());
    }
    let fifth = connect(mallory.clone()).await;
    assert!(
        matches!(&fifth, Err(e) if format!("{e:?}").contains("4 connections open")),
        "{:?}",
        fifth.as_ref().err()
    );
    // 5,000 made-up results announced (its own seal on each: it has a
    // key): indexed up to the identity's cap.
    let made_up: Vec<Sealed> = (0..5000)
        .map(|i| {
            let inputs = inputs(&format!("made-up-{i}"));
            let mut m = stored_b.manifest.clone();
            m.key = inputs.key();
            m.inputs = inputs;
            Sealed {
                seal: reprise_executor::store::Sealer::seal(mallory.as_ref(), &m),
                manifest: m,
            }
        })
        .collect();
    let announced = floods[0].announce_sealed(made_up).await;
    assert!(
        matches!(&announced, Err(LinkError::Refused { code: ErrorCode::Limit, message })
            if message.contains("2000 results indexed")),
        "{announced:?}"
    );

    // Then 90 stalled streams on each connection.
    let mut stalls = tokio::task::JoinSet::new();
    for link in &floods {
        for _ in 0..90 {
            stalls.spawn(stall(link.connection().clone()));
        }
    }
    // Meanwhile the trusted pair replays, again and again.
    let key = inputs("t1").key();
    for round in 0..5 {
        let store_a = Store::new(work.path().join(format!("store-a-{round}")));
        let (got, who) = a
            .fetch_into(&key, NS, &inputs("t1"), &store_a)
            .await
            .unwrap_or_else(|e| panic!("replay {round} during the flood: {e:#}"));
        assert_eq!(who.name, "builder");
        assert_eq!(got.manifest, stored_b.manifest);
    }

    // Every stalled stream was answered: refused over the limit of open
    // requests, or timed out; none holds the service.
    let mut outcomes = Vec::new();
    while let Some(got) = stalls.join_next().await {
        outcomes.push(got.unwrap());
    }
    let count = |what: Flooded| outcomes.iter().filter(|o| **o == what).count();
    let (limited, timed_out) = (
        count(Flooded::Refused(ErrorCode::Limit)),
        count(Flooded::Refused(ErrorCode::TimedOut)),
    );
    assert!(
        limited > 0 && timed_out > 0 && limited + timed_out == 360,
        "{outcomes:?}"
    );
    let peak = peak_rss(server.0.id());
    eprintln!("the orchestrator peaked at {} MiB", peak >> 20);
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        peak < 64 << 20,
        "the orchestrator peaked at {} MiB\n{text}",
        peak >> 20
    );
    for line in [
        "refused: the identity has as many connections open as it may",
        "refusing requests over the open-request limit",
        "request stream timed out",
        "the identity has as many results indexed as it may",
    ] {
        assert!(text.contains(line), "log line {line:?} missing:\n{text}");
    }
    // Each refusal is counted by its reason on /metrics.
    let http: SocketAddr = text
        .split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{text}"))
        .parse()
        .unwrap();
    let (_, _, metrics) = http_get(http, "/metrics").await;
    let count = |reason: &str| -> u64 {
        let prefix = format!("reprise_refusals_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{reason} missing:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(count("connection-limit"), 1, "{metrics}");
    assert_eq!(count("stream-limit") as usize, limited, "{metrics}");
    assert_eq!(count("request-timeout") as usize, timed_out, "{metrics}");
    // The executor stops announcing at the first refusal of a batch.
    assert!(count("announce-limit") > 0, "{metrics}");
    assert!(metrics.contains("reprise_replays_total 5\n"), "{metrics}");
    serving.abort();
    drop(server);
    team.stop().await;
}

/// A child process killed when dropped (a failing test leaves none).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_fetch_that_fills_the_disk_says_so_and_commits_nothing() {
    // The asker's store on a 1 MiB tmpfs (needs root, as in CI); the
    // result's artifacts are about 3 MB.
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mnt)
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
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let team = Team::start().await;
    let builder = team.creds("builder", &[NS], true);
    let (store_b, _) = producer_store(work.path(), &builder);
    let _b = relayer(&team, &builder, &store_b).await;
    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let store_a = Store::new(mnt.join("store"));
    let err = a
        .fetch_into(&inputs("t1").key(), NS, &inputs("t1"), &store_a)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::DiskFull(_)), "{err:?}");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_nothing_committed(&store_a);
    team.stop().await;
}

/// A forge's commit status API as GitHub and GitLab document it, on
/// loopback: records every request, and answers the first one with a 500
/// (the orchestrator must retry).
struct StandInForge {
    base: String,
    seen: Arc<std::sync::Mutex<Vec<(String, axum::http::HeaderMap, serde_json::Value)>>>,
}

impl StandInForge {
    async fn start() -> StandInForge {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode, Uri};
        type Seen = Arc<std::sync::Mutex<Vec<(String, HeaderMap, serde_json::Value)>>>;
        async fn status(
            State(seen): State<Seen>,
            uri: Uri,
            headers: HeaderMap,
            body: String,
        ) -> (StatusCode, String) {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let mut seen = seen.lock().unwrap();
            seen.push((uri.path().to_string(), headers, json));
            if seen.len() == 1 {
                (StatusCode::INTERNAL_SERVER_ERROR, "{}".into())
            } else {
                (StatusCode::CREATED, r#"{"state":"success"}"#.into())
            }
        }
        let seen: Seen = Default::default();
        let app = axum::Router::new()
            .route(
                "/repos/{owner}/{repo}/statuses/{sha}",
                axum::routing::post(status),
            )
            .route(
                "/api/v4/projects/{id}/statuses/{sha}",
                axum::routing::post(status),
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        StandInForge { base, seen }
    }

    fn requests(&self) -> Vec<(String, axum::http::HeaderMap, serde_json::Value)> {
        self.seen.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_counting_result_gets_one_commit_status_on_its_forge() {
    const GL_NS: &str = "gitlab.example/group/sub/app";
    let forge = StandInForge::start().await;
    let settings = format!(
        "[policy]\ncommit_status = true\n\
         [status.github]\ntoken_file = \"gh-token\"\napi_url = \"{0}\"\nhost = \"example.com\"\n\
         [status.gitlab]\ntoken_file = \"gl-token\"\nurl = \"{0}\"\nhost = \"gitlab.example\"\n",
        forge.base
    );
    let team = Team::prepared(&settings, Limits::default(), |dir| {
        use std::os::unix::fs::PermissionsExt;
        for (file, token) in [("gh-token", "gh-secret\n"), ("gl-token", "gl-secret\n")] {
            fs::write(dir.join(file), token).unwrap();
            fs::set_permissions(dir.join(file), fs::Permissions::from_mode(0o600)).unwrap();
        }
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let ci = team.creds("ci", &[NS, GL_NS], true);
    let (store, stored) = producer_store(&work.path().join("ci"), &ci);
    let _c = relayer(&team, &ci, &store).await;
    let key = stored.manifest.key;
    let posted = || {
        team.folder
            .state()
            .unwrap()
            .status_posted(NS, &key)
            .unwrap()
            .is_some()
    };
    wait_until(posted).await;
    let requests = forge.requests();
    assert_eq!(requests.len(), 2, "a 500, then the retry that was taken");
    for (path, headers, body) in &requests {
        assert_eq!(path, "/repos/team/app/statuses/c1");
        assert_eq!(headers["authorization"], "Bearer gh-secret");
        assert_eq!(headers["accept"], "application/vnd.github+json");
        assert_eq!(headers["x-github-api-version"], "2022-11-28");
        assert_eq!(body["state"], "success");
        assert_eq!(body["context"], "reprise/test");
        let description = body["description"].as_str().unwrap();
        assert!(
            description.contains("ci") && description.contains(&key.short()),
            "{description}"
        );
    }

    // The same result announced again, by its producer's new connection
    // and by another trusted holder: no second status.
    let alice = team.creds("alice", &[NS], true);
    let (store_al, _) = producer_store(&work.path().join("al"), &alice);
    let _a = relayer(&team, &alice, &store_al).await;
    let _again = relayer(&team, &ci, &store).await;
    // Results that do not count get none: an untrusted producer's, a
    // failed run's.
    let bob = team.creds("bob", &[NS], false);
    let other = |tree: &'static str| {
        move |m: &mut ResultManifest| {
            m.inputs.tree = tree.into();
            m.key = m.inputs.key();
        }
    };
    let (store_bob, _) = producer_store_with(&work.path().join("bob"), Some(&bob), other("t2"));
    let _b = relayer(&team, &bob, &store_bob).await;
    let (store_failed, _) = producer_store_with(&work.path().join("f"), Some(&ci), |m| {
        other("t3")(m);
        m.outcome = Outcome::Failed;
        m.exit_code = 1;
    });
    let _f = relayer(&team, &ci, &store_failed).await;

    // A GitLab project: its path URL-encoded, the token as PRIVATE-TOKEN.
    let (store_gl, stored_gl) = producer_store_with(&work.path().join("gl"), Some(&ci), |m| {
        m.inputs.namespace = GL_NS.into();
        m.key = m.inputs.key();
    });
    let _g = relayer(&team, &ci, &store_gl).await;
    let gl_key = stored_gl.manifest.key;
    wait_until(|| {
        team.folder
            .state()
            .unwrap()
            .status_posted(GL_NS, &gl_key)
            .unwrap()
            .is_some()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let requests = forge.requests();
    assert_eq!(
        requests.len(),
        3,
        "one more, for the GitLab project only: {requests:?}"
    );
    let (path, headers, body) = &requests[2];
    assert_eq!(path, "/api/v4/projects/group%2Fsub%2Fapp/statuses/c1");
    assert_eq!(headers["private-token"], "gl-secret");
    assert_eq!(body["state"], "success");
    assert_eq!(body["name"], "reprise/test");
    team.stop().await;
}

/// A holder serving `store` through the orchestrator and listening for
/// direct fetches on loopback: its link, its listener, and the tasks
/// serving both.
async fn direct_holder(
    team: &Team,
    creds: &Arc<Credentials>,
    store: &Store,
) -> (Arc<Link>, Arc<Direct>, Vec<tokio::task::JoinHandle<()>>) {
    let direct = Direct::bind("127.0.0.1:0".parse().unwrap(), creds).unwrap();
    holder_listening(team, creds, store, direct).await
}

/// [`direct_holder`] with the listener `direct`.
async fn holder_listening(
    team: &Team,
    creds: &Arc<Credentials>,
    store: &Store,
    direct: Direct,
) -> (Arc<Link>, Arc<Direct>, Vec<tokio::task::JoinHandle<()>>) {
    let direct = Arc::new(direct);
    let peer = Arc::new(team.connect(creds).await.unwrap());
    peer.announce(store).await.unwrap();
    let addr = peer.listen(&direct).await.unwrap();
    assert_eq!(addr, direct.local_addr().unwrap().to_string());
    let serving = {
        let (p, s, t) = (peer.clone(), store.clone(), direct.tickets().clone());
        tokio::spawn(async move {
            let _ = p.serve_with(&s, Some(t)).await;
        })
    };
    let listening = {
        let (d, s) = (direct.clone(), store.clone());
        tokio::spawn(async move { d.serve(&s).await })
    };
    (peer, direct, vec![serving, listening])
}

/// The parts' bytes of a stored result.
fn data_bytes(stored: &StoredResult) -> u64 {
    stored.manifest.output_bytes
        + stored
            .manifest
            .artifacts
            .iter()
            .map(|a| a.bytes)
            .sum::<u64>()
}

#[tokio::test]
async fn a_result_is_fetched_straight_from_a_holder_that_listens_and_through_the_relay_when_it_cannot_be()
 {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, stored_b) = producer_store(work.path(), &builder);
    let (_b, direct, tasks) = direct_holder(&team, &builder, &store_b).await;
    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();

    let store_a = Store::new(work.path().join("store-a"));
    let fetched = a.fetch(&key, NS, &inputs("t1"), &store_a).await.unwrap();
    assert!(fetched.direct, "fetched straight from the holder");
    assert!(fetched.tcp, "over TCP, the holder listening there too");
    assert_eq!(fetched.signed_by.name, "builder");
    assert_eq!(fetched.stored.manifest, stored_b.manifest);
    assert_eq!(fetched.stored.seal, stored_b.seal);
    assert_eq!(
        fs::read(fetched.stored.output_path()).unwrap(),
        fs::read(stored_b.output_path()).unwrap()
    );
    for art in &fetched.stored.manifest.artifacts {
        assert_eq!(
            fs::read(store_a.blob_path(art)).unwrap(),
            fs::read(store_b.blob_path(art)).unwrap(),
            "{}",
            art.path
        );
    }
    crate_verify(&store_a, &fetched.stored);
    // Nothing went through the relay; the holder said it served the
    // ticket whole, and the replay is audited with it as the relayer.
    assert_eq!(team.telemetry.snapshot().relayed_bytes, 0);
    let audit = || {
        team.folder
            .state()
            .unwrap()
            .audit(&AuditFilter::default())
            .unwrap()
    };
    wait_until(|| !audit().is_empty()).await;
    match &audit()[..] {
        [AuditEntry::Replay(r)] => {
            assert_eq!(
                (r.asker.as_str(), r.producer.as_str()),
                ("asker", "builder")
            );
            assert_eq!(r.relayer.as_deref(), Some("builder"));
            assert_eq!(r.bytes, Some(data_bytes(&stored_b)));
            assert_eq!(
                r.run_ms,
                Some(stored_b.manifest.total_ms),
                "the time the replay saved, from the announced manifest"
            );
        }
        other => panic!("one replay expected: {other:?}"),
    }
    assert!(direct.tickets().is_empty(), "the ticket was used up");

    // The listener gone (a firewall, a machine that moved): the same
    // fetch goes through the relay.
    for t in tasks.iter().skip(1) {
        t.abort();
    }
    drop(direct);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let store_c = Store::new(work.path().join("store-c"));
    let fetched = a.fetch(&key, NS, &inputs("t1"), &store_c).await.unwrap();
    assert!(!fetched.direct, "through the relay");
    assert_eq!(fetched.stored.manifest, stored_b.manifest);
    assert_eq!(
        team.telemetry.snapshot().relayed_bytes,
        data_bytes(&stored_b)
    );
    // The asker fell back to the relay after its introduction: the holder
    // is left out of introductions for a while, so the next fetch goes to
    // the relay at once rather than waiting out a handshake again.
    let intro = Message::Introduce {
        key,
        namespace: NS.into(),
    };
    match a.request(&intro).await.unwrap() {
        Message::Error { message, .. } => {
            assert!(message.contains("directly"), "{message}")
        }
        other => panic!("introduced to a holder just found unreachable: {other:?}"),
    }
    let store_d = Store::new(work.path().join("store-d"));
    let fetched = a.fetch(&key, NS, &inputs("t1"), &store_d).await.unwrap();
    assert!(!fetched.direct, "through the relay");
    for t in tasks {
        t.abort();
    }
    team.stop().await;
}

/// Asks to be introduced to the holder of `key`.
async fn introduction(asker: &Link, key: &RunKey) -> (String, Sha256Digest, Secret) {
    let intro = Message::Introduce {
        key: *key,
        namespace: NS.into(),
    };
    match asker.request(&intro).await.unwrap() {
        Message::Introduction(i) => (i.addr, i.holder, i.ticket),
        other => panic!("expected an introduction, got {other:?}"),
    }
}

/// Sends a `Redeem` on a direct TCP connection and reads the first answer.
async fn redeem_tcp(
    pipe: &mut reprise_executor::link::pipe::TlsPipe,
    ticket: &Secret,
    key: &RunKey,
) -> Result<Message, reprise_frames::ReadError> {
    let m = Message::Redeem {
        ticket: ticket.clone(),
        key: *key,
        namespace: NS.into(),
        resume: None,
    };
    write_message(pipe, &m).await.unwrap();
    read_message(pipe).await
}

/// Sends a `Redeem` on a direct connection and reads the first answer.
async fn redeem(conn: &quinn::Connection, ticket: &Secret, key: &RunKey) -> Message {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let m = Message::Redeem {
        ticket: ticket.clone(),
        key: *key,
        namespace: NS.into(),
        resume: None,
    };
    write_message(&mut send, &m).await.unwrap();
    let _ = send.finish();
    read_message(&mut recv).await.unwrap()
}

#[tokio::test]
async fn a_direct_fetch_needs_the_askers_own_unused_ticket_for_the_key_and_the_holders_certificate()
{
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, _) = producer_store(work.path(), &builder);
    let (_b, direct, tasks) = direct_holder(&team, &builder, &store_b).await;
    let asker_creds = team.creds("asker", &[NS], false);
    let a = team.connect(&asker_creds).await.unwrap();
    let key = inputs("t1").key();
    let (addr, holder, ticket) = introduction(&a, &key).await;
    assert_eq!(holder, builder.fingerprint());
    assert_eq!(direct.tickets().len(), 1);
    let refused = |m: Message| {
        assert!(
            matches!(&m, Message::Error { code: ErrorCode::NotFound, message } if message.contains("no ticket")),
            "{m:?}"
        );
    };

    // Another member of the team that learnt the ticket: refused, and the
    // ticket stays for its asker.
    let mallory_creds = team.creds("mallory", &[NS], true);
    let (_e, mallory) = direct::dial(&addr, holder, &mallory_creds).await.unwrap();
    refused(redeem(&mallory, &ticket, &key).await);
    // The asker with a ticket it made up, or its ticket for another key.
    let (_e, conn) = direct::dial(&addr, holder, &asker_creds).await.unwrap();
    refused(redeem(&conn, &Secret("00".repeat(32)), &key).await);
    refused(redeem(&conn, &ticket, &inputs("t2").key()).await);
    assert_eq!(direct.tickets().len(), 1);
    // Its own ticket, once.
    assert!(matches!(
        redeem(&conn, &ticket, &key).await,
        Message::Transfer { .. }
    ));
    refused(redeem(&conn, &ticket, &key).await);
    assert!(direct.tickets().is_empty());

    // A certificate of another CA does not get through the handshake.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = Folder::init(foreign_dir.path(), &[]).unwrap();
    let foreign =
        Credentials::from_pem(&foreign.issue("f", &[NS.to_string()], true, None).unwrap()).unwrap();
    let (_, _, ticket) = introduction(&a, &key).await;
    match direct::dial(&addr, holder, &foreign).await {
        Err(_) => {}
        // The handshake's last flight may be refused after the client
        // took it: then nothing is served on it.
        Ok((_e, conn)) => {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let m = Message::Redeem {
                ticket: ticket.clone(),
                key,
                namespace: NS.into(),
                resume: None,
            };
            let _ = write_message(&mut send, &m).await;
            let _ = send.finish();
            assert!(read_message(&mut recv).await.is_err(), "served a stranger");
        }
    }
    // A listener at the introduced address with another certificate (a
    // machine in the middle): the asker does not connect.
    let impostor = team.creds("impostor", &[NS], true);
    let e = direct::dial(&addr, impostor.fingerprint(), &asker_creds)
        .await
        .unwrap_err();
    assert!(!e.is_empty());

    // The same over TCP, the holder's other listener on the same port.
    let (_, _, ticket) = introduction(&a, &key).await;
    let mut mallory = direct::dial_tcp(&addr, holder, &mallory_creds)
        .await
        .unwrap();
    refused(redeem_tcp(&mut mallory, &ticket, &key).await.unwrap());
    let mut pipe = direct::dial_tcp(&addr, holder, &asker_creds).await.unwrap();
    refused(
        redeem_tcp(&mut pipe, &Secret("00".repeat(32)), &key)
            .await
            .unwrap(),
    );
    let mut pipe = direct::dial_tcp(&addr, holder, &asker_creds).await.unwrap();
    assert!(matches!(
        redeem_tcp(&mut pipe, &ticket, &key).await.unwrap(),
        Message::Transfer { .. }
    ));
    let mut pipe = direct::dial_tcp(&addr, holder, &asker_creds).await.unwrap();
    refused(redeem_tcp(&mut pipe, &ticket, &key).await.unwrap());
    let (_, _, ticket) = introduction(&a, &key).await;
    let kept = direct.tickets().len();
    match direct::dial_tcp(&addr, holder, &foreign).await {
        Err(_) => {}
        // TLS 1.3: the client may finish before the server refuses its
        // certificate; then nothing is served.
        Ok(mut pipe) => assert!(
            redeem_tcp(&mut pipe, &ticket, &key).await.is_err(),
            "served a stranger over TCP"
        ),
    }
    assert_eq!(
        direct.tickets().len(),
        kept,
        "the stranger did not use it up"
    );
    let e = direct::dial_tcp(&addr, impostor.fingerprint(), &asker_creds)
        .await
        .unwrap_err();
    assert!(!e.is_empty());
    for t in tasks {
        t.abort();
    }
    team.stop().await;
}

#[tokio::test]
async fn another_program_on_the_holders_tcp_port_gets_no_ticket_and_the_fetch_goes_over_quic() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, stored_b) = producer_store(work.path(), &builder);
    // A program of a member of the team took the TCP port first, with a
    // certificate of the team: it would gladly read a ticket.
    // The kernel picks the TCP port; its UDP twin may be another test's
    // QUIC endpoint, so a few ports are tried until the holder gets it.
    let mut found = None;
    for _ in 0..16 {
        let squatter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = squatter.local_addr().unwrap();
        match Direct::bind(port, &builder) {
            Ok(direct) => {
                found = Some((squatter, port, direct));
                break;
            }
            Err(LinkError::Endpoint(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => panic!("the holder cannot listen on {port}: {e}"),
        }
    }
    let (squatter, port, direct) = found.expect("a UDP port beside a free TCP port");
    let tls = team
        .creds("squatter", &[NS], true)
        .direct_server_tls()
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let squatting = tokio::spawn(async move {
        while let Ok((tcp, _)) = squatter.accept().await {
            let _ = heard_tx.send("connection");
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let _ = heard_tx.send("handshake");
                let mut buf = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut buf).await;
                if !buf.is_empty() {
                    let _ = heard_tx.send("bytes");
                }
            }
        }
    });
    assert!(!direct.over_tcp(), "the TCP port is the squatter's");
    let (_b, direct, tasks) = holder_listening(&team, &builder, &store_b, direct).await;
    assert_eq!(direct.local_addr().unwrap(), port);

    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let store_a = Store::new(work.path().join("a"));
    let fetched = a
        .fetch(&inputs("t1").key(), NS, &inputs("t1"), &store_a)
        .await
        .unwrap();
    assert!(
        fetched.direct && !fetched.tcp,
        "straight from the holder, over QUIC"
    );
    assert_eq!(fetched.stored.manifest, stored_b.manifest);
    crate_verify(&store_a, &fetched.stored);
    // The asker reached the squatter, which could not present the pinned
    // certificate: no handshake, so no ticket, no byte.
    let mut told = Vec::new();
    while let Ok(what) = heard.try_recv() {
        told.push(what);
    }
    assert_eq!(
        told,
        ["connection"],
        "the squatter got further than a TCP connection"
    );
    squatting.abort();
    for t in tasks {
        t.abort();
    }
    team.stop().await;
}

#[tokio::test]
async fn a_holder_cannot_pass_off_a_result_the_orchestrator_did_not_offer_over_the_direct_path() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    // Alice's result, held by a laptop that listens and, asked directly,
    // sends a result of the same key sealed by itself with other outputs.
    let alice = team.creds("alice", &[NS], true);
    let laptop = team.creds("laptop", &[NS], false);
    let (store_l, stored) = producer_store(work.path(), &alice);
    let l = Arc::new(team.connect(&laptop).await.unwrap());
    l.announce(&store_l).await.unwrap();
    let endpoint = quinn::Endpoint::server(
        laptop.direct_server_config().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let listen = Message::Listen {
        port,
        ip: None,
        cert: laptop.fingerprint(),
    };
    assert!(matches!(
        l.request(&listen).await.unwrap(),
        Message::Listening { .. }
    ));
    let tickets = Arc::new(direct::Tickets::default());
    let serving = {
        let (p, s) = (l.clone(), store_l.clone());
        tokio::spawn(async move {
            let _ = p.serve_with(&s, Some(tickets)).await;
        })
    };
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rogue = {
        let (asked, laptop) = (asked.clone(), laptop.clone());
        let (store, stored) = (store_l.clone(), stored.clone());
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let conn = incoming.await.unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let _redeem = read_message(&mut recv).await.unwrap();
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut manifest = stored.manifest.clone();
                manifest.artifacts[0].mode = 0o700;
                let own = Sealed {
                    seal: laptop.seal(&manifest),
                    manifest,
                };
                let files = transfer_files(&store, &stored);
                let from = vec![0; own.parts().len()];
                let _ = reprise_executor::link::write_transfer(
                    &mut send,
                    &own,
                    &files,
                    &from,
                    None,
                    u64::MAX,
                )
                .await;
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        })
    };
    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();
    let store_a = Store::new(work.path().join("a"));
    let e = a
        .fetch_direct(&key, NS, &inputs("t1"), &store_a)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::NotOffered), "{e:?}");
    assert_nothing_committed(&store_a);
    // The whole fetch: refused directly, then alice's through the relay.
    let fetched = a.fetch(&key, NS, &inputs("t1"), &store_a).await.unwrap();
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(!fetched.direct);
    assert_eq!(fetched.signed_by.name, "alice");
    assert_eq!(fetched.stored.manifest, stored.manifest);
    rogue.abort();
    serving.abort();
    team.stop().await;
}

#[tokio::test]
async fn an_asker_cannot_tie_up_a_holder_with_introductions_it_never_redeems() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, stored_b) = producer_store(work.path(), &builder);
    let (_b, direct, tasks) = direct_holder(&team, &builder, &store_b).await;
    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();
    for _ in 0..server::MAX_INTRODUCTIONS {
        introduction(&a, &key).await;
    }
    assert_eq!(direct.tickets().len(), server::MAX_INTRODUCTIONS);
    let intro = Message::Introduce {
        key,
        namespace: NS.into(),
    };
    match a.request(&intro).await.unwrap() {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::Limit);
            assert!(
                message.contains("fetch through the orchestrator"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(direct.tickets().len(), server::MAX_INTRODUCTIONS);
    // The asker still gets the result, through the relay.
    let store_a = Store::new(work.path().join("a"));
    let fetched = a.fetch(&key, NS, &inputs("t1"), &store_a).await.unwrap();
    assert!(!fetched.direct);
    assert_eq!(fetched.stored.manifest, stored_b.manifest);
    for t in tasks {
        t.abort();
    }
    team.stop().await;
}

#[tokio::test]
async fn a_direct_transfer_cut_midway_is_finished_through_the_relay_from_its_last_checked_chunk() {
    let team = Team::start().await;
    let work = tempfile::tempdir().unwrap();
    let builder = team.creds("builder", &[NS], true);
    let (store_b, stored_b) = producer_store(work.path(), &builder);
    let (_b, direct, tasks) = direct_holder(&team, &builder, &store_b).await;
    // Cut after the record, the report and the big artifact's first chunk.
    direct.stop_serving_at(Some(3));
    let a = team
        .connect(&team.creds("asker", &[NS], false))
        .await
        .unwrap();
    let key = inputs("t1").key();
    let store_a = Store::new(work.path().join("a"));
    let e = a
        .fetch_direct(&key, NS, &inputs("t1"), &store_a)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Truncated { .. }), "{e:?}");
    assert_nothing_committed_but_a_partial(&store_a);
    // The next fetch asks the listener for the rest, which it cuts again
    // at the same chunk; the relay then serves the rest, from the chunks
    // kept, and only the rest travels.
    let fetched = a.fetch(&key, NS, &inputs("t1"), &store_a).await.unwrap();
    assert!(!fetched.direct);
    assert!(fetched.resumed >= 1 << 20, "{fetched:?}");
    assert_eq!(fetched.resumed + fetched.received, data_bytes(&stored_b));
    assert_eq!(fetched.stored.manifest, stored_b.manifest);
    crate_verify(&store_a, &fetched.stored);
    for t in tasks {
        t.abort();
    }
    team.stop().await;
}
