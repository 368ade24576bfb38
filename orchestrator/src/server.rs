//! The QUIC service: admits executors by client certificate (refusing
//! unknown and revoked ones after the handshake), answers announce, lookup,
//! assess and fetch requests, and relays a result from the connection that
//! holds it to the asker as a stream.
//!
//! Announced results arrive sealed by their producers; each seal is
//! verified against the team CA and the revocation list before the result
//! is indexed, so every decision ([`crate::matcher`]) is made on what the
//! producer signed, never on what the announcing executor claims. A relayed
//! transfer's header is checked again against the offer (same producer,
//! same outputs, a seal that holds) before a byte reaches the asker.
//!
//! Streams: the executor's first bi stream carries `Hello` → `Welcome`;
//! every later bi stream it opens carries one request and its answer. To
//! fetch from a producer the orchestrator opens a bi stream on the
//! producer's connection with `Serve`; the producer answers with a
//! `Transfer` header and chunk frames, which are copied to the asker as
//! they come. A fetch may ask for the rest of a transfer that was cut
//! (`resume`: the result's digest and the chunk each part starts at); the
//! request is passed on to whichever holder is chosen, which serves the
//! rest if it holds that very result and everything otherwise, and the
//! header must say one of the two. Every chunk frame must be the length
//! its part's chunk is; the chunks' sha256s are the asker's to check.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::policy::PolicyConfig;
use reprise_protocol::seal::{SealError, SignedBy};
use reprise_protocol::wire::{
    ErrorCode, Held, Introduction, Message, Resume, Sealed, Secret, StateEvent, chunk_count,
    chunk_len,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use thiserror::Error;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::limits::Limits;
use crate::login::{self, CiLogin};
use crate::matcher::{Claim, ConnId, Decision, Matcher, NotIndexed};
use crate::people::PeopleLogin;
use crate::state::{Admission, Grant, State, now_secs};
use crate::status::{Poster, Status};
use crate::telemetry::{Answer, Refusal, Telemetry};

/// Connection close codes.
pub mod close {
    /// The service is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The certificate is not one this orchestrator issued.
    pub const UNKNOWN_IDENTITY: u32 = 1;
    /// The identity was revoked.
    pub const REVOKED: u32 = 2;
    /// The executor broke the protocol (no `Hello`, bad frame, version).
    pub const PROTOCOL: u32 = 3;
    /// The identity has as many connections open as it may.
    pub const LIMIT: u32 = 4;
}

use reprise_frames::{ChunkError, read_chunk_head, read_piece, write_chunk_head};
pub use reprise_frames::{ReadError, WriteError, read_message, write_message};

/// Why the service stopped.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("the endpoint stopped accepting connections")]
    EndpointClosed,
}

/// How many logins are answered at once; more are refused at once.
pub const MAX_LOGINS: usize = 16;

/// How long a new connection has to say `Hello`.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the service runs on: its state, the repositories' policy, and the
/// CA that client certificates (and so every seal) must chain to.
#[derive(Debug)]
pub struct Service {
    pub state: State,
    pub policy: PolicyConfig,
    pub client_ca: Vec<CertificateDer<'static>>,
    pub limits: Limits,
    /// What `/metrics` and the dashboard read ([`crate::http`]).
    pub telemetry: Arc<Telemetry>,
    /// What answers CI logins (none: connections without a client
    /// certificate are told that this orchestrator takes none).
    pub login: Option<CiLogin>,
    /// What posts commit statuses (none: no `[status.*]` configured).
    pub status: Option<Arc<Poster>>,
    /// What answers people's logins (none: no `[login.*]` configured).
    pub people: Option<PeopleLogin>,
}

struct Shared {
    /// Connection ids are counted, not taken from quinn's `stable_id` (an
    /// address, which a new connection may reuse after an old one is freed).
    next_id: std::sync::atomic::AtomicUsize,
    state: Arc<Mutex<State>>,
    policy: PolicyConfig,
    client_ca: Vec<CertificateDer<'static>>,
    limits: Limits,
    telemetry: Arc<Telemetry>,
    matcher: Mutex<Matcher>,
    login: Option<CiLogin>,
    people: Option<PeopleLogin>,
    /// People's device flows waiting at once.
    sessions: Semaphore,
    status: Option<Arc<Poster>>,
    /// Logins being answered at once are bounded: each may fetch an
    /// issuer's keys and signs a certificate.
    logins: Semaphore,
    conns: Mutex<BTreeMap<ConnId, Live>>,
    /// Conflicts already written to the audit log: (result, producers).
    logged_conflicts: Mutex<std::collections::BTreeSet<(Held, Vec<String>)>>,
}

/// A connected executor: its connection, its identity, and its
/// certificate's sha256, by which a later revocation finds it.
struct Live {
    conn: Connection,
    identity: String,
    cert_sha256: Option<Sha256Digest>,
    /// Where it takes direct fetches, and the sha256 of the certificate
    /// its listener presents (`Listen`).
    direct: Option<(SocketAddr, Sha256Digest)>,
    /// Its introductions whose tickets are still outstanding (each holds
    /// a stream open on the holder's connection until served or expired).
    introductions: Arc<Semaphore>,
    /// The holder each of those introductions is to, by key: a `Fetch` of
    /// such a key means the direct path failed (see `direct_failed`).
    introduced: BTreeMap<RunKey, ConnId>,
    /// When an asker last fell back to the relay after an introduction to
    /// this holder: for [`DIRECT_FAILED_FOR`] after, it is not introduced.
    direct_failed: Option<std::time::Instant>,
}

/// How long a holder an asker could not fetch from directly is left out of
/// introductions: each asker would otherwise wait out a handshake timeout
/// (2 s) on every fetch before the relay, where the holder is behind NAT
/// or a firewall. A reconnected holder is tried again at once.
pub const DIRECT_FAILED_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// How many introductions of one connection may wait at once for their
/// tickets to be served; more are refused (the fetch goes through the
/// relay), so an asker cannot tie up a holder's streams.
pub const MAX_INTRODUCTIONS: usize = 4;

/// How often the state is checked for revocations of connected executors
/// (`reprise-orchestrator revoke` is another process); the check reads the
/// identities again only when the database changed.
pub const REVOCATION_SWEEP: std::time::Duration = std::time::Duration::from_secs(1);

impl Shared {
    /// The asker `asker` fetches `key` through the relay: if it was just
    /// introduced to a holder of it whose ticket is still outstanding, the
    /// direct path failed (the holder unreachable from there, or its
    /// transfer refused), and that holder is left out of introductions for
    /// [`DIRECT_FAILED_FOR`].
    fn fell_back(&self, asker: ConnId, key: &RunKey) {
        let mut conns = self.conns.lock().expect("conns");
        let Some(holder) = conns
            .get_mut(&asker)
            .and_then(|live| live.introduced.remove(key))
        else {
            return;
        };
        if let Some(live) = conns.get_mut(&holder) {
            live.direct_failed = Some(std::time::Instant::now());
            info!(
                holder = %live.identity,
                "an asker fetched through the relay after its introduction; no introductions to this holder for {} s",
                DIRECT_FAILED_FOR.as_secs()
            );
        }
    }

    /// The ticket of the introduction of `asker` to `holder` for `key` was
    /// served or expired.
    fn introduction_done(&self, asker: ConnId, key: &RunKey, holder: ConnId) {
        let mut conns = self.conns.lock().expect("conns");
        if let Some(live) = conns.get_mut(&asker)
            && live.introduced.get(key) == Some(&holder)
        {
            live.introduced.remove(key);
        }
    }

    /// Closes the connections of executors revoked since they connected;
    /// they stop being offered as producers at once.
    fn close_revoked(&self) {
        let mut regranted = Vec::new();
        let revoked: Vec<(ConnId, String)> = {
            let mut state = self.state.lock().expect("state lock");
            if let Err(e) = state.refresh() {
                warn!("cannot read the state database: {e}");
                return;
            }
            let conns = self.conns.lock().expect("conns");
            conns
                .iter()
                .filter_map(|(id, live)| {
                    let admission = live
                        .cert_sha256
                        .as_ref()
                        .map_or(Admission::Unknown, |fp| state.admit(fp));
                    match admission {
                        Admission::Admitted(g) => {
                            regranted.push((*id, g));
                            None
                        }
                        Admission::Revoked(name) => Some((*id, name)),
                        Admission::Unknown => Some((*id, String::from("an unknown identity"))),
                    }
                })
                .collect()
        };
        // A renewal or a reissue changed a grant: the connection is
        // decided by the new one (the matcher is locked apart from the
        // state: lookups lock the matcher, then the state).
        {
            let mut matcher = self.matcher.lock().expect("matcher");
            for (id, grant) in regranted {
                matcher.regrant(id, grant);
            }
        }
        for (id, name) in revoked {
            self.matcher.lock().expect("matcher").disconnect(id);
            self.telemetry.disconnected(id);
            if let Some(live) = self.conns.lock().expect("conns").remove(&id) {
                self.telemetry.refused(Refusal::Revoked);
                info!(%name, id, "closing a revoked executor's connection");
                live.conn.close(
                    VarInt::from_u32(close::REVOKED),
                    format!("the certificate of {name} was revoked").as_bytes(),
                );
            }
        }
    }

    /// What the orchestrator knows of a certificate, for the matcher.
    fn trust(&self, fp: &Sha256Digest) -> (Admission, Option<u64>) {
        let state = self.state.lock().expect("state lock");
        (state.admit(fp), state.not_after(fp))
    }

    /// Checks a sealed result's seal (team CA, validity, revocation) and
    /// manifest. Returns who sealed it.
    fn verify(&self, sealed: &Sealed) -> Result<SignedBy, String> {
        let revoked = self.state.lock().expect("state lock").revoked_certs();
        let who = reprise_protocol::seal::verify(
            &sealed.seal,
            &sealed.manifest,
            &self.client_ca,
            UnixTime::now(),
            &revoked,
        )
        .map_err(|e: SealError| e.to_string())?;
        sealed.manifest.check().map_err(|e| e.to_string())?;
        Ok(who)
    }

    /// The decision on `wanted` for `asker`.
    fn lookup(&self, asker: ConnId, wanted: &Held) -> Decision {
        let policy = self.policy.for_repo(&wanted.namespace);
        let trust = |fp: &Sha256Digest| self.trust(fp);
        let decision = self.matcher.lock().expect("matcher").lookup(
            asker,
            wanted,
            &trust,
            &policy,
            now_secs(),
        );
        match &decision {
            Decision::Offer { producer_name, .. } => self
                .standing_conflict(wanted, producer_name, &policy.prefer)
                .unwrap_or(decision),
            _ => decision,
        }
    }

    /// A conflict recorded on `held` that still stands against an offer of
    /// `producer`'s result: the matcher sees only connected executors, so
    /// once the other side (say, a CI job's `verify` run) disconnects, its
    /// disagreement would otherwise be forgotten. It stands while another
    /// producer of it is still trusted for the namespace and not revoked,
    /// unless `prefer` names `producer` before the others.
    fn standing_conflict(
        &self,
        held: &Held,
        producer: &str,
        prefer: &[String],
    ) -> Option<Decision> {
        let mut state = self.state.lock().expect("state lock");
        // A revocation by another process counts at once.
        if let Err(e) = state.refresh() {
            warn!("cannot read the state database: {e}");
            return Some(Decision::NotFound);
        }
        let recorded = match state.conflicts_on(&held.namespace, &held.key) {
            Ok(recorded) => recorded,
            Err(e) => {
                // Fail closed: an unreadable audit log offers nothing.
                warn!("cannot read the audit log's conflicts: {e}");
                return Some(Decision::NotFound);
            }
        };
        for producers in recorded {
            if !producers.iter().any(|p| p == producer) {
                continue;
            }
            let other_stands = producers.iter().filter(|p| *p != producer).any(|p| {
                !state.is_revoked(p)
                    && state
                        .grant(p)
                        .is_some_and(|g| g.trusted && g.repos.contains(&held.namespace))
            });
            let preferred = prefer.iter().find(|p| producers.contains(p));
            if other_stands && preferred.is_none_or(|p| p != producer) {
                return Some(Decision::Conflict { producers });
            }
        }
        None
    }

    /// Posts a commit status for `sealed` (just indexed as `held`) when
    /// the repository's policy asks for one and the result counts: the
    /// matcher offers its producer's result, and no recorded conflict
    /// stands against it.
    fn post_status(&self, held: &Held, sealed: &Sealed) {
        let Some(poster) = &self.status else {
            return;
        };
        let policy = self.policy.for_repo(&held.namespace);
        if !policy.commit_status || !sealed.passed() {
            return;
        }
        let trust = |fp: &Sha256Digest| self.trust(fp);
        let decision =
            self.matcher
                .lock()
                .expect("matcher")
                .decide(held, None, &trust, &policy, now_secs());
        let Decision::Offer { producer_name, .. } = decision else {
            return;
        };
        if self
            .standing_conflict(held, &producer_name, &policy.prefer)
            .is_some()
        {
            return;
        }
        poster.post_once(
            &self.state,
            Status {
                namespace: held.namespace.clone(),
                key: held.key,
                sha: sealed.manifest.commit.clone(),
                target: sealed.manifest.inputs.target.clone(),
                producer: producer_name,
            },
        );
    }

    /// Writes a conflict on `held` to the audit log, once per set of
    /// producers.
    fn note_conflict(&self, held: &Held) {
        let policy = self.policy.for_repo(&held.namespace);
        let trust = |fp: &Sha256Digest| self.trust(fp);
        let decision =
            self.matcher
                .lock()
                .expect("matcher")
                .decide(held, None, &trust, &policy, now_secs());
        let Decision::Conflict { producers } = decision else {
            return;
        };
        let new = self
            .logged_conflicts
            .lock()
            .expect("conflicts")
            .insert((held.clone(), producers.clone()));
        if !new {
            return;
        }
        self.telemetry.conflict();
        warn!(key = %held.key, namespace = %held.namespace, ?producers, "trusted producers disagree");
        let event = StateEvent::Conflict {
            key: held.key,
            namespace: held.namespace.clone(),
            producers,
            at: now_secs(),
        };
        if let Err(e) = self.state.lock().expect("state").append(event) {
            warn!("cannot write the audit log: {e}");
        }
    }
}

/// Serves on `endpoint` (bound, with [`crate::pki::server_config`]) until
/// `shutdown` resolves; then closes every connection and waits for them to
/// be told.
pub async fn run(
    endpoint: quinn::Endpoint,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let shared = Arc::new(Shared {
        next_id: std::sync::atomic::AtomicUsize::new(1),
        state: Arc::new(Mutex::new(service.state)),
        policy: service.policy,
        matcher: Mutex::new(Matcher::new(service.limits.announced_per_identity)),
        client_ca: service.client_ca,
        limits: service.limits,
        telemetry: service.telemetry,
        login: service.login,
        people: service.people,
        sessions: Semaphore::new(crate::people::MAX_SESSIONS),
        status: service.status,
        logins: Semaphore::new(MAX_LOGINS),
        conns: Mutex::new(BTreeMap::new()),
        logged_conflicts: Mutex::new(Default::default()),
    });
    tokio::pin!(shutdown);
    let mut sweep = tokio::time::interval(REVOCATION_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            _ = sweep.tick() => shared.close_revoked(),
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break Err(ServeError::EndpointClosed) };
                let shared = shared.clone();
                let span = info_span!("conn", remote = %incoming.remote_address());
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => handle_connection(shared, conn).await,
                        Err(e) => info!("handshake refused: {e}"),
                    }
                }.instrument(span));
            }
        }
    };
    endpoint.close(
        VarInt::from_u32(close::SHUTDOWN),
        b"orchestrator shutting down",
    );
    endpoint.wait_idle().await;
    result
}

fn peer_cert(conn: &Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

async fn handle_connection(shared: Arc<Shared>, conn: Connection) {
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The TLS verifier already refused certificates from another CA and
    // expired ones; here the identity must be one we issued and not revoked.
    let cert_sha256 = peer_cert(&conn).map(|cert| Sha256Digest::of(cert.as_ref()));
    if cert_sha256.is_none() {
        // No certificate: the connection may only log in (a CI job).
        let Ok(permit) = shared.logins.try_acquire() else {
            shared.telemetry.refused(Refusal::LoginLimit);
            info!("refused: {MAX_LOGINS} logins are being answered");
            conn.close(
                VarInt::from_u32(close::LIMIT),
                b"too many logins at once; try again",
            );
            return;
        };
        let logins = login::Logins {
            ci: shared.login.as_ref(),
            people: shared.people.as_ref(),
            sessions: &shared.sessions,
        };
        let indexed = || shared.matcher.lock().expect("matcher").namespaces();
        let logged_in = login::answer(
            &conn,
            logins,
            permit,
            &shared.state,
            &shared.policy,
            &indexed,
        )
        .await;
        if !logged_in {
            shared.telemetry.refused(Refusal::Login);
        }
        return;
    }
    let admission = match &cert_sha256 {
        None => Admission::Unknown,
        Some(sha) => {
            let mut state = shared.state.lock().expect("state lock");
            match state.refresh() {
                Ok(()) => state.admit(sha),
                Err(e) => {
                    warn!("cannot read the state database: {e}");
                    Admission::Unknown
                }
            }
        }
    };
    let grant = match admission {
        Admission::Admitted(g) => g,
        Admission::Revoked(name) => {
            shared.telemetry.refused(Refusal::Revoked);
            info!(%name, "refused: revoked");
            conn.close(
                VarInt::from_u32(close::REVOKED),
                format!("the certificate of {name} was revoked").as_bytes(),
            );
            return;
        }
        Admission::Unknown => {
            shared.telemetry.refused(Refusal::UnknownCertificate);
            info!("refused: unknown certificate");
            conn.close(
                VarInt::from_u32(close::UNKNOWN_IDENTITY),
                b"this certificate was not issued by this orchestrator",
            );
            return;
        }
    };
    let span = info_span!("executor", name = %grant.name, id);
    async {
        // A place among the identity's connections, taken before Hello so
        // that the count and the insert are one step.
        let full = {
            let mut conns = shared.conns.lock().expect("conns");
            let open = conns.values().filter(|l| l.identity == grant.name).count();
            let full = open >= shared.limits.connections_per_identity;
            if !full {
                conns.insert(
                    id,
                    Live {
                        conn: conn.clone(),
                        identity: grant.name.clone(),
                        cert_sha256,
                        direct: None,
                        introductions: Arc::new(Semaphore::new(MAX_INTRODUCTIONS)),
                        introduced: BTreeMap::new(),
                        direct_failed: None,
                    },
                );
            }
            full
        };
        if full {
            let cap = shared.limits.connections_per_identity;
            shared.telemetry.refused(Refusal::ConnectionLimit);
            warn!(cap, "refused: the identity has as many connections open as it may");
            conn.close(
                VarInt::from_u32(close::LIMIT),
                format!(
                    "{} has {cap} connections open, the most this orchestrator allows one identity (serve --max-connections)",
                    grant.name
                )
                .as_bytes(),
            );
            return;
        }
        let revoked: Vec<Sha256Digest> = shared
            .state
            .lock()
            .expect("state lock")
            .revoked_certs()
            .into_iter()
            .collect();
        let said = tokio::time::timeout(HELLO_TIMEOUT, hello(&conn, &grant, revoked, &shared.policy)).await;
        if let Err(reason) = said.unwrap_or_else(|_| Err("no hello in time".into())) {
            shared.telemetry.refused(Refusal::Hello);
            info!("refused: {reason}");
            conn.close(VarInt::from_u32(close::PROTOCOL), reason.as_bytes());
            shared.conns.lock().expect("conns").remove(&id);
            return;
        }
        shared
            .matcher
            .lock()
            .expect("matcher")
            .connect(id, grant.clone());
        shared
            .telemetry
            .connected(id, &grant.name, conn.remote_address(), now_secs());
        info!("connected");
        let open = Arc::new(Semaphore::new(shared.limits.streams_per_connection as usize));
        let mut over_limit = 0u64;
        loop {
            match conn.accept_bi().await {
                Ok((send, recv)) => {
                    let Ok(permit) = open.clone().try_acquire_owned() else {
                        shared.telemetry.refused(Refusal::StreamLimit);
                        if over_limit == 0 {
                            warn!(
                                cap = shared.limits.streams_per_connection,
                                "refusing requests over the open-request limit of a connection"
                            );
                        }
                        over_limit += 1;
                        tokio::spawn(refuse_over_limit(send, recv, shared.limits.streams_per_connection));
                        continue;
                    };
                    let shared = shared.clone();
                    let grant = grant.clone();
                    tokio::spawn(
                        async move {
                            request(shared, id, &grant, send, recv).await;
                            drop(permit);
                        }
                        .in_current_span(),
                    );
                }
                Err(e) => {
                    info!(refused_over_limit = over_limit, "disconnected: {e}");
                    break;
                }
            }
        }
        shared.matcher.lock().expect("matcher").disconnect(id);
        shared.telemetry.disconnected(id);
        shared.conns.lock().expect("conns").remove(&id);
    }
    .instrument(span)
    .await
}

/// The first stream: `Hello` → `Welcome`, or the refusal (sent, and
/// returned as the close reason).
async fn hello(
    conn: &Connection,
    grant: &Grant,
    revoked: Vec<Sha256Digest>,
    policy: &PolicyConfig,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let refusal = match read_message(&mut recv).await {
        Ok(Message::Hello { version }) => Message::check_version(version),
        Ok(_) => Some(Message::error(
            ErrorCode::HelloFirst,
            "the first message must be hello",
        )),
        Err(e) => e.refusal(),
    };
    let answer = refusal.clone().unwrap_or_else(|| Message::Welcome {
        identity: grant.name.clone(),
        repos: grant.repos.iter().cloned().collect(),
        trusted: grant.trusted,
        revoked,
        counts: Some(crate::matcher::counts_in(grant, policy)),
    });
    let _ = write_message(&mut send, &answer).await;
    let _ = send.finish();
    match refusal {
        None => Ok(()),
        Some(Message::Error { message, .. }) => {
            // Let the refusal reach the executor before the close does.
            let _ = send.stopped().await;
            Err(message)
        }
        Some(_) => Err("refused".into()),
    }
}

/// Answers a request stream over the connection's limit of open requests.
async fn refuse_over_limit(mut send: SendStream, mut recv: RecvStream, cap: u32) {
    let m = Message::error(
        ErrorCode::Limit,
        format!(
            "this connection has {cap} requests open, the most this orchestrator allows (serve --max-streams); wait for one to finish"
        ),
    );
    let _ = recv.stop(VarInt::from_u32(0));
    let _ = write_message(&mut send, &m).await;
    let _ = send.finish();
}

async fn request(
    shared: Arc<Shared>,
    id: ConnId,
    grant: &Grant,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let deadline = shared.limits.request_timeout;
    let message = match tokio::time::timeout(deadline, read_message(&mut recv)).await {
        Err(_) => {
            shared.telemetry.refused(Refusal::RequestTimeout);
            info!(
                after_secs = deadline.as_secs(),
                "request stream timed out before its request arrived"
            );
            let m = Message::error(
                ErrorCode::TimedOut,
                format!(
                    "no whole request within {}s (serve --request-timeout)",
                    deadline.as_secs()
                ),
            );
            let _ = recv.stop(VarInt::from_u32(0));
            let _ = write_message(&mut send, &m).await;
            let _ = send.finish();
            return;
        }
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            shared.telemetry.refused(Refusal::BadRequest);
            debug!("bad request: {e}");
            if let Some(refusal) = e.refusal() {
                let _ = write_message(&mut send, &refusal).await;
            }
            let _ = send.finish();
            return;
        }
    };
    let answer = match message {
        Message::Announce { results } => {
            let (mut accepted, mut refused, mut over_cap) = (0u32, 0u32, 0u64);
            let mut indexed = Vec::new();
            let mut full = None;
            for sealed in &results {
                let held = sealed.held();
                let claim = shared
                    .verify(sealed)
                    .map(|who| Claim::of(id, who.fingerprint, sealed));
                let ok = match claim {
                    Ok(claim) => match shared
                        .matcher
                        .lock()
                        .expect("matcher")
                        .announce(held.clone(), claim)
                    {
                        Ok(()) => true,
                        Err(NotIndexed::NotGranted) => false,
                        Err(NotIndexed::Full { identity, cap }) => {
                            full = Some((identity, cap));
                            over_cap += 1;
                            false
                        }
                    },
                    Err(why) => {
                        debug!(key = %held.key, "announce refused: {why}");
                        false
                    }
                };
                if ok {
                    accepted += 1;
                    indexed.push((held, sealed));
                } else {
                    refused += 1;
                }
            }
            for (held, sealed) in &indexed {
                shared.note_conflict(held);
                shared.post_status(held, sealed);
            }
            shared.telemetry.indexed(id, u64::from(accepted));
            shared.telemetry.refused_n(Refusal::AnnounceLimit, over_cap);
            shared
                .telemetry
                .refused_n(Refusal::AnnounceRefused, u64::from(refused) - over_cap);
            debug!(accepted, refused, "announce");
            match full {
                Some((identity, cap)) => {
                    warn!(
                        accepted,
                        refused,
                        cap,
                        "announce: the identity has as many results indexed as it may"
                    );
                    Message::error(
                        ErrorCode::Limit,
                        format!(
                            "{identity} has {cap} results indexed, the most this orchestrator keeps for one identity (serve --max-announced); {accepted} of this announce indexed, {refused} refused"
                        ),
                    )
                }
                None => {
                    if refused > 0 {
                        info!(
                            accepted,
                            refused,
                            "announce: results refused (seal, manifest or repository not granted)"
                        );
                    }
                    Message::Announced { accepted, refused }
                }
            }
        }
        Message::Lookup { key, namespace } => {
            let wanted = Held { key, namespace };
            let (answer, message) = match shared.lookup(id, &wanted) {
                Decision::Offer {
                    producer_name,
                    counts,
                    ..
                } => (
                    Answer::Hit,
                    Message::Offer {
                        producer: producer_name,
                        counts,
                    },
                ),
                Decision::Conflict { producers } => {
                    (Answer::Conflict, Message::Conflict { producers })
                }
                Decision::NotFound => (Answer::Miss, Message::NotFound),
            };
            shared.telemetry.lookup(answer);
            message
        }
        Message::Assess { result } => {
            let namespace = result.manifest.inputs.namespace.clone();
            let granted = shared
                .matcher
                .lock()
                .expect("matcher")
                .grants(id, &namespace);
            // A person the repository's `readers` leaves out learns as
            // little as one it does not grant.
            if !granted || !shared.policy.for_repo(&namespace).may_read(&grant.name) {
                Message::Assessed {
                    counts: false,
                    reason: format!("this certificate does not grant {namespace}"),
                }
            } else {
                match shared.verify(&result) {
                    Err(why) => Message::Assessed {
                        counts: false,
                        reason: why,
                    },
                    Ok(who) => {
                        let claim = Claim::of(id, who.fingerprint, &result);
                        let policy = shared.policy.for_repo(&namespace);
                        let trust = |fp: &Sha256Digest| shared.trust(fp);
                        match crate::matcher::counts(
                            &claim,
                            &namespace,
                            &trust,
                            &policy,
                            now_secs(),
                        ) {
                            Ok((name, why)) if claim.passed => {
                                let held = Held {
                                    key: result.manifest.key,
                                    namespace: namespace.clone(),
                                };
                                match shared.standing_conflict(&held, &name, &policy.prefer) {
                                    Some(Decision::Conflict { producers }) => Message::Assessed {
                                        counts: false,
                                        reason: format!(
                                            "trusted producers disagree on it ({}): neither counts until one is revoked or the policy prefers one",
                                            producers.join(", ")
                                        ),
                                    },
                                    Some(_) => Message::Assessed {
                                        counts: false,
                                        reason: "the audit log cannot be read".into(),
                                    },
                                    None => Message::Assessed {
                                        counts: true,
                                        reason: why,
                                    },
                                }
                            }
                            Ok(_) => Message::Assessed {
                                counts: false,
                                reason: "the run failed".into(),
                            },
                            Err(why) => Message::Assessed {
                                counts: false,
                                reason: why,
                            },
                        }
                    }
                }
            }
        }
        Message::Fetch {
            key,
            namespace,
            resume,
        } => {
            shared.fell_back(id, &key);
            relay(&shared, id, grant, Held { key, namespace }, resume, send).await;
            return;
        }
        Message::Listen { port, ip, cert } => {
            let mut conns = shared.conns.lock().expect("conns");
            match conns.get_mut(&id) {
                Some(live) if port != 0 => {
                    // The address it says, else the one it comes from.
                    let ip = ip.unwrap_or_else(|| live.conn.remote_address().ip().to_canonical());
                    let addr = SocketAddr::new(ip, port);
                    live.direct = Some((addr, cert));
                    info!(%addr, "takes direct fetches");
                    Message::Listening {
                        addr: addr.to_string(),
                    }
                }
                Some(_) => Message::error(ErrorCode::Malformed, "port 0 is no port to listen on"),
                None => Message::error(ErrorCode::Unexpected, "not connected"),
            }
        }
        Message::Introduce { key, namespace } => {
            let answer = introduce(&shared, id, grant, Held { key, namespace }).await;
            let _ = write_message(&mut send, &answer).await;
            let _ = send.finish();
            return;
        }
        Message::Renew { public_key, proof } => {
            let current = shared
                .conns
                .lock()
                .expect("conns")
                .get(&id)
                .and_then(|live| live.cert_sha256);
            match (&shared.people, current) {
                (Some(people), Some(current)) => {
                    // The grant as the state holds it now, not as it was
                    // when the connection was made.
                    let now = match shared.state.lock().expect("state lock").admit(&current) {
                        Admission::Admitted(g) => Some(g),
                        _ => None,
                    };
                    match now {
                        None => Message::error(
                            ErrorCode::Other,
                            "this certificate is no longer admitted: log in again (reprise login)",
                        ),
                        Some(now) => {
                            let cx = crate::people::Context {
                                login: people,
                                state: &shared.state,
                                policy: &shared.policy,
                                indexed: shared.matcher.lock().expect("matcher").namespaces(),
                            };
                            crate::people::renew(&cx, &now, &current, &public_key, &proof).await
                        }
                    }
                }
                _ => Message::error(
                    ErrorCode::Unavailable,
                    "this orchestrator takes no logins of people ([login.*]), so it renews nothing",
                ),
            }
        }
        other => {
            shared.telemetry.refused(Refusal::BadRequest);
            Message::error(
                ErrorCode::Unexpected,
                format!("{} is not a request", tag(&other)),
            )
        }
    };
    let _ = write_message(&mut send, &answer).await;
    let _ = send.finish();
}

fn tag(m: &Message) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_default()
}

/// How long a holder has to take a ticket (`Expect` → `Expecting`).
const EXPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Introduces the asker to the executor holding `wanted`, decided as a
/// relayed fetch is ([`Shared::lookup`]): hands the holder a ticket bound
/// to the asker's certificate and the key, and answers the asker with the
/// holder's address, its listener's certificate, and who must have sealed
/// the result. The replay is audited once the holder says it served the
/// ticket whole.
async fn introduce(shared: &Arc<Shared>, asker: ConnId, grant: &Grant, wanted: Held) -> Message {
    let Decision::Offer {
        conn,
        producer,
        producer_name,
        outputs,
        run_ms,
        ..
    } = shared.lookup(asker, &wanted)
    else {
        return Message::NotFound;
    };
    let (holder, asker_live) = {
        let conns = shared.conns.lock().expect("conns");
        let failed = conns.get(&conn).and_then(|live| live.direct_failed);
        if let Some(at) = failed.filter(|at| at.elapsed() < DIRECT_FAILED_FOR) {
            return Message::error(
                ErrorCode::Unavailable,
                format!(
                    "an asker could not fetch from this holder directly {} s ago: fetch through the orchestrator",
                    at.elapsed().as_secs()
                ),
            );
        }
        let holder = conns.get(&conn).and_then(|live| {
            live.direct
                .map(|d| (live.conn.clone(), live.identity.clone(), d))
        });
        let asker_live = conns
            .get(&asker)
            .and_then(|live| Some((live.cert_sha256?, live.introductions.clone())));
        (holder, asker_live)
    };
    let (Some((holder_conn, holder_name, (addr, holder_cert))), Some((asker_cert, waiting))) =
        (holder, asker_live)
    else {
        return Message::error(
            ErrorCode::Unavailable,
            "the holder takes no direct fetches: fetch through the orchestrator",
        );
    };
    let Ok(permit) = waiting.try_acquire_owned() else {
        return Message::error(
            ErrorCode::Limit,
            format!(
                "{MAX_INTRODUCTIONS} introductions of this connection are waiting to be served: fetch through the orchestrator"
            ),
        );
    };
    let mut bytes = [0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return Message::error(ErrorCode::Other, "no randomness for a ticket");
    }
    let ticket = Secret(reprise_protocol::hex::encode(&bytes));
    let expect = Message::Expect {
        ticket: ticket.clone(),
        key: wanted.key,
        namespace: wanted.namespace.clone(),
        asker: asker_cert,
    };
    let handed = async {
        let (mut psend, mut precv) = holder_conn.open_bi().await.map_err(|e| e.to_string())?;
        write_message(&mut psend, &expect)
            .await
            .map_err(|e| e.to_string())?;
        let _ = psend.finish();
        match read_message(&mut precv).await.map_err(|e| e.to_string())? {
            Message::Expecting => Ok(precv),
            Message::Error { message, .. } => Err(message),
            other => Err(format!("answered {}", tag(&other))),
        }
    };
    let mut precv = match tokio::time::timeout(EXPECT_TIMEOUT, handed).await {
        Ok(Ok(precv)) => precv,
        Ok(Err(why)) => {
            info!(holder = %holder_name, "the holder did not take a ticket: {why}");
            return Message::error(
                ErrorCode::Unavailable,
                format!("the holder did not take a ticket ({why}): fetch through the orchestrator"),
            );
        }
        Err(_) => {
            return Message::error(
                ErrorCode::Unavailable,
                "the holder did not take a ticket in time: fetch through the orchestrator",
            );
        }
    };
    let started = std::time::Instant::now();
    if let Some(live) = shared.conns.lock().expect("conns").get_mut(&asker) {
        live.introduced.insert(wanted.key, conn);
    }
    let (shared, asker_name) = (shared.clone(), grant.name.clone());
    tokio::spawn(async move {
        let _permit = permit;
        // The holder's word that the transfer left whole, or the stream's
        // end when the ticket expired unused.
        let served = read_message(&mut precv).await;
        shared.introduction_done(asker, &wanted.key, conn);
        let Ok(Message::Served { bytes }) = served else {
            return;
        };
        shared.telemetry.replayed();
        let relay_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let event = StateEvent::Replayed {
            asker: asker_name,
            producer: producer_name.clone(),
            relayer: Some(holder_name.clone()),
            key: wanted.key,
            namespace: wanted.namespace,
            at: now_secs(),
            // The holder's sealed manifest's, as announced.
            run_ms: Some(run_ms),
            relay_ms: Some(relay_ms),
            bytes: Some(bytes),
        };
        // Said once the audit log holds it (or could not), so whoever
        // waits for the line knows the orchestrator is done with it.
        if let Err(e) = shared.state.lock().expect("state").append(event) {
            warn!("cannot write the audit log: {e}");
        }
        info!(producer = %producer_name, holder = %holder_name, key = %wanted.key, bytes, relay_ms, "served directly");
    });
    Message::Introduction(Box::new(Introduction {
        addr: addr.to_string(),
        holder: holder_cert,
        producer,
        outputs,
        ticket,
    }))
}

/// Relays `wanted` from the executor holding it to the asker's `send`.
async fn relay(
    shared: &Shared,
    asker: ConnId,
    grant: &Grant,
    wanted: Held,
    resume: Option<Resume>,
    mut send: SendStream,
) {
    let decision = shared.lookup(asker, &wanted);
    let offer = match decision {
        Decision::Offer {
            conn,
            producer,
            producer_name,
            outputs,
            ..
        } => {
            let live = shared
                .conns
                .lock()
                .expect("conns")
                .get(&conn)
                .map(|live| live.conn.clone());
            live.map(|c| (c, producer, producer_name, outputs))
        }
        Decision::Conflict { .. } | Decision::NotFound => None,
    };
    let Some((conn, producer, producer_name, outputs)) = offer else {
        let _ = write_message(&mut send, &Message::NotFound).await;
        let _ = send.finish();
        return;
    };
    let expected = Expected {
        held: &wanted,
        producer,
        outputs,
        resume,
    };
    let started = std::time::Instant::now();
    match pipe(shared, &conn, &expected, &mut send).await {
        Ok(relayed) => {
            let _ = send.finish();
            let relay_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            shared.telemetry.replayed();
            let event = StateEvent::Replayed {
                asker: grant.name.clone(),
                producer: producer_name.clone(),
                relayer: Some(relayed.relayer.clone()),
                key: wanted.key,
                namespace: wanted.namespace,
                at: now_secs(),
                run_ms: Some(relayed.run_ms),
                relay_ms: Some(relay_ms),
                bytes: Some(relayed.bytes),
            };
            // Said once the audit log holds it, as a direct transfer is.
            if let Err(e) = shared.state.lock().expect("state").append(event) {
                warn!("cannot write the audit log: {e}");
            }
            info!(
                producer = %producer_name,
                relayer = %relayed.relayer,
                key = %wanted.key,
                bytes = relayed.bytes,
                resumed = relayed.resumed,
                relay_ms,
                "relayed"
            );
        }
        Err(PipeError::BeforeData(reason)) => {
            info!(producer = %producer_name, "the holder could not serve: {reason}");
            let m = Message::error(
                ErrorCode::Unavailable,
                format!("the result of {producer_name} could not be served: {reason}"),
            );
            let _ = write_message(&mut send, &m).await;
            let _ = send.finish();
        }
        Err(PipeError::TooLarge(reason)) => {
            shared.telemetry.refused(Refusal::TransferLimit);
            warn!(producer = %producer_name, "not relayed: {reason}");
            let m = Message::error(ErrorCode::Limit, reason);
            let _ = write_message(&mut send, &m).await;
            let _ = send.finish();
        }
        Err(PipeError::Cut(reason)) => {
            // The holder's stream broke off between or inside chunks: the
            // asker gets every chunk relayed so far and then the end of the
            // stream, short of what the manifest says, so it keeps the
            // checked chunks and asks for the rest later.
            warn!(producer = %producer_name, "transfer cut: {reason}");
            let _ = send.finish();
        }
        Err(PipeError::Midway(reason)) => {
            // The asker must not take a partial result for a whole one.
            warn!(producer = %producer_name, "transfer broke off: {reason}");
            let _ = send.reset(VarInt::from_u32(1));
        }
    }
}

/// What the relayed header must show.
struct Expected<'a> {
    held: &'a Held,
    producer: Sha256Digest,
    outputs: Sha256Digest,
    /// Where the asker would have it start.
    resume: Option<Resume>,
}

enum PipeError {
    BeforeData(String),
    /// The result is over the transfer limit.
    TooLarge(String),
    /// The holder's data stopped coming before the last chunk.
    Cut(String),
    /// The holder broke the protocol after its data began.
    Midway(String),
}

/// A transfer copied whole.
struct Relayed {
    /// The name of the holder's identity.
    relayer: String,
    /// The output record's and the artifacts' bytes relayed.
    bytes: u64,
    /// Whether the transfer was the rest of one that was cut.
    resumed: bool,
    /// The producer's recorded run time (the manifest's `total_ms`).
    run_ms: u64,
}

/// Asks `conn` to serve the result, checks its header against what was
/// offered, and copies the transfer to `send`.
async fn pipe(
    shared: &Shared,
    conn: &Connection,
    expected: &Expected<'_>,
    send: &mut SendStream,
) -> Result<Relayed, PipeError> {
    let before = |e: &dyn std::fmt::Display| PipeError::BeforeData(e.to_string());
    let (mut psend, mut precv) = conn.open_bi().await.map_err(|e| before(&e))?;
    let serve = Message::Serve {
        key: expected.held.key,
        namespace: expected.held.namespace.clone(),
        resume: expected.resume.clone(),
    };
    write_message(&mut psend, &serve)
        .await
        .map_err(|e| before(&e))?;
    let _ = psend.finish();
    let idle = shared.limits.transfer_idle;
    let header = tokio::time::timeout(idle, read_message(&mut precv))
        .await
        .map_err(|_| PipeError::BeforeData(format!("no answer within {}s", idle.as_secs())))?
        .map_err(|e| before(&e))?;
    let (parts, from, run_ms) = match &header {
        Message::Transfer { result: t, from } => {
            if t.held() != *expected.held {
                return Err(PipeError::BeforeData("sent another result".into()));
            }
            let who = shared.verify(t).map_err(|e| before(&e))?;
            if who.fingerprint != expected.producer
                || t.manifest.outputs_digest() != expected.outputs
            {
                return Err(PipeError::BeforeData(
                    "sent a result other than the one it announced".into(),
                ));
            }
            // From the start, or from exactly where the asker asked of
            // this very result.
            let whole = from.iter().all(|f| *f == 0);
            let rest = expected
                .resume
                .as_ref()
                .is_some_and(|r| r.manifest == t.digest() && r.from == *from);
            if !t.fits(from) || !(whole || rest) {
                return Err(PipeError::BeforeData(
                    "started the transfer where the asker did not ask".into(),
                ));
            }
            let parts: Vec<u64> = t.parts().iter().map(|(_, bytes, _)| *bytes).collect();
            let total = parts.iter().fold(0u64, |a, b| a.saturating_add(*b));
            let max = shared.limits.max_transfer;
            if total > max {
                return Err(PipeError::TooLarge(format!(
                    "the result is {total} bytes, over this orchestrator's limit of {max} (serve --max-transfer)"
                )));
            }
            (parts, from.clone(), t.manifest.total_ms)
        }
        Message::Error { message, .. } => return Err(PipeError::BeforeData(message.clone())),
        other => {
            return Err(PipeError::BeforeData(format!("answered {}", tag(other))));
        }
    };
    write_message(send, &header)
        .await
        .map_err(|e| PipeError::Midway(e.to_string()))?;
    // The parts, chunk by chunk from where each starts: each frame the
    // length its chunk is, none slower to come than the idle limit;
    // nothing past the last part.
    let midway = |e: &dyn std::fmt::Display| PipeError::Midway(e.to_string());
    // Each chunk is passed on as it comes (cut through): its header once
    // its length is checked, then each piece the holder's stream received,
    // handed to the asker's stream as it is (no copy). Waiting for a whole
    // chunk before sending it on held the holder to one chunk in flight
    // (the stream's window), stopping and starting at every chunk. A
    // chunk still has the idle limit to arrive whole; one cut inside ends
    // the asker's stream inside it, which the asker reads as a cut
    // transfer and keeps the chunks before it.
    let cut = || PipeError::Cut(format!("the holder sent nothing for {}s", idle.as_secs()));
    let mut bytes = 0u64;
    for (part, start) in parts.into_iter().zip(from.iter().copied()) {
        for index in start..chunk_count(part) {
            let len = chunk_len(part, index);
            let deadline = tokio::time::Instant::now() + idle;
            let (sha, mut left) =
                tokio::time::timeout_at(deadline, read_chunk_head(&mut precv, len))
                    .await
                    .map_err(|_| cut())?
                    .map_err(|e| match e {
                        ChunkError::Read(e) => PipeError::Cut(e.to_string()),
                        bad => midway(&bad),
                    })?;
            write_chunk_head(send, &sha, left)
                .await
                .map_err(|e| midway(&e))?;
            while left > 0 {
                let piece = tokio::time::timeout_at(deadline, read_piece(&mut precv, left))
                    .await
                    .map_err(|_| cut())?
                    .map_err(|e| PipeError::Cut(e.to_string()))?;
                left -= piece.len();
                send.write_chunk(piece).await.map_err(|e| midway(&e))?;
            }
            shared.telemetry.relayed(len);
            bytes += len;
        }
    }
    // ... and then the end of the stream: trailing bytes mean a broken
    // holder, whose transfer the asker must not take.
    let mut probe = [0u8; 1];
    match tokio::time::timeout(idle, precv.read(&mut probe)).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(_))) => {
            return Err(PipeError::Midway(
                "the holder sent more than the result's parts".into(),
            ));
        }
        Ok(Err(e)) => return Err(midway(&e)),
        Err(_) => {
            return Err(PipeError::Midway(
                "the holder did not end the transfer".into(),
            ));
        }
    }
    let relayer = peer_cert(conn)
        .map(|c| Sha256Digest::of(c.as_ref()))
        .and_then(|fp| match shared.state.lock().expect("state").admit(&fp) {
            Admission::Admitted(g) => Some(g.name),
            _ => None,
        })
        .unwrap_or_else(|| "an executor".into());
    Ok(Relayed {
        relayer,
        bytes,
        resumed: from.iter().any(|f| *f > 0),
        run_ms,
    })
}
