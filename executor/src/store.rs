//! The local result store, under `$XDG_DATA_HOME/reprise/store`.
//!
//! ```text
//! results/<key>/manifest.json   passed results, the only ones replayed
//! results/<key>/output.rec
//! results/<key>/seal.json       the producer's seal (absent: never served)
//! results/<key>/tags-v2         keyed tags of its parts' BLAKE3 ([`crate::tags`])
//! failed/<key>-<time>/...       failed runs, kept for inspection
//! blobs/<sha256>                artifacts, content-addressed
//! tmp/                          staging; never read
//! placing.lock                  held by commits placing blobs, and by gc
//! ```
//!
//! A result is staged in `tmp/` (its blobs too), every file synced, and
//! then renamed into `results/` in one step (exchanged with an older copy
//! when there is one), so a reader sees a whole result or none. Its blobs
//! move into `blobs/` just before, under the store's [`PLACING`] lock
//! (shared), which [`Store::gc`] takes exclusive before it removes blobs no
//! result refers to: a blob placed for a result not renamed into place yet
//! is never taken for an orphan. A result received from a peer
//! ([`Store::receive`]) is written into its staging folder as it arrives,
//! each file synced in the background once whole, and committed by
//! renames: its bytes are read from the wire once, never copied. Running out of space anywhere on
//! the way leaves nothing behind but the staging folder, which is removed.
//!
//! The store on disk is read as untrusted input: results and blobs are
//! addressed only by [`RunKey`] and [`Sha256Digest`] (which print as hex and
//! nothing else), a manifest must parse with its typed fields and pass
//! [`ResultManifest::check`], and a result is returned for a key only if it
//! is stored under that key and its inputs hash to it.

use crate::part_digest::{PartDigest, PartDigester, STATE_LEN};
use crate::tags::{Content, PartHasher, TagKey, Tags};
use crate::workdir::WorkDir;
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reprise_protocol::digest::{Blake3Digest, KeyPrefix, RunKey, Sha256Digest};
use reprise_protocol::key::{Differences, KeyInputs};
use reprise_protocol::manifest::{
    Artifact, ArtifactPath, MANIFEST_VERSION, MAX_ARTIFACT_BYTES, Outcome, ResultManifest,
};
use reprise_protocol::seal::Seal;
use reprise_protocol::wire::{self, Sealed};
use thiserror::Error;

/// Why the store failed.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("the result store at {} is full (free some space, or run `reprise results gc`); nothing was kept", .0.display())]
    Full(PathBuf),
    #[error("{0}: nothing was kept (a result this large could not be replayed or served)")]
    TooLarge(#[from] reprise_protocol::manifest::Oversize),
    #[error("result store io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stored result {0} is damaged: {1}")]
    Damaged(String, String),
    #[error("artifact file {} cannot be kept: {reason}", path.display())]
    BadArtifactFile { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| {
        if source.raw_os_error() == Some(nix::libc::ENOSPC) {
            StoreError::Full(path.to_path_buf())
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// A stored result.
#[derive(Debug, Clone)]
pub struct StoredResult {
    pub dir: PathBuf,
    pub manifest: ResultManifest,
    /// The producer's seal; `None` for a result made without credentials
    /// (replayed here, never served, never counts).
    pub seal: Option<Seal>,
    /// The artifacts' blobs as this process wrote them from bytes it had
    /// just checked against their sha256 (a fetch), still open; `None` for
    /// a result read from disk, whose blobs a replay hashes again.
    verified: Option<Arc<VerifiedBlobs>>,
}

/// Blobs a fetch wrote and checked, by sha256, open for reading: the
/// replay that follows copies them without hashing the same bytes again
/// (and from the very file it checked, whatever the store's folder holds
/// by then).
#[derive(Debug, Default)]
pub struct VerifiedBlobs(BTreeMap<Sha256Digest, fs::File>);

/// The file in a result's folder saying why it is kept on this machine
/// (an artifact holds a secret).
pub const KEPT_LOCAL: &str = "kept-local.txt";
/// What of [`KEPT_LOCAL`] is read.
pub const KEPT_LOCAL_MAX: u64 = 4096;

/// The lock, in the store's root, that a commit holds shared from when it
/// moves its blobs into `blobs/` until its result is renamed into place,
/// and that [`Store::gc`] holds exclusive while it decides which blobs
/// nothing refers to and removes them.
pub const PLACING: &str = "placing.lock";

impl StoredResult {
    /// Why the result is kept on this machine, if it is.
    /// One line, at most [`KEPT_LOCAL_MAX`] bytes of it, whatever the file
    /// holds.
    pub fn kept_local(&self) -> Option<String> {
        use std::io::Read;
        let mut text = Vec::new();
        open_stored(&self.dir.join(KEPT_LOCAL))
            .ok()?
            .take(KEPT_LOCAL_MAX)
            .read_to_end(&mut text)
            .ok()?;
        let text = String::from_utf8_lossy(&text);
        Some(text.lines().next().unwrap_or_default().trim().to_string())
    }

    pub fn output_path(&self) -> PathBuf {
        self.dir.join("output.rec")
    }

    /// The blob of `sha256` if this process checked it while it arrived
    /// ([`Receiving`]), open for reading.
    pub fn verified_blob(&self, sha256: &Sha256Digest) -> Option<&fs::File> {
        self.verified.as_ref()?.0.get(sha256)
    }

    /// The result as it travels: manifest and seal, if it has a seal.
    pub fn sealed(&self) -> Option<Sealed> {
        Some(Sealed {
            manifest: self.manifest.clone(),
            seal: self.seal.clone()?,
        })
    }
}

/// Seals a result with a producer's key when its run ends.
pub trait Sealer {
    fn seal(&self, manifest: &ResultManifest) -> Seal;
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit(StoredResult),
    /// No result for the key; the nearest stored result of the same
    /// repository, with the inputs that differ, if there is one.
    Miss {
        nearest: Option<(StoredResult, Differences)>,
    },
}

/// How many results to keep.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Passed results kept per repository and target, newest first.
    pub per_target: usize,
    /// Results older than this are dropped.
    pub max_age: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            per_target: 1,
            max_age: None,
        }
    }
}

/// What a [`Store::gc`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Results dropped beyond the retention.
    pub results: usize,
    /// Blobs no result referred to.
    pub blobs: usize,
    /// A commit was placing its blobs, so none were removed: the next
    /// `gc` does it.
    pub blobs_deferred: bool,
    /// Partial transfers nobody resumed for [`PARTIAL_MAX_AGE`].
    pub partials: usize,
}

/// The local store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: PathBuf) -> Store {
        Store { root }
    }

    /// The store under the user's data folder (XDG_DATA_HOME respected).
    pub fn default_location() -> Store {
        Store::new(crate::paths::data_dir().join("store"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn results(&self) -> PathBuf {
        self.root.join("results")
    }

    fn blob(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("blobs").join(sha.hex())
    }

    /// The path of an artifact's content.
    pub fn blob_path(&self, artifact: &Artifact) -> PathBuf {
        self.blob(&artifact.sha256)
    }

    /// Loads the passed result for `key`, if stored (under that key, for
    /// that key, whole).
    pub fn get(&self, key: &RunKey) -> Option<StoredResult> {
        load(&self.results().join(key.hex()))
            .filter(|r| r.manifest.outcome == Outcome::Passed && r.manifest.key == *key)
    }

    /// Looks a key up; on a miss, finds the nearest result of the same
    /// repository to explain the difference.
    pub fn lookup(&self, inputs: &KeyInputs) -> Lookup {
        if let Some(hit) = self.get(&inputs.key()) {
            return Lookup::Hit(hit);
        }
        let nearest = self
            .list()
            .into_iter()
            .filter(|r| r.manifest.inputs.namespace == inputs.namespace)
            .map(|r| {
                let diff = inputs.diff(&r.manifest.inputs);
                (r, diff)
            })
            .min_by_key(|(r, diff)| (diff.len(), std::cmp::Reverse(r.manifest.created_at)));
        Lookup::Miss { nearest }
    }

    /// Every passed result, newest first.
    pub fn list(&self) -> Vec<StoredResult> {
        list_dir(&self.results())
    }

    /// Every failed run kept for inspection, newest first.
    pub fn list_failed(&self) -> Vec<StoredResult> {
        list_dir(&self.root.join("failed"))
    }

    /// Finds a result (passed or failed) by key or key prefix.
    pub fn find(&self, prefix: &KeyPrefix) -> Vec<StoredResult> {
        self.list()
            .into_iter()
            .chain(self.list_failed())
            .filter(|r| prefix.matches(&r.manifest.key))
            .collect()
    }

    /// A staging folder in the store's `tmp/` (same file system, so its
    /// files can be renamed into place).
    pub fn stage(&self, prefix: &str) -> Result<WorkDir, StoreError> {
        let tmp = self.root.join("tmp");
        WorkDir::new_in(&tmp, prefix).map_err(io_err(&tmp))
    }

    /// Commits the result of a run made here: the manifest (its artifact
    /// list and output fields are filled in here), the output record, and
    /// the files under `artifacts` (a folder; may be absent), sealed by
    /// `sealer` once the manifest is complete. Passed results go where
    /// lookups find them; failed ones to `failed/`.
    pub fn commit(
        &self,
        manifest: ResultManifest,
        record: &[u8],
        artifacts: Option<&Path>,
        sealer: Option<&dyn Sealer>,
    ) -> Result<StoredResult, StoreError> {
        self.commit_from(manifest, &mut &record[..], artifacts, sealer)
    }

    /// [`Store::commit`] with the output record read from `record` as it
    /// is copied (and hashed) into the store, never held whole.
    pub fn commit_from(
        &self,
        mut manifest: ResultManifest,
        record: &mut dyn std::io::Read,
        artifacts: Option<&Path>,
        sealer: Option<&dyn Sealer>,
    ) -> Result<StoredResult, StoreError> {
        let stage = self.stage("stage-")?;
        let key = self.tag_key_made();
        let out = stage.path().join("output.rec");
        let record = copy_synced(record, &out)?;
        let bytes = record.bytes;
        manifest.output_sha256 = record.sha256;
        manifest.output_blake3 = Some(record.blake3);
        manifest.output_bytes = bytes;
        let (artifacts, blobs) = match artifacts {
            Some(dir) if dir.is_dir() => self.stage_artifacts(dir, bytes, &stage)?,
            _ => (Vec::new(), Vec::new()),
        };
        manifest.artifacts = artifacts;
        manifest.check_sizes()?;
        if let Some(key) = &key {
            // The tags bind the BLAKE3 digests just hashed into the manifest.
            let contents: Vec<Option<Content>> = manifest
                .blake3()
                .into_iter()
                .flatten()
                .map(|d| Some(Content::of(&d)))
                .collect();
            write_tags(stage.path(), key, &manifest, &contents);
        }
        manifest.version = MANIFEST_VERSION;
        let seal = sealer.map(|s| s.seal(&manifest));
        crate::faults::pause_point("commit");
        self.finish(stage, manifest, seal, blobs)
    }

    /// Where the key of this store's tags is kept: beside it.
    pub fn tag_key_path(&self) -> PathBuf {
        crate::tags::key_path(&self.root)
    }

    /// This store's tag key, made if there is none yet; `None` (and no
    /// tags are kept) when it cannot be made or is not private.
    fn tag_key_made(&self) -> Option<TagKey> {
        TagKey::load_or_make(&self.tag_key_path())
    }

    /// The tags a stored result keeps, with the key to check them
    /// ([`crate::tags`]); `None` when it has none this store's key checks.
    pub fn tags(&self, result: &StoredResult) -> Option<Tags> {
        Tags::read(
            &self.tag_key_path(),
            &result.dir,
            1 + result.manifest.artifacts.len(),
        )
    }

    /// The tags a replay of `result` checks by: [`Store::tags`], or none
    /// with this store's key (made if there is none) when it keeps none
    /// that read, so that the parts it checks by sha256 get their tags made
    /// anew ([`Store::heal_tags`]). `None` only without a key.
    pub fn tags_to_replay(&self, result: &StoredResult) -> Option<Tags> {
        self.tags(result).or_else(|| {
            let key = self.tag_key_made()?;
            Some(Tags::none(key, 1 + result.manifest.artifacts.len()))
        })
    }

    /// Makes anew the tags of the parts of `result` a replay just checked
    /// by sha256 (`healed`, hashed by the key of `tags` beside it), keeping
    /// the others of `tags`: a result fetched by resuming a cut transfer,
    /// stored before tags, or whose tags or key were lost then replays at
    /// BLAKE3's speed from the next time on. The file is replaced whole; a
    /// failure only costs speed, and is not an error.
    pub fn heal_tags(&self, result: &StoredResult, tags: &Tags, healed: &[crate::replay::Healed]) {
        if healed.is_empty() {
            return;
        }
        match crate::tags::replace(&result.dir, &tags.healed(healed)) {
            Ok(()) => tracing::debug!(parts = healed.len(), "made the result's tags anew"),
            Err(e) => {
                tracing::debug!(dir = %result.dir.display(), "making the result's tags anew: {e}")
            }
        }
    }

    /// Starts receiving a result from a peer, `sealed` exactly as its
    /// producer sealed it (checked by the caller), into its partial folder
    /// `tmp/partial-<digest>/` ([`Partial`]): `resumed`, the partial
    /// [`Store::resumable`] found, if the transfer continues it; otherwise a
    /// fresh one (a stale partial of the same result is emptied). When
    /// another fetch holds that folder, a folder of its own that is never
    /// kept. The manifest and seal are written at once. The caller writes
    /// every part through the [`Receiving`], checking each
    /// part's sha256 as they arrive, and then commits it.
    pub fn receive(
        &self,
        sealed: Sealed,
        resumed: Option<Partial>,
    ) -> Result<Receiving, StoreError> {
        let digest = sealed.digest();
        let parts = sealed.parts().len();
        let partial = match resumed {
            Some(p) if p.digest == Some(digest) && p.progress.len() == parts => p,
            other => {
                // A partial of another result of this key, or one the
                // holder would not resume: it is dropped.
                if let Some(mut old) = other {
                    old.keep = false;
                }
                Partial::fresh(self, &digest, &sealed.manifest)?
            }
        };
        // Appended to by every part; not through a symlink (a reopened
        // partial wrote it anew, a fresh one has none).
        let record_path = partial.dir.join(PROGRESS);
        let record = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&record_path)
            .map_err(io_err(&record_path))?;
        let mut receiving = Receiving {
            store: self.clone(),
            partial,
            sealed,
            files: Vec::new(),
            syncs: Syncs::default(),
            record,
            tag_key: self.tag_key_made(),
            contents: vec![None; parts],
        };
        let dir = receiving.partial.dir.clone();
        let manifest =
            serde_json::to_vec_pretty(&receiving.sealed.manifest).expect("manifest serialises");
        let seal = serde_json::to_vec_pretty(&receiving.sealed.seal).expect("seal serialises");
        for (name, text) in [("manifest.json", manifest), ("seal.json", seal)] {
            let path = dir.join(name);
            let mut f = create_anew(&path).map_err(io_err(&path))?;
            f.write_all(&text).map_err(io_err(&path))?;
            receiving.syncs.start(f, path)?;
        }
        Ok(receiving)
    }

    /// The partial transfer of a result of `key` this store keeps
    /// ([`Partial`]), locked for this fetch: what a fetch asks the rest of.
    /// Its chunks are not read here: the fetch checks them while the rest
    /// arrives ([`Receiving::kept_check`]). `None` when there is none (or
    /// another fetch holds it).
    pub fn resumable(&self, key: &RunKey) -> Option<Partial> {
        let tmp = self.root.join("tmp");
        let mut found: Vec<(SystemTime, PathBuf, ResultManifest)> = fs::read_dir(&tmp)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX))
            .filter_map(|e| {
                let m = read_partial_manifest(&e.path())?;
                let at = fs::metadata(e.path().join(OWNER)).and_then(|m| m.modified());
                (m.key == *key).then(|| (at.unwrap_or(UNIX_EPOCH), e.path(), m))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found
            .into_iter()
            .find_map(|(_, dir, m)| Partial::reopen(dir, m).ok().flatten())
    }

    /// Writes the manifest and seal into `stage`, syncs it, and places it
    /// with its staged `blobs`.
    fn finish(
        &self,
        stage: WorkDir,
        manifest: ResultManifest,
        seal: Option<Seal>,
        blobs: Vec<(Sha256Digest, PathBuf)>,
    ) -> Result<StoredResult, StoreError> {
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        write_synced(&stage.path().join("manifest.json"), &text)?;
        if let Some(seal) = &seal {
            let text = serde_json::to_vec_pretty(seal).expect("seal serialises");
            write_synced(&stage.path().join("seal.json"), &text)?;
        }
        self.place(stage, manifest, seal, blobs)
    }

    /// Opens and locks the store's [`PLACING`] lock; `None` if `how` does
    /// not wait and someone else holds it.
    fn placing(&self, how: FlockArg) -> Result<Option<Flock<fs::File>>, StoreError> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let path = self.root.join(PLACING);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match Flock::lock(file, how) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(io_err(&path)(errno.into())),
        }
    }

    /// Places a staging folder whose every file is synced: under the
    /// [`PLACING`] lock (shared), moves its staged `blobs` (synced files in
    /// `stage/blobs/`, with the sha256 each was checked against) into
    /// `blobs/` (one already there is kept and the staged copy dropped
    /// when [`keeps_filed`] says so, else replaced),
    /// syncs both folders, renames the result into place and syncs its new
    /// parent.
    ///
    /// Why a lock and not a grace period in `gc`: between a blob's move
    /// and the result's rename, nothing on disk refers to the blob, and a
    /// commit may also count on a blob that is already there (of an older
    /// result `gc` is dropping this moment), whatever its age. Staging the
    /// blobs in the locked staging folder keeps them from `gc` until the
    /// move; the lock covers the move to the rename, and no longer: it is
    /// held for renames and syncs only, never while artifacts are copied
    /// or received.
    fn place(
        &self,
        stage: impl Staged,
        manifest: ResultManifest,
        seal: Option<Seal>,
        blobs: Vec<(Sha256Digest, PathBuf)>,
    ) -> Result<StoredResult, StoreError> {
        let _placing = self.placing(FlockArg::LockShared)?;
        let store_blobs = self.root.join("blobs");
        let staged_blobs = stage.path().join("blobs");
        let mut moved = false;
        if staged_blobs.exists() {
            fs::create_dir_all(&store_blobs).map_err(io_err(&store_blobs))?;
            for (sha, staged) in blobs {
                let blob = self.blob(&sha);
                if keeps_filed(&blob, &staged, &sha) {
                    fs::remove_file(&staged).map_err(io_err(&staged))?;
                } else {
                    fs::rename(&staged, &blob).map_err(io_err(&blob))?;
                    moved = true;
                }
            }
            fs::remove_dir(&staged_blobs).map_err(io_err(&staged_blobs))?;
        }
        // The two folders at once: their syncs share a journal commit.
        let stage_dir = stage.path().to_path_buf();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| match moved {
                true => sync_dir(&store_blobs),
                false => Ok(()),
            });
            (a.join(), sync_dir(&stage_dir))
        });
        a.expect("sync thread")?;
        b?;
        crate::faults::pause_point("place");
        let dest = match manifest.outcome {
            Outcome::Passed => self.results().join(manifest.key.hex()),
            Outcome::Failed => self.root.join("failed").join(format!(
                "{}-{}",
                manifest.key.hex(),
                manifest.created_at
            )),
        };
        let parent = dest.parent().expect("dest has a parent");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let staged = stage.keep();
        if dest.exists() {
            // Swap the new result in for the old in one step, then drop the old.
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &staged,
                nix::fcntl::AT_FDCWD,
                &dest,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(|e| io_err(&dest)(e.into()))?;
            let _ = fs::remove_dir_all(&staged);
        } else if let Err(e) = fs::rename(&staged, &dest) {
            let _ = fs::remove_dir_all(&staged);
            return Err(io_err(&dest)(e));
        }
        sync_dir(parent)?;
        Ok(StoredResult {
            dir: dest,
            manifest,
            seal,
            verified: None,
        })
    }

    /// Stages the files under `dir` as blobs in `stage/blobs/`, synced,
    /// once they are known to fit the size limits beside a record of
    /// `record_bytes`: a blob the store holds already is linked (its name
    /// may go while this commit runs; the staged link keeps its bytes), a
    /// new one copied. Returns the artifacts, the staged blobs (one per
    /// content).
    #[expect(clippy::type_complexity, reason = "two lists, named at the caller")]
    fn stage_artifacts(
        &self,
        dir: &Path,
        record_bytes: u64,
        stage: &WorkDir,
    ) -> Result<(Vec<Artifact>, Vec<(Sha256Digest, PathBuf)>), StoreError> {
        let staged_blobs = stage.path().join("blobs");
        fs::create_dir(&staged_blobs).map_err(io_err(&staged_blobs))?;
        let mut artifacts = Vec::new();
        let files = artifact_files(dir)?;
        let mut sizes = Vec::with_capacity(files.len());
        for rel in &files {
            let path = dir.join(rel.as_str());
            sizes.push(fs::symlink_metadata(&path).map_err(io_err(&path))?.len());
        }
        reprise_protocol::manifest::check_sizes(
            record_bytes,
            files.iter().map(|f| f.as_str()).zip(sizes.iter().copied()),
        )?;
        let mut staged: Vec<(Sha256Digest, PathBuf)> = Vec::new();
        for rel in files {
            let path = dir.join(rel.as_str());
            let hashed = hash_file(&path).map_err(io_err(&path))?;
            let sha = hashed.sha256;
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            if !staged.iter().any(|(s, _)| *s == sha) {
                let to = staged_blobs.join(staged.len().to_string());
                // A blob filed under this sha256 is only shared when it
                // holds this file's bytes: one that does not (damaged, or
                // filed by a lying producer) is replaced when placed.
                let blob = self.blob(&sha);
                let linked =
                    same_files(&blob, &path).unwrap_or(false) && fs::hard_link(&blob, &to).is_ok();
                if !linked {
                    fs::copy(&path, &to)
                        .and_then(|_| fs::File::open(&to)?.sync_all())
                        .map_err(io_err(&to))?;
                }
                staged.push((sha, to));
            }
            artifacts.push(Artifact {
                path: rel,
                sha256: sha,
                blake3: Some(hashed.blake3),
                bytes: meta.len(),
                // Permission bits only: a set-id bit from the guest is not kept.
                mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            });
        }
        Ok((artifacts, staged))
    }

    /// Moves a damaged result aside into `quarantine/<key>-<now>/`, with
    /// `reason.txt` saying why, and beside it every blob of its artifacts
    /// that no longer matches its sha256. Nothing looks it up again.
    /// Returns where it went.
    pub fn quarantine(&self, result: &StoredResult, reason: &str) -> Result<PathBuf, StoreError> {
        let dest = self.quarantine_folder(&result.dir, reason)?;
        for a in &result.manifest.artifacts {
            let blob = self.blob_path(a);
            let matches = stored_sha256(&blob) == Some(a.sha256);
            if blob.symlink_metadata().is_ok() && !matches {
                let aside = dest.join("damaged-blobs");
                fs::create_dir_all(&aside).map_err(io_err(&aside))?;
                fs::rename(&blob, aside.join(a.sha256.hex())).map_err(io_err(&blob))?;
            }
        }
        Ok(dest)
    }

    /// Result folders that do not load (a manifest that does not parse or
    /// check, a folder not named by its key): lookups skip them, `results
    /// verify` moves them aside.
    pub fn unreadable(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in [self.results(), self.root.join("failed")] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if load(&e.path()).is_none() {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    /// Moves a result folder into the quarantine (`quarantine/<name>-<now>/`),
    /// with its reason. Its blobs stay: they are checked by content, and
    /// `gc` drops those nothing refers to. A result folder that does not
    /// load goes this way as it is; [`Store::quarantine`] adds the damaged
    /// blobs of one that does.
    pub fn quarantine_folder(&self, folder: &Path, reason: &str) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = dir.join(format!("{name}-{}", now_secs()));
        fs::rename(folder, &dest).map_err(io_err(&dest))?;
        let why = dest.join("reason.txt");
        create_anew(&why)
            .and_then(|mut f| f.write_all(format!("{reason}\n").as_bytes()))
            .map_err(io_err(&why))?;
        Ok(dest)
    }

    /// The quarantined results' folders.
    pub fn quarantined(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(self.root.join("quarantine"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Drops results beyond the retention, then blobs no result refers to
    /// (unless a commit is placing its blobs right now: then they are left
    /// for the next `gc`, see [`Store::place`]).
    pub fn gc(&self, retention: Retention) -> Result<Collected, StoreError> {
        let now = now_secs();
        let mut dropped = 0;
        for results in [self.list(), self.list_failed()] {
            let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
            for r in results {
                let group = (
                    r.manifest.inputs.namespace.clone(),
                    r.manifest.inputs.target.clone(),
                );
                let n = seen.entry(group).or_default();
                *n += 1;
                let too_old = retention
                    .max_age
                    .is_some_and(|age| now.saturating_sub(r.manifest.created_at) > age.as_secs());
                if *n > retention.per_target || too_old {
                    fs::remove_dir_all(&r.dir).map_err(io_err(&r.dir))?;
                    dropped += 1;
                }
            }
        }
        // Staging folders of commits and fetches that were killed; those
        // of live ones are theirs.
        crate::workdir::sweep(&self.root.join("tmp"), "");
        let partials = self.sweep_partials(PARTIAL_MAX_AGE);
        // Held while the blobs in use are listed and the others removed, so
        // no commit moves a blob in meanwhile; a commit holding it now is
        // not waited for.
        let Some(_placing) = self.placing(FlockArg::LockExclusiveNonblock)? else {
            return Ok(Collected {
                results: dropped,
                blobs: 0,
                blobs_deferred: true,
                partials,
            });
        };
        let used: std::collections::BTreeSet<String> = self
            .list()
            .into_iter()
            .chain(self.list_failed())
            .flat_map(|r| r.manifest.artifacts.into_iter().map(|a| a.sha256.hex()))
            .collect();
        let mut blobs = 0;
        if let Ok(entries) = fs::read_dir(self.root.join("blobs")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // A dot-file is a temporary of an older version's commit,
                // never a blob.
                if !name.starts_with('.')
                    && !used.contains(&name)
                    && fs::remove_file(e.path()).is_ok()
                {
                    blobs += 1;
                }
            }
        }
        Ok(Collected {
            results: dropped,
            blobs,
            blobs_deferred: false,
            partials,
        })
    }

    /// Removes the partial transfers no fetch holds that no fetch took for
    /// `max_age` (by their lock file's time, set whenever a fetch takes
    /// one). Returns how many.
    pub fn sweep_partials(&self, max_age: Duration) -> usize {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
                continue;
            }
            let owner = e.path().join(OWNER);
            let taken = fs::metadata(&owner)
                .or_else(|_| fs::metadata(e.path()))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if taken.is_none_or(|age| age <= max_age) {
                continue;
            }
            // Held by a fetch right now: not abandoned, whatever its age.
            let free = match fs::File::open(&owner) {
                Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok(),
                Err(_) => true,
            };
            if free && fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Where partial transfers are kept, in the store's `tmp/`:
/// `partial-<digest>/`, the digest of the result's manifest
/// ([`Sealed::digest`]), so only that very result resumes.
pub const PARTIAL_PREFIX: &str = "partial-";

/// How long a partial transfer nobody resumes is kept ([`Store::gc`]).
pub const PARTIAL_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The lock file of a partial folder, held by the fetch writing it; its
/// modification time is when a fetch last took the folder.
const OWNER: &str = ".owner";

/// A partial's progress record: for every chunk written so far, one entry
/// of [`ENTRY_LEN`] bytes, its part (`u32`, little-endian), its index in
/// the part (`u64`) and the part's sha256 state after it. One file for the
/// whole transfer, appended to: a file per part cost a fetch of 21 parts 21
/// files made and removed, and ext4's search for a free inode past the
/// ones freed a moment ago was a tenth of a receiver's CPU (`perf`).
const PROGRESS: &str = "progress";

/// Where a partial kept its progress before [`PROGRESS`] (a folder of one
/// record per part); removed when a fetch starts over, never read.
const OLD_CHUNKS: &str = "chunks";

/// The length of an entry of [`PROGRESS`].
const ENTRY_LEN: usize = 4 + 8 + STATE_LEN;

/// The most of a progress record read: an entry for every chunk of a
/// result of the largest size the limits allow, and more.
const PROGRESS_MAX: u64 = 16 << 20;

/// A result being received ([`Store::receive`]), staged in its partial
/// folder. Every chunk goes into its part's digest as it is written, and
/// the digest's state is recorded after it ([`PartWriter`]); every part is
/// checked against the manifest's digest once whole, and every file
/// is synced in the background as soon as its part is whole, while the
/// next one arrives; [`Receiving::commit`] waits
/// for those syncs, moves the blobs into place, syncs the two folders that
/// changed and renames the result into `results/` and syncs that: a
/// result is never visible before all of it is durable. Dropped
/// uncommitted, it removes its folder, unless [`Receiving::keep`] kept it
/// for the rest of the transfer.
#[derive(Debug)]
pub struct Receiving {
    store: Store,
    partial: Partial,
    sealed: Sealed,
    /// The artifacts' staged files, open, by artifact, once whole.
    files: Vec<Option<fs::File>>,
    syncs: Syncs,
    /// The progress record ([`PROGRESS`]), appended to by every part.
    record: fs::File,
    /// The store's tag key, and each part's BLAKE3 once whole, for its
    /// tag: the digest it was checked by where the manifest gives BLAKE3
    /// digests (resumed or not); else hashed as it arrives, from its first
    /// chunk only (a part resumed is left without a tag, and a replay
    /// checks its sha256).
    tag_key: Option<TagKey>,
    contents: Vec<Option<Content>>,
}

/// What a partial holds of one part: its chunks checked so far, and the
/// part's digest over them (sha256, or BLAKE3 where the manifest gives
/// it: [`crate::part_digest`]).
#[derive(Debug, Clone)]
struct Progress {
    chunks: u64,
    digest: PartDigester,
}

impl Progress {
    /// Every part of `manifest` from its start, by the digest it is
    /// checked by.
    fn starts(manifest: &ResultManifest) -> Vec<Progress> {
        let blake3 = manifest.blake3().is_some();
        part_sizes(manifest)
            .into_iter()
            .map(|bytes| Progress {
                chunks: 0,
                digest: PartDigester::new(blake3, bytes),
            })
            .collect()
    }

    /// The same part from its start.
    fn restarted(&self) -> Progress {
        let (blake3, bytes) = self.digest.kind();
        Progress {
            chunks: 0,
            digest: PartDigester::new(blake3, bytes),
        }
    }
}

/// A partial transfer's folder (`tmp/partial-<digest>/`), locked by the
/// fetch using it:
///
/// ```text
/// manifest.json, seal.json   as the transfer's header gave them
/// output.rec, blobs/<i>      the parts, each its chunks so far
/// progress                   each part's digest state after each of them
/// .owner                     locked while a fetch writes the folder
/// ```
///
/// Nothing in it is synced until the result is committed: a partial is
/// never trusted as it lies on disk. A fetch resumes each part's digest
/// from the state recorded after its last chunk kept ([`Store::resumable`])
/// and asks for the rest at once; while the rest arrives, every chunk kept
/// is read back and hashed again, and the state after each must be the one
/// recorded ([`KeptCheck`]). Equal states after a chunk mean equal bytes
/// up to it, so a part's digest at the end covers every byte on disk, and
/// the result is committed only once that check held. Where it does not (a
/// crash lost or tore a chunk or its record, or someone changed them), the
/// part is cut back to its last chunk that holds ([`Receiving::cut_back`])
/// and the fetch asks again. Dropped, the folder is removed unless kept
/// ([`Receiving::keep`]); `gc` removes kept ones nobody took for
/// [`PARTIAL_MAX_AGE`].
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    _owner: Flock<fs::File>,
    /// The result's digest; `None` for a folder of one fetch's own (when
    /// another fetch holds the result's partial), never kept.
    digest: Option<Sha256Digest>,
    progress: Vec<Progress>,
    /// Each part's states recorded after its chunks kept, as
    /// [`Partial::reopen`] found them (to check them by, [`KeptCheck`]).
    recorded: Vec<Vec<u8>>,
    keep: bool,
    placed: bool,
}

impl Partial {
    /// Takes the partial folder of `digest` and empties it, or, when
    /// another fetch holds it, makes a folder of this fetch's own.
    fn fresh(
        store: &Store,
        digest: &Sha256Digest,
        manifest: &ResultManifest,
    ) -> Result<Partial, StoreError> {
        let tmp = store.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let dir = tmp.join(format!("{PARTIAL_PREFIX}{}", digest.hex()));
        let (dir, digest) = match fs::create_dir(&dir) {
            Ok(()) => (dir, Some(*digest)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (dir, Some(*digest)),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let taken = Partial::lock(dir.clone(), digest, manifest)?;
        let mut partial = match taken {
            Some(p) => p,
            None => {
                let own = tempfile::Builder::new()
                    .prefix("fetch-")
                    .tempdir_in(&tmp)
                    .map_err(io_err(&tmp))?
                    .keep();
                Partial::lock(own, None, manifest)?.ok_or_else(|| {
                    io_err(&tmp)(std::io::Error::other("a fresh folder is locked"))
                })?
            }
        };
        // Whatever an earlier fetch left is dropped: this one starts over.
        for name in ["output.rec", "blobs", PROGRESS, OLD_CHUNKS] {
            let path = partial.dir.join(name);
            let gone = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
            if let Err(e) = gone
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(io_err(&path)(e));
            }
        }
        let blobs = partial.dir.join("blobs");
        fs::create_dir(&blobs).map_err(io_err(&blobs))?;
        partial.keep = false;
        Ok(partial)
    }

    /// Locks `dir` (`None` when another fetch holds it); marks it kept for
    /// the work-folder sweep (a partial's age is `gc`'s to judge) and its
    /// lock file as just taken.
    fn lock(
        dir: PathBuf,
        digest: Option<Sha256Digest>,
        manifest: &ResultManifest,
    ) -> Result<Option<Partial>, StoreError> {
        let progress = Progress::starts(manifest);
        let parts = progress.len();
        // The sweep of abandoned work folders leaves kept ones alone.
        let kept = dir.join(".kept");
        if digest.is_some() && !kept.exists() {
            create_anew(&kept).map_err(io_err(&kept))?;
        }
        let path = dir.join(OWNER);
        // A folder of this fetch's own is swept like any work folder once
        // its owner is gone: its lock file is locked under another name
        // and then renamed, so no sweep sees it unlocked.
        let opened = match digest {
            Some(_) => dir.join(OWNER),
            None => dir.join(".owner.new"),
        };
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&opened);
        let file = match file {
            Ok(f) => f,
            // Something else than a lock file in its place (a symlink):
            // this folder is not taken; the fetch uses one of its own.
            Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Ok(None),
            Err(e) => return Err(io_err(&opened)(e)),
        };
        let owner = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => return Err(io_err(&path)(errno.into())),
        };
        if opened != path {
            fs::rename(&opened, &path).map_err(io_err(&path))?;
        }
        let _ = owner.set_modified(SystemTime::now());
        Ok(Some(Partial {
            dir,
            _owner: owner,
            digest,
            progress,
            recorded: vec![Vec::new(); parts],
            keep: true,
            placed: false,
        }))
    }

    /// Takes the partial folder `dir` of a result with `manifest`, each
    /// part resumed from the state recorded after its last chunk on disk
    /// (checked against the bytes by [`KeptCheck`], not here); `None` if
    /// another fetch holds it.
    fn reopen(dir: PathBuf, manifest: ResultManifest) -> Result<Option<Partial>, StoreError> {
        let sealed_digest = Sha256Digest::of(&reprise_protocol::sign::signing_bytes(&manifest));
        let named = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PARTIAL_PREFIX))
            .and_then(|n| n.parse::<Sha256Digest>().ok());
        if named != Some(sealed_digest) {
            return Ok(None);
        }
        let Some(mut partial) = Partial::lock(dir, Some(sealed_digest), &manifest)? else {
            return Ok(None);
        };
        let sizes = part_sizes(&manifest);
        let mut recorded = partial.read_progress(sizes.len());
        for (i, bytes) in sizes.into_iter().enumerate() {
            let start = partial.progress[i].clone();
            let progress = partial.claim(i, bytes, &recorded[i], start)?;
            recorded[i].truncate(progress.chunks as usize * STATE_LEN);
            partial.progress[i] = progress;
        }
        // Written anew whatever it held (or was: a symlink is replaced, not
        // followed), so this fetch appends to a record of its own making.
        partial.write_progress(&recorded)?;
        partial.recorded = recorded;
        Ok(Some(partial))
    }

    /// What part `i` (of `bytes` bytes) holds by its `recorded` states and
    /// its file's length: the chunks both cover, and the digest state
    /// recorded after the last of them. Anything but a regular file in the
    /// part's place (a symlink) is removed, and the part starts over.
    fn claim(
        &self,
        i: usize,
        bytes: u64,
        recorded: &[u8],
        start: Progress,
    ) -> Result<Progress, StoreError> {
        let path = self.part_path(i);
        let on_disk = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                fs::remove_file(&path).map_err(io_err(&path))?;
                0
            }
            Err(_) => 0,
        };
        let whole_chunks = if on_disk >= bytes {
            wire::chunk_count(bytes)
        } else {
            on_disk / wire::CHUNK_BYTES
        };
        Ok(resumed_after(
            start,
            recorded,
            whole_chunks.min((recorded.len() / STATE_LEN) as u64),
        ))
    }

    /// Each of `parts` parts' states as the progress record holds them
    /// ([`parse_progress`]); none where there is no record.
    fn read_progress(&self, parts: usize) -> Vec<Vec<u8>> {
        use std::io::Read;
        let mut recorded = Vec::new();
        if let Ok(f) = open_stored(&self.dir.join(PROGRESS)) {
            // Entries past what the largest result could need are left out.
            let _ = f.take(PROGRESS_MAX).read_to_end(&mut recorded);
        }
        parse_progress(&recorded, parts)
    }

    /// Writes the progress record anew with each part's `states`.
    fn write_progress(&self, states: &[Vec<u8>]) -> Result<(), StoreError> {
        let path = self.dir.join(PROGRESS);
        let mut text = Vec::new();
        for (part, states) in states.iter().enumerate() {
            for (index, state) in states.chunks_exact(STATE_LEN).enumerate() {
                text.extend_from_slice(&progress_entry(part, index as u64, state));
            }
        }
        create_anew(&path)
            .and_then(|mut f| f.write_all(&text))
            .map_err(io_err(&path))
    }

    /// The check of the chunks this partial holds, to run while the rest
    /// arrives; `None` when it holds none.
    fn kept_check(&self) -> Option<KeptCheck> {
        let parts: Vec<KeptPart> = self
            .progress
            .iter()
            .enumerate()
            .map(|(i, progress)| {
                let (blake3, bytes) = progress.digest.kind();
                KeptPart {
                    path: self.part_path(i),
                    blake3,
                    recorded: self.recorded.get(i).cloned().unwrap_or_default(),
                    bytes,
                    chunks: progress.chunks,
                }
            })
            .collect();
        parts
            .iter()
            .any(|p| p.chunks > 0)
            .then_some(KeptCheck { parts })
    }

    /// Cuts each part of `damaged` (a part and how many of its chunks
    /// held, as [`KeptCheck::run`] found) back to those chunks: its file,
    /// its record and its progress, so the next fetch asks from there.
    fn cut_back(&mut self, damaged: &[(usize, u64)]) -> Result<(), StoreError> {
        // Read again: the record holds what this fetch added since.
        let mut recorded = self.read_progress(self.progress.len());
        let mut cut = false;
        for &(i, keep) in damaged {
            if self.progress.get(i).is_none_or(|p| keep >= p.chunks) {
                continue;
            }
            let start = self.progress[i].restarted();
            let progress = resumed_after(start, &recorded[i], keep);
            let states = progress.chunks as usize * STATE_LEN;
            recorded[i].truncate(states);
            self.recorded[i].truncate(states);
            cut = true;
            let part = self.part_path(i);
            let opened = fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&part);
            if let Ok(f) = opened {
                f.set_len(progress.chunks.saturating_mul(wire::CHUNK_BYTES))
                    .map_err(io_err(&part))?;
            }
            self.progress[i] = progress;
        }
        if cut {
            self.write_progress(&recorded)?;
        }
        Ok(())
    }

    /// The file of part `i`: the output record, then each artifact's.
    fn part_path(&self, i: usize) -> PathBuf {
        match i {
            0 => self.dir.join("output.rec"),
            i => self.dir.join("blobs").join((i - 1).to_string()),
        }
    }

    /// The result's digest, `None` for a folder of this fetch's own.
    pub fn digest(&self) -> Option<Sha256Digest> {
        self.digest
    }

    /// The chunk each part's rest starts at.
    pub fn from(&self) -> Vec<u64> {
        self.progress.iter().map(|p| p.chunks).collect()
    }

    /// Removes the folder: its chunks are of no use any more.
    pub fn discard(mut self) {
        self.keep = false;
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let kept = self.keep && self.digest.is_some();
        if !(self.placed || kept) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The sizes of a result's parts: its output record, then each artifact.
fn part_sizes(manifest: &ResultManifest) -> Vec<u64> {
    std::iter::once(manifest.output_bytes)
        .chain(manifest.artifacts.iter().map(|a| a.bytes))
        .collect()
}

/// A part resumed after its first `chunks` chunks: its digest from the
/// states `recorded` after them, or `start` (the part from its start) when
/// they do not hold that many or do not parse.
fn resumed_after(start: Progress, recorded: &[u8], chunks: u64) -> Progress {
    let (blake3, bytes) = start.digest.kind();
    match PartDigester::resume(blake3, bytes, recorded, chunks) {
        Some(digest) => Progress { chunks, digest },
        None => start,
    }
}

/// The entry of [`PROGRESS`] for chunk `index` of `part`, whose digest
/// state after it is `state`.
fn progress_entry(part: usize, index: u64, state: &[u8]) -> [u8; ENTRY_LEN] {
    let mut entry = [0u8; ENTRY_LEN];
    entry[..4].copy_from_slice(&(part as u32).to_le_bytes());
    entry[4..12].copy_from_slice(&index.to_le_bytes());
    entry[12..].copy_from_slice(state);
    entry
}

/// Each of `parts` parts' states, in chunk order from its first chunk, as
/// the progress record `recorded` holds them. An entry for a chunk already
/// recorded replaces it and those after it; one past the next chunk, of
/// no such part, or torn at the end is left out. The states are this
/// receiver's word only: [`KeptCheck`] checks them against the bytes.
fn parse_progress(recorded: &[u8], parts: usize) -> Vec<Vec<u8>> {
    let mut states = vec![Vec::new(); parts];
    for entry in recorded.chunks_exact(ENTRY_LEN) {
        let part = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes")) as usize;
        let index = u64::from_le_bytes(entry[4..12].try_into().expect("8 bytes"));
        let Some(part) = states.get_mut(part) else {
            continue;
        };
        let Some(at) = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(STATE_LEN))
            .filter(|at| *at <= part.len())
        else {
            continue;
        };
        part.truncate(at);
        part.extend_from_slice(&entry[12..]);
    }
    states
}

/// The check of the chunks a partial kept ([`Receiving::kept_check`]): each
/// is read back and hashed, and the part's digest state after it must be
/// the one recorded when it arrived. Owned, so that it runs on a thread of
/// its own while the rest of the transfer arrives; it reads only the kept
/// chunks, which the rest never touches.
#[derive(Debug)]
pub struct KeptCheck {
    parts: Vec<KeptPart>,
}

#[derive(Debug)]
struct KeptPart {
    path: PathBuf,
    /// Whether the part is checked by BLAKE3 (else sha256).
    blake3: bool,
    /// The states recorded after each chunk kept.
    recorded: Vec<u8>,
    bytes: u64,
    /// The chunks kept: the rest was asked from the one after them.
    chunks: u64,
}

impl KeptCheck {
    /// Returns each part whose kept chunks do not all hold, with how many
    /// of them do (those before the first that does not); empty when every
    /// one holds.
    pub fn run(self) -> Result<Vec<(usize, u64)>, StoreError> {
        use std::io::Read;
        let mut damaged = Vec::new();
        let mut buf = vec![0u8; wire::CHUNK_BYTES as usize];
        for (i, part) in self.parts.iter().enumerate() {
            if part.chunks == 0 {
                continue;
            }
            let recorded = &part.recorded;
            let mut digest = PartDigester::new(part.blake3, part.bytes);
            let mut file = open_stored(&part.path).map_err(io_err(&part.path))?;
            let mut good = 0;
            while good < part.chunks {
                let chunk = &mut buf[..wire::chunk_len(part.bytes, good) as usize];
                if file.read_exact(chunk).is_err() {
                    break;
                }
                let state = digest.chunk(good, &[&*chunk]);
                let at = good as usize * STATE_LEN;
                if recorded.get(at..at + STATE_LEN) != Some(state.as_slice()) {
                    break;
                }
                good += 1;
            }
            if good < part.chunks {
                damaged.push((i, good));
            }
        }
        Ok(damaged)
    }
}

/// The manifest a partial folder holds, if it parses and checks (the
/// folder is untrusted input like the rest of the store).
fn read_partial_manifest(dir: &Path) -> Option<ResultManifest> {
    let text = read_stored(&dir.join("manifest.json"), wire::MAX_FRAME).ok()?;
    let m: ResultManifest = serde_json::from_slice(&text).ok()?;
    m.check().ok()?;
    m.check_sizes().ok()?;
    Some(m)
}

/// Why a chunk was not written.
#[derive(Debug, Error)]
pub enum ChunkRefused {
    #[error("chunk {index} is past the part's end")]
    PastEnd { index: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Writes one part of a [`Receiving`] chunk by chunk from where its
/// partial ends: each chunk goes into the part's digest (BLAKE3 or sha256,
/// [`crate::part_digest`]) and is written, and the digest's state after
/// it is recorded beside it.
///
/// The sha256 a holder sends with each chunk is not checked here: it is
/// the holder's word, not the producer's seal, so matching it proves
/// nothing the part's digest does not prove at the end, and checking it
/// would hash every byte twice (a fifth of a receiver's CPU). The recorded
/// states are this receiver's own: they let a fetch that resumes a cut
/// transfer go on hashing from where it stopped, and check the chunks kept
/// on disk against them at the same time ([`KeptCheck`]).
#[derive(Debug)]
pub struct PartWriter {
    part: usize,
    bytes: u64,
    path: PathBuf,
    file: fs::File,
    record_path: PathBuf,
    /// The partial's progress record, appended to.
    record: fs::File,
    progress: Progress,
    content: Option<PartHasher>,
    /// The syncs started while the part is written, one at a time, each
    /// once [`SYNC_STEP`] more of it is written: their bytes reach the
    /// disk while the rest arrives, and the part's last sync has at most
    /// a step's left to write. A transfer cut after them keeps the chunks
    /// they covered on the disk.
    early: Syncs,
    /// How far into the part the last of them went.
    synced_to: u64,
}

/// How much of a large part is written between the syncs started while
/// it is written ([`PartWriter`]). Without them, a 1 GiB part was all
/// written to the disk by its one sync once whole, after its last byte
/// had arrived.
const SYNC_STEP: u64 = 64 << 20;

impl PartWriter {
    /// The next chunk's index.
    pub fn next_chunk(&self) -> u64 {
        self.progress.chunks
    }

    /// Whether every chunk of the part is written.
    pub fn whole(&self) -> bool {
        self.progress.chunks >= wire::chunk_count(self.bytes)
    }

    /// Keeps `bytes` as the next chunk.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<(), ChunkRefused> {
        self.write_pieces(&[bytes])
    }

    /// [`PartWriter::write_chunk`] of a chunk whose bytes are `pieces`, in
    /// order (as a stream received them), written by vectored writes
    /// ([`write_in_steps`]).
    pub fn write_pieces(&mut self, pieces: &[&[u8]]) -> Result<(), ChunkRefused> {
        let index = self.progress.chunks;
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        if self.whole() || len as u64 != wire::chunk_len(self.bytes, index) {
            return Err(ChunkRefused::PastEnd { index });
        }
        let state = self.progress.digest.chunk(index, pieces);
        if let Some(c) = &mut self.content {
            for piece in pieces {
                c.update(piece);
            }
        }
        write_in_steps(&mut self.file, pieces).map_err(io_err(&self.path))?;
        let entry = progress_entry(self.part, index, &state);
        self.record
            .write_all(&entry)
            .map_err(io_err(&self.record_path))?;
        self.progress.chunks += 1;
        let written = (index * wire::CHUNK_BYTES).saturating_add(len as u64);
        if written - self.synced_to >= SYNC_STEP && !self.whole() && self.early.all_done() {
            let file = self.file.try_clone().map_err(io_err(&self.path))?;
            self.early.start(file, self.path.clone())?;
            self.synced_to = written;
        }
        Ok(())
    }
}

/// Reserves the blocks of `len` bytes of `file` from `at` before they are
/// written, leaving its size as it is (`fallocate` with
/// `FALLOC_FL_KEEP_SIZE`): the file system allocates them at once rather
/// than page by page as they are written (20 files of 1 MiB written or
/// copied in 1.1–1.3 ms less on ext4 here, about a fifth), and a full disk
/// is found before a byte is written. A file system that cannot reserve
/// (no `fallocate`) is written as before; only a full disk or quota is an
/// error.
pub fn reserve(file: &fs::File, at: u64, len: u64) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{FallocateFlags, fallocate};
    let (Ok(at), Ok(len @ 1..)) = (i64::try_from(at), i64::try_from(len)) else {
        return Ok(());
    };
    match fallocate(file, FallocateFlags::FALLOC_FL_KEEP_SIZE, at, len) {
        Err(e @ (Errno::ENOSPC | Errno::EDQUOT)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// The most bytes given to the kernel in one write to a file here. A
/// larger write has the page cache allocate a large folio for it, and
/// where free memory is fragmented (a page cache filling the RAM, the
/// usual state of a developer's machine) each such allocation may stall
/// in direct compaction: writing ten 20 MiB files by 1 MiB writes stalled
/// 55 times and took 13 ms a file here, by 32 KiB writes never and 8 ms.
/// 256 KiB (the size restores were already written in, with no stall)
/// costs the file system less per byte than 32 KiB: 20 files of 1 MiB
/// took 5.1 ms against 7.0 ms, and 4.1 ms against 5.7 ms with their
/// blocks reserved first ([`reserve`]; medians of 8, `shabench` scratch
/// program, not kept).
pub const WRITE_STEP: usize = 256 << 10;

/// Writes `pieces` in order to `file`, by vectored writes of at most
/// [`WRITE_STEP`] bytes.
pub fn write_in_steps(file: &mut fs::File, pieces: &[&[u8]]) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut steps: Vec<IoSlice> = Vec::new();
    let mut batch = 0;
    let mut flush = |steps: &mut Vec<IoSlice>| -> std::io::Result<()> {
        let mut left = &mut steps[..];
        while !left.is_empty() {
            match file.write_vectored(left)? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => IoSlice::advance_slices(&mut left, n),
            }
        }
        steps.clear();
        Ok(())
    };
    for piece in pieces {
        for part in piece.chunks(WRITE_STEP) {
            if batch + part.len() > WRITE_STEP {
                flush(&mut steps)?;
                batch = 0;
            }
            steps.push(IoSlice::new(part));
            batch += part.len();
        }
    }
    flush(&mut steps)
}

impl Receiving {
    /// The staging folder.
    pub fn path(&self) -> &Path {
        &self.partial.dir
    }

    /// The chunk each part starts at: where the partial ends.
    pub fn from(&self) -> Vec<u64> {
        self.partial.from()
    }

    /// The result being received, as its header gave it.
    pub fn sealed(&self) -> &Sealed {
        &self.sealed
    }

    /// The check of the chunks kept from a cut transfer, to run while the
    /// rest arrives and to pass before [`Receiving::commit`]; `None` when
    /// none were kept.
    pub fn kept_check(&self) -> Option<KeptCheck> {
        self.partial.kept_check()
    }

    /// Cuts the parts whose kept chunks did not all hold back to those
    /// that did (file, record and progress) and keeps the folder, for the
    /// next fetch to ask from there.
    pub fn cut_back(&mut self, damaged: &[(usize, u64)]) -> Result<(), StoreError> {
        self.partial.keep = true;
        self.partial.cut_back(damaged)
    }

    /// The bytes the partial held when this receive started.
    pub fn resumed_bytes(&self) -> u64 {
        let all = self
            .sealed
            .bytes_from(&vec![0; self.partial.progress.len()]);
        all - self.sealed.bytes_from(&self.partial.from())
    }

    /// Keeps the partial folder when this is dropped uncommitted: the
    /// transfer was cut, and what was checked serves the next fetch.
    pub fn keep(&mut self) {
        self.partial.keep = true;
    }

    /// Opens part `i` (0 the output record, then each artifact) where its
    /// partial ends.
    pub fn part(&mut self, i: usize) -> Result<PartWriter, StoreError> {
        let parts = self.sealed.parts();
        let bytes = parts[i].1;
        let path = self.partial.part_path(i);
        // Not through a symlink put in a kept partial.
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err(&path))?;
        let progress = self.partial.progress[i].clone();
        let at = progress.chunks.saturating_mul(wire::CHUNK_BYTES).min(bytes);
        file.set_len(at).map_err(io_err(&path))?;
        reserve(&file, at, bytes - at).map_err(io_err(&path))?;
        use std::io::Seek;
        (&file)
            .seek(std::io::SeekFrom::Start(at))
            .map_err(io_err(&path))?;
        let record_path = self.partial.dir.join(PROGRESS);
        let record = self.record.try_clone().map_err(io_err(&record_path))?;
        // A part checked by BLAKE3 is tagged by the digest of that check;
        // one checked by sha256 is hashed for its tag beside, from its
        // start only.
        let content = match (progress.chunks, progress.digest.kind()) {
            (0, (false, _)) => self.tag_key.as_ref().map(|_| Content::hasher()),
            _ => None,
        };
        Ok(PartWriter {
            part: i,
            bytes,
            path,
            file,
            record_path,
            record,
            progress,
            content,
            early: Syncs::default(),
            synced_to: at,
        })
    }

    /// Part `writer` is whole: returns its digest (over every byte in its
    /// file, for the caller to check against the manifest) and starts its
    /// sync.
    pub fn part_done(&mut self, writer: PartWriter) -> Result<PartDigest, StoreError> {
        let PartWriter {
            part,
            path,
            file,
            progress,
            content,
            mut early,
            ..
        } = writer;
        // The commit waits for them with the rest.
        self.syncs.adopt(&mut early);
        self.partial.progress[part] = progress.clone();
        let found = progress.digest.finish();
        self.contents[part] = match &found {
            // Only the manifest's own digest is tagged: a part that does
            // not match is refused by the caller and never committed, but
            // its tag would not vouch for it even so.
            PartDigest::Blake3(digest) => (self.tag_key.is_some()
                && part_blake3(&self.sealed.manifest, part) == Some(*digest))
            .then(|| Content::of(digest)),
            PartDigest::Sha256(_) => content.as_ref().map(PartHasher::finish),
        };
        let synced = file.try_clone().map_err(io_err(&path))?;
        self.syncs.start(synced, path)?;
        if part > 0 {
            let i = part - 1;
            if self.files.len() <= i {
                self.files.resize_with(i + 1, || None);
            }
            self.files[i] = Some(file);
        }
        Ok(found)
    }

    /// Writes part `i` whole from `bytes`, cut into chunks here (for tests
    /// and for a store filling another); returns its digest.
    pub fn put_part(&mut self, i: usize, bytes: &[u8]) -> Result<PartDigest, ChunkRefused> {
        let mut w = self.part(i)?;
        let from = (w.next_chunk() * wire::CHUNK_BYTES) as usize;
        for chunk in bytes[from.min(bytes.len())..].chunks(wire::CHUNK_BYTES as usize) {
            w.write_chunk(chunk)?;
        }
        Ok(self.part_done(w)?)
    }

    /// Commits the received result: waits until every staged file is
    /// synced, then places it ([`Store::place`]: the blobs into `blobs/`, a
    /// blob already there kept, the result into `results/`, each folder
    /// synced). Only call this once every part was checked.
    pub fn commit(mut self) -> Result<StoredResult, StoreError> {
        self.syncs.wait()?;
        let progress = self.partial.dir.join(PROGRESS);
        match fs::remove_file(&progress) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err(&progress)(e));
            }
            _ => {}
        }
        if let Some(key) = &self.tag_key {
            write_tags(
                &self.partial.dir,
                key,
                &self.sealed.manifest,
                &self.contents,
            );
        }
        let mut verified = BTreeMap::new();
        let mut blobs = Vec::new();
        let mut files = std::mem::take(&mut self.files);
        for (i, a) in self.sealed.manifest.artifacts.iter().enumerate() {
            let staged = self.partial.part_path(i + 1);
            let file = match files.get_mut(i).and_then(Option::take) {
                Some(f) => f,
                None => fs::File::open(&staged).map_err(io_err(&staged))?,
            };
            if verified.contains_key(&a.sha256) {
                // The same content again: the first staged copy is its blob.
                fs::remove_file(&staged).map_err(io_err(&staged))?;
                continue;
            }
            verified.insert(a.sha256, file);
            blobs.push((a.sha256, staged));
        }
        let Receiving {
            store,
            partial,
            sealed,
            ..
        } = self;
        let mut stored = store.place(partial, sealed.manifest, Some(sealed.seal), blobs)?;
        stored.verified = Some(Arc::new(VerifiedBlobs(verified)));
        Ok(stored)
    }
}

/// A staging folder a result is placed from.
trait Staged {
    fn path(&self) -> &Path;
    /// Leaves the folder to the caller, who renames it.
    fn keep(self) -> PathBuf;
}

impl Staged for WorkDir {
    fn path(&self) -> &Path {
        WorkDir::path(self)
    }
    fn keep(self) -> PathBuf {
        WorkDir::keep(self)
    }
}

impl Staged for Partial {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn keep(mut self) -> PathBuf {
        self.placed = true;
        self.dir.clone()
    }
}

/// Files being synced in the background, one thread each: their syncs
/// overlap with what comes next, and with each other (the file system
/// commits them together).
#[derive(Debug, Default)]
struct Syncs(Vec<(PathBuf, std::thread::JoinHandle<std::io::Result<()>>)>);

impl Syncs {
    fn start(&mut self, file: fs::File, path: PathBuf) -> Result<(), StoreError> {
        let handle = std::thread::Builder::new()
            .name("reprise-sync".into())
            .spawn(move || file.sync_all())
            .map_err(io_err(&path))?;
        self.0.push((path, handle));
        Ok(())
    }

    /// Takes over the syncs `other` started, to wait for them with these.
    fn adopt(&mut self, other: &mut Syncs) {
        self.0.append(&mut other.0);
    }

    /// Whether every sync started has ended.
    fn all_done(&self) -> bool {
        self.0.iter().all(|(_, handle)| handle.is_finished())
    }

    /// Waits for every sync; the first failure is the error.
    fn wait(&mut self) -> Result<(), StoreError> {
        let mut first = Ok(());
        for (path, handle) in self.0.drain(..) {
            let done = handle
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread panicked")));
            if let (Err(e), Ok(())) = (done, &first) {
                first = Err(io_err(&path)(e));
            }
        }
        first
    }
}

impl Drop for Syncs {
    fn drop(&mut self) {
        // Never leave a sync running on a folder about to be removed
        // unwaited: the staging folder goes when its WorkDir drops.
        let _ = self.wait();
    }
}

fn list_dir(dir: &Path) -> Vec<StoredResult> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<StoredResult> = entries.flatten().filter_map(|e| load(&e.path())).collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.manifest.created_at));
    out
}

/// Reads a stored result, or `None` if anything about it does not hold: a
/// manifest that does not parse or check, a folder name that is not its
/// key, a seal file that does not parse.
fn load(dir: &Path) -> Option<StoredResult> {
    let text = read_stored(&dir.join("manifest.json"), wire::MAX_FRAME).ok()?;
    let manifest: ResultManifest = serde_json::from_slice(&text).ok()?;
    manifest.check().ok()?;
    let name = dir.file_name()?.to_str()?;
    let named_key = name.split('-').next()?.parse::<RunKey>().ok()?;
    if named_key != manifest.key {
        return None;
    }
    let seal = match read_stored(&dir.join("seal.json"), wire::MAX_FRAME) {
        Ok(text) => Some(serde_json::from_slice(&text).ok()?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(_) => return None,
    };
    Some(StoredResult {
        dir: dir.to_path_buf(),
        manifest,
        seal,
        verified: None,
    })
}

/// The files a run's artifacts folder `dir` holds, as artifact paths,
/// sorted: what a commit stores ([`walk_files`]).
pub fn artifact_files(dir: &Path) -> Result<Vec<ArtifactPath>, StoreError> {
    let mut files = Vec::new();
    walk_files(dir, dir, &mut files)?;
    files.sort();
    Ok(files)
}

/// The regular files under `root`, as artifact paths. Symlinks and other
/// special files are not artifacts and are skipped; a name that cannot be
/// an artifact path (not UTF-8) is an error rather than a silently renamed
/// file.
fn walk_files(root: &Path, dir: &Path, out: &mut Vec<ArtifactPath>) -> Result<(), StoreError> {
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let path = e.path();
        let t = e.file_type().map_err(io_err(&path))?;
        if t.is_dir() {
            walk_files(root, &path, out)?;
        } else if t.is_file() {
            let rel = path.strip_prefix(root).expect("under root");
            let parsed = rel
                .to_str()
                .ok_or_else(|| "the name is not UTF-8".to_string())
                .and_then(|r| r.parse::<ArtifactPath>().map_err(|e| e.to_string()));
            match parsed {
                Ok(p) => out.push(p),
                Err(reason) => return Err(StoreError::BadArtifactFile { path, reason }),
            }
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Copies `from` into a new file at `path`, synced; returns what it
/// found of the bytes.
fn copy_synced(from: &mut dyn std::io::Read, path: &Path) -> Result<Hashed, StoreError> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    let hashed = hash_reading(from, 64 * 1024, |piece| f.write_all(piece));
    let hashed = hashed.map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(hashed)
}

/// Creates the file `path` anew in a folder of the store that may hold
/// anything (a partial kept from an earlier fetch, a quarantined result):
/// whatever is at `path` is removed first, and the file is created only
/// if nothing is there then (`O_EXCL`, which never follows a symlink), so
/// a symlink planted there is never written through.
pub(crate) fn create_anew(path: &Path) -> std::io::Result<fs::File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// Opens a file of the store to read, as untrusted input: never through a
/// symlink, without waiting (a FIFO put in its place would block the open
/// for good, and the replay or the daemon's serving with it), and only a
/// regular file (a device such as `/dev/zero` would never end).
/// Anything else in a stored file's place is refused as [`NotAStoredFile`].
pub(crate) fn open_stored(path: &Path) -> std::io::Result<fs::File> {
    let not_stored = || std::io::Error::new(std::io::ErrorKind::InvalidData, NotAStoredFile);
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // The last component is a symlink (O_NOFOLLOW).
            Some(nix::libc::ELOOP) => not_stored(),
            _ => e,
        })?;
    if !file.metadata()?.is_file() {
        return Err(not_stored());
    }
    Ok(file)
}

/// What [`open_stored`] found in a stored file's place: a symlink, a
/// FIFO, a device or a folder. The store's copy is damaged, as when the
/// file is missing, and is treated so (a replay quarantines its result).
#[derive(Debug, Error)]
#[error("not a regular file (a symlink, FIFO, device or folder in a stored file's place)")]
pub struct NotAStoredFile;

/// Whether `e` is [`open_stored`] finding no stored file: nothing there,
/// or something that is not a regular file.
pub(crate) fn is_missing_stored_file(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || e.get_ref()
            .is_some_and(|inner| inner.is::<NotAStoredFile>())
}

/// The sha256 of a file of the store ([`open_stored`]: a FIFO, a device
/// or a symlink in its place has none), or `None` if it cannot be read or
/// is longer than any artifact may be (then it is not read).
fn stored_sha256(path: &Path) -> Option<Sha256Digest> {
    stored_sha256_sized(path, |len| len <= MAX_ARTIFACT_BYTES)
        .ok()
        .flatten()
}

/// Whether the file of the store at `path` ([`open_stored`]) holds `bytes`
/// bytes whose sha256 is `sha256`. A file of another size is not read.
pub(crate) fn stored_file_holds(
    path: &Path,
    bytes: u64,
    sha256: &Sha256Digest,
) -> std::io::Result<bool> {
    Ok(stored_sha256_sized(path, |len| len == bytes)? == Some(*sha256))
}

/// The sha256 of the file of the store at `path` ([`open_stored`]) when
/// its size passes `size_ok`; `None`, unread, when it does not. What is
/// read stops a byte past that size: a file grown meanwhile is not read
/// whole (and hashes to something else).
fn stored_sha256_sized(
    path: &Path,
    size_ok: impl FnOnce(u64) -> bool,
) -> std::io::Result<Option<Sha256Digest>> {
    use std::io::Read;
    let file = open_stored(path)?;
    let len = file.metadata()?.len();
    if !size_ok(len) {
        return Ok(None);
    }
    let mut bounded = file.take(len.saturating_add(1));
    crate::image::sha256_reading(&mut bounded).map(Some)
}

/// Whether the blob filed as `blob` under `sha` stays, rather than being
/// replaced by `staged`, a copy of a part known by that sha256 that was
/// checked on its way in (by sha256, or by the BLAKE3 digest a version 3
/// manifest seals beside it). Yes when it is the same file or holds the
/// same bytes; no when there is none or it cannot be read as a stored
/// file. When the bytes differ, one of the two is not what its name
/// says: a damaged blob, or one a lying producer's result had filed (a
/// receiver of a version 3 result checks its bytes by BLAKE3 and never
/// computes their sha256, so a producer sealing a sha256 that is not its
/// bytes' gets them filed under it). The filed blob then stays only if
/// its own sha256 is `sha`: neither a lie filed first nor one arriving
/// after takes the place of the true bytes, and a replay checks every
/// byte against its own result's digests whatever is filed.
fn keeps_filed(blob: &Path, staged: &Path, sha: &Sha256Digest) -> bool {
    match same_files(blob, staged) {
        Ok(true) => true,
        Ok(false) => stored_sha256(blob) == Some(*sha),
        Err(_) => false,
    }
}

/// Whether the stored file `filed` ([`open_stored`]) and the file `other`
/// are the same file or hold the same bytes; an error when `filed` cannot
/// be read as a stored file (`other` is one this store wrote or hashed).
fn same_files(filed: &Path, other: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut a = open_stored(filed)?;
    let mut b = fs::File::open(other)?;
    let (ma, mb) = (a.metadata()?, b.metadata()?);
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        return Ok(true);
    }
    if ma.len() != mb.len() {
        return Ok(false);
    }
    // Of one size, so both are read in the same steps to their end.
    const STEP: u64 = 256 << 10;
    let (mut x, mut y) = (vec![0u8; STEP as usize], vec![0u8; STEP as usize]);
    let mut left = ma.len();
    while left > 0 {
        let n = left.min(STEP) as usize;
        a.read_exact(&mut x[..n])?;
        b.read_exact(&mut y[..n])?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// Reads a file of the store ([`open_stored`]) whole, if it holds at most
/// `limit` bytes.
pub(crate) fn read_stored(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut text = Vec::new();
    open_stored(path)?
        .take(limit as u64 + 1)
        .read_to_end(&mut text)?;
    if text.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(text)
}

/// What the file at `path` hashes to ([`Hashed`]), from one read.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<Hashed> {
    let mut f = fs::File::open(path)?;
    hash_reading(&mut f, 1 << 20, |_| Ok(()))
}

/// What [`hash_reading`] found of some bytes: the digests a manifest gives
/// of them and their size.
#[derive(Debug)]
pub(crate) struct Hashed {
    pub sha256: Sha256Digest,
    pub blake3: Blake3Digest,
    pub bytes: u64,
}

/// Reads `from` to its end through a buffer of `buffer` bytes, each piece
/// hashed and then given to `each`.
fn hash_reading(
    from: &mut dyn std::io::Read,
    buffer: usize,
    mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<Hashed> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut blake3 = blake3::Hasher::new();
    let mut buf = vec![0u8; buffer];
    let mut bytes = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha.update(&buf[..n]);
        blake3.update(&buf[..n]);
        each(&buf[..n])?;
        bytes += n as u64;
    }
    Ok(Hashed {
        sha256: Sha256Digest::finish(sha),
        blake3: Blake3Digest::from_bytes(*blake3.finalize().as_bytes()),
        bytes,
    })
}

/// The BLAKE3 digest `manifest` gives part `i` (0 the output record, then
/// each artifact), if it gives one.
fn part_blake3(manifest: &ResultManifest, i: usize) -> Option<Blake3Digest> {
    match i {
        0 => manifest.output_blake3,
        _ => manifest.artifacts.get(i - 1)?.blake3,
    }
}

/// Writes the tags of a result's parts, `contents` their BLAKE3s
/// (the output record's first), into its staging folder `dir`. A failure
/// is logged and costs only speed: a result without tags is checked
/// against its sha256s.
fn write_tags(dir: &Path, key: &TagKey, manifest: &ResultManifest, contents: &[Option<Content>]) {
    let sizes = std::iter::once((manifest.output_sha256, manifest.output_bytes))
        .chain(manifest.artifacts.iter().map(|a| (a.sha256, a.bytes)));
    let tags: Vec<_> = sizes
        .zip(contents.iter().chain(std::iter::repeat(&None)))
        .map(|((sha, bytes), content)| content.as_ref().map(|c| key.tag(&sha, bytes, c)))
        .collect();
    if let Err(e) = crate::tags::write(dir, &tags) {
        tracing::debug!(dir = %dir.display(), "writing the result's tags: {e}");
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir))
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use reprise_protocol::manifest::{Phase, Producer};

    pub(crate) fn manifest(inputs: KeyInputs, outcome: Outcome, created_at: u64) -> ResultManifest {
        ResultManifest {
            version: MANIFEST_VERSION,
            key: inputs.key(),
            inputs,
            commit: "c".into(),
            outcome,
            exit_code: if outcome == Outcome::Passed { 0 } else { 1 },
            phases: vec![Phase {
                name: "test".into(),
                ms: 5,
            }],
            total_ms: 5,
            accel: "tcg".into(),
            tool_version: "0".into(),
            producer: Producer {
                host: "h".into(),
                user: "u".into(),
            },
            created_at,
            snapshot: reprise_protocol::manifest::Snapshot::Fresh,
            output_sha256: Sha256Digest::of(b""),
            output_blake3: None,
            output_bytes: 0,
            artifacts: vec![],
            crontab: None,
            container_image: None,
        }
    }

    pub(crate) fn inputs(tree: &str) -> KeyInputs {
        KeyInputs {
            version: reprise_protocol::key::KEY_VERSION,
            namespace: "ns".into(),
            tree: tree.into(),
            target: "test".into(),
            env: Default::default(),
            image_digest: "img".into(),
            driver: "qemu".into(),
            network: false,
        }
    }

    #[test]
    fn commit_then_lookup_hits_and_misses_explain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let arts = dir.path().join("arts");
        fs::create_dir_all(arts.join("sub")).unwrap();
        fs::write(arts.join("sub/r.txt"), "report").unwrap();
        let stored = store
            .commit(
                manifest(inputs("t1"), Outcome::Passed, 10),
                b"rec",
                Some(&arts),
                None,
            )
            .unwrap();
        assert_eq!(stored.manifest.artifacts.len(), 1);
        assert_eq!(stored.manifest.artifacts[0].path.as_str(), "sub/r.txt");
        assert_eq!(
            fs::read(store.blob_path(&stored.manifest.artifacts[0])).unwrap(),
            b"report"
        );
        assert!(matches!(store.lookup(&inputs("t1")), Lookup::Hit(_)));
        match store.lookup(&inputs("t2")) {
            Lookup::Miss {
                nearest: Some((_, diff)),
            } => {
                assert_eq!(diff.len(), 1);
                assert_eq!(diff[0].0, "tree");
            }
            other => panic!("expected a miss with a nearest result, got {other:?}"),
        }
        // Committing the same key again replaces the result whole.
        store
            .commit(
                manifest(inputs("t1"), Outcome::Passed, 11),
                b"rec2",
                None,
                None,
            )
            .unwrap();
        let again = store.get(&inputs("t1").key()).unwrap();
        assert_eq!(again.manifest.created_at, 11);
        assert_eq!(fs::read(again.output_path()).unwrap(), b"rec2");
    }

    fn sealed_with(artifacts: &[(&str, &[u8])], record: &[u8]) -> Sealed {
        sealed_by(artifacts, record, true)
    }

    /// A result of `artifacts` and `record`, its manifest giving their
    /// BLAKE3 digests if `blake3` (as producers make them), else their
    /// sha256 only (as producers made them before).
    fn sealed_by(artifacts: &[(&str, &[u8])], record: &[u8], blake3: bool) -> Sealed {
        use reprise_protocol::seal::{SEAL_VERSION, Seal};
        let b3 = |bytes: &[u8]| {
            blake3.then(|| Blake3Digest::from_bytes(*::blake3::hash(bytes).as_bytes()))
        };
        let mut m = manifest(inputs("r1"), Outcome::Passed, 10);
        m.output_sha256 = Sha256Digest::of(record);
        m.output_blake3 = b3(record);
        m.output_bytes = record.len() as u64;
        m.artifacts = artifacts
            .iter()
            .map(|(path, bytes)| Artifact {
                path: path.parse().unwrap(),
                sha256: Sha256Digest::of(bytes),
                blake3: b3(bytes),
                bytes: bytes.len() as u64,
                mode: 0o644,
            })
            .collect();
        Sealed {
            manifest: m,
            seal: Seal {
                version: SEAL_VERSION,
                signature: "00".into(),
                producer_cert: "not checked by the store".into(),
            },
        }
    }

    /// What part `i` of `sealed`, `bytes`, hashes to by the function its
    /// manifest checks it by.
    fn digest_of(sealed: &Sealed, i: usize, bytes: &[u8]) -> PartDigest {
        match sealed.manifest.blake3() {
            Some(b3) => {
                assert_eq!(b3[i].as_bytes(), ::blake3::hash(bytes).as_bytes());
                PartDigest::Blake3(b3[i])
            }
            None => PartDigest::Sha256(Sha256Digest::of(bytes)),
        }
    }

    /// Writes a result through a [`Receiving`] as a fetch does.
    fn receive(store: &Store, sealed: &Sealed, record: &[u8], artifacts: &[&[u8]]) -> Receiving {
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        assert_eq!(
            incoming.put_part(0, record).unwrap(),
            digest_of(sealed, 0, record)
        );
        for (i, bytes) in artifacts.iter().enumerate() {
            incoming.put_part(i + 1, bytes).unwrap();
        }
        incoming
    }

    #[test]
    fn a_received_result_is_committed_whole_with_its_blobs_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        // Two artifacts of the same content share one blob.
        let arts: [(&str, &[u8]); 3] = [("a.txt", b"same"), ("b/c.bin", b"other"), ("d", b"same")];
        let sealed = sealed_with(&arts, b"rec");
        let bytes: Vec<&[u8]> = arts.iter().map(|a| a.1).collect();
        let stored = receive(&store, &sealed, b"rec", &bytes).commit().unwrap();
        assert_eq!(stored.manifest, sealed.manifest);
        assert_eq!(stored.seal.as_ref(), Some(&sealed.seal));
        assert_eq!(fs::read(stored.output_path()).unwrap(), b"rec");
        for a in &stored.manifest.artifacts {
            assert!(stored.verified_blob(&a.sha256).is_some(), "{}", a.path);
        }
        assert_eq!(
            fs::read_dir(dir.path().join("store/blobs"))
                .unwrap()
                .count(),
            2
        );
        assert_eq!(
            fs::read(store.blob_path(&stored.manifest.artifacts[2])).unwrap(),
            b"same"
        );
        // Read back from disk, it is the same result, and nothing says it
        // was checked: a replay hashes its blobs again.
        let got = store
            .get(&sealed.manifest.key)
            .expect("stored under its key");
        assert_eq!(got.manifest, sealed.manifest);
        assert!(
            got.verified_blob(&sealed.manifest.artifacts[0].sha256)
                .is_none()
        );
        // Nothing is left staged.
        assert_eq!(
            fs::read_dir(dir.path().join("store/tmp")).unwrap().count(),
            0
        );
        assert!(
            !stored.dir.join("blobs").exists(),
            "the staged blobs' folder does not stay in the result"
        );
    }

    /// A result of one artifact, `out.bin`, of `bytes`, under a key of
    /// its own (`name`), as an honest producer seals it.
    fn sealed_named(name: &str, bytes: &[u8]) -> Sealed {
        let mut sealed = sealed_with(&[("out.bin", bytes)], b"rec");
        sealed.manifest.inputs = inputs(name);
        sealed.manifest.key = sealed.manifest.inputs.key();
        sealed
    }

    /// A lying producer's result: its manifest names the sha256 of `truth`
    /// for the bytes of `lie` (their BLAKE3 digest and size are the lie's
    /// own, which is all a receiver of a version 3 result checks).
    fn lying_about(truth: &[u8], lie: &[u8]) -> Sealed {
        let mut sealed = sealed_named("liar", lie);
        sealed.manifest.artifacts[0].sha256 = Sha256Digest::of(truth);
        sealed
    }

    /// Restores the result of `key` as read back from disk (no blob
    /// known checked, its tags if any) into a fresh folder; its artifact.
    fn replayed_from_disk(
        store: &Store,
        key: &RunKey,
    ) -> Result<Vec<u8>, crate::replay::ReplayError> {
        let got = store.get(key).expect("stored");
        let dest = tempfile::tempdir().unwrap();
        crate::replay::restore_artifacts(store, &got, store.tags(&got).as_ref(), dest.path())?;
        Ok(fs::read(dest.path().join("out.bin")).unwrap())
    }

    #[test]
    fn bytes_a_liar_filed_under_another_contents_sha256_give_way_to_that_content() {
        // The attack: a producer seals a sha256 that is not its bytes'. A
        // receiver checks them by the sealed BLAKE3 digest, so they are
        // filed under that sha256. Every result of the true bytes after
        // it, fetched or made here, shared that blob and was refused on
        // every replay from disk, and a producer served the lie in its
        // own result's name to its peers, who took it for damage.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let (truth, lie) = (data(3000, 1), data(3000, 2));
        let liar = lying_about(&truth, &lie);
        receive(&store, &liar, b"rec", &[&lie]).commit().unwrap();
        let filed = store.blob_path(&liar.manifest.artifacts[0]);
        assert_eq!(fs::read(&filed).unwrap(), lie, "filed as the liar said");

        let honest = sealed_named("honest", &truth);
        receive(&store, &honest, b"rec", &[&truth])
            .commit()
            .unwrap();
        assert_eq!(fs::read(&filed).unwrap(), truth);
        assert_eq!(
            replayed_from_disk(&store, &honest.manifest.key).unwrap(),
            truth
        );

        // The same when this store's own run makes the true bytes.
        fs::write(&filed, &lie).unwrap();
        let arts = dir.path().join("arts");
        fs::create_dir_all(&arts).unwrap();
        fs::write(arts.join("out.bin"), &truth).unwrap();
        let made = store
            .commit(
                manifest(inputs("made"), Outcome::Passed, 11),
                b"",
                Some(&arts),
                None,
            )
            .unwrap();
        assert_eq!(fs::read(&filed).unwrap(), truth);
        assert_eq!(
            replayed_from_disk(&store, &made.manifest.key).unwrap(),
            truth
        );
        // Both results still share the one blob.
        assert_eq!(
            fs::read_dir(dir.path().join("store/blobs"))
                .unwrap()
                .count(),
            1
        );
    }

    #[test]
    fn a_lie_arriving_after_the_true_bytes_does_not_displace_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let (truth, lie) = (data(3000, 1), data(2000, 2));
        let honest = sealed_named("honest", &truth);
        receive(&store, &honest, b"rec", &[&truth])
            .commit()
            .unwrap();
        let liar = lying_about(&truth, &lie);
        receive(&store, &liar, b"rec", &[&lie]).commit().unwrap();
        assert_eq!(
            fs::read(store.blob_path(&honest.manifest.artifacts[0])).unwrap(),
            truth
        );
        assert_eq!(
            replayed_from_disk(&store, &honest.manifest.key).unwrap(),
            truth
        );
        // The liar's result names bytes of another size: never replayed
        // from disk.
        assert!(matches!(
            replayed_from_disk(&store, &liar.manifest.key),
            Err(crate::replay::ReplayError::Artifact { .. })
        ));
    }

    /// `n` bytes that differ from chunk to chunk.
    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i / 7) as u8 ^ seed).collect()
    }

    /// Writes the first `chunks` chunks of part `i` and leaves it there
    /// (the writer returned, as a cut transfer leaves it).
    fn write_chunks(incoming: &mut Receiving, i: usize, bytes: &[u8], chunks: usize) -> PartWriter {
        let mut w = incoming.part(i).unwrap();
        for chunk in bytes.chunks(wire::CHUNK_BYTES as usize).take(chunks) {
            w.write_chunk(chunk).unwrap();
        }
        w
    }

    /// Runs the check of the chunks `incoming` kept, as a fetch does while
    /// the rest arrives.
    fn check_kept(incoming: &Receiving) -> Vec<(usize, u64)> {
        incoming
            .kept_check()
            .map_or(Vec::new(), |c| c.run().unwrap())
    }

    #[test]
    fn a_cut_receive_keeps_its_checked_chunks_and_resumes_from_them() {
        for blake3 in [true, false] {
            a_cut_receive_resumes(blake3);
        }
    }

    fn a_cut_receive_resumes(blake3: bool) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let big = data(3 * wire::CHUNK_BYTES as usize + 5, 1);
        let small = data(10, 2);
        let sealed = sealed_by(&[("big.bin", &big), ("small", &small)], b"rec", blake3);
        let key = sealed.manifest.key;
        assert!(store.resumable(&key).is_none(), "nothing to resume yet");
        // Cut in the big artifact after two chunks; a chunk of the wrong
        // length refused.
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        {
            let mut w = write_chunks(&mut incoming, 1, &big, 2);
            let short = &big[2 << 20..(3 << 20) - 1];
            assert!(matches!(
                w.write_chunk(short),
                Err(ChunkRefused::PastEnd { .. })
            ));
        }
        incoming.keep();
        drop(incoming);
        assert!(store.get(&key).is_none(), "nothing committed");
        // Found again, without reading the chunks: the record whole and
        // the two chunks of the big artifact.
        let partial = store.resumable(&key).expect("the partial is kept");
        assert_eq!(partial.digest(), Some(sealed.digest()));
        assert_eq!(partial.from(), vec![1, 2, 0]);
        // Another fetch of the key does not get it while this one holds it.
        assert!(store.resumable(&key).is_none(), "locked by the first");
        let mut incoming = store.receive(sealed.clone(), Some(partial)).unwrap();
        assert_eq!(incoming.resumed_bytes(), 3 + (2 << 20));
        assert_eq!(check_kept(&incoming), vec![], "the kept chunks hold");
        assert_eq!(
            incoming.put_part(0, b"rec").unwrap(),
            digest_of(&sealed, 0, b"rec")
        );
        assert_eq!(
            incoming.put_part(1, &big).unwrap(),
            digest_of(&sealed, 1, &big)
        );
        incoming.put_part(2, &small).unwrap();
        let stored = incoming.commit().unwrap();
        assert_eq!(
            fs::read(store.blob_path(&stored.manifest.artifacts[0])).unwrap(),
            big
        );
        // Checked by BLAKE3, every part is tagged by the digest of that
        // check, resumed or not; by sha256, only the part received from
        // its first chunk got a tag, and the two resumed ones are checked
        // by sha256 when replayed.
        let tags = store.tags(&stored).expect("tags kept");
        let tagged: Vec<bool> = (0..3).map(|i| tags.hasher(i).is_some()).collect();
        match blake3 {
            true => assert_eq!(tagged, [true, true, true]),
            false => assert_eq!(tagged, [false, false, true]),
        }
        let m = &stored.manifest;
        let parts = [
            (m.output_sha256, &b"rec"[..]),
            (m.artifacts[0].sha256, &big[..]),
            (m.artifacts[1].sha256, &small[..]),
        ];
        for (i, (sha, bytes)) in parts.iter().enumerate() {
            let mut h = crate::tags::Content::hasher();
            h.update(bytes);
            assert_eq!(
                tags.holds(i, sha, bytes.len() as u64, &h.finish()),
                tagged[i],
                "part {i}'s tag holds of its bytes"
            );
            let mut other = crate::tags::Content::hasher();
            other.update(b"other bytes");
            assert!(!tags.holds(i, sha, bytes.len() as u64, &other.finish()));
        }
        let dest = dir.path().join("restored");
        crate::replay::restore_artifacts(&store, &stored, Some(&tags), &dest).unwrap();
        assert_eq!(fs::read(dest.join("big.bin")).unwrap(), big);
        assert!(
            !stored.dir.join(PROGRESS).exists(),
            "no progress record in a result"
        );
        assert_eq!(
            fs::read_dir(dir.path().join("store/tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn the_progress_record_gives_each_part_its_states_in_chunk_order() {
        let state = |b: u8| [b; STATE_LEN];
        let e = |part, index, b| progress_entry(part, index, &state(b)).to_vec();
        let states = |bs: &[u8]| bs.iter().flat_map(|b| state(*b)).collect::<Vec<u8>>();
        // (case, record, the two parts' states)
        type Case = (&'static str, Vec<u8>, [Vec<u8>; 2]);
        let table: Vec<Case> = vec![
            ("empty", vec![], [states(&[]), states(&[])]),
            (
                "parts interleaved",
                [e(0, 0, 1), e(1, 0, 2), e(0, 1, 3)].concat(),
                [states(&[1, 3]), states(&[2])],
            ),
            (
                "torn at the end",
                [e(0, 0, 1), e(1, 0, 2)[..ENTRY_LEN - 1].to_vec()].concat(),
                [states(&[1]), states(&[])],
            ),
            (
                "a chunk skipped",
                [e(0, 0, 1), e(0, 2, 2), e(0, 1, 3)].concat(),
                [states(&[1, 3]), states(&[])],
            ),
            (
                "a chunk recorded again replaces it and those after",
                [e(0, 0, 1), e(0, 1, 2), e(0, 2, 3), e(0, 1, 4)].concat(),
                [states(&[1, 4]), states(&[])],
            ),
            (
                "no such part, or an index past any length",
                [e(2, 0, 1), e(7, 0, 1), e(1, u64::MAX, 1), e(1, 0, 5)].concat(),
                [states(&[]), states(&[5])],
            ),
        ];
        for (name, recorded, want) in table {
            assert_eq!(parse_progress(&recorded, 2), want, "{name}");
        }
    }

    #[test]
    fn pieces_are_written_whole_and_in_order_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let big = data(3 * WRITE_STEP + 7, 4);
        let pieces: [&[u8]; 6] = [b"", b"a", &big, b"", &big[..WRITE_STEP - 1], b"z"];
        let mut file = fs::File::create(&path).unwrap();
        write_in_steps(&mut file, &pieces).unwrap();
        assert_eq!(fs::read(&path).unwrap(), pieces.concat());
    }

    #[test]
    fn a_large_part_is_synced_as_it_is_written_a_step_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let chunk = wire::CHUNK_BYTES as usize;
        let step = (SYNC_STEP / wire::CHUNK_BYTES) as usize;
        let big = data((step + 2) * chunk, 5);
        let sealed = sealed_by(&[("big.bin", &big)], b"rec", true);
        let mut incoming = store.receive(sealed, None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        let mut w = write_chunks(&mut incoming, 1, &big, step - 1);
        assert!(w.early.0.is_empty(), "less than a step written");
        w.write_chunk(&big[(step - 1) * chunk..step * chunk])
            .unwrap();
        assert_eq!(w.early.0.len(), 1, "a step written: its sync started");
        assert_eq!(w.synced_to, SYNC_STEP);
        w.early.wait().unwrap();
        w.write_chunk(&big[step * chunk..(step + 1) * chunk])
            .unwrap();
        assert!(w.early.0.is_empty(), "not another before the next step");
        w.write_chunk(&big[(step + 1) * chunk..]).unwrap();
        assert!(w.whole());
        incoming.part_done(w).unwrap();
        let stored = incoming.commit().unwrap();
        let blob = store.blob_path(&stored.manifest.artifacts[0]);
        assert!(fs::read(blob).unwrap() == big);
    }

    #[test]
    fn a_partial_damaged_on_disk_is_cut_back_to_its_last_good_chunk() {
        for blake3 in [true, false] {
            a_damaged_partial_is_cut_back(blake3);
        }
    }

    fn a_damaged_partial_is_cut_back(blake3: bool) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let big = data(4 * wire::CHUNK_BYTES as usize, 3);
        let sealed = sealed_by(&[("big.bin", &big)], b"rec", blake3);
        let key = sealed.manifest.key;
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        write_chunks(&mut incoming, 1, &big, 3);
        let blob = incoming.path().join("blobs/0");
        incoming.keep();
        drop(incoming);
        let record = blob.parent().unwrap().parent().unwrap().join(PROGRESS);
        // A byte of the second chunk changed since (a crash tore it, or
        // someone wrote it): resumed from its record, the part's sha256
        // would still come out right, so the check of the kept chunks is
        // what finds it; that chunk and the next go.
        let mut bytes = fs::read(&blob).unwrap();
        bytes[(1 << 20) + 17] ^= 1;
        fs::write(&blob, &bytes).unwrap();
        let partial = store.resumable(&key).unwrap();
        assert_eq!(partial.from(), vec![1, 3]);
        let mut incoming = store.receive(sealed.clone(), Some(partial)).unwrap();
        let damaged = check_kept(&incoming);
        assert_eq!(damaged, vec![(1, 1)]);
        incoming.cut_back(&damaged).unwrap();
        assert_eq!(incoming.from(), vec![1, 1]);
        drop(incoming);
        assert_eq!(fs::metadata(&blob).unwrap().len(), 1 << 20);
        // The record's entries: the output record's chunk, the first of
        // the artifact's.
        assert_eq!(fs::metadata(&record).unwrap().len(), 2 * ENTRY_LEN as u64);
        let partial = store.resumable(&key).unwrap();
        assert_eq!(partial.from(), vec![1, 1]);
        drop(partial);
        // A record changed (its state after the first chunk): that chunk
        // no longer holds either.
        let mut states = fs::read(&record).unwrap();
        let entry = &mut states[ENTRY_LEN..];
        assert_eq!(entry[..12], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        entry[12 + 3] ^= 1;
        fs::write(&record, &states).unwrap();
        let partial = store.resumable(&key).unwrap();
        let mut incoming = store.receive(sealed.clone(), Some(partial)).unwrap();
        assert_eq!(check_kept(&incoming), vec![(1, 0)]);
        incoming.cut_back(&[(1, 0)]).unwrap();
        drop(incoming);
        // A file shorter than its record (its last writes lost): resumed
        // from the chunks it holds whole.
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        write_chunks(&mut incoming, 1, &big, 3);
        incoming.keep();
        drop(incoming);
        let f = fs::OpenOptions::new().write(true).open(&blob).unwrap();
        f.set_len((2 << 20) + 1000).unwrap();
        drop(f);
        let partial = store.resumable(&key).unwrap();
        assert_eq!(partial.from(), vec![1, 2]);
        // The rest completes it, and what was kept counts in the digest.
        let mut incoming = store.receive(sealed.clone(), Some(partial)).unwrap();
        assert_eq!(check_kept(&incoming), vec![]);
        incoming.put_part(0, b"rec").unwrap();
        assert_eq!(
            incoming.put_part(1, &big).unwrap(),
            digest_of(&sealed, 1, &big)
        );
        incoming.commit().unwrap();
    }

    #[test]
    fn symlinks_planted_in_a_kept_partial_are_never_written_through() {
        // Regression: a kept partial's files were created and truncated
        // by path. A store from an untrusted source (a CI cache) with
        // symlinks in a partial folder had a fetch write its manifest,
        // seal, tags and progress into whatever files they named.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let big = data(3 * wire::CHUNK_BYTES as usize, 5);
        let sealed = sealed_with(&[("big.bin", &big)], b"rec");
        let key = sealed.manifest.key;
        let victim = dir.path().join("victim");
        fs::write(&victim, "the user's file").unwrap();
        let plant = |folder: &Path, names: &[&str]| {
            for name in names {
                let at = folder.join(name);
                let _ = fs::remove_file(&at);
                std::os::unix::fs::symlink(&victim, &at).unwrap();
            }
        };
        // A partial kept after two chunks; then its progress, its first
        // part and its lock file made symlinks, and the tags file planted.
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        write_chunks(&mut incoming, 1, &big, 2);
        let folder = incoming.path().to_path_buf();
        incoming.keep();
        drop(incoming);
        plant(&folder, &[PROGRESS, "output.rec", crate::tags::TAGS_FILE]);
        // Resumed: the planted progress and part are replaced, not followed.
        let partial = store.resumable(&key).expect("still resumable");
        assert_eq!(partial.from(), vec![0, 0], "nothing trusted of it");
        let mut incoming = store.receive(sealed.clone(), Some(partial)).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        incoming.put_part(1, &big).unwrap();
        let stored = incoming.commit().unwrap();
        assert_eq!(fs::read(stored.output_path()).unwrap(), b"rec");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "the user's file");
        // Started over in a kept folder whose every file is a symlink.
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        write_chunks(&mut incoming, 1, &big, 1);
        incoming.keep();
        drop(incoming);
        plant(
            &folder,
            &[
                "manifest.json",
                "seal.json",
                ".kept",
                PROGRESS,
                crate::tags::TAGS_FILE,
            ],
        );
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        incoming.put_part(1, &big).unwrap();
        incoming.commit().unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "the user's file");
        // A lock file that is a symlink: the fetch uses a folder of its own.
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        incoming.put_part(0, b"rec").unwrap();
        incoming.keep();
        drop(incoming);
        plant(&folder, &[OWNER]);
        let mut incoming = store.receive(sealed, None).unwrap();
        assert_ne!(incoming.path(), folder, "not the planted folder");
        incoming.put_part(0, b"rec").unwrap();
        incoming.put_part(1, &big).unwrap();
        incoming.commit().unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "the user's file");
    }

    #[test]
    fn a_second_fetch_of_a_result_whose_partial_is_held_receives_into_its_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let sealed = sealed_with(&[("a", b"aaa")], b"rec");
        let mut first = store.receive(sealed.clone(), None).unwrap();
        first.put_part(0, b"rec").unwrap();
        let held = first.path().to_path_buf();
        assert!(
            held.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(PARTIAL_PREFIX)
        );
        // Meanwhile another fetch of the same result, to its end.
        let mut second = store.receive(sealed.clone(), None).unwrap();
        let own = second.path().to_path_buf();
        assert_ne!(own, held);
        assert!(
            own.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("fetch-")
        );
        second.put_part(0, b"rec").unwrap();
        second.put_part(1, b"aaa").unwrap();
        second.commit().unwrap();
        assert!(store.get(&sealed.manifest.key).is_some());
        // The first is cut: its partial stays; a cut second one would not.
        first.keep();
        drop(first);
        assert!(held.join("output.rec").exists());
        let mut third = store
            .receive(sealed.clone(), store.resumable(&sealed.manifest.key))
            .unwrap();
        let mut fourth = store.receive(sealed, None).unwrap();
        let fourth_dir = fourth.path().to_path_buf();
        fourth.keep();
        drop(fourth);
        assert!(!fourth_dir.exists(), "a folder of its own is never kept");
        third.keep();
    }

    #[test]
    fn a_partial_of_another_result_is_not_resumed_and_old_ones_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let big = data(2 * wire::CHUNK_BYTES as usize, 4);
        let sealed = sealed_with(&[("big.bin", &big)], b"rec");
        let mut incoming = store.receive(sealed.clone(), None).unwrap();
        write_chunks(&mut incoming, 0, b"rec", 1);
        let folder = incoming.path().to_path_buf();
        incoming.keep();
        drop(incoming);
        // Named by the digest of its manifest: a manifest changed on disk
        // under that name is not that result's.
        let text = fs::read_to_string(folder.join("manifest.json")).unwrap();
        fs::write(
            folder.join("manifest.json"),
            text.replace("\"created_at\": 10", "\"created_at\": 11"),
        )
        .unwrap();
        assert!(store.resumable(&sealed.manifest.key).is_none());
        fs::write(folder.join("manifest.json"), &text).unwrap();
        assert!(store.resumable(&sealed.manifest.key).is_some());
        // The work-folder sweep leaves it alone; gc removes it once nobody
        // took it for a day, and not while a fetch holds it.
        crate::workdir::sweep(&dir.path().join("store/tmp"), "");
        assert!(folder.exists());
        assert_eq!(store.gc(Retention::default()).unwrap().partials, 0);
        let old = SystemTime::now() - PARTIAL_MAX_AGE - Duration::from_secs(60);
        let set_old = || {
            fs::File::options()
                .write(true)
                .open(folder.join(OWNER))
                .unwrap()
                .set_modified(old)
                .unwrap()
        };
        set_old();
        let held = store.resumable(&sealed.manifest.key).unwrap();
        set_old();
        assert_eq!(store.sweep_partials(PARTIAL_MAX_AGE), 0, "held by a fetch");
        drop(held);
        set_old();
        assert_eq!(store.gc(Retention::default()).unwrap().partials, 1);
        assert!(!folder.exists());
    }

    #[test]
    fn an_uncommitted_receive_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let arts: [(&str, &[u8]); 1] = [("a.txt", b"half")];
        let sealed = sealed_with(&arts, b"rec");
        drop(receive(&store, &sealed, b"rec", &[b"half"]));
        assert!(store.get(&sealed.manifest.key).is_none());
        assert_eq!(
            fs::read_dir(dir.path().join("store/tmp")).unwrap().count(),
            0
        );
        assert_eq!(
            fs::read_dir(dir.path().join("store/blobs"))
                .map(|d| d.count())
                .unwrap_or(0),
            0,
            "no blob of an uncommitted result"
        );
    }

    #[test]
    fn a_full_disk_is_reported_and_leaves_nothing_behind() {
        // A 1 MiB tmpfs as the store's file system (needs root, as in CI).
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("small");
        fs::create_dir(&mnt).unwrap();
        let mount = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .output();
        if !mount.as_ref().is_ok_and(|o| o.status.success()) {
            assert!(
                !nix::unistd::geteuid().is_root(),
                "mounting a 1 MiB tmpfs failed as root (CI runs this as root, so it must not skip): {mount:?}"
            );
            eprintln!("skipped: mounting a tmpfs needs root, and this test does not run as root");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(&mnt);
        let store = Store::new(mnt.join("store"));
        let arts = dir.path().join("arts");
        fs::create_dir_all(&arts).unwrap();
        fs::write(arts.join("big.bin"), vec![7u8; 2 << 20]).unwrap();
        let err = store
            .commit(
                manifest(inputs("t1"), Outcome::Passed, 1),
                b"rec",
                Some(&arts),
                None,
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::Full(_)), "{err:?}");
        assert!(err.to_string().contains("full"), "{err}");
        assert!(store.list().is_empty());
        assert!(matches!(store.lookup(&inputs("t1")), Lookup::Miss { .. }));
        let leftovers: Vec<_> = fs::read_dir(mnt.join("store/tmp"))
            .map(|d| d.count())
            .into_iter()
            .collect();
        assert_eq!(leftovers, [0], "the staging folder is removed");
        let blobs = fs::read_dir(mnt.join("store/blobs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(blobs, 0, "no partial blob is left");
    }

    #[test]
    fn failed_runs_are_kept_but_never_hit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        store
            .commit(manifest(inputs("t1"), Outcome::Failed, 10), b"", None, None)
            .unwrap();
        assert!(matches!(store.lookup(&inputs("t1")), Lookup::Miss { .. }));
        assert_eq!(store.list_failed().len(), 1);
        assert_eq!(
            store
                .find(&inputs("t1").key().hex()[..8].parse().unwrap())
                .len(),
            1
        );
    }

    #[test]
    fn gc_keeps_the_latest_per_target_and_drops_orphan_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        let arts = dir.path().join("arts");
        fs::create_dir_all(&arts).unwrap();
        fs::write(arts.join("old.bin"), "old").unwrap();
        store
            .commit(
                manifest(inputs("t1"), Outcome::Passed, 10),
                b"",
                Some(&arts),
                None,
            )
            .unwrap();
        store
            .commit(manifest(inputs("t2"), Outcome::Passed, 20), b"", None, None)
            .unwrap();
        assert_eq!(store.gc(Retention::default()).unwrap().results, 1);
        let left = store.list();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].manifest.inputs.tree, "t2");
        assert_eq!(fs::read_dir(dir.path().join("blobs")).unwrap().count(), 0);
        let aged = Retention {
            per_target: 5,
            max_age: Some(Duration::from_secs(1)),
        };
        assert_eq!(store.gc(aged).unwrap().results, 1, "an old result goes");
    }

    /// Regression: `gc` (which every passing run calls) removed the blobs
    /// a commit or a fetch had just moved into `blobs/`, before its result
    /// was renamed into place, so the new result lacked them.
    #[test]
    fn gc_in_the_middle_of_a_commit_or_fetch_leaves_their_blobs() {
        use std::cell::Cell;
        use std::rc::Rc;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let blobs = dir.path().join("store/blobs");
        fs::create_dir_all(&blobs).unwrap();
        // A blob nothing refers to that the commit reuses, one that stays an
        // orphan, and a temporary of an older version's commit.
        let reused = Sha256Digest::of(b"reused");
        let orphan = Sha256Digest::of(b"orphan");
        fs::write(blobs.join(reused.hex()), b"reused").unwrap();
        fs::write(blobs.join(orphan.hex()), b"orphan").unwrap();
        let temporary = blobs.join(format!(".{}.4242", orphan.hex()));
        fs::write(&temporary, b"half").unwrap();
        let arts = dir.path().join("arts");
        fs::create_dir_all(&arts).unwrap();
        fs::write(arts.join("new.bin"), b"new").unwrap();
        fs::write(arts.join("reused.bin"), b"reused").unwrap();

        // gc runs when the commit has moved its blobs into `blobs/` and
        // not yet renamed its result into place.
        let during: Rc<Cell<Option<Collected>>> = Rc::default();
        let hook = {
            let (store, during) = (store.clone(), during.clone());
            crate::faults::hook::at("place", move || {
                let keep_all = Retention {
                    per_target: 10,
                    max_age: None,
                };
                during.set(Some(store.gc(keep_all).unwrap()));
            })
        };
        let stored = store
            .commit(
                manifest(inputs("t1"), Outcome::Passed, 10),
                b"rec",
                Some(&arts),
                None,
            )
            .expect("the commit succeeds");
        let seen = during.take().expect("gc ran in the middle of the commit");
        assert_eq!(seen.blobs, 0, "{seen:?}");
        assert!(seen.blobs_deferred, "{seen:?}");
        let got = store.get(&inputs("t1").key()).expect("committed");
        assert_eq!(got.manifest.artifacts.len(), 2);
        for (a, bytes) in got.manifest.artifacts.iter().zip([&b"new"[..], b"reused"]) {
            assert_eq!(fs::read(store.blob_path(a)).unwrap(), bytes, "{}", a.path);
        }

        // The same in the middle of a fetch's commit.
        let sealed = sealed_with(&[("f.bin", b"fetched"), ("g.bin", b"reused")], b"rec");
        let fetched = receive(&store, &sealed, b"rec", &[b"fetched", b"reused"])
            .commit()
            .expect("the fetch commits");
        assert!(during.take().expect("gc ran").blobs_deferred);
        drop(hook);
        for a in &fetched.manifest.artifacts {
            assert!(store.blob_path(a).is_file(), "{}", a.path);
        }

        // Once nothing is placing, gc removes the orphan only.
        let after = store.gc(Retention {
            per_target: 10,
            max_age: None,
        });
        assert_eq!(
            after.unwrap(),
            Collected {
                results: 0,
                blobs: 1,
                blobs_deferred: false,
                partials: 0,
            }
        );
        assert!(!blobs.join(orphan.hex()).exists());
        assert!(temporary.exists(), "a dot-file is not a blob");
        for r in [&stored, &fetched] {
            for a in &r.manifest.artifacts {
                assert!(store.blob_path(a).is_file(), "{}", a.path);
            }
        }
        for r in [&stored, &fetched] {
            crate::replay::verify_artifacts(&store, r).expect("every blob whole");
        }
    }

    #[test]
    fn gc_leaves_the_staging_of_a_live_fetch_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        let live = store.stage("fetch-").unwrap();
        fs::write(live.path().join("output.rec"), "half").unwrap();
        store.gc(Retention::default()).unwrap();
        assert!(
            live.path().join("output.rec").exists(),
            "a fetch in progress keeps its staging"
        );
    }

    #[test]
    fn a_kept_local_reason_is_read_as_one_bounded_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_path_buf());
        let stored = store
            .commit(manifest(inputs("t1"), Outcome::Passed, 10), b"", None, None)
            .unwrap();
        assert_eq!(stored.kept_local(), None);
        let mut huge = b"kept on this machine: x\nsecond line\n".to_vec();
        huge.extend(std::iter::repeat_n(b'y', 1 << 20));
        fs::write(stored.dir.join(KEPT_LOCAL), &huge).unwrap();
        assert_eq!(
            stored.kept_local().as_deref(),
            Some("kept on this machine: x")
        );
        fs::write(stored.dir.join(KEPT_LOCAL), vec![b'z'; 1 << 20]).unwrap();
        assert_eq!(
            stored.kept_local().map(|t| t.len()),
            Some(KEPT_LOCAL_MAX as usize)
        );
    }

    #[test]
    fn a_hostile_store_is_read_as_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let arts = dir.path().join("arts");
        fs::create_dir_all(&arts).unwrap();
        fs::write(arts.join("r.txt"), "report").unwrap();
        let stored = store
            .commit(
                manifest(inputs("t1"), Outcome::Passed, 10),
                b"rec",
                Some(&arts),
                None,
            )
            .unwrap();
        let results = dir.path().join("store/results");
        // A result copied under another key's name is not that key's.
        let other = inputs("t2").key();
        let copy = std::process::Command::new("cp")
            .arg("-r")
            .arg(&stored.dir)
            .arg(results.join(other.hex()))
            .status()
            .unwrap();
        assert!(copy.success());
        assert!(store.get(&other).is_none(), "served under a key it is not");
        fs::remove_dir_all(results.join(other.hex())).unwrap();
        // A manifest whose digest is a path is not a manifest.
        let path = stored.dir.join("manifest.json");
        let text = fs::read_to_string(&path).unwrap();
        let sha = stored.manifest.artifacts[0].sha256.hex();
        fs::write(&path, text.replace(&sha, "../../../credentials.pem")).unwrap();
        assert!(store.get(&inputs("t1").key()).is_none());
        assert!(store.list().is_empty());
        // Nor is one whose artifact path climbs out, or whose seal is garbage.
        fs::write(&path, text.replace("\"r.txt\"", "\"../../.bashrc\"")).unwrap();
        assert!(store.list().is_empty());
        fs::write(&path, &text).unwrap();
        assert!(store.get(&inputs("t1").key()).is_some(), "restored");
        fs::write(stored.dir.join("seal.json"), "{not a seal").unwrap();
        assert!(store.get(&inputs("t1").key()).is_none());
    }
}
