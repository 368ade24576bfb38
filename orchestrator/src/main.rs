//! `reprise-orchestrator`: parses arguments and calls the library.
//!
//! Exit codes: 0 success, 1 the command failed, 2 bad usage (clap).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reprise_orchestrator::{Folder, Limits, limits, server};

#[derive(Debug, Parser)]
#[command(
    name = "reprise-orchestrator",
    version,
    about = "The reprise orchestrator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a state folder: team CA, server certificate, config, state log.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Extra names or addresses for the server certificate (localhost and
        /// 127.0.0.1 are always in it).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Serve executors over QUIC until SIGINT or SIGTERM.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: SocketAddr,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Issue a client certificate to an executor.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Repository namespaces it may read and serve.
        #[arg(long = "repo", required = true)]
        repos: Vec<String>,
        /// Its results count for CI on those repositories.
        #[arg(long)]
        trusted: bool,
        /// Where to write the credentials (certificate, key, CA).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke every certificate of an identity.
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

/// What one executor may take of the service (ARCHITECTURE.md lists them).
#[derive(Debug, clap::Args)]
struct LimitArgs {
    /// Largest result relayed, output record and artifacts together
    /// (bytes, or with K, M, G, T).
    #[arg(long, value_parser = limits::parse_size, default_value = "4G")]
    max_transfer: u64,
    /// Connections one identity may have open at once.
    #[arg(long, default_value_t = Limits::default().connections_per_identity)]
    max_connections: usize,
    /// Requests open at once on one connection.
    #[arg(long, default_value_t = Limits::default().streams_per_connection)]
    max_streams: u32,
    /// Results one identity may have indexed, over all its connections.
    #[arg(long, default_value_t = Limits::default().announced_per_identity)]
    max_announced: usize,
    /// How long a request stream may take to deliver its request.
    #[arg(long, value_parser = limits::parse_duration, default_value = "10s")]
    request_timeout: std::time::Duration,
    /// How long a relayed transfer may go without a byte from its holder.
    #[arg(long, value_parser = limits::parse_duration, default_value = "30s")]
    transfer_idle_timeout: std::time::Duration,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            request_timeout: self.request_timeout,
            transfer_idle: self.transfer_idle_timeout,
            streams_per_connection: self.max_streams.max(1),
            connections_per_identity: self.max_connections.max(1),
            announced_per_identity: self.max_announced,
            max_transfer: self.max_transfer,
        }
    }
}

fn main() {
    // REPRISE_LOG, as for `reprise` (RUST_LOG still read when it is unset);
    // colour only on a terminal, so a log file holds plain text.
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPRISE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, hosts } => {
            Folder::init(&dir, &hosts).context("while making the state folder")?;
            println!("orchestrator state folder ready in {}", dir.display());
        }
        Command::Issue {
            dir,
            name,
            repos,
            trusted,
            out,
        } => {
            Folder::open(&dir)?
                .issue_to(&name, &repos, trusted, &out)
                .with_context(|| format!("while issuing a certificate to {name}"))?;
            println!("credentials for {name} written to {}", out.display());
        }
        Command::Revoke { dir, name } => {
            Folder::open(&dir)?
                .revoke(&name)
                .with_context(|| format!("while revoking {name}"))?;
            println!(
                "{name} revoked: new connections are refused, and a running orchestrator closes its open ones within {}s",
                server::REVOCATION_SWEEP.as_secs()
            );
        }
        Command::Serve {
            dir,
            listen,
            limits,
        } => {
            let limits = limits.limits();
            let folder = Folder::open(&dir)?;
            let config = folder
                .server_config_with(&limits)
                .context("while loading the certificates")?;
            let mut service = folder
                .service()
                .context("while reading the state log, the settings and the CA")?;
            service.limits = limits;
            let rt = tokio::runtime::Runtime::new().context("while starting the runtime")?;
            rt.block_on(async {
                let endpoint = quinn::Endpoint::server(config, listen)
                    .with_context(|| format!("while binding {listen}"))?;
                tracing::info!("serving on {}", endpoint.local_addr()?);
                server::run(endpoint, service, shutdown_signal())
                    .await
                    .context("while serving")
            })?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
