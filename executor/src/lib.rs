//! The reprise executor: the run pipeline and its drivers (qemu, host
//! podman, dry run), the base image, the local result store and replay,
//! the link to the orchestrator and the daemon. The `reprise` binary is
//! glue over this library; ARCHITECTURE.md has the code map and glossary.

pub mod accel;
pub mod beneath;
pub mod check;
pub mod daemon;
pub mod driver;
pub mod error;
pub mod faults;
pub mod image;
pub mod inputs;
pub mod link;
pub mod part_digest;
pub mod paths;
pub mod pipeline;
pub mod recorder;
pub mod redact;
pub mod replay;
pub mod repo;
pub mod saved_guests;
pub mod schedule;
pub mod serving;
pub mod signals;
pub mod snapshots;
pub mod steps;
pub mod store;
pub mod tags;
pub mod text;
pub mod ui;
pub mod vars;
pub mod vm;
pub mod workdir;
