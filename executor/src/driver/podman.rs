//! The podman driver: no VM. The OS is a privileged container of the same
//! base image on the host's podman (its root file system read from the
//! image's disk and imported once per recipe as `localhost/reprise-os:*`),
//! in which `mk prepare-runtime` runs as root and the tests run in a
//! container of their own (podman in podman). The repository's snapshot is
//! a folder of its own ([`crate::snapshots::Form::Folder`]), a copy of the current generation
//! bind-mounted at [`SNAPSHOT`], made a new generation after a pass. For
//! machines and CI runners without KVM, where a VM under emulation is slow;
//! its results carry driver class `podman` and never mix with VM results.
//!
//! On a host whose cgroups are hybrid (v1 with a v2 hierarchy beside it)
//! crun refuses to start containers; runc is used there. Containers get the
//! host's hard limits of open files and processes, since podman's defaults
//! may be above what an unprivileged host allows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use reprise_protocol::digest::RunKey;
use reprise_protocol::manifest::Snapshot;
use tokio::io::AsyncReadExt;

use super::{ARTIFACTS, OS_HELPER, OS_MK, REPO, SNAPSHOT};
use super::{Driver, Output, Prepared, Session, Stream};
use crate::error::RunError;
use crate::image::{Image, ImageCache};
use crate::snapshots::{RepoId, SnapshotStart, Snapshots, Stage};
use crate::ui::Ui;

/// Runs in a privileged container on the host's podman.
#[derive(Debug, Default)]
pub struct Podman;

impl Podman {
    pub fn new() -> Podman {
        Podman
    }
}

/// The OS image of `image` in the host's podman.
fn os_image(image: &Image) -> String {
    format!("localhost/reprise-os:{}", &image.manifest.recipe_hash[..16])
}

/// `podman` with the options every container of this driver needs on this
/// host.
fn podman_run_options() -> Vec<String> {
    let mut opts = Vec::new();
    if Path::new("/sys/fs/cgroup/unified").is_dir() && crate::paths::which("runc").is_some() {
        opts.extend(["--runtime".into(), "runc".into()]);
    }
    use nix::sys::resource::{Resource, getrlimit};
    // A process limit above the kernel's pid_max is refused (EPERM) by
    // runc on such hosts, though it is within the hard limit.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(u64::MAX);
    for (name, resource, cap) in [
        ("nofile", Resource::RLIMIT_NOFILE, u64::MAX),
        ("nproc", Resource::RLIMIT_NPROC, pid_max),
    ] {
        if let Ok((_, hard)) = getrlimit(resource) {
            let limit = hard.min(cap);
            if limit != nix::sys::resource::RLIM_INFINITY {
                opts.extend(["--ulimit".into(), format!("{name}={limit}:{limit}")]);
            }
        }
    }
    opts
}

fn failed(what: &str, out: &std::process::Output) -> RunError {
    RunError::Podman(format!(
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

async fn podman(args: &[&str]) -> Result<std::process::Output, RunError> {
    tokio::process::Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| RunError::Podman(format!("cannot run podman ({e}); apt-get install podman")))
}

/// Imports the base image's root file system into the host's podman, once
/// per recipe (under a lock, so two runs do not both import).
async fn ensure_os_image(image: &Image, ui: &dyn Ui) -> Result<String, RunError> {
    let name = os_image(image);
    if podman(&["image", "exists", &name]).await?.status.success() {
        return Ok(name);
    }
    let cache = crate::paths::cache_dir().join("podman");
    std::fs::create_dir_all(&cache).map_err(|e| RunError::Podman(e.to_string()))?;
    let lock = std::fs::File::create(cache.join("import.lock"))
        .map_err(|e| RunError::Podman(e.to_string()))?;
    let _lock = tokio::task::block_in_place(|| {
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| RunError::Podman(format!("locking the import: {e}")))
    })?;
    if podman(&["image", "exists", &name]).await?.status.success() {
        return Ok(name);
    }
    ui.image_step("importing the base image's root file system into podman (once per image)");
    let scratch = crate::workdir::WorkDir::new_in(&cache, crate::workdir::IMPORT_PREFIX)
        .map_err(|e| RunError::Podman(e.to_string()))?;
    let raw = scratch.path().join("disk.raw");
    let out = tokio::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image.disk())
        .arg(&raw)
        .output()
        .await
        .map_err(|e| RunError::Podman(format!("qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(failed("converting the base image's disk", &out));
    }
    let rootfs = scratch.path().join("rootfs");
    tokio::task::block_in_place(|| crate::vm::disk::dump_dir(&raw, "/", &rootfs))
        .map_err(|e| RunError::Podman(crate::text::error_chain(&e)))?;
    let _ = std::fs::remove_file(&raw);
    let script =
        format!("tar -C \"$1\" -c . | podman import -q --change 'CMD [\"/bin/sh\"]' - {name}");
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(&rootfs)
        .output()
        .await
        .map_err(|e| RunError::Podman(e.to_string()))?;
    if !out.status.success() {
        return Err(failed("importing the base image into podman", &out));
    }
    Ok(name)
}

/// A running OS container of a run.
#[derive(Debug)]
pub struct PodmanSession {
    container: String,
    start: Option<SnapshotStart>,
    /// The snapshot folder the container mounts; `None` once committed or
    /// discarded.
    staged: Option<Stage>,
    artifacts: PathBuf,
    snapshots: Snapshots,
    repo: RepoId,
    image: Image,
    finished: bool,
}

impl Driver for Podman {
    type Session = PodmanSession;

    async fn start(
        &self,
        run: &Prepared<'_>,
        ui: &dyn Ui,
    ) -> Result<(PodmanSession, &'static str), RunError> {
        let image = tokio::task::block_in_place(|| {
            ImageCache::default_location().ensure(&mut |step| ui.image_step(step))
        })?;
        let os = ensure_os_image(&image, ui).await?;
        let snapshots = Snapshots::folders();
        let repo = run.repo.clone();
        let start = run.snapshot_start(&snapshots, &image, ui, || Ok(PathBuf::new()))?;
        let staged = tokio::task::block_in_place(|| snapshots.stage_folder(&repo, &image, &start))?;
        let artifacts = run.work.join("os-artifacts");
        std::fs::create_dir_all(&artifacts).map_err(|e| RunError::Podman(e.to_string()))?;
        let mk = crate::paths::sibling_exe("mk").ok_or_else(|| {
            RunError::Infra("the static mk is missing beside the reprise binary".into())
        })?;
        let helper = crate::paths::sibling_exe("reprise-guest").ok_or_else(|| {
            RunError::Infra("the static reprise-guest is missing beside the reprise binary".into())
        })?;
        let container = format!(
            "{}{}-{}",
            crate::workdir::CONTAINER_PREFIX,
            std::process::id(),
            &run.keyed.inputs.key().short()
        );
        // Owned by the run's work folder before it exists: if this process
        // is killed, the next command's sweep removes it with the folder.
        crate::workdir::owns_container(run.work, &container)
            .map_err(|e| RunError::Podman(format!("recording the OS container's owner: {e}")))?;
        let mount = |host: &Path, os: &str, ro: bool| {
            format!("{}:{os}{}", host.display(), if ro { ":ro" } else { "" })
        };
        let mut args: Vec<String> = ["run", "-d", "--privileged", "--name", &container]
            .map(String::from)
            .to_vec();
        args.extend(podman_run_options());
        // The OS has the network when preparation or the tests may use it
        // (the test container itself runs with --network none unless asked).
        if !run.network && !run.prepare_network {
            args.extend(["--network".into(), "none".into()]);
        }
        for (host, os, ro) in [
            (run.tree.as_path(), "/reprise/repo", false),
            (mk.as_path(), OS_MK, true),
            (helper.as_path(), OS_HELPER, true),
            (artifacts.as_path(), ARTIFACTS, false),
            (staged.path(), SNAPSHOT, false),
        ] {
            args.extend(["-v".into(), mount(host, os, ro)]);
        }
        args.extend([os, "sleep".into(), "infinity".into()]);
        let mut session = PodmanSession {
            container,
            start: Some(start),
            staged: Some(staged),
            artifacts,
            snapshots,
            repo,
            image,
            finished: false,
        };
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman(&argv).await?;
        if !out.status.success() {
            session.finished = true;
            session.discard();
            return Err(failed("starting the OS container", &out));
        }
        Ok((session, "start"))
    }
}

impl PodmanSession {
    /// `podman exec` of `argv` in the OS, from the repository root. Every
    /// variable but PATH is passed by name, its value in podman's own
    /// environment (never in argv).
    fn exec_command(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
    ) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("podman");
        cmd.args(["exec", "-w", REPO]);
        for (name, value) in env {
            if name == "PATH" {
                cmd.arg("--env").arg(format!("PATH={value}"));
            } else {
                cmd.arg("--env").arg(name);
                cmd.env(name, value);
            }
        }
        cmd.arg(&self.container)
            .args(argv)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Removes the container and the staged snapshot (a run that did not
    /// pass, or did not finish).
    fn discard(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.container])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.staged = None;
    }
}

impl Drop for PodmanSession {
    fn drop(&mut self) {
        if !self.finished {
            self.discard();
        }
    }
}

impl Session for PodmanSession {
    async fn exec(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        sink: &mut (dyn FnMut(Stream, &[u8]) + Send),
    ) -> Result<i32, RunError> {
        let mut child = self
            .exec_command(argv, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RunError::Podman(format!("podman exec: {e}")))?;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let (mut obuf, mut ebuf) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            tokio::select! {
                n = out.read(&mut obuf), if out_open => match n {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => sink(Stream::Stdout, &obuf[..n]),
                },
                n = err.read(&mut ebuf), if err_open => match n {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => sink(Stream::Stderr, &ebuf[..n]),
                },
            }
        }
        let status = child
            .wait()
            .await
            .map_err(|e| RunError::Podman(format!("podman exec: {e}")))?;
        Ok(exit_code(status))
    }

    async fn capture(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
    ) -> Result<Output, RunError> {
        let out = self
            .exec_command(argv, env)
            .output()
            .await
            .map_err(|e| RunError::Podman(format!("podman exec: {e}")))?;
        Ok(Output {
            code: exit_code(out.status),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    async fn collect(&self, dest: &Path, _settled: bool) -> Result<(), RunError> {
        // The artifacts folder is a bind mount of a folder of the run's
        // work folder: it is on the host already.
        std::fs::rename(&self.artifacts, dest)
            .map_err(|e| RunError::Podman(format!("collecting the artifacts: {e}")))
    }

    fn settle_snapshot(&self) -> Option<String> {
        None
    }

    fn console_tail(&self) -> String {
        String::new()
    }

    fn isolation(&self) -> String {
        "container".into()
    }

    fn snapshot(&self) -> Snapshot {
        self.start
            .as_ref()
            .map_or(Snapshot::Fresh, SnapshotStart::snapshot)
    }

    async fn finish(
        mut self,
        passed: bool,
        _settled: bool,
        key: &RunKey,
        ui: &dyn Ui,
    ) -> Result<(), RunError> {
        let out = podman(&["rm", "-f", "-t", "0", &self.container]).await?;
        if !out.status.success() {
            ui.note(&failed("removing the OS container", &out).to_string());
        }
        self.finished = true;
        let start = self.start.take().expect("finished once");
        let staged = self.staged.take().expect("finished once");
        if passed {
            let t = std::time::Instant::now();
            ui.begin("snapshot");
            match self
                .snapshots
                .commit_folder(&self.repo, &self.image, staged, start, key)
            {
                Ok(_) => ui.phase("snapshot", t.elapsed()),
                Err(e) => ui.note(&format!("could not update the repository's snapshot: {e}")),
            }
        }
        Ok(())
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
