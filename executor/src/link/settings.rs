//! Where the orchestrator is and which credentials to present. Both come
//! from the user, never from a repository: a freshly cloned repository must
//! not be able to point the executor at a foreign orchestrator with foreign
//! credentials (its failing tests "replayed" as a pass that counts, and the
//! whole store served to a stranger).
//!
//! Sources, first found wins, each setting on its own:
//!
//! | setting | environment | user config (mode 0600) | repository `.env` |
//! | --- | --- | --- | --- |
//! | orchestrator | `REPRISE_ORCHESTRATOR` | `orchestrator` | only if git does not track it |
//! | credentials | `REPRISE_CREDENTIALS` | `credentials` | never |
//!
//! The user config is `$XDG_CONFIG_HOME/reprise/config.toml`; a relative
//! `credentials` path there is taken from that folder. A `.env` that git
//! tracks is not read at all. Whatever is ignored is said in one line.
//! [`resolve`] is the decision, a pure function over the gathered facts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the orchestrator is and which credentials to present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSettings {
    /// `HOST:PORT`.
    pub orchestrator: String,
    pub credentials: PathBuf,
}

pub use crate::vars::{CREDENTIALS_VAR, ORCHESTRATOR_VAR};

/// The user config file, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    pub text: String,
}

/// A repository's `.env`, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DotEnv {
    pub path: PathBuf,
    /// Whether git tracks it (in the index or in HEAD's tree).
    pub tracked: bool,
    pub text: String,
}

/// Everything the decision looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The process environment (the two variables above, if set).
    pub env: BTreeMap<String, String>,
    pub user_config: Option<UserConfig>,
    pub dotenv: Option<DotEnv>,
}

/// The decision: the settings, if both are known, and one line for each
/// thing that was ignored or is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub settings: Option<LinkSettings>,
    pub notes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    orchestrator: Option<String>,
    credentials: Option<PathBuf>,
}

/// Decides the settings from `facts`.
pub fn resolve(facts: &Facts) -> Resolved {
    let mut notes = Vec::new();
    let env = |name: &str| facts.env.get(name).filter(|v| !v.is_empty()).cloned();
    let mut orchestrator = env(ORCHESTRATOR_VAR);
    let mut credentials = env(CREDENTIALS_VAR).map(PathBuf::from);

    if let Some(config) = &facts.user_config {
        if config.mode & 0o077 != 0 {
            notes.push(format!(
                "ignoring {}: it may be read or changed by others (mode {:o}); `chmod 600` it",
                config.path.display(),
                config.mode & 0o777
            ));
        } else {
            match toml::from_str::<ConfigFile>(&config.text) {
                Ok(file) => {
                    orchestrator = orchestrator.or(file.orchestrator);
                    let folder = config.path.parent().unwrap_or(Path::new("/"));
                    credentials = credentials.or(file.credentials.map(|c| folder.join(c)));
                }
                Err(e) => notes.push(format!(
                    "ignoring {}: {}",
                    config.path.display(),
                    e.message()
                )),
            }
        }
    }

    if let Some(dotenv) = &facts.dotenv {
        let values = parse_dotenv(&dotenv.text);
        let names_settings =
            values.contains_key(ORCHESTRATOR_VAR) || values.contains_key(CREDENTIALS_VAR);
        if dotenv.tracked {
            if names_settings {
                notes.push(format!(
                    "ignoring {}: git tracks it, and a repository never chooses the orchestrator or credentials (set {ORCHESTRATOR_VAR} and {CREDENTIALS_VAR} yourself)",
                    dotenv.path.display()
                ));
            }
        } else {
            if orchestrator.is_none() {
                orchestrator = values.get(ORCHESTRATOR_VAR).cloned();
            }
            if values.contains_key(CREDENTIALS_VAR) {
                notes.push(format!(
                    "ignoring {CREDENTIALS_VAR} in {}: credentials come only from the environment or your user config",
                    dotenv.path.display()
                ));
            }
        }
    }

    let settings = match (orchestrator, credentials) {
        (Some(orchestrator), Some(credentials)) => Some(LinkSettings {
            orchestrator,
            credentials,
        }),
        (Some(orchestrator), None) => {
            notes.push(format!(
                "an orchestrator ({orchestrator}) is set but no credentials: set {CREDENTIALS_VAR} or `credentials` in your user config; sharing is off"
            ));
            None
        }
        _ => None,
    };
    Resolved { settings, notes }
}

/// The user config file's path.
pub fn user_config_path() -> PathBuf {
    crate::paths::config_dir().join("config.toml")
}

/// Gathers the facts for a run in the checkout at `repo_root` (if any).
pub fn gather(repo_root: Option<&Path>) -> Facts {
    use std::os::unix::fs::PermissionsExt;
    let env = [ORCHESTRATOR_VAR, CREDENTIALS_VAR]
        .into_iter()
        .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
        .collect();
    let path = user_config_path();
    let user_config = std::fs::metadata(&path).ok().and_then(|meta| {
        Some(UserConfig {
            text: std::fs::read_to_string(&path).ok()?,
            mode: meta.permissions().mode(),
            path: path.clone(),
        })
    });
    let dotenv = repo_root.and_then(|root| {
        let path = root.join(".env");
        let text = std::fs::read_to_string(&path).ok()?;
        let tracked = crate::repo::Checkout::discover(root)
            .map(|c| c.tracks(Path::new(".env")))
            // Cannot tell: treat it as the repository's.
            .unwrap_or(true);
        Some(DotEnv {
            path,
            tracked,
            text,
        })
    });
    Facts {
        env,
        user_config,
        dotenv,
    }
}

/// The variables of a `.env` file, parsed as `dotenvy` reads them
/// (`export ` allowed, `#` comments, quoted values); lines that do not
/// parse are skipped.
pub fn parse_dotenv(text: &str) -> BTreeMap<String, String> {
    dotenvy::from_read_iter(text.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config(mode: u32, text: &str) -> Option<UserConfig> {
        Some(UserConfig {
            path: PathBuf::from("/home/u/.config/reprise/config.toml"),
            mode,
            text: text.into(),
        })
    }

    fn dotenv(tracked: bool, text: &str) -> Option<DotEnv> {
        Some(DotEnv {
            path: PathBuf::from("/repo/.env"),
            tracked,
            text: text.into(),
        })
    }

    fn settings(o: &str, c: &str) -> Option<LinkSettings> {
        Some(LinkSettings {
            orchestrator: o.into(),
            credentials: c.into(),
        })
    }

    const FOREIGN: &str = "REPRISE_ORCHESTRATOR=evil.example:443\nREPRISE_CREDENTIALS=evil.pem\n";

    #[test]
    fn only_the_user_chooses_the_orchestrator_and_credentials() {
        let user = "orchestrator = \"team:7443\"\ncredentials = \"me.pem\"\n";
        // (case, facts, settings, a note containing)
        let table: Vec<(&str, Facts, Option<LinkSettings>, Option<&str>)> = vec![
            ("nothing set", Facts::default(), None, None),
            (
                "environment",
                Facts {
                    env: env(&[(ORCHESTRATOR_VAR, "h:1"), (CREDENTIALS_VAR, "/c.pem")]),
                    ..Facts::default()
                },
                settings("h:1", "/c.pem"),
                None,
            ),
            (
                "user config, credentials beside it",
                Facts {
                    user_config: config(0o600, user),
                    ..Facts::default()
                },
                settings("team:7443", "/home/u/.config/reprise/me.pem"),
                None,
            ),
            (
                "the environment wins over the user config",
                Facts {
                    env: env(&[(ORCHESTRATOR_VAR, "h:1")]),
                    user_config: config(0o600, user),
                    ..Facts::default()
                },
                settings("h:1", "/home/u/.config/reprise/me.pem"),
                None,
            ),
            (
                "a user config others can read is refused",
                Facts {
                    user_config: config(0o644, user),
                    ..Facts::default()
                },
                None,
                Some("mode 644"),
            ),
            (
                "a tracked .env is not read",
                Facts {
                    dotenv: dotenv(true, FOREIGN),
                    ..Facts::default()
                },
                None,
                Some("git tracks it"),
            ),
            (
                "a tracked .env does not override the user either",
                Facts {
                    user_config: config(0o600, user),
                    dotenv: dotenv(true, FOREIGN),
                    ..Facts::default()
                },
                settings("team:7443", "/home/u/.config/reprise/me.pem"),
                Some("git tracks it"),
            ),
            (
                "an untracked .env names the orchestrator, never credentials",
                Facts {
                    env: env(&[(CREDENTIALS_VAR, "/mine.pem")]),
                    dotenv: dotenv(false, FOREIGN),
                    ..Facts::default()
                },
                settings("evil.example:443", "/mine.pem"),
                Some("credentials come only from"),
            ),
            (
                "an untracked .env alone gives no credentials",
                Facts {
                    dotenv: dotenv(false, FOREIGN),
                    ..Facts::default()
                },
                None,
                Some("no credentials"),
            ),
            (
                "a bad user config is named",
                Facts {
                    user_config: config(0o600, "orchestrator = 7\n"),
                    ..Facts::default()
                },
                None,
                Some("ignoring /home/u/.config/reprise/config.toml"),
            ),
        ];
        for (case, facts, want, note) in table {
            let got = resolve(&facts);
            assert_eq!(got.settings, want, "{case}");
            match note {
                Some(n) => assert!(
                    got.notes.iter().any(|line| line.contains(n)),
                    "{case}: {:?}",
                    got.notes
                ),
                None => assert!(got.notes.is_empty(), "{case}: {:?}", got.notes),
            }
        }
    }

    #[test]
    fn dotenv_lines() {
        let env = parse_dotenv(
            "# comment\nREPRISE_ORCHESTRATOR=127.0.0.1:4433\nexport REPRISE_CREDENTIALS=\"creds.pem\"\n\nBAD LINE\nQ='x=y'\n",
        );
        assert_eq!(env["REPRISE_ORCHESTRATOR"], "127.0.0.1:4433");
        assert_eq!(env["REPRISE_CREDENTIALS"], "creds.pem");
        assert_eq!(env["Q"], "x=y");
        assert_eq!(env.len(), 3);
    }
}
