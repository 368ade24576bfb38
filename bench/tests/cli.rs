//! The benchmarks' arguments: `--help` prints the usage and exits 0; an
//! unknown argument, or a value missing or not one the argument takes,
//! says which and exits 2, before anything is measured.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).output().expect("bench starts");
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_exits_0_and_bad_arguments_exit_2() {
    let benches = [
        (env!("CARGO_BIN_EXE_run_bench"), "--runs"),
        (env!("CARGO_BIN_EXE_peer_bench"), "--runs"),
        (env!("CARGO_BIN_EXE_turbo_bench"), "--rounds"),
        (env!("CARGO_BIN_EXE_mk_bench"), "--runs"),
    ];
    for (bin, numeric) in benches {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0, "{bin} --help");
        assert!(out.starts_with("usage: "), "{bin} --help printed {out:?}");
        let (code, _, err) = run(bin, &["--no-such-flag"]);
        assert_eq!(code, 2, "{bin} --no-such-flag");
        assert!(err.contains("unknown argument \"--no-such-flag\""), "{err}");
        for args in [vec![numeric], vec![numeric, "many"]] {
            let (code, _, err) = run(bin, &args);
            assert_eq!(code, 2, "{bin} {args:?}");
            assert!(err.starts_with(&format!("{numeric} needs ")), "{err}");
            assert!(!err.contains("panicked"), "{bin} {args:?}: {err}");
        }
    }
    // Turborepo's side needs rounds enough for a median of its own.
    let (code, _, err) = run(env!("CARGO_BIN_EXE_turbo_bench"), &["--rounds", "1"]);
    assert_eq!(code, 2);
    assert!(err.contains("at least 11"), "{err}");
    // The build to time against must be there before anything is set up.
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_turbo_bench"),
        &["--against", "/no/such/reprise"],
    );
    assert_eq!(code, 2);
    assert!(err.starts_with("--against needs "), "{err}");
    let (code, _, _) = run(env!("CARGO_BIN_EXE_vm_bench"), &["--help"]);
    assert_eq!(code, 0, "vm_bench --help");
    let (code, _, _) = run(env!("CARGO_BIN_EXE_vm_bench"), &["many"]);
    assert_eq!(code, 2, "vm_bench many");
}
