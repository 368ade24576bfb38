//! The canonical encoding of a result manifest that its producer signs.
//!
//! The JSON of a manifest is not stable enough to sign (field order, number
//! and string formatting may change between serde versions), so the
//! signature covers this encoding instead: a domain tag, then every field in
//! a fixed order, each as a big-endian u64 length followed by its bytes
//! (numbers as fixed-width big-endian), lists preceded by their count. No two
//! different manifests encode alike. The seal that carries the signature,
//! and its verification, are [`crate::seal`].

use crate::manifest::{Outcome, ResultManifest, Snapshot};

/// Version of the signed encoding; part of the signed bytes.
pub const SIGNATURE_VERSION: u32 = 2;

/// The bytes a producer signs for `manifest`.
pub fn signing_bytes(manifest: &ResultManifest) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |bytes: &[u8]| crate::hex::put_field(&mut out, bytes);
    put(b"reprise-result-signature");
    put(&SIGNATURE_VERSION.to_be_bytes());
    put(&manifest.version.to_be_bytes());
    put(manifest.key.as_bytes());
    put(&manifest.inputs.encode());
    put(manifest.commit.as_bytes());
    put(match manifest.outcome {
        Outcome::Passed => b"passed",
        Outcome::Failed => b"failed",
    });
    put(&manifest.exit_code.to_be_bytes());
    put(&(manifest.phases.len() as u64).to_be_bytes());
    for phase in &manifest.phases {
        put(phase.name.as_bytes());
        put(&phase.ms.to_be_bytes());
    }
    put(&manifest.total_ms.to_be_bytes());
    put(manifest.accel.as_bytes());
    put(manifest.tool_version.as_bytes());
    put(manifest.producer.host.as_bytes());
    put(manifest.producer.user.as_bytes());
    put(&manifest.created_at.to_be_bytes());
    match manifest.snapshot {
        Snapshot::Fresh => put(b"fresh"),
        Snapshot::Generation(g) => put(g.as_bytes()),
    }
    put(manifest.output_sha256.as_bytes());
    put(&manifest.output_bytes.to_be_bytes());
    put(&(manifest.artifacts.len() as u64).to_be_bytes());
    for a in &manifest.artifacts {
        put(a.path.as_str().as_bytes());
        put(a.sha256.as_bytes());
        put(&a.bytes.to_be_bytes());
        put(&a.mode.to_be_bytes());
    }
    match &manifest.crontab {
        None => put(b"no crontab"),
        Some(text) => {
            put(b"crontab");
            put(text.as_bytes());
        }
    }
    match &manifest.container_image {
        None => put(b"no container image"),
        Some(id) => {
            put(b"container image");
            put(id.as_bytes());
        }
    }
    // The parts' BLAKE3 digests (manifest version 3) follow, each field
    // empty where a part has none; a manifest of version 2 without any
    // encodes as it always did, so its producers' seals still hold.
    let blake3: Vec<_> = std::iter::once(manifest.output_blake3)
        .chain(manifest.artifacts.iter().map(|a| a.blake3))
        .collect();
    if manifest.version >= 3 || blake3.iter().any(Option::is_some) {
        put(b"blake3");
        for digest in blake3 {
            put(digest.as_ref().map_or(&[][..], |d| d.as_bytes()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{Blake3Digest, Sha256Digest};
    use crate::manifest::tests::manifest;

    #[test]
    fn every_field_changes_the_signed_bytes() {
        let base = signing_bytes(&manifest());
        assert_eq!(base, signing_bytes(&manifest()), "the encoding is stable");
        let changes: Vec<fn(&mut ResultManifest)> = vec![
            |m| m.version += 1,
            |m| m.key = Sha256Digest::of(b"k").hex().parse().unwrap(),
            |m| m.inputs.tree.push('x'),
            |m| m.inputs.network = true,
            |m| m.commit.push('x'),
            |m| m.outcome = Outcome::Failed,
            |m| m.exit_code = 1,
            |m| m.phases[0].name.push('x'),
            |m| m.phases[0].ms += 1,
            |m| m.phases.clear(),
            |m| m.total_ms += 1,
            |m| m.accel = "tcg".into(),
            |m| m.tool_version.push('x'),
            |m| m.producer.host.push('x'),
            |m| m.producer.user.push('x'),
            |m| m.created_at += 1,
            |m| m.snapshot = Snapshot::Generation(Sha256Digest::of(b"g")),
            |m| m.output_sha256 = Sha256Digest::of(b"o2"),
            |m| m.output_bytes += 1,
            |m| m.artifacts[0].path = "a/c".parse().unwrap(),
            |m| m.artifacts[0].sha256 = Sha256Digest::of(b"a2"),
            |m| m.artifacts[0].bytes += 1,
            |m| m.artifacts[0].mode = 0o755,
            |m| m.artifacts.clear(),
            |m| m.crontab = Some(String::new()),
            |m| m.crontab = Some("* * * * * lint\n".into()),
            |m| m.container_image = Some(Sha256Digest::of(b"image")),
            |m| m.output_blake3 = Some(Blake3Digest::from_bytes([1; 32])),
            |m| m.artifacts[0].blake3 = Some(Blake3Digest::from_bytes([2; 32])),
        ];
        for (n, change) in changes.into_iter().enumerate() {
            let mut m = manifest();
            change(&mut m);
            assert_ne!(signing_bytes(&m), base, "change {n} kept the signed bytes");
        }
    }

    #[test]
    fn a_version_2_manifest_encodes_as_before_the_blake3_digests() {
        // The sha256 of this manifest's signed bytes as the build before
        // the BLAKE3 digests made them: producers' seals of version 2
        // results still hold.
        let mut m = manifest();
        m.version = 2;
        assert_eq!(
            Sha256Digest::of(&signing_bytes(&m)).hex(),
            "b31008f335db6632892191f3aa7a24a878b1902a3c4419fd4998e8c426067765"
        );
        // The digests of one part cannot pass for another's.
        let mut a = manifest();
        let mut b = manifest();
        let d = Some(Blake3Digest::from_bytes([7; 32]));
        (a.output_blake3, b.artifacts[0].blake3) = (d, d);
        assert_ne!(signing_bytes(&a), signing_bytes(&b));
    }

    #[test]
    fn fields_cannot_shift_into_each_other() {
        let mut a = manifest();
        let mut b = manifest();
        a.producer.host = "ab".into();
        a.producer.user = "c".into();
        b.producer.host = "a".into();
        b.producer.user = "bc".into();
        assert_ne!(signing_bytes(&a), signing_bytes(&b));
    }
}
