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
//!
//! Finding the folders is cheap: each is registered, from before it is
//! locked until it is removed or kept, by a symlink to it in the cache's
//! `work-folders/` ([`REGISTRY`]), and a command's sweep reads only that
//! folder. Listing every place folders are made in (the temporary folder,
//! every repository's snapshot folder) took 5 ms of CPU per command on a
//! developer's cache; it is done once a day ([`FULL_SWEEP_EVERY`]), for
//! what the registry cannot know (a folder whose owner died between making
//! and registering it, or made by an older version).

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

/// The folder in the user's cache where live work folders are registered.
pub const REGISTRY: &str = "work-folders";
/// The file in the user's cache whose time says when every place was last
/// listed.
const FULL_SWEEP_STAMP: &str = "work-folders.swept";
/// How often a command lists every place work folders are made in, rather
/// than only the registered ones.
pub const FULL_SWEEP_EVERY: Duration = Duration::from_secs(24 * 3600);

/// A work folder owned by this process; removed when dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    _owner: Option<Flock<File>>,
    remove: bool,
    /// Its symlink in the registry, if registering worked.
    entry: Option<PathBuf>,
}

impl WorkDir {
    /// Makes `<parent>/<prefix><random>/` (and `parent`), owned and locked
    /// by this process, registered in the user's cache.
    pub fn new_in(parent: &Path, prefix: &str) -> std::io::Result<WorkDir> {
        Self::new_registered_in(parent, prefix, &crate::paths::cache_dir().join(REGISTRY))
    }

    /// [`WorkDir::new_in`], registered in `registry`.
    fn new_registered_in(parent: &Path, prefix: &str, registry: &Path) -> std::io::Result<WorkDir> {
        fs::create_dir_all(parent)?;
        let path = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)?
            .keep();
        // Registered before it is locked, so a sweep never misses a folder
        // whose owner died after locking it. One that cannot be registered
        // (an unwritable cache) is still made: the daily full sweep finds it.
        let entry = register(registry, &path);
        let mut dir = WorkDir {
            path,
            _owner: None,
            remove: true,
            entry,
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
        // Removed or kept: no sweep is to look at it again.
        if let Some(entry) = &self.entry {
            let _ = fs::remove_file(entry);
        }
    }
}

/// Registers the work folder `path` in `registry`: a symlink to it, named
/// by a digest of its path. Returns the symlink.
fn register(registry: &Path, path: &Path) -> Option<PathBuf> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    let name: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let entry = registry.join(name);
    fs::create_dir_all(registry).ok()?;
    // A stale entry of the same path (its folder long gone) is replaced.
    let _ = fs::remove_file(&entry);
    std::os::unix::fs::symlink(path, &entry).ok()?;
    Some(entry)
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
    let mut places = fixed_places(roots);
    for snapshots in snapshot_folders(roots) {
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

/// The snapshot folders of both drivers, each holding a folder per
/// repository.
fn snapshot_folders(roots: &Roots) -> [PathBuf; 2] {
    [
        roots.cache.join("snapshots"),
        roots.cache.join("snapshots-podman"),
    ]
}

/// The places of [`places`] that do not depend on what is on disk.
fn fixed_places(roots: &Roots) -> Vec<(PathBuf, &'static str)> {
    let cache = &roots.cache;
    vec![
        (roots.temp.clone(), RUN_PREFIX),
        (cache.join("vms"), VM_PREFIX),
        (roots.runtime.clone(), SOCKETS_PREFIX),
        (roots.runtime.clone(), NET_PREFIX),
        (cache.join("images"), BUILD_PREFIX),
        (cache.join("podman"), IMPORT_PREFIX),
        (cache.join("saved-guests"), STAGE_PREFIX),
        (roots.store.join("tmp"), ""),
    ]
}

/// Every kind of work folder of every owner that is gone, with the
/// containers they own: the registered ones, and once a day
/// ([`FULL_SWEEP_EVERY`]) every one in every place. Returns how many were
/// removed.
pub fn sweep_all(store_root: &Path) -> usize {
    let roots = Roots::of_user(store_root);
    let mut removed = sweep_registered(&roots);
    let stamp = roots.cache.join(FULL_SWEEP_STAMP);
    let due = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age > FULL_SWEEP_EVERY);
    if due {
        // Stamped first: two commands starting together list once.
        let _ = fs::create_dir_all(&roots.cache).and_then(|()| fs::write(&stamp, b""));
        removed += places(&roots)
            .iter()
            .map(|(parent, prefix)| sweep(parent, prefix))
            .sum::<usize>();
    }
    removed
}

/// Removes the registered work folders whose owners are gone (and their
/// containers), and the entries of folders that are gone. A registered
/// folder outside this user's places (another temporary folder, say, as
/// set by another command's `TMPDIR`), or named as no work folder is, is
/// never removed: the registry names folders, it does not vouch for them.
fn sweep_registered(roots: &Roots) -> usize {
    let Ok(entries) = fs::read_dir(roots.cache.join(REGISTRY)) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let entry = e.path();
        let Ok(target) = fs::read_link(&entry) else {
            let _ = fs::remove_file(&entry);
            continue;
        };
        let is_dir = fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir());
        if !is_dir {
            let _ = fs::remove_file(&entry);
            continue;
        }
        if sweepable(roots, &target)
            && abandoned(&target)
            && release(&target)
            && fs::remove_dir_all(&target).is_ok()
        {
            let _ = fs::remove_file(&entry);
            removed += 1;
        }
    }
    removed
}

/// Whether `dir` is where and as [`places`] says work folders are made.
fn sweepable(roots: &Roots, dir: &Path) -> bool {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return false;
    };
    let name = name.to_string_lossy();
    if fixed_places(roots)
        .iter()
        .any(|(place, prefix)| place == parent && name.starts_with(prefix))
    {
        return true;
    }
    name.starts_with(STAGE_PREFIX)
        && snapshot_folders(roots)
            .iter()
            .any(|s| parent == s || parent.parent() == Some(s.as_path()))
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

    /// A user's places, all beneath `dir`.
    fn roots_in(dir: &Path) -> Roots {
        Roots {
            temp: dir.join("tmp"),
            cache: dir.join("cache"),
            runtime: dir.join("run"),
            store: dir.join("store"),
        }
    }

    /// Regression: a snapshot generation or saved guest being made by a
    /// killed run (`.stage-*` beside the finished ones, in the snapshot
    /// folders of both drivers) was never removed.
    #[test]
    fn stage_folders_of_dead_owners_are_swept_beside_snapshots_and_saved_guests() {
        let dir = tempfile::tempdir().unwrap();
        let roots = roots_in(dir.path());
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

    /// A command's sweep reads only the registry: it removes registered
    /// folders of dead owners where work folders are made, never a live
    /// owner's, a kept one, or a folder elsewhere that an entry names; and
    /// it forgets entries of folders that are gone.
    #[test]
    fn the_registry_names_the_folders_a_sweep_looks_at() {
        let dir = tempfile::tempdir().unwrap();
        let roots = roots_in(dir.path());
        let registry = roots.cache.join(REGISTRY);
        let entries = || fs::read_dir(&registry).map_or(0, |d| d.count());
        let make = |parent: &Path, prefix: &str| {
            WorkDir::new_registered_in(parent, prefix, &registry).unwrap()
        };
        let dead = |parent: &Path, prefix: &str| {
            let mut d = make(parent, prefix);
            d._owner = None;
            d.remove = false;
            d.entry = None;
            d.path().to_path_buf()
        };
        let run = dead(&roots.temp, RUN_PREFIX);
        let stage = dead(&roots.cache.join("snapshots/0123-recipe"), STAGE_PREFIX);
        // Registered, dead, but not where work folders are made (another
        // command's TMPDIR), or not named as one.
        let elsewhere = dead(&dir.path().join("other-tmp"), RUN_PREFIX);
        let misnamed = dead(&roots.temp, "precious-");
        let live = make(&roots.temp, RUN_PREFIX);
        let kept = make(&roots.temp, RUN_PREFIX).keep();
        let gone = dead(&roots.temp, RUN_PREFIX);
        fs::remove_dir_all(&gone).unwrap();
        assert_eq!(entries(), 6, "every folder but the kept one is registered");

        assert_eq!(sweep_registered(&roots), 2);
        assert!(!run.exists() && !stage.exists());
        for stays in [&elsewhere, &misnamed, &kept, live.path()] {
            assert!(stays.exists(), "{}", stays.display());
        }
        assert_eq!(entries(), 3, "the removed and the gone are forgotten");
        drop(live);
        assert_eq!(entries(), 2, "a dropped work folder unregisters itself");
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
