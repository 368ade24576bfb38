//! Scheduled targets. A repository's `prepare-runtime` may write
//! `/var/run/ci/crontab`: one line per target, five cron fields and the
//! target (`0 3 * * * nightly`, `#` comments). The run keeps it in its
//! manifest; a run of the tip of the repository's default branch records
//! the schedule here, and `reprise daemon` runs each target of that branch
//! at its times (as `reprise run --rev BRANCH --target TARGET`, so its
//! result is announced like any run's).
//!
//! ```text
//! $XDG_DATA_HOME/reprise/schedule/<repository id>.json
//! ```
//!
//! When a target is due is a pure function of the schedule, the last run
//! and `now` ([`due`]); cron expressions are evaluated with `croner`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of a schedule file's layout.
pub const SCHEDULE_VERSION: u32 = 1;

/// Longest crontab kept, in bytes.
pub const MAX_CRONTAB: usize = 16 << 10;

/// One line of a crontab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The five cron fields.
    pub cron: String,
    pub target: String,
}

/// What is wrong with a crontab line.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("/var/run/ci/crontab:{line}: {what}")]
pub struct CrontabError {
    pub line: usize,
    pub what: String,
}

/// Parses a crontab: five cron fields and a target per line.
pub fn parse_crontab(text: &str) -> Result<Vec<Entry>, CrontabError> {
    if text.len() > MAX_CRONTAB {
        return Err(CrontabError {
            line: 1,
            what: format!("longer than {MAX_CRONTAB} bytes"),
        });
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let err = |what: String| CrontabError { line: n + 1, what };
        let [m, h, dom, mon, dow, target] = fields.as_slice() else {
            return Err(err(format!(
                "expected five cron fields and a target, got {:?}",
                line
            )));
        };
        let cron = [*m, *h, *dom, *mon, *dow].join(" ");
        let parsed = Cron::from_str(&cron).map_err(|e| err(format!("'{cron}': {e}")))?;
        if !occurs(&parsed) {
            return Err(err(format!("'{cron}' never occurs (no such day)")));
        }
        let valid_target = !target.is_empty()
            && target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !valid_target {
            return Err(err(format!("'{target}' is not a target name")));
        }
        out.push(Entry {
            cron,
            target: target.to_string(),
        });
    }
    Ok(out)
}

/// The last scheduled run of a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    /// Seconds since the Unix epoch it started.
    pub at: u64,
    /// The run's exit code.
    pub exit_code: i32,
}

/// A repository's schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub version: u32,
    pub namespace: String,
    /// The checkout the daemon runs in.
    pub checkout: PathBuf,
    /// The default branch, whose tip the targets run on.
    pub branch: String,
    /// The driver of the run that recorded it.
    pub driver: String,
    pub entries: Vec<Entry>,
    /// Seconds since the Unix epoch it was recorded (nothing before is due).
    pub since: u64,
    /// By target.
    #[serde(default)]
    pub last: BTreeMap<String, LastRun>,
}

fn at(secs: u64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs as i64, 0)
        .single()
        .unwrap_or_default()
}

/// The next time `entry` is due after `after` (seconds since the epoch).
/// Whether `cron` ever occurs. An expression that names no real day
/// (`0 0 31 2 *`) makes croner search up to its year limit, tens of
/// milliseconds each time (seconds under a sanitizer), and the daemon asks
/// every 15 s. Every calendar case (leap year or not, the weekday of the
/// 1st) comes within 28 years that hold no century year, so searching the
/// 28 years before the limit answers quickly and for good.
fn occurs(cron: &Cron) -> bool {
    Utc.with_ymd_and_hms(croner::YEAR_UPPER_LIMIT - 28, 1, 1, 0, 0, 0)
        .single()
        .is_some_and(|from| cron.find_next_occurrence(&from, true).is_ok())
}

pub fn next_after(entry: &Entry, after: u64) -> Option<u64> {
    let cron = Cron::from_str(&entry.cron).ok()?;
    if !occurs(&cron) {
        return None;
    }
    let next = cron.find_next_occurrence(&at(after), false).ok()?;
    u64::try_from(next.timestamp()).ok()
}

/// The entries of `schedule` due at `now`: whose next time after their
/// last run (or after the schedule was recorded) has come.
pub fn due(schedule: &Schedule, now: u64) -> Vec<Entry> {
    schedule
        .entries
        .iter()
        .filter(|e| {
            let last = schedule
                .last
                .get(&e.target)
                .map_or(schedule.since, |l| l.at.max(schedule.since));
            next_after(e, last).is_some_and(|t| t <= now)
        })
        .cloned()
        .collect()
}

/// Why a schedule could not be read or written.
#[derive(Debug, Error)]
#[error("schedule {}", path.display())]
pub struct ScheduleError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The folder of schedules.
#[derive(Debug, Clone)]
pub struct Schedules {
    root: PathBuf,
}

impl Schedules {
    pub fn new(root: PathBuf) -> Schedules {
        Schedules { root }
    }

    /// `$XDG_DATA_HOME/reprise/schedule`.
    pub fn default_location() -> Schedules {
        Schedules::new(crate::paths::data_dir().join("schedule"))
    }

    fn path(&self, namespace: &str, checkout: &Path) -> PathBuf {
        let mut bytes = Vec::new();
        reprise_protocol::hex::put_field(&mut bytes, namespace.as_bytes());
        reprise_protocol::hex::put_field(&mut bytes, checkout.as_os_str().as_encoded_bytes());
        self.root.join(format!(
            "{}.json",
            &reprise_protocol::digest::Sha256Digest::of(&bytes).hex()[..24]
        ))
    }

    /// Records (or replaces, keeping last runs of targets still listed) the
    /// schedule of the repository in `schedule.checkout`; an empty schedule
    /// removes it.
    pub fn record(&self, mut schedule: Schedule) -> Result<(), ScheduleError> {
        let path = self.path(&schedule.namespace, &schedule.checkout);
        let io = |source| ScheduleError {
            path: path.clone(),
            source,
        };
        if schedule.entries.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
                _ => Ok(()),
            };
        }
        if let Some(old) = read(&path) {
            for (target, last) in old.last {
                if schedule.entries.iter().any(|e| e.target == target) {
                    schedule.last.entry(target).or_insert(last);
                }
            }
            if old.entries == schedule.entries {
                schedule.since = old.since;
            }
        }
        self.write(&path, &schedule).map_err(io)
    }

    fn write(&self, path: &Path, schedule: &Schedule) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(schedule).expect("schedules serialise"),
        )?;
        std::fs::rename(&tmp, path)
    }

    /// Notes that `target` of `schedule` ran at `at` with `exit_code`.
    pub fn ran(
        &self,
        schedule: &Schedule,
        target: &str,
        at: u64,
        exit_code: i32,
    ) -> Result<(), ScheduleError> {
        let path = self.path(&schedule.namespace, &schedule.checkout);
        let mut current = read(&path).unwrap_or_else(|| schedule.clone());
        current
            .last
            .insert(target.to_string(), LastRun { at, exit_code });
        self.write(&path, &current)
            .map_err(|source| ScheduleError { path, source })
    }

    /// Every schedule recorded.
    pub fn list(&self) -> Vec<Schedule> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<Schedule> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| read(&e.path()))
            .collect();
        out.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        out
    }
}

fn read(path: &Path) -> Option<Schedule> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice::<Schedule>(&text)
        .ok()
        .filter(|s| s.version == SCHEDULE_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crontabs_parse_with_their_lines_in_errors() {
        let entries =
            parse_crontab("# nightly and every minute\n0 3 * * * nightly\n\n* * * * * lint\n")
                .unwrap();
        assert_eq!(
            entries,
            vec![
                Entry {
                    cron: "0 3 * * *".into(),
                    target: "nightly".into()
                },
                Entry {
                    cron: "* * * * *".into(),
                    target: "lint".into()
                }
            ]
        );
        for (text, want) in [
            ("* * * * lint\n", "crontab:1: expected five"),
            ("\n61 * * * * lint\n", "crontab:2: '61 * * * *'"),
            ("* * * * * two words\n", "crontab:1: expected five"),
            ("* * * * * rm;-rf\n", "crontab:1: 'rm;-rf' is not a target"),
            (
                "59 23 31 2 * leap.day\n",
                "crontab:1: '59 23 31 2 *' never occurs",
            ),
            (
                "0 0 31 4,6,9,11 * x\n",
                "crontab:1: '0 0 31 4,6,9,11 *' never occurs",
            ),
        ] {
            let e = parse_crontab(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    fn schedule(entries: &str) -> Schedule {
        Schedule {
            version: SCHEDULE_VERSION,
            namespace: "ns".into(),
            checkout: "/repo".into(),
            branch: "main".into(),
            driver: "qemu".into(),
            entries: parse_crontab(entries).unwrap(),
            since: 1_800_000_000,
            last: BTreeMap::new(),
        }
    }

    #[test]
    fn targets_are_due_when_their_time_has_come_since_their_last_run() {
        // 1_800_000_000 is 2027-01-15T08:00:00Z.
        let s = schedule("* * * * * lint\n0 3 * * * nightly\n");
        let t0 = s.since;
        assert!(due(&s, t0).is_empty(), "nothing at once");
        let due_at = |s: &Schedule, now: u64| -> Vec<String> {
            due(s, now).into_iter().map(|e| e.target).collect()
        };
        assert_eq!(due_at(&s, t0 + 60), ["lint"]);
        assert_eq!(due_at(&s, t0 + 19 * 3600), ["lint", "nightly"]);
        let mut ran = s.clone();
        ran.last.insert(
            "lint".into(),
            LastRun {
                at: t0 + 60,
                exit_code: 0,
            },
        );
        assert!(due_at(&ran, t0 + 90).is_empty(), "ran this minute");
        assert_eq!(due_at(&ran, t0 + 120), ["lint"]);
        assert_eq!(next_after(&s.entries[1], t0), Some(t0 + 19 * 3600));
    }

    #[test]
    fn recording_keeps_last_runs_and_an_empty_crontab_removes_the_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let schedules = Schedules::new(dir.path().to_path_buf());
        let s = schedule("* * * * * lint\n");
        schedules.record(s.clone()).unwrap();
        schedules.ran(&s, "lint", s.since + 60, 0).unwrap();
        let mut again = s.clone();
        again.since += 3600;
        schedules.record(again).unwrap();
        let listed = schedules.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last["lint"].at, s.since + 60);
        assert_eq!(listed[0].since, s.since, "same entries: same since");
        let mut empty = s.clone();
        empty.entries.clear();
        schedules.record(empty).unwrap();
        assert!(schedules.list().is_empty());
    }
}
