//! The direct path's TLS stream over TCP, as a stream of frames
//! ([`reprise_frames::FrameRecv`], [`reprise_frames::FrameSend`]).
//!
//! Where a QUIC connection gives up on a peer that went quiet (its idle
//! timeout), this stream does the same: every read and every write must
//! make progress within [`IDLE`], or it fails as timed out. A clean end is
//! TLS's `close_notify`; a stream broken off ([`FrameSend::abort`]) ends
//! the TCP stream without it, which the reader takes as a cut transfer,
//! never as its end.

use std::time::Duration;

use bytes::BufMut;
use reprise_frames::{FrameRecv, FrameSend, ReadError, WriteError};
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::buffers::Buffers;

/// How long a read or a write may wait for its peer: a QUIC link's idle
/// timeout ([`super::credentials`]).
pub const IDLE: Duration = Duration::from_secs(10);

/// The most a frame's body is read at once: pieces large enough to hash
/// with wide instructions, below the allocator's mmap threshold.
const PIECE: usize = 64 * 1024;

/// The most pieces a [`TlsPipe`] keeps for reuse ([`Buffers`]): a
/// chunk's (a fetch hashes and writes each chunk before it reads the
/// next, [`super::fetch`]).
const PIECES_KEPT: usize = (wire::CHUNK_BYTES as usize).div_ceil(PIECE);

/// The TCP stream a [`TlsPipe`] runs over: read through a buffer of
/// [`READ_BUFFER`] bytes ([`buffered`]).
pub type Tcp = tokio::io::BufReader<TcpStream>;

/// How much of the TCP stream is read at once beneath TLS. rustls asks
/// its transport for what its record buffer has room for (4 KiB more at a
/// time), so a receiver read a 21 MiB transfer in 1,360 `recvfrom` calls
/// straight from the socket, and in 89 through this buffer, for one copy
/// more of each byte: about 1 ms less of a remote hit (alternated, four
/// runs).
pub const READ_BUFFER: usize = 256 * 1024;

/// `tcp`, read through a buffer of [`READ_BUFFER`] bytes: what a TLS
/// handshake for a [`TlsPipe`] runs over.
pub fn buffered(tcp: TcpStream) -> Tcp {
    tokio::io::BufReader::with_capacity(READ_BUFFER, tcp)
}

/// A TLS stream over TCP carrying frames.
#[derive(Debug)]
pub struct TlsPipe {
    stream: tokio_rustls::TlsStream<Tcp>,
    /// The buffers pieces are read into, each back once the bytes read
    /// into it are dropped.
    buffers: Buffers,
}

impl TlsPipe {
    pub fn new(stream: impl Into<tokio_rustls::TlsStream<Tcp>>) -> TlsPipe {
        TlsPipe {
            stream: stream.into(),
            buffers: Buffers::new(PIECE, PIECES_KEPT),
        }
    }

    /// The sha256 of the certificate the peer presented, if it did.
    pub fn peer_fingerprint(&self) -> Option<Sha256Digest> {
        let (_, tls) = self.stream.get_ref();
        tls.peer_certificates()?
            .first()
            .map(|c| Sha256Digest::of(c.as_ref()))
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the peer made no progress for {IDLE:?}"),
    )
}

/// `op`, failed as timed out past [`IDLE`].
async fn within<T>(op: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(IDLE, op)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

impl FrameRecv for TlsPipe {
    async fn fill(&mut self, buf: &mut [u8], started: bool) -> Result<(), ReadError> {
        let mut at = 0;
        while at < buf.len() {
            match within(self.stream.read(&mut buf[at..])).await {
                Ok(0) if started || at > 0 => return Err(ReadError::Truncated),
                Ok(0) => return Err(ReadError::Ended),
                Ok(n) => at += n,
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(())
    }

    async fn piece(&mut self, max: usize) -> Result<bytes::Bytes, ReadError> {
        let want = max.clamp(1, PIECE);
        let mut buf = self.buffers.take();
        while buf.len() < want {
            let room = want - buf.len();
            match within(self.stream.read_buf(&mut (&mut buf).limit(room))).await {
                Ok(0) => return Err(ReadError::Truncated),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(self.buffers.share(buf))
    }

    async fn ended(&mut self) -> Result<bool, ReadError> {
        let mut extra = [0u8; 1];
        match within(self.stream.read(&mut extra)).await {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(ReadError::Io(e)),
        }
    }
}

impl FrameSend for TlsPipe {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        within(self.stream.write_all(bytes))
            .await
            .map_err(WriteError::Io)
    }

    async fn put_bytes(&mut self, bytes: bytes::Bytes) -> Result<(), WriteError> {
        self.put(&bytes).await
    }

    async fn end(&mut self) {
        // close_notify, then the end of the TCP stream.
        let _ = within(self.stream.shutdown()).await;
    }

    async fn abort(&mut self) {
        // What was written goes out, then the TCP stream ends without
        // close_notify: the reader's TLS reports an unexpected end.
        let _ = within(self.stream.flush()).await;
        let (tcp, _) = self.stream.get_mut();
        let _ = within(tcp.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reprise_frames::{read_message, write_message};
    use reprise_protocol::wire::Message;
    use std::sync::Arc;

    /// A TLS pair over loopback TCP: the server's pipe and the client's.
    async fn pair() -> (TlsPipe, TlsPipe) {
        let cert = rcgen::generate_simple_self_signed(vec!["peer".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            TlsPipe::new(acceptor.accept(buffered(tcp)).await.unwrap())
        };
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = rustls::pki_types::ServerName::try_from("peer").unwrap();
            TlsPipe::new(connector.connect(name, buffered(tcp)).await.unwrap())
        };
        tokio::join!(accept, connect)
    }

    #[tokio::test]
    async fn an_ended_stream_is_told_from_one_broken_off() {
        let (mut a, mut b) = pair().await;
        write_message(&mut a, &Message::NotFound).await.unwrap();
        a.end().await;
        assert!(matches!(read_message(&mut b).await, Ok(Message::NotFound)));
        assert!(b.ended().await.unwrap(), "close_notify is the end");

        let (mut a, mut b) = pair().await;
        write_message(&mut a, &Message::NotFound).await.unwrap();
        a.abort().await;
        assert!(
            matches!(read_message(&mut b).await, Ok(Message::NotFound)),
            "what was written before the abort arrives"
        );
        assert!(
            matches!(b.ended().await, Err(ReadError::Io(_))),
            "an end without close_notify is a broken stream, not its end"
        );
    }

    #[tokio::test]
    async fn a_peer_that_goes_quiet_fails_reads_and_writes_after_the_idle_bound() {
        let (mut a, mut b) = pair().await;
        // The clock stands still until nothing else can happen, then jumps
        // to the next timer: the bound is reached at once, and an outer
        // bound three times as long tells a pipe without one.
        tokio::time::pause();
        let timed_out = |e: &std::io::Error| e.kind() == std::io::ErrorKind::TimedOut;
        let read = tokio::time::timeout(3 * IDLE, b.fill(&mut [0u8; 1], false))
            .await
            .expect("a read of a quiet peer ends by the pipe's own bound");
        assert!(
            matches!(&read, Err(ReadError::Io(e)) if timed_out(e)),
            "{read:?}"
        );

        // A peer that reads nothing: the writes fill the buffers on the
        // way, then one waits for room, and gives up.
        let chunk = bytes::Bytes::from(vec![1u8; 1 << 20]);
        let mut written = 0usize;
        let write = tokio::time::timeout(3 * IDLE, async {
            loop {
                match a.put_bytes(chunk.clone()).await {
                    Ok(()) => written += chunk.len(),
                    Err(e) => break e,
                }
            }
        })
        .await
        .expect("a write to a peer that reads nothing ends by the pipe's own bound");
        assert!(
            matches!(&write, WriteError::Io(e) if timed_out(e)),
            "{write:?}"
        );
        assert!(
            written < 256 << 20,
            "{written} bytes taken by a peer that reads none"
        );
        drop(b);
    }

    /// The receiving end of a stream that sent `len` bytes of 7, then
    /// ended cleanly.
    async fn sent_sevens(len: usize) -> TlsPipe {
        let (mut a, b) = pair().await;
        a.put_bytes(bytes::Bytes::from(vec![7u8; len]))
            .await
            .unwrap();
        a.end().await;
        b
    }

    #[tokio::test]
    async fn a_piece_is_at_most_what_is_asked_and_an_end_inside_it_is_a_truncation() {
        let mut b = sent_sevens(3 * PIECE).await;
        let first = b.piece(10).await.unwrap();
        assert_eq!(first.len(), 10);
        let second = b.piece(usize::MAX).await.unwrap();
        assert_eq!(second.len(), PIECE, "pieces stop at {PIECE} bytes");
        let mut rest = vec![0u8; 2 * PIECE - 10];
        b.fill(&mut rest, true).await.unwrap();
        assert!(matches!(b.piece(1).await, Err(ReadError::Truncated)));
        assert!(matches!(
            b.fill(&mut [0u8; 1], false).await,
            Err(ReadError::Ended)
        ));
    }

    #[tokio::test]
    async fn pieces_are_read_into_the_buffers_of_pieces_dropped() {
        let mut b = sent_sevens(4 * PIECE).await;
        let first = b.piece(PIECE).await.unwrap();
        let second = b.piece(PIECE).await.unwrap();
        let mut at: Vec<_> = [&first, &second].iter().map(|p| p.as_ptr()).collect();
        assert_eq!(b.buffers.kept(), 0);
        drop((first, second));
        assert_eq!(b.buffers.kept(), 2);
        let third = b.piece(PIECE).await.unwrap();
        let fourth = b.piece(PIECE).await.unwrap();
        assert_eq!(b.buffers.kept(), 0, "each piece read into a buffer kept");
        assert!(third.iter().chain(fourth.iter()).all(|&x| x == 7));
        let mut again: Vec<_> = [&third, &fourth].iter().map(|p| p.as_ptr()).collect();
        at.sort();
        again.sort();
        assert_eq!(at, again);
    }
}
