//! The reprise orchestrator: a team's CA and state folder, and the QUIC
//! service that admits executors by client certificate, indexes the results
//! they hold, and relays a result from its producer to an asker. The
//! `reprise-orchestrator` binary is glue over this library.
//!
//! ```text
//! DIR/config.json     which files below play which part
//! DIR/ca.pem ca.key   the team CA (client certificates chain to it)
//! DIR/server.pem .key the service's certificate, signed by the CA
//! DIR/state.jsonl     identities, grants, revocations, audit log
//! DIR/orchestrator.toml  settings: the repositories' trust policy
//! ```

pub mod limits;
pub mod matcher;
pub mod pki;
pub mod server;
pub mod state;

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use reprise_protocol::policy::{self, OrchestratorSettings};
use reprise_protocol::wire::{OrchestratorConfig, STATE_VERSION, StateEvent};
use thiserror::Error;

pub use crate::limits::Limits;
use crate::pki::{CaPem, LeafKind, PkiError};
use crate::state::{State, StateError};

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
    #[error("no identity named {0:?} was ever issued")]
    UnknownName(String),
    #[error("an identity name must be non-empty and printable, without spaces")]
    BadName,
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

# One repository's own rules (only what is set overrides the defaults):
# [policy.repos.\"example.com/team/project\"]
# require_fresh = true
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
            version: STATE_VERSION,
            client_ca: "ca.pem".into(),
            ca_key: Some("ca.key".into()),
            server_cert: "server.pem".into(),
            server_key: "server.key".into(),
            state_log: "state.jsonl".into(),
        };
        write_private(&dir.join("ca.pem"), &ca.cert)?;
        write_private(&dir.join("ca.key"), &ca.key)?;
        write_private(
            &dir.join("server.pem"),
            &format!("{}{}", server.cert, ca.cert),
        )?;
        write_private(&dir.join("server.key"), &server.key)?;
        State::open(&dir.join(&config.state_log))?;
        write_private(&dir.join(policy::FILE_NAME), SETTINGS_TEMPLATE)?;
        let text = serde_json::to_string_pretty(&config).expect("config serialises");
        write_private(&config_path, &text)?;
        Ok(Folder {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// Opens an existing folder.
    pub fn open(dir: &Path) -> Result<Folder, FolderError> {
        let path = dir.join("config.json");
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FolderError::NotInitialised(dir.to_path_buf()));
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let config =
            serde_json::from_slice(&text).map_err(|source| FolderError::Config { path, source })?;
        Ok(Folder {
            dir: dir.to_path_buf(),
            config,
        })
    }

    fn read(&self, name: &str) -> Result<String, FolderError> {
        let path = self.dir.join(name);
        fs::read_to_string(&path).map_err(io(&path))
    }

    /// The state store.
    pub fn state(&self) -> Result<State, FolderError> {
        Ok(State::open(&self.dir.join(&self.config.state_log))?)
    }

    /// The settings (`orchestrator.toml`; absent means the defaults).
    pub fn settings(&self) -> Result<OrchestratorSettings, FolderError> {
        let path = self.dir.join(policy::FILE_NAME);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(OrchestratorSettings::parse(&text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Everything [`server::run`] needs: the state, the policy and the CA.
    pub fn service(&self) -> Result<server::Service, FolderError> {
        Ok(server::Service {
            state: self.state()?,
            policy: self.settings()?.policy,
            client_ca: pki::certs(&self.ca_pem()?)?,
            limits: Limits::default(),
        })
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

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Result<String, FolderError> {
        self.read(&self.config.client_ca)
    }

    /// Issues a client certificate to `name` for `repos` and records it;
    /// returns the credentials file's text (client certificate, its key,
    /// the CA certificate). `validity` overrides the default of a year.
    pub fn issue(
        &self,
        name: &str,
        repos: &[String],
        trusted: bool,
        validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    ) -> Result<String, FolderError> {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(FolderError::BadName);
        }
        let key_file = self.config.ca_key.as_ref().ok_or(FolderError::NoCaKey)?;
        let ca = CaPem {
            cert: self.read(&self.config.client_ca)?,
            key: self.read(key_file)?,
        };
        let leaf = pki::issue(&ca, LeafKind::Client, name, &[], validity)?;
        self.state()?.append(StateEvent::Issued {
            name: name.to_string(),
            cert_sha256: leaf.sha256,
            repos: repos.to_vec(),
            trusted,
            at: state::now_secs(),
            not_after: Some(leaf.not_after),
        })?;
        Ok(format!("{}{}{}", leaf.cert, leaf.key, ca.cert))
    }

    /// Like [`Folder::issue`], writing the credentials to `out` (mode 0600).
    pub fn issue_to(
        &self,
        name: &str,
        repos: &[String],
        trusted: bool,
        out: &Path,
    ) -> Result<(), FolderError> {
        let text = self.issue(name, repos, trusted, None)?;
        write_private(out, &text)
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
        assert!(matches!(
            f.issue("two words", &[], false, None),
            Err(FolderError::BadName)
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Folder::open(empty.path()),
            Err(FolderError::NotInitialised(_))
        ));
    }
}
