//! `reprise.toml`: what a repository declares about its runs, read from the
//! revision's tree so that every peer agrees on it.
//!
//! ```toml
//! namespace = "example.com/team/project"  # default: from the origin URL
//! env = ["CC", "RUST_LOG"]                # counted in the key
//! secrets = ["NPM_TOKEN"]                 # passed in, never counted or kept
//! artifacts = ["report.txt"]              # built with /var/run/ci/artifacts/%
//!
//! [network]
//! prepare = true    # base-image and prepare-runtime may fetch (the tests never do)
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
    #[serde(default)]
    pub network: NetworkConfig,
}

/// The `[network]` section: who may reach the network.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// `base-image`, `prepare-runtime` and `post-test` may reach the
    /// outside network (never the host's own services). Off for fully
    /// offline builds.
    #[serde(default = "yes")]
    pub prepare: bool,
}

fn yes() -> bool {
    true
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig { prepare: true }
    }
}

/// Why `reprise.toml` was refused, and where: `reprise.toml:LINE:COLUMN:`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{FILE_NAME}:{line}:{column}: {what}")]
pub struct ConfigError {
    pub line: usize,
    pub column: usize,
    pub what: ConfigProblem,
}

/// What is wrong with `reprise.toml`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigProblem {
    #[error("{0}")]
    Syntax(String),
    #[error("'{0}' is not a valid environment variable name")]
    BadName(String),
    #[error("'{0}' is both counted and secret")]
    Both(String),
}

/// The 1-based line and column of byte `offset` of `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl ConfigError {
    /// A problem with `name`, placed at its first quoted occurrence in
    /// `text` (counted names are written as TOML strings).
    fn at_name(text: &str, name: &str, what: ConfigProblem) -> ConfigError {
        let offset = text
            .find(&format!("\"{name}\""))
            .or_else(|| text.find(&format!("'{name}'")))
            .map_or(0, |o| o + 1);
        let (line, column) = line_column(text, offset);
        ConfigError { line, column, what }
    }
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
        let config: RepoConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            ConfigError {
                line,
                column,
                what: ConfigProblem::Syntax(e.message().to_string()),
            }
        })?;
        for name in config.env.iter().chain(&config.secrets) {
            if !valid_env_name(name) {
                return Err(ConfigError::at_name(
                    text,
                    name,
                    ConfigProblem::BadName(name.clone()),
                ));
            }
        }
        if let Some(both) = config.env.iter().find(|n| config.secrets.contains(n)) {
            // The second mention is the one that makes it both. A name may
            // be written in either quotes (or escaped, and not found): never
            // slice the text where no quote was found.
            let mut mentions: Vec<usize> = Vec::new();
            for q in ['"', '\''] {
                let quoted = format!("{q}{both}{q}");
                mentions.extend(text.match_indices(&quoted).map(|(o, _)| o));
            }
            mentions.sort_unstable();
            let offset = mentions.get(1).or(mentions.first()).map_or(0, |o| o + 1);
            let (line, column) = line_column(text, offset);
            return Err(ConfigError {
                line,
                column,
                what: ConfigProblem::Both(both.clone()),
            });
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
        assert!(c.network.prepare, "preparation has the network by default");
        let offline = RepoConfig::parse("[network]\nprepare = false\n").unwrap();
        assert!(!offline.network.prepare);
        assert_eq!(RepoConfig::parse("").unwrap(), RepoConfig::default());
    }

    #[test]
    fn refuses_bad_declarations() {
        let cases = [
            ("env = [\"1X\"]", "reprise.toml:1:9: '1X' is not a valid"),
            (
                "env = [\"A\"]\nsecrets = [\"A\"]",
                "reprise.toml:2:13: 'A' is both counted and secret",
            ),
            (
                "\u{feff}env = ['A']\nsecrets = ['A']",
                "reprise.toml:2:13: 'A' is both counted and secret",
            ),
            (
                "env = [\"\\u0041\"]\nsecrets = [\"\\u0041\"]",
                "reprise.toml:1:1: 'A' is both counted and secret",
            ),
            ("artifacts = [\"../x\"]", "reprise.toml:1:13: artifact path"),
            ("\nartifacts = [\"/etc/passwd\"]", "reprise.toml:2:13:"),
            ("artifacts = [\"a//b\"]", "relative"),
            ("colour = 1", "reprise.toml:1:1: unknown field `colour`"),
            ("env = \"CC\"", "reprise.toml:1:7:"),
            ("env = [\"CC\"\n", "reprise.toml:1:12: unclosed array"),
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
