//! The saved guests that runs start from instead of booting.
//!
//! One state per base image, accelerator, machine shape and qemu version,
//! kept under the user's cache folder: made once by booting the image cold
//! with an empty snapshot-disk slot and saving it ([`Vm::save_state`]), then
//! restored by every run that fits it (see [`crate::vm::saved`]). Under
//! TCG here a restore reaches a ready guest in about 2 s against 5–8 s for a
//! cold boot.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

use crate::vm::{BootError, GuestCommand, SavedGuest, SavedGuestError, SnapshotDisk, Vm, VmConfig};

/// Bumped when what a saved guest holds changes (the guest's state at the
/// save, the device set).
const FORMAT: u32 = 4;

/// Reads the container tools and their libraries into the page cache.
const WARM_UP: &str = "set -e; bins='/usr/bin/podman /usr/bin/conmon /usr/bin/crun'; \
    cat $bins /etc/containers/* /usr/share/containers/* > /dev/null 2>&1 || true; \
    for b in $bins; do ldd $b; done | awk '/=> \\//{print $3}' | sort -u | xargs cat > /dev/null";

/// Why no saved guest could be made.
#[derive(Debug, Error)]
pub enum SavedGuestsError {
    #[error("booting the guest to save its state")]
    Boot(#[from] BootError),
    #[error(transparent)]
    Save(#[from] SavedGuestError),
    #[error("io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The folder of saved guests.
#[derive(Debug, Clone)]
pub struct SavedGuests {
    root: PathBuf,
}

impl SavedGuests {
    pub fn new(root: PathBuf) -> SavedGuests {
        SavedGuests { root }
    }

    /// Under the user's cache folder.
    pub fn default_location() -> SavedGuests {
        SavedGuests::new(crate::paths::cache_dir().join("saved-guests"))
    }

    /// The machine a saved guest is made on for `config`: its image,
    /// accelerator, memory and CPUs, network card or not, no tree, an empty
    /// snapshot slot.
    fn source_config(config: &VmConfig) -> VmConfig {
        let mut source = config.clone();
        source.tree = None;
        source.tty = false;
        source.backing = None;
        source.restore = None;
        source.snapshot_disk = Some(SnapshotDisk::Empty);
        source.may_spawn = true;
        source
    }

    /// The name of the state that fits `config`.
    pub fn key(config: &VmConfig) -> String {
        let mut text = format!(
            "reprise-state/{FORMAT}\nimage {}\naccel {}\nmemory {}\ncpus {}\nqemu {}\nnetwork {}\n",
            config.image.manifest.digest,
            config.accel,
            config.memory_mib,
            config.cpus,
            qemu_version(),
            config.network
        );
        for arg in &config.kernel_args {
            text.push_str(&format!("arg {}\n", arg.len()));
            text.push_str(arg);
        }
        reprise_protocol::hex::sha256(text.as_bytes())[..24].to_string()
    }

    /// The saved guest for `config` if it was made already. Marks it used.
    pub fn get(&self, config: &VmConfig) -> Option<SavedGuest> {
        let dir = self.root.join(Self::key(config));
        let saved = SavedGuest::load(&dir)?;
        if let Ok(f) = std::fs::File::open(&dir) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(saved)
    }

    /// Removes states unused for [`crate::snapshots::MAX_AGE`] (made for
    /// another image, accelerator or qemu, they are never used again).
    fn remove_unused(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let unused = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > crate::snapshots::MAX_AGE);
            if unused {
                let _ = match e.path().is_dir() {
                    true => std::fs::remove_dir_all(e.path()),
                    false => std::fs::remove_file(e.path()),
                };
            }
        }
    }

    /// The saved guest for `config`, made now if there is none (a cold boot
    /// and a save, once; `step` is told). Safe against concurrent callers.
    pub async fn ensure(
        &self,
        config: &VmConfig,
        step: &mut (dyn FnMut(&str) + Send),
    ) -> Result<SavedGuest, SavedGuestsError> {
        if let Some(saved) = self.get(config) {
            return Ok(saved);
        }
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| SavedGuestsError::Io { path, source }
        };
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let key = Self::key(config);
        let lock_path = self.root.join(format!("{key}.lock"));
        let file = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
        let _lock = tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
            .await
            .map_err(|e| SavedGuestsError::Io {
                path: lock_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(|(_, errno)| SavedGuestsError::Io {
                path: lock_path.clone(),
                source: errno.into(),
            })?;
        if let Some(saved) = self.get(config) {
            return Ok(saved);
        }
        step("saving a booted guest to start runs from (once per image and accelerator)");
        self.remove_unused();
        let dest = self.root.join(&key);
        // Made in a work folder of this process beside the saved guests
        // (`.stage-*`), which the next command removes if this one dies.
        let stage = crate::workdir::WorkDir::new_in(&self.root, crate::workdir::STAGE_PREFIX)
            .map_err(io(&self.root))?;
        let scratch = stage.path().join(&key);
        std::fs::create_dir_all(&scratch).map_err(io(&scratch))?;
        let mut source_config = Self::source_config(config);
        // Its RAM is a file the saved guest keeps: restored guests map it
        // and read only the pages they touch.
        source_config.memory_file = Some(crate::vm::MemoryFile {
            path: crate::vm::saved::ram_file(&scratch),
            shared: true,
        });
        let made = async {
            let vm = Vm::boot(&source_config).await?;
            // Every run starts podman, conmon and crun: their files go into
            // the saved page cache instead of being read in every run.
            vm.exec(&GuestCommand::shell(WARM_UP))
                .await
                .map_err(SavedGuestError::from)?;
            let saved = vm.save_state(&scratch, &source_config).await;
            vm.shutdown().await;
            saved.map_err(SavedGuestsError::from)
        }
        .await;
        made?;
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&scratch, &dest).map_err(io(&dest))?;
        drop(stage);
        SavedGuest::load(&dest).ok_or_else(|| SavedGuestsError::Io {
            path: dest,
            source: std::io::Error::other("the saved guest is incomplete"),
        })
    }

    /// Removes a saved guest that failed to restore, so the next run makes
    /// it anew.
    pub fn discard(&self, saved: &SavedGuest) {
        if saved.dir().starts_with(&self.root) {
            let _ = std::fs::remove_dir_all(saved.dir());
        }
    }

    /// The saved guests on disk: folder and bytes used.
    pub fn list(&self) -> Vec<(PathBuf, u64)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut states: Vec<(PathBuf, u64)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| SavedGuest::load(p).is_some())
            .map(|p| {
                let bytes = crate::vm::disk::tree_disk_bytes(&p);
                (p, bytes)
            })
            .collect();
        states.sort();
        states
    }

    /// Removes every saved guest. Returns how many there were.
    pub fn drop_all(&self) -> std::io::Result<usize> {
        let n = std::fs::read_dir(&self.root).map_or(0, |entries| {
            entries
                .flatten()
                .filter(|e| SavedGuest::load(&e.path()).is_some())
                .count()
        });
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(n),
        }
    }
}

/// The first line of `qemu-system-x86_64 --version` (a saved guest only
/// loads into the qemu that made it), or "unknown".
fn qemu_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_unused_for_a_week_are_removed_and_used_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let states = SavedGuests::new(dir.path().to_path_buf());
        let old = dir.path().join("old");
        let recent = dir.path().join("recent");
        for d in [&old, &recent] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("state.bin"), b"x").unwrap();
        }
        std::fs::write(dir.path().join("old.lock"), b"").unwrap();
        let long_ago =
            SystemTime::now() - crate::snapshots::MAX_AGE - std::time::Duration::from_secs(60);
        for p in [old.clone(), dir.path().join("old.lock")] {
            std::fs::File::open(&p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        states.remove_unused();
        assert!(!old.exists() && !dir.path().join("old.lock").exists());
        assert!(recent.join("state.bin").is_file());
    }
}
