//! The mkfile parser: assignments, rules with attributes, includes, and
//! the rule table mk's graph builder reads.

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::{ParseError, os_reason};
use crate::lex::Lexer;
use crate::proc;
use crate::vars::{INTERNAL, Vars};
use crate::word::{Ctx, charin, stow};

/// Rule attribute bits (as in 9base, so the numbers mean something to
/// whoever reads both).
pub(crate) mod attr {
    pub const META: u16 = 0x0001;
    pub const UPD: u16 = 0x0004;
    pub const QUIET: u16 = 0x0008;
    pub const VIR: u16 = 0x0010;
    pub const REGEXP: u16 = 0x0020;
    pub const NOREC: u16 = 0x0040;
    pub const DEL: u16 = 0x0080;
    pub const NOVIRT: u16 = 0x0100;
    pub const NOMINUSE: u16 = 0x1000;
}

/// Whether backquotes and `<|` includes run commands while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Commands {
    /// Run them with the shell, as mk does.
    #[default]
    Run,
    /// Do not run anything: backquotes expand to nothing and `<|`
    /// includes are skipped with a warning.
    Skip,
}

/// One rule for one target (a line with several targets gives several).
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub target: String,
    pub tail: Vec<String>,
    /// Shared by the rules of one line: identity tells recipes apart.
    pub recipe: Rc<str>,
    pub attr: u16,
    pub line: usize,
    pub file: Rc<str>,
    pub alltargets: Rc<Vec<String>>,
    pub pat: Option<regex::Regex>,
    pub prog: Option<String>,
    pub shell: Rc<Vec<String>>,
}

impl Rule {
    pub fn is_meta(&self) -> bool {
        self.attr & attr::META != 0
    }

    /// A rule with neither recipe nor prerequisites is ignored.
    pub fn no_effect(&self) -> bool {
        self.recipe.is_empty() && self.tail.first().is_none_or(|w| w.is_empty())
    }
}

/// A parsed mkfile: variables and rules.
#[derive(Debug)]
pub struct Mkfile {
    pub(crate) vars: Vars,
    pub(crate) rules: Vec<Rule>,
    pub(crate) by_target: HashMap<String, Vec<usize>>,
    pub(crate) metarules: Vec<usize>,
    pub(crate) target1: Option<Vec<String>>,
    explicit: Vec<String>,
    warnings: Vec<String>,
    shell: Rc<Vec<String>>,
    shell_stack: Vec<Rc<Vec<String>>>,
    commands: Commands,
    includes: Option<Includes>,
}

/// Reads an include file's text by path; `None` when it is missing.
type IncludeReader = dyn Fn(&str) -> Option<String>;

/// Where `<file` includes are read from, when not the file system.
struct Includes(Box<IncludeReader>);

impl std::fmt::Debug for Includes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Includes(..)")
    }
}

/// A rule's recipe and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// The mkfile (or included file) name.
    pub file: String,
    /// The line of the rule's head.
    pub line: usize,
    /// The targets of that line.
    pub targets: Vec<String>,
    /// The shell that runs it (`MKSHELL` then).
    pub shell: Vec<String>,
    /// The recipe's text, lines without their leading tab.
    pub text: String,
}

enum Head {
    Include(Vec<String>),
    Pipe(Vec<String>),
    Rule {
        head: Vec<String>,
        tail: Vec<String>,
        attr: u16,
        prog: Option<String>,
    },
    Assign {
        head: Vec<String>,
        tail: Vec<String>,
        noexport: bool,
    },
}

fn default_shell() -> Rc<Vec<String>> {
    Rc::new(vec!["sh".to_string()])
}

impl Mkfile {
    /// An empty mkfile with the variables of `env` imported (and
    /// `MKSHELL=sh`), ready for [`Mkfile::parse_text`].
    pub fn new<I, K, V>(env: I, commands: Commands) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut vars = Vars::new();
        vars.set("MKSHELL", vec!["sh".to_string()]);
        vars.import_env(env);
        Self {
            vars,
            rules: Vec::new(),
            by_target: HashMap::new(),
            metarules: Vec::new(),
            target1: None,
            explicit: Vec::new(),
            warnings: Vec::new(),
            shell: default_shell(),
            shell_stack: Vec::new(),
            commands,
            includes: None,
        }
    }

    /// Reads `<file` includes through `resolve` instead of the file system
    /// (`None`: the file is missing, a warning as for a missing file). For
    /// checking a mkfile of a revision, whose files are git objects.
    pub fn set_includes(&mut self, resolve: impl Fn(&str) -> Option<String> + 'static) {
        self.includes = Some(Includes(Box::new(resolve)));
    }

    /// Where the first explicit rule for `target` was written: (file, line).
    pub fn rule_location(&self, target: &str) -> Option<(String, usize)> {
        self.by_target.get(target)?.iter().find_map(|&i| {
            let r = &self.rules[i];
            (!r.is_meta()).then(|| (r.file.to_string(), r.line))
        })
    }

    /// Every recipe, once per rule line, in the order written.
    pub fn recipes(&self) -> Vec<Recipe> {
        let mut out: Vec<Recipe> = Vec::new();
        for r in &self.rules {
            if r.recipe.is_empty()
                || out
                    .iter()
                    .any(|o| o.line == r.line && *o.file == *r.file && o.text == *r.recipe)
            {
                continue;
            }
            out.push(Recipe {
                file: r.file.to_string(),
                line: r.line,
                targets: (*r.alltargets).clone(),
                shell: (*r.shell).clone(),
                text: r.recipe.to_string(),
            });
        }
        out
    }

    /// Warnings printed while parsing (missing include files and the like),
    /// each a full line as 9base prints it.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// The environment of a child started while parsing: the per-recipe
    /// names set empty plus every exported variable.
    pub(crate) fn child_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = INTERNAL
            .iter()
            .map(|n| (n.to_string(), String::new()))
            .collect();
        env.extend(
            self.vars
                .exported()
                .map(|(k, v)| (k.to_string(), v.join(" "))),
        );
        env
    }

    /// Applies `VAR=value` arguments from the command line: they override
    /// the assignments in the mkfiles read afterwards.
    pub fn assign_command_line(&mut self, assignments: &[String]) -> Result<(), ParseError> {
        if assignments.is_empty() {
            return Ok(());
        }
        let mut text = assignments.join("\n");
        text.push('\n');
        self.parse_text("command line args", &text, true)
    }

    /// Reads the mkfile `path` (and what it includes) into this mkfile.
    pub fn parse_path(&mut self, path: &str) -> Result<(), ParseError> {
        let text = std::fs::read(path).map_err(|e| ParseError::Open {
            path: path.to_string(),
            reason: os_reason(&e),
        })?;
        self.parse_text(path, &String::from_utf8_lossy(&text), false)
    }

    fn push_shell(&mut self) {
        let old = std::mem::replace(&mut self.shell, default_shell());
        self.shell_stack.push(old);
        self.vars.set("MKSHELL", (*self.shell).clone());
    }

    fn pop_shell(&mut self) {
        if let Some(s) = self.shell_stack.pop() {
            self.shell = s;
        }
        self.vars.set("MKSHELL", (*self.shell).clone());
    }

    /// Parses `text` as a mkfile named `name`. `varoverride` marks
    /// command-line assignments.
    pub fn parse_text(
        &mut self,
        name: &str,
        text: &str,
        varoverride: bool,
    ) -> Result<(), ParseError> {
        self.push_shell();
        let r = self.parse_inner(name, text, varoverride);
        self.pop_shell();
        r
    }

    fn parse_inner(&mut self, name: &str, text: &str, varoverride: bool) -> Result<(), ParseError> {
        let file: Rc<str> = Rc::from(name);
        let mut lx = Lexer::new(name, text);
        loop {
            let line = {
                let this = &*self;
                let mut run = |cmd: &str| -> Result<String, ParseError> {
                    if this.commands == Commands::Skip {
                        return Ok(String::new());
                    }
                    proc::backquote(&this.shell, cmd, &this.child_env()).map_err(|e| {
                        ParseError::Spawn {
                            shell: this.shell.join(" "),
                            reason: os_reason(&e),
                        }
                    })
                };
                lx.assline(&mut run)?
            };
            let Some(line) = line else { break };
            let hline = lx.line;
            match self.rhead(&line, name, &lx)? {
                Head::Include(tail) => {
                    let p = tail.join(" ");
                    if p.is_empty() {
                        return Err(syntax(name, lx.line, "missing include file name"));
                    }
                    let read = match &self.includes {
                        Some(Includes(resolve)) => {
                            resolve(&p).ok_or_else(|| "No such file or directory".to_string())
                        }
                        None => std::fs::read(&p)
                            .map(|t| String::from_utf8_lossy(&t).into_owned())
                            .map_err(|e| os_reason(&e)),
                    };
                    match read {
                        Err(reason) => self.warnings.push(format!(
                            "warning: skipping missing include file {p}: {reason}"
                        )),
                        Ok(t) => self.parse_text(&p, &t, false)?,
                    }
                }
                Head::Pipe(tail) => {
                    let p = tail.join(" ");
                    if p.is_empty() {
                        return Err(syntax(name, lx.line, "missing include program name"));
                    }
                    if self.commands == Commands::Skip {
                        self.warnings
                            .push(format!("warning: not running include program {p}"));
                        continue;
                    }
                    let env = self.child_env();
                    let (out, ok) = proc::pipe_output(&self.shell, &p, &env).map_err(|e| {
                        ParseError::Spawn {
                            shell: self.shell.join(" "),
                            reason: os_reason(&e),
                        }
                    })?;
                    self.parse_text(&p, &out, false)?;
                    if !ok {
                        return Err(ParseError::IncludeStatus);
                    }
                }
                Head::Rule {
                    head,
                    tail,
                    attr,
                    prog,
                } => {
                    let body = lx.rbody();
                    self.addrules(
                        head,
                        tail,
                        Rc::from(body.as_str()),
                        attr,
                        hline,
                        &file,
                        prog,
                    )?;
                }
                Head::Assign {
                    head,
                    tail,
                    noexport,
                } => {
                    if head.len() > 1 {
                        return Err(syntax(
                            name,
                            lx.line,
                            "multiple vars on left side of assignment",
                        ));
                    }
                    let var = &head[0];
                    let set = if self.vars.get(var).is_some_and(|v| v.overridden) {
                        varoverride
                    } else {
                        if varoverride {
                            self.vars.entry(var).overridden = true;
                        }
                        true
                    };
                    if set {
                        let is_shell = var == "MKSHELL";
                        if is_shell {
                            self.shell = Rc::new(tail.clone());
                        }
                        let v = self.vars.entry(var);
                        v.value = tail;
                        v.weset = true;
                    }
                    if noexport {
                        self.vars.entry(var).noexport = true;
                    }
                }
            }
        }
        Ok(())
    }

    fn rhead(&mut self, line: &str, name: &str, lx: &Lexer) -> Result<Head, ParseError> {
        let Some(p) = charin(line, ":=<") else {
            return Err(syntax(name, lx.line, "expected one of :<="));
        };
        let mut sep = line.as_bytes()[p];
        let mut rest = &line[p + 1..];
        if sep == b'<' && rest.starts_with('|') {
            sep = b'|';
            rest = &rest[1..];
        }
        let mut attrs = 0u16;
        let mut noexport = false;
        let mut prog = None;
        if sep == b'='
            && let Some(pp) = charin(rest, "\"'= \t")
            && rest.as_bytes()[pp] == b'='
        {
            for c in rest[..pp].chars() {
                if c != 'U' {
                    return Err(syntax(name, lx.line, &format!("unknown attribute '{c}'")));
                }
                noexport = true;
            }
            rest = &rest[pp + 1..];
        }
        if sep == b':' && !rest.is_empty() && !rest.starts_with([' ', '\t']) {
            let mut end = None;
            for (i, c) in rest.char_indices() {
                match c {
                    ':' => {
                        end = Some(i);
                        break;
                    }
                    'D' => attrs |= attr::DEL,
                    'E' => attrs |= attr::NOMINUSE,
                    'n' => attrs |= attr::NOVIRT,
                    'N' => attrs |= attr::NOREC,
                    'Q' => attrs |= attr::QUIET,
                    'R' => attrs |= attr::REGEXP,
                    'U' => attrs |= attr::UPD,
                    'V' => attrs |= attr::VIR,
                    'P' => {
                        let from = i + 1;
                        let Some(j) = rest[from..].find(':') else {
                            return Err(syntax(name, lx.line, "missing trailing :"));
                        };
                        prog = Some(rest[from..from + j].to_string());
                        end = Some(from + j);
                        break;
                    }
                    _ => return Err(syntax(name, lx.line, &format!("unknown attribute '{c}'"))),
                }
            }
            let Some(end) = end else {
                return Err(syntax(name, lx.line, "missing trailing :"));
            };
            rest = &rest[end + 1..];
        }
        let mut warnings = Vec::new();
        let mut ctx = Ctx {
            vars: &self.vars,
            file: name,
            line: lx.line,
            warnings: &mut warnings,
        };
        let head = stow(&mut ctx, &line[..p])?;
        if head[0].is_empty() && sep != b'<' && sep != b'|' {
            return Err(syntax(
                name,
                lx.line - 1,
                "no var on left side of assignment/rule",
            ));
        }
        let tail = stow(&mut ctx, rest)?;
        self.warnings.extend(warnings);
        Ok(match sep {
            b'<' => Head::Include(tail),
            b'|' => Head::Pipe(tail),
            b':' => Head::Rule {
                head,
                tail,
                attr: attrs,
                prog,
            },
            _ => Head::Assign {
                head,
                tail,
                noexport,
            },
        })
    }

    /// Adds the rules of one rule line (one per target word).
    #[expect(clippy::too_many_arguments, reason = "mirrors one rule line's parts")]
    pub(crate) fn addrules(
        &mut self,
        head: Vec<String>,
        tail: Vec<String>,
        body: Rc<str>,
        attrs: u16,
        hline: usize,
        file: &Rc<str>,
        prog: Option<String>,
    ) -> Result<(), ParseError> {
        if self.target1.is_none()
            && attrs & attr::REGEXP == 0
            && !head.iter().any(|w| charin(w, "%&").is_some())
        {
            self.target1 = Some(head.clone());
        }
        let all = Rc::new(head);
        for w in all.iter() {
            self.addrule(w, &tail, &body, &all, attrs, hline, file, prog.clone())?;
        }
        Ok(())
    }

    #[expect(clippy::too_many_arguments, reason = "mirrors one rule line's parts")]
    fn addrule(
        &mut self,
        target: &str,
        tail: &[String],
        body: &Rc<str>,
        all: &Rc<Vec<String>>,
        attrs: u16,
        hline: usize,
        file: &Rc<str>,
        prog: Option<String>,
    ) -> Result<(), ParseError> {
        let meta = attrs & attr::REGEXP != 0 || charin(target, "%&").is_some();
        let existing = self
            .by_target
            .get(target)
            .and_then(|list| list.iter().copied().find(|&i| self.rules[i].tail == tail));
        let mut rule = Rule {
            target: target.to_string(),
            tail: tail.to_vec(),
            recipe: Rc::clone(body),
            attr: attrs | if meta { attr::META } else { 0 },
            line: hline,
            file: Rc::clone(file),
            alltargets: Rc::clone(all),
            pat: None,
            prog,
            shell: Rc::clone(&self.shell),
        };
        if let Some(i) = existing {
            rule.pat = self.rules[i].pat.take();
            self.rules[i] = rule;
            return Ok(());
        }
        if attrs & attr::REGEXP != 0 {
            let re = crate::regexp::compile(target).map_err(|msg| ParseError::Regex {
                file: file.to_string(),
                line: hline,
                msg,
            })?;
            rule.pat = Some(re);
        }
        let idx = self.rules.len();
        self.rules.push(rule);
        let list = self.by_target.entry(target.to_string()).or_default();
        if list.is_empty() && !meta {
            self.explicit.push(target.to_string());
        }
        list.push(idx);
        if meta {
            self.metarules.push(idx);
        }
        Ok(())
    }

    /// Whether commands may run (backquotes, `<|`, `P` comparisons).
    pub(crate) fn commands(&self) -> Commands {
        self.commands
    }

    /// The explicit (non-meta) targets, in the order first defined.
    pub fn targets(&self) -> &[String] {
        &self.explicit
    }

    /// The targets mk builds when given none: those of the first
    /// non-meta rule.
    pub fn default_targets(&self) -> Option<&[String]> {
        self.target1.as_deref()
    }

    /// The words of variable `name`, if it is set.
    pub fn variable(&self, name: &str) -> Option<&[String]> {
        self.vars.get(name).map(|v| v.value.as_slice())
    }

    /// Sets a variable as mk itself does (`MKFLAGS`, `MKARGS`): exported,
    /// not marked as set by the mkfile.
    pub fn set_variable(&mut self, name: &str, value: Vec<String>) {
        self.vars.set(name, value);
    }

    /// Rule indices for `target`, in the order 9base chains them: the
    /// first rule defined, then the others from the last to the second.
    pub(crate) fn chain(&self, target: &str) -> Vec<usize> {
        match self.by_target.get(target) {
            None => Vec::new(),
            Some(list) => {
                let mut v = Vec::with_capacity(list.len());
                if let Some(&first) = list.first() {
                    v.push(first);
                }
                v.extend(list.iter().skip(1).rev());
                v
            }
        }
    }
}

fn syntax(file: &str, line: usize, msg: &str) -> ParseError {
    ParseError::Syntax {
        file: file.to_string(),
        line,
        msg: msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Mkfile, ParseError> {
        let mut m = Mkfile::new(Vec::<(String, String)>::new(), Commands::Skip);
        m.parse_text("mkfile", text, false)?;
        Ok(m)
    }

    #[test]
    fn assignments_table() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("X=a b\n", "X", &["a", "b"]),
            ("X=\n", "X", &[""]),
            ("X=1\nY=$X$X\n", "Y", &["11"]),
            ("X=U=hidden\n", "X", &["hidden"]),
            ("X = spaced\n", "X", &["spaced"]),
            ("X='a=b'\n", "X", &["a=b"]),
            ("X=a\\\n  b\n", "X", &["a", "b"]),
            ("S=x.c y.c\nO=${S:%.c=%.o}\n", "O", &["x.o", "y.o"]),
        ];
        for (text, var, want) in cases {
            let m = parse(text).expect("parses");
            assert_eq!(m.variable(var).expect("set"), *want, "{text:?}");
        }
    }

    #[test]
    fn noexport_attribute() {
        let m = parse("X=U=1\nY=2\n").expect("parses");
        let exported: Vec<_> = m.vars.exported().map(|(k, _)| k.to_string()).collect();
        assert!(exported.contains(&"Y".to_string()));
        assert!(!exported.contains(&"X".to_string()));
    }

    #[test]
    fn rules_and_attributes() {
        let m = parse("all:V: a b\n\techo $prereq\n%.o:Q: %.c\n\tcc $stem.c\nx y:DE:\n\ttrue\n")
            .expect("parses");
        assert_eq!(m.default_targets().expect("default"), ["all"]);
        assert_eq!(m.targets(), ["all", "x", "y"]);
        let all = &m.rules[m.chain("all")[0]];
        assert_eq!(all.tail, ["a", "b"]);
        assert_eq!(&*all.recipe, "echo $prereq\n");
        assert_ne!(all.attr & attr::VIR, 0);
        assert_eq!(m.metarules.len(), 1);
        let x = &m.rules[m.chain("x")[0]];
        let y = &m.rules[m.chain("y")[0]];
        assert!(Rc::ptr_eq(&x.recipe, &y.recipe));
        assert_eq!(
            x.attr & (attr::DEL | attr::NOMINUSE),
            attr::DEL | attr::NOMINUSE
        );
    }

    #[test]
    fn p_attribute_takes_a_program() {
        let m = parse("x:Pcmp -s: y\n\tcp y x\n").expect("parses");
        assert_eq!(m.rules[0].prog.as_deref(), Some("cmp -s"));
        assert_eq!(m.rules[0].tail, ["y"]);
    }

    #[test]
    fn same_target_and_prereqs_override() {
        let m = parse("a: b\n\tone\na: b\n\ttwo\n").expect("parses");
        assert_eq!(m.rules.len(), 1);
        assert_eq!(&*m.rules[0].recipe, "two\n");
    }

    #[test]
    fn errors_table() {
        let cases: &[(&str, &str)] = &[
            ("a b\n", "mkfile:2: syntax error; expected one of :<="),
            ("a:b\n", "mkfile:2: syntax error; unknown attribute 'b'"),
            ("X=a=b\n", "mkfile:2: syntax error; unknown attribute 'a'"),
            ("a:V\n", "mkfile:2: syntax error; missing trailing :"),
            (
                ": b\n",
                "mkfile:1: syntax error; no var on left side of assignment/rule",
            ),
            (
                "a b=c\n",
                "mkfile:2: syntax error; multiple vars on left side of assignment",
            ),
            ("<\n", "mkfile:2: syntax error; missing include file name"),
            ("X='a\n", "mkfile:1: syntax error; missing closing '"),
        ];
        for (text, want) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.to_string(), *want, "{text:?}");
        }
    }

    #[test]
    fn command_line_assignment_overrides_every_mkfile_assignment() {
        let mut m = Mkfile::new(Vec::<(String, String)>::new(), Commands::Skip);
        m.assign_command_line(&["A=5".to_string()])
            .expect("assigns");
        m.parse_text("mkfile", "A=1\nA=2\n", false).expect("parses");
        assert_eq!(m.variable("A").expect("set"), ["5"]);
    }

    #[test]
    fn missing_include_warns() {
        let mut m = parse("</nonexistent/file\nx:V:\n\ttrue\n").expect("parses");
        let w = m.take_warnings();
        assert_eq!(
            w,
            ["warning: skipping missing include file /nonexistent/file: No such file or directory"]
        );
    }

    #[test]
    fn mkshell_is_per_file() {
        let m = parse("MKSHELL=bash\nx:V:\n\ttrue\n").expect("parses");
        assert_eq!(*m.rules[0].shell, ["bash"]);
        assert_eq!(m.variable("MKSHELL").expect("set"), ["sh"]);
    }
}
