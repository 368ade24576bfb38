//! The recorded output of a run: which stream, when, what bytes, in order.
//!
//! Layout: the magic line `REPRISE-RECORD 1\n`, then entries of one byte of
//! stream (1 stdout, 2 stderr), a big-endian u32 of milliseconds since the
//! start, a big-endian u32 length and the bytes. Replaying writes the bytes
//! to the same streams in the same order.

use thiserror::Error;

/// The first bytes of a record.
pub const MAGIC: &[u8] = b"REPRISE-RECORD 1\n";

/// Which stream an entry was written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamId {
    Stdout,
    Stderr,
}

/// One entry of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub stream: StreamId,
    pub at_ms: u32,
    pub bytes: Vec<u8>,
}

/// What is wrong with a record.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not an output record (or an unknown record version)")]
    BadMagic,
    #[error("record entry at byte {0} has an unknown stream")]
    BadStream(usize),
    #[error("record ends in the middle of an entry at byte {0}")]
    Truncated(usize),
}

/// Appends an entry to an encoded record (the magic first, if `out` is
/// empty).
pub fn push(out: &mut Vec<u8>, stream: StreamId, at_ms: u32, bytes: &[u8]) {
    if out.is_empty() {
        out.extend_from_slice(MAGIC);
    }
    push_entry(out, stream, at_ms, bytes);
}

/// Appends one entry's encoding to `out`, which holds the tail of a
/// record that already has its magic.
pub fn push_entry(out: &mut Vec<u8>, stream: StreamId, at_ms: u32, bytes: &[u8]) {
    out.push(match stream {
        StreamId::Stdout => 1,
        StreamId::Stderr => 2,
    });
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Decodes a whole record. An empty input is an empty record.
pub fn decode(data: &[u8]) -> Result<Vec<Entry>, RecordError> {
    entries(data)
        .map(|e| {
            e.map(|(stream, at_ms, bytes)| Entry {
                stream,
                at_ms,
                bytes: bytes.to_vec(),
            })
        })
        .collect()
}

/// The entries of an encoded record in order, borrowed from it: each
/// entry's stream, time and bytes, or what is wrong where the record stops
/// being one (the last item then). An empty input is an empty record.
pub fn entries(data: &[u8]) -> Entries<'_> {
    Entries {
        data,
        at: 0,
        done: data.is_empty(),
    }
}

/// The iterator [`entries`] returns.
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    data: &'a [u8],
    /// Where the next entry starts (0: the magic is still to be read).
    at: usize,
    done: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(StreamId, u32, &'a [u8]), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let data = self.data;
        let at = match self.at {
            0 if !data.starts_with(MAGIC) => return self.fail(RecordError::BadMagic),
            0 => MAGIC.len(),
            at => at,
        };
        if at == data.len() {
            self.done = true;
            return None;
        }
        if data.len() - at < 9 {
            return self.fail(RecordError::Truncated(at));
        }
        let stream = match data[at] {
            1 => StreamId::Stdout,
            2 => StreamId::Stderr,
            _ => return self.fail(RecordError::BadStream(at)),
        };
        let at_ms = u32::from_be_bytes(data[at + 1..at + 5].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(data[at + 5..at + 9].try_into().expect("4 bytes")) as usize;
        if data.len() - at - 9 < len {
            return self.fail(RecordError::Truncated(at));
        }
        self.at = at + 9 + len;
        Some(Ok((stream, at_ms, &data[at + 9..at + 9 + len])))
    }
}

impl Entries<'_> {
    fn fail<T>(&mut self, e: RecordError) -> Option<Result<T, RecordError>> {
        self.done = true;
        Some(Err(e))
    }
}

/// Why a record could not be read from a reader.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("reading the record")]
    Io(#[from] std::io::Error),
}

/// How much of an entry's bytes is handed on at a time.
const PIECE: usize = 64 * 1024;

/// Decodes a record from `input` without holding it: `sink` gets each
/// entry's bytes in order, in pieces of at most 64 KiB (an entry's pieces
/// in a row; an empty entry gets none). An empty input is an empty record.
pub fn decode_stream(
    mut input: impl std::io::Read,
    mut sink: impl FnMut(StreamId, &[u8]) -> std::io::Result<()>,
) -> Result<(), StreamError> {
    let mut magic = [0u8; MAGIC.len()];
    let got = read_full(&mut input, &mut magic)?;
    if got == 0 {
        return Ok(());
    }
    if got < MAGIC.len() || magic != MAGIC {
        return Err(RecordError::BadMagic.into());
    }
    let mut at = MAGIC.len();
    let mut head = [0u8; 9];
    let mut piece = vec![0u8; PIECE];
    loop {
        match read_full(&mut input, &mut head)? {
            0 => return Ok(()),
            9 => {}
            _ => return Err(RecordError::Truncated(at).into()),
        }
        let stream = match head[0] {
            1 => StreamId::Stdout,
            2 => StreamId::Stderr,
            _ => return Err(RecordError::BadStream(at).into()),
        };
        let mut left = u32::from_be_bytes(head[5..9].try_into().expect("4 bytes")) as usize;
        while left > 0 {
            let n = left.min(PIECE);
            if read_full(&mut input, &mut piece[..n])? < n {
                return Err(RecordError::Truncated(at).into());
            }
            sink(stream, &piece[..n])?;
            left -= n;
        }
        at += 9 + u32::from_be_bytes(head[5..9].try_into().expect("4 bytes")) as usize;
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(input: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_in_order() {
        let mut rec = Vec::new();
        push(&mut rec, StreamId::Stdout, 0, b"\x1b[32mok\x1b[0m\n");
        push(&mut rec, StreamId::Stderr, 5, b"warn\n");
        push(&mut rec, StreamId::Stdout, 9, b"");
        let entries = decode(&rec).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].bytes, b"\x1b[32mok\x1b[0m\n");
        assert_eq!(entries[1].stream, StreamId::Stderr);
        assert_eq!(entries[1].at_ms, 5);
    }

    #[test]
    fn damaged_records_are_refused() {
        let mut rec = Vec::new();
        push(&mut rec, StreamId::Stdout, 0, b"hello");
        for cut in MAGIC.len() + 1..rec.len() {
            assert_eq!(
                decode(&rec[..cut]),
                Err(RecordError::Truncated(MAGIC.len()))
            );
        }
        assert_eq!(decode(b"garbage"), Err(RecordError::BadMagic));
        let mut bad = rec.clone();
        bad[MAGIC.len()] = 7;
        assert_eq!(decode(&bad), Err(RecordError::BadStream(MAGIC.len())));
        assert_eq!(decode(b""), Ok(vec![]));
    }

    /// `decode_stream`'s entries, joined per run of one stream.
    fn streamed(data: &[u8]) -> Result<Vec<(StreamId, Vec<u8>)>, String> {
        let mut out: Vec<(StreamId, Vec<u8>)> = Vec::new();
        decode_stream(data, |stream, bytes| {
            match out.last_mut() {
                Some((s, b)) if *s == stream => b.extend_from_slice(bytes),
                _ => out.push((stream, bytes.to_vec())),
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn the_streaming_decoder_agrees_with_the_whole_one() {
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut rec = Vec::new();
        push(&mut rec, StreamId::Stdout, 0, b"one\n");
        push(&mut rec, StreamId::Stderr, 1, &big);
        push(&mut rec, StreamId::Stdout, 2, b"");
        push(&mut rec, StreamId::Stdout, 3, b"two\n");
        assert_eq!(
            streamed(&rec).unwrap(),
            vec![
                (StreamId::Stdout, b"one\n".to_vec()),
                (StreamId::Stderr, big),
                (StreamId::Stdout, b"two\n".to_vec()),
            ]
        );
        assert_eq!(streamed(b"").unwrap(), vec![]);
        // Every cut and every damage the whole decoder refuses, it refuses.
        for cut in 1..rec.len() {
            assert_eq!(
                streamed(&rec[..cut]).is_err(),
                decode(&rec[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        assert!(streamed(b"garbage").is_err());
        let mut bad = rec.clone();
        bad[MAGIC.len()] = 7;
        assert!(streamed(&bad).is_err());
    }
}
