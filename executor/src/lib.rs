//! The reprise executor: the base image, the qemu VM driver, the run
//! pipeline, the local result store and replay. The `reprise` binary is
//! glue over this library.

pub mod accel;
pub mod beneath;
pub mod connected;
pub mod image;
pub mod layers;
pub mod paths;
pub mod peer;
pub mod pipeline;
pub mod redact;
pub mod replay;
pub mod repo;
pub mod settings;
pub mod states;
pub mod store;
pub mod vm;
