//! Lowercase hex encoding of digests (sha2 0.11 digests do not format as
//! hex), and the length-prefixed encoding that keys, seals and digests of
//! several fields are computed over.

/// Appends `bytes` to `out` as a big-endian u64 length and the bytes: the
/// canonical encoding of one field, so that no two different sequences of
/// fields encode alike (as plain concatenation could).
pub fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// The bytes of an even-length hex string (either case); `None` if it is
/// not one.
pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Sha256 of `bytes`, as lowercase hex.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    encode(&sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_of_empty_input() {
        assert_eq!(
            super::sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(super::encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(super::decode("00abFF"), Some(vec![0, 0xab, 0xff]));
        for bad in ["0", "zz", "+1", "éé"] {
            assert_eq!(super::decode(bad), None, "{bad}");
        }
    }
}
