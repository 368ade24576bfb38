//! Framing of the byte stream between the guest helper and the host.
//!
//! The guest helper runs one command at a time and sends its output over a
//! virtio-serial port as frames: one byte of kind, four bytes of big-endian
//! payload length, the payload. A run opens with `Start` carrying its id, so
//! the host can drop anything left over from an earlier, abandoned command,
//! and closes with `Exit`. This module only encodes and decodes; it does no IO.

use thiserror::Error;

/// Version of this framing; bumped on any change to the layout.
pub const VERSION: u32 = 1;

/// Largest payload of one frame; the helper splits bigger writes.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Length of a frame's header.
pub const HEADER_LEN: usize = 5;

/// One frame of the guest stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A command starts; the payload is the id the host gave it.
    Start(String),
    /// Bytes the command wrote to its standard output.
    Stdout(Vec<u8>),
    /// Bytes the command wrote to its standard error.
    Stderr(Vec<u8>),
    /// The command ended: its exit status, or 128 + the signal that killed it.
    Exit(i32),
    /// The helper could not start the command; the payload says why.
    Failed(String),
}

const START: u8 = 1;
const STDOUT: u8 = 2;
const STDERR: u8 = 3;
const EXIT: u8 = 4;
const FAILED: u8 = 5;

/// What went wrong decoding a frame.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame payload of {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("exit frame has {0} payload bytes, expected 4")]
    BadExit(usize),
    #[error("frame text is not UTF-8")]
    NotUtf8,
}

impl Frame {
    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, payload): (u8, &[u8]) = match self {
            Frame::Start(id) => (START, id.as_bytes()),
            Frame::Stdout(b) => (STDOUT, b),
            Frame::Stderr(b) => (STDERR, b),
            Frame::Exit(code) => {
                out.push(EXIT);
                out.extend_from_slice(&4u32.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                return;
            }
            Frame::Failed(msg) => (FAILED, msg.as_bytes()),
        };
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// Encodes the frame into a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes one frame from the front of `buf`. Returns the frame and the
    /// number of bytes it used, or `None` when `buf` holds no whole frame yet.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = buf[0];
        if !(START..=FAILED).contains(&kind) {
            return Err(FrameError::UnknownKind(kind));
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = &buf[HEADER_LEN..HEADER_LEN + len];
        let text = || String::from_utf8(payload.to_vec()).map_err(|_| FrameError::NotUtf8);
        let frame = match kind {
            START => Frame::Start(text()?),
            STDOUT => Frame::Stdout(payload.to_vec()),
            STDERR => Frame::Stderr(payload.to_vec()),
            EXIT => {
                let code: [u8; 4] = payload.try_into().map_err(|_| FrameError::BadExit(len))?;
                Frame::Exit(i32::from_be_bytes(code))
            }
            _ => Frame::Failed(text()?),
        };
        Ok(Some((frame, HEADER_LEN + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Start("run-1".into()),
            Frame::Stdout(b"hello\x1b[31m red\n".to_vec()),
            Frame::Stderr(vec![]),
            Frame::Exit(-1),
            Frame::Exit(137),
            Frame::Failed("no such file".into()),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            f.encode_into(&mut buf);
        }
        let mut decoded = Vec::new();
        let mut at = 0;
        while let Some((f, used)) = Frame::decode(&buf[at..]).unwrap() {
            decoded.push(f);
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(decoded, frames);
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let buf = Frame::Stdout(b"abcdef".to_vec()).encode();
        for cut in 0..buf.len() {
            assert_eq!(Frame::decode(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(
            Frame::decode(&[9, 0, 0, 0, 0]),
            Err(FrameError::UnknownKind(9))
        );
        assert_eq!(
            Frame::decode(&[2, 0xff, 0, 0, 0]),
            Err(FrameError::TooLarge(0xff00_0000))
        );
        assert_eq!(
            Frame::decode(&[4, 0, 0, 0, 1, 7]),
            Err(FrameError::BadExit(1))
        );
        assert_eq!(
            Frame::decode(&[1, 0, 0, 0, 1, 0xff]),
            Err(FrameError::NotUtf8)
        );
    }
}
