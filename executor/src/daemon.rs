//! `reprise daemon`: one per store, it serves the whole store to peers
//! ([`crate::serving`]) and answers a local socket over which `reprise run`
//! hands over its new results and `reprise daemon status` asks how it is.
//! With `--warm` it also keeps one warm guest ([`crate::vm::warm`]) that
//! it lends to the next `reprise run` of the same saved guest: the run
//! asks over the socket ([`Ask::Warm`]) and keeps the connection open while
//! it uses the guest; when the connection closes, the guest is killed and
//! the next one is made.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use reprise_protocol::local::{self, Answer, Ask, LinkState, Request};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::link::direct::Direct;
use crate::link::settings::{self, CREDENTIALS_VAR, ORCHESTRATOR_VAR};
use crate::link::{Orchestrator, RunLink};
use crate::serving::{News, serve_until};
use crate::store::{Store, StoredResult};
use crate::ui::Ui;
use crate::vm::WarmGuest;

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
    #[error(
        "the daemon needs an orchestrator: pass --orchestrator HOST:PORT and --credentials FILE, set {ORCHESTRATOR_VAR} and {CREDENTIALS_VAR}, or write them in {}",
        .0.display()
    )]
    NoOrchestrator(PathBuf),
    #[error(transparent)]
    Credentials(#[from] crate::link::CredentialsError),
    #[error("cannot listen for direct fetches on {addr} (--direct): {source}")]
    Direct {
        addr: SocketAddr,
        #[source]
        source: crate::link::LinkError,
    },
    #[error(
        "--direct needs an orchestrator: peers are introduced by it (pass --orchestrator and --credentials)"
    )]
    DirectWithoutOrchestrator,
    #[error("the daemon (pid {0}) did not stop within 10s")]
    DidNotStop(u32),
    #[error("the daemon did not answer within 10s; see {}", .0.display())]
    NoAnswer(PathBuf),
    #[error("the daemon exited ({status}):\n{log}")]
    Exited {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("signalling the daemon (pid {pid})")]
    Signal {
        pid: u32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("starting the daemon")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Ask(#[from] AskError),
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

    /// Runs until `stop`: serves the store through the orchestrator (if
    /// any), keeps a warm guest (if `warm`) and answers the local socket.
    pub async fn run(
        self,
        orchestrator: Option<Orchestrator>,
        warm: bool,
        direct: Option<Direct>,
        store: Store,
        stop: impl std::future::Future<Output = ()>,
        note: &(dyn Fn(&str) + Sync),
    ) {
        let (news_tx, news_rx) = mpsc::channel(256);
        let (link_tx, link_rx) = watch::channel(LinkState::Reconnecting {
            last_error: match orchestrator {
                Some(_) => String::from("not connected yet"),
                None => {
                    String::from("no orchestrator configured: this daemon only keeps a warm guest")
                }
            },
        });
        let slot = warm.then(|| Arc::new(WarmSlot::default()));
        let ctx = Arc::new(LocalCtx {
            store: store.clone(),
            orchestrator: orchestrator
                .as_ref()
                .map_or_else(String::new, |o| o.settings.orchestrator.clone()),
            serving: orchestrator.is_some(),
            news: news_tx,
            link: link_rx,
            warm: slot.clone(),
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
        let serve = async {
            match &orchestrator {
                Some(o) => {
                    let direct = direct.as_ref();
                    serve_until(o, None, &store, news_rx, &link_tx, stop, note, direct).await
                }
                None => stop.await,
            }
        };
        let serve_direct = async {
            match &direct {
                Some(d) => d.serve(&store).await,
                None => std::future::pending().await,
            }
        };
        let keep_warm = async {
            match &slot {
                Some(slot) => keep_warm(slot, note).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = serve => {}
            () = accept => {}
            () = run_schedules(note) => {}
            () = keep_warm => {}
            () = serve_direct => {}
        }
        if let Some(slot) = &slot
            && let WarmState::Ready { guest, .. } =
                std::mem::replace(&mut *slot.state.lock().await, WarmState::Making)
        {
            guest.kill().await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

struct LocalCtx {
    store: Store,
    orchestrator: String,
    /// Whether results are served (an orchestrator is configured).
    serving: bool,
    news: mpsc::Sender<News>,
    link: watch::Receiver<LinkState>,
    warm: Option<Arc<WarmSlot>>,
}

/// The daemon's one warm guest.
#[derive(Default)]
struct WarmSlot {
    state: tokio::sync::Mutex<WarmState>,
    /// Told when a lent guest's run has ended.
    returned: tokio::sync::Notify,
}

#[derive(Default)]
enum WarmState {
    #[default]
    Making,
    Ready {
        /// The saved guest it was restored from ([`SavedGuests::key`]).
        saved_guest: String,
        guest: Box<WarmGuest>,
    },
    Lent(String),
    Failed(String),
}

use crate::saved_guests::SavedGuests;

impl WarmState {
    fn describe(&self) -> String {
        match self {
            WarmState::Making => "being made".into(),
            WarmState::Ready { guest, .. } => format!("ready ({})", guest.id()),
            WarmState::Lent(id) => format!("lent to a run ({id}); the next is made when it ends"),
            WarmState::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// How long after a failed warm guest the next attempt waits.
const WARM_RETRY: Duration = Duration::from_secs(60);

/// Keeps one warm guest of the current base image, for the accelerator
/// this host uses and the machine shape of a run: makes one, waits until
/// it has been lent and its run has ended (or it died), makes the next.
/// The next is made after the run, not during it: under emulation both
/// would share the same cores.
async fn keep_warm(slot: &WarmSlot, note: &(dyn Fn(&str) + Sync)) {
    loop {
        *slot.state.lock().await = WarmState::Making;
        let made = make_warm().await;
        let ready = match made {
            Ok((saved_guest, guest)) => {
                note(&format!(
                    "warm guest {} ready in {:.1}s",
                    guest.id(),
                    guest.made_in.as_secs_f64()
                ));
                *slot.state.lock().await = WarmState::Ready {
                    saved_guest,
                    guest: Box::new(guest),
                };
                true
            }
            Err(why) => {
                note(&format!("no warm guest: {why}"));
                *slot.state.lock().await = WarmState::Failed(why);
                false
            }
        };
        if !ready {
            tokio::time::sleep(WARM_RETRY).await;
            continue;
        }
        // Until it is lent and returned, or dies unlent.
        loop {
            tokio::select! {
                () = slot.returned.notified() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            let mut state = slot.state.lock().await;
            if let WarmState::Ready { guest, .. } = &mut *state
                && !guest.alive()
            {
                note(&format!(
                    "warm guest {} died unused; making another",
                    guest.id()
                ));
                break;
            }
        }
    }
}

/// Restores and warms up a guest for a run of the current base image;
/// returns the saved guest's name and the guest.
async fn make_warm() -> Result<(String, WarmGuest), String> {
    let image = crate::image::ImageCache::default_location()
        .current()
        .ok_or("the base image is not built yet (a first `reprise run` builds it)")?;
    let choice = crate::accel::choose(&crate::accel::AccelFacts::probe(), None);
    let config = crate::driver::qemu::run_config(image, choice.accel);
    let saved_guest = SavedGuests::key(&config);
    let saved = SavedGuests::default_location()
        .ensure(&config, &mut |_| {})
        .await
        .map_err(|e| crate::text::error_chain(&e))?;
    let mut config = config;
    config.restore = Some(saved);
    let mut id = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| "no randomness for the guest's id".to_string())?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let guest = WarmGuest::make(&config, &id)
        .await
        .map_err(|e| crate::text::error_chain(&e))?;
    Ok((saved_guest, guest))
}

async fn answer_local(stream: UnixStream, ctx: &LocalCtx) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(local::MAX_LINE as u64 + 1);
    let read = reader.read_until(b'\n', &mut line);
    let mut lent = None;
    let answer = match tokio::time::timeout(Duration::from_secs(5), read).await {
        Err(_) => return,
        Ok(Err(_)) => return,
        Ok(Ok(_)) => match local::decode_request(line.strip_suffix(b"\n").unwrap_or(&line)) {
            Err(e) => Answer::Error {
                message: e.to_string(),
            },
            Ok(Request {
                body: Ask::Warm { saved_guest },
                ..
            }) => {
                let (answer, guest) = lend(&saved_guest, ctx).await;
                lent = guest;
                answer
            }
            Ok(Request { body, .. }) => handle(body, ctx).await,
        },
    };
    let _ = write.write_all(&local::encode(&answer)).await;
    let Some(guest) = lent else {
        let _ = write.shutdown().await;
        return;
    };
    // The run holds the connection while it uses the guest; it ends when
    // the run does (or dies), and the guest with it.
    let mut rest = reader.into_inner();
    let mut sink = [0u8; 64];
    while let Ok(n) = rest.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    guest.kill().await;
    if let Some(slot) = &ctx.warm {
        slot.returned.notify_one();
    }
}

/// Takes the warm guest for a run of `saved_guest`, if one is ready.
async fn lend(saved_guest: &str, ctx: &LocalCtx) -> (Answer, Option<Box<WarmGuest>>) {
    let no = |why: String| (Answer::NoWarm { why }, None);
    let Some(slot) = &ctx.warm else {
        return no("this daemon keeps no warm guest (start it with --warm)".into());
    };
    let mut state = slot.state.lock().await;
    match &mut *state {
        WarmState::Ready {
            saved_guest: has,
            guest,
        } if has == saved_guest => {
            if !guest.alive() {
                return no("the warm guest died".into());
            }
        }
        WarmState::Ready { .. } => {
            return no("the warm guest is of another image, accelerator or machine shape".into());
        }
        other => return no(format!("the warm guest is {}", other.describe())),
    }
    let WarmState::Ready { guest, .. } = std::mem::take(&mut *state) else {
        unreachable!("checked above");
    };
    *state = WarmState::Lent(guest.id().to_string());
    let lent = guest.lent();
    (
        Answer::Warm {
            pid: lent.pid,
            work: lent.work.display().to_string(),
            sockets: lent.sockets.display().to_string(),
            guest: lent.guest,
            accel: lent.accel.to_string(),
        },
        Some(guest),
    )
}

async fn handle(ask: Ask, ctx: &LocalCtx) -> Answer {
    let warm = match &ctx.warm {
        Some(slot) => Some(slot.state.lock().await.describe()),
        None => None,
    };
    match ask {
        Ask::Status => Answer::Status {
            pid: std::process::id(),
            store: ctx.store.root().display().to_string(),
            orchestrator: ctx.orchestrator.clone(),
            link: ctx.link.borrow().clone(),
            warm,
        },
        Ask::Warm { .. } => Answer::Error {
            message: "a warm guest is lent on a connection of its own".into(),
        },
        Ask::Held { .. } if !ctx.serving => Answer::Error {
            message: "this daemon serves no orchestrator (it only keeps a warm guest)".into(),
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

/// How often the daemon looks for scheduled targets that are due.
pub const SCHEDULE_TICK: Duration = Duration::from_secs(15);

/// Runs the scheduled targets of every recorded schedule when they are
/// due, one at a time, each as `reprise run --rev BRANCH --target TARGET`
/// in the repository's checkout (which hands its result to this daemon).
async fn run_schedules(note: &(dyn Fn(&str) + Sync)) {
    let schedules = crate::schedule::Schedules::default_location();
    let mut tick = tokio::time::interval(SCHEDULE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for schedule in schedules.list() {
            for entry in crate::schedule::due(&schedule, crate::store::now_secs()) {
                let started = crate::store::now_secs();
                note(&format!(
                    "scheduled {} of {} ({}) starts on {}",
                    entry.target, schedule.namespace, entry.cron, schedule.branch
                ));
                let code = run_scheduled(&schedule, &entry.target).await;
                note(&format!(
                    "scheduled {} of {} ended with exit code {code}",
                    entry.target, schedule.namespace
                ));
                if let Err(e) = schedules.ran(&schedule, &entry.target, started, code) {
                    note(&crate::text::error_chain(&e));
                }
            }
        }
    }
}

/// `reprise run` of one scheduled target; its exit code (`-1` when it
/// could not start).
async fn run_scheduled(schedule: &crate::schedule::Schedule, target: &str) -> i32 {
    let Ok(exe) = std::env::current_exe() else {
        return -1;
    };
    let status = tokio::process::Command::new(exe)
        .args(["run", "--rev", &schedule.branch, "--target", target])
        .args(["--driver", &schedule.driver])
        .current_dir(&schedule.checkout)
        .stdin(std::process::Stdio::null())
        // Its output, the tests' too, goes to the daemon's log.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .await;
    status.ok().and_then(|s| s.code()).unwrap_or(-1)
}

/// One line about the daemon's link to the orchestrator.
pub fn describe(link: &LinkState) -> String {
    match link {
        LinkState::Connected {
            identity,
            announced,
        } => format!("connected as {identity}, {announced} result(s) announced"),
        LinkState::Reconnecting { last_error } => {
            format!(
                "not connected to the orchestrator now: {last_error}; it announces everything when it is"
            )
        }
    }
}

/// After a run: a running daemon for this store takes the result and
/// serves it, and the run returns; otherwise, if `serve`, the run stays
/// connected and serves the store itself until SIGINT or SIGTERM
/// (connected mode), reconnecting if the orchestrator restarts. A run that
/// could not reach the orchestrator does not wait on it.
pub async fn hand_over_or_serve(
    result: &StoredResult,
    link: &mut RunLink,
    ui: &dyn Ui,
    serve: bool,
) {
    let data = crate::paths::data_dir();
    let store = Store::default_location();
    // Sealed results, passed or failed, are announced (a failed one so
    // that a disagreement between producers shows).
    let ask = if result.seal.is_some() {
        Ask::Held {
            key: result.manifest.key,
            namespace: result.manifest.inputs.namespace.clone(),
            store: store.root().display().to_string(),
        }
    } else {
        Ask::Status
    };
    let handed = match ask_daemon(&data, ask).await {
        Ok(Answer::Accepted { link }) => {
            ui.note(&format!(
                "handed the result to the reprise daemon, which serves it ({})",
                describe(&link)
            ));
            true
        }
        // A daemon that only keeps a warm guest serves nothing.
        Ok(Answer::Status { orchestrator, .. }) if orchestrator.is_empty() => false,
        Ok(Answer::Status { pid, link, .. }) => {
            ui.note(&format!(
                "the reprise daemon (pid {pid}) serves this store ({})",
                describe(&link)
            ));
            true
        }
        Ok(Answer::Error { .. } | Answer::Warm { .. } | Answer::NoWarm { .. })
        | Err(AskError::NoDaemon) => false,
        Err(e) => {
            ui.note(&format!("{e}; serving from here instead"));
            false
        }
    };
    if handed || !serve {
        link.close().await;
        return;
    }
    if link.get(ui).await.is_none() {
        return;
    }
    let Some((orchestrator, first)) = link.take() else {
        return;
    };
    let (_news, news_rx) = mpsc::channel(1);
    let (state, _) = watch::channel(LinkState::Reconnecting {
        last_error: String::new(),
    });
    serve_until(
        &orchestrator,
        Some(first),
        &store,
        news_rx,
        &state,
        crate::signals::interrupted(),
        &|line| ui.note(line),
        None,
    )
    .await;
}

/// How a running daemon is doing, or `None` when none serves the store
/// under `data_dir`.
pub async fn status(data_dir: &Path) -> Result<Option<Answer>, AskError> {
    match ask_daemon(data_dir, Ask::Status).await {
        Ok(answer @ Answer::Status { .. }) => Ok(Some(answer)),
        Ok(other) => Err(AskError::Broken(format!("answered {other:?}"))),
        Err(AskError::NoDaemon) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Stops the daemon serving the store under `data_dir` and waits until it
/// is gone. Returns its pid, or `None` when none was running.
pub async fn stop(data_dir: &Path) -> Result<Option<u32>, DaemonError> {
    let Some(Answer::Status { pid, .. }) = status(data_dir).await? else {
        return Ok(None);
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|source| DaemonError::Signal { pid, source })?;
    let socket = socket_path(data_dir);
    for _ in 0..100 {
        if !socket.exists() {
            return Ok(Some(pid));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DaemonError::DidNotStop(pid))
}

/// The orchestrator the daemon serves: from `flags` (address, credentials)
/// over the user's settings. Never from a repository: the daemon serves
/// the whole store.
pub fn orchestrator(
    flags: (Option<String>, Option<PathBuf>),
    ui: &dyn Ui,
) -> Result<Orchestrator, DaemonError> {
    let mut facts = settings::gather(None);
    if let Some(o) = flags.0 {
        facts.env.insert(ORCHESTRATOR_VAR.into(), o);
    }
    if let Some(c) = flags.1 {
        facts
            .env
            .insert(CREDENTIALS_VAR.into(), c.display().to_string());
    }
    let resolved = settings::resolve(&facts);
    for note in &resolved.notes {
        ui.note(note);
    }
    let settings = resolved
        .settings
        .ok_or_else(|| DaemonError::NoOrchestrator(settings::user_config_path()))?;
    Ok(Orchestrator::new(settings)?)
}

/// Serves the store under `data_dir` in the foreground until SIGINT or
/// SIGTERM (SIGHUP is ignored), logging with UTC timestamps to stderr; with
/// `warm`, keeps a warm guest too; with `direct`, peers the orchestrator
/// introduces fetch straight from that address. Without an orchestrator it
/// only keeps the warm guest.
pub async fn serve_in_foreground(
    data_dir: &Path,
    orchestrator: Option<Orchestrator>,
    warm: bool,
    direct: Option<SocketAddr>,
) -> Result<(), DaemonError> {
    let daemon = Daemon::bind(data_dir)?;
    let store = Store::default_location();
    let direct = match (direct, &orchestrator) {
        (None, _) => None,
        (Some(_), None) => return Err(DaemonError::DirectWithoutOrchestrator),
        (Some(addr), Some(o)) => Some(
            Direct::bind(addr, &o.credentials())
                .map_err(|source| DaemonError::Direct { addr, source })?,
        ),
    };
    let listening = direct.as_ref().map_or(String::new(), |d| {
        let over = if d.over_tcp() { "TCP and UDP" } else { "UDP" };
        d.local_addr().map_or(String::new(), |a| {
            format!(", direct fetches on {a} ({over})")
        })
    });
    eprintln!(
        "reprise daemon: pid {}, store {}, socket {}, orchestrator {}{}{listening}",
        std::process::id(),
        store.root().display(),
        daemon.socket().display(),
        orchestrator
            .as_ref()
            .map_or("none", |o| o.settings.orchestrator.as_str()),
        if warm { ", keeps a warm guest" } else { "" }
    );
    daemon
        .run(
            orchestrator,
            warm,
            direct,
            store,
            crate::signals::interrupted_not_hung_up(),
            &|line| {
                let now = crate::store::now_secs();
                eprintln!("{} reprise daemon: {line}", crate::text::utc_timestamp(now));
            },
        )
        .await;
    eprintln!("reprise daemon: stopped");
    Ok(())
}

/// Starts `reprise daemon` for `orchestrator` (and `--warm` if `warm`) in
/// the background, in a process group of its own, its output appended to
/// `daemon.log`, and waits until it answers. Returns its pid and the log's
/// path.
pub async fn detach(
    data_dir: &Path,
    orchestrator: Option<&Orchestrator>,
    warm: bool,
    direct: Option<SocketAddr>,
) -> Result<(u32, PathBuf), DaemonError> {
    use std::os::unix::process::CommandExt;
    let log_path = data_dir.join("daemon.log");
    let io = |source| DaemonError::Socket {
        path: log_path.clone(),
        source,
    };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io)?;
    let exe = std::env::current_exe().map_err(DaemonError::Spawn)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon");
    if let Some(orchestrator) = orchestrator {
        cmd.args(["--orchestrator", &orchestrator.settings.orchestrator])
            .arg("--credentials")
            .arg(&orchestrator.settings.credentials);
    }
    if warm {
        cmd.arg("--warm");
    }
    if let Some(direct) = direct {
        cmd.arg("--direct").arg(direct.to_string());
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(DaemonError::Spawn)?;
    for _ in 0..100 {
        if let Ok(Some(Answer::Status { pid, .. })) = status(data_dir).await {
            return Ok((pid, log_path));
        }
        if let Some(status) = child.try_wait().map_err(DaemonError::Spawn)? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(DaemonError::Exited {
                status,
                log: crate::paths::tail_lines(&log, 5),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(DaemonError::NoAnswer(log_path))
}

/// Asks the daemon of the store under `data_dir` to lend a warm guest
/// restored from `saved_guest`. On `Ok(Some(..))` the guest is this
/// process's while it holds the returned connection open.
pub async fn borrow_warm(
    data_dir: &Path,
    saved_guest: &str,
) -> Result<Option<(crate::vm::Lent, std::os::unix::net::UnixStream)>, String> {
    let socket = socket_path(data_dir);
    let mut stream = match UnixStream::connect(&socket).await {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let request = Request {
        version: local::LOCAL_VERSION,
        body: Ask::Warm {
            saved_guest: saved_guest.to_string(),
        },
    };
    let exchange = async {
        stream.write_all(&local::encode(&request)).await?;
        let mut line = Vec::new();
        // Byte by byte: nothing past the answer may be read ahead, the
        // connection stays open.
        let mut byte = [0u8; 1];
        while line.len() <= local::MAX_LINE {
            if stream.read(&mut byte).await? == 0 || byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        Ok::<Vec<u8>, std::io::Error>(line)
    };
    let line = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Err(_) => return Err("the reprise daemon did not answer within 10s".into()),
        Ok(Err(e)) => return Err(format!("the reprise daemon did not answer: {e}")),
        Ok(Ok(line)) => line,
    };
    match local::decode_answer(&line) {
        Ok(Answer::Warm {
            pid,
            work,
            sockets,
            guest,
            accel,
        }) => {
            let accel = accel.parse().map_err(|e: String| e)?;
            let stream = stream.into_std().map_err(|e| e.to_string())?;
            Ok(Some((
                crate::vm::Lent {
                    pid,
                    work: work.into(),
                    sockets: sockets.into(),
                    guest,
                    accel,
                },
                stream,
            )))
        }
        Ok(Answer::NoWarm { why }) => Err(why),
        Ok(Answer::Error { message }) => Err(message),
        Ok(other) => Err(format!("the reprise daemon answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            // (A child that another test of this process forks at that
            // moment holds a copy of the listener until it execs: until
            // then a connection is accepted by no one and breaks.)
            assert!(socket.exists());
            let mut answer = ask_daemon(dir.path(), Ask::Status).await;
            for _ in 0..100 {
                if !matches!(answer, Err(AskError::Broken(_))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                answer = ask_daemon(dir.path(), Ask::Status).await;
            }
            assert!(matches!(answer, Err(AskError::NoDaemon)), "{answer:?}");
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
            let (_link_tx, link) = watch::channel(LinkState::Reconnecting {
                last_error: "x".into(),
            });
            let ctx = Arc::new(LocalCtx {
                store: store.clone(),
                orchestrator: "h:1".into(),
                serving: true,
                news,
                link,
                warm: None,
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

    #[test]
    fn a_run_gets_no_warm_guest_unless_one_is_ready_for_it() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let daemon = Daemon::bind(dir.path()).unwrap();
            let (news, _news_rx) = mpsc::channel(4);
            let (_link_tx, link) = watch::channel(LinkState::Reconnecting {
                last_error: "x".into(),
            });
            let ctx = |warm: Option<Arc<WarmSlot>>| {
                Arc::new(LocalCtx {
                    store: Store::new(dir.path().join("store")),
                    orchestrator: String::new(),
                    serving: false,
                    news: news.clone(),
                    link: link.clone(),
                    warm,
                })
            };
            let without = ctx(None);
            let making = ctx(Some(Arc::new(WarmSlot::default())));
            let server = async {
                for ctx in [&without, &making] {
                    let (s, _) = daemon.listener.accept().await.unwrap();
                    answer_local(s, ctx).await;
                }
                // Status says how the warm guest is doing.
                let (s, _) = daemon.listener.accept().await.unwrap();
                answer_local(s, &making).await;
                std::future::pending::<()>().await;
            };
            let client = async {
                let e = borrow_warm(dir.path(), "k").await.unwrap_err();
                assert!(e.contains("keeps no warm guest"), "{e}");
                let e = borrow_warm(dir.path(), "k").await.unwrap_err();
                assert!(e.contains("being made"), "{e}");
                match ask_daemon(dir.path(), Ask::Status).await.unwrap() {
                    Answer::Status { warm, .. } => {
                        assert_eq!(warm.as_deref(), Some("being made"))
                    }
                    other => panic!("{other:?}"),
                }
            };
            tokio::select! {
                () = server => unreachable!(),
                () = client => {}
            }
            // No daemon at all: no warm guest, and no complaint.
            let none = tempfile::tempdir().unwrap();
            assert!(borrow_warm(none.path(), "k").await.unwrap().is_none());
        });
    }
}
