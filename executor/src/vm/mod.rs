//! The qemu VM: boot a per-run copy-on-write overlay of the base image, then
//! drive it through QMP and the guest agent (both with the `qapi` crate).
//!
//! A [`Vm`] owns its qemu process (in its own process group, killed on drop
//! and when this process dies), its work folder (overlay, data disk, console
//! log) and three sockets: QMP, the guest agent, and the `reprise.stream`
//! port over which the guest helper streams a command's output live.

pub mod agent;
pub mod disk;
mod net;
pub mod saved;
pub mod shell;
pub mod warm;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qga;
use qapi::qmp;
use reprise_protocol::guest_stream::Frame;
use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, mpsc};
use tokio::time::{sleep, timeout};
use tracing::{debug, info_span, warn};

use crate::accel::Accel;
use crate::image::Image;
use crate::workdir::WorkDir;
pub use agent::{Agent, AgentError};
pub use disk::DiskError;
pub use saved::{SavedGuest, SavedGuestError};
pub use warm::{Lent, PluggedDisks, WarmError, WarmGuest};

/// Where the data disk is mounted in the guest.
pub const GUEST_DATA: &str = "/reprise";
/// Where the tree put into the guest appears (a link into the data disk).
pub const GUEST_REPO: &str = "/repo";
/// Reprise's helper in the guest, on the data disk (`reprise-guest`).
pub const GUEST_HELPER: &str = "/reprise/bin/reprise-guest";
/// The guest device of the snapshot disk ([`VmConfig::snapshot_disk`]).
pub const GUEST_SNAPSHOT_DEVICE: &str = "/dev/vdc";
/// The snapshot disk's overlay in a VM's work folder.
pub const SNAPSHOT_OVERLAY: &str = "state.qcow2";

/// How many missed deadlines in a row end a status poll while qemu does
/// no work (a hung guest), and while it keeps working (a guest starved of
/// host CPU under emulation, which answers late, not never): see
/// [`Vm::exec_status`].
const AGENT_IDLE_STALLS: u32 = 3;
const AGENT_BUSY_STALLS: u32 = 20;
/// CPU time qemu must have used during a missed deadline for the guest to
/// count as working.
const BUSY_CPU: Duration = Duration::from_secs(1);
const AGENT_PORT_ID: &str = "qgaport";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub image: Image,
    /// The disk the root overlay is made on; the image's disk unless a
    /// saved guest is restored.
    pub backing: Option<PathBuf>,
    /// A third disk (`/dev/vdc`) for the repository's state. The guest
    /// mounts nothing of it by itself.
    pub snapshot_disk: Option<SnapshotDisk>,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// A network card, on user-mode networking through passt (the outside
    /// network, nothing of the host's); off unless asked for.
    pub network: bool,
    /// A host folder whose contents appear at `/repo` in the guest.
    pub tree: Option<PathBuf>,
    /// Static binaries put on the data disk's `bin/` (guest helper, mk).
    pub guest_bins: Vec<PathBuf>,
    /// Spare room on the data disk for what the guest writes there.
    pub data_spare_bytes: u64,
    pub boot_timeout: Duration,
    pub agent_timeout: Duration,
    /// Extra kernel command line arguments.
    pub kernel_args: Vec<String>,
    /// Folder for the VM's work files (a fresh sub-folder is made in it).
    pub work_root: PathBuf,
    /// Boot from a saved guest instead of cold (see [`saved`]);
    /// its accelerator, memory and CPUs replace this config's.
    pub restore: Option<SavedGuest>,
    /// A second serial port (`/dev/ttyS1` in the guest) on a host socket,
    /// for an interactive shell (see [`shell`]).
    pub tty: bool,
    /// qemu may start a process: only the machine that writes a saved
    /// guest needs to (its state goes out through `exec:cat`), and it runs
    /// nothing but the bare base image. Every other qemu runs with
    /// `spawn=deny` in its seccomp filter.
    pub may_spawn: bool,
    /// The guest's RAM in a file instead of anonymous memory: the machine
    /// that writes a saved guest shares it (the file is its RAM, and the
    /// saved state leaves it out), a restored one maps it copy-on-write,
    /// so its pages are read as the guest touches them rather than all
    /// before it runs ([`saved`]).
    pub memory_file: Option<MemoryFile>,
}

/// A file holding a guest's RAM ([`VmConfig::memory_file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFile {
    pub path: PathBuf,
    /// The guest writes the file (`share=on`); otherwise its writes stay
    /// its own (`share=off`, a private mapping).
    pub shared: bool,
}

impl VmConfig {
    /// Defaults for `image`, with the guest binaries found beside this
    /// executable.
    pub fn new(image: Image, accel: Accel) -> VmConfig {
        let slow = accel == Accel::Tcg;
        VmConfig {
            image,
            backing: None,
            snapshot_disk: None,
            accel,
            memory_mib: 2048,
            // Under TCG one vCPU: with two, CI runs saw the guest kernel
            // deadlock while podman started a container (both vCPUs in
            // soft lockup for minutes, qemu spinning), twice in a row on
            // a quiet runner. One vCPU has no other CPU to wait for.
            cpus: if slow {
                1
            } else {
                std::thread::available_parallelism().map_or(2, |n| n.get().min(4) as u32)
            },
            network: false,
            tree: None,
            guest_bins: default_guest_bins(),
            data_spare_bytes: 256 << 20,
            boot_timeout: Duration::from_secs(if slow { 120 } else { 30 }),
            agent_timeout: Duration::from_secs(if slow { 30 } else { 10 }),
            kernel_args: Vec::new(),
            work_root: crate::paths::cache_dir().join("vms"),
            restore: None,
            tty: false,
            may_spawn: false,
            memory_file: None,
        }
    }
}

/// The static guest helper and mk, found beside this executable (or named by
/// `REPRISE_GUEST_BIN_DIR`).
pub fn default_guest_bins() -> Vec<PathBuf> {
    let dir = std::env::var_os(crate::vars::GUEST_BIN_DIR_VAR).map(PathBuf::from);
    ["reprise-guest", "mk"]
        .iter()
        .filter_map(|name| match &dir {
            Some(d) => Some(d.join(name)).filter(|p| p.is_file()),
            None => crate::paths::sibling_exe(name),
        })
        .collect()
}

/// What is in the snapshot disk slot ([`VmConfig::snapshot_disk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotDisk {
    /// A fresh overlay (`state.qcow2` in the work folder) on this qcow2.
    On(PathBuf),
    /// A small blank disk that is never used (so that the machine has the
    /// slot, e.g. when saving a state that runs restore with a snapshot disk).
    Empty,
}

/// Why a VM did not come up.
#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot start qemu-system-x86_64 (install it with: apt-get install qemu-system-x86)")]
    QemuMissing(#[source] std::io::Error),
    #[error("cannot start passt, the guest's network (install it with: apt-get install passt)")]
    PasstMissing(#[source] std::io::Error),
    #[error("passt did not open its socket: {0}")]
    Passt(String),
    #[error(
        "the guest helper reprise-guest was not found beside the reprise binary (build the workspace, or set REPRISE_GUEST_BIN_DIR)"
    )]
    HelperMissing,
    #[error("preparing the VM's disks")]
    Disk(#[from] DiskError),
    #[error("qemu exited during boot ({status})\n{}", diagnostics(.console, .qemu_log))]
    Exited {
        status: String,
        console: String,
        qemu_log: String,
    },
    #[error("the guest agent was not ready after {after:?} ({accel})\n{}", diagnostics(.console, .qemu_log))]
    Timeout {
        after: Duration,
        accel: Accel,
        console: String,
        qemu_log: String,
    },
    #[error("talking to qemu's monitor during boot")]
    Qmp(#[source] std::io::Error),
    #[error("the guest agent did not answer after the guest came up")]
    Agent(#[from] AgentError),
    #[error("restoring the saved guest")]
    Restore(#[source] Box<SavedGuestError>),
    #[error("io on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn diagnostics(console: &str, qemu_log: &str) -> String {
    let mut s = String::new();
    if !qemu_log.trim().is_empty() {
        s.push_str("qemu said:\n");
        s.push_str(qemu_log.trim_end());
        s.push('\n');
    }
    s.push_str("last lines of the guest console:\n");
    if console.trim().is_empty() {
        s.push_str("(nothing)");
    } else {
        s.push_str(console.trim_end());
    }
    s
}

/// Why something failed in a running VM.
#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the guest helper failed: {0}")]
    Helper(String),
    #[error("the command did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("the guest output stream closed")]
    StreamClosed,
    #[error("copying files out of the guest")]
    Disk(#[from] DiskError),
    #[error("qemu's monitor")]
    Qmp(#[source] std::io::Error),
    #[error("keeping the VM's disk after it stopped")]
    Keep(#[source] std::io::Error),
}

/// A command to run in the guest, as root.
#[derive(Debug, Clone, Default)]
pub struct GuestCommand {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Kill the command after this long.
    pub timeout: Option<Duration>,
}

impl GuestCommand {
    pub fn new<I, S>(argv: I) -> GuestCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        GuestCommand {
            argv: argv.into_iter().map(Into::into).collect(),
            ..GuestCommand::default()
        }
    }

    /// `sh -c SCRIPT`.
    pub fn shell(script: &str) -> GuestCommand {
        GuestCommand::new(["/bin/sh", "-c", script])
    }

    pub fn env(mut self, name: &str, value: &str) -> GuestCommand {
        self.env.insert(name.into(), value.into());
        self
    }

    pub fn cwd(mut self, dir: &str) -> GuestCommand {
        self.cwd = Some(dir.into());
        self
    }

    pub fn timeout(mut self, after: Duration) -> GuestCommand {
        self.timeout = Some(after);
        self
    }

    /// The environment as qemu-ga wants it; it replaces the agent's own, so
    /// PATH and HOME are filled in unless given.
    fn env_list(&self) -> Vec<String> {
        let mut env = self.env.clone();
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        env.entry("HOME".into()).or_insert_with(|| "/root".into());
        env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

/// The result of a command whose output was captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status, or 128 + the signal that ended it.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Which stream a piece of live output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The qemu process of a [`Vm`]: started here, or lent by the `reprise
/// daemon` that started it ([`warm`]), or handed on ([`Vm::into_warm`]).
enum Process {
    Own(Child),
    /// Another process's qemu, usable while `lease` (the connection to its
    /// owner) is open; the owner kills it when the lease ends.
    Lent {
        pid: u32,
        _lease: std::os::unix::net::UnixStream,
    },
    Gone,
}

impl Process {
    fn id(&self) -> Option<u32> {
        match self {
            Process::Own(child) => child.id(),
            Process::Lent { pid, .. } => Some(*pid),
            Process::Gone => None,
        }
    }
}

/// A folder of a [`Vm`]: its own, or the lender's.
#[derive(Debug)]
enum Folder {
    Own(WorkDir),
    Lent(PathBuf),
}

impl Folder {
    fn path(&self) -> &Path {
        match self {
            Folder::Own(dir) => dir.path(),
            Folder::Lent(path) => path,
        }
    }
}

/// A running VM.
pub struct Vm {
    process: Process,
    work: Folder,
    sockets: Folder,
    /// The data disk's file (`data.raw` in the work folder, or the one
    /// plugged in at a hand-off).
    data: PathBuf,
    agent: Agent,
    qmp: Monitor,
    qmp_events: tokio::task::JoinHandle<()>,
    frames: Mutex<mpsc::UnboundedReceiver<Frame>>,
    stream_task: tokio::task::JoinHandle<()>,
    accel: Accel,
    /// Started with [`VmConfig::may_spawn`]: only such a qemu can save its
    /// state.
    may_spawn: bool,
    boot_time: Duration,
    next_id: AtomicU64,
    span: tracing::Span,
    /// The file in the snapshot-disk slot, if the machine has one.
    state_slot: Option<SlotFile>,
    /// The guest's network, if it has one (stopped with the VM).
    _net: Option<net::Passt>,
}

/// Missed agent deadlines in a row, and qemu's CPU time at the last one.
#[derive(Debug, Default)]
struct Stalls {
    busy: u32,
    idle: u32,
    cpu: Option<Duration>,
}

/// The CPU time (user and system) process `pid` has used, from
/// `/proc/PID/stat`.
fn process_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after
    // the last ')'. utime and stime are the 14th and 15th fields.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_millis((utime + stime) * 1000 / ticks))
}

/// The file qemu was given for the snapshot-disk slot (`/dev/vdc`).
#[derive(Debug)]
struct SlotFile {
    path: PathBuf,
    /// qemu's name of its format: `qcow2` for an overlay, `raw` for an
    /// empty placeholder.
    format: &'static str,
}

impl SlotFile {
    /// Makes the file for `disk` in the VM's work folder.
    fn make(disk: &SnapshotDisk, work: &Path) -> Result<SlotFile, DiskError> {
        match disk {
            SnapshotDisk::On(base) => {
                let path = work.join(SNAPSHOT_OVERLAY);
                disk::create_overlay(base, &path)?;
                Ok(SlotFile {
                    path,
                    format: "qcow2",
                })
            }
            SnapshotDisk::Empty => {
                let path = work.join("state.raw");
                disk::make_placeholder(&path)?;
                Ok(SlotFile {
                    path,
                    format: "raw",
                })
            }
        }
    }

    /// The size the guest sees.
    fn guest_bytes(&self) -> std::io::Result<u64> {
        match self.format {
            "qcow2" => disk::qcow2_virtual_size(&self.path),
            _ => Ok(std::fs::metadata(&self.path)?.len()),
        }
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("pid", &self.process.id())
            .field("work", &self.work.path())
            .field("accel", &self.accel)
            .finish()
    }
}

static VM_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Vm {
    /// Boots a VM and waits until its guest agent answers.
    pub async fn boot(config: &VmConfig) -> Result<Vm, BootError> {
        let started = Instant::now();
        let restored;
        let config = match &config.restore {
            Some(saved) => {
                restored = saved.apply(config);
                &restored
            }
            None => config,
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BootError::Io { path, source }
        };
        if !config
            .guest_bins
            .iter()
            .any(|p| p.ends_with("reprise-guest"))
        {
            return Err(BootError::HelperMissing);
        }
        std::fs::create_dir_all(&config.work_root).map_err(io(&config.work_root))?;
        let work = WorkDir::new_in(&config.work_root, crate::workdir::VM_PREFIX)
            .map_err(io(&config.work_root))?;
        let sockets = WorkDir::new_in(&crate::paths::runtime_dir(), crate::workdir::SOCKETS_PREFIX)
            .map_err(io(&crate::paths::runtime_dir()))?;
        let vm_id = format!(
            "{}-{}",
            std::process::id(),
            VM_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let span = info_span!("vm", id = %vm_id, accel = %config.accel);
        let _enter = span.clone().entered();

        if let Some(saved) = &config.restore
            && !saved.has_snapshot_slot()
            && config.snapshot_disk.is_some()
        {
            return Err(BootError::Restore(Box::new(SavedGuestError::Prepare(
                "the saved guest has no slot for a snapshot disk".into(),
            ))));
        }
        let overlay = work.path().join("overlay.qcow2");
        let backing = config
            .backing
            .clone()
            .unwrap_or_else(|| config.image.disk());
        disk::create_overlay(&backing, &overlay)?;
        let slot = match (&config.snapshot_disk, &config.restore) {
            (Some(disk), _) => Some(disk),
            // A saved guest with a snapshot slot needs a disk in it.
            (None, Some(saved)) if saved.has_snapshot_slot() => Some(&SnapshotDisk::Empty),
            (None, _) => None,
        };
        let state_slot = slot
            .map(|disk| SlotFile::make(disk, work.path()))
            .transpose()?;
        let data = work.path().join("data.raw");
        stage_data(config, work.path())?;
        disk::make_data_disk(&work.path().join("data"), &data, config.data_spare_bytes)?;
        std::fs::remove_dir_all(work.path().join("data")).map_err(io(work.path()))?;
        debug!(elapsed = ?started.elapsed(), "disks ready");

        let qmp_path = sockets.path().join("qmp.sock");
        let qga_path = sockets.path().join("qga.sock");
        let stream_path = sockets.path().join("stream.sock");
        let console = work.path().join("console.log");
        let qemu_log = work.path().join("qemu.log");
        let net = match config.network {
            true => Some(net::Passt::start(&work.path().join("passt.log")).await?),
            false => None,
        };
        let args = qemu_args(
            config,
            &overlay,
            &data,
            state_slot.as_ref().map(|s| (s.path.as_path(), s.format)),
            &console,
            &qmp_path,
            &qga_path,
            &stream_path,
            net.is_some(),
        );
        debug!(?args, "starting qemu");
        let log = std::fs::File::create(&qemu_log).map_err(io(&qemu_log))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .process_group(0);
        die_with_parent(&mut cmd);
        // A restore reads its state from this file, handed over open.
        let incoming = match &config.restore {
            Some(saved) => {
                let path = saved.state_path();
                Some(std::fs::File::open(&path).map_err(io(&path))?)
            }
            None => None,
        };
        let handed: Vec<(RawFd, RawFd)> = [
            incoming.as_ref().map(|f| (f.as_raw_fd(), INCOMING_FD)),
            net.as_ref().map(|n| (n.connection(), NET_FD)),
        ]
        .into_iter()
        .flatten()
        .collect();
        least_privilege(&mut cmd, handed);
        let mut child = cmd.spawn().map_err(BootError::QemuMissing)?;
        drop(incoming);

        let failed = |child: &mut Child, status: Option<std::process::ExitStatus>| {
            let _ = child.start_kill();
            let console = console_excerpt(&console, 30);
            let qemu_log = tail_file(&qemu_log, 10);
            match status {
                Some(status) => BootError::Exited {
                    status: status.to_string(),
                    console,
                    qemu_log,
                },
                None => BootError::Timeout {
                    after: config.boot_timeout,
                    accel: config.accel,
                    console,
                    qemu_log,
                },
            }
        };
        let deadline = started + config.boot_timeout;

        // The monitor and the stream port exist as soon as qemu has started.
        let qmp_stream = match connect_when_ready(&mut child, &qmp_path, deadline).await {
            Ok(s) => s,
            Err(status) => return Err(failed(&mut child, status)),
        };
        let (qmp, mut events) = open_monitor(qmp_stream).await?;
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let qmp_events = tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                if let qmp::Event::VSERPORT_CHANGE { data, .. } = &event
                    && data.id == AGENT_PORT_ID
                    && data.open
                {
                    let _ = ready_tx.send(());
                }
            }
        });
        // (The monitor answers only while its events are read, above.)
        if config.restore.is_some() {
            saved::load_deferred(&qmp, INCOMING_FD)
                .await
                .map_err(BootError::Qmp)?;
        }
        let stream = match connect_when_ready(&mut child, &stream_path, deadline).await {
            Ok(s) => s,
            Err(status) => return Err(failed(&mut child, status)),
        };
        let (frames, stream_task) = start_frames(stream);

        // The guest opens the agent's port when qemu-ga starts; writing to
        // the socket before then would fill its buffer and block. A restored
        // guest has it open already, once the incoming state is loaded.
        tokio::select! {
            running = saved::wait_running(&qmp), if config.restore.is_some() => {
                running.map_err(BootError::Qmp)?;
            }
            got = ready_rx.recv(), if config.restore.is_none() => {
                if got.is_none() {
                    let status = child.wait().await.ok();
                    return Err(failed(&mut child, status));
                }
            }
            status = child.wait() => return Err(failed(&mut child, status.ok())),
            _ = tokio::time::sleep_until(deadline.into()) => return Err(failed(&mut child, None)),
        }
        let agent = Agent::new(qga_path, config.agent_timeout);
        let remaining = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        agent.call_within(qga::guest_ping {}, remaining).await?;
        debug!(elapsed = ?started.elapsed(), "guest agent ready");
        drop(_enter);
        let mut vm = Vm {
            process: Process::Own(child),
            data: work.path().join("data.raw"),
            work: Folder::Own(work),
            sockets: Folder::Own(sockets),
            agent,
            qmp,
            qmp_events,
            frames,
            stream_task,
            accel: config.accel,
            may_spawn: config.may_spawn,
            boot_time: Duration::ZERO,
            next_id: AtomicU64::new(1),
            span,
            state_slot,
            _net: net,
        };
        if config.restore.is_some() {
            vm.finish_restore()
                .await
                .map_err(|e| BootError::Restore(Box::new(e)))?;
        }
        vm.boot_time = started.elapsed();
        debug!(boot_time = ?vm.boot_time, "VM ready");
        Ok(vm)
    }

    /// The accelerator this VM runs under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// From starting qemu to a guest agent that answered.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The guest agent, for calls this type does not wrap.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The last `n` lines the guest wrote to its console.
    pub fn console_tail(&self, n: usize) -> String {
        tail_file(&self.work.path().join("console.log"), n)
    }

    /// Runs a command through the guest agent and returns its captured
    /// output once it has exited. For small, internal commands; use
    /// [`Vm::exec_streaming`] for anything whose output a user watches.
    pub async fn exec(&self, command: &GuestCommand) -> Result<Output, VmError> {
        let _enter = self.span.enter();
        let (path, args) = match &command.cwd {
            None => (command.argv[0].clone(), command.argv[1..].to_vec()),
            Some(cwd) => {
                let mut args = vec!["-c".into(), "cd \"$0\" && exec \"$@\"".into(), cwd.clone()];
                args.extend(command.argv.iter().cloned());
                ("/bin/sh".to_string(), args)
            }
        };
        let pid = self
            .agent
            .call(qga::guest_exec {
                path,
                arg: Some(args),
                env: Some(command.env_list()),
                input_data: None,
                capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
            })
            .await?
            .pid;
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        let mut stalls = Stalls::default();
        loop {
            let status = self.exec_status(pid, &mut stalls).await?;
            if let Some(status) = status.filter(|s| s.exited) {
                debug!(took = ?started.elapsed(), argv = ?command.argv, "exec ended");
                return Ok(Output {
                    code: exit_code(status.exitcode, status.signal),
                    stdout: status.out_data.unwrap_or_default(),
                    stderr: status.err_data.unwrap_or_default(),
                });
            }
            if let Some(limit) = command.timeout
                && started.elapsed() > limit
            {
                self.kill_guest_process(pid).await;
                return Err(VmError::TimedOut(limit));
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Runs a command in the guest and hands its output to `sink` as it is
    /// written, stdout and stderr apart, in the order the guest read them.
    /// Returns the exit status (128 + signal if killed).
    pub async fn exec_streaming(
        &self,
        command: &GuestCommand,
        sink: &mut (dyn FnMut(Stream, &[u8]) + Send),
    ) -> Result<i32, VmError> {
        let mut frames = self.frames.lock().await;
        while frames.try_recv().is_ok() {}
        let id = format!("x{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut args = vec!["exec".to_string(), "--id".into(), id.clone()];
        if let Some(cwd) = &command.cwd {
            args.extend(["--cwd".into(), cwd.clone()]);
        }
        args.push("--".into());
        args.extend(command.argv.iter().cloned());
        let pid = self
            .agent
            .call(qga::guest_exec {
                path: GUEST_HELPER.into(),
                arg: Some(args),
                env: Some(command.env_list()),
                input_data: None,
                capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
            })
            .await?
            .pid;
        let started = Instant::now();
        let mut stalls = Stalls::default();
        let mut running = false;
        let mut helper_exited_at: Option<Instant> = None;
        let mut helper_stderr = Vec::new();
        let mut check = tokio::time::interval(Duration::from_millis(500));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = frames.recv() => match frame {
                    None => return Err(VmError::StreamClosed),
                    Some(Frame::Start(got)) => running = got == id,
                    Some(_) if !running => {}
                    Some(Frame::Stdout(bytes)) => {
                        stalls = Stalls::default();
                        sink(Stream::Stdout, &bytes)
                    }
                    Some(Frame::Stderr(bytes)) => {
                        stalls = Stalls::default();
                        sink(Stream::Stderr, &bytes)
                    }
                    Some(Frame::Exit(code)) => {
                        debug!(took = ?started.elapsed(), argv = ?command.argv.first(), "streamed exec ended");
                        return Ok(code);
                    }
                    Some(Frame::Failed(why)) => return Err(VmError::Helper(why)),
                },
                _ = check.tick() => {
                    if let Some(limit) = command.timeout
                        && started.elapsed() > limit
                    {
                        self.kill_guest_process(pid).await;
                        return Err(VmError::TimedOut(limit));
                    }
                    match helper_exited_at {
                        // The exit frame may still be on its way; give it a moment.
                        Some(at) if at.elapsed() > Duration::from_secs(3) => {
                            return Err(VmError::Helper(format!(
                                "it exited without reporting the command's end: {}",
                                String::from_utf8_lossy(&helper_stderr).trim()
                            )));
                        }
                        Some(_) => {}
                        None => {
                            let status = self.exec_status(pid, &mut stalls).await?;
                            if let Some(status) = status.filter(|s| s.exited) {
                                helper_exited_at = Some(Instant::now());
                                helper_stderr = status.err_data.unwrap_or_default();
                            }
                        }
                    }
                }
            }
        }
    }

    /// The status of a command the agent started; `None` when the agent
    /// missed its deadline but the poll goes on. Under TCG on a busy host a
    /// guest starting podman can starve the agent for minutes (its kernel
    /// reports soft lockups): while qemu keeps using CPU the guest is
    /// working and up to [`AGENT_BUSY_STALLS`] deadlines are missed; while
    /// it uses none, [`AGENT_IDLE_STALLS`] end the poll.
    async fn exec_status(
        &self,
        pid: i64,
        stalls: &mut Stalls,
    ) -> Result<Option<qga::GuestExecStatus>, VmError> {
        match self.agent.call(qga::guest_exec_status { pid }).await {
            Ok(status) => {
                *stalls = Stalls {
                    cpu: self.qemu_cpu_time(),
                    ..Stalls::default()
                };
                Ok(Some(status))
            }
            Err(AgentError::Timeout { .. }) => {
                // Without an earlier reading, the first miss counts as idle.
                let cpu = self.qemu_cpu_time();
                let busy =
                    matches!((cpu, stalls.cpu), (Some(now), Some(then)) if now >= then + BUSY_CPU);
                stalls.cpu = cpu;
                if busy {
                    stalls.busy += 1;
                } else {
                    stalls.idle += 1;
                }
                if stalls.busy >= AGENT_BUSY_STALLS || stalls.idle >= AGENT_IDLE_STALLS {
                    return Err(AgentError::Timeout {
                        command: "guest-exec-status",
                        after: self.agent.timeout() * (stalls.busy + stalls.idle),
                    }
                    .into());
                }
                warn!(
                    pid,
                    busy = stalls.busy,
                    idle = stalls.idle,
                    "the guest agent is slow to answer; waiting on"
                );
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn qemu_cpu_time(&self) -> Option<Duration> {
        self.process.id().and_then(process_cpu_time)
    }

    /// Kills a process the agent started and every process under it. The
    /// guest helper does not put its command in a group of its own, so the
    /// tree is walked: each process is stopped before its children are
    /// read, so none can fork past the walk, and then all are killed.
    async fn kill_guest_process(&self, pid: i64) {
        let script = format!(
            "kill -STOP {pid}; all={pid}; todo={pid}; \
             while [ -n \"$todo\" ]; do next=; \
               for p in $todo; do for c in $(cat /proc/$p/task/*/children 2>/dev/null); do \
                 kill -STOP $c; next=\"$next $c\"; done; done; \
               all=\"$all $next\"; todo=$next; done; \
             kill -KILL $all"
        );
        let _ = self
            .agent
            .call(qga::guest_exec {
                path: "/bin/sh".into(),
                arg: Some(vec!["-c".into(), script]),
                env: None,
                input_data: None,
                capture_output: None,
            })
            .await;
    }

    /// Copies the guest folder `guest_dir` to the host folder `host_dir`
    /// (which must not exist), through the data disk.
    pub async fn copy_out(&self, guest_dir: &str, host_dir: &Path) -> Result<(), VmError> {
        self.copy_out_inner(guest_dir, host_dir, false).await
    }

    /// As [`Vm::copy_out`] for a folder on the data disk that the guest's
    /// last command settled with [`Vm::settle_data_disk`]: no command runs
    /// in the guest.
    pub async fn copy_out_settled(&self, guest_dir: &str, host_dir: &Path) -> Result<(), VmError> {
        self.copy_out_inner(guest_dir, host_dir, true).await
    }

    /// A shell fragment that flushes and checkpoints the data disk's file
    /// system, so the host reads a consistent one from the disk file.
    pub fn settle_data_disk() -> String {
        // The helper runs from the disk it freezes: it is loaded before
        // the freeze and only reads after.
        Self::settle(GUEST_DATA)
    }

    /// A shell command that flushes and checkpoints the file system at
    /// `dir` (freezing ext4 syncs it and checkpoints its journal: no
    /// `sync` of every file system first) and thaws it: the helper's
    /// `FIFREEZE` and `FITHAW`, one process where `fsfreeze -f` and `-u`
    /// were two.
    pub fn settle(dir: &str) -> String {
        format!("{GUEST_HELPER} setup settle {dir}")
    }

    async fn copy_out_inner(
        &self,
        guest_dir: &str,
        host_dir: &Path,
        settled: bool,
    ) -> Result<(), VmError> {
        // A folder already on the data disk is read straight from it; any
        // other is first copied there (which costs guest time under TCG).
        let on_disk = data_disk_path(guest_dir);
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = format!("{GUEST_DATA}/out/{n}");
        let freeze = Self::settle_data_disk();
        let script = match &on_disk {
            Some(_) if settled => None,
            Some(_) => Some(format!("set -e; test -d \"$0\"; {freeze}")),
            None => Some(format!(
                "set -e; mkdir -p {slot}; cp -a \"$0\"/. {slot}/; {freeze}"
            )),
        };
        if let Some(script) = script {
            let out = self
                .exec(&GuestCommand::new(["/bin/sh", "-c", &script, guest_dir]))
                .await?;
            if !out.success() {
                return Err(VmError::Helper(format!(
                    "copying {guest_dir} to the data disk failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let data = self.data.clone();
        let in_disk = on_disk.unwrap_or_else(|| format!("/out/{n}"));
        tokio::task::block_in_place(|| disk::dump_dir(&data, &in_disk, host_dir))?;
        if in_disk.starts_with("/out/") {
            let _ = self.exec(&GuestCommand::new(["rm", "-rf", &slot])).await;
        }
        Ok(())
    }

    /// Pauses the guest's CPUs (QMP `stop`).
    pub async fn pause(&self) -> Result<(), VmError> {
        self.qmp_call(qmp::stop {}).await.map(drop)
    }

    /// Resumes the guest's CPUs (QMP `cont`).
    pub async fn resume(&self) -> Result<(), VmError> {
        self.qmp_call(qmp::cont {}).await.map(drop)
    }

    async fn qmp_call<C>(&self, command: C) -> Result<C::Ok, VmError>
    where
        C: qapi::Command + qmp::QmpCommand,
        QmpStreamTokio<tokio::io::WriteHalf<UnixStream>>:
            futures::Sink<qapi::Execute<C, u32>, Error = std::io::Error> + Unpin,
    {
        match timeout(Duration::from_secs(10), self.qmp.execute(command)).await {
            Ok(Ok(ok)) => Ok(ok),
            Ok(Err(e)) => Err(VmError::Qmp(e.into())),
            Err(_) => Err(VmError::Qmp(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// Stops the VM and moves its disk overlays (`overlay.qcow2`, and
    /// `state.qcow2` if it has a snapshot disk) and console log (`console.log`)
    /// into `dest`, for the repository's snapshot and for inspection. Run
    /// `fsfreeze` in the guest first if an overlay must be consistent.
    pub async fn stop_keeping(self, dest: &Path) -> Result<(), VmError> {
        let stopped = self.shutdown_in_place().await;
        let work = stopped.work.path();
        std::fs::create_dir_all(dest).map_err(VmError::Keep)?;
        let kept_state = stopped
            .state_slot
            .as_ref()
            .is_some_and(|slot| slot.format == "qcow2");
        let names = ["overlay.qcow2", "console.log"]
            .into_iter()
            .chain(kept_state.then_some(SNAPSHOT_OVERLAY));
        for name in names {
            std::fs::rename(work.join(name), dest.join(name)).map_err(VmError::Keep)?;
        }
        Ok(())
    }

    /// Stops qemu but leaves the work folder to the caller (dropped with `self`).
    async fn shutdown_in_place(mut self) -> Self {
        let _ = self.qmp_call(qmp::quit {}).await;
        match &mut self.process {
            Process::Own(child) => {
                if timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
            // The lender reaps it; here it is gone once it no longer runs.
            Process::Lent { pid, .. } => {
                let pid = *pid;
                let started = Instant::now();
                while warm::runs(pid) && started.elapsed() < Duration::from_secs(5) {
                    sleep(Duration::from_millis(10)).await;
                }
                if warm::runs(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            Process::Gone => {}
        }
        self
    }

    /// Stops the VM: QMP `quit`, then a kill if qemu is still there.
    pub async fn shutdown(self) {
        drop(self.shutdown_in_place().await);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stream_task.abort();
        self.qmp_events.abort();
        if let Process::Own(child) = &self.process
            && let Some(pid) = child.id()
        {
            // qemu runs in its own process group.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The path inside the data disk's file system of a guest folder that lives
/// on it (`/reprise/x` or `/repo/x`), or `None`.
fn data_disk_path(guest_dir: &str) -> Option<String> {
    let dir = guest_dir.trim_end_matches('/');
    let rest = if let Some(rest) = dir
        .strip_prefix(GUEST_REPO)
        .filter(|r| r.is_empty() || r.starts_with('/'))
    {
        format!("/repo{rest}")
    } else {
        dir.strip_prefix(GUEST_DATA)?.to_string()
    };
    let plain = rest.starts_with('/')
        && rest.len() > 1
        && !rest.split('/').any(|part| part == ".." || part == ".");
    plain.then_some(rest)
}

fn exit_code(code: Option<i64>, signal: Option<i64>) -> i32 {
    match (code, signal) {
        (Some(c), _) => c as i32,
        (None, Some(s)) => 128 + s as i32,
        (None, None) => 255,
    }
}

/// Fills the data disk's staging folder: `bin/` with the guest binaries,
/// `repo/` with the tree, `out/` for files going back.
fn stage_data(config: &VmConfig, work: &Path) -> Result<(), BootError> {
    let staging = work.join("data");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BootError::Io { path, source }
    };
    let bin = staging.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(&bin))?;
    std::fs::create_dir_all(staging.join("out")).map_err(io(&staging))?;
    for src in &config.guest_bins {
        let dest = bin.join(src.file_name().unwrap_or_default());
        std::fs::copy(src, &dest).map_err(io(src))?;
    }
    let repo = staging.join("repo");
    match &config.tree {
        Some(tree) => copy_tree(tree, &repo).map_err(io(tree))?,
        None => std::fs::create_dir_all(&repo).map_err(io(&repo))?,
    }
    Ok(())
}

/// Copies a tree, hard-linking when it can (mkfs only reads the files).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for flags in ["-al", "-a"] {
        let status = std::process::Command::new("cp")
            .arg(flags)
            .arg("--no-target-directory")
            .arg(from)
            .arg(to)
            .stderr(Stdio::null())
            .status()?;
        if status.success() {
            return Ok(());
        }
        let _ = std::fs::remove_dir_all(to);
    }
    Err(std::io::Error::other(format!(
        "cannot copy {} into the data disk",
        from.display()
    )))
}

#[allow(clippy::too_many_arguments)]
fn qemu_args(
    config: &VmConfig,
    overlay: &Path,
    data: &Path,
    state: Option<(&Path, &str)>,
    console: &Path,
    qmp: &Path,
    qga: &Path,
    stream: &Path,
    net: bool,
) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let (machine, cpu) = match config.accel {
        Accel::Kvm => ("q35,accel=kvm", "host"),
        Accel::Tcg => ("q35,accel=tcg", "max"),
    };
    let mut cmdline = vec![
        "root=/dev/vda",
        "rw",
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "loglevel=1",
        "init=/sbin/reprise-init",
        "reprise.data=/dev/vdb",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    if net {
        cmdline.push("reprise.net=1".into());
    }
    cmdline.extend(config.kernel_args.iter().cloned());
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-machine".into(),
        match &config.memory_file {
            Some(_) => format!("{machine},memory-backend={RAM_ID}"),
            None => machine.into(),
        },
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        config.cpus.to_string(),
        "-m".into(),
        config.memory_mib.to_string(),
        "-kernel".into(),
        p(&config.image.kernel()),
        "-initrd".into(),
        p(&config.image.initrd()),
        "-append".into(),
        cmdline.join(" "),
        "-drive".into(),
        format!("file={},if=virtio,format=qcow2,cache=unsafe", p(overlay)),
        "-drive".into(),
        format!(
            "file={},if=virtio,format=raw,cache=unsafe,id={}",
            p(data),
            saved::DATA_DRIVE
        ),
    ];
    if let Some((path, format)) = state {
        args.extend([
            "-drive".into(),
            format!(
                "file={},if=virtio,format={format},cache=unsafe,id={}",
                p(path),
                saved::SNAPSHOT_DRIVE
            ),
        ]);
    }
    args.extend([
        "-chardev".into(),
        format!("file,id=console,path={}", p(console)),
        "-serial".into(),
        "chardev:console".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p(qmp)),
        // Two empty PCIe slots: a warm guest gets a run's data and
        // snapshot disks plugged in there ([`warm`]).
        "-device".into(),
        format!("pcie-root-port,id={},chassis=1", warm::PORTS[0]),
        "-device".into(),
        format!("pcie-root-port,id={},chassis=2", warm::PORTS[1]),
        "-device".into(),
        "virtio-serial-pci,id=vser".into(),
        "-chardev".into(),
        format!("socket,id=qga,path={},server=on,wait=off", p(qga)),
        "-device".into(),
        format!("virtserialport,chardev=qga,name=org.qemu.guest_agent.0,id={AGENT_PORT_ID}"),
        "-chardev".into(),
        format!("socket,id=stream,path={},server=on,wait=off", p(stream)),
        "-device".into(),
        "virtserialport,chardev=stream,name=reprise.stream,id=streamport".into(),
    ]);
    if net {
        args.extend([
            "-netdev".into(),
            format!("stream,id=net0,server=off,addr.type=fd,addr.str={NET_FD}"),
            "-device".into(),
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56".into(),
        ]);
    } else {
        args.extend(["-nic".into(), "none".into()]);
    }
    if config.tty {
        let tty = qmp.with_file_name(shell::TTY_SOCKET);
        args.extend([
            "-chardev".into(),
            format!("socket,id=tty,path={},server=on,wait=off", p(&tty)),
            "-serial".into(),
            "chardev:tty".into(),
        ]);
    }
    if let Some(file) = &config.memory_file {
        args.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id={RAM_ID},size={}M,mem-path={},share={}",
                config.memory_mib,
                p(&file.path),
                if file.shared { "on" } else { "off" }
            ),
        ]);
    }
    if config.restore.is_some() {
        // A state saved without its RAM (x-ignore-shared) loads only where
        // that capability is set first, by the monitor ([`Vm::boot`]).
        args.extend(["-incoming".into(), "defer".into()]);
    }
    // seccomp: no obsolete system calls, no set*id, no scheduler or
    // priority changes, and no new processes unless it must save a state.
    let spawn = if config.may_spawn { "allow" } else { "deny" };
    args.extend([
        "-sandbox".into(),
        format!("on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny,spawn={spawn}"),
    ]);
    args
}

/// The id of the memory backend of a guest whose RAM is a file.
const RAM_ID: &str = "ram0";

/// The descriptor a restoring qemu reads its saved state from.
const INCOMING_FD: RawFd = 3;
/// The descriptor of the guest network card's connection to passt.
const NET_FD: RawFd = 4;

/// What qemu keeps of this process's privileges: no capabilities at all
/// (when the executor runs as root, qemu stays uid 0 for its own files but
/// loses every capability, bounding and ambient sets included), no way to
/// gain any back (`no_new_privs`), and the descriptors it is handed, each
/// `(open here, number in qemu)`: what it needs of files and sockets it
/// gets open, rather than by path.
#[expect(
    unsafe_code,
    reason = "pre_exec is unsafe; prctl, capset, dup2 and fcntl are async-signal-safe system calls"
)]
fn least_privilege(cmd: &mut Command, handed: Vec<(RawFd, RawFd)>) {
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_long| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            // Out of the way first (a source may sit on another's target),
            // then into place; dup2 leaves the targets open across exec.
            let mut moved = [-1; 4];
            for (i, (from, _)) in handed.iter().enumerate().take(moved.len()) {
                moved[i] = libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, 100);
                check(moved[i] as libc::c_long)?;
            }
            for (i, (_, to)) in handed.iter().enumerate().take(moved.len()) {
                check(libc::dup2(moved[i], *to) as libc::c_long)?;
            }
            // Bounding set: every capability this kernel knows (EINVAL past
            // the last one ends the loop).
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINVAL) => break,
                        // Not allowed to drop (not root): nothing to drop.
                        Some(libc::EPERM) => break,
                        _ => return Err(e),
                    }
                }
            }
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) as libc::c_long)?;
            // capset(2), version 3: effective, permitted and inheritable
            // all empty.
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            #[derive(Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let header = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let data = [Data {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            Ok(())
        });
    }
}

/// Makes the kernel kill qemu when this process dies, however it dies.
#[expect(
    unsafe_code,
    reason = "pre_exec is unsafe; prctl(PR_SET_PDEATHSIG) is async-signal-safe"
)]
pub(crate) fn die_with_parent(cmd: &mut Command) {
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

/// Connects to one of qemu's server sockets once qemu has made it. Returns
/// qemu's exit status (or `None` on timeout) if it never appears.
async fn connect_when_ready(
    child: &mut Child,
    path: &Path,
    deadline: Instant,
) -> Result<UnixStream, Option<std::process::ExitStatus>> {
    loop {
        if let Ok(stream) = UnixStream::connect(path).await {
            return Ok(stream);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Some(status));
        }
        if Instant::now() > deadline {
            return Err(None);
        }
        sleep(Duration::from_millis(5)).await;
    }
}

/// Reads frames from the stream port into `tx` until the socket closes. A
/// malformed frame drops the buffer: the next `Start` resynchronises.
/// qemu's monitor (QMP), negotiated.
pub(super) type Monitor = QapiService<QmpStreamTokio<tokio::io::WriteHalf<UnixStream>>>;

/// The events qemu's monitor sends.
pub(super) type MonitorEvents =
    qapi::futures::QapiEvents<QmpStreamTokio<tokio::io::ReadHalf<UnixStream>>>;

/// Opens qemu's monitor on `stream` and negotiates its capabilities.
pub(super) async fn open_monitor(
    stream: UnixStream,
) -> Result<(Monitor, MonitorEvents), BootError> {
    let negotiation = QmpStreamTokio::open(stream).await.map_err(BootError::Qmp)?;
    Ok(negotiation
        .negotiate()
        .await
        .map_err(BootError::Qmp)?
        .into_parts())
}

/// Reads the guest's stream port on a task of its own: the frames it
/// sends arrive on the receiver returned.
pub(super) fn start_frames(
    stream: UnixStream,
) -> (
    Mutex<mpsc::UnboundedReceiver<Frame>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (read, write) = stream.into_split();
    (Mutex::new(rx), tokio::spawn(read_frames(read, write, tx)))
}

async fn read_frames(
    mut read: tokio::net::unix::OwnedReadHalf,
    _write: OwnedWriteHalf,
    tx: mpsc::UnboundedSender<Frame>,
) {
    let mut buf = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = match read.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        loop {
            match Frame::decode(&buf[at..]) {
                Ok(Some((frame, used))) => {
                    at += used;
                    if tx.send(frame).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("bad frame from the guest helper: {e}");
                    at = buf.len();
                    break;
                }
            }
        }
        buf.drain(..at);
    }
}

/// The last `n` lines of a text file, or an empty string.
pub fn tail_file(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    crate::paths::tail_lines(&String::from_utf8_lossy(&bytes), n)
}

/// The console's last `n` lines, preceded by the lines that say why a boot
/// failed (a kernel panic, our init's complaints) when they scrolled out of
/// the tail, as a panic's stack trace makes them do.
pub fn console_excerpt(path: &Path, n: usize) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    excerpt(&text, n)
}

fn excerpt(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let telling = |l: &str| {
        l.contains("Kernel panic") || l.contains("reprise-init") || l.contains("reprise-initrd")
    };
    let mut out: Vec<&str> = lines[..start]
        .iter()
        .copied()
        .filter(|l| telling(l))
        .take(5)
        .collect();
    if !out.is_empty() {
        out.push("...");
    }
    out.extend(&lines[start..]);
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_processs_cpu_time_is_read_from_proc_and_grows_with_work() {
        let me = std::process::id();
        let before = process_cpu_time(me).expect("this process's CPU time");
        // Work until the kernel has counted 200 ms more (a busy machine
        // gives this thread only part of the wall time).
        let spin = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after < before + Duration::from_millis(200)
            && spin.elapsed() < Duration::from_secs(20)
        {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            after = process_cpu_time(me).expect("this process's CPU time");
        }
        assert!(
            after >= before + Duration::from_millis(200),
            "{before:?} → {after:?}"
        );
        assert_eq!(process_cpu_time(u32::MAX), None, "no such process");
    }

    use reprise_protocol::image::ImageManifest;

    fn config(accel: Accel, network: bool) -> VmConfig {
        let image = Image {
            dir: "/img".into(),
            manifest: ImageManifest {
                version: 1,
                recipe_hash: "r".into(),
                digest: "d".into(),
                built_at: 0,
                build_ms: 0,
                disk: "disk.qcow2".into(),
                kernel: "vmlinuz".into(),
                initrd: "initrd.img".into(),
                disk_bytes: 0,
            },
        };
        let mut c = VmConfig::new(image, accel);
        c.network = network;
        c
    }

    fn args(c: &VmConfig) -> Vec<String> {
        let p = Path::new;
        qemu_args(
            c,
            p("/w/o.qcow2"),
            p("/w/d.raw"),
            None,
            p("/w/c.log"),
            p("/s/q"),
            p("/s/g"),
            p("/s/s"),
            c.network,
        )
    }

    #[test]
    fn qemu_gets_the_accelerator_and_no_network_by_default() {
        let tcg = args(&config(Accel::Tcg, false)).join(" ");
        assert!(tcg.contains("-machine q35,accel=tcg -cpu max"), "{tcg}");
        assert!(tcg.contains("-nic none"));
        assert!(!tcg.contains("reprise.net=1"));
        let kvm = args(&config(Accel::Kvm, true)).join(" ");
        assert!(kvm.contains("-machine q35,accel=kvm -cpu host"), "{kvm}");
        assert!(
            kvm.contains("-netdev stream,id=net0,server=off,addr.type=fd,addr.str=4"),
            "{kvm}"
        );
        assert!(kvm.contains("reprise.net=1"));
        for a in [&tcg, &kvm] {
            assert!(
                a.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny,spawn=deny"),
                "{a}"
            );
        }
        assert!(kvm.contains("file=/img/disk.qcow2").not() && kvm.contains("file=/w/o.qcow2"));
        assert!(
            kvm.contains("id=state").not(),
            "no snapshot disk unless asked: {kvm}"
        );
    }

    #[test]
    fn the_state_disk_is_the_third_virtio_drive() {
        let c = config(Accel::Tcg, false);
        let p = Path::new;
        let args = qemu_args(
            &c,
            p("/w/o.qcow2"),
            p("/w/d.raw"),
            Some((p("/w/state.qcow2"), "qcow2")),
            p("/w/c.log"),
            p("/s/q"),
            p("/s/g"),
            p("/s/s"),
            false,
        );
        let drives: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-drive")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(drives.len(), 3, "{drives:?}");
        assert!(drives[0].starts_with("file=/w/o.qcow2,"));
        assert!(drives[1].starts_with("file=/w/d.raw,"));
        assert_eq!(
            drives[2],
            "file=/w/state.qcow2,if=virtio,format=qcow2,cache=unsafe,id=state"
        );
    }

    trait Not {
        fn not(self) -> bool;
    }
    impl Not for bool {
        fn not(self) -> bool {
            !self
        }
    }

    #[test]
    fn guest_env_fills_path_and_home() {
        let c = GuestCommand::new(["true"]).env("A", "1").env("HOME", "/x");
        let env = c.env_list();
        assert!(env.contains(&"A=1".to_string()));
        assert!(env.contains(&"HOME=/x".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin")));
    }

    #[test]
    fn folders_on_the_data_disk_are_read_straight_from_it() {
        assert_eq!(data_disk_path("/repo"), Some("/repo".into()));
        assert_eq!(data_disk_path("/repo/out/"), Some("/repo/out".into()));
        assert_eq!(
            data_disk_path("/reprise/artifacts"),
            Some("/artifacts".into())
        );
        assert_eq!(data_disk_path("/reprise"), None);
        assert_eq!(data_disk_path("/reprisex/a"), None);
        assert_eq!(data_disk_path("/repository"), None);
        assert_eq!(data_disk_path("/reprise/../etc"), None);
        assert_eq!(data_disk_path("/var/run/ci/artifacts"), None);
    }

    #[test]
    fn the_reason_for_a_panic_survives_a_long_stack_trace() {
        let mut text =
            String::from("boot\n[ 2.8] Kernel panic - not syncing: Attempted to kill init!\n");
        for i in 0..50 {
            text.push_str(&format!("[ 2.8] frame {i}\n"));
        }
        let e = excerpt(&text, 10);
        assert!(e.starts_with("[ 2.8] Kernel panic"), "{e}");
        assert!(e.ends_with("frame 49"), "{e}");
        assert_eq!(e.lines().count(), 12);
        assert_eq!(excerpt("a\nb", 10), "a\nb");
    }

    #[test]
    fn exit_codes_include_signals() {
        assert_eq!(exit_code(Some(3), None), 3);
        assert_eq!(exit_code(None, Some(9)), 137);
        assert_eq!(exit_code(None, None), 255);
    }
}
