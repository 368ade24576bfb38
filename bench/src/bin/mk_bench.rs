//! Benchmark of `mk`: parse time and parse+plan time of a generated
//! 5,000-rule mkfile, ours against Debian's 9base mk, as medians of
//! several runs. Prints figures; asserts nothing about them.
//!
//! Usage: `mk_bench [--runs N] [--mk PATH]`. Our `mk` is looked for next
//! to this binary (build it with the same profile: `cargo build
//! --release -p reprise-mk -p reprise-bench`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RULES: usize = 5000;
const HEADERS: usize = 50;
const NINEBASE: &str = "/usr/lib/plan9/bin/mk";

/// Writes the mkfile and its source files into `dir`.
fn generate(dir: &Path) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut m = String::new();
    let objs: Vec<String> = (0..RULES).map(|i| format!("o{i}.o")).collect();
    let _ = writeln!(
        m,
        "CC=cc\nCFLAGS=-O2 -g\nNAMES={}",
        (0..RULES)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(m, "SRC=${{NAMES:%=%.c}}\n");
    let _ = writeln!(m, "prog: {}\n\t$CC -o $target $prereq\n", objs.join(" "));
    let _ = writeln!(m, "parseonly:V:\n\ttrue\n");
    for i in 0..RULES {
        let _ = writeln!(
            m,
            "o{i}.o: s{i}.c h{}.h\n\t$CC $CFLAGS -c s{i}.c -o $target\n",
            i % HEADERS
        );
    }
    let _ = writeln!(m, "%.c:N:\n");
    std::fs::write(dir.join("mkfile"), m)?;
    for i in 0..RULES {
        std::fs::write(dir.join(format!("s{i}.c")), b"")?;
    }
    for i in 0..HEADERS {
        std::fs::write(dir.join(format!("h{i}.h")), b"")?;
    }
    Ok(())
}

/// Runs `bin -n target` in `dir` with output to /dev/null `runs` times;
/// the median wall time, or why it failed.
fn median_run(bin: &Path, dir: &Path, target: &str, runs: usize) -> Result<Duration, String> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let st = Command::new(bin)
            .args(["-n", target])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let t = start.elapsed();
        if !st.success() {
            return Err(format!("{} -n {target} failed: {st}", bin.display()));
        }
        times.push(t);
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

const USAGE: &str = "usage: mk_bench [--runs N] [--mk PATH]";

fn main() {
    let mut runs = 7usize;
    let mut ours: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or_else(|| reprise_bench::value_exit(&a, "a number", USAGE))
                    .max(1)
            }
            "--mk" => {
                let path = args.next();
                ours =
                    Some(PathBuf::from(path.unwrap_or_else(|| {
                        reprise_bench::value_exit(&a, "a path", USAGE)
                    })))
            }
            _ => reprise_bench::usage_exit(&a, USAGE),
        }
    }
    let ours = ours.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("mk")))
            .unwrap_or_else(|| PathBuf::from("mk"))
    });
    if !ours.exists() {
        eprintln!(
            "our mk is not at {}: build it with the same profile (cargo build -p reprise-mk) or pass --mk PATH",
            ours.display()
        );
        std::process::exit(1);
    }
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cannot create a temporary directory: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = generate(dir.path()) {
        eprintln!("cannot write the benchmark mkfile: {e}");
        std::process::exit(1);
    }

    // In-process figure for the library alone (no process start-up).
    let mut lib_times = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let parsed = reprise_mk::Mkfile::parse_file(dir.path().join("mkfile"), std::env::vars());
        lib_times.push(start.elapsed());
        if let Err(e) = parsed {
            eprintln!("library parse failed: {e}");
            std::process::exit(1);
        }
    }
    lib_times.sort();

    println!(
        "mk benchmark: {RULES} rules, {} files, median of {runs} runs",
        RULES + HEADERS
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "", "reprise mk", "9base mk", "ratio"
    );
    let have_9base = Path::new(NINEBASE).exists();
    for (label, target) in [
        ("parse (mk -n parseonly)", "parseonly"),
        ("parse+plan (mk -n prog)", "prog"),
    ] {
        let a = median_run(&ours, dir.path(), target, runs);
        let b = if have_9base {
            median_run(Path::new(NINEBASE), dir.path(), target, runs)
        } else {
            Err("not installed (apt-get install 9base)".to_string())
        };
        let cell = |r: &Result<Duration, String>| {
            r.as_ref()
                .map(|d| ms(*d))
                .unwrap_or_else(|_| "n/a".to_string())
        };
        let ratio = match (&a, &b) {
            (Ok(x), Ok(y)) => format!("{:.2}x", x.as_secs_f64() / y.as_secs_f64()),
            _ => "n/a".to_string(),
        };
        println!("{label:<34} {:>12} {:>12} {ratio:>8}", cell(&a), cell(&b));
        for e in [a.err(), b.err()].into_iter().flatten() {
            println!("  note: {e}");
        }
    }
    println!(
        "{:<34} {:>12}",
        "library parse, in process",
        ms(lib_times[lib_times.len() / 2])
    );
    println!("(ratio = reprise / 9base; below 1 means ours is faster)");
}
