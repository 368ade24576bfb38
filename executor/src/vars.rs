//! Every environment variable the `reprise` binary reads, in one place.
//! (The `reprise-orchestrator` binary reads only `REPRISE_LOG`, or `RUST_LOG` when it is unset.)
//!
//! | variable | read by | meaning |
//! | --- | --- | --- |
//! | `REPRISE_ORCHESTRATOR` | [`crate::link::settings`] | the orchestrator, `HOST:PORT` |
//! | `REPRISE_CREDENTIALS` | [`crate::link::settings`] | the credentials file |
//! | `REPRISE_DIRECT` | `main` (`reprise daemon`) | the address (TCP and UDP port) the daemon takes direct fetches on when `--direct` is not given ([`crate::link::direct`]) |
//! | `REPRISE_CA_FINGERPRINT`, `REPRISE_AUDIENCE` | `reprise login` | the team CA's sha256 the orchestrator must present; the token's audience |
//! | `ACTIONS_ID_TOKEN_REQUEST_URL`, `ACTIONS_ID_TOKEN_REQUEST_TOKEN` | [`crate::link::login`] | GitHub Actions: where and how to ask for the job's ID token |
//! | `REPRISE_ID_TOKEN` | [`crate::link::login`] | GitLab CI (or any CI): the job's ID token itself |
//! | `CI`, `GITHUB_STEP_SUMMARY` | `main` | CI mode (`CI=true`); where GitHub wants the job's Markdown summary |
//! | `NO_COLOR`, `TERM` | `main` (terminal) | no colour; a terminal that cannot draw a spinner (`dumb`) |
//! | `PATH` | [`crate::paths`], [`crate::vm`] | where qemu, podman and the guest binaries are found |
//! | `REPRISE_DRIVER` | [`crate::driver`] | `qemu`, `podman` or `dry-run` when `--driver` is not given |
//! | `REPRISE_COLD_BOOT` | [`crate::driver::qemu`] | `1`: boot VMs cold instead of restoring the saved guest |
//! | `REPRISE_KEEP` | `main` | passed results kept per repository and target (default 1) |
//! | `REPRISE_MAX_AGE` | `main` | results older than this are dropped (`7d`, `12h`) |
//! | `REPRISE_LOG` | `main` | the log filter (`tracing`'s `EnvFilter` syntax; default `warn`) |
//! | `REPRISE_GUEST_BIN_DIR` | [`crate::vm`] | where `reprise-guest` and `mk` are, if not beside `reprise` |
//! | `REPRISE_PAUSE_AT` | [`crate::faults`] | tests only: the point a command waits at to be killed |
//! | `REPRISE_TEST_STOP_SERVING_AT` | [`crate::link::serve`] | tests only: a producer cuts every transfer it serves at this chunk of the result (a resumed one starting past it is not cut) |
//! | `REPRISE_MIRROR`, `REPRISE_SUITE`, `REPRISE_IMAGE_SIZE` | `image/build.sh` | the Debian mirror, suite and disk size of the base image |
//! | `XDG_CACHE_HOME`, `XDG_DATA_HOME`, `XDG_CONFIG_HOME`, `XDG_RUNTIME_DIR`, `HOME` | [`crate::paths`] | where things are kept |
//! | `USER`, `LOGNAME` | [`crate::pipeline`] | the producer's user name in a manifest |
//! | `TMPDIR` | [`crate::workdir`] | where runs make their work folders |
//! | the repository's counted and secret variables | [`crate::inputs`] | declared in `reprise.toml` or given with `--env`/`--secret` |

/// The orchestrator, `HOST:PORT`.
pub const ORCHESTRATOR_VAR: &str = "REPRISE_ORCHESTRATOR";
/// The credentials file.
pub const CREDENTIALS_VAR: &str = "REPRISE_CREDENTIALS";
/// The daemon's direct-fetch address when `--direct` is not given.
pub const DIRECT_VAR: &str = "REPRISE_DIRECT";
/// The driver when `--driver` is not given.
pub const DRIVER_VAR: &str = "REPRISE_DRIVER";
/// Boot VMs cold instead of restoring the saved guest.
pub const COLD_BOOT_VAR: &str = "REPRISE_COLD_BOOT";

/// Passed results kept per repository and target.
pub const KEEP_VAR: &str = "REPRISE_KEEP";
/// Results older than this are dropped.
pub const MAX_AGE_VAR: &str = "REPRISE_MAX_AGE";
/// The log filter.
pub const LOG_VAR: &str = "REPRISE_LOG";
/// Where the guest binaries are.
pub const GUEST_BIN_DIR_VAR: &str = "REPRISE_GUEST_BIN_DIR";
/// The Debian mirror the base image is built from (also read by
/// `image/build.sh`, with `REPRISE_SUITE` and `REPRISE_IMAGE_SIZE`).
pub const MIRROR_VAR: &str = "REPRISE_MIRROR";
/// Tests only: the pause point a command waits at ([`crate::faults`]).
pub const PAUSE_VAR: &str = "REPRISE_PAUSE_AT";
/// Tests only: the chunk at which a producer cuts every transfer it serves
/// ([`crate::link::serve::stop_serving_at`]).
pub const STOP_SERVING_AT_VAR: &str = "REPRISE_TEST_STOP_SERVING_AT";
