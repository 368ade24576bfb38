//! The executor's side of the orchestrator protocol: credentials, the
//! connection, announcing held results, looking up and fetching a result
//! from a peer (verified in full before anything is committed), and serving
//! the local store to peers.
//!
//! A result travels with its *producer's* seal, stored with it when its run
//! ended; nothing here signs on another's behalf. What a fetch checks before
//! it commits: the producer's seal ([`reprise_protocol::seal::verify`]: the
//! certificate chains to the team CA, may authenticate clients, is valid
//! now and not on the revocation list the orchestrator sent at `Welcome`,
//! and its signature covers the manifest's canonical encoding); the
//! manifest's own consistency ([`ResultManifest::check`]: its key is its
//! inputs' key, artifact paths are plain relative paths, no file twice);
//! the manifest is for the key asked and its inputs are the ones this
//! checkout computed; the result passed; the output record's size is under
//! the limit; the output record's and every artifact's sha256 and size
//! while they stream; nothing follows the last artifact. Everything is
//! staged in the store's `tmp/` and committed with
//! [`Store::commit_received`] only at the end, so a failure anywhere leaves
//! the store as it was.
//!
//! What serving checks: the request decodes (keys are typed: a path-like
//! key does not), the result is stored under that key, passed, sealed, of
//! the namespace asked, and of a namespace this executor's certificate
//! grants. Only such results are announced too (with the failed ones of
//! granted namespaces, sealed, so a disagreement shows).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream};
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::key::KeyInputs;
use reprise_protocol::manifest::{ManifestError, Outcome, ResultManifest};
use reprise_protocol::seal::{SEAL_VERSION, Seal, SealError, SignedBy};
use reprise_protocol::wire::{
    self, ErrorCode, FrameError, MAX_CHUNK, MAX_FRAME, Message, PROTOCOL_VERSION, Sealed,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::beneath::{Beneath, BeneathError};
use crate::store::{Sealer, Store, StoreError, StoredResult};

/// Largest output record a fetch accepts (it is held in memory to commit).
pub const MAX_RECORD: u64 = 256 << 20;

/// Why talking to the orchestrator failed.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error("credentials file {}", path.display())]
    CredentialsIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("cannot resolve orchestrator address {0:?}")]
    Resolve(String),
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

/// Why a frame could not be written.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream write")]
    Stream(#[from] quinn::WriteError),
}

/// Why a fetched result was not committed. Whatever the reason, nothing
/// was committed and the caller runs the tests for real.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("no peer holds the result")]
    NotFound,
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("the producer could not serve the result: {0}")]
    Unavailable(String),
    #[error("the producer's seal does not hold")]
    Seal(#[from] SealError),
    #[error("the result's manifest is refused")]
    Manifest(#[from] ManifestError),
    #[error("the producer sent a result for key {got}, not {asked}")]
    WrongKey { asked: RunKey, got: RunKey },
    #[error("the result's inputs differ from this checkout's ({0})")]
    InputsDiffer(String),
    #[error("the producer sent a result that did not pass")]
    NotPassed,
    #[error("the {part} of the result is {found} bytes or more, over the limit of {max}")]
    TooLarge { part: String, found: u64, max: u64 },
    #[error("the {part} does not match its manifest (sha256 {found}, expected {expected})")]
    Digest {
        part: String,
        expected: Sha256Digest,
        found: Sha256Digest,
    },
    #[error("the transfer broke off in the {part}")]
    Truncated {
        part: String,
        #[source]
        source: Option<ReadError>,
    },
    #[error("the producer sent a chunk of {0} bytes that overruns its part")]
    BadChunk(usize),
    #[error("the producer sent data after the last artifact")]
    TrailingData,
    #[error("staging the fetched result in {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("staging the fetched result")]
    Stage(#[from] BeneathError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An executor's credentials: its client certificate and key, and the team
/// CA, from the one PEM file `reprise-orchestrator issue` writes.
#[derive(Debug)]
pub struct Credentials {
    cert_pem: String,
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    ca: CertificateDer<'static>,
}

impl Credentials {
    /// Reads a credentials file.
    pub fn load(path: &Path) -> Result<Credentials, PeerError> {
        let text = std::fs::read_to_string(path).map_err(|source| PeerError::CredentialsIo {
            path: path.to_path_buf(),
            source,
        })?;
        Credentials::from_pem(&text)
    }

    /// Parses credentials: the client certificate first, its PKCS#8 key, and
    /// the CA certificate last.
    pub fn from_pem(text: &str) -> Result<Credentials, PeerError> {
        let bad = |what: &str| PeerError::Credentials(what.to_string());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&format!("bad certificate PEM: {e}")))?;
        let [cert, .., ca] = certs.as_slice() else {
            return Err(bad("expected a client certificate and the CA certificate"));
        };
        let key = PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| bad(&format!("no private key: {e}")))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(bad("the private key must be PKCS#8"));
        };
        let key_pkcs8 = pkcs8.secret_pkcs8_der().to_vec();
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &key_pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| bad(&format!("the key is not an ECDSA P-256 key: {e}")))?;
        let cert_pem = pem_of(cert);
        Ok(Credentials {
            cert_pem,
            cert: cert.clone(),
            key_pkcs8,
            ca: ca.clone(),
        })
    }

    /// The client certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The team CA that seals and the orchestrator are checked against.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Who this certificate names (its common name, fingerprint, expiry).
    pub fn identity(&self) -> Result<SignedBy, SealError> {
        reprise_protocol::seal::describe(&self.cert)
    }

    /// The QUIC client configuration: TLS 1.3, ALPN `reprise/1`, this
    /// certificate presented, the orchestrator checked against the team CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, PeerError> {
        let bad = |e: &dyn std::fmt::Display| PeerError::Credentials(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::Pkcs8(self.key_pkcs8.clone().into());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.cert.clone()], key)
            .map_err(|e| bad(&e))?;
        tls.alpn_protocols = vec![wire::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| bad(&e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)).expect("in range"),
        ));
        transport.keep_alive_interval(Some(std::time::Duration::from_secs(3)));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

impl Sealer for Credentials {
    /// Signs the manifest's canonical encoding with this certificate's key.
    fn seal(&self, manifest: &ResultManifest) -> Seal {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.key_pkcs8, &rng)
            .expect("checked when loaded");
        let sig = key
            .sign(&rng, &reprise_protocol::sign::signing_bytes(manifest))
            .expect("ECDSA signing");
        Seal {
            version: SEAL_VERSION,
            signature: reprise_protocol::hex::encode(sig.as_ref()),
            producer_cert: self.cert_pem.clone(),
        }
    }
}

fn pem_of(cert: &CertificateDer<'_>) -> String {
    use std::fmt::Write as _;
    let b64 = base64_encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).expect("ascii"));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads one control message frame, refusing an oversized length before
/// reading the body.
pub async fn read_message(recv: &mut RecvStream) -> Result<Message, ReadError> {
    let mut header = [0u8; wire::HEADER_LEN];
    read_exact(recv, &mut header, false).await?;
    let len = wire::body_len(header, wire::MAX_FRAME)?;
    let mut body = vec![0u8; len];
    read_exact(recv, &mut body, true).await?;
    Ok(wire::decode(&body)?)
}

async fn read_exact(recv: &mut RecvStream, buf: &mut [u8], started: bool) -> Result<(), ReadError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) if started || n > 0 => ReadError::Truncated,
        quinn::ReadExactError::FinishedEarly(_) => ReadError::Ended,
        quinn::ReadExactError::ReadError(e) => ReadError::Stream(e),
    })
}

/// Writes one control message frame.
pub async fn write_message(send: &mut SendStream, message: &Message) -> Result<(), WriteError> {
    send.write_all(&wire::encode(message)?).await?;
    Ok(())
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
pub struct Peer {
    endpoint: quinn::Endpoint,
    conn: Connection,
    creds: Arc<Credentials>,
    identity: String,
    repos: Vec<String>,
    /// Fingerprints of revoked certificates, as of the connection.
    revoked: BTreeSet<Sha256Digest>,
}

impl Peer {
    /// Connects to `addr` (`HOST:PORT`; HOST must be a name or address in
    /// the orchestrator's certificate), presents the client certificate and
    /// says `Hello`.
    pub async fn connect(addr: &str, creds: Arc<Credentials>) -> Result<Peer, PeerError> {
        let (host, _) = addr
            .rsplit_once(':')
            .ok_or_else(|| PeerError::Resolve(addr.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let remote: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .map_err(|_| PeerError::Resolve(addr.to_string()))?
            .next()
            .ok_or_else(|| PeerError::Resolve(addr.to_string()))?;
        let local: SocketAddr = if remote.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let mut endpoint = quinn::Endpoint::client(local).map_err(PeerError::Endpoint)?;
        endpoint.set_default_client_config(creds.client_config()?);
        let conn = endpoint.connect(remote, host)?.await?;
        Peer::hello(endpoint, conn, creds, PROTOCOL_VERSION).await
    }

    /// Says `Hello` with `version` on a fresh connection (tests use other
    /// versions to see them refused).
    pub async fn hello(
        endpoint: quinn::Endpoint,
        conn: Connection,
        creds: Arc<Credentials>,
        version: u32,
    ) -> Result<Peer, PeerError> {
        let answer = exchange(&conn, &Message::Hello { version }).await;
        match answer {
            Ok(Message::Welcome {
                identity,
                repos,
                revoked,
                ..
            }) => {
                debug!(%identity, revoked = revoked.len(), "connected to the orchestrator");
                Ok(Peer {
                    endpoint,
                    conn,
                    creds,
                    identity,
                    repos,
                    revoked: revoked.into_iter().collect(),
                })
            }
            Ok(other) => Err(unexpected(other)),
            // A refused connection shows as closed with the reason.
            Err(PeerError::Read(ReadError::Stream(quinn::ReadError::ConnectionLost(e)))) => {
                Err(PeerError::Connection(e))
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

    /// The underlying connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Sends one request on its own stream and reads the answer.
    pub async fn request(&self, message: &Message) -> Result<Message, PeerError> {
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
    pub async fn announce(&self, store: &Store) -> Result<(u32, u32), PeerError> {
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
    pub async fn announce_sealed(&self, results: Vec<Sealed>) -> Result<(u32, u32), PeerError> {
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
    pub async fn lookup(&self, key: &RunKey, namespace: &str) -> Result<Found, PeerError> {
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
    pub async fn assess(&self, result: Sealed) -> Result<(bool, String), PeerError> {
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
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(PeerError::from)?;
        let fetch = Message::Fetch {
            key: *key,
            namespace: namespace.to_string(),
        };
        write_message(&mut send, &fetch)
            .await
            .map_err(PeerError::from)?;
        let _ = send.finish();
        let sealed = match read_message(&mut recv).await.map_err(PeerError::from)? {
            Message::Transfer(t) => t,
            Message::NotFound => return Err(FetchError::NotFound),
            Message::Error { message, .. } => return Err(FetchError::Unavailable(message)),
            other => return Err(unexpected(other).into()),
        };
        let who = check_transfer(
            std::slice::from_ref(&self.creds.ca),
            &sealed,
            key,
            expected,
            &self.revoked,
            UnixTime::now(),
        )?;
        let stored = receive(&mut recv, *sealed, store).await?;
        info!(key = %key, producer = %who.name, "fetched a result from a peer");
        Ok((stored, who))
    }

    /// Serves `Serve` requests from `store` until the connection closes.
    pub async fn serve(&self, store: &Store) -> Result<(), PeerError> {
        loop {
            let (send, recv) = match self.conn.accept_bi().await {
                Ok(s) => s,
                Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let store = store.clone();
            let repos = self.repos.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(send, recv, &store, &repos).await {
                    warn!("serving a peer failed: {e}");
                }
            });
        }
    }

    /// Closes the connection, giving the close a moment to reach the
    /// orchestrator. Waiting for the endpoint to go fully idle would cost
    /// QUIC's draining period (three probe timeouts, ~80 ms even on
    /// loopback; measured by `peer_bench`), which nothing here needs: the
    /// close frame leaves at once.
    pub async fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(15),
            self.endpoint.wait_idle(),
        )
        .await;
    }
}

fn unexpected(m: Message) -> PeerError {
    match m {
        Message::Error { code, message } => PeerError::Refused { code, message },
        other => PeerError::Unexpected(
            serde_json::to_value(&other)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_default(),
        ),
    }
}

async fn exchange(conn: &Connection, message: &Message) -> Result<Message, PeerError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_message(&mut send, message).await?;
    let _ = send.finish();
    Ok(read_message(&mut recv).await?)
}

/// The files whose bytes follow a transfer header, in order.
pub fn transfer_files(store: &Store, stored: &StoredResult) -> Vec<PathBuf> {
    std::iter::once(stored.output_path())
        .chain(stored.manifest.artifacts.iter().map(|a| store.blob_path(a)))
        .collect()
}

/// Writes a transfer: its header, then each file as chunk frames.
pub async fn write_transfer(
    send: &mut SendStream,
    transfer: &Sealed,
    files: &[PathBuf],
) -> Result<(), ServeError> {
    use tokio::io::AsyncReadExt;
    write_message(send, &Message::Transfer(Box::new(transfer.clone()))).await?;
    let mut buf = vec![0u8; MAX_CHUNK.min(256 << 10)];
    for path in files {
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|source| ServeError::Io {
                path: path.clone(),
                source,
            })?;
        loop {
            let n = f.read(&mut buf).await.map_err(|source| ServeError::Io {
                path: path.clone(),
                source,
            })?;
            if n == 0 {
                break;
            }
            send.write_all(&wire::chunk_header(n))
                .await
                .map_err(WriteError::from)?;
            send.write_all(&buf[..n]).await.map_err(WriteError::from)?;
        }
    }
    Ok(())
}

/// Why serving a result to a peer failed.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("reading {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

async fn serve_one(
    mut send: SendStream,
    mut recv: RecvStream,
    store: &Store,
    repos: &[String],
) -> Result<(), ServeError> {
    let (key, namespace) = match read_message(&mut recv).await {
        Ok(Message::Serve { key, namespace }) => (key, namespace),
        Ok(_) => {
            let m = Message::error(ErrorCode::Unexpected, "expected serve");
            write_message(&mut send, &m).await?;
            let _ = send.finish();
            return Ok(());
        }
        Err(e) => {
            // A path-like key or digest does not even decode.
            let m = Message::error(ErrorCode::Malformed, e.to_string());
            let _ = write_message(&mut send, &m).await;
            let _ = send.finish();
            return Err(e.into());
        }
    };
    let granted = repos.contains(&namespace);
    let found = store
        .get(&key)
        .filter(|_| granted)
        .filter(|r| r.manifest.inputs.namespace == namespace)
        .filter(|r| crate::replay::verify(r).is_ok());
    let Some((stored, sealed)) = found.and_then(|r| r.sealed().map(|s| (r, s))) else {
        let m = Message::error(ErrorCode::NotFound, "the result is not held");
        write_message(&mut send, &m).await?;
        let _ = send.finish();
        return Ok(());
    };
    write_transfer(&mut send, &sealed, &transfer_files(store, &stored)).await?;
    let _ = send.finish();
    debug!(key = %key, "served a result");
    Ok(())
}

/// Checks a transfer header before any data is read: the producer's seal,
/// the manifest, the key, the inputs, the outcome, the record's size.
/// Returns who sealed it.
pub fn check_transfer(
    roots: &[CertificateDer<'_>],
    sealed: &Sealed,
    key: &RunKey,
    expected: &KeyInputs,
    revoked: &BTreeSet<Sha256Digest>,
    now: UnixTime,
) -> Result<SignedBy, FetchError> {
    let m = &sealed.manifest;
    let who = reprise_protocol::seal::verify(&sealed.seal, m, roots, now, revoked)?;
    m.check()?;
    if m.key != *key || expected.key() != *key {
        return Err(FetchError::WrongKey {
            asked: *key,
            got: m.key,
        });
    }
    if m.inputs != *expected {
        let diff = expected.diff(&m.inputs);
        let names: Vec<String> = diff.into_iter().map(|d| d.0).collect();
        return Err(FetchError::InputsDiffer(names.join(", ")));
    }
    if m.outcome != Outcome::Passed {
        return Err(FetchError::NotPassed);
    }
    if m.output_bytes > MAX_RECORD {
        return Err(FetchError::TooLarge {
            part: "output record".into(),
            found: m.output_bytes,
            max: MAX_RECORD,
        });
    }
    Ok(who)
}

/// Reads the data of a checked transfer into a staging folder, checking
/// every part's size and sha256, then commits it.
async fn receive(
    recv: &mut RecvStream,
    sealed: Sealed,
    store: &Store,
) -> Result<StoredResult, FetchError> {
    let m = &sealed.manifest;
    let stage = store.stage("fetch-")?;
    let mut record = Vec::with_capacity(m.output_bytes.min(1 << 20) as usize);
    receive_part(
        recv,
        "output record",
        m.output_bytes,
        &m.output_sha256,
        &mut record,
    )
    .await?;
    let arts = stage.path().join("artifacts");
    let beneath = Beneath::open(&arts)?;
    for a in &m.artifacts {
        let mut pending = beneath.create(&a.path, a.mode)?;
        let part = format!("artifact {}", a.path);
        receive_part(recv, &part, a.bytes, &a.sha256, &mut pending.file).await?;
        pending.file.sync_all().map_err(|source| FetchError::Io {
            path: pending.path().to_path_buf(),
            source,
        })?;
        pending.commit()?;
    }
    let mut extra = [0u8; 1];
    match recv.read(&mut extra).await {
        Ok(None) => {}
        Ok(Some(_)) => return Err(FetchError::TrailingData),
        Err(e) => {
            return Err(FetchError::Truncated {
                part: "end of the transfer".into(),
                source: Some(ReadError::Stream(e)),
            });
        }
    }
    Ok(store.commit_received(stage, sealed, &record, &arts)?)
}

async fn receive_part(
    recv: &mut RecvStream,
    part: &str,
    len: u64,
    sha256: &Sha256Digest,
    out: &mut dyn Write,
) -> Result<(), FetchError> {
    let truncated = |source: Option<ReadError>| FetchError::Truncated {
        part: part.to_string(),
        source,
    };
    let mut hasher = Sha256::new();
    let mut left = len;
    let mut buf = Vec::new();
    while left > 0 {
        let mut header = [0u8; wire::HEADER_LEN];
        read_exact(recv, &mut header, true)
            .await
            .map_err(|e| truncated(Some(e)))?;
        let n = wire::body_len(header, MAX_CHUNK).map_err(|e| truncated(Some(e.into())))?;
        if n as u64 > left || n == 0 {
            return Err(FetchError::BadChunk(n));
        }
        buf.resize(n, 0);
        read_exact(recv, &mut buf, true)
            .await
            .map_err(|e| truncated(Some(e)))?;
        hasher.update(&buf);
        out.write_all(&buf).map_err(|source| FetchError::Io {
            path: PathBuf::from(part),
            source,
        })?;
        left -= n as u64;
    }
    let found = Sha256Digest::finish(hasher);
    if found != *sha256 {
        return Err(FetchError::Digest {
            part: part.to_string(),
            expected: *sha256,
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and credentials it issued, made with rcgen.
    fn team() -> (CertificateDer<'static>, Credentials) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let pem = format!("{}{}{}", leaf.pem(), key.serialize_pem(), ca.pem());
        (ca.der().clone(), Credentials::from_pem(&pem).unwrap())
    }

    fn manifest() -> ResultManifest {
        let inputs = crate::store::tests::inputs("t");
        let mut m = crate::store::tests::manifest(inputs, Outcome::Passed, 1);
        m.output_bytes = 1;
        m.artifacts = vec![reprise_protocol::manifest::Artifact {
            path: "a/b.txt".parse().unwrap(),
            sha256: Sha256Digest::of(b"s"),
            bytes: 1,
            mode: 0o644,
        }];
        m
    }

    #[test]
    fn transfer_headers_are_checked_before_any_data() {
        let (ca, creds) = team();
        let roots = [ca];
        let expected = manifest().inputs;
        let key = expected.key();
        let none = BTreeSet::new();
        let check = |m: ResultManifest, revoked: &BTreeSet<Sha256Digest>| {
            let t = Sealed {
                seal: creds.seal(&m),
                manifest: m,
            };
            check_transfer(&roots, &t, &key, &expected, revoked, UnixTime::now())
        };
        check(manifest(), &none).expect("a good header passes");
        let dup = {
            let mut m = manifest();
            m.artifacts.push(m.artifacts[0].clone());
            m
        };
        let table: Vec<(&str, ResultManifest)> = vec![
            ("setuid", {
                let mut m = manifest();
                m.artifacts[0].mode = 0o4755;
                m
            }),
            ("the same file twice", dup),
            ("failed", {
                let mut m = manifest();
                m.outcome = Outcome::Failed;
                m
            }),
            ("huge record", {
                let mut m = manifest();
                m.output_bytes = MAX_RECORD + 1;
                m
            }),
            ("another key", {
                let mut m = manifest();
                m.inputs.tree = "other".into();
                m.key = m.inputs.key();
                m
            }),
            ("a key that is not its inputs'", {
                let mut m = manifest();
                m.key = Sha256Digest::of(b"k").hex().parse().unwrap();
                m
            }),
            ("networked where this checkout is not", {
                let mut m = manifest();
                m.inputs.network = true;
                m.key = m.inputs.key();
                m
            }),
        ];
        for (name, m) in table {
            assert!(check(m, &none).is_err(), "{name} was accepted");
        }
        // Revoked producer.
        let fingerprint = creds.identity().unwrap().fingerprint;
        assert!(matches!(
            check(manifest(), &BTreeSet::from([fingerprint])),
            Err(FetchError::Seal(SealError::Revoked { .. }))
        ));
        // Sealed over one manifest, sent with another.
        let mut t = Sealed {
            seal: creds.seal(&manifest()),
            manifest: manifest(),
        };
        t.manifest.artifacts[0].sha256 = Sha256Digest::of(b"forged");
        assert!(matches!(
            check_transfer(&roots, &t, &key, &expected, &none, UnixTime::now()),
            Err(FetchError::Seal(SealError::Signature))
        ));
        // A producer from another CA.
        let (other_ca, _) = team();
        t.manifest = manifest();
        assert!(matches!(
            check_transfer(&[other_ca], &t, &key, &expected, &none, UnixTime::now()),
            Err(FetchError::Seal(SealError::Certificate(_)))
        ));
    }

    #[test]
    fn base64() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
