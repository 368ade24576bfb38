//! `reprise run`: resolve, key, replay on a hit, otherwise run in a fresh VM
//! (prepare-runtime in the guest, the target in the container), collect the
//! artifacts, and commit the result.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reprise_protocol::digest::RunKey;
use reprise_protocol::exit;
use reprise_protocol::key::{KEY_VERSION, KeyInputs};
use reprise_protocol::manifest::{Outcome, Phase, Producer, ResultManifest};
use reprise_protocol::record::{self, StreamId};
use thiserror::Error;

use crate::accel::{self, Accel, AccelFacts};
use crate::connected::Connector;
use crate::image::{Image, ImageCache, ImageError};
use crate::layers::{Base, LayerError, Layers, RepoId};
use crate::peer::{Found, Peer};
use crate::redact::Redactor;
use crate::replay::{self, ReplayError};
use crate::repo::{Checkout, RepoError, Revision};
use crate::states::States;
use crate::store::{Lookup, Retention, Sealer, Store, StoreError, StoredResult};
use crate::vm::{
    BootError, GUEST_STATE_DEVICE, GuestCommand, STATE_OVERLAY, StateDisk, Stream, Vm, VmConfig,
    VmError,
};

/// The driver class that goes into the key.
pub const DRIVER: &str = "qemu";
const CI: &str = "/var/run/ci";
/// Where the repository's state disk is mounted in the guest.
const STATE: &str = "/var/lib/reprise/state";

/// Flushes and checkpoints the state disk's file system, so the disk file
/// is consistent once qemu stops.
fn freeze_state() -> String {
    format!("sync; fsfreeze -f {STATE} && fsfreeze -u {STATE}")
}
const GUEST_MK: &str = "/reprise/bin/mk";
/// Where `/var/run/ci/artifacts` points: a folder of the data disk.
const ARTIFACTS: &str = "/reprise/artifacts";
const GUEST_PATH: &str =
    "/reprise/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// A folder inside the checkout.
    pub dir: PathBuf,
    pub rev: Option<String>,
    pub target: String,
    /// Counted variables given on the command line.
    pub env: Vec<(String, String)>,
    /// Secret variable names given on the command line.
    pub secrets: Vec<String>,
    pub network: bool,
    pub timeout: Option<Duration>,
    pub accel: Option<Accel>,
    pub artifacts_dir: PathBuf,
    pub retention: Retention,
    /// Boot the bare base image, not the repository's snapshot.
    pub fresh: bool,
    /// Keep the run's work folder and say where.
    pub keep_work: bool,
}

/// Why a run did not produce a result.
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{0}")]
    Contract(String),
    #[error("{0}")]
    Usage(String),
    #[error("the base image")]
    Image(#[from] ImageError),
    #[error("booting the VM")]
    Boot(#[from] BootError),
    #[error("in the VM")]
    Vm(#[from] VmError),
    #[error("in the VM: {}\n--- last lines of the guest console ---\n{console}", error_chain(.error))]
    Guest { error: VmError, console: String },
    #[error("`mk prepare-runtime` failed with status {code}")]
    Prepare { code: i32, console: String },
    #[error("the run reached its timeout of {0:?}; the VM was stopped and nothing was kept")]
    Timeout(Duration),
    #[error("the result store")]
    Store(#[from] StoreError),
    #[error("replaying the stored result")]
    Replay(#[from] ReplayError),
    #[error("the repository's snapshot")]
    Layer(#[from] LayerError),
    #[error("{0}")]
    Infra(String),
}

impl RunError {
    /// The documented exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Repo(RepoError::Config { .. }) => exit::CONTRACT,
            RunError::Repo(RepoError::Io { .. } | RepoError::Git(_)) => exit::INFRA,
            RunError::Repo(_) => exit::REPOSITORY,
            RunError::Contract(_) => exit::CONTRACT,
            RunError::Usage(_) => exit::USAGE,
            RunError::Prepare { .. } => exit::PREPARE_FAILED,
            RunError::Timeout(_) => exit::TIMEOUT,
            RunError::Store(StoreError::Full(_)) => exit::STORE_FULL,
            RunError::Image(ImageError::DiskFull { .. }) => exit::STORE_FULL,
            // A symlink in the artifacts folder: the repository's doing.
            RunError::Replay(ReplayError::Unsafe(_)) => exit::CONTRACT,
            _ => exit::INFRA,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// A stored result was replayed; no VM was booted.
    Replayed(StoredResult),
    /// The tests ran; the result is stored (passed or failed).
    Ran(StoredResult),
}

impl RunOutcome {
    /// The stored result, replayed or made.
    pub fn result(&self) -> &StoredResult {
        match self {
            RunOutcome::Replayed(r) | RunOutcome::Ran(r) => r,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self.result().manifest.outcome {
            Outcome::Passed => exit::SUCCESS,
            Outcome::Failed => exit::TESTS_FAILED,
        }
    }
}

/// What the user sees besides the tests' own output.
pub trait Ui: Send + Sync {
    /// A one-line note (dirty tree, accelerator, provenance).
    fn note(&self, line: &str);
    /// A phase finished.
    fn phase(&self, name: &str, took: Duration);
    /// The base image build reports a step.
    fn image_step(&self, step: &str);
}

/// A resolved revision and its key.
#[derive(Debug)]
pub struct Keyed {
    pub checkout_root: PathBuf,
    pub revision: Revision,
    pub inputs: KeyInputs,
    pub dirty: bool,
}

/// Resolves the revision and computes the key, reading nothing but git
/// objects (the tree id already hashes every file).
pub fn compute_key(
    dir: &Path,
    rev: Option<&str>,
    target: &str,
    cli_env: &[(String, String)],
    network: bool,
    check_dirty: Option<&Path>,
) -> Result<Keyed, RunError> {
    let checkout = Checkout::discover(dir)?;
    let revision = checkout.resolve(rev)?;
    let mut env = BTreeMap::new();
    for name in &revision.config.env {
        if let Ok(value) = std::env::var(name) {
            env.insert(name.clone(), value);
        }
    }
    for (name, value) in cli_env {
        if revision.config.secrets.contains(name) {
            return Err(RunError::Usage(format!(
                "{name} is declared secret in reprise.toml; it cannot be counted"
            )));
        }
        env.insert(name.clone(), value.clone());
    }
    let inputs = KeyInputs {
        version: KEY_VERSION,
        namespace: revision.namespace.clone(),
        tree: revision.tree.clone(),
        target: target.to_string(),
        env,
        // The recipe's hash, not the disk's: every machine that builds the
        // same recipe must agree on the key (see ARCHITECTURE.md).
        image_digest: format!(
            "recipe:{}",
            crate::image::recipe_hash(crate::image::RECIPE_FILES)
        ),
        driver: DRIVER.into(),
        network,
    };
    Ok(Keyed {
        checkout_root: checkout.root(),
        dirty: check_dirty.is_some_and(|ignore| checkout.is_dirty(Some(ignore))),
        revision,
        inputs,
    })
}

/// Whether the mkfile defines `target` (a rule naming it, or one of the
/// well-known targets that the standard include provides).
pub fn mkfile_defines(mkfile: &str, target: &str) -> bool {
    let includes_ci = mkfile
        .lines()
        .any(|l| l.starts_with('<') && l.trim_end().ends_with("ci.mk"));
    if includes_ci && ["prepare-runtime", "base-image", "post-test"].contains(&target) {
        return true;
    }
    mkfile.lines().any(|line| {
        if line.starts_with([' ', '\t', '#']) {
            return false;
        }
        let Some((targets, _)) = line.split_once(':') else {
            return false;
        };
        if targets.contains('=') {
            return false;
        }
        targets.split_whitespace().any(|t| t == target)
    })
}

/// The orchestrator connection, made on first need: a local hit with
/// `--no-serve` never connects. The credentials are loaded on first need
/// too, and seal the run's result whether or not the orchestrator is
/// reachable.
#[derive(Debug)]
pub struct Remote {
    dir: PathBuf,
    connector: Option<Connector>,
    peer: Option<Peer>,
    loaded: bool,
    tried: bool,
}

impl Remote {
    pub fn new(dir: &Path) -> Remote {
        Remote {
            dir: dir.to_path_buf(),
            connector: None,
            peer: None,
            loaded: false,
            tried: false,
        }
    }

    /// The configured orchestrator and loaded credentials, if any (notes
    /// say what was ignored, once).
    pub fn connector(&mut self, ui: &dyn Ui) -> Option<&Connector> {
        if !self.loaded {
            self.loaded = true;
            self.connector = connector_from_settings(&self.dir, ui);
        }
        self.connector.as_ref()
    }

    /// The connection, if an orchestrator is configured and reachable.
    /// Configured but unusable (bad credentials, unreachable) is a one-line
    /// note: a run never fails for want of an orchestrator.
    pub async fn get(&mut self, ui: &dyn Ui) -> Option<&Peer> {
        if !self.tried {
            self.tried = true;
            if let Some(connector) = self.connector(ui).cloned() {
                match connector.connect().await {
                    Ok(peer) => self.peer = Some(peer),
                    Err(e) => ui.note(&format!(
                        "cannot reach the orchestrator at {}: {e}; running without it",
                        connector.settings.orchestrator
                    )),
                }
            }
        }
        self.peer.as_ref()
    }

    /// The connection if one was made.
    pub fn connected(&self) -> Option<&Peer> {
        self.peer.as_ref()
    }

    /// Takes the connection and what made it (to stay connected).
    pub fn take(&mut self) -> Option<(Connector, Peer)> {
        Some((self.connector.clone()?, self.peer.take()?))
    }
}

/// The orchestrator and credentials the user configured
/// ([`crate::settings`]), with the credentials loaded; `None` when nothing
/// is configured, or with a note when the credentials cannot be used.
pub fn connector_from_settings(dir: &Path, ui: &dyn Ui) -> Option<Connector> {
    let root = Checkout::discover(dir).ok().map(|c| c.root());
    let resolved = crate::settings::resolve(&crate::settings::gather(root.as_deref()));
    for note in &resolved.notes {
        ui.note(note);
    }
    match Connector::new(resolved.settings?) {
        Ok(c) => Some(c),
        Err(e) => {
            ui.note(&format!(
                "{}; running without the orchestrator",
                error_chain(&e)
            ));
            None
        }
    }
}

/// Asks the orchestrator for a result that counts and fetches it; every
/// check happens in [`Peer::fetch_into`] before anything is committed. Any
/// failure is a note and a real run; so is a conflict between trusted
/// producers.
async fn fetch_from_peers(
    peer: &Peer,
    inputs: &KeyInputs,
    store: &Store,
    ui: &dyn Ui,
) -> Option<(StoredResult, Source)> {
    let key = inputs.key();
    let (producer, counts) = match peer.lookup(&key, &inputs.namespace).await {
        Ok(Found::Offer { producer, counts }) => (producer, counts),
        Ok(Found::NotFound) => return None,
        Ok(Found::Conflict { producers }) => {
            ui.note(&format!(
                "trusted producers disagree on result {} ({}): neither counts for CI until one is revoked or the repository's policy prefers one; running the tests here",
                key.short(),
                producers.join(", ")
            ));
            return None;
        }
        Err(e) => {
            ui.note(&format!(
                "orchestrator lookup failed: {e}; running the tests here"
            ));
            return None;
        }
    };
    match peer
        .fetch_into(&key, &inputs.namespace, inputs, store)
        .await
    {
        Ok((result, signed_by)) => Some((
            result,
            Source::Peer {
                producer: signed_by.name,
                counts,
            },
        )),
        Err(e) => {
            ui.note(&format!(
                "the result offered by {producer} was refused: {}; running the tests here",
                error_chain(&e)
            ));
            None
        }
    }
}

/// Runs (or replays) the request. `remote` is the orchestrator, asked on a
/// local miss.
pub async fn run(
    req: &RunRequest,
    remote: &mut Remote,
    ui: &dyn Ui,
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let keyed = compute_key(
        &req.dir,
        req.rev.as_deref(),
        &req.target,
        &req.env,
        req.network,
        Some(&req.artifacts_dir),
    )?;
    if keyed.dirty {
        ui.note("the working tree has uncommitted changes; they are ignored (the run uses the committed tree)");
    }
    let secrets = secret_values(&keyed.revision, &req.secrets)?;
    let store = Store::default_location();
    let key = keyed.inputs.key();
    match store.lookup(&keyed.inputs) {
        Lookup::Hit(result) => match local_seal(&result, remote, ui) {
            Ok(sealed_by) => {
                replay_result(
                    &store,
                    &result,
                    &req.artifacts_dir,
                    Source::Local { sealed_by },
                    ui,
                )?;
                return Ok(RunOutcome::Replayed(result));
            }
            Err(why) => ui.note(&format!(
                "the stored result {} is not replayed: its seal does not hold ({why})",
                key.short()
            )),
        },
        Lookup::Miss { nearest } => {
            if let Some((near, diff)) = nearest {
                let what: Vec<&str> = diff.iter().map(|d| d.0.as_str()).collect();
                ui.note(&format!(
                    "no stored result for {}; nearest ({}) differs in: {}",
                    key.short(),
                    near.manifest.key.short(),
                    what.join(", ")
                ));
            }
        }
    }
    if let Some(peer) = remote.get(ui).await
        && let Some((result, source)) = fetch_from_peers(peer, &keyed.inputs, &store, ui).await
    {
        replay_result(&store, &result, &req.artifacts_dir, source, ui)?;
        return Ok(RunOutcome::Replayed(result));
    }
    let mkfile = keyed.revision.mkfile.as_deref().ok_or_else(|| {
        RunError::Contract(format!(
            "revision {} has no mkfile at its root (add one; see mkfiles/ci.mk)",
            &keyed.revision.commit[..12]
        ))
    })?;
    if !mkfile_defines(mkfile, &req.target) {
        return Err(RunError::Contract(format!(
            "the mkfile of {} has no '{}' target (add a rule '{}:V:')",
            &keyed.revision.commit[..12],
            req.target,
            req.target
        )));
    }

    let image = tokio::task::block_in_place(|| {
        ImageCache::default_location().ensure(&mut |step| ui.image_step(step))
    })?;
    let choice = accel::choose(&AccelFacts::probe(), req.accel);
    ui.note(&format!("accelerator {}", choice.reason));

    let work = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| RunError::Infra(format!("cannot make a work folder: {e}")))?;
    let tree = work.path().join("tree");
    let checkout = Checkout::discover(&keyed.checkout_root)?;
    checkout.export(&keyed.revision.tree, &tree)?;

    let layers = Layers::default_location();
    let repo_id = RepoId {
        namespace: keyed.inputs.namespace.clone(),
        root_commit: keyed.revision.root_commit.clone(),
    };
    let layer = if req.fresh {
        None
    } else {
        layers.current(&repo_id, &image)
    };
    let state_base = match layer {
        Some(layer) => {
            ui.note(&format!(
                "using this repository's snapshot (generation {}; --fresh for a blank one)",
                layer.generation.short()
            ));
            Base::Layer(layer)
        }
        None => Base::Blank(tokio::task::block_in_place(|| layers.blank())?),
    };
    let mut config = VmConfig::new(image.clone(), choice.accel);
    config.tree = Some(tree);
    config.network = req.network;
    config.state_disk = Some(StateDisk::On(state_base.path().to_path_buf()));
    let states = States::default_location();
    // A run with network boots cold: the saved guest has no network card.
    // REPRISE_COLD_BOOT=1 boots cold too (to compare, or to rule the saved
    // guest out when something looks wrong).
    let cold = std::env::var_os("REPRISE_COLD_BOOT").is_some_and(|v| !v.is_empty() && v != "0");
    if !req.network && !cold {
        match states
            .ensure(&config, &mut |step| ui.image_step(step))
            .await
        {
            Ok(saved) => config.restore = Some(saved),
            Err(e) => ui.note(&format!(
                "booting cold: no saved guest state ({})",
                error_chain(&e)
            )),
        }
    }
    let in_vm = run_in_vm(
        &config,
        &states,
        req,
        mkfile,
        &keyed,
        &secrets,
        work.path(),
        ui,
    );
    let ran = match req.timeout {
        Some(limit) => tokio::time::timeout(limit, in_vm)
            .await
            .map_err(|_| RunError::Timeout(limit))?,
        None => in_vm.await,
    }?;
    // Only a run whose tests passed writes the repository's snapshot: a
    // failed run could have planted anything (an image that makes later
    // tests pass); a timed-out or interrupted one never gets here.
    let snapshot = state_base.snapshot();
    let overlay = work.path().join("vm").join(STATE_OVERLAY);
    if ran.exit_code == 0 {
        update_layer(&layers, &repo_id, &image, state_base, &overlay, &key, ui);
    } else {
        drop(state_base);
    }
    let _ = std::fs::remove_file(&overlay);
    if req.keep_work {
        let kept = work.keep();
        ui.note(&format!("kept the run's work folder: {}", kept.display()));
    }

    let outcome = if ran.exit_code == 0 {
        Outcome::Passed
    } else {
        Outcome::Failed
    };
    let mut phases = ran.phases;
    let total_ms = started.elapsed().as_millis() as u64;
    phases.push(Phase {
        name: "total".into(),
        ms: total_ms,
    });
    let manifest = ResultManifest {
        version: reprise_protocol::manifest::MANIFEST_VERSION,
        key,
        inputs: keyed.inputs.clone(),
        commit: keyed.revision.commit.clone(),
        outcome,
        exit_code: ran.exit_code,
        phases,
        total_ms,
        accel: choice.accel.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        producer: producer(),
        created_at: crate::store::now_secs(),
        snapshot,
        output_sha256: reprise_protocol::digest::Sha256Digest::of(b""),
        output_bytes: 0,
        artifacts: Vec::new(),
    };
    // Sealed now, by this producer, once: the seal travels with the result.
    let sealer = remote.connector(ui).map(|c| c.credentials());
    let stored = store.commit(
        manifest,
        &ran.record,
        ran.artifacts.as_deref(),
        sealer.map(|c| c as &dyn Sealer),
    )?;
    if outcome == Outcome::Passed {
        replay::restore_artifacts(&store, &stored, &req.artifacts_dir)?;
        let _ = store.gc(req.retention);
        ui.note(&format!(
            "passed in {:.1}s; result {} stored{}{}",
            total_ms as f64 / 1000.0,
            key.short(),
            if stored.seal.is_some() {
                ""
            } else {
                " (not sealed: no credentials are configured, so it is never served and never counts for CI)"
            },
            artifacts_note(&stored, &req.artifacts_dir)
        ));
    } else {
        ui.note(&format!(
            "tests failed (status {}); the run is kept for inspection as {} and will not be replayed",
            ran.exit_code,
            key.short()
        ));
    }
    Ok(RunOutcome::Ran(stored))
}

/// Folds the stopped VM's disk changes into a new generation of the
/// repository's snapshot. A failure here costs the next run time, not this
/// run its result: it is a note, not an error.
fn update_layer(
    layers: &Layers,
    repo: &RepoId,
    image: &Image,
    base: Base,
    overlay: &Path,
    key: &RunKey,
    ui: &dyn Ui,
) {
    let t = Instant::now();
    match layers.update(repo, image, overlay, base, key) {
        Ok(_) => ui.phase("snapshot", t.elapsed()),
        Err(e) => ui.note(&format!("could not update the repository's snapshot: {e}")),
    }
}

fn artifacts_note(result: &StoredResult, dir: &Path) -> String {
    match result.manifest.artifacts.len() {
        0 => String::new(),
        n => format!(", {n} artifact(s) in {}", dir.display()),
    }
}

/// Where a replayed result came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The local store; `sealed_by` names who sealed it (`None`: made here
    /// without credentials).
    Local { sealed_by: Option<String> },
    /// Through the orchestrator: sealed by `producer`, counting for CI for
    /// the reason `counts`.
    Peer { producer: String, counts: String },
}

/// Checks the seal of a locally stored result before it is replayed: who
/// sealed it, if anyone. A seal that does not hold (a store changed by
/// hand, a certificate from another team) keeps it from being replayed.
/// Without credentials nothing can be checked against the team CA, so the
/// name is the certificate's claim, and said to be one.
fn local_seal(
    result: &StoredResult,
    remote: &mut Remote,
    ui: &dyn Ui,
) -> Result<Option<String>, String> {
    let Some(seal) = &result.seal else {
        return Ok(None);
    };
    match remote.connector(ui) {
        Some(connector) => reprise_protocol::seal::verify(
            seal,
            &result.manifest,
            &[connector.credentials().ca().clone()],
            rustls::pki_types::UnixTime::now(),
            &Default::default(),
        )
        .map(|who| Some(who.name))
        .map_err(|e| e.to_string()),
        None => seal
            .claimed()
            .map(|who| {
                Some(format!(
                    "{} (unchecked: no credentials configured)",
                    who.name
                ))
            })
            .map_err(|e| e.to_string()),
    }
}

/// Replays a stored result and says where it came from.
pub fn replay_result(
    store: &Store,
    result: &StoredResult,
    artifacts: &Path,
    source: Source,
    ui: &dyn Ui,
) -> Result<(), RunError> {
    // Everything is checked before a byte reaches the user's streams.
    let entries = replay::verify(result)?;
    replay::restore_artifacts(store, result, artifacts)?;
    replay::write_output(&entries, &mut std::io::stdout(), &mut std::io::stderr())
        .map_err(|e| RunError::Infra(format!("writing the replayed output: {e}")))?;
    let m = &result.manifest;
    let (from, sealed) = match source {
        Source::Local { sealed_by: None } => (
            "the local store".to_string(),
            "not sealed: made here without credentials, never served, does not count for CI"
                .to_string(),
        ),
        Source::Local {
            sealed_by: Some(name),
        } => (
            "the local store".to_string(),
            format!("sealed by {name}; `reprise results show` asks whether it counts for CI"),
        ),
        Source::Peer { producer, counts } => (
            format!("peer '{producer}' through the orchestrator"),
            format!("sealed by {producer}; counts for CI: {counts}"),
        ),
    };
    ui.note(&format!(
        "replayed result {} from {from}: produced by {}@{} {} ago, took {:.1}s under {} ({}, snapshot {}, network {}; {sealed}){}",
        m.key.short(),
        m.producer.user,
        m.producer.host,
        ago(crate::store::now_secs().saturating_sub(m.created_at)),
        m.total_ms as f64 / 1000.0,
        m.accel,
        m.inputs.driver,
        short_snapshot(&m.snapshot),
        if m.inputs.network { "yes" } else { "none" },
        artifacts_note(result, artifacts)
    ));
    Ok(())
}

/// `fresh`, or the first digits of a generation.
pub fn short_snapshot(s: &reprise_protocol::manifest::Snapshot) -> String {
    match s {
        reprise_protocol::manifest::Snapshot::Fresh => "fresh".into(),
        reprise_protocol::manifest::Snapshot::Generation(g) => g.short(),
    }
}

fn ago(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn producer() -> Producer {
    Producer {
        host: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into()),
        user: std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .ok()
            .or_else(|| {
                nix::unistd::User::from_uid(nix::unistd::getuid())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .unwrap_or_else(|| nix::unistd::getuid().to_string()),
    }
}

/// The secrets' values from this process's environment: those the
/// repository declares (skipped with a note if unset) and those given with
/// `--secret` (an error if unset).
fn secret_values(revision: &Revision, cli: &[String]) -> Result<Vec<(String, String)>, RunError> {
    let mut out = Vec::new();
    for name in &revision.config.secrets {
        if let Ok(v) = std::env::var(name) {
            out.push((name.clone(), v));
        }
    }
    for name in cli {
        if revision.config.env.contains(name) {
            return Err(RunError::Usage(format!(
                "{name} is declared counted in reprise.toml; it cannot be a secret"
            )));
        }
        match std::env::var(name) {
            Ok(v) => out.push((name.clone(), v)),
            Err(_) => {
                return Err(RunError::Usage(format!(
                    "--secret {name}: {name} is not set in the environment"
                )));
            }
        }
    }
    Ok(out)
}

struct Ran {
    exit_code: i32,
    record: Vec<u8>,
    phases: Vec<Phase>,
    artifacts: Option<PathBuf>,
    /// The state disk was already frozen by the last guest command.
    state_frozen: bool,
}

/// Output of a command: live to the terminal, redacted, and recorded.
struct Recorder {
    record: Vec<u8>,
    start: Instant,
    redact: [Redactor; 2],
    keep: bool,
}

impl Recorder {
    fn new(secrets: &[String], keep: bool) -> Recorder {
        Recorder {
            record: Vec::new(),
            start: Instant::now(),
            redact: [Redactor::new(secrets), Redactor::new(secrets)],
            keep,
        }
    }

    fn emit(&mut self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let at = self.start.elapsed().as_millis() as u32;
        let _ = match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            Stream::Stderr => std::io::stderr().lock().write_all(bytes),
        };
        if self.keep {
            let id = match stream {
                Stream::Stdout => StreamId::Stdout,
                Stream::Stderr => StreamId::Stderr,
            };
            record::push(&mut self.record, id, at, bytes);
        }
    }

    fn feed(&mut self, stream: Stream, bytes: &[u8]) {
        let clean = self.redact[stream as usize].feed(bytes);
        self.emit(stream, &clean);
    }

    fn finish(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = self.redact[stream as usize].finish();
            self.emit(stream, &rest);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_in_vm(
    config: &VmConfig,
    states: &States,
    req: &RunRequest,
    mkfile: &str,
    keyed: &Keyed,
    secrets: &[(String, String)],
    work: &Path,
    ui: &dyn Ui,
) -> Result<Ran, RunError> {
    let mut phases = Vec::new();
    let phase = |name: &str, since: Instant, phases: &mut Vec<Phase>| {
        let took = since.elapsed();
        ui.phase(name, took);
        phases.push(Phase {
            name: name.into(),
            ms: took.as_millis() as u64,
        });
    };
    let secret_values: Vec<String> = secrets.iter().map(|(_, v)| v.clone()).collect();
    let mut env: BTreeMap<String, String> = keyed.inputs.env.clone();
    env.extend(secrets.iter().cloned());
    env.insert("PATH".into(), GUEST_PATH.into());

    let t = Instant::now();
    let vm = match Vm::boot(config).await {
        Err(e) if config.restore.is_some() => {
            // A state that does not load (qemu changed under it, a damaged
            // file) is made anew next time; this run boots cold.
            ui.note(&format!(
                "the saved guest state did not restore ({}); booting cold",
                error_chain(&e)
            ));
            if let Some(saved) = &config.restore {
                states.discard(saved);
            }
            let mut cold = config.clone();
            cold.restore = None;
            Vm::boot(&cold).await?
        }
        booted => booted?,
    };
    phase(
        if config.restore.is_some() {
            "restore"
        } else {
            "boot"
        },
        t,
        &mut phases,
    );
    let ran = in_guest(
        &vm,
        req,
        mkfile,
        keyed,
        &env,
        &secret_values,
        work,
        &phase,
        phases,
    )
    .await;
    let ran = ran.map_err(|e| match e {
        RunError::Vm(error) => RunError::Guest {
            error,
            console: vm.console_tail(15),
        },
        other => other,
    })?;
    // A consistent state disk for the snapshot: freeze (flush and
    // checkpoint the file system), thaw, then stop qemu and keep the overlay.
    if !ran.state_frozen {
        let _ = vm.exec(&GuestCommand::shell(&freeze_state())).await;
    }
    vm.stop_keeping(&work.join("vm")).await?;
    Ok(ran)
}

/// The run's steps inside the booted guest, from prepare-runtime to the
/// collected artifacts.
#[allow(clippy::too_many_arguments)]
async fn in_guest(
    vm: &Vm,
    req: &RunRequest,
    mkfile: &str,
    keyed: &Keyed,
    env: &BTreeMap<String, String>,
    secret_values: &[String],
    work: &Path,
    phase: &(dyn Fn(&str, Instant, &mut Vec<Phase>) + Sync),
    mut phases: Vec<Phase>,
) -> Result<Ran, RunError> {
    // prepare-runtime, as root in the guest, from the repository root.
    let t = Instant::now();
    // The repository's state disk holds podman's storage and
    // /var/run/ci (a tmpfs in the guest otherwise), so container images and
    // cache/ reach the repository's snapshot. env/ starts empty every run;
    // artifacts/ is a folder of the data disk, which the host reads
    // directly afterwards.
    let mut setup = GuestCommand::shell(&format!(
        "mkdir -p {STATE} /var/lib/containers && \
         mount -t ext4 -o rw,noatime {GUEST_STATE_DEVICE} {STATE} && \
         mkdir -p {STATE}/containers {STATE}/ci && \
         mount --bind {STATE}/containers /var/lib/containers && \
         ln -sfn {STATE}/ci /run/ci && \
         rm -rf {CI}/env {CI}/artifacts && mkdir -p {CI}/env {CI}/cache {ARTIFACTS} && \
         ln -s {ARTIFACTS} {CI}/artifacts"
    ));
    setup.env = env.clone();
    let out = vm.exec(&setup).await?;
    if !out.success() {
        return Err(RunError::Infra(format!(
            "setting up {CI} in the guest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    if mkfile_defines(mkfile, "prepare-runtime") {
        let code = guest_mk(vm, "prepare-runtime", None, env, secret_values).await?;
        if code != 0 {
            return Err(RunError::Prepare {
                code,
                console: vm.console_tail(20),
            });
        }
    }
    phase("prepare-runtime", t, &mut phases);

    // /var/run/ci/env: each file a variable of the container.
    let listing = vm
        .exec(&GuestCommand::shell(&format!(
            "cd {CI}/env && for f in *; do [ -f \"$f\" ] || continue; printf '%s\\0' \"$f\"; cat \"$f\"; printf '\\0'; done"
        )))
        .await?;
    let ci_env = parse_env_listing(&listing.stdout);
    let image = ci_env.get("CONTAINERIMAGE").cloned().ok_or_else(|| {
        RunError::Contract(format!(
            "prepare-runtime did not write {CI}/env/CONTAINERIMAGE (include </usr/lib/reprise/ci.mk and set CONTAINERIMAGE, or write the file in prepare-runtime)"
        ))
    })?;

    // The target, in the container, with the repository as working directory.
    let t = Instant::now();
    let mut container_env = env.clone();
    container_env.remove("PATH");
    container_env.extend(ci_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut argv: Vec<String> = [
        "podman",
        "run",
        "--rm",
        "--pull=never",
        "--network",
        if req.network { "host" } else { "none" },
        "-v",
        "/repo:/repo",
        "-w",
        "/repo",
        "-v",
        "/reprise/bin/mk:/usr/local/bin/mk:ro",
        "-v",
        "/usr/lib/reprise:/usr/lib/reprise:ro",
    ]
    .map(String::from)
    .to_vec();
    for name in container_env.keys() {
        // The value travels in podman's own environment, never in argv.
        argv.extend(["--env".into(), name.clone()]);
    }
    argv.extend([
        image.clone(),
        "/usr/local/bin/mk".into(),
        req.target.clone(),
    ]);
    let mut test = GuestCommand::new(argv).cwd(crate::vm::GUEST_REPO);
    test.env = container_env;
    test.env.insert("PATH".into(), GUEST_PATH.into());
    let mut recorder = Recorder::new(secret_values, true);
    let exit_code = vm
        .exec_streaming(&test, &mut |s, b| recorder.feed(s, b))
        .await?;
    recorder.finish();
    // podman's own failures exit 125; only then is it worth asking (one
    // podman start costs about a second under TCG) whether the image is
    // missing, which is the repository's mistake and not a test failure.
    if exit_code == 125 {
        let exists = vm
            .exec(&GuestCommand::new(["podman", "image", "exists", &image]))
            .await?;
        if !exists.success() {
            return Err(RunError::Contract(format!(
                "CONTAINERIMAGE names '{image}', which is not an image in the guest's podman (does base-image build it with that name?)"
            )));
        }
    }
    phase(&req.target, t, &mut phases);

    let mut artifacts = None;
    let mut state_frozen = false;
    if exit_code == 0 {
        let t = Instant::now();
        let declared = &keyed.revision.config.artifacts;
        if !declared.is_empty() {
            // One mk for every artifact: a process start costs time under TCG.
            let mut argv = vec![GUEST_MK.to_string()];
            argv.extend(declared.iter().map(|path| format!("{CI}/artifacts/{path}")));
            let mut cmd = GuestCommand::new(argv.clone()).cwd(crate::vm::GUEST_REPO);
            cmd.env = env.clone();
            let out = vm.exec(&cmd).await?;
            if !out.success() {
                return Err(RunError::Contract(format!(
                    "making the artifacts {} (`mk {}`) failed:\n{}{}",
                    declared
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    argv[1..].join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        let host = work.join("artifacts");
        vm.copy_out(ARTIFACTS, &host).await?;
        artifacts = Some(host);
        if mkfile_defines(mkfile, "post-test") {
            // The state disk is frozen in the same guest command.
            let code = guest_mk(vm, "post-test", Some(&freeze_state()), env, secret_values).await?;
            state_frozen = true;
            if code != 0 {
                return Err(RunError::Contract(format!(
                    "`mk post-test` failed with status {code}"
                )));
            }
        }
        phase("collect", t, &mut phases);
    }
    Ok(Ran {
        exit_code,
        record: recorder.record,
        phases,
        artifacts,
        state_frozen,
    })
}

/// Runs `mk TARGET` as root in the guest from the repository root, its
/// output shown live (redacted) but not part of the result, then the shell
/// script `after` if given (whatever mk's status; its output is shown too).
/// Returns mk's status.
async fn guest_mk(
    vm: &Vm,
    target: &str,
    after: Option<&str>,
    env: &BTreeMap<String, String>,
    secrets: &[String],
) -> Result<i32, VmError> {
    let argv = match after {
        None => vec![GUEST_MK.to_string(), target.to_string()],
        Some(script) => vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("{GUEST_MK} \"$0\"; c=$?; {script}; exit $c"),
            target.into(),
        ],
    };
    let mut cmd = GuestCommand::new(argv).cwd(crate::vm::GUEST_REPO);
    cmd.env = env.clone();
    let mut shown = Recorder::new(secrets, false);
    let code = vm
        .exec_streaming(&cmd, &mut |s, b| shown.feed(s, b))
        .await?;
    shown.finish();
    Ok(code)
}

/// An error and its causes on one line, as `{:#}` would print them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Parses `name\0value\0` pairs; one trailing newline of a value is dropped
/// (files written with `echo`).
fn parse_env_listing(data: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut parts = data.split(|b| *b == 0);
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if !reprise_protocol::repo_config::valid_env_name(&name) {
            continue;
        }
        let value = String::from_utf8_lossy(value);
        out.insert(name, value.strip_suffix('\n').unwrap_or(&value).to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_targets_in_mkfiles() {
        let mk = "</usr/lib/reprise/ci.mk\nX=a:b\ntest lint:V: base\n\techo test: not a rule\nbuild:\n\ttrue\n";
        assert!(mkfile_defines(mk, "test"));
        assert!(mkfile_defines(mk, "lint"));
        assert!(mkfile_defines(mk, "build"));
        assert!(mkfile_defines(mk, "prepare-runtime"), "from ci.mk");
        assert!(!mkfile_defines(mk, "X"));
        assert!(!mkfile_defines(mk, "a"));
        assert!(!mkfile_defines(mk, "deploy"));
        assert!(!mkfile_defines("test:V:\n", "prepare-runtime"));
    }

    #[test]
    fn env_listing_becomes_variables() {
        let data = b"CONTAINERIMAGE\0localhost/x\n\0EMPTY\0\0bad name\0v\0";
        let env = parse_env_listing(data);
        assert_eq!(
            env.get("CONTAINERIMAGE").map(String::as_str),
            Some("localhost/x")
        );
        assert_eq!(env.get("EMPTY").map(String::as_str), Some(""));
        assert_eq!(env.len(), 2);
    }

    #[test]
    fn exit_codes_are_distinct_per_failure() {
        let codes = [
            RunError::Repo(RepoError::NoCommits).exit_code(),
            RunError::Contract("x".into()).exit_code(),
            RunError::Usage("x".into()).exit_code(),
            RunError::Prepare {
                code: 1,
                console: String::new(),
            }
            .exit_code(),
            RunError::Timeout(Duration::from_secs(1)).exit_code(),
            RunError::Store(StoreError::Full("/".into())).exit_code(),
            RunError::Infra("x".into()).exit_code(),
        ];
        let unique: std::collections::BTreeSet<i32> = codes.iter().copied().collect();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
        assert!(!codes.contains(&exit::SUCCESS) && !codes.contains(&exit::TESTS_FAILED));
    }
}
