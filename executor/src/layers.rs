//! Per-repository disk layers: what a repository's runs leave on the guest's
//! root disk (container images, `/var/run/ci/cache`) kept between runs, so a
//! second real run does not rebuild its container image.
//!
//! A layer is a qcow2 over the base image, one per repository namespace and
//! image recipe. A run boots an overlay over the layer; afterwards the
//! overlay's changes are folded into a *copy* of the layer, which is renamed
//! into place. Layers are never written while a VM may be reading them, so
//! two runs of one repository at once are safe (the later update wins).
//! Layers unused for [`MAX_AGE`] are dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::image::Image;

/// Layers older than this are not used, and are removed.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a layer could not be updated.
#[derive(Debug, Error)]
pub enum LayerError {
    #[error("{tool} failed while updating the repository's snapshot: {stderr}")]
    Tool { tool: &'static str, stderr: String },
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
            "{}-{}.qcow2",
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

    /// Removes the layers of `namespace` (every image), or all layers.
    /// Returns how many were removed.
    pub fn drop_layers(&self, namespace: Option<&str>) -> std::io::Result<usize> {
        let prefix = namespace.map(Self::prefix);
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(0);
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefix.as_ref().is_none_or(|p| name.starts_with(p.as_str())) {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Folds a stopped VM's `overlay` into the layer of `namespace`. The
    /// overlay must have been booted on `base_of_overlay` (the current layer,
    /// or the image's disk for a fresh run). The overlay is consumed.
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
            if base_of_overlay == image.disk() {
                let disk = std::path::absolute(image.disk()).map_err(io(&image.disk()))?;
                qemu_img(
                    &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"],
                    &[&disk, &new],
                )?;
            } else {
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
