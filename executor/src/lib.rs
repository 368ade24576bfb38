//! The reprise executor: the base image, the qemu VM driver, and (as they
//! land) the run pipeline, the result store and replay. The `reprise`
//! binary is glue over this library.

pub mod accel;
pub mod image;
pub mod paths;
pub mod vm;
