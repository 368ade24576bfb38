//! Error types of the library: reading a mkfile and running it.

/// Why a mkfile could not be read. The `Display` text is what mk prints
/// after `mk: `.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// A syntax error at `file:line`.
    #[error("{file}:{line}: syntax error; {msg}")]
    Syntax {
        /// The mkfile (or included file) name.
        file: String,
        /// The line as 9base reports it.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A regular-expression target that does not compile.
    #[error("{file}:{line}: regular expression error; {msg}")]
    Regex {
        /// The mkfile name.
        file: String,
        /// The line of the rule.
        line: usize,
        /// The compiler's complaint.
        msg: String,
    },
    /// The mkfile named with `-f` could not be opened.
    #[error("open {path}: {reason}")]
    Open {
        /// The file.
        path: String,
        /// The OS error text.
        reason: String,
    },
    /// A `<|command` include exited with a non-zero status.
    #[error("bad include program status")]
    IncludeStatus,
    /// A backquote or include command could not be started.
    #[error("cannot run the shell {shell}: {reason}")]
    Spawn {
        /// The shell command.
        shell: String,
        /// The OS error text.
        reason: String,
    },
}

/// Why building targets stopped. The `Display` text is what mk prints
/// after `mk: ` (or, for [`RunError::Reported`], nothing more is printed).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A recipe failed; the message was already printed.
    #[error("recipe failed")]
    Reported,
    /// Nothing to make and no default target.
    #[error("nothing to mk")]
    NothingToMk,
    /// A target with no rule and no file.
    #[error("don't know how to make '{target}' in {dir}")]
    DontKnow {
        /// The target.
        target: String,
        /// The working directory.
        dir: String,
    },
    /// A target whose rules give no recipe.
    #[error("no recipe to make '{0}'")]
    NoRecipe(String),
    /// The dependency graph has a cycle.
    #[error("cycle in graph detected at target {0}")]
    Cycle(String),
    /// Several rules give different recipes for one target.
    #[error("ambiguous recipes for {target}:\n{trace}")]
    Ambiguous {
        /// The target.
        target: String,
        /// One line per conflicting chain, as 9base prints it.
        trace: String,
    },
    /// A recipe could not be started or waited for.
    #[error("{what}: {reason}")]
    Io {
        /// The operation.
        what: String,
        /// The OS error text.
        reason: String,
    },
}

/// The text of an OS error without Rust's ` (os error N)` suffix, as C's
/// `%r` prints it.
pub fn os_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_reason_strips_the_errno_suffix() {
        let e = std::io::Error::from_raw_os_error(2);
        assert_eq!(os_reason(&e), "No such file or directory");
    }

    #[test]
    fn messages_match_9base() {
        let cases: [(Box<dyn std::error::Error>, &str); 3] = [
            (
                Box::new(ParseError::Syntax {
                    file: "mkfile".into(),
                    line: 2,
                    msg: "expected one of :<=".into(),
                }),
                "mkfile:2: syntax error; expected one of :<=",
            ),
            (
                Box::new(RunError::Cycle("a".into())),
                "cycle in graph detected at target a",
            ),
            (
                Box::new(RunError::DontKnow {
                    target: "x".into(),
                    dir: "/tmp".into(),
                }),
                "don't know how to make 'x' in /tmp",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }
}
