//! Named points where a command can be made to wait, so a test can kill it
//! there (the kill matrix in `tests/tests/kill.rs`): with
//! `REPRISE_PAUSE_AT=<name>` in its environment, a command that reaches
//! the point says `reprise: paused at <name>` on stderr and waits an hour.
//! Unset, a point costs one environment lookup. Nothing is skipped or
//! changed: the command is only made slow at a known place.

use std::time::Duration;

/// Pauses here if `REPRISE_PAUSE_AT` names this point.
pub fn pause_point(name: &str) {
    if std::env::var(crate::vars::PAUSE_VAR).is_ok_and(|v| v == name) {
        eprintln!("reprise: paused at {name}");
        std::thread::sleep(Duration::from_secs(3600));
    }
}
