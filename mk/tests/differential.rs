//! Differential tests: every case of `tests/corpus/*/spec` is run with our
//! `mk` and with Debian's 9base mk in copies of the case directory, and
//! the exit statuses, standard output, standard error (with the directory
//! name masked) and the files left behind must agree.
//!
//! A `spec` holds one directive a line (`#` starts a comment):
//!
//! - `mtime FILE SECONDS`: create FILE if needed and set its date (files
//!   copied from the case directory are dated 999000000);
//! - `env NAME=VALUE`: add to the environment of the following runs
//!   (runs start with only `PATH` and `NPROC=1`);
//! - `run ARGS...`: run both mks with ARGS (single quotes group words)
//!   in the same directories as the previous runs, and compare;
//! - `run-nostderr ARGS...`: the same, without comparing standard error
//!   (where 9base's text cannot be matched, e.g. regexp messages);
//! - `run-unordered ARGS...`: compare standard output as sorted lines
//!   (parallel runs);
//! - `question ARGS...`: our `-q ARGS` (an extension 9base lacks) must
//!   exit 1 exactly when 9base's `-n ARGS` prints a recipe;
//! - `reset`: start again from fresh copies of the case directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NINEBASE: &str = "/usr/lib/plan9/bin/mk";
const TIMEOUT: Duration = Duration::from_secs(30);
/// The date given to every file copied from a case directory.
const COPY_MTIME: u64 = 999_000_000;

fn ours() -> &'static str {
    env!("CARGO_BIN_EXE_mk")
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// Splits a spec line into words; single quotes group.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' | '\t' if !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            _ => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy dir");
    for e in std::fs::read_dir(from).expect("read case dir") {
        let e = e.expect("dir entry");
        let name = e.file_name();
        if name == "spec" {
            continue;
        }
        let src = e.path();
        let dst = to.join(&name);
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy file");
            // A fixed old date, so a run's decisions never depend on the
            // second the copy was made in.
            set_mtime(&dst, COPY_MTIME);
        }
    }
}

fn set_mtime(path: &Path, secs: u64) {
    if !path.exists() {
        std::fs::write(path, b"").expect("create file for mtime");
    }
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open for mtime");
    f.set_modified(t).expect("set mtime");
}

/// Files under `dir` with their contents (directories as `name/`).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(base)
                .expect("under base")
                .display()
                .to_string();
            if p.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(base, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run_mk(bin: &str, dir: &Path, args: &[String], env: &[(String, String)]) -> Outcome {
    let out_path = PathBuf::from(format!("{}.stdout", dir.display()));
    let err_path = PathBuf::from(format!("{}.stderr", dir.display()));
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{bin} {args:?} in {} did not finish in {TIMEOUT:?}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mask = |s: String| mask_now(&s.replace(&dir.display().to_string(), "$DIR"));
    Outcome {
        code: status.code(),
        stdout: mask(std::fs::read_to_string(&out_path).unwrap_or_default()),
        stderr: mask(std::fs::read_to_string(&err_path).unwrap_or_default()),
    }
}

/// Replaces ten-digit numbers within a day of now (dates of files made
/// during the run, shown by `-e`) with `<now>`.
fn mask_now(s: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut out = String::with_capacity(s.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        match digits.parse::<i64>() {
            Ok(n) if digits.len() == 10 && (n - now).abs() < 86_400 => out.push_str("<now>"),
            _ => out.push_str(digits),
        }
        digits.clear();
    };
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

fn sorted_lines(s: &str) -> Vec<&str> {
    let mut v: Vec<&str> = s.lines().collect();
    v.sort_unstable();
    v
}

/// Runs one case; returns the differences found.
fn run_case(case: &Path, scratch: &Path) -> Vec<String> {
    let name = case
        .file_name()
        .expect("case name")
        .to_string_lossy()
        .to_string();
    let spec =
        std::fs::read_to_string(case.join("spec")).unwrap_or_else(|e| panic!("{name}/spec: {e}"));
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_string());
    let mut env: Vec<(String, String)> = vec![("PATH".into(), path), ("NPROC".into(), "1".into())];
    let mut diffs = Vec::new();
    let mut generation = 0;
    let fresh = |generation: u32| -> (PathBuf, PathBuf) {
        let a = scratch.join(format!("{name}.{generation}.ours"));
        let b = scratch.join(format!("{name}.{generation}.9base"));
        copy_dir(case, &a);
        copy_dir(case, &b);
        (a, b)
    };
    let (mut da, mut db) = fresh(generation);
    for (lineno, raw) in spec.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (cmd, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let at = format!("{name}/spec:{}: {line}", lineno + 1);
        match cmd {
            "mtime" => {
                let w = split_args(rest);
                let secs: u64 = w[1].parse().expect("mtime seconds");
                set_mtime(&da.join(&w[0]), secs);
                set_mtime(&db.join(&w[0]), secs);
            }
            "env" => {
                let (k, v) = rest.split_once('=').expect("env NAME=VALUE");
                env.retain(|(n, _)| n != k);
                env.push((k.to_string(), v.to_string()));
            }
            "reset" => {
                generation += 1;
                (da, db) = fresh(generation);
            }
            "question" => {
                let args = split_args(rest);
                let mut q = vec!["-q".to_string()];
                q.extend(args.iter().cloned());
                let mut n = vec!["-n".to_string()];
                n.extend(args.iter().cloned());
                let a = run_mk(ours(), &da, &q, &env);
                let b = run_mk(NINEBASE, &db, &n, &env);
                let would = b.code == Some(0)
                    && !b.stdout.is_empty()
                    && !b.stdout.contains("is up to date");
                let want = if b.code != Some(0) || would {
                    Some(1)
                } else {
                    Some(0)
                };
                if a.code != want {
                    diffs.push(format!(
                        "{at}\n  -q exit {:?}, 9base -n exit {:?} printing {:?}",
                        a.code, b.code, b.stdout
                    ));
                }
                if !a.stdout.is_empty() {
                    diffs.push(format!("{at}\n  -q printed {:?}", a.stdout));
                }
            }
            "run" | "run-nostderr" | "run-unordered" => {
                let args = split_args(rest);
                let a = run_mk(ours(), &da, &args, &env);
                let b = run_mk(NINEBASE, &db, &args, &env);
                if a.code != b.code {
                    diffs.push(format!("{at}\n  exit: ours {:?}, 9base {:?}\n  ours stderr: {:?}\n  9base stderr: {:?}", a.code, b.code, a.stderr, b.stderr));
                }
                let same_out = if cmd == "run-unordered" {
                    sorted_lines(&a.stdout) == sorted_lines(&b.stdout)
                } else {
                    a.stdout == b.stdout
                };
                if !same_out {
                    diffs.push(format!(
                        "{at}\n  stdout differs\n--- ours\n{}--- 9base\n{}---",
                        a.stdout, b.stdout
                    ));
                }
                if cmd != "run-nostderr" && sorted_lines(&a.stderr) != sorted_lines(&b.stderr) {
                    diffs.push(format!(
                        "{at}\n  stderr differs\n--- ours\n{}--- 9base\n{}---",
                        a.stderr, b.stderr
                    ));
                }
                let (sa, sb) = (snapshot(&da), snapshot(&db));
                if sa != sb {
                    let keys =
                        |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
                    let changed: Vec<&String> = sa
                        .iter()
                        .filter(|(k, v)| sb.get(*k) != Some(v))
                        .map(|(k, _)| k)
                        .collect();
                    diffs.push(format!(
                        "{at}\n  files differ: ours {:?} 9base {:?}; changed {:?}",
                        keys(&sa),
                        keys(&sb),
                        changed
                    ));
                }
            }
            other => panic!("{at}: unknown directive {other}"),
        }
    }
    diffs
}

#[test]
fn corpus_matches_9base() {
    assert!(
        Path::new(NINEBASE).exists(),
        "9base mk not found at {NINEBASE}: the differential tests need it; run `apt-get install 9base`"
    );
    let mut cases: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("tests/corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("spec").exists())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 40,
        "the corpus should hold at least 40 cases, found {}",
        cases.len()
    );
    let only = std::env::var("MK_CASE").ok();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in &cases {
        let name = case
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        if only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        ran += 1;
        failures.extend(run_case(case, scratch.path()));
    }
    assert!(ran > 0, "no case ran (MK_CASE={only:?})");
    assert!(
        failures.is_empty(),
        "{} difference(s) from 9base:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
