//! The bodies of the fuzz targets in `fuzz/`: one function per parser of
//! untrusted bytes. Each parses the bytes with the real parser and, where
//! the parse succeeds, checks a property that must hold (a round trip, a
//! check that stays true, a path that stays beneath its folder). None of
//! them panics on any input except through a genuine bug.
//!
//! `fuzz/fuzz_targets/<name>.rs` calls the function of the same name under
//! libFuzzer (nightly, `cargo fuzz`); `tests/corpus.rs` replays every file
//! of `fuzz/corpus/<name>/` through [`TARGETS`] on stable, so CI keeps the
//! committed corpora passing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use reprise_executor::check;
use reprise_executor::link::Credentials;
use reprise_executor::link::fetch::check_transfer;
use reprise_executor::link::settings::{self, DotEnv, Facts, UserConfig};
use reprise_executor::schedule::{self, Schedule};
use reprise_executor::store::Sealer;
use reprise_mk::{Commands, Mkfile};
use reprise_protocol::digest::{KeyPrefix, RunKey, Sha256Digest};
use reprise_protocol::guest_stream::{self, Frame};
use reprise_protocol::key::{KEY_VERSION, KeyInputs};
use reprise_protocol::manifest::{
    Artifact, ArtifactPath, MANIFEST_VERSION, MAX_ARTIFACT_BYTES, MAX_ARTIFACT_PATH,
    MAX_RECORD_BYTES, MAX_RESULT_BYTES, Outcome, Phase, Producer, ResultManifest, Snapshot,
};
use reprise_protocol::policy::OrchestratorSettings;
use reprise_protocol::record::StreamId;
use reprise_protocol::repo_config::{self, RepoConfig};
use reprise_protocol::wire::{self, FrameError, Message, Sealed};
use reprise_protocol::{hex, local, record, seal, sign};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its file in `fuzz/fuzz_targets/` and its
/// corpus folder in `fuzz/corpus/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_frame", wire_frame),
    ("result_manifest", result_manifest),
    ("output_record", output_record),
    ("guest_stream", guest_stream),
    ("daemon_line", daemon_line),
    ("repo_config", repo_config),
    ("dotenv", dotenv),
    ("credentials", credentials),
    ("artifact_path", artifact_path),
    ("sealed_result", sealed_result),
    ("digest", digest),
    ("mkfile", mkfile),
    ("orchestrator_policy", orchestrator_policy),
    ("crontab", crontab),
];

/// The team CA that [`sealed_result`] checks seals against (made by
/// `tests/seeds.rs`, which also seals that target's seeds with it).
pub const TEAM_CA_PEM: &str = include_str!("team-ca.pem");

static TEAM_CA: LazyLock<CertificateDer<'static>> = LazyLock::new(|| {
    CertificateDer::from_pem_slice(TEAM_CA_PEM.as_bytes()).expect("the team CA is PEM")
});

/// The time seals are checked at: 2026-01-01, inside the validity of the
/// seeds' certificates, and fixed so a failing input fails every time.
pub const NOW: u64 = 1_767_225_600;

/// `wire.rs`: a frame header's length (`body_len`), a whole frame
/// (`decode_frame`) and a control message body (`decode`). A frame takes
/// no more bytes than it has; a decoded message encodes and decodes back
/// to itself.
pub fn wire_frame(data: &[u8]) {
    if let Some(header) = data.first_chunk::<{ wire::HEADER_LEN }>() {
        for max in [wire::MAX_FRAME, wire::MAX_CHUNK, 0, 1] {
            match wire::body_len(*header, max) {
                Ok(len) => assert!(len <= max, "{len} passed a limit of {max}"),
                Err(FrameError::TooLarge { len, max: m }) => assert!(len > m && m == max),
                Err(e) => panic!("a header can only be too large, not {e:?}"),
            }
        }
    }
    if let Ok(Some((message, used))) = wire::decode_frame(data) {
        assert!(used <= data.len() && used >= wire::HEADER_LEN);
        message_round_trips(&message);
    }
    if let Ok(message) = wire::decode(data) {
        message_round_trips(&message);
        match &message {
            Message::Hello { version } => {
                let _ = Message::check_version(*version);
            }
            Message::Announce { results } => results.iter().for_each(sealed_parts),
            Message::Assess { result } | Message::Transfer { result, .. } => sealed_parts(result),
            _ => {}
        }
    }
}

fn message_round_trips(message: &Message) {
    match wire::encode(message) {
        Ok(frame) => {
            let (back, used) = wire::decode_frame(&frame)
                .expect("an encoded message decodes")
                .expect("an encoded frame is whole");
            assert_eq!(
                &back, message,
                "a message changed through encode and decode"
            );
            assert_eq!(used, frame.len());
        }
        // Escapes can make the encoding longer than what was read.
        Err(FrameError::TooLarge { .. }) => {}
        Err(e) => panic!("encoding refused a decoded message: {e}"),
    }
}

fn sealed_parts(sealed: &Sealed) {
    let parts = sealed.parts();
    assert_eq!(parts.len(), 1 + sealed.manifest.artifacts.len());
    let _ = (sealed.held(), sealed.passed(), sealed.manifest.check());
}

/// `manifest.rs`: a result manifest as a store or a peer hands it over
/// (JSON), then `ResultManifest::check`. Every artifact path is plain; a
/// manifest that checks serialises, parses back equal and still checks,
/// and signs the same bytes.
pub fn result_manifest(data: &[u8]) {
    let Ok(m) = serde_json::from_slice::<ResultManifest>(data) else {
        return;
    };
    for a in &m.artifacts {
        path_is_plain(&a.path);
    }
    let digest = m.outputs_digest();
    let signed = sign::signing_bytes(&m);
    let _ = m.inputs.explain();
    if m.check_sizes().is_ok() {
        let total = m
            .artifacts
            .iter()
            .try_fold(m.output_bytes, |t, a| t.checked_add(a.bytes));
        assert!(
            m.output_bytes <= MAX_RECORD_BYTES
                && m.artifacts.iter().all(|a| a.bytes <= MAX_ARTIFACT_BYTES)
                && total.is_some_and(|t| t <= MAX_RESULT_BYTES),
            "sizes over the limits passed"
        );
    }
    if m.check().is_err() {
        return;
    }
    let paths: BTreeSet<&str> = m.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(
        paths.len(),
        m.artifacts.len(),
        "a checked manifest lists a path twice"
    );
    for a in &m.artifacts {
        assert_eq!(a.mode & !0o777, 0, "a checked manifest keeps special bits");
        for (i, _) in a.path.as_str().match_indices('/') {
            assert!(
                !paths.contains(&a.path.as_str()[..i]),
                "{} is inside a file",
                a.path
            );
        }
    }
    let json = serde_json::to_vec(&m).expect("manifests serialise");
    let back: ResultManifest = serde_json::from_slice(&json).expect("a serialised manifest parses");
    assert_eq!(back, m, "a manifest changed through JSON");
    back.check().expect("a manifest that checked checks again");
    assert_eq!(back.outputs_digest(), digest);
    assert_eq!(sign::signing_bytes(&back), signed);
    assert!(back.inputs.diff(&m.inputs).is_empty());
}

/// `record.rs`: an output record as stored or fetched, read by the
/// streaming decoder `replay` uses (`decode_stream`, fed in uneven pieces)
/// and by the whole one (`decode`). Both agree on the bytes of each stream
/// and on the error; a record that decodes is the encoding of its
/// entries, byte for byte.
pub fn output_record(data: &[u8]) {
    let whole = record::decode(data);
    let mut streamed: Vec<(StreamId, Vec<u8>)> = Vec::new();
    let result = record::decode_stream(
        Uneven {
            data,
            at: 0,
            step: 0,
        },
        |stream, bytes| {
            match streamed.last_mut() {
                Some((s, b)) if *s == stream => b.extend_from_slice(bytes),
                _ => streamed.push((stream, bytes.to_vec())),
            }
            Ok(())
        },
    );
    match (&whole, result) {
        (Ok(entries), Ok(())) => {
            let mut merged: Vec<(StreamId, Vec<u8>)> = Vec::new();
            for e in entries.iter().filter(|e| !e.bytes.is_empty()) {
                match merged.last_mut() {
                    Some((s, b)) if *s == e.stream => b.extend_from_slice(&e.bytes),
                    _ => merged.push((e.stream, e.bytes.clone())),
                }
            }
            assert_eq!(merged, streamed, "the streaming decoder read other bytes");
        }
        (Err(w), Err(record::StreamError::Record(s))) => assert_eq!(w, &s),
        (w, s) => panic!("the decoders disagree: {w:?} and {s:?}"),
    }
    let Ok(entries) = whole else {
        return;
    };
    let mut again = Vec::new();
    for e in &entries {
        record::push(&mut again, e.stream, e.at_ms, &e.bytes);
    }
    if entries.is_empty() {
        assert!(data.is_empty() || data == record::MAGIC);
    } else {
        assert_eq!(again, data, "a record is not the encoding of its entries");
    }
}

/// A reader that hands out its bytes in pieces of 1 to 7 bytes, as a pipe
/// or a slow disk might.
struct Uneven<'a> {
    data: &'a [u8],
    at: usize,
    step: usize,
}

impl std::io::Read for Uneven<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = self.step.min(buf.len()).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// `guest_stream.rs`: the bytes the guest helper sends, read as the host
/// reads them (frame after frame until one is partial or bad). Each frame
/// is exactly the bytes it took, and a partial frame stays partial with
/// fewer bytes.
pub fn guest_stream(data: &[u8]) {
    let mut at = 0;
    loop {
        match Frame::decode(&data[at..]) {
            Ok(Some((frame, used))) => {
                assert!(used >= guest_stream::HEADER_LEN && at + used <= data.len());
                assert_eq!(frame.encode(), &data[at..at + used], "{frame:?}");
                at += used;
            }
            Ok(None) => {
                let rest = &data[at..];
                if let Some(shorter) = rest.len().checked_sub(1) {
                    assert_eq!(Frame::decode(&rest[..shorter]), Ok(None));
                }
                break;
            }
            Err(_) => break,
        }
    }
}

/// `local.rs`: a line on the daemon's socket, as a request (what the
/// daemon reads) and as an answer (what `reprise run` reads). What
/// decodes has the version spoken and round-trips.
pub fn daemon_line(data: &[u8]) {
    let line = data.strip_suffix(b"\n").unwrap_or(data);
    if let Ok(request) = local::decode_request(line) {
        assert_eq!(request.version, local::LOCAL_VERSION);
        let again = local::encode(&request);
        let back = local::decode_request(again.strip_suffix(b"\n").expect("a line"))
            .expect("an encoded request decodes");
        assert_eq!(back, request);
    }
    if let Ok(answer) = local::decode_answer(line) {
        let again = local::encode(&answer);
        let back = local::decode_answer(&again).expect("an encoded answer decodes");
        assert_eq!(back, answer);
    }
}

/// `repo_config.rs`: `reprise.toml` as a revision holds it. What parses
/// names valid variables, never one both counted and secret, and plain
/// artifact paths; a refusal points inside the text.
pub fn repo_config(data: &[u8]) {
    // As `repo.rs` reads the blob.
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    match RepoConfig::parse(text) {
        Ok(config) => {
            for name in config.env.iter().chain(&config.secrets) {
                assert!(repo_config::valid_env_name(name), "{name:?}");
            }
            assert!(!config.env.iter().any(|n| config.secrets.contains(n)));
            config.artifacts.iter().for_each(path_is_plain);
        }
        Err(e) => {
            let lines = text.split('\n').count();
            assert!(e.line >= 1 && e.line <= lines, "{e}: line out of the text");
            assert!(e.column >= 1, "{e}");
        }
    }
    if let Some(namespace) = repo_config::namespace_from_url(text) {
        assert!(!namespace.is_empty() && namespace.contains('/'));
    }
}

/// `settings.rs`: a repository's `.env` (and the user config's TOML).
/// Lines give names (a value may span quoted lines); whatever a `.env`
/// says, it never supplies credentials, and a tracked one is not read.
pub fn dotenv(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let values = settings::parse_dotenv(text);
    // Names are single words; a value may span lines when the file quotes
    // it (dotenvy reads `A="x\ny"` as two lines of one value).
    for name in values.keys() {
        assert!(!name.contains('=') && !name.contains('\n'), "{name:?}");
        assert_eq!(name.trim(), name);
    }
    let dotenv = |tracked| DotEnv {
        path: PathBuf::from("/repo/.env"),
        tracked,
        text: text.to_string(),
    };
    let alone = settings::resolve(&Facts {
        dotenv: Some(dotenv(false)),
        ..Facts::default()
    });
    assert_eq!(alone.settings, None, "a .env alone gave credentials");
    let env = BTreeMap::from([
        (settings::ORCHESTRATOR_VAR.to_string(), "user:1".to_string()),
        (
            settings::CREDENTIALS_VAR.to_string(),
            "/user.pem".to_string(),
        ),
    ]);
    for tracked in [true, false] {
        let r = settings::resolve(&Facts {
            env: env.clone(),
            user_config: Some(UserConfig {
                path: PathBuf::from("/home/u/.config/reprise/config.toml"),
                mode: 0o600,
                text: text.to_string(),
            }),
            dotenv: Some(dotenv(tracked)),
        });
        let s = r.settings.expect("the environment gives both");
        assert_eq!(
            (s.orchestrator.as_str(), s.credentials.as_path()),
            ("user:1", Path::new("/user.pem")),
            "a file overrode the environment"
        );
    }
    let tracked = settings::resolve(&Facts {
        dotenv: Some(dotenv(true)),
        ..Facts::default()
    });
    assert_eq!(tracked.settings, None);
}

/// `credentials.rs`: a credentials file (client certificate, PKCS#8 key,
/// CA). Credentials that load print a certificate that parses back to the
/// one they hold, and can seal.
pub fn credentials(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(creds) = Credentials::from_pem(text) else {
        return;
    };
    let der = CertificateDer::from_pem_slice(creds.cert_pem().as_bytes())
        .expect("the printed certificate is PEM");
    let first = CertificateDer::pem_slice_iter(data)
        .next()
        .expect("a certificate was read")
        .expect("it was read");
    assert_eq!(der, first, "the printed certificate is not the one read");
    if let Ok(who) = creds.identity() {
        assert_eq!(who.fingerprint, Sha256Digest::of(der.as_ref()));
    }
    let s = creds.seal(&sample_manifest());
    assert!(hex::decode(&s.signature).is_some());
    assert_eq!(s.producer_cert, creds.cert_pem());
}

/// A manifest that checks: what [`credentials`] seals, and what
/// `tests/seeds.rs` starts its seeds from.
pub fn sample_manifest() -> ResultManifest {
    let inputs = KeyInputs {
        version: KEY_VERSION,
        namespace: "example.com/team/hello".into(),
        tree: "4b825dc642cb6eb9a060e54bf8d69288fbee4904".into(),
        target: "test".into(),
        env: BTreeMap::from([("CC".into(), "gcc".into())]),
        image_digest: Sha256Digest::of(b"image").hex(),
        driver: "qemu".into(),
        network: false,
    };
    ResultManifest {
        version: MANIFEST_VERSION,
        key: inputs.key(),
        inputs,
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        outcome: Outcome::Passed,
        exit_code: 0,
        phases: vec![Phase {
            name: "test".into(),
            ms: 1200,
        }],
        total_ms: 1500,
        accel: "kvm".into(),
        tool_version: "0.1.0".into(),
        producer: Producer {
            host: "laptop".into(),
            user: "alice".into(),
        },
        created_at: NOW - 60,
        snapshot: Snapshot::Fresh,
        output_sha256: Sha256Digest::of(b"output"),
        output_blake3: None,
        output_bytes: 6,
        artifacts: vec![Artifact {
            path: "reports/junit.xml".parse().expect("a plain path"),
            sha256: Sha256Digest::of(b"<testsuite/>"),
            blake3: None,
            bytes: 12,
            mode: 0o644,
        }],
        crontab: Some("0 3 * * * nightly\n".into()),
        container_image: Some(Sha256Digest::of(b"container")),
    }
}

/// `manifest.rs` `ArtifactPath`: a path a manifest or `reprise.toml`
/// names. One that parses is plain, prints as written and round-trips
/// through JSON; JSON refuses what parsing refuses.
pub fn artifact_path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = text.parse::<ArtifactPath>();
    if let Ok(path) = &parsed {
        path_is_plain(path);
        assert_eq!(path.as_str(), text);
        assert_eq!(path.to_string(), text);
    }
    let json = serde_json::to_string(text).expect("strings serialise");
    let from_json = serde_json::from_str::<ArtifactPath>(&json);
    assert_eq!(from_json.ok(), parsed.ok(), "JSON and parsing disagree");
}

/// What every accepted artifact path must be: joined onto a folder, it
/// names something beneath it.
fn path_is_plain(path: &ArtifactPath) {
    let s = path.as_str();
    assert!(!s.is_empty() && s.len() <= MAX_ARTIFACT_PATH, "{s:?}");
    assert!(!s.starts_with('/') && !s.contains('\0'), "{s:?}");
    let parts: Vec<&str> = path.parts().collect();
    assert!(
        parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != ".."),
        "{s:?}"
    );
    let components: Vec<Component<'_>> = Path::new(s).components().collect();
    assert_eq!(components.len(), parts.len(), "{s:?}");
    assert!(
        components.iter().all(|c| matches!(c, Component::Normal(_))),
        "{s:?}"
    );
    assert!(
        Path::new("/store/artifacts")
            .join(s)
            .starts_with("/store/artifacts/")
    );
}

/// `seal.rs` and `fetch.rs` `check_transfer`: a transfer header (manifest
/// and seal, JSON) as a peer sends it, checked against the team CA; and
/// the bytes as a certificate's DER for `describe`. A transfer that
/// passes is sealed by the certificate it claims, and its manifest checks.
pub fn sealed_result(data: &[u8]) {
    if let Ok(who) = seal::describe(&CertificateDer::from(data)) {
        assert_eq!(who.fingerprint, Sha256Digest::of(data));
    }
    let Ok(sealed) = serde_json::from_slice::<Sealed>(data) else {
        return;
    };
    let claimed = sealed.seal.claimed();
    if let Ok(der) = sealed.seal.certificate() {
        assert_eq!(
            claimed.clone().map(|w| w.fingerprint),
            seal::describe(&der).map(|w| w.fingerprint)
        );
    }
    let now = UnixTime::since_unix_epoch(Duration::from_secs(NOW));
    let roots = [TEAM_CA.clone()];
    let m = &sealed.manifest;
    let Ok(who) = check_transfer(&roots, &sealed, &m.key, &m.inputs, &BTreeSet::new(), now) else {
        return;
    };
    assert_eq!(Ok(&who), claimed.as_ref());
    assert!(who.not_after >= NOW, "an expired certificate passed");
    m.check().expect("a transfer that passed checks");
    assert!(sealed.passed());
    let revoked = BTreeSet::from([who.fingerprint]);
    assert!(
        check_transfer(&roots, &sealed, &m.key, &m.inputs, &revoked, now).is_err(),
        "a revoked producer passed"
    );
}

/// `digest.rs`, `manifest.rs` `Snapshot` and `hex.rs`: keys and digests as
/// they cross a boundary, key prefixes as people type them. What parses
/// prints back as the same text (prefixes in lower case).
pub fn digest(data: &[u8]) {
    if let Some(bytes) = std::str::from_utf8(data).ok().and_then(hex::decode) {
        let text = std::str::from_utf8(data).expect("checked");
        assert_eq!(hex::encode(&bytes), text.to_ascii_lowercase());
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let digest = text.parse::<Sha256Digest>();
    let key = text.parse::<RunKey>();
    assert_eq!(digest.is_ok(), key.is_ok());
    if let Ok(d) = digest {
        assert_eq!(d.to_string(), text);
        assert_eq!(d.hex(), text);
        assert!(text.starts_with(&d.short()));
        let json = serde_json::to_string(&d).expect("digests serialise");
        assert_eq!(serde_json::from_str::<Sha256Digest>(&json).ok(), Some(d));
    }
    if let Ok(k) = key {
        assert_eq!(k.to_string(), text);
    }
    if let Ok(p) = text.parse::<KeyPrefix>() {
        let lower = text.to_ascii_lowercase();
        assert_eq!(p.to_string(), lower);
        assert!((1..=64).contains(&lower.len()));
        assert_eq!(p.whole(), lower.parse::<RunKey>().ok());
        if let Some(k) = p.whole() {
            assert!(p.matches(&k));
        }
    }
    if let Ok(s) = text.parse::<Snapshot>() {
        assert_eq!(s.to_string(), text);
    }
}

/// mk's lexer and parser (`mk/src/lex.rs`, `parse.rs`): a mkfile as
/// `reprise check` reads it, running no command and reading no file. What
/// parses answers the questions the check asks of it.
pub fn mkfile(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut mk = Mkfile::new(std::iter::empty::<(String, String)>(), Commands::Skip);
    mk.set_includes(|_| None);
    if mk.parse_text("mkfile", &text, false).is_err() {
        return;
    }
    let _ = mk.take_warnings();
    for recipe in mk.recipes() {
        assert!(recipe.line >= 1);
    }
    let targets = mk.targets().to_vec();
    let _ = mk.default_targets();
    for target in targets.iter().take(64) {
        let _ = mk.prerequisites(target);
        let _ = mk.has_target(target);
        let _ = mk.rule_location(target);
    }
    for probe in ["test", "a.o", "", "x/y.c"] {
        let _ = mk.has_target(probe);
        let _ = mk.prerequisites(probe);
    }
    // And as `reprise check` reads it: with the contract's ci.mk to include.
    let artifacts: Vec<ArtifactPath> = vec!["report.txt".parse().expect("a plain path")];
    let _ = check::check_text(&text, "test", &artifacts, &BTreeMap::new());
}

/// `policy.rs`: the orchestrator's `orchestrator.toml`. What parses gives
/// every repository a policy; a repository's section overrides only what
/// it sets.
pub fn orchestrator_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = OrchestratorSettings::parse(text) else {
        return;
    };
    let p = &settings.policy;
    for (namespace, o) in &p.repos {
        let r = p.for_repo(namespace);
        assert_eq!(r.require_fresh, o.require_fresh.unwrap_or(p.require_fresh));
        assert_eq!(r.allow_network, o.allow_network.unwrap_or(p.allow_network));
    }
    let other = p.for_repo("\0 not a namespace");
    if !p.repos.contains_key("\0 not a namespace") {
        assert_eq!(other.prefer, p.prefer);
    }
}

/// `schedule.rs`: the crontab a repository's `prepare-runtime` writes,
/// then when each target is due, as the daemon asks every 15 s. Every
/// accepted entry has a next time, after now.
pub fn crontab(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(entries) = schedule::parse_crontab(text) else {
        return;
    };
    for e in &entries {
        assert_eq!(e.cron.split(' ').count(), 5, "{:?}", e.cron);
        assert!(!e.target.is_empty() && !e.target.contains(char::is_whitespace));
        // What parses occurs (a day that never comes is refused).
        let next = schedule::next_after(e, NOW).expect("an accepted entry occurs");
        assert!(next > NOW, "{:?} is due at {next}, not after {NOW}", e.cron);
    }
    let s = Schedule {
        version: schedule::SCHEDULE_VERSION,
        namespace: "n".into(),
        checkout: PathBuf::from("/repo"),
        branch: "main".into(),
        driver: "qemu".into(),
        entries,
        since: NOW,
        last: BTreeMap::new(),
    };
    let _ = schedule::due(&s, NOW + 3600);
}
