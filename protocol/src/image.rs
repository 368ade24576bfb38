//! The manifest of a built base image, kept beside it in the image cache.

use serde::{Deserialize, Serialize};

/// Version of [`ImageManifest`]'s layout.
pub const IMAGE_MANIFEST_VERSION: u32 = 1;

/// What a cached base image is: which recipe made it, its digest, its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub version: u32,
    /// Sha256 over the recipe's files (names and contents, length-prefixed).
    pub recipe_hash: String,
    /// Sha256 of the qcow2 disk: the digest that goes into run keys.
    pub digest: String,
    /// Seconds since the Unix epoch at which the build finished.
    pub built_at: u64,
    /// How long the build took, in milliseconds.
    pub build_ms: u64,
    /// File names, relative to the image's folder.
    pub disk: String,
    pub kernel: String,
    pub initrd: String,
    /// Size of the disk file in bytes.
    pub disk_bytes: u64,
}
