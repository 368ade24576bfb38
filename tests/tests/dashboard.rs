//! System test of the orchestrator's HTTP listener: a real orchestrator
//! with `--http`, a daemon serving a sealed result (committed as a real run
//! would, without a VM) and a second executor that replays it through the
//! orchestrator; then `/metrics` is read, and the dashboard is loaded in
//! headless Chromium, which must show the repository, the replay and the
//! connected executor. A screenshot is kept in
//! `<target>/test-artifacts/dashboard.png`.

#[expect(
    dead_code,
    reason = "the support module is shared with run.rs; this file uses part of it"
)]
mod run_support;
#[expect(
    dead_code,
    reason = "the support module is shared with peer.rs; this file uses part of it"
)]
mod team_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use run_support::{Run, wait_until};
use team_support::{
    Team, clone_of, fabricate_result, free_udp_port, http_get, metric, namespace, serve_with_http,
    serving_daemon, with_orchestrator,
};

/// Where the screenshot is kept: `<target>/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .join("test-artifacts");
    fs::create_dir_all(&dir).expect("test artifacts folder");
    dir
}

/// Debian's headless Chromium; its absence fails the test with what to do.
fn chromium() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let path = Path::new(dir).join("chromium");
        if path.is_file() {
            return path;
        }
    }
    panic!("chromium is not installed: run scripts/setup.sh (Debian's `chromium` package)");
}

/// Headless Chromium with `args` and then `url`, in a profile of its own,
/// killed after two minutes. Returns its stdout.
fn headless(profile: &Path, args: &[&str], url: &str) -> String {
    let out = profile.join("stdout");
    let err = profile.join("stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.join("profile").display()
        ))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).expect("chromium stdout"))
        .stderr(fs::File::create(&err).expect("chromium stderr"))
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("chromium status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within two minutes:\n{}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "chromium {args:?} {url}: {status}\n{}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    fs::read_to_string(&out).expect("chromium's output")
}

#[test]
fn the_dashboard_shows_a_replay_between_two_executors_and_metrics_count_it() {
    let Team {
        dir,
        state,
        a,
        alice,
        ci,
    } = Team::new();
    let ns = namespace(&a);
    let stdout = fabricate_result(&a, "a result for the dashboard", Some(&alice));
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let (_server, http) = serve_with_http(&state, &addr, &dir.path().join("orch.log"));

    // Nothing yet: the page says so.
    let (code, page) = http_get(http, "/");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("No replays or conflicts yet."), "{page}");

    // A: the daemon serves its store as alice; B replays A's result as ci.
    let (_daemon, said) = serving_daemon(&a, &addr, &alice, &dir.path().join("daemon.log"));
    assert!(said.contains("serving 1 result(s)"), "{said}");
    let b = clone_of(&a);
    let mut cmd = b.reprise(&["run", "--no-serve"]);
    with_orchestrator(&mut cmd, &addr, &ci);
    let replay = Run::from(cmd.output().expect("reprise run"));
    replay.expect_code(0, "B replays through the orchestrator");
    assert!(!replay.booted(), "{}", replay.stderr);
    assert!(
        replay.stderr.contains("from producer 'alice'"),
        "{}",
        replay.stderr
    );
    assert_eq!(replay.stdout_bytes, stdout);

    // The counters: B's lookup was a hit and the result was relayed; once
    // B has gone, only A's daemon is connected.
    let read = || http_get(http, "/metrics");
    assert!(
        wait_until(Duration::from_secs(30), || metric(
            &read().1,
            "reprise_executors_connected"
        ) == Some(1.0)),
        "B's connection is gone and A's daemon stays:\n{}",
        read().1
    );
    let (code, metrics) = read();
    assert_eq!(code, 200);
    for (name, want) in [
        ("reprise_lookups_total", 1.0),
        ("reprise_lookup_hits_total", 1.0),
        ("reprise_lookup_misses_total", 0.0),
        ("reprise_replays_total", 1.0),
        ("reprise_conflicts_total", 0.0),
        (
            "reprise_refusals_total{reason=\"unknown-certificate\"}",
            0.0,
        ),
    ] {
        assert_eq!(metric(&metrics, name), Some(want), "{name}:\n{metrics}");
    }
    let relayed = metric(&metrics, "reprise_relayed_bytes_total").unwrap_or(0.0);
    assert!(
        relayed >= stdout.len() as f64,
        "the output record and the artifact were relayed ({relayed} bytes):\n{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");

    // The dashboard, as a browser renders it.
    let browser = dir.path().join("chromium");
    fs::create_dir_all(&browser).expect("chromium folder");
    let url = format!("http://{http}/");
    let dom = headless(&browser, &["--dump-dom"], &url);
    for (what, want) in [
        ("the repository", ns.clone()),
        ("one replay", "<dd id=\"replays\">1</dd>".to_string()),
        (
            "one executor connected",
            "<dd id=\"executors-connected\">1</dd>".to_string(),
        ),
        (
            "who replayed whose result",
            "ci replayed alice's result".to_string(),
        ),
        (
            "the producer's run time",
            "<td class=\"n\">1.2 s</td>".to_string(),
        ),
    ] {
        assert!(dom.contains(&want), "{what}: {want:?} missing from\n{dom}");
    }
    // The run time saved: the producer's 1.2 s less the relay's time.
    let saved = dom
        .split("id=\"time-saved\">")
        .nth(1)
        .and_then(|t| t.split('<').next())
        .unwrap_or_else(|| panic!("no time saved:\n{dom}"));
    assert!(
        saved != "0 ms" && (saved.ends_with(" ms") || saved.starts_with("1.")),
        "{saved}"
    );
    // A's daemon in the table of executors connected now.
    let executors = dom
        .split("<table id=\"executors\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("no table of executors:\n{dom}"));
    assert!(executors.contains("<td>alice</td>"), "{executors}");
    assert!(
        !executors.contains("<td>ci</td>"),
        "B has gone: {executors}"
    );
    // The repository's row: one replay.
    let repos = dom
        .split("<table id=\"repos\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("no table of repositories:\n{dom}"));
    assert!(
        repos.contains(&format!("<td>{ns}</td><td class=\"n\">1</td>")),
        "{repos}"
    );

    let shot = artifacts_dir().join("dashboard.png");
    let _ = fs::remove_file(&shot);
    headless(
        &browser,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,1000",
        ],
        &url,
    );
    let png =
        fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} is not a screenshot of a page ({} bytes)",
        shot.display(),
        png.len()
    );
    eprintln!("dashboard screenshot: {}", shot.display());
}
