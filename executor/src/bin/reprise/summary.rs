//! The end of a run for CI: what happened (ran here, replayed, verified),
//! from whom, under which isolation, whether it counts for CI and why. One
//! JSON document (`--report FILE`), rendered as text on stderr in CI mode
//! and as Markdown into `$GITHUB_STEP_SUMMARY` on GitHub.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use reprise_executor::link::provenance::{Counts, SealedBy};
use reprise_executor::pipeline::{Mode, RunOutcome, Source};
use reprise_executor::store::StoredResult;
use serde_json::{Value, json};

/// The summary of `outcome`, which took `took` in all.
pub fn of(outcome: &RunOutcome, mode: Mode, took: std::time::Duration) -> Value {
    let (how, source, replayed, verify) = match outcome {
        RunOutcome::Replayed(r, source) => ("replayed", source_json(source, r), Some(r), None),
        RunOutcome::Verified {
            replayed,
            source,
            ran,
            mismatch,
        } => (
            "verified",
            source_json(source, replayed),
            Some(&**replayed),
            Some(json!({ "ran": result_json(ran), "mismatch": mismatch })),
        ),
        RunOutcome::Ran(_) => ("ran", Value::Null, None, None),
        RunOutcome::Planned(_) => ("planned", Value::Null, None, None),
    };
    json!({
        "version": 1,
        "how": how,
        "mode": match mode {
            Mode::ReplayOrRun => "replay-or-run",
            Mode::ReplayOnly => "replay-only",
            Mode::Verify { .. } => "verify",
        },
        "exit_code": outcome.exit_code(),
        "elapsed_ms": took.as_millis() as u64,
        "source": source,
        "result": replayed.or(outcome.result()).map(result_json),
        "verify": verify,
    })
}

fn source_json(source: &Source, result: &StoredResult) -> Value {
    let counts = |c: &Counts| match c {
        Counts::Yes(why) => json!({ "answer": "yes", "why": why }),
        Counts::No(why) => json!({ "answer": "no", "why": why }),
        Counts::Unknown(why) => json!({ "answer": "unknown", "why": why }),
    };
    match source {
        Source::Local { by, counts: c } => json!({
            "from": "local store",
            "sealed_by": match by {
                SealedBy::Checked(w) | SealedBy::Unchecked(w) => Some(w.name.clone()),
                SealedBy::Nobody | SealedBy::Broken(_) => None,
            },
            "producer": source.producer_name(result),
            "counts": c.as_ref().map(counts),
        }),
        Source::Link {
            producer,
            counts: why,
            direct,
        } => json!({
            "from": "orchestrator",
            "direct": direct,
            "sealed_by": producer,
            "producer": producer,
            "counts": { "answer": "yes", "why": why },
        }),
    }
}

fn result_json(r: &StoredResult) -> Value {
    let m = &r.manifest;
    json!({
        "key": m.key,
        "outcome": m.outcome,
        "exit_code": m.exit_code,
        "namespace": m.inputs.namespace,
        "target": m.inputs.target,
        "commit": m.commit,
        "producer": m.producer,
        "produced_at": reprise_executor::text::utc_timestamp(m.created_at),
        "isolation": m.accel,
        "driver": m.inputs.driver,
        "network": m.inputs.network,
        "container_image": m.container_image,
        "took_ms": m.total_ms,
        "sealed": r.seal.is_some(),
    })
}

fn field<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The summary's rows: what a person reads, in order.
fn rows(summary: &Value) -> Vec<(&'static str, String)> {
    let r = |path: &[&str]| text_of(field(&summary["result"], path));
    let mut rows = vec![
        (
            "revision",
            format!(
                "{} target {} of {}",
                r(&["commit"]),
                r(&["target"]),
                r(&["namespace"])
            ),
        ),
        ("key", r(&["key"])),
    ];
    let how = text_of(&summary["how"]);
    let source = &summary["source"];
    rows.push((
        "how",
        match how.as_str() {
            "replayed" | "verified" => format!(
                "{how}: the result of {} from the {}",
                text_of(&source["producer"]),
                text_of(&source["from"])
            ),
            "ran" => "ran here (no result that counts was found)".into(),
            other => other.to_string(),
        },
    ));
    if how != "planned" {
        rows.push((
            "produced",
            format!(
                "{} by {}@{} in {:.1}s under {} ({}), network {}",
                r(&["produced_at"]),
                r(&["producer", "user"]),
                r(&["producer", "host"]),
                field(summary, &["result", "took_ms"]).as_u64().unwrap_or(0) as f64 / 1000.0,
                r(&["isolation"]),
                r(&["driver"]),
                if field(summary, &["result", "network"]).as_bool() == Some(true) {
                    "yes"
                } else {
                    "none"
                }
            ),
        ));
    }
    let counts = &source["counts"];
    rows.push((
        "counts",
        if counts.is_null() {
            match how.as_str() {
                "ran" => "this run's own result: it counts if this job's identity is trusted for the repository".into(),
                _ => "not asked".into(),
            }
        } else {
            format!("{}: {}", text_of(&counts["answer"]), text_of(&counts["why"]))
        },
    ));
    if let Some(verify) = summary["verify"].as_object() {
        rows.push((
            "verify",
            match &verify["mismatch"] {
                Value::Null => "the tests ran here again to the same verdict".into(),
                why => format!("MISMATCH: the replayed result {}", text_of(why)),
            },
        ));
    }
    rows.push(("exit", text_of(&summary["exit_code"])));
    rows
}

/// The summary as lines for the job log.
pub fn text(summary: &Value) -> String {
    let mut out = String::from("reprise: summary\n");
    for (name, value) in rows(summary) {
        out.push_str(&format!("  {name:<9} {value}\n"));
    }
    out
}

/// The summary as Markdown (GitHub's job summary).
pub fn markdown(summary: &Value) -> String {
    let mut out = String::from("### Reprise\n\n| | |\n| --- | --- |\n");
    for (name, value) in rows(summary) {
        let cell = value.replace('|', "\\|").replace('\n', " ");
        out.push_str(&format!("| {name} | {cell} |\n"));
    }
    out.push('\n');
    out
}

/// Writes `value` to `path` whole or not at all.
pub fn write_report(path: &Path, value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).expect("a JSON value serialises");
    text.push(b'\n');
    reprise_executor::paths::write_whole(path, &text, 0o644)
        .with_context(|| format!("while writing the report {}", path.display()))
}

/// Appends the Markdown summary to the file GitHub names in
/// `GITHUB_STEP_SUMMARY`.
pub fn append_step_summary(path: &Path, value: &Value) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("while opening GITHUB_STEP_SUMMARY {}", path.display()))?;
    file.write_all(markdown(value).as_bytes())
        .with_context(|| format!("while writing GITHUB_STEP_SUMMARY {}", path.display()))
}
