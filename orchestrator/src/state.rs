//! The orchestrator's durable state, in SQLite (WAL, `synchronous=FULL`, so
//! a write is on disk before the call returns): identities and their
//! grants, the certificates issued to them (with their expiry and whether
//! revoked), revocations, and the audit log of replays and conflicts.
//!
//! The serving process keeps identities, grants and certificates in memory
//! (every connection and every seal is checked against them) and reloads
//! them only when another connection committed something: `PRAGMA
//! data_version` moves then, and reading it costs no IO beyond the shared
//! memory of the WAL. `reprise-orchestrator issue` and `revoke` are other
//! processes writing the same database; both wait up to [`BUSY_TIMEOUT`]
//! for the other's write lock. The audit log is only read on demand
//! (`audit`, the dashboard), never folded into memory.
//!
//! The schema carries its version in `PRAGMA user_version`; [`MIGRATIONS`]
//! brings an older database up to [`SCHEMA_VERSION`] in one transaction,
//! and a database from a newer build is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::policy::ForgeAccess;
use reprise_protocol::wire::{STATE_VERSION, StateEvent};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use thiserror::Error;

/// The schema this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 4;

/// The conflicts recorded on one result: asked on every lookup, so it
/// must use the `conflicts_by_result` index.
const CONFLICTS_ON: &str =
    "SELECT producers FROM conflicts WHERE namespace = ?1 AND key = ?2 ORDER BY id";

/// How long after its expiry a certificate is forgotten (at the next
/// login); TLS refuses it from its expiry on.
pub const PRUNE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How long a writer waits for another process's write to finish.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The steps from an empty database: step `i` brings `user_version` `i` to
/// `i + 1`. A new schema is a new step at the end; a step is never edited.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema (what the JSON-lines log held, in tables).
    "CREATE TABLE identities (
         name       TEXT PRIMARY KEY NOT NULL,
         trusted    INTEGER NOT NULL,
         issued_at  INTEGER NOT NULL,
         revoked_at INTEGER
     ) STRICT;
     CREATE TABLE grants (
         name TEXT NOT NULL REFERENCES identities(name) ON DELETE CASCADE,
         repo TEXT NOT NULL,
         PRIMARY KEY (name, repo)
     ) STRICT;
     CREATE TABLE certificates (
         sha256    TEXT PRIMARY KEY NOT NULL,
         name      TEXT NOT NULL REFERENCES identities(name),
         issued_at INTEGER NOT NULL,
         not_after INTEGER,
         revoked   INTEGER NOT NULL DEFAULT 0
     ) STRICT;
     CREATE INDEX certificates_by_name ON certificates(name);
     CREATE TABLE revocations (
         id   INTEGER PRIMARY KEY,
         name TEXT NOT NULL,
         at   INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE replays (
         id        INTEGER PRIMARY KEY,
         at        INTEGER NOT NULL,
         namespace TEXT NOT NULL,
         key       TEXT NOT NULL,
         asker     TEXT NOT NULL,
         producer  TEXT NOT NULL,
         relayer   TEXT,
         run_ms    INTEGER,
         relay_ms  INTEGER,
         bytes     INTEGER
     ) STRICT;
     CREATE INDEX replays_by_at ON replays(at);
     CREATE INDEX replays_by_namespace ON replays(namespace, at);
     CREATE TABLE conflicts (
         id        INTEGER PRIMARY KEY,
         at        INTEGER NOT NULL,
         namespace TEXT NOT NULL,
         key       TEXT NOT NULL,
         producers TEXT NOT NULL
     ) STRICT;
     CREATE INDEX conflicts_by_at ON conflicts(at);",
    // 2: commit statuses posted to the forge, at most one per result.
    "CREATE TABLE statuses (
         namespace TEXT NOT NULL,
         key       TEXT NOT NULL,
         sha       TEXT NOT NULL,
         claimed_at INTEGER NOT NULL,
         posted_at INTEGER,
         PRIMARY KEY (namespace, key)
     ) STRICT;",
    // 3: people who log in through a forge: their access to each granted
    // repository as the forge said, the forge token kept for renewals
    // (never sent on), and the log of their logins.
    "CREATE TABLE access (
         name  TEXT NOT NULL REFERENCES identities(name) ON DELETE CASCADE,
         repo  TEXT NOT NULL,
         level TEXT NOT NULL,
         PRIMARY KEY (name, repo)
     ) STRICT;
     CREATE TABLE people (
         name      TEXT PRIMARY KEY NOT NULL REFERENCES identities(name) ON DELETE CASCADE,
         provider  TEXT NOT NULL,
         forge_id  INTEGER NOT NULL,
         token     TEXT NOT NULL,
         logged_in_at INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE logins (
         id       INTEGER PRIMARY KEY,
         at       INTEGER NOT NULL,
         name     TEXT NOT NULL,
         kind     TEXT NOT NULL,
         repos    TEXT NOT NULL
     ) STRICT;
     CREATE INDEX logins_by_at ON logins(at);",
    // 4: every lookup asks whether its result stands in a conflict, by
    // namespace and key; every login prunes certificates long expired.
    "CREATE INDEX conflicts_by_result ON conflicts(namespace, key);
     CREATE INDEX certificates_by_expiry ON certificates(not_after);",
];

/// What a write in [`State::transact`] did: refused (rolled back), or
/// written (committed), and whether it changed identities.
enum Outcome<T> {
    Refused(T),
    Written { value: T, identities: bool },
}

/// Why the state could not be read or written.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("state database {}", path.display())]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state database {} has schema version {found}, and this build reads up to {SCHEMA_VERSION}: a newer reprise-orchestrator wrote it; run that one",
        path.display()
    )]
    Newer { path: PathBuf, found: i64 },
    #[error("state database {} holds a value that does not read back: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("state log io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state log {} is damaged at line {line}; nothing was imported and the log is untouched: repair or remove that line, then start again",
        path.display()
    )]
    Damaged {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "state log {} line {line} has version {version}, and this build reads {STATE_VERSION}; nothing was imported",
        path.display()
    )]
    Version {
        path: PathBuf,
        line: usize,
        version: u32,
    },
}

/// What an identity may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    /// Repository namespaces it may read (and announce results for).
    pub repos: BTreeSet<String>,
    /// Whether its results count for CI on those repositories (a
    /// hand-issued `--trusted` identity, a CI job whose ref counts; never
    /// set for people, whose results count by their forge access).
    pub trusted: bool,
    /// A person's forge access to each granted repository, as the forge
    /// said when they last logged in or renewed (empty for others).
    pub access: BTreeMap<String, ForgeAccess>,
}

/// What the orchestrator keeps of a person who logged in through a forge.
#[derive(Clone, PartialEq, Eq)]
pub struct PersonRecord {
    /// `github`, `gitlab`.
    pub provider: String,
    /// The forge's numeric user id: a renewal must find the same person.
    pub forge_id: u64,
    /// The forge token; never logged, never sent on.
    pub token: String,
}

impl std::fmt::Debug for PersonRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersonRecord")
            .field("provider", &self.provider)
            .field("forge_id", &self.forge_id)
            .finish_non_exhaustive()
    }
}

/// A line of the login log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    pub at: u64,
    pub name: String,
    /// `login` or `renewal`.
    pub kind: String,
    /// What was granted (none: a renewal that found no access left).
    pub repos: Vec<String>,
}

/// Whether a person's certificate came from a login or a renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginKind {
    Login,
    Renewal,
}

/// Who a certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted(Grant),
    Revoked(String),
    Unknown,
}

/// A certificate this orchestrator issued.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cert {
    name: String,
    not_after: Option<u64>,
    revoked: bool,
}

/// What recording an issue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Done,
    /// The name exists and replacing was not asked for: nothing written.
    NameTaken(Grant),
}

/// An identity as `identities list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub grant: Grant,
    /// When it was last issued a certificate.
    pub issued_at: u64,
    /// When it was revoked (cleared by a later issue).
    pub revoked_at: Option<u64>,
    /// Every certificate issued to it, oldest first.
    pub certificates: Vec<Certificate>,
}

/// A certificate as `identities list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub sha256: Sha256Digest,
    pub issued_at: u64,
    pub not_after: Option<u64>,
    pub revoked: bool,
}

/// A replay from the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub at: u64,
    pub namespace: String,
    pub key: RunKey,
    pub asker: String,
    pub producer: String,
    pub relayer: Option<String>,
    pub run_ms: Option<u64>,
    pub relay_ms: Option<u64>,
    pub bytes: Option<u64>,
}

/// A conflict from the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub at: u64,
    pub namespace: String,
    pub key: RunKey,
    pub producers: Vec<String>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEntry {
    Replay(Replay),
    Conflict(Conflict),
    Login(LoginRecord),
}

impl AuditEntry {
    pub fn at(&self) -> u64 {
        match self {
            AuditEntry::Replay(r) => r.at,
            AuditEntry::Conflict(c) => c.at,
            AuditEntry::Login(l) => l.at,
        }
    }

    /// The repository of a replay or conflict; those a login granted,
    /// comma-separated ("-": none).
    pub fn namespace(&self) -> String {
        match self {
            AuditEntry::Replay(r) => r.namespace.clone(),
            AuditEntry::Conflict(c) => c.namespace.clone(),
            AuditEntry::Login(l) if l.repos.is_empty() => "-".to_string(),
            AuditEntry::Login(l) => l.repos.join(", "),
        }
    }
}

/// Which audit entries to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this repository namespace.
    pub namespace: Option<String>,
    /// Only entries at or after this time (seconds since the epoch).
    pub since: Option<u64>,
    /// Only the newest this many.
    pub newest: Option<usize>,
    /// Logins too (people's and CI jobs': one each job, so the
    /// dashboard's recent replays leave them out).
    pub logins: bool,
}

/// One repository's replays and conflicts, for the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoSummary {
    pub namespace: String,
    pub replays: u64,
    /// Replays whose producer's run time is known.
    pub timed: u64,
    /// Over the timed replays: the producers' run times less the relays'.
    pub saved_ms: u64,
    pub relayed_bytes: u64,
    pub conflicts: u64,
    pub last_at: Option<u64>,
}

/// The state, backed by its database.
#[derive(Debug)]
pub struct State {
    path: PathBuf,
    conn: Connection,
    /// `PRAGMA data_version` when the cache was last loaded.
    data_version: i64,
    /// Certificate sha256 → whose, until when, whether revoked.
    certs: BTreeMap<Sha256Digest, Cert>,
    grants: BTreeMap<String, Grant>,
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Reads a digest stored as hex.
fn digest_col<T: std::str::FromStr>(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: String = row.get(i)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl State {
    /// Opens the database at `path`, creating it (mode 0600) and its schema
    /// if absent, and bringing an older schema up to date.
    pub fn open(path: &Path) -> Result<State, StateError> {
        let sql = |source| StateError::Sql {
            path: path.to_path_buf(),
            source,
        };
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|source| StateError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), %mode, "the state database is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        migrate(&mut conn, path)?;
        let mut state = State {
            path: path.to_path_buf(),
            conn,
            data_version: 0,
            certs: BTreeMap::new(),
            grants: BTreeMap::new(),
        };
        state.data_version = state.read_data_version()?;
        state.reload()?;
        Ok(state)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self) -> impl FnOnce(rusqlite::Error) -> StateError + '_ {
        move |source| StateError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn read_data_version(&self) -> Result<i64, StateError> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(self.sql())
    }

    /// Reloads identities, grants and certificates if another connection
    /// (another process: `issue`, `revoke`) committed since they were read.
    pub fn refresh(&mut self) -> Result<(), StateError> {
        let now = self.read_data_version()?;
        if now != self.data_version {
            self.data_version = now;
            self.reload()?;
        }
        Ok(())
    }

    fn reload(&mut self) -> Result<(), StateError> {
        let path = self.path.clone();
        let sql = |source| StateError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let (certs, grants) = read_cache(&tx).map_err(sql)?;
        tx.commit().map_err(sql)?;
        self.certs = certs;
        self.grants = grants;
        Ok(())
    }

    /// Runs `write` in one immediate transaction (so a check and the
    /// write it allows cannot be split by another writer), committing it
    /// when `write` says so; reloads identities when an `Issued` or
    /// `Revoked` was written (this connection's own commits do not move
    /// `data_version`).
    fn transact<T>(
        &mut self,
        write: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<Outcome<T>>,
    ) -> Result<T, StateError> {
        let path = self.path.clone();
        let sql = |source| StateError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        match write(&tx).map_err(sql)? {
            Outcome::Refused(value) => Ok(value),
            Outcome::Written { value, identities } => {
                tx.commit().map_err(sql)?;
                if identities {
                    self.reload()?;
                }
                Ok(value)
            }
        }
    }

    /// Records an event in one transaction, on disk when this returns.
    /// An `Issued` for an existing name replaces its grants.
    pub fn append(&mut self, event: StateEvent) -> Result<(), StateError> {
        let identities = matches!(
            event,
            StateEvent::Issued { .. } | StateEvent::Revoked { .. }
        );
        self.transact(|tx| {
            apply(tx, &event)?;
            Ok(Outcome::Written {
                value: (),
                identities,
            })
        })
    }

    /// Records an `Issued` event unless its name exists and `replace` is
    /// false; the check and the write are one transaction, so two issues
    /// of one name cannot both take it.
    pub fn record_issue(
        &mut self,
        event: StateEvent,
        replace: bool,
    ) -> Result<Recorded, StateError> {
        let StateEvent::Issued { name, .. } = &event else {
            return self.append(event).map(|()| Recorded::Done);
        };
        self.transact(|tx| {
            if !replace && let Some(existing) = grant_in(tx, name)? {
                return Ok(Outcome::Refused(Recorded::NameTaken(existing)));
            }
            apply(tx, &event)?;
            Ok(Outcome::Written {
                value: Recorded::Done,
                identities: true,
            })
        })
    }

    /// Records a CI job's login (an `Issued` event for a `ci:` identity,
    /// its grants replaced) unless an administrator revoked that identity:
    /// a revoked job identity stays refused until `revoke --lift` lifts
    /// it (`Some(when it was revoked)`). The check and the write are one
    /// transaction.
    pub fn record_login(&mut self, event: StateEvent) -> Result<Option<u64>, StateError> {
        let StateEvent::Issued {
            name, at, repos, ..
        } = &event
        else {
            unreachable!("a login records an issue");
        };
        self.transact(|tx| {
            if let Some(revoked) = admit_login(tx, name, *at)? {
                return Ok(Outcome::Refused(Some(revoked)));
            }
            apply(tx, &event)?;
            log_login(tx, *at, name, "ci-login", repos)?;
            Ok(Outcome::Written {
                value: None,
                identities: true,
            })
        })
    }

    /// Records a person's login or renewal: the `Issued` event (its grants
    /// and forge access replacing the earlier ones), the forge token and
    /// id kept for renewals, and a line of the login log; unless an
    /// administrator revoked the identity (`Some(when)`; nothing written).
    /// One transaction.
    pub fn record_person_login(
        &mut self,
        event: StateEvent,
        person: &PersonRecord,
        kind: LoginKind,
    ) -> Result<Option<u64>, StateError> {
        let StateEvent::Issued {
            name, at, repos, ..
        } = &event
        else {
            unreachable!("a login records an issue");
        };
        self.transact(|tx| {
            if let Some(revoked) = admit_login(tx, name, *at)? {
                return Ok(Outcome::Refused(Some(revoked)));
            }
            apply(tx, &event)?;
            tx.execute(
                "INSERT INTO people (name, provider, forge_id, token, logged_in_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET
                     provider = excluded.provider,
                     forge_id = excluded.forge_id,
                     token = excluded.token,
                     logged_in_at = CASE WHEN ?6 THEN excluded.logged_in_at ELSE logged_in_at END",
                params![
                    name,
                    person.provider,
                    as_i64(person.forge_id),
                    person.token,
                    as_i64(*at),
                    kind == LoginKind::Login
                ],
            )?;
            let kind = match kind {
                LoginKind::Login => "login",
                LoginKind::Renewal => "renewal",
            };
            log_login(tx, *at, name, kind, repos)?;
            Ok(Outcome::Written {
                value: None,
                identities: true,
            })
        })
    }

    /// A person's renewal found no repository they may read: their grants
    /// go (every certificate of theirs reads nothing from now on), and the
    /// login log says so.
    pub fn withdraw(&mut self, name: &str, at: u64) -> Result<(), StateError> {
        self.transact(|tx| {
            tx.execute("DELETE FROM grants WHERE name = ?1", [name])?;
            tx.execute("DELETE FROM access WHERE name = ?1", [name])?;
            log_login(tx, at, name, "renewal", &[])?;
            Ok(Outcome::Written {
                value: (),
                identities: true,
            })
        })
    }

    /// Lifts the revocation of `name` so that it may log in again (its
    /// certificates issued so far stay revoked). Whether it was revoked.
    pub fn lift_revocation(&mut self, name: &str) -> Result<bool, StateError> {
        self.transact(|tx| {
            let n = tx.execute(
                "UPDATE identities SET revoked_at = NULL WHERE name = ?1 AND revoked_at IS NOT NULL",
                [name],
            )?;
            Ok(Outcome::Written {
                value: n == 1,
                identities: true,
            })
        })
    }

    /// What was kept of the person `name` at their last login.
    pub fn person(&self, name: &str) -> Result<Option<PersonRecord>, StateError> {
        self.conn
            .query_row(
                "SELECT provider, forge_id, token FROM people WHERE name = ?1",
                [name],
                |r| {
                    Ok(PersonRecord {
                        provider: r.get(0)?,
                        forge_id: as_u64(r.get(1)?),
                        token: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(self.sql())
    }

    /// The logins and renewals of people, oldest first.
    pub fn logins(&self) -> Result<Vec<LoginRecord>, StateError> {
        let read = || -> rusqlite::Result<Vec<LoginRecord>> {
            let mut stmt = self
                .conn
                .prepare("SELECT at, name, kind, repos FROM logins ORDER BY id")?;
            let rows = stmt.query_map([], login_row)?;
            rows.collect()
        };
        read().map_err(self.sql())
    }

    /// Every namespace some identity is granted.
    pub fn granted_namespaces(&self) -> BTreeSet<String> {
        self.grants
            .values()
            .flat_map(|g| g.repos.iter().cloned())
            .collect()
    }

    /// Who holds the certificate with this sha256.
    pub fn admit(&self, cert_sha256: &Sha256Digest) -> Admission {
        match self.certs.get(cert_sha256) {
            None => Admission::Unknown,
            Some(c) if c.revoked => Admission::Revoked(c.name.clone()),
            Some(c) => self
                .grants
                .get(&c.name)
                .cloned()
                .map_or(Admission::Unknown, Admission::Admitted),
        }
    }

    /// When the certificate with this sha256 expires, if recorded.
    pub fn not_after(&self, cert_sha256: &Sha256Digest) -> Option<u64> {
        self.certs.get(cert_sha256).and_then(|c| c.not_after)
    }

    /// The fingerprints of every revoked certificate.
    pub fn revoked_certs(&self) -> BTreeSet<Sha256Digest> {
        self.certs
            .iter()
            .filter(|(_, c)| c.revoked)
            .map(|(fp, _)| *fp)
            .collect()
    }

    /// Whether every certificate `name` was issued is revoked.
    pub fn is_revoked(&self, name: &str) -> bool {
        let mut any = false;
        for cert in self.certs.values().filter(|c| c.name == name) {
            if !cert.revoked {
                return false;
            }
            any = true;
        }
        any
    }

    /// The producer sets of every conflict recorded on `key` of
    /// `namespace`, oldest first.
    pub fn conflicts_on(
        &self,
        namespace: &str,
        key: &reprise_protocol::digest::RunKey,
    ) -> Result<Vec<Vec<String>>, StateError> {
        let read = || -> rusqlite::Result<Vec<Vec<String>>> {
            let mut stmt = self.conn.prepare_cached(CONFLICTS_ON)?;
            let rows = stmt.query_map(params![namespace, key.hex()], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?).unwrap_or_default());
            }
            Ok(out)
        };
        read().map_err(self.sql())
    }

    /// Takes the commit status of `key` of `namespace` (for commit `sha`)
    /// to post: false when it was taken before, posted or being posted, so
    /// a result gets at most one status however often it is announced.
    pub fn claim_status(
        &mut self,
        namespace: &str,
        key: &RunKey,
        sha: &str,
        now: u64,
    ) -> Result<bool, StateError> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO statuses (namespace, key, sha, claimed_at, posted_at)
                 VALUES (?1, ?2, ?3, ?4, NULL)",
                params![namespace, key.hex(), sha, as_i64(now)],
            )
            .map_err(self.sql())?;
        Ok(n == 1)
    }

    /// Records that the status of `key` was posted, or (`posted` false)
    /// gives the claim back so that a later announce tries again.
    pub fn settle_status(
        &mut self,
        namespace: &str,
        key: &RunKey,
        posted: bool,
        now: u64,
    ) -> Result<(), StateError> {
        let sql = if posted {
            "UPDATE statuses SET posted_at = ?3 WHERE namespace = ?1 AND key = ?2"
        } else {
            "DELETE FROM statuses WHERE namespace = ?1 AND key = ?2 AND ?3 >= 0"
        };
        self.conn
            .execute(sql, params![namespace, key.hex(), as_i64(now)])
            .map_err(self.sql())?;
        Ok(())
    }

    /// Gives back every status claim that was never posted: the process
    /// that took it is gone (a service starting holds none yet), so a
    /// later announce of the result tries again. Returns how many.
    pub fn release_unposted_statuses(&mut self) -> Result<usize, StateError> {
        self.conn
            .execute("DELETE FROM statuses WHERE posted_at IS NULL", [])
            .map_err(self.sql())
    }

    /// When the status of `key` of `namespace` was posted, if it was.
    pub fn status_posted(&self, namespace: &str, key: &RunKey) -> Result<Option<u64>, StateError> {
        self.conn
            .query_row(
                "SELECT posted_at FROM statuses WHERE namespace = ?1 AND key = ?2",
                params![namespace, key.hex()],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()
            .map(|v| v.flatten().map(as_u64))
            .map_err(self.sql())
    }

    /// Whether `name` was ever issued a certificate.
    pub fn knows(&self, name: &str) -> bool {
        self.grants.contains_key(name)
    }

    /// The grant of `name`, if it was ever issued a certificate.
    pub fn grant(&self, name: &str) -> Option<&Grant> {
        self.grants.get(name)
    }

    fn count(&self, table: &str) -> Result<usize, StateError> {
        let n: i64 = self
            .conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .map_err(self.sql())?;
        Ok(as_u64(n) as usize)
    }

    /// How many conflicts the audit log holds.
    pub fn conflicts(&self) -> Result<usize, StateError> {
        self.count("conflicts")
    }

    /// How many replays the audit log holds.
    pub fn replays(&self) -> Result<usize, StateError> {
        self.count("replays")
    }

    /// Every identity, by name, with its certificates.
    pub fn identities(&self) -> Result<Vec<Identity>, StateError> {
        let sql = self.sql();
        let read = || -> rusqlite::Result<Vec<Identity>> {
            let mut certs: BTreeMap<String, Vec<Certificate>> = BTreeMap::new();
            let mut stmt = self.conn.prepare(
                "SELECT name, sha256, issued_at, not_after, revoked FROM certificates
                 ORDER BY issued_at, rowid",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Certificate {
                        sha256: digest_col(r, 1)?,
                        issued_at: as_u64(r.get(2)?),
                        not_after: r.get::<_, Option<i64>>(3)?.map(as_u64),
                        revoked: r.get(4)?,
                    },
                ))
            })?;
            for row in rows {
                let (name, cert) = row?;
                certs.entry(name).or_default().push(cert);
            }
            let mut stmt = self
                .conn
                .prepare("SELECT name, issued_at, revoked_at FROM identities ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    as_u64(r.get(1)?),
                    r.get::<_, Option<i64>>(2)?.map(as_u64),
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (name, issued_at, revoked_at) = row?;
                let Some(grant) = self.grants.get(&name).cloned() else {
                    continue;
                };
                out.push(Identity {
                    grant,
                    issued_at,
                    revoked_at,
                    certificates: certs.remove(&name).unwrap_or_default(),
                });
            }
            Ok(out)
        };
        read().map_err(sql)
    }

    /// The audit log's replays and conflicts that pass `filter`, oldest
    /// first.
    pub fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StateError> {
        let since = as_i64(filter.since.unwrap_or(0));
        let limit = filter.newest.map_or(-1, |n| as_i64(n as u64));
        let ns = filter.namespace.as_deref();
        let read = || -> rusqlite::Result<Vec<AuditEntry>> {
            let mut out = Vec::new();
            let mut stmt = self.conn.prepare(
                "SELECT at, namespace, key, asker, producer, relayer, run_ms, relay_ms, bytes
                 FROM replays WHERE at >= ?1 AND (?2 IS NULL OR namespace = ?2)
                 ORDER BY at DESC, id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![since, ns, limit], |r| {
                Ok(AuditEntry::Replay(Replay {
                    at: as_u64(r.get(0)?),
                    namespace: r.get(1)?,
                    key: digest_col(r, 2)?,
                    asker: r.get(3)?,
                    producer: r.get(4)?,
                    relayer: r.get(5)?,
                    run_ms: r.get::<_, Option<i64>>(6)?.map(as_u64),
                    relay_ms: r.get::<_, Option<i64>>(7)?.map(as_u64),
                    bytes: r.get::<_, Option<i64>>(8)?.map(as_u64),
                }))
            })?;
            for row in rows {
                out.push((row?, 0));
            }
            let mut stmt = self.conn.prepare(
                "SELECT at, namespace, key, producers FROM conflicts
                 WHERE at >= ?1 AND (?2 IS NULL OR namespace = ?2)
                 ORDER BY at DESC, id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![since, ns, limit], |r| {
                let producers: String = r.get(3)?;
                let producers: Vec<String> = serde_json::from_str(&producers).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        3,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?;
                Ok(AuditEntry::Conflict(Conflict {
                    at: as_u64(r.get(0)?),
                    namespace: r.get(1)?,
                    key: digest_col(r, 2)?,
                    producers,
                }))
            })?;
            for row in rows {
                out.push((row?, 1));
            }
            // Logins and renewals that granted the repository, or all.
            let mut stmt = self.conn.prepare(
                "SELECT at, name, kind, repos FROM logins
                 WHERE at >= ?1
                   AND (?2 IS NULL OR EXISTS (SELECT 1 FROM json_each(repos) WHERE value = ?2))
                 ORDER BY at DESC, id DESC LIMIT ?3",
            )?;
            if filter.logins {
                let rows = stmt.query_map(params![since, ns, limit], login_row)?;
                for row in rows {
                    out.push((AuditEntry::Login(row?), 2));
                }
            }
            // Oldest first; at one second, replays, then conflicts, then
            // logins.
            out.sort_by_key(|(e, kind)| (e.at(), *kind));
            let mut out: Vec<AuditEntry> = out.into_iter().map(|(e, _)| e).collect();
            if let Some(n) = filter.newest {
                out.drain(..out.len().saturating_sub(n));
            }
            Ok(out)
        };
        read().map_err(self.sql())
    }

    /// Each repository with replays or conflicts: counts, the run time the
    /// replays spared (where the producer's run time is known), the last
    /// activity. By namespace.
    pub fn repo_summaries(&self) -> Result<Vec<RepoSummary>, StateError> {
        let read = || -> rusqlite::Result<Vec<RepoSummary>> {
            let mut by: BTreeMap<String, RepoSummary> = BTreeMap::new();
            let mut stmt = self.conn.prepare(
                "SELECT namespace, COUNT(*), COUNT(run_ms),
                        COALESCE(SUM(MAX(COALESCE(run_ms, 0) - COALESCE(relay_ms, 0), 0)), 0),
                        COALESCE(SUM(bytes), 0), MAX(at)
                 FROM replays GROUP BY namespace",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(RepoSummary {
                    namespace: r.get(0)?,
                    replays: as_u64(r.get(1)?),
                    timed: as_u64(r.get(2)?),
                    saved_ms: as_u64(r.get(3)?),
                    relayed_bytes: as_u64(r.get(4)?),
                    conflicts: 0,
                    last_at: r.get::<_, Option<i64>>(5)?.map(as_u64),
                })
            })?;
            for row in rows {
                let s = row?;
                by.insert(s.namespace.clone(), s);
            }
            let mut stmt = self
                .conn
                .prepare("SELECT namespace, COUNT(*), MAX(at) FROM conflicts GROUP BY namespace")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, as_u64(r.get(1)?), as_u64(r.get(2)?)))
            })?;
            for row in rows {
                let (ns, n, at) = row?;
                let s = by.entry(ns.clone()).or_insert_with(|| RepoSummary {
                    namespace: ns,
                    ..Default::default()
                });
                s.conflicts = n;
                s.last_at = Some(s.last_at.map_or(at, |l| l.max(at)));
            }
            Ok(by.into_values().collect())
        };
        read().map_err(self.sql())
    }

    /// Imports `events` (a state log's, in order) in one transaction.
    pub(crate) fn import(&mut self, events: &[StateEvent]) -> Result<(), StateError> {
        let path = self.path.clone();
        let sql = |source| StateError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        for event in events {
            apply(&tx, event).map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        self.reload()
    }
}

/// Brings the schema up to [`SCHEMA_VERSION`], under the write lock so
/// that two processes starting at once migrate once.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StateError> {
    let sql = |source| StateError::Sql {
        path: path.to_path_buf(),
        source,
    };
    let version = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    let found = version(conn).map_err(sql)?;
    if found > SCHEMA_VERSION {
        return Err(StateError::Newer {
            path: path.to_path_buf(),
            found,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let found = version(&tx).map_err(sql)?;
    for step in MIGRATIONS.iter().skip(usize::try_from(found).unwrap_or(0)) {
        tx.execute_batch(step).map_err(sql)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(sql)?;
    tx.commit().map_err(sql)
}

/// A row of `SELECT at, name, kind, repos FROM logins`.
fn login_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LoginRecord> {
    Ok(LoginRecord {
        at: as_u64(r.get(0)?),
        name: r.get(1)?,
        kind: r.get(2)?,
        repos: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
    })
}

/// A line of the login log: `kind` is `login` or `renewal` (a person's),
/// or `ci-login` (a CI job's); `repos` what was granted.
fn log_login(
    tx: &rusqlite::Transaction<'_>,
    at: u64,
    name: &str,
    kind: &str,
    repos: &[String],
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO logins (at, name, kind, repos) VALUES (?1, ?2, ?3, ?4)",
        params![
            as_i64(at),
            name,
            kind,
            serde_json::to_string(repos).expect("strings serialise")
        ],
    )?;
    Ok(())
}

/// The part every login shares, in its transaction: `Some(when)` if an
/// administrator revoked `name`; otherwise certificates expired for a day
/// are pruned (logins add one each, hours long, and every serving process
/// caches the table), and the login may be written.
fn admit_login(tx: &Transaction<'_>, name: &str, at: u64) -> rusqlite::Result<Option<u64>> {
    let revoked_at: Option<i64> = tx
        .query_row(
            "SELECT revoked_at FROM identities WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    if let Some(when) = revoked_at {
        return Ok(Some(as_u64(when)));
    }
    tx.execute(
        "DELETE FROM certificates WHERE not_after < ?1",
        [at.saturating_sub(PRUNE_AFTER.as_secs()) as i64],
    )?;
    Ok(None)
}

type Cache = (BTreeMap<Sha256Digest, Cert>, BTreeMap<String, Grant>);

fn read_cache(tx: &Transaction<'_>) -> rusqlite::Result<Cache> {
    let mut certs = BTreeMap::new();
    let mut stmt =
        tx.prepare_cached("SELECT sha256, name, not_after, revoked FROM certificates")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            digest_col::<Sha256Digest>(r, 0)?,
            Cert {
                name: r.get(1)?,
                not_after: r.get::<_, Option<i64>>(2)?.map(as_u64),
                revoked: r.get(3)?,
            },
        ))
    })?;
    for row in rows {
        let (fp, cert) = row?;
        certs.insert(fp, cert);
    }
    let mut grants: BTreeMap<String, Grant> = BTreeMap::new();
    let mut stmt = tx.prepare_cached("SELECT name, trusted FROM identities")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?;
    for row in rows {
        let (name, trusted) = row?;
        grants.insert(
            name.clone(),
            Grant {
                name,
                repos: BTreeSet::new(),
                trusted,
                access: BTreeMap::new(),
            },
        );
    }
    let mut stmt = tx.prepare_cached("SELECT name, repo FROM grants")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    for row in rows {
        let (name, repo) = row?;
        if let Some(g) = grants.get_mut(&name) {
            g.repos.insert(repo);
        }
    }
    let mut stmt = tx.prepare_cached("SELECT name, repo, level FROM access")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (name, repo, level) = row?;
        if let (Some(g), Some(level)) = (grants.get_mut(&name), access_of(&level)) {
            g.access.insert(repo, level);
        }
    }
    Ok((certs, grants))
}

/// The grant of `name` as the transaction sees it.
fn grant_in(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<Option<Grant>> {
    let trusted: Option<bool> = tx
        .query_row(
            "SELECT trusted FROM identities WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(trusted) = trusted else {
        return Ok(None);
    };
    let mut stmt = tx.prepare_cached("SELECT repo FROM grants WHERE name = ?1")?;
    let repos = stmt
        .query_map([name], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<BTreeSet<String>>>()?;
    let mut stmt = tx.prepare_cached("SELECT repo, level FROM access WHERE name = ?1")?;
    let access = stmt
        .query_map([name], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<(String, String)>>>()?
        .into_iter()
        .filter_map(|(repo, level)| Some((repo, access_of(&level)?)))
        .collect();
    Ok(Some(Grant {
        name: name.to_string(),
        repos,
        trusted,
        access,
    }))
}

/// An access level as stored (its serde name).
fn access_of(level: &str) -> Option<ForgeAccess> {
    serde_json::from_value(serde_json::Value::String(level.to_string())).ok()
}

/// Writes one event.
fn apply(tx: &Transaction<'_>, event: &StateEvent) -> rusqlite::Result<()> {
    match event {
        StateEvent::Issued {
            name,
            cert_sha256,
            repos,
            trusted,
            at,
            not_after,
            access,
        } => {
            tx.execute(
                "INSERT INTO identities (name, trusted, issued_at, revoked_at)
                 VALUES (?1, ?2, ?3, NULL)
                 ON CONFLICT (name) DO UPDATE SET
                     trusted = excluded.trusted,
                     issued_at = excluded.issued_at,
                     revoked_at = NULL",
                params![name, trusted, as_i64(*at)],
            )?;
            tx.execute("DELETE FROM grants WHERE name = ?1", [name])?;
            for repo in repos {
                tx.execute(
                    "INSERT OR IGNORE INTO grants (name, repo) VALUES (?1, ?2)",
                    params![name, repo],
                )?;
            }
            tx.execute("DELETE FROM access WHERE name = ?1", [name])?;
            for (repo, level) in access {
                tx.execute(
                    "INSERT OR REPLACE INTO access (name, repo, level) VALUES (?1, ?2, ?3)",
                    params![name, repo, level.as_str()],
                )?;
            }
            tx.execute(
                "INSERT INTO certificates (sha256, name, issued_at, not_after, revoked)
                 VALUES (?1, ?2, ?3, ?4, 0)
                 ON CONFLICT (sha256) DO UPDATE SET
                     name = excluded.name,
                     not_after = excluded.not_after,
                     revoked = 0",
                params![cert_sha256.hex(), name, as_i64(*at), not_after.map(as_i64)],
            )?;
        }
        StateEvent::Revoked { name, at } => {
            // Revoking kills every certificate issued so far; a later
            // issue makes a new one that is admitted again.
            tx.execute(
                "UPDATE certificates SET revoked = 1 WHERE name = ?1",
                [name],
            )?;
            tx.execute(
                "UPDATE identities SET revoked_at = ?2 WHERE name = ?1",
                params![name, as_i64(*at)],
            )?;
            tx.execute(
                "INSERT INTO revocations (name, at) VALUES (?1, ?2)",
                params![name, as_i64(*at)],
            )?;
        }
        StateEvent::Replayed {
            asker,
            producer,
            relayer,
            key,
            namespace,
            at,
            run_ms,
            relay_ms,
            bytes,
        } => {
            tx.execute(
                "INSERT INTO replays
                     (at, namespace, key, asker, producer, relayer, run_ms, relay_ms, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    as_i64(*at),
                    namespace,
                    key.hex(),
                    asker,
                    producer,
                    relayer,
                    run_ms.map(as_i64),
                    relay_ms.map(as_i64),
                    bytes.map(as_i64)
                ],
            )?;
        }
        StateEvent::Conflict {
            key,
            namespace,
            producers,
            at,
        } => {
            tx.execute(
                "INSERT INTO conflicts (at, namespace, key, producers) VALUES (?1, ?2, ?3, ?4)",
                params![
                    as_i64(*at),
                    namespace,
                    key.hex(),
                    serde_json::to_string(producers).expect("strings serialise")
                ],
            )?;
        }
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses `audit --since`: a duration back from `now` (`90m`, `2h`,
/// `7days`, `1week`) or an RFC 3339 time (`2026-05-01T12:00:00Z`).
pub fn parse_since(text: &str, now: u64) -> Result<u64, String> {
    let t = text.trim();
    if let Ok(d) = humantime::parse_duration(t) {
        return Ok(now.saturating_sub(d.as_secs()));
    }
    match time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
        Ok(at) => Ok(u64::try_from(at.unix_timestamp()).unwrap_or(0)),
        Err(_) => Err(format!(
            "{text:?} is neither a duration (2h, 7days, 1week) nor an RFC 3339 time (2026-05-01T12:00:00Z)"
        )),
    }
}

/// A time for people: RFC 3339 in UTC, to the second.
pub fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(as_i64(secs))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(cert: &str) -> Sha256Digest {
        Sha256Digest::of(cert.as_bytes())
    }

    fn key(n: u8) -> RunKey {
        RunKey::from_bytes([n; 32])
    }

    fn issued(name: &str, cert: &str, trusted: bool) -> StateEvent {
        StateEvent::Issued {
            name: name.into(),
            cert_sha256: fp(cert),
            repos: vec!["ns".into()],
            trusted,
            at: 1,
            not_after: Some(99),
            access: Default::default(),
        }
    }

    fn replayed(ns: &str, at: u64, run_ms: Option<u64>) -> StateEvent {
        StateEvent::Replayed {
            asker: "ci".into(),
            producer: "a".into(),
            relayer: Some("a".into()),
            key: key(at as u8),
            namespace: ns.into(),
            at,
            run_ms,
            relay_ms: run_ms.map(|_| 100),
            bytes: Some(10),
        }
    }

    #[test]
    fn the_state_survives_a_reopen_and_revocation_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = State::open(&path).unwrap();
        s.append(issued("a", "c1", true)).unwrap();
        s.append(issued("b", "c2", false)).unwrap();
        s.append(StateEvent::Revoked {
            name: "b".into(),
            at: 2,
        })
        .unwrap();
        drop(s);
        let s = State::open(&path).unwrap();
        assert!(matches!(s.admit(&fp("c1")), Admission::Admitted(g) if g.trusted && g.name == "a"));
        assert_eq!(s.admit(&fp("c2")), Admission::Revoked("b".into()));
        assert_eq!(s.admit(&fp("c3")), Admission::Unknown);
        assert_eq!(s.revoked_certs(), BTreeSet::from([fp("c2")]));
        assert_eq!(s.not_after(&fp("c1")), Some(99));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the database is its owner's only");
    }

    #[test]
    fn another_writer_is_seen_on_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut server = State::open(&path).unwrap();
        let mut cli = State::open(&path).unwrap();
        cli.append(issued("a", "c1", true)).unwrap();
        assert_eq!(server.admit(&fp("c1")), Admission::Unknown);
        server.refresh().unwrap();
        assert!(matches!(server.admit(&fp("c1")), Admission::Admitted(_)));
        cli.append(StateEvent::Revoked {
            name: "a".into(),
            at: 3,
        })
        .unwrap();
        server.refresh().unwrap();
        assert_eq!(server.admit(&fp("c1")), Admission::Revoked("a".into()));
        // The server's own audit writes do not need a reload, and do not
        // hide the next change of another process.
        server.append(replayed("ns", 4, Some(1000))).unwrap();
        cli.append(issued("a", "c4", true)).unwrap();
        server.refresh().unwrap();
        assert!(matches!(server.admit(&fp("c4")), Admission::Admitted(_)));
        assert_eq!(cli.replays().unwrap(), 1);
    }

    #[test]
    fn an_issue_for_a_taken_name_writes_nothing_unless_replacing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(
            s.record_issue(issued("a", "c1", true), false).unwrap(),
            Recorded::Done
        );
        let taken = s.record_issue(issued("a", "c2", false), false).unwrap();
        assert!(
            matches!(&taken, Recorded::NameTaken(g) if g.trusted && g.repos.contains("ns")),
            "{taken:?}"
        );
        assert_eq!(s.admit(&fp("c2")), Admission::Unknown, "nothing written");
        assert!(matches!(s.admit(&fp("c1")), Admission::Admitted(g) if g.trusted));
        s.record_issue(issued("a", "c2", false), true).unwrap();
        assert!(matches!(s.admit(&fp("c2")), Admission::Admitted(g) if !g.trusted));
        let ids = s.identities().unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].certificates.len(), 2);
        assert!(!ids[0].grant.trusted);
    }

    #[test]
    fn identities_list_certificates_expiry_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(&dir.path().join("state.db")).unwrap();
        s.append(issued("b", "c1", true)).unwrap();
        s.append(issued("a", "c2", false)).unwrap();
        s.append(StateEvent::Revoked {
            name: "b".into(),
            at: 7,
        })
        .unwrap();
        let ids = s.identities().unwrap();
        let names: Vec<&str> = ids.iter().map(|i| i.grant.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(ids[0].revoked_at, None);
        assert_eq!(ids[1].revoked_at, Some(7));
        assert_eq!(
            ids[1].certificates,
            vec![Certificate {
                sha256: fp("c1"),
                issued_at: 1,
                not_after: Some(99),
                revoked: true
            }]
        );
    }

    #[test]
    fn a_login_forgets_certificates_expired_for_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(&dir.path().join("state.db")).unwrap();
        let day = PRUNE_AFTER.as_secs();
        let login = |cert: &str, at: u64| StateEvent::Issued {
            name: "ci:github:o/r@refs/heads/main".into(),
            cert_sha256: fp(cert),
            repos: vec!["github.com/o/r".into()],
            trusted: true,
            at,
            not_after: Some(at + 3600),
            access: Default::default(),
        };
        s.append(issued("hand", "h", true)).unwrap();
        s.record_login(login("old", 1000)).unwrap();
        s.record_login(login("recent", 1000 + day)).unwrap();
        assert!(matches!(s.admit(&fp("old")), Admission::Admitted(_)));
        // A day after "old" and "hand" expired, and "recent" still in use.
        s.record_login(login("new", 1000 + 3600 + day + 1)).unwrap();
        assert!(matches!(s.admit(&fp("old")), Admission::Unknown));
        assert!(matches!(s.admit(&fp("hand")), Admission::Unknown));
        assert!(matches!(s.admit(&fp("recent")), Admission::Admitted(_)));
        assert!(matches!(s.admit(&fp("new")), Admission::Admitted(_)));
    }

    #[test]
    fn the_audit_log_shows_logins_and_renewals_by_the_repositories_they_granted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(&dir.path().join("state.db")).unwrap();
        let login = |name: &str, repos: &[&str], at: u64| StateEvent::Issued {
            name: name.into(),
            cert_sha256: fp(&format!("{name}{at}")),
            repos: repos.iter().map(|r| r.to_string()).collect(),
            trusted: false,
            at,
            not_after: Some(at + 3600),
            access: Default::default(),
        };
        s.append(replayed("h/o/x", 10, None)).unwrap();
        s.record_login(login("ci:github:o/x@refs/heads/main", &["h/o/x"], 20))
            .unwrap();
        let person = PersonRecord {
            provider: "github".into(),
            forge_id: 7,
            token: "gho_secret".into(),
        };
        s.record_person_login(
            login("github:carol", &["h/o/x", "h/o/y"], 30),
            &person,
            LoginKind::Login,
        )
        .unwrap();
        s.withdraw("github:carol", 40).unwrap();
        let with_logins = AuditFilter {
            logins: true,
            ..Default::default()
        };
        assert_eq!(
            s.audit(&AuditFilter::default()).unwrap().len(),
            1,
            "the replay only, unless logins are asked for"
        );
        let all = s.audit(&with_logins).unwrap();
        let kinds: Vec<String> = all
            .iter()
            .map(|e| match e {
                AuditEntry::Login(l) => format!("{} {} {}", l.at, l.kind, l.name),
                other => format!("{} other", other.at()),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "10 other",
                "20 ci-login ci:github:o/x@refs/heads/main",
                "30 login github:carol",
                "40 renewal github:carol"
            ]
        );
        assert_eq!(
            all[3].namespace(),
            "-",
            "a renewal that withdrew all grants"
        );
        let y = s
            .audit(&AuditFilter {
                namespace: Some("h/o/y".into()),
                ..with_logins
            })
            .unwrap();
        assert!(
            matches!(&y[..], [AuditEntry::Login(l)] if l.name == "github:carol" && l.kind == "login"),
            "only the login that granted h/o/y: {y:?}"
        );
        assert!(!format!("{all:?}").contains("gho_secret"), "{all:?}");
    }

    #[test]
    fn the_audit_log_filters_by_repository_and_time_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(&dir.path().join("state.db")).unwrap();
        s.append(replayed("x", 30, Some(5000))).unwrap();
        s.append(replayed("y", 10, None)).unwrap();
        s.append(StateEvent::Conflict {
            key: key(1),
            namespace: "x".into(),
            producers: vec!["a".into(), "b".into()],
            at: 20,
        })
        .unwrap();
        let all = s.audit(&AuditFilter::default()).unwrap();
        let ats: Vec<u64> = all.iter().map(AuditEntry::at).collect();
        assert_eq!(ats, [10, 20, 30]);
        let x = s
            .audit(&AuditFilter {
                namespace: Some("x".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(x.iter().all(|e| e.namespace() == "x") && x.len() == 2);
        assert!(
            matches!(&x[0], AuditEntry::Conflict(c) if c.producers == ["a", "b"]),
            "{x:?}"
        );
        let recent = s
            .audit(&AuditFilter {
                since: Some(15),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(recent.len(), 2);
        let newest = s
            .audit(&AuditFilter {
                newest: Some(1),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(newest.iter().map(AuditEntry::at).collect::<Vec<_>>(), [30]);
        let sums = s.repo_summaries().unwrap();
        assert_eq!(
            sums[0],
            RepoSummary {
                namespace: "x".into(),
                replays: 1,
                timed: 1,
                saved_ms: 4900,
                relayed_bytes: 10,
                conflicts: 1,
                last_at: Some(30),
            }
        );
        assert_eq!(
            (sums[1].replays, sums[1].timed, sums[1].saved_ms),
            (1, 0, 0)
        );
        assert_eq!(s.conflicts().unwrap(), 1);
        assert_eq!(s.replays().unwrap(), 2);
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused_and_an_older_one_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let c = Connection::open(&path).unwrap();
            assert_eq!(
                c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                    .unwrap(),
                0
            );
        }
        let s = State::open(&path).unwrap();
        let version: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        s.conn
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(s);
        let err = State::open(&path).unwrap_err();
        assert!(matches!(err, StateError::Newer { found, .. } if found == SCHEMA_VERSION + 1));
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn a_lookup_finds_a_results_conflicts_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("state.db")).unwrap();
        let plan: Vec<String> = s
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {CONFLICTS_ON}"))
            .unwrap()
            .query_map(params!["h/o/r", "00"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|step| step.contains("conflicts_by_result")),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.starts_with("SCAN conflicts")),
            "{plan:?}"
        );
    }

    #[test]
    fn since_takes_a_duration_or_a_time() {
        assert_eq!(parse_since("2h", 10_000), Ok(10_000 - 7200));
        assert_eq!(parse_since("7days", 1_000_000), Ok(1_000_000 - 7 * 86400));
        assert_eq!(parse_since("1h", 5), Ok(0));
        assert_eq!(parse_since("2026-05-01T12:00:00Z", 0), Ok(1_777_636_800));
        assert!(
            parse_since("yesterday", 0)
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert_eq!(rfc3339(1_777_636_800), "2026-05-01T12:00:00Z");
    }

    #[test]
    fn a_status_is_claimed_once_and_an_unposted_claim_can_be_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(&dir.path().join("s.db")).unwrap();
        let (a, b) = (key(1), key(2));
        assert!(s.claim_status("x", &a, "c1", 10).unwrap());
        assert!(
            !s.claim_status("x", &a, "c1", 11).unwrap(),
            "once per result"
        );
        assert!(s.claim_status("x", &b, "c2", 12).unwrap());
        s.settle_status("x", &b, true, 13).unwrap();
        assert_eq!(s.status_posted("x", &b).unwrap(), Some(13));
        // A restart gives back the claim that never got through, not the
        // posted one.
        assert_eq!(s.release_unposted_statuses().unwrap(), 1);
        assert!(s.claim_status("x", &a, "c1", 20).unwrap());
        assert!(!s.claim_status("x", &b, "c2", 20).unwrap());
    }
}
