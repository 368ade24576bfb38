//! `reprise.toml`: what a repository declares about its runs, read from the
//! revision's tree so that every peer agrees on it.
//!
//! ```toml
//! namespace = "example.com/team/project"  # default: from the origin URL
//! env = ["CC", "RUST_LOG"]                # counted in the key
//! secrets = ["NPM_TOKEN"]                 # passed in, never counted or kept
//! artifacts = ["report.txt"]              # built with /var/run/ci/artifacts/%
//! ```

use serde::Deserialize;
use thiserror::Error;

use crate::manifest::ArtifactPath;

/// The file's name at the repository root.
pub const FILE_NAME: &str = "reprise.toml";

/// A repository's declarations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub namespace: Option<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    #[serde(default)]
    pub artifacts: Vec<ArtifactPath>,
}

/// Why `reprise.toml` was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{FILE_NAME} is not valid: {0}")]
    Syntax(String),
    #[error("{FILE_NAME}: '{0}' is not a valid environment variable name")]
    BadName(String),
    #[error("{FILE_NAME}: '{0}' is both counted and secret")]
    Both(String),
}

/// Whether `name` can be an environment variable name.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl RepoConfig {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<RepoConfig, ConfigError> {
        let config: RepoConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.message().to_string()))?;
        for name in config.env.iter().chain(&config.secrets) {
            if !valid_env_name(name) {
                return Err(ConfigError::BadName(name.clone()));
            }
        }
        if let Some(both) = config.env.iter().find(|n| config.secrets.contains(n)) {
            return Err(ConfigError::Both(both.clone()));
        }
        Ok(config)
    }
}

/// The namespace for an origin URL: `host/owner/name`, without scheme, user,
/// port or `.git`. `None` if the URL has no path.
pub fn namespace_from_url(url: &str) -> Option<String> {
    let url = url.trim().trim_end_matches('/');
    let url = url.strip_suffix(".git").unwrap_or(url);
    let (host, path) = if let Some((_, rest)) = url.split_once("://") {
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        rest.split_once('/')?
    } else if let Some((left, path)) = url.split_once(':') {
        // scp-like: git@host:owner/name
        (left.rsplit_once('@').map_or(left, |(_, h)| h), path)
    } else {
        return None;
    };
    let host = host.split(':').next()?.to_ascii_lowercase();
    let path = path.trim_matches('/');
    if host.is_empty() || path.is_empty() {
        return None;
    }
    Some(format!("{host}/{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_declarations() {
        let c = RepoConfig::parse(
            "namespace = \"x/y\"\nenv = [\"CC\"]\nsecrets = [\"TOKEN\"]\nartifacts = [\"out/r.txt\"]\n",
        )
        .unwrap();
        assert_eq!(c.namespace.as_deref(), Some("x/y"));
        assert_eq!(c.env, ["CC"]);
        assert_eq!(c.secrets, ["TOKEN"]);
        assert_eq!(c.artifacts, ["out/r.txt".parse().unwrap()]);
        assert_eq!(RepoConfig::parse("").unwrap(), RepoConfig::default());
    }

    #[test]
    fn refuses_bad_declarations() {
        let cases = [
            ("env = [\"1X\"]", "not a valid"),
            ("env = [\"A\"]\nsecrets = [\"A\"]", "both"),
            ("artifacts = [\"../x\"]", "relative"),
            ("artifacts = [\"/etc/passwd\"]", "relative"),
            ("artifacts = [\"a//b\"]", "relative"),
            ("colour = 1", "not valid"),
            ("env = \"CC\"", "not valid"),
        ];
        for (text, want) in cases {
            let err = RepoConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn namespaces_from_origin_urls() {
        let cases = [
            (
                "https://github.com/Team/Proj.git",
                Some("github.com/Team/Proj"),
            ),
            (
                "git@gitlab.example.com:group/sub/proj.git",
                Some("gitlab.example.com/group/sub/proj"),
            ),
            ("ssh://git@host.example:2222/a/b", Some("host.example/a/b")),
            ("https://user:pw@host/a/b/", Some("host/a/b")),
            ("/srv/git/repo", None),
            ("https://host", None),
        ];
        for (url, want) in cases {
            assert_eq!(namespace_from_url(url).as_deref(), want, "{url}");
        }
    }
}
