//! Stand-ins for GitHub and GitLab in tests: what the orchestrator's forge
//! client (`reprise_orchestrator::forge`) talks to, speaking the documented
//! endpoints on 127.0.0.1 (a random port, plain http, so the settings carry
//! `allow_http_loopback = true`), with a scripted person at the other end.
//! Shared by the orchestrator's tests and the system tests
//! (`#[path = "../../orchestrator/tests/forges/mod.rs"] mod forges;`); it
//! needs only tokio, axum and serde_json.
//!
//! ```ignore
//! let github = FakeGithub::start().await;        // interval 1 s, expires_in 60 s
//! github.user("alice", 1001).set_access("alice", "acme/app", "maintain");
//! github.next_login(Script::Approve { user: "alice", after_polls: 1 });
//! let toml = github.settings_toml();             // a [login.github] table
//! // … the client logs in as alice …
//! github.set_access("alice", "acme/app", "none"); // alice loses access
//! ```
//!
//! Both stand-ins, like the real services:
//! - issue a device code per `POST` (GitHub `/login/device/code`, GitLab
//!   `/oauth/authorize_device`) for the right `client_id` only;
//! - answer the token endpoint (GitHub `/login/oauth/access_token`, GitLab
//!   `/oauth/token`) only for the right `client_id`, `grant_type`
//!   (`urn:ietf:params:oauth:grant-type:device_code`) and a known
//!   `device_code`, with `authorization_pending` until the script says
//!   otherwise; a poll sooner than the code's interval after the previous
//!   one (or after the code was issued) gets `slow_down` and the interval
//!   grows by 5 s (GitHub names the new `interval` in the answer);
//!   `expired_token` once `expires_in` has passed;
//! - GitHub answers those errors with status 200 (and in
//!   `application/x-www-form-urlencoded` unless asked for JSON with
//!   `Accept: application/json`); GitLab with 400 (401 `invalid_client`);
//! - accept on their API only a token they issued and did not revoke
//!   (`Authorization: Bearer …`; GitHub also `token …`, and refuses a
//!   request without `User-Agent` with 403), 401 otherwise;
//! - GitHub API under `/api/v3` (as GitHub Enterprise Server):
//!   `GET /api/v3/user`, `GET /api/v3/repos/{owner}/{repo}` with
//!   `permissions` (404 without access: repositories are private);
//!   GitLab `GET /api/v4/user`, `GET /api/v4/projects/{url-encoded path}`
//!   with `permissions.project_access` and `permissions.group_access`
//!   (the project's own group only), `GET /api/v4/projects/{id}/members/all/{user
//!   id}` (the effective level, inherited memberships included); 404
//!   `{"message":"404 Project Not Found"}` without access; an unencoded
//!   path is not a project, as on GitLab.
//!
//! Knobs for the unhappy paths: `rate_limit(true)` (GitHub 403 with
//! `x-ratelimit-remaining: 0`, GitLab 429), `FakeGithub::sso_protect(repo)`
//! (GitHub's 403 for an organization enforcing SAML single sign-on),
//! `revoke_tokens(user)` (401), `expires_in`/`interval` of the next codes.
//!
//! Every request is recorded (`requests()`, `"GET /api/v3/user"`), so a
//! test can show where a token was sent.

#![allow(dead_code, reason = "each test binary uses part of the stand-ins")]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The GitHub stand-in's OAuth application.
pub const GITHUB_CLIENT_ID: &str = "Iv1.fa4e0000c0ffee00";
/// The GitLab stand-in's OAuth application.
pub const GITLAB_CLIENT_ID: &str =
    "fa4e9a81ab00c0ffee000000000000000000000000000000000000000000cafe";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What the person does with the next login's code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// `after_polls` polls get `authorization_pending`, the next one the
    /// token of `user` (0: the first poll gets it).
    Approve {
        user: &'static str,
        after_polls: u32,
    },
    /// `after_polls` polls get `authorization_pending`, then
    /// `access_denied`.
    Deny { after_polls: u32 },
    /// Never acts: `authorization_pending` until the code expires, then
    /// `expired_token`.
    Expire,
    /// The first poll gets `slow_down` (and the interval grows by 5 s);
    /// then as `Approve`.
    SlowDownThenApprove {
        user: &'static str,
        after_polls: u32,
    },
}

/// What the stand-in has seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub device_codes: u32,
    /// Token-endpoint requests with a known device code.
    pub polls: u32,
    /// `slow_down` answers, scripted or for polling too soon.
    pub slow_downs: u32,
    /// `slow_down` answers for polling too soon (not scripted).
    pub too_soon: u32,
    pub tokens: u32,
    /// The intervals the device codes ended with, in seconds.
    pub intervals: Vec<u64>,
    /// The `scope` the device codes were asked with.
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Github,
    Gitlab,
}

struct Code {
    script: Option<Script>,
    issued: Instant,
    last_poll: Option<Instant>,
    interval: u64,
    pending_answers: u32,
    slowed: bool,
    done: bool,
}

struct Core {
    kind: Kind,
    base: String,
    client_id: String,
    interval: u64,
    expires_in: u64,
    users: BTreeMap<String, u64>,
    /// (user, repository) → level name.
    access: HashMap<(String, String), String>,
    /// GitLab: (user, group path) → level name.
    group_access: HashMap<(String, String), String>,
    repositories: HashSet<String>,
    /// GitHub: repositories of an organization that enforces SAML single
    /// sign-on the tokens are not authorized for (403).
    sso_protected: HashSet<String>,
    /// Answer every API request as rate limited.
    rate_limited: bool,
    tokens: HashMap<String, String>,
    codes: HashMap<String, Code>,
    scripts: VecDeque<Script>,
    requests: Vec<String>,
    stats: Stats,
    serial: u64,
}

type Shared = Arc<Mutex<Core>>;

/// The shared machinery of both stand-ins.
struct Stand {
    core: Shared,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Stand {
    async fn start(kind: Kind, client_id: &str) -> Stand {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let core = Arc::new(Mutex::new(Core {
            kind,
            base: format!("http://{addr}"),
            client_id: client_id.to_string(),
            interval: 1,
            expires_in: 60,
            users: BTreeMap::new(),
            access: HashMap::new(),
            group_access: HashMap::new(),
            repositories: HashSet::new(),
            sso_protected: HashSet::new(),
            rate_limited: false,
            tokens: HashMap::new(),
            codes: HashMap::new(),
            scripts: VecDeque::new(),
            requests: Vec::new(),
            stats: Stats::default(),
            serial: 0,
        }));
        let app = Router::new().fallback(handle).with_state(core.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .expect("the forge stand-in serves");
        });
        Stand {
            core,
            addr,
            stop: Some(stop),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Core) -> T) -> T {
        f(&mut self.core.lock().unwrap())
    }
}

impl Drop for Stand {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

macro_rules! common_api {
    () => {
        /// `http://127.0.0.1:PORT`, the web root.
        pub fn url(&self) -> String {
            format!("http://{}", self.stand.addr)
        }

        /// The OAuth application's client id the stand-in accepts.
        pub fn client_id(&self) -> String {
            self.stand.with(|c| c.client_id.clone())
        }

        /// Registers a person (`login`/`username` and numeric id).
        pub fn user(&self, name: &str, id: u64) -> &Self {
            self.stand.with(|c| c.users.insert(name.to_string(), id));
            self
        }

        /// Sets `user`'s access to `repository`, made to exist; `"none"`
        /// removes it (the repository then answers 404 to them). GitHub
        /// levels: `pull` (or `read`), `triage`, `push` (or `write`),
        /// `maintain`, `admin`; GitLab: `guest`, `planner`, `reporter`,
        /// `developer`, `maintainer`, `owner`. Takes effect at once, also
        /// for tokens already issued.
        pub fn set_access(&self, user: &str, repository: &str, level: &str) -> &Self {
            assert!(
                level == "none" || self.level_known(level),
                "unknown access level {level:?}"
            );
            self.stand.with(|c| {
                c.repositories.insert(repository.to_string());
                let key = (user.to_string(), repository.to_string());
                if level == "none" {
                    c.access.remove(&key);
                } else {
                    c.access.insert(key, level.to_string());
                }
            });
            self
        }

        /// Queues what the person does with the next device code issued
        /// (codes issued with no script queued are never acted on).
        pub fn next_login(&self, script: Script) -> &Self {
            if let Script::Approve { user, .. } | Script::SlowDownThenApprove { user, .. } = &script
            {
                assert!(
                    self.stand.with(|c| c.users.contains_key(*user)),
                    "register {user:?} with .user() before scripting a login as them"
                );
            }
            self.stand.with(|c| c.scripts.push_back(script));
            self
        }

        /// The `interval` (seconds) of the codes issued from now on (default 1).
        pub fn interval(&self, seconds: u64) -> &Self {
            self.stand.with(|c| c.interval = seconds);
            self
        }

        /// The `expires_in` (seconds) of the codes issued from now on (default 60).
        pub fn expires_in(&self, seconds: u64) -> &Self {
            self.stand.with(|c| c.expires_in = seconds);
            self
        }

        /// The person revokes the application: their tokens stop working.
        pub fn revoke_tokens(&self, user: &str) -> &Self {
            self.stand.with(|c| c.tokens.retain(|_, who| who != user));
            self
        }

        /// From now on every API request is refused as over the rate limit
        /// (GitHub: 403 with `x-ratelimit-remaining: 0`; GitLab: 429), or
        /// no longer.
        pub fn rate_limit(&self, on: bool) -> &Self {
            self.stand.with(|c| c.rate_limited = on);
            self
        }

        /// Every request so far, as `"METHOD /path?query"` (raw, as sent).
        pub fn requests(&self) -> Vec<String> {
            self.stand.with(|c| c.requests.clone())
        }

        pub fn stats(&self) -> Stats {
            self.stand.with(|c| c.stats.clone())
        }
    };
}

/// A GitHub stand-in: web endpoints at the root, the REST API under
/// `/api/v3` (as GitHub Enterprise Server). Stops when dropped.
pub struct FakeGithub {
    stand: Stand,
}

impl FakeGithub {
    pub async fn start() -> FakeGithub {
        FakeGithub {
            stand: Stand::start(Kind::Github, GITHUB_CLIENT_ID).await,
        }
    }

    common_api!();

    fn level_known(&self, level: &str) -> bool {
        github_rank(level).is_some()
    }

    /// `repository`'s organization enforces SAML single sign-on and the
    /// tokens are not authorized for it: GitHub answers 403.
    pub fn sso_protect(&self, repository: &str) -> &Self {
        self.stand
            .with(|c| c.sso_protected.insert(repository.to_string()));
        self
    }

    /// `http://127.0.0.1:PORT/api/v3`.
    pub fn api_url(&self) -> String {
        format!("{}/api/v3", self.url())
    }

    /// A `[login.github]` table pointing at the stand-in (host `github.com`).
    pub fn settings_toml(&self) -> String {
        format!(
            "[login.github]\nclient_id = \"{}\"\nweb_url = \"{}\"\napi_url = \"{}\"\nhost = \"github.com\"\nallow_http_loopback = true\n",
            self.client_id(),
            self.url(),
            self.api_url()
        )
    }
}

/// A GitLab stand-in: `/oauth/…` and `/api/v4/…` at the root. Stops when
/// dropped.
pub struct FakeGitlab {
    stand: Stand,
}

impl FakeGitlab {
    pub async fn start() -> FakeGitlab {
        FakeGitlab {
            stand: Stand::start(Kind::Gitlab, GITLAB_CLIENT_ID).await,
        }
    }

    common_api!();

    fn level_known(&self, level: &str) -> bool {
        gitlab_number(level).is_some()
    }

    /// Makes `project` (`group/…/name`) exist without giving anyone access.
    pub fn project(&self, project: &str) -> &Self {
        self.stand
            .with(|c| c.repositories.insert(project.to_string()));
        self
    }

    /// Sets `user`'s membership of `group` (a group path, e.g. `acme` or
    /// `acme/tools`); `"none"` removes it. As on GitLab, a project's
    /// `permissions.group_access` shows only the membership of the
    /// project's own group; one inherited from a group higher up shows
    /// only in `GET /api/v4/projects/{id}/members/all/{user id}`.
    pub fn set_group_access(&self, user: &str, group: &str, level: &str) -> &Self {
        assert!(
            level == "none" || gitlab_number(level).is_some(),
            "unknown access level {level:?}"
        );
        self.stand.with(|c| {
            let key = (user.to_string(), group.to_string());
            if level == "none" {
                c.group_access.remove(&key);
            } else {
                c.group_access.insert(key, level.to_string());
            }
        });
        self
    }

    /// A `[login.gitlab]` table pointing at the stand-in (host `gitlab.com`).
    pub fn settings_toml(&self) -> String {
        format!(
            "[login.gitlab]\nclient_id = \"{}\"\nurl = \"{}\"\nhost = \"gitlab.com\"\nallow_http_loopback = true\n",
            self.client_id(),
            self.url()
        )
    }
}

fn github_rank(level: &str) -> Option<u8> {
    Some(match level {
        "pull" | "read" => 1,
        "triage" => 2,
        "push" | "write" => 3,
        "maintain" => 4,
        "admin" => 5,
        _ => return None,
    })
}

fn gitlab_number(level: &str) -> Option<u64> {
    Some(match level {
        "guest" => 10,
        "planner" => 15,
        "reporter" => 20,
        "developer" => 30,
        "maintainer" => 40,
        "owner" => 50,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// The wire

/// `application/x-www-form-urlencoded` decoding.
fn form(body: &[u8]) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let spaced = s.replace('+', " ");
        percent_decode(&spaced).unwrap_or(spaced)
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn form_encode(pairs: &[(&str, String)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_string(),
                b => format!("%{b:02X}"),
            })
            .collect()
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

/// A GitHub OAuth answer: JSON when asked for it, else form-encoded (what
/// GitHub sends by default). `pairs` in the order GitHub's docs show.
fn github_oauth(headers: &HeaderMap, pairs: Vec<(&str, Value)>) -> Response {
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if wants_json {
        let fields: Vec<String> = pairs
            .iter()
            .map(|(k, v)| format!("{}:{}", Value::from(*k), v))
            .collect();
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            format!("{{{}}}", fields.join(",")),
        )
            .into_response()
    } else {
        let mut sorted: Vec<(&str, String)> = pairs
            .iter()
            .map(|(k, v)| (*k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
            .collect();
        sorted.sort();
        (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )],
            form_encode(&sorted),
        )
            .into_response()
    }
}

const GITHUB_DEVICE_ERRORS: &str = "https://docs.github.com/developers/apps/authorizing-oauth-apps#error-codes-for-the-device-flow";

fn github_error(
    headers: &HeaderMap,
    error: &str,
    description: &str,
    interval: Option<u64>,
) -> Response {
    let mut pairs = vec![
        ("error", Value::from(error)),
        ("error_description", Value::from(description)),
        ("error_uri", Value::from(GITHUB_DEVICE_ERRORS)),
    ];
    if let Some(interval) = interval {
        pairs.push(("interval", Value::from(interval)));
    }
    github_oauth(headers, pairs)
}

fn gitlab_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

async fn handle(
    State(core): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut core = core.lock().unwrap();
    let raw = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.as_str().to_string());
    core.requests.push(format!("{method} {raw}"));
    let path = uri.path();
    match (core.kind, &method, path) {
        (Kind::Github, &Method::POST, "/login/device/code") => {
            github_device_code(&mut core, &headers, &body)
        }
        (Kind::Github, &Method::POST, "/login/oauth/access_token") => {
            github_token(&mut core, &headers, &body)
        }
        (Kind::Github, &Method::GET, _) if path.starts_with("/api/v3/") => {
            github_api(&core, &headers, &path["/api/v3".len()..])
        }
        (Kind::Gitlab, &Method::POST, "/oauth/authorize_device") => {
            gitlab_device_code(&mut core, &body)
        }
        (Kind::Gitlab, &Method::POST, "/oauth/token") => gitlab_token(&mut core, &body),
        (Kind::Gitlab, &Method::GET, _) if path.starts_with("/api/v4/") => {
            gitlab_api(&core, &headers, &path["/api/v4".len()..])
        }
        (Kind::Github, _, _) => json_response(
            StatusCode::NOT_FOUND,
            &json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"}),
        ),
        (Kind::Gitlab, _, _) => {
            json_response(StatusCode::NOT_FOUND, &json!({"error": "404 Not Found"}))
        }
    }
}

impl Core {
    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    /// A new device code; returns (device_code, user_code).
    fn issue(&mut self, scope: String) -> (String, String) {
        let n = self.next_serial();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
        let device_code = format!("{:040x}", (n << 32) ^ nanos ^ 0x3584_d835_3055_7fdd);
        let letters = b"BCDFGHJKLMNPQRSTVWXZ";
        let pick = |i: u64| letters[(i % letters.len() as u64) as usize] as char;
        let user_code: String = (0..8)
            .map(|i| pick(n.wrapping_mul(7919).wrapping_add(i * 31)))
            .collect();
        let user_code = format!("{}-{}", &user_code[..4], &user_code[4..]);
        let script = self.scripts.pop_front();
        self.codes.insert(
            device_code.clone(),
            Code {
                script,
                issued: Instant::now(),
                last_poll: None,
                interval: self.interval,
                pending_answers: 0,
                slowed: false,
                done: false,
            },
        );
        self.stats.device_codes += 1;
        self.stats.scopes.push(scope);
        (device_code, user_code)
    }

    /// One poll of a known code: what the person's script says now.
    fn poll(&mut self, device_code: &str) -> Poll {
        let expires_in = self.expires_in;
        let now = Instant::now();
        let code = self.codes.get_mut(device_code).expect("a known code");
        self.stats.polls += 1;
        if code.done {
            return Poll::Unknown;
        }
        if now.duration_since(code.issued) >= Duration::from_secs(expires_in) {
            code.done = true;
            return Poll::Expired;
        }
        let since = now.duration_since(code.last_poll.unwrap_or(code.issued));
        code.last_poll = Some(now);
        if since < Duration::from_secs(code.interval) {
            code.interval += 5;
            self.stats.slow_downs += 1;
            self.stats.too_soon += 1;
            return Poll::SlowDown(code.interval);
        }
        let outcome = match code.script.clone() {
            None | Some(Script::Expire) => Poll::Pending,
            Some(Script::SlowDownThenApprove { .. }) if !code.slowed => {
                code.slowed = true;
                code.interval += 5;
                self.stats.slow_downs += 1;
                return Poll::SlowDown(code.interval);
            }
            Some(Script::Approve { user, after_polls })
            | Some(Script::SlowDownThenApprove { user, after_polls }) => {
                if code.pending_answers < after_polls {
                    Poll::Pending
                } else {
                    Poll::Approved(user)
                }
            }
            Some(Script::Deny { after_polls }) => {
                if code.pending_answers < after_polls {
                    Poll::Pending
                } else {
                    Poll::Denied
                }
            }
        };
        match outcome {
            Poll::Pending => code.pending_answers += 1,
            _ => code.done = true,
        }
        let interval = code.interval;
        if !matches!(outcome, Poll::Pending) {
            self.stats.intervals.push(interval);
        }
        outcome
    }

    fn mint(&mut self, user: &str) -> String {
        assert!(
            self.users.contains_key(user),
            "the script approves as {user:?}, who is not a registered user"
        );
        let n = self.next_serial();
        let prefix = match self.kind {
            Kind::Github => "gho_",
            Kind::Gitlab => "glpat-",
        };
        let token = format!("{prefix}{:036x}", (n << 20) ^ 0x16c7_e42f_292c_6912);
        self.tokens.insert(token.clone(), user.to_string());
        self.stats.tokens += 1;
        token
    }

    /// The user a request's bearer token belongs to.
    fn bearer(&self, headers: &HeaderMap) -> Option<(String, u64)> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ").or_else(|| match self.kind {
            Kind::Github => value.strip_prefix("token "),
            Kind::Gitlab => None,
        })?;
        let user = self.tokens.get(token)?;
        Some((user.clone(), *self.users.get(user)?))
    }
}

enum Poll {
    Pending,
    SlowDown(u64),
    Approved(&'static str),
    Denied,
    Expired,
    Unknown,
}

// ---------------------------------------------------------------------------
// GitHub

fn github_device_code(core: &mut Core, headers: &HeaderMap, body: &[u8]) -> Response {
    let form = form(body);
    if form.get("client_id") != Some(&core.client_id) {
        // What github.com answers for a client_id it does not know.
        return json_response(StatusCode::NOT_FOUND, &json!({"error": "Not Found"}));
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    let (device_code, user_code) = core.issue(scope);
    github_oauth(
        headers,
        vec![
            ("device_code", Value::from(device_code)),
            ("user_code", Value::from(user_code)),
            (
                "verification_uri",
                Value::from(format!("{}/login/device", core.base)),
            ),
            ("expires_in", Value::from(core.expires_in)),
            ("interval", Value::from(core.interval)),
        ],
    )
}

fn github_token(core: &mut Core, headers: &HeaderMap, body: &[u8]) -> Response {
    let form = form(body);
    if form.get("client_id") != Some(&core.client_id) {
        return github_error(
            headers,
            "incorrect_client_credentials",
            "The client_id and/or client_secret passed are incorrect.",
            None,
        );
    }
    if form.get("grant_type").map(String::as_str) != Some(DEVICE_GRANT) {
        return github_error(
            headers,
            "unsupported_grant_type",
            "The grant type must be urn:ietf:params:oauth:grant-type:device_code.",
            None,
        );
    }
    let device_code = form.get("device_code").cloned().unwrap_or_default();
    if !core.codes.contains_key(&device_code) {
        return github_error(
            headers,
            "incorrect_device_code",
            "The device_code provided is not valid.",
            None,
        );
    }
    match core.poll(&device_code) {
        Poll::Pending => github_error(
            headers,
            "authorization_pending",
            "The authorization request is still pending.",
            None,
        ),
        Poll::SlowDown(interval) => github_error(
            headers,
            "slow_down",
            &format!(
                "Too many requests have been made in the same timeframe. The new interval is {interval} seconds."
            ),
            Some(interval),
        ),
        Poll::Expired => github_error(
            headers,
            "expired_token",
            "The device_code has expired.",
            None,
        ),
        Poll::Denied => github_error(
            headers,
            "access_denied",
            "The authorization request was denied.",
            None,
        ),
        Poll::Unknown => github_error(
            headers,
            "incorrect_device_code",
            "The device_code provided is not valid.",
            None,
        ),
        Poll::Approved(user) => {
            let token = core.mint(user);
            let scope = core.stats.scopes.last().cloned().unwrap_or_default();
            github_oauth(
                headers,
                vec![
                    ("access_token", Value::from(token)),
                    ("token_type", Value::from("bearer")),
                    ("scope", Value::from(scope)),
                ],
            )
        }
    }
}

fn github_api(core: &Core, headers: &HeaderMap, path: &str) -> Response {
    if headers.get(header::USER_AGENT).is_none() {
        return (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Request forbidden by administrative rules. Please make sure your request has a User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required). Check https://developer.github.com for other possible causes.\n",
        )
            .into_response();
    }
    if core.rate_limited {
        let mut answer = json_response(
            StatusCode::FORBIDDEN,
            &json!({"message": "API rate limit exceeded for user ID 1.", "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting", "status": "403"}),
        );
        let headers = answer.headers_mut();
        headers.insert("x-ratelimit-limit", "5000".parse().unwrap());
        headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
        headers.insert("x-ratelimit-reset", "1700000000".parse().unwrap());
        return answer;
    }
    let Some((user, id)) = core.bearer(headers) else {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest", "status": "401"}),
        );
    };
    let not_found = |doc: &str| {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"message": "Not Found", "documentation_url": doc, "status": "404"}),
        )
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["user"] => json_response(
            StatusCode::OK,
            &json!({
                "login": user,
                "id": id,
                "node_id": format!("MDQ6VXNlcj{id}"),
                "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
                "url": format!("{}/api/v3/users/{user}", core.base),
                "html_url": format!("{}/{user}", core.base),
                "type": "User",
                "site_admin": false,
                "name": null,
            }),
        ),
        ["repos", owner, name] => {
            // Raw segments: GitHub does not decode %2F into a path separator.
            let full = format!("{owner}/{name}");
            if core.sso_protected.contains(&full) {
                return json_response(
                    StatusCode::FORBIDDEN,
                    &json!({"message": "Resource protected by organization SAML enforcement. You must grant your Personal Access token access to this organization.", "documentation_url": "https://docs.github.com/articles/authenticating-to-a-github-organization-with-saml-single-sign-on/", "status": "403"}),
                );
            }
            let level = core.access.get(&(user.clone(), full.clone()));
            match level.and_then(|l| github_rank(l)) {
                None => not_found("https://docs.github.com/rest/repos/repos#get-a-repository"),
                Some(rank) => json_response(
                    StatusCode::OK,
                    &json!({
                        "id": 1_296_269,
                        "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5",
                        "name": name,
                        "full_name": full,
                        "owner": {"login": owner, "type": "Organization"},
                        "private": true,
                        "html_url": format!("{}/{full}", core.base),
                        "url": format!("{}/api/v3/repos/{full}", core.base),
                        "default_branch": "main",
                        "visibility": "private",
                        "permissions": {
                            "admin": rank >= 5,
                            "maintain": rank >= 4,
                            "push": rank >= 3,
                            "triage": rank >= 2,
                            "pull": rank >= 1,
                        },
                    }),
                ),
            }
        }
        _ => not_found("https://docs.github.com/rest"),
    }
}

// ---------------------------------------------------------------------------
// GitLab

fn gitlab_device_code(core: &mut Core, body: &[u8]) -> Response {
    let form = form(body);
    if form.get("client_id") != Some(&core.client_id) {
        return gitlab_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed due to unknown client, no client authentication included, or unsupported authentication method.",
        );
    }
    let scope = form.get("scope").cloned().unwrap_or_default();
    let (device_code, user_code) = core.issue(scope);
    let uri = format!("{}/oauth/device", core.base);
    json_response(
        StatusCode::OK,
        &json!({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": uri,
            "verification_uri_complete": format!("{uri}?user_code={user_code}"),
            "expires_in": core.expires_in,
            "interval": core.interval,
        }),
    )
}

fn gitlab_token(core: &mut Core, body: &[u8]) -> Response {
    let form = form(body);
    if form.get("client_id") != Some(&core.client_id) {
        return gitlab_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client authentication failed due to unknown client, no client authentication included, or unsupported authentication method.",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some(DEVICE_GRANT) {
        return gitlab_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server.",
        );
    }
    let device_code = form.get("device_code").cloned().unwrap_or_default();
    let invalid_grant = || {
        gitlab_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client.",
        )
    };
    if !core.codes.contains_key(&device_code) {
        return invalid_grant();
    }
    match core.poll(&device_code) {
        Poll::Pending => gitlab_error(
            StatusCode::BAD_REQUEST,
            "authorization_pending",
            "The authorization request is still pending as the end user hasn't yet completed the user-interaction steps.",
        ),
        Poll::SlowDown(_) => gitlab_error(
            StatusCode::BAD_REQUEST,
            "slow_down",
            "The authorization request is still pending and polling should continue, but the interval MUST be increased by 5 seconds for this and all subsequent requests.",
        ),
        Poll::Expired => gitlab_error(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "The \"device_code\" has expired, and the device authorization session has concluded.",
        ),
        Poll::Denied => gitlab_error(
            StatusCode::BAD_REQUEST,
            "access_denied",
            "The resource owner or authorization server denied the request.",
        ),
        Poll::Unknown => invalid_grant(),
        Poll::Approved(user) => {
            let token = core.mint(user);
            let scope = core.stats.scopes.last().cloned().unwrap_or_default();
            json_response(
                StatusCode::OK,
                &json!({
                    "access_token": token,
                    "token_type": "Bearer",
                    "expires_in": 7200,
                    "refresh_token": format!("{:064x}", core.serial),
                    "scope": scope,
                    "created_at": 1_700_000_000,
                }),
            )
        }
    }
}

/// GitLab's project id: a number or a URL-encoded path, decoded once.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn project_not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"message": "404 Project Not Found"}),
    )
}

/// What GitLab knows of `user` and the project named by the (encoded) id.
struct Membership {
    full: String,
    /// The project's own membership.
    project: Option<u64>,
    /// The membership of the project's own group (what
    /// `permissions.group_access` shows; ancestors are not shown there).
    direct_group: Option<u64>,
    /// The highest of the project's and all its ancestor groups'
    /// memberships (what `members/all` shows).
    effective: Option<u64>,
}

/// `None` when the project does not exist or `user` may not see it (every
/// project is private: only members see it).
fn membership(core: &Core, user: &str, encoded: &str) -> Option<Membership> {
    let full = percent_decode(encoded)?;
    if !core.repositories.contains(&full) {
        return None;
    }
    let project = core
        .access
        .get(&(user.to_string(), full.clone()))
        .and_then(|l| gitlab_number(l));
    let namespace = full.rsplit_once('/').map_or("", |(n, _)| n);
    let group_level = |group: &str| {
        core.group_access
            .get(&(user.to_string(), group.to_string()))
            .and_then(|l| gitlab_number(l))
    };
    let direct_group = group_level(namespace);
    let mut effective = project;
    let mut prefix = String::new();
    for part in namespace.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        effective = effective.max(group_level(&prefix));
    }
    effective?;
    Some(Membership {
        full,
        project,
        direct_group,
        effective,
    })
}

fn gitlab_api(core: &Core, headers: &HeaderMap, path: &str) -> Response {
    if core.rate_limited {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::CONTENT_TYPE, "text/plain"),
                (header::RETRY_AFTER, "60"),
            ],
            "Retry later\n",
        )
            .into_response();
    }
    let Some((user, id)) = core.bearer(headers) else {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "401 Unauthorized"}),
        );
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["user"] => json_response(
            StatusCode::OK,
            &json!({
                "id": id,
                "username": user,
                "name": user,
                "state": "active",
                "locked": false,
                "avatar_url": null,
                "web_url": format!("{}/{user}", core.base),
                "bot": false,
            }),
        ),
        ["projects", encoded] => {
            let Some(Membership {
                full,
                project,
                direct_group,
                ..
            }) = membership(core, &user, encoded)
            else {
                return project_not_found();
            };
            let (namespace, name) = full.rsplit_once('/').unwrap_or(("", &full));
            let level = |n: Option<u64>| match n {
                Some(n) => json!({"access_level": n, "notification_level": 3}),
                None => Value::Null,
            };
            json_response(
                StatusCode::OK,
                &json!({
                    "id": 3,
                    "description": null,
                    "name": name,
                    "name_with_namespace": full.replace('/', " / "),
                    "path": name,
                    "path_with_namespace": full,
                    "default_branch": "main",
                    "visibility": "private",
                    "web_url": format!("{}/{full}", core.base),
                    "namespace": {"full_path": namespace, "kind": "group"},
                    "permissions": {
                        "project_access": level(project),
                        "group_access": level(direct_group),
                    },
                }),
            )
        }
        ["projects", encoded, "members", "all", member] => {
            let Some(found) = membership(core, &user, encoded) else {
                return project_not_found();
            };
            // The member asked about (any user id; here only the caller's
            // own memberships are kept, which is what the client asks).
            let Some((name, member_id)) = core
                .users
                .iter()
                .find(|(_, uid)| uid.to_string() == *member)
            else {
                return json_response(StatusCode::NOT_FOUND, &json!({"message": "404 Not found"}));
            };
            let effective = if *name == user {
                found.effective
            } else {
                membership(core, name, encoded).and_then(|m| m.effective)
            };
            match effective {
                None => json_response(StatusCode::NOT_FOUND, &json!({"message": "404 Not found"})),
                Some(level) => json_response(
                    StatusCode::OK,
                    &json!({
                        "id": member_id,
                        "username": name,
                        "name": name,
                        "state": "active",
                        "access_level": level,
                        "created_at": "2024-01-01T00:00:00.000Z",
                        "expires_at": null,
                    }),
                ),
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "404 Not Found"})),
    }
}
