//! `reprise-guest`: Reprise's helper inside the guest VM.
//!
//! The guest agent (qemu-ga) only hands a command's output back once it has
//! exited. For live output the host starts this helper through the agent:
//! `reprise-guest exec --id ID [--cwd DIR] -- PROGRAM ARGS...`. It runs the
//! command with its standard output and error on pipes and forwards both, as
//! they come, in frames over the `reprise.stream` virtio-serial port, closing
//! with the exit status. Its own exit status is the command's.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use reprise_protocol::guest_stream::Frame;

const PORT_NAME: &str = "reprise.stream";
const CHUNK: usize = 64 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(req) => match exec(req) {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("reprise-guest: {e}");
                ExitCode::from(125)
            }
        },
        Err(e) => {
            eprintln!("reprise-guest: {e}");
            eprintln!("usage: reprise-guest exec --id ID [--cwd DIR] -- PROGRAM [ARGS...]");
            ExitCode::from(125)
        }
    }
}

#[derive(Debug)]
struct Request {
    id: String,
    cwd: Option<PathBuf>,
    argv: Vec<String>,
}

fn parse(args: &[String]) -> Result<Request, String> {
    let mut it = args.iter();
    match it.next().map(String::as_str) {
        Some("exec") => {}
        Some(other) => return Err(format!("unknown command '{other}'")),
        None => return Err("no command given".into()),
    }
    let (mut id, mut cwd) = (None, None);
    loop {
        match it.next().map(String::as_str) {
            Some("--id") => id = it.next().cloned(),
            Some("--cwd") => cwd = it.next().map(PathBuf::from),
            Some("--") => break,
            Some(other) => return Err(format!("unknown option '{other}'")),
            None => return Err("missing '--' before the program".into()),
        }
    }
    let argv: Vec<String> = it.cloned().collect();
    if argv.is_empty() {
        return Err("no program given".into());
    }
    Ok(Request {
        id: id.ok_or("missing --id")?,
        cwd,
        argv,
    })
}

/// Finds the character device of the virtio-serial port named `name`
/// (there is no udev in the guest, so no /dev/virtio-ports links).
fn find_port(name: &str) -> std::io::Result<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports")? {
        let entry = entry?;
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Ok(Path::new("/dev").join(entry.file_name()));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no virtio-serial port named {name}"),
    ))
}

fn send(port: &Mutex<File>, frame: &Frame) -> std::io::Result<()> {
    let bytes = frame.encode();
    let mut port = port.lock().unwrap_or_else(|p| p.into_inner());
    port.write_all(&bytes)?;
    port.flush()
}

fn exec(req: Request) -> std::io::Result<i32> {
    let port = OpenOptions::new().write(true).open(find_port(PORT_NAME)?)?;
    let port = Arc::new(Mutex::new(port));
    send(&port, &Frame::Start(req.id.clone()))?;

    let mut cmd = Command::new(&req.argv[0]);
    // A process group of its own: a `kill 0` in the command, or the kernel's
    // SIGHUP to an orphaned group with stopped jobs, stays inside it and
    // never reaches the guest agent.
    cmd.process_group(0);
    cmd.args(&req.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let msg = format!("cannot start {}: {e}", req.argv[0]);
            send(&port, &Frame::Failed(msg))?;
            return Ok(127);
        }
    };

    let out = child
        .stdout
        .take()
        .map(|r| pump(r, port.clone(), Frame::Stdout));
    let err = child
        .stderr
        .take()
        .map(|r| pump(r, port.clone(), Frame::Stderr));
    let status = child.wait()?;
    for pump in [out, err].into_iter().flatten() {
        pump.join().unwrap_or(Ok(()))?;
    }
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 255,
    };
    send(&port, &Frame::Exit(code))?;
    Ok(code)
}

/// Forwards one pipe to the port until it closes.
fn pump(
    mut from: impl Read + Send + 'static,
    port: Arc<Mutex<File>>,
    frame: fn(Vec<u8>) -> Frame,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            send(&port, &frame(buf[..n].to_vec()))?;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_exec_requests() {
        let r = parse(&args(&[
            "exec", "--id", "7", "--cwd", "/repo", "--", "sh", "-c", "x",
        ]))
        .unwrap();
        assert_eq!(r.id, "7");
        assert_eq!(r.cwd, Some(PathBuf::from("/repo")));
        assert_eq!(r.argv, ["sh", "-c", "x"]);
    }

    #[test]
    fn refuses_malformed_requests() {
        assert!(parse(&args(&[])).is_err());
        assert!(parse(&args(&["run"])).is_err());
        assert!(parse(&args(&["exec", "--id", "1"])).is_err());
        assert!(parse(&args(&["exec", "--id", "1", "--"])).is_err());
        assert!(parse(&args(&["exec", "--", "true"])).is_err());
    }
}
