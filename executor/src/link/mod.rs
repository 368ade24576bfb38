//! The executor's link to the orchestrator: where it is and the
//! credentials to present ([`Orchestrator`], from the user's
//! [`settings`]), a live connection ([`LinkState`]: hello, announce, lookup,
//! assess, fetch, serve), and the two trust boundaries a result crosses:
//! [`fetch`] (everything a received result must pass before it is
//! committed) and [`serve`] (what this executor hands out, and to whom).
//!
//! A result travels with its *producer's* seal, stored with it when its run
//! ended ([`credentials`]); nothing here signs on another's behalf.

mod buffers;
pub mod credentials;
pub mod direct;
pub mod fetch;
pub mod login;
pub mod pipe;
pub mod provenance;
pub mod serve;
pub mod settings;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::Connection;
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::key::KeyInputs;
use reprise_protocol::seal::SignedBy;
use reprise_protocol::wire::{ErrorCode, MAX_FRAME, Message, PROTOCOL_VERSION, Resume, Sealed};
use rustls::pki_types::UnixTime;
use thiserror::Error;
use tracing::{debug, info, warn};

pub use credentials::Credentials;
use direct::HolderLink;
use fetch::receive;
pub use fetch::{FetchError, Fetched, check_start, check_transfer};
pub use reprise_frames::{ReadError, WriteError, read_message, write_message};
use serve::serve_one;
pub use serve::{transfer_files, write_transfer};
pub use settings::LinkSettings;

use crate::store::{Store, StoredResult};

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the orchestrator is, with the credentials loaded.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    pub settings: LinkSettings,
    /// The credentials in use, shared by the clones: a renewal (here or by
    /// another process writing the file) replaces them for the next
    /// connection and the next seal.
    creds: Arc<std::sync::Mutex<Arc<Credentials>>>,
}

/// Why a orchestrator could not be made.
#[derive(Debug, Error)]
#[error("cannot use the credentials {}", .path.display())]
pub struct CredentialsError {
    path: PathBuf,
    #[source]
    source: LinkError,
}

impl Orchestrator {
    pub fn new(settings: LinkSettings) -> Result<Orchestrator, CredentialsError> {
        let creds = Credentials::load(&settings.credentials)
            .and_then(Credentials::unexpired)
            .map_err(|source| CredentialsError {
                path: settings.credentials.clone(),
                source,
            })?;
        Ok(Orchestrator {
            settings,
            creds: Arc::new(std::sync::Mutex::new(Arc::new(creds))),
        })
    }

    /// The loaded credentials (they seal results made here).
    pub fn credentials(&self) -> Arc<Credentials> {
        self.creds.lock().expect("credentials").clone()
    }

    /// Takes the credentials file's certificate when it is another,
    /// unexpired one than in use (renewed by another process).
    fn reload(&self) {
        let current = self.credentials();
        let Ok(fresh) =
            Credentials::load(&self.settings.credentials).and_then(Credentials::unexpired)
        else {
            return;
        };
        if fresh.cert_pem() != current.cert_pem() {
            *self.creds.lock().expect("credentials") = Arc::new(fresh);
        }
    }

    /// One attempt, bounded by [`CONNECT_TIMEOUT`]. A person's
    /// credentials in the last quarter of their lifetime are renewed on
    /// the way (the new certificate is written over the credentials file
    /// and used from the next connection on).
    pub async fn connect(&self) -> Result<Link, String> {
        self.reload();
        let creds = self.credentials();
        let attempt = Link::connect(&self.settings.orchestrator, creds.clone());
        let link = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(link)) => link,
            Ok(Err(e)) => return Err(crate::text::error_chain(&e)),
            Err(_) => return Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
        };
        if let Ok((from, until)) = creds.validity()
            && creds.is_person()
            && login::renewal_due(from, until, crate::store::now_secs())
        {
            match self.renew(&link).await {
                Ok(renewed) => info!(
                    identity = %renewed.identity,
                    "renewed the credentials until {}",
                    crate::text::utc_timestamp(renewed.expires_at)
                ),
                Err(e) => warn!(
                    "could not renew the credentials (they expire at {}): {}",
                    crate::text::utc_timestamp(until),
                    crate::text::error_chain(&e)
                ),
            }
        }
        Ok(link)
    }

    /// Asks for a new certificate on `link` (a person's) and writes it
    /// over the credentials file.
    pub async fn renew(&self, link: &Link) -> Result<login::LoggedIn, login::LoginError> {
        let creds = self.credentials();
        let renewed = tokio::time::timeout(CONNECT_TIMEOUT * 6, login::renew(link, &creds))
            .await
            .map_err(|_| login::LoginError::TimedOut(CONNECT_TIMEOUT * 6))??;
        crate::paths::write_private(
            &self.settings.credentials,
            renewed.credentials_pem.as_bytes(),
        )
        .map_err(|source| LinkError::CredentialsIo {
            path: self.settings.credentials.clone(),
            source,
        })?;
        if let Ok(fresh) = Credentials::from_pem(&renewed.credentials_pem) {
            *self.creds.lock().expect("credentials") = Arc::new(fresh);
        }
        Ok(renewed)
    }
}

/// Why talking to the orchestrator failed.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("credentials file {}", path.display())]
    CredentialsIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error(
        "they expired at {}: log in again (`reprise login`) or ask your administrator for new credentials",
        crate::text::utc_timestamp(*.0)
    )]
    Expired(u64),
    #[error("cannot resolve orchestrator address {0:?}")]
    Resolve(String),
    #[error("the orchestrator address {0:?} has no port: give HOST:PORT (e.g. {0}:4433)")]
    NoPort(String),
    #[error("cannot start a QUIC endpoint")]
    Endpoint(#[source] std::io::Error),
    #[error("cannot connect to the orchestrator")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection to the orchestrator")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the orchestrator refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("reading from the orchestrator")]
    Read(#[from] ReadError),
    #[error("writing to the orchestrator")]
    Write(#[from] WriteError),
    #[error("the orchestrator answered {0} where it should not")]
    Unexpected(String),
}

impl LinkError {
    /// Whether the orchestrator closed the connection because it does not
    /// take these credentials (revoked, or not issued by it): logging in
    /// again is what helps, not trying later.
    pub fn credentials_refused(&self) -> bool {
        match self {
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
                // The orchestrator's close codes 1 (unknown identity) and
                // 2 (revoked).
                matches!(close.error_code.into_inner(), 1 | 2)
            }
            _ => false,
        }
    }
}

/// The orchestrator's answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A result that counts is held; `producer` sealed it, `counts` says
    /// why it counts.
    Offer {
        producer: String,
        counts: String,
    },
    /// Trusted producers disagree on the key; nothing counts.
    Conflict {
        producers: Vec<String>,
    },
    NotFound,
}

/// A connection to the orchestrator.
#[derive(Debug)]
pub struct Link {
    /// The link's own UDP endpoint, open for as long as the link.
    _endpoint: quinn::Endpoint,
    conn: Connection,
    creds: Arc<Credentials>,
    identity: String,
    repos: Vec<String>,
    /// Whether this identity's results count for CI (under each
    /// repository's policy).
    trusted: bool,
    /// The granted repositories in which its results count for CI.
    counts: Vec<String>,
    /// Fingerprints of revoked certificates, as of the connection.
    revoked: BTreeSet<Sha256Digest>,
    /// Tests and benchmarks only: the chunk of a result at which every
    /// transfer served is cut ([`Link::stop_serving_at`]).
    stop_serving_at: Arc<AtomicU64>,
}

impl Link {
    /// Connects to `addr` (`HOST:PORT`; HOST must be a name or address in
    /// the orchestrator's certificate), presents the client certificate and
    /// says `Hello`.
    pub async fn connect(addr: &str, creds: Arc<Credentials>) -> Result<Link, LinkError> {
        let (endpoint, conn) = dial(addr, creds.client_config()?).await?;
        Link::hello(endpoint, conn, creds, PROTOCOL_VERSION).await
    }

    /// Says `Hello` with `version` on a fresh connection (tests use other
    /// versions to see them refused).
    pub async fn hello(
        endpoint: quinn::Endpoint,
        conn: Connection,
        creds: Arc<Credentials>,
        version: u32,
    ) -> Result<Link, LinkError> {
        let answer = exchange(&conn, &Message::Hello { version }).await;
        match answer {
            Ok(Message::Welcome {
                identity,
                repos,
                revoked,
                trusted,
                counts,
            }) => {
                debug!(%identity, revoked = revoked.len(), "connected to the orchestrator");
                // The orchestrator's word cannot widen what this executor
                // serves: only namespaces its own certificate grants.
                let (repos, refused): (Vec<String>, Vec<String>) = repos
                    .into_iter()
                    .partition(|r| creds.namespaces().contains(r));
                if !refused.is_empty() {
                    warn!(
                        "the orchestrator names repositories these credentials do not grant, which are not served or announced: {} (credentials issued before grants were written into certificates need `reprise-orchestrator issue --replace`)",
                        refused.join(", ")
                    );
                }
                let counts = match counts {
                    Some(c) => c.into_iter().filter(|r| repos.contains(r)).collect(),
                    None if trusted => repos.clone(),
                    None => Vec::new(),
                };
                Ok(Link {
                    _endpoint: endpoint,
                    conn,
                    creds,
                    identity,
                    repos,
                    trusted,
                    counts,
                    revoked: revoked.into_iter().collect(),
                    stop_serving_at: Arc::new(AtomicU64::new(serve::stop_serving_at_from_env())),
                })
            }
            Ok(other) => Err(unexpected(other)),
            // A refused connection shows as closed with the reason.
            Err(LinkError::Read(ReadError::Stream(quinn::ReadError::ConnectionLost(e)))) => {
                Err(LinkError::Connection(e))
            }
            Err(e) => Err(e),
        }
    }

    /// The identity the orchestrator knows this executor by.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The repositories this executor may read.
    pub fn repos(&self) -> &[String] {
        &self.repos
    }

    /// Whether this identity's results count for CI, under each
    /// repository's policy.
    pub fn trusted(&self) -> bool {
        self.trusted
    }

    /// The granted repositories in which this identity's results count
    /// for CI under their policy.
    pub fn counts_in(&self) -> &[String] {
        &self.counts
    }

    /// The underlying connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sends one request on its own stream and reads the answer.
    pub async fn request(&self, message: &Message) -> Result<Message, LinkError> {
        exchange(&self.conn, message).await
    }

    /// Whether this executor's certificate grants `namespace`.
    pub fn grants(&self, namespace: &str) -> bool {
        self.repos.iter().any(|r| r == namespace)
    }

    /// The revocation list the orchestrator sent when this connected.
    pub fn revoked(&self) -> &BTreeSet<Sha256Digest> {
        &self.revoked
    }

    /// Announces every sealed result of `store` in a namespace this
    /// executor is granted (passed ones to serve, failed ones so that a
    /// disagreement shows), in as many messages as the frame limit needs.
    /// Returns how many passed results the orchestrator indexed (the ones
    /// served), and how many results it refused.
    pub async fn announce(&self, store: &Store) -> Result<(u32, u32), LinkError> {
        let sealed = |results: Vec<StoredResult>| -> Vec<Sealed> {
            results
                .iter()
                .filter(|r| self.grants(&r.manifest.inputs.namespace))
                .filter_map(StoredResult::sealed)
                .collect()
        };
        let (served, refused) = self.announce_sealed(sealed(store.list())).await?;
        let (_, refused_failed) = self.announce_sealed(sealed(store.list_failed())).await?;
        Ok((served, refused + refused_failed))
    }

    /// Announces `results` (already filtered), batched under the frame
    /// limit.
    pub async fn announce_sealed(&self, results: Vec<Sealed>) -> Result<(u32, u32), LinkError> {
        let (mut accepted, mut refused) = (0, 0);
        let mut batch: Vec<Sealed> = Vec::new();
        let mut size = 0;
        let mut results = results.into_iter().peekable();
        while let Some(r) = results.next() {
            size += serde_json::to_vec(&r).map_or(MAX_FRAME, |v| v.len()) + 1;
            batch.push(r);
            let next_size = results
                .peek()
                .map_or(0, |n| serde_json::to_vec(n).map_or(MAX_FRAME, |v| v.len()));
            if results.peek().is_none() || size + next_size + 64 > MAX_FRAME {
                let results = std::mem::take(&mut batch);
                size = 0;
                match self.request(&Message::Announce { results }).await? {
                    Message::Announced {
                        accepted: a,
                        refused: r,
                    } => {
                        accepted += a;
                        refused += r;
                    }
                    other => return Err(unexpected(other)),
                }
            }
        }
        Ok((accepted, refused))
    }

    /// Asks whether a result for `key` that counts for CI is held.
    pub async fn lookup(&self, key: &RunKey, namespace: &str) -> Result<Found, LinkError> {
        let m = Message::Lookup {
            key: *key,
            namespace: namespace.to_string(),
        };
        match self.request(&m).await? {
            Message::Offer { producer, counts } => Ok(Found::Offer { producer, counts }),
            Message::Conflict { producers } => Ok(Found::Conflict { producers }),
            Message::NotFound => Ok(Found::NotFound),
            other => Err(unexpected(other)),
        }
    }

    /// Asks whether `result` would count for CI under its repository's
    /// policy: `(counts, why)`.
    pub async fn assess(&self, result: Sealed) -> Result<(bool, String), LinkError> {
        let m = Message::Assess {
            result: Box::new(result),
        };
        match self.request(&m).await? {
            Message::Assessed { counts, reason } => Ok((counts, reason)),
            other => Err(unexpected(other)),
        }
    }

    /// Fetches `key` through the orchestrator, checks everything (see the
    /// module's doc) against `expected` (the inputs this checkout computed)
    /// and commits it to `store`.
    pub async fn fetch_into(
        &self,
        key: &RunKey,
        namespace: &str,
        expected: &KeyInputs,
        store: &Store,
    ) -> Result<(StoredResult, SignedBy), FetchError> {
        let f = self.fetch(key, namespace, expected, store).await?;
        Ok((f.stored, f.signed_by))
    }

    /// [`Link::fetch_into`], resuming a transfer of the key that was cut
    /// if the store keeps one ([`Store::resumable`]), saying how many bytes
    /// came now and how many were kept from before. Straight from the
    /// holder when the orchestrator introduces one ([`Link::fetch_direct`]),
    /// else, or when that fails, through the relay. When chunks kept did
    /// not hold, they are cut back and the rest asked once more.
    pub async fn fetch(
        &self,
        key: &RunKey,
        namespace: &str,
        expected: &KeyInputs,
        store: &Store,
    ) -> Result<Fetched, FetchError> {
        match self.fetch_direct(key, namespace, expected, store).await {
            Ok(fetched) => return Ok(fetched),
            Err(FetchError::NotFound) => return Err(FetchError::NotFound),
            Err(e @ FetchError::DiskFull(_)) => return Err(e),
            Err(FetchError::NoDirect(why)) => {
                debug!(key = %key, "no direct fetch: {why}");
            }
            Err(e) => info!(
                key = %key,
                "the direct fetch failed ({}); fetching through the orchestrator",
                crate::text::error_chain(&e)
            ),
        }
        match self.fetch_once(key, namespace, expected, store).await {
            Err(FetchError::KeptDamaged) => {
                info!(key = %key, "chunks kept from a cut transfer did not hold; asking again from the last that did");
                self.fetch_once(key, namespace, expected, store).await
            }
            done => done,
        }
    }

    /// Fetches `key` straight from the executor holding it, which the
    /// orchestrator introduces ([`direct`]). [`FetchError::NoDirect`] when
    /// it cannot be (no holder listens, or an orchestrator that predates
    /// the direct path).
    pub async fn fetch_direct(
        &self,
        key: &RunKey,
        namespace: &str,
        expected: &KeyInputs,
        store: &Store,
    ) -> Result<Fetched, FetchError> {
        let introduce = Message::Introduce {
            key: *key,
            namespace: namespace.to_string(),
        };
        let (addr, holder, offered, ticket) = match self.request(&introduce).await? {
            Message::Introduction(i) => (i.addr, i.holder, (i.producer, i.outputs), i.ticket),
            Message::NotFound => return Err(FetchError::NotFound),
            Message::Error { message, .. } => return Err(FetchError::NoDirect(message)),
            other => return Err(unexpected(other).into()),
        };
        debug!(%addr, "introduced to the holder");
        let (partial, resume) = resumable(store, key);
        let redeem = Message::Redeem {
            ticket,
            key: *key,
            namespace: namespace.to_string(),
            resume: resume.clone().map(Box::new),
        };
        let kept = (partial, resume);
        let link = direct::connect(&addr, holder, &self.creds)
            .await
            .map_err(|e| FetchError::Unavailable(format!("the holder at {addr}: {e}")))?;
        let taken = match link {
            HolderLink::Tcp(mut pipe) => {
                debug!(%addr, "connected to the holder over TCP");
                write_message(&mut *pipe, &redeem)
                    .await
                    .map_err(LinkError::from)?;
                self.take(&mut *pipe, key, expected, store, kept, Some(offered))
                    .await
                    .map(|f| (f, true))
            }
            HolderLink::Quic(endpoint, conn) => {
                debug!(%addr, "connected to the holder over QUIC");
                let (mut send, mut recv) = conn.open_bi().await.map_err(LinkError::from)?;
                write_message(&mut send, &redeem)
                    .await
                    .map_err(LinkError::from)?;
                let _ = send.finish();
                let taken = self
                    .take(&mut recv, key, expected, store, kept, Some(offered))
                    .await;
                conn.close(0u32.into(), b"done");
                drop(endpoint);
                taken.map(|f| (f, false))
            }
        };
        // The holder's word that it holds nothing is not the
        // orchestrator's: the relay is still asked.
        let (mut fetched, tcp) = taken.map_err(|e| match e {
            FetchError::NotFound => {
                FetchError::Unavailable("the holder holds no such result".into())
            }
            e => e,
        })?;
        fetched.direct = true;
        fetched.tcp = tcp;
        info!(key = %key, %addr, tcp, "fetched straight from the holder");
        Ok(fetched)
    }

    async fn fetch_once(
        &self,
        key: &RunKey,
        namespace: &str,
        expected: &KeyInputs,
        store: &Store,
    ) -> Result<Fetched, FetchError> {
        let (partial, resume) = resumable(store, key);
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(LinkError::from)?;
        let fetch = Message::Fetch {
            key: *key,
            namespace: namespace.to_string(),
            resume: resume.clone(),
        };
        write_message(&mut send, &fetch)
            .await
            .map_err(LinkError::from)?;
        let _ = send.finish();
        let fetched = self
            .take(&mut recv, key, expected, store, (partial, resume), None)
            .await?;
        let path = self.conn.stats().path;
        debug!(
            mtu = path.current_mtu,
            rtt_us = path.rtt.as_micros() as u64,
            cwnd = path.cwnd,
            lost = path.lost_packets,
            "the link's path after the transfer"
        );
        Ok(fetched)
    }

    /// Reads a transfer's header from `recv`, checks it (with `offered`,
    /// the producer's certificate sha256 and the outputs' digest the
    /// orchestrator named, on the direct path), and receives and commits
    /// its data, resuming the partial kept if the transfer is its rest.
    async fn take(
        &self,
        recv: &mut impl reprise_frames::FrameRecv,
        key: &RunKey,
        expected: &KeyInputs,
        store: &Store,
        (partial, resume): (Option<crate::store::Partial>, Option<Resume>),
        offered: Option<(Sha256Digest, Sha256Digest)>,
    ) -> Result<Fetched, FetchError> {
        let (sealed, from) = match read_message(recv).await.map_err(LinkError::from)? {
            Message::Transfer { result, from } => (result, from),
            Message::NotFound => return Err(FetchError::NotFound),
            Message::Error { message, .. } => return Err(FetchError::Unavailable(message)),
            other => return Err(unexpected(other).into()),
        };
        let who = check_transfer(
            std::slice::from_ref(self.creds.ca()),
            &sealed,
            key,
            expected,
            &self.revoked,
            UnixTime::now(),
        )?;
        if let Some((producer, outputs)) = offered
            && (who.fingerprint != producer || sealed.manifest.outputs_digest() != outputs)
        {
            return Err(FetchError::NotOffered);
        }
        let rest = check_start(&sealed, &from, resume.as_ref())?;
        let partial = match partial {
            Some(p) if rest => Some(p),
            Some(p) => {
                // Another result of the key, or the holder would not give
                // the rest: the chunks kept are of no use.
                p.discard();
                None
            }
            None => None,
        };
        let (stored, received, resumed) = receive(recv, *sealed, partial, store).await?;
        info!(key = %key, producer = %who.name, received, resumed, "fetched a result from a link");
        Ok(Fetched {
            stored,
            signed_by: who,
            received,
            resumed,
            direct: false,
            tcp: false,
        })
    }

    /// Tests and benchmarks only: cuts every transfer this link serves
    /// from now on at chunk `at` of its result (counted from the start of
    /// its first part; `None`: never), as if the producer died there once
    /// that chunk had left. A transfer that starts past it (the rest of a
    /// cut one) is not cut. The default comes from
    /// [`crate::vars::STOP_SERVING_AT_VAR`].
    pub fn stop_serving_at(&self, at: Option<u64>) {
        self.stop_serving_at
            .store(at.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Serves `Serve` requests from `store` until the connection closes.
    pub async fn serve(&self, store: &Store) -> Result<(), LinkError> {
        self.serve_with(store, None).await
    }

    /// Tells the orchestrator that peers may fetch from `direct`, this
    /// executor's listener ([`direct`]). Returns the address peers are
    /// sent to.
    pub async fn listen(&self, direct: &direct::Direct) -> Result<String, LinkError> {
        match self.request(&direct.listen_message(&self.creds)?).await? {
            Message::Listening { addr } => Ok(addr),
            other => Err(unexpected(other)),
        }
    }

    /// [`Link::serve`], keeping the tickets of direct fetches the
    /// orchestrator sends (`Expect`) in `tickets`, the listener's.
    pub async fn serve_with(
        &self,
        store: &Store,
        tickets: Option<Arc<direct::Tickets>>,
    ) -> Result<(), LinkError> {
        loop {
            let (send, recv) = match self.conn.accept_bi().await {
                Ok(s) => s,
                Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let store = store.clone();
            let repos = self.repos.clone();
            let stop = self.stop_serving_at.load(Ordering::Relaxed);
            let tickets = tickets.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(send, recv, &store, &repos, stop, tickets.as_ref()).await
                {
                    warn!("serving a link failed: {e}");
                }
            });
        }
    }

    /// Closes the connection, waiting until the close frame has left (at
    /// most 15 ms), so the orchestrator drops the connection at once
    /// rather than at its idle timeout. Says whether it saw the frame
    /// leave. Waiting for the endpoint to go fully idle would cost QUIC's
    /// draining period (three probe timeouts, ~80 ms even on loopback;
    /// measured by `peer_bench`), which nothing here needs.
    ///
    /// The frame leaves on the connection driver's next turn, which makes
    /// it and hands it to the socket under the connection's lock: a
    /// datagram counted after the close is that frame. (quinn does not
    /// count close frames in `frame_tx`: waiting on that counter waited
    /// out the whole 15 ms on every command that closed a link.) Only an
    /// acknowledgement sent between the count and the close could be
    /// mistaken for it, and then the orchestrator drops the link at its
    /// idle timeout, as it would had this process been killed. The count
    /// is looked at again each millisecond, not in a busy loop: each look
    /// takes the lock the driver needs to send the frame (a busy loop was
    /// 3 % of a fetching command's CPU).
    pub async fn close(&self) -> bool {
        let before = self.conn.stats().udp_tx.datagrams;
        self.conn.close(0u32.into(), b"bye");
        let sent = async {
            tokio::task::yield_now().await;
            while self.conn.stats().udp_tx.datagrams == before {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_millis(15), sent)
            .await
            .is_ok()
    }
}

/// The partial kept of a cut transfer of `key`, and the rest of it to ask
/// for, if any.
fn resumable(store: &Store, key: &RunKey) -> (Option<crate::store::Partial>, Option<Resume>) {
    let partial = store.resumable(key);
    let resume = partial.as_ref().and_then(|p| {
        let from = p.from();
        from.iter().any(|f| *f > 0).then_some(Resume {
            manifest: p.digest()?,
            from,
        })
    });
    (partial, resume)
}

fn unexpected(m: Message) -> LinkError {
    match m {
        Message::Error { code, message } => LinkError::Refused { code, message },
        other => LinkError::Unexpected(
            serde_json::to_value(&other)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_default(),
        ),
    }
}

pub(crate) async fn exchange(conn: &Connection, message: &Message) -> Result<Message, LinkError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_message(&mut send, message).await?;
    let _ = send.finish();
    Ok(read_message(&mut recv).await?)
}

/// The orchestrator connection, made on first need: a local hit with
/// `--no-serve` never connects. The credentials are loaded on first need
/// too, and seal the run's result whether or not the orchestrator is
/// reachable.
#[derive(Debug)]
pub struct RunLink {
    dir: PathBuf,
    orchestrator: Option<Orchestrator>,
    link: Option<Link>,
    loaded: bool,
    tried: bool,
    /// Whether the command may stay connected after its run to serve the
    /// result; when not, a fetched result lets the link go at once.
    stays: bool,
    /// The close of a link let go early, running beside the replay.
    closing: Option<tokio::task::JoinHandle<()>>,
}

impl RunLink {
    pub fn new(dir: &Path) -> RunLink {
        RunLink {
            dir: dir.to_path_buf(),
            orchestrator: None,
            link: None,
            loaded: false,
            tried: false,
            stays: true,
            closing: None,
        }
    }

    /// Says whether the command may stay connected to serve its result
    /// once the run is done (`false`: `--no-serve`, a CI job).
    pub fn staying(mut self, stays: bool) -> RunLink {
        self.stays = stays;
        self
    }

    /// A result was fetched: a command that will not serve has no more use
    /// for the orchestrator, so its close starts now, beside the replay,
    /// rather than after it. [`RunLink::close`] waits for it.
    pub fn fetched(&mut self) {
        if self.stays {
            return;
        }
        if let Some(link) = self.link.take() {
            self.closing = Some(tokio::spawn(async move {
                link.close().await;
            }));
        }
    }

    /// The configured orchestrator and loaded credentials, if any (notes
    /// say what was ignored, once).
    pub fn orchestrator(&mut self, ui: &dyn crate::ui::Ui) -> Option<&Orchestrator> {
        if !self.loaded {
            self.loaded = true;
            self.orchestrator = orchestrator_from_settings(&self.dir, ui);
        }
        self.orchestrator.as_ref()
    }

    /// The connection, if an orchestrator is configured and reachable.
    /// Configured but unusable (bad credentials, unreachable) is a one-line
    /// note: a run never fails for want of an orchestrator.
    pub async fn get(&mut self, ui: &dyn crate::ui::Ui) -> Option<&Link> {
        if !self.tried {
            self.tried = true;
            if let Some(orchestrator) = self.orchestrator(ui).cloned() {
                match orchestrator.connect().await {
                    Ok(link) => self.link = Some(link),
                    Err(e) => ui.note(&format!(
                        "cannot reach the orchestrator at {}: {e}; running without it",
                        orchestrator.settings.orchestrator
                    )),
                }
            }
        }
        self.link.as_ref()
    }

    /// The connection if one was made.
    pub fn connected(&self) -> Option<&Link> {
        self.link.as_ref()
    }

    /// Takes the connection and what made it (to stay connected).
    pub fn take(&mut self) -> Option<(Orchestrator, Link)> {
        Some((self.orchestrator.clone()?, self.link.take()?))
    }

    /// Closes the connection, if one was made, or waits for the close
    /// [`RunLink::fetched`] started.
    pub async fn close(&mut self) {
        if let Some(link) = &self.link {
            link.close().await;
        }
        if let Some(closing) = self.closing.take() {
            let _ = closing.await;
        }
    }
}

/// The orchestrator and credentials the user configured
/// ([`crate::link::settings`]), with the credentials loaded; `None` when nothing
/// is configured, or with a note when the credentials cannot be used.
pub fn orchestrator_from_settings(dir: &Path, ui: &dyn crate::ui::Ui) -> Option<Orchestrator> {
    let root = crate::repo::Checkout::discover(dir).ok().map(|c| c.root());
    let resolved = crate::link::settings::resolve(&crate::link::settings::gather(root.as_deref()));
    for note in &resolved.notes {
        ui.note(note);
    }
    match Orchestrator::new(resolved.settings?) {
        Ok(c) => Some(c),
        Err(e) => {
            ui.note(&format!(
                "{}; running without the orchestrator",
                crate::text::error_chain(&e)
            ));
            None
        }
    }
}

/// Opens a QUIC connection to `addr` (`HOST:PORT`; HOST must be a name or
/// address in the orchestrator's certificate) on an endpoint of its own.
pub(crate) async fn dial(
    addr: &str,
    config: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, Connection), LinkError> {
    let host = host_of(addr)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let remote: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|_| LinkError::Resolve(addr.to_string()))?
        .next()
        .ok_or_else(|| LinkError::Resolve(addr.to_string()))?;
    let mut endpoint =
        reprise_frames::client_endpoint(any_local(&remote)).map_err(LinkError::Endpoint)?;
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(remote, host)?.await?;
    Ok((endpoint, conn))
}

/// Any local address of `remote`'s family, any port: where a client
/// endpoint dialling it binds.
pub(crate) fn any_local(remote: &SocketAddr) -> SocketAddr {
    let ip = match remote {
        SocketAddr::V4(_) => std::net::IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => std::net::IpAddr::from([0u16; 8]),
    };
    SocketAddr::new(ip, 0)
}

/// The host of a `HOST:PORT` address. "host", "[::1]" and "::1" name no
/// port (nor does "host:http"); "host:4433" and "[::1]:4433" do.
fn host_of(addr: &str) -> Result<&str, LinkError> {
    match addr.rsplit_once(':') {
        Some((host, port))
            if (host.ends_with(']') || !host.contains(':')) && port.parse::<u16>().is_ok() =>
        {
            Ok(host)
        }
        _ => Err(LinkError::NoPort(addr.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_port_says_so() {
        for good in ["localhost:4433", "10.0.0.1:1", "[::1]:4433"] {
            assert!(host_of(good).is_ok(), "{good}");
        }
        for bad in ["localhost", "::1", "[::1]", "host:http", "host:99999"] {
            let e = host_of(bad).unwrap_err().to_string();
            assert!(e.contains("has no port: give HOST:PORT"), "{bad}: {e}");
        }
    }
}
