//! The guest helper.
fn main() {}
