//! Work folders that say who owns them, so a killed command leaves nothing
//! behind for long.
//!
//! Every run, fetch, VM and image build works in a [`WorkDir`]: a fresh
//! folder holding an `.owner` file with the owner's pid, on which the owner
//! holds an exclusive `flock` for as long as it lives. The kernel drops the
//! lock when the owner dies, however it dies, so the next command that
//! starts ([`sweep_all`]) can tell a live owner's folder (locked) from a
//! dead one's (lockable) without trusting a pid that may have been reused,
//! and removes only the latter. A folder kept on purpose (`--keep-work`)
//! carries a `.kept` file and is never swept.
//!
//! A work folder may also own what is not in it: the podman containers its
//! owner runs ([`owns_container`], listed in `.containers`). The sweep
//! removes those first, and the folder only once they are gone.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// The file naming and locking a work folder's owner.
const OWNER: &str = ".owner";
/// The file marking a work folder kept for inspection.
const KEPT: &str = ".kept";
/// The file listing the podman containers a work folder's owner runs, one
/// name a line.
const CONTAINERS: &str = ".containers";
/// How long a folder without an owner file is left alone: its creator may
/// be between making it and locking it.
const GRACE: Duration = Duration::from_secs(60);

/// A work folder owned by this process; removed when dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    _owner: Option<Flock<File>>,
    remove: bool,
}

impl WorkDir {
    /// Makes `<parent>/<prefix><random>/` (and `parent`), owned and locked
    /// by this process.
    pub fn new_in(parent: &Path, prefix: &str) -> std::io::Result<WorkDir> {
        fs::create_dir_all(parent)?;
        let path = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)?
            .keep();
        let mut dir = WorkDir {
            path,
            _owner: None,
            remove: true,
        };
        // Locked under another name, then renamed: a sweeper never sees an
        // `.owner` that is not locked yet.
        let staged = dir.path.join(".owner.new");
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&staged)?;
        let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        writeln!(lock, "{}", std::process::id())?;
        fs::rename(&staged, dir.path.join(OWNER))?;
        dir._owner = Some(lock);
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the folder for inspection: it is not removed on drop and no
    /// sweep removes it. Returns where it is.
    pub fn keep(mut self) -> PathBuf {
        self.remove = false;
        let _ = fs::write(self.path.join(KEPT), b"");
        self.path.clone()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Whether the folder at `dir` belongs to an owner that is gone.
pub fn abandoned(dir: &Path) -> bool {
    if dir.join(KEPT).exists() {
        return false;
    }
    match File::open(dir.join(OWNER)) {
        Ok(file) => Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > GRACE),
        Err(_) => false,
    }
}

/// The podman containers whose names start with this are a run's OS
/// containers; no other name is ever removed by a sweep.
pub const CONTAINER_PREFIX: &str = "reprise-run-";

/// Records in the work folder `dir` (this process's) that this process
/// runs the podman container `name`, before it starts it: if the process
/// dies without removing the container, the sweep that removes the folder
/// removes the container first.
pub fn owns_container(dir: &Path, name: &str) -> std::io::Result<()> {
    if !is_container_name(name) {
        return Err(std::io::Error::other(format!(
            "'{name}' is not a run's container name"
        )));
    }
    let mut list = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(CONTAINERS))?;
    writeln!(list, "{name}")?;
    list.sync_all()
}

/// A run's container name: [`CONTAINER_PREFIX`], then letters, digits and
/// dashes.
fn is_container_name(name: &str) -> bool {
    name.strip_prefix(CONTAINER_PREFIX).is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// The containers the abandoned folder `dir` lists, if the folder is this
/// user's: a folder in a shared temporary folder may be anyone's, and
/// another user's list must not name containers for us to remove.
fn owned_containers(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let ours = fs::symlink_metadata(dir).is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw());
    if !ours {
        return Vec::new();
    }
    fs::read_to_string(dir.join(CONTAINERS))
        .unwrap_or_default()
        .lines()
        .filter(|n| is_container_name(n))
        .map(str::to_string)
        .collect()
}

/// Removes the containers the abandoned folder `dir` owns. False if one
/// could not be removed (the folder then stays, so a later sweep tries
/// again).
fn release(dir: &Path) -> bool {
    owned_containers(dir).iter().all(|name| {
        match std::process::Command::new("podman")
            .args(["rm", "-f", "-t", "0", name])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            // `rm -f` of a container that is not there succeeds.
            Ok(status) => status.success(),
            // No podman here: it runs no container either.
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    })
}

/// Removes the folders in `parent` whose names start with `prefix` and
/// whose owners are gone, and the containers they own. Returns how many.
pub fn sweep(parent: &Path, prefix: &str) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir
            && name.to_string_lossy().starts_with(prefix)
            && abandoned(&e.path())
            && release(&e.path())
            && fs::remove_dir_all(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Where a host keeps what commands make: the folders [`places`] looks in.
#[derive(Debug, Clone)]
pub struct Roots {
    /// The temporary folder (`TMPDIR`).
    pub temp: PathBuf,
    /// The user's cache folder for reprise.
    pub cache: PathBuf,
    /// The folder of sockets.
    pub runtime: PathBuf,
    /// The result store.
    pub store: PathBuf,
}

impl Roots {
    /// This user's, with the store at `store_root`.
    pub fn of_user(store_root: &Path) -> Roots {
        Roots {
            temp: std::env::temp_dir(),
            cache: crate::paths::cache_dir(),
            runtime: crate::paths::runtime_dir(),
            store: store_root.to_path_buf(),
        }
    }
}

/// The places work folders are made in, and the prefix of each kind: a
/// new snapshot generation and a saved guest are made in a [`STAGE_PREFIX`]
/// folder beside the finished ones (in every repository's snapshot
/// folder, of both forms) and renamed out of it.
pub fn places(roots: &Roots) -> Vec<(PathBuf, &'static str)> {
    let cache = &roots.cache;
    let mut places = vec![
        (roots.temp.clone(), RUN_PREFIX),
        (cache.join("vms"), VM_PREFIX),
        (roots.runtime.clone(), SOCKETS_PREFIX),
        (roots.runtime.clone(), NET_PREFIX),
        (cache.join("images"), BUILD_PREFIX),
        (cache.join("podman"), IMPORT_PREFIX),
        (cache.join("saved-guests"), STAGE_PREFIX),
        (roots.store.join("tmp"), ""),
    ];
    for snapshots in [cache.join("snapshots"), cache.join("snapshots-podman")] {
        let repos = fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| (e.path(), STAGE_PREFIX))
            .collect::<Vec<_>>();
        places.push((snapshots, STAGE_PREFIX));
        places.extend(repos);
    }
    places
}

/// Every kind of work folder of every owner that is gone, with the
/// containers they own. Returns how many were removed.
pub fn sweep_all(store_root: &Path) -> usize {
    places(&Roots::of_user(store_root))
        .iter()
        .map(|(parent, prefix)| sweep(parent, prefix))
        .sum()
}

/// A run's work folder (the exported tree, the record, the artifacts).
pub const RUN_PREFIX: &str = "reprise-work-";
/// A VM's disks and logs.
pub const VM_PREFIX: &str = "vm-";
/// A VM's sockets.
pub const SOCKETS_PREFIX: &str = "reprise-vm-";
/// passt's folder.
pub const NET_PREFIX: &str = "reprise-net-";
/// A base image build.
pub const BUILD_PREFIX: &str = ".build-";
/// The podman driver's import of the base image.
pub const IMPORT_PREFIX: &str = "import-";
/// A snapshot generation or a saved guest being made, beside the finished
/// ones.
pub const STAGE_PREFIX: &str = ".stage-";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_owners_folder_stays_and_a_dead_ones_goes() {
        let parent = tempfile::tempdir().unwrap();
        let live = WorkDir::new_in(parent.path(), "w-").unwrap();
        assert!(!abandoned(live.path()));
        assert!(
            fs::read_to_string(live.path().join(OWNER))
                .unwrap()
                .starts_with(&std::process::id().to_string())
        );

        // A dead owner: its lock is gone, as when the kernel reaps it.
        let mut dead = WorkDir::new_in(parent.path(), "w-").unwrap();
        dead._owner = None;
        dead.remove = false;
        let dead_path = dead.path().to_path_buf();
        drop(dead);
        assert!(abandoned(&dead_path));

        let kept = WorkDir::new_in(parent.path(), "w-").unwrap().keep();
        // Being made right now (no owner file yet), and another kind.
        fs::create_dir(parent.path().join("w-new")).unwrap();
        fs::create_dir(parent.path().join("other")).unwrap();

        assert_eq!(sweep(parent.path(), "w-"), 1);
        assert!(!dead_path.exists());
        for stays in [live.path(), &kept, &parent.path().join("w-new")] {
            assert!(stays.exists(), "{}", stays.display());
        }
        let live_path = live.path().to_path_buf();
        drop(live);
        assert!(!live_path.exists(), "dropped, removed");
    }

    /// A work folder whose owner died: its lock is gone, as when the
    /// kernel reaps a killed process.
    fn dead_in(parent: &Path, prefix: &str) -> PathBuf {
        let mut dead = WorkDir::new_in(parent, prefix).unwrap();
        dead._owner = None;
        dead.remove = false;
        dead.path().to_path_buf()
    }

    /// Regression: a snapshot generation or saved guest being made by a
    /// killed run (`.stage-*` beside the finished ones, in the snapshot
    /// folders of both drivers) was never removed.
    #[test]
    fn stage_folders_of_dead_owners_are_swept_beside_snapshots_and_saved_guests() {
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots {
            temp: dir.path().join("tmp"),
            cache: dir.path().join("cache"),
            runtime: dir.path().join("run"),
            store: dir.path().join("store"),
        };
        let cache = &roots.cache;
        let repo_disks = cache.join("snapshots/0123abcd-recipe");
        let repo_folders = cache.join("snapshots-podman/0123abcd-recipe");
        let generation = repo_folders.join("f00d.d");
        fs::create_dir_all(&generation).unwrap();
        fs::create_dir_all(&repo_disks).unwrap();
        fs::write(repo_disks.join("beef.qcow2"), b"disk").unwrap();
        let mut dead = Vec::new();
        let mut live = Vec::new();
        for parent in [
            &repo_disks,
            &repo_folders,
            &cache.join("snapshots"),
            &cache.join("saved-guests"),
        ] {
            dead.push(dead_in(parent, STAGE_PREFIX));
            live.push(WorkDir::new_in(parent, STAGE_PREFIX).unwrap());
        }
        let swept: usize = places(&roots)
            .iter()
            .map(|(parent, prefix)| sweep(parent, prefix))
            .sum();
        assert_eq!(swept, dead.len());
        for d in &dead {
            assert!(!d.exists(), "{}", d.display());
        }
        for l in &live {
            assert!(l.path().exists(), "a live owner's: {}", l.path().display());
        }
        assert!(generation.is_dir() && repo_disks.join("beef.qcow2").is_file());
    }

    /// Only a run's container names are recorded and read back, and only
    /// from a folder of this user.
    #[test]
    fn a_work_folder_owns_only_run_containers() {
        let parent = tempfile::tempdir().unwrap();
        let work = WorkDir::new_in(parent.path(), RUN_PREFIX).unwrap();
        owns_container(work.path(), "reprise-run-123-abcdef").unwrap();
        for bad in [
            "my-database",
            "reprise-run-",
            "reprise-run-1;rm -rf /",
            "reprise-run-a b",
        ] {
            assert!(owns_container(work.path(), bad).is_err(), "{bad}");
        }
        // A list written by someone else names whatever it likes.
        fs::write(
            work.path().join(CONTAINERS),
            "reprise-run-123-abcdef\nmy-database\n--all\nreprise-run-9-x\n",
        )
        .unwrap();
        assert_eq!(
            owned_containers(work.path()),
            ["reprise-run-123-abcdef", "reprise-run-9-x"]
        );
    }
}
