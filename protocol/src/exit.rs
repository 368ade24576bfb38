//! The exit codes of the `reprise` binary, so a CI stub can tell "the tests
//! failed" from "the VM did not boot". Documented in the README.

/// The tests ran (or were replayed) and passed; a command did what it was asked.
pub const SUCCESS: i32 = 0;
/// The tests ran and failed.
pub const TESTS_FAILED: i32 = 1;
/// The command line was wrong.
pub const USAGE: i32 = 2;
/// Infrastructure failed: the image, the VM, podman, the store.
pub const INFRA: i32 = 3;
/// The repository or revision could not be used (not a repository, no
/// commits, unknown revision).
pub const REPOSITORY: i32 = 4;
/// The repository does not follow the contract (no mkfile, no such target,
/// no or unknown CONTAINERIMAGE).
pub const CONTRACT: i32 = 5;
/// `mk prepare-runtime` failed.
pub const PREPARE_FAILED: i32 = 6;
/// The run reached its `--timeout`.
pub const TIMEOUT: i32 = 7;
/// The result store has no room left (disk full).
pub const STORE_FULL: i32 = 8;
/// Interrupted (SIGINT/SIGTERM); nothing was committed.
pub const INTERRUPTED: i32 = 130;
/// `reprise results verify` found damaged results and quarantined them.
pub const DAMAGED: i32 = 9;
/// `--mode replay-only`: no result that counts for CI exists for the key,
/// so nothing was run.
pub const NOT_COUNTED: i32 = 10;
/// `--mode verify`: the tests, run here again, disagreed with the replayed
/// result (reported to the orchestrator against its producer).
pub const MISMATCH: i32 = 11;
/// `reprise login`: the CI system gave no token or the orchestrator refused
/// the login; `reprise whoami`: no credentials, or they expired.
pub const LOGIN_REFUSED: i32 = 12;
/// `reprise login`: the orchestrator's team CA was not confirmed (no
/// terminal to ask on and no `--ca`/`--ca-fingerprint`, the answer was no,
/// or it presents another CA than the one pinned); nothing was sent to it.
pub const CA_UNCONFIRMED: i32 = 13;
