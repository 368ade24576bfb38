//! The orchestrator protocol: messages between executors and the
//! orchestrator, their framing, and the records the orchestrator persists.
//!
//! Every message is a frame: a big-endian u32 length and a JSON body of at
//! most [`MAX_FRAME`] bytes. A result's data follows its `Transfer` header
//! as binary chunk frames: each part (first the output record, then every
//! artifact in the manifest's order, the sizes given by the manifest) is
//! cut into chunks of [`CHUNK_BYTES`] (the last one shorter), and each
//! chunk travels as one frame (a big-endian u32 length, the chunk's sha256
//! as its holder computed it, its bytes). A receiver trusts only each
//! part's sha256 in the signed manifest, checked over every byte; a chunk
//! whose length is not its place's ends the transfer. A transfer may start
//! each part at a chunk other than the first ([`Resume`]): the rest of a
//! transfer that was cut. Every connection
//! starts with [`Message::Hello`]; the ALPN is [`ALPN`].
//!
//! The direct path: an executor that listens for peers says so
//! ([`Message::Listen`]); an asker may then ask to be introduced to the
//! holder of a result ([`Message::Introduce`]). The orchestrator decides
//! as for a fetch, hands the holder a single-use ticket bound to the
//! asker's certificate and the key ([`Message::Expect`]), and the asker
//! the holder's address, the sha256 of the certificate its listener
//! presents, and who must have sealed the result. The asker then fetches
//! over its own QUIC connection to the holder (ALPN [`DIRECT_ALPN`], both
//! ends presenting their certificates) with [`Message::Redeem`], and the
//! transfer is the relayed one's, checked the same way. Nothing here does
//! IO: the readers and writers live in the orchestrator and the executor.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::{RunKey, Sha256Digest};
use crate::manifest::{Outcome, ResultManifest};
use crate::seal::Seal;

/// The ALPN protocol id of the orchestrator protocol.
pub const ALPN: &[u8] = b"reprise/1";

/// The ALPN protocol id of a direct connection between two executors.
pub const DIRECT_ALPN: &[u8] = b"reprise-direct/1";

/// The protocol version this build speaks. Version 2: results travel
/// sealed by their producer, keys and digests are typed. Version 3: a
/// transfer's chunks carry their sha256, and a cut transfer resumes.
pub const PROTOCOL_VERSION: u32 = 3;

/// Every protocol version this build accepts in a `Hello`.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// Largest body of a control message frame.
pub const MAX_FRAME: usize = 1 << 20;

/// The bytes of a transfer's chunk: every part is cut at multiples of it.
pub const CHUNK_BYTES: u64 = 1 << 20;

/// Length of the sha256 that starts a data chunk frame's body.
pub const CHUNK_SHA_LEN: usize = 32;

/// Largest body of a data chunk frame: a chunk's sha256 and its bytes.
pub const MAX_CHUNK: usize = CHUNK_SHA_LEN + CHUNK_BYTES as usize;

/// How many chunks a part of `bytes` bytes is cut into.
pub fn chunk_count(bytes: u64) -> u64 {
    bytes.div_ceil(CHUNK_BYTES)
}

/// The length of chunk `index` of a part of `bytes` bytes (0 past its end).
pub fn chunk_len(bytes: u64, index: u64) -> u64 {
    bytes
        .saturating_sub(index.saturating_mul(CHUNK_BYTES))
        .min(CHUNK_BYTES)
}

/// Where a fetch would have a transfer start: the rest of one that was
/// cut. `manifest` is the [`Sealed::digest`] of the result whose chunks
/// the asker holds (only that very result resumes); `from` the chunk each
/// part would start at, one per part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub manifest: Sha256Digest,
    pub from: Vec<u64>,
}

/// Length of a frame header.
pub const HEADER_LEN: usize = 4;

/// A secret carried by a message (a CI job's ID token): its `Debug` never
/// shows it, so it reaches no log or error text.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret([{} bytes])", self.0.len())
    }
}

/// What a `Login`'s proof signs: a fixed context and the sha256 of the
/// token, so a proof made for one token proves nothing for another.
pub fn login_proof_bytes(token: &str) -> Vec<u8> {
    use sha2::Digest as _;
    let mut out = b"reprise login proof v1\0".to_vec();
    out.extend_from_slice(&sha2::Sha256::digest(token.as_bytes()));
    out
}

/// What a `PersonLogin`'s proof signs: a fixed context, the forge and the
/// public key, so the asker shows it holds the key the certificate will
/// name (the exchange itself is inside TLS).
pub fn person_login_proof_bytes(provider: &str, public_key: &str) -> Vec<u8> {
    let mut out = b"reprise person login proof v1\0".to_vec();
    out.extend_from_slice(provider.as_bytes());
    out.push(0);
    out.extend_from_slice(public_key.as_bytes());
    out
}

/// What a `Renew`'s proof signs: a fixed context, the sha256 of the
/// certificate the connection presents, and the new public key, so a
/// proof made for one renewal proves nothing for another.
pub fn renew_proof_bytes(current: &Sha256Digest, public_key: &str) -> Vec<u8> {
    let mut out = b"reprise renew proof v1\0".to_vec();
    out.extend_from_slice(current.hex().as_bytes());
    out.push(0);
    out.extend_from_slice(public_key.as_bytes());
    out
}

/// A result asked for: its key and repository namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Held {
    pub key: RunKey,
    pub namespace: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The `Hello` named a version this side does not speak.
    UnsupportedVersion,
    /// The first message of a connection was not `Hello`.
    HelloFirst,
    /// A message type this side does not know.
    UnknownMessage,
    /// A frame longer than the limit.
    FrameTooLarge,
    /// A frame that does not decode.
    Malformed,
    /// A known message where it makes no sense.
    Unexpected,
    /// The producer of a result is gone or could not serve it.
    Unavailable,
    /// The result is not (or no longer) held.
    NotFound,
    /// A limit of the service was reached (open requests, connections or
    /// announced results of an identity, a transfer's size); the message
    /// names it.
    Limit,
    /// The request did not arrive in time.
    TimedOut,
    /// A code from a newer peer.
    #[serde(other)]
    Other,
}

/// A result as its producer sealed it: announced in full (so the
/// orchestrator decides on signed facts, not on claims) and sent as the
/// header of a transfer, the output record and the artifacts following as
/// chunk frames, sized by the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub manifest: ResultManifest,
    pub seal: Seal,
}

impl Sealed {
    /// The data that follows a transfer header, in order: (what, bytes,
    /// sha256).
    pub fn parts(&self) -> Vec<(String, u64, Sha256Digest)> {
        let m = &self.manifest;
        let mut parts = vec![("output record".to_string(), m.output_bytes, m.output_sha256)];
        for a in &m.artifacts {
            parts.push((format!("artifact {}", a.path), a.bytes, a.sha256));
        }
        parts
    }

    pub fn held(&self) -> Held {
        Held {
            key: self.manifest.key,
            namespace: self.manifest.inputs.namespace.clone(),
        }
    }

    pub fn passed(&self) -> bool {
        self.manifest.outcome == Outcome::Passed
    }

    /// The sha256 of the manifest's signed encoding: names this very
    /// result (a partial transfer is kept under it).
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(&crate::sign::signing_bytes(&self.manifest))
    }

    /// Whether `from` names a starting chunk for every part, none past the
    /// part's end (a part wholly held starts at its chunk count).
    pub fn fits(&self, from: &[u64]) -> bool {
        let parts = self.parts();
        from.len() == parts.len()
            && parts
                .iter()
                .zip(from)
                .all(|((_, bytes, _), f)| *f <= chunk_count(*bytes))
    }

    /// The bytes a transfer starting at `from` carries (of the parts'
    /// data, without frame headers and chunk sha256s).
    pub fn bytes_from(&self, from: &[u64]) -> u64 {
        self.parts()
            .iter()
            .zip(from.iter().copied().chain(std::iter::repeat(0)))
            .map(|((_, bytes, _), f)| bytes.saturating_sub(f.saturating_mul(CHUNK_BYTES)))
            .fold(0u64, u64::saturating_add)
    }
}

/// Where the holder of a result listens (`addr`), the sha256 of the
/// certificate its listener must present (`holder`), who must have sealed
/// the result (`producer`, a certificate's sha256) and its outputs'
/// digest, as announced; `ticket` lets the asker's certificate fetch the
/// key once, soon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Introduction {
    pub addr: String,
    pub holder: Sha256Digest,
    pub producer: Sha256Digest,
    pub outputs: Sha256Digest,
    pub ticket: Secret,
}

/// A message of the orchestrator protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// First message of every connection, executor to orchestrator.
    Hello {
        version: u32,
    },
    /// The answer to `Hello`: who the orchestrator takes the executor for,
    /// and the fingerprints of every revoked certificate (a result sealed
    /// by one of them never counts).
    Welcome {
        identity: String,
        repos: Vec<String>,
        trusted: bool,
        revoked: Vec<Sha256Digest>,
        /// The granted namespaces in which this identity's results count
        /// for CI under the repository's policy (absent from orchestrators
        /// that predate it: then `trusted` says it for every one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Vec<String>>,
    },
    /// Results the executor holds, sealed by their producers: passed ones
    /// it will serve, failed ones so that a disagreement shows.
    Announce {
        results: Vec<Sealed>,
    },
    /// The answer to `Announce`: how many were indexed; the others were
    /// refused (a repository the executor was not granted, a seal that does
    /// not verify).
    Announced {
        accepted: u32,
        refused: u32,
    },
    /// Is there a result for this key that counts for CI?
    Lookup {
        key: RunKey,
        namespace: String,
    },
    /// A result that counts is held by a connected executor; `producer`
    /// sealed it, and `counts` says why it counts under the repository's
    /// policy.
    Offer {
        producer: String,
        counts: String,
    },
    /// Trusted producers disagree on this key (outcome or artifacts);
    /// neither counts until one is revoked or the policy prefers one.
    Conflict {
        producers: Vec<String>,
    },
    /// Would this result count for CI?
    Assess {
        result: Box<Sealed>,
    },
    /// The answer to `Assess`.
    Assessed {
        counts: bool,
        reason: String,
    },
    /// No result the asker may read: the same answer whether a result
    /// exists in a repository the asker may not read or not at all.
    NotFound,
    /// Send me the result (answered with a `Transfer` and chunks); with
    /// `resume`, only the rest of it if the result served is that one.
    Fetch {
        key: RunKey,
        namespace: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
    },
    /// Orchestrator to the executor holding it, on a stream it opens: send
    /// this result (from `resume`, as the asker's `Fetch` said).
    Serve {
        key: RunKey,
        namespace: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Resume>,
    },
    /// A result's header; chunk frames follow, each part's from the chunk
    /// `from` names (one per part; all 0 for the whole result).
    Transfer {
        result: Box<Sealed>,
        from: Vec<u64>,
    },
    /// The first and only request of a connection that presents no client
    /// certificate: a CI job exchanges its OIDC ID token for a short-lived
    /// client certificate of `public_key`, an uncompressed P-256 point
    /// (hex). `proof` (hex, ECDSA P-256 SHA-256, ASN.1) signs
    /// [`login_proof_bytes`] of the token with that key: the asker holds
    /// the key the certificate will name.
    Login {
        version: u32,
        token: Secret,
        public_key: String,
        proof: String,
    },
    /// The answer to `Login`, `PersonLogin` and `Renew`: the certificate
    /// (PEM, chained to the team CA the connection was made to) and what it
    /// grants until it expires (seconds since the Unix epoch); `counts`, as
    /// in `Welcome`.
    LoggedIn {
        certificate: String,
        identity: String,
        repos: Vec<String>,
        trusted: bool,
        expires_at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        counts: Option<Vec<String>>,
    },
    /// The first and only request of a connection without a client
    /// certificate, from a person: log in through `provider` (`github`,
    /// `gitlab`) with the OAuth device flow, for a certificate of
    /// `public_key` (uncompressed P-256, hex); `proof` signs
    /// [`person_login_proof_bytes`] with that key. Answered on the same
    /// stream with `LoginCode` at once, then `LoggedIn` or an `Error` once
    /// the person approved, denied, or let the code expire.
    PersonLogin {
        version: u32,
        provider: String,
        public_key: String,
        proof: String,
    },
    /// What the person does on the forge: open `verification_uri` and
    /// enter `user_code` within `expires_in` seconds.
    LoginCode {
        user_code: String,
        verification_uri: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verification_uri_complete: Option<String>,
        expires_in: u64,
    },
    /// On an authenticated connection of a person: a new certificate for
    /// `public_key` with the grants the forge gives now (the orchestrator
    /// asks it again with the token it kept). `proof` signs
    /// [`renew_proof_bytes`] with the new key. Answered with `LoggedIn`
    /// or an `Error`.
    Renew {
        public_key: String,
        proof: String,
    },
    /// Executor to orchestrator, after `Welcome`: peers may fetch this
    /// executor's results straight from it, over QUIC on UDP `port`, from
    /// `ip` when given, otherwise from the address the orchestrator sees
    /// this connection come from. Its listener presents the certificate
    /// whose sha256 is `cert`. Answered with `Listening`.
    Listen {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<std::net::IpAddr>,
        cert: Sha256Digest,
    },
    /// The answer to `Listen`: the address peers are sent to.
    Listening {
        addr: String,
    },
    /// Executor to orchestrator: introduce me to the executor holding a
    /// result that counts for this key, so I fetch it straight from it.
    /// Answered with `Introduction`, `NotFound`, or an `Error` when the
    /// holder takes no direct fetches (then `Fetch` goes through the
    /// relay).
    Introduce {
        key: RunKey,
        namespace: String,
    },
    /// The answer to `Introduce`.
    Introduction(Box<Introduction>),
    /// Orchestrator to the holder, on a stream it opens: the asker whose
    /// certificate's sha256 is `asker` may fetch `key` once with `ticket`.
    /// Answered with `Expecting` at once and, on the same stream, with
    /// `Served` once the transfer left whole.
    Expect {
        ticket: Secret,
        key: RunKey,
        namespace: String,
        asker: Sha256Digest,
    },
    /// The holder keeps the ticket.
    Expecting,
    /// Asker to holder, on a direct connection: the fetch a ticket
    /// allows, answered as `Serve` is (a `Transfer` and chunks).
    Redeem {
        ticket: Secret,
        key: RunKey,
        namespace: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<Box<Resume>>,
    },
    /// Holder to orchestrator, on the `Expect` stream: the transfer the
    /// ticket allowed left whole, `bytes` of parts' data.
    Served {
        bytes: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// The `type` tags of every message this build knows.
const KNOWN: &[&str] = &[
    "hello",
    "welcome",
    "announce",
    "announced",
    "lookup",
    "offer",
    "conflict",
    "assess",
    "assessed",
    "not-found",
    "fetch",
    "serve",
    "transfer",
    "login",
    "logged-in",
    "person-login",
    "login-code",
    "renew",
    "listen",
    "listening",
    "introduce",
    "introduction",
    "expect",
    "expecting",
    "redeem",
    "served",
    "error",
];

impl Message {
    /// A refusal.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error {
            code,
            message: message.into(),
        }
    }

    /// The answer to a `Hello` with `version`: `None` when it is spoken,
    /// otherwise the error to send back.
    pub fn check_version(version: u32) -> Option<Message> {
        (!SUPPORTED_VERSIONS.contains(&version)).then(|| {
            Message::error(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {version} is not supported; this orchestrator speaks {:?}",
                    SUPPORTED_VERSIONS
                ),
            )
        })
    }
}

/// What is wrong with a frame.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown message type {0:?}")]
    UnknownMessage(String),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Encodes a message as one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(message).expect("messages serialise");
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The body length announced by a frame header, refused over `max` (so a
/// reader never allocates or waits for an oversized body).
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a control message body.
pub fn decode(body: &[u8]) -> Result<Message, FrameError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    match value.get("type").and_then(|t| t.as_str()) {
        Some(tag) if !KNOWN.contains(&tag) => {
            return Err(FrameError::UnknownMessage(tag.to_string()));
        }
        _ => {}
    }
    serde_json::from_value(value).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes the first frame of `buf`: the message and the bytes it took, or
/// `None` when `buf` holds only part of a frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = body_len(header.try_into().expect("4 bytes"), MAX_FRAME)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode(body)?, HEADER_LEN + len)))
}

/// The header of a data chunk frame carrying a chunk of `len` bytes (at
/// most [`CHUNK_BYTES`]) after its sha256.
pub fn chunk_header(len: usize) -> [u8; HEADER_LEN] {
    assert!(
        len as u64 <= CHUNK_BYTES,
        "chunk of {len} bytes over the limit"
    );
    ((CHUNK_SHA_LEN + len) as u32).to_be_bytes()
}

/// Version of the records of the orchestrator's state log (the JSON-lines
/// log of configs before version 2, imported into the database on first
/// start; the same events are what the state records).
pub const STATE_VERSION: u32 = 1;

/// Version of `config.json`. Version 2 names a SQLite database; version 1
/// named only a JSON-lines state log.
pub const CONFIG_VERSION: u32 = 2;

/// One event of the orchestrator's state: a line of the JSON-lines state
/// log of version 1 configs, and what the database records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum StateEvent {
    /// A client certificate was issued to `name`; it is known by the
    /// sha256 of its DER encoding. Re-issuing replaces the grants.
    Issued {
        name: String,
        cert_sha256: Sha256Digest,
        repos: Vec<String>,
        trusted: bool,
        at: u64,
        /// When the certificate expires (absent in logs written before
        /// this was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_after: Option<u64>,
        /// A person's access on the forge to each granted repository, as
        /// the forge said at login (empty for other identities).
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        access: std::collections::BTreeMap<String, crate::policy::ForgeAccess>,
    },
    /// Every certificate of `name` is refused from now on.
    Revoked { name: String, at: u64 },
    /// `asker` was sent `key` of `namespace`, sealed by `producer` and
    /// relayed from `relayer`'s connection.
    Replayed {
        asker: String,
        producer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relayer: Option<String>,
        key: RunKey,
        namespace: String,
        at: u64,
        /// The producer's recorded run time (the sealed manifest's
        /// `total_ms`): what the replay spared the asker. Absent in
        /// records made before it was kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_ms: Option<u64>,
        /// How long the relay took, from the fetch to the last byte.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay_ms: Option<u64>,
        /// Bytes relayed: the output record and the artifacts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
    },
    /// Trusted producers announced different outcomes or artifacts for
    /// `key`: both are kept, neither is offered.
    Conflict {
        key: RunKey,
        namespace: String,
        producers: Vec<String>,
        at: u64,
    },
}

/// A line of the state log: the event and the log's version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub version: u32,
    #[serde(flatten)]
    pub event: StateEvent,
}

/// The orchestrator's config file (`config.json` in its folder). File
/// names are relative to the folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrchestratorConfig {
    /// [`CONFIG_VERSION`], or 1 for a folder made before the database.
    pub version: u32,
    /// The CA that client certificates must chain to (PEM file); an
    /// externally managed CA may be put here instead.
    pub client_ca: String,
    /// The CA's key, when this orchestrator issues certificates itself.
    pub ca_key: Option<String>,
    pub server_cert: String,
    pub server_key: String,
    /// The SQLite database of identities, grants, revocations and the
    /// audit log (version 2 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// The JSON-lines state log of version 1, imported into the database
    /// (and renamed aside) on first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_log: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let frame = encode(&m).unwrap();
        let (back, used) = decode_frame(&frame).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(used, frame.len());
    }

    fn sealed() -> Sealed {
        Sealed {
            manifest: crate::manifest::tests::manifest(),
            seal: Seal {
                version: crate::seal::SEAL_VERSION,
                signature: "3045".into(),
                producer_cert: "pem".into(),
            },
        }
    }

    #[test]
    fn every_message_round_trips() {
        let key = sealed().manifest.key;
        let table = vec![
            Message::Hello { version: 1 },
            Message::Welcome {
                identity: "ci".into(),
                repos: vec!["a/b".into()],
                trusted: true,
                revoked: vec![Sha256Digest::of(b"cert")],
                counts: Some(vec!["a/b".into()]),
            },
            Message::Announce {
                results: vec![sealed()],
            },
            Message::Announced {
                accepted: 1,
                refused: 2,
            },
            Message::Lookup {
                key,
                namespace: "n".into(),
            },
            Message::Offer {
                producer: "ci".into(),
                counts: "trusted".into(),
            },
            Message::Conflict {
                producers: vec!["a".into(), "b".into()],
            },
            Message::Assess {
                result: Box::new(sealed()),
            },
            Message::Assessed {
                counts: false,
                reason: "why".into(),
            },
            Message::NotFound,
            Message::Fetch {
                key,
                namespace: "n".into(),
                resume: None,
            },
            Message::Serve {
                key,
                namespace: "n".into(),
                resume: Some(Resume {
                    manifest: sealed().digest(),
                    from: vec![1, 0],
                }),
            },
            Message::Transfer {
                result: Box::new(sealed()),
                from: vec![0, 0],
            },
            Message::Login {
                version: PROTOCOL_VERSION,
                token: Secret("header.claims.signature".into()),
                public_key: "04ab".into(),
                proof: "3045".into(),
            },
            Message::LoggedIn {
                certificate: "pem".into(),
                identity: "ci:github:o/r@refs/heads/main".into(),
                repos: vec!["github.com/o/r".into()],
                trusted: true,
                expires_at: 1,
                counts: None,
            },
            Message::PersonLogin {
                version: PROTOCOL_VERSION,
                provider: "github".into(),
                public_key: "04ab".into(),
                proof: "3045".into(),
            },
            Message::LoginCode {
                user_code: "WDJB-MJHT".into(),
                verification_uri: "https://github.com/login/device".into(),
                verification_uri_complete: None,
                expires_in: 900,
            },
            Message::Renew {
                public_key: "04ab".into(),
                proof: "3045".into(),
            },
            Message::Listen {
                port: 4434,
                ip: Some("10.0.0.2".parse().unwrap()),
                cert: Sha256Digest::of(b"cert"),
            },
            Message::Listening {
                addr: "10.0.0.2:4434".into(),
            },
            Message::Introduce {
                key,
                namespace: "n".into(),
            },
            Message::Introduction(Box::new(Introduction {
                addr: "10.0.0.2:4434".into(),
                holder: Sha256Digest::of(b"holder"),
                producer: Sha256Digest::of(b"producer"),
                outputs: Sha256Digest::of(b"outputs"),
                ticket: Secret("t".into()),
            })),
            Message::Expect {
                ticket: Secret("t".into()),
                key,
                namespace: "n".into(),
                asker: Sha256Digest::of(b"asker"),
            },
            Message::Expecting,
            Message::Redeem {
                ticket: Secret("t".into()),
                key,
                namespace: "n".into(),
                resume: None,
            },
            Message::Served { bytes: 3 },
            Message::error(ErrorCode::FrameTooLarge, "too big"),
        ];
        assert_eq!(table.len(), KNOWN.len(), "every message is in the table");
        for m in table {
            roundtrip(m);
        }
    }

    #[test]
    fn a_login_token_never_shows_in_debug_output() {
        let m = Message::Login {
            version: PROTOCOL_VERSION,
            token: Secret("eyJhbGciOi.secret-claims.signature".into()),
            public_key: "04".into(),
            proof: "30".into(),
        };
        let shown = format!("{m:?}");
        assert!(!shown.contains("secret-claims"), "{shown}");
        assert!(shown.contains("Secret([34 bytes])"), "{shown}");
        assert_ne!(login_proof_bytes("a"), login_proof_bytes("b"));
        assert_ne!(
            person_login_proof_bytes("github", "04ab"),
            person_login_proof_bytes("gitlab", "04ab")
        );
        assert_ne!(
            renew_proof_bytes(&Sha256Digest::of(b"1"), "04ab"),
            renew_proof_bytes(&Sha256Digest::of(b"2"), "04ab")
        );
    }

    #[test]
    fn path_like_keys_do_not_decode() {
        // What a hostile orchestrator would ask an executor to serve.
        for body in [
            &br#"{"type":"serve","key":"../../../../root/.config/reprise/credentials.pem","namespace":"n"}"#[..],
            br#"{"type":"serve","key":"/etc/shadow","namespace":"n"}"#,
            br#"{"type":"lookup","key":"..","namespace":"n"}"#,
        ] {
            assert!(
                matches!(decode(body), Err(FrameError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_wire_form_is_tagged_json() {
        let frame = encode(&Message::Hello { version: 7 }).unwrap();
        assert_eq!(&frame[..4], &(frame.len() as u32 - 4).to_be_bytes());
        assert_eq!(&frame[4..], br#"{"type":"hello","version":7}"#);
        assert_eq!(
            serde_json::to_string(&Message::NotFound).unwrap(),
            r#"{"type":"not-found"}"#
        );
    }

    #[test]
    fn bad_frames_are_refused() {
        let oversized = ((MAX_FRAME + 1) as u32).to_be_bytes();
        // (case, bytes, the bytes the frame took or the refusal)
        type Case = (&'static str, Vec<u8>, Result<Option<usize>, FrameError>);
        let table: Vec<Case> = vec![
            ("empty", vec![], Ok(None)),
            ("partial header", vec![0, 0], Ok(None)),
            (
                "truncated body",
                {
                    let mut f = encode(&Message::NotFound).unwrap();
                    f.pop();
                    f
                },
                Ok(None),
            ),
            (
                "over the limit",
                oversized.to_vec(),
                Err(FrameError::TooLarge {
                    len: MAX_FRAME + 1,
                    max: MAX_FRAME,
                }),
            ),
            (
                "max u32 length",
                vec![0xff; 4],
                Err(FrameError::TooLarge {
                    len: u32::MAX as usize,
                    max: MAX_FRAME,
                }),
            ),
            (
                "unknown message",
                {
                    let body = br#"{"type":"steal-keys","all":true}"#;
                    let mut f = (body.len() as u32).to_be_bytes().to_vec();
                    f.extend_from_slice(body);
                    f
                },
                Err(FrameError::UnknownMessage("steal-keys".into())),
            ),
            (
                "complete",
                encode(&Message::NotFound).unwrap(),
                Ok(Some(4 + 20)),
            ),
        ];
        for (name, frame, want) in table {
            let got = decode_frame(&frame).map(|o| o.map(|(_, used)| used));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for body in [
            &b"not json"[..],
            br#"{"no":"type"}"#,
            br#"{"type":"hello"}"#,
            br#"{"type":"hello","version":"one"}"#,
            br#"[1,2]"#,
        ] {
            assert!(
                matches!(decode(body), Err(FrameError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn oversized_messages_are_not_encoded() {
        let m = Message::error(ErrorCode::Other, "x".repeat(MAX_FRAME));
        assert!(matches!(encode(&m), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn unknown_error_codes_decode_as_other() {
        let m = decode(br#"{"type":"error","code":"quota-exceeded","message":"m"}"#).unwrap();
        assert_eq!(m, Message::error(ErrorCode::Other, "m"));
    }

    #[test]
    fn versions_are_checked() {
        assert_eq!(Message::check_version(PROTOCOL_VERSION), None);
        match Message::check_version(99) {
            Some(Message::Error {
                code: ErrorCode::UnsupportedVersion,
                message,
            }) => assert!(
                message.contains("99") && message.contains("[3]"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sealed_results_list_their_parts() {
        let t = sealed();
        let m = &t.manifest;
        assert_eq!(
            t.parts(),
            vec![
                ("output record".to_string(), m.output_bytes, m.output_sha256),
                ("artifact a/b".to_string(), 2, m.artifacts[0].sha256)
            ]
        );
        assert!(t.passed());
        assert_eq!(t.held().key, m.key);
    }

    #[test]
    fn parts_are_cut_into_chunks_and_resume_points_are_checked() {
        // (part bytes, chunks, length of each chunk)
        let c = CHUNK_BYTES;
        let table: [(u64, u64, Vec<u64>); 5] = [
            (0, 0, vec![]),
            (1, 1, vec![1]),
            (c, 1, vec![c]),
            (c + 1, 2, vec![c, 1]),
            (3 * c - 5, 3, vec![c, c, c - 5]),
        ];
        for (bytes, count, lens) in table {
            assert_eq!(chunk_count(bytes), count, "{bytes}");
            let got: Vec<u64> = (0..count).map(|i| chunk_len(bytes, i)).collect();
            assert_eq!(got, lens, "{bytes}");
            assert_eq!(chunk_len(bytes, count), 0, "{bytes}");
            assert_eq!(lens.iter().sum::<u64>(), bytes);
        }
        let mut t = sealed();
        t.manifest.output_bytes = 2 * c + 1;
        assert!(t.fits(&[3, 1]));
        assert!(t.fits(&[0, 0]));
        assert!(!t.fits(&[4, 0]), "past the record's end");
        assert!(!t.fits(&[0, 2]), "past the artifact's end");
        assert!(!t.fits(&[0]), "a part missing");
        assert!(!t.fits(&[0, 0, 0]), "a part too many");
        assert_eq!(t.bytes_from(&[0, 0]), 2 * c + 1 + 2);
        assert_eq!(t.bytes_from(&[2, 1]), 1);
        assert_eq!(t.bytes_from(&[3, 0]), 2);
        // The digest names this very manifest.
        let mut other = t.clone();
        other.manifest.created_at += 1;
        assert_ne!(other.digest(), t.digest());
        other.seal.signature = "other".into();
        other.manifest.created_at -= 1;
        assert_eq!(other.digest(), t.digest(), "the seal is not part of it");
    }

    #[test]
    fn a_transfer_header_names_where_each_part_starts() {
        let frame = encode(&Message::Transfer {
            result: Box::new(sealed()),
            from: vec![2, 0],
        })
        .unwrap();
        let text = String::from_utf8_lossy(&frame[4..]).into_owned();
        assert!(
            text.starts_with(r#"{"type":"transfer","result":{"manifest":"#),
            "{text}"
        );
        assert!(text.ends_with(r#","from":[2,0]}"#), "{text}");
        // A fetch without a resume point reads as before.
        let fetch = decode(br#"{"type":"fetch","key":"0000000000000000000000000000000000000000000000000000000000000000","namespace":"n"}"#).unwrap();
        assert!(matches!(fetch, Message::Fetch { resume: None, .. }));
        assert_eq!(&chunk_header(5), &(37u32).to_be_bytes());
    }

    #[test]
    fn state_records_carry_their_version() {
        let r = StateRecord {
            version: STATE_VERSION,
            event: StateEvent::Revoked {
                name: "x".into(),
                at: 3,
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"version":1,"event":"revoked","name":"x","at":3}"#);
        assert_eq!(serde_json::from_str::<StateRecord>(&line).unwrap(), r);
        // A replay recorded before run times were kept still reads.
        let old = r#"{"version":1,"event":"replayed","asker":"a","producer":"p","key":"0000000000000000000000000000000000000000000000000000000000000000","namespace":"n","at":5}"#;
        match serde_json::from_str::<StateRecord>(old).unwrap().event {
            StateEvent::Replayed {
                run_ms, relayer, ..
            } => assert_eq!((run_ms, relayer), (None, None)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_version_1_config_naming_only_the_state_log_reads() {
        let old = r#"{"version":1,"client_ca":"ca.pem","ca_key":"ca.key","server_cert":"server.pem","server_key":"server.key","state_log":"state.jsonl"}"#;
        let c: OrchestratorConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c.state_log.as_deref(), Some("state.jsonl"));
        assert_eq!(c.database, None);
        let new = OrchestratorConfig {
            version: CONFIG_VERSION,
            database: Some("state.db".into()),
            state_log: None,
            ..c
        };
        let text = serde_json::to_string(&new).unwrap();
        assert!(!text.contains("state_log"), "{text}");
        assert_eq!(
            serde_json::from_str::<OrchestratorConfig>(&text).unwrap(),
            new
        );
    }
}
