//! A command's output, as the user sees it and as the result keeps it:
//! shown live on the terminal, redacted of the secrets' values, and (for
//! the tests) recorded with its timing.

use std::io::Write;
use std::time::Instant;

use reprise_protocol::record::{self, StreamId};

use crate::redact::Redactor;
use crate::vm::Stream;

/// Output of a command: live to the terminal, redacted, and recorded.
#[derive(Debug)]
pub struct Recorder {
    /// The encoded record (empty unless kept).
    pub record: Vec<u8>,
    start: Instant,
    redact: [Redactor; 2],
    keep: bool,
}

impl Recorder {
    pub fn new(secrets: &[String], keep: bool) -> Recorder {
        Recorder {
            record: Vec::new(),
            start: Instant::now(),
            redact: [Redactor::new(secrets), Redactor::new(secrets)],
            keep,
        }
    }

    fn emit(&mut self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let at = self.start.elapsed().as_millis() as u32;
        let _ = match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            Stream::Stderr => std::io::stderr().lock().write_all(bytes),
        };
        if self.keep {
            let id = match stream {
                Stream::Stdout => StreamId::Stdout,
                Stream::Stderr => StreamId::Stderr,
            };
            record::push(&mut self.record, id, at, bytes);
        }
    }

    pub fn feed(&mut self, stream: Stream, bytes: &[u8]) {
        let clean = self.redact[stream as usize].feed(bytes);
        self.emit(stream, &clean);
    }

    pub fn finish(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = self.redact[stream as usize].finish();
            self.emit(stream, &rest);
        }
    }
}
