//! The qemu driver: the OS is a VM of the base image, restored from the
//! saved guest (or booted cold with `REPRISE_COLD_BOOT=1`, or when no saved
//! guest loads), KVM when usable and TCG otherwise. Its network card is on
//! passt ([`crate::vm`]): the outside network, nothing of the host. The
//! repository's snapshot is a qcow2 disk of its own ([`crate::snapshots`]),
//! plugged in as `/dev/vdc` over a generation (or the blank disk) and
//! folded into a new generation after a pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use reprise_protocol::digest::RunKey;
use reprise_protocol::manifest::Snapshot;

use super::{ARTIFACTS, REPO, SNAPSHOT};
use super::{Driver, Output, Prepared, Session, Stream};
use crate::accel::{self, AccelFacts};
use crate::error::RunError;
use crate::image::{Image, ImageCache};
use crate::saved_guests::SavedGuests;
use crate::snapshots::{RepoId, SnapshotStart, Snapshots};
use crate::text::error_chain;
use crate::ui::Ui;
use crate::vm::{
    GUEST_SNAPSHOT_DEVICE, GuestCommand, SNAPSHOT_OVERLAY, SnapshotDisk, Vm, VmConfig, VmError,
};

/// Boots cold instead of restoring the saved guest (to compare, or to rule
/// it out when something looks wrong).
pub use crate::vars::COLD_BOOT_VAR;

/// Flushes and checkpoints the snapshot disk's file system, so the disk
/// file is consistent once qemu stops ([`Vm::settle`]).
fn freeze_snapshot() -> String {
    Vm::settle(SNAPSHOT)
}

/// Runs in a qemu VM.
#[derive(Debug, Default)]
pub struct Qemu;

/// The machine of a run on `image` under `accel`, before its tree and
/// snapshot: what a saved guest and a warm guest are made for.
pub fn run_config(image: Image, accel: crate::accel::Accel) -> VmConfig {
    let mut config = VmConfig::new(image, accel);
    // Every run's VM has a network card (the saved guest has one):
    // preparation may use it, the tests get it only with --network.
    config.network = true;
    config
}

/// The warm guest of a running `reprise daemon --warm`, if it has one for
/// `config` (which names no saved guest yet), with the run's disks plugged
/// in; `None` (and a note saying why, if a daemon was asked) otherwise.
async fn warm_start(config: &VmConfig, ui: &dyn Ui) -> Option<(Vm, String)> {
    let data = crate::paths::data_dir();
    let key = SavedGuests::key(config);
    let (lent, lease) = match crate::daemon::borrow_warm(&data, &key).await {
        Ok(Some(lent)) => lent,
        Ok(None) => return None,
        Err(why) => {
            ui.note(&format!(
                "no warm guest from the reprise daemon ({why}); restoring one here"
            ));
            return None;
        }
    };
    let plugged = async {
        let mut vm = Vm::attach(&lent, lease, config.agent_timeout)
            .await
            .map_err(|e| error_chain(&e))?;
        let plugged = vm
            .plug_run_disks(config, &lent.guest)
            .await
            .map_err(|e| error_chain(&e))?;
        Ok::<_, String>((vm, plugged.script))
    }
    .await;
    match plugged {
        Ok((vm, script)) => {
            ui.note(&format!(
                "using the reprise daemon's warm guest {} (restored and podman started in it before this run; the run's disks plugged in)",
                lent.guest
            ));
            Some((vm, script))
        }
        Err(why) => {
            ui.note(&format!(
                "the reprise daemon's warm guest {} could not be used ({why}); restoring one here",
                lent.guest
            ));
            None
        }
    }
}

/// A running VM of a run.
#[derive(Debug)]
pub struct QemuSession {
    vm: Vm,
    start: SnapshotStart,
    snapshots: Snapshots,
    repo: RepoId,
    image: Image,
    work: PathBuf,
    /// Run first in the guest ([`Session::os_setup`]): sets `$state_dev`
    /// (and, in a warm guest, finds the run's disks and mounts its data
    /// disk).
    os_setup: String,
}

impl Driver for Qemu {
    type Session = QemuSession;

    async fn start(
        &self,
        run: &Prepared<'_>,
        ui: &dyn Ui,
    ) -> Result<(QemuSession, &'static str), RunError> {
        let image = tokio::task::block_in_place(|| {
            ImageCache::default_location().ensure(&mut |step| ui.image_step(step))
        })?;
        let choice = accel::choose(&AccelFacts::probe(), run.accel);
        ui.note(&format!("accelerator {}", choice.reason));
        let snapshots = Snapshots::default_location();
        let repo = run.repo.clone();
        let start = run.snapshot_start(&snapshots, &image, ui, || {
            Ok(tokio::task::block_in_place(|| snapshots.blank())?)
        })?;
        let mut config = run_config(image.clone(), choice.accel);
        config.tree = Some(run.tree.clone());
        config.snapshot_disk = Some(SnapshotDisk::On(start.path().to_path_buf()));
        let cold = std::env::var_os(COLD_BOOT_VAR).is_some_and(|v| !v.is_empty() && v != "0");
        // A warm guest of the daemon: its disks are mounted by the run's
        // first guest command; any other guest has them from its start.
        let warm = if cold {
            None
        } else {
            warm_start(&config, ui).await
        };
        let (vm, setup, phase) = match warm {
            Some((vm, script)) => (vm, script, "warm"),
            None => {
                let (vm, phase) = boot_or_restore(&mut config, cold, ui).await?;
                (vm, format!("state_dev={GUEST_SNAPSHOT_DEVICE}; "), phase)
            }
        };
        let session = QemuSession {
            vm,
            start,
            snapshots,
            repo,
            image,
            work: run.work.to_path_buf(),
            os_setup: setup,
        };
        Ok((session, phase))
    }
}

/// Boots the guest of `config`: from the saved guest unless `cold` (made
/// first if need be), else or when it does not load, from scratch. The
/// phase is "restore" or "boot".
async fn boot_or_restore(
    config: &mut VmConfig,
    cold: bool,
    ui: &dyn Ui,
) -> Result<(Vm, &'static str), RunError> {
    let saved_guests = SavedGuests::default_location();
    if !cold {
        match saved_guests
            .ensure(config, &mut |step| ui.image_step(step))
            .await
        {
            Ok(saved) => config.restore = Some(saved),
            Err(e) => ui.note(&format!(
                "booting cold: no saved guest ({})",
                error_chain(&e)
            )),
        }
    }
    let vm = match Vm::boot(config).await {
        Err(e) if config.restore.is_some() => {
            // A saved guest that does not load (qemu changed under it, a
            // damaged file) is made anew next time; this run boots cold.
            ui.note(&format!(
                "the saved guest did not restore ({}); booting cold",
                error_chain(&e)
            ));
            if let Some(saved) = &config.restore {
                saved_guests.discard(saved);
            }
            let mut cold = config.clone();
            cold.restore = None;
            Vm::boot(&cold).await?
        }
        booted => booted?,
    };
    let phase = if config.restore.is_some() {
        "restore"
    } else {
        "boot"
    };
    Ok((vm, phase))
}

impl QemuSession {
    fn command(&self, argv: &[String], env: &BTreeMap<String, String>) -> GuestCommand {
        let mut cmd = GuestCommand::new(argv.iter().cloned()).cwd(REPO);
        cmd.env = env.clone();
        cmd
    }

    /// A guest failure with the console's last lines, which usually say why.
    fn guest(&self, error: VmError) -> RunError {
        RunError::Guest {
            error,
            console: self.vm.console_tail(15),
        }
    }
}

impl Session for QemuSession {
    async fn exec(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        sink: &mut (dyn FnMut(Stream, &[u8]) + Send),
    ) -> Result<i32, RunError> {
        self.vm
            .exec_streaming(&self.command(argv, env), sink)
            .await
            .map_err(|e| self.guest(e))
    }

    async fn capture(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
    ) -> Result<Output, RunError> {
        self.vm
            .exec(&self.command(argv, env))
            .await
            .map_err(|e| self.guest(e))
    }

    async fn collect(&self, dest: &Path, settled: bool) -> Result<(), RunError> {
        let copied = match settled {
            true => self.vm.copy_out_settled(ARTIFACTS, dest).await,
            false => self.vm.copy_out(ARTIFACTS, dest).await,
        };
        copied.map_err(|e| self.guest(e))
    }

    fn settle_artifacts(&self) -> Option<String> {
        Some(Vm::settle_data_disk())
    }

    fn settle_snapshot(&self) -> Option<String> {
        Some(freeze_snapshot())
    }

    fn os_setup(&self) -> String {
        self.os_setup.clone()
    }

    /// Mounts the snapshot disk, `$state_dev` ([`Session::os_setup`] sets
    /// it), at [`SNAPSHOT`].
    fn os_steps(&self) -> Vec<String> {
        ["mkdir", SNAPSHOT, "mount-ext4", "\"$state_dev\"", SNAPSHOT]
            .map(String::from)
            .to_vec()
    }

    fn console_tail(&self) -> String {
        self.vm.console_tail(20)
    }

    fn isolation(&self) -> String {
        self.vm.accel().to_string()
    }

    fn snapshot(&self) -> Snapshot {
        self.start.snapshot()
    }

    async fn finish(
        self,
        passed: bool,
        settled: bool,
        key: &RunKey,
        ui: &dyn Ui,
    ) -> Result<(), RunError> {
        // A consistent snapshot disk: freeze (flush and checkpoint the file
        // system), thaw, then stop qemu and keep the overlay.
        if passed && !settled {
            let _ = self.vm.exec(&GuestCommand::shell(&freeze_snapshot())).await;
        }
        let kept = self.work.join("vm");
        self.vm.stop_keeping(&kept).await?;
        let overlay = kept.join(SNAPSHOT_OVERLAY);
        // Only a run whose tests passed writes the repository's snapshot: a
        // failed run could have planted anything (an image that makes
        // later tests pass).
        if passed {
            let t = Instant::now();
            ui.begin("snapshot");
            match self
                .snapshots
                .update(&self.repo, &self.image, &overlay, self.start, key)
            {
                Ok(_) => ui.phase("snapshot", t.elapsed()),
                Err(e) => ui.note(&format!("could not update the repository's snapshot: {e}")),
            }
        }
        let _ = std::fs::remove_file(&overlay);
        Ok(())
    }
}
