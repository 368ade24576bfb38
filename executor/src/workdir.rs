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

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

/// The file naming and locking a work folder's owner.
const OWNER: &str = ".owner";
/// The file marking a work folder kept for inspection.
const KEPT: &str = ".kept";
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

/// Removes the folders in `parent` whose names start with `prefix` and
/// whose owners are gone. Returns how many.
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
            && fs::remove_dir_all(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// The places work folders are made in, and the prefix of each kind.
pub fn places(store_root: &Path) -> Vec<(PathBuf, &'static str)> {
    let cache = crate::paths::cache_dir();
    vec![
        (std::env::temp_dir(), RUN_PREFIX),
        (cache.join("vms"), VM_PREFIX),
        (crate::paths::runtime_dir(), SOCKETS_PREFIX),
        (crate::paths::runtime_dir(), NET_PREFIX),
        (cache.join("images"), BUILD_PREFIX),
        (cache.join("podman"), IMPORT_PREFIX),
        (store_root.join("tmp"), ""),
    ]
}

/// Every kind of work folder of every owner that is gone. Returns how many
/// were removed.
pub fn sweep_all(store_root: &Path) -> usize {
    places(store_root)
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
}
