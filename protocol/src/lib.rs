//! Reprise's wire and persisted types: the guest stream framing, the image
//! manifest, the run key, the result manifest and output record, the
//! repository's declarations, exit codes. Nothing here does IO; every
//! persisted or wire format carries a version.

pub mod clock;
pub mod digest;
pub mod exit;
pub mod grants;
pub mod guest_stream;
pub mod hex;
pub mod image;
pub mod key;
pub mod local;
pub mod manifest;
pub mod policy;
pub mod record;
pub mod repo_config;
pub mod seal;
pub mod sign;
pub mod wire;
