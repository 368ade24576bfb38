//! Named points where a command can be made to wait, so a test can kill it
//! there (the kill matrix in `tests/tests/kill.rs`): with
//! `REPRISE_PAUSE_AT=<name>` in its environment, a command that reaches
//! the point says `reprise: paused at <name>` on stderr and waits an hour.
//! Unset, a point costs one environment lookup. Nothing is skipped or
//! changed: the command is only made slow at a known place.
//!
//! This crate's unit tests reach the same points in process: [`hook::at`]
//! runs a closure when the calling thread gets there (a `gc` in the middle
//! of a commit, say), without any environment variable.

use std::time::Duration;

/// Pauses here if `REPRISE_PAUSE_AT` names this point.
pub fn pause_point(name: &str) {
    #[cfg(test)]
    hook::run(name);
    if std::env::var(crate::vars::PAUSE_VAR).is_ok_and(|v| v == name) {
        eprintln!("reprise: paused at {name}");
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Closures that unit tests run at a pause point, per thread (tests run
/// in parallel, each on its own thread).
#[cfg(test)]
pub(crate) mod hook {
    use std::cell::RefCell;

    type Hook = (&'static str, Box<dyn FnMut()>);

    thread_local! {
        static AT: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `f` each time this thread reaches the point `name`, until the
    /// returned guard drops.
    #[must_use = "the hook is removed when the guard drops"]
    pub(crate) fn at(name: &'static str, f: impl FnMut() + 'static) -> Guard {
        AT.with(|at| *at.borrow_mut() = Some((name, Box::new(f))));
        Guard
    }

    /// Removes the hook when dropped.
    #[derive(Debug)]
    pub(crate) struct Guard;

    impl Drop for Guard {
        fn drop(&mut self) {
            AT.with(|at| at.borrow_mut().take());
        }
    }

    pub(super) fn run(name: &str) {
        // Taken out while it runs, so it may reach other points itself.
        let hook = AT.with(|at| at.borrow_mut().take_if(|(n, _)| *n == name));
        if let Some((n, mut f)) = hook {
            f();
            AT.with(|at| *at.borrow_mut() = Some((n, f)));
        }
    }
}
