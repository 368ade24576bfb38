//! Plan 9 mk(1): parser and evaluator.
//!
//! The crate reads mkfiles as Debian's 9base `mk` does (assignments,
//! rules with attributes, `%`/`&` meta-rules, `R` regular-expression
//! rules, `<file` and `<|command` includes, backquotes, `${var:A%B=C%D}`)
//! and makes targets the same way (dates, virtual targets, missing
//! intermediates, cycles, `$NPROC` parallel recipes run by `sh -e`).
//!
//! # Checking a mkfile without running it
//!
//! The small API another crate needs to look at a mkfile on the host:
//!
//! ```no_run
//! let mk = reprise_mk::Mkfile::parse_file("mkfile", std::env::vars())?;
//! for t in mk.targets() {
//!     println!("{t}: {:?}", mk.prerequisites(t));
//! }
//! assert!(mk.has_target("prog.o")); // directly or through a meta-rule
//! # Ok::<(), reprise_mk::ParseError>(())
//! ```
//!
//! [`Mkfile::parse_file`] runs no command: backquotes expand to nothing
//! and `<|` includes are skipped (see [`Commands`]). To make targets,
//! parse with [`Commands::Run`] and hand the [`Mkfile`] to an
//! [`Evaluator`], as the `mk` binary does.
//!
//! Not supported: archive members (`lib.a(member)`, `$newmember` is
//! computed but member dates are not read from archives) and rc(1)
//! quoting when `MKSHELL` is rc.

mod error;
mod eval;
mod lex;
mod parse;
mod proc;
mod regexp;
mod vars;
mod word;

pub use error::{ParseError, RunError};
pub use eval::{Evaluator, Options};
pub use parse::{Commands, Mkfile, Recipe};

use std::path::Path;

impl Mkfile {
    /// Parses the mkfile at `path` with the variables of `env` imported,
    /// running no command (see [`Commands::Skip`]).
    pub fn parse_file<I, K, V>(path: impl AsRef<Path>, env: I) -> Result<Self, ParseError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self::parse_file_with(path, env, Commands::Skip)
    }

    /// Like [`Mkfile::parse_file`], choosing whether commands run.
    pub fn parse_file_with<I, K, V>(
        path: impl AsRef<Path>,
        env: I,
        commands: Commands,
    ) -> Result<Self, ParseError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut m = Self::new(env, commands);
        m.parse_path(&path.as_ref().to_string_lossy())?;
        Ok(m)
    }

    /// Parses mkfile text; `name` is used in error messages.
    pub fn parse_str<I, K, V>(name: &str, text: &str, env: I) -> Result<Self, ParseError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut m = Self::new(env, Commands::Skip);
        m.parse_text(name, text, false)?;
        Ok(m)
    }

    /// Whether some rule can make `target`: an explicit rule, or a
    /// meta-rule (`%`, `&` or `R`) whose target pattern matches. File
    /// dates are not consulted.
    pub fn has_target(&self, target: &str) -> bool {
        let explicit = self
            .chain(target)
            .into_iter()
            .any(|i| !self.rules[i].is_meta() && !self.rules[i].no_effect());
        explicit
            || self
                .metarules
                .iter()
                .any(|&i| self.meta_applies(i, target).is_some())
    }

    /// The prerequisites rules give `target`: those of its explicit rules
    /// (in mk's order), then those of every meta-rule that matches, with
    /// the stem substituted. No file is looked at, so meta-rule
    /// prerequisites that mk would discard as unbuildable are included.
    pub fn prerequisites(&self, target: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |w: String| {
            if !w.is_empty() && !out.contains(&w) {
                out.push(w);
            }
        };
        for i in self.chain(target) {
            let r = &self.rules[i];
            if !r.is_meta() {
                r.tail.iter().cloned().for_each(&mut add);
            }
        }
        for &i in &self.metarules {
            if let Some(words) = self.meta_applies(i, target) {
                words.into_iter().for_each(&mut add);
            }
        }
        out
    }

    /// If meta-rule `i` matches `target`, its prerequisites for it.
    fn meta_applies(&self, i: usize, target: &str) -> Option<Vec<String>> {
        let r = &self.rules[i];
        if r.no_effect() {
            return None;
        }
        if let Some(re) = &r.pat {
            let m = regexp::exec(re, target)?;
            return Some(r.tail.iter().map(|w| regexp::regsub(w, &m)).collect());
        }
        let stem = eval::meta_match(target, &r.target)?;
        Some(r.tail.iter().map(|w| eval::subst(&stem, w)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOENV: [(&str, &str); 0] = [];

    #[test]
    fn query_api_table() {
        let text = "OBJ=a.o b.o\nprog: $OBJ main.o\n\tcc -o $target $prereq\n%.o: %.c\n\tcc -c $stem.c\n\
                    (.*)\\.tab\\.c:R: '\\1'.y\n\tyacc $prereq\nclean:V:\n\trm -f *.o\n";
        let mk = Mkfile::parse_str("mkfile", text, NOENV).expect("parses");
        assert_eq!(mk.targets(), ["prog", "clean"]);
        assert_eq!(mk.default_targets().expect("default"), ["prog"]);
        let cases: &[(&str, bool, &[&str])] = &[
            ("prog", true, &["a.o", "b.o", "main.o"]),
            ("x.o", true, &["x.c"]),
            ("gram.tab.c", true, &["gram.y"]),
            ("clean", true, &[]),
            ("nothing.h", false, &[]),
        ];
        for (t, has, pre) in cases {
            assert_eq!(mk.has_target(t), *has, "{t}");
            assert_eq!(mk.prerequisites(t), *pre, "{t}");
        }
    }

    #[test]
    fn parse_file_reports_missing_file() {
        let e = Mkfile::parse_file("/nonexistent/mkfile", NOENV).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "open /nonexistent/mkfile: No such file or directory"
        );
    }
}
