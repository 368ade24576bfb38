//! The `reprise-orchestrator` commands on a state folder, through the real
//! binary: issuing a taken name, `identities list`, `audit`, and the
//! import of a version 1 folder's state log on first start.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use reprise_protocol::digest::{RunKey, Sha256Digest};
use reprise_protocol::wire::{STATE_VERSION, StateEvent, StateRecord};

fn orchestrator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reprise-orchestrator"))
        .args(args)
        .env("REPRISE_LOG", "info")
        .output()
        .expect("reprise-orchestrator runs")
}

fn ok(args: &[&str]) -> String {
    let out = orchestrator(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).expect("json")
}

#[test]
fn issuing_a_taken_name_is_refused_unless_replacing_and_identities_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("orch");
    let d = d.to_str().unwrap();
    ok(&["init", "--dir", d]);
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (a, a2) = (out("a.pem"), out("a2.pem"));
    ok(&[
        "issue",
        "--dir",
        d,
        "--name",
        "alice",
        "--repo",
        "ns/one",
        "--repo",
        "ns/two",
        "--trusted",
        "--out",
        &a,
    ]);
    let taken = orchestrator(&[
        "issue", "--dir", d, "--name", "alice", "--repo", "other", "--out", &a2,
    ]);
    assert_eq!(taken.status.code(), Some(3), "a distinct exit code");
    let said = String::from_utf8_lossy(&taken.stderr);
    assert!(
        said.contains("\"alice\" exists already") && said.contains("--replace"),
        "{said}"
    );
    assert!(!Path::new(&a2).exists(), "no credentials written");

    ok(&["revoke", "--dir", d, "--name", "alice"]);
    let listed = json(&["identities", "list", "--dir", d, "--json"]);
    assert_eq!(listed["version"], 1);
    let alice = &listed["identities"][0];
    assert_eq!(alice["name"], "alice");
    assert_eq!(alice["trusted"], true);
    assert_eq!(alice["revoked"], true);
    assert_eq!(alice["repos"], serde_json::json!(["ns/one", "ns/two"]));
    assert_eq!(alice["certificates"][0]["revoked"], true);
    assert!(
        alice["certificates"][0]["not_after"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{alice}"
    );

    ok(&[
        "issue",
        "--dir",
        d,
        "--name",
        "alice",
        "--repo",
        "other",
        "--out",
        &a2,
        "--replace",
    ]);
    let table = ok(&["identities", "list", "--dir", d]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "a header: {table}");
    assert!(
        lines[1].contains("alice") && lines[1].contains("no") && lines[1].contains("active"),
        "the new grants, the revocation lifted: {table}"
    );
    assert!(lines[1].trim_end().ends_with("other"), "{table}");
    assert_eq!(
        table.matches("certificate ").count(),
        2,
        "both certificates: {table}"
    );
    assert_eq!(table.matches(", revoked").count(), 1, "{table}");
}

/// A version 1 folder: made by `init`, its config rewritten as version 1
/// wrote it, its state a JSON-lines log of `events`.
fn version_1_folder(d: &Path, events: &[StateEvent]) {
    ok(&["init", "--dir", d.to_str().unwrap()]);
    fs::remove_file(d.join("state.db")).unwrap();
    fs::write(
        d.join("config.json"),
        r#"{"version":1,"client_ca":"ca.pem","ca_key":"ca.key","server_cert":"server.pem","server_key":"server.key","state_log":"state.jsonl"}"#,
    )
    .unwrap();
    let mut log = String::new();
    for event in events {
        log.push_str(
            &serde_json::to_string(&StateRecord {
                version: STATE_VERSION,
                event: event.clone(),
            })
            .unwrap(),
        );
        log.push('\n');
    }
    fs::write(d.join("state.jsonl"), log).unwrap();
}

#[test]
fn a_version_1_state_log_is_imported_on_first_start_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("orch");
    let key = RunKey::from_bytes([3; 32]);
    let events = vec![
        StateEvent::Issued {
            name: "alice".into(),
            cert_sha256: Sha256Digest::of(b"alice's certificate"),
            repos: vec!["ns/one".into()],
            trusted: true,
            at: 1_700_000_000,
            not_after: Some(1_800_000_000),
            access: Default::default(),
        },
        StateEvent::Replayed {
            asker: "ci".into(),
            producer: "alice".into(),
            relayer: Some("alice".into()),
            key,
            namespace: "ns/one".into(),
            at: 1_700_000_100,
            run_ms: None,
            relay_ms: None,
            bytes: None,
        },
        StateEvent::Conflict {
            key,
            namespace: "ns/two".into(),
            producers: vec!["alice".into(), "bob".into()],
            at: 1_700_000_200,
        },
    ];
    version_1_folder(&d, &events);
    let ds = d.to_str().unwrap();

    // The first command imports, says so, and keeps the log aside.
    let first = orchestrator(&["audit", "--dir", ds]);
    assert!(first.status.success());
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(
        said.contains("imported the state log") && said.contains("state.jsonl.migrated"),
        "{said}"
    );
    assert!(!d.join("state.jsonl").exists());
    assert!(d.join("state.jsonl.migrated").exists());
    let audit = String::from_utf8(first.stdout).unwrap();
    let lines: Vec<&str> = audit.lines().collect();
    assert_eq!(lines.len(), 3, "a header, then oldest first:\n{audit}");
    assert!(lines[1].contains("replay") && lines[1].contains("ci replayed alice's result"));
    assert!(lines[2].contains("conflict") && lines[2].contains("alice, bob disagree"));

    // Once: the second start says nothing of it.
    let again = orchestrator(&["audit", "--dir", ds, "--repo", "ns/two", "--json"]);
    assert!(!String::from_utf8_lossy(&again.stderr).contains("imported"));
    let only: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let entries = only["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{only}");
    assert_eq!(entries[0]["kind"], "conflict");
    assert_eq!(entries[0]["key"], key.hex());
    assert_eq!(entries[0]["at"], "2023-11-14T22:16:40Z");
    let since = json(&[
        "audit",
        "--dir",
        ds,
        "--since",
        "2023-11-14T22:16:00Z",
        "--json",
    ]);
    assert_eq!(since["entries"].as_array().unwrap().len(), 1, "{since}");
    let recent = json(&["audit", "--dir", ds, "--since", "1h", "--json"]);
    assert_eq!(recent["entries"], serde_json::json!([]));
    let listed = json(&["identities", "list", "--dir", ds, "--json"]);
    assert_eq!(listed["identities"][0]["name"], "alice");
}

#[test]
fn a_damaged_version_1_state_log_refuses_to_start_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("orch");
    version_1_folder(&d, &[]);
    fs::write(
        d.join("state.jsonl"),
        "{\"version\":1,\"event\":\"revoked\",\"name\":\"x\",\"at\":1}\nnot json\n",
    )
    .unwrap();
    let before = fs::read(d.join("config.json")).unwrap();
    let out = orchestrator(&["identities", "list", "--dir", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("damaged at line 2") && said.contains("nothing was imported"),
        "{said}"
    );
    assert!(!d.join("state.db").exists());
    assert!(d.join("state.jsonl").exists());
    assert_eq!(fs::read(d.join("config.json")).unwrap(), before);
}

#[test]
fn policy_check_explains_whose_results_count_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("orch");
    let d = d.to_str().unwrap();
    ok(&["init", "--dir", d]);
    fs::write(
        dir.path().join("orch/orchestrator.toml"),
        "[policy.owners.\"h/ns\"]\nallow_network = true\n[policy.repos.\"h/ns/app\"]\nrequire_fresh = true\n",
    )
    .unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    for (name, trusted) in [("alice", true), ("bob", false)] {
        let file = out(&format!("{name}.pem"));
        let mut args = vec![
            "issue", "--dir", d, "--name", name, "--repo", "h/ns/app", "--out", &file,
        ];
        if trusted {
            args.push("--trusted");
        }
        ok(&args);
    }
    let check = |who: &str, repo: &str| {
        orchestrator(&[
            "policy",
            "check",
            "--dir",
            d,
            "--identity",
            who,
            "--repo",
            repo,
        ])
    };
    let alice = check("alice", "h/ns/app");
    let said = String::from_utf8_lossy(&alice.stdout);
    assert!(alice.status.success(), "{said}");
    assert!(
        said.contains("alice in h/ns/app: its results count for CI")
            && said.contains("trusted (issued with --trusted)")
            && said.contains("fresh snapshot"),
        "{said}"
    );
    assert!(
        said.contains(
            "policy of h/ns/app from [policy], then [policy.owners.\"h/ns\"], then [policy.repos.\"h/ns/app\"]"
        ) && !said.contains("without the network"),
        "the owner's section allows the network: {said}"
    );
    let bob = check("bob", "h/ns/app");
    assert_eq!(bob.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bob.stdout).contains("not trusted"));
    let elsewhere = check("alice", "h/ns/other");
    assert_eq!(elsewhere.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&elsewhere.stdout).contains("may not read"));
    ok(&["revoke", "--dir", d, "--name", "alice"]);
    let revoked = orchestrator(&[
        "policy",
        "check",
        "--dir",
        d,
        "--identity",
        "alice",
        "--repo",
        "h/ns/app",
        "--json",
    ]);
    assert_eq!(revoked.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&revoked.stdout).unwrap();
    assert_eq!(doc["counts"], false);
    assert_eq!(doc["policy_sections"].as_array().unwrap().len(), 3, "{doc}");
    assert!(
        doc["reasons"][0].as_str().unwrap().contains("revoked"),
        "{doc}"
    );
}
