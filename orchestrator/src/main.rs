//! `reprise-orchestrator`: parses arguments and calls the library.
//!
//! Exit codes: 0 success, 1 the command failed, 2 bad usage (clap), 3
//! `issue` refused a name that exists (pass `--replace`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reprise_orchestrator::dashboard;
use reprise_orchestrator::state::{self, AuditEntry, AuditFilter, Identity, rfc3339};
use reprise_orchestrator::{Folder, FolderError, Limits, http, limits, server};

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
    /// Print the team CA's sha256, which CI jobs pin (`reprise login --ci
    /// --ca-fingerprint`) to know they reached this orchestrator.
    Fingerprint {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve executors over QUIC until SIGINT or SIGTERM.
    #[command(after_help = "Examples:\n  \
        reprise-orchestrator serve --dir /srv/reprise --listen 0.0.0.0:7443\n  \
        reprise-orchestrator serve --dir /srv/reprise --listen 0.0.0.0:7443 --http\n\n\
        With --http, http://127.0.0.1:9464/ is the dashboard and /metrics the counters \
        for Prometheus (OpenMetrics text). Without --http nothing listens on HTTP.")]
    Serve {
        /// The state folder (made by `init`).
        #[arg(long)]
        dir: PathBuf,
        /// The QUIC address executors connect to.
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: SocketAddr,
        /// Serve the dashboard (/) and Prometheus metrics (/metrics) over
        /// HTTP on ADDR; 127.0.0.1:9464 when given without a value. Off when
        /// absent. There is no authentication: keep it on loopback or behind
        /// a proxy that has some.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = http::DEFAULT_ADDR)]
        http: Option<SocketAddr>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Issue a client certificate to a new executor identity.
    #[command(after_help = "Examples:\n  \
        reprise-orchestrator issue --dir /srv/reprise --name ci --repo example.com/team/app --out ci.pem\n  \
        reprise-orchestrator issue --dir /srv/reprise --name alice --repo example.com/team/app --trusted --replace --out alice.pem\n\n\
        A name that exists is refused (exit code 3) unless --replace.")]
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
        /// The name may exist: give it a new certificate and replace its
        /// grants with these (its earlier certificates stay valid, with the
        /// new grants, unless revoked; a revocation is lifted for the new
        /// certificate).
        #[arg(long)]
        replace: bool,
    },
    /// Revoke every certificate of an identity (a person, a CI job or a
    /// hand-issued one); it is refused at its next login too.
    #[command(after_help = "Examples:\n  \
        reprise-orchestrator revoke --dir /srv/reprise --name github:alice\n  \
        reprise-orchestrator revoke --dir /srv/reprise --name github:alice --lift   may log in again")]
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Lift an earlier revocation instead: the identity may log in
        /// again (people, CI jobs); the certificates it held stay revoked.
        #[arg(long)]
        lift: bool,
    },
    /// The identities this orchestrator issued certificates to.
    Identities {
        #[command(subcommand)]
        command: IdentitiesCommand,
    },
    /// The repositories' trust policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The audit log: replays, conflicts, and logins (people's logins and
    /// renewals, CI jobs' logins), oldest first.
    #[command(after_help = "Examples:\n  \
        reprise-orchestrator audit --dir /srv/reprise --since 24h\n  \
        reprise-orchestrator audit --dir /srv/reprise --repo example.com/team/app --since 2026-05-01T00:00:00Z --json")]
    Audit {
        #[arg(long)]
        dir: PathBuf,
        /// Only this repository namespace.
        #[arg(long = "repo", value_name = "NAMESPACE")]
        repo: Option<String>,
        /// Only entries since then: a duration back from now (90m, 24h,
        /// 7days) or an RFC 3339 time (2026-05-01T12:00:00Z).
        #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
        since: Option<u64>,
        /// One JSON document on stdout (`version`, `entries`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Why an identity's results do or do not count for CI in a
    /// repository, and what its results must also show. Exit 0 when they
    /// count, 1 when not.
    #[command(after_help = "Examples:\n  \
        reprise-orchestrator policy check --dir /srv/reprise --identity alice --repo example.com/team/app\n  \
        reprise-orchestrator policy check --dir /srv/reprise --identity ci:github:team/app@refs/heads/main --repo github.com/team/app --json")]
    Check {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        identity: String,
        /// The repository namespace.
        #[arg(long = "repo", value_name = "NAMESPACE")]
        repo: String,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum IdentitiesCommand {
    /// Each identity: its repositories, whether trusted or revoked, and its
    /// certificates with their expiry.
    List {
        #[arg(long)]
        dir: PathBuf,
        /// One JSON document on stdout (`version`, `identities`).
        #[arg(long)]
        json: bool,
    },
}

fn parse_since(text: &str) -> Result<u64, String> {
    state::parse_since(text, state::now_secs())
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
        let taken = matches!(e.downcast_ref(), Some(FolderError::NameTaken(_)));
        std::process::exit(if taken { 3 } else { 1 });
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, hosts } => {
            let folder = Folder::init(&dir, &hosts).context("while making the state folder")?;
            println!("orchestrator state folder ready in {}", dir.display());
            println!("team CA sha256: {}", folder.ca_fingerprint()?);
        }
        Command::Issue {
            dir,
            name,
            repos,
            trusted,
            out,
            replace,
        } => {
            Folder::open(&dir)?
                .issue_to(&name, &repos, trusted, replace, &out)
                .with_context(|| format!("while issuing a certificate to {name}"))?;
            println!("credentials for {name} written to {}", out.display());
        }
        Command::Identities {
            command: IdentitiesCommand::List { dir, json },
        } => {
            let identities = Folder::open(&dir)?
                .state()?
                .identities()
                .context("while reading the identities")?;
            if json {
                print_json(&identities_json(&identities));
            } else {
                print_identities(&identities);
            }
        }
        Command::Audit {
            dir,
            repo,
            since,
            json,
        } => {
            let filter = AuditFilter {
                namespace: repo,
                since,
                newest: None,
                logins: true,
            };
            let entries = Folder::open(&dir)?
                .state()?
                .audit(&filter)
                .context("while reading the audit log")?;
            if json {
                print_json(&audit_json(&entries));
            } else {
                print_audit(&entries);
            }
        }
        Command::Policy {
            command:
                PolicyCommand::Check {
                    dir,
                    identity,
                    repo,
                    json,
                },
        } => {
            let folder = Folder::open(&dir)?;
            let settings = folder.settings()?;
            let policy = settings.policy.for_repo(&repo);
            let sections: Vec<String> = std::iter::once("[policy]".to_string())
                .chain(settings.policy.sections(&repo).into_iter().map(|(s, _)| s))
                .collect();
            let e = reprise_orchestrator::explain::explain(
                &folder.state()?,
                &policy,
                &identity,
                &repo,
                state::now_secs(),
            )
            .context("while reading the state database")?;
            if json {
                print_json(&serde_json::json!({
                    "version": JSON_VERSION,
                    "identity": e.identity,
                    "repo": e.namespace,
                    "may_read": e.may_read,
                    "counts": e.counts,
                    "reasons": e.reasons,
                    "conditions": e.conditions,
                    "policy_sections": sections,
                }));
            } else {
                let mut text = format!(
                    "{} in {}: {}\n",
                    e.identity,
                    e.namespace,
                    match (e.counts, e.may_read) {
                        (true, _) => "its results count for CI",
                        (false, true) => "may read and replay; its results do not count",
                        (false, false) => "may not read; nothing it produces counts",
                    }
                );
                for r in &e.reasons {
                    text.push_str(&format!("  because {r}\n"));
                }
                text.push_str(&format!(
                    "policy of {} from {}\n",
                    e.namespace,
                    sections.join(", then ")
                ));
                text.push_str("a result counts only if it is\n");
                for c in &e.conditions {
                    text.push_str(&format!("  {c}\n"));
                }
                print(&text);
            }
            if !e.counts {
                std::process::exit(1);
            }
        }
        Command::Fingerprint { dir } => {
            println!("{}", Folder::open(&dir)?.ca_fingerprint()?);
        }
        Command::Revoke {
            dir,
            name,
            lift: true,
        } => {
            Folder::open(&dir)?
                .lift(&name)
                .with_context(|| format!("while lifting the revocation of {name}"))?;
            println!("{name} may log in again; the certificates it held stay revoked");
        }
        Command::Revoke { dir, name, .. } => {
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
            http: http_addr,
            limits,
        } => {
            let limits = limits.limits();
            let folder = Folder::open(&dir)?;
            let config = folder
                .server_config_with(&limits)
                .context("while loading the certificates")?;
            let mut service = folder
                .service()
                .context("while reading the state database, the settings and the CA")?;
            service.limits = limits;
            let telemetry = service.telemetry.clone();
            let rt = tokio::runtime::Runtime::new().context("while starting the runtime")?;
            rt.block_on(async {
                let endpoint = reprise_frames::server_endpoint(config, listen)
                    .with_context(|| format!("while binding {listen}"))?;
                tracing::info!("serving on {}", endpoint.local_addr()?);
                let (stop, stopped) = tokio::sync::watch::channel(());
                let web = match http_addr {
                    None => None,
                    Some(addr) => {
                        let listener = tokio::net::TcpListener::bind(addr)
                            .await
                            .with_context(|| format!("while binding {addr} for --http"))?;
                        let local = listener.local_addr()?;
                        tracing::info!(
                            "dashboard on http://{local}/ and metrics on http://{local}/metrics"
                        );
                        if !local.ip().is_loopback() {
                            tracing::warn!(
                                "the dashboard and /metrics have no authentication; anyone who reaches {local} sees identity names and repositories"
                            );
                        }
                        let pages_state = folder
                            .state()
                            .context("while opening the state database for the dashboard")?;
                        let mut stopped = stopped.clone();
                        Some(tokio::spawn(http::run(
                            listener,
                            telemetry,
                            pages_state,
                            async move {
                                let _ = stopped.changed().await;
                            },
                        )))
                    }
                };
                let served = server::run(endpoint, service, shutdown_signal()).await;
                let _ = stop.send(());
                if let Some(web) = web {
                    match web.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!("the HTTP listener failed: {e}"),
                        Err(e) => tracing::warn!("the HTTP listener failed: {e}"),
                    }
                }
                served.context("while serving")
            })?;
        }
    }
    Ok(())
}

/// Writes `text` to stdout; a reader that went away (`| head`) ends the
/// output quietly.
fn print(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
        _ => {}
    }
}

fn print_json(value: &serde_json::Value) {
    let mut text = serde_json::to_string_pretty(value).expect("json values serialise");
    text.push('\n');
    print(&text);
}

/// The version of `identities list --json` and `audit --json`.
const JSON_VERSION: u32 = 1;

fn identities_json(identities: &[Identity]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = identities
        .iter()
        .map(|i| {
            serde_json::json!({
                "name": i.grant.name,
                "repos": i.grant.repos,
                "trusted": i.grant.trusted,
                "issued_at": rfc3339(i.issued_at),
                "revoked": i.revoked_at.is_some(),
                "revoked_at": i.revoked_at.map(rfc3339),
                "certificates": i.certificates.iter().map(|c| serde_json::json!({
                    "sha256": c.sha256,
                    "issued_at": rfc3339(c.issued_at),
                    "not_after": c.not_after.map(rfc3339),
                    "revoked": c.revoked,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({ "version": JSON_VERSION, "identities": list })
}

fn print_identities(identities: &[Identity]) {
    use std::fmt::Write;
    if identities.is_empty() {
        eprintln!("no identities yet; `reprise-orchestrator issue` makes one");
        return;
    }
    let mut text = String::new();
    let width = identities
        .iter()
        .map(|i| i.grant.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        text,
        "{:width$}  TRUSTED  STATUS                         REPOSITORIES",
        "NAME"
    );
    for i in identities {
        let status = match i.revoked_at {
            Some(at) => format!("revoked {}", rfc3339(at)),
            None => "active".to_string(),
        };
        let _ = writeln!(
            text,
            "{:width$}  {:7}  {:29}  {}",
            i.grant.name,
            if i.grant.trusted { "yes" } else { "no" },
            status,
            i.grant.repos.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        for c in &i.certificates {
            let _ = writeln!(
                text,
                "{:width$}  certificate {} issued {}, {}{}",
                "",
                c.sha256.short(),
                rfc3339(c.issued_at),
                c.not_after
                    .map_or("no recorded expiry".to_string(), |t| format!(
                        "expires {}",
                        rfc3339(t)
                    )),
                if c.revoked { ", revoked" } else { "" }
            );
        }
    }
    print(&text);
}

fn audit_json(entries: &[AuditEntry]) -> serde_json::Value {
    let list: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| match e {
            AuditEntry::Replay(r) => serde_json::json!({
                "kind": "replay",
                "at": rfc3339(r.at),
                "namespace": r.namespace,
                "key": r.key,
                "asker": r.asker,
                "producer": r.producer,
                "relayer": r.relayer,
                "run_ms": r.run_ms,
                "relay_ms": r.relay_ms,
                "bytes": r.bytes,
            }),
            AuditEntry::Conflict(c) => serde_json::json!({
                "kind": "conflict",
                "at": rfc3339(c.at),
                "namespace": c.namespace,
                "key": c.key,
                "producers": c.producers,
            }),
            AuditEntry::Login(l) => serde_json::json!({
                "kind": l.kind,
                "at": rfc3339(l.at),
                "identity": l.name,
                "repos": l.repos,
            }),
        })
        .collect();
    serde_json::json!({ "version": JSON_VERSION, "entries": list })
}

fn print_audit(entries: &[AuditEntry]) {
    use std::fmt::Write;
    if entries.is_empty() {
        eprintln!("no replays, conflicts or logins recorded (for this filter)");
        return;
    }
    let mut text = String::new();
    let shown = |e: &AuditEntry| match e {
        AuditEntry::Login(l) if l.repos.len() > 2 => {
            format!("{}, and {} more", l.repos[0], l.repos.len() - 1)
        }
        other => other.namespace(),
    };
    let width = entries
        .iter()
        .map(|e| shown(e).len())
        .max()
        .unwrap_or(0)
        .max(10);
    let _ = writeln!(
        text,
        "{:20}  {:9}  {:width$}  {:12}  DETAIL",
        "WHEN", "WHAT", "REPOSITORY", "KEY"
    );
    for e in entries {
        let (what, key, detail) = match e {
            AuditEntry::Replay(r) => {
                let mut d = format!("{} replayed {}'s result", r.asker, r.producer);
                if let Some(by) = r.relayer.as_ref().filter(|by| **by != r.producer) {
                    d.push_str(&format!(" (relayed by {by})"));
                }
                if let Some(ms) = r.run_ms {
                    d.push_str(&format!(", its run took {}", dashboard::duration(ms)));
                }
                if let Some(ms) = r.relay_ms {
                    d.push_str(&format!(", relayed in {}", dashboard::duration(ms)));
                }
                if let Some(b) = r.bytes {
                    d.push_str(&format!(", {}", dashboard::bytes(b)));
                }
                ("replay", r.key.short(), d)
            }
            AuditEntry::Conflict(c) => (
                "conflict",
                c.key.short(),
                format!("{} disagree", c.producers.join(", ")),
            ),
            AuditEntry::Login(l) => (
                l.kind.as_str(),
                "-".to_string(),
                match (l.kind.as_str(), l.repos.is_empty()) {
                    ("renewal", true) => {
                        format!("{} renewed: no access left, grants withdrawn", l.name)
                    }
                    ("renewal", false) => format!("{} renewed", l.name),
                    _ => format!("{} logged in", l.name),
                },
            ),
        };
        let _ = writeln!(
            text,
            "{:20}  {:9}  {:width$}  {:12}  {detail}",
            rfc3339(e.at()),
            what,
            shown(e),
            key
        );
    }
    print(&text);
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
