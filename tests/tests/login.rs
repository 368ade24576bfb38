//! `reprise login --ci`, `whoami` and `logout` as a CI job runs them: the
//! job's ID token asked for from a stand-in of GitHub Actions' token
//! endpoint (its documented request: `GET $ACTIONS_ID_TOKEN_REQUEST_URL
//! &audience=...` with the request token as bearer; answer `{"value":
//! ...}`), signed by a real OIDC issuer (`oauth2-mock-server`), exchanged
//! with a real orchestrator over QUIC, and then used to replay a trusted
//! peer's result in CI mode. No VM boots.
//!
//! People's `reprise login` through a real orchestrator and the GitHub and
//! GitLab stand-ins (`orchestrator/tests/forges/`, their documented
//! endpoints with a scripted person): a replay the grants allow and one
//! they refuse, denial and expiry, the team CA confirmed or refused,
//! renewal after the forge took access away, and revocation.

#[path = "../../orchestrator/tests/forges/mod.rs"]
mod forges;
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

// ---- People ----------------------------------------------------------

use forges::{FakeGithub, FakeGitlab, Script};
use team_support::{orchestrator, orchestrator_bin, serve_logged};

/// Which stand-in a person logs in with.
enum Stand {
    Github(FakeGithub),
    Gitlab(FakeGitlab),
}

impl Stand {
    /// Gives `user` read (GitLab: Reporter) or no access to `repo`.
    fn read(&self, user: &str, repo: &str, may: bool) {
        match self {
            Stand::Github(f) => {
                f.set_access(user, repo, if may { "read" } else { "none" });
            }
            Stand::Gitlab(f) => {
                f.set_access(user, repo, if may { "reporter" } else { "none" });
            }
        }
    }

    fn next_login(&self, script: Script) {
        match self {
            Stand::Github(f) => {
                f.next_login(script);
            }
            Stand::Gitlab(f) => {
                f.next_login(script);
            }
        }
    }

    fn user(&self, name: &str, id: u64) {
        match self {
            Stand::Github(f) => {
                f.user(name, id);
            }
            Stand::Gitlab(f) => {
                f.user(name, id);
            }
        }
    }

    fn settings(&self) -> String {
        match self {
            Stand::Github(f) => f.settings_toml(),
            Stand::Gitlab(f) => f.settings_toml(),
        }
    }

    fn provider(&self) -> &'static str {
        match self {
            Stand::Github(_) => "github",
            Stand::Gitlab(_) => "gitlab",
        }
    }

    fn host(&self) -> &'static str {
        match self {
            Stand::Github(_) => "github.com",
            Stand::Gitlab(_) => "gitlab.com",
        }
    }

    fn expires_in(&self, seconds: u64) {
        match self {
            Stand::Github(f) => {
                f.expires_in(seconds);
            }
            Stand::Gitlab(f) => {
                f.expires_in(seconds);
            }
        }
    }
}

/// A team on a forge stand-in: repositories acme/app, acme/lib and
/// acme/secret; trusted `alice` (hand-issued) serves a result of HEAD in
/// each from her daemon; `carol` may read acme/app and acme/lib on the
/// forge, not acme/secret.
struct People {
    _runtime: tokio::runtime::Runtime,
    stand: Stand,
    _dir: tempfile::TempDir,
    state: String,
    addr: String,
    fingerprint: String,
    log: std::path::PathBuf,
    a: Sandbox,
    _server: Killed,
    _daemon: Killed,
}

impl People {
    fn new(gitlab: bool) -> People {
        People::with_settings(gitlab, "")
    }

    /// A team whose `orchestrator.toml` starts with `extra`.
    fn with_settings(gitlab: bool, extra: &str) -> People {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let stand = if gitlab {
            Stand::Gitlab(runtime.block_on(FakeGitlab::start()))
        } else {
            Stand::Github(runtime.block_on(FakeGithub::start()))
        };
        let host = stand.host();
        stand.user("carol", 3003);
        stand.read("carol", "acme/app", true);
        stand.read("carol", "acme/lib", true);
        stand.read("bob", "acme/secret", true);

        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir
            .path()
            .join("orchestrator")
            .to_str()
            .expect("utf-8")
            .to_string();
        orchestrator(&["init", "--dir", &state]);
        let namespaces: Vec<String> = ["app", "lib", "secret"]
            .iter()
            .map(|r| format!("{host}/acme/{r}"))
            .collect();
        let mut settings = extra.to_string();
        for ns in &namespaces {
            settings.push_str(&format!("[policy.repos.\"{ns}\"]\n"));
        }
        settings.push_str(&stand.settings());
        fs::write(Path::new(&state).join("orchestrator.toml"), settings).expect("settings");
        let out = std::process::Command::new(orchestrator_bin())
            .args(["fingerprint", "--dir", &state])
            .output()
            .expect("fingerprint");
        let fingerprint = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string();
        let addr = format!("127.0.0.1:{}", team_support::free_udp_port());
        let log = dir.path().join("orchestrator.log");
        let server = serve_logged(&state, &addr, &log);

        // alice's results: the same tree under each repository's origin.
        let a = Sandbox::new();
        a.git_init();
        a.git(&["commit", "-q", "--allow-empty", "-m", "root"]);
        a.copy_from(&example_hello()).commit("hello");
        let alice = dir.path().join("alice.pem");
        let ns: Vec<&str> = namespaces.iter().map(String::as_str).collect();
        issue(&state, "alice", &ns, true, &alice);
        for r in ["app", "secret"] {
            let _ = a.reprise(&["--version"]);
            std::process::Command::new("git")
                .args(["remote", "remove", "origin"])
                .current_dir(a.repo())
                .output()
                .expect("git");
            a.git(&[
                "remote",
                "add",
                "origin",
                &format!("https://{host}/acme/{r}.git"),
            ]);
            assert_eq!(namespace(&a), format!("{host}/acme/{r}"));
            fabricate_result_for(&a, &format!("hello {r} from alice"), Some(&alice), "qemu");
        }
        let (daemon, _) = serving_daemon(&a, &addr, &alice, &dir.path().join("daemon.log"));
        People {
            _runtime: runtime,
            stand,
            _dir: dir,
            state,
            addr,
            fingerprint,
            log,
            a,
            _server: server,
            _daemon: daemon,
        }
    }

    /// A checkout of acme/`repo` on the forge.
    fn checkout(&self, repo: &str) -> Sandbox {
        let b = clone_of(&self.a);
        b.git(&[
            "remote",
            "set-url",
            "origin",
            &format!("https://{}/acme/{repo}.git", self.stand.host()),
        ]);
        b
    }

    /// `reprise ARGS` in `s`, no terminal, the login's credentials.
    fn reprise(&self, s: &Sandbox, args: &[&str]) -> Run {
        let out = s
            .reprise(args)
            .env_remove("REPRISE_CA_FINGERPRINT")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("reprise");
        Run::from(out)
    }

    /// `reprise login` with the team CA pinned.
    fn login(&self, s: &Sandbox) -> Run {
        self.reprise(
            s,
            &[
                "login",
                &self.addr,
                "--provider",
                self.stand.provider(),
                "--ca-fingerprint",
                &self.fingerprint,
            ],
        )
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn a_person_logs_in_and_replays_what_the_forge_lets_them_read(gitlab: bool) {
    let team = People::new(gitlab);
    let identity = if gitlab {
        "gitlab:gitlab.com:carol"
    } else {
        "github:carol"
    };
    let host = team.stand.host();
    let app = team.checkout("app");
    team.stand.next_login(Script::Approve {
        user: "carol",
        after_polls: 1,
    });
    let login = team.login(&app);
    login.expect_code(code::SUCCESS, "login");
    assert!(
        login.stderr.contains("to log in, open http://127.0.0.1:")
            && login.stderr.contains("and enter the code"),
        "the code is shown: {}",
        login.stderr
    );
    assert!(
        login
            .stderr
            .contains(&format!("logged in as {identity} until")),
        "{}",
        login.stderr
    );
    let creds = app.config().join("reprise/credentials.pem");
    assert_private(&creds);
    // The forge token never reaches the executor.
    let text = fs::read_to_string(&creds).expect("credentials");
    assert!(!text.contains("gho_") && !text.contains("glpat"), "{text}");

    let who = team.reprise(&app, &["whoami", "--json"]);
    who.expect_code(code::SUCCESS, "whoami");
    let who: Value = serde_json::from_str(&who.stdout).expect("whoami --json");
    assert_eq!(who["identity"], identity, "{who}");
    assert_eq!(
        who["repos"],
        json!([format!("{host}/acme/app"), format!("{host}/acme/lib")]),
        "{who}"
    );
    assert_eq!(
        who["counts_in"],
        json!([]),
        "readers' results do not count: {who}"
    );
    assert!(who["renews_from"].is_string(), "{who}");

    // A replay in a repository the grants allow.
    let run = team.reprise(&app, &["run", "--no-serve", "--mode", "replay-only"]);
    run.expect_code(code::SUCCESS, "replay in acme/app");
    assert!(run.replayed(), "{}", run.stderr);
    assert_eq!(run.stdout, "hello app from alice\n");

    // One they refuse: alice holds a result of acme/secret, which the
    // forge does not let carol read.
    let secret = team.checkout("secret");
    fs::create_dir_all(secret.config().join("reprise")).expect("config");
    for f in ["credentials.pem", "config.toml"] {
        fs::copy(
            app.config().join("reprise").join(f),
            secret.config().join("reprise").join(f),
        )
        .expect("copy credentials");
    }
    let run = team.reprise(&secret, &["run", "--no-serve", "--mode", "replay-only"]);
    run.expect_code(team_support::NOT_COUNTED, "replay in acme/secret");
    assert!(!run.stdout.contains("hello secret"), "{}", run.stdout);
    assert!(team.log().contains("person logged in"), "{}", team.log());
}

#[test]
fn a_person_logs_in_with_github_and_replays_only_what_github_lets_them_read() {
    a_person_logs_in_and_replays_what_the_forge_lets_them_read(false);
}

#[test]
fn a_person_logs_in_with_gitlab_and_replays_only_what_gitlab_lets_them_read() {
    a_person_logs_in_and_replays_what_the_forge_lets_them_read(true);
}

#[test]
fn denied_expired_and_unconfirmed_logins_say_why_with_their_exit_codes() {
    let team = People::new(false);
    let app = team.checkout("app");
    let creds = app.config().join("reprise/credentials.pem");

    team.stand.next_login(Script::Deny { after_polls: 1 });
    let run = team.login(&app);
    run.expect_code(code::LOGIN_REFUSED, "denied");
    assert!(run.stderr.contains("denied"), "{}", run.stderr);
    assert_eq!(
        run.stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "one line: {}",
        run.stderr
    );
    assert!(!creds.exists());

    team.stand.expires_in(2);
    team.stand.next_login(Script::Expire);
    let run = team.login(&app);
    run.expect_code(code::LOGIN_REFUSED, "expired");
    assert!(
        run.stderr.contains("expired") && run.stderr.contains("reprise login"),
        "{}",
        run.stderr
    );
    assert!(!creds.exists());
    team.stand.expires_in(60);

    // No pin and no terminal: the CA is named, nothing is sent.
    let run = team.reprise(&app, &["login", &team.addr]);
    run.expect_code(code::CA_UNCONFIRMED, "no terminal to confirm the CA on");
    assert!(
        run.stderr
            .contains(&format!("--ca-fingerprint {}", team.fingerprint)),
        "{}",
        run.stderr
    );
    // A pin the orchestrator does not match: refused, nothing sent.
    let wrong = "0".repeat(64);
    let run = team.reprise(&app, &["login", &team.addr, "--ca-fingerprint", &wrong]);
    run.expect_code(code::CA_UNCONFIRMED, "another CA than the pinned one");
    assert!(
        run.stderr.contains("does not present the pinned team CA"),
        "{}",
        run.stderr
    );
    assert!(!creds.exists());
    assert!(
        !app.config().join("reprise/known_orchestrators").exists(),
        "nothing confirmed is remembered"
    );
}

/// `reprise ARGS` in `s` on a terminal (`script` gives it one), typing
/// `input`; what the terminal showed.
fn in_terminal(s: &Sandbox, args: &[&str], input: &str) -> String {
    use std::io::{Read, Write};
    let cmd = std::iter::once(run_support::reprise_bin().display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .current_dir(s.repo())
        .env("XDG_DATA_HOME", s.data())
        .env("XDG_CONFIG_HOME", s.config())
        .env_remove("REPRISE_ORCHESTRATOR")
        .env_remove("REPRISE_CREDENTIALS")
        .env_remove("REPRISE_CA_FINGERPRINT")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("type");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let status = child.wait().expect("script");
    drop(stdin);
    let text = reader.join().expect("reader");
    assert!(status.code().is_some(), "{text}");
    text
}

#[test]
fn the_first_login_confirms_the_ca_on_the_terminal_and_remembers_it() {
    let team = People::new(false);
    let app = team.checkout("app");
    // `script` gives reprise a terminal; the person answers "y".
    team.stand.next_login(Script::Approve {
        user: "carol",
        after_polls: 0,
    });
    let out = in_terminal(&app, &["login", &team.addr], "y\n");
    assert!(out.contains(&team.fingerprint), "the CA is shown: {out}");
    assert!(out.contains("logged in as github:carol"), "{out}");
    let known =
        fs::read_to_string(app.config().join("reprise/known_orchestrators")).expect("remembered");
    assert_eq!(known.trim(), format!("{} {}", team.addr, team.fingerprint));
    // From then on no question: the remembered CA is pinned.
    team.stand.next_login(Script::Approve {
        user: "carol",
        after_polls: 0,
    });
    let run = team.reprise(&app, &["login", &team.addr]);
    run.expect_code(code::SUCCESS, "second login, no terminal needed");

    // "n" refuses.
    let other = team.checkout("app");
    let out = in_terminal(&other, &["login", &team.addr], "n\n");
    assert!(out.contains("not trusted; nothing was sent"), "{out}");
    assert!(!other.config().join("reprise/credentials.pem").exists());
}

#[test]
fn renewal_drops_what_the_forge_took_away_and_revocation_cuts_a_person_off() {
    let team = People::new(false);
    let app = team.checkout("app");
    team.stand.next_login(Script::Approve {
        user: "carol",
        after_polls: 0,
    });
    team.login(&app).expect_code(code::SUCCESS, "login");

    team.stand.read("carol", "acme/lib", false);
    let run = team.reprise(&app, &["login", "--renew"]);
    run.expect_code(code::SUCCESS, "renew");
    assert!(
        run.stderr.contains("renewed as github:carol")
            && run.stderr.contains("github.com/acme/app")
            && !run.stderr.contains("acme/lib"),
        "{}",
        run.stderr
    );
    let who = team.reprise(&app, &["whoami", "--json"]);
    let who: Value = serde_json::from_str(&who.stdout).expect("whoami --json");
    assert_eq!(who["repos"], json!(["github.com/acme/app"]), "{who}");

    // The administrator revokes carol: her replays stop at once.
    orchestrator(&["revoke", "--dir", &team.state, "--name", "github:carol"]);
    let run = team.reprise(&app, &["run", "--no-serve", "--mode", "replay-only"]);
    run.expect_code(
        team_support::NOT_COUNTED,
        "a revoked person replays nothing",
    );
    let run = team.reprise(&app, &["login", "--renew"]);
    run.expect_code(code::LOGIN_REFUSED, "a revoked person is not renewed");
}

#[test]
fn a_person_s_credentials_renew_themselves_in_the_last_quarter_of_their_lifetime() {
    // A one-minute certificate (backdated a minute for clocks that differ)
    // is due for renewal thirty seconds after it is issued.
    let team = People::with_settings(false, "[login]\ncertificate_lifetime = \"1m\"\n");
    let app = team.checkout("app");
    team.stand.next_login(Script::Approve {
        user: "carol",
        after_polls: 0,
    });
    team.login(&app).expect_code(code::SUCCESS, "login");
    let logged_in = std::time::Instant::now();
    let creds = app.config().join("reprise/credentials.pem");
    let first = fs::read_to_string(&creds).expect("credentials");
    let who = team.reprise(&app, &["whoami", "--json"]);
    let who: Value = serde_json::from_str(&who.stdout).expect("whoami --json");
    let first_expiry = who["expires_at"].clone();
    assert_eq!(who["repos"].as_array().map(Vec::len), Some(2), "{who}");

    // Meanwhile the forge takes acme/lib away from carol.
    team.stand.read("carol", "acme/lib", false);
    // Into the last quarter by the wall clock the credentials are checked
    // against, not by a monotonic sleep: a machine paused meanwhile (a VM
    // host may) comes back with its wall clock ahead of the sleep, and
    // the credentials expired when the run came (once in CI).
    let (not_before, not_after) = reprise_executor::link::credentials::Credentials::load(&creds)
        .and_then(|c| c.validity())
        .expect("the credentials' validity");
    let due = not_after - (not_after - not_before) / 4 + 2;
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    };
    while wall() < due {
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(
        wall() + 10 < not_after,
        "the wall clock passed the credentials' expiry while the test waited ({}s after login): was the machine paused?",
        logged_in.elapsed().as_secs()
    );
    let run = team.reprise(&app, &["run", "--no-serve", "--mode", "replay-only"]);
    run.expect_code(code::SUCCESS, "replay while the credentials are due");
    assert!(run.replayed(), "{}", run.stderr);
    let renewed = fs::read_to_string(&creds).expect("credentials");
    assert_ne!(renewed, first, "the run renewed the credentials on its way");
    assert_private(&creds);
    let who = team.reprise(&app, &["whoami", "--json"]);
    let who: Value = serde_json::from_str(&who.stdout).expect("whoami --json");
    assert_eq!(
        who["repos"],
        json!(["github.com/acme/app"]),
        "the renewal asked the forge again: {who}"
    );
    assert_ne!(who["expires_at"], first_expiry, "{who}");
    assert!(team.log().contains("renewal=true"), "{}", team.log());
    // The orchestrator's audit log shows the login and the renewal.
    let out = std::process::Command::new(orchestrator_bin())
        .args(["audit", "--dir", &team.state])
        .output()
        .expect("audit");
    let audit = String::from_utf8_lossy(&out.stdout);
    assert!(
        audit.contains("github:carol logged in")
            && audit.contains("github:carol renewed")
            && audit.contains("github.com/acme/app, github.com/acme/lib"),
        "{audit}"
    );
}

/// Panics unless only its owner may read `path` (mode 0600).
fn assert_private(path: &Path) {
    let mode = fs::metadata(path).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
}
