//! `reprise login`, `reprise whoami`, `reprise logout`: the credentials a
//! login writes under the user's config folder, and what they grant.
//!
//! A login writes `credentials.pem` (certificate, key, team CA) and
//! `config.toml` (`orchestrator`, `credentials`) in
//! `$XDG_CONFIG_HOME/reprise/`, both mode 0600 and each replaced
//! atomically, so every later command finds them as it finds credentials
//! an administrator issued by hand.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use reprise_executor::link::login::{self, CaPin, LoginError};
use reprise_executor::link::settings::{self, LinkSettings};
use reprise_executor::link::{Credentials, Link};
use reprise_executor::paths;
use reprise_executor::text::utc_timestamp;
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::exit;

/// The file a login writes its credentials to, in the config folder.
pub const CREDENTIALS_FILE: &str = "credentials.pem";

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The orchestrator, HOST:PORT.
    #[arg(env = "REPRISE_ORCHESTRATOR", value_name = "HOST:PORT")]
    orchestrator: String,
    /// Log in as this CI job, with its OIDC ID token (GitHub Actions: the
    /// job needs `permissions: id-token: write`; GitLab CI: an
    /// `id_tokens:` entry named REPRISE_ID_TOKEN).
    #[arg(long, required = true)]
    ci: bool,
    /// The team CA's certificate (PEM): the orchestrator must present it.
    #[arg(long, value_name = "FILE", conflicts_with = "ca_fingerprint")]
    ca: Option<PathBuf>,
    /// The team CA's sha256 (64 hex digits), as `reprise-orchestrator
    /// init` printed it: the orchestrator must present that CA.
    #[arg(long, env = "REPRISE_CA_FINGERPRINT", value_name = "SHA256")]
    ca_fingerprint: Option<String>,
    /// What the token is asked for (its `aud`); the orchestrator's
    /// `[ci.*] audience` (default: reprise://HOST:PORT).
    #[arg(long, env = "REPRISE_AUDIENCE")]
    audience: Option<String>,
}

pub const LOGIN_EXAMPLES: &str = "\
Examples:
  reprise login ci.example.com:4433 --ci --ca-fingerprint 3f2a...   in a CI job
  REPRISE_ORCHESTRATOR=ci.example.com:4433 REPRISE_CA_FINGERPRINT=3f2a... reprise login --ci

The credentials go to $XDG_CONFIG_HOME/reprise/credentials.pem (mode 0600),
and config.toml there names them and the orchestrator.
Exit codes: 0 logged in, 2 no CA pinned, 3 orchestrator unreachable,
12 the CI system or the orchestrator refused the login.";

pub async fn login(args: LoginArgs) -> anyhow::Result<i32> {
    // A variable set to nothing (a CI input left empty) is not set.
    let set = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    let fingerprint = match set(args.ca_fingerprint) {
        None => None,
        Some(text) => match text.trim().to_ascii_lowercase().parse::<Sha256Digest>() {
            Ok(fp) => Some(fp),
            Err(_) => {
                eprintln!(
                    "reprise: error: the CA fingerprint {text:?} is not a sha256 (64 hex digits)"
                );
                return Ok(exit::USAGE);
            }
        },
    };
    let pin = match (&args.ca, fingerprint) {
        (Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("while reading the CA file {}", file.display()))?;
            Some(CaPin::from_pem(&text)?)
        }
        (None, Some(fp)) => Some(CaPin(fp)),
        (None, None) => None,
    };
    let audience = set(args.audience).unwrap_or_else(|| format!("reprise://{}", args.orchestrator));
    let token = match pin {
        Some(_) => match login::ci_token(&audience, &|name| std::env::var(name).ok()).await {
            Ok(token) => Some(token),
            Err(e) => return Ok(refused(&e)),
        },
        // Nothing is sent without a pin: connect only to name the CA.
        None => None,
    };
    let empty = reprise_protocol::wire::Secret(String::new());
    let logged =
        login::exchange_token(&args.orchestrator, pin, token.as_ref().unwrap_or(&empty)).await;
    let logged = match logged {
        Ok(logged) => logged,
        Err(e @ LoginError::NoPin { .. }) => {
            eprintln!("reprise: error: {e}");
            return Ok(exit::USAGE);
        }
        Err(e) if e.is_refusal() => return Ok(refused(&e)),
        Err(e) => {
            eprintln!(
                "reprise: error: cannot log in at {}: {}",
                args.orchestrator,
                reprise_executor::text::error_chain(&e)
            );
            return Ok(exit::INFRA);
        }
    };
    let dir = paths::config_dir();
    write_private(&dir.join(CREDENTIALS_FILE), &logged.credentials_pem)?;
    let config = format!(
        "# Written by `reprise login`; `reprise logout` removes it.\norchestrator = {}\ncredentials = \"{CREDENTIALS_FILE}\"\n",
        toml_string(&args.orchestrator)
    );
    write_private(&settings::user_config_path(), &config)?;
    eprintln!(
        "reprise: logged in as {} until {}: {} ({})",
        logged.identity,
        utc_timestamp(logged.expires_at),
        logged.repos.join(", "),
        if logged.trusted {
            "its results count for CI"
        } else {
            "its results do not count for CI under the repository's policy"
        }
    );
    Ok(exit::SUCCESS)
}

fn refused(e: &LoginError) -> i32 {
    eprintln!("reprise: error: {e}");
    exit::LOGIN_REFUSED
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// Writes `text` to `path` (mode 0600) whole or not at all.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().expect("a file in a folder");
    std::fs::create_dir_all(dir).with_context(|| format!("while making {}", dir.display()))?;
    reprise_executor::paths::write_whole(path, text.as_bytes(), 0o600)
        .with_context(|| format!("while writing {}", path.display()))
}

pub const WHOAMI_EXAMPLES: &str = "\
Examples:
  reprise whoami          who the orchestrator takes this machine for
  reprise whoami --json   the same, for scripts

Exit codes: 0 credentials in force, 12 none or expired (log in again).";

/// Who the credentials name, until when, and what the orchestrator grants
/// them (when it can be reached).
pub async fn whoami(json: bool) -> anyhow::Result<i32> {
    let resolved = settings::resolve(&settings::gather(None));
    for note in &resolved.notes {
        eprintln!("reprise: {note}");
    }
    let Some(LinkSettings {
        orchestrator,
        credentials,
    }) = resolved.settings
    else {
        eprintln!(
            "reprise: not logged in: no orchestrator and credentials set (`reprise login`, or REPRISE_ORCHESTRATOR and REPRISE_CREDENTIALS)"
        );
        return Ok(exit::LOGIN_REFUSED);
    };
    let creds = Credentials::load(&credentials)
        .with_context(|| format!("while reading the credentials {}", credentials.display()))?;
    let me = creds.identity()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let expired = me.not_after <= now;
    let granted = if expired {
        None
    } else {
        let attempt = Link::connect(&orchestrator, std::sync::Arc::new(creds));
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(link)) => {
                let g = (link.repos().to_vec(), link.trusted());
                link.close().await;
                Some(Ok(g))
            }
            Ok(Err(e)) => Some(Err(reprise_executor::text::error_chain(&e))),
            Err(_) => Some(Err("no answer within 5s".to_string())),
        }
    };
    if json {
        let (repos, trusted, reachable) = match &granted {
            Some(Ok((repos, trusted))) => (Some(repos.clone()), Some(*trusted), true),
            _ => (None, None, false),
        };
        let doc = serde_json::json!({
            "version": 1,
            "identity": me.name,
            "orchestrator": orchestrator,
            "credentials": credentials,
            "certificate_sha256": me.fingerprint,
            "expires_at": utc_timestamp(me.not_after),
            "expired": expired,
            "reachable": reachable,
            "repos": repos,
            "counts_for_ci": trusted,
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    } else {
        println!("identity      {}", me.name);
        println!("orchestrator  {orchestrator}");
        println!("credentials   {}", credentials.display());
        if expired {
            println!(
                "expired       {} (log in again: reprise login)",
                utc_timestamp(me.not_after)
            );
        } else {
            println!("expires       {}", utc_timestamp(me.not_after));
        }
        match &granted {
            Some(Ok((repos, trusted))) => {
                for repo in repos {
                    println!(
                        "repository    {repo}: {}",
                        if *trusted {
                            "results count for CI (as its policy allows)"
                        } else {
                            "may read and replay; results do not count for CI"
                        }
                    );
                }
                if repos.is_empty() {
                    println!("repository    none granted");
                }
            }
            Some(Err(e)) => {
                println!("grants        unknown: the orchestrator was not reached ({e})")
            }
            None => {}
        }
    }
    Ok(if expired {
        exit::LOGIN_REFUSED
    } else {
        exit::SUCCESS
    })
}

pub const LOGOUT_EXAMPLES: &str = "\
Examples:
  reprise logout   remove the credentials `reprise login` wrote";

/// Removes what a login wrote: its credentials file, and the config file
/// when it names them.
pub fn logout() -> anyhow::Result<i32> {
    let dir = paths::config_dir();
    let creds = dir.join(CREDENTIALS_FILE);
    let config = settings::user_config_path();
    let ours = std::fs::read_to_string(&config)
        .is_ok_and(|text| text.contains(&format!("credentials = \"{CREDENTIALS_FILE}\"")));
    let mut removed = Vec::new();
    for path in [&creds, &config] {
        if path == &config && !ours {
            continue;
        }
        match std::fs::remove_file(path) {
            Ok(()) => removed.push(path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("while removing {}", path.display())),
        }
    }
    if removed.is_empty() {
        eprintln!("reprise: not logged in (nothing in {})", dir.display());
    } else {
        eprintln!("reprise: logged out; removed {}", removed.join(" and "));
    }
    Ok(exit::SUCCESS)
}
