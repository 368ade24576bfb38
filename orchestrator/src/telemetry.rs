//! What the service counts while it runs, for `/metrics` and the
//! dashboard: the executors connected now, lookups and their answers,
//! replays and relayed bytes, conflicts found, and refusals by reason.
//! Counters start at zero when `serve` starts; what must outlive a restart
//! (replays, conflicts) is in the audit log.
//!
//! Metric names (OpenMetrics text, as Prometheus scrapes it):
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `reprise_executors_connected` | gauge | executors past `Hello` now |
//! | `reprise_lookups_total` | counter | `Lookup` requests |
//! | `reprise_lookup_hits_total` | counter | lookups answered `Offer` |
//! | `reprise_lookup_misses_total` | counter | lookups answered `NotFound` |
//! | `reprise_lookup_conflicts_total` | counter | lookups answered `Conflict` |
//! | `reprise_replays_total` | counter | results relayed whole to an asker |
//! | `reprise_relayed_bytes_total` | counter | bytes of results relayed to askers |
//! | `reprise_conflicts_total` | counter | disagreements between trusted producers found (each written to the audit log) |
//! | `reprise_refusals_total{reason}` | counter | refusals, by [`Refusal`] |

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::matcher::ConnId;

/// Why the service refused a connection, a request or a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// A certificate of the team CA that this orchestrator did not issue.
    UnknownCertificate,
    /// A revoked identity, at connection or cut off while connected.
    Revoked,
    /// An identity over its connections (`--max-connections`).
    ConnectionLimit,
    /// No `Hello` in time, or a version not spoken.
    Hello,
    /// A connection over its open requests (`--max-streams`).
    StreamLimit,
    /// A request that did not arrive in time (`--request-timeout`).
    RequestTimeout,
    /// A frame that does not decode, or a message that is not a request.
    BadRequest,
    /// An announced result not indexed: a seal that does not verify, or a
    /// repository the certificate does not grant.
    AnnounceRefused,
    /// An identity over its indexed results (`--max-announced`).
    AnnounceLimit,
    /// A result over the transfer limit (`--max-transfer`).
    TransferLimit,
    /// A CI login refused (token, proof, revoked identity, not configured).
    Login,
    /// A connection without a certificate while [`crate::server::MAX_LOGINS`]
    /// logins were being answered.
    LoginLimit,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Refusal::UnknownCertificate,
        Refusal::Revoked,
        Refusal::ConnectionLimit,
        Refusal::Hello,
        Refusal::StreamLimit,
        Refusal::RequestTimeout,
        Refusal::BadRequest,
        Refusal::AnnounceRefused,
        Refusal::AnnounceLimit,
        Refusal::TransferLimit,
        Refusal::Login,
        Refusal::LoginLimit,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownCertificate => "unknown-certificate",
            Refusal::Revoked => "revoked",
            Refusal::ConnectionLimit => "connection-limit",
            Refusal::Hello => "hello",
            Refusal::StreamLimit => "stream-limit",
            Refusal::RequestTimeout => "request-timeout",
            Refusal::BadRequest => "bad-request",
            Refusal::AnnounceRefused => "announce-refused",
            Refusal::AnnounceLimit => "announce-limit",
            Refusal::TransferLimit => "transfer-limit",
            Refusal::Login => "login",
            Refusal::LoginLimit => "login-limit",
        }
    }
}

/// How a lookup was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Hit,
    Miss,
    Conflict,
}

/// An executor connected now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub identity: String,
    pub remote: SocketAddr,
    /// When it said `Hello` (seconds since the epoch).
    pub since: u64,
    /// Results of its announcements that were indexed.
    pub indexed: u64,
}

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub executors: Vec<Connected>,
    pub lookups: u64,
    pub hits: u64,
    pub misses: u64,
    pub lookup_conflicts: u64,
    pub replays: u64,
    pub relayed_bytes: u64,
    pub conflicts: u64,
    /// Every reason, with its count (zero included).
    pub refusals: Vec<(Refusal, u64)>,
    pub started_at: u64,
}

type Reason = [(&'static str, &'static str); 1];

/// The service's counters and the executors connected now.
pub struct Telemetry {
    registry: Registry,
    executors_connected: Gauge,
    lookups: Counter,
    hits: Counter,
    misses: Counter,
    lookup_conflicts: Counter,
    replays: Counter,
    relayed_bytes: Counter,
    conflicts: Counter,
    refusals: Family<Reason, Counter>,
    executors: Mutex<BTreeMap<ConnId, Connected>>,
    started_at: u64,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry::new(crate::state::now_secs())
    }
}

fn reason(r: Refusal) -> Reason {
    [("reason", r.label())]
}

impl Telemetry {
    /// Counters at zero, the service started at `now`.
    pub fn new(now: u64) -> Telemetry {
        let mut registry = Registry::with_prefix("reprise");
        let executors_connected = Gauge::default();
        registry.register(
            "executors_connected",
            "Executors connected now (past Hello)",
            executors_connected.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let lookups = counter(&mut registry, "lookups", "Lookup requests");
        let hits = counter(
            &mut registry,
            "lookup_hits",
            "Lookups answered with an offer",
        );
        let misses = counter(&mut registry, "lookup_misses", "Lookups answered not-found");
        let lookup_conflicts = counter(
            &mut registry,
            "lookup_conflicts",
            "Lookups answered with a conflict between trusted producers",
        );
        let replays = counter(
            &mut registry,
            "replays",
            "Results relayed whole from their holder to an asker",
        );
        let relayed_bytes = Counter::default();
        registry.register_with_unit(
            "relayed",
            "Bytes of results relayed to askers",
            Unit::Bytes,
            relayed_bytes.clone(),
        );
        let conflicts = counter(
            &mut registry,
            "conflicts",
            "Disagreements between trusted producers found (each written to the audit log)",
        );
        let refusals = Family::<Reason, Counter>::default();
        registry.register(
            "refusals",
            "Connections, requests and announced results refused, by reason",
            refusals.clone(),
        );
        for r in Refusal::ALL {
            // Every reason is listed from the start, at zero.
            let _ = refusals.get_or_create(&reason(r));
        }
        Telemetry {
            registry,
            executors_connected,
            lookups,
            hits,
            misses,
            lookup_conflicts,
            replays,
            relayed_bytes,
            conflicts,
            refusals,
            executors: Mutex::new(BTreeMap::new()),
            started_at: now,
        }
    }

    /// An executor said `Hello`.
    pub fn connected(&self, id: ConnId, identity: &str, remote: SocketAddr, now: u64) {
        let mut executors = self.executors.lock().expect("executors");
        executors.insert(
            id,
            Connected {
                identity: identity.to_string(),
                remote,
                since: now,
                indexed: 0,
            },
        );
        self.executors_connected.set(executors.len() as i64);
    }

    /// An executor went away (or was cut off); nothing if it never said
    /// `Hello` or was counted gone already.
    pub fn disconnected(&self, id: ConnId) {
        let mut executors = self.executors.lock().expect("executors");
        executors.remove(&id);
        self.executors_connected.set(executors.len() as i64);
    }

    /// `indexed` more of an executor's announced results were indexed.
    pub fn indexed(&self, id: ConnId, indexed: u64) {
        if let Some(e) = self.executors.lock().expect("executors").get_mut(&id) {
            e.indexed += indexed;
        }
    }

    pub fn lookup(&self, answer: Answer) {
        self.lookups.inc();
        match answer {
            Answer::Hit => self.hits.inc(),
            Answer::Miss => self.misses.inc(),
            Answer::Conflict => self.lookup_conflicts.inc(),
        };
    }

    pub fn refused(&self, why: Refusal) {
        self.refused_n(why, 1);
    }

    pub fn refused_n(&self, why: Refusal, n: u64) {
        if n > 0 {
            self.refusals.get_or_create(&reason(why)).inc_by(n);
        }
    }

    /// Bytes written to an asker.
    pub fn relayed(&self, bytes: u64) {
        self.relayed_bytes.inc_by(bytes);
    }

    /// A result relayed whole.
    pub fn replayed(&self) {
        self.replays.inc();
    }

    /// A conflict found (and written to the audit log).
    pub fn conflict(&self) {
        self.conflicts.inc();
    }

    /// The OpenMetrics text exposition of every counter.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// Every counter now, and the executors connected.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            executors: self
                .executors
                .lock()
                .expect("executors")
                .values()
                .cloned()
                .collect(),
            lookups: self.lookups.get(),
            hits: self.hits.get(),
            misses: self.misses.get(),
            lookup_conflicts: self.lookup_conflicts.get(),
            replays: self.replays.get(),
            relayed_bytes: self.relayed_bytes.get(),
            conflicts: self.conflicts.get(),
            refusals: Refusal::ALL
                .iter()
                .map(|r| {
                    let n = self.refusals.get(&reason(*r)).map_or(0, |c| c.get());
                    (*r, n)
                })
                .collect(),
            started_at: self.started_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exposed_under_their_documented_names() {
        let t = Telemetry::new(5);
        let remote: SocketAddr = "127.0.0.1:9".parse().unwrap();
        t.connected(1, "alice", remote, 6);
        t.connected(2, "ci", remote, 7);
        t.indexed(1, 3);
        t.disconnected(2);
        t.disconnected(2);
        t.lookup(Answer::Hit);
        t.lookup(Answer::Miss);
        t.lookup(Answer::Miss);
        t.relayed(1000);
        t.replayed();
        t.refused(Refusal::Revoked);
        t.refused_n(Refusal::AnnounceRefused, 4);
        t.refused_n(Refusal::AnnounceLimit, 0);
        let text = t.encode();
        for line in [
            "reprise_executors_connected 1\n",
            "reprise_lookups_total 3\n",
            "reprise_lookup_hits_total 1\n",
            "reprise_lookup_misses_total 2\n",
            "reprise_lookup_conflicts_total 0\n",
            "reprise_replays_total 1\n",
            "reprise_relayed_bytes_total 1000\n",
            "reprise_conflicts_total 0\n",
            "reprise_refusals_total{reason=\"revoked\"} 1\n",
            "reprise_refusals_total{reason=\"announce-refused\"} 4\n",
            "reprise_refusals_total{reason=\"transfer-limit\"} 0\n",
            "# EOF\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        let s = t.snapshot();
        assert_eq!(
            s.executors,
            vec![Connected {
                identity: "alice".into(),
                remote,
                since: 6,
                indexed: 3
            }]
        );
        assert_eq!((s.lookups, s.hits, s.misses), (3, 1, 2));
        assert_eq!(s.refusals.len(), Refusal::ALL.len());
        assert!(s.refusals.contains(&(Refusal::AnnounceRefused, 4)));
    }
}
