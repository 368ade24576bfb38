//! A command's output, as the user sees it and as the result keeps it:
//! shown live on the terminal, redacted of the secrets' values, and (for
//! the tests) recorded with its timing into a file, never whole in memory
//! and never past a size limit: once the record would outgrow it, nothing
//! more is written (the output is still shown) and the recording ends in
//! [`RecordError::TooLarge`].

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::manifest::Oversize;
use reprise_protocol::record::{self, StreamId};
use sha2::{Digest, Sha256};
use thiserror::Error;

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
    /// The most the file may hold.
    limit: u64,
    /// What the record would hold without the limit; over it, nothing
    /// more is written.
    wanted: u64,
    /// The first write that failed; the recording is then unusable.
    error: Option<std::io::Error>,
}

/// Why a recording is unusable.
#[derive(Debug, Error)]
pub enum RecordError {
    /// The disk the recording is on.
    #[error("writing the output record")]
    Io(#[from] std::io::Error),
    /// The output outgrew the limit; what was recorded is a prefix.
    #[error(transparent)]
    TooLarge(Oversize),
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

    /// Shows output and records it into a new file at `path`, which is
    /// never written past `limit` bytes (a result's limit is
    /// [`reprise_protocol::manifest::MAX_RECORD_BYTES`]).
    pub fn to_file(
        secrets: &Patterns,
        path: &Path,
        limit: u64,
        ui: &'u dyn Ui,
    ) -> std::io::Result<Recorder<'u>> {
        let file = File::create(path)?;
        Ok(Recorder {
            sink: Some(Sink {
                path: path.to_path_buf(),
                file: BufWriter::with_capacity(64 * 1024, file),
                hasher: Sha256::new(),
                bytes: 0,
                limit,
                wanted: 0,
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

    /// Flushes what the redactors held back, and closes the recording:
    /// an error of the disk the recording is on, or output over the limit.
    pub fn finish(mut self) -> Result<Option<Recorded>, RecordError> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = self.redact[stream as usize].finish();
            self.emit(stream, &rest);
        }
        let Some(mut sink) = self.sink.take() else {
            return Ok(None);
        };
        if let Some(e) = sink.error.take() {
            return Err(e.into());
        }
        if sink.wanted > sink.limit {
            return Err(RecordError::TooLarge(Oversize {
                part: "output record".into(),
                found: sink.wanted,
                max: sink.limit,
            }));
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
        self.wanted = self.wanted.saturating_add(data.len() as u64);
        // Once over the limit, nothing more: the file stays a prefix of
        // whole entries, and no larger than the limit.
        if self.error.is_some() || self.wanted > self.limit {
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
            1 << 20,
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

    /// Counts the live output it is shown.
    #[derive(Debug, Default)]
    struct Shown(std::sync::atomic::AtomicU64);

    impl Ui for Shown {
        fn note(&self, _line: &str) {}
        fn phase(&self, _name: &str, _took: std::time::Duration) {}
        fn image_step(&self, _step: &str) {}
        fn output(&self, _stream: Stream, bytes: &[u8]) {
            self.0
                .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Regression: the record grew without a bound while the tests ran; the
    /// 256 MiB limit was checked only at the commit, with all of it on disk.
    #[test]
    fn a_recording_stops_at_its_limit_and_says_how_large_it_would_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.rec");
        let shown = Shown::default();
        let limit = 1024;
        let mut r = Recorder::to_file(&Patterns::default(), &path, limit, &shown).unwrap();
        let line = [b'x'; 99];
        for _ in 0..100 {
            r.feed(Stream::Stdout, &line);
        }
        let err = r.finish().unwrap_err();
        let RecordError::TooLarge(over) = &err else {
            panic!("{err:?}");
        };
        assert_eq!(over.max, limit);
        assert!(over.found > 99 * 100, "{over:?}");
        assert_eq!(over.part, "output record");
        assert!(
            err.to_string()
                .contains(&format!("over the limit of {limit}")),
            "{err}"
        );
        let kept = std::fs::read(&path).unwrap();
        assert!(kept.len() as u64 <= limit && !kept.is_empty());
        // What was kept is whole entries, a prefix of the output.
        let entries = record::decode(&kept).expect("a prefix of whole entries");
        assert!(entries.iter().all(|e| e.bytes == line));
        assert_eq!(
            shown.0.load(std::sync::atomic::Ordering::Relaxed),
            99 * 100,
            "all of it was shown live"
        );

        // Up to the limit, a recording is kept whole.
        let path = dir.path().join("small.rec");
        let quiet = Shown::default();
        let mut r = Recorder::to_file(&Patterns::default(), &path, limit, &quiet).unwrap();
        r.feed(Stream::Stderr, &line);
        let done = r.finish().unwrap().expect("recorded");
        assert_eq!(done.bytes, std::fs::metadata(&path).unwrap().len());
        assert!(done.bytes <= limit);
    }
}
