//! A real project, not ours: six's source distribution, fetched from PyPI
//! at test time and checked against its pinned digest, made a git
//! repository with only an mkfile added (`scripts/pypi-project.sh`, the
//! same script `examples/pypi-six` runs). Its `base-image` builds a Debian
//! test image with python3 and pytest from Debian's mirror in the guest;
//! the package's own unmodified test suite then runs with no network.

#[expect(
    dead_code,
    reason = "the support module is shared with run.rs; this file uses part of it"
)]
mod run_support;

use std::path::Path;
use std::process::Command;

use run_support::{Run, Sandbox, vm_lock};

/// `reprise results show` of the result a real run stored.
fn show(s: &Sandbox, run: &Run) -> String {
    let key = run
        .stderr
        .split("; result ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("the run names its stored result:\n{}", run.stderr));
    let shown = s.run(&["results", "show", key]);
    shown.expect_code(0, "results show");
    shown.stdout
}

/// The id (hex) of the container image a stored result says its tests
/// ran in.
fn image_of(shown: &str) -> String {
    shown
        .lines()
        .find_map(|l| l.strip_prefix("image:       the tests ran in container image sha256:"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no container image recorded:\n{shown}"))
        .to_string()
}

#[test]
fn a_pypi_packages_own_tests_pass_offline_replay_and_reuse_the_snapshot() {
    let s = Sandbox::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pypi-project.sh");
    let made = Command::new("bash")
        .arg(&script)
        .arg(s.repo())
        .output()
        .expect("pypi-project.sh runs");
    assert!(
        made.status.success(),
        "fetching six from PyPI failed:\n{}",
        String::from_utf8_lossy(&made.stderr)
    );
    // The package's own files and tests, and of ours only the mkfile.
    let tracked = s.git(&["ls-files"]);
    for file in ["mkfile", "six.py", "test_six.py", "setup.py"] {
        assert!(tracked.lines().any(|f| f == file), "{file}:\n{tracked}");
    }
    assert!(!tracked.contains("reprise.toml"), "{tracked}");

    let _vm = vm_lock();
    // The first run builds the test image from Debian's mirror (preparation
    // has the network) and runs the package's tests without one.
    let first = s.run(&["run", "--no-serve"]);
    first.expect_code(0, "six's own test suite");
    assert!(
        first.stdout.contains("network interfaces: lo\n"),
        "the test container has only loopback:\n{}",
        first.stdout
    );
    assert!(
        first.stdout.contains(" passed") && !first.stdout.contains(" failed"),
        "pytest's summary:\n{}",
        first.stdout
    );
    let shown = show(&s, &first);
    assert!(shown.contains("network none"), "{shown}");
    let image = image_of(&shown);
    // Preparation's output goes to stderr (stdout is the tests' alone).
    assert!(
        first.stderr.contains(&format!("sha256:{image}")),
        "base-image imported the image the tests ran in ({image}):\n{}",
        first.stderr
    );

    // The same tree again: a replay, which names the image too.
    let again = s.run(&["run", "--no-serve"]);
    again.expect_code(0, "replay");
    assert!(again.replayed() && !again.booted(), "{}", again.stderr);
    assert!(
        again.stderr.contains(&format!("image {}", &image[..12])),
        "the provenance line names the container image:\n{}",
        again.stderr
    );

    // A new commit runs for real on the repository's snapshot: the image
    // is found there, not built again.
    s.write("README.rst", "six, under Reprise\n")
        .commit("a change that is not a test");
    let second = s.run(&["run", "--no-serve"]);
    second.expect_code(0, "second real run");
    assert!(second.booted(), "{}", second.stderr);
    assert!(
        second.stderr.contains("using this repository's snapshot"),
        "{}",
        second.stderr
    );
    assert_eq!(
        image_of(&show(&s, &second)),
        image,
        "the second run's tests ran in the snapshot's image"
    );
    assert!(
        !second.stderr.contains(&format!("sha256:{image}")),
        "the image was not imported again:\n{}",
        second.stderr
    );
}
