//! Frame IO on QUIC streams for the orchestrator protocol
//! ([`reprise_protocol::wire`]), the one implementation both ends use: a
//! control message is read header first and an oversized length is refused
//! before any of the body is read or allocated; a data chunk is read
//! against the bytes its part has left.

use quinn::{RecvStream, SendStream};
use reprise_protocol::wire::{self, ErrorCode, FrameError, MAX_CHUNK, Message};
use thiserror::Error;

/// Why a frame could not be read.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
    #[error("the stream ended before a message")]
    Ended,
    #[error("stream read")]
    Stream(#[from] quinn::ReadError),
}

impl ReadError {
    /// The refusal to send back, if one can be sent.
    pub fn refusal(&self) -> Option<Message> {
        match self {
            ReadError::Frame(e) => Some(Message::error(
                match e {
                    FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                    FrameError::UnknownMessage(_) => ErrorCode::UnknownMessage,
                    FrameError::Malformed(_) => ErrorCode::Malformed,
                },
                e.to_string(),
            )),
            ReadError::Truncated => Some(Message::error(ErrorCode::Malformed, self.to_string())),
            ReadError::Ended | ReadError::Stream(_) => None,
        }
    }
}

/// Why a frame could not be written.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream write")]
    Stream(#[from] quinn::WriteError),
}

/// Fills `buf`; `started` says whether part of the frame was read already
/// (an end there is a truncated frame, not the end of the stream).
pub async fn read_exact(
    recv: &mut RecvStream,
    buf: &mut [u8],
    started: bool,
) -> Result<(), ReadError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) if started || n > 0 => ReadError::Truncated,
        quinn::ReadExactError::FinishedEarly(_) => ReadError::Ended,
        quinn::ReadExactError::ReadError(e) => ReadError::Stream(e),
    })
}

/// How much of a frame's body is read (and allocated) at a time: a peer
/// that announces a long frame and stalls holds only what it sent.
const BODY_STEP: usize = 64 * 1024;

/// Reads one control message frame, refusing an oversized length before
/// reading the body, and growing the body only as its bytes arrive.
pub async fn read_message(recv: &mut RecvStream) -> Result<Message, ReadError> {
    let mut header = [0u8; wire::HEADER_LEN];
    read_exact(recv, &mut header, false).await?;
    let len = wire::body_len(header, wire::MAX_FRAME)?;
    let mut body = Vec::with_capacity(len.min(BODY_STEP));
    while body.len() < len {
        let start = body.len();
        body.resize(start + (len - start).min(BODY_STEP), 0);
        read_exact(recv, &mut body[start..], true).await?;
    }
    Ok(wire::decode(&body)?)
}

/// Writes one control message frame.
pub async fn write_message(send: &mut SendStream, message: &Message) -> Result<(), WriteError> {
    send.write_all(&wire::encode(message)?).await?;
    Ok(())
}

/// Reads one data chunk of at most `left` bytes (and at most
/// [`MAX_CHUNK`]) into `buf`, resized to the chunk. An empty chunk or one
/// that overruns `left` is refused as [`ChunkError::Overrun`].
pub async fn read_chunk(
    recv: &mut RecvStream,
    left: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let mut header = [0u8; wire::HEADER_LEN];
    read_exact(recv, &mut header, true).await?;
    let n = wire::body_len(header, MAX_CHUNK).map_err(ReadError::from)?;
    if n as u64 > left || n == 0 {
        return Err(ChunkError::Overrun(n));
    }
    buf.resize(n, 0);
    read_exact(recv, buf, true).await?;
    Ok(())
}

/// Why a data chunk could not be read.
#[derive(Debug, Error)]
pub enum ChunkError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("a chunk of {0} bytes overruns its part")]
    Overrun(usize),
}

/// Writes one data chunk.
pub async fn write_chunk(send: &mut SendStream, bytes: &[u8]) -> Result<(), WriteError> {
    send.write_all(&wire::chunk_header(bytes.len())).await?;
    send.write_all(bytes).await?;
    Ok(())
}
