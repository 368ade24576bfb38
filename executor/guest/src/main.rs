//! `reprise-guest`: Reprise's helper inside the guest VM.
//!
//! The guest agent (qemu-ga) only hands a command's output back once it has
//! exited. For live output the host starts this helper through the agent:
//! `reprise-guest exec --id ID [--cwd DIR] -- PROGRAM ARGS...`. It runs the
//! command with its standard output and error on pipes and forwards both, as
//! they come, in frames over the `reprise.stream` virtio-serial port, closing
//! with the exit status. Its own exit status is the command's.
//!
//! `reprise-guest setup STEP...` does a run's set-up in the OS (mounts,
//! folders, links) in one process where a shell would start one per
//! command: under software emulation each process start costs the guest
//! tens of milliseconds. Each step does what the shell command named in
//! [`Step`] does; the first that fails ends it, exit status 1.

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
    if args.first().map(String::as_str) == Some("setup") {
        return setup(&args[1..]);
    }
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

/// `reprise-guest setup STEP...`: every step in order, up to the first
/// that fails (exit status 1); 125 for steps that do not parse.
fn setup(args: &[String]) -> ExitCode {
    let steps = match parse_steps(args) {
        Ok(steps) => steps,
        Err(e) => {
            eprintln!("reprise-guest: {e}");
            eprintln!(
                "usage: reprise-guest setup STEP... (mkdir DIR, mount-ext4 DEV DIR, bind FROM DIR, link TARGET PATH, rm PATH, settle DIR)"
            );
            return ExitCode::from(125);
        }
    };
    for step in &steps {
        if let Err(e) = step.run() {
            eprintln!("reprise-guest: {step}: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
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

/// One step of `reprise-guest setup`, each as the shell command it stands
/// for does it.
#[derive(Debug, PartialEq)]
enum Step {
    /// `mkdir -p DIR`
    Mkdir(PathBuf),
    /// `mount -t ext4 -o rw,noatime DEV DIR`
    MountExt4 { dev: PathBuf, dir: PathBuf },
    /// `mount --bind FROM DIR`
    Bind { from: PathBuf, dir: PathBuf },
    /// `ln -sfn TARGET PATH`, but never into a folder at PATH: that is an
    /// error.
    Link { target: PathBuf, path: PathBuf },
    /// `rm -rf PATH`: a symlink there is removed, never followed.
    Remove(PathBuf),
    /// `fsfreeze -f DIR && fsfreeze -u DIR`: the file system at DIR synced
    /// and its journal checkpointed, so its disk file reads consistent.
    Settle(PathBuf),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Mkdir(dir) => write!(f, "mkdir -p {}", dir.display()),
            Step::MountExt4 { dev, dir } => {
                write!(f, "mount -t ext4 {} {}", dev.display(), dir.display())
            }
            Step::Bind { from, dir } => {
                write!(f, "mount --bind {} {}", from.display(), dir.display())
            }
            Step::Link { target, path } => {
                write!(f, "ln -sfn {} {}", target.display(), path.display())
            }
            Step::Remove(path) => write!(f, "rm -rf {}", path.display()),
            Step::Settle(dir) => write!(f, "fsfreeze -f {0} && fsfreeze -u {0}", dir.display()),
        }
    }
}

/// The steps named in `args`, each a name and its operands.
fn parse_steps(args: &[String]) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    let mut it = args.iter();
    while let Some(name) = it.next() {
        let mut operand = || {
            it.next()
                .filter(|a| !a.is_empty())
                .map(PathBuf::from)
                .ok_or_else(|| format!("'{name}' is missing an operand"))
        };
        steps.push(match name.as_str() {
            "mkdir" => Step::Mkdir(operand()?),
            "mount-ext4" => Step::MountExt4 {
                dev: operand()?,
                dir: operand()?,
            },
            "bind" => Step::Bind {
                from: operand()?,
                dir: operand()?,
            },
            "link" => Step::Link {
                target: operand()?,
                path: operand()?,
            },
            "rm" => Step::Remove(operand()?),
            "settle" => Step::Settle(operand()?),
            other => return Err(format!("unknown step '{other}'")),
        });
    }
    if steps.is_empty() {
        return Err("no step given".into());
    }
    Ok(steps)
}

impl Step {
    fn run(&self) -> std::io::Result<()> {
        match self {
            Step::Mkdir(dir) => std::fs::create_dir_all(dir),
            Step::MountExt4 { dev, dir } => {
                mount(dev, dir, Some("ext4"), nix::mount::MsFlags::MS_NOATIME)
            }
            Step::Bind { from, dir } => mount(from, dir, None, nix::mount::MsFlags::MS_BIND),
            Step::Link { target, path } => {
                match std::fs::symlink_metadata(path) {
                    Ok(m) if m.is_dir() => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "a folder is in the way",
                        ));
                    }
                    Ok(_) => std::fs::remove_file(path)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                std::os::unix::fs::symlink(target, path)
            }
            Step::Remove(path) => {
                let gone = match std::fs::symlink_metadata(path) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
                    Ok(_) => std::fs::remove_file(path),
                    Err(e) => Err(e),
                };
                match gone {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            }
            Step::Settle(dir) => settle(dir),
        }
    }
}

nix::ioctl_readwrite!(fifreeze, b'X', 119, std::ffi::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, std::ffi::c_int);

/// Freezes the file system at `dir` (which syncs it and checkpoints its
/// journal) and thaws it at once, as `fsfreeze -f` and `-u` do.
#[expect(
    unsafe_code,
    reason = "FIFREEZE and FITHAW are ioctls on a descriptor this function owns"
)]
fn settle(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let folder = File::open(dir)?;
    let mut unused: std::ffi::c_int = 0;
    // SAFETY: the descriptor is open for the whole call and the argument
    // points to an int, as both ioctls take.
    unsafe { fifreeze(folder.as_raw_fd(), &mut unused) }.map_err(std::io::Error::from)?;
    // SAFETY: as above.
    unsafe { fithaw(folder.as_raw_fd(), &mut unused) }.map_err(std::io::Error::from)?;
    Ok(())
}

/// mount(2) of `source` on `dir`, read-write.
fn mount(
    source: &Path,
    dir: &Path,
    fstype: Option<&str>,
    flags: nix::mount::MsFlags,
) -> std::io::Result<()> {
    nix::mount::mount(Some(source), dir, fstype, flags, None::<&str>).map_err(std::io::Error::from)
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
    fn parses_setup_steps() {
        let words = "mkdir /s mount-ext4 /dev/vdc /s bind /s/c /var/lib/c \
                     link /s/ci /run/ci rm /run/ci/env settle /s";
        let steps = parse_steps(&args(&words.split_whitespace().collect::<Vec<_>>())).unwrap();
        assert_eq!(
            steps,
            [
                Step::Mkdir("/s".into()),
                Step::MountExt4 {
                    dev: "/dev/vdc".into(),
                    dir: "/s".into()
                },
                Step::Bind {
                    from: "/s/c".into(),
                    dir: "/var/lib/c".into()
                },
                Step::Link {
                    target: "/s/ci".into(),
                    path: "/run/ci".into()
                },
                Step::Remove("/run/ci/env".into()),
                Step::Settle("/s".into()),
            ]
        );
        // A missing operand (an unset shell variable is an empty one), an
        // unknown step, or none at all.
        for bad in [
            &["mkdir"][..],
            &["mount-ext4", "", "/s"],
            &["bind", "/a"],
            &["settle"],
            &["chmod", "/a"],
            &[],
        ] {
            assert!(parse_steps(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn setup_steps_do_what_their_shell_commands_do() {
        let dir = std::env::temp_dir().join(format!("reprise-guest-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let victim = dir.join("victim");
        std::fs::create_dir_all(victim.join("keep")).unwrap();
        // A tree to remove holding a link out of it, and a link to a folder
        // in place of one: removed, never followed.
        let old = dir.join("ci/env");
        std::fs::create_dir_all(old.join("deep")).unwrap();
        std::fs::write(old.join("deep/VAR"), "x").unwrap();
        std::os::unix::fs::symlink(&victim, old.join("out")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("ci/artifacts")).unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.join("run-ci")).unwrap();
        let p = |s: &str| dir.join(s).display().to_string();
        let steps = parse_steps(&args(&[
            "rm",
            &p("ci/env"),
            "rm",
            &p("ci/artifacts"),
            "rm",
            &p("ci/crontab"),
            "mkdir",
            &p("ci/env"),
            "mkdir",
            &p("a/b/c"),
            "mkdir",
            &p("a/b"),
            "link",
            &p("ci"),
            &p("run-ci"),
            "link",
            &p("a/b/c"),
            &p("ci/artifacts"),
        ]))
        .unwrap();
        for step in &steps {
            step.run().unwrap_or_else(|e| panic!("{step}: {e}"));
        }
        assert!(victim.join("keep").is_dir(), "a link was followed");
        assert_eq!(std::fs::read_dir(dir.join("ci/env")).unwrap().count(), 0);
        assert!(dir.join("a/b/c").is_dir());
        assert_eq!(
            std::fs::read_link(dir.join("run-ci")).unwrap(),
            dir.join("ci")
        );
        assert_eq!(
            std::fs::read_link(dir.join("ci/artifacts")).unwrap(),
            dir.join("a/b/c")
        );
        // A link is never made inside a folder in its place.
        let into = Step::Link {
            target: "/x".into(),
            path: dir.join("a"),
        };
        assert!(into.run().is_err());
        assert!(!dir.join("a/x").exists());
        std::fs::remove_dir_all(&dir).unwrap();
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
