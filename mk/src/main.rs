//! The `mk` binary: parses mk(1)'s arguments, reads the mkfiles and makes
//! the targets with the library.
//!
//! Exit status, as 9base's: 0 when everything asked for was made (also
//! under `-k`, whatever failed), 1 on any error. With `-q` (an extension),
//! 1 also means something is out of date.

use std::io::{BufWriter, Write};
use std::process::ExitCode;

use reprise_mk::{Commands, Evaluator, Mkfile, Options, ParseError, RunError};

const USAGE: &str = "Usage: mk [-f file] [-n] [-a] [-e] [-t] [-k] [-i] [-d[egp]] [targets ...]";

/// What the command line asks for.
#[derive(Debug, Default)]
struct Args {
    opts: Options,
    files: Vec<String>,
    sequential: bool,
    assignments: Vec<String>,
    targets: Vec<String>,
    mkflags: Vec<String>,
    mkargs: Vec<String>,
}

fn parse_args(argv: &[String]) -> Option<Args> {
    let mut a = Args::default();
    let mut i = 0;
    while i < argv.len() && argv[i].starts_with('-') {
        let arg = &argv[i];
        a.mkflags.push(arg.clone());
        match arg.chars().nth(1) {
            Some('a') => a.opts.all = true,
            Some('d') | Some('u') => {}
            Some('e') => a.opts.explain = true,
            Some('f') => {
                i += 1;
                let f = argv.get(i)?;
                a.files.push(f.clone());
                a.mkflags.push(f.clone());
            }
            Some('i') => a.opts.intermediates = true,
            Some('k') => a.opts.keep_going = true,
            Some('n') => a.opts.dry_run = true,
            Some('q') => a.opts.question = true,
            Some('s') => a.sequential = true,
            Some('t') => a.opts.touch = true,
            Some('w') => {
                if arg.len() > 2 {
                    a.opts.whatif.push(arg[2..].to_string());
                } else {
                    i += 1;
                    a.opts.whatif.push(argv.get(i)?.clone());
                }
            }
            _ => return None,
        }
        i += 1;
    }
    if a.opts.all {
        a.opts.intermediates = true;
    }
    for arg in &argv[i..] {
        if arg.contains('=') {
            a.assignments.push(arg.clone());
            a.mkflags.push(arg.clone());
        } else {
            a.targets.push(arg.clone());
            a.mkargs.push(arg.clone());
        }
    }
    Some(a)
}

fn words(v: &[String]) -> Vec<String> {
    let w: Vec<String> = v
        .iter()
        .flat_map(|s| s.split_whitespace().map(String::from))
        .collect();
    if w.is_empty() { vec![String::new()] } else { w }
}

fn real_main() -> u8 {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(args) = parse_args(&argv) else {
        eprintln!("{USAGE}");
        return 1;
    };
    let mut mkfile = Mkfile::new(std::env::vars(), Commands::Run);
    let parsed = (|| {
        mkfile.assign_command_line(&args.assignments)?;
        mkfile.set_variable("MKFLAGS", words(&args.mkflags));
        mkfile.set_variable("MKARGS", words(&args.mkargs));
        if args.files.is_empty() {
            if std::fs::File::open("mkfile").is_ok() {
                mkfile.parse_path("mkfile")?;
            }
        } else {
            for f in &args.files {
                mkfile.parse_path(f)?;
            }
        }
        Ok::<(), ParseError>(())
    })();
    for w in mkfile.take_warnings() {
        eprintln!("{w}");
    }
    if let Err(e) = parsed {
        // 9base prints these two without its name.
        match e {
            ParseError::Open { .. } | ParseError::IncludeStatus => eprintln!("{e}"),
            _ => eprintln!("mk: {e}"),
        }
        return 1;
    }
    let question = args.opts.question;
    let out = BufWriter::new(std::io::stdout());
    let mut ev = Evaluator::new(mkfile, args.opts, out).with_unbuffered(std::io::stdout());
    let result = (|| {
        if args.targets.is_empty() {
            let Some(defaults) = ev.mkfile().default_targets().map(<[String]>::to_vec) else {
                return Err(RunError::NothingToMk);
            };
            for t in &defaults {
                ev.mk(t)?;
            }
        } else if args.sequential || args.targets.len() == 1 {
            for t in &args.targets {
                ev.mk(t)?;
            }
        } else {
            let name = ev.add_command_line_rule(&args.targets);
            ev.mk(&name)?;
        }
        Ok(())
    })();
    let would_run = ev.would_run();
    let _ = ev.into_output().flush();
    match result {
        Err(RunError::Reported) => 1,
        Err(e) => {
            eprintln!("mk: {e}");
            1
        }
        Ok(()) if question && would_run => 1,
        Ok(()) => 0,
    }
}

fn main() -> ExitCode {
    // Deep dependency chains recurse deeply; give them room.
    let worker = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(real_main);
    match worker.map(|h| h.join()) {
        Ok(Ok(code)) => ExitCode::from(code),
        _ => ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_table() {
        let a = parse_args(&sv(&["-n", "-f", "m", "-wa,b", "X=1", "t1", "t2"])).expect("parses");
        assert!(a.opts.dry_run);
        assert_eq!(a.files, ["m"]);
        assert_eq!(a.opts.whatif, ["a,b"]);
        assert_eq!(a.assignments, ["X=1"]);
        assert_eq!(a.targets, ["t1", "t2"]);
        assert_eq!(a.mkflags, ["-n", "-f", "m", "-wa,b", "X=1"]);
        let a = parse_args(&sv(&["-a"])).expect("parses");
        assert!(a.opts.intermediates);
        assert!(parse_args(&sv(&["-z"])).is_none());
        assert!(parse_args(&sv(&["-f"])).is_none());
        // Only the first letter of a flag counts, as in 9base.
        let a = parse_args(&sv(&["-nk"])).expect("parses");
        assert!(a.opts.dry_run && !a.opts.keep_going);
    }
}
