//! The evaluator: builds the dependency graph for a target, decides what
//! is out of date, and runs recipes (up to `$NPROC` at once).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{RunError, os_reason};
use crate::parse::{Mkfile, attr};
use crate::proc;
use crate::regexp::{self, Matches};
use crate::vars::is_internal;
use crate::word::{charin, is_wordchr};

mod flag {
    pub const VIRTUAL: u16 = 0x0001;
    pub const CYCLE: u16 = 0x0002;
    pub const READY: u16 = 0x0004;
    pub const CANPRETEND: u16 = 0x0008;
    pub const PRETENDING: u16 = 0x0010;
    pub const NOTMADE: u16 = 0x0020;
    pub const BEINGMADE: u16 = 0x0040;
    pub const MADE: u16 = 0x0080;
    pub const PROBABLE: u16 = 0x0100;
    pub const VACUOUS: u16 = 0x0200;
    pub const NORECIPE: u16 = 0x0400;
    pub const DELETE: u16 = 0x0800;
}
use flag::*;

/// The command-line switches that change how targets are made.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-a`: assume every target out of date.
    pub all: bool,
    /// `-e`: explain why each target is made.
    pub explain: bool,
    /// `-i`: make missing intermediates.
    pub intermediates: bool,
    /// `-k`: keep going after errors.
    pub keep_going: bool,
    /// `-n`: print recipes, run nothing.
    pub dry_run: bool,
    /// `-t`: touch targets instead of running recipes.
    pub touch: bool,
    /// `-q` (an extension; 9base has no such flag): run and print
    /// nothing, only tell by the result whether anything is out of date.
    pub question: bool,
    /// `-w`: names whose date is taken to be now.
    pub whatif: Vec<String>,
}

#[derive(Debug, Clone)]
struct Arc {
    n: Option<usize>,
    r: usize,
    stem: Rc<str>,
    matches: Rc<Matches>,
    togo: bool,
}

#[derive(Debug)]
struct Node {
    name: String,
    time: i64,
    flags: u16,
    prereqs: Vec<Arc>,
}

#[derive(Debug)]
struct Job {
    r: usize,
    nodes: Vec<usize>,
    stem: Rc<str>,
    matches: Rc<Matches>,
    prereq: Vec<String>,
    newprereq: Vec<String>,
    target: Vec<String>,
    alltarget: Vec<String>,
}

#[derive(Debug, Default)]
struct Slot {
    pid: i32,
    job: Option<Job>,
}

/// Makes targets of one mkfile. Nodes persist between [`Evaluator::mk`]
/// calls, as in mk.
#[derive(Debug)]
pub struct Evaluator<W: Write> {
    mk: Mkfile,
    opts: Options,
    out: W,
    nodes: Vec<Node>,
    by_name: HashMap<String, usize>,
    times: HashMap<String, i64>,
    ood: HashMap<(usize, usize), bool>,
    jobs: VecDeque<Job>,
    slots: Vec<Slot>,
    nrunning: usize,
    nproclimit: usize,
    nreps: usize,
    runerrs: usize,
    /// Exported variables (name, value joined by blanks).
    env: Vec<(String, String)>,
    /// Variables a printed recipe shows expanded: set by the mkfile and exported.
    shown: HashMap<String, String>,
    would_run: bool,
    direct: Option<Direct>,
}

/// The unbuffered standard output some `-e` messages go to.
struct Direct(Box<dyn Write>);

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Direct")
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The modification time of `name` in seconds, or 0 if it does not exist.
pub fn mtime(name: &str) -> i64 {
    let Ok(md) = std::fs::metadata(name) else {
        return 0;
    };
    match md.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        },
        Err(_) => 0,
    }
}

/// `%`/`&` meta-rule matching: the stem if `name` matches `template`.
pub fn meta_match(name: &str, template: &str) -> Option<String> {
    let pi = template.find(['%', '&'])?;
    let (prefix, suffix) = (&template[..pi], &template[pi + 1..]);
    let rest = name.strip_prefix(prefix)?;
    let n = rest.len().checked_sub(suffix.len())?;
    if !rest.is_char_boundary(n) || &rest[n..] != suffix {
        return None;
    }
    let stem = &rest[..n];
    if template.as_bytes()[pi] == b'&' && charin(stem, "./").is_some() {
        return None;
    }
    Some(stem.to_string())
}

/// Replaces every `%` and `&` of `template` with `stem`.
pub fn subst(stem: &str, template: &str) -> String {
    template.replace(['%', '&'], stem)
}

/// 9base's recipe echo: `$name` and `${name}` are replaced when `lookup`
/// knows them; quoted strings are copied as they are.
pub fn shprint(recipe: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(recipe.len());
    let mut it = recipe.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if c == '$' {
            let rest = &recipe[i + 1..];
            let (name, consumed) = if let Some(r) = rest.strip_prefix('{') {
                match r.find('}') {
                    Some(j) => (&r[..j], j + 2),
                    None => (r, r.len() + 1),
                }
            } else {
                let n: usize = rest
                    .chars()
                    .take_while(|&c| is_wordchr(c))
                    .map(char::len_utf8)
                    .sum();
                (&rest[..n], n)
            };
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => out.push_str(&recipe[i..i + 1 + consumed]),
            }
            while it.peek().is_some_and(|&(j, _)| j < i + 1 + consumed) {
                it.next();
            }
            continue;
        }
        out.push(c);
        match c {
            '\'' | '"' => {
                for (_, d) in it.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '`' => {
                while let Some((_, d)) = it.next() {
                    out.push(d);
                    if d == '`' {
                        break;
                    }
                    if d == '\'' || d == '"' {
                        for (_, e) in it.by_ref() {
                            out.push(e);
                            if e == d {
                                break;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The short form of a recipe in failure messages: at most five fields
/// (`a b c ... last`), each followed by a blank.
pub fn front(s: &str) -> String {
    let mut f: Vec<&str> = s.split([' ', '\t', '\n']).collect();
    if f.len() > 5 {
        let last = f[f.len() - 1];
        f.truncate(3);
        f.push("...");
        f.push(last);
    }
    let mut out = String::new();
    for x in f {
        out.push_str(x);
        out.push(' ');
    }
    out
}

fn addw(list: &mut Vec<String>, s: &str) {
    if !list.iter().any(|w| w == s) {
        list.push(s.to_string());
    }
}

impl<W: Write> Evaluator<W> {
    /// An evaluator for `mk`, writing what mk prints on standard output to
    /// `out`. The environment of recipes is fixed here, after parsing.
    pub fn new(mk: Mkfile, opts: Options, out: W) -> Self {
        let mut env = Vec::new();
        let mut shown = HashMap::new();
        for (k, v) in mk.vars.exported() {
            let joined = v.join(" ");
            if mk.vars.get(k).is_some_and(|x| x.weset) {
                shown.insert(k.to_string(), joined.clone());
            }
            env.push((k.to_string(), joined));
        }
        env.sort();
        let mut times = HashMap::new();
        let t = now();
        for w in &opts.whatif {
            for name in w.split([' ', ',', '\n']).filter(|s| !s.is_empty()) {
                times.insert(name.to_string(), t);
            }
        }
        Self {
            mk,
            opts,
            out,
            nodes: Vec::new(),
            by_name: HashMap::new(),
            times,
            ood: HashMap::new(),
            jobs: VecDeque::new(),
            slots: Vec::new(),
            nrunning: 0,
            nproclimit: 1,
            nreps: 1,
            runerrs: 0,
            env,
            shown,
            would_run: false,
            direct: None,
        }
    }

    /// Sends the explanations 9base prints unbuffered (`-e`) to `w`
    /// directly, so they appear where 9base's do relative to the buffered
    /// recipe echoes. Without it everything goes to the main output.
    pub fn with_unbuffered(mut self, w: impl Write + 'static) -> Self {
        self.direct = Some(Direct(Box::new(w)));
        self
    }

    /// Whether `-q` found something out of date.
    pub fn would_run(&self) -> bool {
        self.would_run
    }

    /// The mkfile.
    pub fn mkfile(&self) -> &Mkfile {
        &self.mk
    }

    /// Gives back the output writer.
    pub fn into_output(self) -> W {
        self.out
    }

    /// Adds the virtual rule mk uses for several command-line targets and
    /// returns its name.
    pub fn add_command_line_rule(&mut self, targets: &[String]) -> String {
        let name = "command line arguments".to_string();
        let file: Rc<str> = Rc::from("command line args");
        // A rule without recipe or regular expression cannot fail to add.
        let _ = self.mk.addrules(
            vec![name.clone()],
            targets.to_vec(),
            Rc::from(""),
            attr::VIR,
            1,
            &file,
            None,
        );
        name
    }

    fn var_int(&self, name: &str) -> Option<usize> {
        let w = self.mk.vars.words(name).first()?;
        if w.is_empty() {
            return None;
        }
        let digits: String = w
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        Some(digits.parse().unwrap_or(0))
    }

    /// Makes `target` as mk does: builds the graph, runs what is out of
    /// date, prints `mk: 'x' is up to date` if there was nothing to do.
    pub fn mk(&mut self, target: &str) -> Result<(), RunError> {
        let r = self.mk_inner(target);
        if r.is_err() {
            self.reap_all();
        }
        let _ = self.out.flush();
        r
    }

    /// Waits for the recipes still running, and only for them: a process
    /// that runs mk as a library has children of its own (its tests run in
    /// threads of one process, and a reaper of any child there took a
    /// backquote's shell from under its `wait`).
    fn reap_all(&mut self) {
        let _ = self.out.flush();
        for slot in &mut self.slots {
            if slot.pid > 0 {
                proc::wait_for(slot.pid);
                slot.pid = -1;
                slot.job = None;
            }
        }
        self.nrunning = 0;
    }

    fn mk_inner(&mut self, target: &str) -> Result<(), RunError> {
        if let Some(n) = self.var_int("NPROC") {
            self.nproclimit = n;
        }
        self.nproclimit = self.nproclimit.max(1);
        while self.slots.len() < self.nproclimit {
            self.slots.push(Slot::default());
        }
        if let Some(n) = self.var_int("NREP") {
            self.nreps = n;
        }
        self.nreps = self.nreps.max(1);
        self.runerrs = 0;
        let node = self.graph(target)?;
        let mut seen = HashSet::new();
        self.clrmade(node, &mut seen);
        let mut did = false;
        while self.nodes[node].flags & NOTMADE != 0 {
            if self.work(node, None)? {
                did = true;
            } else if self.waitup(1)? > 0 && self.nodes[node].flags & (NOTMADE | BEINGMADE) != 0 {
                break;
            }
        }
        if self.nodes[node].flags & BEINGMADE != 0 {
            self.waitup(-1)?;
        }
        while !self.jobs.is_empty() {
            self.waitup(-2)?;
        }
        if !did && !self.opts.question {
            let _ = writeln!(self.out, "mk: '{}' is up to date", self.nodes[node].name);
        }
        Ok(())
    }

    // ---- graph -------------------------------------------------------

    fn timeof(&mut self, name: &str, force: bool) -> i64 {
        if force {
            return mtime(name);
        }
        if let Some(&t) = self.times.get(name) {
            return t;
        }
        let t = mtime(name);
        if t != 0 {
            self.times.insert(name.to_string(), t);
        }
        t
    }

    fn newnode(&mut self, name: &str) -> usize {
        let time = self.timeof(name, false);
        let idx = self.nodes.len();
        self.nodes.push(Node {
            name: name.to_string(),
            time,
            flags: if time != 0 { PROBABLE } else { 0 },
            prereqs: Vec::new(),
        });
        self.by_name.insert(name.to_string(), idx);
        idx
    }

    fn graph(&mut self, target: &str) -> Result<usize, RunError> {
        let mut cnt = vec![0usize; self.mk.rules.len()];
        let node = self.applyrules(target, &mut cnt);
        let mut done = HashSet::new();
        self.cyclechk(node, &mut done)?;
        self.nodes[node].flags |= PROBABLE;
        self.vacuous(node);
        let mut seen = HashSet::new();
        self.ambiguous(node, &mut seen)?;
        let mut seen = HashSet::new();
        self.attribute(node, &mut seen);
        Ok(node)
    }

    fn applyrules(&mut self, target: &str, cnt: &mut [usize]) -> usize {
        if let Some(&n) = self.by_name.get(target) {
            return n;
        }
        let node = self.newnode(target);
        let mut arcs: Vec<Arc> = Vec::new();
        let nomatch = Rc::new(Matches::default());
        let empty: Rc<str> = Rc::from("");
        for ri in self.mk.chain(target) {
            let r = &self.mk.rules[ri];
            if r.is_meta() || r.no_effect() || cnt[ri] >= self.nreps {
                continue;
            }
            cnt[ri] += 1;
            self.nodes[node].flags |= PROBABLE;
            let tail = r.tail.clone();
            if tail.first().is_none_or(|w| w.is_empty()) {
                arcs.push(Arc {
                    n: None,
                    r: ri,
                    stem: Rc::clone(&empty),
                    matches: Rc::clone(&nomatch),
                    togo: false,
                });
            } else {
                for w in &tail {
                    let n = self.applyrules(w, cnt);
                    arcs.push(Arc {
                        n: Some(n),
                        r: ri,
                        stem: Rc::clone(&empty),
                        matches: Rc::clone(&nomatch),
                        togo: false,
                    });
                }
            }
            cnt[ri] -= 1;
        }
        let metarules = self.mk.metarules.clone();
        for ri in metarules {
            let r = &self.mk.rules[ri];
            if r.no_effect() {
                continue;
            }
            if r.attr & attr::NOVIRT != 0
                && arcs
                    .last()
                    .is_some_and(|a| self.mk.rules[a.r].attr & attr::VIR != 0)
            {
                continue;
            }
            let (stem, matches) = if r.attr & attr::REGEXP != 0 {
                let Some(re) = r.pat.as_ref() else { continue };
                match regexp::exec(re, target) {
                    Some(m) => (String::new(), m),
                    None => continue,
                }
            } else {
                match meta_match(target, &r.target) {
                    Some(s) => (s, Matches::default()),
                    None => continue,
                }
            };
            if cnt[ri] >= self.nreps {
                continue;
            }
            cnt[ri] += 1;
            let stem: Rc<str> = Rc::from(stem.as_str());
            let matches = Rc::new(matches);
            let regex = r.attr & attr::REGEXP != 0;
            let tail = r.tail.clone();
            if tail.first().is_none_or(|w| w.is_empty()) {
                arcs.push(Arc {
                    n: None,
                    r: ri,
                    stem: Rc::clone(&stem),
                    matches: Rc::clone(&matches),
                    togo: false,
                });
            } else {
                for w in &tail {
                    let name = if regex {
                        regexp::regsub(w, &matches)
                    } else {
                        subst(&stem, w)
                    };
                    let n = self.applyrules(&name, cnt);
                    arcs.push(Arc {
                        n: Some(n),
                        r: ri,
                        stem: Rc::clone(&stem),
                        matches: Rc::clone(&matches),
                        togo: false,
                    });
                }
            }
            cnt[ri] -= 1;
        }
        let old = std::mem::take(&mut self.nodes[node].prereqs);
        arcs.extend(old);
        self.nodes[node].prereqs = arcs;
        node
    }

    fn cyclechk(&mut self, n: usize, done: &mut HashSet<usize>) -> Result<(), RunError> {
        if self.nodes[n].flags & CYCLE != 0 && !self.nodes[n].prereqs.is_empty() {
            return Err(RunError::Cycle(self.nodes[n].name.clone()));
        }
        if done.contains(&n) {
            return Ok(());
        }
        self.nodes[n].flags |= CYCLE;
        for i in 0..self.nodes[n].prereqs.len() {
            if let Some(p) = self.nodes[n].prereqs[i].n {
                self.cyclechk(p, done)?;
            }
        }
        self.nodes[n].flags &= !CYCLE;
        done.insert(n);
        Ok(())
    }

    fn togo(&mut self, n: usize) {
        self.nodes[n].prereqs.retain(|a| !a.togo);
    }

    fn vacuous(&mut self, n: usize) -> bool {
        let mut vac = self.nodes[n].flags & PROBABLE == 0;
        if self.nodes[n].flags & READY != 0 {
            return self.nodes[n].flags & VACUOUS != 0;
        }
        self.nodes[n].flags |= READY;
        for i in 0..self.nodes[n].prereqs.len() {
            let a = &self.nodes[n].prereqs[i];
            let (child, meta) = (a.n, self.mk.rules[a.r].is_meta());
            let gone = match child {
                Some(c) => self.vacuous(c) && meta,
                None => false,
            };
            if gone {
                self.nodes[n].prereqs[i].togo = true;
            } else {
                vac = false;
            }
        }
        // If a rule generated arcs that do not go, none of its arcs go.
        let keep: HashSet<usize> = self.nodes[n]
            .prereqs
            .iter()
            .filter(|a| !a.togo)
            .map(|a| a.r)
            .collect();
        for a in &mut self.nodes[n].prereqs {
            if a.togo && keep.contains(&a.r) {
                a.togo = false;
            }
        }
        self.togo(n);
        if vac {
            self.nodes[n].flags |= VACUOUS;
        }
        vac
    }

    fn trace(&self, name: &str, n: usize, ai: usize) -> String {
        let mut s = format!("\t{name}");
        let mut cur = Some((n, ai));
        let mut steps = 0;
        while let Some((node, i)) = cur {
            let a = &self.nodes[node].prereqs[i];
            let r = &self.mk.rules[a.r];
            let child = a.n.map(|c| self.nodes[c].name.as_str()).unwrap_or("");
            s.push_str(&format!(" <-({}:{})- {}", r.file, r.line, child));
            steps += 1;
            cur = a.n.and_then(|c| {
                self.nodes[c]
                    .prereqs
                    .iter()
                    .position(|x| !self.mk.rules[x.r].recipe.is_empty())
                    .map(|p| (c, p))
            });
            if steps > self.nodes.len() {
                break;
            }
        }
        s
    }

    fn ambiguous(&mut self, n: usize, seen: &mut HashSet<usize>) -> Result<(), RunError> {
        if !seen.insert(n) {
            return Ok(());
        }
        let mut r: Option<usize> = None;
        let mut la = 0;
        let mut bad: Vec<String> = Vec::new();
        for i in 0..self.nodes[n].prereqs.len() {
            if let Some(c) = self.nodes[n].prereqs[i].n {
                self.ambiguous(c, seen)?;
            }
            let ar = self.nodes[n].prereqs[i].r;
            if self.mk.rules[ar].recipe.is_empty() {
                continue;
            }
            let Some(cur) = r else {
                r = Some(ar);
                la = i;
                continue;
            };
            let mut cur = cur;
            let same = |a: usize, b: usize, mk: &Mkfile| {
                Rc::ptr_eq(&mk.rules[a].recipe, &mk.rules[b].recipe)
            };
            if !same(cur, ar, &self.mk) {
                let (m1, m2) = (self.mk.rules[cur].is_meta(), self.mk.rules[ar].is_meta());
                if m1 && !m2 {
                    self.nodes[n].prereqs[la].togo = true;
                    cur = ar;
                    la = i;
                    r = Some(cur);
                } else if !m1 && m2 {
                    self.nodes[n].prereqs[i].togo = true;
                    continue;
                }
            }
            if !same(cur, ar, &self.mk) {
                let name = self.nodes[n].name.clone();
                if bad.is_empty() {
                    bad.push(self.trace(&name, n, la));
                }
                bad.push(self.trace(&name, n, i));
            }
        }
        if !bad.is_empty() {
            return Err(RunError::Ambiguous {
                target: self.nodes[n].name.clone(),
                trace: bad.join("\n"),
            });
        }
        self.togo(n);
        Ok(())
    }

    fn attribute(&mut self, n: usize, seen: &mut HashSet<usize>) {
        if !seen.insert(n) {
            return;
        }
        for i in 0..self.nodes[n].prereqs.len() {
            let a = &self.nodes[n].prereqs[i];
            let (ra, child) = (self.mk.rules[a.r].attr, a.n);
            if ra & attr::VIR != 0 {
                self.nodes[n].flags |= VIRTUAL;
            }
            if ra & attr::NOREC != 0 {
                self.nodes[n].flags |= NORECIPE;
            }
            if ra & attr::DEL != 0 {
                self.nodes[n].flags |= DELETE;
            }
            if let Some(c) = child {
                self.attribute(c, seen);
            }
        }
        if self.nodes[n].flags & VIRTUAL != 0 {
            self.nodes[n].time = 0;
        }
    }

    fn clrmade(&mut self, n: usize, seen: &mut HashSet<usize>) {
        if !seen.insert(n) {
            return;
        }
        let node = &mut self.nodes[n];
        node.flags &= !(CANPRETEND | PRETENDING);
        if !node.name.contains('(') || node.time != 0 {
            node.flags |= CANPRETEND;
        }
        node.flags = (node.flags & !(NOTMADE | BEINGMADE | MADE)) | NOTMADE;
        for i in 0..self.nodes[n].prereqs.len() {
            if let Some(c) = self.nodes[n].prereqs[i].n {
                self.clrmade(c, seen);
            }
        }
    }

    // ---- deciding ----------------------------------------------------

    fn madeset(&mut self, n: usize, m: u16) {
        let f = &mut self.nodes[n].flags;
        *f = (*f & !(NOTMADE | BEINGMADE | MADE)) | m;
    }

    fn unpretend(&mut self, n: usize) {
        self.madeset(n, NOTMADE);
        self.nodes[n].flags &= !(CANPRETEND | PRETENDING);
        self.nodes[n].time = 0;
    }

    /// Whether `node` is out of date with respect to the prerequisite of
    /// arc `ai` of node `owner`.
    fn outofdate(&mut self, node: usize, owner: usize, ai: usize, eval: bool) -> bool {
        let a = &self.nodes[owner].prereqs[ai];
        let Some(p) = a.n else { return false };
        let rule = &self.mk.rules[a.r];
        if let Some(prog) = rule.prog.clone() {
            let key = (node, p);
            if !eval && let Some(&v) = self.ood.get(&key) {
                return v;
            }
            let shell = Rc::clone(&rule.shell);
            let _ = self.out.flush();
            // Without commands (a check on the host), every P prerequisite counts as newer.
            let up_to_date = self.mk.commands() == crate::parse::Commands::Run
                && proc::compare(&shell, &prog, &self.nodes[node].name, &self.nodes[p].name)
                    .unwrap_or(false);
            self.ood.insert(key, !up_to_date);
            return !up_to_date;
        }
        if self.nodes[p].name.contains('(') && self.nodes[p].time == 0 {
            return true;
        }
        self.nodes[node].time <= self.nodes[p].time
    }

    /// An explanation (`-e`) written through the buffered output.
    fn explain(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.opts.explain {
            let _ = self.out.write_fmt(msg);
        }
    }

    /// An explanation 9base writes unbuffered, ahead of recipe echoes
    /// still in the buffer.
    fn explain_now(&mut self, msg: std::fmt::Arguments<'_>) {
        if !self.opts.explain {
            return;
        }
        match self.direct.as_mut() {
            Some(d) => {
                let _ = d.0.write_fmt(msg);
                let _ = d.0.flush();
            }
            None => {
                let _ = self.out.write_fmt(msg);
            }
        }
    }

    fn work(&mut self, node: usize, p: Option<(usize, usize)>) -> Result<bool, RunError> {
        let mut did = false;
        if self.nodes[node].flags & BEINGMADE != 0 {
            return Ok(did);
        }
        if self.nodes[node].flags & MADE != 0
            && self.nodes[node].flags & PRETENDING != 0
            && let Some((pn, pa)) = p
            && self.outofdate(pn, pn, pa, false)
        {
            let (nn, nt, pname, pt) = (
                self.nodes[node].name.clone(),
                self.nodes[node].time,
                self.nodes[pn].name.clone(),
                self.nodes[pn].time,
            );
            self.explain_now(format_args!(
                "unpretending {nn}({nt}) because {pname} is out of date({pt})\n"
            ));
            self.unpretend(node);
        }
        if self.nodes[node].flags & MADE != 0 {
            if self.nodes[node].flags & PRETENDING != 0 {
                self.nodes[node].time = 0;
            } else {
                return Ok(did);
            }
        }
        if self.nodes[node].prereqs.is_empty() {
            if self.nodes[node].time == 0 {
                let dir = std::env::current_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                let e = RunError::DontKnow {
                    target: self.nodes[node].name.clone(),
                    dir,
                };
                if self.opts.keep_going {
                    let _ = self.out.flush();
                    eprintln!("mk: {e}");
                    self.nodes[node].flags |= BEINGMADE;
                    self.runerrs += 1;
                } else {
                    return Err(e);
                }
            } else {
                self.madeset(node, MADE);
            }
            return Ok(did);
        }
        let mut ready = true;
        let mut weoutofdate = self.opts.all;
        let mut ra: Option<usize> = None;
        for ai in 0..self.nodes[node].prereqs.len() {
            match self.nodes[node].prereqs[ai].n {
                Some(c) => {
                    did = self.work(c, Some((node, ai)))? || did;
                    if self.nodes[c].flags & (NOTMADE | BEINGMADE) != 0 {
                        ready = false;
                    }
                    if self.outofdate(node, node, ai, false) {
                        weoutofdate = true;
                        let better = match ra.and_then(|r| self.nodes[node].prereqs[r].n) {
                            None => true,
                            Some(rn) => self.nodes[rn].time < self.nodes[c].time,
                        };
                        if better {
                            ra = Some(ai);
                        }
                    }
                }
                None => {
                    if self.nodes[node].time == 0 {
                        if ra.is_none() {
                            ra = Some(ai);
                        }
                        weoutofdate = true;
                    }
                }
            }
        }
        if !ready {
            return Ok(did);
        }
        if !weoutofdate {
            self.madeset(node, MADE);
            return Ok(did);
        }
        // Can we pretend to be made?
        if !self.opts.intermediates
            && self.nodes[node].time == 0
            && self.nodes[node].flags & (PRETENDING | CANPRETEND) != 0
            && let Some((pn, _)) = p
            && let Some(rai) = ra
            && self.nodes[node].prereqs[rai].n.is_some()
            && !self.outofdate(pn, node, rai, false)
        {
            self.nodes[node].flags &= !CANPRETEND;
            self.madeset(node, MADE);
            if self.nodes[node].flags & PRETENDING == 0 {
                let (nn, nt) = (self.nodes[node].name.clone(), self.nodes[node].time);
                self.explain_now(format_args!("pretending {nn} has time {nt}\n"));
            }
            self.nodes[node].flags |= PRETENDING;
            return Ok(did);
        }
        // Out of date and we really have to do something: rescan for pretenders.
        for ai in 0..self.nodes[node].prereqs.len() {
            if let Some(c) = self.nodes[node].prereqs[ai].n
                && self.nodes[c].flags & PRETENDING != 0
            {
                if self.opts.explain {
                    let why = ra
                        .and_then(|r| self.nodes[node].prereqs[r].n)
                        .map(|x| self.nodes[x].name.clone())
                        .unwrap_or_else(|| "rule with no prerequisites".to_string());
                    let (cn, nn) = (self.nodes[c].name.clone(), self.nodes[node].name.clone());
                    self.explain(format_args!(
                        "unpretending {cn} because of {nn} because of {why}\n"
                    ));
                }
                self.unpretend(c);
                did = self.work(c, Some((node, ai)))? || did;
                ready = false;
            }
        }
        if !ready {
            return Ok(did || self.work(node, p)?);
        }
        Ok(self.dorecipe(node)? || did)
    }

    fn touch(&mut self, name: &str) -> Result<(), RunError> {
        let _ = writeln!(self.out, "touch({name})");
        if self.opts.dry_run {
            return Ok(());
        }
        let r = if std::path::Path::new(name).exists() {
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                name,
                &nix::sys::time::TimeSpec::UTIME_NOW,
                &nix::sys::time::TimeSpec::UTIME_NOW,
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .map_err(std::io::Error::from)
        } else {
            std::fs::File::create(name).map(drop)
        };
        r.map_err(|e| RunError::Io {
            what: name.to_string(),
            reason: os_reason(&e),
        })
    }

    fn update(&mut self, fake: bool, n: usize) {
        self.madeset(n, if fake { BEINGMADE } else { MADE });
        let name = self.nodes[n].name.clone();
        if self.nodes[n].flags & VIRTUAL == 0 && std::path::Path::new(&name).exists() {
            self.nodes[n].time = self.timeof(&name, true);
            self.nodes[n].flags &= !(CANPRETEND | PRETENDING);
            for ai in 0..self.nodes[n].prereqs.len() {
                if self.mk.rules[self.nodes[n].prereqs[ai].r].prog.is_some() {
                    self.outofdate(n, n, ai, true);
                }
            }
        } else {
            self.nodes[n].time = 1;
            for ai in 0..self.nodes[n].prereqs.len() {
                if let Some(c) = self.nodes[n].prereqs[ai].n
                    && self.outofdate(n, n, ai, true)
                {
                    self.nodes[n].time = self.nodes[c].time;
                }
            }
        }
    }

    fn dorecipe(&mut self, node: usize) -> Result<bool, RunError> {
        let mut pick: Option<usize> = None;
        for (ai, a) in self.nodes[node].prereqs.iter().enumerate() {
            if !self.mk.rules[a.r].recipe.is_empty() {
                pick = Some(ai);
            }
        }
        let Some(aa) = pick else {
            let f = self.nodes[node].flags;
            if f & VIRTUAL == 0 && f & NORECIPE == 0 {
                return Err(RunError::NoRecipe(self.nodes[node].name.clone()));
            }
            if self.nodes[node].name.contains('(') && self.nodes[node].time == 0 {
                self.madeset(node, MADE);
            } else {
                self.update(false, node);
            }
            if self.opts.touch {
                let name = self.nodes[node].name.clone();
                if f & VIRTUAL == 0 {
                    self.touch(&name)?;
                } else {
                    self.explain(format_args!("no touch of virtual '{name}'\n"));
                }
            }
            return Ok(false);
        };
        let arc = self.nodes[node].prereqs[aa].clone();
        let ri = arc.r;
        let rule_attr = self.mk.rules[ri].attr;
        let mut list = vec![node];
        let mut targets = Vec::new();
        let mut alltargets = Vec::new();
        if rule_attr & attr::REGEXP != 0 {
            targets.push(self.nodes[node].name.clone());
            alltargets.push(self.nodes[node].name.clone());
        } else {
            let all = Rc::clone(&self.mk.rules[ri].alltargets);
            for w in all.iter() {
                let buf = if rule_attr & attr::META != 0 {
                    subst(&arc.stem, w)
                } else {
                    w.clone()
                };
                alltargets.push(buf.clone());
                let Some(&n) = self.by_name.get(&buf) else {
                    continue;
                };
                if !self.opts.all && self.nodes[n].time != 0 {
                    let mut any = false;
                    for ai in 0..self.nodes[n].prereqs.len() {
                        if self.nodes[n].prereqs[ai].n.is_some() && self.outofdate(n, n, ai, false)
                        {
                            any = true;
                            break;
                        }
                    }
                    if !any {
                        continue;
                    }
                }
                targets.push(buf);
                if n != node {
                    list.insert(1, n);
                }
            }
        }
        if list.iter().any(|&n| self.nodes[n].flags & READY == 0) {
            return Ok(false);
        }
        let mut prereq = Vec::new();
        let mut newprereq = Vec::new();
        for &n in &list {
            for ai in 0..self.nodes[n].prereqs.len() {
                match self.nodes[n].prereqs[ai].n {
                    Some(c) => {
                        let cname = self.nodes[c].name.clone();
                        addw(&mut prereq, &cname);
                        if self.outofdate(n, n, ai, false) {
                            addw(&mut newprereq, &cname);
                            let (nn, nt, ct) = (
                                self.nodes[n].name.clone(),
                                self.nodes[n].time,
                                self.nodes[c].time,
                            );
                            self.explain_now(format_args!("{nn}({nt}) < {cname}({ct})\n"));
                        }
                    }
                    None => {
                        let nn = self.nodes[n].name.clone();
                        self.explain_now(format_args!("{nn} has no prerequisites\n"));
                    }
                }
            }
            self.madeset(n, BEINGMADE);
        }
        self.run(Job {
            r: ri,
            nodes: list,
            stem: arc.stem,
            matches: arc.matches,
            prereq,
            newprereq,
            target: targets,
            alltarget: alltargets,
        })?;
        Ok(true)
    }

    // ---- running -----------------------------------------------------

    fn run(&mut self, j: Job) -> Result<(), RunError> {
        self.jobs.push_back(j);
        if self.nrunning < self.nproclimit {
            self.sched()?;
        }
        Ok(())
    }

    /// The per-recipe variables of job `j` in slot `slot`.
    fn internal_env(&self, j: &Job, slot: usize) -> Vec<(&'static str, String)> {
        let regex = self.mk.rules[j.r].attr & attr::REGEXP != 0;
        let newmember: Vec<String> = j
            .newprereq
            .iter()
            .filter_map(|w| {
                let open = w.find('(')?;
                let close = w[open + 1..].find(')')? + open + 1;
                Some(w[open + 1..close].to_string())
            })
            .collect();
        let mut v = vec![
            ("target", j.target.join(" ")),
            (
                "stem",
                if regex {
                    String::new()
                } else {
                    j.stem.to_string()
                },
            ),
            ("prereq", j.prereq.join(" ")),
            ("pid", std::process::id().to_string()),
            ("nproc", slot.to_string()),
            ("newprereq", j.newprereq.join(" ")),
            ("alltarget", j.alltarget.join(" ")),
            ("newmember", newmember.join(" ")),
        ];
        const STEMS: [&str; 10] = [
            "stem0", "stem1", "stem2", "stem3", "stem4", "stem5", "stem6", "stem7", "stem8",
            "stem9",
        ];
        for (i, name) in STEMS.iter().enumerate() {
            let val = if regex {
                j.matches
                    .stems
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_default()
            } else {
                String::new()
            };
            v.push((name, val));
        }
        v
    }

    fn echo_text(&self, j: &Job, internal: &[(&'static str, String)]) -> String {
        let lookup = |name: &str| -> Option<String> {
            if is_internal(name) {
                return internal
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.clone());
            }
            self.shown.get(name).cloned()
        };
        shprint(&self.mk.rules[j.r].recipe, &lookup)
    }

    fn sched(&mut self) -> Result<(), RunError> {
        let Some(j) = self.jobs.pop_front() else {
            return Ok(());
        };
        let slot = self.slots.iter().position(|s| s.pid <= 0).unwrap_or(0);
        let internal = self.internal_env(&j, slot);
        let text = self.echo_text(&j, &internal);
        let rule_attr = self.mk.rules[j.r].attr;
        if !self.opts.question
            && !self.opts.touch
            && (self.opts.dry_run || rule_attr & attr::QUIET == 0)
        {
            let _ = self.out.write_all(text.as_bytes());
        }
        if self.opts.dry_run || self.opts.touch || self.opts.question {
            self.would_run = true;
            for &n in &j.nodes {
                if self.opts.touch {
                    let name = self.nodes[n].name.clone();
                    if self.nodes[n].flags & VIRTUAL == 0 {
                        self.touch(&name)?;
                    } else {
                        self.explain(format_args!("no touch of virtual '{name}'\n"));
                    }
                }
                self.nodes[n].time = now();
                self.madeset(n, MADE);
            }
            return Ok(());
        }
        let _ = self.out.flush();
        let mut env: Vec<(String, String)> = internal
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        env.extend(self.env.iter().cloned());
        let rule = &self.mk.rules[j.r];
        let flag = if rule_attr & attr::NOMINUSE != 0 {
            None
        } else {
            Some("-e")
        };
        let pid = proc::spawn_recipe(&rule.shell, flag, &rule.recipe, &env).map_err(|e| {
            RunError::Io {
                what: rule.shell.join(" "),
                reason: os_reason(&e),
            }
        })?;
        self.slots[slot] = Slot { pid, job: Some(j) };
        self.nrunning += 1;
        Ok(())
    }

    fn waitup(&mut self, echildok: i32) -> Result<i32, RunError> {
        loop {
            let got = proc::wait_any().map_err(|e| RunError::Io {
                what: format!("(waitup {echildok})"),
                reason: os_reason(&e),
            })?;
            let Some((pid, msg)) = got else {
                if echildok > 0 {
                    return Ok(1);
                }
                return Err(RunError::Io {
                    what: format!("(waitup {echildok})"),
                    reason: "No child processes".to_string(),
                });
            };
            let Some(slot) = self.slots.iter().position(|s| s.pid == pid) else {
                continue;
            };
            let j = self.slots[slot]
                .job
                .take()
                .expect("a running slot has a job");
            self.nrunning -= 1;
            self.slots[slot].pid = -1;
            let mut fake = false;
            if !msg.is_empty() {
                let internal = self.internal_env(&j, slot);
                let text = self.echo_text(&j, &internal);
                let mut line = format!("mk: {}: exit status={}", front(&text), msg);
                let mut deleting = false;
                for &n in &j.nodes {
                    if self.nodes[n].flags & DELETE != 0 {
                        if !deleting {
                            line.push_str(", deleting");
                            deleting = true;
                        }
                        let name = &self.nodes[n].name;
                        line.push_str(&format!(" '{name}'"));
                        if let Err(e) = std::fs::remove_file(name) {
                            eprintln!("remove {name}: {}", os_reason(&e));
                        }
                    }
                }
                let _ = self.out.flush();
                eprintln!("{line}");
                if self.opts.keep_going {
                    self.runerrs += 1;
                    fake = true;
                } else {
                    self.jobs.clear();
                    return Err(RunError::Reported);
                }
            }
            for w in &j.target {
                if let Some(&n) = self.by_name.get(w) {
                    self.update(fake, n);
                }
            }
            if self.nrunning < self.nproclimit {
                self.sched()?;
            }
            return Ok(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::Commands;

    #[test]
    fn meta_match_table() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("foo.o", "%.o", Some("foo")),
            ("dir/foo.o", "%.o", Some("dir/foo")),
            ("dir/foo.o", "&.o", None),
            ("foo.o", "&.o", Some("foo")),
            (".o", "%.o", Some("")),
            ("foo.c", "%.o", None),
            ("libx.a", "lib%.a", Some("x")),
            ("o", "%.o", None),
        ];
        for (name, tmpl, want) in cases {
            assert_eq!(meta_match(name, tmpl).as_deref(), *want, "{name} {tmpl}");
        }
    }

    #[test]
    fn subst_replaces_every_percent() {
        assert_eq!(subst("x", "%.c %.h&"), "x.c x.hx");
    }

    #[test]
    fn shprint_table() {
        let lookup = |n: &str| match n {
            "A" => Some("1 2".to_string()),
            "target" => Some("t".to_string()),
            _ => None,
        };
        let cases = [
            ("echo $A $target\n", "echo 1 2 t\n"),
            ("echo ${A}x\n", "echo 1 2x\n"),
            ("echo $HOME\n", "echo $HOME\n"),
            ("echo '$A' \"$A\"\n", "echo '$A' \"$A\"\n"),
            ("echo `echo $A`\n", "echo `echo $A`\n"),
            ("echo ${A:%=%.o}\n", "echo ${A:%=%.o}\n"),
            ("echo $$ $\n", "echo $$ $\n"),
        ];
        for (recipe, want) in cases {
            assert_eq!(shprint(recipe, &lookup), want, "{recipe:?}");
        }
    }

    #[test]
    fn front_table() {
        let cases = [
            ("false\n", "false  "),
            (
                "echo making foo; touch foo\nfalse\necho notreached\n",
                "echo making foo; ...  ",
            ),
            ("a b c d\n", "a b c d  "),
        ];
        for (s, want) in cases {
            assert_eq!(front(s), want, "{s:?}");
        }
    }

    fn dry(text: &str, target: &str) -> (String, Result<(), RunError>) {
        let mut m = Mkfile::new(Vec::<(String, String)>::new(), Commands::Skip);
        m.parse_text("mkfile", text, false).expect("parses");
        let opts = Options {
            dry_run: true,
            ..Options::default()
        };
        let mut ev = Evaluator::new(m, opts, Vec::new());
        let r = ev.mk(target);
        (String::from_utf8(ev.into_output()).expect("utf8"), r)
    }

    #[test]
    fn dry_run_table() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "a:V: b\n\techo a $prereq\nb:V:\n\techo b\n",
                "a",
                "echo b\necho a b\n",
            ),
            (
                "X=1\nall:V: x.o\n%.o:V:\n\techo $stem $X $target\n",
                "all",
                "echo x 1 x.o\n",
            ),
            ("a b:V:\n\techo $target $alltarget\n", "a", "echo a a b\n"),
            ("a:VQ:\n\techo q\n", "a", "echo q\n"),
            ("n:N: x\nx:V:\n\techo x\n", "n", "echo x\n"),
        ];
        for (text, target, want) in cases {
            let (out, r) = dry(text, target);
            assert!(r.is_ok(), "{text:?}: {r:?}");
            assert_eq!(out, *want, "{text:?}");
        }
    }

    #[test]
    fn graph_errors_table() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "a:V: b\n\ttrue\nb:V: a\n\ttrue\n",
                "a",
                "cycle in graph detected at target a",
            ),
            ("a:V: b\n\ttrue\n", "a", "don't know how to make 'b' in"),
            ("a: b\n", "a", "don't know how to make 'b' in"),
            (
                "a:V: b\nb:\n\tx\nb: c\n\ty\nc:V:\n\tz\n",
                "a",
                "ambiguous recipes for b:",
            ),
        ];
        for (text, target, want) in cases {
            let (_, r) = dry(text, target);
            let e = r.expect_err(text).to_string();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
    }
}
