//! The guest's network: passt, user-mode networking through the host's
//! own sockets. The guest reaches the outside network and nothing of the
//! host itself: the gateway is not mapped to the host's loopback and no
//! port is forwarded in.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::BootError;

/// The guest's address, gateway and DNS server; the guest's init sets them
/// statically (`reprise.net=1`, image/init), so no DHCP exchange costs boot
/// time.
pub const ADDRESS: &str = "10.0.2.15";
pub const GATEWAY: &str = "10.0.2.2";
pub const DNS: &str = "10.0.2.3";

/// The user passt drops to when started as root. It binds its socket after
/// dropping, so the socket's folder must be that user's.
const NOBODY: u32 = 65534;

/// A running passt and the private folder of its socket; both go with it.
pub struct Passt {
    _child: Child,
    /// The connection qemu's network card uses, made here: qemu is handed
    /// it open and needs no access to the socket's folder.
    connection: std::os::unix::net::UnixStream,
    _dir: crate::workdir::WorkDir,
}

impl Passt {
    /// Starts passt, its messages in `log`, and waits for its socket.
    pub async fn start(log: &Path) -> Result<Passt, BootError> {
        let runtime = crate::paths::runtime_dir();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BootError::Io { path, source }
        };
        let dir = crate::workdir::WorkDir::new_in(&runtime, crate::workdir::NET_PREFIX)
            .map_err(io(&runtime))?;
        let root = nix::unistd::geteuid().is_root();
        if root {
            std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY))
                .map_err(io(dir.path()))?;
        }
        let socket = dir.path().join("passt.sock");
        let log_file = std::fs::File::create(log).map_err(io(log))?;
        let mut cmd = Command::new("passt");
        // `--one-off`: passt quits once its one client (the connection
        // made below, shared with qemu) is gone. Its parent-death signal
        // alone does not hold: the kernel clears it when passt drops to
        // `--runas`'s user, and a killed run left passt running for ever.
        cmd.args(["--foreground", "--quiet", "--one-off", "-4", "--socket"])
            .arg(&socket)
            .args([
                "--address",
                ADDRESS,
                "--netmask",
                "24",
                "--gateway",
                GATEWAY,
            ])
            .args(["--dns-forward", DNS, "--no-map-gw"])
            .args(["--tcp-ports", "none", "--udp-ports", "none"]);
        if root {
            cmd.args(["--runas", &format!("{NOBODY}:{NOBODY}")]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .process_group(0);
        super::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(BootError::PasstMissing)?;
        for _ in 0..500 {
            if socket.exists()
                && let Ok(connection) = std::os::unix::net::UnixStream::connect(&socket)
            {
                return Ok(Passt {
                    _child: child,
                    connection,
                    _dir: dir,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let said = std::fs::read_to_string(log).unwrap_or_default();
                return Err(BootError::Passt(format!(
                    "it exited ({status}): {}",
                    said.trim()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // This passt reports its socket bound even when bind failed.
        Err(BootError::Passt(format!(
            "no socket at {} after 5 s",
            socket.display()
        )))
    }

    /// The descriptor of the connection qemu's network card uses.
    pub fn connection(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run killed outright never drops its `Passt`, so nothing kills
    /// passt: it must go by itself once its connection is gone (qemu's and
    /// the run's ends close when they die). Its parent-death signal does
    /// not see to it: the kernel clears it when passt drops to `--runas`'s
    /// user, and such a passt outlived its run.
    #[tokio::test]
    async fn passt_quits_once_its_connection_is_gone_though_nothing_kills_it() {
        let dir = tempfile::tempdir().unwrap();
        let passt = Passt::start(&dir.path().join("passt.log"))
            .await
            .expect("passt runs (scripts/setup.sh installs it)");
        let Passt {
            _child: child,
            connection,
            _dir,
        } = passt;
        let pid = child.id().expect("passt is running");
        // As a killed run would: no kill, no wait, only the connection
        // closes.
        std::mem::forget(child);
        drop(connection);
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
        };
        let started = std::time::Instant::now();
        while !gone() && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let outlived = !gone();
        if outlived {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        assert!(!outlived, "passt outlived its connection by 10 s");
    }
}
