//! The run key: what makes two runs the same run.
//!
//! sha256 over a canonical encoding of the inputs: every field is written as
//! a big-endian u64 length followed by its bytes, in a fixed order, after a
//! format version, so no two different sets of inputs can encode alike (as
//! plain concatenation could). Secrets are never inputs. Whether the tests
//! had the network is an input: a networked run is not hermetic, so it never
//! shares a key with the hermetic run of the same tree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::digest::RunKey;

/// Version of the key encoding; part of every key.
pub const KEY_VERSION: u32 = 2;

/// The driver class of a run in a VM (the `qemu` driver; a dry run plans one).
pub const DRIVER_QEMU: &str = "qemu";
/// The driver class of a run in a privileged container on the host's
/// podman (the `podman` driver).
pub const DRIVER_PODMAN: &str = "podman";
/// Every driver class a key's `driver` input takes.
pub const DRIVER_CLASSES: [&str; 2] = [DRIVER_QEMU, DRIVER_PODMAN];

/// Inputs that differ between two keys: (input, this value, other value).
pub type Differences = Vec<(String, String, String)>;

/// Everything that goes into a run key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub version: u32,
    /// The repository's namespace, e.g. `example.com/team/project`.
    pub namespace: String,
    /// The git tree id of the revision (not the commit: an amended message
    /// keeps the tree and so the key).
    pub tree: String,
    /// The mk target, `test` unless asked otherwise.
    pub target: String,
    /// The counted environment variables, by name.
    pub env: BTreeMap<String, String>,
    /// The base image's digest.
    pub image_digest: String,
    /// The driver class, one of [`DRIVER_CLASSES`]: results of different
    /// classes never share a key.
    pub driver: String,
    /// Whether the test container could reach the network (`--network`).
    pub network: bool,
}

impl KeyInputs {
    /// The canonical encoding that the key hashes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |bytes: &[u8]| crate::hex::put_field(&mut out, bytes);
        put(b"reprise-run-key");
        put(&self.version.to_be_bytes());
        put(self.namespace.as_bytes());
        put(self.tree.as_bytes());
        put(self.target.as_bytes());
        put(&(self.env.len() as u64).to_be_bytes());
        for (name, value) in &self.env {
            put(name.as_bytes());
            put(value.as_bytes());
        }
        put(self.image_digest.as_bytes());
        put(self.driver.as_bytes());
        put(&[u8::from(self.network)]);
        out
    }

    /// The run key: sha256 of the encoding.
    pub fn key(&self) -> RunKey {
        RunKey::from_bytes(Sha256::digest(self.encode()).into())
    }

    /// One line per input, for `reprise key --explain`.
    pub fn explain(&self) -> Vec<(String, String)> {
        let mut lines = vec![
            ("version".to_string(), self.version.to_string()),
            ("namespace".into(), self.namespace.clone()),
            ("tree".into(), self.tree.clone()),
            ("target".into(), self.target.clone()),
        ];
        for (name, value) in &self.env {
            lines.push((format!("env {name}"), value.clone()));
        }
        lines.push(("image".into(), self.image_digest.clone()));
        lines.push(("driver".into(), self.driver.clone()));
        lines.push(("network".into(), network_word(self.network).into()));
        lines
    }

    /// The inputs that differ between `self` and `other`, each as
    /// (input, this value, other value); an absent variable shows as `(unset)`.
    pub fn diff(&self, other: &KeyInputs) -> Differences {
        let mut out = Vec::new();
        let mut field = |name: &str, a: &str, b: &str| {
            if a != b {
                out.push((name.to_string(), a.to_string(), b.to_string()));
            }
        };
        field(
            "version",
            &self.version.to_string(),
            &other.version.to_string(),
        );
        field("namespace", &self.namespace, &other.namespace);
        field("tree", &self.tree, &other.tree);
        field("target", &self.target, &other.target);
        let names: std::collections::BTreeSet<&String> =
            self.env.keys().chain(other.env.keys()).collect();
        for name in names {
            let unset = "(unset)".to_string();
            field(
                &format!("env {name}"),
                self.env.get(name).unwrap_or(&unset),
                other.env.get(name).unwrap_or(&unset),
            );
        }
        field("image", &self.image_digest, &other.image_digest);
        field("driver", &self.driver, &other.driver);
        field(
            "network",
            network_word(self.network),
            network_word(other.network),
        );
        out
    }
}

fn network_word(network: bool) -> &'static str {
    if network { "yes" } else { "none" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> KeyInputs {
        KeyInputs {
            version: KEY_VERSION,
            namespace: "example.com/team/hello".into(),
            tree: "4b825dc642cb6eb9a060e54bf8d69288fbee4904".into(),
            target: "test".into(),
            env: BTreeMap::from([("CC".into(), "gcc".into())]),
            image_digest: "abc".into(),
            driver: "qemu".into(),
            network: false,
        }
    }

    #[test]
    fn key_is_stable_and_has_a_golden_value() {
        assert_eq!(inputs().key(), inputs().key());
        // A change to the encoding changes every key in every store: it
        // must come with a new KEY_VERSION, never by accident.
        assert_eq!(
            inputs().key().to_string(),
            "5907405fcc159c83cb7aa67bce0a189638376dcfcdc3e418af3dcc056008b468"
        );
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = inputs().key();
        let changes: Vec<fn(&mut KeyInputs)> = vec![
            |i| i.version += 1,
            |i| i.namespace.push('x'),
            |i| i.tree = "0".repeat(40),
            |i| i.target = "lint".into(),
            |i| {
                i.env.insert("CC".into(), "clang".into());
            },
            |i| {
                i.env.insert("NEW".into(), String::new());
            },
            |i| i.image_digest = "abd".into(),
            |i| i.driver = DRIVER_PODMAN.into(),
            |i| i.network = true,
        ];
        for (n, change) in changes.into_iter().enumerate() {
            let mut i = inputs();
            change(&mut i);
            assert_ne!(i.key(), base, "change {n} kept the key");
        }
    }

    #[test]
    fn encoding_is_not_plain_concatenation() {
        let mut a = inputs();
        let mut b = inputs();
        a.env = BTreeMap::from([("AB".into(), "C".into())]);
        b.env = BTreeMap::from([("A".into(), "BC".into())]);
        assert_ne!(a.key(), b.key());
        a.env.clear();
        b.env.clear();
        a.namespace = "x/y".into();
        a.target = "zt".into();
        b.namespace = "x/yz".into();
        b.target = "t".into();
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn diff_names_what_changed() {
        let a = inputs();
        let mut b = inputs();
        b.env.insert("CC".into(), "clang".into());
        b.env.insert("OPT".into(), "2".into());
        b.tree = "t2".into();
        let d = a.diff(&b);
        let names: Vec<&str> = d.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["tree", "env CC", "env OPT"]);
        assert_eq!(d[2].1, "(unset)");
        assert!(a.diff(&a).is_empty());
    }
}
