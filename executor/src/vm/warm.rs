//! Warm guests: a guest restored from the saved state ahead of any run,
//! podman's code already translated by a throwaway podman call, kept by
//! `reprise daemon --warm` ([`crate::daemon`]) and lent to one run, which
//! plugs its own disks into it instead of starting qemu.
//!
//! Under TCG every new qemu translates the guest's code anew: the first
//! podman start in a restored guest costs about twice a later one. A warm
//! guest pays that before the run asks. What it holds before the hand-off is
//! the base image's state and the warm-up's own files (a busybox container
//! in a podman storage of its own, removed afterwards): nothing of any
//! repository. Its data disk has the guest binaries and an empty `repo/`,
//! its snapshot slot the blank placeholder. At the hand-off the run's data
//! disk and snapshot disk are hot-plugged into two empty PCIe slots
//! (QMP `blockdev-add` and `device_add virtio-blk-pci`, each with a serial),
//! found in the guest by serial under `/sys/block`, and mounted in place of
//! the warm guest's own data disk ([`Vm::plug_run_disks`]). Each warm guest
//! serves one run: the lender kills it when the lease ends.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qapi::qmp;
use serde::Serialize;
use thiserror::Error;
use tokio::net::UnixStream;
use tokio::process::Child;
use tracing::{debug, info_span};

use super::{
    Agent, BootError, Folder, GUEST_DATA, GuestCommand, Process, SNAPSHOT_OVERLAY, SlotFile,
    SnapshotDisk, Vm, VmConfig, VmError, disk, open_monitor, stage_data, start_frames,
};
use crate::accel::Accel;
use crate::workdir::WorkDir;

/// The ids of the two empty PCIe root ports every VM has.
pub(super) const PORTS: [&str; 2] = ["hp0", "hp1"];
/// The serials of the plugged disks, as the guest sees them in
/// `/sys/block/*/serial`.
const DATA_SERIAL: &str = "reprise-data";
const STATE_SERIAL: &str = "reprise-state";
/// The file in the guest holding the warm guest's id (a tmpfs: it goes
/// with the guest).
pub const MARKER: &str = "/run/reprise-warm";
/// The data disk file plugged in at a hand-off, in the VM's work folder.
const RUN_DATA: &str = "run-data.raw";

/// The warm-up: podman started once for each of the calls a run makes
/// (`image exists`, `run`, `image inspect`) on a one-file busybox image,
/// all in a storage of their own that is removed afterwards, so the run's
/// own storage (the repository's snapshot) never sees it. `$1` is the id.
const WARM_UP: &str = "set -e; echo \"$1\" > /run/reprise-warm; w=/run/reprise-warmup; \
    p=\"podman --root $w/root --runroot $w/runroot --tmpdir $w/tmp\"; \
    mkdir -p $w/fs/bin; cp /bin/busybox $w/fs/bin/; ln -s busybox $w/fs/bin/sh; ln -s busybox $w/fs/bin/true; \
    tar -C $w/fs -c . | $p import -q - localhost/reprise-warmup > /dev/null; \
    $p image exists localhost/reprise-warmup; \
    $p run --rm --pull=never --network none localhost/reprise-warmup /bin/true; \
    $p image inspect --format '{{.Id}}' localhost/reprise-warmup > /dev/null; \
    $p rmi -a -f > /dev/null 2>&1 || true; \
    umount -R $w/root $w/runroot 2>/dev/null || true; rm -rf $w";

/// Why a warm guest could not be made, lent or plugged.
#[derive(Debug, Error)]
pub enum WarmError {
    #[error("restoring the guest")]
    Boot(#[from] BootError),
    #[error("warming the guest up failed: {0}")]
    WarmUp(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("plugging the run's disks into the warm guest: {0}")]
    Plug(String),
    #[error("io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a lender tells a run about the warm guest it lends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lent {
    pub pid: u32,
    /// Its work folder (disks, console log) and sockets folder.
    pub work: PathBuf,
    pub sockets: PathBuf,
    /// The id written to [`MARKER`] in the guest.
    pub guest: String,
    pub accel: Accel,
}

/// A restored, warmed-up guest nobody is connected to, owned by the
/// process that made it (its qemu dies with that process).
pub struct WarmGuest {
    child: Child,
    work: WorkDir,
    sockets: WorkDir,
    _net: Option<super::net::Passt>,
    id: String,
    accel: Accel,
    /// How long the restore and the warm-up took.
    pub made_in: Duration,
}

impl std::fmt::Debug for WarmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmGuest")
            .field("id", &self.id)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl WarmGuest {
    /// Restores a guest for `config` (which names the saved guest in
    /// [`VmConfig::restore`] and has neither a tree nor a snapshot disk),
    /// warms it up and lets go of its sockets. `id` goes into [`MARKER`].
    pub async fn make(config: &VmConfig, id: &str) -> Result<WarmGuest, WarmError> {
        let started = Instant::now();
        if config.tree.is_some() || matches!(config.snapshot_disk, Some(SnapshotDisk::On(_))) {
            return Err(WarmError::WarmUp(
                "a warm guest is made without a tree or a snapshot".into(),
            ));
        }
        let vm = Vm::boot(config).await?;
        let out = vm
            .exec(
                &GuestCommand::new(["/bin/sh", "-c", WARM_UP, "warm-up", id])
                    .timeout(Duration::from_secs(600)),
            )
            .await?;
        if !out.success() {
            return Err(WarmError::WarmUp(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let mut warm = vm.into_warm(id);
        warm.made_in = started.elapsed();
        Ok(warm)
    }

    /// The id written in the guest.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What a run needs to reach the guest.
    pub fn lent(&self) -> Lent {
        Lent {
            pid: self.child.id().unwrap_or(0),
            work: self.work.path().to_path_buf(),
            sockets: self.sockets.path().to_path_buf(),
            guest: self.id.clone(),
            accel: self.accel,
        }
    }

    /// Whether qemu still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills qemu and removes its folders.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Whether process `pid` runs (exists and is not a zombie).
pub(super) fn runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `blockdev-add` of a disk file with its format on top.
#[derive(Debug, Serialize)]
struct BlockdevAdd {
    driver: &'static str,
    #[serde(rename = "node-name")]
    node_name: String,
    file: BlockFile,
    cache: BlockCache,
}

#[derive(Debug, Serialize)]
struct BlockFile {
    driver: &'static str,
    filename: String,
}

/// As `cache=unsafe` on the command line.
#[derive(Debug, Serialize)]
struct BlockCache {
    #[serde(rename = "no-flush")]
    no_flush: bool,
}

impl qapi::Command for BlockdevAdd {
    type Ok = qapi::Empty;
    const NAME: &'static str = "blockdev-add";
    const ALLOW_OOB: bool = false;
}
impl qmp::QmpCommand for BlockdevAdd {}

/// What [`Vm::plug_run_disks`] leaves for the caller: a shell fragment to
/// run first in the guest's next command.
#[derive(Debug, Clone)]
pub struct PluggedDisks {
    /// Waits for both disks, checks that the guest is the one lent and
    /// holds no repository, and mounts the data disk at [`GUEST_DATA`];
    /// leaves the snapshot disk's device in `$state_dev`.
    pub script: String,
}

impl Vm {
    /// Lets go of the guest's sockets (the agent, QMP, the stream port)
    /// and keeps the process running: another process may connect now.
    fn into_warm(mut self, id: &str) -> WarmGuest {
        self.stream_task.abort();
        self.qmp_events.abort();
        let child = match std::mem::replace(&mut self.process, Process::Gone) {
            Process::Own(child) => child,
            _ => unreachable!("a booted VM owns its qemu"),
        };
        let own =
            |folder: &mut Folder| match std::mem::replace(folder, Folder::Lent(PathBuf::new())) {
                Folder::Own(dir) => dir,
                Folder::Lent(_) => unreachable!("a booted VM owns its folders"),
            };
        let work = own(&mut self.work);
        let sockets = own(&mut self.sockets);
        WarmGuest {
            child,
            work,
            sockets,
            _net: self._net.take(),
            id: id.to_string(),
            accel: self.accel,
            made_in: self.boot_time,
        }
    }

    /// Connects to a warm guest lent by another process, for as long as
    /// `lease` (the connection to the lender) stays open.
    pub async fn attach(
        lent: &Lent,
        lease: std::os::unix::net::UnixStream,
        agent_timeout: Duration,
    ) -> Result<Vm, BootError> {
        let started = Instant::now();
        let span = info_span!("vm", id = %format!("warm-{}", lent.guest), accel = %lent.accel);
        let _enter = span.clone().entered();
        let qmp_path = lent.sockets.join("qmp.sock");
        let connect = |path: PathBuf| async move {
            // The lender has just let go; qemu accepts the next client.
            let mut tries = 0;
            loop {
                match UnixStream::connect(&path).await {
                    Ok(s) => return Ok(s),
                    Err(e) if tries > 100 => return Err(BootError::Qmp(e)),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        };
        let (qmp, mut events) = open_monitor(connect(qmp_path).await?).await?;
        let qmp_events =
            tokio::spawn(async move { while let Some(Ok(_)) = events.next().await {} });
        let (frames, stream_task) = start_frames(connect(lent.sockets.join("stream.sock")).await?);
        let agent = Agent::new(lent.sockets.join("qga.sock"), agent_timeout);
        agent.call(qapi::qga::guest_ping {}).await?;
        drop(_enter);
        let vm = Vm {
            process: Process::Lent {
                pid: lent.pid,
                _lease: lease,
            },
            work: Folder::Lent(lent.work.clone()),
            sockets: Folder::Lent(lent.sockets.clone()),
            data: lent.work.join("data.raw"),
            agent,
            qmp,
            qmp_events,
            frames,
            stream_task,
            accel: lent.accel,
            may_spawn: false,
            boot_time: started.elapsed(),
            next_id: std::sync::atomic::AtomicU64::new(1),
            span,
            state_slot: None,
            _net: None,
        };
        debug!(took = ?vm.boot_time, "attached to the warm guest");
        Ok(vm)
    }

    /// Makes the run's data disk (`config`'s tree and guest binaries) and
    /// its snapshot disk (an overlay on `config`'s snapshot disk) in the
    /// work folder and plugs both into the guest's empty slots. Nothing is
    /// mounted yet: run [`PluggedDisks::script`] in the guest first.
    pub async fn plug_run_disks(
        &mut self,
        config: &VmConfig,
        guest: &str,
    ) -> Result<PluggedDisks, WarmError> {
        let work = self.work.path().to_path_buf();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WarmError::Io { path, source }
        };
        let Some(SnapshotDisk::On(base)) = &config.snapshot_disk else {
            return Err(WarmError::Plug("the run has no snapshot disk".into()));
        };
        let data = work.join(RUN_DATA);
        let state = work.join(SNAPSHOT_OVERLAY);
        // Staged in `run/data`, as a booting VM stages `data`.
        let run = work.join("run");
        stage_data(config, &run).map_err(|e| WarmError::Plug(crate::text::error_chain(&e)))?;
        let staging = run.join("data");
        tokio::task::block_in_place(|| {
            disk::make_data_disk(&staging, &data, config.data_spare_bytes)?;
            disk::create_overlay(base, &state)
        })
        .map_err(|e| WarmError::Plug(crate::text::error_chain(&e)))?;
        std::fs::remove_dir_all(&run).map_err(io(&run))?;
        for (i, (node, file, format, serial)) in [
            ("rundata", &data, "raw", DATA_SERIAL),
            ("runstate", &state, "qcow2", STATE_SERIAL),
        ]
        .into_iter()
        .enumerate()
        {
            self.qmp_call(BlockdevAdd {
                driver: format,
                node_name: node.into(),
                file: BlockFile {
                    driver: "file",
                    filename: file.display().to_string(),
                },
                cache: BlockCache { no_flush: true },
            })
            .await?;
            let mut arguments = qapi::Dictionary::new();
            arguments.insert("drive".into(), node.into());
            arguments.insert("serial".into(), serial.into());
            self.qmp_call(qmp::device_add {
                bus: Some(PORTS[i].into()),
                id: Some(node.into()),
                driver: "virtio-blk-pci".into(),
                arguments,
            })
            .await?;
        }
        self.data = data;
        self.state_slot = Some(SlotFile {
            path: state,
            format: "qcow2",
        });
        // Shell builtins only until the mount: under TCG each process the
        // guest starts costs tens of milliseconds, and finding the disks
        // by `cat` of each one's serial in command substitutions took the
        // guest 0.5–0.6 s though they were there at the first look.
        let script = format!(
            "id=; read -r id 2>/dev/null < {MARKER}; \
             [ \"$id\" = '{guest}' ] || {{ echo 'this is not the warm guest {guest}' >&2; exit 1; }}; \
             for f in {GUEST_DATA}/repo/* {GUEST_DATA}/repo/.[!.]* {GUEST_DATA}/repo/..?*; do \
               [ -e \"$f\" ] || [ -L \"$f\" ] || continue; echo 'the warm guest holds a tree already' >&2; exit 1; done; \
             : > {MARKER}; \
             found() {{ data_dev=; state_dev=; for b in /sys/block/vd*; do s=; read -r s 2>/dev/null < \"$b/serial\"; \
               case \"$s\" in {DATA_SERIAL}) data_dev=/dev/${{b##*/}};; {STATE_SERIAL}) state_dev=/dev/${{b##*/}};; esac; done; \
               [ -b \"$data_dev\" ] && [ -b \"$state_dev\" ]; }}; \
             i=0; until found; do \
               i=$((i+1)); [ $i -gt 3000 ] && {{ echo 'the plugged disks did not appear' >&2; exit 1; }}; sleep 0.01; done; \
             {{ umount {GUEST_DATA} || umount -l {GUEST_DATA}; }} && mount -t ext4 -o rw,noatime \"$data_dev\" {GUEST_DATA} || exit 1; "
        );
        Ok(PluggedDisks { script })
    }
}
