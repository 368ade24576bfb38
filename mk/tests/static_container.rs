//! The `mk` binary is static: it runs in a container image holding only
//! Debian's busybox-static and mk itself. Skipped (with a note) when
//! `podman` is not installed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MKFILE: &str = "\
NAME=static
all:V: hello.txt
\tcat hello.txt
%.txt: %.src
\techo $NAME built $target from $prereq > $target
fail:V:
\tfalse
";

fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the ELF file at `path` has no program interpreter (PT_INTERP),
/// i.e. is statically linked.
fn is_static_elf(path: &Path) -> bool {
    let b = std::fs::read(path).expect("read binary");
    assert_eq!(&b[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(b[4], 2, "not a 64-bit ELF");
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let p = phoff + i * phentsize;
        u32::from_le_bytes(b[p..p + 4].try_into().expect("4 bytes")) != 3
    })
}

/// `/bin/busybox` from Debian's busybox-static: the installed one, or
/// extracted from the downloaded .deb.
fn busybox_static(tmp: &Path) -> PathBuf {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "busybox-static"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
    if installed && Path::new("/bin/busybox").exists() {
        return PathBuf::from("/bin/busybox");
    }
    let dl = tmp.join("deb");
    std::fs::create_dir_all(&dl).expect("mkdir deb");
    let st = Command::new("apt-get")
        .args(["download", "busybox-static"])
        .current_dir(&dl)
        .status()
        .expect("apt-get download busybox-static");
    assert!(st.success(), "apt-get download busybox-static failed");
    let deb = std::fs::read_dir(&dl)
        .expect("read deb dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("downloaded .deb");
    let root = tmp.join("debroot");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .expect("dpkg-deb");
    assert!(st.success(), "dpkg-deb -x failed");
    root.join("bin/busybox")
}

fn image_tar(tar_path: &Path, busybox: &Path, mk: &Path) {
    let f = std::fs::File::create(tar_path).expect("create tar");
    let mut t = tar::Builder::new(f);
    let dir = |t: &mut tar::Builder<std::fs::File>, name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        t.append_data(&mut h, name, std::io::empty())
            .expect("tar dir");
    };
    let file = |t: &mut tar::Builder<std::fs::File>, name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        // mk takes a date of 0 to mean "no such file".
        h.set_mtime(1_000_000_000);
        t.append_data(&mut h, name, data).expect("tar file");
    };
    dir(&mut t, "bin");
    dir(&mut t, "tmp");
    dir(&mut t, "work");
    file(
        &mut t,
        "bin/busybox",
        &std::fs::read(busybox).expect("read busybox"),
        0o755,
    );
    file(
        &mut t,
        "bin/mk",
        &std::fs::read(mk).expect("read mk"),
        0o755,
    );
    for applet in ["sh", "cat", "false"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        t.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("tar symlink");
    }
    file(&mut t, "work/mkfile", MKFILE.as_bytes(), 0o644);
    file(&mut t, "work/hello.src", b"source\n", 0o644);
    t.finish().expect("finish tar");
}

struct Podman {
    root: PathBuf,
    runroot: PathBuf,
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--storage-driver")
            .arg("vfs");
        c
    }

    /// `podman run` of `args` in the image, with crun first and runc if
    /// the default runtime cannot start containers here.
    fn run(&self, image: &str, args: &[&str]) -> Output {
        let attempt = |runtime: Option<&str>| {
            let mut c = self.cmd();
            c.arg("run");
            if let Some(r) = runtime {
                c.args(["--runtime", r]);
            }
            c.args(["--rm", "--network", "none"])
                .args([
                    "--ulimit",
                    "nofile=20000:20000",
                    "--ulimit",
                    "nproc=32768:32768",
                ])
                .args(["-w", "/work", image])
                .args(args);
            c.output().expect("podman run")
        };
        let out = attempt(None);
        let runtime_failed = matches!(out.status.code(), Some(125) | Some(126))
            && String::from_utf8_lossy(&out.stderr).contains("OCI runtime");
        if runtime_failed {
            attempt(Some("runc"))
        } else {
            out
        }
    }
}

#[test]
fn static_mk_runs_in_a_busybox_only_container() {
    if !have("podman") {
        println!("note: podman is not installed; skipping the static-container test");
        return;
    }
    let mk = PathBuf::from(env!("CARGO_BIN_EXE_mk"));
    assert!(
        is_static_elf(&mk),
        "{} has a program interpreter: not static",
        mk.display()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let busybox = busybox_static(tmp.path());
    assert!(
        is_static_elf(&busybox),
        "{} is not static",
        busybox.display()
    );
    let tar_path = tmp.path().join("image.tar");
    image_tar(&tar_path, &busybox, &mk);
    let podman = Podman {
        root: tmp.path().join("storage"),
        runroot: tmp.path().join("run"),
    };
    let image = "localhost/reprise-mk-static-test:latest";
    let imp = podman
        .cmd()
        .arg("import")
        .arg(&tar_path)
        .arg(image)
        .output()
        .expect("podman import");
    assert!(
        imp.status.success(),
        "podman import failed: {}",
        String::from_utf8_lossy(&imp.stderr)
    );

    let ok = podman.run(image, &["/bin/mk"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "mk failed in the container: {:?}\nstdout: {stdout}\nstderr: {}",
        ok.status,
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        stdout,
        "echo static built hello.txt from hello.src > hello.txt\ncat hello.txt\nstatic built hello.txt from hello.src\n"
    );

    let bad = podman.run(image, &["/bin/mk", "fail"]);
    assert_eq!(bad.status.code(), Some(1), "a failing recipe exits 1");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("mk: false  : exit status=exit(1)"),
        "stderr: {}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let _ = podman.cmd().args(["rmi", "-f", image]).output();
}

#[test]
fn static_elf_check_sees_dynamic_binaries() {
    // /bin/ls on Debian is dynamically linked: the check must say so.
    if Path::new("/bin/ls").exists() {
        assert!(!is_static_elf(Path::new("/bin/ls")));
    }
}
