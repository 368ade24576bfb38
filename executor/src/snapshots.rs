//! Per-repository snapshots: what a repository's runs keep between runs
//! (its container images in `/var/lib/containers`, `/var/run/ci/cache`), so
//! a second real run does not rebuild its container image.
//!
//! A snapshot is a qcow2 disk holding an ext4 file system; the first is a
//! copy of a blank one made on the host. It is a disk of its own, not a
//! layer of the root disk, so that every run can start from the same saved
//! guest (see [`crate::saved_guests`]) and plug its repository's disk in.
//!
//! Snapshots belong to a [`RepoId`]: the namespace *and* the root commit (or,
//! in a shallow clone, the origin it was fetched from), so a repository that
//! declares another's namespace does not get (or poison) its snapshot. Each
//! state of a snapshot is a *generation*, named by an id that chains from
//! the generation it was made from ([`next_generation`]);
//! a run records the generation it started from (or `fresh`) in its
//! manifest, so a policy can ask for results from a blank snapshot only.
//! Only a run whose tests passed writes a new generation: a failed,
//! timed-out or interrupted run leaves nothing behind.
//!
//! ```text
//! snapshots/<repo id>-<recipe>/<generation>.qcow2   immutable once written
//! snapshots/<repo id>-<recipe>/current              symlink to the newest
//! snapshots/blank-v1.qcow2
//! ```
//!
//! A run holds a shared lock on the generation it boots on; a new
//! generation is a copy of the one its run booted on with the run's overlay
//! committed into it, renamed into place, then `current` is swapped to it.
//! Whatever is made (a generation, a podman run's folder, the blank disk)
//! is made in a [`Stage`], a work folder beside the generations that the
//! next command removes once its owner is gone ([`crate::workdir`]).
//! Generations nobody holds are removed after each update. Snapshots unused
//! for [`MAX_AGE`] are dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::manifest::Snapshot;
use thiserror::Error;

use crate::image::Image;
use crate::workdir::WorkDir;

/// Snapshots older than this are not used, and are removed.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The size the guest sees of a snapshot disk (sparse: it costs what is
/// written).
pub const STATE_DISK_BYTES: u64 = 32 << 30;

const BLANK: &str = "blank-v1.qcow2";
const CURRENT: &str = "current";

/// Why a snapshot could not be made or updated.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{tool} failed while updating the repository's snapshot: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("making a blank snapshot disk")]
    Blank(#[source] crate::vm::DiskError),
    #[error("snapshot io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which repository a snapshot belongs to: what it declares (its namespace)
/// together with what its content cannot choose ([`RepoId::anchor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    pub namespace: String,
    /// The root commit, which a repository cannot choose without sharing
    /// the history; in a shallow clone, whose history stops at a commit
    /// that moves with every fetch, the origin it was fetched from
    /// (`Checkout::anchor`).
    pub anchor: String,
}

impl RepoId {
    fn id(&self) -> String {
        let mut bytes = Vec::new();
        for part in [self.namespace.as_bytes(), self.anchor.as_bytes()] {
            reprise_protocol::hex::put_field(&mut bytes, part);
        }
        Sha256Digest::of(&bytes).hex()[..24].to_string()
    }
}

/// The id of a new generation: made from `parent` by the run with `key`,
/// at `nanos` since the epoch. Ids chain, so a generation names its whole
/// history, and no two runs make the same one.
pub fn next_generation(parent: Snapshot, key: &RunKey, nanos: u128) -> Sha256Digest {
    let mut bytes = b"reprise-snapshot-generation".to_vec();
    match parent {
        Snapshot::Fresh => bytes.extend_from_slice(b"fresh"),
        Snapshot::Generation(g) => bytes.extend_from_slice(g.as_bytes()),
    }
    bytes.extend_from_slice(key.as_bytes());
    bytes.extend_from_slice(&nanos.to_be_bytes());
    bytes.extend_from_slice(&std::process::id().to_be_bytes());
    Sha256Digest::of(&bytes)
}

/// Something being made beside the generations: a work folder
/// (`.stage-*`, owned and locked by this process) holding it, renamed out
/// of it when done. Dropped, it goes with what is left in it.
#[derive(Debug)]
pub struct Stage {
    /// Held for its lock; removes the folder when dropped.
    _work: WorkDir,
    path: PathBuf,
}

impl Stage {
    /// A stage in `folder` for a file or folder called `name`.
    fn new_in(folder: &Path, name: &str) -> Result<Stage, SnapshotError> {
        let work = WorkDir::new_in(folder, crate::workdir::STAGE_PREFIX).map_err(io(folder))?;
        let path = work.path().join(name);
        Ok(Stage { _work: work, path })
    }

    /// What is being made (not there until it is made).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A generation a run boots on: its file, its id, and a shared lock that
/// keeps it from being removed while the run needs it.
#[derive(Debug)]
pub struct SnapshotGeneration {
    pub path: PathBuf,
    pub generation: Sha256Digest,
    _lock: Flock<File>,
}

/// What a run's snapshot disk starts from.
#[derive(Debug)]
pub enum SnapshotStart {
    /// The blank disk: a fresh snapshot.
    Fresh(PathBuf),
    /// A generation of the repository's snapshot, held.
    Generation(SnapshotGeneration),
}

impl SnapshotStart {
    pub fn path(&self) -> &Path {
        match self {
            SnapshotStart::Fresh(p) => p,
            SnapshotStart::Generation(l) => &l.path,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        match self {
            SnapshotStart::Fresh(_) => Snapshot::Fresh,
            SnapshotStart::Generation(l) => Snapshot::Generation(l.generation),
        }
    }
}

/// What a generation is on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// A qcow2 disk with an ext4 file system (the qemu driver's).
    Disk,
    /// A folder, bind-mounted into the OS (the podman driver's).
    Folder,
}

impl Form {
    fn suffix(self) -> &'static str {
        match self {
            Form::Disk => ".qcow2",
            Form::Folder => ".d",
        }
    }
}

/// The folder of snapshots.
#[derive(Debug, Clone)]
pub struct Snapshots {
    root: PathBuf,
    form: Form,
}

impl Snapshots {
    pub fn new(root: PathBuf, form: Form) -> Snapshots {
        Snapshots { root, form }
    }

    /// The qemu driver's, under the user's cache folder.
    pub fn default_location() -> Snapshots {
        Snapshots::new(crate::paths::cache_dir().join("snapshots"), Form::Disk)
    }

    /// The podman driver's, under the user's cache folder.
    pub fn folders() -> Snapshots {
        Snapshots::new(
            crate::paths::cache_dir().join("snapshots-podman"),
            Form::Folder,
        )
    }

    /// The folder of `repo`'s snapshots on `image`.
    fn folder(&self, repo: &RepoId, image: &Image) -> PathBuf {
        self.root.join(format!(
            "{}-{}",
            repo.id(),
            &image.manifest.recipe_hash[..16]
        ))
    }

    /// The generation to boot on, if one exists and is fresh enough, locked
    /// (shared) until the returned value drops.
    pub fn current(&self, repo: &RepoId, image: &Image) -> Option<SnapshotGeneration> {
        let folder = self.folder(repo, image);
        let target = std::fs::read_link(folder.join(CURRENT)).ok()?;
        let name = target.file_name()?.to_str()?;
        let generation: Sha256Digest = name.strip_suffix(self.form.suffix())?.parse().ok()?;
        let path = folder.join(name);
        let file = File::open(&path).ok()?;
        let age = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())?;
        if age > MAX_AGE {
            drop(file);
            let _ = std::fs::remove_dir_all(&folder);
            return None;
        }
        let lock = Flock::lock(file, FlockArg::LockSharedNonblock).ok()?;
        // An update may have removed it between the link and the lock.
        if !path.exists() {
            return None;
        }
        Some(SnapshotGeneration {
            path,
            generation,
            _lock: lock,
        })
    }

    /// The blank snapshot disk (an empty ext4 file system), made on first use.
    pub fn blank(&self) -> Result<PathBuf, SnapshotError> {
        let path = self.root.join(BLANK);
        if path.is_file() {
            return Ok(path);
        }
        let stage = Stage::new_in(&self.root, BLANK)?;
        crate::vm::disk::make_blank_ext4(stage.path(), STATE_DISK_BYTES, "reprise-state")
            .map_err(SnapshotError::Blank)?;
        std::fs::rename(stage.path(), &path).map_err(io(&path))?;
        Ok(path)
    }

    /// Removes the snapshots of `repo` (every image), or all snapshots (and the
    /// blank disk). Returns how many repositories' snapshots were removed.
    pub fn drop_repo(&self, repo: Option<&RepoId>) -> std::io::Result<usize> {
        let prefix = repo.map(RepoId::id);
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !prefix.as_ref().is_none_or(|p| name.starts_with(p.as_str())) {
                continue;
            }
            if e.file_type()?.is_dir() {
                std::fs::remove_dir_all(e.path())?;
                n += 1;
            } else if prefix.is_none() {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(n)
    }

    /// A folder beside `repo`'s generations holding a copy of `start` (or
    /// nothing, for a fresh start): what a run of the podman driver mounts
    /// (at [`Stage::path`]) and changes. [`Snapshots::commit_folder`]
    /// makes it a generation; dropped, it is removed.
    pub fn stage_folder(
        &self,
        repo: &RepoId,
        image: &Image,
        start: &SnapshotStart,
    ) -> Result<Stage, SnapshotError> {
        let folder = self.folder(repo, image);
        let stage = Stage::new_in(&folder, "state")?;
        let staged = stage.path();
        std::fs::create_dir(staged).map_err(io(staged))?;
        if let SnapshotStart::Generation(g) = start {
            let out = Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(g.path.join("."))
                .arg(staged)
                .output()
                .map_err(io(staged))?;
            if !out.status.success() {
                return Err(SnapshotError::Tool {
                    tool: "cp",
                    stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
                });
            }
        }
        Ok(stage)
    }

    /// Makes the folder `staged` (from [`Snapshots::stage_folder`]) a new
    /// generation of `repo`'s snapshot made by the run with `key` from
    /// `start`, and makes it current.
    pub fn commit_folder(
        &self,
        repo: &RepoId,
        image: &Image,
        staged: Stage,
        start: SnapshotStart,
        key: &RunKey,
    ) -> Result<Sha256Digest, SnapshotError> {
        let folder = self.folder(repo, image);
        let generation = next_generation(start.snapshot(), key, now_nanos());
        let dest = folder.join(format!("{generation}{}", self.form.suffix()));
        std::fs::rename(staged.path(), &dest).map_err(io(&dest))?;
        drop(staged);
        self.make_current(&folder, &generation)?;
        drop(start);
        self.remove_unused(&folder, &generation);
        Ok(generation)
    }

    /// Swaps `current` to `generation` in one step: a new link renamed
    /// over the old.
    fn make_current(&self, folder: &Path, generation: &Sha256Digest) -> Result<(), SnapshotError> {
        let link = folder.join(format!(".{CURRENT}.{generation}"));
        std::os::unix::fs::symlink(format!("{generation}{}", self.form.suffix()), &link)
            .map_err(io(&link))?;
        std::fs::rename(&link, folder.join(CURRENT)).map_err(io(&link))
    }

    /// Folds a stopped VM's snapshot-disk `overlay`, booted on `base`, into a
    /// new generation of `repo`'s snapshot made by the run with `key`, and
    /// makes it current. The overlay and the base (and its lock) are
    /// consumed. Returns the new generation.
    pub fn update(
        &self,
        repo: &RepoId,
        image: &Image,
        overlay: &Path,
        base: SnapshotStart,
        key: &RunKey,
    ) -> Result<Sha256Digest, SnapshotError> {
        let folder = self.folder(repo, image);
        let generation = next_generation(base.snapshot(), key, now_nanos());
        let dest = folder.join(format!("{generation}.qcow2"));
        let stage = Stage::new_in(&folder, &format!("{generation}.qcow2"))?;
        let new = stage.path();
        let result = (|| {
            let out = Command::new("cp")
                .args(["--reflink=auto", "--sparse=always"])
                .arg(base.path())
                .arg(new)
                .output()
                .map_err(io(new))?;
            if !out.status.success() {
                return Err(SnapshotError::Tool {
                    tool: "cp",
                    stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
                });
            }
            // Point the overlay at the copy (same contents as what it was
            // booted on), then write its changes into the copy.
            let abs_new = std::path::absolute(new).map_err(io(new))?;
            qemu_img(&["rebase", "-u", "-F", "qcow2", "-b"], &[&abs_new, overlay])?;
            qemu_img(&["commit", "-q"], &[overlay])?;
            std::fs::rename(new, &dest).map_err(io(&dest))?;
            self.make_current(&folder, &generation)
        })();
        drop(stage);
        if result.is_err() {
            return result.map(|()| generation);
        }
        drop(base);
        self.remove_unused(&folder, &generation);
        Ok(generation)
    }

    /// Removes the generations of `folder` other than `keep` that no run
    /// holds.
    fn remove_unused(&self, folder: &Path, keep: &Sha256Digest) {
        let Ok(entries) = std::fs::read_dir(folder) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(generation) = name.strip_suffix(self.form.suffix()) else {
                continue;
            };
            if generation == keep.hex() {
                continue;
            }
            let Ok(file) = File::open(e.path()) else {
                continue;
            };
            if let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                let _ = match self.form {
                    Form::Disk => std::fs::remove_file(e.path()),
                    Form::Folder => std::fs::remove_dir_all(e.path()),
                };
            }
        }
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> Result<(), SnapshotError> {
    let out = Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .map_err(|source| SnapshotError::Io {
            path: PathBuf::from("qemu-img"),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(SnapshotError::Tool {
            tool: "qemu-img",
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reprise_protocol::image::ImageManifest;

    fn qemu_io(args: &[&str], disk: &Path) -> String {
        let out = Command::new("qemu-io")
            .args(args)
            .arg(disk)
            .output()
            .expect("qemu-io");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_blank_state_disk_is_an_empty_ext4_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = Snapshots::new(dir.path().join("snapshots"), Form::Disk);
        let blank = snapshots.blank().expect("blank");
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&blank)
            .output()
            .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], STATE_DISK_BYTES);
        assert!(
            std::fs::metadata(&blank).unwrap().len() < 64 << 20,
            "sparse: only the file system's metadata is stored"
        );
        let raw = dir.path().join("check.raw");
        qemu_img(&["convert", "-O", "raw"], &[&blank, &raw]).unwrap();
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&raw)
            .output()
            .unwrap();
        let header = String::from_utf8_lossy(&out.stdout);
        assert!(header.contains("reprise-state"), "{header}");
        // Made once: a second call returns the same file untouched.
        let made = std::fs::metadata(&blank).unwrap().modified().unwrap();
        assert_eq!(snapshots.blank().unwrap(), blank);
        assert_eq!(std::fs::metadata(&blank).unwrap().modified().unwrap(), made);
        // Dropping every generation removes it too, but counts only snapshots.
        assert_eq!(snapshots.drop_repo(None).unwrap(), 0);
        assert!(!blank.exists());
    }

    #[test]
    fn a_run_overlay_is_folded_into_the_layer_without_touching_the_base() {
        if crate::paths::which("qemu-io").is_none() {
            panic!("qemu-io is missing: apt-get install qemu-utils");
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2"], &[&base, Path::new("16M")]).unwrap();
        qemu_io(&["-c", "write -P 0x11 0 64k"], &base);
        let image = Image {
            dir: dir.path().to_path_buf(),
            manifest: ImageManifest {
                version: 1,
                recipe_hash: "f".repeat(64),
                digest: "d".into(),
                built_at: 0,
                build_ms: 0,
                disk: "disk.qcow2".into(),
                kernel: "k".into(),
                initrd: "i".into(),
                disk_bytes: 0,
            },
        };
        let base_sha = crate::image::sha256_file(&base).unwrap();
        let snapshots = Snapshots::new(dir.path().join("snapshots"), Form::Disk);
        let repo = RepoId {
            namespace: "ns".into(),
            anchor: "r1".into(),
        };
        let key = RunKey::from_bytes([7; 32]);
        assert!(snapshots.current(&repo, &image).is_none());

        // First run: an overlay on the base writes 0x22 at 1M.
        let run1 = dir.path().join("run1.qcow2");
        crate::vm::disk::create_overlay(&base, &run1).unwrap();
        qemu_io(&["-c", "write -P 0x22 1M 64k"], &run1);
        let first = snapshots
            .update(
                &repo,
                &image,
                &run1,
                SnapshotStart::Fresh(base.clone()),
                &key,
            )
            .unwrap();
        let generation = snapshots
            .current(&repo, &image)
            .expect("a current generation");
        assert_eq!(generation.generation, first);

        // Another repository declaring the same namespace does not see it.
        let impostor = RepoId {
            namespace: "ns".into(),
            anchor: "r2".into(),
        };
        assert!(snapshots.current(&impostor, &image).is_none());

        // Second run: on the generation, sees the first run's write, adds another.
        let run2 = dir.path().join("run2.qcow2");
        crate::vm::disk::create_overlay(&generation.path, &run2).unwrap();
        assert!(qemu_io(&["-c", "read -P 0x22 1M 64k"], &run2).contains("read 65536"));
        qemu_io(&["-c", "write -P 0x33 2M 64k"], &run2);
        let first_path = generation.path.clone();
        let second = snapshots
            .update(
                &repo,
                &image,
                &run2,
                SnapshotStart::Generation(generation),
                &key,
            )
            .unwrap();
        assert_ne!(second, first, "every update is a new generation");
        assert_ne!(
            second,
            next_generation(Snapshot::Fresh, &key, 0),
            "chained from its parent"
        );
        let now = snapshots.current(&repo, &image).unwrap();
        assert_eq!(now.generation, second);
        assert!(!first_path.exists(), "a generation nobody holds is removed");
        let check = dir.path().join("check.qcow2");
        crate::vm::disk::create_overlay(&now.path, &check).unwrap();
        for pattern in [
            "read -P 0x11 0 64k",
            "read -P 0x22 1M 64k",
            "read -P 0x33 2M 64k",
        ] {
            let out = qemu_io(&["-c", pattern], &check);
            assert!(!out.contains("verification failed"), "{pattern}: {out}");
        }
        assert_eq!(
            crate::image::sha256_file(&base).unwrap(),
            base_sha,
            "the base is never written"
        );
        // A generation a run holds survives the next update.
        let run3 = dir.path().join("run3.qcow2");
        crate::vm::disk::create_overlay(&now.path, &run3).unwrap();
        let held = snapshots.current(&repo, &image).unwrap();
        snapshots
            .update(&repo, &image, &run3, SnapshotStart::Generation(now), &key)
            .unwrap();
        assert!(held.path.exists(), "held by a run");
        drop(held);

        assert_eq!(snapshots.drop_repo(Some(&impostor)).unwrap(), 0);
        assert_eq!(snapshots.drop_repo(Some(&repo)).unwrap(), 1);
        assert!(snapshots.current(&repo, &image).is_none());
    }
}
