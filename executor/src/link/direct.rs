//! The direct path: a result fetched straight from the executor holding
//! it, the orchestrator only introducing the two, so its bytes are not
//! decrypted and encrypted again by a relay.
//!
//! The holder listens on a UDP port of its own ([`Direct`], `reprise
//! daemon --direct ADDR`) and says so on its link ([`Message::Listen`]:
//! the port, and the sha256 of the certificate its listener presents,
//! its own). An asker asks the orchestrator to introduce it
//! ([`Message::Introduce`]); the orchestrator decides exactly as for a
//! relayed fetch, sends the holder a ticket over the holder's own link
//! ([`Message::Expect`]: 32 random bytes, the key, the namespace, the
//! sha256 of the asker's certificate), and once the holder keeps it tells
//! the asker where the holder listens, which certificate it must present,
//! and who must have sealed the result ([`Message::Introduction`]).
//!
//! What each side checks:
//! - the asker takes the holder only if it presents the pinned
//!   certificate and proves it holds its key (TLS 1.3); then the transfer
//!   is checked as a relayed one is ([`super::fetch`]: the seal against
//!   the team CA and the revocation list, the key, the inputs, every
//!   sha256), and its seal must be the producer's the orchestrator named,
//!   with the outputs it announced: a holder cannot pass off a result of
//!   its own, or another's, that the orchestrator did not offer;
//! - the holder takes only clients whose certificate chains to the team
//!   CA, and serves a `Redeem` only with a ticket it holds, unexpired
//!   ([`TICKET_LIFETIME`]), for that key and namespace, from the
//!   certificate the ticket names; each ticket serves once. It serves
//!   then as it does through the relay: a result of a namespace its own
//!   certificate grants, sealed, passed, every byte checked as it goes.
//!
//! A ticket is never logged ([`Secret`]), and only its sha256 is kept.
//! Whatever fails on the direct path (no listener, an address the asker
//! cannot reach, a refused ticket, a broken or refused transfer), the
//! asker fetches through the relay, resuming what arrived whole.
//!
//! The holder listens on the same port twice: QUIC on UDP, and TLS over
//! TCP ([`super::pipe`]), with the same TLS configuration, checks and
//! tickets. The asker dials TCP first, and QUIC beside it when the TCP
//! port has not answered within [`TCP_HEAD_START`] (a firewall that lets
//! only UDP through) or when TCP fails: no connection or handshake within
//! [`TCP_CONNECT_TIMEOUT`], or a handshake refused (a TCP port the holder
//! could not take and another program holds: that one cannot present the
//! pinned certificate). The first handshake done is the connection
//! ([`connect`]). Over TCP a transfer costs both ends about a third less
//! CPU than over QUIC, whose packets userspace encrypts, acknowledges and
//! copies one by one: on a machine of two cores that is the transfer's
//! time (ARCHITECTURE.md).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use reprise_frames::{FrameRecv, FrameSend, read_message, write_message};
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::wire::{ErrorCode, Message, Secret};
use tracing::{debug, info, warn};

use super::LinkError;
use super::credentials::Credentials;
use super::pipe::{self, TlsPipe};
use super::serve::{serve_held, stop_serving_at_from_env};
use crate::store::Store;

/// How long a ticket may wait for its asker.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(30);

/// How many tickets a holder keeps at once; past it, the one closest to
/// expiring goes.
pub const MAX_TICKETS: usize = 256;

/// How long an asker waits for the holder's handshake before it fetches
/// through the relay instead.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an asker waits for the holder's TCP connection and TLS
/// handshake before it gives up on TCP: a loopback or LAN handshake
/// takes milliseconds.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long the holder's TCP port has to answer (the connection made, the
/// handshake not yet) before the asker dials QUIC beside it: a filtered
/// port (a firewall that lets only UDP through) never answers, and a
/// LAN's round trip is well under it.
pub const TCP_HEAD_START: Duration = Duration::from_millis(100);

/// How long a direct connection has to send its `Redeem`.
const REDEEM_TIMEOUT: Duration = Duration::from_secs(10);

/// How many direct connections a holder serves at once; more are refused.
const MAX_PEERS: usize = 64;

/// A ticket's grant, as the orchestrator sent it.
#[derive(Debug)]
pub(super) struct Pending {
    pub key: RunKey,
    pub namespace: String,
    /// The sha256 of the certificate that may redeem it.
    pub asker: Sha256Digest,
    /// What this holder's certificate grants, as of the link.
    pub repos: Vec<String>,
    /// The orchestrator's stream, answered with `Served` once the
    /// transfer left whole; dropped (ended) otherwise.
    pub reply: SendStream,
}

/// Why a `Redeem` was refused: the same answer for every reason, so an
/// asker learns nothing of other tickets.
const REFUSED: &str = "no ticket for this key and certificate (expired, used, or never issued): fetch through the orchestrator";

/// The tickets a holder keeps, by the sha256 of each.
#[derive(Debug, Default)]
pub struct Tickets(Mutex<HashMap<Sha256Digest, (Pending, Instant)>>);

impl Tickets {
    /// Keeps `ticket` until it is redeemed or [`TICKET_LIFETIME`] passes.
    pub(super) fn expect(self: &Arc<Self>, ticket: Secret, pending: Pending) {
        let id = Sha256Digest::of(ticket.0.as_bytes());
        let now = Instant::now();
        {
            let mut map = self.0.lock().expect("tickets");
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= MAX_TICKETS
                && let Some(first) = map
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| *k)
            {
                map.remove(&first);
            }
            map.insert(id, (pending, now + TICKET_LIFETIME));
        }
        // An unredeemed ticket's stream ends when it expires, so the
        // orchestrator stops waiting for it.
        let tickets = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(TICKET_LIFETIME).await;
            if let Some(t) = tickets.upgrade() {
                let now = Instant::now();
                t.0.lock()
                    .expect("tickets")
                    .retain(|_, (_, until)| *until > now);
            }
        });
    }

    /// Takes the ticket if it is held, unexpired, and grants `key` of
    /// `namespace` to `asker`. A ticket that does not match stays (its
    /// own asker may still come).
    pub(super) fn redeem(
        &self,
        ticket: &Secret,
        asker: &Sha256Digest,
        key: &RunKey,
        namespace: &str,
    ) -> Option<Pending> {
        let id = Sha256Digest::of(ticket.0.as_bytes());
        let mut map = self.0.lock().expect("tickets");
        let (pending, until) = map.get(&id)?;
        if *until <= Instant::now() {
            map.remove(&id);
            return None;
        }
        if pending.asker != *asker || pending.key != *key || pending.namespace != namespace {
            return None;
        }
        map.remove(&id).map(|(p, _)| p)
    }

    /// How many tickets are kept.
    pub fn len(&self) -> usize {
        self.0.lock().expect("tickets").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A holder's direct listener: its endpoint, its TCP listener on the same
/// port, and the tickets it honours.
#[derive(Debug)]
pub struct Direct {
    endpoint: quinn::Endpoint,
    tcp: Option<tokio::net::TcpListener>,
    /// The TLS configuration TCP connections are accepted with.
    tls: Mutex<Arc<rustls::ServerConfig>>,
    tickets: Arc<Tickets>,
    /// The sha256 of the certificate the listener presents.
    cert: Mutex<Sha256Digest>,
    /// Tests and benchmarks only: the chunk of a result at which every
    /// transfer is cut ([`Direct::stop_serving_at`]).
    stop_serving_at: Arc<AtomicU64>,
}

impl Direct {
    /// Listens on `addr` (`0.0.0.0:PORT`: every address, and peers are
    /// sent to the one the orchestrator sees this executor come from),
    /// presenting `creds`' certificate, over QUIC on its UDP port and TLS
    /// on its TCP port.
    ///
    /// A TCP port it cannot take is a warning: peers then come over QUIC
    /// (with port 0, other port numbers are tried first).
    pub fn bind(addr: SocketAddr, creds: &Credentials) -> Result<Direct, LinkError> {
        let tries = if addr.port() == 0 { 8 } else { 1 };
        let mut last = None;
        for _ in 0..tries {
            let mut direct = Direct::bind_quic(addr, creds)?;
            let port = direct.local_addr()?;
            match std::net::TcpListener::bind(port).and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }) {
                Ok(listener) => {
                    direct.tcp = Some(listener);
                    return Ok(direct);
                }
                Err(e) => last = Some((direct, port, e)),
            }
        }
        let (direct, port, e) = last.expect("tried at least once");
        warn!("direct fetches over QUIC only: TCP port {port} cannot be taken: {e}");
        Ok(direct)
    }

    /// Listens on `addr` over QUIC only: for a holder whose TCP port is
    /// another program's, and for tests of the fallback.
    pub fn bind_quic(addr: SocketAddr, creds: &Credentials) -> Result<Direct, LinkError> {
        let endpoint = reprise_frames::server_endpoint(creds.direct_server_config()?, addr)
            .map_err(LinkError::Endpoint)?;
        Ok(Direct {
            endpoint,
            tcp: None,
            tls: Mutex::new(Arc::new(creds.direct_server_tls()?)),
            tickets: Arc::default(),
            cert: Mutex::new(creds.fingerprint()),
            stop_serving_at: Arc::new(AtomicU64::new(stop_serving_at_from_env())),
        })
    }

    /// Tests and benchmarks only: cuts every transfer served from now on
    /// at chunk `at` of its result (`None`: never), as
    /// [`super::Link::stop_serving_at`] does for the relay.
    pub fn stop_serving_at(&self, at: Option<u64>) {
        self.stop_serving_at
            .store(at.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.endpoint.local_addr().map_err(LinkError::Endpoint)
    }

    /// The tickets it honours (the link's `Expect`s fill them).
    pub fn tickets(&self) -> &Arc<Tickets> {
        &self.tickets
    }

    /// What tells the orchestrator of it, presenting `creds`' certificate
    /// from now on (renewed credentials replace the one bound).
    pub fn listen_message(&self, creds: &Credentials) -> Result<Message, LinkError> {
        let fingerprint = creds.fingerprint();
        let mut cert = self.cert.lock().expect("cert");
        if *cert != fingerprint {
            self.endpoint
                .set_server_config(Some(creds.direct_server_config()?));
            *self.tls.lock().expect("tls") = Arc::new(creds.direct_server_tls()?);
            *cert = fingerprint;
        }
        let addr = self.local_addr()?;
        Ok(Message::Listen {
            port: addr.port(),
            ip: (!addr.ip().is_unspecified()).then_some(addr.ip()),
            cert: fingerprint,
        })
    }

    /// Whether it also listens over TCP.
    pub fn over_tcp(&self) -> bool {
        self.tcp.is_some()
    }

    /// Serves direct fetches from `store` until the endpoint closes.
    pub async fn serve(&self, store: &Store) {
        let peers = Arc::new(tokio::sync::Semaphore::new(MAX_PEERS));
        tokio::select! {
            () = self.serve_quic(store, &peers) => {}
            () = self.serve_tcp(store, &peers) => {}
        }
    }

    async fn serve_tcp(&self, store: &Store, peers: &Arc<tokio::sync::Semaphore>) {
        let Some(listener) = &self.tcp else {
            return std::future::pending().await;
        };
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: the next may work.
                    debug!("accepting a direct TCP connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = peers.clone().try_acquire_owned() else {
                debug!("refused a direct connection: {MAX_PEERS} are open");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.lock().expect("tls").clone());
            let (store, tickets) = (store.clone(), self.tickets.clone());
            let stop = self.stop_serving_at.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let _permit = permit;
                // The handshake within the Redeem's time, then the Redeem
                // within its own, so a peer that stalls holds no place for
                // long.
                let handshake =
                    tokio::time::timeout(REDEEM_TIMEOUT, acceptor.accept(pipe::buffered(tcp)))
                        .await;
                let mut pipe = match handshake {
                    Ok(Ok(tls)) => TlsPipe::new(tls),
                    Ok(Err(e)) => {
                        debug!("a direct TCP connection failed its handshake: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                // The TLS verifier required a certificate chained to the
                // team CA.
                let Some(asker) = pipe.peer_fingerprint() else {
                    return;
                };
                let asked = read_redeem(&mut pipe).await;
                if let Err(e) = answer(&mut pipe, asked, &store, &tickets, &asker, stop).await {
                    warn!("serving a direct fetch failed: {e}");
                }
            });
        }
    }

    async fn serve_quic(&self, store: &Store, peers: &Arc<tokio::sync::Semaphore>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let Ok(permit) = peers.clone().try_acquire_owned() else {
                debug!("refused a direct connection: {MAX_PEERS} are open");
                incoming.refuse();
                continue;
            };
            let (store, tickets) = (store.clone(), self.tickets.clone());
            let stop = self.stop_serving_at.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match incoming.await {
                    Ok(conn) => serve_peer(conn, &store, &tickets, &stop).await,
                    Err(e) => debug!("a direct connection failed its handshake: {e}"),
                }
            });
        }
    }
}

/// The sha256 of the certificate `conn`'s peer presented.
fn peer_fingerprint(conn: &Connection) -> Option<Sha256Digest> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Sha256Digest::of(c.as_ref()))
}

async fn serve_peer(
    conn: Connection,
    store: &Store,
    tickets: &Arc<Tickets>,
    stop: &Arc<AtomicU64>,
) {
    // The TLS verifier required a certificate chained to the team CA.
    let Some(asker) = peer_fingerprint(&conn) else {
        conn.close(1u32.into(), b"a certificate is required");
        return;
    };
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let (store, tickets) = (store.clone(), tickets.clone());
        let stop = stop.load(Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = redeem(send, recv, &store, &tickets, &asker, stop).await {
                warn!("serving a direct fetch failed: {e}");
            }
        });
    }
}

async fn redeem(
    mut send: SendStream,
    mut recv: RecvStream,
    store: &Store,
    tickets: &Tickets,
    asker: &Sha256Digest,
    stop: u64,
) -> Result<(), super::serve::ServeError> {
    let asked = read_redeem(&mut recv).await;
    answer(&mut send, asked, store, tickets, asker, stop).await
}

/// What a direct connection asked, its `Redeem` read within
/// [`REDEEM_TIMEOUT`].
enum Asked {
    Redeem {
        ticket: Secret,
        key: RunKey,
        namespace: String,
        resume: Option<Box<reprise_protocol::wire::Resume>>,
    },
    /// Something else: refused with this.
    Other(Message),
    /// Nothing in time.
    Nothing,
    Broken(reprise_frames::ReadError),
}

async fn read_redeem(recv: &mut impl FrameRecv) -> Asked {
    match tokio::time::timeout(REDEEM_TIMEOUT, read_message(recv)).await {
        Ok(Ok(Message::Redeem {
            ticket,
            key,
            namespace,
            resume,
        })) => Asked::Redeem {
            ticket,
            key,
            namespace,
            resume,
        },
        Ok(Ok(_)) => Asked::Other(Message::error(ErrorCode::Unexpected, "expected redeem")),
        Ok(Err(e)) => Asked::Broken(e),
        Err(_) => Asked::Nothing,
    }
}

/// Serves what was asked if a ticket the holder keeps allows it.
async fn answer(
    send: &mut impl FrameSend,
    asked: Asked,
    store: &Store,
    tickets: &Tickets,
    asker: &Sha256Digest,
    stop: u64,
) -> Result<(), super::serve::ServeError> {
    let (ticket, key, namespace, resume) = match asked {
        Asked::Redeem {
            ticket,
            key,
            namespace,
            resume,
        } => (ticket, key, namespace, resume),
        Asked::Other(m) => {
            write_message(send, &m).await?;
            send.end().await;
            return Ok(());
        }
        Asked::Broken(e) => return Err(e.into()),
        Asked::Nothing => return Ok(()),
    };
    let Some(mut pending) = tickets.redeem(&ticket, asker, &key, &namespace) else {
        info!(key = %key.short(), "refused a direct fetch without a ticket for it");
        write_message(send, &Message::error(ErrorCode::NotFound, REFUSED)).await?;
        send.end().await;
        return Ok(());
    };
    let sent = serve_held(
        send,
        &key,
        &namespace,
        resume.map(|r| *r),
        store,
        &pending.repos,
        stop,
    )
    .await?;
    if let Some(bytes) = sent {
        debug!(key = %key, bytes, "served a result directly");
        let _ = write_message(&mut pending.reply, &Message::Served { bytes }).await;
        let _ = pending.reply.finish();
    }
    Ok(())
}

/// A connection to a holder, over one of its two listeners.
#[derive(Debug)]
pub enum HolderLink {
    /// TLS over TCP (boxed: the TLS state is a kilobyte and more).
    Tcp(Box<TlsPipe>),
    /// QUIC, with the endpoint it goes through.
    Quic(quinn::Endpoint, Connection),
}

/// Dials the holder an introduction names (see [`dial_tcp`] and [`dial`]
/// for what is checked): over TCP, and over QUIC beside it when the TCP
/// port has not answered within [`TCP_HEAD_START`] (a filtered port never
/// does) or at once when TCP fails. The first handshake to complete is
/// the connection; the other is dropped before a byte of the request
/// goes over it, so a ticket is only ever sent once.
pub async fn connect(
    addr: &str,
    holder: Sha256Digest,
    creds: &Credentials,
) -> Result<HolderLink, String> {
    let (answered, told) = tokio::sync::oneshot::channel();
    let tcp = dial_tcp_telling(addr, holder, creds, Some(answered));
    match race(tcp, told, || dial(addr, holder, creds), TCP_HEAD_START).await? {
        Raced::First(pipe) => Ok(HolderLink::Tcp(Box::new(pipe))),
        Raced::Second((endpoint, conn)) => Ok(HolderLink::Quic(endpoint, conn)),
    }
}

/// Which of two dials won a [`race`].
#[derive(Debug)]
enum Raced<A, B> {
    First(A),
    Second(B),
}

/// Runs the preferred dial `first`, and `second` beside it once
/// `head_start` has passed without `answered` (the first's transport
/// answered), or once `first` fails. The first to succeed wins and the
/// other is dropped; when both fail, both reasons are given.
async fn race<A, B, F>(
    first: impl Future<Output = Result<A, String>>,
    mut answered: tokio::sync::oneshot::Receiver<()>,
    second: impl FnOnce() -> F,
    head_start: Duration,
) -> Result<Raced<A, B>, String>
where
    F: Future<Output = Result<B, String>>,
{
    let mut first = std::pin::pin!(first);
    let mut head = std::pin::pin!(tokio::time::sleep(head_start));
    let mut second = Some(second);
    let mut racing: Option<std::pin::Pin<Box<F>>> = None;
    let (mut first_failed, mut second_failed) = (None::<String>, None::<String>);
    let mut waiting = true;
    let both = |tcp: &str, quic: &str| format!("over TCP: {tcp}; over QUIC: {quic}");
    loop {
        tokio::select! {
            r = &mut first, if first_failed.is_none() => match r {
                Ok(a) => return Ok(Raced::First(a)),
                Err(e) => {
                    if let Some(quic) = &second_failed {
                        return Err(both(&e, quic));
                    }
                    first_failed = Some(e);
                    if let Some(dial) = second.take() {
                        racing = Some(Box::pin(dial()));
                    }
                }
            },
            _ = &mut answered, if waiting => waiting = false,
            () = &mut head, if waiting && second.is_some() => {
                if let Some(dial) = second.take() {
                    racing = Some(Box::pin(dial()));
                }
            },
            r = async { racing.as_mut().expect("a started dial").await },
                if racing.is_some() && second_failed.is_none() => match r {
                Ok(b) => return Ok(Raced::Second(b)),
                Err(e) => {
                    if let Some(tcp) = &first_failed {
                        return Err(both(tcp, &e));
                    }
                    second_failed = Some(e);
                }
            },
        }
    }
}

/// Dials the holder an introduction names over TCP: its `addr`, taken
/// only with the certificate whose sha256 is `holder`, presenting
/// `creds`; the connection and the handshake within
/// [`TCP_CONNECT_TIMEOUT`].
pub async fn dial_tcp(
    addr: &str,
    holder: Sha256Digest,
    creds: &Credentials,
) -> Result<TlsPipe, String> {
    dial_tcp_telling(addr, holder, creds, None).await
}

/// [`dial_tcp`], telling `answered` once the TCP connection is made.
async fn dial_tcp_telling(
    addr: &str,
    holder: Sha256Digest,
    creds: &Credentials,
    answered: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<TlsPipe, String> {
    let remote: SocketAddr = addr
        .parse()
        .map_err(|_| format!("the introduction's address {addr:?} is not IP:PORT"))?;
    let tls = creds.direct_client_tls(holder).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = rustls::pki_types::ServerName::try_from("reprise-peer").expect("a valid name");
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(remote)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(answered) = answered {
            let _ = answered.send(());
        }
        let _ = tcp.set_nodelay(true);
        connector
            .connect(name, pipe::buffered(tcp))
            .await
            .map_err(|e| crate::text::error_chain(&e))
    };
    match tokio::time::timeout(TCP_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(tls)) => Ok(TlsPipe::new(tls)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no handshake within {TCP_CONNECT_TIMEOUT:?}")),
    }
}

/// Dials the holder an introduction names over QUIC: its `addr`, taken
/// only with the certificate whose sha256 is `holder`, presenting `creds`.
pub async fn dial(
    addr: &str,
    holder: Sha256Digest,
    creds: &Credentials,
) -> Result<(quinn::Endpoint, Connection), String> {
    let remote: SocketAddr = addr
        .parse()
        .map_err(|_| format!("the introduction's address {addr:?} is not IP:PORT"))?;
    let config = creds
        .direct_client_config(holder)
        .map_err(|e| e.to_string())?;
    let endpoint =
        reprise_frames::client_endpoint(super::any_local(&remote)).map_err(|e| e.to_string())?;
    let connecting = endpoint
        .connect_with(config, remote, "reprise-peer")
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok((endpoint, conn)),
        Ok(Err(e)) => Err(crate::text::error_chain(&e)),
        Err(_) => Err(format!("no handshake within {CONNECT_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use tokio::sync::oneshot;
    use tokio::time::{Instant, sleep, sleep_until};

    const HEAD: Duration = TCP_HEAD_START;
    const MS: Duration = Duration::from_millis(1);

    /// A preferred dial: its transport answers `answer` after the start
    /// (never if `None`), and it ends at `end_at` with `end`.
    async fn first_dial(
        start: Instant,
        answer: Option<Duration>,
        tell: oneshot::Sender<()>,
        end_at: Duration,
        end: Result<&'static str, &'static str>,
    ) -> Result<&'static str, String> {
        let mut tell = Some(tell);
        if let Some(at) = answer {
            sleep_until(start + at).await;
            let _ = tell.take().expect("told once").send(());
        }
        sleep_until(start + end_at).await;
        drop(tell);
        end.map_err(String::from)
    }

    /// The race of `first` against a second dial that takes `takes` and
    /// ends with `end`; returns the outcome and when the second started,
    /// counted from the start.
    async fn run(
        answer: Option<Duration>,
        end_at: Duration,
        first_end: Result<&'static str, &'static str>,
        takes: Duration,
        end: Result<&'static str, &'static str>,
    ) -> (
        Result<Raced<&'static str, &'static str>, String>,
        Option<Duration>,
    ) {
        let start = Instant::now();
        let (tell, told) = oneshot::channel();
        let started = Cell::new(None);
        let first = first_dial(start, answer, tell, end_at, first_end);
        let second = || {
            started.set(Some(start.elapsed()));
            async move {
                sleep(takes).await;
                end.map_err(String::from)
            }
        };
        let raced = race(first, told, second, HEAD).await;
        (raced, started.get())
    }

    /// When QUIC started, in a race TCP loses: its transport answering
    /// at `answer` (never if `None`), failing at `fails_at`.
    async fn quic_start(answer: Option<Duration>, fails_at: Duration) -> Option<Duration> {
        let (raced, started) =
            run(answer, fails_at, Err("no handshake"), 10 * MS, Ok("quic")).await;
        assert!(matches!(raced, Ok(Raced::Second("quic"))), "{raced:?}");
        started
    }

    #[tokio::test(start_paused = true)]
    async fn a_tcp_port_that_never_answers_gets_quic_beside_it_after_the_head_start() {
        let started = quic_start(None, TCP_CONNECT_TIMEOUT).await;
        assert_eq!(started, Some(HEAD), "QUIC waits the head start, no more");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tcp_port_that_answers_keeps_quic_back_until_its_handshake_fails() {
        // Another program on the holder's TCP port: it accepts, it never
        // completes a handshake with the holder's certificate.
        let started = quic_start(Some(MS), TCP_CONNECT_TIMEOUT).await;
        assert_eq!(started, Some(TCP_CONNECT_TIMEOUT));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_tcp_connection_starts_quic_at_once() {
        let started = quic_start(None, Duration::ZERO).await;
        assert_eq!(started, Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quick_tcp_handshake_never_starts_quic() {
        let (raced, started) = run(Some(MS), 20 * MS, Ok("tcp"), MS, Ok("quic")).await;
        assert!(matches!(raced, Ok(Raced::First("tcp"))), "{raced:?}");
        assert_eq!(started, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tcp_handshake_still_wins_over_a_slower_quic_one() {
        let (raced, started) = run(
            Some(HEAD + 50 * MS),
            HEAD + 60 * MS,
            Ok("tcp"),
            CONNECT_TIMEOUT,
            Ok("quic"),
        )
        .await;
        assert!(matches!(raced, Ok(Raced::First("tcp"))), "{raced:?}");
        assert_eq!(started, Some(HEAD), "QUIC was dialled, and dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn quic_failing_first_leaves_tcp_to_finish() {
        let (raced, _) = run(None, 300 * MS, Ok("tcp"), MS, Err("unreachable")).await;
        assert!(matches!(raced, Ok(Raced::First("tcp"))), "{raced:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn both_failing_gives_both_reasons() {
        for (end_at, takes) in [(TCP_CONNECT_TIMEOUT, MS), (Duration::ZERO, CONNECT_TIMEOUT)] {
            let (raced, _) = run(None, end_at, Err("refused"), takes, Err("timed out")).await;
            let e = raced.expect_err("both failed");
            assert!(e.contains("TCP: refused"), "{e}");
            assert!(e.contains("QUIC: timed out"), "{e}");
        }
    }
}
