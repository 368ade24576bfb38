//! Matching a lookup to a producer, without IO: an index from a result to
//! the connected executors that announced it, and the trust policy.
//!
//! Policy: a producer is offered only when the asker may read the
//! repository, and the producer was granted the repository *and* is trusted
//! (issued with `--trusted`). Results from untrusted producers are indexed
//! but never offered. Every refusal is the same `None` as "nobody holds it",
//! so an asker learns nothing about repositories it may not read.

use std::collections::{BTreeMap, BTreeSet};

use reprise_protocol::wire::Held;

use crate::state::Grant;

/// A connection's id, unique for the service's lifetime.
pub type ConnId = usize;

/// The index of connected executors and what they hold.
#[derive(Debug, Default)]
pub struct Matcher {
    conns: BTreeMap<ConnId, Grant>,
    held: BTreeMap<Held, BTreeSet<ConnId>>,
}

/// The producer chosen for a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub conn: ConnId,
    pub name: String,
}

impl Matcher {
    pub fn new() -> Matcher {
        Matcher::default()
    }

    /// An executor connected with `grant`.
    pub fn connect(&mut self, conn: ConnId, grant: Grant) {
        self.conns.insert(conn, grant);
    }

    /// An executor went away: it serves nothing any more.
    pub fn disconnect(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.held.retain(|_, holders| {
            holders.remove(&conn);
            !holders.is_empty()
        });
    }

    /// An executor announced results; those for repositories it was not
    /// granted are dropped. Returns how many were indexed.
    pub fn announce(&mut self, conn: ConnId, results: &[Held]) -> usize {
        let Some(grant) = self.conns.get(&conn) else {
            return 0;
        };
        let mut accepted = 0;
        for h in results {
            if grant.repos.contains(&h.namespace) {
                self.held.entry(h.clone()).or_default().insert(conn);
                accepted += 1;
            }
        }
        accepted
    }

    /// A producer `asker` may fetch `wanted` from, if any.
    pub fn lookup(&self, asker: ConnId, wanted: &Held) -> Option<Match> {
        let may_read = self
            .conns
            .get(&asker)
            .is_some_and(|g| g.repos.contains(&wanted.namespace));
        if !may_read {
            return None;
        }
        // The newest connection first: it is the likeliest to be alive.
        self.held
            .get(wanted)?
            .iter()
            .rev()
            .filter(|c| **c != asker)
            .filter_map(|c| self.conns.get(c).map(|g| (c, g)))
            .find(|(_, g)| g.trusted && g.repos.contains(&wanted.namespace))
            .map(|(c, g)| Match {
                conn: *c,
                name: g.name.clone(),
            })
    }

    /// How many executors are connected.
    pub fn connected(&self) -> usize {
        self.conns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(name: &str, repos: &[&str], trusted: bool) -> Grant {
        Grant {
            name: name.into(),
            repos: repos.iter().map(|r| r.to_string()).collect(),
            trusted,
        }
    }

    fn held(key: &str, ns: &str) -> Held {
        Held {
            key: key.into(),
            namespace: ns.into(),
        }
    }

    #[test]
    fn lookups_follow_grants_and_trust() {
        let mut m = Matcher::new();
        m.connect(1, grant("ci", &["a", "b"], true));
        m.connect(2, grant("laptop", &["a"], false));
        m.connect(3, grant("asker", &["a"], false));
        m.connect(4, grant("outsider", &["z"], false));
        assert_eq!(m.announce(1, &[held("k1", "a"), held("k2", "b")]), 2);
        assert_eq!(m.announce(2, &[held("k3", "a"), held("k9", "z")]), 1);
        let ci = Some(Match {
            conn: 1,
            name: "ci".into(),
        });
        let table = [
            (
                "trusted producer, granted asker",
                3,
                held("k1", "a"),
                ci.clone(),
            ),
            ("asker not granted the repository", 4, held("k1", "a"), None),
            (
                "asker not granted, nothing held",
                4,
                held("nope", "a"),
                None,
            ),
            ("asker not granted b", 3, held("k2", "b"), None),
            (
                "untrusted producer is not offered",
                3,
                held("k3", "a"),
                None,
            ),
            (
                "announce for an ungranted repo dropped",
                4,
                held("k9", "z"),
                None,
            ),
            ("same key, other namespace", 3, held("k1", "b"), None),
            ("nobody holds it", 3, held("k0", "a"), None),
            (
                "a producer is not offered to itself",
                1,
                held("k1", "a"),
                None,
            ),
            ("unknown asker", 99, held("k1", "a"), None),
        ];
        for (name, asker, wanted, want) in table {
            assert_eq!(m.lookup(asker, &wanted), want, "{name}");
        }
    }

    #[test]
    fn a_disconnected_producer_is_forgotten() {
        let mut m = Matcher::new();
        m.connect(1, grant("ci", &["a"], true));
        m.connect(2, grant("ci2", &["a"], true));
        m.connect(3, grant("asker", &["a"], false));
        m.announce(1, &[held("k", "a")]);
        m.announce(2, &[held("k", "a")]);
        assert_eq!(
            m.lookup(3, &held("k", "a")).unwrap().conn,
            2,
            "newest first"
        );
        m.disconnect(2);
        assert_eq!(m.lookup(3, &held("k", "a")).unwrap().conn, 1);
        m.disconnect(1);
        assert_eq!(m.lookup(3, &held("k", "a")), None);
        assert_eq!(m.connected(), 1);
        assert_eq!(m.announce(1, &[held("k", "a")]), 0, "gone");
    }
}
