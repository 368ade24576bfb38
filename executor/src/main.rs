//! The `reprise` binary.
fn main() {}
