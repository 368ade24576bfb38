//! Per-repository state disks: what a repository's runs keep between runs
//! (its container images in `/var/lib/containers`, `/var/run/ci/cache`), so
//! a second real run does not rebuild its container image.
//!
//! A layer is a qcow2 holding an ext4 file system, one per repository
//! namespace and image recipe; the first is a copy of a blank one made on the
//! host. It is a disk of its own, not a layer of the root disk, so that every
//! run can start from the same saved guest state (see [`crate::states`]) and
//! plug its repository's disk in. A run boots an overlay over the layer;
//! afterwards the overlay's changes are folded into a *copy* of the layer,
//! which is renamed into place. Layers are never written while a VM may be
//! reading them, so two runs of one repository at once are safe (the later
//! update wins). Layers unused for [`MAX_AGE`] are dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::image::Image;

/// Layers older than this are not used, and are removed.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The size the guest sees of a state disk (sparse: it costs what is
/// written).
pub const STATE_DISK_BYTES: u64 = 32 << 30;

const LAYER_SUFFIX: &str = ".state.qcow2";
const BLANK: &str = "blank-v1.qcow2";

/// Why a layer could not be made or updated.
#[derive(Debug, Error)]
pub enum LayerError {
    #[error("{tool} failed while updating the repository's snapshot: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("making a blank state disk")]
    Blank(#[source] crate::vm::DiskError),
    #[error("snapshot io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The folder of layers.
#[derive(Debug, Clone)]
pub struct Layers {
    root: PathBuf,
}

impl Layers {
    pub fn new(root: PathBuf) -> Layers {
        Layers { root }
    }

    /// Under the user's cache folder.
    pub fn default_location() -> Layers {
        Layers::new(crate::paths::cache_dir().join("layers"))
    }

    fn prefix(namespace: &str) -> String {
        reprise_protocol::hex::sha256(namespace.as_bytes())[..16].to_string()
    }

    /// The layer file of `namespace` on `image`.
    pub fn path(&self, namespace: &str, image: &Image) -> PathBuf {
        self.root.join(format!(
            "{}-{}{LAYER_SUFFIX}",
            Self::prefix(namespace),
            &image.manifest.recipe_hash[..16]
        ))
    }

    /// The layer to boot on, if one exists and is fresh enough.
    pub fn current(&self, namespace: &str, image: &Image) -> Option<PathBuf> {
        let path = self.path(namespace, image);
        let age = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())?;
        if age > MAX_AGE {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(path)
    }

    /// The blank state disk (an empty ext4 file system), made on first use.
    pub fn blank(&self) -> Result<PathBuf, LayerError> {
        let path = self.root.join(BLANK);
        if path.is_file() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.root).map_err(|source| LayerError::Io {
            path: self.root.clone(),
            source,
        })?;
        let scratch = self
            .root
            .join(format!(".{BLANK}.tmp-{}", std::process::id()));
        crate::vm::disk::make_blank_ext4(&scratch, STATE_DISK_BYTES, "reprise-state")
            .map_err(LayerError::Blank)?;
        std::fs::rename(&scratch, &path).map_err(|source| LayerError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Removes the layers of `namespace` (every image), or all layers (and
    /// the blank disk). Returns how many layers were removed.
    pub fn drop_layers(&self, namespace: Option<&str>) -> std::io::Result<usize> {
        let prefix = namespace.map(Self::prefix);
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_layer = name.ends_with(".qcow2") && name != BLANK;
            if prefix.as_ref().is_none_or(|p| name.starts_with(p.as_str())) {
                std::fs::remove_file(e.path())?;
                n += usize::from(is_layer);
            }
        }
        Ok(n)
    }

    /// Folds a stopped VM's state-disk `overlay` into the layer of
    /// `namespace`. The overlay must have been booted on `base_of_overlay`
    /// (the current layer, or the blank disk for a fresh start). The overlay
    /// is consumed.
    pub fn update(
        &self,
        namespace: &str,
        image: &Image,
        overlay: &Path,
        base_of_overlay: &Path,
    ) -> Result<PathBuf, LayerError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LayerError::Io { path, source }
        };
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let dest = self.path(namespace, image);
        let new = dest.with_extension(format!("tmp-{}", std::process::id()));
        let result = (|| {
            let out = Command::new("cp")
                .args(["--reflink=auto", "--sparse=always"])
                .arg(base_of_overlay)
                .arg(&new)
                .output()
                .map_err(io(&new))?;
            if !out.status.success() {
                return Err(LayerError::Tool {
                    tool: "cp",
                    stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
                });
            }
            // Point the overlay at the copy (same contents as what it was
            // booted on), then write its changes into the copy.
            let abs_new = std::path::absolute(&new).map_err(io(&new))?;
            qemu_img(&["rebase", "-u", "-F", "qcow2", "-b"], &[&abs_new, overlay])?;
            qemu_img(&["commit", "-q"], &[overlay])?;
            std::fs::rename(&new, &dest).map_err(io(&dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&new);
        }
        result.map(|()| dest)
    }
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> Result<(), LayerError> {
    let out = Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .map_err(|source| LayerError::Io {
            path: PathBuf::from("qemu-img"),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LayerError::Tool {
            tool: "qemu-img",
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reprise_protocol::image::ImageManifest;

    fn qemu_io(args: &[&str], disk: &Path) -> String {
        let out = Command::new("qemu-io")
            .args(args)
            .arg(disk)
            .output()
            .expect("qemu-io");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_blank_state_disk_is_an_empty_ext4_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let layers = Layers::new(dir.path().join("layers"));
        let blank = layers.blank().expect("blank");
        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&blank)
            .output()
            .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], STATE_DISK_BYTES);
        assert!(
            std::fs::metadata(&blank).unwrap().len() < 64 << 20,
            "sparse: only the file system's metadata is stored"
        );
        let raw = dir.path().join("check.raw");
        qemu_img(&["convert", "-O", "raw"], &[&blank, &raw]).unwrap();
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&raw)
            .output()
            .unwrap();
        let header = String::from_utf8_lossy(&out.stdout);
        assert!(header.contains("reprise-state"), "{header}");
        // Made once: a second call returns the same file untouched.
        let made = std::fs::metadata(&blank).unwrap().modified().unwrap();
        assert_eq!(layers.blank().unwrap(), blank);
        assert_eq!(std::fs::metadata(&blank).unwrap().modified().unwrap(), made);
        // Dropping every layer removes it too, but counts only layers.
        assert_eq!(layers.drop_layers(None).unwrap(), 0);
        assert!(!blank.exists());
    }

    #[test]
    fn a_run_overlay_is_folded_into_the_layer_without_touching_the_base() {
        if crate::paths::which("qemu-io").is_none() {
            panic!("qemu-io is missing: apt-get install qemu-utils");
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("disk.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2"], &[&base, Path::new("16M")]).unwrap();
        qemu_io(&["-c", "write -P 0x11 0 64k"], &base);
        let image = Image {
            dir: dir.path().to_path_buf(),
            manifest: ImageManifest {
                version: 1,
                recipe_hash: "f".repeat(64),
                digest: "d".into(),
                built_at: 0,
                build_ms: 0,
                disk: "disk.qcow2".into(),
                kernel: "k".into(),
                initrd: "i".into(),
                disk_bytes: 0,
            },
        };
        let base_sha = crate::image::sha256_file(&base).unwrap();
        let layers = Layers::new(dir.path().join("layers"));
        assert!(layers.current("ns", &image).is_none());

        // First run: an overlay on the base writes 0x22 at 1M.
        let run1 = dir.path().join("run1.qcow2");
        crate::vm::disk::create_overlay(&base, &run1).unwrap();
        qemu_io(&["-c", "write -P 0x22 1M 64k"], &run1);
        let layer = layers.update("ns", &image, &run1, &base).unwrap();
        assert_eq!(layers.current("ns", &image), Some(layer.clone()));

        // Second run: on the layer, sees the first run's write, adds another.
        let run2 = dir.path().join("run2.qcow2");
        crate::vm::disk::create_overlay(&layer, &run2).unwrap();
        assert!(qemu_io(&["-c", "read -P 0x22 1M 64k"], &run2).contains("read 65536"));
        qemu_io(&["-c", "write -P 0x33 2M 64k"], &run2);
        layers.update("ns", &image, &run2, &layer).unwrap();
        let check = dir.path().join("check.qcow2");
        crate::vm::disk::create_overlay(&layers.current("ns", &image).unwrap(), &check).unwrap();
        for pattern in [
            "read -P 0x11 0 64k",
            "read -P 0x22 1M 64k",
            "read -P 0x33 2M 64k",
        ] {
            let out = qemu_io(&["-c", pattern], &check);
            assert!(!out.contains("verification failed"), "{pattern}: {out}");
        }
        assert_eq!(
            crate::image::sha256_file(&base).unwrap(),
            base_sha,
            "the base is never written"
        );

        assert_eq!(layers.drop_layers(Some("other")).unwrap(), 0);
        assert_eq!(layers.drop_layers(Some("ns")).unwrap(), 1);
        assert!(layers.current("ns", &image).is_none());
    }
}
