//! What the user sees besides the tests' own output: notes, phases and
//! image build steps. The binary implements it for a terminal; the library
//! only calls it.

use std::time::Duration;

/// Where notes and phases go.
pub trait Ui: Send + Sync {
    /// A one-line note (dirty tree, accelerator, provenance).
    fn note(&self, line: &str);
    /// A phase finished.
    fn phase(&self, name: &str, took: Duration);
    /// The base image build reports a step.
    fn image_step(&self, step: &str);
}
