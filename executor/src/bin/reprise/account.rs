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
use reprise_executor::link::{Credentials, Link, Orchestrator};
use reprise_executor::paths;
use reprise_executor::text::utc_timestamp;
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::exit;

/// The file a login writes its credentials to, in the config folder.
pub const CREDENTIALS_FILE: &str = "credentials.pem";

/// The forges a person logs in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderArg {
    Github,
    Gitlab,
}

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The orchestrator, HOST:PORT (with --renew: the one configured).
    #[arg(
        env = "REPRISE_ORCHESTRATOR",
        value_name = "HOST:PORT",
        required_unless_present = "renew"
    )]
    orchestrator: Option<String>,
    /// Log in as this CI job, with its OIDC ID token (GitHub Actions: the
    /// job needs `permissions: id-token: write`; GitLab CI: an
    /// `id_tokens:` entry named REPRISE_ID_TOKEN).
    #[arg(long, conflicts_with_all = ["provider", "renew"])]
    ci: bool,
    /// The forge a person logs in with (the orchestrator runs the OAuth
    /// device flow with its own application).
    #[arg(long, value_enum, default_value = "github")]
    provider: ProviderArg,
    /// Renew the credentials of an earlier login now (they are renewed by
    /// themselves in the last quarter of their lifetime): a new
    /// certificate with what the forge grants today.
    #[arg(long, conflicts_with_all = ["ca", "ca_fingerprint"])]
    renew: bool,
    /// The team CA's certificate (PEM): the orchestrator must present it.
    #[arg(long, value_name = "FILE", conflicts_with = "ca_fingerprint")]
    ca: Option<PathBuf>,
    /// The team CA's sha256 (64 hex digits), as `reprise-orchestrator
    /// fingerprint` prints it: the orchestrator must present that CA.
    #[arg(long, env = "REPRISE_CA_FINGERPRINT", value_name = "SHA256")]
    ca_fingerprint: Option<String>,
    /// What the token is asked for (its `aud`); the orchestrator's
    /// `[ci.*] audience` (default: reprise://HOST:PORT).
    #[arg(long, env = "REPRISE_AUDIENCE")]
    audience: Option<String>,
}

pub const LOGIN_EXAMPLES: &str = "\
Examples:
  reprise login ci.example.com:4433                     log in with GitHub
  reprise login ci.example.com:4433 --provider gitlab   log in with GitLab
  reprise login --renew                                 renew now (done by itself in the last quarter)
  reprise login ci.example.com:4433 --ci --ca-fingerprint 3f2a...   in a CI job

The first login to an orchestrator shows its team CA's sha256 and asks to
confirm it (check it with your administrator: `reprise-orchestrator
fingerprint`); scripts pass --ca-fingerprint or --ca. The confirmed CA is
remembered in $XDG_CONFIG_HOME/reprise/known_orchestrators.
The credentials go to $XDG_CONFIG_HOME/reprise/credentials.pem (mode 0600),
and config.toml there names them and the orchestrator.
Exit codes: 0 logged in, 2 bad usage or (--ci) no CA pinned, 3 orchestrator
unreachable, 12 the forge, the CI system or the orchestrator refused the
login (denied, expired, no access), 13 the orchestrator's CA was not
confirmed or is not the pinned one.";

/// The file that remembers the team CA confirmed for each orchestrator.
pub const KNOWN_FILE: &str = "known_orchestrators";

/// The CA confirmed earlier for `addr`, from the known orchestrators file
/// (lines `HOST:PORT SHA256`).
fn known_ca(addr: &str) -> Option<Sha256Digest> {
    let text = std::fs::read_to_string(paths::config_dir().join(KNOWN_FILE)).ok()?;
    text.lines().find_map(|line| {
        let (host, fp) = line.trim().split_once(char::is_whitespace)?;
        (host == addr).then(|| fp.trim().parse().ok())?
    })
}

/// Remembers `fp` as the team CA of `addr`.
fn remember_ca(addr: &str, fp: &Sha256Digest) -> anyhow::Result<()> {
    let path = paths::config_dir().join(KNOWN_FILE);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(addr))
        .map(str::to_string)
        .collect();
    lines.push(format!("{addr} {fp}"));
    write_private(&path, &(lines.join("\n") + "\n"))
}

pub async fn login(args: LoginArgs) -> anyhow::Result<i32> {
    if args.renew {
        return renew().await;
    }
    let addr = args.orchestrator.clone().expect("clap requires it");
    // A variable set to nothing (a CI input left empty) is not set.
    let set = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    let fingerprint = match set(args.ca_fingerprint.clone()) {
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
    if !args.ci {
        return person(&addr, pin, args.provider).await;
    }
    let audience = set(args.audience).unwrap_or_else(|| format!("reprise://{addr}"));
    let token = match pin {
        Some(_) => match login::ci_token(&audience, &|name| std::env::var(name).ok()).await {
            Ok(token) => Some(token),
            Err(e) => return Ok(refused(&e)),
        },
        // Nothing is sent without a pin: connect only to name the CA.
        None => None,
    };
    let empty = reprise_protocol::wire::Secret(String::new());
    let logged = login::exchange_token(&addr, pin, token.as_ref().unwrap_or(&empty)).await;
    match logged {
        Ok(logged) => store(&addr, &logged),
        Err(e @ LoginError::NoPin { .. }) => {
            eprintln!("reprise: error: {e}");
            Ok(exit::USAGE)
        }
        Err(e) => Ok(failed(&addr, &e)),
    }
}

/// The exit code of a login that failed, said in one line.
fn failed(addr: &str, e: &LoginError) -> i32 {
    match e {
        e if e.is_refusal() => refused(e),
        LoginError::WrongCa { .. } => {
            eprintln!("reprise: error: {e}");
            exit::CA_UNCONFIRMED
        }
        e => {
            eprintln!(
                "reprise: error: cannot log in at {addr}: {}",
                reprise_executor::text::error_chain(e)
            );
            exit::INFRA
        }
    }
}

/// A person logs in through a forge.
async fn person(addr: &str, pin: Option<CaPin>, provider: ProviderArg) -> anyhow::Result<i32> {
    let pin = match pin.or_else(|| known_ca(addr).map(CaPin)) {
        Some(pin) => pin,
        None => match confirm_ca(addr).await {
            Ok(pin) => pin,
            Err(code) => return Ok(code),
        },
    };
    let provider = match provider {
        ProviderArg::Github => "github",
        ProviderArg::Gitlab => "gitlab",
    };
    let mut shown = |code: &login::LoginCode| {
        let minutes = code.expires_in.div_ceil(60);
        eprintln!(
            "reprise: to log in, open {} and enter the code {} (within {minutes} minute{})",
            code.verification_uri,
            code.user_code,
            if minutes == 1 { "" } else { "s" }
        );
        if let Some(complete) = &code.verification_uri_complete {
            eprintln!("reprise: or open {complete}");
        }
        eprintln!("reprise: waiting for the forge...");
    };
    match login::person_login(addr, pin, provider, &mut shown).await {
        Ok(logged) => {
            remember_ca(addr, &pin.0)?;
            store(addr, &logged)
        }
        Err(e) => Ok(failed(addr, &e)),
    }
}

/// Shows the team CA the orchestrator at `addr` presents and asks on the
/// terminal whether to trust it; refused (exit 13) when there is no
/// terminal to ask on or the answer is not yes.
async fn confirm_ca(addr: &str) -> Result<CaPin, i32> {
    use std::io::IsTerminal as _;
    let seen = match login::presented_ca(addr).await {
        Ok(Some(fp)) => fp,
        Ok(None) => {
            eprintln!(
                "reprise: error: the orchestrator at {addr} presents no CA certificate; pass --ca FILE with the team CA"
            );
            return Err(exit::CA_UNCONFIRMED);
        }
        Err(e) => return Err(failed(addr, &e)),
    };
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        eprintln!(
            "reprise: error: the orchestrator at {addr} presents the team CA with sha256 {seen}, and there is no terminal to confirm it on; check it with your administrator (`reprise-orchestrator fingerprint`) and pass --ca-fingerprint {seen}"
        );
        return Err(exit::CA_UNCONFIRMED);
    }
    eprintln!("reprise: the orchestrator at {addr} presents the team CA with sha256");
    eprintln!("  {seen}");
    eprint!(
        "reprise: this is the first login there; is it your team's (ask your administrator: `reprise-orchestrator fingerprint`)? [y/N] "
    );
    let mut answer = String::new();
    let _ = std::io::stdin().read_line(&mut answer);
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(CaPin(seen))
    } else {
        eprintln!("reprise: not trusted; nothing was sent to {addr}");
        Err(exit::CA_UNCONFIRMED)
    }
}

/// Writes a login's credentials and the config naming them, and says what
/// they grant.
fn store(addr: &str, logged: &login::LoggedIn) -> anyhow::Result<i32> {
    let dir = paths::config_dir();
    write_private(&dir.join(CREDENTIALS_FILE), &logged.credentials_pem)?;
    let config = format!(
        "# Written by `reprise login`; `reprise logout` removes it.\norchestrator = {}\ncredentials = \"{CREDENTIALS_FILE}\"\n",
        toml_string(addr)
    );
    write_private(&settings::user_config_path(), &config)?;
    said_granted("logged in", logged);
    Ok(exit::SUCCESS)
}

fn said_granted(what: &str, logged: &login::LoggedIn) {
    let repos: Vec<String> = logged
        .repos
        .iter()
        .map(|r| {
            format!(
                "{r} ({})",
                if logged.counts.contains(r) {
                    "its results count for CI"
                } else {
                    "its results do not count for CI under the repository's policy"
                }
            )
        })
        .collect();
    eprintln!(
        "reprise: {what} as {} until {}: {}",
        logged.identity,
        utc_timestamp(logged.expires_at),
        repos.join(", ")
    );
}

/// `reprise login --renew`: a new certificate for the configured
/// credentials, with what the forge grants now.
async fn renew() -> anyhow::Result<i32> {
    let resolved = settings::resolve(&settings::gather(None));
    for note in &resolved.notes {
        eprintln!("reprise: {note}");
    }
    let Some(configured) = resolved.settings else {
        eprintln!("reprise: not logged in: nothing to renew (`reprise login HOST:PORT`)");
        return Ok(exit::LOGIN_REFUSED);
    };
    let orchestrator = match Orchestrator::new(configured) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("reprise: {}", reprise_executor::text::error_chain(&e));
            return Ok(exit::LOGIN_REFUSED);
        }
    };
    if !orchestrator.credentials().is_person() {
        eprintln!(
            "reprise: error: these credentials are not a person's login: a CI job logs in again (`reprise login --ci`), hand-issued ones come from your administrator"
        );
        return Ok(exit::USAGE);
    }
    let addr = orchestrator.settings.orchestrator.clone();
    let creds = std::sync::Arc::new(
        Credentials::load(&orchestrator.settings.credentials)
            .with_context(|| "while reading the credentials")?,
    );
    let attempt = Link::connect(&addr, creds);
    let link = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(link)) => link,
        Ok(Err(e)) if e.credentials_refused() => {
            eprintln!(
                "reprise: error: the orchestrator refused these credentials ({}): log in again (reprise login {addr})",
                reprise_executor::text::error_chain(&e)
            );
            return Ok(exit::LOGIN_REFUSED);
        }
        Ok(Err(e)) => {
            eprintln!(
                "reprise: error: cannot reach the orchestrator at {addr}: {}",
                reprise_executor::text::error_chain(&e)
            );
            return Ok(exit::INFRA);
        }
        Err(_) => {
            eprintln!(
                "reprise: error: cannot reach the orchestrator at {addr}: no answer within 10s"
            );
            return Ok(exit::INFRA);
        }
    };
    let renewed = orchestrator.renew(&link).await;
    link.close().await;
    match renewed {
        Ok(logged) => {
            said_granted("renewed", &logged);
            Ok(exit::SUCCESS)
        }
        Err(e) => Ok(failed(&addr, &e)),
    }
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
    reprise_executor::paths::write_private(path, text.as_bytes())
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
    let creds_person = creds.is_person();
    let validity = creds.validity().ok();
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
                let g = (
                    link.repos().to_vec(),
                    link.trusted(),
                    link.counts_in().to_vec(),
                );
                link.close().await;
                Some(Ok(g))
            }
            Ok(Err(e)) => Some(Err(reprise_executor::text::error_chain(&e))),
            Err(_) => Some(Err("no answer within 5s".to_string())),
        }
    };
    let renews = if creds_person {
        validity.map(|(from, until)| until - (until.saturating_sub(from)) / 4)
    } else {
        None
    };
    if json {
        let (repos, trusted, counts, reachable) = match &granted {
            Some(Ok((repos, trusted, counts))) => (
                Some(repos.clone()),
                Some(*trusted),
                Some(counts.clone()),
                true,
            ),
            _ => (None, None, None, false),
        };
        let doc = serde_json::json!({
            "version": 1,
            "identity": me.name,
            "orchestrator": orchestrator,
            "credentials": credentials,
            "certificate_sha256": me.fingerprint,
            "expires_at": utc_timestamp(me.not_after),
            "expired": expired,
            "renews_from": renews.map(utc_timestamp),
            "reachable": reachable,
            "repos": repos,
            "counts_for_ci": trusted,
            "counts_in": counts,
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
            if let Some(at) = renews {
                println!(
                    "renews        from {} on, at the next connection (or `reprise login --renew`)",
                    utc_timestamp(at)
                );
            }
        }
        match &granted {
            Some(Ok((repos, _, counts))) => {
                for repo in repos {
                    println!(
                        "repository    {repo}: {}",
                        if counts.contains(repo) {
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
