//! Fetching a result through the orchestrator: what a fetch checks before
//! it commits: the producer's seal ([`reprise_protocol::seal::verify`]: the
//! certificate chains to the team CA, may authenticate clients, is valid
//! now and not on the revocation list the orchestrator sent at `Welcome`,
//! and its signature covers the manifest's canonical encoding); the
//! manifest's own consistency ([`ResultManifest::check`]: its key is its
//! inputs' key, artifact paths are plain relative paths, no file twice);
//! the manifest is for the key asked and its inputs are the ones this
//! checkout computed; the result passed; the record's and artifacts' sizes are
//! under the limits ([`ResultManifest::check_sizes`]); each part starts
//! at chunk 0 or exactly where this fetch asked of this very result
//! ([`Sealed::fits`]); every chunk is the length its place in its part
//! says; the output record's and every artifact's size, and digest over
//! every byte of the part (kept from an earlier cut transfer or just
//! arrived): by BLAKE3 where the manifest gives it (version 3,
//! [`crate::part_digest`]), else by sha256;
//! nothing follows the last artifact. Everything is staged in the store's
//! `tmp/` ([`Store::receive`]) and committed only at the end, so a failure
//! anywhere leaves the store's results as they were.
//!
//! A transfer cut midway (the stream broke off, a chunk that is not its
//! length) keeps the chunks received so far in the result's partial folder
//! ([`crate::store::Partial`]), each with the state of its part's sha256
//! after it, and the next fetch of the key asks for the rest ([`Resume`])
//! at once, from whichever holder the orchestrator picks, hashing on from
//! the recorded state. Meanwhile a thread reads the kept chunks back and
//! checks that they hash to the states recorded
//! ([`KeptCheck`](crate::store::KeptCheck)); the result is committed only
//! if they do, and otherwise the parts are cut back to their chunks that
//! hold and the fetch asks once more ([`FetchError::KeptDamaged`]). A part
//! whose whole sha256 does not match the manifest (bad bytes from a
//! hostile holder, whatever sha256 it sent with each chunk) drops the
//! partial altogether, and nothing of it is ever committed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use reprise_frames::{ChunkError, FrameRecv, Pieces, ReadError, read_chunk_pieces};
use reprise_protocol::digest::{Blake3Digest, RunKey, Sha256Digest};
use reprise_protocol::key::KeyInputs;
use reprise_protocol::manifest::{ManifestError, Outcome, Oversize};
use reprise_protocol::seal::{SealError, SignedBy};
use reprise_protocol::wire::{Resume, Sealed, chunk_len};
use rustls::pki_types::{CertificateDer, UnixTime};
use thiserror::Error;
use tracing::debug;

use super::LinkError;
use crate::part_digest::PartDigest;
use crate::store::{ChunkRefused, Partial, Receiving, Store, StoreError, StoredResult};

/// Why a fetched result was not committed. Whatever the reason, nothing
/// was committed and the caller runs the tests for real.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("no peer holds the result")]
    NotFound,
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the producer could not serve the result: {0}")]
    Unavailable(String),
    #[error("the producer's seal does not hold")]
    Seal(#[from] SealError),
    #[error("the result's manifest is refused")]
    Manifest(#[from] ManifestError),
    #[error("the producer sent a result for key {got}, not {asked}")]
    WrongKey { asked: RunKey, got: RunKey },
    #[error("the result's inputs differ from this checkout's ({0})")]
    InputsDiffer(String),
    #[error("the holder cannot be fetched from directly: {0}")]
    NoDirect(String),
    #[error(
        "the holder sent a result other than the one the orchestrator offered (another producer's seal, or other outputs)"
    )]
    NotOffered,
    #[error("the producer sent a result that did not pass")]
    NotPassed,
    #[error(transparent)]
    TooLarge(#[from] Oversize),
    #[error("the {part} does not match its manifest (sha256 {found}, expected {expected})")]
    Digest {
        part: String,
        expected: Sha256Digest,
        found: Sha256Digest,
    },
    #[error("the {part} does not match its manifest (BLAKE3 {found}, expected {expected})")]
    Blake3 {
        part: String,
        expected: Blake3Digest,
        found: Blake3Digest,
    },
    #[error("the {part} was hashed by another function than its manifest gives")]
    DigestKind { part: String },
    #[error("the transfer broke off in the {part}")]
    Truncated {
        part: String,
        #[source]
        source: Option<ReadError>,
    },
    #[error("the producer sent a chunk of {0} bytes where another length was due")]
    BadChunk(usize),
    #[error("the holder started the transfer where this fetch did not ask")]
    BadStart,
    #[error("the producer sent data after the last artifact")]
    TrailingData,
    #[error(
        "chunks kept from a cut transfer changed on disk since they arrived; they are cut back to the last one that holds"
    )]
    KeptDamaged,
    #[error("disk full: staging the fetched result in {} failed (free some space: `reprise results gc`, `reprise cache drop`)", .0.display())]
    DiskFull(PathBuf),
    #[error("staging the fetched result in {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FetchError {
    /// Whether the chunks received so far are worth keeping for the rest
    /// of the transfer: the transfer was cut, or a chunk was refused. A
    /// part that does not match the manifest, trailing data or a store
    /// error drop them.
    fn keeps_partial(&self) -> bool {
        matches!(
            self,
            FetchError::Truncated { .. } | FetchError::BadChunk(_) | FetchError::KeptDamaged
        )
    }

    /// Whether the disk ran out of space somewhere beneath this error.
    fn is_disk_full(&self) -> bool {
        if matches!(self, FetchError::Store(StoreError::Full(_))) {
            return true;
        }
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.raw_os_error() == Some(nix::libc::ENOSPC)
            {
                return true;
            }
            next = e.source();
        }
        false
    }
}

/// Checks a transfer header before any data is read: the producer's seal,
/// the manifest, the key, the inputs, the outcome, the record's size.
/// Returns who sealed it.
pub fn check_transfer(
    roots: &[CertificateDer<'_>],
    sealed: &Sealed,
    key: &RunKey,
    expected: &KeyInputs,
    revoked: &BTreeSet<Sha256Digest>,
    now: UnixTime,
) -> Result<SignedBy, FetchError> {
    let m = &sealed.manifest;
    let who = reprise_protocol::seal::verify(&sealed.seal, m, roots, now, revoked)?;
    m.check()?;
    if m.key != *key || expected.key() != *key {
        return Err(FetchError::WrongKey {
            asked: *key,
            got: m.key,
        });
    }
    if m.inputs != *expected {
        let diff = expected.diff(&m.inputs);
        let names: Vec<String> = diff.into_iter().map(|d| d.0).collect();
        return Err(FetchError::InputsDiffer(names.join(", ")));
    }
    if m.outcome != Outcome::Passed {
        return Err(FetchError::NotPassed);
    }
    m.check_sizes()?;
    Ok(who)
}

/// What a fetch brought: the result committed, who sealed it, and the
/// bytes of its parts that came over the wire now and that were kept from
/// an earlier transfer that was cut.
#[derive(Debug)]
pub struct Fetched {
    pub stored: StoredResult,
    pub signed_by: SignedBy,
    pub received: u64,
    pub resumed: u64,
    /// Whether it came straight from the holder ([`super::direct`]), not
    /// through the orchestrator's relay.
    pub direct: bool,
    /// Whether it came straight from the holder over TCP, not QUIC.
    pub tcp: bool,
}

/// Whether a transfer header's `from` is one this fetch accepts: every
/// part from its start, or exactly the rest it asked for of this very
/// result. Returns whether it is the rest.
pub fn check_start(
    sealed: &Sealed,
    from: &[u64],
    asked: Option<&Resume>,
) -> Result<bool, FetchError> {
    let whole = from.iter().all(|f| *f == 0);
    let rest = asked.is_some_and(|r| r.manifest == sealed.digest() && r.from == from);
    if !sealed.fits(from) || !(whole || rest) {
        return Err(FetchError::BadStart);
    }
    Ok(rest && !whole)
}

/// Reads the data of a checked transfer into its partial folder (`resumed`
/// when the transfer is its rest), checking every chunk, every part's size
/// and sha256, then commits it. Returns the result and the bytes received
/// and resumed.
pub(super) async fn receive(
    recv: &mut impl FrameRecv,
    sealed: Sealed,
    resumed: Option<Partial>,
    store: &Store,
) -> Result<(StoredResult, u64, u64), FetchError> {
    let started = std::time::Instant::now();
    let disk_full = |e: FetchError| {
        if e.is_disk_full() {
            FetchError::DiskFull(store.root().join("tmp"))
        } else {
            e
        }
    };
    let mut incoming = store
        .receive(sealed, resumed)
        .map_err(|e| disk_full(e.into()))?;
    let resumed = incoming.resumed_bytes();
    let checking = incoming
        .kept_check()
        .map(|check| tokio::task::spawn_blocking(move || check.run()));
    let mut received = 0;
    let got = receive_parts(recv, &mut incoming, &mut received).await;
    // Whatever the rest did, nothing is committed or kept as it stands
    // before the chunks kept are known to hold.
    if let Some(checking) = checking {
        let damaged = checking
            .await
            .map_err(|e| StoreError::Io {
                path: incoming.path().to_path_buf(),
                source: std::io::Error::other(e),
            })
            .and_then(|r| r)
            .map_err(|e| disk_full(e.into()))?;
        if !damaged.is_empty() {
            debug!(?damaged, "chunks kept from a cut transfer did not hold");
            incoming
                .cut_back(&damaged)
                .map_err(|e| disk_full(e.into()))?;
            return Err(match got {
                Err(e) if e.is_disk_full() => disk_full(e),
                _ => FetchError::KeptDamaged,
            });
        }
    }
    if let Err(e) = got {
        if e.keeps_partial() {
            incoming.keep();
            debug!(
                received,
                resumed, "a transfer was cut; its checked chunks are kept: {e}"
            );
        }
        return Err(disk_full(e));
    }
    let took = started.elapsed();
    let stored = incoming.commit().map_err(|e| disk_full(e.into()))?;
    debug!(
        received_ms = took.as_millis() as u64,
        committed_ms = (started.elapsed() - took).as_millis() as u64,
        received,
        resumed,
        "received and committed a result"
    );
    Ok((stored, received, resumed))
}

/// Reads every chunk of the parts from chunk `from[i]` of part `i` on
/// into `incoming`, each hashed and written as it arrives, on this
/// thread: the bytes just decrypted are hashed and written while still in
/// the cache, and no other thread waits for them. Each part's digest is
/// checked against the manifest once it is whole (by BLAKE3 where a
/// version 3 manifest gives it, else by sha256); then nothing may follow
/// the last. Counts the bytes written in `received`; stops at the first
/// error, every chunk written before it kept.
async fn receive_parts(
    recv: &mut impl FrameRecv,
    incoming: &mut Receiving,
    received: &mut u64,
) -> Result<(), FetchError> {
    let parts = incoming.sealed().parts();
    let from = incoming.from();
    // A manifest of version 3 gives each part's BLAKE3 digest, which the
    // parts are checked by instead of their sha256 ([`crate::part_digest`]).
    let blake3 = incoming.sealed().manifest.blake3();
    let mut pieces = Pieces::default();
    for (i, (part, bytes, sha256)) in parts.iter().enumerate() {
        if i > 0 {
            crate::faults::pause_point("fetch");
        }
        let truncated = |source: Option<ReadError>| FetchError::Truncated {
            part: part.clone(),
            source,
        };
        let mut w = incoming.part(i)?;
        for index in from[i]..reprise_protocol::wire::chunk_count(*bytes) {
            let len = chunk_len(*bytes, index);
            // Each chunk is hashed and written from the pieces the stream
            // received, not copied into a buffer first. The sha256 the
            // holder sent with it is its word only; the part's digest is
            // checked over every byte instead.
            match read_chunk_pieces(recv, len, &mut pieces).await {
                Ok(_holders_sha) => {}
                Err(ChunkError::Overrun(n)) => return Err(FetchError::BadChunk(n)),
                Err(ChunkError::Read(e)) => return Err(truncated(Some(e))),
            }
            match w.write_pieces(&pieces.slices()) {
                Ok(()) => *received += pieces.len() as u64,
                Err(ChunkRefused::PastEnd { .. }) => {
                    return Err(FetchError::BadChunk(pieces.len()));
                }
                Err(ChunkRefused::Store(e)) => return Err(e.into()),
            }
        }
        let part = part.clone();
        match (incoming.part_done(w)?, &blake3) {
            (PartDigest::Blake3(found), Some(expected)) if found == expected[i] => {}
            (PartDigest::Sha256(found), None) if found == *sha256 => {}
            (PartDigest::Blake3(found), Some(expected)) => {
                return Err(FetchError::Blake3 {
                    part,
                    expected: expected[i],
                    found,
                });
            }
            (PartDigest::Sha256(found), None) => {
                return Err(FetchError::Digest {
                    part,
                    expected: *sha256,
                    found,
                });
            }
            // A partial resumed is one of this very manifest (its name is
            // the manifest's digest), so this does not happen.
            _ => return Err(FetchError::DigestKind { part }),
        }
    }
    match recv.ended().await {
        Ok(true) => Ok(()),
        Ok(false) => Err(FetchError::TrailingData),
        Err(e) => Err(FetchError::Truncated {
            part: "end of the transfer".into(),
            source: Some(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Credentials;
    use crate::store::Sealer;
    use reprise_protocol::manifest::{MAX_RECORD_BYTES, ResultManifest};

    /// A CA and credentials it issued, made with rcgen.
    fn team() -> (CertificateDer<'static>, Credentials) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let pem = format!("{}{}{}", leaf.pem(), key.serialize_pem(), ca.pem());
        (ca.der().clone(), Credentials::from_pem(&pem).unwrap())
    }

    fn manifest() -> ResultManifest {
        let inputs = crate::store::tests::inputs("t");
        let mut m = crate::store::tests::manifest(inputs, Outcome::Passed, 1);
        m.output_bytes = 1;
        m.artifacts = vec![reprise_protocol::manifest::Artifact {
            path: "a/b.txt".parse().unwrap(),
            sha256: Sha256Digest::of(b"s"),
            blake3: None,
            bytes: 1,
            mode: 0o644,
        }];
        m
    }

    #[test]
    fn transfer_headers_are_checked_before_any_data() {
        let (ca, creds) = team();
        let roots = [ca];
        let expected = manifest().inputs;
        let key = expected.key();
        let none = BTreeSet::new();
        let check = |m: ResultManifest, revoked: &BTreeSet<Sha256Digest>| {
            let t = Sealed {
                seal: creds.seal(&m),
                manifest: m,
            };
            check_transfer(&roots, &t, &key, &expected, revoked, UnixTime::now())
        };
        check(manifest(), &none).expect("a good header passes");
        let dup = {
            let mut m = manifest();
            m.artifacts.push(m.artifacts[0].clone());
            m
        };
        let table: Vec<(&str, ResultManifest)> = vec![
            ("setuid", {
                let mut m = manifest();
                m.artifacts[0].mode = 0o4755;
                m
            }),
            ("the same file twice", dup),
            ("failed", {
                let mut m = manifest();
                m.outcome = Outcome::Failed;
                m
            }),
            ("huge record", {
                let mut m = manifest();
                m.output_bytes = MAX_RECORD_BYTES + 1;
                m
            }),
            ("another key", {
                let mut m = manifest();
                m.inputs.tree = "other".into();
                m.key = m.inputs.key();
                m
            }),
            ("a key that is not its inputs'", {
                let mut m = manifest();
                m.key = Sha256Digest::of(b"k").hex().parse().unwrap();
                m
            }),
            ("networked where this checkout is not", {
                let mut m = manifest();
                m.inputs.network = true;
                m.key = m.inputs.key();
                m
            }),
        ];
        for (name, m) in table {
            assert!(check(m, &none).is_err(), "{name} was accepted");
        }
        // Revoked producer.
        let fingerprint = creds.identity().unwrap().fingerprint;
        assert!(matches!(
            check(manifest(), &BTreeSet::from([fingerprint])),
            Err(FetchError::Seal(SealError::Revoked { .. }))
        ));
        // Sealed over one manifest, sent with another.
        let mut t = Sealed {
            seal: creds.seal(&manifest()),
            manifest: manifest(),
        };
        t.manifest.artifacts[0].sha256 = Sha256Digest::of(b"forged");
        assert!(matches!(
            check_transfer(&roots, &t, &key, &expected, &none, UnixTime::now()),
            Err(FetchError::Seal(SealError::Signature))
        ));
        // A producer from another CA.
        let (other_ca, _) = team();
        t.manifest = manifest();
        assert!(matches!(
            check_transfer(&[other_ca], &t, &key, &expected, &none, UnixTime::now()),
            Err(FetchError::Seal(SealError::Certificate(_)))
        ));
    }
}
