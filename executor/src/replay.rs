//! Replaying a stored result: its output, byte for byte and in order, to the
//! same streams, and its artifacts back into a folder. Everything is checked
//! against the manifest's sha256s before a byte is written.

use std::io::Write;
use std::path::{Path, PathBuf};

use reprise_protocol::record::{self, RecordError, StreamId};
use thiserror::Error;

use crate::store::{Store, StoredResult};

/// Why a result could not be replayed.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(
        "the stored output of {key} does not match its manifest (sha256 {found}, expected {expected})"
    )]
    OutputMismatch {
        key: String,
        found: String,
        expected: String,
    },
    #[error("the stored output of {key} is damaged")]
    Record {
        key: String,
        #[source]
        source: RecordError,
    },
    #[error("artifact {path} of {key} is missing or damaged in the store")]
    Artifact { key: String, path: String },
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
    let key = &result.manifest.key;
    let path = result.output_path();
    let data = std::fs::read(&path).map_err(|source| ReplayError::Io {
        path: path.clone(),
        source,
    })?;
    let found = reprise_protocol::hex::sha256(&data);
    if found != result.manifest.output_sha256 {
        return Err(ReplayError::OutputMismatch {
            key: key.clone(),
            found,
            expected: result.manifest.output_sha256.clone(),
        });
    }
    record::decode(&data).map_err(|source| ReplayError::Record {
        key: key.clone(),
        source,
    })
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

/// Copies the result's artifacts into `dest` (created if needed). Each is
/// hashed while it is copied to a temporary file beside its final name;
/// only when every one matched its manifest are they renamed into place, so
/// a damaged store leaves `dest` as it was.
pub fn restore_artifacts(
    store: &Store,
    result: &StoredResult,
    dest: &Path,
) -> Result<usize, ReplayError> {
    let mut staged = Vec::new();
    let outcome = (|| {
        for a in &result.manifest.artifacts {
            let target = dest.join(&a.path);
            let tmp = target.with_file_name(format!(
                ".{}.reprise-tmp",
                target.file_name().unwrap_or_default().to_string_lossy()
            ));
            let io = |source| ReplayError::Io {
                path: target.clone(),
                source,
            };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            staged.push((tmp.clone(), target.clone()));
            let sha = copy_hashing(&store.blob_path(a), &tmp, a.mode).map_err(io)?;
            if sha != a.sha256 {
                return Err(ReplayError::Artifact {
                    key: result.manifest.key.clone(),
                    path: a.path.clone(),
                });
            }
        }
        for (tmp, target) in &staged {
            std::fs::rename(tmp, target).map_err(|source| ReplayError::Io {
                path: target.clone(),
                source,
            })?;
        }
        Ok(result.manifest.artifacts.len())
    })();
    if outcome.is_err() {
        for (tmp, _) in &staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
    outcome
}

/// Copies `from` to `to` with permissions `mode`, returning the sha256 of
/// what was copied.
fn copy_hashing(from: &Path, to: &Path, mode: u32) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(to)?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    // The mode given at creation is masked by the umask; set it exactly.
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    Ok(reprise_protocol::hex::encode(&hash.finalize()))
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
            .commit(manifest(inputs("t"), Outcome::Passed, 1), &rec, Some(&arts))
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
            .commit(manifest(inputs("t"), Outcome::Passed, 1), b"", Some(&arts))
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
            std::fs::read_dir(&dest).unwrap().count(),
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
