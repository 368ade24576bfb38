//! People log in through a forge: the orchestrator runs the OAuth 2.0
//! device authorization grant (RFC 8628) against GitHub or GitLab with its
//! own OAuth application, then asks the forge who the person is and what
//! access they have to each of the team's repositories. The forge token
//! never leaves the orchestrator.
//!
//! Settings, in `orchestrator.toml` (every URL defaults to the public
//! service, so GitHub Enterprise or a self-hosted GitLab only changes URLs):
//!
//! ```toml
//! [login.github]
//! client_id = "Iv1.0123456789abcdef"
//! web_url = "https://github.com"          # device code and token endpoints
//! api_url = "https://api.github.com"      # /user, /repos/{owner}/{repo}
//! host = "github.com"                     # first part of namespaces
//!
//! [login.gitlab]
//! client_id = "…"
//! url = "https://gitlab.com"              # /oauth/…, /api/v4/…
//! host = "gitlab.com"
//! ```
//!
//! THIS FILE IS THE INTERFACE AGREED BETWEEN TWO PIECES OF WORK: the bodies
//! are filled in by the forge-client work; the login service only calls
//! what is declared here.

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Which forge a person logs in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    Github,
    Gitlab,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
        }
    }
}

/// A `[login.github]` table, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubSettings {
    pub client_id: String,
    #[serde(default)]
    pub web_url: Option<String>,
    #[serde(default)]
    pub api_url: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// For tests only: accept `http://` URLs on a loopback address.
    #[serde(default)]
    pub allow_http_loopback: bool,
}

/// A `[login.gitlab]` table, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitlabSettings {
    pub client_id: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    /// For tests only: accept `http://` URLs on a loopback address.
    #[serde(default)]
    pub allow_http_loopback: bool,
}

/// The `[login]` table, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSettings {
    #[serde(default)]
    pub github: Option<GithubSettings>,
    #[serde(default)]
    pub gitlab: Option<GitlabSettings>,
    /// How long a person's certificate lasts (`humantime`; default 12h).
    #[serde(default)]
    pub certificate_lifetime: Option<String>,
}

/// What the forge answered to the device authorization request; shown to
/// the person (the `device_code` stays in the orchestrator).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    /// The least time between two polls (RFC 8628 default 5 s).
    pub interval: Duration,
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// The person's forge access token; never logged, never sent on.
#[derive(Clone, PartialEq, Eq)]
pub struct ForgeToken(pub String);

impl std::fmt::Debug for ForgeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForgeToken(…)")
    }
}

/// Who the forge says the person is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// GitHub `login`, GitLab `username`.
    pub username: String,
    /// The forge's numeric user id (stable across renames).
    pub id: u64,
}

/// A person's access to one repository, ordered from least to most.
/// GitHub's `permissions` map to these one to one (`pull` = Read, `push` =
/// Write); GitLab's access levels: 10 Guest and 15 Planner = `Guest`, 20
/// Reporter = `Read`, 30 Developer = `Write`, 40 Maintainer = `Maintain`,
/// 50 Owner = `Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// No access, or the repository does not exist for them.
    None,
    /// May see the project but not its code (GitLab Guest).
    Guest,
    Read,
    Triage,
    Write,
    Maintain,
    Admin,
}

/// How a device flow ended, when it did not give a token.
#[derive(Debug, Error)]
pub enum ForgeError {
    #[error("the person denied the login on the forge")]
    Denied,
    #[error("the login code expired before the person approved it; run `reprise login` again")]
    Expired,
    #[error("the forge refused the OAuth application: {0}")]
    Client(String),
    #[error("the forge answered something unexpected: {0}")]
    Protocol(String),
    #[error("the forge could not be reached: {0}")]
    Unreachable(String),
    #[error("the [login] settings are not valid: {0}")]
    Config(String),
}

/// One configured forge, ready to run device flows and ask about access.
#[derive(Debug, Clone)]
pub struct Forge {
    pub provider: Provider,
    /// The first part of the namespaces of its repositories.
    pub host: String,
}

impl Forge {
    /// Checks the `[login]` table of `orchestrator.toml`'s text.
    pub fn from_toml(_text: &str) -> Result<(Vec<Forge>, Duration), ForgeError> {
        Err(ForgeError::Config("not built yet".into()))
    }

    /// The namespace of `repository` (`owner/name`, GitLab may nest groups).
    pub fn namespace(&self, repository: &str) -> String {
        format!("{}/{}", self.host, repository)
    }

    /// Starts a device flow (GitHub `POST {web}/login/device/code`, GitLab
    /// `POST {url}/oauth/authorize_device`).
    pub async fn start(&self) -> Result<DeviceAuthorization, ForgeError> {
        Err(ForgeError::Config("not built yet".into()))
    }

    /// Polls the token endpoint, honouring `interval` and `slow_down`,
    /// until the person approves (the token), denies, or the code expires.
    pub async fn wait_for_token(
        &self,
        _device: &DeviceAuthorization,
    ) -> Result<ForgeToken, ForgeError> {
        Err(ForgeError::Config("not built yet".into()))
    }

    /// Who the token belongs to (GitHub `GET {api}/user`, GitLab `GET
    /// {url}/api/v4/user`).
    pub async fn person(&self, _token: &ForgeToken) -> Result<Person, ForgeError> {
        Err(ForgeError::Config("not built yet".into()))
    }

    /// The person's access to `repository` (`owner/name`): GitHub `GET
    /// {api}/repos/{owner}/{repo}` and its `permissions`; GitLab `GET
    /// {url}/api/v4/projects/{url-encoded path}` and the higher of
    /// `permissions.project_access` and `permissions.group_access`. A 404
    /// is [`Access::None`].
    pub async fn access(
        &self,
        _token: &ForgeToken,
        _repository: &str,
    ) -> Result<Access, ForgeError> {
        Err(ForgeError::Config("not built yet".into()))
    }
}
