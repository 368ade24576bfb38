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
//! count_drivers = "all"           # whose results count by driver: "all", or the
//!                                 # driver classes listed, e.g. ["qemu"] (VM runs only)
//!
//! [policy.repos."example.com/team/project"]
//! require_fresh = true            # only what is set here overrides
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use thiserror::Error;

use crate::key::DRIVER_CLASSES;

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
    /// Which drivers' results count.
    pub count_drivers: CountDrivers,
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

/// Which drivers' results count for CI (`count_drivers`), by the driver
/// class the run key and the sealed manifest carry. A podman run shares
/// the host's kernel and can reach services on podman's bridge, so a
/// repository may count only VM runs (`["qemu"]`); by default every
/// driver's results count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "DriversToml")]
pub enum CountDrivers {
    #[default]
    All,
    /// Only these driver classes (never empty, each one of
    /// [`DRIVER_CLASSES`]).
    Only(BTreeSet<String>),
}

impl CountDrivers {
    /// Whether results of driver class `driver` count.
    pub fn counts(&self, driver: &str) -> bool {
        match self {
            CountDrivers::All => true,
            CountDrivers::Only(classes) => classes.contains(driver),
        }
    }
}

impl fmt::Display for CountDrivers {
    /// `all`, or the classes as TOML writes them: `["qemu"]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountDrivers::All => f.write_str("all"),
            CountDrivers::Only(classes) => {
                let quoted: Vec<String> = classes.iter().map(|c| format!("\"{c}\"")).collect();
                write!(f, "[{}]", quoted.join(", "))
            }
        }
    }
}

/// `count_drivers` as written: `"all"` or a list of driver classes.
#[derive(Deserialize)]
#[serde(untagged)]
enum DriversToml {
    Word(String),
    List(Vec<String>),
}

impl TryFrom<DriversToml> for CountDrivers {
    type Error = String;

    fn try_from(value: DriversToml) -> Result<CountDrivers, String> {
        let known = DRIVER_CLASSES.join(", ");
        match value {
            DriversToml::Word(w) if w == "all" => Ok(CountDrivers::All),
            DriversToml::Word(w) => Err(format!(
                "count_drivers is \"all\" or a list of driver classes ({known}), not \"{w}\""
            )),
            DriversToml::List(list) if list.is_empty() => Err(format!(
                "count_drivers = [] would count no result at all: list the driver classes whose results count ({known}), or write \"all\""
            )),
            DriversToml::List(list) => {
                if let Some(bad) = list.iter().find(|c| !DRIVER_CLASSES.contains(&c.as_str())) {
                    return Err(format!(
                        "count_drivers: \"{bad}\" is not a driver class ({known})"
                    ));
                }
                Ok(CountDrivers::Only(list.into_iter().collect()))
            }
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
    pub count_drivers: Option<CountDrivers>,
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
    #[serde(default)]
    pub count_drivers: CountDrivers,
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
            count_drivers: o
                .count_drivers
                .unwrap_or_else(|| self.count_drivers.clone()),
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
    fn every_setting_may_be_left_out() {
        for text in [
            "",
            "[policy]\n",
            "[policy]\nrequire_fresh = true\n",
            "[policy.repos.\"a/b\"]\n",
        ] {
            let parsed = OrchestratorSettings::parse(text);
            assert!(parsed.is_ok(), "{text:?}: {parsed:?}");
        }
    }

    #[test]
    fn repositories_override_the_defaults_field_by_field() {
        let s = OrchestratorSettings::parse(
            r#"
[policy]
allow_network = true
prefer = ["ci"]
count_drivers = ["qemu"]

[policy.repos."example.com/a/b"]
require_fresh = true

[policy.repos."example.com/c/d"]
allow_network = false
prefer = []
count_drivers = "all"
"#,
        )
        .unwrap();
        let p = &s.policy;
        let vm_only = CountDrivers::Only(BTreeSet::from(["qemu".to_string()]));
        assert_eq!(
            p.for_repo("example.com/a/b"),
            RepoPolicy {
                require_fresh: true,
                allow_network: true,
                prefer: vec!["ci".into()],
                ci_jobs: CiJobs::Protected,
                commit_status: false,
                count_drivers: vm_only.clone(),
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
                count_drivers: CountDrivers::All,
            }
        );
        assert_eq!(p.for_repo("other").prefer, ["ci"]);
        assert_eq!(p.for_repo("other").count_drivers, vm_only);
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
    fn count_drivers_is_all_or_known_driver_classes() {
        let parse = |value: &str| {
            OrchestratorSettings::parse(&format!("[policy]\ncount_drivers = {value}\n"))
                .map(|s| s.policy.for_repo("x").count_drivers)
        };
        assert_eq!(
            RepoPolicy::default().count_drivers,
            CountDrivers::All,
            "every driver's results count unless the policy says otherwise"
        );
        assert_eq!(parse("\"all\"").unwrap(), CountDrivers::All);
        let both = parse("[\"podman\", \"qemu\"]").unwrap();
        assert!(both.counts("qemu") && both.counts("podman"));
        let vm = parse("[\"qemu\"]").unwrap();
        assert!(vm.counts("qemu"));
        assert!(!vm.counts("podman"), "{vm}");
        assert_eq!(vm.to_string(), "[\"qemu\"]");
        assert!(CountDrivers::All.counts("podman"));
        for (value, says) in [
            ("[\"vm\"]", "\"vm\" is not a driver class (qemu, podman)"),
            ("[\"qemu\", \"host-podman\"]", "\"host-podman\" is not"),
            ("[]", "would count no result"),
            ("\"qemu\"", "\"all\" or a list"),
            ("true", "orchestrator.toml"),
        ] {
            let e = parse(value).unwrap_err().to_string();
            assert!(e.contains(says), "{value}: {e}");
        }
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
