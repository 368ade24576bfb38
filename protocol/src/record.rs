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

/// Appends an entry to an encoded record.
pub fn push(out: &mut Vec<u8>, stream: StreamId, at_ms: u32, bytes: &[u8]) {
    if out.is_empty() {
        out.extend_from_slice(MAGIC);
    }
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
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let mut at = MAGIC.len();
    if !data.starts_with(MAGIC) {
        return Err(RecordError::BadMagic);
    }
    let mut entries = Vec::new();
    while at < data.len() {
        if data.len() - at < 9 {
            return Err(RecordError::Truncated(at));
        }
        let stream = match data[at] {
            1 => StreamId::Stdout,
            2 => StreamId::Stderr,
            _ => return Err(RecordError::BadStream(at)),
        };
        let at_ms = u32::from_be_bytes(data[at + 1..at + 5].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(data[at + 5..at + 9].try_into().expect("4 bytes")) as usize;
        if data.len() - at - 9 < len {
            return Err(RecordError::Truncated(at));
        }
        entries.push(Entry {
            stream,
            at_ms,
            bytes: data[at + 9..at + 9 + len].to_vec(),
        });
        at += 9 + len;
    }
    Ok(entries)
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
}
