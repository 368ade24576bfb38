//! Writing files beneath a folder without ever following a symlink, for
//! the artifacts folder: it usually sits inside the user's checkout, where a
//! repository can commit a symlink (`reprise-artifacts -> ~/.ssh`, or one
//! anywhere below it) to make a replay write elsewhere.
//!
//! The folder itself is opened once with `O_NOFOLLOW` (and, for a relative
//! path, every part of it without following symlinks); everything below is
//! reached with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from that
//! descriptor, one part at a time, and files are created with `O_EXCL`
//! under a temporary name and renamed into place with `renameat` (which
//! replaces a symlink at the final name instead of writing through it).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat2, renameat};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use reprise_protocol::manifest::ArtifactPath;
use thiserror::Error;

/// Why a file could not be written beneath the folder.
#[derive(Debug, Error)]
pub enum BeneathError {
    #[error(
        "{} is a symbolic link (committed to the repository?); refusing to write through it: remove it or pass another --artifacts folder",
        .0.display()
    )]
    Symlink(PathBuf),
    #[error("{} is not a folder", .0.display())]
    NotAFolder(PathBuf),
    #[error("writing {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BeneathError {
    fn from_errno(path: PathBuf, errno: Errno) -> BeneathError {
        match errno {
            // ELOOP: a symlink where none may be; EXDEV: a path that would
            // leave the folder (RESOLVE_BENEATH).
            Errno::ELOOP | Errno::EXDEV => BeneathError::Symlink(path),
            Errno::ENOTDIR => BeneathError::NotAFolder(path),
            e => BeneathError::Io {
                path,
                source: e.into(),
            },
        }
    }
}

/// Folders are opened with `RESOLVE_NO_SYMLINKS`, which refuses a symlink
/// with ELOOP (`O_NOFOLLOW` with `O_DIRECTORY` would say ENOTDIR).
const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_RDONLY)
    .union(OFlag::O_CLOEXEC);

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS
}

/// Opens (creating if missing) the folder `name` in `parent` without
/// following a symlink; a folder it made is recorded in `created`.
fn open_dir_in<Fd: AsFd>(
    parent: Fd,
    name: &Path,
    shown: &Path,
    created: &Mutex<Created>,
) -> Result<OwnedFd, BeneathError> {
    match mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o755)) {
        Ok(()) => created
            .lock()
            .expect("created")
            .record(parent.as_fd(), name),
        Err(Errno::EEXIST) => {}
        Err(e) => return Err(BeneathError::from_errno(shown.to_path_buf(), e)),
    }
    let how = OpenHow::new().flags(DIR_FLAGS).resolve(beneath());
    openat2(parent, name, how).map_err(|e| BeneathError::from_errno(shown.to_path_buf(), e))
}

/// The folders a [`Beneath`] made, in the order it made them, each as its
/// parent's descriptor and its name. Dropped, it removes them again, the
/// last made first and each only while empty, unless [`Created::keep`]
/// was called: a refused restore leaves no empty folders behind.
#[derive(Debug, Default)]
pub struct Created(Vec<(OwnedFd, PathBuf)>);

impl Created {
    fn record(&mut self, parent: std::os::fd::BorrowedFd<'_>, name: &Path) {
        // The current folder as a descriptor of its own (AT_FDCWD cannot
        // be duplicated).
        let parent = match parent.as_raw_fd() {
            nix::libc::AT_FDCWD => File::open(".").map(OwnedFd::from),
            _ => parent.try_clone_to_owned(),
        };
        // Without a descriptor the folder is only not removed again.
        if let Ok(parent) = parent {
            self.0.push((parent, name.to_path_buf()));
        }
    }

    /// Keeps the folders: what was written in them is in place.
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        while let Some((parent, name)) = self.0.pop() {
            // Fails, and keeps the folder, when anything is in it.
            let _ = unlinkat(&parent, name.as_path(), UnlinkatFlags::RemoveDir);
        }
    }
}

/// A folder that files are written beneath.
#[derive(Debug)]
pub struct Beneath {
    dir: OwnedFd,
    path: PathBuf,
    created: Mutex<Created>,
}

impl Beneath {
    /// Opens `path`, creating it and its missing parents. A relative path
    /// is walked from the current folder one part at a time without
    /// following any symlink (`..` is allowed: it is the user's own
    /// argument); an absolute path is the user's choice up to its last
    /// part, which must not be a symlink.
    pub fn open(path: &Path) -> Result<Beneath, BeneathError> {
        let created = Mutex::new(Created::default());
        let dir = if path.is_absolute() {
            let parent = path.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent).map_err(|source| BeneathError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
            let parent_fd = File::open(parent).map_err(|source| BeneathError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
            match path.file_name() {
                Some(name) => open_dir_in(&parent_fd, Path::new(name), path, &created)?,
                None => OwnedFd::from(parent_fd),
            }
        } else {
            walk(AT_FDCWD, path, &created)?
        };
        Ok(Beneath {
            dir,
            path: path.to_path_buf(),
            created,
        })
    }

    /// The folders it made (the folder itself, the parts of a relative
    /// path that were missing, folders on artifacts' paths); the parents
    /// of an absolute path are not among them.
    pub fn into_created(self) -> Created {
        self.created.into_inner().expect("created")
    }

    /// The folder's path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a new file that becomes `rel` when committed, making the
    /// folders on the way (none of which may be a symlink). Its mode is set
    /// exactly (not masked by the umask).
    pub fn create(&self, rel: &ArtifactPath, mode: u32) -> Result<PendingFile, BeneathError> {
        let parts: Vec<&str> = rel.parts().collect();
        let (name, folders) = parts.split_last().expect("an artifact path has a part");
        let mut shown = self.path.clone();
        let mut dir: Option<OwnedFd> = None;
        for folder in folders {
            shown.push(folder);
            let parent = dir.as_ref().map_or(self.dir.as_fd(), |d| d.as_fd());
            dir = Some(open_dir_in(
                parent,
                Path::new(folder),
                &shown,
                &self.created,
            )?);
        }
        let dir = match dir {
            Some(d) => d,
            None => self.dir.try_clone().map_err(|source| BeneathError::Io {
                path: self.path.clone(),
                source,
            })?,
        };
        shown.push(name);
        let tmp = format!("{TEMPORARY}{}-{}", std::process::id(), unique());
        let how = OpenHow::new()
            .flags(
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_CLOEXEC
                    | OFlag::O_NOFOLLOW,
            )
            .mode(Mode::from_bits_truncate(0o600))
            .resolve(beneath());
        let fd = openat2(&dir, tmp.as_str(), how)
            .map_err(|e| BeneathError::from_errno(shown.clone(), e))?;
        fchmod(&fd, Mode::from_bits_truncate(mode & 0o777))
            .map_err(|e| BeneathError::from_errno(shown.clone(), e))?;
        Ok(PendingFile {
            file: File::from(fd),
            dir,
            tmp,
            name: name.to_string(),
            shown,
        })
    }
}

/// The start of a pending file's name; its creator's pid follows.
const TEMPORARY: &str = ".reprise-tmp-";

/// Removes the pending files under `root` whose creator is gone (killed
/// before it committed or dropped them). Symlinked folders are not
/// entered. Returns how many.
pub fn sweep_dead_temporaries(root: &Path) -> usize {
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(kind) = e.file_type() else { continue };
            let name = e.file_name();
            let name = name.to_string_lossy();
            if kind.is_dir() {
                dirs.push(e.path());
            } else if kind.is_file()
                && let Some(pid) = name
                    .strip_prefix(TEMPORARY)
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<i32>().ok())
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH)
                && std::fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

/// Opens the relative folder `path` from `start`, one part at a time,
/// creating what is missing and following no symlink.
fn walk<Fd: AsFd>(
    start: Fd,
    path: &Path,
    created: &Mutex<Created>,
) -> Result<OwnedFd, BeneathError> {
    let mut shown = PathBuf::new();
    let mut fd: Option<OwnedFd> = None;
    for part in path.components() {
        let name: &Path = match part {
            Component::CurDir => continue,
            Component::ParentDir => Path::new(".."),
            Component::Normal(n) => Path::new(n),
            Component::RootDir | Component::Prefix(_) => unreachable!("a relative path"),
        };
        shown.push(name);
        let parent = fd.as_ref().map_or(start.as_fd(), |f| f.as_fd());
        let next = if name == Path::new("..") {
            // `..` cannot be reached beneath its own child.
            let how = OpenHow::new()
                .flags(DIR_FLAGS)
                .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
            openat2(parent, name, how).map_err(|e| BeneathError::from_errno(shown.clone(), e))?
        } else {
            open_dir_in(parent, name, &shown, created)?
        };
        fd = Some(next);
    }
    match fd {
        Some(fd) => Ok(fd),
        None => start
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| BeneathError::Io {
                path: PathBuf::from("."),
                source,
            }),
    }
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A file being written under a temporary name; [`PendingFile::commit`]
/// gives it its name, dropping it removes it.
#[derive(Debug)]
pub struct PendingFile {
    pub file: File,
    dir: OwnedFd,
    tmp: String,
    name: String,
    shown: PathBuf,
}

impl PendingFile {
    /// The path it will have.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Renames it into place (replacing a file, or a symlink, of that name;
    /// a folder of that name is an error).
    pub fn commit(mut self) -> Result<(), BeneathError> {
        let tmp = std::mem::take(&mut self.tmp);
        renameat(&self.dir, tmp.as_str(), &self.dir, self.name.as_str()).map_err(|e| {
            let _ = unlinkat(&self.dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            BeneathError::from_errno(self.shown.clone(), e)
        })
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = unlinkat(&self.dir, self.tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn write(b: &Beneath, rel: &str, bytes: &[u8]) -> Result<(), BeneathError> {
        let mut f = b.create(&rel.parse().unwrap(), 0o640)?;
        f.file.write_all(bytes).unwrap();
        f.commit()
    }

    #[test]
    fn the_folders_made_are_removed_again_unless_kept_and_only_while_empty() {
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("arts");
        let b = Beneath::open(&arts).unwrap();
        let pending = b.create(&"a/b/c.txt".parse().unwrap(), 0o644).unwrap();
        drop(pending);
        drop(b.into_created());
        assert!(!arts.exists(), "the folder and those below it are removed");

        // A folder that was there stays, and so does one something else
        // wrote into meanwhile.
        std::fs::create_dir_all(arts.join("kept")).unwrap();
        let b = Beneath::open(&arts).unwrap();
        drop(b.create(&"kept/new/f".parse().unwrap(), 0o644).unwrap());
        drop(b.create(&"other/f".parse().unwrap(), 0o644).unwrap());
        std::fs::write(arts.join("other/theirs"), "x").unwrap();
        drop(b.into_created());
        let left: Vec<String> = walkdir(&arts);
        assert_eq!(left, ["kept", "other", "other/theirs"]);

        // Kept: a committed file's folders stay.
        let b = Beneath::open(&arts).unwrap();
        let mut f = b.create(&"d/e".parse().unwrap(), 0o644).unwrap();
        f.file.write_all(b"e").unwrap();
        f.commit().unwrap();
        b.into_created().keep();
        assert_eq!(std::fs::read(arts.join("d/e")).unwrap(), b"e");

        // A relative path's missing parts are made and removed the same way.
        let start = File::open(dir.path()).unwrap();
        let created = Mutex::default();
        walk(&start, Path::new("x/y/z"), &created).unwrap();
        assert!(dir.path().join("x/y/z").is_dir());
        drop(created);
        assert!(!dir.path().join("x").exists());
    }

    /// The paths below `root`, sorted.
    fn walkdir(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                if p.is_dir() {
                    dirs.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn files_land_beneath_the_folder_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("arts");
        let b = Beneath::open(&arts).unwrap();
        write(&b, "a/b/c.txt", b"c").unwrap();
        write(&b, "top", b"t").unwrap();
        write(&b, "top", b"again").unwrap();
        assert_eq!(std::fs::read(arts.join("a/b/c.txt")).unwrap(), b"c");
        assert_eq!(std::fs::read(arts.join("top")).unwrap(), b"again");
        let mode = std::fs::metadata(arts.join("top"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        // An uncommitted file leaves nothing behind.
        let pending = b.create(&"x".parse().unwrap(), 0o644).unwrap();
        drop(pending);
        let names: Vec<_> = std::fs::read_dir(&arts)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn symlinks_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let arts = dir.path().join("arts");
        // The folder itself is a symlink.
        symlink(&outside, &arts).unwrap();
        assert!(matches!(
            Beneath::open(&arts),
            Err(BeneathError::Symlink(_))
        ));
        std::fs::remove_file(&arts).unwrap();
        // A symlink below it, absolute or relative.
        std::fs::create_dir(&arts).unwrap();
        symlink(&outside, arts.join("abs")).unwrap();
        symlink("../outside", arts.join("rel")).unwrap();
        let b = Beneath::open(&arts).unwrap();
        for rel in ["abs/x", "rel/x", "abs/deeper/x"] {
            let e = write(&b, rel, b"pwned").unwrap_err();
            assert!(matches!(e, BeneathError::Symlink(_)), "{rel}: {e}");
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        // A symlink at the final name is replaced, not written through.
        std::fs::write(outside.join("target"), b"precious").unwrap();
        symlink(outside.join("target"), arts.join("link")).unwrap();
        write(&b, "link", b"artifact").unwrap();
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"precious");
        assert!(!arts.join("link").is_symlink());
        assert_eq!(std::fs::read(arts.join("link")).unwrap(), b"artifact");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            1,
            "nothing written outside"
        );
    }

    #[test]
    fn a_relative_folder_follows_no_symlink_on_its_way() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        symlink(&outside, repo.join("out")).unwrap();
        let start = File::open(&repo).unwrap();
        let e = walk(&start, Path::new("out/arts"), &Mutex::default()).unwrap_err();
        assert!(matches!(e, BeneathError::Symlink(_)), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let created = Mutex::default();
        walk(&start, Path::new("./fine/../fine/arts"), &created).unwrap();
        assert!(repo.join("fine/arts").is_dir());
    }
}
