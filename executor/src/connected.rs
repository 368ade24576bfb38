//! Connected mode and the daemon: staying connected to the orchestrator to
//! serve the local store, reconnecting with backoff when the connection is
//! lost (an orchestrator restart, a network change), and the local socket
//! over which `reprise run` hands its new results to a running
//! `reprise daemon`.
//!
//! Every (re)connection announces the whole store, so nothing committed
//! while the link was down is missed; results handed over while connected
//! are announced at once.

use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use reprise_protocol::local::{self, Answer, Ask, Link, Request};
use reprise_protocol::wire::Sealed;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::peer::{Credentials, Peer, PeerError};
use crate::settings::Settings;
use crate::store::Store;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the orchestrator is, with the credentials loaded.
#[derive(Debug, Clone)]
pub struct Connector {
    pub settings: Settings,
    creds: Arc<Credentials>,
}

/// Why a connector could not be made.
#[derive(Debug, Error)]
#[error("cannot use the credentials {}", .path.display())]
pub struct CredentialsError {
    path: PathBuf,
    #[source]
    source: PeerError,
}

impl Connector {
    pub fn new(settings: Settings) -> Result<Connector, CredentialsError> {
        let creds =
            Credentials::load(&settings.credentials).map_err(|source| CredentialsError {
                path: settings.credentials.clone(),
                source,
            })?;
        Ok(Connector {
            settings,
            creds: Arc::new(creds),
        })
    }

    /// The loaded credentials (they seal results made here).
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// One attempt, bounded by [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Peer, String> {
        let attempt = Peer::connect(&self.settings.orchestrator, self.creds.clone());
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(peer)) => Ok(peer),
            Ok(Err(e)) => Err(crate::pipeline::error_chain(&e)),
            Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
        }
    }
}

/// Exponential backoff with jitter between reconnection attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next attempt: doubling up to the maximum, then
    /// spread by ±25% so executors cut off together do not all come back
    /// in the same instant.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let spread = f64::from(nanos % 1000) / 1000.0 * 0.5 + 0.75;
        base.mul_f64(spread)
    }

    /// A connection worked: start again from the first delay.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(30))
    }
}

/// A sealed result to announce, and where to say how it went.
pub type News = (Sealed, oneshot::Sender<Link>);

/// Serves `store` to peers through the orchestrator until `stop` resolves,
/// starting with `first` if a connection is already open. A lost
/// connection is noted and made again with backoff; each new connection
/// announces the whole store. `news` carries results to announce as they
/// are committed (answered with the link's state once announced, or at
/// once while disconnected: the next connection announces them); `link`
/// reports the connection's state.
pub async fn stay_connected(
    connector: &Connector,
    first: Option<Peer>,
    store: &Store,
    mut news: mpsc::Receiver<News>,
    link: &watch::Sender<Link>,
    stop: impl std::future::Future<Output = ()>,
    note: &(dyn Fn(&str) + Sync),
) {
    let mut stop = pin!(stop);
    let mut backoff = Backoff::default();
    let mut first = first;
    let mut was_connected = false;
    let mut quiet_failures = false;
    // While disconnected, `news` is answered with the link as it is.
    macro_rules! until {
        ($fut:expr) => {{
            let fut = $fut;
            let mut fut = pin!(fut);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    out = &mut fut => break out,
                    Some((_, reply)) = news.recv() => {
                        let _ = reply.send(link.borrow().clone());
                    }
                }
            }
        }};
    }
    loop {
        let peer = match first.take() {
            Some(peer) => Ok(peer),
            None => until!(connector.connect()),
        };
        let peer = match peer {
            Ok(peer) => Arc::new(peer),
            Err(e) => {
                let delay = backoff.next_delay();
                // One line per outage, not one per attempt.
                if !quiet_failures {
                    note(&format!(
                        "cannot reach the orchestrator at {}: {e}; retrying with backoff",
                        connector.settings.orchestrator
                    ));
                    quiet_failures = true;
                }
                link.send_replace(Link::Reconnecting { last_error: e });
                until!(tokio::time::sleep(delay));
                continue;
            }
        };
        let announced = match until!(peer.announce(store)) {
            Ok((served, refused)) => {
                if refused > 0 {
                    note(&format!(
                        "the orchestrator refused {refused} result(s) of this store (unverifiable seals, or repositories this certificate does not grant)"
                    ));
                }
                served
            }
            Err(e) => {
                let e = crate::pipeline::error_chain(&e);
                note(&format!(
                    "announcing results to the orchestrator failed: {e}"
                ));
                link.send_replace(Link::Reconnecting { last_error: e });
                peer.close().await;
                until!(tokio::time::sleep(backoff.next_delay()));
                continue;
            }
        };
        backoff.reset();
        quiet_failures = false;
        note(&format!(
            "{} {announced} result(s) to peers as {}{}",
            if was_connected {
                "reconnected; serving"
            } else {
                "serving"
            },
            peer.identity(),
            if was_connected {
                ""
            } else {
                "; Ctrl-C to stop"
            }
        ));
        was_connected = true;
        let mut announced_total = announced;
        link.send_replace(Link::Connected {
            identity: peer.identity().to_string(),
            announced: announced_total,
        });

        let serving = {
            let peer = peer.clone();
            let store = store.clone();
            tokio::spawn(async move { peer.serve(&store).await })
        };
        let mut serving = pin!(serving);
        let lost = loop {
            tokio::select! {
                () = &mut stop => {
                    peer.close().await;
                    return;
                }
                ended = &mut serving => {
                    break match ended {
                        Ok(Ok(())) => String::from("closed"),
                        Ok(Err(e)) => crate::pipeline::error_chain(&e),
                        Err(e) => e.to_string(),
                    };
                }
                Some((sealed, reply)) = news.recv() => {
                    let passed = sealed.passed();
                    // A failure means the connection is failing: the serve
                    // task ends too, and the reconnection announces all.
                    if peer.grants(&sealed.manifest.inputs.namespace)
                        && let Ok((accepted, _)) = peer.announce_sealed(vec![sealed]).await
                    {
                        if passed {
                            announced_total += accepted;
                        }
                        link.send_replace(Link::Connected {
                            identity: peer.identity().to_string(),
                            announced: announced_total,
                        });
                    }
                    let _ = reply.send(link.borrow().clone());
                }
            }
        };
        note(&format!(
            "the orchestrator connection was lost ({lost}); reconnecting"
        ));
        link.send_replace(Link::Reconnecting { last_error: lost });
    }
}

/// The daemon's socket for the store under `data_dir`: one daemon per store.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("daemon.sock")
}

fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("daemon.lock")
}

/// Why the daemon could not start or stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(
        "a reprise daemon (pid {pid}) already serves the store in {}; stop it first, or check it with `reprise daemon status`",
        .dir.display()
    )]
    AlreadyRunning { pid: String, dir: PathBuf },
    #[error("cannot set up the daemon's socket {}", .path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The running daemon: holds the lock for the store's data folder and its
/// socket (removed when [`Daemon::run`] returns).
#[derive(Debug)]
pub struct Daemon {
    listener: UnixListener,
    socket: PathBuf,
    _lock: Flock<std::fs::File>,
}

impl Daemon {
    /// Takes the store's daemon lock and binds its socket (mode 0600).
    pub fn bind(data_dir: &Path) -> Result<Daemon, DaemonError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::PermissionsExt;
        let socket = socket_path(data_dir);
        let err = |source| DaemonError::Socket {
            path: socket.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(err)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(lock_path(data_dir))
            .map_err(err)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(DaemonError::AlreadyRunning {
                    pid: pid.trim().to_string(),
                    dir: data_dir.to_path_buf(),
                });
            }
            Err((_, errno)) => return Err(err(errno.into())),
        };
        lock.set_len(0).map_err(err)?;
        lock.rewind().map_err(err)?;
        writeln!(lock, "{}", std::process::id()).map_err(err)?;
        // The lock is ours, so a socket file left there is stale.
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(err)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        Ok(Daemon {
            listener,
            socket,
            _lock: lock,
        })
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs until `stop`: serves the store through the orchestrator and
    /// answers the local socket.
    pub async fn run(
        self,
        connector: Connector,
        store: Store,
        stop: impl std::future::Future<Output = ()>,
        note: &(dyn Fn(&str) + Sync),
    ) {
        let (news_tx, news_rx) = mpsc::channel(256);
        let (link_tx, link_rx) = watch::channel(Link::Reconnecting {
            last_error: String::from("not connected yet"),
        });
        let ctx = Arc::new(LocalCtx {
            store: store.clone(),
            orchestrator: connector.settings.orchestrator.clone(),
            news: news_tx,
            link: link_rx,
        });
        let listener = self.listener;
        let accept = async {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move { answer_local(stream, &ctx).await });
                    }
                    Err(e) => {
                        note(&format!("the daemon socket failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        tokio::select! {
            () = stay_connected(&connector, None, &store, news_rx, &link_tx, stop, note) => {}
            () = accept => {}
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

struct LocalCtx {
    store: Store,
    orchestrator: String,
    news: mpsc::Sender<News>,
    link: watch::Receiver<Link>,
}

async fn answer_local(stream: UnixStream, ctx: &LocalCtx) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(local::MAX_LINE as u64 + 1);
    let read = reader.read_until(b'\n', &mut line);
    let answer = match tokio::time::timeout(Duration::from_secs(5), read).await {
        Err(_) => return,
        Ok(Err(_)) => return,
        Ok(Ok(_)) => match local::decode_request(line.strip_suffix(b"\n").unwrap_or(&line)) {
            Err(e) => Answer::Error {
                message: e.to_string(),
            },
            Ok(Request { body, .. }) => handle(body, ctx).await,
        },
    };
    let _ = write.write_all(&local::encode(&answer)).await;
    let _ = write.shutdown().await;
}

async fn handle(ask: Ask, ctx: &LocalCtx) -> Answer {
    match ask {
        Ask::Status => Answer::Status {
            pid: std::process::id(),
            store: ctx.store.root().display().to_string(),
            orchestrator: ctx.orchestrator.clone(),
            link: ctx.link.borrow().clone(),
        },
        Ask::Held {
            key,
            namespace,
            store,
        } => {
            if Path::new(&store) != ctx.store.root() {
                return Answer::Error {
                    message: format!(
                        "this daemon serves the store {}, not {store}",
                        ctx.store.root().display()
                    ),
                };
            }
            // Only what is really in the store, sealed, is announced.
            let stored = ctx
                .store
                .get(&key)
                .or_else(|| {
                    let failed = ctx.store.list_failed();
                    failed.into_iter().find(|r| r.manifest.key == key)
                })
                .filter(|r| r.manifest.inputs.namespace == namespace);
            let Some(stored) = stored else {
                return Answer::Error {
                    message: format!("the store holds no result {key} of {namespace}"),
                };
            };
            let Some(sealed) = stored.sealed() else {
                return Answer::Error {
                    message: format!(
                        "result {} is not sealed (made without credentials); it is never served",
                        key.short()
                    ),
                };
            };
            let (reply, answer) = oneshot::channel();
            if ctx.news.send((sealed, reply)).await.is_err() {
                return Answer::Error {
                    message: "the daemon is stopping".into(),
                };
            }
            let link = match tokio::time::timeout(Duration::from_secs(8), answer).await {
                Ok(Ok(link)) => link,
                _ => ctx.link.borrow().clone(),
            };
            Answer::Accepted { link }
        }
    }
}

/// Why the daemon could not be asked.
#[derive(Debug, Error)]
pub enum AskError {
    /// No daemon serves this store (no socket, or nobody listening).
    #[error("no reprise daemon is running for this store")]
    NoDaemon,
    #[error("the reprise daemon did not answer: {0}")]
    Broken(String),
    #[error("the reprise daemon refused: {0}")]
    Refused(String),
}

/// Sends one request to the daemon of the store under `data_dir`.
pub async fn ask_daemon(data_dir: &Path, ask: Ask) -> Result<Answer, AskError> {
    let socket = socket_path(data_dir);
    let mut stream = match UnixStream::connect(&socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AskError::NoDaemon);
        }
        Err(e) => return Err(AskError::Broken(e.to_string())),
    };
    let request = Request {
        version: local::LOCAL_VERSION,
        body: ask,
    };
    let exchange = async {
        stream.write_all(&local::encode(&request)).await?;
        let mut line = Vec::new();
        BufReader::new(&mut stream)
            .take(local::MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        Ok::<Vec<u8>, std::io::Error>(line)
    };
    let line = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Err(_) => return Err(AskError::Broken("no answer within 10s".into())),
        Ok(Err(e)) => return Err(AskError::Broken(e.to_string())),
        Ok(Ok(line)) => line,
    };
    match local::decode_answer(line.strip_suffix(b"\n").unwrap_or(&line)) {
        Ok(Answer::Error { message }) => Err(AskError::Refused(message)),
        Ok(answer) => Ok(answer),
        Err(e) => Err(AskError::Broken(e.to_string())),
    }
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`, for log lines.
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (proleptic Gregorian), era by era of 400 years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(utc_timestamp(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bases = [100, 200, 400, 800, 800, 800];
        for (d, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25),
                "{d:?} for {base:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn one_daemon_per_store_and_no_daemon_is_a_clear_answer() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            assert!(matches!(
                ask_daemon(dir.path(), Ask::Status).await,
                Err(AskError::NoDaemon)
            ));
            let first = Daemon::bind(dir.path()).unwrap();
            match Daemon::bind(dir.path()) {
                Err(DaemonError::AlreadyRunning { pid, .. }) => {
                    assert_eq!(pid, std::process::id().to_string());
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a second daemon bound the same store"),
            }
            let socket = first.socket().to_path_buf();
            drop(first);
            // A socket file left behind by a daemon that died is not a daemon.
            assert!(socket.exists());
            assert!(matches!(
                ask_daemon(dir.path(), Ask::Status).await,
                Err(AskError::NoDaemon)
            ));
            let again = Daemon::bind(dir.path()).unwrap();
            drop(again);
        });
    }

    #[test]
    fn the_daemon_answers_status_and_refuses_what_its_store_lacks() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let daemon = Daemon::bind(dir.path()).unwrap();
            let store = Store::new(dir.path().join("store"));
            let (news, mut news_rx) = mpsc::channel(4);
            let (_link_tx, link) = watch::channel(Link::Reconnecting {
                last_error: "x".into(),
            });
            let ctx = Arc::new(LocalCtx {
                store: store.clone(),
                orchestrator: "h:1".into(),
                news,
                link,
            });
            let server = {
                let ctx = ctx.clone();
                async move {
                    loop {
                        let (s, _) = daemon.listener.accept().await.unwrap();
                        answer_local(s, &ctx).await;
                    }
                }
            };
            let client = async {
                match ask_daemon(dir.path(), Ask::Status).await.unwrap() {
                    Answer::Status {
                        pid, orchestrator, ..
                    } => {
                        assert_eq!(pid, std::process::id());
                        assert_eq!(orchestrator, "h:1");
                    }
                    other => panic!("{other:?}"),
                }
                let held = |store: &Path| Ask::Held {
                    key: reprise_protocol::digest::Sha256Digest::of(b"k")
                        .hex()
                        .parse()
                        .unwrap(),
                    namespace: "n".into(),
                    store: store.display().to_string(),
                };
                let e = ask_daemon(dir.path(), held(store.root()))
                    .await
                    .unwrap_err();
                assert!(e.to_string().contains("holds no result"), "{e}");
                let e = ask_daemon(dir.path(), held(Path::new("/elsewhere")))
                    .await
                    .unwrap_err();
                assert!(e.to_string().contains("not /elsewhere"), "{e}");
                // A malformed line gets an error, not a hang.
                let mut s = UnixStream::connect(socket_path(dir.path())).await.unwrap();
                s.write_all(b"{\"version\":9}\n").await.unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).await.unwrap();
                assert!(answer.contains("version 9 is not supported"), "{answer}");
            };
            tokio::select! {
                () = server => unreachable!(),
                () = client => {}
            }
            assert!(news_rx.try_recv().is_err(), "nothing was announced");
        });
    }
}
