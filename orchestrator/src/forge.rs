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
//! `certificate_lifetime` (in `[login]`, `humantime`, default 12h, at most
//! 7 days) is how long the certificate of a person who logged in lasts.
//! `allow_http_loopback = true` (tests only) accepts `http://` URLs on a
//! loopback address; otherwise every URL must be `https`.
//!
//! What is asked of the forge:
//!
//! | step | GitHub | GitLab (17.x and later) |
//! |---|---|---|
//! | start | `POST {web}/login/device/code` | `POST {url}/oauth/authorize_device` |
//! | poll | `POST {web}/login/oauth/access_token` | `POST {url}/oauth/token` |
//! | who | `GET {api}/user` (`login`, `id`) | `GET {url}/api/v4/user` (`username`, `id`) |
//! | access | `GET {api}/repos/{owner}/{repo}` `permissions` | `GET {url}/api/v4/projects/{path}` `permissions`, `…/members/all/{id}` |
//!
//! Scopes: GitLab `read_api` (read-only, covers `/user` and the projects'
//! access levels; `read_user` alone cannot read a project). GitHub `repo`:
//! an OAuth App needs it to see a private repository at all (there is no
//! read-only scope for private repositories); a GitHub App ignores scopes
//! and its user tokens get only the App's permissions (Metadata: read is
//! enough) on the repositories where it is installed, so a GitHub App is
//! the narrower choice and the one the README recommends. Either way the
//! token stays in the orchestrator.
//!
//! The device flow is RFC 8628 through the `oauth2` crate, with three
//! things it leaves to us:
//!
//! * GitHub answers the token endpoint's errors (`authorization_pending`,
//!   `slow_down`, `expired_token`, `access_denied`, …) with HTTP 200, which
//!   `oauth2` takes for a malformed token (its issue #218). The HTTP client
//!   handed to `oauth2` ([`Forge::send`]) turns a 200 whose JSON carries an
//!   `error` into a 400, the status RFC 6749 §5.2 gives it.
//! * `slow_down`: `oauth2` adds 5 s to the interval (RFC 8628 §3.5); when
//!   the forge names a new `interval` (GitHub does) the longer of the two is
//!   waited.
//! * The first poll waits one interval too (the person needs the time to
//!   type the code anyway), and polling stops at `expires_in`.
//!
//! Every request has a timeout, every answer is read up to a size cap,
//! redirects are not followed (the token would go wherever a `Location`
//! says), and no error text carries the token, the device code or an
//! answer's body beyond the OAuth `error` fields. A repository name is
//! checked segment by segment (`[A-Za-z0-9._-]`, no `.`/`..`) before it is
//! put into a URL, as escaped path segments, so a hostile name in the
//! settings cannot send the token to another API path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, DeviceAuthorizationUrl, HttpRequest, HttpResponse, RequestTokenError,
    Scope, StandardErrorResponse, TokenResponse as _, TokenUrl,
};
use oauth2::{DeviceCodeErrorResponseType, StandardDeviceAuthorizationResponse};
use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;
use tracing::{debug, info};

use crate::oidc::{check_scheme, clip};

/// A person's certificate lasts this long unless `[login]
/// certificate_lifetime` says otherwise.
pub const DEFAULT_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The longest `certificate_lifetime` accepted: access lost on the forge
/// must take effect within it.
pub const MAX_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest `certificate_lifetime` accepted.
pub const MIN_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(60);
/// The largest answer read from a forge (a GitHub repository or a GitLab
/// project is a few KiB of JSON).
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Each request to a forge gives up after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest device-flow polling interval honoured (a forge asking for
/// more is capped, so a login cannot hang for its whole expiry on one poll).
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// The longest device flow waited for, whatever `expires_in` says
/// (GitHub's codes last 15 minutes, GitLab's 5).
const MAX_EXPIRY: Duration = Duration::from_secs(3600);
/// The scope asked of GitHub (see the module doc).
pub const GITHUB_SCOPE: &str = "repo";
/// The scope asked of GitLab (see the module doc).
pub const GITLAB_SCOPE: &str = "read_api";
const USER_AGENT: &str = concat!("reprise-orchestrator/", env!("CARGO_PKG_VERSION"));

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
    /// The OAuth application's client id.
    pub client_id: String,
    endpoints: Endpoints,
    http: reqwest::Client,
}

/// Where a forge is asked what.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoints {
    device_authorization: Url,
    token: Url,
    /// `GET` the person.
    user: Url,
    /// GitHub `{api}`, GitLab `{url}/api/v4`: the repository paths go below.
    api: Url,
}

/// A settings URL, checked: parsed, no credentials, query or fragment,
/// `https` (or `http` on loopback when allowed); the trailing `/` dropped.
fn base_url(what: &str, text: &str, allow_http_loopback: bool) -> Result<Url, ForgeError> {
    let bad = |reason: &str| ForgeError::Config(format!("{what} {text:?}: {reason}"));
    let mut url = Url::parse(text).map_err(|e| bad(&e.to_string()))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("it must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or fragment"));
    }
    check_scheme(&url, allow_http_loopback).map_err(|reason| bad(&reason))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    let path = url.path().trim_end_matches('/').to_string();
    url.set_path(&path);
    Ok(url)
}

/// `base` with `path` (fixed text, no user input) appended.
fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}/{}", base.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    url
}

/// `base` with each of `segments` appended as one escaped path segment.
fn with_segments<'a>(base: &Url, segments: impl IntoIterator<Item = &'a str>) -> Url {
    let mut url = base.clone();
    {
        let mut path = url
            .path_segments_mut()
            .expect("a checked http(s) URL has a path");
        path.pop_if_empty();
        for segment in segments {
            path.push(segment);
        }
    }
    url
}

fn check_host(host: &str) -> Result<(), ForgeError> {
    if host.is_empty() || host.contains(['/', ' ', '\\']) || host.chars().any(char::is_control) {
        return Err(ForgeError::Config(format!(
            "host {host:?} is not a host name"
        )));
    }
    Ok(())
}

fn check_client_id(provider: Provider, id: &str) -> Result<(), ForgeError> {
    if id.trim().is_empty() || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ForgeError::Config(format!(
            "[login.{}] client_id {id:?} is not an OAuth client id (copy it from the OAuth application's page)",
            provider.as_str()
        )));
    }
    Ok(())
}

/// Checks a repository name before any part of it goes into a URL:
/// GitHub exactly two segments (`owner/name`), GitLab 2 to 21 (nested
/// groups, at most 20 levels), each of `[A-Za-z0-9._-]`, none empty, `.`
/// or `..`. Returns the segments.
pub fn check_repository(provider: Provider, repository: &str) -> Result<Vec<&str>, ForgeError> {
    let segments: Vec<&str> = repository.split('/').collect();
    let count_ok = match provider {
        Provider::Github => segments.len() == 2,
        Provider::Gitlab => (2..=21).contains(&segments.len()),
    };
    let segment_ok = |s: &&str| {
        !s.is_empty()
            && s.len() <= 255
            && *s != "."
            && *s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if !count_ok || !segments.iter().all(segment_ok) {
        let shape = match provider {
            Provider::Github => "owner/name",
            Provider::Gitlab => "group/…/project",
        };
        return Err(ForgeError::Config(format!(
            "repository {:?} is not a {} repository name ({shape}, letters, digits, '.', '_' and '-')",
            clip(repository),
            provider.as_str()
        )));
    }
    Ok(segments)
}

/// How a device flow's polls went, shared between the HTTP client handed
/// to `oauth2` and the sleep between polls.
#[derive(Debug, Default)]
struct PollState {
    /// The `interval` the forge sent with its last `slow_down`.
    server_interval: Option<Duration>,
    /// The last poll that did not get an answer (cleared by an answer).
    transport_error: Option<String>,
    /// The status of the last answer.
    status: Option<u16>,
}

/// The HTTP client handed to `oauth2`: [`Forge::send`] (a named type with
/// a boxed `Send` future, so the device flow can run on a spawned task).
/// It owns what it uses (a `Forge` clone shares the connection pool):
/// borrowed fields make the flow's future not provably `Send`.
struct OauthHttp {
    forge: Forge,
    state: Arc<Mutex<PollState>>,
}

type SendFuture<'c> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<HttpResponse, HttpFailure>> + Send + 'c>,
>;

impl<'c> oauth2::AsyncHttpClient<'c> for OauthHttp {
    type Error = HttpFailure;
    type Future = SendFuture<'c>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.forge.send(request, &self.state))
    }
}

/// Why a request to a forge got no usable answer (never carries the
/// token: reqwest's errors name the URL, and no URL holds a secret).
#[derive(Debug, Error)]
#[error("{0}")]
struct HttpFailure(String);

impl Forge {
    /// Checks the `[login]` table of `orchestrator.toml`'s text (other
    /// tables are not looked at): the configured forges, and how long a
    /// person's certificate lasts.
    pub fn from_toml(text: &str) -> Result<(Vec<Forge>, Duration), ForgeError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ForgeError::Config(e.to_string()))?;
        let settings = match table.get("login") {
            None => LoginSettings::default(),
            Some(value) => LoginSettings::deserialize(value.clone())
                .map_err(|e| ForgeError::Config(format!("[login]: {}", e.message())))?,
        };
        Forge::from_settings(&settings)
    }

    /// Checks a `[login]` table already read.
    pub fn from_settings(settings: &LoginSettings) -> Result<(Vec<Forge>, Duration), ForgeError> {
        let mut forges = Vec::new();
        if let Some(github) = &settings.github {
            forges.push(Forge::github(github)?);
        }
        if let Some(gitlab) = &settings.gitlab {
            forges.push(Forge::gitlab(gitlab)?);
        }
        let lifetime = match &settings.certificate_lifetime {
            None => DEFAULT_CERTIFICATE_LIFETIME,
            Some(text) => {
                let lifetime = humantime::parse_duration(text).map_err(|e| {
                    ForgeError::Config(format!(
                        "certificate_lifetime {text:?}: {e} (write e.g. \"12h\")"
                    ))
                })?;
                if !(MIN_CERTIFICATE_LIFETIME..=MAX_CERTIFICATE_LIFETIME).contains(&lifetime) {
                    return Err(ForgeError::Config(format!(
                        "certificate_lifetime {text:?} must be between 1m and 7days"
                    )));
                }
                lifetime
            }
        };
        Ok((forges, lifetime))
    }

    /// A GitHub (or GitHub Enterprise) forge from its `[login.github]`.
    pub fn github(settings: &GithubSettings) -> Result<Forge, ForgeError> {
        check_client_id(Provider::Github, &settings.client_id)?;
        let loopback = settings.allow_http_loopback;
        let web = base_url(
            "[login.github] web_url",
            settings.web_url.as_deref().unwrap_or("https://github.com"),
            loopback,
        )?;
        let api = base_url(
            "[login.github] api_url",
            settings
                .api_url
                .as_deref()
                .unwrap_or("https://api.github.com"),
            loopback,
        )?;
        let host = settings.host.clone().unwrap_or_else(|| "github.com".into());
        check_host(&host)?;
        Forge::with(
            Provider::Github,
            host,
            settings.client_id.clone(),
            Endpoints {
                device_authorization: join(&web, "login/device/code"),
                token: join(&web, "login/oauth/access_token"),
                user: join(&api, "user"),
                api,
            },
        )
    }

    /// A GitLab (GitLab.com or self-managed) forge from its `[login.gitlab]`.
    pub fn gitlab(settings: &GitlabSettings) -> Result<Forge, ForgeError> {
        check_client_id(Provider::Gitlab, &settings.client_id)?;
        let url = base_url(
            "[login.gitlab] url",
            settings.url.as_deref().unwrap_or("https://gitlab.com"),
            settings.allow_http_loopback,
        )?;
        let host = match &settings.host {
            Some(host) => host.clone(),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        check_host(&host)?;
        let api = join(&url, "api/v4");
        Forge::with(
            Provider::Gitlab,
            host,
            settings.client_id.clone(),
            Endpoints {
                device_authorization: join(&url, "oauth/authorize_device"),
                token: join(&url, "oauth/token"),
                user: join(&api, "user"),
                api,
            },
        )
    }

    fn with(
        provider: Provider,
        host: String,
        client_id: String,
        endpoints: Endpoints,
    ) -> Result<Forge, ForgeError> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| ForgeError::Config(format!("no HTTP client: {e}")))?;
        Ok(Forge {
            provider,
            host,
            client_id,
            endpoints,
            http,
        })
    }

    /// The namespace of `repository` (`owner/name`, GitLab may nest groups).
    pub fn namespace(&self, repository: &str) -> String {
        format!("{}/{}", self.host, repository)
    }

    fn scope(&self) -> &'static str {
        match self.provider {
            Provider::Github => GITHUB_SCOPE,
            Provider::Gitlab => GITLAB_SCOPE,
        }
    }

    /// The `oauth2` client: a public client (no secret, `client_id` in the
    /// form body, which is what both forges' device flows take).
    fn oauth(
        &self,
    ) -> oauth2::Client<
        oauth2::basic::BasicErrorResponse,
        oauth2::basic::BasicTokenResponse,
        oauth2::basic::BasicTokenIntrospectionResponse,
        oauth2::StandardRevocableToken,
        oauth2::basic::BasicRevocationErrorResponse,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
    > {
        BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_auth_type(AuthType::RequestBody)
            .set_device_authorization_url(DeviceAuthorizationUrl::from_url(
                self.endpoints.device_authorization.clone(),
            ))
            .set_token_uri(TokenUrl::from_url(self.endpoints.token.clone()))
    }

    /// One HTTP exchange for `oauth2`: the answer read up to
    /// [`MAX_ANSWER_BYTES`], and a 200 whose JSON carries an `error` (GitHub's
    /// way) turned into the 400 of RFC 6749 §5.2; a `slow_down`'s new
    /// `interval` is noted in `state`.
    async fn send(
        &self,
        request: HttpRequest,
        state: &Mutex<PollState>,
    ) -> Result<HttpResponse, HttpFailure> {
        let url = request.uri().to_string();
        let result = self.exchange(request).await;
        let mut state = state.lock().expect("poll state");
        match result {
            Ok(mut response) => {
                state.transport_error = None;
                state.status = Some(response.status().as_u16());
                if let Some((error, interval)) = oauth_error(response.body()) {
                    if response.status() == oauth2::http::StatusCode::OK {
                        *response.status_mut() = oauth2::http::StatusCode::BAD_REQUEST;
                    }
                    if error == "slow_down" {
                        state.server_interval = interval.map(Duration::from_secs);
                    }
                }
                Ok(response)
            }
            Err(e) => {
                let text = format!("POST {url}: {e}");
                state.transport_error = Some(text.clone());
                Err(HttpFailure(text))
            }
        }
    }

    async fn exchange(&self, request: HttpRequest) -> Result<HttpResponse, String> {
        let request = reqwest::Request::try_from(request).map_err(|e| e.to_string())?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| crate::oidc::error_chain(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_capped(response).await?;
        let mut answer = oauth2::http::Response::new(body);
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        Ok(answer)
    }

    /// Starts a device flow (GitHub `POST {web}/login/device/code`, GitLab
    /// `POST {url}/oauth/authorize_device`).
    pub async fn start(&self) -> Result<DeviceAuthorization, ForgeError> {
        let state = Arc::new(Mutex::new(PollState::default()));
        let http = OauthHttp {
            forge: self.clone(),
            state: state.clone(),
        };
        let answer: StandardDeviceAuthorizationResponse = self
            .oauth()
            .exchange_device_code()
            .add_scope(Scope::new(self.scope().into()))
            .request_async(&http)
            .await
            .map_err(|e| {
                let status = state.lock().expect("poll state").status;
                self.start_error(e, status)
            })?;
        let device = DeviceAuthorization {
            device_code: answer.device_code().secret().clone(),
            user_code: answer.user_code().secret().clone(),
            verification_uri: answer.verification_uri().to_string(),
            verification_uri_complete: answer
                .verification_uri_complete()
                .map(|u| u.secret().clone()),
            expires_in: answer.expires_in(),
            interval: answer.interval(),
        };
        // What the person is shown: no terminal control characters.
        let shown = [&device.user_code, &device.verification_uri]
            .into_iter()
            .chain(device.verification_uri_complete.as_ref());
        let printable = shown.into_iter().all(|s| !s.chars().any(char::is_control));
        if device.expires_in.is_zero() || device.user_code.is_empty() || !printable {
            return Err(ForgeError::Protocol(format!(
                "POST {}: an empty or unprintable user code or URL, or an expiry of 0",
                self.endpoints.device_authorization
            )));
        }
        info!(provider = self.provider.as_str(), expires_in = ?device.expires_in, "device flow started");
        Ok(device)
    }

    fn start_error(
        &self,
        e: RequestTokenError<HttpFailure, StandardErrorResponse<BasicErrorResponseType>>,
        status: Option<u16>,
    ) -> ForgeError {
        let url = &self.endpoints.device_authorization;
        if status == Some(404) {
            // What github.com answers for a client_id it does not know.
            return ForgeError::Client(format!(
                "POST {url}: 404: no OAuth application with client_id {:?} here (or not one with the device flow enabled)",
                clip(&self.client_id)
            ));
        }
        match e {
            RequestTokenError::ServerResponse(answer) => {
                let text = format!(
                    "POST {url}: {}{}",
                    clip(answer.error().as_ref()),
                    describe(answer.error_description())
                );
                match answer.error() {
                    BasicErrorResponseType::InvalidClient
                    | BasicErrorResponseType::UnauthorizedClient
                    | BasicErrorResponseType::InvalidScope => ForgeError::Client(text),
                    BasicErrorResponseType::Extension(other) if is_client_error(other) => {
                        ForgeError::Client(text)
                    }
                    _ => ForgeError::Protocol(text),
                }
            }
            RequestTokenError::Request(e) => ForgeError::Unreachable(e.0),
            RequestTokenError::Parse(e, body) => ForgeError::Protocol(format!(
                "POST {url}: not a device authorization ({}; {} bytes, status {})",
                parse_failure(e.inner(), e.path()),
                body.len(),
                status.map_or_else(|| "?".to_string(), |s| s.to_string()),
            )),
            RequestTokenError::Other(text) => ForgeError::Protocol(format!("POST {url}: {text}")),
        }
    }

    /// Polls the token endpoint, honouring `interval` and `slow_down`,
    /// until the person approves (the token), denies, or the code expires.
    pub async fn wait_for_token(
        &self,
        device: &DeviceAuthorization,
    ) -> Result<ForgeToken, ForgeError> {
        // A forge's word, bounded: at least 1 s between polls, at most
        // MAX_INTERVAL, and no flow longer than MAX_EXPIRY.
        let interval = device.interval.clamp(Duration::from_secs(1), MAX_INTERVAL);
        let expires_in = device.expires_in.min(MAX_EXPIRY);
        let answer: StandardDeviceAuthorizationResponse =
            serde_json::from_value(serde_json::json!({
                "device_code": device.device_code,
                "user_code": device.user_code,
                "verification_uri": device.verification_uri,
                "expires_in": expires_in.as_secs(),
                "interval": interval.as_secs(),
            }))
            .map_err(|e| ForgeError::Protocol(format!("the device authorization: {e}")))?;
        let state = Arc::new(Mutex::new(PollState::default()));
        let http = OauthHttp {
            forge: self.clone(),
            state: state.clone(),
        };
        let sleep = |wanted: Duration| {
            let state = state.clone();
            async move {
                let server = state.lock().expect("poll state").server_interval;
                let wait = wanted.max(server.unwrap_or_default()).min(MAX_INTERVAL);
                debug!(?wait, "next poll");
                tokio::time::sleep(wait).await;
            }
        };
        // The first poll waits one interval too (nobody approves faster).
        tokio::time::sleep(interval).await;
        let client = self.oauth();
        let result = client
            .exchange_device_access_token(&answer)
            .set_max_backoff_interval(MAX_INTERVAL)
            .request_async(&http, sleep, Some(expires_in))
            .await;
        let token_url = &self.endpoints.token;
        match result {
            Ok(token) => {
                let token = token.access_token().secret().clone();
                if token.is_empty() {
                    return Err(ForgeError::Protocol(format!(
                        "POST {token_url}: an empty access_token"
                    )));
                }
                info!(provider = self.provider.as_str(), "device flow approved");
                Ok(ForgeToken(token))
            }
            Err(RequestTokenError::ServerResponse(answer)) => {
                let text = format!(
                    "POST {token_url}: {}{}",
                    clip(answer.error().as_ref()),
                    describe(answer.error_description())
                );
                match answer.error() {
                    DeviceCodeErrorResponseType::AccessDenied => Err(ForgeError::Denied),
                    DeviceCodeErrorResponseType::ExpiredToken => {
                        // oauth2 says "expired" when its clock ran out, also
                        // when the last polls could not reach the forge.
                        match state.lock().expect("poll state").transport_error.take() {
                            Some(e) => Err(ForgeError::Unreachable(e)),
                            None => Err(ForgeError::Expired),
                        }
                    }
                    DeviceCodeErrorResponseType::Basic(
                        BasicErrorResponseType::InvalidClient
                        | BasicErrorResponseType::UnauthorizedClient
                        | BasicErrorResponseType::UnsupportedGrantType
                        | BasicErrorResponseType::InvalidScope,
                    ) => Err(ForgeError::Client(text)),
                    DeviceCodeErrorResponseType::Basic(BasicErrorResponseType::Extension(
                        other,
                    )) if is_client_error(other) => Err(ForgeError::Client(text)),
                    // The forge no longer knows the code (GitLab
                    // `invalid_grant`, GitHub `incorrect_device_code`):
                    // the flow is over, the person logs in again.
                    DeviceCodeErrorResponseType::Basic(BasicErrorResponseType::InvalidGrant) => {
                        Err(ForgeError::Expired)
                    }
                    DeviceCodeErrorResponseType::Basic(BasicErrorResponseType::Extension(
                        other,
                    )) if other == "incorrect_device_code" => Err(ForgeError::Expired),
                    _ => Err(ForgeError::Protocol(text)),
                }
            }
            Err(RequestTokenError::Request(e)) => Err(ForgeError::Unreachable(e.0)),
            Err(RequestTokenError::Parse(e, body)) => Err(ForgeError::Protocol(format!(
                "POST {token_url}: not a token answer ({}; {} bytes)",
                parse_failure(e.inner(), e.path()),
                body.len()
            ))),
            Err(RequestTokenError::Other(text)) => {
                Err(ForgeError::Protocol(format!("POST {token_url}: {text}")))
            }
        }
    }

    /// `GET url` with the person's token.
    async fn get(&self, token: &ForgeToken, url: &Url) -> Result<Answer, ForgeError> {
        let mut request = self.http.get(url.clone()).bearer_auth(&token.0);
        if self.provider == Provider::Github {
            request = request
                .header(reqwest::header::ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28");
        } else {
            request = request.header(reqwest::header::ACCEPT, "application/json");
        }
        let response = request.send().await.map_err(|e| {
            ForgeError::Unreachable(format!("GET {url}: {}", crate::oidc::error_chain(&e)))
        })?;
        let status = response.status();
        let rate_limited = status == reqwest::StatusCode::TOO_MANY_REQUESTS
            || (status == reqwest::StatusCode::FORBIDDEN
                && response
                    .headers()
                    .get("x-ratelimit-remaining")
                    .is_some_and(|v| v.as_bytes() == b"0"));
        if rate_limited {
            return Err(ForgeError::Unreachable(format!(
                "GET {url}: rate limited ({status}); try again later"
            )));
        }
        match status.as_u16() {
            200 => {}
            404 => return Ok(Answer::NotFound),
            403 => return Ok(Answer::Forbidden),
            401 => {
                return Err(ForgeError::Denied);
            }
            code => {
                return Err(ForgeError::Protocol(format!("GET {url}: status {code}")));
            }
        }
        let body = read_capped(response)
            .await
            .map_err(|e| ForgeError::Unreachable(format!("GET {url}: {e}")))?;
        serde_json::from_slice(&body)
            .map(Answer::Json)
            .map_err(|e| {
                ForgeError::Protocol(format!(
                    "GET {url}: not JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ))
            })
    }

    /// Who the token belongs to (GitHub `GET {api}/user`, GitLab `GET
    /// {url}/api/v4/user`). A token the forge no longer accepts (401) is
    /// [`ForgeError::Denied`].
    pub async fn person(&self, token: &ForgeToken) -> Result<Person, ForgeError> {
        let url = &self.endpoints.user;
        let answer = match self.get(token, url).await? {
            Answer::Json(answer) => answer,
            Answer::NotFound => return Err(ForgeError::Protocol(format!("GET {url}: status 404"))),
            Answer::Forbidden => {
                return Err(ForgeError::Protocol(format!("GET {url}: status 403")));
            }
        };
        person_of(self.provider, &answer)
            .map_err(|reason| ForgeError::Protocol(format!("GET {url}: {reason}")))
    }

    /// The URL asked for the person's access to `repository`.
    fn repository_url(&self, repository: &str) -> Result<Url, ForgeError> {
        let segments = check_repository(self.provider, repository)?;
        Ok(match self.provider {
            Provider::Github => {
                with_segments(&self.endpoints.api, ["repos", segments[0], segments[1]])
            }
            // One segment: `url` escapes its `/`s as %2F, the "URL-encoded
            // path" GitLab's API takes for a project id.
            Provider::Gitlab => with_segments(&self.endpoints.api, ["projects", repository]),
        })
    }

    /// The person's access to `repository` (`owner/name`): GitHub `GET
    /// {api}/repos/{owner}/{repo}` and its `permissions`; GitLab `GET
    /// {url}/api/v4/projects/{url-encoded path}` and the higher of
    /// `permissions.project_access` and `permissions.group_access`. A 404
    /// is [`Access::None`], and so is a 403 that is not rate limiting (e.g.
    /// an organization whose SAML single sign-on the token has not been
    /// authorized for: the forge will not show this person the
    /// repository). A name that cannot be a repository of this
    /// forge ([`check_repository`]) is a [`ForgeError::Config`], and is
    /// never sent.
    pub async fn access(&self, token: &ForgeToken, repository: &str) -> Result<Access, ForgeError> {
        let url = self.repository_url(repository)?;
        let answer = match self.get(token, &url).await? {
            Answer::NotFound | Answer::Forbidden => return Ok(Access::None),
            Answer::Json(answer) => answer,
        };
        let bad = |reason: String| ForgeError::Protocol(format!("GET {url}: {reason}"));
        if self.provider == Provider::Gitlab && gitlab_shown_level(&answer).map_err(bad)?.is_none()
        {
            // Seen, but neither a project nor a parent-group membership is
            // shown: the membership may be inherited from a group higher up
            // (or a group the project is shared with), which only
            // `members/all` tells.
            if let Some(level) = self.gitlab_inherited_level(token, repository).await? {
                return Ok(gitlab_level(level));
            }
        }
        access_of(self.provider, &answer).map_err(bad)
    }

    /// GitLab `GET {url}/api/v4/projects/{path}/members/all/{user id}`: the
    /// person's effective access level, inherited memberships included;
    /// `None` when they are no member at all.
    async fn gitlab_inherited_level(
        &self,
        token: &ForgeToken,
        repository: &str,
    ) -> Result<Option<u64>, ForgeError> {
        let person = self.person(token).await?;
        let id = person.id.to_string();
        let url = with_segments(
            &self.endpoints.api,
            ["projects", repository, "members", "all", id.as_str()],
        );
        match self.get(token, &url).await? {
            Answer::NotFound | Answer::Forbidden => Ok(None),
            Answer::Json(member) => member
                .get("access_level")
                .and_then(Value::as_u64)
                .map(Some)
                .ok_or_else(|| ForgeError::Protocol(format!("GET {url}: no access_level"))),
        }
    }
}

/// What an API `GET` got.
enum Answer {
    Json(Value),
    NotFound,
    Forbidden,
}

/// Reads a body up to [`MAX_ANSWER_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let too_large = || format!("the answer is larger than {MAX_ANSWER_BYTES} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| crate::oidc::error_chain(&e))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The OAuth `error` of a JSON answer, and the `interval` beside it.
fn oauth_error(body: &[u8]) -> Option<(String, Option<u64>)> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?.as_str()?.to_string();
    let interval = value.get("interval").and_then(Value::as_u64);
    Some((error, interval))
}

/// Where and how an answer failed to parse, without quoting any of its
/// values (a token's answer holds the token).
fn parse_failure(e: &serde_json::Error, path: &dyn std::fmt::Display) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "unexpected fields",
        serde_json::error::Category::Eof => "cut short",
    };
    format!("{kind} at {path}")
}

/// Errors that mean the OAuth application is wrong, not the person.
fn is_client_error(error: &str) -> bool {
    matches!(
        error,
        "incorrect_client_credentials"
            | "device_flow_disabled"
            | "unauthorized_client"
            | "invalid_client"
            | "unsupported_grant_type"
    )
}

fn describe(description: Option<&String>) -> String {
    description
        .map(|d| format!(" ({})", clip(d)))
        .unwrap_or_default()
}

/// The person in a `/user` answer.
pub fn person_of(provider: Provider, answer: &Value) -> Result<Person, String> {
    let name_field = match provider {
        Provider::Github => "login",
        Provider::Gitlab => "username",
    };
    let username = answer
        .get(name_field)
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && !n.chars().any(|c| c.is_control() || c == '/'))
        .ok_or_else(|| format!("no usable {name_field:?}"))?;
    let id = answer
        .get("id")
        .and_then(Value::as_u64)
        .ok_or("no numeric \"id\"")?;
    Ok(Person {
        username: username.to_string(),
        id,
    })
}

/// GitLab's access level numbers as [`Access`].
pub fn gitlab_level(level: u64) -> Access {
    match level {
        50.. => Access::Admin,
        40..50 => Access::Maintain,
        30..40 => Access::Write,
        20..30 => Access::Read,
        10..20 => Access::Guest,
        _ => Access::None,
    }
}

/// The higher of a GitLab project answer's `permissions.project_access`
/// and `permissions.group_access` levels (`None`: both `null`).
pub fn gitlab_shown_level(answer: &Value) -> Result<Option<u64>, String> {
    let permissions = answer
        .get("permissions")
        .filter(|p| p.is_object())
        .ok_or("no \"permissions\" (was the request authenticated?)")?;
    let level = |name: &str| -> Result<Option<u64>, String> {
        match permissions.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .get("access_level")
                .and_then(Value::as_u64)
                .map(Some)
                .ok_or_else(|| format!("permissions.{name} has no access_level")),
        }
    };
    Ok(level("project_access")?.max(level("group_access")?))
}

/// The access a repository answer gives the person who asked.
///
/// GitHub: the highest of `permissions` that is true (`admin`, `maintain`,
/// `push`, `triage`, `pull`); none true is `None`, no `permissions` at all
/// (an unauthenticated answer) is an error.
///
/// GitLab: the higher of `permissions.project_access.access_level` and
/// `permissions.group_access.access_level` (the project's own group only).
/// When both are `null` ([`Forge::access`] has then asked `members/all`,
/// which shows memberships inherited from groups higher up, and found
/// none) the person sees the project without being a member: a `public`
/// or `internal` project is `Read` (anyone signed in may read its code), a
/// `private` one `Guest` (seen, level unknown: fail closed).
pub fn access_of(provider: Provider, answer: &Value) -> Result<Access, String> {
    let permissions = answer
        .get("permissions")
        .filter(|p| p.is_object())
        .ok_or("no \"permissions\" (was the request authenticated?)")?;
    match provider {
        Provider::Github => {
            let is = |name: &str| permissions.get(name).and_then(Value::as_bool) == Some(true);
            Ok(if is("admin") {
                Access::Admin
            } else if is("maintain") {
                Access::Maintain
            } else if is("push") {
                Access::Write
            } else if is("triage") {
                Access::Triage
            } else if is("pull") {
                Access::Read
            } else {
                Access::None
            })
        }
        Provider::Gitlab => {
            let best = gitlab_shown_level(answer)?;
            Ok(match best {
                Some(level) => gitlab_level(level),
                None => match answer.get("visibility").and_then(Value::as_str) {
                    Some("public" | "internal") => Access::Read,
                    _ => Access::Guest,
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config_error(text: &str) -> String {
        match Forge::from_toml(text) {
            Err(ForgeError::Config(reason)) => reason,
            other => panic!("{text:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_public_services() {
        let (forges, lifetime) = Forge::from_toml(
            "[ci.github]\naudience = \"x\"\n[login.github]\nclient_id = \"Iv1.abc\"\n[login.gitlab]\nclient_id = \"def\"\n",
        )
        .unwrap();
        assert_eq!(lifetime, DEFAULT_CERTIFICATE_LIFETIME);
        let [github, gitlab] = &forges[..] else {
            panic!("{forges:?}")
        };
        assert_eq!(github.provider, Provider::Github);
        assert_eq!(github.host, "github.com");
        assert_eq!(
            github.endpoints.device_authorization.as_str(),
            "https://github.com/login/device/code"
        );
        assert_eq!(
            github.endpoints.token.as_str(),
            "https://github.com/login/oauth/access_token"
        );
        assert_eq!(
            github.endpoints.user.as_str(),
            "https://api.github.com/user"
        );
        assert_eq!(gitlab.host, "gitlab.com");
        assert_eq!(
            gitlab.endpoints.device_authorization.as_str(),
            "https://gitlab.com/oauth/authorize_device"
        );
        assert_eq!(
            gitlab.endpoints.token.as_str(),
            "https://gitlab.com/oauth/token"
        );
        assert_eq!(
            gitlab.endpoints.user.as_str(),
            "https://gitlab.com/api/v4/user"
        );
        assert_eq!(gitlab.namespace("a/b/c"), "gitlab.com/a/b/c");
    }

    #[test]
    fn enterprise_and_self_managed_urls() {
        let (forges, lifetime) = Forge::from_toml(
            "[login]\ncertificate_lifetime = \"2h 30m\"\n[login.github]\nclient_id = \"x\"\nweb_url = \"https://ghe.example/\"\napi_url = \"https://ghe.example/api/v3/\"\nhost = \"ghe.example\"\n[login.gitlab]\nclient_id = \"y\"\nurl = \"https://code.example/gitlab\"\n",
        )
        .unwrap();
        assert_eq!(lifetime, Duration::from_secs(9000));
        assert_eq!(
            forges[0].endpoints.device_authorization.as_str(),
            "https://ghe.example/login/device/code"
        );
        assert_eq!(
            forges[0].endpoints.user.as_str(),
            "https://ghe.example/api/v3/user"
        );
        assert_eq!(forges[0].host, "ghe.example");
        assert_eq!(
            forges[1].endpoints.token.as_str(),
            "https://code.example/gitlab/oauth/token"
        );
        assert_eq!(forges[1].host, "code.example");
        assert_eq!(
            forges[1].repository_url("a/b/c").unwrap().as_str(),
            "https://code.example/gitlab/api/v4/projects/a%2Fb%2Fc"
        );
        assert_eq!(
            forges[0].repository_url("o-1/r_2.x").unwrap().as_str(),
            "https://ghe.example/api/v3/repos/o-1/r_2.x"
        );
    }

    #[test]
    fn no_login_table_means_no_forges() {
        let (forges, lifetime) = Forge::from_toml("[ci]\n").unwrap();
        assert!(forges.is_empty());
        assert_eq!(lifetime, DEFAULT_CERTIFICATE_LIFETIME);
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        for (text, says) in [
            (
                "[login.github]\nclient_id = \"x\"\nweb_url = \"http://github.example\"\n",
                "must be https",
            ),
            (
                "[login.github]\nclient_id = \"x\"\nweb_url = \"http://github.example\"\nallow_http_loopback = true\n",
                "loopback address only",
            ),
            (
                "[login.gitlab]\nclient_id = \"x\"\nurl = \"ftp://gitlab.example\"\n",
                "not https",
            ),
            (
                "[login.gitlab]\nclient_id = \"x\"\nurl = \"https://u:p@gitlab.example\"\n",
                "credentials",
            ),
            (
                "[login.gitlab]\nclient_id = \"x\"\nurl = \"https://gitlab.example/?a=b\"\n",
                "query",
            ),
            (
                "[login.gitlab]\nclient_id = \"x\"\nurl = \"not a url\"\n",
                "url",
            ),
            ("[login.gitlab]\nclient_id = \"\"\n", "client_id"),
            ("[login.gitlab]\nclient_id = \"a b\"\n", "client_id"),
            ("[login.github]\n", "client_id"),
            (
                "[login.github]\nclient_id = \"x\"\nsecret = \"y\"\n",
                "unknown field",
            ),
            ("[login.bitbucket]\nclient_id = \"x\"\n", "unknown field"),
            (
                "[login.github]\nclient_id = \"x\"\nhost = \"a/b\"\n",
                "not a host name",
            ),
            (
                "[login]\ncertificate_lifetime = \"forever\"\n",
                "certificate_lifetime",
            ),
            (
                "[login]\ncertificate_lifetime = \"8days\"\n",
                "between 1m and 7days",
            ),
            (
                "[login]\ncertificate_lifetime = \"10s\"\n",
                "between 1m and 7days",
            ),
            ("[login\n", "TOML"),
        ] {
            let reason = config_error(text);
            assert!(
                reason.to_lowercase().contains(&says.to_lowercase()),
                "{text:?}: {reason}"
            );
        }
        // Loopback http is fine in tests.
        let (forges, _) = Forge::from_toml(
            "[login.gitlab]\nclient_id = \"x\"\nurl = \"http://127.0.0.1:8080\"\nallow_http_loopback = true\n",
        )
        .unwrap();
        assert_eq!(forges[0].host, "127.0.0.1");
        assert_eq!(
            Forge::from_toml("[login]\ncertificate_lifetime = \"7days\"\n")
                .unwrap()
                .1,
            MAX_CERTIFICATE_LIFETIME
        );
    }

    #[test]
    fn repository_names() {
        for good in ["a/b", "Acme-1/app.rs", "a_b/c-d.e"] {
            assert!(check_repository(Provider::Github, good).is_ok(), "{good}");
            assert!(check_repository(Provider::Gitlab, good).is_ok(), "{good}");
        }
        assert!(check_repository(Provider::Gitlab, "g/sub/deeper/p").is_ok());
        assert!(check_repository(Provider::Github, "g/sub/p").is_err());
        for bad in [
            "", "a", "a/", "/b", "a//b", "./b", "a/..", "a/b?c", "a/b#c", "a/%2e%2e", "a/b c",
            "a/b\0", "a\\b/c", "ä/b",
        ] {
            assert!(check_repository(Provider::Github, bad).is_err(), "{bad:?}");
            assert!(check_repository(Provider::Gitlab, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn github_permissions_map_to_the_highest_true() {
        let perms = |admin, maintain, push, triage, pull| json!({"permissions": {"admin": admin, "maintain": maintain, "push": push, "triage": triage, "pull": pull}});
        for (answer, want) in [
            (perms(true, true, true, true, true), Access::Admin),
            (perms(false, true, true, true, true), Access::Maintain),
            (perms(false, false, true, true, true), Access::Write),
            (perms(false, false, false, true, true), Access::Triage),
            (perms(false, false, false, false, true), Access::Read),
            (perms(false, false, false, false, false), Access::None),
            // A classic OAuth answer may lack maintain and triage.
            (
                json!({"permissions": {"admin": false, "push": true, "pull": true}}),
                Access::Write,
            ),
        ] {
            assert_eq!(access_of(Provider::Github, &answer), Ok(want), "{answer}");
        }
        assert!(access_of(Provider::Github, &json!({"full_name": "a/b"})).is_err());
    }

    #[test]
    fn gitlab_levels_map_to_access() {
        let answer = |project: Value, group: Value, visibility: &str| json!({"visibility": visibility, "permissions": {"project_access": project, "group_access": group}});
        let level = |n: u64| json!({"access_level": n, "notification_level": 3});
        for (n, want) in [
            (5, Access::None),
            (10, Access::Guest),
            (15, Access::Guest),
            (20, Access::Read),
            (30, Access::Write),
            (40, Access::Maintain),
            (50, Access::Admin),
        ] {
            assert_eq!(gitlab_level(n), want, "{n}");
            let only_project = answer(level(n), Value::Null, "private");
            assert_eq!(access_of(Provider::Gitlab, &only_project), Ok(want));
            let only_group = answer(Value::Null, level(n), "private");
            assert_eq!(access_of(Provider::Gitlab, &only_group), Ok(want));
        }
        assert_eq!(
            access_of(Provider::Gitlab, &answer(level(10), level(40), "private")),
            Ok(Access::Maintain)
        );
        assert_eq!(
            access_of(Provider::Gitlab, &answer(level(40), level(20), "private")),
            Ok(Access::Maintain)
        );
        for (visibility, want) in [
            ("public", Access::Read),
            ("internal", Access::Read),
            ("private", Access::Guest),
        ] {
            let seen = answer(Value::Null, Value::Null, visibility);
            assert_eq!(access_of(Provider::Gitlab, &seen), Ok(want), "{visibility}");
        }
        assert!(
            access_of(
                Provider::Gitlab,
                &answer(json!({"x": 1}), Value::Null, "private")
            )
            .is_err()
        );
    }

    #[test]
    fn person_answers() {
        assert_eq!(
            person_of(Provider::Github, &json!({"login": "octocat", "id": 1})),
            Ok(Person {
                username: "octocat".into(),
                id: 1
            })
        );
        assert_eq!(
            person_of(Provider::Gitlab, &json!({"username": "jdoe", "id": 7})),
            Ok(Person {
                username: "jdoe".into(),
                id: 7
            })
        );
        for bad in [
            json!({"username": "x", "id": 1}),
            json!({"login": "", "id": 1}),
            json!({"login": "a/b", "id": 1}),
            json!({"login": "x", "id": "1"}),
            json!({"login": "x"}),
        ] {
            assert!(person_of(Provider::Github, &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_200_carrying_an_oauth_error_is_recognised() {
        assert_eq!(
            oauth_error(br#"{"error":"slow_down","error_description":"x","interval":10}"#),
            Some(("slow_down".into(), Some(10)))
        );
        assert_eq!(
            oauth_error(br#"{"error":"authorization_pending"}"#),
            Some(("authorization_pending".into(), None))
        );
        assert_eq!(
            oauth_error(br#"{"access_token":"t","token_type":"bearer"}"#),
            None
        );
        assert_eq!(oauth_error(b"error=slow_down"), None);
    }

    #[test]
    fn a_parse_failure_quotes_nothing_of_the_answer() {
        let e = serde_json::from_str::<oauth2::basic::BasicTokenResponse>(
            r#"{"access_token":"gho_secret","token_type":7}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains('7'), "{e}");
        let text = parse_failure(&e, &"token_type");
        assert_eq!(text, "unexpected fields at token_type");
        let e = serde_json::from_str::<Value>(r#"{"access_token":"gho_secret""#).unwrap_err();
        assert!(!parse_failure(&e, &".").contains("gho_"));
    }

    #[test]
    fn the_device_flow_can_run_on_another_task() {
        fn is_send<T: Send>(_: &T) {}
        let (forges, _) = Forge::from_toml("[login.github]\nclient_id = \"x\"\n").unwrap();
        let device = DeviceAuthorization {
            device_code: "d".into(),
            user_code: "u".into(),
            verification_uri: "https://github.com/login/device".into(),
            verification_uri_complete: None,
            expires_in: Duration::from_secs(1),
            interval: Duration::from_secs(1),
        };
        let token = ForgeToken("t".into());
        is_send(&forges[0].start());
        is_send(&forges[0].wait_for_token(&device));
        is_send(&forges[0].person(&token));
        is_send(&forges[0].access(&token, "a/b"));
    }
}
