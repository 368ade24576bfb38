//! The orchestrator's durable state: identities and their grants,
//! revocations and the audit log of replays, kept as an append-only log of
//! JSON lines, each written in one `write` and fsync'd before the call
//! returns. The in-memory view is the fold of the log; it is re-read when
//! the file grew (another process issued or revoked).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::wire::{STATE_VERSION, StateEvent, StateRecord};
use thiserror::Error;

/// Why the state log could not be read or written.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("state log io on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state log {} is damaged at line {line}", path.display())]
    Damaged {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("state log {} line {line} has version {version}; this build reads {STATE_VERSION}", path.display())]
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
    /// Whether its results count for CI on those repositories.
    pub trusted: bool,
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

/// The state, backed by its log file.
#[derive(Debug)]
pub struct State {
    path: PathBuf,
    read_len: u64,
    /// Certificate sha256 → whose, until when, whether revoked.
    certs: BTreeMap<Sha256Digest, Cert>,
    grants: BTreeMap<String, Grant>,
    revoked: BTreeSet<String>,
    replays: usize,
    conflicts: usize,
}

impl State {
    /// Opens (creating if absent) the log at `path` and reads it.
    pub fn open(path: &Path) -> Result<State, StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        // A crash in the middle of an append leaves a last line without its
        // newline: it was never acknowledged, so it is cut off.
        let text = fs::read(path).map_err(io)?;
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(complete as u64))
                .map_err(io)?;
        }
        let mut state = State {
            path: path.to_path_buf(),
            read_len: 0,
            certs: BTreeMap::new(),
            grants: BTreeMap::new(),
            revoked: BTreeSet::new(),
            replays: 0,
            conflicts: 0,
        };
        state.reload()?;
        Ok(state)
    }

    /// Re-reads the log if it changed size since it was last read.
    pub fn refresh(&mut self) -> Result<(), StateError> {
        let len = fs::metadata(&self.path)
            .map_err(|source| StateError::Io {
                path: self.path.clone(),
                source,
            })?
            .len();
        if len != self.read_len {
            self.reload()?;
        }
        Ok(())
    }

    fn reload(&mut self) -> Result<(), StateError> {
        let text = fs::read_to_string(&self.path).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.certs.clear();
        self.grants.clear();
        self.revoked.clear();
        self.replays = 0;
        self.conflicts = 0;
        // A torn last line (a writer in the middle of an append) is not read.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        for (n, line) in complete.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record: StateRecord =
                serde_json::from_str(line).map_err(|source| StateError::Damaged {
                    path: self.path.clone(),
                    line: n + 1,
                    source,
                })?;
            if record.version != STATE_VERSION {
                return Err(StateError::Version {
                    path: self.path.clone(),
                    line: n + 1,
                    version: record.version,
                });
            }
            self.apply(record.event);
        }
        self.read_len = complete.len() as u64;
        Ok(())
    }

    fn apply(&mut self, event: StateEvent) {
        match event {
            StateEvent::Issued {
                name,
                cert_sha256,
                repos,
                trusted,
                not_after,
                ..
            } => {
                self.revoked.remove(&name);
                self.certs.insert(
                    cert_sha256,
                    Cert {
                        name: name.clone(),
                        not_after,
                        revoked: false,
                    },
                );
                self.grants.insert(
                    name.clone(),
                    Grant {
                        name,
                        repos: repos.into_iter().collect(),
                        trusted,
                    },
                );
            }
            StateEvent::Revoked { name, .. } => {
                // Revoking kills every certificate issued so far; a later
                // issue makes a new one that is admitted again.
                for cert in self.certs.values_mut().filter(|c| c.name == name) {
                    cert.revoked = true;
                }
                self.revoked.insert(name);
            }
            StateEvent::Replayed { .. } => self.replays += 1,
            StateEvent::Conflict { .. } => self.conflicts += 1,
        }
    }

    /// Appends an event, fsync'd, and applies it.
    pub fn append(&mut self, event: StateEvent) -> Result<(), StateError> {
        self.refresh()?;
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_string(&StateRecord {
            version: STATE_VERSION,
            event: event.clone(),
        })
        .expect("state records serialise");
        line.push('\n');
        let mut f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        f.write_all(line.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        self.read_len += line.len() as u64;
        self.apply(event);
        Ok(())
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

    /// How many conflicts the audit log holds.
    pub fn conflicts(&self) -> usize {
        self.conflicts
    }

    /// Whether `name` was ever issued a certificate.
    pub fn knows(&self, name: &str) -> bool {
        self.grants.contains_key(name)
    }

    /// How many replays the audit log holds.
    pub fn replays(&self) -> usize {
        self.replays
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(cert: &str) -> Sha256Digest {
        Sha256Digest::of(cert.as_bytes())
    }

    fn issued(name: &str, cert: &str, trusted: bool) -> StateEvent {
        StateEvent::Issued {
            name: name.into(),
            cert_sha256: fp(cert),
            repos: vec!["ns".into()],
            trusted,
            at: 1,
            not_after: Some(99),
        }
    }

    #[test]
    fn the_log_survives_a_reopen_and_revocation_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.jsonl");
        let mut s = State::open(&path).unwrap();
        s.append(issued("a", "c1", true)).unwrap();
        s.append(issued("b", "c2", false)).unwrap();
        s.append(StateEvent::Revoked {
            name: "b".into(),
            at: 2,
        })
        .unwrap();
        let s = State::open(&path).unwrap();
        assert!(matches!(s.admit(&fp("c1")), Admission::Admitted(g) if g.trusted && g.name == "a"));
        assert_eq!(s.admit(&fp("c2")), Admission::Revoked("b".into()));
        assert_eq!(s.admit(&fp("c3")), Admission::Unknown);
        assert_eq!(s.revoked_certs(), BTreeSet::from([fp("c2")]));
        assert_eq!(s.not_after(&fp("c1")), Some(99));
    }

    #[test]
    fn another_writer_is_seen_on_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.jsonl");
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
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.jsonl");
        let mut s = State::open(&path).unwrap();
        s.append(issued("a", "c1", true)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"version":1,"event":"rev"#).unwrap();
        let mut s = State::open(&path).unwrap();
        assert!(matches!(s.admit(&fp("c1")), Admission::Admitted(_)));
        s.append(issued("b", "c2", true)).unwrap();
        let s = State::open(&path).unwrap();
        assert!(
            matches!(s.admit(&fp("c2")), Admission::Admitted(_)),
            "the torn line was cut off"
        );
        fs::write(&path, "garbage\n").unwrap();
        assert!(matches!(
            State::open(&path),
            Err(StateError::Damaged { line: 1, .. })
        ));
    }
}
