//! Matching a lookup to a result that counts, without IO: an index from a
//! result to the connected executors that announced it (with the facts its
//! producer sealed), and the trust policy.
//!
//! Trust is decided by the result's *producer* (the identity whose
//! certificate sealed it), never by the executor that holds and relays it.
//! A result counts for CI when its producer is known, not revoked, its
//! certificate unexpired, trusted for the repository, and the result meets
//! the repository's policy (a fresh snapshot if required; no network
//! unless allowed; a driver whose results the repository counts). A lookup
//! is answered:
//!
//! - `Offer` when the counting producers agree (outcome and artifacts) and
//!   the result passed, naming a connected executor that holds it;
//! - `Conflict` when trusted producers disagree and the policy prefers none
//!   of them: neither counts, and the caller is told who disagrees;
//! - `NotFound` otherwise, including every refusal to an asker that may not
//!   read the repository, so an asker learns nothing about repositories it
//!   may not read (no oracle).
//!
//! Every function takes what it needs (the trust lookup, the policy, `now`)
//! as arguments.

use std::collections::{BTreeMap, BTreeSet};

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::manifest::Snapshot;
use reprise_protocol::policy::{CountDrivers, RepoPolicy};
use reprise_protocol::wire::{Held, Sealed};

use crate::state::{Admission, Grant};

/// A connection's id, unique for the service's lifetime.
pub type ConnId = usize;

/// What a connected executor's announcement says about one result, taken
/// from the sealed manifest (whose seal was verified on announce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The connection that holds it (and would serve it).
    pub conn: ConnId,
    /// The fingerprint of the certificate that sealed it.
    pub producer: Sha256Digest,
    /// [`reprise_protocol::manifest::ResultManifest::outputs_digest`].
    pub outputs: Sha256Digest,
    pub passed: bool,
    pub snapshot: Snapshot,
    pub network: bool,
    /// The driver class the run key and the sealed manifest carry
    /// (`inputs.driver`: `qemu`, `podman`).
    pub driver: String,
    pub created_at: u64,
    /// The producer's run time (the manifest's `total_ms`): what a replay
    /// of it saved, for the audit log.
    pub run_ms: u64,
}

impl Claim {
    /// The claim a sealed result makes, held by `conn`, sealed by
    /// `producer`.
    pub fn of(conn: ConnId, producer: Sha256Digest, sealed: &Sealed) -> Claim {
        let m = &sealed.manifest;
        Claim {
            conn,
            producer,
            outputs: m.outputs_digest(),
            passed: sealed.passed(),
            snapshot: m.snapshot,
            network: m.inputs.network,
            driver: m.inputs.driver.clone(),
            created_at: m.created_at,
            run_ms: m.total_ms,
        }
    }
}

/// What the orchestrator knows of a certificate: its admission (whose, and
/// whether revoked) and when it expires.
pub type TrustLookup<'a> = &'a dyn Fn(&Sha256Digest) -> (Admission, Option<u64>);

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Offer {
        /// The connection to fetch it from.
        conn: ConnId,
        /// Who sealed it, and the result's outputs: what the relayed
        /// header must show.
        producer: Sha256Digest,
        producer_name: String,
        outputs: Sha256Digest,
        /// The holder's claim's run time ([`Claim::run_ms`]).
        run_ms: u64,
        /// Why it counts.
        counts: String,
    },
    Conflict {
        producers: Vec<String>,
    },
    NotFound,
}

/// Whether a claim on `namespace` counts under `policy`: who produced it
/// and why it counts, or why not.
pub fn counts(
    claim: &Claim,
    namespace: &str,
    trust: TrustLookup<'_>,
    policy: &RepoPolicy,
    now: u64,
) -> Result<(String, String), String> {
    let (admission, not_after) = trust(&claim.producer);
    let grant = match admission {
        Admission::Admitted(g) => g,
        Admission::Revoked(name) => return Err(format!("its producer {name} was revoked")),
        Admission::Unknown => {
            return Err("its producer's certificate is unknown to this orchestrator".into());
        }
    };
    if let Err(e) = reprise_protocol::clock::not_from_the_future(
        "the result's creation time",
        claim.created_at,
        now,
    ) {
        return Err(e.to_string());
    }
    if not_after.is_some_and(|t| now > t) {
        return Err(format!(
            "the certificate of its producer {} expired",
            grant.name
        ));
    }
    let trusted_because = if grant.repos.contains(namespace) {
        standing(&grant, namespace, policy)
    } else {
        None
    };
    let Some(trusted_because) = trusted_because else {
        return Err(format!(
            "its producer {} is not trusted for {namespace}",
            grant.name
        ));
    };
    if policy.require_fresh && claim.snapshot != Snapshot::Fresh {
        return Err(format!(
            "{namespace} counts only runs from a fresh snapshot, and this one started from generation {}",
            match claim.snapshot {
                Snapshot::Generation(g) => g.short(),
                Snapshot::Fresh => unreachable!(),
            }
        ));
    }
    if claim.network && !policy.allow_network {
        return Err(format!(
            "its tests had the network, which {namespace}'s policy does not count"
        ));
    }
    if !policy.count_drivers.counts(&claim.driver) {
        return Err(format!(
            "it ran under the {} driver, and {namespace}'s policy counts only the results of count_drivers = {}",
            claim.driver, policy.count_drivers
        ));
    }
    let mut why = format!("{trusted_because} for {namespace}");
    if policy.require_fresh {
        why.push_str(", from a fresh snapshot");
    }
    if policy.count_drivers != CountDrivers::All {
        why.push_str(&format!(", under the {} driver", claim.driver));
    }
    Ok((grant.name, why))
}

/// Why the results of `grant`'s identity count for CI in `namespace`
/// (which it must be granted) under `policy`, before what the result
/// itself must show: [`RepoPolicy::counts_for`] with what the state holds
/// of it (whether issued as trusted, a person's forge access there).
pub fn standing(grant: &Grant, namespace: &str, policy: &RepoPolicy) -> Option<String> {
    policy.counts_for(
        &grant.name,
        grant.trusted,
        grant.access.get(namespace).copied(),
    )
}

/// The namespaces granted to `grant` in which its results count for CI
/// under `policy`.
pub fn counts_in(grant: &Grant, policy: &reprise_protocol::policy::PolicyConfig) -> Vec<String> {
    grant
        .repos
        .iter()
        .filter(|ns| standing(grant, ns, &policy.for_repo(ns)).is_some())
        .cloned()
        .collect()
}

/// The index of connected executors and what they hold.
#[derive(Debug)]
pub struct Matcher {
    conns: BTreeMap<ConnId, Grant>,
    held: BTreeMap<Held, Vec<Claim>>,
    /// Claims indexed per identity, over all its connections.
    per_identity: BTreeMap<String, usize>,
    /// The most claims one identity may have indexed.
    cap: usize,
}

/// Why an announced result was not indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotIndexed {
    /// The executor's certificate does not grant the repository.
    NotGranted,
    /// The identity has `cap` results indexed already.
    Full { identity: String, cap: usize },
}

impl Matcher {
    /// An empty index that keeps at most `cap` results per identity.
    pub fn new(cap: usize) -> Matcher {
        Matcher {
            conns: BTreeMap::new(),
            held: BTreeMap::new(),
            per_identity: BTreeMap::new(),
            cap,
        }
    }

    /// An executor connected with `grant`.
    pub fn connect(&mut self, conn: ConnId, grant: Grant) {
        self.conns.insert(conn, grant);
    }

    /// An executor went away: it serves nothing any more.
    pub fn disconnect(&mut self, conn: ConnId) {
        let Some(grant) = self.conns.remove(&conn) else {
            return;
        };
        let mut dropped = 0;
        self.held.retain(|_, claims| {
            let before = claims.len();
            claims.retain(|c| c.conn != conn);
            dropped += before - claims.len();
            !claims.is_empty()
        });
        if let Some(n) = self.per_identity.get_mut(&grant.name) {
            *n = n.saturating_sub(dropped);
            if *n == 0 {
                self.per_identity.remove(&grant.name);
            }
        }
    }

    /// A connected executor's identity was granted anew (a renewal, an
    /// `issue --replace`): its requests are decided by the new grant.
    pub fn regrant(&mut self, conn: ConnId, grant: Grant) {
        if let Some(g) = self.conns.get_mut(&conn) {
            *g = grant;
        }
    }

    /// The namespaces of every result indexed now.
    pub fn namespaces(&self) -> BTreeSet<String> {
        self.held.keys().map(|h| h.namespace.clone()).collect()
    }

    /// How many results `identity` has indexed.
    pub fn indexed_by(&self, identity: &str) -> usize {
        self.per_identity.get(identity).copied().unwrap_or(0)
    }

    /// Whether `conn`'s grant lets it read and announce `namespace`.
    pub fn grants(&self, conn: ConnId, namespace: &str) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|g| g.repos.contains(namespace))
    }

    /// An executor announced a verified result. Refused for a repository
    /// it was not granted, and once its identity has the most results
    /// indexed that one identity may have.
    pub fn announce(&mut self, held: Held, claim: Claim) -> Result<(), NotIndexed> {
        if !self.grants(claim.conn, &held.namespace) {
            return Err(NotIndexed::NotGranted);
        }
        let identity = self.conns[&claim.conn].name.clone();
        let same = |c: &Claim| c.conn == claim.conn && c.producer == claim.producer;
        // One claim per connection and producer: the newest replaces the
        // older, which costs nothing more.
        let replaces = self
            .held
            .get(&held)
            .is_some_and(|claims| claims.iter().any(same));
        let count = self.per_identity.entry(identity.clone()).or_insert(0);
        if !replaces {
            if *count >= self.cap {
                return Err(NotIndexed::Full {
                    identity,
                    cap: self.cap,
                });
            }
            *count += 1;
        }
        let claims = self.held.entry(held).or_default();
        claims.retain(|c| !same(c));
        claims.push(claim);
        Ok(())
    }

    /// What `asker` is told about `wanted`.
    pub fn lookup(
        &self,
        asker: ConnId,
        wanted: &Held,
        trust: TrustLookup<'_>,
        policy: &RepoPolicy,
        now: u64,
    ) -> Decision {
        if !self.grants(asker, &wanted.namespace) {
            return Decision::NotFound;
        }
        // A person the repository's `readers` leaves out reads nothing.
        if !policy.may_read(&self.conns[&asker].name) {
            return Decision::NotFound;
        }
        self.decide(wanted, Some(asker), trust, policy, now)
    }

    /// The decision on `wanted` for anyone but `asker` (whose own claims
    /// are not offered back to it).
    pub fn decide(
        &self,
        wanted: &Held,
        asker: Option<ConnId>,
        trust: TrustLookup<'_>,
        policy: &RepoPolicy,
        now: u64,
    ) -> Decision {
        let Some(claims) = self.held.get(wanted) else {
            return Decision::NotFound;
        };
        // The counting claims, and each producer's newest one.
        let mut newest: BTreeMap<String, (&Claim, String)> = BTreeMap::new();
        for claim in claims.iter().filter(|c| self.conns.contains_key(&c.conn)) {
            let Ok((name, why)) = counts(claim, &wanted.namespace, trust, policy, now) else {
                continue;
            };
            match newest.get(&name) {
                Some((c, _)) if c.created_at >= claim.created_at => {}
                _ => {
                    newest.insert(name, (claim, why));
                }
            }
        }
        let verdicts: BTreeSet<&Sha256Digest> = newest.values().map(|(c, _)| &c.outputs).collect();
        let winner = match verdicts.len() {
            0 => return Decision::NotFound,
            // They agree: the one on the newest connection, the likeliest
            // to be alive.
            1 => newest.iter().max_by_key(|(_, (c, _))| c.conn),
            _ => match policy.prefer.iter().find_map(|p| newest.get_key_value(p)) {
                Some(preferred) => Some(preferred),
                None => {
                    return Decision::Conflict {
                        producers: newest.keys().cloned().collect(),
                    };
                }
            },
        };
        let Some((name, (chosen, why))) = winner else {
            return Decision::NotFound;
        };
        if !chosen.passed {
            return Decision::NotFound;
        }
        // Any connected holder of that very result (the newest connection
        // first: it is the likeliest to be alive), but not the asker.
        let holder = claims
            .iter()
            .rev()
            .filter(|c| Some(c.conn) != asker && self.conns.contains_key(&c.conn))
            .filter(|c| c.producer == chosen.producer && c.outputs == chosen.outputs)
            .max_by_key(|c| c.conn);
        match holder {
            Some(h) => Decision::Offer {
                conn: h.conn,
                producer: h.producer,
                producer_name: name.clone(),
                outputs: h.outputs,
                run_ms: h.run_ms,
                counts: if verdicts.len() > 1 {
                    format!("{why}; the policy prefers it over the other producers")
                } else {
                    why.clone()
                },
            },
            None => Decision::NotFound,
        }
    }

    /// How many executors are connected.
    pub fn connected(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reprise_protocol::digest::RunKey;

    fn grant(name: &str, repos: &[&str], trusted: bool) -> Grant {
        Grant {
            name: name.into(),
            repos: repos.iter().map(|r| r.to_string()).collect(),
            trusted,
            access: Default::default(),
        }
    }

    fn fp(name: &str) -> Sha256Digest {
        Sha256Digest::of(name.as_bytes())
    }

    fn held(key: &str, ns: &str) -> Held {
        Held {
            key: RunKey::from_bytes(*Sha256Digest::of(key.as_bytes()).as_bytes()),
            namespace: ns.into(),
        }
    }

    /// The team: producers by certificate fingerprint.
    fn trust(fingerprint: &Sha256Digest) -> (Admission, Option<u64>) {
        let table = [
            ("ci", grant("ci", &["a", "b"], true), Some(1000)),
            ("ci2", grant("ci2", &["a"], true), None),
            ("laptop", grant("laptop", &["a"], false), None),
            ("old", grant("old", &["a"], true), Some(10)),
        ];
        for (name, g, not_after) in table {
            if *fingerprint == fp(name) {
                return (Admission::Admitted(g), not_after);
            }
        }
        if *fingerprint == fp("gone") {
            return (Admission::Revoked("gone".into()), None);
        }
        (Admission::Unknown, None)
    }

    fn claim(conn: ConnId, producer: &str, outputs: &str) -> Claim {
        Claim {
            conn,
            producer: fp(producer),
            outputs: fp(outputs),
            passed: outputs != "failed",
            snapshot: Snapshot::Fresh,
            network: false,
            driver: "qemu".into(),
            created_at: 1,
            run_ms: 1000,
        }
    }

    fn team() -> Matcher {
        let mut m = Matcher::new(1000);
        m.connect(1, grant("ci", &["a", "b"], true));
        m.connect(2, grant("laptop", &["a"], false));
        m.connect(3, grant("asker", &["a"], false));
        m.connect(4, grant("outsider", &["z"], false));
        m
    }

    const NOW: u64 = 100;

    fn offer(conn: ConnId, producer: &str) -> impl Fn(&Decision) -> bool + '_ {
        move |d| matches!(d, Decision::Offer { conn: c, producer_name, .. } if *c == conn && producer_name == producer)
    }

    #[test]
    fn a_person_left_out_by_readers_is_told_nothing_and_counts_by_forge_access() {
        use reprise_protocol::policy::{ForgeAccess, OrchestratorSettings};
        let settings = OrchestratorSettings::parse(
            "[policy.repos.\"ns\"]\nreaders = [\"bob\"]\n[policy.repos.\"open\"]\n",
        )
        .unwrap()
        .policy;
        let mut carol = grant("github:carol", &["ns", "open"], false);
        carol.access.insert("ns".into(), ForgeAccess::Admin);
        carol.access.insert("open".into(), ForgeAccess::Write);
        assert_eq!(counts_in(&carol, &settings), Vec::<String>::new());
        carol.access.insert("open".into(), ForgeAccess::Maintain);
        assert_eq!(counts_in(&carol, &settings), ["open"]);
        let mut m = Matcher::new(10);
        m.connect(1, carol);
        let trust = |_: &Sha256Digest| (Admission::Unknown, None);
        let wanted = Held {
            key: RunKey::from_bytes([1; 32]),
            namespace: "ns".into(),
        };
        assert_eq!(
            m.lookup(1, &wanted, &trust, &settings.for_repo("ns"), 0),
            Decision::NotFound
        );
    }

    #[test]
    fn lookups_follow_grants_and_the_producers_trust() {
        let mut m = team();
        let policy = RepoPolicy::default();
        assert!(m.announce(held("k1", "a"), claim(1, "ci", "out")).is_ok());
        assert!(m.announce(held("k2", "b"), claim(1, "ci", "out")).is_ok());
        // The laptop is not trusted: its own result is indexed, never offered.
        assert!(
            m.announce(held("k3", "a"), claim(2, "laptop", "out"))
                .is_ok()
        );
        // ...but a trusted producer's result it relays is.
        assert!(m.announce(held("k4", "a"), claim(2, "ci", "out")).is_ok());
        // Revoked, unknown and expired producers, relayed by the laptop.
        assert!(m.announce(held("k5", "a"), claim(2, "gone", "out")).is_ok());
        assert!(
            m.announce(held("k6", "a"), claim(2, "stranger", "out"))
                .is_ok()
        );
        assert!(m.announce(held("k7", "a"), claim(2, "old", "out")).is_ok());
        assert!(
            m.announce(held("k9", "z"), claim(2, "ci", "out")) == Err(NotIndexed::NotGranted),
            "z is not granted to 2"
        );
        type Case<'a> = (&'a str, ConnId, Held, Box<dyn Fn(&Decision) -> bool>);
        let not_found = |d: &Decision| *d == Decision::NotFound;
        let table: Vec<Case> = vec![
            (
                "trusted producer, granted asker",
                3,
                held("k1", "a"),
                Box::new(offer(1, "ci")),
            ),
            (
                "asker not granted the repository",
                4,
                held("k1", "a"),
                Box::new(not_found),
            ),
            (
                "asker not granted, nothing held",
                4,
                held("nope", "a"),
                Box::new(not_found),
            ),
            (
                "asker not granted b",
                3,
                held("k2", "b"),
                Box::new(not_found),
            ),
            (
                "untrusted producer",
                3,
                held("k3", "a"),
                Box::new(not_found),
            ),
            (
                "a trusted producer's result relayed by an untrusted holder",
                3,
                held("k4", "a"),
                Box::new(offer(2, "ci")),
            ),
            (
                "revoked producer, relayed",
                3,
                held("k5", "a"),
                Box::new(not_found),
            ),
            (
                "unknown producer, relayed",
                3,
                held("k6", "a"),
                Box::new(not_found),
            ),
            (
                "expired producer, relayed",
                3,
                held("k7", "a"),
                Box::new(not_found),
            ),
            (
                "same key, other namespace",
                3,
                held("k1", "b"),
                Box::new(not_found),
            ),
            ("nobody holds it", 3, held("k0", "a"), Box::new(not_found)),
            (
                "a holder is not offered to itself",
                1,
                held("k1", "a"),
                Box::new(not_found),
            ),
            ("unknown asker", 99, held("k1", "a"), Box::new(not_found)),
        ];
        for (name, asker, wanted, want) in table {
            let got = m.lookup(asker, &wanted, &trust, &policy, NOW);
            assert!(want(&got), "{name}: {got:?}");
        }
    }

    #[test]
    fn the_policy_decides_on_snapshots_and_network() {
        let mut m = team();
        let mut stale = claim(1, "ci", "out");
        stale.snapshot = Snapshot::Generation(fp("gen"));
        let mut networked = claim(1, "ci", "out");
        networked.network = true;
        m.announce(held("stale", "a"), stale.clone())
            .expect("indexed");
        m.announce(held("net", "a"), networked.clone())
            .expect("indexed");
        let default = RepoPolicy::default();
        let fresh = RepoPolicy {
            require_fresh: true,
            ..RepoPolicy::default()
        };
        let network = RepoPolicy {
            allow_network: true,
            ..RepoPolicy::default()
        };
        let table = [
            ("stale counts by default", "stale", &default, true),
            (
                "stale refused when fresh is required",
                "stale",
                &fresh,
                false,
            ),
            ("networked refused by default", "net", &default, false),
            ("networked allowed", "net", &network, true),
        ];
        for (name, key, policy, offered) in table {
            let got = m.lookup(3, &held(key, "a"), &trust, policy, NOW);
            assert_eq!(
                matches!(got, Decision::Offer { .. }),
                offered,
                "{name}: {got:?}"
            );
        }
        let mut future = stale.clone();
        future.created_at = NOW + 3600;
        let why = counts(&future, "a", &trust, &default, NOW).unwrap_err();
        assert!(
            why.contains("60 min ahead of this machine's clock"),
            "{why}"
        );
        let why = counts(&stale, "a", &trust, &fresh, NOW).unwrap_err();
        assert!(why.contains("fresh snapshot"), "{why}");
        let why = counts(&networked, "a", &trust, &default, NOW).unwrap_err();
        assert!(why.contains("network"), "{why}");
        let (who, why) = counts(&stale, "a", &trust, &default, NOW).unwrap();
        assert_eq!(who, "ci");
        assert!(why.contains("trusted for a"), "{why}");
    }

    #[test]
    fn the_policy_decides_which_drivers_results_count() {
        let mut m = team();
        let mut podman = claim(1, "ci", "out");
        podman.driver = "podman".into();
        m.announce(held("vm", "a"), claim(1, "ci", "out"))
            .expect("indexed");
        m.announce(held("podman", "a"), podman.clone())
            .expect("indexed");
        let default = RepoPolicy::default();
        let vm_only = RepoPolicy {
            count_drivers: CountDrivers::Only(["qemu".to_string()].into()),
            ..RepoPolicy::default()
        };
        let table = [
            ("a VM run counts by default", "vm", &default, true),
            ("a podman run counts by default", "podman", &default, true),
            ("a VM run counts for qemu only", "vm", &vm_only, true),
            (
                "a podman run does not count for qemu only",
                "podman",
                &vm_only,
                false,
            ),
        ];
        for (name, key, policy, offered) in table {
            let got = m.lookup(3, &held(key, "a"), &trust, policy, NOW);
            assert_eq!(
                matches!(got, Decision::Offer { .. }),
                offered,
                "{name}: {got:?}"
            );
        }
        let why = counts(&podman, "a", &trust, &vm_only, NOW).unwrap_err();
        assert!(
            why.contains("under the podman driver") && why.contains("count_drivers = [\"qemu\"]"),
            "says which driver and which setting: {why}"
        );
        let (_, why) = counts(&claim(1, "ci", "out"), "a", &trust, &vm_only, NOW).unwrap();
        assert!(why.contains("under the qemu driver"), "{why}");
        let (_, why) = counts(&podman, "a", &trust, &default, NOW).unwrap();
        assert!(!why.contains("driver"), "{why}");
    }

    #[test]
    fn trusted_producers_that_disagree_are_a_conflict_unless_the_policy_prefers_one() {
        let mut m = team();
        m.connect(5, grant("ci2", &["a"], true));
        let k = held("k", "a");
        m.announce(k.clone(), claim(1, "ci", "out-1"))
            .expect("indexed");
        // The same result from a second producer agrees: no conflict.
        m.announce(k.clone(), claim(5, "ci2", "out-1"))
            .expect("indexed");
        let policy = RepoPolicy::default();
        assert!(matches!(
            m.lookup(3, &k, &trust, &policy, NOW),
            Decision::Offer { .. }
        ));
        // Other artifacts from ci2: neither counts.
        m.announce(k.clone(), claim(5, "ci2", "out-2"))
            .expect("indexed");
        assert_eq!(
            m.lookup(3, &k, &trust, &policy, NOW),
            Decision::Conflict {
                producers: vec!["ci".into(), "ci2".into()]
            }
        );
        // An untrusted producer's disagreement does not count.
        m.announce(k.clone(), claim(2, "laptop", "out-3"))
            .expect("indexed");
        let prefer = RepoPolicy {
            prefer: vec!["ci2".into()],
            ..RepoPolicy::default()
        };
        let got = m.lookup(3, &k, &trust, &prefer, NOW);
        assert!(offer(5, "ci2")(&got), "{got:?}");
        assert!(matches!(&got, Decision::Offer { counts, .. } if counts.contains("prefers")));
        // A trusted producer whose run failed disagrees on the outcome.
        let k2 = held("k2", "a");
        m.announce(k2.clone(), claim(1, "ci", "out"))
            .expect("indexed");
        m.announce(k2.clone(), claim(5, "ci2", "failed"))
            .expect("indexed");
        assert!(matches!(
            m.lookup(3, &k2, &trust, &policy, NOW),
            Decision::Conflict { .. }
        ));
        // Preferring the failed one: nothing to offer.
        assert_eq!(m.lookup(3, &k2, &trust, &prefer, NOW), Decision::NotFound);
        // The conflict ends when ci2 goes away.
        m.disconnect(5);
        assert!(offer(1, "ci")(&m.lookup(3, &k2, &trust, &policy, NOW)));
    }

    #[test]
    fn a_disconnected_holder_is_forgotten() {
        let mut m = team();
        m.connect(5, grant("ci2", &["a"], true));
        let k = held("k", "a");
        m.announce(k.clone(), claim(1, "ci", "out"))
            .expect("indexed");
        m.announce(k.clone(), claim(5, "ci", "out"))
            .expect("indexed");
        let policy = RepoPolicy::default();
        assert!(
            offer(5, "ci")(&m.lookup(3, &k, &trust, &policy, NOW)),
            "newest first"
        );
        m.disconnect(5);
        assert!(offer(1, "ci")(&m.lookup(3, &k, &trust, &policy, NOW)));
        m.disconnect(1);
        assert_eq!(m.lookup(3, &k, &trust, &policy, NOW), Decision::NotFound);
        assert_eq!(m.connected(), 3);
        assert!(m.announce(k, claim(1, "ci", "out")).is_err(), "gone");
    }

    #[test]
    fn an_identity_indexes_at_most_its_cap_over_all_its_connections() {
        let mut m = Matcher::new(3);
        m.connect(1, grant("ci", &["a"], true));
        m.connect(2, grant("ci", &["a"], true));
        m.connect(3, grant("ci2", &["a"], true));
        m.announce(held("k1", "a"), claim(1, "ci", "out"))
            .expect("1");
        m.announce(held("k2", "a"), claim(1, "ci", "out"))
            .expect("2");
        // A newer claim on the same result replaces the older: no more room.
        m.announce(held("k2", "a"), claim(1, "ci", "out-2"))
            .expect("again");
        m.announce(held("k3", "a"), claim(2, "ci", "out"))
            .expect("3");
        assert_eq!(m.indexed_by("ci"), 3);
        assert_eq!(
            m.announce(held("k4", "a"), claim(2, "ci", "out")),
            Err(NotIndexed::Full {
                identity: "ci".into(),
                cap: 3
            }),
            "the cap counts every connection of the identity"
        );
        // Another identity has its own room.
        m.announce(held("k4", "a"), claim(3, "ci2", "out"))
            .expect("other");
        // A connection that goes frees what it held.
        m.disconnect(1);
        assert_eq!(m.indexed_by("ci"), 1);
        m.announce(held("k5", "a"), claim(2, "ci", "out"))
            .expect("room again");
        m.disconnect(2);
        assert_eq!(m.indexed_by("ci"), 0);
    }
}
