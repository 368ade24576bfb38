//! Serving the local store to peers through the orchestrator. What
//! serving checks: the request decodes (keys are typed: a path-like
//! key does not), the result is stored under that key, passed, sealed, of
//! the namespace asked, and of a namespace this executor's certificate
//! grants. Only such results are announced too (with the failed ones of
//! granted namespaces, sealed, so a disagreement shows). A result whose
//! record or artifact no longer matches its sha256 is quarantined, never
//! sent whole (the record is checked before a transfer starts, by its tag
//! where the store keeps one that holds, [`crate::tags`], else by sha256).
//!
//! Each part goes in chunks of [`CHUNK_BYTES`], each with its sha256. A
//! request to resume (`Serve` with `resume`) is honoured when it names
//! this very result (its manifest's digest) and chunks within its parts;
//! otherwise the whole result is sent, and the header says which. A part
//! sent from a later chunk before this process has served it whole is not
//! checked here (its first chunks are not read): the asker checks its
//! whole sha256, as for every part.

use std::path::PathBuf;
use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use reprise_frames::{FrameSend, ReadError, WriteError, read_message, write_chunk, write_message};
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::wire::{
    CHUNK_BYTES, ErrorCode, Message, Resume, Sealed, chunk_count, chunk_len,
};
use thiserror::Error;
use tracing::{debug, warn};

use super::buffers::Buffers;
use crate::store::{Store, StoredResult};
use crate::tags::{PartHasher, Tags};

/// The files whose bytes follow a transfer header, in order.
pub fn transfer_files(store: &Store, stored: &StoredResult) -> Vec<PathBuf> {
    std::iter::once(stored.output_path())
        .chain(stored.manifest.artifacts.iter().map(|a| store.blob_path(a)))
        .collect()
}

/// Tests and benchmarks only: the chunk of a result (counted from the
/// start of its first part) at which a producer cuts every transfer, as
/// told by [`crate::vars::STOP_SERVING_AT_VAR`]; `u64::MAX` for never.
/// [`super::Link::stop_serving_at`] sets it for one link.
pub fn stop_serving_at_from_env() -> u64 {
    std::env::var(crate::vars::STOP_SERVING_AT_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Writes a transfer: its header, then each file as chunk frames from the
/// chunk `from` names (one per part), each with its sha256. Every byte
/// sent is checked against the store's record of it, so a file that no
/// longer matches its part's sha256 stops the transfer before its end
/// ([`ServeError::Damaged`]) and the asker never takes it whole:
/// - the first time this process serves a part whole, each chunk's
///   sha256 is computed for the wire, and remembered ([`ChunkTables`]);
///   the part is checked whole by its tag (`tags`, the store's keyed
///   tag of its BLAKE3, [`crate::tags`]) where it has one that holds, else by its
///   sha256;
/// - a later transfer of the part whole sends the remembered sha256s and
///   checks the part by its tag alone, hashing every byte once with
///   BLAKE3 rather than with SHA-256; without a tag, or for the rest of a
///   part, each chunk is checked against its remembered sha256 before it
///   is sent;
/// - a part whose file has the very stamp (inode, size, modification and
///   change times) it had when this process last checked it whole, and
///   had settled before that check ([`ChunkTables`]), is sent as it is
///   read, unhashed: the file system says it has not been written since.
///
/// A part checked whole is checked before its last chunk is written, so
/// a damaged part never leaves whole; a mismatch resets the stream, which
/// the asker reads as broken. (A tag that does not hold is not taken as
/// damage by itself: the part is read again and its sha256 decides.)
/// Chunks are read on the blocking pool, hashed there, and handed to the
/// stream as they are ([`pooled`]), not copied again.
/// Tests and benchmarks only: the transfer stops before chunk `stop` of
/// the result ([`ServeError::Stopped`]; `u64::MAX` for never).
pub async fn write_transfer(
    send: &mut impl FrameSend,
    transfer: &Sealed,
    files: &[PathBuf],
    from: &[u64],
    tags: Option<&Tags>,
    stop: u64,
) -> Result<(), ServeError> {
    use sha2::Digest as _;
    use std::io::Seek;
    write_message(
        send,
        &Message::Transfer {
            result: Box::new(transfer.clone()),
            from: from.to_vec(),
        },
    )
    .await?;
    let mut position = 0u64;
    let parts = transfer.parts();
    for (i, ((path, (_, bytes, sha256)), start)) in files
        .iter()
        .zip(parts)
        .zip(from.iter().copied())
        .enumerate()
    {
        if i > 0 {
            crate::faults::pause_point("serve");
        }
        let io = |source| ServeError::Io {
            path: path.clone(),
            source,
        };
        let count = chunk_count(bytes);
        // Read before the file is opened, so a change while it is read
        // shows in a later stamp.
        let opened_at = std::time::SystemTime::now();
        let mut f = crate::store::open_stored(path).map_err(io)?;
        let stamp = f.metadata().map(|m| Stamp::of(&m)).map_err(io)?;
        let known = CHUNK_TABLES.get(&sha256, count);
        // Checked whole here before and not written since: not hashed.
        let unchanged = known.as_ref().is_some_and(|k| k.stamp == Some(stamp));
        let known = known.map(|k| k.chunks);
        let tag = (start == 0 && !unchanged)
            .then(|| tags.and_then(|t| t.hasher(i)))
            .flatten();
        let mut check = PartCheck {
            // Without a tag, a part sent whole and not yet remembered is
            // hashed whole (but for a part of one chunk, whose chunk's
            // sha256 is its own).
            whole: (tag.is_none() && known.is_none() && start == 0 && count > 1)
                .then(sha2::Sha256::new),
            // With the chunks' sha256s remembered and a tag (or the file
            // unchanged), no chunk is hashed by SHA-256 at all.
            chunks: known.is_none() || (tag.is_none() && !unchanged),
            tag,
        };
        let mut table = Vec::new();
        if start > 0 {
            f.seek(std::io::SeekFrom::Start(start * CHUNK_BYTES))
                .map_err(io)?;
        }
        for index in start..count {
            if position + index >= stop {
                return Err(ServeError::Stopped(position + index));
            }
            let len = chunk_len(bytes, index) as usize;
            let read;
            (f, check, read) = tokio::task::spawn_blocking(move || {
                let read = read_pooled(&mut f, len).map(|buf| {
                    let chunk_sha = check.update(&buf);
                    (buf, chunk_sha)
                });
                (f, check, read)
            })
            .await
            .map_err(|e| io(std::io::Error::other(e)))?;
            let (chunk, chunk_sha) = match read {
                Ok(r) => r,
                // Shorter than its manifest says: damaged.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(ServeError::Damaged(path.clone()));
                }
                Err(e) => return Err(io(e)),
            };
            let chunk_sha = match (&known, chunk_sha) {
                (Some(t), Some(sha)) if t[index as usize] != sha => {
                    return Err(ServeError::Damaged(path.clone()));
                }
                (Some(t), _) => t[index as usize],
                (None, Some(sha)) if count == 1 && sha[..] != sha256.as_bytes()[..] => {
                    return Err(ServeError::Damaged(path.clone()));
                }
                (None, Some(sha)) => {
                    table.push(sha);
                    sha
                }
                (None, None) => unreachable!("a chunk not remembered is hashed"),
            };
            // A part checked whole lets its last chunk leave only once
            // it is known whole, so a damaged part is never sent whole.
            if index + 1 == count && !check.holds(tags, i, &sha256, bytes, path).await? {
                return Err(ServeError::Damaged(path.clone()));
            }
            write_chunk(send, &chunk_sha, chunk).await?;
        }
        position += count;
        // Every chunk of the part was checked against its sha256, and so
        // the whole part when it went from its start.
        let settled =
            (start == 0 && !unchanged && stamp.settled_before(opened_at)).then_some(stamp);
        if known.is_none() && start == 0 && !table.is_empty() {
            CHUNK_TABLES.remember(sha256, table, settled);
        } else if settled.is_some() {
            CHUNK_TABLES.stamp(&sha256, count, settled);
        }
    }
    Ok(())
}

/// How a part being sent is checked as its chunks are read.
struct PartCheck {
    /// The part's sha256, when it is checked whole by it.
    whole: Option<sha2::Sha256>,
    /// The part's BLAKE3, when it is checked whole by its tag.
    tag: Option<PartHasher>,
    /// Whether each chunk's own sha256 is computed.
    chunks: bool,
}

impl PartCheck {
    /// Whether the part, all of it hashed in, is whole (`true` when it is
    /// not checked whole). A tag that does not hold is not taken for
    /// damage: the part is read again and its sha256 decides.
    async fn holds(
        &mut self,
        tags: Option<&Tags>,
        i: usize,
        sha256: &Sha256Digest,
        bytes: u64,
        path: &std::path::Path,
    ) -> Result<bool, ServeError> {
        Ok(match (self.whole.take(), self.tag.take()) {
            (Some(h), _) => Sha256Digest::finish(h) == *sha256,
            (None, Some(h)) => {
                tags.is_some_and(|t| t.holds(i, sha256, bytes, &h.finish()))
                    || part_matches(path.to_path_buf(), *sha256)
                        .await
                        .map_err(|source| ServeError::Io {
                            path: path.to_path_buf(),
                            source,
                        })?
            }
            (None, None) => true,
        })
    }

    /// Hashes a chunk in; returns its sha256 if it is computed.
    fn update(&mut self, chunk: &[u8]) -> Option<[u8; 32]> {
        use sha2::Digest;
        if let Some(h) = self.whole.as_mut() {
            h.update(chunk);
        }
        if let Some(h) = self.tag.as_mut() {
            h.update(chunk);
        }
        self.chunks.then(|| sha2::Sha256::digest(chunk).into())
    }
}

/// Whether the file at `path` hashes to `sha256`, read on the blocking
/// pool.
async fn part_matches(path: PathBuf, sha256: Sha256Digest) -> std::io::Result<bool> {
    tokio::task::spawn_blocking(move || crate::store::hash_file(&path).map(|h| h.sha256 == sha256))
        .await
        .map_err(std::io::Error::other)?
}

/// Chunk buffers handed to a stream without a copy: quinn keeps a chunk
/// until the peer acknowledged it, then drops it, and the buffer goes
/// back to a pool rather than to the allocator. (Copying each chunk into
/// the stream was a tenth of a producer's CPU, and fresh 1 MiB buffers
/// page faults and zeroing besides.) The pool keeps a stream's window of
/// chunks in flight and a few more.
static CHUNK_BUFFERS: std::sync::LazyLock<Buffers> =
    std::sync::LazyLock::new(|| Buffers::new(CHUNK_BYTES as usize, 12));

/// The next `len` bytes of `f` (at most a chunk), in a pooled buffer.
fn read_pooled(f: &mut std::fs::File, len: usize) -> std::io::Result<bytes::Bytes> {
    use std::io::Read;
    let mut buf = CHUNK_BUFFERS.take();
    let read = f.take(len as u64).read_to_end(&mut buf);
    match read {
        Ok(n) if n == len => Ok(CHUNK_BUFFERS.share(buf)),
        Ok(_) => {
            CHUNK_BUFFERS.give_back(buf);
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
        Err(e) => {
            CHUNK_BUFFERS.give_back(buf);
            Err(e)
        }
    }
}

/// The sha256 of each chunk of parts this process served whole and found
/// matching their sha256, by the part's sha256: in memory only, so what a
/// transfer is checked against was computed here from bytes that matched
/// a manifest, never read from a disk that may have changed since.
///
/// With each table, the [`Stamp`] of the file last checked whole here, if
/// its last change was [`SETTLED`] before the check began: a file with that
/// very stamp has not been written since (a write sets its change time to
/// now, which no one but the clock can set back), and is sent without
/// being hashed again. The asker checks every byte against the signed
/// manifest whatever the holder checked; what this check spares the holder
/// is sending a part it would find damaged, which still happens for any
/// change made through the file system.
struct ChunkTables(std::sync::Mutex<Tables>);

/// The tables by part sha256, and how many chunks they hold.
#[derive(Default)]
struct Tables {
    by_part: std::collections::HashMap<Sha256Digest, Known>,
    chunks: usize,
}

/// What is remembered of a part: its chunks' sha256s, and the stamp of
/// the file last found whole.
#[derive(Clone)]
struct Known {
    chunks: Arc<[[u8; 32]]>,
    stamp: Option<Stamp>,
}

/// What the file system says of a file without reading it: which file it
/// is, its size, and when its bytes and its inode last changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

/// How long before a check a file's last change must be for its stamp to
/// be trusted: a write within the file system's timestamp granularity of
/// the last change (a clock tick, or a second on some file systems) could
/// leave the change time as it was.
pub const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether the file last changed at least [`SETTLED`] before `t`.
    fn settled_before(&self, t: std::time::SystemTime) -> bool {
        let Ok(now) = t.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let (secs, nanos) = self.changed;
        let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
            return false;
        };
        std::time::Duration::new(secs, nanos.min(999_999_999)) + SETTLED <= now
    }
}

/// How many chunks' sha256s (and parts) are remembered, all parts
/// together; past it, they are forgotten all at once. Each is 32 bytes
/// (and a part's entry about 100), so the tables stay under 16 MiB: the
/// tables of 256 GiB of parts, or of 100,000 small ones.
const CHUNK_TABLES_MAX: usize = 1 << 18;

static CHUNK_TABLES: std::sync::LazyLock<ChunkTables> =
    std::sync::LazyLock::new(|| ChunkTables(Default::default()));

impl ChunkTables {
    /// The table of the part whose sha256 is `sha256`, if it has `count`
    /// chunks.
    fn get(&self, sha256: &Sha256Digest, count: u64) -> Option<Known> {
        let tables = self.0.lock().expect("chunk tables");
        tables
            .by_part
            .get(sha256)
            .filter(|k| k.chunks.len() as u64 == count)
            .cloned()
    }

    fn remember(&self, sha256: Sha256Digest, table: Vec<[u8; 32]>, stamp: Option<Stamp>) {
        let mut tables = self.0.lock().expect("chunk tables");
        // Each part counts as a chunk more, so many small ones are
        // bounded too.
        if tables.chunks + tables.by_part.len() + table.len() + 1 > CHUNK_TABLES_MAX {
            *tables = Tables::default();
        }
        tables.chunks += table.len();
        let known = Known {
            chunks: table.into(),
            stamp,
        };
        if let Some(old) = tables.by_part.insert(sha256, known) {
            tables.chunks -= old.chunks.len();
        }
    }

    /// Sets the stamp of the file last found whole for a part whose
    /// table of `count` chunks is remembered.
    fn stamp(&self, sha256: &Sha256Digest, count: u64, stamp: Option<Stamp>) {
        let mut tables = self.0.lock().expect("chunk tables");
        if let Some(k) = tables
            .by_part
            .get_mut(sha256)
            .filter(|k| k.chunks.len() as u64 == count)
        {
            k.stamp = stamp;
        }
    }
}

/// Moves a result found damaged while serving aside, with a log line.
fn quarantine(store: &Store, result: &StoredResult, why: &str) {
    match store.quarantine(result, why) {
        Ok(dest) => warn!(
            key = %result.manifest.key,
            "a damaged stored result was quarantined in {}: {why}",
            dest.display()
        ),
        Err(e) => {
            warn!(key = %result.manifest.key, "a damaged stored result could not be quarantined: {e}")
        }
    }
}

/// Why serving a result to a peer failed.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{} no longer matches its sha256 in the store", .0.display())]
    Damaged(PathBuf),
    #[error("stopped at chunk {0} as told (REPRISE_TEST_STOP_SERVING_AT)")]
    Stopped(u64),
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Answers one stream the orchestrator opened on the link: `Serve` (a
/// relayed transfer), or `Expect` (a ticket for a direct fetch, kept in
/// `tickets` when this executor listens for peers, [`super::direct`]).
pub(super) async fn serve_one(
    mut send: SendStream,
    mut recv: RecvStream,
    store: &Store,
    repos: &[String],
    stop: u64,
    tickets: Option<&Arc<super::direct::Tickets>>,
) -> Result<(), ServeError> {
    let (key, namespace, resume) = match read_message(&mut recv).await {
        Ok(Message::Serve {
            key,
            namespace,
            resume,
        }) => (key, namespace, resume),
        Ok(Message::Expect {
            ticket,
            key,
            namespace,
            asker,
        }) if tickets.is_some() => {
            let tickets = tickets.expect("checked");
            write_message(&mut send, &Message::Expecting).await?;
            // The stream stays open: `Served` goes on it once the ticket's
            // transfer has left whole; it ends unanswered if it never is.
            tickets.expect(
                ticket,
                super::direct::Pending {
                    key,
                    namespace,
                    asker,
                    repos: repos.to_vec(),
                    reply: send,
                },
            );
            return Ok(());
        }
        Ok(_) => {
            let m = Message::error(ErrorCode::Unexpected, "expected serve");
            write_message(&mut send, &m).await?;
            let _ = send.finish();
            return Ok(());
        }
        Err(e) => {
            // A path-like key or digest does not even decode.
            warn!("refused a request to serve that does not decode (a path for a key?): {e}");
            let m = Message::error(ErrorCode::Malformed, e.to_string());
            let _ = write_message(&mut send, &m).await;
            let _ = send.finish();
            return Err(e.into());
        }
    };
    serve_held(&mut send, &key, &namespace, resume, store, repos, stop)
        .await
        .map(|_| ())
}

/// Sends the result of `key` on `send` (a transfer header and its chunks,
/// from where `resume` asks if it names this very result), or `NotFound`
/// when this store holds no such result it may serve: of `namespace`,
/// which `repos` (what its certificate grants) must name, passed, sealed,
/// its output record whole. Returns the bytes of parts' data sent, `None`
/// when nothing was.
pub(super) async fn serve_held(
    send: &mut impl FrameSend,
    key: &RunKey,
    namespace: &str,
    resume: Option<Resume>,
    store: &Store,
    repos: &[String],
    stop: u64,
) -> Result<Option<u64>, ServeError> {
    let granted = repos.iter().any(|r| r == namespace);
    if !granted {
        warn!(key = %key.short(), "refused to serve: this certificate does not grant {namespace}");
    }
    let found = store
        .get(key)
        .filter(|_| granted)
        .filter(|r| {
            let own = r.manifest.inputs.namespace == namespace;
            if !own {
                warn!(key = %key.short(), "refused to serve: the result belongs to {}, not {namespace}", r.manifest.inputs.namespace);
            }
            own
        })
        .map(|r| {
            let tags = store.tags(&r);
            (r, tags)
        })
        .filter(
            |(r, tags)| match crate::replay::verify_output(r, tags.as_ref()) {
                Ok(()) => true,
                Err(e) => {
                    quarantine(store, r, &e.to_string());
                    false
                }
            },
        );
    let Some((stored, tags, sealed)) = found.and_then(|(r, tags)| r.sealed().map(|s| (r, tags, s)))
    else {
        let m = Message::error(ErrorCode::NotFound, "the result is not held");
        write_message(send, &m).await?;
        send.end().await;
        return Ok(None);
    };
    // The rest of a cut transfer if the asker holds the start of this very
    // result; otherwise all of it.
    let from = resume
        .filter(|r| r.manifest == sealed.digest() && sealed.fits(&r.from))
        .map(|r| r.from)
        .unwrap_or_else(|| vec![0; sealed.parts().len()]);
    let files = transfer_files(store, &stored);
    match write_transfer(send, &sealed, &files, &from, tags.as_ref(), stop).await {
        Ok(()) => {
            send.end().await;
            debug!(key = %key, "served a result");
            Ok(Some(sealed.bytes_from(&from)))
        }
        Err(ServeError::Damaged(path)) => {
            // Cut off: the asker must see a broken transfer, not a whole one.
            send.abort().await;
            quarantine(
                store,
                &stored,
                &format!("{} no longer matches its sha256", path.display()),
            );
            Err(ServeError::Damaged(path))
        }
        Err(ServeError::Stopped(at)) => {
            // Ended where it stopped, as a producer that died there after
            // its last chunk had left.
            send.end().await;
            warn!(key = %key, "stopped serving at chunk {at}, as told");
            Err(ServeError::Stopped(at))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_tables_are_found_by_part_and_count_and_forgotten_past_their_bound() {
        let tables = ChunkTables(Default::default());
        let (a, b, c) = (
            Sha256Digest::of(b"a"),
            Sha256Digest::of(b"b"),
            Sha256Digest::of(b"c"),
        );
        tables.remember(a, vec![[1; 32]; 3], None);
        assert_eq!(tables.get(&a, 3).unwrap().chunks[2], [1; 32]);
        assert!(tables.get(&a, 2).is_none(), "a part of another length");
        assert!(tables.get(&b, 3).is_none());
        // Up to the bound exactly (3 chunks and a part, then the rest).
        tables.remember(b, vec![[2; 32]; CHUNK_TABLES_MAX - 5], None);
        assert!(
            tables.get(&a, 3).is_some() && tables.get(&b, CHUNK_TABLES_MAX as u64 - 5).is_some()
        );
        // Past it: everything before goes.
        tables.remember(c, vec![[3; 32]], None);
        assert!(
            tables.get(&a, 3).is_none() && tables.get(&b, CHUNK_TABLES_MAX as u64 - 5).is_none()
        );
        assert!(tables.get(&c, 1).is_some());
    }

    #[test]
    fn a_stamp_is_trusted_only_once_its_file_has_settled_and_only_for_its_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"bytes").unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&path).unwrap());
        let now = std::time::SystemTime::now();
        assert!(!stamp.settled_before(now), "just written");
        assert!(stamp.settled_before(now + SETTLED + std::time::Duration::from_millis(50)));
        // Written again: another stamp, whatever the bytes.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"bytes").unwrap();
        assert_ne!(Stamp::of(&std::fs::metadata(&path).unwrap()), stamp);

        let tables = ChunkTables(Default::default());
        let a = Sha256Digest::of(b"a");
        tables.stamp(&a, 1, Some(stamp));
        assert!(tables.get(&a, 1).is_none(), "no table, no stamp");
        tables.remember(a, vec![[1; 32]], None);
        tables.stamp(&a, 2, Some(stamp));
        assert_eq!(tables.get(&a, 1).unwrap().stamp, None, "another length");
        tables.stamp(&a, 1, Some(stamp));
        assert_eq!(tables.get(&a, 1).unwrap().stamp, Some(stamp));
    }
}
