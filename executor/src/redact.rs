//! Redacting secret values from a stream of output, across chunk borders.
//!
//! Each stream holds back the last `longest secret - 1` bytes it was given,
//! so a secret split over two chunks is still seen whole before anything of
//! it is released.

/// What a secret is replaced with.
pub const MASK: &[u8] = b"[redacted]";

/// A redactor for one stream.
#[derive(Debug, Default)]
pub struct Redactor {
    secrets: Vec<Vec<u8>>,
    hold: usize,
    pending: Vec<u8>,
}

impl Redactor {
    /// A redactor for these secret values (empty values are ignored).
    pub fn new(secrets: &[String]) -> Redactor {
        let mut secrets: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let hold = secrets.first().map_or(0, |s| s.len() - 1);
        Redactor {
            secrets,
            hold,
            pending: Vec::new(),
        }
    }

    /// Takes a chunk; returns the bytes that are safe to release.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return bytes.to_vec();
        }
        self.pending.extend_from_slice(bytes);
        self.pending = mask(&self.pending, &self.secrets);
        let keep = self.hold.min(self.pending.len());
        let release = self.pending.len() - keep;
        self.pending.drain(..release).collect()
    }

    /// Releases whatever is held back.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = mask(&self.pending, &self.secrets);
        self.pending.clear();
        rest
    }
}

fn mask(data: &[u8], secrets: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    'outer: while i < data.len() {
        for s in secrets {
            if data[i..].starts_with(s) {
                out.extend_from_slice(MASK);
                i += s.len();
                continue 'outer;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secrets: &[&str], chunks: &[&str]) -> String {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        let mut r = Redactor::new(&secrets);
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
}
