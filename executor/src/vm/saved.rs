//! Saving a booted guest's state once and booting later VMs from it, which
//! skips the kernel boot and init (the big lever under TCG).
//!
//! The machine that saves a guest has its RAM in a file of the saved
//! guest's folder, shared with it ([`VmConfig::memory_file`]).
//! [`Vm::save_state`] unmounts the data disk in the guest, stops the CPUs
//! for good, writes the rest of the machine state with QMP `migrate` to
//! `exec:cat > FILE` (qemu 7.2 has no `file:` transport), the RAM left out
//! (`x-ignore-shared`: the file is the RAM), and keeps a copy of the root
//! overlay as it was at that moment: the saved memory (page cache, ext4
//! state) matches that disk and no other. A VM booted with
//! [`VmConfig::restore`] maps the RAM file copy-on-write (a private
//! mapping: its pages are read as the guest touches them, shared between
//! guests until one writes, and the file never changes), gets a fresh
//! overlay on top of the disk copy, the same device set (`-incoming`
//! requires it) and a new data disk in the same slot; once the state is
//! loaded, the host tells the guest the data disk's new size
//! (`block_resize`), and the guest drops what it cached of the old disk,
//! mounts the new one and takes the host's clock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qapi::qmp;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::time::sleep;

use super::{GUEST_DATA, GuestCommand, Vm, VmConfig, VmError};
use crate::accel::Accel;

/// The `-drive` id of the data disk.
pub(super) const DATA_DRIVE: &str = "data";
/// The `-drive` id of the snapshot disk.
pub(super) const SNAPSHOT_DRIVE: &str = "state";
const STATE_FILE: &str = "state.bin";
const DISK_FILE: &str = "disk.qcow2";
const META_FILE: &str = "meta.json";
/// The saved guest's RAM: the file the machine that saved it had as its
/// RAM ([`VmConfig::memory_file`]).
const RAM_FILE: &str = "ram.bin";

/// Where the machine that saves a guest into `dir` keeps its RAM.
pub fn ram_file(dir: &Path) -> PathBuf {
    dir.join(RAM_FILE)
}

/// Why a guest state could not be saved or restored.
#[derive(Debug, Error)]
pub enum SavedGuestError {
    #[error("preparing the guest for saving: {0}")]
    Prepare(String),
    #[error("saving the guest state failed: {0}")]
    Migrate(String),
    #[error("the guest state was not saved within {0:?}")]
    Timeout(Duration),
    #[error("attaching the new data disk in the restored guest: {0}")]
    Attach(String),
    #[error("io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// A guest state saved by [`Vm::save_state`]: the machine state and the
/// root disk as they were, and the machine shape they need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedGuest {
    #[serde(skip)]
    dir: PathBuf,
    accel: Accel,
    memory_mib: u32,
    cpus: u32,
    network: bool,
    tty: bool,
    kernel_args: Vec<String>,
    bytes: u64,
    /// Whether the saved machine has a snapshot disk slot (`/dev/vdc`).
    state_slot: bool,
}

impl SavedGuest {
    /// The state saved in `dir` by [`Vm::save_state`], if it is complete.
    pub fn load(dir: &Path) -> Option<SavedGuest> {
        let meta = std::fs::read(dir.join(META_FILE)).ok()?;
        let mut saved: SavedGuest = serde_json::from_slice(&meta).ok()?;
        saved.dir = dir.to_path_buf();
        let whole = [saved.state_file(), saved.disk(), ram_file(dir)]
            .iter()
            .all(|f| f.is_file());
        whole.then_some(saved)
    }

    /// Whether VMs restored from it can have a snapshot disk.
    pub fn has_snapshot_slot(&self) -> bool {
        self.state_slot
    }

    /// The folder holding the state file and the root disk.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Size of the saved machine state in bytes (its RAM file's blocks
    /// included).
    pub fn state_bytes(&self) -> u64 {
        self.bytes
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The root disk at the time of the save; restored VMs put their
    /// overlay on it.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }

    /// `config` with the machine shape of the saved guest, booting on a
    /// fresh overlay of the saved disk.
    pub(super) fn apply(&self, config: &VmConfig) -> VmConfig {
        let mut c = config.clone();
        c.backing = Some(self.disk());
        c.accel = self.accel;
        c.memory_mib = self.memory_mib;
        c.cpus = self.cpus;
        c.network = self.network;
        c.tty = self.tty;
        c.kernel_args = self.kernel_args.clone();
        // Mapped copy-on-write: what the guest writes stays its own.
        c.memory_file = Some(super::MemoryFile {
            path: ram_file(&self.dir),
            shared: false,
        });
        c
    }

    /// The machine state file, which a restoring qemu is handed open.
    pub(super) fn state_path(&self) -> PathBuf {
        self.state_file()
    }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The capability that leaves a shared RAM file out of a saved state;
/// the machine that loads the state must have it set too.
fn ignore_shared() -> qmp::migrate_set_capabilities {
    qmp::migrate_set_capabilities {
        capabilities: vec![qmp::MigrationCapabilityStatus {
            capability: qmp::MigrationCapability::x_ignore_shared,
            state: true,
        }],
    }
}

/// Starts loading the state handed over as descriptor `fd` into a qemu
/// started with `-incoming defer`, the capability of a state saved
/// without its RAM set first (qemu 7.2 takes it only from the monitor).
pub(super) async fn load_deferred(qmp: &super::Monitor, fd: i32) -> std::io::Result<()> {
    qmp.execute(ignore_shared())
        .await
        .map_err(std::io::Error::other)?;
    qmp.execute(qmp::migrate_incoming {
        uri: Some(format!("fd:{fd}")),
        channels: None,
        exit_on_error: None,
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(())
}

/// Waits until the incoming state is loaded and the guest runs. The state
/// was saved with the CPUs stopped, and qemu keeps a guest in the run state
/// its source had, so a loaded guest left paused is started here.
pub(super) async fn wait_running(qmp: &super::Monitor) -> std::io::Result<()> {
    loop {
        let status = qmp
            .execute(qmp::query_status {})
            .await
            .map_err(std::io::Error::other)?;
        if status.running {
            return Ok(());
        }
        if status.status == qmp::RunState::paused {
            qmp.execute(qmp::cont {})
                .await
                .map_err(std::io::Error::other)?;
            continue;
        }
        sleep(Duration::from_millis(10)).await;
    }
}

impl Vm {
    /// Saves this guest's state into the new folder `dir` so that later
    /// VMs can boot from it (set [`VmConfig::restore`]). The guest's data
    /// disk is unmounted first (the restored guests mount their own), and
    /// this VM keeps running afterwards without it: use it for nothing but
    /// saving. Boot it without a tree so the data disk is small, and with
    /// [`VmConfig::may_spawn`] (qemu 7.2 writes the state through `exec:`,
    /// which its sandbox otherwise forbids). What the
    /// guest has cached of its root disk is saved with it (and stays true:
    /// restored guests run on a copy of that disk), so reading files in
    /// beforehand makes them instant for every restored guest.
    pub async fn save_state(
        &self,
        dir: &Path,
        config: &VmConfig,
    ) -> Result<SavedGuest, SavedGuestError> {
        if !self.may_spawn {
            return Err(SavedGuestError::Prepare(
                "this VM was started without may_spawn, so its sandbox forbids writing a state"
                    .into(),
            ));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SavedGuestError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let dir = std::path::absolute(dir).map_err(io(dir))?;
        // Its RAM must be the file restored guests will map.
        let ram_in_dir = config.memory_file.as_ref().is_some_and(|f| {
            f.shared && std::path::absolute(&f.path).is_ok_and(|p| p == ram_file(&dir))
        });
        if !ram_in_dir {
            return Err(SavedGuestError::Prepare(format!(
                "a saved guest's RAM is a file shared with it (memory_file), {}",
                ram_file(&dir).display()
            )));
        }
        let out = self
            .exec(&GuestCommand::shell(&format!(
                "sync; umount {GUEST_DATA} && sync && blockdev --flushbufs /dev/vdb"
            )))
            .await?;
        if !out.success() {
            return Err(SavedGuestError::Prepare(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        // Nothing of an agent connection survives into the saved guest.
        self.agent.disconnect().await;

        let state = dir.join(STATE_FILE);
        // The state leaves the RAM out (it is the file already), and the
        // source stays stopped, so the file stays as it was saved.
        self.qmp_call(ignore_shared()).await?;
        self.qmp_call(qmp::stop {}).await?;
        self.migrate_to(&state).await?;
        // On disk before the folder counts as complete: a crash must not
        // leave a state whose RAM is partly another's.
        let ram = ram_file(&dir);
        for path in [&ram, &state] {
            std::fs::File::open(path)
                .and_then(|f| f.sync_all())
                .map_err(io(path))?;
        }

        let overlay = self.work.path().join("overlay.qcow2");
        std::fs::copy(&overlay, dir.join(DISK_FILE)).map_err(io(&overlay))?;
        // What the RAM file holds on disk, not its (sparse) length.
        let bytes = std::fs::metadata(&state).map_err(io(&state))?.len()
            + std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&ram).map_err(io(&ram))?)
                * 512;
        let saved = SavedGuest {
            dir: dir.clone(),
            accel: config.accel,
            memory_mib: config.memory_mib,
            cpus: config.cpus,
            network: config.network,
            tty: config.tty,
            kernel_args: config.kernel_args.clone(),
            bytes,
            state_slot: config.snapshot_disk.is_some(),
        };
        // Written last: a folder with it is complete.
        let meta = dir.join(META_FILE);
        std::fs::write(&meta, serde_json::to_vec(&saved).unwrap_or_default()).map_err(io(&meta))?;
        Ok(saved)
    }

    async fn migrate_to(&self, state: &Path) -> Result<(), SavedGuestError> {
        self.qmp_call(qmp::migrate {
            uri: Some(format!("exec:cat > {}", shell_quote(state))),
            channels: None,
            detach: None,
            resume: None,
        })
        .await?;
        let limit = Duration::from_secs(120);
        let started = Instant::now();
        loop {
            let info = self.qmp_call(qmp::query_migrate {}).await?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => return Ok(()),
                Some(qmp::MigrationStatus::failed | qmp::MigrationStatus::cancelled) => {
                    return Err(SavedGuestError::Migrate(
                        info.error_desc.unwrap_or_else(|| "no reason given".into()),
                    ));
                }
                _ => {}
            }
            if started.elapsed() > limit {
                let _ = self.qmp_call(qmp::migrate_cancel {}).await;
                return Err(SavedGuestError::Timeout(limit));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// After an incoming state is loaded: tell the guest the new disks'
    /// sizes, mount the data disk where the saved guest had its old one, and
    /// set the guest's clock (it still reads the time of the save). The
    /// snapshot disk, if any, is left for the caller to mount.
    pub(super) async fn finish_restore(&self) -> Result<(), SavedGuestError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SavedGuestError::Io { path, source }
        };
        let data = self.data.clone();
        let size = std::fs::metadata(&data).map_err(io(&data))?.len();
        let mut disks = vec![(DATA_DRIVE, "vdb", size)];
        if let Some(slot) = &self.state_slot {
            let size = slot.guest_bytes().map_err(io(&slot.path))?;
            disks.push((SNAPSHOT_DRIVE, "vdc", size));
        }
        // Resizing to the current size still raises the config-change
        // interrupt, after which the guest reads the capacity anew.
        for (drive, _, size) in &disks {
            self.qmp_call(qmp::block_resize {
                device: Some((*drive).into()),
                node_name: None,
                size: *size as i64,
            })
            .await?;
        }
        // The clock is set from the shell: the agent's guest-set-time also
        // writes the hardware clock with hwclock, which waits for the next
        // second boundary (0.5 s on average, more under TCG).
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut script = format!(
            "date -u -s @{}.{:09} > /dev/null || exit 1; ",
            now.as_secs(),
            now.subsec_nanos()
        );
        // Wait until the guest sees each disk's size, then drop what it
        // cached of the disks that were in those slots when it was saved.
        // The size is read by the shell itself: a `cat` per look is a
        // process start, tens of milliseconds under TCG.
        script.push_str("size_of() { s=; read -r s 2>/dev/null < \"/sys/block/$1/size\"; }; ");
        for (_, dev, size) in &disks {
            let sectors = size / 512;
            script.push_str(&format!(
                "i=0; size_of {dev}; while [ \"$s\" != {sectors} ]; do \
                   i=$((i+1)); [ $i -gt 500 ] && {{ echo \"{dev} still has $s sectors\" >&2; exit 1; }}; \
                   sleep 0.01; size_of {dev}; done; \
                 blockdev --flushbufs /dev/{dev} || exit 1; "
            ));
        }
        script.push_str(&format!(
            "mount -t ext4 -o rw,noatime /dev/vdb {GUEST_DATA}"
        ));
        let out = self.exec(&GuestCommand::shell(&script)).await?;
        if !out.success() {
            return Err(SavedGuestError::Attach(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }
}
