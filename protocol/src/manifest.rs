//! The manifest of a stored result: every key input, the outcome, timings,
//! who produced it and how (isolation, snapshot generation), and the content
//! addresses of its output record and artifacts.
//!
//! Everything in a manifest may come from a hostile peer or a damaged store,
//! so its parts are typed: keys and digests are [`RunKey`] and
//! [`Sha256Digest`], artifact paths [`ArtifactPath`] (plain relative paths,
//! checked when parsed), and [`ResultManifest::check`] refuses what types
//! alone cannot (a key that is not its inputs' key, the same file twice).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::digest::{Blake3Digest, RunKey, Sha256Digest};
use crate::key::KeyInputs;

/// Version of [`ResultManifest`]'s layout, the one this reprise writes:
/// version 3 may give each part's BLAKE3 digest beside its sha256 (every
/// part's or none). Version 2 (sha256 only) is still read; version 1 (no
/// snapshot generation, untyped digests) is not.
pub const MANIFEST_VERSION: u32 = 3;

/// The oldest manifest version read.
pub const MANIFEST_VERSION_OLDEST: u32 = 2;

/// Longest artifact path, in bytes.
pub const MAX_ARTIFACT_PATH: usize = 1024;

/// Whether the run passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Passed,
    Failed,
}

/// How long one phase took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub ms: u64,
}

/// Where the run says it ran (host and user name as the producer's machine
/// reported them). Who *signed* it is the seal's certificate, not this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    pub host: String,
    pub user: String,
}

/// Which state of the repository's snapshot (container images,
/// `/var/run/ci/cache`) a run started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Snapshot {
    /// A blank one: nothing an earlier run left behind.
    Fresh,
    /// The generation with this id, written by an earlier passed run.
    Generation(Sha256Digest),
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Snapshot::Fresh => f.write_str("fresh"),
            Snapshot::Generation(g) => write!(f, "{g}"),
        }
    }
}

impl FromStr for Snapshot {
    type Err = crate::digest::DigestError;
    fn from_str(s: &str) -> Result<Snapshot, Self::Err> {
        match s {
            "fresh" => Ok(Snapshot::Fresh),
            other => other.parse().map(Snapshot::Generation),
        }
    }
}

impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Snapshot, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a path is not an artifact path.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error(
    "artifact path {0:?} is not a plain relative path (non-empty parts separated by single '/', no '.', '..', leading '/' or NUL, at most {MAX_ARTIFACT_PATH} bytes)"
)]
pub struct ArtifactPathError(String);

/// A path relative to the artifacts folder: one or more `/`-separated
/// parts, none empty, `.` or `..`, no NUL, no leading `/`. Joining it onto
/// a folder can only name something beneath that folder (symlinks aside,
/// which the writer refuses to follow).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactPath(String);

impl ArtifactPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parts, in order.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for ArtifactPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ArtifactPath {
    type Err = ArtifactPathError;
    fn from_str(s: &str) -> Result<ArtifactPath, ArtifactPathError> {
        let plain = !s.is_empty()
            && s.len() <= MAX_ARTIFACT_PATH
            && !s.contains('\0')
            && s.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
        if plain {
            Ok(ArtifactPath(s.to_string()))
        } else {
            let shown: String = s.chars().take(120).collect();
            Err(ArtifactPathError(shown))
        }
    }
}

impl Serialize for ArtifactPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ArtifactPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ArtifactPath, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A file kept by content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Path relative to the artifacts folder.
    pub path: ArtifactPath,
    pub sha256: Sha256Digest,
    /// Its BLAKE3 digest (version 3; see [`ResultManifest::blake3`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<Blake3Digest>,
    pub bytes: u64,
    /// Unix permission bits (no set-id or sticky bits).
    pub mode: u32,
}

/// A stored result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultManifest {
    pub version: u32,
    pub key: RunKey,
    pub inputs: KeyInputs,
    /// The commit that was run (the key counts only its tree).
    pub commit: String,
    pub outcome: Outcome,
    /// Exit status of the test command.
    pub exit_code: i32,
    pub phases: Vec<Phase>,
    pub total_ms: u64,
    /// The accelerator the VM ran under (`kvm`, `tcg`), or `none`.
    pub accel: String,
    pub tool_version: String,
    pub producer: Producer,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The repository snapshot the run started from.
    pub snapshot: Snapshot,
    /// Sha256 and size of the output record.
    pub output_sha256: Sha256Digest,
    /// The output record's BLAKE3 digest (version 3; see
    /// [`ResultManifest::blake3`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blake3: Option<Blake3Digest>,
    pub output_bytes: u64,
    pub artifacts: Vec<Artifact>,
    /// What `prepare-runtime` wrote to `/var/run/ci/crontab`, if anything:
    /// the repository's scheduled targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crontab: Option<String>,
    /// The id (sha256) of the container image the tests ran in, as the
    /// OS's podman reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<Sha256Digest>,
}

/// What is wrong with a manifest whose parts each parsed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error(
        "manifest version {0} is not read by this reprise (it reads {MANIFEST_VERSION_OLDEST} to {MANIFEST_VERSION})"
    )]
    Version(u32),
    #[error(
        "the manifest gives the BLAKE3 digests of some of its parts only (version 3 gives every part's or none, version 2 none)"
    )]
    PartialBlake3,
    #[error(
        "artifact {0} has the sha256 of another artifact and not its BLAKE3 digest, or the reverse"
    )]
    DigestsDisagree(ArtifactPath),
    #[error("the manifest's key {key} is not the key of its inputs ({computed})")]
    KeyMismatch { key: RunKey, computed: RunKey },
    #[error("artifact {0} is listed twice")]
    DuplicateArtifact(ArtifactPath),
    #[error("artifact {0} is both a file and the folder of another artifact")]
    FileIsFolder(ArtifactPath),
    #[error("artifact {path} has mode {mode:o}; only permission bits (0777) are kept")]
    Mode { path: ArtifactPath, mode: u32 },
}

/// Largest output record a result may have.
pub const MAX_RECORD_BYTES: u64 = 256 << 20;
/// Largest artifact a result may have.
pub const MAX_ARTIFACT_BYTES: u64 = 4 << 30;
/// Largest result: output record and artifacts together.
pub const MAX_RESULT_BYTES: u64 = 8 << 30;

/// A part of a result over its size limit.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("the {part} is {found} bytes, over the limit of {max}")]
pub struct Oversize {
    pub part: String,
    pub found: u64,
    pub max: u64,
}

/// Checks sizes against the limits: the record, each artifact (`(path,
/// bytes)`), then their total.
pub fn check_sizes<'a>(
    record: u64,
    artifacts: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), Oversize> {
    let over = |part: String, found, max| Err(Oversize { part, found, max });
    if record > MAX_RECORD_BYTES {
        return over("output record".into(), record, MAX_RECORD_BYTES);
    }
    let mut total = record;
    for (path, bytes) in artifacts {
        if bytes > MAX_ARTIFACT_BYTES {
            return over(format!("artifact {path}"), bytes, MAX_ARTIFACT_BYTES);
        }
        total = total.saturating_add(bytes);
    }
    if total > MAX_RESULT_BYTES {
        return over("result".into(), total, MAX_RESULT_BYTES);
    }
    Ok(())
}

impl ResultManifest {
    /// The BLAKE3 digest of each part, the output record first, when the
    /// manifest gives them (version 3; [`ResultManifest::check`] holds
    /// them to every part's or none); `None` when it does not give them
    /// all.
    pub fn blake3(&self) -> Option<Vec<Blake3Digest>> {
        std::iter::once(self.output_blake3)
            .chain(self.artifacts.iter().map(|a| a.blake3))
            .collect()
    }

    /// Whether the record and artifacts the manifest lists fit the limits.
    pub fn check_sizes(&self) -> Result<(), Oversize> {
        check_sizes(
            self.output_bytes,
            self.artifacts.iter().map(|a| (a.path.as_str(), a.bytes)),
        )
    }

    /// Checks what the types alone do not: the version, that the key is
    /// the key of the inputs, and that the artifacts can all be written
    /// (no path twice, no file that is another's folder, no special bits).
    pub fn check(&self) -> Result<(), ManifestError> {
        if !(MANIFEST_VERSION_OLDEST..=MANIFEST_VERSION).contains(&self.version) {
            return Err(ManifestError::Version(self.version));
        }
        let given = std::iter::once(&self.output_blake3)
            .chain(self.artifacts.iter().map(|a| &a.blake3))
            .filter(|d| d.is_some())
            .count();
        let all = given == 1 + self.artifacts.len();
        if given > 0 && (!all || self.version < 3) {
            return Err(ManifestError::PartialBlake3);
        }
        // A store keeps one blob per sha256: two artifacts of one sha256
        // must be one content by BLAKE3 too (and two of one BLAKE3 digest
        // one by sha256), or a receiver checking by BLAKE3 would keep one
        // under the other's name.
        let mut by_sha = std::collections::BTreeMap::new();
        let mut by_blake3 = std::collections::BTreeMap::new();
        for a in self.artifacts.iter().filter(|a| a.blake3.is_some()) {
            if *by_sha.entry(a.sha256).or_insert(a.blake3) != a.blake3
                || *by_blake3.entry(a.blake3).or_insert(a.sha256) != a.sha256
            {
                return Err(ManifestError::DigestsDisagree(a.path.clone()));
            }
        }
        let computed = self.inputs.key();
        if computed != self.key {
            return Err(ManifestError::KeyMismatch {
                key: self.key,
                computed,
            });
        }
        let mut paths = std::collections::BTreeSet::new();
        for a in &self.artifacts {
            if a.mode & !0o777 != 0 {
                return Err(ManifestError::Mode {
                    path: a.path.clone(),
                    mode: a.mode,
                });
            }
            if !paths.insert(a.path.as_str()) {
                return Err(ManifestError::DuplicateArtifact(a.path.clone()));
            }
        }
        for a in &self.artifacts {
            let mut folder = String::new();
            let parts: Vec<&str> = a.path.parts().collect();
            for part in &parts[..parts.len() - 1] {
                if !folder.is_empty() {
                    folder.push('/');
                }
                folder.push_str(part);
                if paths.contains(folder.as_str()) {
                    return Err(ManifestError::FileIsFolder(a.path.clone()));
                }
            }
        }
        Ok(())
    }

    /// What two producers of the same key must agree on: the outcome, the
    /// exit status and every artifact (path, content, mode). The output
    /// record is not part of it: it carries timings, which differ between
    /// honest runs.
    pub fn outputs_digest(&self) -> Sha256Digest {
        let mut out = Vec::new();
        let mut put = |bytes: &[u8]| crate::hex::put_field(&mut out, bytes);
        put(b"reprise-outputs");
        put(match self.outcome {
            Outcome::Passed => b"passed",
            Outcome::Failed => b"failed",
        });
        put(&self.exit_code.to_be_bytes());
        put(&(self.artifacts.len() as u64).to_be_bytes());
        for a in &self.artifacts {
            put(a.path.as_str().as_bytes());
            put(a.sha256.as_bytes());
            put(&a.mode.to_be_bytes());
        }
        Sha256Digest::of(&out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::key::KEY_VERSION;

    pub(crate) fn manifest() -> ResultManifest {
        let inputs = KeyInputs {
            version: KEY_VERSION,
            namespace: "example.com/t/p".into(),
            tree: "t".into(),
            target: "test".into(),
            env: Default::default(),
            image_digest: "img".into(),
            driver: "qemu".into(),
            network: false,
        };
        ResultManifest {
            version: MANIFEST_VERSION,
            key: inputs.key(),
            inputs,
            commit: "c".into(),
            outcome: Outcome::Passed,
            exit_code: 0,
            phases: vec![Phase {
                name: "test".into(),
                ms: 5,
            }],
            total_ms: 5,
            accel: "kvm".into(),
            tool_version: "0.1.0".into(),
            producer: Producer {
                host: "h".into(),
                user: "u".into(),
            },
            created_at: 10,
            snapshot: Snapshot::Fresh,
            output_sha256: Sha256Digest::of(b"output"),
            output_blake3: None,
            output_bytes: 3,
            artifacts: vec![Artifact {
                path: "a/b".parse().unwrap(),
                sha256: Sha256Digest::of(b"artifact"),
                blake3: None,
                bytes: 2,
                mode: 0o644,
            }],
            crontab: None,
            container_image: None,
        }
    }

    #[test]
    fn blake3_digests_are_every_part_s_or_none_from_version_3() {
        let d = |n: u8| Some(Blake3Digest::from_bytes([n; 32]));
        let mut m = manifest();
        m.check().expect("version 3 without BLAKE3 digests");
        assert_eq!(m.blake3(), None);
        m.output_blake3 = d(1);
        assert_eq!(m.check(), Err(ManifestError::PartialBlake3));
        assert_eq!(m.blake3(), None);
        m.artifacts[0].blake3 = d(2);
        m.check().expect("every part's");
        assert_eq!(m.blake3(), Some(vec![d(1).unwrap(), d(2).unwrap()]));
        m.output_blake3 = None;
        assert_eq!(m.check(), Err(ManifestError::PartialBlake3));
        // Two artifacts of one content agree on both digests.
        m.output_blake3 = d(1);
        let mut twin = m.artifacts[0].clone();
        twin.path = "twin".parse().unwrap();
        m.artifacts.push(twin);
        m.check().expect("one content twice");
        m.artifacts[1].blake3 = d(3);
        assert_eq!(
            m.check(),
            Err(ManifestError::DigestsDisagree("twin".parse().unwrap()))
        );
        m.artifacts[1].blake3 = d(2);
        m.artifacts[1].sha256 = Sha256Digest::of(b"other");
        assert_eq!(
            m.check(),
            Err(ManifestError::DigestsDisagree("twin".parse().unwrap()))
        );
        let mut old = manifest();
        old.version = 2;
        old.check().expect("version 2 is still read");
        old.output_blake3 = d(1);
        old.artifacts[0].blake3 = d(2);
        assert_eq!(old.check(), Err(ManifestError::PartialBlake3));
        for version in [1, MANIFEST_VERSION + 1] {
            let mut m = manifest();
            m.version = version;
            assert_eq!(m.check(), Err(ManifestError::Version(version)));
        }
    }

    #[test]
    fn artifact_paths_are_plain_relative_paths() {
        for good in ["a", "a/b.txt", "report.xml", "dir/sub/x", ".hidden", "a..b"] {
            assert_eq!(good.parse::<ArtifactPath>().unwrap().as_str(), good);
        }
        let long = "x".repeat(MAX_ARTIFACT_PATH + 1);
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a/..",
            "..",
            ".",
            "./a",
            "a/./b",
            "a//b",
            "a/",
            "/",
            "a\0b",
            &long,
        ] {
            assert!(bad.parse::<ArtifactPath>().is_err(), "{bad:?} accepted");
        }
        let e = serde_json::from_str::<Artifact>(&format!(
            r#"{{"path":"../../.ssh/authorized_keys","sha256":"{}","bytes":1,"mode":420}}"#,
            Sha256Digest::of(b"")
        ))
        .unwrap_err();
        assert!(e.to_string().contains("not a plain relative path"), "{e}");
    }

    #[test]
    fn snapshots_are_fresh_or_a_generation() {
        let g = Sha256Digest::of(b"g");
        for s in [Snapshot::Fresh, Snapshot::Generation(g)] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), s);
        }
        assert_eq!(
            serde_json::to_string(&Snapshot::Fresh).unwrap(),
            "\"fresh\""
        );
        assert!(serde_json::from_str::<Snapshot>("\"stale\"").is_err());
    }

    #[test]
    fn check_refuses_what_cannot_be_written_or_is_not_its_key() {
        manifest().check().expect("a good manifest");
        let file_and_folder = {
            let mut m = manifest();
            let mut a = m.artifacts[0].clone();
            a.path = "a".parse().unwrap();
            m.artifacts.push(a);
            m
        };
        let table: Vec<(&str, ResultManifest)> = vec![
            ("old version", {
                let mut m = manifest();
                m.version = 1;
                m
            }),
            ("key of other inputs", {
                let mut m = manifest();
                m.inputs.tree.push('x');
                m
            }),
            ("the same path twice", {
                let mut m = manifest();
                m.artifacts.push(m.artifacts[0].clone());
                m
            }),
            ("setuid", {
                let mut m = manifest();
                m.artifacts[0].mode = 0o4755;
                m
            }),
            ("file and folder", file_and_folder),
        ];
        for (name, m) in table {
            assert!(m.check().is_err(), "{name} passed the check");
        }
    }

    #[test]
    fn outputs_digest_covers_outcome_and_artifacts_but_not_timings() {
        let base = manifest().outputs_digest();
        let mut m = manifest();
        m.total_ms += 1;
        m.created_at += 1;
        m.output_sha256 = Sha256Digest::of(b"other timings");
        assert_eq!(m.outputs_digest(), base);
        let changes: Vec<fn(&mut ResultManifest)> = vec![
            |m| m.outcome = Outcome::Failed,
            |m| m.exit_code = 3,
            |m| m.artifacts[0].sha256 = Sha256Digest::of(b"x"),
            |m| m.artifacts[0].mode = 0o755,
            |m| m.artifacts[0].path = "a/c".parse().unwrap(),
            |m| m.artifacts.clear(),
        ];
        for (n, change) in changes.into_iter().enumerate() {
            let mut m = manifest();
            change(&mut m);
            assert_ne!(m.outputs_digest(), base, "change {n}");
        }
    }

    #[test]
    fn sizes_over_the_limits_are_named() {
        assert_eq!(check_sizes(10, [("a", 20)]), Ok(()));
        let err = check_sizes(MAX_RECORD_BYTES + 1, []).unwrap_err();
        assert_eq!(err.part, "output record");
        let err = check_sizes(0, [("big.bin", MAX_ARTIFACT_BYTES + 1)]).unwrap_err();
        assert_eq!(err.part, "artifact big.bin");
        let err =
            check_sizes(1, [("a", MAX_ARTIFACT_BYTES), ("b", MAX_ARTIFACT_BYTES)]).unwrap_err();
        assert_eq!(
            (err.part.as_str(), err.found),
            ("result", MAX_RESULT_BYTES + 1)
        );
    }
}
