//! The `mk` binary.
fn main() {}
