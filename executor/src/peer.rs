//! The executor's side of the orchestrator protocol: credentials, the
//! connection, announcing held results, looking up and fetching a result
//! from a peer (verified in full before anything is committed), and serving
//! the local store to peers (each result signed with the certificate's key).
//!
//! What a fetch checks before it commits: the producer's certificate chains
//! to the team CA and may authenticate clients; its signature over the
//! manifest's canonical encoding ([`reprise_protocol::sign`]); the manifest
//! is for the key asked and its inputs are the ones this checkout computed;
//! the result passed; every artifact path stays inside the artifacts folder;
//! the output record's and every artifact's sha256 and size while they
//! stream; nothing follows the last artifact. Everything is staged in the
//! store's `tmp/` and committed with [`Store::commit`] only at the end, so a
//! failure anywhere leaves the store as it was.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream};
use reprise_protocol::key::KeyInputs;
use reprise_protocol::manifest::{MANIFEST_VERSION, Outcome, ResultManifest};
use reprise_protocol::wire::{
    self, ErrorCode, FrameError, Held, MAX_CHUNK, Message, PROTOCOL_VERSION, Transfer,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::store::{Store, StoreError, StoredResult};

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
    #[error("the producer's certificate is not from the team CA (or expired)")]
    ProducerCert(#[source] webpki::Error),
    #[error("the producer's certificate is not valid PEM")]
    ProducerCertPem,
    #[error("the result's signature does not verify under the producer's certificate")]
    BadSignature,
    #[error("the producer sent a result for key {got}, not {asked}")]
    WrongKey { asked: String, got: String },
    #[error("the result's inputs differ from this checkout's ({0})")]
    InputsDiffer(String),
    #[error("the producer sent a result that did not pass, or of an unknown manifest version")]
    NotPassed,
    #[error("the result names an unsafe artifact path or mode: {0:?}")]
    UnsafeArtifact(String),
    #[error("the {part} of the result is {found} bytes or more, over the limit of {max}")]
    TooLarge { part: String, found: u64, max: u64 },
    #[error("the {part} does not match its manifest (sha256 {found}, expected {expected})")]
    Digest {
        part: String,
        expected: String,
        found: String,
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

    /// Signs a manifest's canonical encoding; the signature as hex.
    pub fn sign(&self, manifest: &ResultManifest) -> String {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.key_pkcs8, &rng)
            .expect("checked when loaded");
        let sig = key
            .sign(&rng, &reprise_protocol::sign::signing_bytes(manifest))
            .expect("ECDSA signing");
        reprise_protocol::hex::encode(sig.as_ref())
    }

    /// The client certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
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

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where the orchestrator is and which credentials to present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `HOST:PORT`.
    pub orchestrator: String,
    pub credentials: PathBuf,
}

impl Settings {
    /// `REPRISE_ORCHESTRATOR` and `REPRISE_CREDENTIALS` from the environment,
    /// else from the `.env` file at `repo_root` (a relative credentials path
    /// there is taken from the repository root). `None` when either is unset
    /// (peer replay is off).
    pub fn from_env(repo_root: Option<&Path>) -> Option<Settings> {
        let dotenv = repo_root
            .and_then(|root| std::fs::read_to_string(root.join(".env")).ok())
            .map(|t| parse_dotenv(&t))
            .unwrap_or_default();
        let get = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (v, false))
                .or_else(|| dotenv.get(name).cloned().map(|v| (v, true)))
        };
        let (orchestrator, _) = get("REPRISE_ORCHESTRATOR")?;
        let (creds, from_file) = get("REPRISE_CREDENTIALS")?;
        let mut credentials = PathBuf::from(creds);
        if let Some(root) = repo_root.filter(|_| from_file && credentials.is_relative()) {
            credentials = root.join(credentials);
        }
        Some(Settings {
            orchestrator,
            credentials,
        })
    }
}

/// `NAME=VALUE` lines (`export ` allowed, `#` comments, values optionally in
/// single or double quotes).
pub fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        out.insert(name.trim().to_string(), value.to_string());
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

/// A producer the orchestrator offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub producer: String,
}

/// A connection to the orchestrator.
#[derive(Debug)]
pub struct Peer {
    endpoint: quinn::Endpoint,
    conn: Connection,
    creds: Arc<Credentials>,
    identity: String,
    repos: Vec<String>,
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
                identity, repos, ..
            }) => {
                debug!(%identity, "connected to the orchestrator");
                Ok(Peer {
                    endpoint,
                    conn,
                    creds,
                    identity,
                    repos,
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

    /// Announces every passed result of `store`; returns how many the
    /// orchestrator indexed.
    pub async fn announce(&self, store: &Store) -> Result<u32, PeerError> {
        let results = store
            .list()
            .into_iter()
            .map(|r| Held {
                key: r.manifest.key,
                namespace: r.manifest.inputs.namespace,
            })
            .collect();
        match self.request(&Message::Announce { results }).await? {
            Message::Announced { accepted } => Ok(accepted),
            other => Err(unexpected(other)),
        }
    }

    /// Asks whether a trusted peer holds `key`.
    pub async fn lookup(&self, key: &str, namespace: &str) -> Result<Option<Offer>, PeerError> {
        let m = Message::Lookup {
            key: key.to_string(),
            namespace: namespace.to_string(),
        };
        match self.request(&m).await? {
            Message::Offer { producer } => Ok(Some(Offer { producer })),
            Message::NotFound => Ok(None),
            other => Err(unexpected(other)),
        }
    }

    /// Fetches `key` through the orchestrator, checks everything (see the
    /// module's doc) against `expected` (the inputs this checkout computed)
    /// and commits it to `store`.
    pub async fn fetch_into(
        &self,
        key: &str,
        namespace: &str,
        expected: &KeyInputs,
        store: &Store,
    ) -> Result<StoredResult, FetchError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(PeerError::from)?;
        let fetch = Message::Fetch {
            key: key.to_string(),
            namespace: namespace.to_string(),
        };
        write_message(&mut send, &fetch)
            .await
            .map_err(PeerError::from)?;
        let _ = send.finish();
        let transfer = match read_message(&mut recv).await.map_err(PeerError::from)? {
            Message::Transfer(t) => t,
            Message::NotFound => return Err(FetchError::NotFound),
            Message::Error { message, .. } => return Err(FetchError::Unavailable(message)),
            other => return Err(unexpected(other).into()),
        };
        check_transfer(&self.creds.ca, &transfer, key, expected)?;
        let stored = receive(&mut recv, &transfer, store).await?;
        info!(key, producer = ?transfer.manifest.producer, "fetched a result from a peer");
        Ok(stored)
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
            let creds = self.creds.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_one(send, recv, &store, &creds).await {
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

/// The signed transfer header for a stored result.
pub fn signed_transfer(stored: &StoredResult, creds: &Credentials) -> Transfer {
    Transfer {
        signature: creds.sign(&stored.manifest),
        manifest: stored.manifest.clone(),
        producer_cert_pem: creds.cert_pem().to_string(),
    }
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
    transfer: &Transfer,
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
    creds: &Credentials,
) -> Result<(), ServeError> {
    let (key, namespace) = match read_message(&mut recv).await? {
        Message::Serve { key, namespace } => (key, namespace),
        _ => {
            let m = Message::error(ErrorCode::Unexpected, "expected serve");
            write_message(&mut send, &m).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let found = store
        .get(&key)
        .filter(|r| r.manifest.inputs.namespace == namespace)
        .filter(|r| crate::replay::verify(r).is_ok());
    let Some(stored) = found else {
        let m = Message::error(ErrorCode::NotFound, "the result is no longer held");
        write_message(&mut send, &m).await?;
        let _ = send.finish();
        return Ok(());
    };
    let transfer = signed_transfer(&stored, creds);
    write_transfer(&mut send, &transfer, &transfer_files(store, &stored)).await?;
    let _ = send.finish();
    debug!(key, "served a result");
    Ok(())
}

/// Checks a transfer header before any data is read: the producer's
/// certificate, its signature, the key, the inputs, the outcome, the
/// artifact paths.
pub fn check_transfer(
    ca: &CertificateDer<'_>,
    transfer: &Transfer,
    key: &str,
    expected: &KeyInputs,
) -> Result<(), FetchError> {
    let m = &transfer.manifest;
    let cert = CertificateDer::from_pem_slice(transfer.producer_cert_pem.as_bytes())
        .map_err(|_| FetchError::ProducerCertPem)?;
    let ee = webpki::EndEntityCert::try_from(&cert).map_err(FetchError::ProducerCert)?;
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(FetchError::ProducerCert)?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(FetchError::ProducerCert)?;
    let sig = hex_decode(&transfer.signature).ok_or(FetchError::BadSignature)?;
    ee.verify_signature(
        webpki::ring::ECDSA_P256_SHA256,
        &reprise_protocol::sign::signing_bytes(m),
        &sig,
    )
    .map_err(|_| FetchError::BadSignature)?;
    if m.key != key || expected.key() != key {
        return Err(FetchError::WrongKey {
            asked: key.to_string(),
            got: m.key.clone(),
        });
    }
    if m.inputs != *expected {
        let diff = expected.diff(&m.inputs);
        let names: Vec<String> = diff.into_iter().map(|d| d.0).collect();
        return Err(FetchError::InputsDiffer(names.join(", ")));
    }
    if m.inputs.key() != m.key {
        return Err(FetchError::WrongKey {
            asked: key.to_string(),
            got: m.inputs.key(),
        });
    }
    if m.outcome != Outcome::Passed || m.version != MANIFEST_VERSION {
        return Err(FetchError::NotPassed);
    }
    if m.output_bytes > MAX_RECORD {
        return Err(FetchError::TooLarge {
            part: "output record".into(),
            found: m.output_bytes,
            max: MAX_RECORD,
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for a in &m.artifacts {
        let safe = !a.path.is_empty()
            && Path::new(&a.path)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
            && seen.insert(Path::new(&a.path).components().collect::<PathBuf>())
            && a.mode & !0o777 == 0;
        if !safe {
            return Err(FetchError::UnsafeArtifact(a.path.clone()));
        }
    }
    Ok(())
}

/// Reads the data of a checked transfer into a staging folder, checking
/// every part's size and sha256, then commits it.
async fn receive(
    recv: &mut RecvStream,
    transfer: &Transfer,
    store: &Store,
) -> Result<StoredResult, FetchError> {
    let m = &transfer.manifest;
    let tmp = store.root().join("tmp");
    let stage_io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    std::fs::create_dir_all(&tmp).map_err(stage_io(&tmp))?;
    let stage = tempfile::Builder::new()
        .prefix("fetch-")
        .tempdir_in(&tmp)
        .map_err(stage_io(&tmp))?;
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
    for a in &m.artifacts {
        let path = arts.join(&a.path);
        let parent = path.parent().expect("under the artifacts folder");
        std::fs::create_dir_all(parent).map_err(stage_io(parent))?;
        let mut f = std::fs::File::create(&path).map_err(stage_io(&path))?;
        let part = format!("artifact {}", a.path);
        receive_part(recv, &part, a.bytes, &a.sha256, &mut f).await?;
        f.sync_all().map_err(stage_io(&path))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(a.mode))
            .map_err(stage_io(&path))?;
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
    let dir = (!m.artifacts.is_empty()).then_some(arts.as_path());
    Ok(store.commit(m.clone(), &record, dir)?)
}

async fn receive_part(
    recv: &mut RecvStream,
    part: &str,
    len: u64,
    sha256: &str,
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
    let found = reprise_protocol::hex::encode(&hasher.finalize());
    if found != sha256 {
        return Err(FetchError::Digest {
            part: part.to_string(),
            expected: sha256.to_string(),
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
        let inputs = KeyInputs {
            version: 1,
            namespace: "ns".into(),
            tree: "t".into(),
            target: "test".into(),
            env: Default::default(),
            image_digest: "i".into(),
            driver: "qemu".into(),
        };
        ResultManifest {
            version: MANIFEST_VERSION,
            key: inputs.key(),
            inputs,
            commit: "c".into(),
            outcome: Outcome::Passed,
            exit_code: 0,
            phases: vec![],
            total_ms: 1,
            accel: "kvm".into(),
            tool_version: "0".into(),
            producer: reprise_protocol::manifest::Producer {
                host: "h".into(),
                user: "u".into(),
            },
            created_at: 1,
            output_sha256: "o".into(),
            output_bytes: 1,
            artifacts: vec![reprise_protocol::manifest::Artifact {
                path: "a/b.txt".into(),
                sha256: "s".into(),
                bytes: 1,
                mode: 0o644,
            }],
        }
    }

    #[test]
    fn transfer_headers_are_checked_before_any_data() {
        let (ca, creds) = team();
        let expected = manifest().inputs;
        let key = expected.key();
        let check = |m: ResultManifest| {
            let t = Transfer {
                signature: creds.sign(&m),
                manifest: m,
                producer_cert_pem: creds.cert_pem().to_string(),
            };
            check_transfer(&ca, &t, &key, &expected)
        };
        check(manifest()).expect("a good header passes");
        let art = |path: &str, mode: u32| {
            let mut m = manifest();
            m.artifacts[0].path = path.into();
            m.artifacts[0].mode = mode;
            m
        };
        let dup = {
            let mut m = manifest();
            let mut again = m.artifacts[0].clone();
            again.path = "a/./b.txt".into();
            m.artifacts.push(again);
            m
        };
        let table: Vec<(&str, ResultManifest)> = vec![
            ("parent dir", art("../x", 0o644)),
            ("absolute", art("/etc/passwd", 0o644)),
            ("climbs out", art("a/../../b", 0o644)),
            ("empty", art("", 0o644)),
            ("setuid", art("a/b", 0o4755)),
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
                m.key = "0".repeat(64);
                m
            }),
        ];
        for (name, m) in table {
            assert!(check(m).is_err(), "{name} was accepted");
        }
        // Signed over one manifest, sent with another.
        let mut t = Transfer {
            signature: creds.sign(&manifest()),
            manifest: manifest(),
            producer_cert_pem: creds.cert_pem().to_string(),
        };
        t.manifest.artifacts[0].sha256 = "forged".into();
        assert!(matches!(
            check_transfer(&ca, &t, &key, &expected),
            Err(FetchError::BadSignature)
        ));
        // A producer from another CA.
        let (other_ca, _) = team();
        t.manifest = manifest();
        assert!(matches!(
            check_transfer(&other_ca, &t, &key, &expected),
            Err(FetchError::ProducerCert(_))
        ));
    }

    #[test]
    fn dotenv_lines() {
        let env = parse_dotenv(
            "# comment\nREPRISE_ORCHESTRATOR=127.0.0.1:4433\nexport REPRISE_CREDENTIALS=\"creds.pem\"\n\nBAD LINE\nQ='x=y'\n",
        );
        assert_eq!(env["REPRISE_ORCHESTRATOR"], "127.0.0.1:4433");
        assert_eq!(env["REPRISE_CREDENTIALS"], "creds.pem");
        assert_eq!(env["Q"], "x=y");
        assert_eq!(env.len(), 3);
    }

    #[test]
    fn hex_and_base64() {
        assert_eq!(hex_decode("00ab"), Some(vec![0, 0xab]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
