//! Starting shells: backquotes, `<|` includes, recipes, and waiting for
//! any child as mk's scheduler does.

use std::io::{self, Write};
use std::process::{Command, Stdio};

/// Builds a command for the shell words `shell` with a cleared environment
/// set to `env`.
fn shell_command(shell: &[String], env: &[(String, String)]) -> Command {
    let prog = shell.first().map(String::as_str).unwrap_or("sh");
    let mut cmd = Command::new(if prog.is_empty() { "sh" } else { prog });
    if shell.len() > 1 {
        cmd.args(&shell[1..]);
    }
    cmd.env_clear();
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Feeds `script` to the shell's standard input from a helper thread, so
/// a long script never blocks the caller.
fn feed(child: &mut std::process::Child, script: &str) {
    if let Some(mut stdin) = child.stdin.take() {
        let script = script.as_bytes().to_vec();
        std::thread::spawn(move || {
            // A shell that exits early closes the pipe; that is not an error here.
            let _ = stdin.write_all(&script);
        });
    }
}

/// Runs `script` on the shell's standard input and returns its standard
/// output with one trailing newline removed (a backquote).
pub fn backquote(shell: &[String], script: &str, env: &[(String, String)]) -> io::Result<String> {
    let mut cmd = shell_command(shell, env);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn()?;
    feed(&mut child, script);
    let out = child.wait_with_output()?;
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if s.ends_with('\n') {
        s.pop();
    }
    Ok(s)
}

/// Runs `shell -c cmd` and returns its standard output and whether it
/// exited with status zero (a `<|` include).
pub fn pipe_output(
    shell: &[String],
    cmd: &str,
    env: &[(String, String)],
) -> io::Result<(String, bool)> {
    let mut c = shell_command(shell, env);
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped());
    let out = c.output()?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    ))
}

/// Runs `shell -c "prog 'a' 'b'"` in mk's own environment (the `P`
/// attribute): true when it exits zero.
pub fn compare(shell: &[String], prog: &str, a: &str, b: &str) -> io::Result<bool> {
    let prog_name = shell.first().map(String::as_str).unwrap_or("sh");
    let mut c = Command::new(prog_name);
    c.args(shell.iter().skip(1))
        .arg("-c")
        .arg(format!("{prog} '{a}' '{b}'\n"));
    Ok(c.status()?.success())
}

/// Starts a recipe: the shell with `flag` (normally `-e`), the recipe on
/// standard input. Returns the child's pid; reap it with [`wait_any`].
pub fn spawn_recipe(
    shell: &[String],
    flag: Option<&str>,
    recipe: &str,
    env: &[(String, String)],
) -> io::Result<i32> {
    let mut cmd = shell_command(shell, env);
    if let Some(f) = flag {
        cmd.arg(f);
    }
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn()?;
    feed(&mut child, recipe);
    let pid = i32::try_from(child.id()).map_err(io::Error::other)?;
    // The child is reaped by `wait_any`; dropping the handle neither
    // waits nor kills.
    drop(child);
    Ok(pid)
}

/// Waits for the child `pid` to end (whatever its status).
pub fn wait_for(pid: i32) {
    use nix::errno::Errno;
    use nix::sys::wait::waitpid;
    let pid = nix::unistd::Pid::from_raw(pid);
    // Without WNOHANG it returns once the child ended; only a signal
    // interrupts it.
    while waitpid(pid, None) == Err(Errno::EINTR) {}
}

/// Waits for any child. `Ok(None)` when there are none; otherwise its pid
/// and 9base's status text (empty on success, `exit(N)`, `signal N`).
pub fn wait_any() -> io::Result<Option<(i32, String)>> {
    use nix::errno::Errno;
    use nix::sys::wait::{WaitStatus, wait};
    loop {
        match wait() {
            Err(Errno::ECHILD) => return Ok(None),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
            Ok(WaitStatus::Exited(pid, code)) => {
                let msg = if code == 0 {
                    String::new()
                } else {
                    format!("exit({code})")
                };
                return Ok(Some((pid.as_raw(), msg)));
            }
            Ok(WaitStatus::Signaled(pid, sig, core)) => {
                let n = sig as i32;
                let msg = if core {
                    format!("signal {n}, core dumped")
                } else {
                    format!("signal {n}")
                };
                return Ok(Some((pid.as_raw(), msg)));
            }
            Ok(_) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh() -> Vec<String> {
        vec!["sh".to_string()]
    }

    fn path_env() -> Vec<(String, String)> {
        std::env::var("PATH")
            .map(|p| vec![("PATH".to_string(), p)])
            .unwrap_or_default()
    }

    #[test]
    fn backquote_strips_one_newline() {
        let out = backquote(&sh(), "echo a; echo b\n", &path_env()).expect("runs");
        assert_eq!(out, "a\nb");
    }

    #[test]
    fn pipe_output_reports_status() {
        let (out, ok) = pipe_output(&sh(), "echo x=1; exit 3", &path_env()).expect("runs");
        assert_eq!(out, "x=1\n");
        assert!(!ok);
    }
}
