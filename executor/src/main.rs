//! The `reprise` binary: parses the command line, builds typed config, and
//! calls the executor library. Outcomes map to the exit codes of
//! `reprise_protocol::exit`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reprise_executor::accel::{self, Accel, AccelFacts};
use reprise_executor::image::{ImageCache, ImageError};
use reprise_executor::vm::{BootError, GuestCommand, Stream, Vm, VmConfig};
use reprise_protocol::exit;

#[derive(Debug, Parser)]
#[command(
    name = "reprise",
    version,
    about = "Run a repository's tests once, in a hermetic VM, and replay the result everywhere else"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The base OS image the VMs boot.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Fresh VMs for debugging.
    #[command(subcommand)]
    Vm(VmCmd),
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build the base image (cached: instant when already built).
    Build,
    /// Show the cached images.
    Info,
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
}

fn parse_accel(s: &str) -> Result<Accel, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REPRISE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async {
        tokio::select! {
            code = run(cli) => code,
            _ = interrupted() => {
                eprintln!("reprise: interrupted; stopping the VM, nothing was kept");
                Ok(exit::INTERRUPTED)
            }
        }
    });
    // Dropping the runtime drops any VM still running, which kills qemu.
    drop(runtime);
    match code {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("reprise: error: {e:#}");
            ExitCode::from(error_code(&e) as u8)
        }
    }
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The exit code for an error, from the typed error in its chain.
fn error_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(ImageError::DiskFull { .. }) = cause.downcast_ref::<ImageError>() {
            return exit::INFRA;
        }
        if cause.downcast_ref::<BootError>().is_some() {
            return exit::INFRA;
        }
    }
    exit::INFRA
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Cmd::Image(ImageCmd::Build) => {
            let image = ensure_image()?;
            println!(
                "image {} ready at {}",
                short(&image.manifest.digest),
                image.dir.display()
            );
            Ok(exit::SUCCESS)
        }
        Cmd::Image(ImageCmd::Info) => {
            image_info();
            Ok(exit::SUCCESS)
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

fn image_info() {
    let cache = ImageCache::default_location();
    let current = reprise_executor::image::recipe_hash(reprise_executor::image::RECIPE_FILES);
    println!("image cache: {}", cache.root().display());
    println!("recipe of this build: {}", short(&current));
    let images = cache.list();
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
}

async fn boot(args: &VmArgs) -> anyhow::Result<Vm> {
    let image = ensure_image()?;
    let choice = accel::choose(&AccelFacts::probe(), args.accel);
    eprintln!("reprise: accelerator {}", choice.reason);
    let mut config = VmConfig::new(image, choice.accel);
    config.network = args.network;
    config.tree = args.tree.clone();
    let vm = Vm::boot(&config).await.context("while booting the VM")?;
    tracing::info!(boot = ?vm.boot_time(), "VM ready");
    Ok(vm)
}
