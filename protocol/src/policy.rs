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
//! count_access = "maintain"       # people (reprise login) whose results count: at least
//!                                 # this access on the forge ("read" … "admin"), or "none"
//! count_people = []               # identities whose results count whatever their access:
//!                                 # a forge username ("alice") or an identity name
//! readers = ["alice"]             # if set: only these people may read (the forge must
//!                                 # let them read too); unset: anyone the forge lets read
//!
//! [policy.owners."example.com/team"]  # every repository of an owner (a GitHub
//! count_access = "write"          # user or organization, a GitLab group or subgroup)
//!
//! [policy.repos."example.com/team/project"]
//! require_fresh = true            # only what is set here overrides
//! ```
//!
//! A repository's policy is layered, each layer overriding only what it
//! sets: `[policy]`, then each `[policy.owners]` section whose owner is a
//! path prefix of the namespace (the shorter first, so a GitLab subgroup's
//! section overrides its group's), then the repository's own section.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
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
    /// The least forge access a person needs for their results to count.
    pub count_access: CountAccess,
    /// Identities whose results count whatever their access (forge
    /// usernames of people, or identity names).
    pub count_people: Vec<String>,
    /// When set, only these people (forge usernames or identity names)
    /// may read the repository; the forge must let them read it too.
    pub readers: Option<Vec<String>>,
}

/// A person's access to a repository on the forge, from least to most
/// (GitHub's `permissions`; GitLab's access levels: Guest and Planner are
/// `guest`, Reporter `read`, Developer `write`, Maintainer `maintain`,
/// Owner `admin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForgeAccess {
    None,
    /// Sees the project, not its code (GitLab Guest): cannot read.
    Guest,
    Read,
    Triage,
    Write,
    Maintain,
    Admin,
}

impl ForgeAccess {
    /// Whether this access lets a person read the code.
    pub fn reads(self) -> bool {
        self >= ForgeAccess::Read
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ForgeAccess::None => "none",
            ForgeAccess::Guest => "guest",
            ForgeAccess::Read => "read",
            ForgeAccess::Triage => "triage",
            ForgeAccess::Write => "write",
            ForgeAccess::Maintain => "maintain",
            ForgeAccess::Admin => "admin",
        }
    }
}

/// Whose forge access makes a person's results count (`count_access`): at
/// least a level, or nobody by access ("none"; named people still count).
/// By default people who maintain the repository: they can change what
/// CI runs on its protected branches anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum CountAccess {
    AtLeast(ForgeAccess),
    Nobody,
}

impl Default for CountAccess {
    fn default() -> CountAccess {
        CountAccess::AtLeast(ForgeAccess::Maintain)
    }
}

impl TryFrom<String> for CountAccess {
    type Error = String;

    fn try_from(word: String) -> Result<CountAccess, String> {
        Ok(match word.as_str() {
            "none" => CountAccess::Nobody,
            "read" => CountAccess::AtLeast(ForgeAccess::Read),
            "triage" => CountAccess::AtLeast(ForgeAccess::Triage),
            "write" => CountAccess::AtLeast(ForgeAccess::Write),
            "maintain" => CountAccess::AtLeast(ForgeAccess::Maintain),
            "admin" => CountAccess::AtLeast(ForgeAccess::Admin),
            _ => {
                return Err(format!(
                    "count_access is one of \"read\", \"triage\", \"write\", \"maintain\", \"admin\" (the least forge access whose results count) or \"none\", not \"{word}\""
                ));
            }
        })
    }
}

impl fmt::Display for CountAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountAccess::Nobody => f.write_str("\"none\""),
            CountAccess::AtLeast(level) => write!(f, "\"{}\"", level.as_str()),
        }
    }
}

/// The prefixes of the identities of people who logged in through a forge
/// (`github:<username>`, `gitlab:<host>:<username>`) and of CI jobs; names
/// issued by hand take none of them.
pub const RESERVED_PREFIXES: &[&str] = &["ci:", "github:", "gitlab:"];

/// The identity of a person who logged in through GitHub.
pub fn github_identity(username: &str) -> String {
    format!("github:{username}")
}

/// The identity of a person who logged in through the GitLab at `host`.
pub fn gitlab_identity(host: &str, username: &str) -> String {
    format!("gitlab:{host}:{username}")
}

/// The forge username of a person's identity (`None`: not a person).
pub fn person_username(identity: &str) -> Option<&str> {
    if let Some(name) = identity.strip_prefix("github:") {
        return (!name.is_empty() && !name.contains(':')).then_some(name);
    }
    let rest = identity.strip_prefix("gitlab:")?;
    let (_, name) = rest.rsplit_once(':')?;
    (!name.is_empty()).then_some(name)
}

/// Whether `entry` of a list of people (`count_people`, `readers`) names
/// `identity`: its whole name, or a person's forge username. A person only
/// ever holds grants on their own forge's repositories, so a username in
/// one repository's list cannot name someone of another forge there.
pub fn names(entry: &str, identity: &str) -> bool {
    entry == identity || person_username(identity) == Some(entry)
}

impl RepoPolicy {
    /// Whether `identity` may read the repository as far as the policy
    /// goes (`readers` restricts people only; the grant is checked apart).
    pub fn may_read(&self, identity: &str) -> bool {
        match &self.readers {
            Some(list) if person_username(identity).is_some() => {
                list.iter().any(|e| names(e, identity))
            }
            _ => true,
        }
    }

    /// Why the results of `identity`, granted the repository, count for
    /// CI, or `None` when they do not: named in `count_people`; a person
    /// with at least `count_access` on the forge (`access`, as the forge
    /// said at login); another identity that was issued as trusted (by
    /// hand with `--trusted`, or a CI job whose ref `ci_jobs` counts).
    pub fn counts_for(
        &self,
        identity: &str,
        trusted: bool,
        access: Option<ForgeAccess>,
    ) -> Option<String> {
        if !self.may_read(identity) {
            return None;
        }
        if self.count_people.iter().any(|e| names(e, identity)) {
            return Some(format!("{identity} is named in count_people"));
        }
        if person_username(identity).is_some() {
            let access = access.unwrap_or(ForgeAccess::None);
            return match self.count_access {
                CountAccess::AtLeast(least) if access >= least => Some(format!(
                    "{identity} has {} access on the forge (count_access = {})",
                    access.as_str(),
                    self.count_access
                )),
                _ => None,
            };
        }
        trusted.then(|| format!("{identity} is trusted"))
    }
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
    pub count_access: Option<CountAccess>,
    pub count_people: Option<Vec<String>>,
    pub readers: Option<Vec<String>>,
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
    #[serde(default)]
    pub count_access: CountAccess,
    #[serde(default)]
    pub count_people: Vec<String>,
    #[serde(default)]
    pub readers: Option<Vec<String>>,
    /// By owner: a path prefix of namespaces (`host/owner`, or a GitLab
    /// subgroup's `host/group/sub`).
    #[serde(default)]
    pub owners: BTreeMap<String, RepoOverrides>,
    /// By repository namespace.
    #[serde(default)]
    pub repos: BTreeMap<String, RepoOverrides>,
}

impl RepoOverrides {
    /// These overrides laid over `under`: what this sets wins.
    fn over(self, under: RepoOverrides) -> RepoOverrides {
        RepoOverrides {
            require_fresh: self.require_fresh.or(under.require_fresh),
            allow_network: self.allow_network.or(under.allow_network),
            prefer: self.prefer.or(under.prefer),
            ci_jobs: self.ci_jobs.or(under.ci_jobs),
            commit_status: self.commit_status.or(under.commit_status),
            count_drivers: self.count_drivers.or(under.count_drivers),
            count_access: self.count_access.or(under.count_access),
            count_people: self.count_people.or(under.count_people),
            readers: self.readers.or(under.readers),
        }
    }
}

/// Whether `owner` (a `[policy.owners]` key) is a path prefix of
/// `namespace`: `team` owns `team/app` and `team/sub/app`, not `teams/app`.
fn owns(owner: &str, namespace: &str) -> bool {
    namespace
        .strip_prefix(owner)
        .is_some_and(|rest| rest.starts_with('/'))
}

impl PolicyConfig {
    /// The sections that decide `namespace`'s policy beyond `[policy]`,
    /// from the least to the most specific, as the file names them
    /// (`[policy.owners."h/o"]`, `[policy.repos."h/o/r"]`).
    pub fn sections(&self, namespace: &str) -> Vec<(String, &RepoOverrides)> {
        let mut owners: Vec<(&String, &RepoOverrides)> = self
            .owners
            .iter()
            .filter(|(owner, _)| owns(owner, namespace))
            .collect();
        owners.sort_by_key(|(owner, _)| owner.len());
        let mut out: Vec<(String, &RepoOverrides)> = owners
            .into_iter()
            .map(|(owner, o)| (format!("[policy.owners.\"{owner}\"]"), o))
            .collect();
        if let Some(o) = self.repos.get(namespace) {
            out.push((format!("[policy.repos.\"{namespace}\"]"), o));
        }
        out
    }

    /// The policy of `namespace`: the defaults, overridden by its owners'
    /// sections, then by its own.
    pub fn for_repo(&self, namespace: &str) -> RepoPolicy {
        let o = self
            .sections(namespace)
            .into_iter()
            .fold(RepoOverrides::default(), |under, (_, o)| {
                o.clone().over(under)
            });
        RepoPolicy {
            require_fresh: o.require_fresh.unwrap_or(self.require_fresh),
            allow_network: o.allow_network.unwrap_or(self.allow_network),
            prefer: o.prefer.unwrap_or_else(|| self.prefer.clone()),
            ci_jobs: o.ci_jobs.unwrap_or(self.ci_jobs),
            commit_status: o.commit_status.unwrap_or(self.commit_status),
            count_drivers: o
                .count_drivers
                .unwrap_or_else(|| self.count_drivers.clone()),
            count_access: o.count_access.unwrap_or(self.count_access),
            count_people: o.count_people.unwrap_or_else(|| self.count_people.clone()),
            readers: o.readers.or_else(|| self.readers.clone()),
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
    /// The `[login]` table (how people log in through GitHub or GitLab),
    /// read and checked by the orchestrator's `forge` module.
    #[serde(default)]
    pub login: Option<toml::Table>,
}

/// Why the settings file was refused.
#[derive(Debug, Error)]
#[error("{FILE_NAME} is not valid: {0}")]
pub struct SettingsError(String);

impl OrchestratorSettings {
    pub fn parse(text: &str) -> Result<OrchestratorSettings, SettingsError> {
        let settings: OrchestratorSettings =
            toml::from_str(text).map_err(|e| SettingsError(e.to_string()))?;
        for owner in settings.policy.owners.keys() {
            let parts: Vec<&str> = owner.split('/').collect();
            if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(SettingsError(format!(
                    "[policy.owners.\"{owner}\"]: an owner is written HOST/OWNER (e.g. \"github.com/team\", or a GitLab subgroup \"gitlab.com/group/sub\"), without a trailing slash"
                )));
            }
        }
        Ok(settings)
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
                ..RepoPolicy::default()
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
                ..RepoPolicy::default()
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
    fn owners_override_the_defaults_and_repositories_override_their_owners() {
        let p = OrchestratorSettings::parse(
            r#"
[policy]
count_access = "admin"
require_fresh = true

[policy.owners."gitlab.com/group"]
count_access = "write"
readers = ["alice"]

[policy.owners."gitlab.com/group/sub"]
count_access = "maintain"

[policy.repos."gitlab.com/group/sub/app"]
require_fresh = false
"#,
        )
        .unwrap()
        .policy;
        let at = |ns: &str| p.for_repo(ns);
        let write = CountAccess::AtLeast(ForgeAccess::Write);
        let maintain = CountAccess::AtLeast(ForgeAccess::Maintain);
        let admin = CountAccess::AtLeast(ForgeAccess::Admin);
        assert_eq!(at("gitlab.com/group/web").count_access, write);
        assert!(at("gitlab.com/group/web").require_fresh, "from [policy]");
        assert_eq!(
            at("gitlab.com/group/sub/lib").count_access,
            maintain,
            "a subgroup's section overrides its group's"
        );
        assert_eq!(
            at("gitlab.com/group/sub/lib").readers,
            Some(vec!["alice".to_string()]),
            "what the subgroup leaves unset comes from the group"
        );
        let app = at("gitlab.com/group/sub/app");
        assert!(!app.require_fresh && app.count_access == maintain);
        assert_eq!(
            at("gitlab.com/groups/web").count_access,
            admin,
            "an owner is a whole path segment, not a string prefix"
        );
        assert_eq!(at("gitlab.com/group").count_access, admin);
        let named: Vec<String> = p
            .sections("gitlab.com/group/sub/app")
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            named,
            [
                "[policy.owners.\"gitlab.com/group\"]",
                "[policy.owners.\"gitlab.com/group/sub\"]",
                "[policy.repos.\"gitlab.com/group/sub/app\"]",
            ]
        );
        for bad in ["github.com", "github.com/", "github.com//team", "/team"] {
            let e = OrchestratorSettings::parse(&format!(
                "[policy.owners.\"{bad}\"]\ncount_access = \"write\"\n"
            ))
            .unwrap_err();
            assert!(e.to_string().contains("HOST/OWNER"), "{bad}: {e}");
        }
        let e = OrchestratorSettings::parse("[policy.owners.\"h/o\"]\nfresh = true\n").unwrap_err();
        assert!(e.to_string().contains("fresh"), "{e}");
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
    fn people_count_by_forge_access_or_by_name_and_may_be_kept_from_reading() {
        let p = OrchestratorSettings::parse(
            r#"
[policy]
count_people = ["carol", "laptop"]

[policy.repos."github.com/o/strict"]
count_access = "admin"
readers = ["alice", "github:bob"]

[policy.repos."github.com/o/open"]
count_access = "write"

[policy.repos."github.com/o/nobody"]
count_access = "none"
count_people = []
"#,
        )
        .unwrap()
        .policy;
        use ForgeAccess::{Admin, Maintain, Read, Write};
        let counts = |ns: &str, who: &str, trusted: bool, access: Option<ForgeAccess>| {
            p.for_repo(ns).counts_for(who, trusted, access).is_some()
        };
        // (case, namespace, identity, trusted, access, counts)
        let table = [
            (
                "maintainers count by default",
                "github.com/o/x",
                "github:alice",
                false,
                Some(Maintain),
                true,
            ),
            (
                "writers do not",
                "github.com/o/x",
                "github:alice",
                false,
                Some(Write),
                false,
            ),
            (
                "unless the repository says so",
                "github.com/o/open",
                "github:alice",
                false,
                Some(Write),
                true,
            ),
            (
                "a named person counts with read access",
                "github.com/o/x",
                "github:carol",
                false,
                Some(Read),
                true,
            ),
            (
                "named by username on GitLab too",
                "github.com/o/x",
                "gitlab:gl.example:carol",
                false,
                Some(Read),
                true,
            ),
            (
                "a hand-issued identity named in full",
                "github.com/o/x",
                "laptop",
                false,
                None,
                true,
            ),
            (
                "a trusted hand-issued identity",
                "github.com/o/x",
                "desk",
                true,
                None,
                true,
            ),
            (
                "an untrusted one",
                "github.com/o/x",
                "desk",
                false,
                None,
                false,
            ),
            (
                "trust of a person comes from the forge, not a flag",
                "github.com/o/x",
                "github:dave",
                true,
                Some(Read),
                false,
            ),
            (
                "a CI job as the ci_jobs rule decided at login",
                "github.com/o/x",
                "ci:github:o/x@refs/heads/main",
                true,
                None,
                true,
            ),
            (
                "count_access = none",
                "github.com/o/nobody",
                "github:alice",
                false,
                Some(Admin),
                false,
            ),
            (
                "not a reader",
                "github.com/o/strict",
                "github:carol",
                false,
                Some(Admin),
                false,
            ),
            (
                "a reader who is admin",
                "github.com/o/strict",
                "github:bob",
                false,
                Some(Admin),
                true,
            ),
        ];
        for (case, ns, who, trusted, access, want) in table {
            assert_eq!(counts(ns, who, trusted, access), want, "{case}");
        }
        let strict = p.for_repo("github.com/o/strict");
        assert!(strict.may_read("github:alice") && strict.may_read("github:bob"));
        assert!(!strict.may_read("github:carol"));
        assert!(
            strict.may_read("ci:github:o/strict@refs/heads/main"),
            "readers names people only"
        );
        assert!(strict.may_read("desk"));
        let why = p
            .for_repo("github.com/o/x")
            .counts_for("github:alice", false, Some(Admin))
            .unwrap();
        assert!(
            why.contains("admin access") && why.contains("count_access = \"maintain\""),
            "{why}"
        );
        let e = OrchestratorSettings::parse("[policy]\ncount_access = \"owner\"\n").unwrap_err();
        assert!(e.to_string().contains("count_access is one of"), "{e}");
    }

    #[test]
    fn person_identities_name_their_forge_and_username() {
        assert_eq!(person_username(&github_identity("alice")), Some("alice"));
        assert_eq!(
            person_username(&gitlab_identity("gitlab.example:8443", "bob")),
            Some("bob")
        );
        for not_a_person in [
            "alice",
            "ci:github:o/r@refs/heads/main",
            "github:",
            "github:a:b",
            "gitlab:host",
        ] {
            assert_eq!(person_username(not_a_person), None, "{not_a_person}");
        }
        assert!(ForgeAccess::Read.reads() && !ForgeAccess::Guest.reads());
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
