//! Writes the seed inputs of every fuzz target into `fuzz/corpus/<target>/`
//! as `seed-*` files: valid inputs made by the real encoders (messages by
//! `wire::encode`, credentials by the orchestrator's `issue`, seals by
//! `Credentials`), and the repository's own mkfiles and `reprise.toml`s.
//! It also writes the team CA that `sealed_result` checks seals against
//! (`src/team-ca.pem`), so run it only to remake the seeds, then minimise
//! the corpora (`cargo fuzz cmin`):
//!
//! ```text
//! cargo test -p reprise-fuzzing --test seeds -- --ignored
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reprise_executor::link::Credentials;
use reprise_executor::store::Sealer;
use reprise_fuzzing::{NOW, sample_manifest};
use reprise_orchestrator::pki::{self, LeafKind};
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::guest_stream::Frame;
use reprise_protocol::local::{self, Answer, Ask, LinkState, Request};
use reprise_protocol::manifest::{Outcome, Snapshot};
use reprise_protocol::record::{self, StreamId};
use reprise_protocol::wire::{self, ErrorCode, Message, Sealed};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes `seeds` as `fuzz/corpus/<target>/seed-<name>`.
fn write(target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}

fn seeds<const N: usize>(named: [(&str, &[u8]); N]) -> Vec<(String, Vec<u8>)> {
    named
        .into_iter()
        .map(|(n, b)| (n.to_string(), b.to_vec()))
        .collect()
}

/// The files named `name` in the folders below `dir` (one level), each
/// named by its folder.
fn files_named(dir: &Path, name: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let folder = entry.unwrap().path();
        if let Ok(bytes) = std::fs::read(folder.join(name)) {
            let label = folder.file_name().unwrap().to_string_lossy().into_owned();
            out.push((label, bytes));
        }
    }
    out
}

#[test]
#[ignore = "writes the seed corpora and the team CA; run by hand"]
fn write_seeds() {
    let from = time::OffsetDateTime::from_unix_timestamp(NOW as i64 - 365 * 86400).unwrap();
    let until = time::OffsetDateTime::from_unix_timestamp(NOW as i64 + 10 * 365 * 86400).unwrap();
    let ca = pki::new_ca().unwrap();
    std::fs::write(root().join("fuzzing/src/team-ca.pem"), &ca.cert).unwrap();
    let leaf = pki::issue(&ca, LeafKind::Client, "alice", &[], Some((from, until))).unwrap();
    let creds_pem = format!("{}{}{}", leaf.cert, leaf.key, ca.cert);
    let creds = Credentials::from_pem(&creds_pem).unwrap();
    let expired = pki::issue(&ca, LeafKind::Client, "old", &[], Some((from, from))).unwrap();
    let server = pki::issue(
        &ca,
        LeafKind::Server,
        "orch",
        &["orch".into()],
        Some((from, until)),
    )
    .unwrap();

    let manifest = sample_manifest();
    manifest.check().unwrap();
    let sealed = Sealed {
        seal: creds.seal(&manifest),
        manifest: manifest.clone(),
    };
    let failed = {
        let mut m = manifest.clone();
        m.outcome = Outcome::Failed;
        m.exit_code = 1;
        m.snapshot = Snapshot::Generation(Sha256Digest::of(b"generation"));
        m.crontab = None;
        m.artifacts.clear();
        Sealed {
            seal: creds.seal(&m),
            manifest: m,
        }
    };

    // Credentials and certificates.
    write(
        "credentials",
        vec![
            ("issued".into(), creds_pem.clone().into_bytes()),
            (
                "expired".into(),
                format!("{}{}{}", expired.cert, expired.key, ca.cert).into_bytes(),
            ),
            (
                "server".into(),
                format!("{}{}{}", server.cert, server.key, ca.cert).into_bytes(),
            ),
        ],
    );
    let der = |pem: &str| pki::certs(pem).unwrap().remove(0).as_ref().to_vec();
    write(
        "sealed_result",
        vec![
            ("passed".into(), serde_json::to_vec(&sealed).unwrap()),
            ("failed".into(), serde_json::to_vec(&failed).unwrap()),
            ("alice.der".into(), der(&leaf.cert)),
            ("ca.der".into(), der(&ca.cert)),
        ],
    );

    // The orchestrator protocol.
    let key = manifest.key;
    let messages = vec![
        Message::Hello {
            version: wire::PROTOCOL_VERSION,
        },
        Message::Welcome {
            identity: "alice".into(),
            repos: vec!["example.com/team/hello".into()],
            trusted: true,
            revoked: vec![Sha256Digest::of(b"cert")],
            counts: None,
        },
        Message::Announce {
            results: vec![sealed.clone(), failed.clone()],
        },
        Message::Announced {
            accepted: 1,
            refused: 1,
        },
        Message::Lookup {
            key,
            namespace: "example.com/team/hello".into(),
        },
        Message::Offer {
            producer: "alice".into(),
            counts: "trusted producer".into(),
        },
        Message::Conflict {
            producers: vec!["alice".into(), "bob".into()],
        },
        Message::Assess {
            result: Box::new(sealed.clone()),
        },
        Message::Assessed {
            counts: true,
            reason: "trusted".into(),
        },
        Message::NotFound,
        Message::Fetch {
            key,
            namespace: "n".into(),
            resume: None,
        },
        Message::Serve {
            key,
            namespace: "n".into(),
            resume: Some(wire::Resume {
                manifest: sealed.digest(),
                from: vec![1, 0],
            }),
        },
        Message::Transfer {
            result: Box::new(sealed.clone()),
            from: vec![0, 0],
        },
        Message::error(ErrorCode::Unavailable, "gone"),
    ];
    let mut wire_seeds: Vec<(String, Vec<u8>)> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("message-{i}"), wire::encode(m).unwrap()))
        .collect();
    wire_seeds.push((
        "two-frames".into(),
        [
            wire::encode(&messages[0]).unwrap(),
            wire::encode(&messages[1]).unwrap(),
        ]
        .concat(),
    ));
    write("wire_frame", wire_seeds);
    write(
        "result_manifest",
        vec![
            (
                "passed".into(),
                serde_json::to_vec_pretty(&manifest).unwrap(),
            ),
            (
                "failed".into(),
                serde_json::to_vec(&failed.manifest).unwrap(),
            ),
        ],
    );

    // The output record and the guest stream.
    let mut rec = Vec::new();
    record::push(
        &mut rec,
        StreamId::Stdout,
        0,
        b"\x1b[32mok\x1b[0m 1 - add\n",
    );
    record::push(&mut rec, StreamId::Stderr, 15, b"warning: slow\n");
    record::push(&mut rec, StreamId::Stdout, 40, b"");
    write(
        "output_record",
        vec![
            ("three".into(), rec),
            ("magic".into(), record::MAGIC.to_vec()),
        ],
    );
    let stream: Vec<u8> = [
        Frame::Start("run-1".into()),
        Frame::Stdout(b"hello\n".to_vec()),
        Frame::Stderr(b"oops\n".to_vec()),
        Frame::Exit(137),
        Frame::Failed("no such file".into()),
    ]
    .iter()
    .flat_map(Frame::encode)
    .collect();
    write("guest_stream", vec![("run".into(), stream)]);

    // The daemon's socket.
    let held = Request {
        version: local::LOCAL_VERSION,
        body: Ask::Held {
            key,
            namespace: "example.com/team/hello".into(),
            store: "/home/u/.local/share/reprise/store".into(),
        },
    };
    let status = Request {
        version: local::LOCAL_VERSION,
        body: Ask::Status,
    };
    let answers = [
        Answer::Accepted {
            link: LinkState::Connected {
                identity: "alice".into(),
                announced: 3,
            },
        },
        Answer::Status {
            pid: 42,
            store: "/s".into(),
            orchestrator: "orch:7443".into(),
            link: LinkState::Reconnecting {
                last_error: "refused".into(),
            },
            warm: None,
        },
        Answer::Error {
            message: "another store".into(),
        },
    ];
    let mut lines = vec![
        ("held".into(), local::encode(&held)),
        ("status".into(), local::encode(&status)),
    ];
    for (i, a) in answers.iter().enumerate() {
        lines.push((format!("answer-{i}"), local::encode(a)));
    }
    write("daemon_line", lines);

    // Files a repository or a user writes.
    let mut configs = files_named(&root().join("examples"), "reprise.toml");
    configs.push((
        "full".into(),
        b"namespace = \"example.com/team/project\"\nenv = [\"CC\", \"RUST_LOG\"]\nsecrets = ['NPM_TOKEN']\nartifacts = [\"report.txt\", \"out/junit.xml\"]\n\n[network]\nprepare = false\n".to_vec(),
    ));
    write("repo_config", configs);
    write(
        "dotenv",
        seeds([
            (
                "settings",
                b"# the team's\nREPRISE_ORCHESTRATOR=127.0.0.1:4433\nexport REPRISE_CREDENTIALS=\"creds.pem\"\n\nQ='x=y'\r\n",
            ),
            (
                "user-config",
                b"orchestrator = \"team:7443\"\ncredentials = \"me.pem\"\n",
            ),
        ]),
    );
    write(
        "orchestrator_policy",
        seeds([(
            "policy",
            b"[policy]\nallow_network = true\nprefer = [\"ci\"]\n\n[policy.repos.\"example.com/a/b\"]\nrequire_fresh = true\n\n[policy.repos.\"example.com/c/d\"]\nallow_network = false\nprefer = []\n",
        )]),
    );
    write(
        "crontab",
        seeds([
            (
                "nightly",
                b"# nightly and every minute\n0 3 * * * nightly\n\n*/15 * * * 1-5 lint\n",
            ),
            ("ranges", b"0,30 8-18 1,15 jan-jun mon-fri report/weekly\n"),
        ]),
    );
    write(
        "artifact_path",
        seeds([
            ("plain", b"reports/junit.xml"),
            ("hidden", b".hidden/a..b"),
            ("escape", b"../../.ssh/authorized_keys"),
        ]),
    );
    let hex = Sha256Digest::of(b"x").hex();
    write(
        "digest",
        vec![
            ("digest".into(), hex.clone().into_bytes()),
            ("prefix".into(), hex[..12].to_uppercase().into_bytes()),
            ("fresh".into(), b"fresh".to_vec()),
            ("odd".into(), b"abc".to_vec()),
        ],
    );

    // mkfiles: the examples, mk's differential corpus and the contract's.
    let mut mkfiles = files_named(&root().join("examples"), "mkfile");
    for (name, bytes) in files_named(&root().join("mk/tests/corpus"), "mkfile") {
        mkfiles.push((format!("mk-{name}"), bytes));
    }
    mkfiles.push((
        "ci.mk".into(),
        std::fs::read(root().join("mkfiles/ci.mk")).unwrap(),
    ));
    write("mkfile", mkfiles);

    // Every seed replays clean (the sealed results only once this crate is
    // rebuilt with the new team CA: `tests/corpus.rs` replays them then).
    let names: BTreeMap<&str, _> = reprise_fuzzing::TARGETS.iter().copied().collect();
    for (name, target) in names {
        if name == "sealed_result" && reprise_fuzzing::TEAM_CA_PEM != ca.cert {
            eprintln!("a new team CA: rebuild, then run tests/corpus.rs");
            continue;
        }
        for entry in std::fs::read_dir(root().join("fuzz/corpus").join(name)).unwrap() {
            target(&std::fs::read(entry.unwrap().path()).unwrap());
        }
    }
}
