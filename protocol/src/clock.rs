//! How far apart two machines' clocks may be. A producer's certificate and
//! a result's timestamps come from another machine; each check of them
//! against this machine's clock allows [`TOLERANCE`] either way and, past
//! it, names the difference so the user knows to fix a clock rather than
//! suspect the result.

use std::time::Duration;

use thiserror::Error;

/// The clock difference accepted between any two machines of a team.
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// A timestamp further ahead of this machine's clock than [`TOLERANCE`].
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
#[error(
    "{what} is {} ahead of this machine's clock (more than the {} tolerated): check the clocks of both machines",
    span(*ahead),
    span(TOLERANCE.as_secs())
)]
pub struct FromTheFuture {
    pub what: &'static str,
    /// Seconds ahead.
    pub ahead: u64,
}

/// Checks that `at` (seconds since the epoch) is not past `now` by more
/// than [`TOLERANCE`].
pub fn not_from_the_future(what: &'static str, at: u64, now: u64) -> Result<(), FromTheFuture> {
    let ahead = at.saturating_sub(now);
    if ahead > TOLERANCE.as_secs() {
        return Err(FromTheFuture { what, ahead });
    }
    Ok(())
}

/// A number of seconds as people say it: "42 s", "7 min", "3 h 5 min",
/// "2 days".
pub fn span(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} days", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_future_is_refused_past_the_tolerance_and_named() {
        assert_eq!(not_from_the_future("x", 1000, 1000), Ok(()));
        assert_eq!(not_from_the_future("x", 0, 1000), Ok(()));
        assert_eq!(not_from_the_future("x", 1300, 1000), Ok(()));
        let e = not_from_the_future("the result", 1000 + 3 * 3600, 1000).unwrap_err();
        assert_eq!(e.ahead, 3 * 3600);
        assert_eq!(
            e.to_string(),
            "the result is 3 h 0 min ahead of this machine's clock (more than the 5 min tolerated): check the clocks of both machines"
        );
    }
}
