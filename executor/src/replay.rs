//! Replaying a stored result: its output, byte for byte and in order, to the
//! same streams, and its artifacts back into a folder. Everything is checked
//! against the manifest's sha256s before a byte is written, and artifacts
//! are written only beneath the folder, through no symlink
//! ([`crate::beneath`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::manifest::ArtifactPath;
use reprise_protocol::record::{self, RecordError, StreamId};
use thiserror::Error;

use crate::beneath::{Beneath, BeneathError};
use crate::store::{Store, StoredResult};

/// Why a result could not be replayed.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(
        "the stored output of {key} does not match its manifest (sha256 {found}, expected {expected})"
    )]
    OutputMismatch {
        key: RunKey,
        found: Sha256Digest,
        expected: Sha256Digest,
    },
    #[error("the stored output of {key} is damaged")]
    Record {
        key: RunKey,
        #[source]
        source: RecordError,
    },
    #[error("artifact {path} of {key} is missing or damaged in the store")]
    Artifact { key: RunKey, path: ArtifactPath },
    #[error("restoring the artifacts")]
    Unsafe(#[from] BeneathError),
    #[error("replay io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks a stored result's output record against its manifest and returns
/// the decoded output. Artifacts are checked by [`restore_artifacts`], which
/// hashes them as it copies (one read of each file, not two).
pub fn verify(result: &StoredResult) -> Result<Vec<record::Entry>, ReplayError> {
    let key = result.manifest.key;
    let path = result.output_path();
    let data = std::fs::read(&path).map_err(|source| ReplayError::Io {
        path: path.clone(),
        source,
    })?;
    let found = Sha256Digest::of(&data);
    if found != result.manifest.output_sha256 {
        return Err(ReplayError::OutputMismatch {
            key,
            found,
            expected: result.manifest.output_sha256,
        });
    }
    record::decode(&data).map_err(|source| ReplayError::Record { key, source })
}

/// Writes the recorded output to `stdout` and `stderr` in recorded order.
pub fn write_output(
    entries: &[record::Entry],
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> std::io::Result<()> {
    for e in entries {
        match e.stream {
            StreamId::Stdout => {
                stdout.write_all(&e.bytes)?;
                stdout.flush()?;
            }
            StreamId::Stderr => {
                stderr.write_all(&e.bytes)?;
                stderr.flush()?;
            }
        }
    }
    Ok(())
}

/// Copies the result's artifacts into `dest` (created if needed), beneath
/// it and through no symlink. Each is hashed while it is copied to a
/// temporary file beside its final name; only when every one matched its
/// manifest are they renamed into place, so a damaged store leaves `dest`
/// as it was.
pub fn restore_artifacts(
    store: &Store,
    result: &StoredResult,
    dest: &Path,
) -> Result<usize, ReplayError> {
    let artifacts = &result.manifest.artifacts;
    if artifacts.is_empty() {
        return Ok(0);
    }
    let beneath = Beneath::open(dest)?;
    let mut staged = Vec::with_capacity(artifacts.len());
    for a in artifacts {
        let mut pending = beneath.create(&a.path, a.mode)?;
        let blob = store.blob_path(a);
        let sha = copy_hashing(&blob, &mut pending.file).map_err(|source| ReplayError::Io {
            path: blob.clone(),
            source,
        })?;
        if sha != a.sha256 {
            return Err(ReplayError::Artifact {
                key: result.manifest.key,
                path: a.path.clone(),
            });
        }
        staged.push(pending);
    }
    // Dropping the rest on an error removes their temporary files.
    for pending in staged {
        pending.commit()?;
    }
    Ok(artifacts.len())
}

/// Copies `from` into `to`, returning the sha256 of what was copied.
fn copy_hashing(from: &Path, to: &mut std::fs::File) -> std::io::Result<Sha256Digest> {
    use sha2::Digest;
    use std::io::Read;
    let mut src = std::fs::File::open(from)?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
    Ok(Sha256Digest::finish(hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{inputs, manifest};
    use reprise_protocol::manifest::Outcome;

    #[test]
    fn replays_output_in_order_and_restores_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let mut rec = Vec::new();
        record::push(&mut rec, StreamId::Stdout, 0, b"one\n");
        record::push(&mut rec, StreamId::Stderr, 1, b"\x1b[31mtwo\x1b[0m\n");
        record::push(&mut rec, StreamId::Stdout, 2, b"three\n");
        let arts = dir.path().join("a");
        std::fs::create_dir_all(&arts).unwrap();
        std::fs::write(arts.join("bin"), [0u8, 1, 2]).unwrap();
        let stored = store
            .commit(
                manifest(inputs("t"), Outcome::Passed, 1),
                &rec,
                Some(&arts),
                None,
            )
            .unwrap();
        let entries = verify(&stored).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        write_output(&entries, &mut out, &mut err).unwrap();
        assert_eq!(out, b"one\nthree\n");
        assert_eq!(err, b"\x1b[31mtwo\x1b[0m\n");
        let dest = dir.path().join("restored");
        assert_eq!(restore_artifacts(&store, &stored, &dest).unwrap(), 1);
        assert_eq!(std::fs::read(dest.join("bin")).unwrap(), [0, 1, 2]);
    }

    #[test]
    fn damaged_results_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let arts = dir.path().join("a");
        std::fs::create_dir_all(&arts).unwrap();
        std::fs::write(arts.join("f"), "content").unwrap();
        let stored = store
            .commit(
                manifest(inputs("t"), Outcome::Passed, 1),
                b"",
                Some(&arts),
                None,
            )
            .unwrap();
        std::fs::write(store.blob_path(&stored.manifest.artifacts[0]), "c0ntent").unwrap();
        let dest = dir.path().join("restored");
        assert!(matches!(
            restore_artifacts(&store, &stored, &dest),
            Err(ReplayError::Artifact { .. })
        ));
        assert!(
            !dest.join("f").exists(),
            "a damaged artifact is not restored"
        );
        assert_eq!(
            std::fs::read_dir(&dest).map(|d| d.count()).unwrap_or(0),
            0,
            "no temporary file is left"
        );
        std::fs::write(stored.output_path(), "x").unwrap();
        assert!(matches!(
            verify(&stored),
            Err(ReplayError::OutputMismatch { .. })
        ));
    }
}
