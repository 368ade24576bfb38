//! Keyed BLAKE3 tags of a stored result's parts: what lets a local replay
//! check every byte it replays at BLAKE3's speed rather than SHA-256's.
//!
//! When bytes enter the store (a run's output and artifacts committed
//! here, or a peer's received and checked against the producer's sealed
//! digests), the store keeps, beside the result, one tag per part: a hash
//! keyed by a secret of its own binding that part's sha256, its size and
//! its BLAKE3 digest. A replay hashes every byte of each part with BLAKE3
//! and compares the tag it computes (from the manifest's sha256 and size)
//! with the kept one. Only a holder of the key can make a tag, so a changed
//! byte (which would need a second BLAKE3 preimage to keep the digest), a
//! changed tag, or a blob swapped for another result's is refused exactly
//! as a sha256 mismatch would be; and a part without a tag, or whose tag
//! does not hold, is checked against its sha256 as before, so a lost key
//! or tags file only costs speed.
//!
//! The digest inside the tag is the plain BLAKE3 of the part, the one a
//! version 3 manifest seals: a receiver of such a result checked every
//! part by it as it arrived (resumed parts too), so its tags cost no
//! second pass over the bytes, nor do a producer's, which computes it for
//! the manifest. (Until 2026-12-04 the digest was keyed too, `tags-v1`,
//! which a receiver hashed a second time; those files are no longer read,
//! and the parts they tagged are checked by sha256 once and tagged anew.)
//!
//! The key is 32 random bytes in a file beside the store, never inside it
//! (`<store>.tag-key`, mode 0600): whoever may write the store but not read
//! the user's private files cannot forge a tag. A key file that is not a
//! regular file of 32 bytes readable by its owner only is not used, and
//! the next commit replaces it with a new key. It is not synced: a key lost
//! or cut by a crash is replaced the same way, and the tags made with it
//! no longer hold, which costs only speed.
//!
//! ```text
//! content = BLAKE3(bytes)
//! tag     = BLAKE3-keyed(derive_key(TAG, key), sha256 || size (u64 LE) || content)
//! ```

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use reprise_protocol::digest::{Blake3Digest, Sha256Digest};

/// The file in a result's folder holding its tags: 32 bytes per part (the
/// output record, then each artifact in the manifest's order), all zero
/// for a part without one.
pub const TAGS_FILE: &str = "tags-v2";

const TAG_CONTEXT: &str = "reprise store 2026-12 part tag of its BLAKE3";
const KEY_BYTES: usize = 32;

/// The store's tag key. Its bytes are never printed.
#[derive(Clone)]
pub struct TagKey {
    tag: [u8; 32],
}

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TagKey(..)")
    }
}

/// Where the tag key of the store at `root` is kept: beside it.
pub fn key_path(root: &Path) -> PathBuf {
    let mut name = root.as_os_str().to_owned();
    name.push(".tag-key");
    PathBuf::from(name)
}

impl TagKey {
    fn from_secret(secret: &[u8; KEY_BYTES]) -> TagKey {
        TagKey {
            tag: blake3::derive_key(TAG_CONTEXT, secret),
        }
    }

    /// The key at `path`; `None` when there is none, or the file is not a
    /// regular file of exactly 32 bytes that only its owner (this user)
    /// may read and write.
    pub fn load(path: &Path) -> Option<TagKey> {
        // A regular file, not through a symlink, without waiting.
        let mut file = crate::store::open_stored(path).ok()?;
        let meta = file.metadata().ok()?;
        let private = meta.permissions().mode() & 0o077 == 0;
        let ours = meta.uid() == nix::unistd::geteuid().as_raw();
        if meta.len() != KEY_BYTES as u64 || !private || !ours {
            tracing::warn!(
                path = %path.display(),
                "the store's tag key is not a private 32-byte file of this user, so it \
                 is not used (the next result stored replaces it); replays check \
                 every sha256 meanwhile"
            );
            return None;
        }
        let mut secret = [0u8; KEY_BYTES];
        file.read_exact(&mut secret).ok()?;
        Some(TagKey::from_secret(&secret))
    }

    /// The key at `path`, made first if there is none or it is not one
    /// ([`TagKey::load`]): 32 random bytes, mode 0600, written whole before
    /// they take the name, so processes making it at once each read the one
    /// that landed.
    pub fn load_or_make(path: &Path) -> Option<TagKey> {
        if let Some(key) = TagKey::load(path) {
            return Some(key);
        }
        if let Err(e) = make_key(path) {
            tracing::debug!(path = %path.display(), "making the store's tag key: {e}");
        }
        TagKey::load(path)
    }

    /// The tag of a part whose bytes hashed to `content` and whose manifest
    /// gives `sha256` and `bytes`.
    pub fn tag(&self, sha256: &Sha256Digest, bytes: u64, content: &Content) -> Tag {
        let mut h = blake3::Hasher::new_keyed(&self.tag);
        h.update(sha256.as_bytes());
        h.update(&bytes.to_le_bytes());
        h.update(content.0.as_bytes());
        Tag(h.finalize())
    }
}

fn make_key(path: &Path) -> std::io::Result<()> {
    let mut secret = [0u8; KEY_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| std::io::Error::other("no randomness for the store's tag key"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".reprise-tag-key-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    tmp.write_all(&secret)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A part's BLAKE3, as it is being hashed. Small pieces (a QUIC
/// frame's, a few KiB) are gathered into [`HASH_BATCH`] before they are
/// hashed: BLAKE3 hashes many 1 KiB chunks of one input at once with SIMD,
/// so fed a packet at a time it ran at a third of its speed here.
#[derive(Debug, Clone)]
pub struct PartHasher {
    hasher: blake3::Hasher,
    pending: Vec<u8>,
}

/// The least a [`PartHasher`] hands BLAKE3 at once (but at the end).
pub const HASH_BATCH: usize = 64 << 10;

impl PartHasher {
    /// Gathers the pieces given to `hasher` (keyed or not, at an offset
    /// or not) into batches as [`PartHasher::update`] does.
    pub fn batching(hasher: blake3::Hasher) -> PartHasher {
        PartHasher {
            hasher,
            pending: Vec::new(),
        }
    }

    /// The hasher, every piece given to it.
    pub fn into_hasher(mut self) -> blake3::Hasher {
        self.hasher.update(&self.pending);
        self.hasher
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        if !self.pending.is_empty() {
            let take = (HASH_BATCH - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < HASH_BATCH {
                return;
            }
            self.hasher.update(&self.pending);
            self.pending.clear();
        }
        if bytes.len() >= HASH_BATCH {
            self.hasher.update(bytes);
        } else {
            self.pending.reserve_exact(HASH_BATCH);
            self.pending.extend_from_slice(bytes);
        }
    }

    pub fn finish(&self) -> Content {
        let mut last = self.hasher.clone();
        last.update(&self.pending);
        Content(last.finalize())
    }
}

/// A part's BLAKE3 digest, as a tag binds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content(blake3::Hash);

impl Content {
    /// A hasher for a part's bytes.
    pub fn hasher() -> PartHasher {
        PartHasher::batching(blake3::Hasher::new())
    }

    /// The content of a part whose BLAKE3 digest is `digest`, computed
    /// over its bytes elsewhere (a receiver's check, a producer's
    /// manifest).
    pub fn of(digest: &Blake3Digest) -> Content {
        Content(blake3::Hash::from_bytes(*digest.as_bytes()))
    }
}

/// A part's tag (compared in constant time: `blake3::Hash`'s equality).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tag(blake3::Hash);

impl std::fmt::Debug for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tag(..)")
    }
}

/// A stored result's tags, with the key to check them.
#[derive(Debug, Clone)]
pub struct Tags {
    key: TagKey,
    parts: Vec<Option<Tag>>,
}

impl Tags {
    /// The tags kept in a result's folder `dir` for `parts` parts, checked
    /// with the key at `key_path`; `None` when either is missing, or the
    /// file is not exactly one tag per part.
    pub fn read(key_path: &Path, dir: &Path, parts: usize) -> Option<Tags> {
        let key = TagKey::load(key_path)?;
        let mut file = crate::store::open_stored(&dir.join(TAGS_FILE)).ok()?;
        let want = parts.checked_mul(32)?;
        let meta = file.metadata().ok()?;
        if meta.len() != want as u64 {
            return None;
        }
        let mut bytes = vec![0u8; want];
        file.read_exact(&mut bytes).ok()?;
        let parts = bytes
            .chunks_exact(32)
            .map(|c| {
                let tag: [u8; 32] = c.try_into().expect("32 bytes");
                (tag != [0; 32]).then_some(Tag(blake3::Hash::from_bytes(tag)))
            })
            .collect();
        Some(Tags { key, parts })
    }

    /// No tags for `parts` parts, with the store's `key` to make them by
    /// ([`Tags::healed`]): what a replay hashes by when a result's tags
    /// file is missing or does not read.
    pub fn none(key: TagKey, parts: usize) -> Tags {
        Tags {
            key,
            parts: vec![None; parts],
        }
    }

    /// The key these tags are made with.
    pub fn key(&self) -> &TagKey {
        &self.key
    }

    /// These tags with part `i`'s made anew for each `(i, sha256, bytes,
    /// content)` of `healed` (parts whose sha256 was just checked over
    /// their bytes, which hashed to `content`): what [`replace`] writes.
    pub fn healed(&self, healed: &[(usize, Sha256Digest, u64, Content)]) -> Vec<Option<Tag>> {
        let mut parts = self.parts.clone();
        for (i, sha256, bytes, content) in healed {
            if let Some(part) = parts.get_mut(*i) {
                *part = Some(self.key.tag(sha256, *bytes, content));
            }
        }
        parts
    }

    /// A hasher for part `i`, if it has a tag to check.
    pub fn hasher(&self, i: usize) -> Option<PartHasher> {
        self.parts.get(i)?.as_ref()?;
        Some(Content::hasher())
    }

    /// Whether part `i`, of `sha256` and `bytes` by the manifest, hashed to
    /// `content`: its kept tag is the one the key makes of them.
    pub fn holds(&self, i: usize, sha256: &Sha256Digest, bytes: u64, content: &Content) -> bool {
        let Some(Some(kept)) = self.parts.get(i) else {
            return false;
        };
        self.key.tag(sha256, bytes, content) == *kept
    }
}

/// Writes the tags of a result's parts into its (staging) folder `dir`.
/// Not synced: a tags file lost or cut by a crash fails to read, and the
/// replay checks the sha256s instead.
pub fn write(dir: &Path, parts: &[Option<Tag>]) -> std::io::Result<()> {
    // A received result's folder is a partial kept from an earlier fetch:
    // not written through whatever is in the file's place.
    crate::store::create_anew(&dir.join(TAGS_FILE))?.write_all(&encode(parts))
}

/// Replaces the tags file of a stored result's folder `dir` with `parts`:
/// written whole under another name, then renamed over it, so a replay
/// reading it meanwhile reads the old file or the new one, never half.
pub fn replace(dir: &Path, parts: &[Option<Tag>]) -> std::io::Result<()> {
    let mut tmp = tempfile::Builder::new().prefix(".tags-").tempfile_in(dir)?;
    tmp.write_all(&encode(parts))?;
    tmp.persist(dir.join(TAGS_FILE)).map_err(|e| e.error)?;
    Ok(())
}

fn encode(parts: &[Option<Tag>]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(parts.len() * 32);
    for tag in parts {
        bytes.extend_from_slice(&tag.map_or([0; 32], |t| *t.0.as_bytes()));
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(bytes: &[u8]) -> Content {
        let mut h = Content::hasher();
        h.update(bytes);
        h.finish()
    }

    #[test]
    fn pieces_of_any_size_hash_as_the_whole() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = content(&bytes);
        for sizes in [
            &[1usize][..],
            &[1452],
            &[6500, 1],
            &[HASH_BATCH],
            &[HASH_BATCH + 3, 17],
        ] {
            let mut h = Content::hasher();
            let mut rest = &bytes[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, after) = rest.split_at((*size).min(rest.len()));
                h.update(piece);
                rest = after;
            }
            assert_eq!(h.finish(), whole, "pieces of {sizes:?}");
        }
    }

    #[test]
    fn the_content_a_tag_binds_is_the_digest_a_manifest_gives() {
        // A receiver and a producer tag a part by the BLAKE3 digest they
        // already have; a replay hashes the bytes: the two must agree.
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let digest = Blake3Digest::from_bytes(*blake3::hash(&bytes).as_bytes());
        assert_eq!(content(&bytes), Content::of(&digest));
        assert_ne!(content(b"other"), Content::of(&digest));
    }

    #[test]
    fn a_tag_holds_only_for_its_bytes_sha256_size_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_at = key_path(&dir.path().join("store"));
        let key = TagKey::load_or_make(&key_at).unwrap();
        let mode = fs::metadata(&key_at).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sha = Sha256Digest::of(b"bytes");
        let other_sha = Sha256Digest::of(b"other");
        let tag = key.tag(&sha, 5, &content(b"bytes"));
        write(dir.path(), &[None, Some(tag)]).unwrap();
        let tags = Tags::read(&key_at, dir.path(), 2).unwrap();
        assert!(tags.hasher(0).is_none(), "a part without a tag");
        assert!(tags.holds(1, &sha, 5, &content(b"bytes")));
        assert!(!tags.holds(1, &sha, 5, &content(b"bytez")));
        assert!(!tags.holds(1, &other_sha, 5, &content(b"bytes")));
        assert!(!tags.holds(1, &sha, 6, &content(b"bytes")));
        assert!(!tags.holds(0, &sha, 5, &content(b"bytes")));
        // The wrong number of parts: not read at all.
        assert!(Tags::read(&key_at, dir.path(), 3).is_none());
        // A FIFO in the tags file's place is not waited on.
        let fifo = dir.path().join("fifo");
        fs::create_dir(&fifo).unwrap();
        nix::unistd::mkfifo(&fifo.join(TAGS_FILE), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(Tags::read(&key_at, &fifo, 0).is_none());
        // Another key (the file made anew) makes other tags.
        fs::remove_file(&key_at).unwrap();
        TagKey::load_or_make(&key_at).unwrap();
        let tags = Tags::read(&key_at, dir.path(), 2).unwrap();
        assert!(!tags.holds(1, &sha, 5, &content(b"bytes")));
    }

    #[test]
    fn a_key_others_may_read_or_of_the_wrong_size_is_not_used_but_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let key_at = key_path(&dir.path().join("store"));
        TagKey::load_or_make(&key_at).unwrap();
        let first = fs::read(&key_at).unwrap();
        fs::set_permissions(&key_at, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(TagKey::load(&key_at).is_none());
        // Others could read it: a new key replaces it.
        TagKey::load_or_make(&key_at).unwrap();
        assert_ne!(fs::read(&key_at).unwrap(), first);
        let mode = fs::metadata(&key_at).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(&key_at, [1u8; 31]).unwrap();
        assert!(TagKey::load(&key_at).is_none(), "a key cut short");
        fs::remove_file(&key_at).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, [1u8; 32]).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &key_at).unwrap();
        assert!(TagKey::load(&key_at).is_none(), "a symlink is not followed");
        fs::remove_file(&key_at).unwrap();
        nix::unistd::mkfifo(&key_at, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(
            TagKey::load(&key_at).is_none(),
            "a FIFO is not read, nor waited on"
        );
        fs::remove_file(&key_at).unwrap();
        TagKey::load_or_make(&key_at).unwrap();
        assert!(!key_at.symlink_metadata().unwrap().is_symlink());
        assert_eq!(
            fs::read(&elsewhere).unwrap(),
            [1u8; 32],
            "its target is left alone"
        );
    }
}
