//! `reprise-orchestrator policy check`: why an identity's results do or do
//! not count for CI in a repository, from the same state and policy the
//! service decides by.

use reprise_protocol::policy::{
    CiJobs, CountAccess, ForgeAccess, RepoPolicy, names, person_username,
};

use crate::state::{State, StateError, rfc3339};

/// The decision for one identity and one repository, and its reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub identity: String,
    pub namespace: String,
    /// May it look up and replay the repository's results?
    pub may_read: bool,
    /// Do results it produces count for CI (when they meet `conditions`)?
    pub counts: bool,
    /// Why, one line each, in the order they were checked.
    pub reasons: Vec<String>,
    /// What a result of it must also show to count (the repository's
    /// policy).
    pub conditions: Vec<String>,
}

/// Explains `identity` on `namespace` under `policy` as of `now`.
pub fn explain(
    state: &State,
    policy: &RepoPolicy,
    identity: &str,
    namespace: &str,
    now: u64,
) -> Result<Explanation, StateError> {
    let mut out = Explanation {
        identity: identity.to_string(),
        namespace: namespace.to_string(),
        may_read: false,
        counts: false,
        reasons: Vec::new(),
        conditions: conditions(policy, namespace),
    };
    let Some(grant) = state.grant(identity) else {
        out.reasons.push(format!(
            "{identity} was never issued a certificate (issue it, or a CI job logs in)"
        ));
        return Ok(out);
    };
    let record = state
        .identities()?
        .into_iter()
        .find(|i| i.grant.name == identity);
    let newest = record.as_ref().and_then(|i| {
        i.certificates
            .iter()
            .filter(|c| !c.revoked)
            .filter_map(|c| c.not_after)
            .max()
    });
    if state.is_revoked(identity) {
        out.reasons.push(format!(
            "{identity} is revoked: its certificates are refused (`issue --replace` gives it a new one)"
        ));
        return Ok(out);
    }
    match newest {
        Some(t) if t <= now => {
            out.reasons.push(format!(
                "every certificate of {identity} expired, the last at {} (log in again, or issue a new one)",
                rfc3339(t)
            ));
            return Ok(out);
        }
        Some(t) => out.reasons.push(format!(
            "{identity} holds a certificate valid until {}",
            rfc3339(t)
        )),
        None => out.reasons.push(format!(
            "{identity} holds a certificate with no recorded expiry"
        )),
    }
    out.may_read = grant.repos.contains(namespace);
    if !out.may_read {
        out.reasons.push(format!(
            "{namespace} is not among its repositories ({}): it may not read it, and nothing it produces there counts",
            grant.repos.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
        return Ok(out);
    }
    if !policy.may_read(identity) {
        out.may_read = false;
        out.reasons.push(format!(
            "{namespace}'s policy lets only {} read it (readers): it may not read it, and nothing it produces there counts",
            policy.readers.as_deref().unwrap_or_default().join(", ")
        ));
        return Ok(out);
    }
    out.reasons.push(format!(
        "it may read {namespace}: its certificate grants it"
    ));
    let standing = crate::matcher::standing(grant, namespace, policy);
    out.counts = standing.is_some();
    if let Some(username) = person_username(identity) {
        let access = grant
            .access
            .get(namespace)
            .copied()
            .unwrap_or(ForgeAccess::None);
        out.reasons.push(format!(
            "it is {username}, who logged in through the forge with {} access to it (as the forge said at the last login or renewal)",
            access.as_str()
        ));
        out.reasons.push(match (&standing, policy.count_access) {
            (Some(why), _) if policy.count_people.iter().any(|e| names(e, identity)) => {
                format!("its results count: {why}")
            }
            (Some(why), _) => format!("its results count: {why}"),
            (None, CountAccess::Nobody) => format!(
                "its results do not count: count_access = \"none\" and count_people does not name {username}"
            ),
            (None, CountAccess::AtLeast(least)) => format!(
                "its results do not count: they need {} access or more (count_access = {}), or {username} named in count_people",
                least.as_str(),
                policy.count_access
            ),
        });
        return Ok(out);
    }
    if let Some(why) = &standing
        && !grant.trusted
    {
        out.reasons.push(format!("its results count: {why}"));
    } else if grant.trusted {
        out.reasons.push(if identity.starts_with("ci:") {
            format!(
                "it is trusted: a CI job on a ref the policy counts (ci_jobs = {})",
                ci_jobs(policy.ci_jobs)
            )
        } else {
            "it is trusted (issued with --trusted)".to_string()
        });
    } else {
        out.reasons.push(if identity.starts_with("ci:") {
            format!(
                "it is not trusted: its job's ref does not count under ci_jobs = {} (the ref's protection is read at login)",
                ci_jobs(policy.ci_jobs)
            )
        } else {
            "it is not trusted: it may replay, its own results do not count (issue --trusted --replace to change that, or name it in count_people)".to_string()
        });
    }
    Ok(out)
}

fn ci_jobs(c: CiJobs) -> &'static str {
    match c {
        CiJobs::Protected => "\"protected\"",
        CiJobs::All => "\"all\"",
        CiJobs::None => "\"none\"",
    }
}

/// What any result must show to count in `namespace`.
fn conditions(policy: &RepoPolicy, namespace: &str) -> Vec<String> {
    let mut out = vec!["a passed run, sealed by its producer, not from the future".to_string()];
    if policy.require_fresh {
        out.push(format!(
            "a run from a fresh snapshot (require_fresh = true for {namespace})"
        ));
    }
    if let reprise_protocol::policy::CountDrivers::Only(drivers) = &policy.count_drivers {
        out.push(format!(
            "a run under the driver{} {} (count_drivers)",
            if drivers.len() == 1 { "" } else { "s" },
            drivers.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if !policy.allow_network {
        out.push("tests without the network (allow_network = false)".to_string());
    }
    if !policy.prefer.is_empty() {
        out.push(format!(
            "when trusted producers disagree, {} win in that order",
            policy.prefer.join(", ")
        ));
    } else {
        out.push("when trusted producers disagree, none counts".to_string());
    }
    if policy.commit_status {
        out.push("a counting result gets a commit status on the forge".to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use reprise_protocol::digest::Sha256Digest;
    use reprise_protocol::wire::StateEvent;

    use super::*;

    fn issued(state: &mut State, name: &str, repos: &[&str], trusted: bool, not_after: u64) {
        state
            .append(StateEvent::Issued {
                name: name.into(),
                cert_sha256: Sha256Digest::of(name.as_bytes()),
                repos: repos.iter().map(|r| r.to_string()).collect(),
                trusted,
                at: 1,
                not_after: Some(not_after),
                access: Default::default(),
            })
            .unwrap();
    }

    #[test]
    fn each_refusal_and_acceptance_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::open(&dir.path().join("s.db")).unwrap();
        issued(&mut state, "alice", &["a/b"], true, 2_000);
        issued(&mut state, "bob", &["a/b"], false, 2_000);
        issued(&mut state, "old", &["a/b"], true, 500);
        issued(&mut state, "gone", &["a/b"], true, 2_000);
        state
            .append(StateEvent::Revoked {
                name: "gone".into(),
                at: 2,
            })
            .unwrap();
        // People count by their forge access, under count_access.
        state
            .append(StateEvent::Issued {
                name: "github:carol".into(),
                cert_sha256: Sha256Digest::of(b"carol"),
                repos: vec!["a/b".into(), "c/d".into()],
                trusted: false,
                at: 1,
                not_after: Some(2_000),
                access: [
                    ("a/b".to_string(), ForgeAccess::Maintain),
                    ("c/d".to_string(), ForgeAccess::Read),
                ]
                .into_iter()
                .collect(),
            })
            .unwrap();
        let policy = RepoPolicy {
            require_fresh: true,
            ..RepoPolicy::default()
        };
        let e = |who: &str, ns: &str| explain(&state, &policy, who, ns, 1_000).unwrap();
        let alice = e("alice", "a/b");
        assert!(alice.may_read && alice.counts, "{alice:?}");
        assert!(
            alice
                .conditions
                .iter()
                .any(|c| c.contains("fresh snapshot"))
        );
        let bob = e("bob", "a/b");
        assert!(bob.may_read && !bob.counts);
        assert!(
            bob.reasons.last().unwrap().contains("not trusted"),
            "{bob:?}"
        );
        let elsewhere = e("alice", "c/d");
        assert!(!elsewhere.may_read && !elsewhere.counts);
        assert!(elsewhere.reasons.last().unwrap().contains("not among"));
        let old = e("old", "a/b");
        assert!(!old.counts && old.reasons[0].contains("expired"), "{old:?}");
        let gone = e("gone", "a/b");
        assert!(
            !gone.counts && gone.reasons[0].contains("revoked"),
            "{gone:?}"
        );
        let carol = e("github:carol", "a/b");
        assert!(carol.may_read && carol.counts, "{carol:?}");
        assert!(
            carol.reasons.iter().any(|r| r.contains("maintain access")),
            "{carol:?}"
        );
        let reader = e("github:carol", "c/d");
        assert!(reader.may_read && !reader.counts, "{reader:?}");
        assert!(
            reader
                .reasons
                .last()
                .unwrap()
                .contains("need maintain access or more"),
            "{reader:?}"
        );
        let named = RepoPolicy {
            count_people: vec!["carol".into()],
            ..RepoPolicy::default()
        };
        let carol_named = explain(&state, &named, "github:carol", "c/d", 1_000).unwrap();
        assert!(carol_named.counts, "{carol_named:?}");
        let closed = RepoPolicy {
            readers: Some(vec!["dave".into()]),
            ..RepoPolicy::default()
        };
        let kept_out = explain(&state, &closed, "github:carol", "a/b", 1_000).unwrap();
        assert!(!kept_out.may_read && !kept_out.counts, "{kept_out:?}");
        assert!(kept_out.reasons.last().unwrap().contains("readers"));
        let nobody = e("nobody", "a/b");
        assert!(!nobody.may_read && nobody.reasons[0].contains("never issued"));
    }
}
