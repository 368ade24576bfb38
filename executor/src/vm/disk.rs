//! Disk files of a VM: the copy-on-write overlay over the base image and the
//! data disk that carries a tree in and files out.
//!
//! Bulk data never goes through the guest agent (about 2.5 MB/s here): the
//! data disk is an ext4 file system made on the host with `mkfs.ext4 -d`
//! from a staging folder, and files come back with `debugfs rdump` from the
//! same file once the guest has frozen (and so checkpointed) the file system.

use std::path::Path;
use std::process::Command;

use thiserror::Error;

/// Why a disk file could not be made or read.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("cannot run {tool} (install it with: apt-get install {package})")]
    Missing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("io on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn run(tool: &'static str, package: &'static str, cmd: &mut Command) -> Result<(), DiskError> {
    let out = cmd.output().map_err(|source| DiskError::Missing {
        tool,
        package,
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Tool {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Makes `overlay`, a qcow2 whose backing file is `base` (an absolute path:
/// qemu resolves a relative one against the overlay's folder).
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), DiskError> {
    let base = std::path::absolute(base).map_err(|source| DiskError::Io {
        path: base.display().to_string(),
        source,
    })?;
    run(
        "qemu-img",
        "qemu-utils",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(overlay),
    )
}

/// Bytes used by the files under `dir` (not following symlinks).
pub fn tree_bytes(dir: &Path) -> u64 {
    tree_sum(dir, |meta| meta.len().max(4096))
}

/// What the files under `dir` take on disk (their blocks: a sparse file
/// counts what it holds, not its length).
pub fn tree_disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    tree_sum(dir, |meta| meta.blocks() * 512)
}

fn tree_sum(dir: &Path, size: impl Fn(&std::fs::Metadata) -> u64) -> u64 {
    fn walk(dir: &Path, total: &mut u64, size: &dyn Fn(&std::fs::Metadata) -> u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            *total += size(&meta);
            if meta.is_dir() {
                walk(&e.path(), total, size);
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total, &size);
    total
}

/// Makes the sparse ext4 file `disk` holding the contents of `staging`,
/// with `spare` bytes free for what the guest writes.
pub fn make_data_disk(staging: &Path, disk: &Path, spare: u64) -> Result<(), DiskError> {
    let size = (tree_bytes(staging) * 5 / 4 + spare).max(64 << 20);
    let size = size.div_ceil(1 << 20) << 20;
    let f = std::fs::File::create(disk).map_err(|source| DiskError::Io {
        path: disk.display().to_string(),
        source,
    })?;
    f.set_len(size).map_err(|source| DiskError::Io {
        path: disk.display().to_string(),
        source,
    })?;
    drop(f);
    run(
        "mkfs.ext4",
        "e2fsprogs",
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "reprise-data",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(staging)
            .arg(disk),
    )
}

/// Copies the folder `from` (a path inside the ext4 file `disk`) to the
/// host folder `to`, which must not exist yet.
pub fn dump_dir(disk: &Path, from: &str, to: &Path) -> Result<(), DiskError> {
    let io = |source| DiskError::Io {
        path: to.display().to_string(),
        source,
    };
    let parent = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io)?;
    let scratch = tempfile::Builder::new()
        .prefix(".reprise-dump-")
        .tempdir_in(parent)
        .map_err(io)?;
    let request = format!("rdump \"{from}\" \"{}\"", scratch.path().display());
    let out = Command::new("debugfs")
        .args(["-R", &request])
        .arg(disk)
        .output()
        .map_err(|source| DiskError::Missing {
            tool: "debugfs",
            package: "e2fsprogs",
            source,
        })?;
    let name = Path::new(from).file_name().unwrap_or_default();
    let dumped = scratch.path().join(name);
    // debugfs exits 0 even when the path is missing; its stderr says so.
    if !out.status.success() || !dumped.is_dir() {
        return Err(DiskError::Tool {
            tool: "debugfs",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    std::fs::rename(&dumped, to).map_err(io)
}

/// Makes `disk`, a small sparse raw file, for a disk slot the guest never
/// reads (the snapshot slot of a saved guest, when a VM has no snapshot disk).
pub fn make_placeholder(disk: &Path) -> Result<(), DiskError> {
    let io = |source| DiskError::Io {
        path: disk.display().to_string(),
        source,
    };
    std::fs::File::create(disk)
        .and_then(|f| f.set_len(1 << 20))
        .map_err(io)
}

/// Makes `disk`, a qcow2 of `size` bytes holding an empty ext4 file system
/// labelled `label`, with its inode tables and journal written (the guest's
/// lazy initialisation would otherwise write them again in every run).
pub fn make_blank_ext4(disk: &Path, size: u64, label: &str) -> Result<(), DiskError> {
    let io = |source| DiskError::Io {
        path: disk.display().to_string(),
        source,
    };
    let raw = disk.with_extension("raw-tmp");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .map_err(io)?;
    let made = run(
        "mkfs.ext4",
        "e2fsprogs",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-i", "32768", "-L", label])
            .args([
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            ])
            .arg(&raw),
    )
    .and_then(|()| {
        run(
            "qemu-img",
            "qemu-utils",
            Command::new("qemu-img")
                .args(["convert", "-q", "-O", "qcow2"])
                .arg(&raw)
                .arg(disk),
        )
    });
    let _ = std::fs::remove_file(&raw);
    made
}

/// The virtual size of a qcow2 file, from its header (big-endian u64 at
/// byte 24, after the magic, version and backing file fields).
pub fn qcow2_virtual_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut header = [0u8; 32];
    std::fs::File::open(path)?.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(std::io::Error::other("not a qcow2 file"));
    }
    Ok(u64::from_be_bytes(
        header[24..32].try_into().expect("8 bytes"),
    ))
}
