//! The reprise orchestrator: a team's CA and state folder, and the QUIC
//! service that admits executors by client certificate, indexes the results
//! they hold, and relays a result from its producer to an asker. The
//! `reprise-orchestrator` binary is glue over this library.
//!
//! ```text
//! DIR/config.json     which files below play which part
//! DIR/ca.pem ca.key   the team CA (client certificates chain to it)
//! DIR/server.pem .key the service's certificate, signed by the CA
//! DIR/state.db        identities, grants, certificates, revocations,
//!                     the audit log (SQLite, WAL: also state.db-wal, -shm)
//! DIR/orchestrator.toml  settings: the repositories' trust policy
//! ```
//!
//! A folder made before the database (config version 1) names a JSON-lines
//! `state_log` instead; the first command to open it imports the log into
//! `state.db`, keeps the log as `state.jsonl.migrated`, and rewrites the
//! config.

pub mod dashboard;
pub mod explain;
pub mod forge;
pub mod http;
pub mod limits;
pub mod login;
pub mod matcher;
pub mod migrate;
pub mod oidc;
pub mod people;
pub mod pki;
pub mod server;
pub mod state;
pub mod status;
pub mod telemetry;

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use reprise_protocol::policy::{self, OrchestratorSettings};
use reprise_protocol::wire::{CONFIG_VERSION, OrchestratorConfig, StateEvent};
use thiserror::Error;
use tracing::{info, warn};

pub use crate::limits::Limits;
use crate::pki::{CaPem, LeafKind, PkiError};
use crate::state::{Grant, Recorded, State, StateError};

/// The database's file name in a new folder, and in a migrated one.
pub const DATABASE: &str = "state.db";

/// Why a command on the state folder failed.
#[derive(Debug, Error)]
pub enum FolderError {
    #[error("{} already holds an orchestrator (config.json exists); pick another folder", .0.display())]
    Exists(PathBuf),
    #[error("{} holds no orchestrator (no config.json); run `reprise-orchestrator init --dir {}` first", .0.display(), .0.display())]
    NotInitialised(PathBuf),
    #[error("config {} is not valid", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "this orchestrator does not hold its CA's key (externally managed CA); issue certificates with that CA"
    )]
    NoCaKey,
    #[error("config {} has version {found}, and this build reads up to {CONFIG_VERSION}: a newer reprise-orchestrator wrote it", path.display())]
    ConfigVersion { path: PathBuf, found: u32 },
    #[error("no identity named {0:?} was ever issued")]
    UnknownName(String),
    #[error(
        "an identity named {:?} exists already ({}, repositories: {}); pass --replace to issue it a new certificate and replace its grants (its earlier certificates stay valid, with the new grants, until revoked)",
        .0.name,
        if .0.trusted { "trusted" } else { "not trusted" },
        .0.repos.iter().cloned().collect::<Vec<_>>().join(", ")
    )]
    NameTaken(Grant),
    #[error(
        "an identity name must be non-empty and printable, without spaces, and not begin with `ci:`, `github:` or `gitlab:` (the names of CI jobs and of people who log in)"
    )]
    BadName,
    #[error(transparent)]
    Login(#[from] forge::ForgeError),
    #[error("io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Settings(#[from] reprise_protocol::policy::SettingsError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Ci(#[from] oidc::ConfigError),
    #[error(transparent)]
    Status(#[from] status::StatusConfigError),
    #[error("cannot make an HTTP client (CI issuers' keys, commit statuses)")]
    Http(#[source] reqwest::Error),
    #[error(transparent)]
    State(#[from] StateError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FolderError + '_ {
    move |source| FolderError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `init` writes as `orchestrator.toml`: the defaults, explained.
const SETTINGS_TEMPLATE: &str = "\
# reprise-orchestrator settings. Read when `serve` starts.

# What a result must show to count for CI, beyond a producer that is trusted
# for the repository (`issue --trusted`), not revoked, and not expired.
[policy]
require_fresh = false   # count only runs that started from a blank snapshot
allow_network = false   # count runs whose tests had the network (--network)
prefer = []             # when trusted producers disagree, these win, in order
ci_jobs = \"protected\"  # CI jobs (reprise login --ci) whose results count:
                        # \"protected\" refs only, \"all\", or \"none\"
commit_status = false   # post a commit status for each counting result ([status.*])
count_drivers = \"all\"  # whose results count by driver (reprise run --driver):
                        # \"all\", or the classes listed, e.g. [\"qemu\"] for VM runs only

count_access = \"maintain\" # people (reprise login) whose results count: at least this
                        # access on the forge (\"read\" … \"admin\"), or \"none\"
count_people = []       # people (forge usernames) or identities that count anyway
# readers = [\"alice\"]   # only these people may read; unset: anyone the forge lets read

# An owner's rules (a GitHub user or organization, a GitLab group or
# subgroup), for each of its repositories; only what is set overrides:
# [policy.owners.\"example.com/team\"]
# count_access = \"write\"

# One repository's own rules (only what is set overrides its owner's):
# [policy.repos.\"example.com/team/project\"]
# require_fresh = true
# count_drivers = [\"qemu\"]

# CI jobs log in with their OIDC ID token (reprise login --ci). A job of
# repository owner/name is granted the namespace HOST/owner/name only.
# [ci]
# certificate_lifetime = \"1h\"   # how long a job's certificate lasts (at most 24h)
# [ci.github]
# audience = \"reprise://reprise.example.com:4433\"   # what jobs ask their token for
# issuer = \"https://token.actions.githubusercontent.com\"  # the default
# host = \"github.com\"           # the default
# [ci.gitlab]
# audience = \"reprise://reprise.example.com:4433\"
# issuer = \"https://gitlab.com\"  # the default; host defaults to the issuer's

# People log in with GitHub or GitLab (reprise login), through this
# orchestrator's OAuth application (device flow enabled; see the README).
# [login]
# certificate_lifetime = \"12h\"  # a person's certificate (1m to 7days)
# [login.github]
# client_id = \"Iv1.0123456789abcdef\"
# web_url = \"https://github.com\", api_url = \"https://api.github.com\", host = \"github.com\": the defaults
# [login.gitlab]
# client_id = \"…\"               # the application's id (not confidential, scope read_api)
# url = \"https://gitlab.com\"    # host: the url's

# Where commit statuses go (token files in this folder, mode 0600):
# [status.github]
# token_file = \"github-status-token\"
# [status.gitlab]
# token_file = \"gitlab-status-token\"
# url = \"https://gitlab.example.com\"
";

/// Writes a file readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), FolderError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// An orchestrator's state folder.
#[derive(Debug, Clone)]
pub struct Folder {
    dir: PathBuf,
    config: OrchestratorConfig,
}

impl Folder {
    /// Makes a new folder: a CA, a server certificate for `localhost`,
    /// `127.0.0.1` and every name in `hosts`, the config and an empty state.
    pub fn init(dir: &Path, hosts: &[String]) -> Result<Folder, FolderError> {
        let config_path = dir.join("config.json");
        if config_path.exists() {
            return Err(FolderError::Exists(dir.to_path_buf()));
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = pki::new_ca()?;
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(hosts.iter().cloned());
        let server = pki::issue(&ca, LeafKind::Server, "reprise orchestrator", &sans, None)?;
        let config = OrchestratorConfig {
            version: CONFIG_VERSION,
            client_ca: "ca.pem".into(),
            ca_key: Some("ca.key".into()),
            server_cert: "server.pem".into(),
            server_key: "server.key".into(),
            database: Some(DATABASE.into()),
            state_log: None,
        };
        write_private(&dir.join("ca.pem"), &ca.cert)?;
        write_private(&dir.join("ca.key"), &ca.key)?;
        write_private(
            &dir.join("server.pem"),
            &format!("{}{}", server.cert, ca.cert),
        )?;
        write_private(&dir.join("server.key"), &server.key)?;
        State::open(&dir.join(DATABASE))?;
        write_private(&dir.join(policy::FILE_NAME), SETTINGS_TEMPLATE)?;
        let text = serde_json::to_string_pretty(&config).expect("config serialises");
        write_private(&config_path, &text)?;
        Ok(Folder {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// Opens an existing folder. A folder of config version 1 has its
    /// state log imported into the database first (see [`migrate`]).
    pub fn open(dir: &Path) -> Result<Folder, FolderError> {
        let path = dir.join("config.json");
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FolderError::NotInitialised(dir.to_path_buf()));
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let config: OrchestratorConfig =
            serde_json::from_slice(&text).map_err(|source| FolderError::Config {
                path: path.clone(),
                source,
            })?;
        if config.version > CONFIG_VERSION {
            return Err(FolderError::ConfigVersion {
                path,
                found: config.version,
            });
        }
        let mut folder = Folder {
            dir: dir.to_path_buf(),
            config,
        };
        folder.migrate()?;
        Ok(folder)
    }

    /// Imports a version 1 folder's state log into the database (once),
    /// and rewrites the config to name the database.
    fn migrate(&mut self) -> Result<(), FolderError> {
        let Some(log_name) = self.config.state_log.clone() else {
            return Ok(());
        };
        let db = self.database();
        let log = self.dir.join(&log_name);
        if log.exists() {
            if db.exists() {
                warn!(
                    log = %log.display(),
                    database = %db.display(),
                    "the state log is not read: the database holds the state (the log was imported before); remove the log"
                );
            } else if let Some(done) = migrate::import(&log, &db)? {
                info!(
                    events = done.events,
                    "imported the state log {} into {}; the log is kept as {}",
                    log.display(),
                    db.display(),
                    done.kept_as.display()
                );
                if done.torn_tail {
                    warn!(
                        "the log's last line was cut short by a crash and never acknowledged; it was left out"
                    );
                }
            }
        }
        let mut config = self.config.clone();
        config.version = CONFIG_VERSION;
        config.database = Some(
            db.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(DATABASE)
                .to_string(),
        );
        config.state_log = None;
        let text = serde_json::to_string_pretty(&config).expect("config serialises");
        let path = self.dir.join("config.json");
        let staged = self.dir.join(format!("config.json.{}", std::process::id()));
        write_private(&staged, &text)?;
        fs::rename(&staged, &path).map_err(io(&path))?;
        self.config = config;
        Ok(())
    }

    /// The state database's path.
    pub fn database(&self) -> PathBuf {
        self.dir
            .join(self.config.database.as_deref().unwrap_or(DATABASE))
    }

    fn read(&self, name: &str) -> Result<String, FolderError> {
        let path = self.dir.join(name);
        fs::read_to_string(&path).map_err(io(&path))
    }

    /// The state store (a connection of its own to the database).
    pub fn state(&self) -> Result<State, FolderError> {
        Ok(State::open(&self.database())?)
    }

    /// The settings file's text (`orchestrator.toml`; absent: `None`).
    fn settings_text(&self) -> Result<Option<String>, FolderError> {
        let path = self.dir.join(policy::FILE_NAME);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The settings (`orchestrator.toml`; absent means the defaults).
    pub fn settings(&self) -> Result<OrchestratorSettings, FolderError> {
        match self.settings_text()? {
            Some(text) => Ok(OrchestratorSettings::parse(&text)?),
            None => Ok(Default::default()),
        }
    }

    /// Everything [`server::run`] needs: the state, the policy and the CA,
    /// and what answers logins and posts statuses, all from one reading of
    /// `orchestrator.toml`.
    pub fn service(&self) -> Result<server::Service, FolderError> {
        let text = self.settings_text()?.unwrap_or_default();
        let settings = OrchestratorSettings::parse(&text)?;
        let login = self.ci_login_from(&text)?;
        let status = self.status_poster_from(&text)?;
        let people = self.people_login_from(&settings, &text)?;
        let mut state = self.state()?;
        // Statuses claimed by an earlier process and never posted: its
        // poster tasks are gone, so a later announce may try again.
        let released = state.release_unposted_statuses()?;
        if released > 0 {
            info!(
                "{released} commit status(es) claimed before a restart were never posted; they will be posted at the next announce"
            );
        }
        Ok(server::Service {
            state,
            policy: settings.policy,
            client_ca: pki::certs(&self.ca_pem()?)?,
            limits: Limits::default(),
            telemetry: Default::default(),
            login,
            status,
            people,
        })
    }

    /// What posts commit statuses, when `[status.github]` or
    /// `[status.gitlab]` is configured.
    pub fn status_poster(&self) -> Result<Option<std::sync::Arc<status::Poster>>, FolderError> {
        self.status_poster_from(&self.settings_text()?.unwrap_or_default())
    }

    fn status_poster_from(
        &self,
        text: &str,
    ) -> Result<Option<std::sync::Arc<status::Poster>>, FolderError> {
        let forges = status::forges(text, &self.dir)?;
        if forges.is_empty() {
            return Ok(None);
        }
        let poster = status::Poster::new(forges).map_err(FolderError::Http)?;
        Ok(Some(std::sync::Arc::new(poster)))
    }

    /// The CA, with its key (which signs login certificates).
    fn ca_with_key(&self) -> Result<CaPem, FolderError> {
        let key_file = self.config.ca_key.as_ref().ok_or(FolderError::NoCaKey)?;
        Ok(CaPem {
            cert: self.read(&self.config.client_ca)?,
            key: self.read(key_file)?,
        })
    }

    /// What answers CI logins, when `[ci.github]` or `[ci.gitlab]` is
    /// configured; the CA key must then be in the folder.
    pub fn ci_login(&self) -> Result<Option<login::CiLogin>, FolderError> {
        self.ci_login_from(&self.settings_text()?.unwrap_or_default())
    }

    fn ci_login_from(&self, text: &str) -> Result<Option<login::CiLogin>, FolderError> {
        let config = oidc::CiConfig::from_toml(text)?;
        if config.issuers.is_empty() {
            return Ok(None);
        }
        let ca = self.ca_with_key()?;
        let verifier = oidc::Verifier::new(&config).map_err(FolderError::Http)?;
        Ok(Some(login::CiLogin {
            config,
            verifier,
            ca,
        }))
    }

    /// What answers people's logins, when `[login.github]` or
    /// `[login.gitlab]` is configured; the CA key must then be in the
    /// folder.
    fn people_login_from(
        &self,
        settings: &OrchestratorSettings,
        text: &str,
    ) -> Result<Option<people::PeopleLogin>, FolderError> {
        let Some(table) = &settings.login else {
            return Ok(None);
        };
        if !table.contains_key("github") && !table.contains_key("gitlab") {
            // `[login]` alone (a lifetime, say) configures no forge.
            forge::Forge::from_toml(text)?;
            return Ok(None);
        }
        let (forges, lifetime) = forge::Forge::from_toml(text)?;
        if forges.is_empty() {
            return Ok(None);
        }
        Ok(Some(people::PeopleLogin {
            forges,
            lifetime,
            ca: self.ca_with_key()?,
        }))
    }

    /// The QUIC server configuration (mTLS against the configured CA),
    /// with the default limits.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, FolderError> {
        self.server_config_with(&Limits::default())
    }

    /// The QUIC server configuration, its transport bounded by `limits`.
    pub fn server_config_with(&self, limits: &Limits) -> Result<quinn::ServerConfig, FolderError> {
        Ok(pki::server_config(
            &self.read(&self.config.client_ca)?,
            &self.read(&self.config.server_cert)?,
            &self.read(&self.config.server_key)?,
            limits.transport(),
        )?)
    }

    /// The sha256 of the CA certificate's DER: what CI jobs pin.
    pub fn ca_fingerprint(&self) -> Result<reprise_protocol::digest::Sha256Digest, FolderError> {
        let ca = pki::certs(&self.ca_pem()?)?;
        Ok(pki::fingerprint(&ca[0]))
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Result<String, FolderError> {
        self.read(&self.config.client_ca)
    }

    /// Issues a client certificate to a new identity `name` for `repos`
    /// and records it; returns the credentials file's text (client
    /// certificate, its key, the CA certificate). `validity` overrides the
    /// default of a year. A name that exists is refused
    /// ([`FolderError::NameTaken`]); see [`Folder::reissue`].
    pub fn issue(
        &self,
        name: &str,
        repos: &[String],
        trusted: bool,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    ) -> Result<String, FolderError> {
        self.issue_as(name, repos, trusted, validity, false)
    }

    /// Like [`Folder::issue`] for a name that may exist: its grants are
    /// replaced by these (its earlier certificates stay valid, with the new
    /// grants, unless revoked) and a revocation is lifted for the new
    /// certificate.
    pub fn reissue(
        &self,
        name: &str,
        repos: &[String],
        trusted: bool,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    ) -> Result<String, FolderError> {
        self.issue_as(name, repos, trusted, validity, true)
    }

    fn issue_as(
        &self,
        name: &str,
        repos: &[String],
        trusted: bool,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
        replace: bool,
    ) -> Result<String, FolderError> {
        if name.is_empty()
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
            || policy::RESERVED_PREFIXES
                .iter()
                .any(|p| name.to_ascii_lowercase().starts_with(p))
        {
            return Err(FolderError::BadName);
        }
        let mut state = self.state()?;
        // Refused before a key is made; checked again when recorded.
        if !replace && let Some(existing) = state.grant(name) {
            return Err(FolderError::NameTaken(existing.clone()));
        }
        let ca = self.ca_with_key()?;
        let leaf = pki::issue_client(&ca, name, repos, validity)?;
        let event = StateEvent::Issued {
            name: name.to_string(),
            cert_sha256: leaf.sha256,
            repos: repos.to_vec(),
            trusted,
            at: state::now_secs(),
            not_after: Some(leaf.not_after),
            access: Default::default(),
        };
        match state.record_issue(event, replace)? {
            Recorded::Done => Ok(format!("{}{}{}", leaf.cert, leaf.key, ca.cert)),
            Recorded::NameTaken(existing) => Err(FolderError::NameTaken(existing)),
        }
    }

    /// Like [`Folder::issue`] (or [`Folder::reissue`] when `replace`),
    /// writing the credentials to `out` (mode 0600).
    pub fn issue_to(
        &self,
        name: &str,
        repos: &[String],
        trusted: bool,
        replace: bool,
        out: &Path,
    ) -> Result<(), FolderError> {
        let text = self.issue_as(name, repos, trusted, None, replace)?;
        write_private(out, &text)
    }

    /// Lifts the revocation of `name` (a person or a CI job, which log in
    /// again by themselves); its certificates issued so far stay revoked.
    pub fn lift(&self, name: &str) -> Result<(), FolderError> {
        let mut state = self.state()?;
        if !state.knows(name) {
            return Err(FolderError::UnknownName(name.to_string()));
        }
        state.lift_revocation(name)?;
        Ok(())
    }

    /// Revokes every certificate issued to `name`.
    pub fn revoke(&self, name: &str) -> Result<(), FolderError> {
        let mut state = self.state()?;
        if !state.knows(name) {
            return Err(FolderError::UnknownName(name.to_string()));
        }
        state.append(StateEvent::Revoked {
            name: name.to_string(),
            at: state::now_secs(),
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use reprise_protocol::digest::Sha256Digest;

    use super::*;
    use crate::state::Admission;

    #[test]
    fn init_issue_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let f = Folder::init(dir.path(), &[]).unwrap();
        assert!(matches!(
            Folder::init(dir.path(), &[]),
            Err(FolderError::Exists(_))
        ));
        let f2 = Folder::open(dir.path()).unwrap();
        f2.server_config().unwrap();
        let creds = f.issue("ci", &["ns".into()], true, None).unwrap();
        let certs = pki::certs(&creds).unwrap();
        assert_eq!(certs.len(), 2, "client and CA certificates");
        pki::private_key(&creds).unwrap();
        let sha = pki::fingerprint(&certs[0]);
        assert_eq!(
            f.settings().unwrap(),
            Default::default(),
            "the template is the defaults"
        );
        assert!(matches!(f.state().unwrap().admit(&sha), Admission::Admitted(g) if g.trusted));
        f.revoke("ci").unwrap();
        assert_eq!(
            f.state().unwrap().admit(&sha),
            Admission::Revoked("ci".into())
        );
        assert!(matches!(
            f.revoke("nobody"),
            Err(FolderError::UnknownName(_))
        ));
        for bad in [
            "two words",
            "ci:github:o/r@main",
            "github:alice",
            "GitLab:h:bob",
            "",
        ] {
            assert!(
                matches!(f.issue(bad, &[], false, None), Err(FolderError::BadName)),
                "{bad:?}: hand-issued names cannot take the forms of logins"
            );
        }
        // The revoked name exists: issuing it again needs replacing.
        let taken = f.issue("ci", &["other".into()], false, None).unwrap_err();
        assert!(
            matches!(&taken, FolderError::NameTaken(g) if g.trusted && g.repos.contains("ns")),
            "{taken:?}"
        );
        assert!(taken.to_string().contains("--replace"), "{taken}");
        let creds = f.reissue("ci", &["other".into()], false, None).unwrap();
        let sha2 = pki::fingerprint(&pki::certs(&creds).unwrap()[0]);
        assert!(
            matches!(f.state().unwrap().admit(&sha2), Admission::Admitted(g) if !g.trusted && g.repos.contains("other"))
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Folder::open(empty.path()),
            Err(FolderError::NotInitialised(_))
        ));
    }

    /// A version 1 folder, as `init` made it before the database: its
    /// config names only `state_log`, which holds `lines`.
    fn version_1_folder(dir: &Path, lines: &str) {
        Folder::init(dir, &[]).unwrap();
        fs::remove_file(dir.join(DATABASE)).unwrap();
        fs::write(
            dir.join("config.json"),
            r#"{"version":1,"client_ca":"ca.pem","ca_key":"ca.key","server_cert":"server.pem","server_key":"server.key","state_log":"state.jsonl"}"#,
        )
        .unwrap();
        fs::write(dir.join("state.jsonl"), lines).unwrap();
    }

    #[test]
    fn a_version_1_folder_is_migrated_on_first_open() {
        let dir = tempfile::tempdir().unwrap();
        let orch = dir.path().join("orch");
        let sha = Sha256Digest::of(b"old cert");
        let log = format!(
            "{{\"version\":1,\"event\":\"issued\",\"name\":\"old\",\"cert_sha256\":\"{sha}\",\"repos\":[\"ns\"],\"trusted\":true,\"at\":1}}\n"
        );
        version_1_folder(&orch, &log);
        let f = Folder::open(&orch).unwrap();
        assert!(matches!(f.state().unwrap().admit(&sha), Admission::Admitted(g) if g.trusted));
        assert!(!orch.join("state.jsonl").exists());
        assert_eq!(
            fs::read_to_string(orch.join("state.jsonl.migrated")).unwrap(),
            log
        );
        let config: OrchestratorConfig =
            serde_json::from_slice(&fs::read(orch.join("config.json")).unwrap()).unwrap();
        assert_eq!(config.version, CONFIG_VERSION);
        assert_eq!(config.database.as_deref(), Some(DATABASE));
        assert_eq!(config.state_log, None);
        // Opened again: nothing more to do, the state is kept.
        let f = Folder::open(&orch).unwrap();
        assert!(f.state().unwrap().knows("old"));
        assert!(matches!(
            f.issue("old", &[], false, None),
            Err(FolderError::NameTaken(_))
        ));
    }

    #[test]
    fn a_damaged_version_1_log_refuses_to_open_and_leaves_the_folder_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let orch = dir.path().join("orch");
        version_1_folder(&orch, "{\"version\":1,\"event\":\"revoked\"}\n");
        let config_before = fs::read(orch.join("config.json")).unwrap();
        let err = Folder::open(&orch).unwrap_err();
        let text = anyhow_like(&err);
        assert!(
            text.contains("damaged at line 1") && text.contains("nothing was imported"),
            "{text}"
        );
        assert!(!orch.join(DATABASE).exists());
        assert!(orch.join("state.jsonl").exists());
        assert_eq!(fs::read(orch.join("config.json")).unwrap(), config_before);
    }

    /// The error and its sources, as `main` prints them.
    fn anyhow_like(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    }
}
