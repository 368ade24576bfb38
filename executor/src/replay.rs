//! Replaying a stored result: its output, byte for byte and in order, to the
//! same streams, and its artifacts back into a folder. Every byte is checked
//! before one is written: by its BLAKE3 against the part's tag where the
//! store keeps one for it (a keyed hash binding the manifest's sha256 and
//! the part's BLAKE3, made when the bytes entered the store and were
//! checked: [`crate::tags`]), otherwise, or when the tag does not hold,
//! against the manifest's sha256.
//! Artifacts are written only beneath the folder, through no symlink
//! ([`crate::beneath`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::manifest::ArtifactPath;
use reprise_protocol::record::{self, RecordError, StreamId};
use thiserror::Error;

use crate::beneath::{Beneath, BeneathError, Created, PendingFile};
use crate::store::{Store, StoredResult};
use crate::tags::{Content, PartHasher, TagKey, Tags};

/// Why a result could not be replayed.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(
        "the stored output of {key} does not match its manifest (sha256 {found}, expected {expected})"
    )]
    OutputMismatch {
        key: RunKey,
        found: Sha256Digest,
        expected: Sha256Digest,
    },
    #[error("the stored output of {key} is damaged")]
    Record {
        key: RunKey,
        #[source]
        source: RecordError,
    },
    #[error("the stored output of {key} is {found} bytes, not the {expected} of its manifest")]
    OutputSize {
        key: RunKey,
        found: u64,
        expected: u64,
    },
    #[error("artifact {path} of {key} is missing or damaged in the store")]
    Artifact { key: RunKey, path: ArtifactPath },
    #[error("restoring the artifacts")]
    Unsafe(#[from] BeneathError),
    #[error("replay io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ReplayError {
    /// Whether the store's copy is damaged (as opposed to the destination
    /// refusing it, or the disk failing): such a result is quarantined.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            ReplayError::OutputMismatch { .. }
                | ReplayError::OutputSize { .. }
                | ReplayError::Record { .. }
                | ReplayError::Artifact { .. }
        ) || matches!(self, ReplayError::Io { source, .. } if crate::store::is_missing_stored_file(source))
    }
}

/// Checks a stored result's output record against its manifest (size,
/// sha256, and that it decodes), reading it as it streams. Artifacts are
/// checked by [`restore_artifacts`], which hashes them as it copies (one
/// read of each file, not two), or by [`verify_artifacts`].
pub fn verify(result: &StoredResult) -> Result<(), ReplayError> {
    verify_output(result, None)
}

/// [`verify`], checking the record against its tag in `tags` when it has
/// one that holds (by BLAKE3), and against its sha256 otherwise.
pub fn verify_output(result: &StoredResult, tags: Option<&Tags>) -> Result<(), ReplayError> {
    check_record(result, tags, None, None).map(|_| ())
}

/// [`verify_output`], keeping the very bytes that were checked for
/// [`CheckedOutput::write`]: the record is read once, and what reaches the
/// user's streams is what held, whatever happens to the store's file after
/// the check.
pub fn check_output(
    result: &StoredResult,
    tags: Option<&Tags>,
) -> Result<CheckedOutput, ReplayError> {
    check_output_keeping(result, tags, KEPT_IN_MEMORY)
}

/// [`check_output`], keeping a record of up to `in_memory` bytes in memory.
fn check_output_keeping(
    result: &StoredResult,
    tags: Option<&Tags>,
    in_memory: u64,
) -> Result<CheckedOutput, ReplayError> {
    let bytes = result.manifest.output_bytes;
    let mut kept = Kept::for_bytes(bytes, in_memory).map_err(|source| ReplayError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let healed = check_record(result, tags, tags.map(Tags::key), Some(&mut kept))?;
    Ok(CheckedOutput {
        key: result.manifest.key,
        bytes,
        kept,
        healed,
    })
}

/// Checks the record of `result` (by its tag in `tags` where one holds,
/// else by sha256), copying what it reads into `keep` if given. Checked by
/// sha256 with a `heal` key, it is also hashed by BLAKE3 for that key, and
/// what that gave is returned, to make its tag anew ([`Tags::healed`]).
fn check_record(
    result: &StoredResult,
    tags: Option<&Tags>,
    heal: Option<&TagKey>,
    keep: Option<&mut Kept>,
) -> Result<Option<Content>, ReplayError> {
    match keep {
        Some(Kept::Memory(bytes)) => check_record_in_memory(result, tags, heal, bytes),
        keep => check_record_streaming(result, tags, heal, keep),
    }
}

/// [`check_record`] of a record read whole into `bytes` first (the file
/// straight into it, no copy between), then checked there: its entries
/// decode, and it hashes as it should (by sha256 too, from the same bytes,
/// where the tag does not hold).
fn check_record_in_memory(
    result: &StoredResult,
    tags: Option<&Tags>,
    heal: Option<&TagKey>,
    bytes: &mut Vec<u8>,
) -> Result<Option<Content>, ReplayError> {
    use std::io::Read;
    bytes.clear();
    let mut file = open_record(result)?;
    file.read_to_end(bytes).map_err(|source| ReplayError::Io {
        path: result.output_path(),
        source,
    })?;
    let key = result.manifest.key;
    if let Some(Err(source)) = record::entries(bytes).find(Result::is_err) {
        return Err(ReplayError::Record { key, source });
    }
    let m = &result.manifest;
    let mut hash = PartHash::new(tags, heal, 0);
    hash.update(bytes);
    let (sha, healed) = match hash.found(tags, 0, &m.output_sha256, m.output_bytes) {
        Found::TagHeld => (m.output_sha256, None),
        Found::Sha256(sha, content) => (sha, content),
        // The sha256 says whether the record is damaged or only its tag.
        Found::TagFailed => {
            let mut hash = Sha256Healing::new(heal);
            hash.update(bytes);
            hash.finish()
        }
    };
    record_holds(result, sha, bytes.len() as u64).map(|()| healed)
}

/// [`check_record`] streaming the record from its file, into `keep` (a
/// temporary file) if given.
fn check_record_streaming(
    result: &StoredResult,
    tags: Option<&Tags>,
    heal: Option<&TagKey>,
    mut keep: Option<&mut Kept>,
) -> Result<Option<Content>, ReplayError> {
    let mut hash = PartHash::new(tags, heal, 0);
    let mut bytes = 0u64;
    if let Some(k) = keep.as_deref_mut() {
        k.clear().map_err(|source| ReplayError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    }
    decode_record(
        result,
        |file| Tee {
            inner: file,
            hash: &mut hash,
            bytes: &mut bytes,
            // A file longer than its manifest says is refused for its
            // size; what is past that size is not kept.
            keep: keep
                .as_deref_mut()
                .map(|k| (k, result.manifest.output_bytes)),
        },
        |_, _| Ok(()),
    )?;
    let m = &result.manifest;
    let (sha, healed) = match hash.found(tags, 0, &m.output_sha256, m.output_bytes) {
        Found::TagHeld => (m.output_sha256, None),
        Found::Sha256(sha, content) => (sha, content),
        // The sha256 says whether the record is damaged or only its tag.
        Found::TagFailed => return check_record_streaming(result, None, heal, keep),
    };
    record_holds(result, sha, bytes).map(|()| healed)
}

/// Whether a record of `bytes` bytes whose sha256 is `found` is the one
/// the manifest of `result` names; why not if it is not.
fn record_holds(result: &StoredResult, found: Sha256Digest, bytes: u64) -> Result<(), ReplayError> {
    let m = &result.manifest;
    let key = m.key;
    if found != m.output_sha256 {
        return Err(ReplayError::OutputMismatch {
            key,
            found,
            expected: m.output_sha256,
        });
    }
    if bytes != m.output_bytes {
        return Err(ReplayError::OutputSize {
            key,
            found: bytes,
            expected: m.output_bytes,
        });
    }
    Ok(())
}

/// A result's output record as [`check_output`] read and checked it.
#[derive(Debug)]
pub struct CheckedOutput {
    key: RunKey,
    /// Its size, the manifest's (which the check held it to).
    bytes: u64,
    kept: Kept,
    /// Its BLAKE3, when it had no tag that held and its sha256 did.
    healed: Option<Content>,
}

/// Where a checked record is kept: in memory up to [`KEPT_IN_MEMORY`]
/// bytes, beyond in an unnamed temporary file only this process holds.
#[derive(Debug)]
enum Kept {
    Memory(Vec<u8>),
    File(std::fs::File),
}

/// The largest output record kept in memory between its check and its
/// replay (records may be up to 256 MiB).
const KEPT_IN_MEMORY: u64 = 32 << 20;

impl Kept {
    fn for_bytes(bytes: u64, in_memory: u64) -> std::io::Result<Kept> {
        Ok(match bytes <= in_memory {
            true => Kept::Memory(Vec::with_capacity(bytes as usize)),
            false => Kept::File(tempfile::tempfile()?),
        })
    }

    fn clear(&mut self) -> std::io::Result<()> {
        match self {
            Kept::Memory(v) => v.clear(),
            Kept::File(f) => {
                f.set_len(0)?;
                std::io::Seek::rewind(f)?;
            }
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Kept::Memory(v) => v.extend_from_slice(bytes),
            Kept::File(f) => f.write_all(bytes)?,
        }
        Ok(())
    }
}

/// A part checked by its sha256 rather than a tag, and hashed by BLAKE3
/// beside, for its tag: its index (0 the output record), sha256 and size
/// by the manifest, and its BLAKE3 ([`Tags::healed`]).
pub type Healed = (usize, Sha256Digest, u64, Content);

impl CheckedOutput {
    /// The record's tag to make anew, if it was checked by its sha256.
    pub fn healed(&self, result: &StoredResult) -> Option<Healed> {
        let m = &result.manifest;
        self.healed
            .map(|content| (0, m.output_sha256, m.output_bytes, content))
    }

    /// Writes the output to this process's standard output and error
    /// ([`CheckedOutput::write`]), a stream that is a pipe (a CI job's log,
    /// a test harness, `| less`) grown to hold it first ([`make_room`])
    /// and taking the record's pieces where they lie in memory
    /// ([`splice_entries`]). What was handed to a pipe that way stays in
    /// this process's memory, untouched, until it exits: the pipe refers
    /// to it until its reader has read it.
    pub fn write_to_std(self) -> Result<(), ReplayError> {
        use std::os::fd::AsFd;
        let (out, err) = (std::io::stdout(), std::io::stderr());
        let out_pipe = make_room(out.as_fd(), self.bytes);
        let err_pipe = make_room(err.as_fd(), self.bytes);
        let Kept::Memory(record) = &self.kept else {
            return self.write(&mut std::io::stdout(), &mut std::io::stderr());
        };
        let (mut out_writer, mut err_writer) = (std::io::stdout(), std::io::stderr());
        let written = splice_entries(
            record,
            Target {
                writer: &mut out_writer,
                pipe: out_pipe.then(|| out.as_fd()),
            },
            Target {
                writer: &mut err_writer,
                pipe: err_pipe.then(|| err.as_fd()),
            },
        )
        .map(drop)
        .map_err(|e| self.stream_error(e));
        // Even when writing failed midway: what was handed over before
        // may still be unread.
        if (out_pipe || err_pipe)
            && let Kept::Memory(record) = self.kept
        {
            std::mem::forget(record);
        }
        written
    }

    /// A record's error while writing it, as a replay's.
    fn stream_error(&self, e: record::StreamError) -> ReplayError {
        match e {
            record::StreamError::Record(source) => ReplayError::Record {
                key: self.key,
                source,
            },
            record::StreamError::Io(source) => ReplayError::Io {
                path: PathBuf::from("<standard output>"),
                source,
            },
        }
    }

    /// Writes the output to `stdout` and `stderr` in recorded order.
    /// Consecutive pieces of one stream are written together (up to
    /// [`OUTPUT_BATCH`]), and a stream is flushed before the other is
    /// written, so the interleaving is the recorded one with a write per
    /// run of a stream, not per piece.
    pub fn write(&self, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<(), ReplayError> {
        let io = |source| ReplayError::Io {
            path: PathBuf::from("<standard output>"),
            source,
        };
        let decoded = match &self.kept {
            Kept::Memory(bytes) => write_entries(bytes, stdout, stderr),
            Kept::File(file) => {
                let mut file = file.try_clone().map_err(io)?;
                std::io::Seek::rewind(&mut file).map_err(io)?;
                write_decoded(
                    std::io::BufReader::with_capacity(RECORD_READ, file),
                    stdout,
                    stderr,
                )
            }
        };
        decoded.map_err(|e| self.stream_error(e))
    }
}

/// Grows the pipe `fd` is, if it is one, to hold `bytes` (up to the most
/// the system gives a user without privilege, 1 MiB unless configured),
/// so a replay writes its output at once instead of waiting for the
/// reader to drain a 64 KiB pipe 16 times a MiB: writing a local hit's
/// 1 MiB of output into a pipe `cat` read took 1.3–1.4 ms, 1.0–1.2 ms
/// with the pipe grown (`written_ms` in `REPRISE_LOG=debug`, 8 runs each,
/// alternated). A pipe is never shrunk; failures leave it as it was.
/// Returns whether `fd` is a pipe.
fn make_room(fd: std::os::fd::BorrowedFd<'_>, bytes: u64) -> bool {
    use nix::fcntl::{FcntlArg, fcntl};
    let want = bytes.min(PIPE_ROOM) as i32;
    // Anything but a pipe refuses F_GETPIPE_SZ, and is left alone.
    let Ok(now) = fcntl(fd, FcntlArg::F_GETPIPE_SZ) else {
        return false;
    };
    if now < want {
        let _ = fcntl(fd, FcntlArg::F_SETPIPE_SZ(want));
    }
    true
}

/// The most [`make_room`] asks a pipe to hold: Linux's default
/// `fs.pipe-max-size`.
const PIPE_ROOM: u64 = 1 << 20;

/// Decodes a record from `input` to `stdout` and `stderr` (see
/// [`CheckedOutput::write`]).
fn write_decoded(
    input: impl std::io::Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<(), record::StreamError> {
    let mut runs = Runs::new(stdout, stderr);
    record::decode_stream(input, |stream, bytes| runs.push(stream, bytes))?;
    runs.finish().map_err(record::StreamError::Io)
}

/// [`write_decoded`] of a record in memory: its entries are taken where
/// they lie, not copied through a reader's buffers first.
fn write_entries(
    record: &[u8],
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<(), record::StreamError> {
    let mut runs = Runs::new(stdout, stderr);
    for entry in record::entries(record) {
        let (stream, _, bytes) = entry?;
        runs.push(stream, bytes)?;
    }
    runs.finish().map_err(record::StreamError::Io)
}

/// One of the two streams [`splice_entries`] writes to: its writer, and
/// the same stream's file descriptor if it is a pipe.
struct Target<'a> {
    writer: &'a mut dyn Write,
    pipe: Option<std::os::fd::BorrowedFd<'a>>,
}

/// [`write_entries`] into streams of which one or both may be pipes: a run
/// of a pipe's pieces is handed to it where the pieces lie in `record`
/// (`vmsplice`), with neither a copy into a batch nor new pages for the
/// pipe's buffer, which a write needs. Writing a local hit's 1 MiB of
/// output into a pipe the test harness read, in `turbo_bench`'s rounds:
/// 0.3–1.4 ms by writes, median 0.93 ms of 12; 0.37–0.67 ms, median
/// 0.55 ms, handed over (`written_ms`, a scratch build). Another stream is
/// written as [`write_entries`] writes it, and so is the rest of a run a
/// pipe refused (one opened non-blocking and full, say). Returns whether
/// any piece was handed over: `record` must then stay unchanged for as
/// long as the pipe's reader may not have read it.
fn splice_entries(
    record: &[u8],
    stdout: Target<'_>,
    stderr: Target<'_>,
) -> Result<bool, record::StreamError> {
    let (out_pipe, err_pipe) = (stdout.pipe, stderr.pipe);
    let mut runs = Runs::new(stdout.writer, stderr.writer);
    let mut spliced = false;
    // The run of pieces gathered for a pipe, and which stream's it is.
    let mut run: Vec<&[u8]> = Vec::new();
    let mut run_of = StreamId::Stdout;
    for entry in record::entries(record) {
        let (stream, _, bytes) = entry?;
        if bytes.is_empty() {
            continue;
        }
        if !run.is_empty() && stream != run_of {
            spliced |= splice_run(&mut runs, run_of, out_pipe, err_pipe, &mut run)?;
        }
        let pipe = match stream {
            StreamId::Stdout => out_pipe,
            StreamId::Stderr => err_pipe,
        };
        match pipe {
            Some(_) => {
                if run.is_empty() {
                    // The other stream's batch goes first.
                    runs.flush()?;
                }
                run.push(bytes);
                run_of = stream;
            }
            None => runs.push(stream, bytes)?,
        }
    }
    if !run.is_empty() {
        spliced |= splice_run(&mut runs, run_of, out_pipe, err_pipe, &mut run)?;
    }
    runs.finish()?;
    Ok(spliced)
}

/// Hands the pieces of `run` (all of stream `stream`, a pipe) to their
/// pipe, and empties it; what the pipe refuses is written to the stream's
/// writer instead. Says whether any piece was handed over.
fn splice_run(
    runs: &mut Runs<'_>,
    stream: StreamId,
    out_pipe: Option<std::os::fd::BorrowedFd<'_>>,
    err_pipe: Option<std::os::fd::BorrowedFd<'_>>,
    run: &mut Vec<&[u8]>,
) -> std::io::Result<bool> {
    use nix::errno::Errno;
    use std::io::IoSlice;
    let (writer, pipe) = match stream {
        StreamId::Stdout => (&mut *runs.stdout, out_pipe),
        StreamId::Stderr => (&mut *runs.stderr, err_pipe),
    };
    let pipe = pipe.expect("a run is gathered for a pipe only");
    // What the writer holds reaches the pipe before the run does.
    writer.flush()?;
    let mut slices: Vec<IoSlice<'_>> = run.iter().map(|p| IoSlice::new(p)).collect();
    let mut left = &mut slices[..];
    let mut spliced = false;
    while !left.is_empty() {
        let at_once = left.len().min(SPLICE_PIECES);
        match nix::fcntl::vmsplice(pipe, &left[..at_once], nix::fcntl::SpliceFFlags::empty()) {
            Ok(n) => {
                spliced = true;
                IoSlice::advance_slices(&mut left, n);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE) => return Err(std::io::ErrorKind::BrokenPipe.into()),
            Err(_) => {
                for piece in left.iter() {
                    writer.write_all(piece)?;
                }
                writer.flush()?;
                break;
            }
        }
    }
    run.clear();
    Ok(spliced)
}

/// The most pieces handed to a pipe at once: Linux's `IOV_MAX`.
const SPLICE_PIECES: usize = 1024;

/// Output written to two streams in runs of one stream, each run's pieces
/// gathered (up to [`OUTPUT_BATCH`]) into one write, and the stream
/// flushed before the other is written.
struct Runs<'a> {
    stdout: &'a mut dyn Write,
    stderr: &'a mut dyn Write,
    batch: Vec<u8>,
    current: StreamId,
}

impl<'a> Runs<'a> {
    fn new(stdout: &'a mut dyn Write, stderr: &'a mut dyn Write) -> Runs<'a> {
        Runs {
            stdout,
            stderr,
            batch: Vec::with_capacity(OUTPUT_BATCH),
            current: StreamId::Stdout,
        }
    }

    fn push(&mut self, stream: StreamId, mut bytes: &[u8]) -> std::io::Result<()> {
        if stream != self.current || self.batch.len() + bytes.len() > OUTPUT_BATCH {
            self.flush()?;
            self.current = stream;
        }
        // A whole batch of one piece is written where it lies.
        while bytes.len() >= OUTPUT_BATCH {
            let (now, rest) = bytes.split_at(OUTPUT_BATCH);
            let (out, _) = self.parts();
            out.write_all(now)?;
            out.flush()?;
            bytes = rest;
        }
        self.batch.extend_from_slice(bytes);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let (out, batch) = self.parts();
        if batch.is_empty() {
            return Ok(());
        }
        out.write_all(batch)?;
        batch.clear();
        out.flush()
    }

    /// The current stream, and the batch gathered for it.
    fn parts(&mut self) -> (&mut dyn Write, &mut Vec<u8>) {
        let out: &mut dyn Write = match self.current {
            StreamId::Stdout => &mut *self.stdout,
            StreamId::Stderr => &mut *self.stderr,
        };
        (out, &mut self.batch)
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.flush()
    }
}

/// A part's bytes being hashed to check them: by the BLAKE3 its tag binds,
/// or by sha256 (and by BLAKE3 beside it, to heal its tag).
enum PartHash {
    Tagged(Box<PartHasher>),
    Sha256(Sha256Healing),
}

/// A part's sha256 being taken, and its BLAKE3 beside it when its
/// tag is to be made anew.
struct Sha256Healing {
    sha256: sha2::Sha256,
    content: Option<Box<PartHasher>>,
}

impl Sha256Healing {
    fn new(heal: Option<&TagKey>) -> Sha256Healing {
        use sha2::Digest;
        Sha256Healing {
            sha256: sha2::Sha256::new(),
            content: heal.map(|_| Box::new(Content::hasher())),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest;
        self.sha256.update(bytes);
        if let Some(c) = &mut self.content {
            c.update(bytes);
        }
    }

    fn finish(self) -> (Sha256Digest, Option<Content>) {
        (
            Sha256Digest::finish(self.sha256),
            self.content.map(|c| c.finish()),
        )
    }
}

impl PartHash {
    /// The hash part `i` is checked by: its tag's when `tags` has one,
    /// else its sha256, beside `heal`'s BLAKE3 if given.
    fn new(tags: Option<&Tags>, heal: Option<&TagKey>, i: usize) -> PartHash {
        match tags.and_then(|t| t.hasher(i)) {
            Some(h) => PartHash::Tagged(Box::new(h)),
            None => PartHash::Sha256(Sha256Healing::new(heal)),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            PartHash::Tagged(h) => h.update(bytes),
            PartHash::Sha256(h) => h.update(bytes),
        }
    }

    /// What the hash says of part `i` of `tags`, of `sha256` and `bytes`
    /// by the manifest.
    fn found(self, tags: Option<&Tags>, i: usize, sha256: &Sha256Digest, bytes: u64) -> Found {
        match self {
            PartHash::Tagged(h) => {
                match tags.is_some_and(|t| t.holds(i, sha256, bytes, &h.finish())) {
                    true => Found::TagHeld,
                    false => Found::TagFailed,
                }
            }
            PartHash::Sha256(h) => {
                let (sha256, content) = h.finish();
                Found::Sha256(sha256, content)
            }
        }
    }
}

/// What a [`PartHash`] found.
enum Found {
    /// The part's tag holds: its bytes are those whose sha256 was checked
    /// when they entered the store (their size is still compared).
    TagHeld,
    /// The part's tag does not hold: the part, or only its tag, is
    /// damaged; its sha256 tells which.
    TagFailed,
    /// The part's sha256, for the caller to compare (and its size), and
    /// its BLAKE3 if it was asked for.
    Sha256(Sha256Digest, Option<Content>),
}

/// A reader that hashes and counts what it reads, and keeps a copy of it
/// if asked.
struct Tee<'a, R> {
    inner: R,
    hash: &'a mut PartHash,
    bytes: &'a mut u64,
    /// Where to keep a copy, and how many more bytes to keep at most.
    keep: Option<(&'a mut Kept, u64)>,
}

impl<R: std::io::Read> std::io::Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        *self.bytes += n as u64;
        if let Some((keep, left)) = &mut self.keep {
            let take = n.min(usize::try_from(*left).unwrap_or(usize::MAX));
            keep.append(&buf[..take])?;
            *left -= take as u64;
        }
        Ok(n)
    }
}

/// Checks every artifact's blob against its size and sha256, without
/// copying (a blob of another size is not read).
pub fn verify_artifacts(store: &Store, result: &StoredResult) -> Result<(), ReplayError> {
    for a in &result.manifest.artifacts {
        let blob = store.blob_path(a);
        let holds =
            crate::store::stored_file_holds(&blob, a.bytes, &a.sha256).map_err(|source| {
                ReplayError::Io {
                    path: blob.clone(),
                    source,
                }
            })?;
        if !holds {
            return Err(ReplayError::Artifact {
                key: result.manifest.key,
                path: a.path.clone(),
            });
        }
    }
    Ok(())
}

/// What `reprise results verify` found.
#[derive(Debug, Default)]
pub struct StoreCheck {
    /// Results that verified.
    pub sound: usize,
    /// Where each damaged result went, and why.
    pub quarantined: Vec<(PathBuf, String)>,
}

/// Checks every stored result (passed and failed): its manifest loads, its
/// output record and every artifact blob match their sha256. A result that
/// does not is quarantined ([`Store::quarantine`]), so no lookup finds it.
pub fn verify_store(store: &Store) -> Result<StoreCheck, crate::store::StoreError> {
    let mut check = StoreCheck::default();
    for folder in store.unreadable() {
        let reason = "its manifest does not load or does not match its folder's key".to_string();
        let to = store.quarantine_folder(&folder, &reason)?;
        check.quarantined.push((to, reason));
    }
    for result in store.list().into_iter().chain(store.list_failed()) {
        let damage = verify(&result).and_then(|()| verify_artifacts(store, &result));
        match damage {
            Ok(()) => check.sound += 1,
            Err(e) if e.is_damage() => {
                let reason = crate::text::error_chain(&e);
                let to = store.quarantine(&result, &reason)?;
                check.quarantined.push((to, reason));
            }
            // Not the store's copy at fault (a read error): say so, keep it.
            Err(e) => {
                return Err(crate::store::StoreError::Io {
                    path: result.dir.clone(),
                    source: std::io::Error::other(crate::text::error_chain(&e)),
                });
            }
        }
    }
    Ok(check)
}

/// The most of one stream's output written at once by [`CheckedOutput::write`].
pub const OUTPUT_BATCH: usize = 256 << 10;

/// How much of an output record is read at once: its pieces are small (a
/// line, often), and each is read as a header and a body.
const RECORD_READ: usize = 256 << 10;

/// Opens a stored result's output record ([`crate::store::open_stored`]):
/// a file of another size than the manifest's is refused unread, and what
/// is read of it stops a byte past that size (a file grown meanwhile).
fn open_record(result: &StoredResult) -> Result<std::io::Take<std::fs::File>, ReplayError> {
    use std::io::Read;
    let path = result.output_path();
    let io = |source| ReplayError::Io {
        path: path.clone(),
        source,
    };
    let file = crate::store::open_stored(&path).map_err(io)?;
    let found = file.metadata().map_err(io)?.len();
    let expected = result.manifest.output_bytes;
    if found != expected {
        return Err(ReplayError::OutputSize {
            key: result.manifest.key,
            found,
            expected,
        });
    }
    Ok(file.take(expected.saturating_add(1)))
}

/// Streams a stored result's output record through `each`, read through
/// what `reader` makes of the file ([`open_record`]); its errors as
/// [`ReplayError`]s.
fn decode_record<R: std::io::Read>(
    result: &StoredResult,
    reader: impl FnOnce(std::io::Take<std::fs::File>) -> R,
    each: impl FnMut(StreamId, &[u8]) -> std::io::Result<()>,
) -> Result<(), ReplayError> {
    let key = result.manifest.key;
    let path = result.output_path();
    let io = |source| ReplayError::Io {
        path: path.clone(),
        source,
    };
    let input = std::io::BufReader::with_capacity(RECORD_READ, reader(open_record(result)?));
    record::decode_stream(input, each).map_err(|e| match e {
        record::StreamError::Record(source) => ReplayError::Record { key, source },
        record::StreamError::Io(source) => io(source),
    })
}

/// What a replay does before a byte reaches the user: checks the output
/// record of `result` (kept for [`CheckedOutput::write`]) on a thread of
/// its own while its artifacts are copied beside their names in `dest`
/// and checked ([`stage_artifacts`]), by their tags where they hold, else
/// by sha256. Nothing is in place unless both hold. The parts checked by
/// sha256 are hashed by BLAKE3 beside, and once both held their
/// tags are made anew ([`Store::heal_tags`]), so the next replay of the
/// result checks them at BLAKE3's speed.
pub fn check_and_stage(
    store: &Store,
    result: &StoredResult,
    dest: &Path,
) -> Result<(CheckedOutput, StagedArtifacts), ReplayError> {
    let tags = store.tags_to_replay(result);
    let (staged, output) = stage_artifacts_beside(store, result, tags.as_ref(), dest, || {
        check_output(result, tags.as_ref())
    });
    let (output, staged) = (output?, staged?);
    if let Some(tags) = &tags {
        let healed: Vec<Healed> = output
            .healed(result)
            .into_iter()
            .chain(staged.healed.iter().copied())
            .collect();
        store.heal_tags(result, tags, &healed);
    }
    Ok((output, staged))
}

/// Copies the result's artifacts into `dest` (created if needed), beneath
/// it and through no symlink: [`stage_artifacts`], then, when every one
/// matched its manifest, [`StagedArtifacts::commit`]. A damaged store
/// leaves `dest` as it was. Returns how many were restored.
pub fn restore_artifacts(
    store: &Store,
    result: &StoredResult,
    tags: Option<&Tags>,
    dest: &Path,
) -> Result<usize, ReplayError> {
    stage_artifacts(store, result, tags, dest)?.commit()
}

/// The artifacts of a result copied beside their names in their folder and
/// checked, waiting to be renamed into place, with the parts among them
/// checked by sha256 whose tags to make anew.
/// Dropped, the temporary files are removed, then the folders made for
/// them (while empty).
#[derive(Debug)]
pub struct StagedArtifacts {
    pending: Vec<PendingFile>,
    healed: Vec<Healed>,
    // Last: dropped after the files in them.
    created: Created,
}

impl StagedArtifacts {
    /// Renames every artifact into place; returns how many.
    pub fn commit(self) -> Result<usize, ReplayError> {
        let n = self.pending.len();
        // Some may be in place: the folders stay.
        self.created.keep();
        // Dropping the rest on an error removes their temporary files.
        for pending in self.pending {
            pending.commit()?;
        }
        Ok(n)
    }
}

/// Copies each of the result's artifacts into a temporary file beside its
/// name in `dest` (created if needed), beneath it and through no symlink,
/// and hashes it while it is copied (by its tag in `tags` where it has one,
/// [`check_output`]), unless this process checked that very blob while it
/// arrived a moment ago ([`StoredResult::verified_blob`]: a fetch), which
/// is copied by the kernel (`copy_file_range`) without being hashed twice.
/// Up to one artifact per CPU at a time. Nothing is in place until
/// [`StagedArtifacts::commit`]; dropped, the temporary files are removed.
pub fn stage_artifacts(
    store: &Store,
    result: &StoredResult,
    tags: Option<&Tags>,
    dest: &Path,
) -> Result<StagedArtifacts, ReplayError> {
    stage_artifacts_beside(store, result, tags, dest, || ()).0
}

/// [`stage_artifacts`], with `beside` run at the same time: first thing
/// on the thread that then joins this one in copying artifacts (or on
/// this one, if that thread has not started by the time the artifacts
/// are done), so the work is shared by one thread a CPU (on a machine of
/// two, a third thread for `beside` only costs a start and the switches
/// between the three). Without artifacts to copy, `beside` runs on this
/// thread.
fn stage_artifacts_beside<T: Send>(
    store: &Store,
    result: &StoredResult,
    tags: Option<&Tags>,
    dest: &Path,
    beside: impl FnOnce() -> T + Send,
) -> (Result<StagedArtifacts, ReplayError>, T) {
    let artifacts = &result.manifest.artifacts;
    if artifacts.is_empty() {
        let staged = StagedArtifacts {
            pending: Vec::new(),
            healed: Vec::new(),
            created: Created::default(),
        };
        return (Ok(staged), beside());
    }
    let beneath = match Beneath::open(dest) {
        Ok(beneath) => beneath,
        Err(e) => return (Err(e.into()), beside()),
    };
    // What a killed restore left here.
    crate::beneath::sweep_dead_temporaries(dest);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_RESTORE_THREADS)
        .min(artifacts.len());
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    type Slot = Mutex<Option<Result<(PendingFile, Option<Content>), ReplayError>>>;
    let slots: Vec<Slot> = artifacts.iter().map(|_| Mutex::new(None)).collect();
    let work = || {
        // One buffer a thread: a fresh one an artifact would be faulted in
        // and zeroed each time.
        let mut buf = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= artifacts.len() || failed.load(Ordering::Relaxed) {
                return;
            }
            let staged = restore_one(&beneath, store, result, tags, i, &mut buf);
            if staged.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            *slots[i].lock().expect("slot") = Some(staged);
            if i + 1 < artifacts.len() {
                crate::faults::pause_point("replay");
            }
        }
    };
    // `beside` is run by the first thread to take it: the one spawned
    // first takes it as it starts, this one once the artifacts are done if
    // that thread has not started yet (on a busy host a thread spawned may
    // wait milliseconds for a CPU, and this one would wait for it).
    let beside = Mutex::new(Some(beside));
    let besides = Mutex::new(None);
    let take_beside = || {
        let f = beside.lock().expect("beside").take();
        if let Some(f) = f {
            *besides.lock().expect("besides") = Some(f());
        }
    };
    // This thread is one of the workers: it starts at once, where a
    // thread spawned would wait for its start (and there is one spawned
    // even when one worker is enough, for `beside`).
    std::thread::scope(|s| {
        s.spawn(|| {
            take_beside();
            work();
        });
        for _ in 2..workers {
            s.spawn(work);
        }
        work();
        take_beside();
    });
    let besides = besides
        .into_inner()
        .expect("besides")
        .expect("one thread or the other ran `beside`");
    let mut staged = Vec::with_capacity(artifacts.len());
    let mut healed = Vec::new();
    let mut error = None;
    for (i, slot) in slots.into_iter().enumerate() {
        match slot.into_inner().expect("slot") {
            Some(Ok((pending, content))) => {
                staged.push(pending);
                if let Some(content) = content {
                    let a = &artifacts[i];
                    healed.push((i + 1, a.sha256, a.bytes, content));
                }
            }
            Some(Err(e)) => {
                error.get_or_insert(e);
            }
            // Not started: another artifact failed first.
            None => {}
        }
    }
    let staged = StagedArtifacts {
        pending: staged,
        healed,
        created: beneath.into_created(),
    };
    match error {
        // Dropped, `staged` removes the temporary files and the folders.
        Some(e) => (Err(e), besides),
        None => (Ok(staged), besides),
    }
}

/// Artifacts restored at once, at most (one per CPU up to this).
const MAX_RESTORE_THREADS: usize = 4;

/// Copies artifact `i` to a temporary file beside its name, checking it,
/// through `buf`. Checked by its sha256 where `tags` has no tag of it
/// that holds, it is also hashed by BLAKE3, returned to heal
/// its tag.
fn restore_one(
    beneath: &Beneath,
    store: &Store,
    result: &StoredResult,
    tags: Option<&Tags>,
    i: usize,
    buf: &mut Vec<u8>,
) -> Result<(PendingFile, Option<Content>), ReplayError> {
    let a = &result.manifest.artifacts[i];
    let mut pending = beneath.create(&a.path, a.mode)?;
    let damaged = || ReplayError::Artifact {
        key: result.manifest.key,
        path: a.path.clone(),
    };
    crate::store::reserve(&pending.file, 0, a.bytes).map_err(|source| ReplayError::Io {
        path: pending.path().to_path_buf(),
        source,
    })?;
    if let Some(blob) = result.verified_blob(&a.sha256) {
        let path = pending.path().to_path_buf();
        let copied = copy_verified(blob, a.bytes, &mut pending.file)
            .map_err(|source| ReplayError::Io { path, source })?;
        if copied != a.bytes {
            return Err(damaged());
        }
        return Ok((pending, None));
    }
    let blob = store.blob_path(a);
    let io = |source| ReplayError::Io {
        path: blob.clone(),
        source,
    };
    let part = i + 1;
    let heal = tags.map(Tags::key);
    let mut hash = PartHash::new(tags, heal, part);
    // One byte past the manifest's size is enough to refuse a longer blob;
    // a huge file planted in the store is not copied whole into `dest`.
    let most = a.bytes.saturating_add(1);
    let mut bytes =
        copy_hashing(&blob, &mut pending.file, buf, most, |b| hash.update(b)).map_err(io)?;
    let (found, healed) = match hash.found(tags, part, &a.sha256, a.bytes) {
        Found::TagHeld => (a.sha256, None),
        Found::Sha256(sha, content) => (sha, content),
        Found::TagFailed => {
            // Copied again and hashed by sha256: the blob or only its tag
            // is damaged.
            let mut hash = Sha256Healing::new(heal);
            pending.file.set_len(0).map_err(io)?;
            std::io::Seek::rewind(&mut pending.file).map_err(io)?;
            bytes = copy_hashing(&blob, &mut pending.file, buf, most, |b| hash.update(b))
                .map_err(io)?;
            hash.finish()
        }
    };
    if found != a.sha256 || bytes != a.bytes {
        return Err(damaged());
    }
    Ok((pending, healed))
}

/// Copies the first `len` bytes of a blob checked by this process into
/// `to` (the kernel copies: `std::io::copy` between files is
/// `copy_file_range` on Linux). Returns how many bytes were copied.
fn copy_verified(blob: &std::fs::File, len: u64, to: &mut std::fs::File) -> std::io::Result<u64> {
    use std::io::{Read, Seek};
    let mut from = blob.try_clone()?;
    from.seek(std::io::SeekFrom::Start(0))?;
    std::io::copy(&mut from.take(len), to)
}

/// Copies `from` into `to` through `buf` (sized here), at most `most`
/// bytes of it, each piece given to `hash` before it is written (in
/// [`RESTORE_WRITE_STEP`] steps); returns how many bytes were copied.
fn copy_hashing(
    from: &Path,
    to: &mut std::fs::File,
    buf: &mut Vec<u8>,
    most: u64,
    mut hash: impl FnMut(&[u8]),
) -> std::io::Result<u64> {
    use std::io::Read;
    let mut src = crate::store::open_stored(from)?.take(most);
    buf.resize(COPY_BUFFER, 0);
    let mut copied = 0u64;
    loop {
        let n = match src.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash(&buf[..n]);
        for step in buf[..n].chunks(RESTORE_WRITE_STEP) {
            to.write_all(step)?;
        }
        copied += n as u64;
    }
    Ok(copied)
}

/// The buffer an artifact is copied through: read and hashed a buffer at
/// a time, written in [`RESTORE_WRITE_STEP`] steps. Restoring 20
/// artifacts of 1 MiB with the page cache filling the RAM (medians of 9
/// of the replay's `checked_ms` in `REPRISE_LOG=debug`, a build that took
/// both sizes from the environment, not kept): a 1 MiB buffer written in
/// [`crate::store::WRITE_STEP`] steps 9.6–11.6 ms, 256 KiB in the same
/// steps 8.4–10.3 ms, 256 KiB written whole 7.5–9.9 ms, with no
/// compaction stall: a smaller buffer is fewer pages for each thread to
/// fault in, and fewer, larger writes cost the file system less.
const COPY_BUFFER: usize = 256 << 10;

/// The most a restore that hashes what it copies writes at once: what
/// the kernel's copy of a fetch's restore writes at once on ext4
/// (`copy_file_range` without shared extents goes through a pipe of
/// sixteen 4 KiB pages), so both restores fill the page cache with pages
/// of one size (64 KiB folios; 256 KiB writes made 256 KiB ones). With
/// 256 KiB writes, a local hit after a fetch whose restored files had
/// then been deleted (as in `turbo_bench`) now and then wrote its 20 MiB
/// at a tenth of the speed, 26–123 ms against 9–13 ms: 95 of 210 rounds
/// in ten runs on this VM, which gives the memory it frees back to its
/// host (what the fetch's files freed did not serve the larger pages;
/// compacting memory between the two took it away). In 64 KiB steps,
/// none in 168 rounds of eight runs alternated with those; the bench's
/// remote hit took the slow rounds instead (2–7 of 21 at 150–280 ms,
/// against 0–1), its median no worse (0.38x–0.49x in seven runs, 0.64x in
/// one noisy one; 0.33x–0.61x before). A local hit alone costs 1–2 % more
/// (medians of 41 alternated, 9.53 → 9.71 ms and 9.82 → 9.91 ms).
const RESTORE_WRITE_STEP: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{inputs, manifest};
    use reprise_protocol::manifest::Outcome;

    #[test]
    fn replays_output_in_order_and_restores_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let mut rec = Vec::new();
        record::push(&mut rec, StreamId::Stdout, 0, b"one\n");
        record::push(&mut rec, StreamId::Stderr, 1, b"\x1b[31mtwo\x1b[0m\n");
        record::push(&mut rec, StreamId::Stdout, 2, b"three\n");
        let arts = dir.path().join("a");
        std::fs::create_dir_all(&arts).unwrap();
        std::fs::write(arts.join("bin"), [0u8, 1, 2]).unwrap();
        let stored = store
            .commit(
                manifest(inputs("t"), Outcome::Passed, 1),
                &rec,
                Some(&arts),
                None,
            )
            .unwrap();
        verify(&stored).unwrap();
        verify_artifacts(&store, &stored).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        check_output(&stored, None)
            .unwrap()
            .write(&mut out, &mut err)
            .unwrap();
        assert_eq!(out, b"one\nthree\n");
        assert_eq!(err, b"\x1b[31mtwo\x1b[0m\n");
        let dest = dir.path().join("restored");
        assert_eq!(restore_artifacts(&store, &stored, None, &dest).unwrap(), 1);
        assert_eq!(std::fs::read(dest.join("bin")).unwrap(), [0, 1, 2]);
    }

    #[test]
    fn artifacts_of_every_size_around_the_buffer_and_the_write_step_restore_whole() {
        // Each 4 bytes their offset: a piece dropped, repeated or moved
        // shows.
        let bytes = |n: usize| -> Vec<u8> {
            let words = (0..n.div_ceil(4) as u32).flat_map(u32::to_le_bytes);
            words.take(n).collect()
        };
        let (step, buffer) = (RESTORE_WRITE_STEP, COPY_BUFFER);
        let sizes = [
            0,
            1,
            step - 1,
            step + 1,
            buffer,
            buffer + step - 1,
            2 * buffer + 3 * step + 7,
        ];
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let names = sizes.map(|n| n.to_string());
        let files: Vec<(&str, Vec<u8>)> = names
            .iter()
            .map(String::as_str)
            .zip(sizes.map(bytes))
            .collect();
        let stored = commit_with(&store, dir.path(), "t", &files);
        let from_disk = store.get(&stored.manifest.key).unwrap();
        for (i, tags) in [None, store.tags(&from_disk)].iter().enumerate() {
            let dest = dir.path().join(format!("restored-{i}"));
            let restored = restore_artifacts(&store, &from_disk, tags.as_ref(), &dest).unwrap();
            assert_eq!(restored, sizes.len());
            for n in sizes {
                let got = std::fs::read(dest.join(n.to_string())).unwrap();
                assert!(
                    got == bytes(n),
                    "{n} bytes restored as {} other bytes",
                    got.len()
                );
            }
        }
    }

    #[test]
    fn output_is_written_in_runs_of_one_stream_in_recorded_order() {
        /// Logs every write with the stream it went to.
        struct Log<'a>(&'a std::cell::RefCell<Vec<(char, Vec<u8>)>>, char);
        impl Write for Log<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.borrow_mut().push((self.1, buf.to_vec()));
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let mut rec = Vec::new();
        record::push(&mut rec, StreamId::Stdout, 0, b"a");
        record::push(&mut rec, StreamId::Stdout, 1, b"b");
        record::push(&mut rec, StreamId::Stderr, 2, b"c");
        record::push(&mut rec, StreamId::Stdout, 3, b"d");
        let big = vec![b'x'; 3 * OUTPUT_BATCH];
        record::push(&mut rec, StreamId::Stderr, 4, &big);
        let stored = store
            .commit(manifest(inputs("t"), Outcome::Passed, 1), &rec, None, None)
            .unwrap();
        let log = std::cell::RefCell::new(Vec::new());
        check_output(&stored, None)
            .unwrap()
            .write(&mut Log(&log, 'o'), &mut Log(&log, 'e'))
            .unwrap();
        let got: Vec<(char, Vec<u8>)> = log.into_inner();
        assert_eq!(
            got[..3],
            [
                ('o', b"ab".to_vec()),
                ('e', b"c".to_vec()),
                ('o', b"d".to_vec()),
            ]
        );
        assert!(
            got[3..]
                .iter()
                .all(|(s, w)| *s == 'e' && w.len() <= OUTPUT_BATCH)
        );
        assert_eq!(got[3..].concat_bytes(), big);
    }

    trait ConcatBytes {
        fn concat_bytes(&self) -> Vec<u8>;
    }

    impl ConcatBytes for [(char, Vec<u8>)] {
        fn concat_bytes(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, w)| w.iter().copied()).collect()
        }
    }

    /// A record of `runs` runs of pieces of odd sizes, alternating stdout
    /// and stderr, and what it writes in order, both streams together.
    fn record_of_runs(runs: usize, per_run: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut rec, mut both) = (Vec::new(), Vec::new());
        for r in 0..runs {
            let stream = [StreamId::Stdout, StreamId::Stderr][r % 2];
            for p in 0..per_run {
                let piece: Vec<u8> = (0..(p * 37 + r) % 5000 + 1)
                    .map(|i| (i * 7 + r + p) as u8)
                    .collect();
                record::push(&mut rec, stream, 0, &piece);
                both.extend_from_slice(&piece);
            }
        }
        (rec, both)
    }

    #[test]
    fn output_handed_to_a_pipe_is_the_recorded_output_in_order() {
        use std::io::Read;
        use std::os::fd::AsFd;
        // More pieces in a run than are handed over at once, into a pipe
        // of sixteen pages, so each hand-over takes several pieces and part
        // of one; both streams the same pipe (`2>&1`), so their order shows.
        let (rec, expected) = record_of_runs(3, SPLICE_PIECES + 300);
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(&write_end, nix::fcntl::FcntlArg::F_SETPIPE_SZ(16 << 12)).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::fs::File::from(read_end).read_to_end(&mut got).unwrap();
            got
        });
        let mut out = std::fs::File::from(write_end.try_clone().unwrap());
        let mut err = std::fs::File::from(write_end.try_clone().unwrap());
        let spliced = splice_entries(
            &rec,
            Target {
                writer: &mut out,
                pipe: Some(write_end.as_fd()),
            },
            Target {
                writer: &mut err,
                pipe: Some(write_end.as_fd()),
            },
        )
        .unwrap();
        drop((out, err, write_end));
        assert!(spliced);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the pipe got other bytes or another order");
    }

    #[test]
    fn a_stream_that_takes_no_pieces_gets_them_written() {
        use std::os::fd::AsFd;
        // stdout's descriptor is a file, not a pipe: what was to be handed
        // over is written instead; stderr is no pipe and written anyway.
        let (rec, _) = record_of_runs(4, 3);
        let (mut expected_out, mut expected_err) = (Vec::new(), Vec::new());
        write_entries(&rec, &mut expected_out, &mut expected_err).unwrap();
        let file = tempfile::tempfile().unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let spliced = splice_entries(
            &rec,
            Target {
                writer: &mut out,
                pipe: Some(file.as_fd()),
            },
            Target {
                writer: &mut err,
                pipe: None,
            },
        )
        .unwrap();
        assert!(!spliced);
        assert_eq!(out, expected_out);
        assert_eq!(err, expected_err);
        assert!(!out.is_empty() && !err.is_empty());
        assert_eq!(file.metadata().unwrap().len(), 0);
    }

    #[test]
    fn the_output_written_is_the_one_checked_whatever_the_store_does_after() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let record_of = |text: &[u8]| {
            let mut rec = Vec::new();
            record::push(&mut rec, StreamId::Stdout, 0, text);
            rec
        };
        let stored = store
            .commit(
                manifest(inputs("t"), Outcome::Passed, 1),
                &record_of(b"the tests passed\n"),
                None,
                None,
            )
            .unwrap();
        // Kept in memory, and kept in a temporary file (a record over the
        // bound): either way the attack below must not reach the streams.
        for in_memory in [KEPT_IN_MEMORY, 4] {
            let checked = check_output_keeping(&stored, None, in_memory).unwrap();
            // The attack: once the check passed, the record in the store
            // is swapped for another, well formed and of the same size.
            std::fs::write(stored.output_path(), record_of(b"forged output!!!\n")).unwrap();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            checked.write(&mut out, &mut err).unwrap();
            assert_eq!(
                out, b"the tests passed\n",
                "kept in memory up to {in_memory}"
            );
            assert!(err.is_empty());
            // Checked again, the swapped record is refused.
            assert!(matches!(
                check_output_keeping(&stored, None, in_memory),
                Err(ReplayError::OutputMismatch { .. })
            ));
            std::fs::write(stored.output_path(), record_of(b"the tests passed\n")).unwrap();
        }
    }

    #[test]
    fn a_fetched_result_restores_from_the_blobs_it_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let arts = dir.path().join("a");
        std::fs::create_dir_all(arts.join("sub")).unwrap();
        std::fs::write(arts.join("sub/f"), "content").unwrap();
        let local = store
            .commit(
                manifest(inputs("t"), Outcome::Passed, 1),
                b"",
                Some(&arts),
                None,
            )
            .unwrap();
        // Received: the same result through a Receiving, as a fetch does.
        let other = Store::new(dir.path().join("fetched"));
        let sealed = reprise_protocol::wire::Sealed {
            manifest: local.manifest.clone(),
            seal: reprise_protocol::seal::Seal {
                version: reprise_protocol::seal::SEAL_VERSION,
                signature: "00".into(),
                producer_cert: String::new(),
            },
        };
        let mut incoming = other.receive(sealed, None).unwrap();
        incoming.put_part(0, b"").unwrap();
        incoming.put_part(1, b"content").unwrap();
        let fetched = incoming.commit().unwrap();
        // Received from the first chunk, each part got its tag.
        let tags = other.tags(&fetched).expect("a received result keeps tags");
        assert!(every_tag_holds(&other, &fetched, &tags));
        let dest = dir.path().join("restored");
        assert_eq!(restore_artifacts(&other, &fetched, None, &dest).unwrap(), 1);
        assert_eq!(std::fs::read(dest.join("sub/f")).unwrap(), b"content");
        // Read back from disk, the same result is hashed as it is restored:
        // a blob damaged since is refused.
        std::fs::write(other.blob_path(&fetched.manifest.artifacts[0]), "c0ntent").unwrap();
        let from_disk = other.get(&fetched.manifest.key).unwrap();
        for tags in [None, other.tags(&from_disk)] {
            assert!(matches!(
                restore_artifacts(&other, &from_disk, tags.as_ref(), &dir.path().join("again")),
                Err(ReplayError::Artifact { .. })
            ));
        }
    }

    /// Whether every part of `result` (as its files now are) holds against
    /// its tag.
    fn every_tag_holds(store: &Store, result: &StoredResult, tags: &Tags) -> bool {
        let m = &result.manifest;
        let parts = std::iter::once((result.output_path(), m.output_sha256, m.output_bytes)).chain(
            m.artifacts
                .iter()
                .map(|a| (store.blob_path(a), a.sha256, a.bytes)),
        );
        parts.enumerate().all(|(i, (path, sha, bytes))| {
            let mut h = tags.hasher(i).expect("a tag for every part");
            h.update(&std::fs::read(path).unwrap());
            tags.holds(i, &sha, bytes, &h.finish())
        })
    }

    /// Commits a passed result of `name` with `files` as its artifacts.
    fn commit_with(
        store: &Store,
        dir: &Path,
        name: &str,
        files: &[(&str, impl AsRef<[u8]>)],
    ) -> StoredResult {
        let arts = dir.join(format!("artifacts-{name}"));
        std::fs::create_dir_all(&arts).unwrap();
        for (file, text) in files {
            let path = arts.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let mut rec = Vec::new();
        record::push(
            &mut rec,
            StreamId::Stdout,
            0,
            format!("{name} passed\n").as_bytes(),
        );
        store
            .commit(
                manifest(inputs(name), Outcome::Passed, 1),
                &rec,
                Some(&arts),
                None,
            )
            .unwrap()
    }

    /// Runs `f` on a thread of its own and waits for it at most 20 s: a
    /// store file that blocks its reader fails the test instead of hanging
    /// it.
    fn within_a_while<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("reading the store waited for a file that never came")
    }

    #[test]
    fn a_fifo_or_a_device_in_place_of_a_stored_file_is_refused_without_waiting() {
        // Regression: the store's records, blobs and manifests were opened
        // as they came. A FIFO put in place of one blocked the open for
        // good (a replay hung, and the daemon's serving thread with it), and
        // a symlink to `/dev/zero` was read without end.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let stored = commit_with(&store, dir.path(), "a", &[("f", "content")]);
        let fifo = |path: &Path| {
            std::fs::remove_file(path).unwrap();
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        };
        let zeros = |path: &Path| {
            std::fs::remove_file(path).unwrap();
            std::os::unix::fs::symlink("/dev/zero", path).unwrap();
        };
        for (plant, name) in [(&fifo as &dyn Fn(&Path), "a FIFO"), (&zeros, "/dev/zero")] {
            let store = Store::new(dir.path().join(format!("store-{}", name.len())));
            let stored = commit_with(&store, dir.path(), "b", &[("f", "content")]);
            plant(&stored.output_path());
            let result = stored.clone();
            let checked = within_a_while(move || check_output(&result, None).map(|_| ()));
            // Damage, as a missing file is: a replay quarantines the
            // result and goes on. It was an I/O error, each replay failing
            // the same way until the user cleared the store by hand.
            assert!(
                matches!(&checked, Err(e @ ReplayError::Io { .. }) if e.is_damage()),
                "{name} as the record: {checked:?}"
            );
            plant(&store.blob_path(&stored.manifest.artifacts[0]));
            let (s, result, dest) = (store.clone(), stored.clone(), dir.path().join("dest"));
            let restored = within_a_while(move || restore_artifacts(&s, &result, None, &dest));
            assert!(
                restored.as_ref().is_err_and(ReplayError::is_damage),
                "{name} as a blob: {restored:?}"
            );
            plant(&stored.dir.join("manifest.json"));
            let (s, key) = (store.clone(), stored.manifest.key);
            let found = within_a_while(move || s.get(&key).is_some());
            assert!(!found, "{name} as the manifest: the result is not found");
            // A refused replay has the result quarantined, which moves the
            // blob aside without reading it: it followed the symlink and
            // waited on the FIFO before.
            let (s, result) = (store.clone(), stored.clone());
            let quarantined = within_a_while(move || s.quarantine(&result, "damaged")).unwrap();
            let blob = store.blob_path(&stored.manifest.artifacts[0]);
            let aside = quarantined
                .join("damaged-blobs")
                .join(stored.manifest.artifacts[0].sha256.hex());
            assert!(
                blob.symlink_metadata().is_err() && aside.symlink_metadata().is_ok(),
                "{name} as a blob is moved aside"
            );
        }
        // The untouched store still replays.
        check_output(&stored, None).unwrap();
    }

    #[test]
    fn results_verify_quarantines_what_is_not_a_blob_without_reading_it() {
        // Regression: `reprise results verify` opened blobs as they came
        // and hashed them whole: a FIFO in a blob's place hung it, a
        // symlink to `/dev/zero` was read without end, and a huge file
        // was read to its end before its size was looked at.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let fifo = |path: &Path| nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let zeros = |path: &Path| std::os::unix::fs::symlink("/dev/zero", path).unwrap();
        // A sparse file far longer than any blob may be: reading it would
        // take hours.
        let huge = |path: &Path| {
            let f = std::fs::File::create(path).unwrap();
            f.set_len(1 << 40).unwrap();
        };
        /// Puts something in a blob's place.
        type Plant = fn(&Path);
        let plants: [(Plant, &str); 3] = [
            (fifo, "a FIFO"),
            (zeros, "/dev/zero"),
            (huge, "a 1 TiB file"),
        ];
        let mut blobs = Vec::new();
        for (i, (plant, _)) in plants.iter().enumerate() {
            let content = format!("content {i}");
            let stored = commit_with(&store, dir.path(), &format!("r{i}"), &[("f", &content)]);
            let blob = store.blob_path(&stored.manifest.artifacts[0]);
            std::fs::remove_file(&blob).unwrap();
            plant(&blob);
            blobs.push((blob, stored.manifest.artifacts[0].sha256));
        }
        let sound = commit_with(&store, dir.path(), "sound", &[("f", "sound")]);
        let s = store.clone();
        let check = within_a_while(move || verify_store(&s)).unwrap();
        assert_eq!(check.sound, 1);
        assert_eq!(check.quarantined.len(), plants.len(), "{check:?}");
        for ((blob, sha), (_, name)) in blobs.iter().zip(plants) {
            assert!(blob.symlink_metadata().is_err(), "{name} is moved aside");
            let aside = check.quarantined.iter().any(|(to, _)| {
                to.join("damaged-blobs")
                    .join(sha.hex())
                    .symlink_metadata()
                    .is_ok()
            });
            assert!(aside, "{name} is in the quarantine");
        }
        assert!(store.get(&sound.manifest.key).is_some());
    }

    #[test]
    fn a_blob_longer_than_its_manifest_says_is_read_one_byte_past_it_only() {
        // A huge (sparse) file planted in the store in place of a blob was
        // copied whole into the restored folder before it was refused.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("store"));
        let stored = commit_with(&store, dir.path(), "a", &[("f", "content")]);
        let blob = store.blob_path(&stored.manifest.artifacts[0]);
        std::fs::File::options()
            .write(true)
            .open(&blob)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let to = dir.path().join("copy");
        let mut file = std::fs::File::create(&to).unwrap();
        let (mut buf, mut hashed) = (Vec::new(), 0);
        let copied = copy_hashing(&blob, &mut file, &mut buf, 8, |b| hashed += b.len()).unwrap();
        assert_eq!((copied, hashed), (8, 8));
        assert_eq!(std::fs::metadata(&to).unwrap().len(), 8);
        let restored = restore_artifacts(&store, &stored, None, &dir.path().join("dest"));
        assert!(matches!(restored, Err(ReplayError::Artifact { .. })));
    }

    /// Replays `result` as the pipeline does, with its tags: output check,
    /// then artifacts into `dest`.
    fn replay_tagged(
        store: &Store,
        result: &StoredResult,
        dest: &Path,
    ) -> Result<usize, ReplayError> {
        let tags = store.tags(result);
        assert!(tags.is_some(), "the result keeps tags");
        check_output(result, tags.as_ref())?;
        restore_artifacts(store, result, tags.as_ref(), dest)
    }

    #[test]
    fn a_replay_by_tags_refuses_changed_forged_and_swapped_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let a = commit_with(
            &store,
            dir.path(),
            "a",
            &[("f", "content-a"), ("g", "more")],
        );
        let b = commit_with(&store, dir.path(), "b", &[("f", "content-b")]);
        let tags = store.tags(&a).expect("a committed result keeps tags");
        assert!(every_tag_holds(&store, &a, &tags));
        assert_eq!(
            replay_tagged(&store, &a, &dir.path().join("ok")).unwrap(),
            2
        );
        assert_eq!(
            std::fs::read(dir.path().join("ok/f")).unwrap(),
            b"content-a"
        );
        let fa = store.blob_path(&a.manifest.artifacts[0]);
        let refused = |what: &str| {
            let dest = dir.path().join(what);
            let err = replay_tagged(&store, &a, &dest).unwrap_err();
            assert!(
                matches!(err, ReplayError::Artifact { .. }),
                "{what}: {err:?}"
            );
            assert!(!dest.join("f").exists(), "{what}: nothing restored");
        };

        // A changed byte, its tag left alone.
        std::fs::write(&fa, "content-A").unwrap();
        refused("changed");

        // The changed byte with tags made for it under another key (an
        // attacker's own store's): ours do not take them.
        let forger = Store::new(dir.path().join("forger"));
        let forged = commit_with(
            &forger,
            dir.path(),
            "a-forged",
            &[("f", "content-A"), ("g", "more")],
        );
        std::fs::copy(
            forged.dir.join(crate::tags::TAGS_FILE),
            a.dir.join(crate::tags::TAGS_FILE),
        )
        .unwrap();
        refused("forged");

        // Another result's blob of the same size, with its tag: a tag
        // binds its part's sha256, so it does not pass for this one.
        std::fs::write(&fa, "content-b").unwrap();
        let mut kept = std::fs::read(a.dir.join(crate::tags::TAGS_FILE)).unwrap();
        let theirs = std::fs::read(b.dir.join(crate::tags::TAGS_FILE)).unwrap();
        kept[32..64].copy_from_slice(&theirs[32..64]);
        std::fs::write(a.dir.join(crate::tags::TAGS_FILE), &kept).unwrap();
        refused("swapped");

        // The output record changed, its length kept: refused too.
        std::fs::write(&fa, "content-a").unwrap();
        let rec = std::fs::read(a.output_path()).unwrap();
        let mut changed = rec.clone();
        *changed.last_mut().unwrap() = b'?';
        std::fs::write(a.output_path(), &changed).unwrap();
        let err = check_output(&a, store.tags(&a).as_ref()).unwrap_err();
        assert!(matches!(err, ReplayError::OutputMismatch { .. }), "{err:?}");
        std::fs::write(a.output_path(), &rec).unwrap();
    }

    #[test]
    fn tags_that_do_not_hold_cost_only_the_sha256_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let a = commit_with(&store, dir.path(), "a", &[("f", "content-a")]);
        // Tags cut short, then garbled, then a new key: each time the
        // bytes, sound, are checked by sha256 and replayed.
        let tags_file = a.dir.join(crate::tags::TAGS_FILE);
        std::fs::write(&tags_file, [7u8; 32]).unwrap();
        assert!(store.tags(&a).is_none());
        check_output(&a, None).unwrap();
        assert_eq!(
            restore_artifacts(&store, &a, None, &dir.path().join("1")).unwrap(),
            1
        );
        std::fs::write(&tags_file, [7u8; 64]).unwrap();
        assert_eq!(replay_tagged(&store, &a, &dir.path().join("2")).unwrap(), 1);
        let again = commit_with(&store, dir.path(), "b", &[("f", "content-b")]);
        std::fs::remove_file(store.tag_key_path()).unwrap();
        crate::tags::TagKey::load_or_make(&store.tag_key_path()).unwrap();
        assert_eq!(
            replay_tagged(&store, &again, &dir.path().join("3")).unwrap(),
            1
        );
        assert_eq!(std::fs::read(dir.path().join("3/f")).unwrap(), b"content-b");
    }

    #[test]
    fn a_replay_makes_anew_the_tags_it_had_to_check_by_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let a = commit_with(&store, dir.path(), "a", &[("f", "ff"), ("g", "gg")]);
        let tags_file = a.dir.join(crate::tags::TAGS_FILE);
        let whole = std::fs::read(&tags_file).unwrap();
        let replay = |to: &str| {
            let dest = dir.path().join(to);
            let (output, staged) = check_and_stage(&store, &a, &dest).unwrap();
            let mut out = Vec::new();
            output.write(&mut out, &mut Vec::new()).unwrap();
            assert_eq!(out, b"a passed\n");
            assert_eq!(staged.commit().unwrap(), 2);
            assert_eq!(std::fs::read(dest.join("g")).unwrap(), b"gg");
        };
        // Each way a part comes to have no tag that holds: the tags file
        // lost, one part's tag missing (a part a fetch resumed), one
        // garbled, a new key. Each time the replay checks by sha256 and
        // makes them anew, the same as the commit made them.
        let lost = |_: &mut Vec<u8>| std::fs::remove_file(&tags_file).unwrap();
        let one_missing = |t: &mut Vec<u8>| {
            t[32..64].fill(0);
            std::fs::write(&tags_file, &t).unwrap();
        };
        let garbled = |t: &mut Vec<u8>| {
            t[70] ^= 1;
            std::fs::write(&tags_file, &t).unwrap();
        };
        type Damage<'a> = &'a dyn Fn(&mut Vec<u8>);
        let cases: [(&str, Damage); 3] = [
            ("the tags file lost", &lost),
            ("a part without a tag", &one_missing),
            ("a garbled tag", &garbled),
        ];
        for (name, damage) in cases {
            damage(&mut whole.clone());
            replay(name);
            assert_eq!(std::fs::read(&tags_file).unwrap(), whole, "{name}");
        }
        std::fs::remove_file(store.tag_key_path()).unwrap();
        crate::tags::TagKey::load_or_make(&store.tag_key_path()).unwrap();
        assert!(
            store
                .tags(&a)
                .is_some_and(|t| !every_tag_holds(&store, &a, &t))
        );
        replay("a new key");
        let tags = store.tags(&a).expect("tags made with the new key");
        assert!(every_tag_holds(&store, &a, &tags));
        // A damaged blob is refused, and no tag is made of it.
        std::fs::remove_file(&tags_file).unwrap();
        std::fs::write(store.blob_path(&a.manifest.artifacts[1]), "gG").unwrap();
        assert!(check_and_stage(&store, &a, &dir.path().join("bad")).is_err());
        assert!(!tags_file.exists(), "no tags made for a damaged result");
    }

    #[test]
    fn a_refused_restore_leaves_no_folder_it_made() {
        // Regression: the temporary files went, the folders made for them
        // stayed, empty.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let files = [("top", "t"), ("a/b/deep", "d"), ("c/f", "f")];
        let stored = commit_with(&store, dir.path(), "n", &files);
        let deep = stored
            .manifest
            .artifacts
            .iter()
            .find(|a| a.path.as_str() == "a/b/deep");
        std::fs::write(store.blob_path(deep.unwrap()), "D").unwrap();
        let fresh = dir.path().join("fresh");
        assert!(restore_artifacts(&store, &stored, None, &fresh).is_err());
        assert!(!fresh.exists(), "the folder made for the restore is gone");
        let there = dir.path().join("there");
        std::fs::create_dir_all(there.join("c")).unwrap();
        std::fs::write(there.join("mine"), "m").unwrap();
        assert!(restore_artifacts(&store, &stored, None, &there).is_err());
        let mut left: Vec<_> = std::fs::read_dir(&there)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["c", "mine"], "what was there stays, nothing else");
        assert_eq!(std::fs::read_dir(there.join("c")).unwrap().count(), 0);

        // Refused for its output, after every artifact was staged.
        let stored = commit_with(&store, dir.path(), "o", &files[1..]);
        std::fs::write(
            stored.output_path(),
            vec![b'x'; stored.manifest.output_bytes as usize],
        )
        .unwrap();
        let dest = dir.path().join("output-refused");
        assert!(check_and_stage(&store, &stored, &dest).is_err());
        assert!(!dest.exists());
        // Restored, the folders stay.
        let stored = commit_with(&store, dir.path(), "p", &files[1..]);
        let (_, staged) = check_and_stage(&store, &stored, &dest).unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("a/b/deep")).unwrap(), b"d");
        assert_eq!(std::fs::read(dest.join("c/f")).unwrap(), b"f");
    }

    #[test]
    fn damaged_results_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let arts = dir.path().join("a");
        std::fs::create_dir_all(&arts).unwrap();
        std::fs::write(arts.join("f"), "content").unwrap();
        let stored = store
            .commit(
                manifest(inputs("t"), Outcome::Passed, 1),
                b"",
                Some(&arts),
                None,
            )
            .unwrap();
        std::fs::write(store.blob_path(&stored.manifest.artifacts[0]), "c0ntent").unwrap();
        let damage = verify_artifacts(&store, &stored).unwrap_err();
        assert!(damage.is_damage(), "{damage:?}");
        let dest = dir.path().join("restored");
        for tags in [None, store.tags(&stored)] {
            assert!(matches!(
                restore_artifacts(&store, &stored, tags.as_ref(), &dest),
                Err(ReplayError::Artifact { .. })
            ));
        }
        assert!(
            !dest.join("f").exists(),
            "a damaged artifact is not restored"
        );
        assert_eq!(
            std::fs::read_dir(&dest).map(|d| d.count()).unwrap_or(0),
            0,
            "no temporary file is left"
        );
        // Checked streaming (verify) and read whole (check_output), with
        // and without tags, each damage is found the same.
        let both = |stored: &StoredResult| {
            let tags = store.tags(stored);
            let streamed = verify(stored).unwrap_err();
            let whole = check_output(stored, None).unwrap_err();
            let tagged = check_output(stored, tags.as_ref()).unwrap_err();
            let kinds = [&streamed, &whole, &tagged].map(std::mem::discriminant);
            assert!(
                kinds.iter().all(|k| *k == kinds[0]),
                "{streamed:?} {whole:?} {tagged:?}"
            );
            assert!(streamed.is_damage());
            streamed
        };
        std::fs::write(stored.output_path(), record::MAGIC).unwrap();
        let err = both(&stored);
        assert!(matches!(err, ReplayError::OutputSize { .. }), "{err:?}");
        // Of the manifest's size: a record that does not decode, and one
        // that decodes to other output.
        let mut rec = Vec::new();
        record::push(&mut rec, StreamId::Stdout, 0, b"the output");
        let stored = store
            .commit(manifest(inputs("u"), Outcome::Passed, 1), &rec, None, None)
            .unwrap();
        let garbage = vec![b'x'; rec.len()];
        std::fs::write(stored.output_path(), &garbage).unwrap();
        let err = both(&stored);
        assert!(matches!(err, ReplayError::Record { .. }), "{err:?}");
        let mut cut = rec.clone();
        cut[record::MAGIC.len() + 8] += 1;
        std::fs::write(stored.output_path(), &cut).unwrap();
        let err = both(&stored);
        assert!(matches!(err, ReplayError::Record { .. }), "{err:?}");
        let mut other = Vec::new();
        record::push(&mut other, StreamId::Stdout, 0, b"not output");
        assert_eq!(other.len(), rec.len());
        std::fs::write(stored.output_path(), &other).unwrap();
        let err = both(&stored);
        assert!(matches!(err, ReplayError::OutputMismatch { .. }), "{err:?}");
    }
}
