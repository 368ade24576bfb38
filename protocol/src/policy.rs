//! The orchestrator's per-repository trust policy, from the `[policy]`
//! section of `DIR/orchestrator.toml`: what a result must show to count for
//! CI, beyond a trusted, unrevoked producer.
//!
//! ```toml
//! [policy]                        # every repository
//! require_fresh = false           # count only runs from a blank snapshot
//! allow_network = false           # count runs whose tests had the network
//! prefer = []                     # on a conflict, these identities win, in order
//! ci_jobs = "protected"           # CI jobs whose results count: protected refs only,
//!                                 # "all" refs, or "none"
//! commit_status = false           # post a commit status for each counting result
//!
//! [policy.repos."example.com/team/project"]
//! require_fresh = true            # only what is set here overrides
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;

/// The orchestrator's settings file's name in its folder.
pub const FILE_NAME: &str = "orchestrator.toml";

/// What a repository's results must show to count (resolved from the
/// defaults and the repository's own section).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoPolicy {
    /// Only results of runs that started from a blank snapshot count.
    pub require_fresh: bool,
    /// Results of runs whose tests had the network count too.
    pub allow_network: bool,
    /// When trusted producers disagree, the first of these that holds a
    /// result wins; with none of them involved, the conflict stands.
    pub prefer: Vec<String>,
    /// Which CI jobs (logged in with their OIDC token) produce results
    /// that count.
    pub ci_jobs: CiJobs,
    /// Post a commit status to the forge when a result that counts is
    /// announced (`[status.*]` says how to reach the forge).
    pub commit_status: bool,
}

/// Which CI jobs' results count for CI. A job on an unprotected ref runs
/// whatever workflow its branch carries (a pull request can change it),
/// and that job holds the key that seals its results: by default only
/// jobs on protected refs count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CiJobs {
    #[default]
    Protected,
    All,
    None,
}

impl CiJobs {
    /// Whether a job on a ref that is (or is not) protected counts.
    pub fn counts(self, protected: bool) -> bool {
        match self {
            CiJobs::Protected => protected,
            CiJobs::All => true,
            CiJobs::None => false,
        }
    }
}

/// One repository's overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoOverrides {
    pub require_fresh: Option<bool>,
    pub allow_network: Option<bool>,
    pub prefer: Option<Vec<String>>,
    pub ci_jobs: Option<CiJobs>,
    pub commit_status: Option<bool>,
}

/// The `[policy]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub require_fresh: bool,
    #[serde(default)]
    pub allow_network: bool,
    #[serde(default)]
    pub prefer: Vec<String>,
    #[serde(default)]
    pub ci_jobs: CiJobs,
    #[serde(default)]
    pub commit_status: bool,
    /// By repository namespace.
    #[serde(default)]
    pub repos: BTreeMap<String, RepoOverrides>,
}

impl PolicyConfig {
    /// The policy of `namespace`.
    pub fn for_repo(&self, namespace: &str) -> RepoPolicy {
        let o = self.repos.get(namespace).cloned().unwrap_or_default();
        RepoPolicy {
            require_fresh: o.require_fresh.unwrap_or(self.require_fresh),
            allow_network: o.allow_network.unwrap_or(self.allow_network),
            prefer: o.prefer.unwrap_or_else(|| self.prefer.clone()),
            ci_jobs: o.ci_jobs.unwrap_or(self.ci_jobs),
            commit_status: o.commit_status.unwrap_or(self.commit_status),
        }
    }
}

/// The whole settings file (other sections come with other features).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorSettings {
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The `[ci]` table (which CI issuers may log in), read and checked by
    /// the orchestrator's `oidc` module.
    #[serde(default)]
    pub ci: Option<toml::Table>,
    /// The `[status]` table (how commit statuses reach the forges), read
    /// and checked by the orchestrator's `status` module.
    #[serde(default)]
    pub status: Option<toml::Table>,
}

/// Why the settings file was refused.
#[derive(Debug, Error)]
#[error("{FILE_NAME} is not valid: {0}")]
pub struct SettingsError(String);

impl OrchestratorSettings {
    pub fn parse(text: &str) -> Result<OrchestratorSettings, SettingsError> {
        toml::from_str(text).map_err(|e| SettingsError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_override_the_defaults_field_by_field() {
        let s = OrchestratorSettings::parse(
            r#"
[policy]
allow_network = true
prefer = ["ci"]

[policy.repos."example.com/a/b"]
require_fresh = true

[policy.repos."example.com/c/d"]
allow_network = false
prefer = []
"#,
        )
        .unwrap();
        let p = &s.policy;
        assert_eq!(
            p.for_repo("example.com/a/b"),
            RepoPolicy {
                require_fresh: true,
                allow_network: true,
                prefer: vec!["ci".into()],
                ci_jobs: CiJobs::Protected,
                commit_status: false,
            }
        );
        assert_eq!(
            p.for_repo("example.com/c/d"),
            RepoPolicy {
                require_fresh: false,
                allow_network: false,
                prefer: vec![],
                ci_jobs: CiJobs::Protected,
                commit_status: false,
            }
        );
        assert_eq!(p.for_repo("other").prefer, ["ci"]);
        assert_eq!(
            OrchestratorSettings::parse("")
                .unwrap()
                .policy
                .for_repo("x"),
            RepoPolicy::default(),
            "by default: neither fresh nor network required or allowed"
        );
    }

    #[test]
    fn unknown_settings_are_refused() {
        for text in [
            "[policy]\nrequire_fresh = \"yes\"\n",
            "[policy]\ntrust_everyone = true\n",
            "[policy.repos.\"x\"]\nfresh = true\n",
            "[polcy]\n",
        ] {
            let e = OrchestratorSettings::parse(text).unwrap_err();
            assert!(e.to_string().contains("orchestrator.toml"), "{e}");
        }
    }
}
