//! `reprise check`: a revision's mkfile and `reprise.toml` verified before
//! anything boots, with the workspace's own mk parser (the same one that
//! runs them in the OS) and the OS's shell for recipes. Every problem
//! carries `file:line`; a problem with the whole file (a target nothing
//! makes) points at its end, as a compiler points at the end of a file
//! that lacks `main`.
//!
//! What is checked: `reprise.toml` parses, its counted and secret names are
//! valid and disjoint (with line and column, from
//! [`reprise_protocol::repo_config`]); the mkfile exists and parses; what
//! it includes exists (`/usr/lib/reprise/ci.mk` is the standard include
//! this build carries; other paths are files of the revision); the targets
//! the contract needs exist, directly or through `ci.mk` (`prepare-runtime`
//! and the target asked for); `CONTAINERIMAGE` is set, or a recipe writes
//! `/var/run/ci/env/CONTAINERIMAGE` itself; every declared artifact has a
//! rule that can make it; every recipe parses (`sh -n`).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

use reprise_mk::{Mkfile, ParseError};

use crate::repo::{Checkout, Revision};

/// The standard include's path in the OS.
pub const CI_MK: &str = "/usr/lib/reprise/ci.mk";
/// The standard include's text, as this build's image carries it.
pub const CI_MK_TEXT: &str = include_str!("../../mkfiles/ci.mk");
const MKFILE: &str = "mkfile";

/// One problem, at `file:line`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// What a revision that passed the check declares, for the run.
#[derive(Debug, Clone)]
pub struct Checked {
    pub has_prepare_runtime: bool,
    pub has_post_test: bool,
    /// `CONTAINERIMAGE` as the mkfile sets it, if it sets it plainly.
    pub container_image: Option<String>,
}

/// Checks `revision` for `target`; `checkout` reads the files it includes.
pub fn check(
    checkout: &Checkout,
    revision: &Revision,
    target: &str,
) -> Result<Checked, Vec<Problem>> {
    let Some(text) = revision.mkfile.as_deref() else {
        return Err(vec![Problem {
            file: MKFILE.into(),
            line: 1,
            message: format!(
                "revision {} has no mkfile at its root (add one; see {CI_MK})",
                &revision.commit[..12]
            ),
        }]);
    };
    let tree = revision.tree.clone();
    let files: BTreeMap<String, Option<String>> = include_paths(text)
        .into_iter()
        .filter(|p| p != CI_MK && !p.starts_with('/'))
        .map(|p| {
            let content = checkout.read_file(&tree, p.trim_start_matches("./"));
            (p, content)
        })
        .collect();
    check_text(text, target, &revision.config.artifacts, &files)
}

/// The check of mkfile `text` for `target`, with `artifacts` declared and
/// `files` the repository files it includes (by the path written).
pub fn check_text(
    text: &str,
    target: &str,
    artifacts: &[reprise_protocol::manifest::ArtifactPath],
    files: &BTreeMap<String, Option<String>>,
) -> Result<Checked, Vec<Problem>> {
    let end = text.lines().count().max(1);
    let at_end = |message: String| Problem {
        file: MKFILE.into(),
        line: end,
        message,
    };
    let mut problems = Vec::new();
    let mut mk = Mkfile::new(Vec::<(String, String)>::new(), reprise_mk::Commands::Skip);
    let included = files.clone();
    mk.set_includes(move |path| {
        if path == CI_MK {
            return Some(CI_MK_TEXT.to_string());
        }
        included.get(path).cloned().flatten()
    });
    if let Err(e) = mk.parse_text(MKFILE, text, false) {
        return Err(vec![parse_problem(e)]);
    }
    for warning in mk.take_warnings() {
        if let Some(rest) = warning.strip_prefix("warning: skipping missing include file ") {
            let path = rest.split(": ").next().unwrap_or(rest);
            problems.push(Problem {
                file: MKFILE.into(),
                line: line_of(text, &format!("<{path}")).unwrap_or(1),
                message: format!(
                    "the included file {path} is not in the revision (only {CI_MK} and the repository's own files can be included)"
                ),
            });
        }
    }
    for (needed, how) in [
        (
            "prepare-runtime",
            format!("include <{CI_MK} first, or add a 'prepare-runtime:V:' rule"),
        ),
        (
            target,
            format!("add a rule '{target}:V:' with the recipe that runs the tests"),
        ),
    ] {
        if !mk.has_target(needed) {
            problems.push(at_end(format!(
                "no rule makes the target '{needed}' ({how})"
            )));
        }
    }
    let container_image = mk
        .variable("CONTAINERIMAGE")
        .map(|v| v.join(" "))
        .filter(|v| !v.is_empty());
    let recipes = mk.recipes();
    let writes_it_itself = recipes.iter().any(|r| {
        r.targets
            .iter()
            .any(|t| t.ends_with("/env/CONTAINERIMAGE") || t == "CONTAINERIMAGE")
            && !r.file.ends_with("ci.mk")
            || (!r.file.ends_with("ci.mk") && r.text.contains("env/CONTAINERIMAGE"))
    });
    if container_image.is_none() && !writes_it_itself {
        problems.push(Problem {
            file: MKFILE.into(),
            line: line_of(text, &format!("<{CI_MK}")).unwrap_or(end),
            message: "CONTAINERIMAGE is not set: add CONTAINERIMAGE=localhost/NAME (the image base-image builds), or write /var/run/ci/env/CONTAINERIMAGE in prepare-runtime".into(),
        });
    }
    for artifact in artifacts {
        let made = format!("/var/run/ci/artifacts/{artifact}");
        if !mk.has_target(&made) {
            problems.push(at_end(format!(
                "no rule can make the declared artifact {artifact} (include <{CI_MK}, whose rule copies the repository file of the same path, or add a rule for {made})"
            )));
        }
    }
    for recipe in &recipes {
        if recipe.file.ends_with("ci.mk") || !is_sh(&recipe.shell) {
            continue;
        }
        if let Some((line, why)) = shell_syntax_error(&crate::paths::cache_dir(), &recipe.text) {
            problems.push(Problem {
                file: recipe.file.clone(),
                // The rule's line is the one after its head (9base's
                // count), where the recipe's first line is.
                line: recipe.line + line - 1,
                message: format!(
                    "the recipe of {} does not parse as a shell script: {why}",
                    recipe.targets.join(" ")
                ),
            });
        }
    }
    if problems.is_empty() {
        Ok(Checked {
            has_prepare_runtime: mk.has_target("prepare-runtime"),
            has_post_test: mk.has_target("post-test"),
            container_image,
        })
    } else {
        problems.sort_by_key(|p| (p.file.clone(), p.line));
        Err(problems)
    }
}

fn parse_problem(e: ParseError) -> Problem {
    match e {
        ParseError::Syntax { file, line, msg } => Problem {
            file,
            // mk (like 9base, whose messages the library keeps) counts the
            // line of an error in a rule or assignment head after reading
            // it; its lexer's unclosed quotes and `no var` count right.
            line: if msg.starts_with("missing closing") || msg.starts_with("no var") {
                line
            } else {
                line.saturating_sub(1).max(1)
            },
            message: format!("syntax error: {msg}"),
        },
        ParseError::Regex { file, line, msg } => Problem {
            file,
            line,
            message: format!("regular expression error: {msg}"),
        },
        other => Problem {
            file: MKFILE.into(),
            line: 1,
            message: other.to_string(),
        },
    }
}

/// The paths of the mkfile's `<file` includes.
fn include_paths(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix('<'))
        .filter(|l| !l.starts_with('|'))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The 1-based line of the first line of `text` that starts with `start`.
fn line_of(text: &str, start: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.starts_with(start))
        .map(|i| i + 1)
}

fn is_sh(shell: &[String]) -> bool {
    shell
        .first()
        .is_none_or(|s| s == "sh" || s.ends_with("/sh"))
}

/// `sh -n` of `script`: the 1-based line of the first syntax error and
/// what the shell said, or `None` when it parses. A script that parsed is
/// remembered by its sha256 under the `cache` folder (`parsed-sh/`), so the
/// check of an unchanged mkfile starts no shell: each start is a process
/// every replay would pay. Errors are not remembered; a planted mark only
/// defers a syntax error to the run, whose own shell reports it.
fn shell_syntax_error(cache: &std::path::Path, script: &str) -> Option<(usize, String)> {
    let mark = cache
        .join(PARSED_SH)
        .join(reprise_protocol::digest::Sha256Digest::of(script.as_bytes()).hex());
    if mark.is_file() {
        return None;
    }
    let found = run_sh_n(script)?;
    if found.is_none()
        && let Some(dir) = mark.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let _ = std::fs::write(&mark, b"");
    }
    found
}

/// The cache folder of marks of scripts `sh -n` took.
const PARSED_SH: &str = "parsed-sh";

/// Runs `sh -n` on `script`: `None` when no shell could be asked,
/// `Some(None)` when it parses, else the error's line and text.
fn run_sh_n(script: &str) -> Option<Option<(usize, String)>> {
    let mut child = Command::new("sh")
        .arg("-n")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let _ = child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes());
    let out = child.wait_with_output().ok()?;
    if out.status.success() {
        return Some(None);
    }
    // dash: "sh: 3: Syntax error: end of file unexpected (expecting "fi")"
    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let mut parts = text.splitn(3, ": ");
    let _shell = parts.next();
    let line = parts.next().and_then(|l| l.parse::<usize>().ok());
    let why = parts.next().map_or(text.clone(), str::to_string);
    Some(Some((line.unwrap_or(1), why)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Checked, Vec<String>> {
        check_text(text, "test", &[], &BTreeMap::new())
            .map_err(|ps| ps.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn a_good_mkfile_passes_and_says_what_it_declares() {
        let checked = check(
            "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/x\n\nbase-image:V:\n\tpodman image exists $CONTAINERIMAGE || true\n\ntest:V:\n\tsh ./test.sh\n",
        )
        .unwrap();
        assert!(checked.has_prepare_runtime);
        assert!(checked.has_post_test, "from ci.mk");
        assert_eq!(checked.container_image.as_deref(), Some("localhost/x"));
    }

    #[test]
    fn recipes_are_checked_by_the_shell_at_their_line() {
        let errors = check(
            "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=x\ntest:V:\n\tif true; then\n\t\techo\n",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("mkfile:")
                && errors[0].contains("does not parse as a shell script"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_script_that_parsed_is_remembered_and_an_error_is_not() {
        let cache = tempfile::tempdir().unwrap();
        let marks = || std::fs::read_dir(cache.path().join(PARSED_SH)).map_or(0, |d| d.count());
        assert_eq!(shell_syntax_error(cache.path(), "echo ok\n"), None);
        assert_eq!(marks(), 1, "the parse is remembered");
        assert_eq!(shell_syntax_error(cache.path(), "echo ok\n"), None);
        assert_eq!(marks(), 1);
        let broken = "if true; then\n";
        for _ in 0..2 {
            let (line, why) = shell_syntax_error(cache.path(), broken).expect("an error");
            assert!(line >= 1 && !why.is_empty(), "{why}");
        }
        assert_eq!(marks(), 1, "an error is asked again each time");
        // A mark is only a shortcut: one planted for a broken script lets
        // the check pass, and the run's own shell reports the error.
        let planted = cache
            .path()
            .join(PARSED_SH)
            .join(reprise_protocol::digest::Sha256Digest::of(broken.as_bytes()).hex());
        std::fs::write(planted, b"").unwrap();
        assert_eq!(shell_syntax_error(cache.path(), broken), None);
    }
}
