//! System tests of `reprise run` with the real binary, real VMs and real git
//! repositories made in temp folders: a first run executes and a second
//! replays, key changes miss and explain themselves, and every kind of bad
//! input is refused with its own exit code and nothing kept.
//!
//! The runs that boot a VM take the `vm_lock` so they go one at a time.

mod run_support;

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use run_support::{Run, Sandbox, alive, children_named, example_hello, vm_lock, wait_until};

/// The exit codes of `reprise_protocol::exit`, as the CLI documents them.
mod code {
    pub const SUCCESS: i32 = 0;
    pub const TESTS_FAILED: i32 = 1;
    pub const INFRA: i32 = 3;
    pub const REPOSITORY: i32 = 4;
    pub const CONTRACT: i32 = 5;
    pub const PREPARE_FAILED: i32 = 6;
    pub const TIMEOUT: i32 = 7;
    pub const INTERRUPTED: i32 = 130;
}

/// What the hello example's test target prints on stdout, byte for byte:
/// mk's echo of the recipe, then the test's output.
const HELLO_STDOUT: &[u8] =
    b"sh ./test.sh\n\x1b[32mok\x1b[0m greet.sh says: hello, world\n1 passed, 0 failed\n";
/// What it prints on stderr.
const HELLO_STDERR: &[u8] = b"note: this line goes to stderr\n";

/// One real run of examples/hello, shared by the tests that need a stored
/// result: each copies the repository and the store into its own sandbox.
struct Fixture {
    sandbox: Sandbox,
    first: Run,
}

fn hello_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let _vm = vm_lock();
        let sandbox = Sandbox::new();
        // A root commit of its own: the namespace of a repository without
        // an origin is derived from its root commit, so amending the hello
        // commit later must not amend the root.
        sandbox.git_init();
        // Named after its folder: an empty root commit made in the same
        // second as another test's (scripts/test.sh runs two test binaries
        // at once) would otherwise be that commit, and share its namespace
        // and snapshots.
        let root = format!("root of {}", sandbox.dir.path().display());
        sandbox.git(&["commit", "-q", "--allow-empty", "-m", &root]);
        sandbox.copy_from(&example_hello()).commit("hello");
        let first = sandbox.run(&["run"]);
        Fixture { sandbox, first }
    })
}

/// A private copy of the fixture's repository and store.
fn copy_of_fixture() -> Sandbox {
    let fixture = hello_fixture();
    fixture
        .first
        .expect_code(code::SUCCESS, "the fixture's first run");
    let copy = Sandbox::new();
    for sub in ["repo", "data"] {
        let status = Command::new("cp")
            .arg("-a")
            .arg(fixture.sandbox.dir.path().join(sub).join("."))
            .arg(copy.dir.path().join(sub))
            .status()
            .expect("cp runs");
        assert!(status.success(), "copying the fixture's {sub} failed");
    }
    copy
}

/// Asserts that nothing was committed to the sandbox's store.
fn assert_nothing_kept(s: &Sandbox, run: &Run, what: &str) {
    assert_eq!(
        s.stored_files(),
        Vec::<std::path::PathBuf>::new(),
        "{what}: the store must stay empty\n--- stderr\n{}",
        run.stderr
    );
    assert_eq!(
        s.results_list(),
        Vec::<String>::new(),
        "{what}: results list"
    );
}

#[test]
fn the_sandbox_leaves_out_the_settings_that_change_a_run() {
    // What the developer running the tests has set must not change what a
    // test's run does: another driver, an orchestrator, CI mode, a cold
    // boot or another retention.
    use reprise_executor::vars;
    let s = Sandbox::new();
    let cmd = s.reprise(&["run"]);
    let envs: std::collections::BTreeMap<_, _> = cmd.get_envs().collect();
    for var in [
        vars::DRIVER_VAR,
        vars::ORCHESTRATOR_VAR,
        vars::CREDENTIALS_VAR,
        vars::COLD_BOOT_VAR,
        vars::KEEP_VAR,
        vars::MAX_AGE_VAR,
        "CI",
    ] {
        assert_eq!(
            envs.get(std::ffi::OsStr::new(var)),
            Some(&None),
            "{var} is removed from a sandboxed command's environment"
        );
    }
}

#[test]
fn first_run_executes_and_second_replays_the_same_output() {
    let fixture = hello_fixture();
    let first = &fixture.first;
    first.expect_code(code::SUCCESS, "first run");
    assert!(
        first.booted(),
        "the first run boots a VM:\n{}",
        first.stderr
    );
    assert!(
        !first.replayed(),
        "nothing to replay yet:\n{}",
        first.stderr
    );
    assert!(
        first.stdout.contains("1 passed, 0 failed"),
        "{}",
        first.stdout
    );
    assert_eq!(
        first.stdout_bytes, HELLO_STDOUT,
        "the first run's stdout is the tests' alone (preparation's goes to stderr)"
    );
    assert_eq!(
        first.test_stderr(),
        HELLO_STDERR,
        "the tests' stderr in the first run:\n{}",
        first.stderr
    );
    let report = fixture.sandbox.repo().join("reprise-artifacts/report.txt");
    assert_eq!(
        fs::read_to_string(&report).unwrap_or_default(),
        "greet: 1 passed, 0 failed\n",
        "artifact {}",
        report.display()
    );

    let s = copy_of_fixture();
    fs::remove_dir_all(s.repo().join("reprise-artifacts")).expect("clear artifacts");
    let replay = s.run(&["run"]);
    replay.expect_code(code::SUCCESS, "second run");
    assert!(
        replay.replayed(),
        "the second run replays:\n{}",
        replay.stderr
    );
    assert!(!replay.booted(), "no VM for a replay:\n{}", replay.stderr);
    assert_eq!(
        replay.stdout_bytes, HELLO_STDOUT,
        "replayed stdout, byte for byte"
    );
    assert_eq!(
        replay.test_stderr(),
        first.test_stderr(),
        "replayed stderr, byte for byte:\n{}",
        replay.stderr
    );
    assert_eq!(
        fs::read(s.repo().join("reprise-artifacts/report.txt")).ok(),
        fs::read(&report).ok(),
        "the replay restores the same artifact"
    );
    const DIRTY: &str =
        "uncommitted changes; they are ignored (the result replayed is the committed tree's)";
    assert!(
        !replay.stderr.contains(DIRTY),
        "a clean tree (the artifacts restored aside):\n{}",
        replay.stderr
    );
    // A file the commit does not have: the replay says whose result it
    // is, before its verdict (the check runs beside the replay).
    s.write("notes.txt", "not committed\n");
    let changed = s.run(&["run"]);
    changed.expect_code(code::SUCCESS, "a replay in a changed tree");
    assert!(changed.replayed(), "{}", changed.stderr);
    let note = changed.stderr.find(DIRTY);
    let verdict = changed.stderr.rfind("replayed result");
    assert!(
        note.is_some() && note < verdict,
        "the note, then the verdict:\n{}",
        changed.stderr
    );
}

/// The names in the "differs in:" block of `reprise key --explain`.
fn explained_differences(explain: &str) -> Vec<String> {
    explain
        .lines()
        .skip_while(|l| !l.contains("differs in:"))
        .skip(1)
        .filter_map(|l| l.trim().split_once(':').map(|(name, _)| name.to_string()))
        .collect()
}

fn stored(s: &Sandbox, extra: &[&str]) -> bool {
    let mut args = vec!["key", "--json"];
    args.extend(extra);
    let r = s.run(&args);
    r.expect_code(code::SUCCESS, "key --json");
    assert!(r.stdout.contains("\"key\""), "{}", r.stdout);
    if r.stdout.contains("\"stored\": true") {
        true
    } else {
        assert!(r.stdout.contains("\"stored\": false"), "{}", r.stdout);
        false
    }
}

#[test]
fn changed_inputs_miss_and_explain_while_the_same_tree_hits() {
    let s = copy_of_fixture();
    assert!(stored(&s, &[]), "the fixture's revision is stored");

    // A counted variable.
    assert!(!stored(&s, &["--env", "GREETING_STYLE=loud"]));
    let explain = s.run(&["key", "--explain", "--env", "GREETING_STYLE=loud"]);
    explain.expect_code(code::SUCCESS, "key --explain --env");
    assert!(explain.stdout.contains("stored: no"), "{}", explain.stdout);
    assert_eq!(
        explained_differences(&explain.stdout),
        ["env GREETING_STYLE"],
        "{}",
        explain.stdout
    );
    assert!(
        explain
            .stdout
            .contains("env GREETING_STYLE: loud here, (unset) there"),
        "{}",
        explain.stdout
    );

    // Another commit of the same tree.
    let before = s.git(&["rev-parse", "HEAD"]);
    s.git(&["commit", "-q", "--amend", "-m", "other"]);
    assert_ne!(s.git(&["rev-parse", "HEAD"]), before, "a new commit");
    assert!(
        stored(&s, &[]),
        "the same tree is stored under another commit"
    );
    let replay = s.run(&["run"]);
    replay.expect_code(code::SUCCESS, "run of the amended commit");
    assert!(replay.replayed(), "{}", replay.stderr);
    assert!(!replay.booted(), "{}", replay.stderr);
    assert_eq!(replay.stdout_bytes, HELLO_STDOUT);

    // A commit of another tree.
    s.write("NOTES", "a new file changes the tree\n")
        .commit("notes");
    assert!(!stored(&s, &[]), "a new tree misses");
    let explain = s.run(&["key", "--explain"]);
    explain.expect_code(code::SUCCESS, "key --explain");
    assert_eq!(
        explained_differences(&explain.stdout),
        ["tree"],
        "{}",
        explain.stdout
    );
}

#[test]
fn bad_settings_are_refused_saying_what_is_accepted() {
    let s = Sandbox::new();
    s.copy_from(&example_hello()).git_init().commit("hello");
    /// (what, arguments, environment, what stderr says)
    type Case = (
        &'static str,
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: [Case; 4] = [
        (
            "REPRISE_KEEP not a number",
            &["run"],
            &[("REPRISE_KEEP", "abc")],
            "REPRISE_KEEP=\"abc\": give how many results to keep",
        ),
        (
            "REPRISE_MAX_AGE not a duration",
            &["run"],
            &[("REPRISE_MAX_AGE", "forever")],
            "REPRISE_MAX_AGE: 'forever' is not a duration like 90s, 10m, 2h or 7d",
        ),
        (
            "a timeout that overflows",
            &["run", "--timeout", "300000000000000d"],
            &[],
            "is not a duration like",
        ),
        (
            "a timeout past a century",
            &["run", "--timeout", "40000d"],
            &[],
            "longer than the 100 years",
        ),
    ];
    for (name, args, env, message) in cases {
        let mut cmd = s.reprise(args);
        cmd.envs(env.iter().copied());
        let run = Run::from(cmd.output().expect("reprise starts"));
        run.expect_code(2, name);
        assert!(run.stderr.contains(message), "{name}:\n{}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{name}:\n{}", run.stderr);
        assert!(!run.booted(), "{name}");
    }
    assert_nothing_kept(
        &s,
        &Run::from(s.reprise(&["results", "list"]).output().unwrap()),
        "bad settings",
    );
}

#[test]
fn scripts_get_json_and_completions_without_a_vm() {
    let s = Sandbox::new();
    s.copy_from(&example_hello()).git_init().commit("hello");
    let json = |args: &[&str], code: i32| -> serde_json::Value {
        let r = s.run(args);
        r.expect_code(code, &args.join(" "));
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?} prints JSON ({e}):\n{}", r.stdout))
    };
    assert_eq!(
        json(&["results", "list", "--json"], 0),
        serde_json::json!([])
    );
    let info = json(&["image", "info", "--json"], 0);
    assert_eq!(
        info["recipe"].as_str().map(str::len),
        Some(64),
        "the recipe hash: {info}"
    );
    assert!(info["images"].is_array(), "{info}");
    let status = json(&["daemon", "status", "--json"], code::TESTS_FAILED);
    assert_eq!(status["running"], serde_json::json!(false), "{status}");
    let key = json(&["key", "--json"], 0);
    assert_eq!(key["stored"], serde_json::json!(false), "{key}");

    for (shell, marker) in [
        ("bash", "_reprise()"),
        ("zsh", "#compdef reprise"),
        ("fish", "complete -c reprise"),
    ] {
        let r = s.run(&["completions", shell]);
        r.expect_code(0, shell);
        assert!(
            r.stdout.contains(marker),
            "{shell}: {}",
            &r.stdout[..r.stdout.len().min(400)]
        );
        assert!(
            r.stdout.contains("results"),
            "{shell} completes subcommands"
        );
    }
    let help = s.run(&["run", "--help"]);
    help.expect_code(0, "run --help");
    assert!(
        help.stdout.contains("Examples:") && help.stdout.contains("--report"),
        "{}",
        help.stdout
    );
    let bad = s.run(&["--color", "sometimes", "key"]);
    bad.expect_code(2, "--color sometimes");
    assert!(
        bad.stderr.contains("always"),
        "the accepted values: {}",
        bad.stderr
    );
}

#[test]
fn bad_repositories_are_refused_before_booting() {
    struct Case {
        name: &'static str,
        setup: fn(&Sandbox),
        args: &'static [&'static str],
        code: i32,
        message: &'static str,
    }
    let cases = [
        Case {
            name: "not a git repository",
            setup: |s| {
                s.copy_from(&example_hello());
            },
            args: &["run"],
            code: code::REPOSITORY,
            message: "is not inside a git repository",
        },
        Case {
            name: "no commits",
            setup: |s| {
                s.copy_from(&example_hello()).git_init();
            },
            args: &["run"],
            code: code::REPOSITORY,
            message: "has no commits yet",
        },
        Case {
            name: "unknown revision",
            setup: |s| {
                s.copy_from(&example_hello()).git_init().commit("hello");
            },
            args: &["run", "--rev", "nope"],
            code: code::REPOSITORY,
            message: "unknown revision 'nope'",
        },
        Case {
            name: "no mkfile",
            setup: |s| {
                s.write("README", "no mkfile here\n")
                    .git_init()
                    .commit("readme");
            },
            args: &["run"],
            code: code::CONTRACT,
            message: "has no mkfile at its root",
        },
        Case {
            name: "no test target",
            setup: |s| {
                s.write("mkfile", "</usr/lib/reprise/ci.mk\nlint:V:\n\ttrue\n")
                    .git_init()
                    .commit("lint only");
            },
            args: &["run"],
            code: code::CONTRACT,
            message: "no rule makes the target 'test'",
        },
        Case {
            name: "CONTAINERIMAGE not set",
            setup: |s| {
                s.write("mkfile", "</usr/lib/reprise/ci.mk\ntest:V:\n\ttrue\n")
                    .git_init()
                    .commit("no image");
            },
            args: &["run"],
            code: code::CONTRACT,
            message: "mkfile:1: CONTAINERIMAGE is not set",
        },
    ];
    for case in cases {
        let s = Sandbox::new();
        (case.setup)(&s);
        let run = s.run(case.args);
        run.expect_code(case.code, case.name);
        assert!(
            run.stderr.contains(case.message),
            "{}: stderr should say '{}':\n{}",
            case.name,
            case.message,
            run.stderr
        );
        assert!(!run.booted(), "{}: no VM:\n{}", case.name, run.stderr);
        assert_nothing_kept(&s, &run, case.name);
    }
}

#[test]
fn a_dry_run_exits_with_the_contract_code_when_its_plan_is_not_valid() {
    struct Case {
        name: &'static str,
        mkfile: Option<&'static str>,
        args: &'static [&'static str],
        code: i32,
        message: &'static str,
    }
    const VALID: &str = "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/x\ntest:V:\n\ttrue\n";
    // The last is a valid plan, so the others' code is the contract's
    // verdict, not the dry run's.
    let cases = [
        Case {
            name: "no mkfile",
            mkfile: None,
            args: &[],
            code: code::CONTRACT,
            message: "has no mkfile at its root",
        },
        Case {
            name: "unknown target",
            mkfile: Some(VALID),
            args: &["--target", "nope"],
            code: code::CONTRACT,
            message: "no rule makes the target 'nope'",
        },
        Case {
            name: "CONTAINERIMAGE not set",
            mkfile: Some("</usr/lib/reprise/ci.mk\ntest:V:\n\ttrue\n"),
            args: &[],
            code: code::CONTRACT,
            message: "mkfile:1: CONTAINERIMAGE is not set",
        },
        Case {
            name: "a valid plan",
            mkfile: Some(VALID),
            args: &[],
            code: code::SUCCESS,
            message: "",
        },
    ];
    for case in cases {
        let name = case.name;
        let s = Sandbox::new();
        s.write("README", "a repository\n");
        if let Some(mkfile) = case.mkfile {
            s.write("mkfile", mkfile);
        }
        s.git_init().commit(name);
        let mut args = vec!["run", "--no-serve", "--driver", "dry-run"];
        args.extend(case.args);
        let run = s.run(&args);
        run.expect_code(case.code, name);
        assert!(
            run.stderr.contains(case.message),
            "{name}: stderr should say '{}':\n{}",
            case.message,
            run.stderr
        );
        assert!(
            !run.ran_here() && !run.replayed(),
            "{name}: a dry run starts nothing:\n{}",
            run.stderr
        );
        assert_eq!(
            run.stdout.contains("plan of `reprise run`"),
            case.code == code::SUCCESS,
            "{name}: a plan is printed only when it is valid:\n{}",
            run.stdout
        );
        assert_nothing_kept(&s, &run, name);
    }
}

#[test]
fn broken_contracts_are_refused_after_booting() {
    // (case, mkfile, exit code, message, driver): the contract's checks
    // after starting are the steps', the same for every driver, so two
    // cases use the podman driver (no VM) and one the VM.
    let cases = [
        (
            "prepare-runtime fails",
            "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/x\nbase-image:V:\n\texit 3\ntest:V:\n\ttrue\n",
            code::PREPARE_FAILED,
            "`mk prepare-runtime` failed with status",
            "qemu",
        ),
        (
            // It names the file, so the static check lets it through.
            "CONTAINERIMAGE missing",
            "prepare-runtime:V:\n\ttrue || echo x > /var/run/ci/env/CONTAINERIMAGE\ntest:V:\n\ttrue\n",
            code::CONTRACT,
            "did not write /var/run/ci/env/CONTAINERIMAGE",
            "podman",
        ),
        (
            // The listing of env/ is bounded: the repository decides its size.
            "env/ too large",
            "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/x\nprepare-runtime:V:\n\thead -c 17000000 /dev/zero > /var/run/ci/env/BIG\n\techo $CONTAINERIMAGE > /var/run/ci/env/CONTAINERIMAGE\ntest:V:\n\ttrue\n",
            code::CONTRACT,
            "hold more than 16 MiB together",
            "podman",
        ),
        (
            "CONTAINERIMAGE unknown",
            "</usr/lib/reprise/ci.mk\nCONTAINERIMAGE=localhost/does-not-exist\ntest:V:\n\ttrue\n",
            code::CONTRACT,
            "'localhost/does-not-exist', which is not an image",
            "podman",
        ),
    ];
    let _vm = vm_lock();
    for (name, mkfile, exit, message, driver) in cases {
        let s = Sandbox::new();
        s.write("mkfile", mkfile).git_init().commit(name);
        let run = s.run(&["run", "--driver", driver]);
        run.expect_code(exit, name);
        assert!(
            run.ran_here(),
            "{name}: found after starting:\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains(message),
            "{name}: stderr should say '{message}':\n{}",
            run.stderr
        );
        assert_nothing_kept(&s, &run, name);
    }
}

#[test]
fn artifact_rules_then_post_test_then_the_copy_out_and_each_failure_is_the_repositorys() {
    // The order of the design: the artifact rules, post-test, then the
    // artifacts copied out, so post-test may still add to them. The steps
    // are the pipeline's, the same for every driver: the podman driver (no
    // VM) runs them.
    const VALUE: &str = "rul3-s3cr3t";
    let mkfile = fs::read_to_string(example_hello().join("mkfile")).expect("mkfile");
    let case = |name: &str, toml: &str, extra: &str| {
        let s = Sandbox::new();
        s.copy_from(&example_hello())
            .write("reprise.toml", toml)
            .write("mkfile", &format!("{mkfile}\n{extra}"))
            .git_init()
            .commit(name);
        let run = Run::from(
            s.reprise(&["run", "--driver", "podman", "--secret", "HELLO_TOKEN"])
                .env("HELLO_TOKEN", VALUE)
                .output()
                .expect("reprise starts"),
        );
        (s, run)
    };
    let declared = |names: &str| format!("secrets = [\"HELLO_TOKEN\"]\nartifacts = [{names}]\n");
    let post_test = "post-test:V:\n\techo post-test ran >&2\n\techo added by post-test >> $CI/artifacts/report.txt\n";
    let _vm = vm_lock();

    let (s, run) = case("post-test adds", &declared("\"report.txt\""), post_test);
    run.expect_code(code::SUCCESS, "post-test adds to an artifact");
    assert!(
        run.stderr.contains("post-test ran"),
        "post-test's output is shown:\n{}",
        run.stderr
    );
    let report =
        fs::read_to_string(s.repo().join("reprise-artifacts/report.txt")).unwrap_or_default();
    assert_eq!(
        report, "greet: 1 passed, 0 failed\nadded by post-test\n",
        "the artifact as post-test left it"
    );

    let (s, run) = case(
        "post-test fails",
        &declared("\"report.txt\""),
        "post-test:V:\n\texit 5\n",
    );
    run.expect_code(code::CONTRACT, "post-test fails");
    // mk says how the recipe ended, and ends with its own status.
    assert!(
        run.stderr.contains("`mk post-test` failed with status 1")
            && run.stderr.contains("exit status=exit(5)"),
        "{}",
        run.stderr
    );
    assert_nothing_kept(&s, &run, "post-test fails");
    assert!(
        !s.repo().join("reprise-artifacts/report.txt").exists(),
        "nothing restored"
    );

    // A rule that fails: its output (the secret in it redacted) is in the
    // error, and post-test does not run.
    let (s, run) = case(
        "a rule fails",
        &declared("\"report.txt\", \"missing.txt\""),
        &format!("$CI/artifacts/missing.txt:\n\techo rule saw $HELLO_TOKEN\n\texit 4\n{post_test}"),
    );
    run.expect_code(code::CONTRACT, "an artifact rule fails");
    assert!(
        run.stderr
            .contains("making the artifacts report.txt, missing.txt")
            && run.stderr.contains("rule saw"),
        "the rule's failure and its output:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(VALUE),
        "the secret is redacted:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("post-test ran"),
        "post-test did not run:\n{}",
        run.stderr
    );
    assert_nothing_kept(&s, &run, "an artifact rule fails");
}

#[test]
fn a_set_up_that_fails_is_told_from_a_prepare_runtime_that_fails() {
    // The set-up and prepare-runtime are one command in the OS: a set-up
    // that fails must still read as the set-up's failure, with what it
    // said, and nothing of the repository's may have run. A passing run
    // leaves a file where the set-up makes a folder of the snapshot
    // (`/var/run/ci/cache`); the podman driver (no VM) keeps its snapshot.
    let mkfile = fs::read_to_string(example_hello().join("mkfile")).expect("mkfile");
    let s = Sandbox::new();
    s.copy_from(&example_hello())
        .write(
            "mkfile",
            &format!(
                "{mkfile}\nprepare-runtime:V: $CI/env/CONTAINERIMAGE\n\techo prepare-runtime ran >&2\n\trm -rf $CI/cache\n\techo not a folder > $CI/cache\n"
            ),
        )
        .git_init()
        .commit("breaks its snapshot");
    let _vm = vm_lock();
    let first = s.run(&["run", "--driver", "podman", "--no-serve"]);
    first.expect_code(code::SUCCESS, "the run that breaks its snapshot passes");
    assert!(
        first.stderr.contains("prepare-runtime ran"),
        "{}",
        first.stderr
    );
    s.write("README", "again\n").commit("a new commit");
    let second = s.run(&["run", "--driver", "podman", "--no-serve"]);
    second.expect_code(code::INFRA, "the set-up fails");
    assert!(
        second
            .stderr
            .contains("setting up /var/run/ci failed (status 1)")
            && second.stderr.contains("/var/run/ci/cache"),
        "the set-up's failure and what it said:\n{}",
        second.stderr
    );
    assert!(
        !second.stderr.contains("prepare-runtime ran"),
        "prepare-runtime did not run:\n{}",
        second.stderr
    );
}

#[test]
fn shallow_clones_of_one_repository_share_its_snapshot() {
    // A CI runner checks out `--depth 1`: every fetch stops at another
    // commit, so the repository's snapshot must not hang on the oldest
    // commit a clone has. Two such clones, a commit apart, are one
    // repository; the podman driver (no VM) keeps snapshots the same way.
    let s = Sandbox::new();
    s.copy_from(&example_hello()).git_init().commit("hello");
    // Fetched by an https URL (git rewrites it to the sandbox's folder),
    // so the namespace comes from the origin, as on a runner. Snapshots
    // live in the user's cache: the sandbox's name makes it a new one.
    let team = s.dir.path().file_name().unwrap().to_str().unwrap();
    let namespace = format!("git.example.com/{team}/hello");
    let url = format!("https://{namespace}");
    let shallow = |from: &Path, url: &str, name: &str| {
        let to = s.dir.path().join(name);
        let rewrite = format!("url.file://{}.insteadOf={url}", from.display());
        let to_arg = to.to_str().unwrap();
        s.git(&["-c", &rewrite, "clone", "-q", "--depth", "1", url, to_arg]);
        to
    };
    let run_in = |dir: &Path| {
        Run::from(
            s.reprise(&["run", "--driver", "podman", "--no-serve"])
                .current_dir(dir)
                .output()
                .expect("reprise starts"),
        )
    };
    let _vm = vm_lock();
    let first = run_in(&shallow(&s.repo(), &url, "ci-1"));
    first.expect_code(code::SUCCESS, "the first shallow clone's run");
    assert!(
        !first.stderr.contains("using this repository's snapshot"),
        "nothing to reuse yet:\n{}",
        first.stderr
    );
    s.write("README", "a new commit\n").commit("another");
    let second = run_in(&shallow(&s.repo(), &url, "ci-2"));
    second.expect_code(code::SUCCESS, "the second shallow clone's run");
    assert!(second.ran_here(), "a new tree runs:\n{}", second.stderr);
    assert!(
        second.stderr.contains("using this repository's snapshot"),
        "the second clone's run starts from the first one's snapshot:\n{}",
        second.stderr
    );

    // Another repository declaring that namespace, shallow-cloned from
    // its own origin, does not get (or poison) the snapshot.
    let other = Sandbox::new();
    other
        .copy_from(&example_hello())
        .write(
            "reprise.toml",
            &format!("namespace = \"{namespace}\"\nartifacts = [\"report.txt\"]\n"),
        )
        .git_init()
        .commit("an impostor");
    let other_url = format!("https://git.example.com/{team}-other/hello");
    let to = shallow(&other.repo(), &other_url, "impostor");
    let impostor = run_in(&to);
    impostor.expect_code(code::SUCCESS, "the impostor's run");
    assert!(
        !impostor.stderr.contains("using this repository's snapshot"),
        "{}",
        impostor.stderr
    );
    for dir in [s.dir.path().join("ci-2"), to] {
        let dropped = s
            .reprise(&["cache", "drop"])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(dropped.status.success(), "{dropped:?}");
    }
}

#[test]
fn failing_tests_are_kept_for_inspection_but_never_replayed() {
    // What is kept is the pipeline's doing, not the driver's: the podman
    // driver (no VM) runs it in a fraction of the time.
    let _vm = vm_lock();
    let s = Sandbox::new();
    s.copy_from(&example_hello())
        .write("greet.sh", "#!/bin/sh\necho \"goodbye, $1\"\n")
        .git_init()
        .commit("broken greeting");
    for attempt in 1..=2 {
        let run = s.run(&["run", "--driver", "podman"]);
        run.expect_code(code::TESTS_FAILED, "failing tests");
        assert!(
            run.ran_here() && !run.replayed(),
            "run {attempt} runs the tests again:\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("FAIL: got 'goodbye, world'"),
            "{}",
            run.stderr
        );
        let list = s.results_list();
        assert_eq!(list.len(), attempt, "one kept run per attempt: {list:?}");
        assert!(list.iter().all(|l| l.contains(" failed ")), "{list:?}");
        assert!(
            !fs::read_dir(s.store().join("results")).is_ok_and(|mut d| d.next().is_some()),
            "no passed result"
        );
    }
    assert!(
        !s.repo().join("reprise-artifacts/report.txt").exists(),
        "a failed run restores no artifacts"
    );
    // The kept runs, and the output of one, to see why it failed.
    let failed = s.run(&["results", "list", "--failed"]);
    failed.expect_code(code::SUCCESS, "results list --failed");
    let key = failed
        .stdout
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("a failed run listed")
        .to_string();
    let shown = s.run(&["results", "show", &key, "--output"]);
    shown.expect_code(code::SUCCESS, "results show --output");
    assert!(
        shown.stderr.contains("FAIL: got 'goodbye, world'"),
        "the failed run's own stderr:\n{}",
        shown.stderr
    );
    let listed: serde_json::Value =
        serde_json::from_str(&s.run(&["results", "list", "--failed", "--json"]).stdout)
            .expect("results list --json");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(listed[0]["status"], "failed", "{listed}");
    let shown = s.run(&["results", "show", &key, "--json"]);
    shown.expect_code(code::SUCCESS, "results show --json");
    let shown: serde_json::Value = serde_json::from_str(&shown.stdout).expect("show --json");
    assert_eq!(shown["manifest"]["outcome"], "failed", "{shown}");
    assert_eq!(shown["counts"]["answer"], "no", "{shown}");

    // -q: the tests' output and the verdict, nothing of Reprise's phases.
    s.write("README", "again\n")
        .commit("a new commit runs again");
    let quiet = s.run(&["-q", "run", "--driver", "podman"]);
    quiet.expect_code(code::TESTS_FAILED, "quiet failing run");
    assert!(
        quiet.stderr.contains("FAIL: got 'goodbye, world'"),
        "{}",
        quiet.stderr
    );
    let ours: Vec<&str> = quiet
        .stderr
        .lines()
        .filter(|l| l.starts_with("reprise: "))
        .collect();
    assert_eq!(ours.len(), 1, "only the verdict: {ours:?}");
    assert!(
        ours[0].starts_with("reprise: tests failed (status "),
        "{ours:?}"
    );
}

#[test]
fn a_run_reaching_its_timeout_is_stopped_and_not_kept() {
    let _vm = vm_lock();
    let s = Sandbox::new();
    s.copy_from(&example_hello())
        .write("test.sh", "#!/bin/sh\necho sleeping\nsleep 600\n")
        .git_init()
        .commit("sleeps");
    let run = s.run(&["run", "--timeout", "20s"]);
    run.expect_code(code::TIMEOUT, "timeout");
    assert!(run.stderr.contains("reached its timeout"), "{}", run.stderr);
    assert_nothing_kept(&s, &run, "timeout");
}

#[test]
fn secrets_are_redacted_on_screen_in_the_record_and_in_the_replay() {
    const VALUE: &str = "s3cr3t-value";
    let s = Sandbox::new();
    let test_sh = fs::read_to_string(example_hello().join("test.sh")).expect("test.sh");
    s.copy_from(&example_hello())
        .write(
            "test.sh",
            &format!(
                "{test_sh}echo \"token is $HELLO_TOKEN\"\necho \"token again $HELLO_TOKEN\" >&2\n"
            ),
        )
        .git_init()
        .commit("prints its token");
    // Redaction is the pipeline's (the podman driver, no VM, runs it).
    let run = |s: &Sandbox, extra: &[&str]| {
        let mut args = vec!["run", "--driver", "podman", "--secret", "HELLO_TOKEN"];
        args.extend(extra);
        Run::from(
            s.reprise(&args)
                .env("HELLO_TOKEN", VALUE)
                .output()
                .expect("reprise starts"),
        )
    };
    let first = {
        let _vm = vm_lock();
        run(&s, &["-v"])
    };
    first.expect_code(code::SUCCESS, "run with a secret");
    // -v shows each command run in the OS (names of variables, never values).
    assert!(
        first
            .stderr
            .contains("reprise: $ podman run --rm --pull=never --network none")
            && first.stderr.contains("--env HELLO_TOKEN"),
        "{}",
        first.stderr
    );
    let report = s.repo().join("report.json");
    let replay = run(&s, &["--report", report.to_str().expect("utf-8 path")]);
    replay.expect_code(code::SUCCESS, "replay with a secret");
    assert!(replay.replayed(), "{}", replay.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(&report).expect("the report is written"))
            .expect("the report is JSON");
    assert_eq!(report["how"], "replayed", "{report}");
    assert_eq!(report["exit_code"], 0, "{report}");
    assert_eq!(report["source"]["from"], "local store", "{report}");
    assert_eq!(report["result"]["isolation"], "container", "{report}");
    for (what, r) in [("run", &first), ("replay", &replay)] {
        assert!(
            r.stdout.contains("token is [redacted]"),
            "{what}: {}",
            r.stdout
        );
        assert!(
            r.stderr.contains("token again [redacted]"),
            "{what}: {}",
            r.stderr
        );
        assert!(
            !r.stdout.contains(VALUE) && !r.stderr.contains(VALUE),
            "{what} shows the secret"
        );
    }
    let mut files = Vec::new();
    run_support::walk(&s.store(), &mut files);
    assert!(!files.is_empty(), "the result is stored");
    for file in files {
        let bytes = fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
            "{} holds the secret",
            file.display()
        );
    }
}

#[test]
fn ctrl_c_during_the_tests_stops_the_vm_and_keeps_nothing() {
    let _vm = vm_lock();
    let s = Sandbox::new();
    s.copy_from(&example_hello())
        .write("test.sh", "#!/bin/sh\necho sleeping\nsleep 60\n")
        .git_init()
        .commit("sleeps");
    let stdout = s.dir.path().join("stdout");
    let stderr = s.dir.path().join("stderr");
    let mut child = s
        .reprise(&["run"])
        .stdout(File::create(&stdout).expect("stdout file"))
        .stderr(File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("reprise starts");
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    let in_tests = wait_until(Duration::from_secs(180), || {
        read(&stderr).contains("reprise: prepare-runtime done")
            && read(&stdout).contains("sleeping")
    });
    if !in_tests {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the tests never started:\n{}", read(&stderr));
    }
    let qemus = children_named(child.id(), "qemu-system");
    assert!(!qemus.is_empty(), "reprise runs qemu as its child");
    for qemu in &qemus {
        assert_least_privilege(*qemu);
    }

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let mut code = None;
    let exited = wait_until(Duration::from_secs(30), || {
        code = child.try_wait().expect("try_wait").map(|s| s.code());
        code.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("reprise did not stop on SIGINT:\n{}", read(&stderr));
    }
    let run = Run {
        code: code.flatten().unwrap_or(-1),
        stdout_bytes: Vec::new(),
        stderr_bytes: Vec::new(),
        stdout: read(&stdout),
        stderr: read(&stderr),
    };
    run.expect_code(code::INTERRUPTED, "SIGINT");
    assert!(
        wait_until(Duration::from_secs(10), || !qemus.iter().any(|p| alive(*p))),
        "qemu {qemus:?} outlived the interrupted run"
    );
    assert!(run.stderr.contains("interrupted"), "{}", run.stderr);
    assert_nothing_kept(&s, &run, "interrupted");
}

/// qemu runs under its seccomp sandbox (mode 2: filter), may not start
/// processes, and holds no capabilities and cannot gain any.
fn assert_least_privilege(qemu: u32) {
    let status = fs::read_to_string(format!("/proc/{qemu}/status")).expect("qemu's status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("Seccomp:"), "2", "qemu's seccomp mode:\n{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "qemu's no_new_privs");
    for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(set), "0000000000000000", "qemu's {set}");
    }
    let cmdline = fs::read(format!("/proc/{qemu}/cmdline")).expect("qemu's cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let sandbox = args
        .iter()
        .position(|a| a == "-sandbox")
        .and_then(|i| args.get(i + 1))
        .unwrap_or_else(|| panic!("qemu runs without -sandbox: {args:?}"));
    for option in [
        "on",
        "spawn=deny",
        "elevateprivileges=deny",
        "obsolete=deny",
    ] {
        assert!(
            sandbox.split(',').any(|o| o == option),
            "-sandbox {sandbox} lacks {option}"
        );
    }
}

/// `reprise results show` of the result a run stored.
fn show_stored(s: &Sandbox, run: &Run) -> String {
    let key = run
        .stderr
        .split("; result ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the stored result's key");
    let shown = s.run(&["results", "show", key]);
    shown.expect_code(code::SUCCESS, "results show");
    shown.stdout
}

#[test]
fn a_second_real_run_reuses_the_repository_snapshot() {
    let s = copy_of_fixture();
    let _vm = vm_lock();
    // A new tree: a real run, booted on the snapshot the fixture's run left,
    // so base-image finds its container image and imports nothing.
    s.write("greet.sh", "#!/bin/sh\n# a change\necho \"hello, $1\"\n")
        .commit("change");
    let second = s.run(&["run"]);
    second.expect_code(code::SUCCESS, "second real run");
    assert!(
        second.booted(),
        "a new tree runs for real:\n{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("using this repository's snapshot"),
        "{}",
        second.stderr
    );
    assert!(
        second.restored(),
        "without --network a run starts from the saved guest:\n{}",
        second.stderr
    );
    assert!(
        !second.stderr.contains("Getting image source signatures"),
        "the container image comes from the snapshot, not a new import:\n{}",
        second.stderr
    );
    // Each result records the snapshot generation it started from (shown
    // now: retention keeps only the newest result of a target).
    let shown = show_stored(&s, &second);
    assert!(
        shown.contains(", snapshot ") && !shown.contains("snapshot fresh"),
        "a generation: {shown}"
    );

    // Booted cold instead of restored, the run still gets the snapshot.
    s.write("greet.sh", "#!/bin/sh\n# cold\necho \"hello, $1\"\n")
        .commit("cold");
    let cold = Run::from(
        s.reprise(&["run"])
            .env("REPRISE_COLD_BOOT", "1")
            .output()
            .expect("reprise starts"),
    );
    cold.expect_code(code::SUCCESS, "cold real run");
    assert!(
        cold.booted() && !cold.restored(),
        "REPRISE_COLD_BOOT boots cold:\n{}",
        cold.stderr
    );
    assert!(
        !cold.stderr.contains("Getting image source signatures"),
        "a cold boot has the snapshot too:\n{}",
        cold.stderr
    );

    // --fresh starts from a blank snapshot, so base-image imports again.
    s.write(
        "greet.sh",
        "#!/bin/sh\n# another change\necho \"hello, $1\"\n",
    )
    .commit("another change");
    let fresh = s.run(&["run", "--fresh"]);
    fresh.expect_code(code::SUCCESS, "fresh run");
    assert!(
        !fresh.stderr.contains("using this repository's snapshot"),
        "{}",
        fresh.stderr
    );
    assert!(
        fresh.stderr.contains("Getting image source signatures"),
        "a fresh run builds its container image again:\n{}",
        fresh.stderr
    );

    assert!(
        show_stored(&s, &fresh).contains("snapshot fresh"),
        "{}",
        show_stored(&s, &fresh)
    );

    let dropped = s.run(&["cache", "drop"]);
    dropped.expect_code(code::SUCCESS, "cache drop");
    assert!(
        dropped.stdout.contains("dropped 1 snapshot"),
        "{}",
        dropped.stdout
    );
}

/// A `reprise daemon --warm` of a sandbox, stopped (SIGTERM, then killed)
/// when dropped.
struct WarmDaemon {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl WarmDaemon {
    fn start(s: &Sandbox) -> WarmDaemon {
        let log = s.dir.path().join("daemon.log");
        let child = s
            .reprise(&["daemon", "--warm"])
            .stdout(File::create(&log).expect("daemon log"))
            .stderr(File::create(&log).expect("daemon log"))
            .spawn()
            .expect("reprise daemon starts");
        WarmDaemon { child, log }
    }

    /// Waits until the daemon's warm guest is ready and returns its id;
    /// `not` is an id it must not be (a guest already lent).
    fn ready(&self, s: &Sandbox, not: &[String]) -> String {
        let mut id = None;
        let ok = wait_until(Duration::from_secs(600), || {
            let status = s.run(&["daemon", "status", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap_or_default();
            id = v["warm"]
                .as_str()
                .and_then(|w| w.strip_prefix("ready ("))
                .and_then(|w| w.strip_suffix(')'))
                .map(str::to_string)
                .filter(|id| !not.contains(id));
            id.is_some()
        });
        assert!(
            ok,
            "no warm guest became ready:\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        id.expect("an id")
    }
}

impl Drop for WarmDaemon {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        if !wait_until(Duration::from_secs(20), || !alive(pid)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The manifest of the result a run stored, as `results show --json` prints it.
fn stored_manifest(s: &Sandbox, run: &Run) -> serde_json::Value {
    let key = run
        .stderr
        .split("; result ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the stored result's key");
    let shown = s.run(&["results", "show", "--json", key]);
    shown.expect_code(code::SUCCESS, "results show --json");
    let v: serde_json::Value = serde_json::from_str(&shown.stdout).expect("json");
    v["manifest"].clone()
}

#[test]
fn a_warm_daemon_lends_each_guest_to_one_run_and_its_result_is_a_restored_runs() {
    let s = copy_of_fixture();
    let cold = copy_of_fixture();
    let _vm = vm_lock();
    let daemon = WarmDaemon::start(&s);
    let first = daemon.ready(&s, &[]);

    // Before the hand-off the warm guest holds nothing of any repository:
    // borrowed here, as a run would, and looked into.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let image = reprise_executor::image::ImageCache::default_location()
        .current()
        .expect("the fixture built the base image");
    let accel =
        reprise_executor::accel::choose(&reprise_executor::accel::AccelFacts::probe(), None);
    let config = reprise_executor::driver::qemu::run_config(image, accel.accel);
    let saved_guest = reprise_executor::saved_guests::SavedGuests::key(&config);
    let inside = runtime.block_on(async {
        let (lent, lease) = reprise_executor::daemon::borrow_warm(
            &s.data().join("reprise"),
            &saved_guest,
        )
        .await
        .expect("the daemon answers")
        .expect("it lends its warm guest");
        assert_eq!(lent.guest, first);
        let vm = reprise_executor::vm::Vm::attach(&lent, lease, Duration::from_secs(60))
            .await
            .expect("the lent guest answers");
        let out = vm
            .exec(&reprise_executor::vm::GuestCommand::shell(
                "cat /run/reprise-warm; echo repo: $(ls -A /reprise/repo | wc -l); \
                 echo mounts: $(grep -c -e /var/lib/reprise/state -e /var/lib/containers /proc/mounts); \
                 echo images: $(podman images -q | wc -l); echo disks: $(ls /sys/block | grep -c vd); \
                 grep -rl 'greet.sh says' /reprise /var/lib/containers /root /tmp 2>/dev/null | wc -l",
            ))
            .await
            .expect("exec in the lent guest");
        String::from_utf8_lossy(&out.stdout).into_owned()
        // The lease ends here: the daemon kills this guest, unused by any run.
    });
    assert_eq!(
        inside,
        format!("{first}\nrepo: 0\nmounts: 0\nimages: 0\ndisks: 3\n0\n"),
        "the warm guest before any hand-off"
    );

    // A run through the daemon gets the next warm guest, freshly made.
    let second = daemon.ready(&s, std::slice::from_ref(&first));
    s.write("greet.sh", "#!/bin/sh\n# warm\necho \"hello, $1\"\n")
        .commit("warm");
    let warm = s.run(&["run"]);
    warm.expect_code(code::SUCCESS, "run through the warm guest");
    assert!(
        warm.warm() && !warm.restored(),
        "the run takes the warm guest:\n{}",
        warm.stderr
    );
    assert!(
        warm.stderr
            .contains(&format!("using the reprise daemon's warm guest {second}")),
        "{}",
        warm.stderr
    );
    assert_eq!(warm.stdout_bytes, HELLO_STDOUT, "{}", warm.stderr);

    // The same tree restored here without a daemon: the same result but
    // for where and how fast it ran.
    cold.write("greet.sh", "#!/bin/sh\n# warm\necho \"hello, $1\"\n")
        .commit("warm");
    let restored = cold.run(&["run"]);
    restored.expect_code(code::SUCCESS, "the same tree, restored");
    assert!(restored.restored(), "{}", restored.stderr);
    // The output record keeps timing, so its digest differs; the bytes
    // do not.
    assert_eq!(restored.stdout_bytes, warm.stdout_bytes);
    let (a, b) = (
        stored_manifest(&s, &warm),
        stored_manifest(&cold, &restored),
    );
    for field in [
        "key",
        "inputs",
        "outcome",
        "exit_code",
        "accel",
        "artifacts",
        "container_image",
        "crontab",
    ] {
        assert_eq!(a[field], b[field], "{field} differs:\n{a:#}\n{b:#}");
    }
    assert!(a["container_image"].is_string(), "{a:#}");
    // Each started from a generation of the repository's snapshot, which
    // the sandboxes share (same namespace), or from none ("fresh").
    for m in [&a, &b] {
        let generation = m["snapshot"].as_str().unwrap_or_default();
        // On a fresh cache the first of them finds no snapshot yet.
        assert!(
            generation == "fresh"
                || (generation.len() == 64 && generation.bytes().all(|c| c.is_ascii_hexdigit())),
            "{m:#}"
        );
    }
    let phases = |m: &serde_json::Value| -> Vec<String> {
        m["phases"]
            .as_array()
            .expect("phases")
            .iter()
            .map(|p| p["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(phases(&a)[0], "warm", "{a:#}");
    assert_eq!(phases(&b)[0], "restore", "{b:#}");

    // The next run gets another guest: each serves one run only.
    let third = daemon.ready(&s, &[first.clone(), second.clone()]);
    s.write("greet.sh", "#!/bin/sh\n# warm again\necho \"hello, $1\"\n")
        .commit("warm again");
    let again = s.run(&["run"]);
    again.expect_code(code::SUCCESS, "a second run through a warm guest");
    assert!(
        again
            .stderr
            .contains(&format!("using the reprise daemon's warm guest {third}")),
        "{}",
        again.stderr
    );
    drop(daemon);
}

/// Answers every connection on the host's loopback with `token`, the way
/// a developer's local service would; returns its port.
fn host_service(token: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            use std::io::{Read, Write};
            // The request first: a reply to a socket that was never read
            // is reset, and the probe would see nothing.
            let mut request = Vec::new();
            let mut buf = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(conn, "HTTP/1.0 200 OK\r\n\r\n{token}\n");
        }
    });
    port
}

/// A preparation step that says what it can reach: the outside network
/// (Debian's mirror) and a service on the host's loopback through the
/// guest's gateway. Prints `<name>: reachable` with the answer's first
/// line, or `<name>: unreachable`.
fn probe_script(port: u16) -> String {
    format!(
        r#"#!/bin/bash
probe() {{
  answer=$(timeout 20 bash -c "exec 3<>/dev/tcp/$2/$3 || exit; printf 'GET /debian/ HTTP/1.1\r\nHost: $2\r\nConnection: close\r\n\r\n' >&3; head -c 200 <&3" 2>/dev/null)
  if [ -n "$answer" ]; then echo "$1: reachable, answered: $answer"; else echo "$1: unreachable"; fi
}}
probe outside deb.debian.org 80
probe host-loopback 10.0.2.2 {port}
"#
    )
}

#[test]
fn preparation_has_the_network_the_tests_and_the_host_do_not() {
    const TOKEN: &str = "reprise-test-host-service-7f3c";
    let port = host_service(TOKEN);
    let s = copy_of_fixture();
    let _vm = vm_lock();
    let mkfile = fs::read_to_string(example_hello().join("mkfile")).expect("hello mkfile");
    let mkfile = mkfile.replacen("base-image:V:\n", "base-image:V:\n\tbash ./probe.sh\n", 1);
    assert!(mkfile.contains("probe.sh"), "{mkfile}");
    let test = "#!/bin/sh\n# network probe\n\
        echo \"interfaces: $(sed 1,2d /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\\n' ' ')\"\n\
        awk '$2 == \"00000000\" { up = 1 } END { print \"default route:\", up ? \"yes\" : \"no\" }' /proc/net/route\n\
        echo probed > report.txt\n";
    s.write("mkfile", &mkfile)
        .write("probe.sh", &probe_script(port))
        .write("test.sh", test)
        .commit("probe the network");

    // Preparation reaches the outside network, and nothing of the host:
    // the gateway is not the host's loopback. The tests have only loopback.
    let hermetic = s.run(&["run"]);
    hermetic.expect_code(code::SUCCESS, "hermetic run");
    let said = format!("{}{}", hermetic.stdout, hermetic.stderr);
    assert!(
        said.contains("outside: reachable, answered: HTTP/1."),
        "base-image reaches Debian's mirror:\n{said}"
    );
    assert!(
        !said.contains(TOKEN),
        "the host's loopback service must not be reachable from the guest:\n{said}"
    );
    assert!(
        hermetic.stdout.contains("interfaces: lo \n"),
        "by default the container has only loopback:\n{}",
        hermetic.stdout
    );
    assert!(hermetic.restored(), "{}", hermetic.stderr);

    // The same tree with the network is another key: a networked run is
    // not hermetic, so it neither replays the hermetic result nor is
    // replayed as one. It restores the saved guest like any run.
    let keys = [s.run(&["key"]), s.run(&["key", "--network"])];
    assert_ne!(keys[0].stdout, keys[1].stdout, "network is a key input");
    let networked = s.run(&["run", "--network"]);
    networked.expect_code(code::SUCCESS, "run with --network");
    assert!(!networked.replayed(), "{}", networked.stderr);
    assert!(
        networked.stdout.contains("eth0"),
        "--network gives the tests the guest's network:\n{}",
        networked.stdout
    );
    assert!(
        networked.stdout.contains("default route: yes"),
        "{}",
        networked.stdout
    );
    assert!(
        networked.restored(),
        "the saved guest has its network card, so --network restores:\n{}",
        networked.stderr
    );

    // A repository that builds offline turns preparation's network off.
    let toml = fs::read_to_string(s.repo().join("reprise.toml")).expect("reprise.toml");
    s.write(
        "reprise.toml",
        &format!("{toml}\n[network]\nprepare = false\n"),
    )
    .commit("offline preparation");
    let offline = s.run(&["run"]);
    offline.expect_code(code::SUCCESS, "offline preparation");
    let said = format!("{}{}", offline.stdout, offline.stderr);
    assert!(
        said.contains("outside: unreachable"),
        "[network] prepare = false takes the network from preparation:\n{said}"
    );
    // ... and a run that asks for the network still gives it to the tests.
    let asked = s.run(&["run", "--network"]);
    asked.expect_code(code::SUCCESS, "offline preparation, networked tests");
    let said = format!("{}{}", asked.stdout, asked.stderr);
    assert!(said.contains("outside: unreachable"), "{said}");
    assert!(
        asked.stdout.contains("default route: yes"),
        "the network is back up for the tests:\n{}",
        asked.stdout
    );
}

#[test]
fn the_realistic_example_builds_its_image_from_a_containerfile_and_passes() {
    let s = Sandbox::new();
    s.git_init();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wordfreq/.");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(&example)
        .arg(s.repo())
        .status()
        .expect("cp runs");
    assert!(copied.success());
    s.commit("wordfreq");
    let _vm = vm_lock();
    let first = s.run(&["run", "--no-serve"]);
    first.expect_code(code::SUCCESS, "wordfreq's tests");
    assert!(
        first.stdout.contains("5 passed, 0 failed"),
        "{}",
        first.stdout
    );
    let report =
        fs::read_to_string(s.repo().join("reprise-artifacts/test-report.txt")).unwrap_or_default();
    assert!(
        report.contains("PASS punct"),
        "the report artifact: {report:?}"
    );
    let replay = s.run(&["run", "--no-serve"]);
    replay.expect_code(code::SUCCESS, "replay");
    assert!(replay.replayed() && !replay.booted(), "{}", replay.stderr);
    assert!(
        replay.stdout.ends_with("5 passed, 0 failed\n"),
        "{}",
        replay.stdout
    );

    // The podman driver (no VM) runs the same tests to the same results.
    fs::remove_dir_all(s.repo().join("reprise-artifacts")).expect("clean");
    let podman = s.run(&["run", "--no-serve", "--driver", "podman"]);
    podman.expect_code(code::SUCCESS, "wordfreq under the podman driver");
    assert!(!podman.booted() && !podman.replayed(), "{}", podman.stderr);
    assert!(
        podman.stdout.contains("5 passed, 0 failed"),
        "{}",
        podman.stdout
    );
    assert_eq!(
        fs::read_to_string(s.repo().join("reprise-artifacts/test-report.txt")).unwrap_or_default(),
        report,
        "the same report under both drivers"
    );
}

#[test]
fn the_podman_driver_agrees_with_qemu_and_a_dry_run_starts_nothing() {
    let s = copy_of_fixture();
    let qemu_report = fs::read(s.repo().join("reprise-artifacts/report.txt")).expect("report");
    // A dry run of a new tree: a plan, no VM, nothing stored.
    s.write("greet.sh", "#!/bin/sh\n# planned\necho \"hello, $1\"\n")
        .commit("planned");
    let before = s.results_list();
    let dry = s.run(&["run", "--no-serve", "--driver", "dry-run"]);
    dry.expect_code(code::SUCCESS, "dry run");
    assert!(!dry.booted() && !dry.replayed(), "{}", dry.stderr);
    for part in [
        "plan of `reprise run` with the qemu driver",
        "mk prepare-runtime",
        "localhost/hello-test",
        "--network none",
        "report.txt",
    ] {
        assert!(dry.stdout.contains(part), "{part}:\n{}", dry.stdout);
    }
    assert_eq!(s.results_list(), before, "a dry run stores nothing");
    // Back on the fixture's tree, the podman driver runs it for real (its
    // key is another than the VM's) and agrees on output and artifacts.
    s.git(&["reset", "-q", "--hard", "HEAD~1"]);
    let keys = [s.run(&["key"]), s.run(&["key", "--driver", "podman"])];
    assert_ne!(
        keys[0].stdout, keys[1].stdout,
        "the driver class is a key input"
    );
    // (The planned commit took the artifacts folder in; the reset took it out.)
    let _ = fs::remove_file(s.repo().join("reprise-artifacts/report.txt"));
    let podman = s.run(&["run", "--no-serve", "--driver", "podman"]);
    podman.expect_code(code::SUCCESS, "hello under the podman driver");
    assert!(
        !podman.booted() && !podman.replayed(),
        "no VM:\n{}",
        podman.stderr
    );
    assert!(podman.stderr.contains("start done"), "{}", podman.stderr);
    assert!(
        podman
            .stdout_bytes
            .windows(HELLO_STDOUT.len())
            .any(|w| w == HELLO_STDOUT),
        "the tests' stdout as under qemu:\n{:?}",
        podman.stdout
    );
    assert_eq!(
        fs::read(s.repo().join("reprise-artifacts/report.txt")).expect("report"),
        qemu_report
    );
    let shown = show_stored(&s, &podman);
    assert!(shown.contains("under container (podman)"), "{shown}");
    let again = s.run(&["run", "--no-serve", "--driver", "podman"]);
    again.expect_code(code::SUCCESS, "podman replay");
    assert!(again.replayed(), "{}", again.stderr);
}

#[test]
fn a_committed_artifacts_symlink_is_never_written_through() {
    let s = Sandbox::new();
    s.copy_from(&example_hello()).git_init();
    let outside = s.dir.path().join("outside");
    fs::create_dir(&outside).expect("outside");
    std::os::unix::fs::symlink("../outside", s.repo().join("reprise-artifacts")).expect("symlink");
    s.commit("artifacts go elsewhere");
    let _vm = vm_lock();
    // A real run: the tests pass and the result is kept, but its artifacts
    // are not written through the symlink. Restoring artifacts is the
    // pipeline's, whatever the driver: the podman one (no VM) runs it.
    let run_args = ["run", "--no-serve", "--driver", "podman"];
    let run = s.run(&run_args);
    run.expect_code(code::CONTRACT, "artifacts folder is a symlink");
    assert!(run.ran_here(), "{}", run.stderr);
    assert!(
        run.stderr.contains("reprise-artifacts is a symbolic link"),
        "says why and what to do:\n{}",
        run.stderr
    );
    assert_eq!(fs::read_dir(&outside).expect("outside").count(), 0);
    // Its replay refuses the same way.
    let replay = s.run(&run_args);
    replay.expect_code(code::CONTRACT, "replay into a symlink");
    assert!(replay.replayed() || !replay.ran_here(), "{}", replay.stderr);
    assert_eq!(fs::read_dir(&outside).expect("outside").count(), 0);
    // A symlink at the artifact's own name is replaced, not written through.
    fs::remove_file(s.repo().join("reprise-artifacts")).expect("rm");
    fs::create_dir(s.repo().join("reprise-artifacts")).expect("mkdir");
    fs::write(outside.join("report.txt"), "precious").expect("write");
    std::os::unix::fs::symlink(
        "../../outside/report.txt",
        s.repo().join("reprise-artifacts/report.txt"),
    )
    .expect("symlink");
    let replay = s.run(&run_args);
    replay.expect_code(code::SUCCESS, "replay beside a symlink");
    assert_eq!(
        fs::read_to_string(outside.join("report.txt")).unwrap(),
        "precious"
    );
    let report = s.repo().join("reprise-artifacts/report.txt");
    assert!(
        !report.is_symlink(),
        "the link was replaced by the artifact"
    );
    assert!(
        fs::read_to_string(&report).unwrap().contains("1 passed"),
        "{:?}",
        fs::read_to_string(&report)
    );
}

/// An mkfile whose test image is busybox with a `/bin/verdict` that exits
/// with `$VERDICT`; `build` is how base-image decides to build it.
fn verdict_mkfile(build: &str, verdict: u8, test: &str) -> String {
    format!(
        "</usr/lib/reprise/ci.mk\n\
         CONTAINERIMAGE=localhost/verdict-test\n\
         base-image:V:\n\
         \tif {build}; then\n\
         \t\troot=`mktemp -d`\n\
         \t\tmkdir -p $root/bin $root/tmp\n\
         \t\tcp /bin/busybox $root/bin/busybox\n\
         \t\tfor applet in `$root/bin/busybox --list`; do\n\
         \t\t\t[ $applet = busybox ] || ln -s busybox $root/bin/$applet\n\
         \t\tdone\n\
         \t\tprintf '#!/bin/sh\\nexit {verdict}\\n' > $root/bin/verdict\n\
         \t\tchmod +x $root/bin/verdict\n\
         \t\ttar -C $root -c . | podman import - $CONTAINERIMAGE\n\
         \t\trm -rf $root\n\
         \tfi\n\
         test:V:\n\
         \t{test}\n"
    )
}

/// Builds the image whatever podman holds.
const ALWAYS: &str = "true";
/// Builds it only if podman does not hold it yet.
const IF_MISSING: &str = "! podman image exists $CONTAINERIMAGE";

#[test]
fn a_repository_declaring_anothers_namespace_cannot_plant_an_image_in_its_snapshot() {
    let ns = "namespace = \"example.com/shared/project\"\n";
    // The attacker's repository: an image whose verdict always passes.
    let planter = Sandbox::new();
    planter
        .write("mkfile", &verdict_mkfile(ALWAYS, 0, "verdict"))
        .write("reprise.toml", ns)
        .git_init()
        .commit("plant");
    // The victim: honest tests that fail, building its image only when
    // podman has none (as the examples do).
    let victim = Sandbox::new();
    victim
        .write("mkfile", &verdict_mkfile(IF_MISSING, 1, "verdict"))
        .write("reprise.toml", ns)
        .git_init()
        .commit("honest");
    let _vm = vm_lock();
    let planted = planter.run(&["run", "--no-serve"]);
    planted.expect_code(code::SUCCESS, "the planter's run passes");
    let honest = victim.run(&["run", "--no-serve"]);
    honest.expect_code(
        code::TESTS_FAILED,
        "the victim's own image, its own verdict",
    );
    assert!(
        !honest.stderr.contains("using this repository's snapshot"),
        "the planter's snapshot was used:\n{}",
        honest.stderr
    );
}

#[test]
fn a_failed_run_leaves_nothing_in_the_snapshot_for_the_next_run() {
    let s = Sandbox::new();
    s.write("mkfile", &verdict_mkfile(ALWAYS, 0, "false"))
        .git_init()
        .commit("plants an image, then fails");
    let _vm = vm_lock();
    let first = s.run(&["run", "--no-serve"]);
    first.expect_code(code::TESTS_FAILED, "the planting run fails");
    s.write("mkfile", &verdict_mkfile(IF_MISSING, 1, "verdict"))
        .commit("honest tests");
    let second = s.run(&["run", "--no-serve"]);
    second.expect_code(
        code::TESTS_FAILED,
        "built its own image, got its own verdict",
    );
    assert!(
        !second.stderr.contains("using this repository's snapshot"),
        "the failed run's snapshot was kept:\n{}",
        second.stderr
    );
}

#[test]
fn the_tests_colour_when_the_users_terminal_does() {
    let s = Sandbox::new();
    let test_sh = fs::read_to_string(example_hello().join("test.sh")).expect("test.sh");
    s.copy_from(&example_hello())
        .write(
            "test.sh",
            &format!("echo \"term=${{TERM:-none}} force=${{FORCE_COLOR:-none}}\"\n{test_sh}"),
        )
        .git_init()
        .commit("says what colour it was given");
    // On a terminal (a pseudo-terminal from script(1)): the tests get the
    // terminal's type and the force-colour switches, and record them.
    let log = s.dir.path().join("typescript");
    let command = format!(
        "{} run --no-serve --driver podman",
        run_support::reprise_bin().display()
    );
    let mut on_tty = s.reprise(&[]);
    on_tty.env("TERM", "xterm-256color").env_remove("NO_COLOR");
    let on_tty = Command::new("script")
        .args(["-q", "-e", "-c", &command])
        .arg(&log)
        .current_dir(s.repo())
        .envs(
            on_tty
                .get_envs()
                .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
        )
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .env_remove("CI")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script runs");
    let shown = fs::read_to_string(&log).unwrap_or_default();
    assert!(on_tty.status.success(), "{shown}");
    assert!(
        shown.contains("term=xterm-256color force=1"),
        "on a terminal:\n{shown}"
    );
    // The replay, into a pipe, shows what was recorded: with colour.
    let replay = s.run(&["run", "--no-serve", "--driver", "podman"]);
    replay.expect_code(code::SUCCESS, "replay");
    assert!(replay.replayed(), "{}", replay.stderr);
    assert!(
        replay.stdout.contains("term=xterm-256color force=1"),
        "{}",
        replay.stdout
    );
    // Not on a terminal: nothing is forced (podman's own TERM=xterm stays).
    s.write("README", "another tree\n").commit("another tree");
    let piped = s.run(&["run", "--no-serve", "--driver", "podman"]);
    piped.expect_code(code::SUCCESS, "piped run");
    assert!(
        piped.stdout.contains(" force=none") && !piped.stdout.contains("xterm-256color"),
        "{}",
        piped.stdout
    );
}
