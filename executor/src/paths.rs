//! Where Reprise keeps things on the host, and small host look-ups.

use std::path::{Path, PathBuf};

/// One of the user's base folders (`directories`: the XDG variable when it
/// is an absolute path, else under the home folder); under `/root` when
/// there is no home at all.
fn base(pick: fn(&directories::BaseDirs) -> &Path, under_home: &str) -> PathBuf {
    match directories::BaseDirs::new() {
        Some(dirs) => pick(&dirs).to_path_buf(),
        None => Path::new("/root").join(under_home),
    }
}

/// `$XDG_CACHE_HOME/reprise` (default `~/.cache/reprise`): rebuildable things.
pub fn cache_dir() -> PathBuf {
    base(directories::BaseDirs::cache_dir, ".cache").join("reprise")
}

/// `$XDG_DATA_HOME/reprise` (default `~/.local/share/reprise`): results.
pub fn data_dir() -> PathBuf {
    base(directories::BaseDirs::data_dir, ".local/share").join("reprise")
}

/// `$XDG_CONFIG_HOME/reprise` (default `~/.config/reprise`): the user's
/// settings and credentials.
pub fn config_dir() -> PathBuf {
    base(directories::BaseDirs::config_dir, ".config").join("reprise")
}

/// A folder for sockets of running VMs. Unix socket paths are limited to
/// 107 bytes, so this is short: `$XDG_RUNTIME_DIR` if set, else `/tmp`.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(v) if Path::new(&v).is_absolute() && v.len() < 60 => PathBuf::from(v),
        _ => PathBuf::from("/tmp"),
    }
}

/// The first executable `name` on `PATH` (or in the sbin folders, which a
/// non-root `PATH` often lacks).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    let search = std::env::join_paths(dirs).ok()?;
    which::which_in(name, Some(search), "/").ok()
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A sibling of the running executable (the guest helper, mk).
pub fn sibling_exe(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live in target/<profile>/deps; the binaries one level up.
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_found_on_path_and_in_sbin() {
        assert!(which("sh").is_some_and(|p| p.is_absolute() && p.ends_with("sh")));
        assert_eq!(which("no-such-tool-reprise"), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 5), "");
    }
}

/// Writes `bytes` to `path` whole or not at all: a temporary file in the
/// same folder (created with `mode`), synced, then renamed over `path`, so
/// a reader sees the old file or the new one and never a part.
pub fn write_whole(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".reprise-")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// [`write_whole`] for a file only its owner reads (credentials, the
/// user's settings), mode 0600, its folder made first.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_whole(path, bytes, 0o600)
}

#[cfg(test)]
mod write_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_whole_write_replaces_the_file_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.pem");
        std::fs::write(&path, "old").unwrap();
        write_whole(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }
}
