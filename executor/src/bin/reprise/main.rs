//! The `reprise` binary: parses the command line, builds typed config, and
//! calls the executor library. Outcomes map to the exit codes of
//! `reprise_protocol::exit`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reprise_executor::accel::{self, Accel, AccelFacts};
use reprise_executor::daemon;
use reprise_executor::driver::DriverKind;
use reprise_executor::image::{ImageCache, ImageError};
use reprise_executor::link::RunLink;
use reprise_executor::link::provenance::{self, Counts, SealedBy};
use reprise_executor::pipeline::{self, RunError};
use reprise_executor::saved_guests::SavedGuests;
use reprise_executor::signals;
use reprise_executor::store::{Lookup, Retention, Store};
use reprise_executor::vars;
use reprise_executor::vm::{BootError, GuestCommand, Stream, Vm, VmConfig};
use reprise_protocol::digest::KeyPrefix;
use reprise_protocol::exit;
use reprise_protocol::local::Answer;

mod account;
mod summary;
mod terminal;

use terminal::{ColorChoice, Verbosity, terminal};

#[derive(Debug, Parser)]
#[command(
    name = "reprise",
    version,
    about = "Run a repository's tests once, in a hermetic VM, and replay the result everywhere else"
)]
struct Cli {
    /// Show only the tests' output and the verdict.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Show each command run in the OS; twice, also debug logs.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Colour: auto (on a terminal, unless NO_COLOR is set), always, never.
    /// Also decides whether the tests are told their output has colour.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The base OS image the VMs boot.
    #[command(subcommand, after_help = IMAGE_EXAMPLES)]
    Image(ImageCmd),
    /// Fresh VMs for debugging.
    #[command(subcommand, after_help = VM_EXAMPLES)]
    Vm(VmCmd),
    /// Run the tests of the current revision in a fresh VM, or replay a
    /// stored successful result of the same key.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Print the run key of a revision.
    #[command(after_help = KEY_EXAMPLES)]
    Key(KeyArgs),
    /// Check a revision's mkfile and reprise.toml without running anything:
    /// the contract's targets, CONTAINERIMAGE, artifacts, recipes. Problems
    /// are printed as FILE:LINE: what is wrong; exit 5 if there are any.
    #[command(after_help = CHECK_EXAMPLES)]
    Check(CheckArgs),
    /// The local result store.
    #[command(subcommand, after_help = RESULTS_EXAMPLES)]
    Results(ResultsCmd),
    /// The per-repository snapshots (container images, /var/run/ci/cache).
    #[command(subcommand, after_help = CACHE_EXAMPLES)]
    Cache(CacheCmd),
    /// Stay connected to the orchestrator and serve the whole local store
    /// to peers; `reprise run` hands its new results to it.
    #[command(after_help = DAEMON_EXAMPLES)]
    Daemon(DaemonArgs),
    /// Log in to the orchestrator: a CI job exchanges its OIDC ID token
    /// for a short-lived certificate.
    #[command(after_help = account::LOGIN_EXAMPLES)]
    Login(account::LoginArgs),
    /// Who the orchestrator takes this machine for, until when, and which
    /// repositories' results it may read and make count.
    #[command(after_help = account::WHOAMI_EXAMPLES)]
    Whoami {
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove the credentials `reprise login` wrote.
    #[command(after_help = account::LOGOUT_EXAMPLES)]
    Logout,
    /// Print a shell completion script.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions {
        /// The shell: bash, zsh, fish, elvish, powershell.
        shell: clap_complete::Shell,
    },
}

const RUN_EXAMPLES: &str = "\
Examples:
  reprise run                      run (or replay) the tests of HEAD
  reprise run --rev main~1         another revision
  reprise run --env PY=3.12        a counted variable: part of the key
  reprise run --secret API_TOKEN   passed in, never stored, redacted
  reprise run -q > test.log        only the tests' output, and the verdict
  reprise run --driver podman      no VM: a privileged container on the host
  reprise run --report out.json    also write the run's summary as JSON";

const CHECK_EXAMPLES: &str = "\
Examples:
  reprise check                    HEAD's mkfile and reprise.toml, for target test
  reprise check --rev main --target lint";

const CACHE_EXAMPLES: &str = "\
Examples:
  reprise cache drop               this repository's snapshot: the next run starts blank
  reprise cache drop --all         every snapshot and saved guest";

const VM_EXAMPLES: &str = "\
Examples:
  reprise vm exec -- uname -a      a command in a fresh VM, its status as ours
  reprise vm exec --network -- apt-get update
  reprise vm shell                 a shell with HEAD's tree at /repo";

const KEY_EXAMPLES: &str = "\
Examples:
  reprise key                      the key of HEAD's test run
  reprise key --explain            every input, and on a miss what differs
  reprise key --json | jq .key";

const RESULTS_EXAMPLES: &str = "\
Examples:
  reprise results list --failed    runs kept for inspection
  reprise results show 3f2a        a result by key prefix
  reprise results show 3f2a --output   its recorded output, as it ran
  reprise results list --json | jq '.[].key'
  reprise results verify           check every sha256, quarantine damage
  reprise results gc --keep 3 --max-age 14d";

const DAEMON_EXAMPLES: &str = "\
Examples:
  reprise daemon --detach          serve the store in the background
  reprise daemon status --json
  reprise daemon schedule          scheduled targets, next and last
  reprise daemon stop";

const IMAGE_EXAMPLES: &str = "\
Examples:
  reprise image build              build (or find cached) the base image
  reprise image info --json";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  reprise completions bash > ~/.local/share/bash-completion/completions/reprise
  reprise completions zsh > ~/.zfunc/_reprise
  reprise completions fish > ~/.config/fish/completions/reprise.fish";

#[derive(Debug, clap::Args)]
struct DaemonArgs {
    #[command(subcommand)]
    action: Option<DaemonAction>,
    /// The orchestrator, HOST:PORT (default: REPRISE_ORCHESTRATOR, else
    /// `orchestrator` in your user config).
    #[arg(long)]
    orchestrator: Option<String>,
    /// The credentials file from `reprise-orchestrator issue` (default:
    /// REPRISE_CREDENTIALS).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Start in the background, log to the data folder's daemon.log, and
    /// return once it answers.
    #[arg(long)]
    detach: bool,
    /// Keep one warm guest (restored, podman started once in it) and lend
    /// it to the next `reprise run` of this store, which then starts no
    /// qemu of its own. Without an orchestrator the daemon does only this.
    #[arg(long)]
    warm: bool,
    /// Let peers fetch results straight from this machine on ADDR, over
    /// TLS on its TCP port and QUIC on its UDP port (e.g. 0.0.0.0:4434;
    /// port 0 picks one), introduced by the orchestrator, instead of
    /// through its relay. Peers that cannot reach it fall back to the
    /// relay.
    #[arg(long, value_name = "ADDR", env = reprise_executor::vars::DIRECT_VAR)]
    direct: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum DaemonAction {
    /// Whether a daemon serves this store, and its link to the orchestrator.
    Status {
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The scheduled targets the daemon runs, when next and when last.
    Schedule,
    /// Stop the daemon serving this store.
    Stop,
}

#[derive(Debug, Subcommand)]
enum CacheCmd {
    /// Drop this repository's snapshot (or every snapshot with --all), so
    /// the next run starts from the bare base image.
    Drop {
        /// Every repository's snapshot, and the saved guests.
        #[arg(long)]
        all: bool,
    },
}

/// Which run: the revision, the target and the counted variables, the
/// inputs `reprise run` and `reprise key` share.
#[derive(Debug, clap::Args)]
struct Which {
    /// The revision (default: HEAD). The working tree is never used.
    #[arg(long)]
    rev: Option<String>,
    /// The mk target to run in the container.
    #[arg(long, default_value = "test")]
    target: String,
    /// A counted variable (part of the key), NAME=VALUE.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    what: Which,
    /// Pass the caller's variable NAME in, not counted, not stored, redacted.
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// Let the test container reach the network (hermetic by default).
    #[arg(long)]
    network: bool,
    /// Stop the run after this long (e.g. 90s, 10m, 1h).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Where artifacts are restored.
    #[arg(long, default_value = "reprise-artifacts")]
    artifacts: PathBuf,
    /// Force an accelerator instead of choosing one.
    #[arg(long, value_parser = parse_accel)]
    accel: Option<Accel>,
    /// Start from the bare base image, not the repository's snapshot.
    #[arg(long)]
    fresh: bool,
    /// Keep the run's work folder (tree, console log, artifacts) and say where.
    #[arg(long)]
    keep: bool,
    /// Return at once instead of staying connected to the orchestrator to
    /// serve results to peers (a running daemon still takes the result).
    #[arg(long)]
    no_serve: bool,
    /// Where the run happens: qemu (a VM, the default), podman (a
    /// privileged container on the host's podman, no VM), dry-run (print
    /// the plan, run nothing). Default: REPRISE_DRIVER, else qemu.
    #[arg(long, value_parser = parse_driver)]
    driver: Option<DriverKind>,
    /// Also write the run's summary as JSON to FILE: ran here or replayed,
    /// from whom, under which isolation, whether it counts, the exit code.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Without a result that counts for CI: replay-or-run (run here),
    /// replay-only (fail with exit 10), verify (replay, and run a sample of
    /// the replays that count here again; a different verdict exits 11).
    #[arg(long, default_value = "replay-or-run")]
    mode: String,
    /// With --mode verify: the fraction of replays run again (0 to 1).
    #[arg(long)]
    sample: Option<f64>,
    /// A CI job (also when CI=true): replay only a result that counts for
    /// CI, never stay connected to serve, no animation, end with a summary
    /// (also to $GITHUB_STEP_SUMMARY on GitHub).
    #[arg(long)]
    ci: bool,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The revision to check (default: HEAD).
    #[arg(long)]
    rev: Option<String>,
    /// The target the run would make.
    #[arg(long, default_value = "test")]
    target: String,
}

#[derive(Debug, clap::Args)]
struct KeyArgs {
    #[command(flatten)]
    what: Which,
    /// The key of a run whose tests have the network (`reprise run --network`).
    #[arg(long)]
    network: bool,
    /// The key of a run with this driver (qemu, podman).
    #[arg(long, value_parser = parse_driver)]
    driver: Option<DriverKind>,
    /// Print every input, and on a miss what differs from the nearest result.
    #[arg(long)]
    explain: bool,
    /// Print the key and its inputs as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum ResultsCmd {
    /// List stored results, passed then failed, newest first.
    List {
        /// Only the failed runs kept for inspection.
        #[arg(long)]
        failed: bool,
        /// Print them as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one result: who produced and sealed it, whether it counts for
    /// CI (asked of the orchestrator when one is configured), and its
    /// manifest (by key or key prefix).
    Show {
        /// The key, or the first hex digits of it.
        #[arg(value_parser = parse_key_prefix)]
        key: KeyPrefix,
        /// Print the run's recorded output instead (stdout and stderr as the
        /// run printed them), e.g. of a failed run kept for inspection.
        #[arg(long, conflicts_with = "json")]
        output: bool,
        /// Print it as JSON: the manifest, who sealed it, whether it counts.
        #[arg(long)]
        json: bool,
    },
    /// Check every stored result against its sha256s; move the damaged
    /// ones aside (quarantine) so no run replays them. Exits 9 when it
    /// quarantined anything.
    Verify,
    /// Drop results beyond the retention.
    Gc {
        /// Results kept per repository and target.
        #[arg(long, default_value_t = 1)]
        keep: usize,
        /// Drop results older than this (e.g. 7d, 12h).
        #[arg(long, value_parser = parse_duration)]
        max_age: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build the base image (cached: instant when already built).
    Build,
    /// Show the cached images.
    Info {
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct VmArgs {
    /// Force an accelerator instead of choosing one.
    #[arg(long, value_parser = parse_accel)]
    accel: Option<Accel>,
    /// Give the guest user-mode networking.
    #[arg(long)]
    network: bool,
    /// Put this host folder at /repo in the guest.
    #[arg(long)]
    tree: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Boot a fresh VM, run a command as root with its output live, exit
    /// with its status.
    Exec {
        #[command(flatten)]
        vm: VmArgs,
        /// Working directory in the guest.
        #[arg(long)]
        cwd: Option<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Boot a fresh VM with the current revision's tree at /repo and open
    /// an interactive shell in it; exits with the shell's status.
    Shell {
        #[command(flatten)]
        vm: VmArgs,
        /// The revision whose tree goes to /repo (default: HEAD).
        #[arg(long)]
        rev: Option<String>,
    },
}

fn parse_key_prefix(s: &str) -> Result<KeyPrefix, String> {
    s.parse()
        .map_err(|e: reprise_protocol::digest::DigestError| e.to_string())
}

fn parse_driver(s: &str) -> Result<DriverKind, String> {
    s.parse()
}

fn parse_accel(s: &str) -> Result<Accel, String> {
    s.parse()
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=VALUE"))?;
    if !reprise_protocol::repo_config::valid_env_name(name) {
        return Err(format!("'{name}' is not a valid variable name"));
    }
    Ok((name.to_string(), value.to_string()))
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 90s, 10m, 2h or 7d ({e})"))?;
    // Past a century a deadline means nothing, and adding it to a clock
    // would overflow.
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);
    if d > LONGEST {
        return Err(format!(
            "'{s}' is longer than the 100 years a duration may be"
        ));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbosity = match (cli.quiet, cli.verbose) {
        (true, _) => Verbosity::Quiet,
        (false, 0) => Verbosity::Normal,
        (false, _) => Verbosity::Verbose,
    };
    let ci = matches!(&cli.command, Cmd::Run(args) if args.ci) || in_ci();
    terminal::init(verbosity, cli.color, ci);
    // REPRISE_LOG decides; else warnings (errors only with -q, debug with -vv).
    let default_level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0 | 1) => "warn",
        (false, _) => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(vars::LOG_VAR)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(
            cli.color
                .colours(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with_writer(std::io::stderr)
        .init();
    // What killed commands left behind goes (never a live one's: each
    // work folder is locked by its owner from its first moment, so the
    // sweep may run beside this command's own work), on its own thread:
    // it reads every repository's snapshot folder, which is milliseconds
    // a replay need not wait for.
    let store_root = Store::default_location().root().to_path_buf();
    let sweeper = std::thread::Builder::new()
        .name("reprise-sweep".into())
        .spawn(move || reprise_executor::workdir::sweep_all(&store_root));
    let code = match cli.command {
        Cmd::Run(args) => run_command(args),
        cmd => run_on(threaded_runtime(), run(cmd)),
    };
    if let Ok(swept) = sweeper.map(|t| t.join())
        && let Ok(n @ 1..) = swept
    {
        tracing::info!("removed {n} work folder(s) of commands that are gone");
    }
    match code {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            terminal().clear();
            eprintln!("reprise: error: {e:#}");
            ExitCode::from(error_code(&e) as u8)
        }
    }
}

/// Runs `work` until it ends or SIGINT/SIGTERM arrives; then says so and
/// returns the interrupted exit code (dropping `work` stops any VM).
async fn interruptible(
    work: impl std::future::Future<Output = anyhow::Result<i32>>,
) -> anyhow::Result<i32> {
    tokio::select! {
        code = work => code,
        () = signals::interrupted() => {
            eprintln!("reprise: interrupted; stopping the VM, nothing was kept");
            Ok(exit::INTERRUPTED)
        }
    }
}

/// The exit code for an error, from the typed error in its chain.
fn error_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(run) = cause.downcast_ref::<RunError>() {
            return run.exit_code();
        }
        if let Some(ImageError::DiskFull { .. }) = cause.downcast_ref::<ImageError>() {
            return exit::INFRA;
        }
        if cause.downcast_ref::<BootError>().is_some() {
            return exit::INFRA;
        }
    }
    exit::INFRA
}

/// The runtime commands run on: a thread a CPU.
fn threaded_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `work` on `runtime`, then shuts the runtime down, which drops any
/// VM still running and so kills qemu. It does not wait for a blocked
/// read of stdin (vm shell).
fn run_on<T>(runtime: tokio::runtime::Runtime, work: impl std::future::Future<Output = T>) -> T {
    let out = runtime.block_on(work);
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    out
}

/// Runs the command. `daemon` handles SIGINT and SIGTERM itself; for every
/// other command they interrupt the work (dropping a VM stops it).
async fn run(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        cmd @ Cmd::Daemon(_) => command(cmd).await,
        cmd => interruptible(command(cmd)).await,
    }
}

/// `reprise run`. Its first pass goes as far as it can before any async
/// runtime is made ([`pipeline::start`]): a local hit is replayed then, and
/// when nothing but a word to a daemon is left (no serving, no second
/// pass), that goes on a runtime of this thread alone. A fetch, a real
/// run and serving get a thread a CPU. Starting those threads and
/// stopping them was 0.2–0.4 ms of a 9 ms local hit here. Until the
/// runtime is made, SIGINT and SIGTERM end the command at once, as they
/// do any program: a replay interrupted so leaves its artifacts' staged
/// copies (which the next replay into that folder removes), never a
/// partial file under an artifact's name.
fn run_command(args: RunArgs) -> anyhow::Result<i32> {
    let req = pipeline::RunRequest {
        dir: std::env::current_dir().context("while finding the current folder")?,
        rev: args.what.rev,
        target: args.what.target,
        env: args.what.env,
        secrets: args.secrets,
        network: args.network,
        timeout: args.timeout,
        accel: args.accel,
        artifacts_dir: args.artifacts,
        retention: retention_from_env()?,
        fresh: args.fresh,
        keep_work: args.keep,
        driver: DriverKind::choose(args.driver, &reprise_executor::inputs::process_env())?,
        colour_term: colour_term(),
        mode: pipeline::Mode::parse(&args.mode, args.sample).map_err(RunError::Usage)?,
        ci: args.ci || in_ci(),
    };
    let serve = !args.no_serve && !req.ci;
    let mut link = RunLink::new(&req.dir).staying(serve);
    let started_at = std::time::Instant::now();
    let started = pipeline::start(&req, &mut link, terminal())?;
    let runtime = match started.is_over(&req) && !serve {
        true => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime"),
        false => threaded_runtime(),
    };
    run_on(runtime, async move {
        let outcome = tokio::select! {
            outcome = pipeline::run_from(started, &req, &mut link, terminal()) => outcome?,
            () = signals::interrupted() => {
                eprintln!("reprise: interrupted; stopping the VM, nothing was kept");
                return Ok(exit::INTERRUPTED);
            }
        };
        let summary = summary::of(&outcome, req.mode, started_at.elapsed());
        if req.ci {
            eprint!("{}", summary::text(&summary));
            if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
                summary::append_step_summary(std::path::Path::new(&path), &summary)?;
            }
        }
        if let Some(path) = &args.report {
            summary::write_report(path, &summary)?;
        }
        // A running daemon takes the result either way; only an
        // interactive run without --no-serve stays connected to serve
        // it, until SIGINT or SIGTERM, with the run's own code.
        match outcome.result() {
            Some(result) => {
                daemon::hand_over_or_serve(result, &mut link, terminal(), serve).await;
            }
            None => {
                link.close().await;
            }
        }
        Ok(outcome.exit_code())
    })
}

async fn command(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Image(ImageCmd::Build) => {
            let image = ensure_image()?;
            println!(
                "image {} ready at {}",
                short(&image.manifest.digest),
                image.dir.display()
            );
            // The guest state runs start from, made now rather than in the
            // first run.
            let choice = accel::choose(&AccelFacts::probe(), None);
            let mut config = VmConfig::new(image, choice.accel);
            // Runs' VMs have a network card; so does the guest they restore.
            config.network = true;
            let saved = SavedGuests::default_location()
                .ensure(&config, &mut |step| eprintln!("reprise: image: {step}"))
                .await
                .context("while saving the booted guest that runs start from")?;
            println!(
                "saved guest ({}, {} MiB) ready at {}",
                choice.accel,
                saved.state_bytes() >> 20,
                saved.dir().display()
            );
            Ok(exit::SUCCESS)
        }
        Cmd::Image(ImageCmd::Info { json }) => {
            image_info(json);
            Ok(exit::SUCCESS)
        }
        Cmd::Login(args) => account::login(args).await,
        Cmd::Whoami { json } => account::whoami(json).await,
        Cmd::Logout => account::logout(),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "reprise",
                &mut std::io::stdout(),
            );
            Ok(exit::SUCCESS)
        }
        Cmd::Run(_) => unreachable!("`reprise run` is run by run_command"),
        Cmd::Key(args) => key(args),
        Cmd::Check(args) => check(args),
        Cmd::Daemon(args) => daemon(args).await,
        Cmd::Results(cmd) => results(cmd).await,
        Cmd::Cache(CacheCmd::Drop { all }) => {
            let snapshots = reprise_executor::snapshots::Snapshots::default_location();
            let repo = if all {
                None
            } else {
                let dir = std::env::current_dir().context("while finding the current folder")?;
                let keyed = pipeline::compute_key(
                    &pipeline::KeyRequest::at(&dir),
                    &reprise_executor::inputs::process_env(),
                )?;
                Some(keyed.repo_id()?)
            };
            let n = snapshots
                .drop_repo(repo.as_ref())
                .context("while removing snapshots")?
                + reprise_executor::snapshots::Snapshots::folders()
                    .drop_repo(repo.as_ref())
                    .context("while removing snapshots")?;
            match repo {
                Some(repo) => println!("dropped {n} snapshot(s) of {}", repo.namespace),
                None => {
                    let states = SavedGuests::default_location()
                        .drop_all()
                        .context("while removing saved guests")?;
                    println!("dropped {n} snapshot(s) and {states} saved guest(s)");
                }
            }
            Ok(exit::SUCCESS)
        }
        Cmd::Vm(VmCmd::Shell { mut vm, rev }) => {
            let work = reprise_executor::workdir::WorkDir::new_in(
                &std::env::temp_dir(),
                reprise_executor::workdir::RUN_PREFIX,
            )
            .context("while making a work folder")?;
            if vm.tree.is_none() {
                let dir = std::env::current_dir().context("while finding the current folder")?;
                let checkout = reprise_executor::repo::Checkout::discover(&dir)
                    .map_err(|e| anyhow::Error::new(RunError::Repo(e)))?;
                let revision = checkout
                    .resolve(rev.as_deref())
                    .map_err(|e| anyhow::Error::new(RunError::Repo(e)))?;
                let tree = work.path().join("tree");
                checkout
                    .export(&revision.tree, &tree)
                    .context("while exporting the tree")?;
                eprintln!(
                    "reprise: /repo holds the tree of {}",
                    &revision.commit[..12]
                );
                vm.tree = Some(tree);
            }
            let machine = boot_with(&vm, true).await?;
            let code = reprise_executor::vm::shell::interactive_shell_on_terminal(&machine)
                .await
                .context("while running the shell")?;
            machine.shutdown().await;
            Ok(code)
        }
        Cmd::Vm(VmCmd::Exec { vm, cwd, command }) => {
            let vm = boot(&vm).await?;
            let mut cmd = GuestCommand::new(command);
            cmd.cwd = cwd;
            let mut sink = |stream: Stream, bytes: &[u8]| {
                let _ = match stream {
                    Stream::Stdout => std::io::stdout()
                        .write_all(bytes)
                        .and_then(|()| std::io::stdout().flush()),
                    Stream::Stderr => std::io::stderr().write_all(bytes),
                };
            };
            let code = vm
                .exec_streaming(&cmd, &mut sink)
                .await
                .context("while running the command in the guest")?;
            vm.shutdown().await;
            Ok(code)
        }
    }
}

/// Whether this is a CI job: `CI` set to something other than empty,
/// `false` or `0` (GitHub, GitLab, Buildkite and most others set `CI=true`).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "false" | "0"))
}

/// The terminal type the tests are told about when their output shows
/// colour: on a terminal (stdout) with `--color auto` and `NO_COLOR` unset,
/// or always with `--color always`.
fn colour_term() -> Option<String> {
    if !terminal()
        .color()
        .colours(std::io::IsTerminal::is_terminal(&std::io::stdout()))
    {
        return None;
    }
    match std::env::var("TERM") {
        Ok(t) if !t.is_empty() && t != "dumb" => Some(t),
        _ => Some("xterm-256color".into()),
    }
}

/// Retention after each run: `REPRISE_KEEP` results per repository and
/// target (default 1), `REPRISE_MAX_AGE` (e.g. 7d). A value that does not
/// parse is refused, saying what is accepted.
fn retention_from_env() -> Result<Retention, RunError> {
    let mut r = Retention::default();
    if let Ok(v) = std::env::var(vars::KEEP_VAR) {
        r.per_target = match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(RunError::Usage(format!(
                    "{}={v:?}: give how many results to keep per repository and target, a whole number of at least 1",
                    vars::KEEP_VAR
                )));
            }
        };
    }
    if let Ok(v) = std::env::var(vars::MAX_AGE_VAR) {
        r.max_age = Some(
            parse_duration(v.trim())
                .map_err(|e| RunError::Usage(format!("{}: {e}", vars::MAX_AGE_VAR)))?,
        );
    }
    Ok(r)
}

/// `reprise daemon [status|stop] [--detach]`.
async fn daemon(args: DaemonArgs) -> anyhow::Result<i32> {
    let data = reprise_executor::paths::data_dir();
    match args.action {
        Some(DaemonAction::Status { json }) => {
            let status = daemon::status(&data).await?;
            if json {
                let value = match &status {
                    Some(Answer::Status {
                        pid,
                        store,
                        orchestrator,
                        link,
                        warm,
                    }) => serde_json::json!({
                        "running": true, "pid": pid, "store": store,
                        "orchestrator": orchestrator, "link": link,
                        "link_text": daemon::describe(link),
                        "warm": warm,
                    }),
                    _ => serde_json::json!({ "running": false, "store": data }),
                };
                println!("{}", serde_json::to_string_pretty(&value).expect("json"));
                return Ok(if status.is_some() {
                    exit::SUCCESS
                } else {
                    exit::TESTS_FAILED
                });
            }
            return match status {
                Some(Answer::Status {
                    pid,
                    store,
                    orchestrator,
                    link,
                    warm,
                }) => {
                    println!("pid:          {pid}");
                    println!("store:        {store}");
                    println!("orchestrator: {orchestrator}");
                    println!("link:         {}", daemon::describe(&link));
                    if let Some(warm) = warm {
                        println!("warm guest:   {warm}");
                    }
                    Ok(exit::SUCCESS)
                }
                _ => {
                    println!("no reprise daemon serves the store in {}", data.display());
                    Ok(exit::TESTS_FAILED)
                }
            };
        }
        Some(DaemonAction::Schedule) => {
            let schedules = reprise_executor::schedule::Schedules::default_location().list();
            if schedules.is_empty() {
                println!(
                    "nothing is scheduled (a run of a default branch's tip whose prepare-runtime writes /var/run/ci/crontab schedules its targets)"
                );
            }
            let when =
                |t: Option<u64>| t.map_or("-".to_string(), reprise_executor::text::utc_timestamp);
            for s in &schedules {
                println!(
                    "{} on {} in {} (driver {})",
                    s.namespace,
                    s.branch,
                    s.checkout.display(),
                    s.driver
                );
                for e in &s.entries {
                    let last = s.last.get(&e.target);
                    let from = last.map_or(s.since, |l| l.at).max(s.since);
                    println!(
                        "  {:<12} {:<14} next {}  last {}{}",
                        e.target,
                        e.cron,
                        when(reprise_executor::schedule::next_after(e, from)),
                        when(last.map(|l| l.at)),
                        last.map_or(String::new(), |l| format!(" (exit {})", l.exit_code))
                    );
                }
            }
            return Ok(exit::SUCCESS);
        }
        Some(DaemonAction::Stop) => {
            match daemon::stop(&data).await? {
                Some(pid) => println!("stopped the reprise daemon (pid {pid})"),
                None => println!("no reprise daemon serves the store in {}", data.display()),
            }
            return Ok(exit::SUCCESS);
        }
        None => {}
    }
    let orchestrator = match daemon::orchestrator((args.orchestrator, args.credentials), terminal())
    {
        Ok(o) => Some(o),
        // A daemon that keeps a warm guest needs no orchestrator.
        Err(daemon::DaemonError::NoOrchestrator(_)) if args.warm => None,
        Err(e) => {
            eprintln!("reprise: error: {}", pipeline::error_chain(&e));
            return Ok(exit::USAGE);
        }
    };
    let served = if args.detach {
        daemon::detach(&data, orchestrator.as_ref(), args.warm, args.direct)
            .await
            .map(|(pid, log)| {
                println!(
                    "reprise daemon started (pid {pid}); log in {}",
                    log.display()
                );
            })
    } else {
        daemon::serve_in_foreground(&data, orchestrator, args.warm, args.direct).await
    };
    match served {
        Ok(()) => Ok(exit::SUCCESS),
        Err(
            e @ (daemon::DaemonError::AlreadyRunning { .. }
            | daemon::DaemonError::DirectWithoutOrchestrator
            | daemon::DaemonError::Direct { .. }),
        ) => {
            eprintln!("reprise: error: {}", pipeline::error_chain(&e));
            Ok(exit::USAGE)
        }
        Err(daemon::DaemonError::Exited { status, log }) => {
            eprintln!("reprise: error: the daemon exited ({status}):\n{log}");
            Ok(status.code().unwrap_or(exit::INFRA))
        }
        Err(e) => Err(e.into()),
    }
}

/// `reprise check`.
fn check(args: CheckArgs) -> anyhow::Result<i32> {
    use reprise_executor::repo::{Checkout, RepoError};
    let dir = std::env::current_dir().context("while finding the current folder")?;
    let checkout = Checkout::discover(&dir).map_err(RunError::Repo)?;
    let revision = match checkout.resolve(args.rev.as_deref()) {
        Ok(r) => r,
        Err(RepoError::Config { source, .. }) => {
            println!("{source}");
            return Ok(exit::CONTRACT);
        }
        Err(e) => return Err(RunError::Repo(e).into()),
    };
    match reprise_executor::check::check(&checkout, &revision, &args.target) {
        Ok(checked) => {
            println!(
                "ok: the mkfile and reprise.toml of {} follow the contract for target {} (CONTAINERIMAGE {})",
                short(&revision.commit),
                args.target,
                checked
                    .container_image
                    .as_deref()
                    .unwrap_or("written by prepare-runtime")
            );
            Ok(exit::SUCCESS)
        }
        Err(problems) => {
            for p in &problems {
                println!("{p}");
            }
            Ok(exit::CONTRACT)
        }
    }
}

fn key(args: KeyArgs) -> anyhow::Result<i32> {
    let dir = std::env::current_dir().context("while finding the current folder")?;
    let env = reprise_executor::inputs::process_env();
    let driver = DriverKind::choose(args.driver, &env)?;
    let request = pipeline::KeyRequest {
        dir,
        rev: args.what.rev,
        target: args.what.target,
        cli_env: args.what.env,
        driver: driver.class().into(),
        network: args.network,
    };
    let keyed = pipeline::compute_key(&request, &env)?;
    let key = keyed.inputs.key();
    let lookup = Store::default_location().lookup(&keyed.inputs);
    if args.json {
        let stored = matches!(lookup, Lookup::Hit(_));
        let json = serde_json::json!({ "key": key, "inputs": keyed.inputs, "stored": stored });
        println!("{}", serde_json::to_string_pretty(&json).expect("json"));
        return Ok(exit::SUCCESS);
    }
    if !args.explain {
        println!("{key}");
        return Ok(exit::SUCCESS);
    }
    println!("key {key}");
    for (name, value) in keyed.inputs.explain() {
        println!("  {name:<12} {value}");
    }
    match lookup {
        Lookup::Hit(r) => println!(
            "stored: yes, produced {}s ago by {}@{}",
            reprise_executor::store::now_secs().saturating_sub(r.manifest.created_at),
            r.manifest.producer.user,
            r.manifest.producer.host
        ),
        Lookup::Miss { nearest: None } => println!(
            "stored: no, and no other result of {} is stored",
            keyed.inputs.namespace
        ),
        Lookup::Miss {
            nearest: Some((near, diff)),
        } => {
            println!(
                "stored: no; the nearest stored result {} differs in:",
                near.manifest.key.short()
            );
            for (name, here, there) in diff {
                println!("  {name}: {here} here, {there} there");
            }
        }
    }
    Ok(exit::SUCCESS)
}

/// `reprise results show`: what the result is, who sealed it, whether it
/// counts for CI, then its manifest; or all of it as one JSON object.
async fn show_result(r: &reprise_executor::store::StoredResult, json: bool) {
    let m = &r.manifest;
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut link = RunLink::new(&dir);
    let by = provenance::sealed_by(r, &mut link, terminal());
    let counts = provenance::counts(r, &by, &mut link, terminal()).await;
    link.close().await;
    let (sealed, sealed_json) = match &by {
        SealedBy::Nobody => (
            "nobody (made without credentials)".to_string(),
            serde_json::json!({ "by": null }),
        ),
        SealedBy::Checked(who) => (
            format!(
                "{} (certificate {}, valid until {}; checked against the team CA)",
                who.name,
                who.fingerprint.short(),
                reprise_executor::text::utc_timestamp(who.not_after)
            ),
            serde_json::json!({
                "by": who.name, "certificate": who.fingerprint,
                "not_after": who.not_after, "checked": true,
            }),
        ),
        SealedBy::Unchecked(who) => (
            format!(
                "{} (certificate {}; unchecked: no credentials configured)",
                who.name,
                who.fingerprint.short()
            ),
            serde_json::json!({
                "by": who.name, "certificate": who.fingerprint, "checked": false,
            }),
        ),
        SealedBy::Broken(why) => (
            format!("a seal that does not hold: {why}"),
            serde_json::json!({ "broken": why }),
        ),
    };
    let (counts_word, why) = match &counts {
        Counts::Yes(why) => ("yes", why),
        Counts::No(why) => ("no", why),
        Counts::Unknown(why) => ("unknown", why),
    };
    if json {
        let value = serde_json::json!({
            "manifest": m,
            "sealed": sealed_json,
            "counts": { "answer": counts_word, "why": why },
            "kept_local": r.kept_local(),
        });
        println!("{}", serde_json::to_string_pretty(&value).expect("json"));
        return;
    }
    println!("key:         {}", m.key);
    println!("outcome:     {:?} (exit {})", m.outcome, m.exit_code);
    println!(
        "repository:  {} target {} commit {}",
        m.inputs.namespace,
        m.inputs.target,
        short(&m.commit)
    );
    println!(
        "ran:         {} on {}@{}, {:.1}s under {} ({}), snapshot {}, network {}",
        reprise_executor::text::utc_timestamp(m.created_at),
        m.producer.user,
        m.producer.host,
        m.total_ms as f64 / 1000.0,
        m.accel,
        m.inputs.driver,
        pipeline::short_snapshot(&m.snapshot),
        if m.inputs.network { "yes" } else { "none" }
    );
    match &m.container_image {
        Some(image) => println!(
            "image:       the tests ran in container image sha256:{image} (its podman image id)"
        ),
        None => println!("image:       not recorded"),
    }
    if let Some(why) = r.kept_local() {
        println!("shared:      no, {why}");
    }
    println!("sealed by:   {sealed}");
    println!("counts:      {counts_word}: {why}");
    println!("{}", serde_json::to_string_pretty(m).expect("json"));
}

async fn results(cmd: ResultsCmd) -> anyhow::Result<i32> {
    let store = Store::default_location();
    match cmd {
        ResultsCmd::List {
            failed: only_failed,
            json,
        } => {
            let passed = if only_failed {
                Vec::new()
            } else {
                store.list()
            };
            let failed = store.list_failed();
            let rows = passed
                .iter()
                .map(|r| (r, "passed"))
                .chain(failed.iter().map(|r| (r, "failed")));
            if json {
                let list: Vec<serde_json::Value> = rows
                    .map(|(r, status)| {
                        let m = &r.manifest;
                        serde_json::json!({
                            "key": m.key,
                            "status": status,
                            "namespace": m.inputs.namespace,
                            "target": m.inputs.target,
                            "commit": m.commit,
                            "total_ms": m.total_ms,
                            "isolation": m.accel,
                            "driver": m.inputs.driver,
                            "created_at": m.created_at,
                            "producer": m.producer,
                            "sealed": r.seal.is_some(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list).expect("json"));
                return Ok(exit::SUCCESS);
            }
            if passed.is_empty() && failed.is_empty() {
                eprintln!("reprise: no stored results");
                return Ok(exit::SUCCESS);
            }
            println!("KEY STATUS NAMESPACE TARGET COMMIT TOOK ISOLATION");
            for (r, status) in rows {
                let m = &r.manifest;
                println!(
                    "{} {} {} {} {} {:.1}s {}",
                    m.key.short(),
                    status,
                    m.inputs.namespace,
                    m.inputs.target,
                    short(&m.commit),
                    m.total_ms as f64 / 1000.0,
                    m.accel
                );
            }
            Ok(exit::SUCCESS)
        }
        ResultsCmd::Show { key, output, json } => {
            let mut found = store.find(&key);
            let one_key = found
                .iter()
                .all(|r| r.manifest.key == found[0].manifest.key);
            if found.len() > 1 && one_key {
                // One key (whole, or a prefix of only it) names one result:
                // the newest (a passed one first, as lookups see it), the
                // others listed.
                found.sort_by_key(|r| {
                    (
                        r.manifest.outcome != reprise_protocol::manifest::Outcome::Passed,
                        std::cmp::Reverse(r.manifest.created_at),
                    )
                });
                for older in &found[1..] {
                    eprintln!(
                        "reprise: also stored: a {:?} run of this key from {}",
                        older.manifest.outcome,
                        reprise_executor::text::utc_timestamp(older.manifest.created_at)
                    );
                }
                found.truncate(1);
            }
            match found.as_slice() {
                [one] if output => {
                    reprise_executor::replay::check_output(one, None)?
                        .write(&mut std::io::stdout().lock(), &mut std::io::stderr().lock())?;
                    Ok(exit::SUCCESS)
                }
                [one] => {
                    show_result(one, json).await;
                    Ok(exit::SUCCESS)
                }
                [] => {
                    eprintln!("reprise: no stored result has a key starting with {key}");
                    Ok(exit::USAGE)
                }
                _ => {
                    eprintln!(
                        "reprise: {} results match {key}; give more of the key",
                        found.len()
                    );
                    Ok(exit::USAGE)
                }
            }
        }
        ResultsCmd::Verify => {
            let check = reprise_executor::replay::verify_store(&store)?;
            for (to, why) in &check.quarantined {
                println!("quarantined {}: {why}", to.display());
            }
            println!(
                "{} result(s) sound, {} quarantined",
                check.sound,
                check.quarantined.len()
            );
            Ok(if check.quarantined.is_empty() {
                exit::SUCCESS
            } else {
                exit::DAMAGED
            })
        }
        ResultsCmd::Gc { keep, max_age } => {
            let collected = store.gc(Retention {
                per_target: keep,
                max_age,
            })?;
            println!(
                "dropped {} result(s), {} blob(s) no result refers to and {} partial transfer(s) nobody resumed for a day",
                collected.results, collected.blobs, collected.partials
            );
            if collected.blobs_deferred {
                println!(
                    "blobs were left for the next gc: a commit was placing its result meanwhile"
                );
            }
            Ok(exit::SUCCESS)
        }
    }
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// The base image, built (with a progress display) if it is not cached.
fn ensure_image() -> anyhow::Result<reprise_executor::image::Image> {
    let cache = ImageCache::default_location();
    if let Some(image) = cache.current() {
        return Ok(image);
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} building the base image [{elapsed}] {msg}",
            )
            .expect("template"),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let plain = bar.is_hidden();
    let mut progress = |phase: &str| {
        if plain {
            eprintln!(
                "reprise: image: {phase} [{:.0}s]",
                started.elapsed().as_secs_f64()
            );
        }
        bar.set_message(phase.to_string());
    };
    let image = tokio::task::block_in_place(|| cache.ensure(&mut progress));
    bar.finish_and_clear();
    let image = image.context("while building the base image")?;
    eprintln!(
        "reprise: built the base image in {:.0}s ({} MiB)",
        started.elapsed().as_secs_f64(),
        image.manifest.disk_bytes >> 20
    );
    Ok(image)
}

fn image_info(json: bool) {
    let cache = ImageCache::default_location();
    let current = reprise_executor::image::recipe_hash(reprise_executor::image::RECIPE_FILES);
    let images = cache.list();
    let states = SavedGuests::default_location().list();
    if json {
        let value = serde_json::json!({
            "cache": cache.root(),
            "recipe": current,
            "images": images.iter().map(|image| serde_json::json!({
                "dir": image.dir,
                "recipe": image.manifest.recipe_hash,
                "digest": image.manifest.digest,
                "disk_bytes": image.manifest.disk_bytes,
                "build_ms": image.manifest.build_ms,
                "current": image.manifest.recipe_hash == current,
            })).collect::<Vec<_>>(),
            "saved_guests": states.iter().map(|(dir, bytes)| serde_json::json!({
                "dir": dir, "bytes": bytes,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value).expect("json"));
        return;
    }
    println!("image cache: {}", cache.root().display());
    println!("recipe of this build: {}", short(&current));
    if images.is_empty() {
        println!("no image built yet (run `reprise image build`)");
    }
    for image in images {
        let m = &image.manifest;
        println!(
            "{} recipe {} digest {} {} MiB built in {:.0}s{}",
            image.dir.display(),
            short(&m.recipe_hash),
            short(&m.digest),
            m.disk_bytes >> 20,
            m.build_ms as f64 / 1000.0,
            if m.recipe_hash == current {
                " (current)"
            } else {
                " (stale: another recipe)"
            }
        );
    }
    if !states.is_empty() {
        println!("saved guests (runs start from these):");
    }
    for (dir, bytes) in states {
        println!("{} {} MiB", dir.display(), bytes >> 20);
    }
}

async fn boot(args: &VmArgs) -> anyhow::Result<Vm> {
    boot_with(args, false).await
}

async fn boot_with(args: &VmArgs, tty: bool) -> anyhow::Result<Vm> {
    let image = ensure_image()?;
    let choice = accel::choose(&AccelFacts::probe(), args.accel);
    eprintln!("reprise: accelerator {}", choice.reason);
    let mut config = VmConfig::new(image, choice.accel);
    config.network = args.network;
    config.tree = args.tree.clone();
    config.tty = tty;
    let vm = Vm::boot(&config).await.context("while booting the VM")?;
    tracing::info!(boot = ?vm.boot_time(), "VM ready");
    Ok(vm)
}
