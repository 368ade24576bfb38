//! The manifest of a stored result: every key input, the outcome, timings,
//! who produced it and how, and the content addresses of its output record
//! and artifacts.

use serde::{Deserialize, Serialize};

use crate::key::KeyInputs;

/// Version of [`ResultManifest`]'s layout.
pub const MANIFEST_VERSION: u32 = 1;

/// Whether the run passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Passed,
    Failed,
}

/// How long one phase took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub ms: u64,
}

/// Who produced a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    pub host: String,
    pub user: String,
}

/// A file kept by content address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Path relative to the artifacts folder, `/`-separated.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// Unix permission bits.
    pub mode: u32,
}

/// A stored result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultManifest {
    pub version: u32,
    pub key: String,
    pub inputs: KeyInputs,
    /// The commit that was run (the key counts only its tree).
    pub commit: String,
    pub outcome: Outcome,
    /// Exit status of the test command.
    pub exit_code: i32,
    pub phases: Vec<Phase>,
    pub total_ms: u64,
    /// The accelerator the VM ran under (`kvm`, `tcg`), or `none`.
    pub accel: String,
    pub tool_version: String,
    pub producer: Producer,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Sha256 and size of the output record.
    pub output_sha256: String,
    pub output_bytes: u64,
    pub artifacts: Vec<Artifact>,
}
