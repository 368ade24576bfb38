//! The repository side of a run: find the checkout, resolve the revision
//! with git2, read the repository's declarations from the revision's tree,
//! and export that tree (never the working directory) for the guest.

use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};
use reprise_protocol::repo_config::{self, ConfigError, RepoConfig};
use thiserror::Error;

/// Why the repository or revision cannot be used.
#[derive(Debug, Error)]
pub enum RepoError {
    #[error("{} is not inside a git repository (run reprise from a checkout)", .0.display())]
    NotARepo(PathBuf),
    #[error("the repository has no commits yet (commit something first)")]
    NoCommits,
    #[error("unknown revision '{0}' (use a commit id, branch or tag that exists here)")]
    UnknownRevision(String),
    #[error("in revision {rev}")]
    Config {
        rev: String,
        #[source]
        source: ConfigError,
    },
    #[error("git")]
    Git(#[from] git2::Error),
    #[error("writing the tree to {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A git checkout.
pub struct Checkout {
    repo: Repository,
}

impl std::fmt::Debug for Checkout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkout")
            .field("path", &self.repo.path())
            .finish()
    }
}

/// A resolved revision and what the repository declares in it.
#[derive(Debug, Clone)]
pub struct Revision {
    pub commit: String,
    pub tree: String,
    pub config: RepoConfig,
    pub namespace: String,
    /// The mkfile at the root of the tree, if there is one.
    pub mkfile: Option<String>,
}

impl Checkout {
    /// The repository that holds `dir`.
    pub fn discover(dir: &Path) -> Result<Checkout, RepoError> {
        let repo = Repository::discover(dir).map_err(|_| RepoError::NotARepo(dir.to_path_buf()))?;
        Ok(Checkout { repo })
    }

    /// The working directory's root.
    pub fn root(&self) -> PathBuf {
        self.repo
            .workdir()
            .unwrap_or_else(|| self.repo.path())
            .to_path_buf()
    }

    /// Resolves `rev` (default `HEAD`) to a commit and reads its declarations.
    pub fn resolve(&self, rev: Option<&str>) -> Result<Revision, RepoError> {
        let commit = match rev {
            None => {
                let head = self.repo.head().map_err(|_| RepoError::NoCommits)?;
                head.peel_to_commit().map_err(|_| RepoError::NoCommits)?
            }
            Some(r) => self
                .repo
                .revparse_single(r)
                .and_then(|o| o.peel_to_commit())
                .map_err(|_| RepoError::UnknownRevision(r.to_string()))?,
        };
        let tree = commit.tree()?;
        let read = |name: &str| -> Result<Option<String>, RepoError> {
            match tree.get_name(name) {
                Some(entry) if entry.kind() == Some(ObjectType::Blob) => {
                    let blob = self.repo.find_blob(entry.id())?;
                    Ok(Some(String::from_utf8_lossy(blob.content()).into_owned()))
                }
                _ => Ok(None),
            }
        };
        let short = commit.id().to_string()[..12].to_string();
        let config = match read(repo_config::FILE_NAME)? {
            Some(text) => RepoConfig::parse(&text).map_err(|source| RepoError::Config {
                rev: short.clone(),
                source,
            })?,
            None => RepoConfig::default(),
        };
        let namespace = match &config.namespace {
            Some(ns) => ns.clone(),
            None => self.derived_namespace(&commit)?,
        };
        Ok(Revision {
            commit: commit.id().to_string(),
            tree: tree.id().to_string(),
            mkfile: read("mkfile")?,
            config,
            namespace,
        })
    }

    /// The namespace from the origin URL, or, for a repository without
    /// one, `local/` and its root commit (shared by every clone). A shallow
    /// clone's history stops at the oldest commit fetched, another one at
    /// every fetch; where its origin is a repository on this machine that
    /// holds the whole history, the root commit is read there, so the
    /// namespace stays put and is the one a full clone derives.
    fn derived_namespace(&self, commit: &git2::Commit<'_>) -> Result<String, RepoError> {
        let origin = self.origin_url();
        if let Some(ns) = origin.as_deref().and_then(repo_config::namespace_from_url) {
            return Ok(ns);
        }
        let root = match origin.filter(|_| self.repo.is_shallow()) {
            Some(url) => match self.root_in_local_origin(&url, commit.id()) {
                Some(root) => root,
                None => root_of(commit.clone())?,
            },
            None => root_of(commit.clone())?,
        };
        Ok(format!("local/{}", &root[..16]))
    }

    /// The root commit of `commit` in the repository at `url` when that is
    /// a path on this machine (or a `file://` URL) to a clone that is not
    /// shallow itself and holds the commit; `None` otherwise (the origin
    /// moved, is remote, or its history cannot be read to its start).
    fn root_in_local_origin(&self, url: &str, commit: Oid) -> Option<String> {
        let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
        let path = match path.is_absolute() {
            true => path.to_path_buf(),
            false => self.root().join(path),
        };
        let origin = git2::Repository::open(path).ok()?;
        if origin.is_shallow() {
            return None;
        }
        root_of(origin.find_commit(commit).ok()?).ok()
    }

    /// The commit reached from `commit` by following first parents to the
    /// start of history (or of a shallow clone's, see [`Checkout::anchor`]):
    /// shared by every clone, and not something a repository can choose
    /// without sharing this history. It reads every commit on the way (0.4–0.7 s for 50,000
    /// here, where a replay takes 25 ms), so only what needs it
    /// asks: a real run's snapshots, and the namespace of a repository
    /// with neither an origin nor a declared one. A parent that cannot be
    /// read is an error, not a root.
    pub fn root_commit(&self, commit: &str) -> Result<String, RepoError> {
        root_of(self.repo.find_commit(Oid::from_str(commit)?)?)
    }

    /// What ties this checkout's snapshots to its repository beside the
    /// namespace, which the repository's content can declare: the root
    /// commit ([`Checkout::root_commit`]). A shallow clone's history stops
    /// at the oldest commit fetched, a different one at every fetch of a
    /// CI runner's `--depth 1` checkout, so there it is the origin the
    /// clone was fetched from (its `host/owner/name`, so https and ssh
    /// clones agree), which the content cannot choose either; a shallow
    /// clone without an origin falls back to its boundary commit.
    pub fn anchor(&self, commit: &str) -> Result<String, RepoError> {
        if self.repo.is_shallow()
            && let Some(url) = self.origin_url()
        {
            let from = repo_config::namespace_from_url(&url).unwrap_or(url);
            return Ok(format!("shallow clone of {from}"));
        }
        self.root_commit(commit)
    }

    /// The URL of the `origin` remote, from the clone's own config (never
    /// the tree's content).
    fn origin_url(&self) -> Option<String> {
        let origin = self.repo.find_remote("origin").ok()?;
        origin.url().ok().map(String::from)
    }

    /// The repository's default branch and the commit at its tip:
    /// `origin`'s HEAD when the clone knows it, else the branch checked out.
    pub fn default_branch(&self) -> Option<(String, String)> {
        if let Ok(r) = self.repo.find_reference("refs/remotes/origin/HEAD")
            && let Ok(Some(target)) = r.symbolic_target()
            && let Some(name) = target.strip_prefix("refs/remotes/origin/")
        {
            let tip = r.resolve().ok()?.target()?.to_string();
            return Some((name.to_string(), tip));
        }
        let head = self.repo.head().ok()?;
        if !head.is_branch() {
            return None;
        }
        let name = head.shorthand().ok()?.to_string();
        Some((name, head.target()?.to_string()))
    }

    /// The text of the file `path` (relative to the root) in the tree
    /// `tree`, if it is a file there.
    pub fn read_file(&self, tree: &str, path: &str) -> Option<String> {
        let tree = self.repo.find_tree(Oid::from_str(tree).ok()?).ok()?;
        let entry = tree.get_path(Path::new(path)).ok()?;
        let blob = self.repo.find_blob(entry.id()).ok()?;
        Some(String::from_utf8_lossy(blob.content()).into_owned())
    }

    /// Whether git tracks `path` (relative to the root): it is in the
    /// index or in HEAD's tree. What a repository commits is the
    /// repository's, not the user's.
    pub fn tracks(&self, path: &Path) -> bool {
        let in_index = self
            .repo
            .index()
            .is_ok_and(|index| index.get_path(path, 0).is_some());
        let in_head = self
            .repo
            .head()
            .and_then(|h| h.peel_to_tree())
            .is_ok_and(|tree| tree.get_path(path).is_ok());
        in_index || in_head
    }

    /// Whether the working tree has changes that a run would not see
    /// (modified, staged, deleted or untracked files), not counting
    /// untracked files under `ignore` (reprise's own artifacts folder).
    /// In a large checkout git itself answers ([`GIT_STATUS_FROM`]),
    /// libgit2 where git is missing or fails.
    pub fn is_dirty(&self, ignore: Option<&Path>) -> bool {
        let large = self
            .repo
            .index()
            .is_ok_and(|index| index.len() >= GIT_STATUS_FROM);
        self.dirty_by(ignore, large)
    }

    /// [`Checkout::is_dirty`] by git's own `status` when `git_first`, by
    /// libgit2 otherwise.
    fn dirty_by(&self, ignore: Option<&Path>, git_first: bool) -> bool {
        let root = self.root();
        let ignore = ignore.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
        let ours = |path: &Path| {
            ignore
                .as_ref()
                .is_some_and(|i| root.join(path).starts_with(i))
        };
        if git_first && let Some(dirty) = git_status_dirty(&root, &ours) {
            return dirty;
        }
        let mut opts = git2::StatusOptions::new();
        opts.include_untracked(true)
            .include_ignored(false)
            .recurse_untracked_dirs(true);
        let Ok(statuses) = self.repo.statuses(Some(&mut opts)) else {
            return false;
        };
        statuses.iter().any(|entry| {
            let untracked_ours = entry.status() == git2::Status::WT_NEW
                && entry.path().ok().is_some_and(|p| ours(Path::new(p)));
            !untracked_ours
        })
    }

    /// Writes the tree `tree` into `dest` (created): files with their
    /// executable bit, symlinks as symlinks; submodules as empty folders.
    pub fn export(&self, tree: &str, dest: &Path) -> Result<(), RepoError> {
        let tree = self.repo.find_tree(Oid::from_str(tree)?)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RepoError::Io { path, source }
        };
        std::fs::create_dir_all(dest).map_err(io(dest))?;
        let mut failure = None;
        tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
            let path = dest.join(parent).join(entry.name().unwrap_or("_"));
            let result = (|| -> Result<(), RepoError> {
                match entry.kind() {
                    Some(ObjectType::Tree) => std::fs::create_dir_all(&path).map_err(io(&path)),
                    Some(ObjectType::Blob) => {
                        let blob = self.repo.find_blob(entry.id())?;
                        write_blob(&path, blob.content(), entry.filemode()).map_err(io(&path))
                    }
                    _ => std::fs::create_dir_all(&path).map_err(io(&path)),
                }
            })();
            match result {
                Ok(()) => TreeWalkResult::Ok,
                Err(e) => {
                    failure = Some(e);
                    TreeWalkResult::Abort
                }
            }
        })?;
        failure.map_or(Ok(()), Err)
    }
}

/// Index entries from which [`Checkout::is_dirty`] asks git itself.
/// Measured here (medians of 21, a scratch program, a VM benchmark busy on
/// the other core): 200 files in one folder 1.3 ms by libgit2 against
/// 3.7 ms by git (mostly starting it); 1,000 files in 1,100 folders 42
/// against 20 ms; 5,000 59 against 30; 20,000 93 against 62; 100,000
/// 458 against 249 (git skips unchanged folders of the index against HEAD
/// by its cache of trees, and stats files on several threads). A small
/// checkout's check hides under the replay either way; from about here it
/// is what the replay waits for.
pub const GIT_STATUS_FROM: usize = 5_000;

/// Whether git's `status` of the checkout at `root` lists anything but
/// untracked files that are `ours`; `None` when git cannot say (not
/// installed, the repository refused). It takes no lock and writes
/// nothing (`--no-optional-locks`), so it never gets in the way of the
/// user's own git; `GIT_*` variables are dropped so that git looks at
/// the checkout libgit2 found.
fn git_status_dirty(root: &Path, ours: &dyn Fn(&Path) -> bool) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = std::process::Command::new("git");
    for (name, _) in std::env::vars_os() {
        if name.as_bytes().starts_with(b"GIT_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .args([
            "--no-optional-locks",
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=all",
        ])
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // Entries are `XY path`, NUL-ended (a rename adds its old path as one
    // more, which is a change either way).
    Some(
        out.stdout
            .split(|&b| b == 0)
            .filter(|entry| !entry.is_empty())
            .any(|entry| match entry.strip_prefix(b"?? ") {
                Some(path) => !ours(Path::new(std::ffi::OsStr::from_bytes(path))),
                None => true,
            }),
    )
}

/// See [`Checkout::root_commit`].
fn root_of(mut commit: git2::Commit<'_>) -> Result<String, RepoError> {
    while commit.parent_count() > 0 {
        commit = commit.parent(0)?;
    }
    Ok(commit.id().to_string())
}

fn write_blob(path: &Path, content: &[u8], mode: i32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if mode == 0o120000 {
        let target = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(content);
        return std::os::unix::fs::symlink(target, path);
    }
    std::fs::write(path, content)?;
    let perm = if mode == 0o100755 { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn the_history_is_read_only_when_a_root_commit_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        git(d, &["init", "-q"]);
        for (i, text) in ["one", "two", "three"].iter().enumerate() {
            std::fs::write(d.join("f"), text).unwrap();
            git(d, &["add", "f"]);
            git(d, &["commit", "-q", "-m", &format!("commit {i}")]);
        }
        let co = Checkout::discover(d).unwrap();
        let rev = co.resolve(None).unwrap();
        let first = co.resolve(Some("HEAD~2")).unwrap().commit;
        assert_eq!(co.root_commit(&rev.commit).unwrap(), first);
        assert_eq!(rev.namespace, format!("local/{}", &first[..16]));

        // The middle commit's object goes: the history cannot be walked.
        let middle = co.resolve(Some("HEAD~1")).unwrap().commit;
        std::fs::remove_file(d.join(format!(".git/objects/{}/{}", &middle[..2], &middle[2..])))
            .unwrap();
        let co = Checkout::discover(d).unwrap();
        assert!(
            matches!(co.root_commit(&rev.commit), Err(RepoError::Git(_))),
            "a parent that cannot be read is not a root"
        );
        assert!(
            co.resolve(None).is_err(),
            "a derived namespace needs the root"
        );
        // With an origin, resolving (what a key and a replay need) reads
        // none of it.
        git(
            d,
            &[
                "remote",
                "add",
                "origin",
                "https://example.com/team/project.git",
            ],
        );
        let co = Checkout::discover(d).unwrap();
        let rev = co.resolve(None).unwrap();
        assert_eq!(rev.namespace, "example.com/team/project");
    }

    /// A repository `upstream` in `dir` to clone from.
    fn upstream(dir: &Path) -> PathBuf {
        let up = dir.join("upstream");
        std::fs::create_dir(&up).unwrap();
        git(&up, &["init", "-q", "-b", "main"]);
        up
    }

    /// Commits `text` as the file `f` of `repo`.
    fn commit_text(repo: &Path, text: &str) {
        std::fs::write(repo.join("f"), text).unwrap();
        git(repo, &["add", "f"]);
        git(repo, &["commit", "-q", "-m", text]);
    }

    #[test]
    fn a_shallow_clone_is_anchored_to_its_origin_not_its_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let up = upstream(dir.path());
        for text in ["one", "two", "three"] {
            commit_text(&up, text);
        }
        let root = Checkout::discover(&up)
            .unwrap()
            .resolve(Some("HEAD~2"))
            .unwrap()
            .commit;
        let url = format!("file://{}", up.display());
        let clone = |name: &str, args: &[&str]| {
            let to = dir.path().join(name);
            let mut all = vec!["clone", "-q"];
            all.extend_from_slice(args);
            all.extend([url.as_str(), to.to_str().unwrap()]);
            git(dir.path(), &all);
            let co = Checkout::discover(&to).unwrap();
            let head = co.resolve(None).unwrap().commit;
            (co.root_commit(&head).unwrap(), co.anchor(&head).unwrap())
        };
        let (full_root, full_anchor) = clone("full", &[]);
        assert_eq!((full_root, full_anchor), (root.clone(), root.clone()));

        // Two `--depth 1` fetches, a commit apart, as a CI runner makes
        // them: each stops at another commit, and both are one repository.
        let (first_root, first) = clone("shallow1", &["--depth", "1"]);
        commit_text(&up, "four");
        let (second_root, second) = clone("shallow2", &["--depth", "1"]);
        assert_ne!(first_root, second_root, "the boundary moves with the fetch");
        assert_ne!(first_root, root);
        assert_eq!(first, second);
        assert_eq!(first, format!("shallow clone of {url}"));

        // A shallow clone of the same repository by another URL spelling
        // of one host/owner/name shares it; the content cannot move it.
        let co = Checkout::discover(&dir.path().join("shallow2")).unwrap();
        let head = co.resolve(None).unwrap().commit;
        for url in [
            "https://git.example.com/team/project.git",
            "git@git.example.com:team/project",
        ] {
            git(
                &dir.path().join("shallow2"),
                &["remote", "set-url", "origin", url],
            );
            let co = Checkout::discover(&dir.path().join("shallow2")).unwrap();
            assert_eq!(
                co.anchor(&head).unwrap(),
                "shallow clone of git.example.com/team/project"
            );
        }
        // Without an origin, the boundary commit is all there is.
        git(
            &dir.path().join("shallow2"),
            &["remote", "remove", "origin"],
        );
        let co = Checkout::discover(&dir.path().join("shallow2")).unwrap();
        assert_eq!(co.anchor(&head).unwrap(), second_root);
    }

    #[test]
    fn a_shallow_clone_of_a_local_repository_keeps_its_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let up = upstream(dir.path());
        commit_text(&up, "one");
        commit_text(&up, "two");
        let root = Checkout::discover(&up)
            .unwrap()
            .resolve(Some("HEAD~1"))
            .unwrap()
            .commit;
        let expected = format!("local/{}", &root[..16]);
        assert_eq!(
            Checkout::discover(&up)
                .unwrap()
                .resolve(None)
                .unwrap()
                .namespace,
            expected
        );
        let clone = |name: &str, args: &[&str], from: &str| {
            let to = dir.path().join(name);
            let mut all = vec!["clone", "-q"];
            all.extend_from_slice(args);
            all.extend([from, to.to_str().unwrap()]);
            git(dir.path(), &all);
            let co = Checkout::discover(&to).unwrap();
            let head = co.resolve(None).unwrap().commit;
            (
                co.root_commit(&head).unwrap(),
                co.resolve(None).unwrap().namespace,
            )
        };
        let url = format!("file://{}", up.display());
        let (_, full) = clone("full", &[], &url);
        assert_eq!(full, expected);
        // `--depth 1` fetches a commit apart: each stops at another commit,
        // and all are the repository upstream's one namespace, by URL or by
        // path.
        let (boundary1, first) = clone("shallow1", &["--depth", "1"], &url);
        commit_text(&up, "three");
        let (boundary2, second) = clone("shallow2", &["--depth", "1"], &url);
        assert_ne!(boundary1, boundary2, "the boundary moves with the fetch");
        assert_ne!(boundary1, root);
        assert_eq!((first, second), (expected.clone(), expected.clone()));
        let (boundary3, by_path) = clone(
            "shallow3",
            &["--depth", "1", "--no-local"],
            up.to_str().unwrap(),
        );
        assert_ne!(boundary3, root, "cloned shallow by its path");
        assert_eq!(by_path, expected);
        // Its origin gone, the boundary is all there is, as before.
        let shallow = dir.path().join("shallow2");
        git(
            &shallow,
            &["remote", "set-url", "origin", "/nonexistent/repo"],
        );
        let co = Checkout::discover(&shallow).unwrap();
        assert_eq!(
            co.resolve(None).unwrap().namespace,
            format!("local/{}", &boundary2[..16])
        );
        // A shallow origin is no better than the boundary: not read.
        git(
            &shallow,
            &[
                "remote",
                "set-url",
                "origin",
                dir.path().join("shallow1").to_str().unwrap(),
            ],
        );
        let co = Checkout::discover(&shallow).unwrap();
        assert_eq!(
            co.resolve(None).unwrap().namespace,
            format!("local/{}", &boundary2[..16])
        );
    }

    #[test]
    fn git_and_libgit2_agree_on_what_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        git(d, &["init", "-q"]);
        std::fs::create_dir_all(d.join("src/deep")).unwrap();
        for f in ["a", "b", "src/c", "src/deep/d"] {
            std::fs::write(d.join(f), f).unwrap();
        }
        git(d, &["add", "-A"]);
        git(d, &["commit", "-q", "-m", "one"]);
        let ours = d.join("reprise-artifacts");
        let co = Checkout::discover(d).unwrap();
        let both = |what: &str| {
            let by_git = co.dirty_by(Some(&ours), true);
            let by_libgit2 = co.dirty_by(Some(&ours), false);
            assert_eq!(by_git, by_libgit2, "{what}");
            by_git
        };
        assert!(!both("clean"));
        assert_eq!(
            git_status_dirty(&co.root(), &|_| false),
            Some(false),
            "git answers (else both would be libgit2's answer)"
        );
        std::fs::create_dir_all(ours.join("sub")).unwrap();
        std::fs::write(ours.join("sub/r.txt"), "x").unwrap();
        assert!(!both("only our own output"));
        type Change = (&'static str, fn(&Path), fn(&Path));
        let changes: [Change; 6] = [
            (
                "modified",
                |d| std::fs::write(d.join("src/deep/d"), "changed").unwrap(),
                |d| git(d, &["checkout", "--", "src/deep/d"]),
            ),
            (
                "deleted",
                |d| std::fs::remove_file(d.join("a")).unwrap(),
                |d| git(d, &["checkout", "--", "a"]),
            ),
            (
                "untracked deep in a new folder",
                |d| {
                    std::fs::create_dir_all(d.join("new/x")).unwrap();
                    std::fs::write(d.join("new/x/y"), "y").unwrap();
                },
                |d| std::fs::remove_dir_all(d.join("new")).unwrap(),
            ),
            (
                "untracked beside our folder, named like it",
                |d| std::fs::write(d.join("reprise-artifacts.txt"), "y").unwrap(),
                |d| std::fs::remove_file(d.join("reprise-artifacts.txt")).unwrap(),
            ),
            (
                "staged, the file as committed",
                |d| {
                    std::fs::write(d.join("b"), "staged").unwrap();
                    git(d, &["add", "b"]);
                    std::fs::write(d.join("b"), "b").unwrap();
                },
                |d| git(d, &["reset", "-q", "b"]),
            ),
            (
                "renamed",
                |d| git(d, &["mv", "src/c", "src/e"]),
                |d| git(d, &["mv", "src/e", "src/c"]),
            ),
        ];
        for (what, make, undo) in changes {
            make(d);
            assert!(both(what), "{what} is a change");
            undo(d);
            assert!(!both(&format!("{what}, undone")));
        }
    }

    #[test]
    fn resolves_exports_and_derives_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        git(d, &["init", "-q", "-b", "main"]);
        assert!(matches!(
            Checkout::discover(d).unwrap().resolve(None),
            Err(RepoError::NoCommits)
        ));
        std::fs::write(d.join("mkfile"), "test:V:\n\techo hi\n").unwrap();
        std::fs::write(d.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            d.join("run.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("run.sh", d.join("link")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a.txt"), "a").unwrap();
        git(d, &["add", "-A"]);
        git(d, &["commit", "-q", "-m", "one"]);
        let co = Checkout::discover(&d.join("sub")).unwrap();
        let rev = co.resolve(None).unwrap();
        assert_eq!(rev.mkfile.as_deref(), Some("test:V:\n\techo hi\n"));
        assert!(rev.namespace.starts_with("local/"), "{}", rev.namespace);
        assert_eq!(
            co.root_commit(&rev.commit).unwrap(),
            rev.commit,
            "one commit: it is the root"
        );
        assert!(co.tracks(Path::new("mkfile")));
        assert!(!co.tracks(Path::new("reprise-artifacts")));
        assert!(!co.is_dirty(None));
        std::fs::create_dir(d.join("reprise-artifacts")).unwrap();
        std::fs::write(d.join("reprise-artifacts/r.txt"), "x").unwrap();
        assert!(
            !co.is_dirty(Some(&d.join("reprise-artifacts"))),
            "our own output is not a change"
        );
        std::fs::write(d.join("untracked"), "x").unwrap();
        assert!(co.is_dirty(Some(&d.join("reprise-artifacts"))));
        std::fs::remove_file(d.join("untracked")).unwrap();

        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("tree");
        co.export(&rev.tree, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("sub/a.txt")).unwrap(),
            "a"
        );
        assert_eq!(
            std::fs::read_link(dest.join("link")).unwrap(),
            Path::new("run.sh")
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dest.join("run.sh"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o755);
        assert!(
            !dest.join("untracked").exists(),
            "the working tree is not exported"
        );

        // An amended message keeps the tree; a new origin gives the namespace.
        git(d, &["commit", "-q", "--amend", "-m", "two"]);
        git(
            d,
            &[
                "remote",
                "add",
                "origin",
                "https://example.com/team/hello.git",
            ],
        );
        let amended = co.resolve(None).unwrap();
        assert_ne!(amended.commit, rev.commit);
        assert_eq!(amended.tree, rev.tree);
        assert_eq!(amended.namespace, "example.com/team/hello");
        assert!(matches!(
            co.resolve(Some("nope")),
            Err(RepoError::UnknownRevision(_))
        ));
        assert!(matches!(
            Checkout::discover(Path::new("/")),
            Err(RepoError::NotARepo(_))
        ));
    }
}
