//! Why a run did not produce a result, and the documented exit code of
//! each reason (`reprise_protocol::exit`), so a CI stub can tell "the tests
//! failed" from "the VM did not boot".

use std::time::Duration;

use reprise_protocol::exit;
use thiserror::Error;

use crate::image::ImageError;
use crate::replay::ReplayError;
use crate::repo::RepoError;
use crate::snapshots::SnapshotError;
use crate::store::StoreError;
use crate::text::error_chain;
use crate::vm::{BootError, VmError};

/// Why a run did not produce a result.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{0}")]
    Contract(String),
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Check(Vec<crate::check::Problem>),
    #[error("{0}")]
    Usage(String),
    #[error("the base image")]
    Image(#[from] ImageError),
    #[error("booting the VM")]
    Boot(#[from] BootError),
    #[error("in the VM")]
    Vm(#[from] VmError),
    #[error("in the VM: {}\n--- last lines of the guest console ---\n{console}", error_chain(.error))]
    Guest { error: VmError, console: String },
    #[error("`mk prepare-runtime` failed with status {code}")]
    Prepare { code: i32, console: String },
    #[error("the run reached its timeout of {0:?}; the VM was stopped and nothing was kept")]
    Timeout(Duration),
    #[error("the result store")]
    Store(#[from] StoreError),
    #[error("replaying the stored result")]
    Replay(#[from] ReplayError),
    #[error("the repository's snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error("the podman driver: {0}")]
    Podman(String),
    /// The tests wrote more output than a result may hold; recording
    /// stopped at the limit.
    #[error(
        "{0}: the tests wrote more output than a result holds; recording stopped at the limit and nothing was kept (a result this large could not be replayed or served)"
    )]
    OutputTooLarge(reprise_protocol::manifest::Oversize),
    #[error("{0}")]
    Infra(String),
    /// `--mode replay-only` found no result that counts.
    #[error(
        "nobody whose results count for CI in {namespace} has run target {target} of {commit} yet (key {key}); on such a machine, `reprise run --rev {commit} --target {target}` produces it{why}"
    )]
    NotCounted {
        namespace: String,
        commit: String,
        target: String,
        key: String,
        /// Why a stored result did not count, if one was found.
        why: String,
    },
}

impl RunError {
    /// The documented exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Repo(RepoError::Config { .. }) => exit::CONTRACT,
            RunError::Repo(RepoError::Io { .. } | RepoError::Git(_)) => exit::INFRA,
            RunError::Repo(_) => exit::REPOSITORY,
            RunError::Contract(_) | RunError::Check(_) => exit::CONTRACT,
            RunError::Usage(_) => exit::USAGE,
            RunError::Prepare { .. } => exit::PREPARE_FAILED,
            RunError::Timeout(_) => exit::TIMEOUT,
            RunError::Store(StoreError::Full(_)) => exit::STORE_FULL,
            // Tests that make more output or artifacts than a result holds.
            RunError::Store(StoreError::TooLarge(_)) | RunError::OutputTooLarge(_) => {
                exit::CONTRACT
            }
            RunError::Image(ImageError::DiskFull { .. }) => exit::STORE_FULL,
            // A symlink in the artifacts folder: the repository's doing.
            RunError::Replay(ReplayError::Unsafe(_)) => exit::CONTRACT,
            RunError::NotCounted { .. } => exit::NOT_COUNTED,
            _ => exit::INFRA,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_failure() {
        let codes = [
            RunError::Repo(RepoError::NoCommits).exit_code(),
            RunError::Contract("x".into()).exit_code(),
            RunError::Usage("x".into()).exit_code(),
            RunError::Prepare {
                code: 1,
                console: String::new(),
            }
            .exit_code(),
            RunError::Timeout(Duration::from_secs(1)).exit_code(),
            RunError::Store(StoreError::Full("/".into())).exit_code(),
            RunError::Infra("x".into()).exit_code(),
            RunError::NotCounted {
                namespace: "n".into(),
                commit: "c".into(),
                target: "t".into(),
                key: "k".into(),
                why: String::new(),
            }
            .exit_code(),
        ];
        let unique: std::collections::BTreeSet<i32> = codes.iter().copied().collect();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
        assert!(!codes.contains(&exit::SUCCESS) && !codes.contains(&exit::TESTS_FAILED));
    }
}
