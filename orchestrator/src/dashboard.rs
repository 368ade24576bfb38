//! The dashboard page, rendered without IO from what the service counts
//! ([`crate::telemetry::Snapshot`]) and what the audit log holds: the
//! executors connected now, each repository's replays and the run time
//! they spared, the recent replays and conflicts, and refusals by reason.
//! Plain HTML with its style inline: no script, nothing fetched from
//! elsewhere (the HTTP layer sends a CSP that forbids both).

use std::fmt::Write;

use crate::state::{AuditEntry, RepoSummary, rfc3339};
use crate::telemetry::Snapshot;

/// Everything the page shows.
#[derive(Debug, Clone)]
pub struct View {
    pub now: u64,
    pub live: Snapshot,
    pub repos: Vec<RepoSummary>,
    /// The newest audit entries, oldest first.
    pub recent: Vec<AuditEntry>,
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration for people: `850 ms`, `12.3 s`, `4 min 5 s`, `2 h 10 min`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// A size for people: `512 B`, `3.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// How long ago `at` was, from `now`.
fn ago(now: u64, at: u64) -> String {
    format!(
        "{} ago",
        duration(now.saturating_sub(at).saturating_mul(1000))
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border-bottom:1px solid #ccc;padding:.25em .75em;text-align:left}\
td.n{text-align:right}code{font-size:.9em}.muted{color:#777}\
dl.sum{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}\
dl.sum dt{font-weight:bold}dl.sum dd{margin:0}";

/// The page.
pub fn render(view: &View) -> String {
    let live = &view.live;
    let mut h = String::new();
    let w = &mut h;
    let _ = write!(
        w,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <title>reprise orchestrator</title><style>{STYLE}</style></head><body>\
         <h1>reprise orchestrator</h1>\
         <p class=\"muted\">As of {now}; serving since {since}. The page reloads every 10 s.</p>",
        now = rfc3339(view.now),
        since = rfc3339(live.started_at),
    );

    // The figures at a glance.
    let replays: u64 = view.repos.iter().map(|r| r.replays).sum();
    let timed: u64 = view.repos.iter().map(|r| r.timed).sum();
    let saved: u64 = view.repos.iter().map(|r| r.saved_ms).sum();
    let conflicts: u64 = view.repos.iter().map(|r| r.conflicts).sum();
    let refused: u64 = live.refusals.iter().map(|(_, n)| n).sum();
    let _ = write!(
        w,
        "<dl class=\"sum\">\
         <dt>Executors connected</dt><dd id=\"executors-connected\">{}</dd>\
         <dt>Replays (audit log)</dt><dd id=\"replays\">{replays}</dd>\
         <dt>Run time saved</dt><dd id=\"time-saved\">{}</dd>\
         <dt>Conflicts (audit log)</dt><dd id=\"conflicts\">{conflicts}</dd>\
         <dt>Lookups since start</dt><dd id=\"lookups\">{} ({} hits, {} misses, {} conflicts)</dd>\
         <dt>Relayed since start</dt><dd id=\"relayed\">{}</dd>\
         <dt>Refusals since start</dt><dd id=\"refusals\">{refused}</dd></dl>",
        live.executors.len(),
        duration(saved),
        live.lookups,
        live.hits,
        live.misses,
        live.lookup_conflicts,
        bytes(live.relayed_bytes),
    );
    let _ = write!(
        w,
        "<p class=\"muted\" id=\"time-saved-note\">Run time saved: for each replay, the run time \
         its producer recorded in the sealed result (the time its run took), less the time the \
         relay took; the asker's own replay of the output is not subtracted.{}</p>",
        if replays > timed {
            format!(
                " {} replay(s) recorded before run times were kept are not counted.",
                replays - timed
            )
        } else {
            String::new()
        }
    );

    // Executors connected now.
    let _ = write!(w, "<h2>Executors connected now</h2>");
    if live.executors.is_empty() {
        let _ = write!(w, "<p id=\"no-executors\">None.</p>");
    } else {
        let _ = write!(
            w,
            "<table id=\"executors\"><tr><th>Identity</th><th>Address</th>\
             <th>Connected</th><th>Results indexed</th></tr>"
        );
        for e in &live.executors {
            let _ = write!(
                w,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td></tr>",
                escape(&e.identity),
                escape(&e.remote.to_string()),
                ago(view.now, e.since),
                e.indexed
            );
        }
        let _ = write!(w, "</table>");
    }

    // Per repository.
    let _ = write!(w, "<h2>Repositories</h2>");
    if view.repos.is_empty() {
        let _ = write!(w, "<p id=\"no-repos\">No replays or conflicts yet.</p>");
    } else {
        let _ = write!(
            w,
            "<table id=\"repos\"><tr><th>Repository</th><th>Replays</th>\
             <th>Run time saved</th><th>Relayed</th><th>Conflicts</th><th>Last</th></tr>"
        );
        for r in &view.repos {
            let _ = write!(
                w,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                escape(&r.namespace),
                r.replays,
                duration(r.saved_ms),
                bytes(r.relayed_bytes),
                r.conflicts,
                r.last_at.map_or_else(String::new, |at| ago(view.now, at)),
            );
        }
        let _ = write!(w, "</table>");
    }

    // The newest audit entries, newest first.
    let _ = write!(w, "<h2>Recent replays and conflicts</h2>");
    if view.recent.is_empty() {
        let _ = write!(w, "<p id=\"no-recent\">Nothing yet.</p>");
    } else {
        let _ = write!(
            w,
            "<table id=\"recent\"><tr><th>When</th><th>What</th><th>Repository</th>\
             <th>Key</th><th>Who</th><th>Run time</th></tr>"
        );
        for e in view.recent.iter().rev() {
            match e {
                AuditEntry::Replay(r) => {
                    let _ = write!(
                        w,
                        "<tr><td>{}</td><td>replay</td><td>{}</td><td><code>{}</code></td>\
                         <td>{} replayed {}'s result{}</td><td class=\"n\">{}</td></tr>",
                        rfc3339(r.at),
                        escape(&r.namespace),
                        r.key.short(),
                        escape(&r.asker),
                        escape(&r.producer),
                        match &r.relayer {
                            Some(by) if *by != r.producer => format!(", relayed by {}", escape(by)),
                            _ => String::new(),
                        },
                        r.run_ms.map_or_else(|| "unknown".into(), duration),
                    );
                }
                AuditEntry::Conflict(c) => {
                    let _ = write!(
                        w,
                        "<tr><td>{}</td><td>conflict</td><td>{}</td><td><code>{}</code></td>\
                         <td>{} disagree</td><td></td></tr>",
                        rfc3339(c.at),
                        escape(&c.namespace),
                        c.key.short(),
                        escape(&c.producers.join(", ")),
                    );
                }
                // Not asked for (`AuditFilter::logins`); shown if they were.
                AuditEntry::Login(l) => {
                    let _ = write!(
                        w,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td></td><td>{}</td><td></td></tr>",
                        rfc3339(l.at),
                        escape(&l.kind),
                        escape(&e.namespace()),
                        escape(&l.name),
                    );
                }
            }
        }
        let _ = write!(w, "</table>");
    }

    // Refusals since start.
    let _ = write!(
        w,
        "<h2>Refusals since start</h2><table id=\"refusal-reasons\"><tr><th>Reason</th><th>Count</th></tr>"
    );
    for (why, n) in &live.refusals {
        let _ = write!(
            w,
            "<tr><td>{}</td><td class=\"n\">{n}</td></tr>",
            why.label()
        );
    }
    let _ = writeln!(
        w,
        "</table><p class=\"muted\">Metrics for Prometheus: <a href=\"/metrics\">/metrics</a>.</p></body></html>"
    );
    h
}

#[cfg(test)]
mod tests {
    use reprise_protocol::digest::RunKey;

    use super::*;
    use crate::state::{Conflict, Replay};
    use crate::telemetry::{Refusal, Telemetry};

    fn view() -> View {
        let t = Telemetry::new(1_000);
        t.connected(1, "alice<script>", "127.0.0.1:5000".parse().unwrap(), 1_100);
        t.refused(Refusal::Revoked);
        View {
            now: 1_200,
            live: t.snapshot(),
            repos: vec![RepoSummary {
                namespace: "example.com/a&b".into(),
                replays: 3,
                timed: 2,
                saved_ms: 125_000,
                relayed_bytes: 3 << 20,
                conflicts: 1,
                last_at: Some(1_190),
            }],
            recent: vec![
                AuditEntry::Replay(Replay {
                    at: 1_150,
                    namespace: "example.com/a&b".into(),
                    key: RunKey::from_bytes([0xab; 32]),
                    asker: "ci".into(),
                    producer: "alice".into(),
                    relayer: Some("bob".into()),
                    run_ms: Some(64_000),
                    relay_ms: Some(2_000),
                    bytes: Some(10),
                }),
                AuditEntry::Conflict(Conflict {
                    at: 1_190,
                    namespace: "example.com/a&b".into(),
                    key: RunKey::from_bytes([0xcd; 32]),
                    producers: vec!["alice".into(), "carol".into()],
                }),
            ],
        }
    }

    #[test]
    fn the_page_shows_executors_repositories_replays_and_refusals_escaped() {
        let page = render(&view());
        for want in [
            "<dd id=\"executors-connected\">1</dd>",
            "alice&lt;script&gt;",
            "<td>example.com/a&amp;b</td><td class=\"n\">3</td><td class=\"n\">2 min 5 s</td>",
            "<td class=\"n\">3.0 MiB</td>",
            "ci replayed alice's result, relayed by bob",
            "abababababab",
            "alice, carol disagree",
            "<td>revoked</td><td class=\"n\">1</td>",
            "1 replay(s) recorded before run times were kept are not counted",
            "1 min 4 s",
        ] {
            assert!(page.contains(want), "{want:?} missing from:\n{page}");
        }
        assert!(!page.contains("<script"), "nothing unescaped");
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "nothing external"
        );
        // Newest first: the conflict above the replay.
        assert!(page.find("disagree").unwrap() < page.find("replayed").unwrap());
    }

    #[test]
    fn an_idle_service_says_so() {
        let t = Telemetry::new(0);
        let page = render(&View {
            now: 5,
            live: t.snapshot(),
            repos: vec![],
            recent: vec![],
        });
        assert!(page.contains("id=\"no-executors\""));
        assert!(page.contains("No replays or conflicts yet."));
        assert!(!page.contains("not counted"));
    }

    #[test]
    fn durations_and_sizes_read_as_people_say_them() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_340), "12.3 s");
        assert_eq!(duration(245_000), "4 min 5 s");
        assert_eq!(duration(7_800_000), "2 h 10 min");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
