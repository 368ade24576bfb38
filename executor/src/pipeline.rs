//! `reprise run`: resolve, key, the static check ([`crate::check`]), replay
//! on a hit (local, or a peer's through the orchestrator), otherwise run the
//! contract's steps ([`crate::steps`])
//! with the chosen [`crate::driver`], and commit the result, sealed by this
//! producer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reprise_protocol::exit;
use reprise_protocol::key::KeyInputs;
use reprise_protocol::manifest::{Outcome, Phase, Producer, ResultManifest};

use crate::accel::Accel;
use crate::driver::{Driver, DriverKind, Prepared, Session};
pub use crate::error::RunError;
use crate::inputs::{DirtyCheck, compute_key_in, process_env, secret_values};
pub use crate::inputs::{KeyRequest, Keyed, compute_key};
use crate::link::provenance::{self, Counts, SealedBy};
use crate::link::{Found, Link, RunLink};
use crate::replay;
use crate::repo::Checkout;
use crate::steps::{self, StepInputs};
use crate::store::{Lookup, Retention, Sealer, Store, StoredResult};
pub use crate::text::error_chain;
pub use crate::ui::Ui;
use crate::workdir::WorkDir;

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
    /// Start from a blank snapshot, not the repository's.
    pub fresh: bool,
    /// Keep the run's work folder and say where.
    pub keep_work: bool,
    /// Where the run happens.
    pub driver: DriverKind,
    /// What to do without a result that counts for CI.
    pub mode: Mode,
    /// A CI job (`CI=true` or `--ci`): a local result is replayed only if
    /// it counts for CI.
    pub ci: bool,
    /// The terminal the output goes to, if it shows colour: the tests get
    /// its `TERM` and the usual force-colour variables, so what they
    /// record (and a replay shows) keeps its colour.
    pub colour_term: Option<String>,
}

/// What a run does when no result that counts for CI is found (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Replay a result (one that counts, in CI), else run the tests here.
    ReplayOrRun,
    /// Replay a result that counts, else fail with [`exit::NOT_COUNTED`].
    ReplayOnly,
    /// Replay, and run this fraction (0 to 1) of the replays that count
    /// here again; a different verdict fails with [`exit::MISMATCH`].
    Verify { sample: f64 },
}

impl Mode {
    /// `replay-or-run`, `replay-only`, `verify` (its sample given apart).
    pub fn parse(name: &str, sample: Option<f64>) -> Result<Mode, String> {
        let mode = match name {
            "replay-or-run" => Mode::ReplayOrRun,
            "replay-only" => Mode::ReplayOnly,
            "verify" => Mode::Verify {
                sample: sample.unwrap_or(0.05),
            },
            other => {
                return Err(format!(
                    "'{other}' is not a mode: replay-or-run, replay-only or verify"
                ));
            }
        };
        match (mode, sample) {
            (Mode::Verify { sample }, _) if !(0.0..=1.0).contains(&sample) => Err(format!(
                "--sample {sample} is not a fraction between 0 and 1"
            )),
            (Mode::Verify { .. }, _) | (_, None) => Ok(mode),
            (_, Some(_)) => Err("--sample goes with --mode verify".into()),
        }
    }
}

impl RunRequest {
    /// Whether a stored result must count for CI to be replayed.
    fn wants_counting(&self) -> bool {
        self.ci || self.mode != Mode::ReplayOrRun
    }
}

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    /// A stored result was replayed (from where it came); no VM was booted.
    Replayed(StoredResult, Source),
    /// The tests ran; the result is stored (passed or failed).
    Ran(StoredResult),
    /// A dry run: the plan was printed (and the stored result that would
    /// be replayed instead, if there is one).
    Planned(Option<StoredResult>),
    /// `--mode verify`: a result that counts was replayed and the tests ran
    /// here again; `mismatch` says how the verdicts differ, if they do.
    Verified {
        replayed: Box<StoredResult>,
        source: Source,
        ran: Box<StoredResult>,
        mismatch: Option<String>,
    },
}

impl RunOutcome {
    /// The stored result, replayed or made (none for a dry run).
    pub fn result(&self) -> Option<&StoredResult> {
        match self {
            RunOutcome::Replayed(r, _) | RunOutcome::Ran(r) => Some(r),
            RunOutcome::Verified { ran, .. } => Some(ran),
            RunOutcome::Planned(_) => None,
        }
    }

    pub fn exit_code(&self) -> i32 {
        if let RunOutcome::Verified {
            mismatch: Some(_), ..
        } = self
        {
            return exit::MISMATCH;
        }
        match self.result().map(|r| r.manifest.outcome) {
            Some(Outcome::Failed) => exit::TESTS_FAILED,
            Some(Outcome::Passed) | None => exit::SUCCESS,
        }
    }
}

/// Asks the orchestrator for a result that counts and fetches it (the rest
/// of it, when a transfer of it was cut before); every check happens in
/// [`Link::fetch`] before anything is committed. Any
/// failure is a note and a real run; so is a conflict between trusted
/// producers.
async fn fetch_from_peers(
    peer: &Link,
    inputs: &KeyInputs,
    store: &Store,
    ui: &dyn Ui,
) -> Option<(StoredResult, Source)> {
    let key = inputs.key();
    let (producer, counts) = match peer.lookup(&key, &inputs.namespace).await {
        Ok(Found::Offer { producer, counts }) => (producer, counts),
        Ok(Found::NotFound) => {
            ui.note(&format!(
                "the orchestrator offers no result of {} that counts for CI (only results sealed by producers trusted for {} are offered); running the tests here",
                key.short(),
                inputs.namespace
            ));
            return None;
        }
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
    match peer.fetch(&key, &inputs.namespace, inputs, store).await {
        Ok(fetched) => {
            if fetched.resumed > 0 {
                ui.note(&format!(
                    "resumed a transfer that was cut: {} bytes kept from before, {} bytes fetched now",
                    fetched.resumed, fetched.received
                ));
            }
            Some((
                fetched.stored,
                Source::Link {
                    producer: fetched.signed_by.name,
                    counts,
                    direct: fetched.direct,
                },
            ))
        }
        Err(e) => {
            ui.note(&fetch_failed(&producer, &e));
            None
        }
    }
}

/// The note of a fetch that failed: the run goes on as a miss.
fn fetch_failed(producer: &str, e: &crate::link::fetch::FetchError) -> String {
    let what = match e {
        crate::link::fetch::FetchError::DiskFull(_) => "could not be kept",
        _ => "was refused",
    };
    format!(
        "the result offered by {producer} {what}: {}; running the tests here",
        error_chain(e)
    )
}

/// Runs (or replays) the request. `link` is the orchestrator, asked on a
/// local miss. With `--mode verify`, a sample of the replays that count
/// runs here again and the verdicts are compared.
pub async fn run(
    req: &RunRequest,
    link: &mut RunLink,
    ui: &dyn Ui,
) -> Result<RunOutcome, RunError> {
    let started = start(req, link, ui)?;
    run_from(started, req, link, ui).await
}

/// How far [`start`] took a run.
#[derive(Debug)]
pub enum Started {
    /// A local hit replayed (or, in a dry run, found): the first pass is
    /// over.
    Done(Box<RunOutcome>),
    /// Looked up locally and not replayed: the orchestrator, a real run or
    /// a local hit's word from the orchestrator is next ([`run_from`]).
    Looked(Box<Looked>),
}

impl Started {
    /// Whether what is left of the run needs no more than a moment: a
    /// local hit's first pass is over and no second one follows
    /// (`--mode verify`).
    pub fn is_over(&self, req: &RunRequest) -> bool {
        matches!(self, Started::Done(_)) && !matches!(req.mode, Mode::Verify { .. })
    }
}

/// The first pass of a run as far as it goes without awaiting anything:
/// the key, the check and the local lookup, and the replay of a local hit
/// that needs no word from the orchestrator (one that need not count for
/// CI). So `reprise run` replays a local hit before it starts an async
/// runtime's threads, which a real run or a fetch needs.
pub fn start(req: &RunRequest, link: &mut RunLink, ui: &dyn Ui) -> Result<Started, RunError> {
    let mut looked = look_up(req, true)?;
    Ok(match replay_local(&mut looked, req, link, ui)? {
        Some(done) => Started::Done(Box::new(done)),
        None => Started::Looked(Box::new(looked)),
    })
}

/// The rest of a run [`start`] began, and with `--mode verify` its second
/// pass.
pub async fn run_from(
    started: Started,
    req: &RunRequest,
    link: &mut RunLink,
    ui: &dyn Ui,
) -> Result<RunOutcome, RunError> {
    let first = match started {
        Started::Done(done) => *done,
        Started::Looked(looked) => run_looked(*looked, req, link, ui).await?,
    };
    let Mode::Verify { sample } = req.mode else {
        return Ok(first);
    };
    let RunOutcome::Replayed(replayed, source) = first else {
        return Ok(first);
    };
    if !source.counts_for_ci() || !sampled(sample) {
        return Ok(RunOutcome::Replayed(replayed, source));
    }
    ui.note(&format!(
        "verify: running the tests of result {} here too (sample {sample})",
        replayed.manifest.key.short()
    ));
    let ran = match run_once(req, link, ui, false).await? {
        RunOutcome::Ran(ran) => ran,
        other => return Ok(other),
    };
    let mismatch = disagreement(&replayed, &ran);
    match &mismatch {
        Some(why) => {
            // The orchestrator learns of it from this run's sealed result:
            // two trusted producers disagreeing is recorded in its audit
            // log as a conflict, and neither is offered any more.
            let reported = match (ran.sealed(), link.get(ui).await) {
                (Some(sealed), Some(live)) => match live.announce_sealed(vec![sealed]).await {
                    Ok(_) => "reported to the orchestrator".to_string(),
                    Err(e) => format!("not reported: {e}"),
                },
                (None, _) => "not reported: this run is not sealed (no credentials)".into(),
                (_, None) => "not reported: the orchestrator is not reachable".into(),
            };
            ui.verdict(&format!(
                "verify failed: the replayed result {} of {} {why}; {reported}",
                replayed.manifest.key.short(),
                source.producer_name(&replayed)
            ));
        }
        None => ui.verdict(&format!(
            "verified: the tests ran here to the same verdict as the replayed result {} of {}",
            replayed.manifest.key.short(),
            source.producer_name(&replayed)
        )),
    }
    Ok(RunOutcome::Verified {
        replayed: Box::new(replayed),
        source,
        ran: Box::new(ran),
        mismatch,
    })
}

/// Whether to verify this replay: true for a fraction `sample` of calls.
fn sampled(sample: f64) -> bool {
    if sample >= 1.0 {
        return true;
    }
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return false;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64 <= sample && sample > 0.0
}

/// How a run here differs from the replayed result in verdict (outcome or
/// exit status), or `None` when it agrees. Output and artifacts may differ
/// between honest runs (times, paths), so they are not compared.
fn disagreement(replayed: &StoredResult, ran: &StoredResult) -> Option<String> {
    let (a, b) = (&replayed.manifest, &ran.manifest);
    (a.outcome != b.outcome || a.exit_code != b.exit_code).then(|| {
        format!(
            "says {:?} (exit {}), and here the tests {:?} (exit {})",
            a.outcome, a.exit_code, b.outcome, b.exit_code
        )
    })
}

/// One pass: look up (unless `lookups` is false) and replay, else run.
async fn run_once(
    req: &RunRequest,
    link: &mut RunLink,
    ui: &dyn Ui,
    lookups: bool,
) -> Result<RunOutcome, RunError> {
    let mut looked = look_up(req, lookups)?;
    match replay_local(&mut looked, req, link, ui)? {
        Some(done) => Ok(done),
        None => run_looked(looked, req, link, ui).await,
    }
}

/// A run keyed, checked and looked up in the local store.
#[derive(Debug)]
pub struct Looked {
    started: Instant,
    keyed: Keyed,
    dirty: DirtyCheck,
    checked: crate::check::Checked,
    secrets: Vec<(String, String)>,
    store: Store,
    /// The local lookup; a hit not yet replayed, or a miss.
    lookup: Lookup,
    /// Whether the store and the orchestrator were asked at all.
    lookups: bool,
    /// Why a stored result was not replayed in a mode that needs it to
    /// count.
    not_counting: String,
}

/// Keys and checks the run, and looks it up in the local store (unless
/// `lookups` is false).
fn look_up(req: &RunRequest, lookups: bool) -> Result<Looked, RunError> {
    let started = Instant::now();
    let env = process_env();
    let key_request = KeyRequest {
        dir: req.dir.clone(),
        rev: req.rev.clone(),
        target: req.target.clone(),
        cli_env: req.env.clone(),
        driver: req.driver.class().into(),
        network: req.network,
    };
    // Opened once: the key and the check read the same repository.
    let checkout = Checkout::discover(&key_request.dir)?;
    let keyed = compute_key_in(&checkout, &key_request, &env)?;
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "key computed");
    let dirty = DirtyCheck::start(&keyed.checkout_root, &req.artifacts_dir);
    // Before any lookup: the same check as `reprise check`, so a broken
    // mkfile is reported before the orchestrator is contacted. Everything
    // the check reads is a key input (the tree's mkfile, the files it
    // includes and `reprise.toml`; the target; `ci.mk`, part of the image
    // recipe whose hash is the key's image), so no result stored under this
    // key can be of a revision that fails it, and checking first costs no
    // replay it could have allowed.
    let checked =
        crate::check::check(&checkout, &keyed.revision, &req.target).map_err(RunError::Check)?;
    let secrets = secret_values(&keyed.revision, &req.secrets, &env)?;
    let store = Store::default_location();
    let lookup = if lookups {
        store.lookup(&keyed.inputs)
    } else {
        Lookup::Miss { nearest: None }
    };
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1e3,
        "checked and looked up locally"
    );
    Ok(Looked {
        started,
        keyed,
        dirty,
        checked,
        secrets,
        store,
        lookup,
        lookups,
        not_counting: String::new(),
    })
}

/// Replays a local hit that needs no word from the orchestrator (all but
/// a run that needs a result that counts for CI), or, in a dry run, says
/// that it would. `None`: nothing replayed (a miss, a hit whose seal does
/// not hold or that is damaged, or a hit left to [`run_looked`]).
fn replay_local(
    looked: &mut Looked,
    req: &RunRequest,
    link: &mut RunLink,
    ui: &dyn Ui,
) -> Result<Option<RunOutcome>, RunError> {
    if req.wants_counting() && req.driver != DriverKind::DryRun {
        return Ok(None);
    }
    let Lookup::Hit(result) = std::mem::replace(&mut looked.lookup, Lookup::Miss { nearest: None })
    else {
        return Ok(None);
    };
    if req.driver == DriverKind::DryRun {
        looked.dirty.note(REPLAY_IGNORES, ui);
        ui.note(&format!(
            "dry run: result {} is stored, so `reprise run` would replay it and run nothing",
            result.manifest.key.short()
        ));
        return Ok(Some(RunOutcome::Planned(Some(result))));
    }
    let Some(by) = seal_holds(&result, link, ui) else {
        return Ok(None);
    };
    replay_hit(looked, result, by, None, req, ui)
}

/// How `result`'s seal stands, or `None` (and a note) when it is broken.
fn seal_holds(result: &StoredResult, link: &mut RunLink, ui: &dyn Ui) -> Option<SealedBy> {
    match provenance::sealed_by(result, link, ui) {
        SealedBy::Broken(why) => {
            ui.note(&format!(
                "the stored result {} is not replayed: its seal does not hold ({why})",
                result.manifest.key.short()
            ));
            None
        }
        by => Some(by),
    }
}

/// Replays the local hit `result` sealed `by`, unless `counts` says it
/// does not count for CI (then why goes into `looked`). `None`: not
/// replayed, or damaged and quarantined.
fn replay_hit(
    looked: &mut Looked,
    result: StoredResult,
    by: SealedBy,
    counts: Option<Counts>,
    req: &RunRequest,
    ui: &dyn Ui,
) -> Result<Option<RunOutcome>, RunError> {
    if let Some(Counts::No(why) | Counts::Unknown(why)) = &counts {
        ui.note(&format!(
            "the stored result {} is not replayed: it does not count for CI ({why})",
            result.manifest.key.short()
        ));
        looked.not_counting = format!("; the stored result does not count: {why}");
        return Ok(None);
    }
    let source = Source::Local { by, counts };
    let store = &looked.store;
    match replay_result(
        store,
        &result,
        &req.artifacts_dir,
        &source,
        &mut looked.dirty,
        ui,
    ) {
        Ok(()) => Ok(Some(RunOutcome::Replayed(result, source))),
        Err(RunError::Replay(e)) if e.is_damage() => {
            quarantine(store, &result, &e, ui);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The rest of a pass: a local hit that needs the orchestrator's word
/// that it counts, the orchestrator's results, and a real run.
async fn run_looked(
    mut looked: Looked,
    req: &RunRequest,
    link: &mut RunLink,
    ui: &dyn Ui,
) -> Result<RunOutcome, RunError> {
    let lookups = looked.lookups;
    let key = looked.keyed.inputs.key();
    match std::mem::replace(&mut looked.lookup, Lookup::Miss { nearest: None }) {
        // A hit is left here only when it must count for CI
        // ([`replay_local`] replays the others).
        Lookup::Hit(result) => {
            if let Some(by) = seal_holds(&result, link, ui) {
                let counts = provenance::counts(&result, &by, link, ui).await;
                if let Some(done) = replay_hit(&mut looked, result, by, Some(counts), req, ui)? {
                    return Ok(done);
                }
            }
        }
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
    let Looked {
        started,
        keyed,
        mut dirty,
        checked,
        secrets,
        store,
        not_counting,
        ..
    } = looked;
    if lookups
        && req.driver != DriverKind::DryRun
        && let Some(peer) = link.get(ui).await
        && let Some((result, source)) = fetch_from_peers(peer, &keyed.inputs, &store, ui).await
    {
        // Nothing more to ask the orchestrator, unless a verify run may
        // report a disagreement to it.
        if !matches!(req.mode, Mode::Verify { .. }) {
            link.fetched();
        }
        replay_result(&store, &result, &req.artifacts_dir, &source, &mut dirty, ui)?;
        return Ok(RunOutcome::Replayed(result, source));
    }
    if req.mode == Mode::ReplayOnly && req.driver != DriverKind::DryRun {
        return Err(RunError::NotCounted {
            namespace: keyed.inputs.namespace.clone(),
            commit: keyed.revision.commit.clone(),
            target: req.target.clone(),
            key: key.to_string(),
            why: not_counting,
        });
    }
    dirty.note("the run uses the committed tree", ui);
    let steps_of = |work| StepInputs {
        keyed: &keyed,
        target: &req.target,
        network: req.network,
        prepare_network: keyed.revision.config.network.prepare,
        secrets: &secrets,
        work,
        has_prepare_runtime: checked.has_prepare_runtime,
        has_post_test: checked.has_post_test,
        colour_term: req.colour_term.as_deref(),
    };
    let work = WorkDir::new_in(&std::env::temp_dir(), crate::workdir::RUN_PREFIX)
        .map_err(|e| RunError::Infra(format!("cannot make a work folder: {e}")))?;
    let work_path = work.path().to_path_buf();
    match req.driver {
        DriverKind::DryRun => {
            let plan = crate::driver::dry_run::plan(&crate::driver::dry_run::PlanRequest {
                keyed: &keyed,
                target: &req.target,
                network: req.network,
                secrets: &secrets,
                checked: &checked,
                artifacts_dir: &req.artifacts_dir,
                fresh: req.fresh,
                accel: req.accel,
            });
            print!("{plan}");
            Ok(RunOutcome::Planned(None))
        }
        DriverKind::Qemu => {
            execute(
                &crate::driver::qemu::Qemu,
                req,
                &steps_of(&work_path),
                work,
                link,
                &store,
                started,
                ui,
            )
            .await
        }
        DriverKind::Podman => {
            let podman = crate::driver::podman::Podman::new();
            execute(
                &podman,
                req,
                &steps_of(&work_path),
                work,
                link,
                &store,
                started,
                ui,
            )
            .await
        }
    }
}

/// Runs the steps with `driver` and commits the result.
#[expect(clippy::too_many_arguments, reason = "the run's parts, each used once")]
async fn execute<D: Driver>(
    driver: &D,
    req: &RunRequest,
    inputs: &StepInputs<'_>,
    work: WorkDir,
    link: &mut RunLink,
    store: &Store,
    started: Instant,
    ui: &dyn Ui,
) -> Result<RunOutcome, RunError> {
    let keyed = inputs.keyed;
    let key = keyed.inputs.key();
    let tree = work.path().join("tree");
    Checkout::discover(&keyed.checkout_root)?.export(&keyed.revision.tree, &tree)?;
    let prepared = Prepared {
        keyed,
        repo: keyed.repo_id()?,
        tree,
        work: work.path(),
        network: req.network,
        prepare_network: inputs.prepare_network,
        fresh: req.fresh,
        accel: req.accel,
    };
    let in_os = async {
        let t = Instant::now();
        ui.begin("start");
        let (session, phase) = driver.start(&prepared, ui).await?;
        let took = t.elapsed();
        ui.phase(phase, took);
        let ran = steps::run(&session, inputs, ui).await;
        let isolation = session.isolation();
        let snapshot = session.snapshot();
        let ran = match ran {
            Ok(ran) => ran,
            Err(e) => {
                let _ = session.finish(false, false, &key, ui).await;
                return Err(e);
            }
        };
        session
            .finish(ran.exit_code == 0, ran.settled, &key, ui)
            .await?;
        let mut phases = vec![Phase {
            name: phase.into(),
            ms: took.as_millis() as u64,
        }];
        phases.extend(ran.phases.iter().cloned());
        Ok::<_, RunError>((ran, phases, isolation, snapshot))
    };
    let (ran, mut phases, isolation, snapshot) = match req.timeout {
        Some(limit) => tokio::time::timeout(limit, in_os)
            .await
            .map_err(|_| RunError::Timeout(limit))?,
        None => in_os.await,
    }?;
    if req.keep_work {
        let kept = work.keep();
        ui.note(&format!("kept the run's work folder: {}", kept.display()));
    }

    let outcome = if ran.exit_code == 0 {
        Outcome::Passed
    } else {
        Outcome::Failed
    };
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
        accel: isolation,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        producer: producer(),
        created_at: crate::store::now_secs(),
        snapshot,
        output_sha256: reprise_protocol::digest::Sha256Digest::of(b""),
        output_blake3: None,
        output_bytes: 0,
        artifacts: Vec::new(),
        crontab: ran.crontab.clone(),
        container_image: ran.container_image,
    };
    crate::faults::pause_point("collect");
    // An artifact holding a secret keeps the result on this machine: not
    // sealed, so never announced, served or counted.
    let leaks = secrets_in_artifacts(inputs.secrets, ran.artifacts.as_deref())?;
    for (path, found) in &leaks {
        ui.note(&format!(
            "artifact {} holds the value of the secret {} ({}); the result is kept on this machine: not sealed, never announced or served, never counts for CI",
            req.artifacts_dir.join(path).display(),
            found.secret,
            found.form
        ));
    }
    // Sealed now, by this producer, once: the seal travels with the result.
    let sealer = match leaks.is_empty() {
        true => link.orchestrator(ui).map(|c| c.credentials()),
        false => None,
    };
    let mut record = std::fs::File::open(&ran.record.path).map_err(|e| {
        RunError::Infra(format!(
            "reading the recorded output {}: {e}",
            ran.record.path.display()
        ))
    })?;
    let stored = store.commit_from(
        manifest,
        &mut record,
        ran.artifacts.as_deref(),
        sealer.as_deref().map(|c| c as &dyn Sealer),
    )?;

    if let Some((path, found)) = leaks.first() {
        let why = format!(
            "kept on this machine: artifact {path} holds the value of the secret {} ({})\n",
            found.secret, found.form
        );
        let marker = stored.dir.join(crate::store::KEPT_LOCAL);
        std::fs::write(&marker, why)
            .map_err(|e| RunError::Infra(format!("writing {}: {e}", marker.display())))?;
    }
    record_schedule(keyed, req.driver, ran.crontab.as_deref(), ui);
    if outcome == Outcome::Passed {
        let tags = store.tags(&stored);
        replay::restore_artifacts(store, &stored, tags.as_ref(), &req.artifacts_dir)?;
        let _ = store.gc(req.retention);
        ui.verdict(&format!(
            "passed in {:.1}s; result {} stored{}{}",
            total_ms as f64 / 1000.0,
            key.short(),
            match (stored.seal.is_some(), leaks.is_empty()) {
                (true, _) => "",
                (false, false) => " (kept on this machine: an artifact holds a secret)",
                (false, true) =>
                    " (not sealed: no credentials are configured, so it is never served and never counts for CI)",
            },
            artifacts_note(&stored, &req.artifacts_dir)
        ));
    } else {
        ui.verdict(&format!(
            "tests failed (status {}); the run is kept for inspection as {} and will not be replayed",
            ran.exit_code,
            key.short()
        ));
    }
    Ok(RunOutcome::Ran(stored))
}

/// The collected artifacts (relative paths) that hold a form of a
/// secret's value, each with the first secret found in it: the files a
/// commit would store.
fn secrets_in_artifacts(
    secrets: &[(String, String)],
    artifacts: Option<&std::path::Path>,
) -> Result<Vec<(String, crate::redact::Found)>, RunError> {
    let (Some(root), false) = (artifacts, secrets.is_empty()) else {
        return Ok(Vec::new());
    };
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let patterns = crate::redact::Patterns::new(secrets);
    let mut out = Vec::new();
    for rel in crate::store::artifact_files(root)? {
        let path = root.join(rel.as_str());
        let found = patterns
            .find_in_file(&path)
            .map_err(|e| RunError::Infra(format!("reading {}: {e}", path.display())))?;
        if let Some(found) = found {
            out.push((rel.as_str().to_string(), found));
        }
    }
    Ok(out)
}

/// Records the repository's scheduled targets for `reprise daemon` when
/// the run was of the tip of its default branch (and forgets them when that
/// run wrote no crontab). A crontab that does not parse is a note.
fn record_schedule(keyed: &Keyed, driver: DriverKind, crontab: Option<&str>, ui: &dyn Ui) {
    let Ok(checkout) = Checkout::discover(&keyed.checkout_root) else {
        return;
    };
    let Some((branch, tip)) = checkout.default_branch() else {
        return;
    };
    if tip != keyed.revision.commit {
        return;
    }
    let entries = match crontab.map(crate::schedule::parse_crontab) {
        None => Vec::new(),
        Some(Ok(entries)) => entries,
        Some(Err(e)) => {
            ui.note(&format!("the crontab is not kept: {e}"));
            return;
        }
    };
    let n = entries.len();
    let schedule = crate::schedule::Schedule {
        version: crate::schedule::SCHEDULE_VERSION,
        namespace: keyed.inputs.namespace.clone(),
        checkout: keyed.checkout_root.clone(),
        branch: branch.clone(),
        driver: driver.to_string(),
        entries,
        since: crate::store::now_secs(),
        last: Default::default(),
    };
    match crate::schedule::Schedules::default_location().record(schedule) {
        Ok(()) if n > 0 => ui.note(&format!(
            "{n} scheduled target(s) of {branch} recorded; `reprise daemon` runs them (`reprise daemon schedule` lists them)"
        )),
        Ok(()) => {}
        Err(e) => ui.note(&format!("the schedule was not recorded: {}", error_chain(&e))),
    }
}

fn artifacts_note(result: &StoredResult, dir: &Path) -> String {
    match result.manifest.artifacts.len() {
        0 => String::new(),
        n => format!(", {n} artifact(s) in {}", dir.display()),
    }
}

/// Moves a damaged stored result aside and says so in one line; the run
/// goes on as a miss.
fn quarantine(store: &Store, result: &StoredResult, damage: &replay::ReplayError, ui: &dyn Ui) {
    let why = error_chain(damage);
    match store.quarantine(result, &why) {
        Ok(dest) => ui.note(&format!(
            "the stored result {} is damaged ({why}); quarantined in {}; running as a miss",
            result.manifest.key.short(),
            dest.display()
        )),
        Err(e) => ui.note(&format!(
            "the stored result {} is damaged ({why}) and could not be quarantined ({}); running as a miss",
            result.manifest.key.short(),
            error_chain(&e)
        )),
    }
}

/// Where a replayed result came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The local store, sealed as said; whether it counts for CI when the
    /// run had to ask.
    Local {
        by: SealedBy,
        counts: Option<Counts>,
    },
    /// Through the orchestrator: sealed by `producer`, counting for CI for
    /// the reason `counts`; `direct` when fetched straight from the holder
    /// the orchestrator introduced rather than through its relay.
    Link {
        producer: String,
        counts: String,
        direct: bool,
    },
}

impl Source {
    /// Whether the orchestrator said the result counts for CI.
    pub fn counts_for_ci(&self) -> bool {
        matches!(
            self,
            Source::Link { .. }
                | Source::Local {
                    counts: Some(Counts::Yes(_)),
                    ..
                }
        )
    }

    /// Who produced `result`: the sealing identity if known, else user@host.
    pub fn producer_name(&self, result: &StoredResult) -> String {
        match self {
            Source::Link { producer, .. } => producer.clone(),
            Source::Local {
                by: SealedBy::Checked(who) | SealedBy::Unchecked(who),
                ..
            } => who.name.clone(),
            Source::Local { .. } => format!(
                "{}@{}",
                result.manifest.producer.user, result.manifest.producer.host
            ),
        }
    }
}

/// Replays a stored result and says where it came from.
/// What a replay ignores of a working tree's changes.
const REPLAY_IGNORES: &str = "the result replayed is the committed tree's";

/// Checks, restores and writes out a stored result; `dirty` is told
/// before the verdict.
pub fn replay_result(
    store: &Store,
    result: &StoredResult,
    artifacts: &Path,
    source: &Source,
    dirty: &mut DirtyCheck,
    ui: &dyn Ui,
) -> Result<(), RunError> {
    // Everything is checked before a byte reaches the user's streams.
    let started = Instant::now();
    let (output, staged) = replay::check_and_stage(store, result, artifacts)?;
    let restored = staged.commit()?;
    let checked = started.elapsed();
    output.write_to_std()?;
    tracing::debug!(
        checked_ms = checked.as_secs_f64() * 1e3,
        written_ms = (started.elapsed() - checked).as_secs_f64() * 1e3,
        restored,
        "replayed"
    );
    let m = &result.manifest;
    let (from, sealed) = match source {
        Source::Local { by, counts } => (
            "the local store".to_string(),
            match (by, counts) {
                (SealedBy::Checked(who) | SealedBy::Unchecked(who), Some(Counts::Yes(why))) => {
                    format!("sealed by {}; counts for CI: {why}", who.name)
                }
                (by, _) => match by {
                SealedBy::Checked(who) => format!(
                    "sealed by {}; `reprise results show` asks whether it counts for CI",
                    who.name
                ),
                SealedBy::Unchecked(who) => format!(
                    "sealed by {} (unchecked: no credentials configured)",
                    who.name
                ),
                    SealedBy::Nobody | SealedBy::Broken(_) => {
                        "not sealed: made here without credentials, never served, does not count for CI"
                            .to_string()
                    }
                },
            },
        ),
        Source::Link {
            producer,
            counts,
            direct,
        } => (
            format!(
                "producer '{producer}' through the orchestrator{}",
                if *direct {
                    " (straight from the executor holding it, which it introduced)"
                } else {
                    ""
                }
            ),
            format!("sealed by {producer}; counts for CI: {counts}"),
        ),
    };
    dirty.note(REPLAY_IGNORES, ui);
    ui.verdict(&format!(
        "replayed result {} from {from}: produced by {}@{} {} ago, took {:.1}s under {} ({}, snapshot {}, network {}, image {}; {sealed}){}",
        m.key.short(),
        m.producer.user,
        m.producer.host,
        ago(crate::store::now_secs().saturating_sub(m.created_at)),
        m.total_ms as f64 / 1000.0,
        m.accel,
        m.inputs.driver,
        short_snapshot(&m.snapshot),
        if m.inputs.network { "yes" } else { "none" },
        m.container_image
            .as_ref()
            .map_or_else(|| "not recorded".into(), |d| d.short()),
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
