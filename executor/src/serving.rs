//! Serving the local store to peers for as long as asked: staying
//! connected to the orchestrator, reconnecting with backoff when the
//! connection is lost (an orchestrator restart, a network change), and
//! announcing results handed over while connected.
//!
//! Every (re)connection announces the whole store, so nothing committed
//! while the link was down is missed; results handed over while connected
//! are announced at once.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use reprise_protocol::local::LinkState;
use reprise_protocol::wire::Sealed;
use tokio::sync::{mpsc, oneshot, watch};

use crate::link::direct::Direct;
use crate::link::{Link, Orchestrator};
use crate::store::Store;

/// Exponential backoff with jitter between reconnection attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next attempt: doubling up to the maximum, then
    /// spread by ±25% so executors cut off together do not all come back
    /// in the same instant.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let spread = f64::from(nanos % 1000) / 1000.0 * 0.5 + 0.75;
        base.mul_f64(spread)
    }

    /// A connection worked: start again from the first delay.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(30))
    }
}

/// A sealed result to announce, and where to say how it went.
pub type News = (Sealed, oneshot::Sender<LinkState>);

/// Serves `store` to peers through the orchestrator until `stop` resolves,
/// starting with `first` if a connection is already open. A lost
/// connection is noted and made again with backoff; each new connection
/// announces the whole store. `news` carries results to announce as they
/// are committed (answered with the link's state once announced, or at
/// once while disconnected: the next connection announces them); `link`
/// reports the connection's state. With `direct`, each connection tells
/// the orchestrator that peers may fetch from that listener, and keeps
/// the tickets it sends there.
#[allow(clippy::too_many_arguments)]
pub async fn serve_until(
    orchestrator: &Orchestrator,
    first: Option<Link>,
    store: &Store,
    mut news: mpsc::Receiver<News>,
    link: &watch::Sender<LinkState>,
    stop: impl std::future::Future<Output = ()>,
    note: &(dyn Fn(&str) + Sync),
    direct: Option<&Direct>,
) {
    let mut stop = pin!(stop);
    let mut backoff = Backoff::default();
    let mut first = first;
    let mut was_connected = false;
    let mut quiet_failures = false;
    // While disconnected, `news` is answered with the link as it is.
    macro_rules! until {
        ($fut:expr) => {{
            let fut = $fut;
            let mut fut = pin!(fut);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    out = &mut fut => break out,
                    Some((_, reply)) = news.recv() => {
                        let _ = reply.send(link.borrow().clone());
                    }
                }
            }
        }};
    }
    loop {
        let peer = match first.take() {
            Some(peer) => Ok(peer),
            None => until!(orchestrator.connect()),
        };
        let peer = match peer {
            Ok(peer) => Arc::new(peer),
            Err(e) => {
                let delay = backoff.next_delay();
                // One line per outage, not one per attempt.
                if !quiet_failures {
                    note(&format!(
                        "cannot reach the orchestrator at {}: {e}; retrying with backoff",
                        orchestrator.settings.orchestrator
                    ));
                    quiet_failures = true;
                }
                link.send_replace(LinkState::Reconnecting { last_error: e });
                until!(tokio::time::sleep(delay));
                continue;
            }
        };
        let announced = match until!(peer.announce(store)) {
            Ok((served, refused)) => {
                if refused > 0 {
                    note(&format!(
                        "the orchestrator refused {refused} result(s) of this store (unverifiable seals, or repositories this certificate does not grant)"
                    ));
                }
                served
            }
            Err(e) => {
                let e = crate::text::error_chain(&e);
                note(&format!(
                    "announcing results to the orchestrator failed: {e}"
                ));
                link.send_replace(LinkState::Reconnecting { last_error: e });
                peer.close().await;
                until!(tokio::time::sleep(backoff.next_delay()));
                continue;
            }
        };
        if let Some(direct) = direct {
            match until!(peer.listen(direct)) {
                Ok(addr) => note(&format!(
                    "peers the orchestrator introduces fetch straight from here ({addr})"
                )),
                Err(e) => note(&format!(
                    "the orchestrator takes no direct fetches ({}); serving through it only",
                    crate::text::error_chain(&e)
                )),
            }
        }
        backoff.reset();
        quiet_failures = false;
        note(&format!(
            "{} {announced} result(s) to peers as {}{}",
            if was_connected {
                "reconnected; serving"
            } else {
                "serving"
            },
            peer.identity(),
            if was_connected {
                ""
            } else {
                "; Ctrl-C to stop"
            }
        ));
        was_connected = true;
        let mut announced_total = announced;
        link.send_replace(LinkState::Connected {
            identity: peer.identity().to_string(),
            announced: announced_total,
        });

        let serving = {
            let peer = peer.clone();
            let store = store.clone();
            let tickets = direct.map(|d| d.tickets().clone());
            tokio::spawn(async move { peer.serve_with(&store, tickets).await })
        };
        let mut serving = pin!(serving);
        let lost = loop {
            tokio::select! {
                () = &mut stop => {
                    peer.close().await;
                    return;
                }
                ended = &mut serving => {
                    break match ended {
                        Ok(Ok(())) => String::from("closed"),
                        Ok(Err(e)) => crate::text::error_chain(&e),
                        Err(e) => e.to_string(),
                    };
                }
                Some((sealed, reply)) = news.recv() => {
                    let passed = sealed.passed();
                    // A failure means the connection is failing: the serve
                    // task ends too, and the reconnection announces all.
                    if peer.grants(&sealed.manifest.inputs.namespace)
                        && let Ok((accepted, _)) = peer.announce_sealed(vec![sealed]).await
                    {
                        if passed {
                            announced_total += accepted;
                        }
                        link.send_replace(LinkState::Connected {
                            identity: peer.identity().to_string(),
                            announced: announced_total,
                        });
                    }
                    let _ = reply.send(link.borrow().clone());
                }
            }
        };
        note(&format!(
            "the orchestrator connection was lost ({lost}); reconnecting"
        ));
        link.send_replace(LinkState::Reconnecting { last_error: lost });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bases = [100, 200, 400, 800, 800, 800];
        for (d, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25),
                "{d:?} for {base:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
