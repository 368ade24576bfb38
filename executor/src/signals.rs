//! Waiting for the signals that end work: SIGINT (Ctrl-C) and SIGTERM.
//! Whoever does the work awaits them itself (a run stops its VM, serving
//! stops serving, the daemon ignores SIGHUP); there is no global state that
//! changes what a signal means.

use tokio::signal::unix::{SignalKind, signal};

/// SIGINT or SIGTERM.
pub async fn interrupted() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// SIGINT or SIGTERM; SIGHUP (a closed terminal) is ignored.
pub async fn interrupted_not_hung_up() {
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let stop = interrupted();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = hup.recv() => {}
        }
    }
}
