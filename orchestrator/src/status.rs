//! Commit statuses without CI minutes: when a result that counts for CI is
//! announced for a commit of a repository whose policy says
//! `commit_status = true`, the orchestrator posts a `success` status for
//! that commit to the forge, context `reprise/<target>`, its description
//! naming the producer and the key. At most one per result (the claim is
//! a row of the state database, taken before the first attempt); retried
//! with backoff on network errors, 5xx and 429, given back after the last
//! attempt so that a later announce tries again.
//!
//! ```toml
//! [status.github]
//! token_file = "github-status-token"   # in the state folder, mode 0600
//! api_url = "https://api.github.com"   # the default (GitHub Enterprise: https://HOST/api/v3)
//! host = "github.com"                  # namespaces it serves (the default)
//!
//! [status.gitlab]
//! token_file = "gitlab-status-token"
//! url = "https://gitlab.com"           # the default; host defaults to its host
//! ```
//!
//! GitHub: `POST {api_url}/repos/{owner}/{repo}/statuses/{sha}` with
//! `{"state", "context", "description"}`; GitLab: `POST
//! {url}/api/v4/projects/{url-encoded path}/statuses/{sha}` with `{"state",
//! "name", "description"}`. The token is read once at start and never
//! logged.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reprise_protocol::digest::RunKey;
use serde::Deserialize;
use thiserror::Error;
use tracing::{info, warn};

use crate::state::{State, now_secs};

/// One `[status.github]` table, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GithubSettings {
    token_file: String,
    api_url: Option<String>,
    host: Option<String>,
}

/// One `[status.gitlab]` table, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GitlabSettings {
    token_file: String,
    url: Option<String>,
    host: Option<String>,
}

/// The `[status]` table, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusSettings {
    github: Option<GithubSettings>,
    gitlab: Option<GitlabSettings>,
}

/// Why the `[status]` settings were refused.
#[derive(Debug, Error)]
pub enum StatusConfigError {
    #[error("the [status] settings are not valid")]
    Toml(#[source] Box<toml::de::Error>),
    #[error("[status.{forge}] {what}")]
    Bad { forge: &'static str, what: String },
}

/// Which forge API a status goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    Github,
    Gitlab,
}

/// A forge that statuses are posted to.
#[derive(Clone)]
pub struct Forge {
    pub kind: ForgeKind,
    /// The first part of the namespaces it holds.
    pub host: String,
    /// GitHub: the API root; GitLab: the instance's root.
    pub base: reqwest::Url,
    token: String,
}

impl std::fmt::Debug for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forge")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

/// The forges of `[status]`, read from `orchestrator.toml`'s text; token
/// files are taken relative to `dir` and must be readable by their owner
/// only.
pub fn forges(text: &str, dir: &Path) -> Result<Vec<Forge>, StatusConfigError> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        status: StatusSettings,
    }
    let file: File = toml::from_str(text).map_err(|e| StatusConfigError::Toml(Box::new(e)))?;
    let mut out = Vec::new();
    if let Some(g) = file.status.github {
        out.push(forge(
            ForgeKind::Github,
            "github",
            g.api_url.as_deref().unwrap_or("https://api.github.com"),
            g.host.or_else(|| Some("github.com".into())),
            &g.token_file,
            dir,
        )?);
    }
    if let Some(g) = file.status.gitlab {
        out.push(forge(
            ForgeKind::Gitlab,
            "gitlab",
            g.url.as_deref().unwrap_or("https://gitlab.com"),
            g.host,
            &g.token_file,
            dir,
        )?);
    }
    Ok(out)
}

fn forge(
    kind: ForgeKind,
    name: &'static str,
    url: &str,
    host: Option<String>,
    token_file: &str,
    dir: &Path,
) -> Result<Forge, StatusConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |what: String| StatusConfigError::Bad { forge: name, what };
    let base = reqwest::Url::parse(url.trim_end_matches('/'))
        .map_err(|e| bad(format!("URL {url:?}: {e}")))?;
    if !matches!(base.scheme(), "https" | "http") {
        return Err(bad(format!("URL {url:?} is not http(s)")));
    }
    let host = match host {
        Some(h) => h,
        None => base
            .host_str()
            .ok_or_else(|| bad(format!("URL {url:?} has no host")))?
            .to_string(),
    };
    let path = dir.join(token_file);
    let meta =
        std::fs::metadata(&path).map_err(|e| bad(format!("token_file {}: {e}", path.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(bad(format!(
            "token_file {} may be read by others; `chmod 600` it",
            path.display()
        )));
    }
    let token = std::fs::read_to_string(&path)
        .map_err(|e| bad(format!("token_file {}: {e}", path.display())))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(bad(format!("token_file {} is empty", path.display())));
    }
    Ok(Forge {
        kind,
        host,
        base,
        token,
    })
}

/// A status to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub namespace: String,
    pub key: RunKey,
    /// The commit (full sha).
    pub sha: String,
    pub target: String,
    pub producer: String,
}

impl Status {
    pub fn context(&self) -> String {
        format!("reprise/{}", self.target)
    }

    pub fn description(&self) -> String {
        format!(
            "passed, run by {}; replay with reprise (key {})",
            self.producer,
            self.key.short()
        )
    }
}

/// How statuses are posted: the forges, the HTTP client, the backoff.
#[derive(Debug, Clone)]
pub struct Poster {
    forges: Vec<Forge>,
    client: reqwest::Client,
    /// Waits between attempts; their count + 1 is the number of attempts.
    pub backoff: Vec<Duration>,
}

impl Poster {
    pub fn new(forges: Vec<Forge>) -> Result<Poster, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("reprise-orchestrator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Poster {
            forges,
            client,
            backoff: [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec(),
        })
    }

    /// The forge holding `namespace` and the repository's path there.
    pub fn forge_of<'a>(&'a self, namespace: &'a str) -> Option<(&'a Forge, &'a str)> {
        self.forges.iter().find_map(|f| {
            let path = namespace.strip_prefix(&f.host)?.strip_prefix('/')?;
            (!path.is_empty()).then_some((f, path))
        })
    }

    /// Claims and posts `status` in the background (at most once per
    /// result), if its repository is on a configured forge.
    pub fn post_once(self: &Arc<Self>, state: &Arc<Mutex<State>>, status: Status) {
        if self.forge_of(&status.namespace).is_none() {
            return;
        }
        let claimed = state.lock().expect("state").claim_status(
            &status.namespace,
            &status.key,
            &status.sha,
            now_secs(),
        );
        match claimed {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!("cannot record a commit status: {e}");
                return;
            }
        }
        let (poster, state) = (self.clone(), state.clone());
        tokio::spawn(async move {
            let posted = poster.post_with_retries(&status).await;
            let settled = state.lock().expect("state").settle_status(
                &status.namespace,
                &status.key,
                posted,
                now_secs(),
            );
            if let Err(e) = settled {
                warn!("cannot record a commit status: {e}");
            }
        });
    }

    async fn post_with_retries(&self, status: &Status) -> bool {
        let Some((forge, path)) = self.forge_of(&status.namespace) else {
            return false;
        };
        let mut waits = self.backoff.iter();
        loop {
            match self.post(forge, path, status).await {
                Ok(()) => {
                    info!(namespace = %status.namespace, sha = %status.sha, context = %status.context(), "commit status posted");
                    return true;
                }
                Err((retry, why)) => match waits.next() {
                    Some(wait) if retry => {
                        warn!(namespace = %status.namespace, sha = %status.sha, "commit status not posted ({why}); again in {wait:?}");
                        tokio::time::sleep(*wait).await;
                    }
                    _ => {
                        warn!(namespace = %status.namespace, sha = %status.sha, "commit status not posted: {why}");
                        return false;
                    }
                },
            }
        }
    }

    /// One attempt: `Err((retry, why))`.
    async fn post(&self, forge: &Forge, path: &str, status: &Status) -> Result<(), (bool, String)> {
        let (url, body, request) = match forge.kind {
            ForgeKind::Github => {
                let url = status_url(forge, path, &status.sha).map_err(|why| (false, why))?;
                let body = serde_json::json!({
                    "state": "success",
                    "context": status.context(),
                    "description": status.description(),
                });
                let request = self
                    .client
                    .post(&url)
                    .bearer_auth(&forge.token)
                    .header("Accept", "application/vnd.github+json")
                    .header("X-GitHub-Api-Version", "2022-11-28");
                (url, body, request)
            }
            ForgeKind::Gitlab => {
                let url = status_url(forge, path, &status.sha).map_err(|why| (false, why))?;
                let body = serde_json::json!({
                    "state": "success",
                    "name": status.context(),
                    "description": status.description(),
                });
                let request = self.client.post(&url).header("PRIVATE-TOKEN", &forge.token);
                (url, body, request)
            }
        };
        let answer = request
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| (true, format!("{url}: {}", e.without_url())))?;
        let code = answer.status();
        if code.is_success() {
            Ok(())
        } else {
            let retry = code.is_server_error() || code.as_u16() == 429;
            Err((retry, format!("{url}: HTTP {code}")))
        }
    }
}

/// The status URL of commit `sha` of the repository at `path` on `forge`.
/// The commit comes from a producer's manifest and the path from a
/// namespace: each goes into the URL as escaped path segments, so neither
/// can steer the orchestrator's token to another API path (`..`, `?`, `/`).
fn status_url(forge: &Forge, path: &str, sha: &str) -> Result<String, String> {
    // One segment of a URL path, escaped; "", "." and ".." would move it.
    let segment = |text: &str| match text {
        "" | "." | ".." => Err(format!("{text:?} cannot be a part of a status URL")),
        _ => Ok(percent_encode_path(text)),
    };
    let base = forge.base.as_str().trim_end_matches('/');
    let sha = segment(sha)?;
    match forge.kind {
        ForgeKind::Github => match path.split('/').collect::<Vec<_>>().as_slice() {
            [owner, repo] => Ok(format!(
                "{base}/repos/{}/{}/statuses/{sha}",
                segment(owner)?,
                segment(repo)?
            )),
            _ => Err(format!("{path:?} is not OWNER/REPO on GitHub")),
        },
        ForgeKind::Gitlab => Ok(format!(
            "{base}/api/v4/projects/{}/statuses/{sha}",
            percent_encode_path(path)
        )),
    }
}

/// A GitLab project path as its API takes it in a URL (`group%2Fproject`).
fn percent_encode_path(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_file(dir: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(dir.join("t"), "secret-token\n").unwrap();
        std::fs::set_permissions(dir.join("t"), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn forges_are_read_and_namespaces_mapped_to_them() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path(), 0o600);
        let forges = forges(
            "[status.github]\ntoken_file = \"t\"\n[status.gitlab]\ntoken_file = \"t\"\nurl = \"https://gitlab.example\"\n",
            dir.path(),
        )
        .unwrap();
        let poster = Poster::new(forges).unwrap();
        let (f, path) = poster.forge_of("github.com/o/r").unwrap();
        assert_eq!((f.kind, path), (ForgeKind::Github, "o/r"));
        assert_eq!(f.base.as_str(), "https://api.github.com/");
        let (f, path) = poster.forge_of("gitlab.example/g/sub/p").unwrap();
        assert_eq!((f.kind, path), (ForgeKind::Gitlab, "g/sub/p"));
        assert!(poster.forge_of("github.com.evil/o/r").is_none());
        assert!(poster.forge_of("local/abc").is_none());
        assert_eq!(percent_encode_path("g/sub/p"), "g%2Fsub%2Fp");
        let shown = format!("{poster:?}");
        assert!(!shown.contains("secret-token"), "{shown}");
    }

    #[test]
    fn hostile_commits_and_paths_stay_inside_the_status_url() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path(), 0o600);
        let forges = forges(
            "[status.github]\ntoken_file = \"t\"\n[status.gitlab]\ntoken_file = \"t\"\nurl = \"https://gitlab.example\"\n",
            dir.path(),
        )
        .unwrap();
        let (gh, gl) = (&forges[0], &forges[1]);
        assert_eq!(
            status_url(gh, "o/r", "../../../orgs/o/members?x=1").unwrap(),
            "https://api.github.com/repos/o/r/statuses/..%2F..%2F..%2Forgs%2Fo%2Fmembers%3Fx%3D1"
        );
        assert_eq!(
            status_url(gl, "g/../p", "c1").unwrap(),
            "https://gitlab.example/api/v4/projects/g%2F..%2Fp/statuses/c1"
        );
        assert!(status_url(gh, "o/r/../../x", "c1").is_err());
        assert!(status_url(gh, "o", "c1").is_err());
        assert!(status_url(gh, "o/..", "c1").is_err());
        assert!(status_url(gl, "g/p", "..").is_err());
    }

    #[test]
    fn a_token_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path(), 0o644);
        let e = forges("[status.github]\ntoken_file = \"t\"\n", dir.path()).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let e = forges("[status.github]\ntoken = \"inline\"\n", dir.path()).unwrap_err();
        assert!(matches!(e, StatusConfigError::Toml(_)), "{e}");
    }
}
