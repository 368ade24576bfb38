//! `reprise login --ci`, `whoami` and `logout` as a CI job runs them: the
//! job's ID token asked for from a stand-in of GitHub Actions' token
//! endpoint (its documented request: `GET $ACTIONS_ID_TOKEN_REQUEST_URL
//! &audience=...` with the request token as bearer; answer `{"value":
//! ...}`), signed by a real OIDC issuer (`oauth2-mock-server`), exchanged
//! with a real orchestrator over QUIC, and then used to replay a trusted
//! peer's result in CI mode. No VM boots.

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

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use issuer::TestIssuer;
use reprise_protocol::exit as code;
use run_support::{Run, Sandbox, example_hello};
use serde_json::{Value, json};
use team_support::{
    CiOrchestrator, Killed, REQUEST_TOKEN, TokenEndpoint, ci_orchestrator, clone_of,
    fabricate_result_for, issue, namespace, serving_daemon,
};

/// A team whose orchestrator takes GitHub Actions logins of repository
/// `team/app` (namespace `example.com/team/app`), and whose trusted
/// `alice` serves a result of HEAD from her daemon.
struct Team {
    _dir: tempfile::TempDir,
    state: String,
    addr: String,
    fingerprint: String,
    issuer: TestIssuer,
    a: Sandbox,
    _orchestrator: CiOrchestrator,
    _daemon: Killed,
}

const ORIGIN: &str = "https://example.com/team/app.git";

impl Team {
    fn new() -> Team {
        let issuer = TestIssuer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let orchestrator = ci_orchestrator(dir.path(), "github", &issuer.url);
        let (state, addr, fingerprint) = (
            orchestrator.state.clone(),
            orchestrator.addr.clone(),
            orchestrator.fingerprint.clone(),
        );

        let a = Sandbox::new();
        a.git_init();
        a.git(&["remote", "add", "origin", ORIGIN]);
        a.git(&["commit", "-q", "--allow-empty", "-m", "root"]);
        a.copy_from(&example_hello()).commit("hello");
        assert_eq!(namespace(&a), "example.com/team/app");
        let alice = dir.path().join("alice.pem");
        issue(&state, "alice", &["example.com/team/app"], true, &alice);
        fabricate_result_for(&a, "hello from alice", Some(&alice), "qemu");
        let (daemon, _) = serving_daemon(&a, &addr, &alice, &dir.path().join("daemon.log"));
        Team {
            _dir: dir,
            state,
            addr,
            fingerprint,
            issuer,
            a,
            _orchestrator: orchestrator,
            _daemon: daemon,
        }
    }

    /// A GitHub Actions token of a job of `team/app` on `git_ref`.
    fn token(&mut self, git_ref: &str, protected: bool, extra: Value) -> String {
        let mut claims = json!({
            "aud": format!("reprise://{}", self.addr),
            "sub": format!("repo:team/app:ref:{git_ref}"),
            "repository": "team/app",
            "repository_owner": "team",
            "ref": git_ref,
            "ref_type": "branch",
            "ref_protected": if protected { "true" } else { "false" },
            "event_name": "push",
        });
        claims
            .as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        self.issuer
            .token_of(json!({"op": "sign", "claims": claims}))
    }

    fn log(&self) -> String {
        fs::read_to_string(&self._orchestrator.log).unwrap_or_default()
    }

    /// A CI job's checkout of the repository, its origin the forge's.
    fn job(&self) -> Sandbox {
        let job = clone_of(&self.a);
        job.git(&["remote", "set-url", "origin", ORIGIN]);
        job
    }

    /// `reprise ARGS` in `job` as a GitHub Actions job whose token
    /// endpoint is `endpoint`.
    fn in_job(&self, job: &Sandbox, endpoint: &TokenEndpoint, args: &[&str]) -> Run {
        let out = job
            .reprise(args)
            .env("CI", "true")
            .env("GITHUB_ACTIONS", "true")
            .env("ACTIONS_ID_TOKEN_REQUEST_URL", &endpoint.url)
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN)
            .env("REPRISE_ORCHESTRATOR", &self.addr)
            .env("REPRISE_CA_FINGERPRINT", &self.fingerprint)
            .output()
            .expect("reprise");
        Run::from(out)
    }
}

#[test]
fn a_ci_job_logs_in_with_its_token_replays_what_counts_and_logs_out() {
    let mut team = Team::new();
    let token = team.token("refs/heads/main", true, json!({}));
    let endpoint = TokenEndpoint::serve(token.clone(), format!("reprise://{}", team.addr));
    let job = team.job();

    let login = team.in_job(&job, &endpoint, &["login", "--ci"]);
    login.expect_code(code::SUCCESS, "login");
    assert!(
        login
            .stderr
            .contains("logged in as ci:github:team/app@refs/heads/main until")
            && login
                .stderr
                .contains("example.com/team/app (its results count for CI)"),
        "{}",
        login.stderr
    );
    let asked = endpoint.asked.lock().expect("log").clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0]
            .starts_with("GET /_apis/token?api-version=2.0&audience=reprise%3A%2F%2F127.0.0.1%3A"),
        "the documented request, audience appended: {asked:?}"
    );
    // The token is in no output, no file and no log.
    let config_dir = job.config().join("reprise");
    for (what, text) in [
        ("stderr", login.stderr.clone()),
        ("stdout", login.stdout.clone()),
        ("orchestrator log", team.log()),
        (
            "credentials",
            fs::read_to_string(config_dir.join("credentials.pem")).expect("credentials"),
        ),
        (
            "config",
            fs::read_to_string(config_dir.join("config.toml")).expect("config"),
        ),
    ] {
        assert!(!text.contains(&token), "the token leaked into the {what}");
    }
    for file in ["credentials.pem", "config.toml"] {
        let mode = fs::metadata(config_dir.join(file))
            .expect(file)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    assert!(team.log().contains("CI job logged in"), "{}", team.log());

    let who = team.in_job(&job, &endpoint, &["whoami", "--json"]);
    who.expect_code(code::SUCCESS, "whoami");
    let who: Value = serde_json::from_str(&who.stdout).expect("whoami --json");
    assert_eq!(
        who["identity"], "ci:github:team/app@refs/heads/main",
        "{who}"
    );
    assert_eq!(who["repos"], json!(["example.com/team/app"]), "{who}");
    assert_eq!(who["counts_for_ci"], true, "{who}");
    assert_eq!(who["expired"], false, "{who}");

    // The job's run finds the login's credentials by itself (no
    // REPRISE_CREDENTIALS) and replays alice's result, which counts.
    let run = team.in_job(&job, &endpoint, &["run", "--ci", "--mode", "replay-only"]);
    run.expect_code(code::SUCCESS, "CI replay with the login's certificate");
    assert!(run.replayed() && !run.ran_here(), "{}", run.stderr);
    assert_eq!(run.stdout, "hello from alice\n");

    let out = team.in_job(&job, &endpoint, &["logout"]);
    out.expect_code(code::SUCCESS, "logout");
    assert!(!config_dir.join("credentials.pem").exists());
    assert!(!config_dir.join("config.toml").exists());
    let who = team.in_job(&job, &endpoint, &["whoami"]);
    who.expect_code(code::LOGIN_REFUSED, "whoami after logout");
    assert!(who.stderr.contains("not logged in"), "{}", who.stderr);
    let _ = &team.state;
}

#[test]
fn refused_logins_exit_with_their_code_and_write_nothing() {
    let mut team = Team::new();
    let job = team.job();
    let config_dir = job.config().join("reprise");

    // A token for another service.
    let elsewhere = team.token(
        "refs/heads/main",
        true,
        json!({"aud": "https://elsewhere.example"}),
    );
    let endpoint = TokenEndpoint::serve(elsewhere, format!("reprise://{}", team.addr));
    let run = team.in_job(&job, &endpoint, &["login", "--ci"]);
    run.expect_code(code::LOGIN_REFUSED, "a token for another audience");
    assert!(run.stderr.contains("audience"), "{}", run.stderr);
    assert!(!config_dir.join("credentials.pem").exists());

    // The job asks for the wrong audience: the CI system refuses it.
    let token = team.token("refs/heads/main", true, json!({}));
    let endpoint = TokenEndpoint::serve(token, format!("reprise://{}", team.addr));
    let run = team.in_job(
        &job,
        &endpoint,
        &["login", "--ci", "--audience", "something-else"],
    );
    run.expect_code(code::LOGIN_REFUSED, "the CI system refuses");
    assert!(run.stderr.contains("HTTP 400"), "{}", run.stderr);

    // No pin: nothing is sent, and the fingerprint to check is named.
    let out = job
        .reprise(&["login", "--ci", &team.addr])
        .env("CI", "true")
        .env("REPRISE_ID_TOKEN", "a.b.c")
        .env_remove("REPRISE_CA_FINGERPRINT")
        .output()
        .expect("reprise");
    let run = Run::from(out);
    run.expect_code(code::USAGE, "no pinned CA");
    assert!(run.stderr.contains(&team.fingerprint), "{}", run.stderr);
    assert!(!config_dir.join("credentials.pem").exists());

    // Credentials that expired: one line saying to log in again.
    let short = tempfile::tempdir().expect("dir");
    let expired_pem = short.path().join("expired.pem");
    orchestrator_with_lifetime(&team.state, &expired_pem);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = job
        .reprise(&["whoami"])
        .env("REPRISE_ORCHESTRATOR", &team.addr)
        .env("REPRISE_CREDENTIALS", &expired_pem)
        .output()
        .expect("reprise");
    let run = Run::from(out);
    run.expect_code(code::LOGIN_REFUSED, "expired credentials");
    assert!(run.stdout.contains("log in again"), "{}", run.stdout);
}

/// Credentials valid for one second, issued by hand through the library.
fn orchestrator_with_lifetime(state: &str, out: &Path) {
    let folder = reprise_orchestrator::Folder::open(Path::new(state)).expect("folder");
    let now = time::OffsetDateTime::now_utc();
    let pem = folder
        .issue(
            "short-lived",
            &["example.com/team/app".to_string()],
            false,
            Some((
                now - time::Duration::minutes(1),
                now + time::Duration::seconds(1),
            )),
        )
        .expect("issue");
    fs::write(out, pem).expect("write");
}
