//! Where a run happens. A [`Driver`] starts a [`Session`] for a prepared
//! run: an "OS" (the base image, booted or started) with the revision's
//! tree at [`REPO`], `mk` at [`OS_MK`], the repository's snapshot mounted
//! at [`SNAPSHOT`] and an artifacts folder at [`ARTIFACTS`]. [`crate::steps`] then drives the contract's
//! steps through the session, the same way for every driver; the driver owns
//! everything about where that happens, and what becomes of the snapshot.
//!
//! | driver | the OS | key class |
//! | --- | --- | --- |
//! | [`qemu`] | a VM of the base image (KVM or TCG) | `qemu` |
//! | [`podman`] | a privileged container of the same image, on the host's podman | `podman` |
//! | [`dry_run`] | none: prints the plan of a qemu run | `qemu` |

pub mod dry_run;
pub mod podman;
pub mod qemu;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use reprise_protocol::digest::RunKey;
use reprise_protocol::key::{DRIVER_PODMAN, DRIVER_QEMU};
use reprise_protocol::manifest::Snapshot;

use crate::accel::Accel;
use crate::error::RunError;
use crate::image::Image;
use crate::inputs::Keyed;
use crate::snapshots::{RepoId, SnapshotStart, Snapshots};
use crate::ui::Ui;
pub use crate::vm::{Output, Stream};

pub use crate::vars::DRIVER_VAR;

// The OS layout every driver provides, on which the steps rely.

/// The well-known folder of the contract.
pub const CI: &str = "/var/run/ci";
/// Where `prepare-runtime` writes the repository's scheduled targets.
pub const CRONTAB: &str = "/var/run/ci/crontab";
/// Where every driver mounts the repository's snapshot in the OS.
pub const SNAPSHOT: &str = "/var/lib/reprise/state";
/// The workspace's `mk` in the OS (and bind-mounted into the container).
pub const OS_MK: &str = "/reprise/bin/mk";
/// Reprise's helper in the OS (`reprise-guest`): it streams a VM's
/// commands' output, and does a run's set-up steps in one process
/// (`reprise-guest setup`), where a shell would start one per command.
pub const OS_HELPER: &str = crate::vm::GUEST_HELPER;
/// Where `/var/run/ci/artifacts` points in the OS; the driver collects it.
pub const ARTIFACTS: &str = "/reprise/artifacts";
/// The repository's tree in the OS.
pub const REPO: &str = "/repo";
/// `PATH` of commands in the OS.
pub const OS_PATH: &str =
    "/reprise/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `podman run` of the target in `image`: the repository at `/repo` as the
/// working directory, `mk` and `ci.mk` mounted read-only, no network unless
/// asked, and every variable of `env` passed by name (its value travels in
/// podman's own environment, never in argv).
pub fn test_command(
    network: bool,
    image: &str,
    target: &str,
    env: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut argv: Vec<String> = [
        "podman",
        "run",
        "--rm",
        "--pull=never",
        "--network",
        if network { "host" } else { "none" },
        "-v",
        "/repo:/repo",
        "-w",
        REPO,
        "-v",
        "/reprise/bin/mk:/usr/local/bin/mk:ro",
        "-v",
        "/usr/lib/reprise:/usr/lib/reprise:ro",
    ]
    .map(String::from)
    .to_vec();
    for name in env.keys() {
        argv.extend(["--env".into(), name.clone()]);
    }
    argv.extend([image.into(), "/usr/local/bin/mk".into(), target.into()]);
    argv
}

/// Which driver a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriverKind {
    #[default]
    Qemu,
    Podman,
    DryRun,
}

impl DriverKind {
    /// The class that goes into the run key: results of different classes
    /// never replay as each other. A dry run plans a qemu run.
    pub fn class(self) -> &'static str {
        match self {
            DriverKind::Qemu | DriverKind::DryRun => DRIVER_QEMU,
            DriverKind::Podman => DRIVER_PODMAN,
        }
    }

    /// `--driver` if given, else `REPRISE_DRIVER` from `env`, else qemu.
    pub fn choose(
        flag: Option<DriverKind>,
        env: &BTreeMap<String, String>,
    ) -> Result<DriverKind, RunError> {
        match (flag, env.get(DRIVER_VAR).filter(|v| !v.is_empty())) {
            (Some(kind), _) => Ok(kind),
            (None, Some(v)) => v
                .parse()
                .map_err(|e| RunError::Usage(format!("{DRIVER_VAR}: {e}"))),
            (None, None) => Ok(DriverKind::Qemu),
        }
    }
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Qemu => "qemu",
            DriverKind::Podman => "podman",
            DriverKind::DryRun => "dry-run",
        })
    }
}

impl FromStr for DriverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<DriverKind, String> {
        match s {
            "qemu" => Ok(DriverKind::Qemu),
            "podman" => Ok(DriverKind::Podman),
            "dry-run" => Ok(DriverKind::DryRun),
            other => Err(format!(
                "'{other}' is not a driver (qemu, podman or dry-run)"
            )),
        }
    }
}

/// What a driver gets to start a session.
#[derive(Debug)]
pub struct Prepared<'a> {
    pub keyed: &'a Keyed,
    /// The repository whose snapshots the run uses ([`Keyed::repo_id`]).
    pub repo: RepoId,
    /// The revision's tree, exported on the host.
    pub tree: PathBuf,
    /// The run's work folder (kept with `--keep`).
    pub work: &'a Path,
    /// Whether the tests get the network.
    pub network: bool,
    /// Whether preparation gets the network.
    pub prepare_network: bool,
    /// Start from a blank snapshot, not the repository's.
    pub fresh: bool,
    /// A forced accelerator (qemu).
    pub accel: Option<Accel>,
}

impl Prepared<'_> {
    /// Where the run's snapshot starts: the repository's current
    /// generation in `snapshots` for `image` (the user is told which),
    /// unless the run is fresh or there is none; otherwise `blank`.
    pub fn snapshot_start(
        &self,
        snapshots: &Snapshots,
        image: &Image,
        ui: &dyn Ui,
        blank: impl FnOnce() -> Result<PathBuf, RunError>,
    ) -> Result<SnapshotStart, RunError> {
        let current = (!self.fresh)
            .then(|| snapshots.current(&self.repo, image))
            .flatten();
        Ok(match current {
            Some(generation) => {
                ui.note(&format!(
                    "using this repository's snapshot (generation {}; --fresh for a blank one)",
                    generation.generation.short()
                ));
                SnapshotStart::Generation(generation)
            }
            None => SnapshotStart::Fresh(blank()?),
        })
    }
}

/// Runs a prepared run somewhere.
#[expect(
    async_fn_in_trait,
    reason = "runs are awaited in place, never spawned, so no Send bound is needed"
)]
pub trait Driver {
    type Session: Session;

    /// Starts the OS for `run`: booted or started, the tree in place, the
    /// snapshot mounted. Returns the session and the name of the phase it
    /// took (`boot`, `restore`, `start`).
    async fn start(
        &self,
        run: &Prepared<'_>,
        ui: &dyn Ui,
    ) -> Result<(Self::Session, &'static str), RunError>;
}

/// A started OS, driven through the contract's steps.
#[expect(
    async_fn_in_trait,
    reason = "runs are awaited in place, never spawned, so no Send bound is needed"
)]
pub trait Session {
    /// Runs `argv` as root in the OS from the repository root with exactly
    /// `env`, its output handed to `sink` as it comes. Returns its status.
    async fn exec(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        sink: &mut (dyn FnMut(Stream, &[u8]) + Send),
    ) -> Result<i32, RunError>;

    /// Runs `argv` as root in the OS and captures its output.
    async fn capture(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
    ) -> Result<Output, RunError>;

    /// Copies the OS's artifacts folder to `dest` (which must not exist);
    /// `settled` when the last command ran [`Session::settle_artifacts`].
    async fn collect(&self, dest: &Path, settled: bool) -> Result<(), RunError>;

    /// A shell snippet that makes the artifacts folder readable from the
    /// host, run at the end of the command that makes the artifacts (a
    /// process start costs time under emulation); `None` when nothing is
    /// needed.
    fn settle_artifacts(&self) -> Option<String> {
        None
    }

    /// A shell snippet that makes the snapshot consistent, run in the same
    /// command as the last step (a process start costs time under
    /// emulation); `None` when nothing is needed.
    fn settle_snapshot(&self) -> Option<String>;

    /// A shell fragment the steps run first in the OS, in the same command
    /// as their own set-up (a process start costs time under TCG): what
    /// the driver leaves to do in the OS before anything else, such as
    /// finding the disks of a warm guest. Each statement ends with `; `
    /// and exits non-zero on failure.
    fn os_setup(&self) -> String {
        String::new()
    }

    /// Steps of `reprise-guest setup` ([`OS_HELPER`]) the driver leaves to
    /// do in the OS after [`Session::os_setup`] and before the steps' own
    /// set-up, as shell words: mounting the snapshot, say.
    fn os_steps(&self) -> Vec<String> {
        Vec::new()
    }

    /// The last lines the OS printed, to show with an error.
    fn console_tail(&self) -> String;

    /// How the run was isolated, for the manifest: the accelerator of a
    /// VM (`kvm`, `tcg`) or `container`.
    fn isolation(&self) -> String;

    /// The snapshot the run started from.
    fn snapshot(&self) -> Snapshot;

    /// Stops the OS. Only if `passed`, the snapshot's changes become a new
    /// generation of the repository's snapshot (made by the run `key`);
    /// `settled`: [`Session::settle_snapshot`] already ran.
    async fn finish(
        self,
        passed: bool,
        settled: bool,
        key: &RunKey,
        ui: &dyn Ui,
    ) -> Result<(), RunError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_are_chosen_by_flag_then_environment() {
        let env = |v: &str| BTreeMap::from([(DRIVER_VAR.to_string(), v.to_string())]);
        let none = BTreeMap::new();
        let table = [
            (None, &none, DriverKind::Qemu),
            (None, &env("podman"), DriverKind::Podman),
            (None, &env(""), DriverKind::Qemu),
            (Some(DriverKind::DryRun), &env("podman"), DriverKind::DryRun),
        ];
        for (flag, env, want) in table {
            assert_eq!(DriverKind::choose(flag, env).unwrap(), want);
        }
        let e = DriverKind::choose(None, &env("docker")).unwrap_err();
        assert!(e.to_string().contains("qemu, podman or dry-run"), "{e}");
        assert_eq!(DriverKind::DryRun.class(), DriverKind::Qemu.class());
        assert_ne!(DriverKind::Podman.class(), DriverKind::Qemu.class());
        assert_eq!(
            crate::inputs::KeyRequest::at(std::path::Path::new(".")).driver,
            DriverKind::default().class()
        );
        for kind in [DriverKind::Qemu, DriverKind::Podman, DriverKind::DryRun] {
            assert_eq!(kind.to_string().parse::<DriverKind>(), Ok(kind));
        }
    }

    #[test]
    fn the_test_command_passes_variables_by_name_only() {
        let env = BTreeMap::from([("TOKEN".to_string(), "s3cret".to_string())]);
        let argv = test_command(false, "localhost/x", "test", &env);
        assert!(argv.windows(2).any(|w| w == ["--network", "none"]));
        assert!(argv.windows(2).any(|w| w == ["--env", "TOKEN"]));
        assert!(!argv.iter().any(|a| a.contains("s3cret")), "{argv:?}");
        assert_eq!(
            argv[argv.len() - 3..],
            ["localhost/x", "/usr/local/bin/mk", "test"]
        );
        let networked = test_command(true, "i", "t", &BTreeMap::new());
        assert!(networked.windows(2).any(|w| w == ["--network", "host"]));
    }
}
