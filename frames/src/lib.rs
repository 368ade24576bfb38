//! Frame IO for the orchestrator protocol ([`reprise_protocol::wire`]),
//! the one implementation both ends use: a control message is read header
//! first and an oversized length is refused before any of the body is read
//! or allocated; a data chunk is read against the bytes its part has left.
//!
//! Frames travel on QUIC streams, and on the direct path between two
//! executors also on a TLS stream over TCP (the executor's
//! `link::direct`): both are a [`FrameRecv`] and a [`FrameSend`].

use std::future::Future;

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
    #[error("stream read")]
    Io(#[source] std::io::Error),
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
            ReadError::Ended | ReadError::Stream(_) | ReadError::Io(_) => None,
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
    #[error("stream write")]
    Io(#[source] std::io::Error),
}

/// Where frames are read from: a QUIC stream's receiving half, or a TLS
/// stream over TCP.
pub trait FrameRecv: Send {
    /// Fills `buf`; `started` says whether part of the frame was read
    /// already (an end there is a truncated frame, not the end of the
    /// stream).
    fn fill(
        &mut self,
        buf: &mut [u8],
        started: bool,
    ) -> impl Future<Output = Result<(), ReadError>> + Send;

    /// The next bytes of a frame's body, at most `max` (at least one): an
    /// end of the stream here is a truncated frame.
    fn piece(&mut self, max: usize)
    -> impl Future<Output = Result<bytes::Bytes, ReadError>> + Send;

    /// Whether the stream ended cleanly here (`false`: more bytes follow).
    fn ended(&mut self) -> impl Future<Output = Result<bool, ReadError>> + Send;
}

/// Where frames are written to: a QUIC stream's sending half, or a TLS
/// stream over TCP.
pub trait FrameSend: Send {
    fn put(&mut self, bytes: &[u8]) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Writes `bytes`, kept as they are where the stream can (QUIC keeps
    /// them until the peer acknowledged them, without a copy).
    fn put_bytes(
        &mut self,
        bytes: bytes::Bytes,
    ) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Ends the stream cleanly: the peer reads what was written, then the
    /// end.
    fn end(&mut self) -> impl Future<Output = ()> + Send;

    /// Breaks the stream off: the peer reads it as broken, not ended.
    fn abort(&mut self) -> impl Future<Output = ()> + Send;
}

impl FrameRecv for RecvStream {
    async fn fill(&mut self, buf: &mut [u8], started: bool) -> Result<(), ReadError> {
        self.read_exact(buf).await.map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(n) if started || n > 0 => ReadError::Truncated,
            quinn::ReadExactError::FinishedEarly(_) => ReadError::Ended,
            quinn::ReadExactError::ReadError(e) => ReadError::Stream(e),
        })
    }

    async fn piece(&mut self, max: usize) -> Result<bytes::Bytes, ReadError> {
        match self.read_chunk(max, true).await {
            Ok(Some(piece)) => Ok(piece.bytes),
            Ok(None) => Err(ReadError::Truncated),
            Err(e) => Err(ReadError::Stream(e)),
        }
    }

    async fn ended(&mut self) -> Result<bool, ReadError> {
        let mut extra = [0u8; 1];
        match self.read(&mut extra).await {
            Ok(None) => Ok(true),
            Ok(Some(_)) => Ok(false),
            Err(e) => Err(ReadError::Stream(e)),
        }
    }
}

impl FrameSend for SendStream {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        Ok(self.write_all(bytes).await?)
    }

    async fn put_bytes(&mut self, bytes: bytes::Bytes) -> Result<(), WriteError> {
        Ok(self.write_chunk(bytes).await?)
    }

    async fn end(&mut self) {
        let _ = self.finish();
    }

    async fn abort(&mut self) {
        let _ = self.reset(quinn::VarInt::from_u32(1));
    }
}

/// Fills `buf`; `started` says whether part of the frame was read already
/// (an end there is a truncated frame, not the end of the stream).
pub async fn read_exact(
    recv: &mut impl FrameRecv,
    buf: &mut [u8],
    started: bool,
) -> Result<(), ReadError> {
    recv.fill(buf, started).await
}

/// How much of a frame's body is read (and allocated) at a time: a peer
/// that announces a long frame and stalls holds only what it sent.
const BODY_STEP: usize = 64 * 1024;

/// Reads one control message frame, refusing an oversized length before
/// reading the body, and growing the body only as its bytes arrive.
pub async fn read_message(recv: &mut impl FrameRecv) -> Result<Message, ReadError> {
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
pub async fn write_message(send: &mut impl FrameSend, message: &Message) -> Result<(), WriteError> {
    send.put(&wire::encode(message)?).await
}

/// The bytes of a data chunk as the stream received them, to hash and
/// write without copying them first ([`read_chunk_pieces`]).
#[derive(Debug, Default)]
pub struct Pieces(Vec<bytes::Bytes>);

impl Pieces {
    /// The bytes, piece by piece in order.
    pub fn slices(&self) -> Vec<&[u8]> {
        self.0.iter().map(|p| &p[..]).collect()
    }

    /// How many bytes they hold.
    pub fn len(&self) -> usize {
        self.0.iter().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads one data chunk frame that must carry exactly `len` bytes (a
/// transfer's chunk: its length is known from the manifest) after its
/// sha256: returns the sha256 the sender gave, with the bytes in `pieces`
/// as the stream holds them. A frame of any other length is refused as
/// [`ChunkError::Overrun`] before its body is read. The bytes are not
/// checked against the sha256, here or by the receiver: it is the
/// holder's word, and the receiver checks each part's sha256 from the
/// signed manifest instead; the relay passes both on.
pub async fn read_chunk_pieces(
    recv: &mut impl FrameRecv,
    len: u64,
    pieces: &mut Pieces,
) -> Result<[u8; wire::CHUNK_SHA_LEN], ChunkError> {
    let (sha, mut left) = read_chunk_head(recv, len).await?;
    pieces.0.clear();
    while left > 0 {
        let piece = read_piece(recv, left).await?;
        left -= piece.len();
        pieces.0.push(piece);
    }
    Ok(sha)
}

/// The next bytes of a frame's body as the stream received them, at most
/// `max` (at least one): an end of the stream here is a truncated frame.
pub async fn read_piece(recv: &mut impl FrameRecv, max: usize) -> Result<bytes::Bytes, ReadError> {
    recv.piece(max).await
}

/// A data chunk frame's header and sha256, the length refused unless it
/// is `len`'s (see [`read_chunk_pieces`]); returns the sha256 and how many bytes
/// follow ([`read_piece`] reads them as they come).
pub async fn read_chunk_head(
    recv: &mut impl FrameRecv,
    len: u64,
) -> Result<([u8; wire::CHUNK_SHA_LEN], usize), ChunkError> {
    let mut header = [0u8; wire::HEADER_LEN];
    read_exact(recv, &mut header, true).await?;
    let n = wire::body_len(header, MAX_CHUNK).map_err(ReadError::from)?;
    let want = len.min(wire::CHUNK_BYTES) as usize + wire::CHUNK_SHA_LEN;
    if n != want || len == 0 {
        return Err(ChunkError::Overrun(n.saturating_sub(wire::CHUNK_SHA_LEN)));
    }
    let mut sha = [0u8; wire::CHUNK_SHA_LEN];
    read_exact(recv, &mut sha, true).await?;
    Ok((sha, n - wire::CHUNK_SHA_LEN))
}

/// Why a data chunk could not be read.
#[derive(Debug, Error)]
pub enum ChunkError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("a chunk of {0} bytes where another length was due")]
    Overrun(usize),
}

/// Writes one data chunk frame: the chunk's sha256, then its bytes,
/// handed to the stream as they are (no copy; the stream keeps them until
/// the peer acknowledged them).
pub async fn write_chunk(
    send: &mut impl FrameSend,
    sha: &[u8; wire::CHUNK_SHA_LEN],
    bytes: bytes::Bytes,
) -> Result<(), WriteError> {
    send.put(&chunk_head(sha, bytes.len())).await?;
    send.put_bytes(bytes).await
}

/// Writes a data chunk frame's header and sha256 for a chunk of `len`
/// bytes, which the caller then writes (a relay: each piece as it comes,
/// [`read_piece`]).
pub async fn write_chunk_head(
    send: &mut impl FrameSend,
    sha: &[u8; wire::CHUNK_SHA_LEN],
    len: usize,
) -> Result<(), WriteError> {
    send.put(&chunk_head(sha, len)).await
}

/// A data chunk frame's header and sha256, for a chunk of `len` bytes.
fn chunk_head(
    sha: &[u8; wire::CHUNK_SHA_LEN],
    len: usize,
) -> [u8; wire::HEADER_LEN + wire::CHUNK_SHA_LEN] {
    let mut head = [0u8; wire::HEADER_LEN + wire::CHUNK_SHA_LEN];
    head[..wire::HEADER_LEN].copy_from_slice(&wire::chunk_header(len));
    head[wire::HEADER_LEN..].copy_from_slice(sha);
    head
}

/// The largest UDP payload path MTU discovery may probe for. On loopback
/// (64 KiB MTU) and jumbo-frame networks a transfer then takes a quarter
/// of the packets it takes at quinn's default bound of 1,452 bytes, and
/// each packet is encrypted, sent and acknowledged once; where the path is
/// smaller the probes are lost and quinn keeps the size that got through.
/// Not larger: quinn sends up to 10 packets as one segmented (GSO) send,
/// and a UDP send carries at most 64 KiB, so beyond 6,553 bytes such sends
/// fail (measured on loopback: with a bound of 8,952 the probes fail and
/// black-hole detection drops the link to 1,200 bytes; 6,500 holds).
pub const MTU_UPPER_BOUND: u16 = 6500;

/// Sets path MTU discovery of `transport` (both ends of every link use
/// it): probe up to [`MTU_UPPER_BOUND`], a black hole falls back as quinn
/// does. The peer's endpoint must take datagrams that large
/// ([`server_endpoint`], [`client_endpoint`]), or discovery stops at what
/// it advertises.
pub fn discover_mtu(transport: &mut quinn::TransportConfig) {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    transport.mtu_discovery_config(Some(mtu));
}

/// An endpoint on `addr` that takes datagrams up to [`MTU_UPPER_BOUND`]
/// (quinn's default endpoint advertises 1,472 bytes, which caps its peer's
/// path MTU discovery), serving `server` if given.
fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MTU_UPPER_BOUND)
        .expect("within QUIC's bounds");
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime (tokio) is running"))?;
    let socket = std::net::UdpSocket::bind(addr)?;
    quinn::Endpoint::new(config, server, socket, runtime)
}

/// A server endpoint on `addr` (see [`discover_mtu`]).
pub fn server_endpoint(
    server: quinn::ServerConfig,
    addr: std::net::SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    endpoint(addr, Some(server))
}

/// A client endpoint on `addr` (see [`discover_mtu`]).
pub fn client_endpoint(addr: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    endpoint(addr, None)
}
