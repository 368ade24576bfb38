//! What the user sees besides the tests' own output: notes, phases and
//! image build steps. The binary implements it for a terminal; the library
//! only calls it.

use std::io::Write;
use std::time::Duration;

use crate::vm::Stream;

/// Where notes, phases and live command output go.
pub trait Ui: Send + Sync {
    /// A one-line note (dirty tree, accelerator, provenance).
    fn note(&self, line: &str);
    /// A phase starts (it ends with [`Ui::phase`]).
    fn begin(&self, _name: &str) {}
    /// A phase finished.
    fn phase(&self, name: &str, took: Duration);
    /// The base image build reports a step.
    fn image_step(&self, step: &str);
    /// A command is about to run in the OS (shown with `-v`).
    fn command(&self, _argv: &[String]) {}
    /// The end of a run: passed, failed, replayed. Shown even with `-q`.
    fn verdict(&self, line: &str) {
        self.note(line);
    }
    /// Live output of a command in the OS, already redacted: the tests'
    /// stdout to stdout, everything else to stderr.
    fn output(&self, stream: Stream, bytes: &[u8]) {
        write_stream(stream, bytes);
    }
}

/// Writes `bytes` to this process's stdout (flushed) or stderr.
pub fn write_stream(stream: Stream, bytes: &[u8]) {
    let _ = match stream {
        Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes).and_then(|()| out.flush())
        }
        Stream::Stderr => std::io::stderr().lock().write_all(bytes),
    };
}

/// A [`Ui`] that shows nothing but command output (library tests, the
/// daemon's scheduled runs use their own).
#[derive(Debug, Default)]
pub struct Silent;

impl Ui for Silent {
    fn note(&self, _line: &str) {}
    fn phase(&self, _name: &str, _took: Duration) {}
    fn image_step(&self, _step: &str) {}
}
