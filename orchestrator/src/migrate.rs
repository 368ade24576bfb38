//! The JSON-lines state log of version 1 folders, imported into the
//! database once. The whole log is read and checked before anything is
//! written, so a damaged log is refused with everything left as it was.
//! The events go into a new database file in one transaction; the file is
//! then linked into place (which fails if another process got there
//! first, so two imports cannot both happen) and the log renamed aside.

use std::fs;
use std::path::{Path, PathBuf};

use reprise_protocol::wire::{STATE_VERSION, StateEvent, StateRecord};

use crate::state::{State, StateError};

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub events: usize,
    /// Where the log was moved.
    pub kept_as: PathBuf,
    /// Whether a last line without its newline (an append cut short by a
    /// crash, never acknowledged) was left out.
    pub torn_tail: bool,
}

/// Reads every complete line of the log at `path`. A last line without its
/// newline was never acknowledged by the old code and is left out, as
/// that code did.
pub fn read_log(path: &Path) -> Result<(Vec<StateEvent>, bool), StateError> {
    let text = fs::read(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn_tail = complete < text.len();
    let mut events = Vec::new();
    for (n, line) in text[..complete].split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record: StateRecord =
            serde_json::from_slice(line).map_err(|source| StateError::Damaged {
                path: path.to_path_buf(),
                line: n + 1,
                source,
            })?;
        if record.version != STATE_VERSION {
            return Err(StateError::Version {
                path: path.to_path_buf(),
                line: n + 1,
                version: record.version,
            });
        }
        events.push(record.event);
    }
    Ok((events, torn_tail))
}

/// Imports the log at `log` into a new database at `db`, then renames the
/// log aside. `Ok(None)` when another process made `db` first (nothing
/// imported here, the log left to it).
pub fn import(log: &Path, db: &Path) -> Result<Option<Imported>, StateError> {
    let (events, torn_tail) = read_log(log)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    let staging = db.with_file_name(format!(
        "{}.importing-{}",
        db.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("state.db"),
        std::process::id()
    ));
    remove_database(&staging);
    let made = (|| {
        let mut state = State::open(&staging)?;
        state.import(&events)?;
        // Closing the last connection checkpoints the WAL into the file.
        drop(state);
        match fs::hard_link(&staging, db) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(db)(e)),
        }
    })();
    remove_database(&staging);
    if !made? {
        return Ok(None);
    }
    let kept_as = free_name(log);
    fs::rename(log, &kept_as).map_err(io(log))?;
    if let Some(dir) = db.parent() {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(Some(Imported {
        events: events.len(),
        kept_as,
        torn_tail,
    }))
}

/// `LOG.migrated`, or `LOG.migrated.N` if that is taken.
fn free_name(log: &Path) -> PathBuf {
    let base = format!("{}.migrated", log.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use reprise_protocol::digest::{RunKey, Sha256Digest};

    use super::*;
    use crate::state::{Admission, AuditFilter};

    /// A log as the JSON-lines code wrote it: one `StateRecord` a line.
    fn write_log(path: &Path, events: &[StateEvent]) {
        let mut text = String::new();
        for event in events {
            text.push_str(
                &serde_json::to_string(&StateRecord {
                    version: STATE_VERSION,
                    event: event.clone(),
                })
                .unwrap(),
            );
            text.push('\n');
        }
        fs::write(path, text).unwrap();
    }

    fn events() -> Vec<StateEvent> {
        let key = RunKey::from_bytes([7; 32]);
        vec![
            StateEvent::Issued {
                name: "alice".into(),
                cert_sha256: Sha256Digest::of(b"a1"),
                repos: vec!["ns".into()],
                trusted: true,
                at: 10,
                not_after: Some(1000),
                access: Default::default(),
            },
            StateEvent::Issued {
                name: "bob".into(),
                cert_sha256: Sha256Digest::of(b"b1"),
                repos: vec!["ns".into(), "other".into()],
                trusted: false,
                at: 11,
                not_after: None,
                access: Default::default(),
            },
            StateEvent::Revoked {
                name: "bob".into(),
                at: 12,
            },
            StateEvent::Issued {
                name: "bob".into(),
                cert_sha256: Sha256Digest::of(b"b2"),
                repos: vec!["ns".into()],
                trusted: true,
                at: 13,
                not_after: Some(2000),
                access: Default::default(),
            },
            StateEvent::Replayed {
                asker: "bob".into(),
                producer: "alice".into(),
                relayer: None,
                key,
                namespace: "ns".into(),
                at: 14,
                run_ms: None,
                relay_ms: None,
                bytes: None,
            },
            StateEvent::Conflict {
                key,
                namespace: "ns".into(),
                producers: vec!["alice".into(), "bob".into()],
                at: 15,
            },
        ]
    }

    #[test]
    fn every_event_of_an_old_log_is_imported_and_the_log_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("state.jsonl");
        let db = dir.path().join("state.db");
        write_log(&log, &events());
        // A torn last line, as a crash in the middle of an append left it.
        fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(br#"{"version":1,"event":"rev"#)
            .unwrap();
        let imported = import(&log, &db).unwrap().expect("imported here");
        assert_eq!(imported.events, 6);
        assert!(imported.torn_tail);
        assert_eq!(imported.kept_as, dir.path().join("state.jsonl.migrated"));
        assert!(!log.exists() && imported.kept_as.exists());
        let leftovers: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("importing"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        let s = State::open(&db).unwrap();
        assert!(matches!(s.admit(&Sha256Digest::of(b"a1")), Admission::Admitted(g) if g.trusted));
        assert_eq!(
            s.admit(&Sha256Digest::of(b"b1")),
            Admission::Revoked("bob".into())
        );
        assert!(
            matches!(s.admit(&Sha256Digest::of(b"b2")), Admission::Admitted(g) if g.trusted && g.repos.len() == 1)
        );
        assert_eq!(s.not_after(&Sha256Digest::of(b"b2")), Some(2000));
        assert_eq!(s.replays().unwrap(), 1);
        assert_eq!(s.conflicts().unwrap(), 1);
        let ids = s.identities().unwrap();
        assert_eq!(ids[1].grant.name, "bob");
        assert_eq!(ids[1].certificates.len(), 2);
        assert_eq!(ids[1].revoked_at, None, "re-issued after the revocation");
        assert_eq!(s.audit(&AuditFilter::default()).unwrap().len(), 2);
    }

    #[test]
    fn a_damaged_log_is_refused_and_nothing_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("state.jsonl");
        let db = dir.path().join("state.db");
        write_log(&log, &events());
        let mut text = fs::read_to_string(&log).unwrap();
        text.insert_str(0, "{\"version\":1,\"event\":\"issued\",\"name\":3}\n");
        fs::write(&log, &text).unwrap();
        let err = import(&log, &db).unwrap_err();
        assert!(
            matches!(err, StateError::Damaged { line: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("nothing was imported"), "{err}");
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            text,
            "the log is untouched"
        );
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["state.jsonl"], "no database was left behind");

        write_log(&log, &events());
        let mut text = fs::read_to_string(&log).unwrap();
        text.push_str("{\"version\":9,\"event\":\"revoked\",\"name\":\"x\",\"at\":1}\n");
        fs::write(&log, &text).unwrap();
        assert!(matches!(
            import(&log, &db),
            Err(StateError::Version {
                line: 7,
                version: 9,
                ..
            })
        ));
        assert!(!db.exists());
    }

    #[test]
    fn an_import_that_finds_the_database_made_leaves_the_log_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("state.jsonl");
        let db = dir.path().join("state.db");
        write_log(&log, &events());
        State::open(&db).unwrap();
        assert_eq!(import(&log, &db).unwrap(), None);
        assert!(log.exists());
        assert_eq!(State::open(&db).unwrap().replays().unwrap(), 0);
    }
}
