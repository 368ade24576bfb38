//! A command's output, as the user sees it and as the result keeps it:
//! shown live on the terminal, redacted of the secrets' values, and (for
//! the tests) recorded with its timing into a file, never whole in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::record::{self, StreamId};
use sha2::{Digest, Sha256};

use crate::redact::{Patterns, Redactor};
use crate::ui::Ui;
use crate::vm::Stream;

/// Output of a command: live to the terminal (through the [`Ui`], which
/// keeps its progress line out of the way), redacted, and maybe recorded.
pub struct Recorder<'u> {
    sink: Option<Sink>,
    start: Instant,
    redact: [Redactor; 2],
    ui: &'u dyn Ui,
}

impl std::fmt::Debug for Recorder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("sink", &self.sink)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// Where a recording goes: the file, and what has been written to it.
#[derive(Debug)]
struct Sink {
    path: PathBuf,
    file: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
    /// The first write that failed; the recording is then unusable.
    error: Option<std::io::Error>,
}

/// A finished recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub path: PathBuf,
    pub sha256: Sha256Digest,
    pub bytes: u64,
}

impl<'u> Recorder<'u> {
    /// Shows output without keeping it.
    pub fn shown(secrets: &Patterns, ui: &'u dyn Ui) -> Recorder<'u> {
        Recorder {
            sink: None,
            start: Instant::now(),
            redact: [Redactor::new(secrets), Redactor::new(secrets)],
            ui,
        }
    }

    /// Shows output and records it into a new file at `path`.
    pub fn to_file(
        secrets: &Patterns,
        path: &Path,
        ui: &'u dyn Ui,
    ) -> std::io::Result<Recorder<'u>> {
        let file = File::create(path)?;
        Ok(Recorder {
            sink: Some(Sink {
                path: path.to_path_buf(),
                file: BufWriter::with_capacity(64 * 1024, file),
                hasher: Sha256::new(),
                bytes: 0,
                error: None,
            }),
            ..Recorder::shown(secrets, ui)
        })
    }

    fn emit(&mut self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let at = self.start.elapsed().as_millis() as u32;
        self.ui.output(stream, bytes);
        if let Some(sink) = &mut self.sink {
            let id = match stream {
                Stream::Stdout => StreamId::Stdout,
                Stream::Stderr => StreamId::Stderr,
            };
            let mut entry = Vec::with_capacity(bytes.len() + 32);
            if sink.bytes == 0 {
                entry.extend_from_slice(record::MAGIC);
            }
            record::push_entry(&mut entry, id, at, bytes);
            sink.write(&entry);
        }
    }

    pub fn feed(&mut self, stream: Stream, bytes: &[u8]) {
        let clean = self.redact[stream as usize].feed(bytes);
        self.emit(stream, &clean);
    }

    /// Flushes what the redactors held back, and closes the recording.
    /// An error here is an error of the disk the recording is on.
    pub fn finish(mut self) -> std::io::Result<Option<Recorded>> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = self.redact[stream as usize].finish();
            self.emit(stream, &rest);
        }
        let Some(mut sink) = self.sink.take() else {
            return Ok(None);
        };
        if let Some(e) = sink.error.take() {
            return Err(e);
        }
        sink.file.flush()?;
        sink.file.get_ref().sync_all()?;
        Ok(Some(Recorded {
            path: sink.path,
            sha256: Sha256Digest::finish(sink.hasher),
            bytes: sink.bytes,
        }))
    }
}

impl Sink {
    fn write(&mut self, data: &[u8]) {
        if self.error.is_some() {
            return;
        }
        match self.file.write_all(data) {
            Ok(()) => {
                self.hasher.update(data);
                self.bytes += data.len() as u64;
            }
            Err(e) => self.error = Some(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::Silent;

    #[test]
    fn a_recording_is_the_encoded_record_with_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.rec");
        let mut r = Recorder::to_file(
            &Patterns::new(&[("PW".into(), "hunter2".into())]),
            &path,
            &Silent,
        )
        .unwrap();
        r.feed(Stream::Stdout, b"one\n");
        r.feed(Stream::Stderr, b"pass=hunter2\n");
        let done = r.finish().unwrap().expect("recorded");
        let data = std::fs::read(&path).unwrap();
        assert_eq!(done.sha256, Sha256Digest::of(&data));
        assert_eq!(done.bytes, data.len() as u64);
        let entries = record::decode(&data).unwrap();
        // Each stream's redactor holds back a possible start of a secret,
        // so the streams interleave differently, but each reads whole.
        let text = |id: StreamId| -> String {
            let bytes: Vec<u8> = entries
                .iter()
                .filter(|e| e.stream == id)
                .flat_map(|e| e.bytes.clone())
                .collect();
            String::from_utf8(bytes).unwrap()
        };
        assert_eq!(text(StreamId::Stdout), "one\n");
        assert_eq!(text(StreamId::Stderr), "pass=[redacted]\n");
        assert_eq!(
            Recorder::shown(&Patterns::default(), &Silent)
                .finish()
                .unwrap(),
            None
        );
    }
}
