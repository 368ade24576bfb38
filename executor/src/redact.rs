//! Keeping the secrets' values out of what a run shows and keeps.
//!
//! A secret is looked for in each of its [`forms`]: the value itself, its
//! percent-encoding, and its base64. Output streams are masked across chunk
//! borders: each holds back the last `longest form - 1` bytes it was given,
//! so a value split over two chunks is still seen whole before anything of
//! it is released. Artifacts are searched ([`find_in_file`]); one that holds
//! a secret keeps its result on this machine.

use std::io::Read;
use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// What a secret is replaced with.
pub const MASK: &[u8] = b"[redacted]";

/// Encoded forms shorter than this are not looked for: a two-character
/// base64 fragment would mask half of any output.
const MIN_ENCODED: usize = 6;

/// How a secret's value was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Raw,
    PercentEncoded,
    Base64,
}

impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Form::Raw => "as is",
            Form::PercentEncoded => "URL-encoded",
            Form::Base64 => "base64-encoded",
        })
    }
}

/// The byte strings that give `value` away: the value; its percent
/// encoding with upper- and lower-case hex digits, spaces as `%20` and as
/// `+`; and its base64 in the standard and the URL-safe alphabet. Inside
/// longer base64 text a value starts at one of three byte offsets, each
/// encoding it differently; for each, the characters that depend on the
/// value alone are kept (the edges they share with neighbours are not).
pub fn forms(value: &[u8]) -> Vec<(Form, Vec<u8>)> {
    let mut out: Vec<(Form, Vec<u8>)> = Vec::new();
    if value.is_empty() {
        return out;
    }
    out.push((Form::Raw, value.to_vec()));
    let mut add = |form: Form, bytes: Vec<u8>| {
        if bytes.len() >= MIN_ENCODED && !out.iter().any(|(_, b)| *b == bytes) {
            out.push((form, bytes));
        }
    };
    let encoded = percent_encoding::percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
        .to_string()
        .replace("%2D", "-")
        .replace("%2E", ".")
        .replace("%5F", "_")
        .replace("%7E", "~");
    add(Form::PercentEncoded, encoded.clone().into_bytes());
    add(
        Form::PercentEncoded,
        encoded.replace("%20", "+").into_bytes(),
    );
    add(
        Form::PercentEncoded,
        lower_hex_escapes(&encoded).into_bytes(),
    );
    let n = value.len();
    for offset in 0..3usize {
        let mut shifted = vec![0u8; offset];
        shifted.extend_from_slice(value);
        // Characters [first, last) carry bits of the value only.
        let first = (8 * offset).div_ceil(6);
        let last = 8 * (offset + n) / 6;
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let text = engine.encode(&shifted);
            if first < last && last <= text.len() {
                add(Form::Base64, text.as_bytes()[first..last].to_vec());
            }
        }
    }
    out
}

fn lower_hex_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut rest = encoded;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..(at + 3).min(rest.len())];
        out.push_str(&escape.to_ascii_lowercase());
        rest = &rest[at + escape.len()..];
    }
    out.push_str(rest);
    out
}

/// Every form of every secret, and the automata finding them: one for
/// masking (leftmost, longest first, so a form containing another is
/// masked whole) and one for searching a stream (the only kind that can).
#[derive(Debug, Clone, Default)]
pub struct Patterns {
    /// (secret's name, form) of each pattern, by pattern index.
    labels: Vec<(String, Form)>,
    longest: usize,
    automata: Option<(AhoCorasick, AhoCorasick)>,
}

impl Patterns {
    /// The patterns of `(name, value)` secrets (empty values are ignored).
    pub fn new(secrets: &[(String, String)]) -> Patterns {
        let mut labels = Vec::new();
        let mut bytes = Vec::new();
        for (name, value) in secrets {
            for (form, b) in forms(value.as_bytes()) {
                labels.push((name.clone(), form));
                bytes.push(b);
            }
        }
        let longest = bytes.iter().map(Vec::len).max().unwrap_or(0);
        let automata = (!bytes.is_empty()).then(|| {
            let masker = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&bytes)
                .expect("secret patterns are plain byte strings");
            let searcher =
                AhoCorasick::new(&bytes).expect("secret patterns are plain byte strings");
            (masker, searcher)
        });
        Patterns {
            labels,
            longest,
            automata,
        }
    }

    /// `data`, whole, with every form of every secret masked.
    pub fn mask(&self, data: &[u8]) -> Vec<u8> {
        let Some((masker, _)) = &self.automata else {
            return data.to_vec();
        };
        let mut out = Vec::with_capacity(data.len());
        masker.replace_all_with_bytes(data, &mut out, |_, _, dst| {
            dst.extend_from_slice(MASK);
            true
        });
        out
    }

    /// Looks for any form of any secret in what `reader` gives, as a
    /// stream (a file may be larger than memory).
    pub fn find_in(&self, reader: impl Read) -> std::io::Result<Option<Found>> {
        let Some((_, searcher)) = &self.automata else {
            return Ok(None);
        };
        let reader = std::io::BufReader::with_capacity(64 * 1024, reader);
        match searcher.stream_find_iter(reader).next() {
            Some(m) => {
                let (secret, form) = self.labels[m?.pattern().as_usize()].clone();
                Ok(Some(Found { secret, form }))
            }
            None => Ok(None),
        }
    }

    /// [`Patterns::find_in`] of the file at `path`.
    pub fn find_in_file(&self, path: &Path) -> std::io::Result<Option<Found>> {
        if self.automata.is_none() {
            return Ok(None);
        }
        self.find_in(std::fs::File::open(path)?)
    }
}

/// A secret found in a file: which one, and how it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub secret: String,
    pub form: Form,
}

/// A redactor for one stream.
#[derive(Debug)]
pub struct Redactor {
    patterns: Patterns,
    pending: Vec<u8>,
}

impl Redactor {
    pub fn new(patterns: &Patterns) -> Redactor {
        Redactor {
            patterns: patterns.clone(),
            pending: Vec::new(),
        }
    }

    /// Takes a chunk; returns the bytes that are safe to release.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.patterns.automata.is_none() {
            return bytes.to_vec();
        }
        self.pending.extend_from_slice(bytes);
        self.pending = self.patterns.mask(&self.pending);
        let keep = (self.patterns.longest - 1).min(self.pending.len());
        let release = self.pending.len() - keep;
        self.pending.drain(..release).collect()
    }

    /// Releases whatever is held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = self.patterns.mask(&self.pending);
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(values: &[&str]) -> Patterns {
        let pairs: Vec<(String, String)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("S{i}"), v.to_string()))
            .collect();
        Patterns::new(&pairs)
    }

    fn run(values: &[&str], chunks: &[&str]) -> String {
        let mut r = Redactor::new(&secrets(values));
        let mut out = Vec::new();
        for c in chunks {
            out.extend(r.feed(c.as_bytes()));
        }
        out.extend(r.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn secrets_are_masked_even_across_chunks() {
        assert_eq!(run(&["hunter2"], &["pw=hunter2\n"]), "pw=[redacted]\n");
        assert_eq!(
            run(&["hunter2"], &["pw=hun", "ter", "2 ok"]),
            "pw=[redacted] ok"
        );
        assert_eq!(
            run(&["abc", "abcdef"], &["xabcdefy abc"]),
            "x[redacted]y [redacted]"
        );
        assert_eq!(run(&[], &["plain"]), "plain");
        assert_eq!(run(&[""], &["plain"]), "plain");
        assert_eq!(run(&["zz"], &["no secret here", "z"]), "no secret herez");
    }

    #[test]
    fn encoded_forms_are_masked_wherever_they_sit() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        let value = "s3cr3t value/with+chars?";
        // base64 of the value after 0, 1 and 2 other bytes, in both
        // alphabets: none of it may show.
        for prefix in ["", "a", "ab", "abc"] {
            for engine in [&STANDARD, &URL_SAFE] {
                let text = engine.encode(format!("{prefix}{value}!"));
                let shown = run(&[value], &["token=", &text, "\n"]);
                assert!(shown.contains("[redacted]"), "{prefix:?}: {shown}");
                let core = &engine.encode(value)[4..20];
                assert!(!shown.contains(core), "{prefix:?}: {shown}");
            }
        }
        // Percent-encoded, as a URL query and as a form.
        for encoded in [
            "s3cr3t%20value%2Fwith%2Bchars%3F",
            "s3cr3t+value%2Fwith%2Bchars%3F",
            "s3cr3t%20value%2fwith%2bchars%3f",
        ] {
            assert_eq!(
                run(&[value], &["https://x/?t=", encoded, "&"]),
                "https://x/?t=[redacted]&"
            );
        }
    }

    #[test]
    fn a_file_holding_a_secret_says_which_and_how() {
        let p = secrets(&["not-this-one", "hunter2-hunter2"]);
        let mut big = vec![b'x'; 300_000];
        assert_eq!(p.find_in(&big[..]).unwrap(), None);
        let encoded = STANDARD_NO_PAD.encode("..hunter2-hunter2..");
        big.extend_from_slice(encoded.as_bytes());
        assert_eq!(
            p.find_in(&big[..]).unwrap(),
            Some(Found {
                secret: "S1".into(),
                form: Form::Base64
            })
        );
        assert_eq!(
            p.find_in(&b"a not-this-one b"[..]).unwrap(),
            Some(Found {
                secret: "S0".into(),
                form: Form::Raw
            })
        );
        assert_eq!(Patterns::new(&[]).find_in(&b"anything"[..]).unwrap(), None);
    }
}
