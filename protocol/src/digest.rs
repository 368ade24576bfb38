//! Typed digests: a sha256 of content and a run key. Each can only hold 32
//! bytes and prints as 64 lowercase hex digits, so a value read from a
//! peer, the orchestrator, the daemon socket or a store on disk can be
//! joined onto a folder without ever naming anything but one file in it.
//! Parsing (`FromStr`, serde) accepts exactly 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;
use thiserror::Error;

/// Why a string is not a digest.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{what} must be 64 lowercase hex digits, not {shown:?}")]
pub struct DigestError {
    what: &'static str,
    shown: String,
}

impl DigestError {
    fn new(what: &'static str, text: &str) -> DigestError {
        // Enough of the value to recognise it; a hostile value may be huge.
        let shown: String = text.chars().take(80).collect();
        DigestError { what, shown }
    }
}

fn parse_hex32(what: &'static str, text: &str) -> Result<[u8; 32], DigestError> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(DigestError::new(what, text));
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            _ => return Err(DigestError::new(what, text)),
        }
    }
    Ok(out)
}

macro_rules! hex32 {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; 32]);

        impl $name {
            /// The raw 32 bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> $name {
                $name(bytes)
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The 64 hex digits.
            pub fn hex(&self) -> String {
                crate::hex::encode(&self.0)
            }

            /// The first 12 hex digits, for people.
            pub fn short(&self) -> String {
                self.hex()[..12].to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.hex())
            }
        }

        impl FromStr for $name {
            type Err = DigestError;
            fn from_str(s: &str) -> Result<$name, DigestError> {
                parse_hex32($what, s).map($name)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex32!(
    /// The sha256 of some content: an output record, an artifact, a
    /// certificate's DER encoding, a snapshot generation.
    Sha256Digest,
    "a sha256 digest"
);

hex32!(
    /// The BLAKE3 hash of some content: an output record or an artifact,
    /// beside its sha256 in a manifest, for a receiver to check it by the
    /// faster function.
    Blake3Digest,
    "a BLAKE3 digest"
);

hex32!(
    /// A run key: the sha256 of a run's canonical inputs
    /// ([`crate::key::KeyInputs::key`]).
    RunKey,
    "a run key"
);

impl Sha256Digest {
    /// The sha256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(sha2::Sha256::digest(bytes).into())
    }

    /// The digest a running hash ended with.
    pub fn finish(hasher: sha2::Sha256) -> Sha256Digest {
        Sha256Digest(hasher.finalize().into())
    }
}

/// The beginning of a run key, as people type it (`reprise results show
/// 3f2a`): 1 to 64 hex digits, upper case taken as lower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    pub fn matches(&self, key: &RunKey) -> bool {
        key.hex().starts_with(&self.0)
    }

    /// Whether the prefix is a whole key.
    pub fn whole(&self) -> Option<RunKey> {
        self.0.parse().ok()
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for KeyPrefix {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<KeyPrefix, DigestError> {
        let lower = s.to_ascii_lowercase();
        if lower.is_empty() || lower.len() > 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DigestError::new("a key or key prefix", s));
        }
        Ok(KeyPrefix(lower))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn only_64_lowercase_hex_digits_parse() {
        let d: Sha256Digest = EMPTY.parse().unwrap();
        assert_eq!(d, Sha256Digest::of(b""));
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.short(), &EMPTY[..12]);
        let refused = [
            "",
            "..",
            "../../../etc/passwd",
            "/etc/passwd",
            &EMPTY[..63],
            &format!("{EMPTY}0"),
            &EMPTY.to_uppercase(),
            &format!("{}/", &EMPTY[..63]),
            &format!("{}\0", &EMPTY[..63]),
            &format!("{}g", &EMPTY[..63]),
            &format!(" {}", &EMPTY[..63]),
            // 64 bytes, but not 64 characters of hex.
            &format!("{}é", &EMPTY[..62]),
        ];
        for bad in refused {
            assert!(bad.parse::<Sha256Digest>().is_err(), "{bad:?} parsed");
            assert!(bad.parse::<RunKey>().is_err(), "{bad:?} parsed as a key");
        }
    }

    #[test]
    fn serde_refuses_what_parsing_refuses() {
        let json = format!("\"{EMPTY}\"");
        let k: RunKey = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&k).unwrap(), json);
        for bad in [r#""../x""#, r#""/abs""#, "12", "null", r#"["a"]"#] {
            assert!(serde_json::from_str::<RunKey>(bad).is_err(), "{bad}");
        }
        let e = serde_json::from_str::<Sha256Digest>(r#""../../creds.pem""#).unwrap_err();
        assert!(e.to_string().contains("64 lowercase hex digits"), "{e}");
    }

    #[test]
    fn prefixes_are_hex_and_match_keys() {
        let k: RunKey = EMPTY.parse().unwrap();
        assert!("E3B0".parse::<KeyPrefix>().unwrap().matches(&k));
        assert!(!"e3b1".parse::<KeyPrefix>().unwrap().matches(&k));
        assert_eq!(EMPTY.parse::<KeyPrefix>().unwrap().whole(), Some(k));
        assert_eq!("e3".parse::<KeyPrefix>().unwrap().whole(), None);
        for bad in ["", "../x", "e3/", &format!("{EMPTY}0")] {
            assert!(bad.parse::<KeyPrefix>().is_err(), "{bad:?}");
        }
    }
}
