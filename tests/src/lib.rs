//! Harness for the system tests: the base image (built once), a VM config
//! for this host, a VM wrapper that dumps the guest console when a test
//! fails, `wait_until` polling, and random file trees to move in and out.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reprise_executor::accel::{self, AccelFacts};
use reprise_executor::image::{Image, ImageCache};
use reprise_executor::vm::{GuestCommand, Output, Vm, VmConfig};

/// The base image of the compiled-in recipe, built on first use (about a
/// minute) and cached across test processes.
pub fn image() -> Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            ImageCache::default_location()
                .ensure(&mut |phase| eprintln!("image: {phase}"))
                .unwrap_or_else(|e| panic!("the base image is not available: {e}"))
        })
        .clone()
}

/// The folder holding the workspace's binaries (`reprise`, `reprise-guest`,
/// `mk`): `REPRISE_GUEST_BIN_DIR`, else the parent of the test binary's
/// `deps/` folder.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REPRISE_GUEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the test binary's folder");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("target folder").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// A binary of the workspace, or a panic saying how to build it.
pub fn workspace_bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` before the system tests \
         (or point REPRISE_GUEST_BIN_DIR at the folder holding reprise-guest and mk)",
        path.display()
    );
    path
}

/// A VM config for this host: the accelerator `accel::choose` picks, the
/// guest binaries of this build, and work files under the system temp dir.
pub fn vm_config() -> VmConfig {
    let choice = accel::choose(&AccelFacts::probe(), None);
    let mut config = VmConfig::new(image(), choice.accel);
    config.guest_bins = vec![workspace_bin("reprise-guest"), workspace_bin("mk")];
    config.work_root = std::env::temp_dir().join("reprise-system-tests");
    config
}

/// A booted VM that prints the guest console's tail if the test panics
/// while it is alive.
#[derive(Debug)]
pub struct TestVm {
    vm: Option<Vm>,
    name: String,
}

impl TestVm {
    /// Boots a VM, panicking with the boot error (which carries the console
    /// tail) if it does not come up.
    pub async fn boot(name: &str, config: &VmConfig) -> TestVm {
        match Vm::boot(config).await {
            Ok(vm) => {
                eprintln!("{name}: booted in {:?} ({})", vm.boot_time(), vm.accel());
                TestVm {
                    vm: Some(vm),
                    name: name.to_string(),
                }
            }
            Err(e) => panic!("{name}: boot failed: {e}"),
        }
    }

    /// Runs a shell script with captured output, panicking if the agent
    /// fails.
    pub async fn sh(&self, script: &str) -> Output {
        self.exec(&GuestCommand::shell(script))
            .await
            .unwrap_or_else(|e| panic!("{}: `{script}` failed to run: {e}", self.name))
    }

    /// Runs a shell script that must succeed; returns its stdout.
    pub async fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script).await;
        assert!(
            out.success(),
            "{}: `{script}` exited {}\nstdout: {}\nstderr: {}",
            self.name,
            out.code,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The VM itself, for calls that consume it.
    pub fn into_vm(mut self) -> Vm {
        self.vm.take().expect("the VM is running")
    }

    /// Stops the VM (QMP quit).
    pub async fn shutdown(mut self) {
        if let Some(vm) = self.vm.take() {
            vm.shutdown().await;
        }
    }
}

impl std::ops::Deref for TestVm {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.vm.as_ref().expect("the VM is running")
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(vm) = &self.vm
        {
            eprintln!(
                "--- {}: last lines of the guest console ---\n{}\n---",
                self.name,
                vm.console_tail(60)
            );
        }
    }
}

/// Polls `check` every `every` until it returns `Some`, or panics after
/// `limit` saying what was awaited.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "gave up waiting for {what} after {limit:?}"
        );
        tokio::time::sleep(every).await;
    }
}

/// A small deterministic generator (xorshift64*) for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Writes a tree of about `total` bytes of random content under `root`:
/// three large files, many small ones in nested folders, an empty file, an
/// empty folder, an executable and a symlink. Returns the bytes written.
pub fn random_tree(root: &Path, total: usize, seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let write = |path: &Path, data: &[u8], mode: u32| {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, data).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    let mut written = 0;
    for (i, share) in [5usize, 4, 3].iter().enumerate() {
        let n = total * share / 25;
        write(&root.join(format!("big/blob{i}.bin")), &rng.bytes(n), 0o644);
        written += n;
    }
    let mut i = 0;
    while written < total {
        let n = (rng.below(96 << 10) as usize + 1).min(total - written);
        let dir = format!("src/d{}/e{}", rng.below(8), rng.below(5));
        let mode = if rng.below(4) == 0 { 0o600 } else { 0o644 };
        write(&root.join(format!("{dir}/f{i}.dat")), &rng.bytes(n), mode);
        written += n;
        i += 1;
    }
    write(&root.join("run.sh"), b"#!/bin/sh\necho ran\n", 0o755);
    write(&root.join("empty"), b"", 0o644);
    std::fs::create_dir_all(root.join("hollow")).expect("mkdir");
    std::os::unix::fs::symlink("big/blob0.bin", root.join("link")).expect("symlink");
    written
}

/// What a tree holds, path by path: the kind, permission bits, and content
/// (or symlink target).
pub fn tree_listing(root: &Path) -> BTreeMap<PathBuf, (char, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (char, u32, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = path.symlink_metadata().expect("lstat");
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("readlink");
                out.insert(rel, ('l', 0, target.into_os_string().into_encoded_bytes()));
            } else if meta.is_dir() {
                out.insert(rel, ('d', mode, Vec::new()));
                walk(root, &path, out);
            } else {
                out.insert(rel, ('f', mode, std::fs::read(&path).expect("read")));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}
