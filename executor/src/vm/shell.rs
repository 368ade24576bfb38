//! An interactive shell in the guest, on its second serial port.
//!
//! A VM booted with [`VmConfig::tty`](super::VmConfig::tty) has a 16550
//! UART at `/dev/ttyS1` whose other end is a unix socket on the host. The
//! agent starts `bash -l` in a new session with that port as its
//! controlling terminal (`setsid -c`), so job control, line editing and
//! Ctrl-C work as on a real terminal; the host pumps bytes between its side
//! (any reader and writer, or the user's terminal in raw mode) and the
//! socket until the shell exits, and returns its exit status.

use std::path::PathBuf;
use std::time::Duration;

use qapi::qga;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{GUEST_REPO, GuestCommand, Vm, VmError, exit_code};

/// The host socket of the guest's `/dev/ttyS1`, beside the QMP socket.
pub(super) const TTY_SOCKET: &str = "tty.sock";
const GUEST_TTY: &str = "/dev/ttyS1";

/// Why an interactive shell could not run.
#[derive(Debug, Error)]
pub enum ShellError {
    #[error("the VM has no terminal port (boot it with VmConfig::tty set)")]
    NoTty,
    #[error("connecting to the guest's terminal port {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("moving bytes between the terminal and the guest")]
    Io(#[source] std::io::Error),
    #[error("setting up the host terminal")]
    Terminal(#[source] nix::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

/// Runs `bash -l` in `/repo` on the guest's `/dev/ttyS1`, copying `input`
/// to it and its output to `output` until it exits; returns its exit status
/// (128 + signal if killed). Input is held back until the shell has written
/// something (its prompt), so nothing typed ahead is lost while the guest
/// opens the port. `size` is given to the guest terminal with `stty`; `term`
/// becomes `TERM`.
pub async fn interactive_shell<R, W>(
    vm: &Vm,
    mut input: R,
    mut output: W,
    size: Option<TermSize>,
    term: &str,
) -> Result<i32, ShellError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let path = vm.sockets.path().join(TTY_SOCKET);
    if !path.exists() {
        return Err(ShellError::NoTty);
    }
    // Connected before the shell starts: qemu drops what the guest writes
    // to a port with no client.
    let socket = UnixStream::connect(&path)
        .await
        .map_err(|source| ShellError::Connect { path, source })?;
    let (mut from_guest, mut to_guest) = socket.into_split();

    // The size is set from inside the session: a tty forgets it when its
    // last opener closes it.
    let stty = match size {
        Some(s) => format!("stty sane rows {} cols {}", s.rows, s.cols),
        None => "stty sane".into(),
    };
    let script = format!(
        "cd {GUEST_REPO} 2>/dev/null || cd; \
         exec setsid -c -w sh -c '{stty}; exec bash -l' <{GUEST_TTY} >{GUEST_TTY} 2>&1"
    );
    let command = GuestCommand::shell(&script)
        .env("TERM", term)
        .env("SHELL", "/bin/bash");
    let pid = vm
        .agent
        .call(qga::guest_exec {
            path: command.argv[0].clone(),
            arg: Some(command.argv[1..].to_vec()),
            env: Some(command.env_list()),
            input_data: None,
            capture_output: None,
        })
        .await
        .map_err(VmError::from)?
        .pid;

    let mut shell_spoke = false;
    let mut input_open = true;
    let mut from_user = vec![0u8; 4096];
    let mut from_shell = vec![0u8; 16384];
    let mut check = tokio::time::interval(Duration::from_millis(200));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            n = from_guest.read(&mut from_shell) => {
                let n = n.map_err(ShellError::Io)?;
                if n == 0 {
                    break;
                }
                shell_spoke = true;
                output.write_all(&from_shell[..n]).await.map_err(ShellError::Io)?;
                output.flush().await.map_err(ShellError::Io)?;
            }
            n = input.read(&mut from_user), if input_open && shell_spoke => {
                match n.map_err(ShellError::Io)? {
                    0 => input_open = false,
                    n => to_guest.write_all(&from_user[..n]).await.map_err(ShellError::Io)?,
                }
            }
            _ = check.tick() => {
                let status = vm
                    .agent
                    .call(qga::guest_exec_status { pid })
                    .await
                    .map_err(VmError::from)?;
                if status.exited {
                    // What the shell wrote last may still be in the port.
                    while let Ok(Ok(n)) = tokio::time::timeout(
                        Duration::from_millis(100),
                        from_guest.read(&mut from_shell),
                    )
                    .await
                    {
                        if n == 0 {
                            break;
                        }
                        output.write_all(&from_shell[..n]).await.map_err(ShellError::Io)?;
                    }
                    output.flush().await.map_err(ShellError::Io)?;
                    return Ok(exit_code(status.exitcode, status.signal));
                }
            }
        }
    }
    Err(ShellError::Io(std::io::ErrorKind::UnexpectedEof.into()))
}

/// [`interactive_shell`] on this process's terminal: stdin in raw mode
/// (restored on return, error or panic), the terminal's size and `TERM`.
pub async fn interactive_shell_on_terminal(vm: &Vm) -> Result<i32, ShellError> {
    let size = terminal_size();
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
    let _raw = RawMode::enter()?;
    interactive_shell(vm, tokio::io::stdin(), tokio::io::stdout(), size, &term).await
}

/// The size of the terminal on stdin, from `stty size`.
fn terminal_size() -> Option<TermSize> {
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_stty_size(&String::from_utf8_lossy(&out.stdout))
}

fn parse_stty_size(text: &str) -> Option<TermSize> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(rows)), Some(Ok(cols))) if rows > 0 && cols > 0 => Some(TermSize { rows, cols }),
        _ => None,
    }
}

/// Stdin in raw mode until dropped. A stdin that is not a terminal is left
/// as it is.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> Result<RawMode, ShellError> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        if !std::io::IsTerminal::is_terminal(&stdin) {
            return Ok(RawMode { saved: None });
        }
        let saved = tcgetattr(&stdin).map_err(ShellError::Terminal)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(ShellError::Terminal)?;
        Ok(RawMode { saved: Some(saved) })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stty_size_is_rows_then_cols() {
        assert_eq!(
            parse_stty_size("40 120\n"),
            Some(TermSize {
                rows: 40,
                cols: 120
            })
        );
        assert_eq!(parse_stty_size(""), None);
        assert_eq!(parse_stty_size("0 0\n"), None);
        assert_eq!(parse_stty_size("x 3"), None);
    }
}
