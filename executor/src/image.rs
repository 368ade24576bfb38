//! The base image: its recipe (the files of `image/`, compiled in), the cache
//! of built images keyed by the recipe's hash, and the build.
//!
//! A build runs `image/build.sh` (mmdebstrap from Debian's mirror) in a
//! scratch folder beside the cache entry, hashes the disk, writes the
//! manifest, and renames the folder into place, so a cache entry is either
//! whole or absent. A lock file serialises builds of the same recipe.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::hex;
use reprise_protocol::image::{IMAGE_MANIFEST_VERSION, ImageManifest};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The recipe's files, as compiled into this binary.
pub const RECIPE_FILES: &[(&str, &str)] = &[
    ("build.sh", include_str!("../../image/build.sh")),
    ("make-initrd.sh", include_str!("../../image/make-initrd.sh")),
    ("make-disk.sh", include_str!("../../image/make-disk.sh")),
    ("initrd-init", include_str!("../../image/initrd-init")),
    ("init", include_str!("../../image/init")),
    (
        "containers.conf",
        include_str!("../../image/containers.conf"),
    ),
    ("packages", include_str!("../../image/packages")),
    ("ci.mk", include_str!("../../mkfiles/ci.mk")),
];

/// Version of the recipe hashing; bumping it rebuilds every image.
const RECIPE_HASH_VERSION: &str = "reprise-image-recipe-v1";

/// Free space a build needs in the cache folder.
const BUILD_SPACE_BYTES: u64 = 3 << 30;

/// Sha256 over the recipe files, each name and content length-prefixed.
pub fn recipe_hash(files: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    let mut put = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    put(RECIPE_HASH_VERSION.as_bytes());
    for (name, content) in files {
        put(name.as_bytes());
        put(content.as_bytes());
    }
    hex::encode(&h.finalize())
}

/// A built image in the cache.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: ImageManifest,
}

impl Image {
    pub fn disk(&self) -> PathBuf {
        self.dir.join(&self.manifest.disk)
    }
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel)
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join(&self.manifest.initrd)
    }

    /// Loads the image in `dir`, if its manifest is there and its files exist.
    pub fn load(dir: &Path) -> Option<Image> {
        let text = fs::read_to_string(dir.join("manifest.json")).ok()?;
        let manifest: ImageManifest = serde_json::from_str(&text).ok()?;
        if manifest.version != IMAGE_MANIFEST_VERSION {
            return None;
        }
        let image = Image {
            dir: dir.to_path_buf(),
            manifest,
        };
        (image.disk().is_file() && image.kernel().is_file() && image.initrd().is_file())
            .then_some(image)
    }
}

/// Why an image could not be built or found.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{tool} is not installed (install it with: apt-get install {package})")]
    MissingTool { tool: String, package: String },
    #[error(
        "building the image needs root or unprivileged user namespaces, and neither is available \
         (run as root, or enable kernel.unprivileged_userns_clone and add a range to /etc/subuid)"
    )]
    NoPrivilege,
    #[error("not enough disk space in {}: {free_mib} MiB free, the build needs {need_mib} MiB", path.display())]
    DiskFull {
        path: PathBuf,
        free_mib: u64,
        need_mib: u64,
    },
    #[error("cannot reach the Debian mirror {mirror} (set REPRISE_MIRROR to one you can reach); the build log is {}", log.display())]
    MirrorUnreachable { mirror: String, log: PathBuf },
    #[error("the image build failed ({status}); the build log is {}:\n{tail}", log.display())]
    BuildFailed {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("no base image is built for this recipe (run `reprise image build`)")]
    NotBuilt,
    #[error("image cache io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The folder of built images, one sub-folder per recipe hash.
#[derive(Debug, Clone)]
pub struct ImageCache {
    root: PathBuf,
}

impl ImageCache {
    pub fn new(root: PathBuf) -> ImageCache {
        ImageCache { root }
    }

    /// The cache under the user's cache folder (XDG_CACHE_HOME respected).
    pub fn default_location() -> ImageCache {
        ImageCache::new(crate::paths::cache_dir().join("images"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image for the compiled-in recipe, if built.
    pub fn current(&self) -> Option<Image> {
        Image::load(&self.root.join(recipe_hash(RECIPE_FILES)))
    }

    /// Every image in the cache.
    pub fn list(&self) -> Vec<Image> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut images: Vec<Image> = entries
            .flatten()
            .filter_map(|e| Image::load(&e.path()))
            .collect();
        images.sort_by_key(|i| std::cmp::Reverse(i.manifest.built_at));
        images
    }

    /// Returns the image of the compiled-in recipe, building it first if it
    /// is not cached. `progress` gets the name of each build step.
    pub fn ensure(&self, progress: &mut dyn FnMut(&str)) -> Result<Image, ImageError> {
        self.ensure_recipe(RECIPE_FILES, progress)
    }

    /// As [`ImageCache::ensure`], for any recipe.
    pub fn ensure_recipe(
        &self,
        files: &[(&str, &str)],
        progress: &mut dyn FnMut(&str),
    ) -> Result<Image, ImageError> {
        let hash = recipe_hash(files);
        let dest = self.root.join(&hash);
        if let Some(image) = Image::load(&dest) {
            return Ok(image);
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let lock_path = self.root.join(format!("{hash}.lock"));
        let lock_file = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
        let _lock =
            match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((file, _)) => {
                    progress("waiting for another build of this image");
                    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                        .map_err(|(_, e)| io_err(&lock_path)(e.into()))?
                }
            };
        if let Some(image) = Image::load(&dest) {
            return Ok(image);
        }
        preflight(&self.root)?;
        self.build(&hash, files, &dest, progress)
    }

    fn build(
        &self,
        hash: &str,
        files: &[(&str, &str)],
        dest: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Image, ImageError> {
        let started = Instant::now();
        let work = crate::workdir::WorkDir::new_in(&self.root, crate::workdir::BUILD_PREFIX)
            .map_err(io_err(&self.root))?;
        let scratch = work.path();
        let recipe = scratch.join("recipe");
        let out = scratch.join("out");
        fs::create_dir_all(&recipe).map_err(io_err(&recipe))?;
        for (name, content) in files {
            let path = recipe.join(name);
            fs::write(&path, content).map_err(io_err(&path))?;
            let mode = if name.ends_with(".sh") || name.ends_with("init") {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(io_err(&path))?;
        }
        let log_path = scratch.join("build.log");
        let apt_cache = crate::paths::cache_dir().join("apt-archives");
        let mut child = Command::new("bash")
            .arg(recipe.join("build.sh"))
            .arg(&recipe)
            .arg(&out)
            .arg(&apt_cache)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(&recipe))?;
        // Both streams go to the log, line by line, and either may announce
        // a phase (mmdebstrap's hooks write to its stderr).
        let mut log = fs::File::create(&log_path).map_err(io_err(&log_path))?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let readers = [
            forward_lines(Box::new(stdout), tx.clone()),
            forward_lines(Box::new(stderr), tx),
        ];
        for line in rx {
            if let Some(phase) = line.strip_prefix("::phase ") {
                progress(phase);
            }
            use std::io::Write;
            let _ = writeln!(log, "{line}");
        }
        for r in readers {
            let _ = r.join();
        }
        let status = child.wait().map_err(io_err(&recipe))?;
        if !status.success() {
            return Err(diagnose(&self.root, &log_path, status.to_string()));
        }
        progress("hashing the disk");
        let disk = out.join("disk.qcow2");
        let digest = sha256_file(&disk).map_err(io_err(&disk))?;
        let disk_bytes = fs::metadata(&disk).map_err(io_err(&disk))?.len();
        let manifest = ImageManifest {
            version: IMAGE_MANIFEST_VERSION,
            recipe_hash: hash.to_string(),
            digest,
            built_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            build_ms: started.elapsed().as_millis() as u64,
            disk: "disk.qcow2".into(),
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            disk_bytes,
        };
        let manifest_path = out.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        fs::write(&manifest_path, text).map_err(io_err(&manifest_path))?;
        let _ = fs::rename(&log_path, out.join("build.log"));
        fs::rename(&out, dest).map_err(io_err(dest))?;
        drop(work);
        Ok(Image {
            dir: dest.to_path_buf(),
            manifest,
        })
    }
}

fn forward_lines(
    from: Box<dyn Read + Send>,
    to: std::sync::mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            if to.send(line).is_err() {
                return;
            }
        }
    })
}

/// Sha256 of a file's contents, as hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_reading(&mut fs::File::open(path)?).map(|d| d.hex())
}

/// Sha256 of what `from` reads to its end.
pub fn sha256_reading(from: &mut impl Read) -> std::io::Result<Sha256Digest> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(Sha256Digest::finish(h))
}

fn preflight(cache: &Path) -> Result<(), ImageError> {
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
    ] {
        if crate::paths::which(tool).is_none() {
            return Err(ImageError::MissingTool {
                tool: tool.into(),
                package: package.into(),
            });
        }
    }
    if !nix::unistd::geteuid().is_root() && !userns_available() {
        return Err(ImageError::NoPrivilege);
    }
    let free = free_bytes(cache).unwrap_or(u64::MAX);
    if free < BUILD_SPACE_BYTES {
        return Err(ImageError::DiskFull {
            path: cache.to_path_buf(),
            free_mib: free >> 20,
            need_mib: BUILD_SPACE_BYTES >> 20,
        });
    }
    Ok(())
}

fn userns_available() -> bool {
    let knob = fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone");
    if knob.is_ok_and(|v| v.trim() == "0") {
        return false;
    }
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let subuid = fs::read_to_string("/etc/subuid").unwrap_or_default();
    crate::paths::which("newuidmap").is_some()
        && subuid
            .lines()
            .any(|l| l.split(':').next() == Some(user.as_str()))
}

/// Free bytes on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Turns a failed build into the error that says what to do.
fn diagnose(cache: &Path, log: &Path, status: String) -> ImageError {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mirror = std::env::var(crate::vars::MIRROR_VAR)
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let disk_full =
        text.contains("No space left on device") || free_bytes(cache).is_some_and(|f| f < 64 << 20);
    if disk_full {
        return ImageError::DiskFull {
            path: cache.to_path_buf(),
            free_mib: free_bytes(cache).unwrap_or(0) >> 20,
            need_mib: BUILD_SPACE_BYTES >> 20,
        };
    }
    let unreachable = [
        "Temporary failure resolving",
        "Could not resolve",
        "Could not connect",
        "Unable to connect",
        "Failed to fetch",
        "Network is unreachable",
    ];
    if unreachable.iter().any(|s| text.contains(s)) {
        return ImageError::MirrorUnreachable {
            mirror,
            log: log.to_path_buf(),
        };
    }
    ImageError::BuildFailed {
        status,
        log: log.to_path_buf(),
        tail: crate::paths::tail_lines(&text, 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_hash_changes_with_any_file() {
        let base = [("a", "1"), ("b", "2")];
        let h = recipe_hash(&base);
        assert_eq!(h.len(), 64);
        assert_eq!(h, recipe_hash(&base));
        assert_ne!(h, recipe_hash(&[("a", "1"), ("b", "3")]));
        assert_ne!(h, recipe_hash(&[("a", "1"), ("c", "2")]));
        // Length prefixes: moving a byte from one file to the next is a change.
        assert_ne!(
            recipe_hash(&[("a", "12"), ("b", "")]),
            recipe_hash(&[("a", "1"), ("b", "2")])
        );
    }

    #[test]
    fn failed_builds_are_diagnosed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build.log");
        fs::write(
            &log,
            "W: Failed to fetch http://deb.debian.org/debian/dists\n",
        )
        .unwrap();
        assert!(matches!(
            diagnose(dir.path(), &log, "exit status: 1".into()),
            ImageError::MirrorUnreachable { .. }
        ));
        fs::write(&log, "tar: write error: No space left on device\n").unwrap();
        assert!(matches!(
            diagnose(dir.path(), &log, "exit status: 1".into()),
            ImageError::DiskFull { .. }
        ));
        fs::write(&log, "E: package foo not found\n").unwrap();
        match diagnose(dir.path(), &log, "exit status: 1".into()) {
            ImageError::BuildFailed { tail, .. } => assert!(tail.contains("foo not found")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_cache_entry_needs_manifest_and_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Image::load(dir.path()).is_none());
        let manifest = ImageManifest {
            version: IMAGE_MANIFEST_VERSION,
            recipe_hash: "r".into(),
            digest: "d".into(),
            built_at: 1,
            build_ms: 2,
            disk: "disk.qcow2".into(),
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            disk_bytes: 3,
        };
        fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        assert!(Image::load(dir.path()).is_none(), "files missing");
        for f in ["disk.qcow2", "vmlinuz", "initrd.img"] {
            fs::write(dir.path().join(f), "x").unwrap();
        }
        assert_eq!(Image::load(dir.path()).unwrap().manifest, manifest);
    }
}
