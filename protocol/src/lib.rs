//! Reprise's wire and persisted types: the guest stream framing, the image
//! manifest, the run key, the result manifest, exit codes. Nothing here does
//! IO; every persisted or wire format carries a version.

pub mod exit;
pub mod guest_stream;
pub mod hex;
pub mod image;
