//! The forge client (`reprise_orchestrator::forge`) against the GitHub and
//! GitLab stand-ins (`forges/`): device flows the person approves, denies or
//! lets expire, `slow_down`, a wrong client id, access levels (GitLab nested
//! groups), losing access, and hostile repository names that must never
//! steer the token to another API path.

mod forges;

use forges::{FakeGithub, FakeGitlab, Script};
use reprise_orchestrator::forge::{Access, Forge, ForgeError, ForgeToken, Provider};

fn forge_of(toml: &str) -> Forge {
    let (forges, _) = Forge::from_toml(toml).expect("the stand-in's settings are valid");
    assert_eq!(forges.len(), 1);
    forges.into_iter().next().unwrap()
}

async fn login(forge: &Forge) -> Result<ForgeToken, ForgeError> {
    let device = forge.start().await?;
    forge.wait_for_token(&device).await
}

#[tokio::test]
async fn github_approve_gives_the_person_and_their_access() {
    let github = FakeGithub::start().await;
    github
        .user("alice", 1001)
        .set_access("alice", "acme/app", "maintain")
        .set_access("alice", "acme/lib", "pull")
        .set_access("alice", "acme/ops", "admin")
        .set_access("alice", "acme/web", "push")
        .set_access("alice", "acme/docs", "triage")
        .next_login(Script::Approve {
            user: "alice",
            after_polls: 2,
        });
    let forge = forge_of(&github.settings_toml());
    assert_eq!(forge.provider, Provider::Github);
    assert_eq!(forge.namespace("acme/app"), "github.com/acme/app");

    let device = forge.start().await.unwrap();
    assert_eq!(
        device.verification_uri,
        format!("{}/login/device", github.url())
    );
    assert_eq!(device.interval.as_secs(), 1);
    assert_eq!(device.user_code.len(), 9, "{:?}", device.user_code);
    let token = forge.wait_for_token(&device).await.unwrap();
    let stats = github.stats();
    assert_eq!(stats.scopes, ["repo"]);
    assert_eq!(stats.polls, 3, "two pending answers, then the token");
    assert_eq!(stats.too_soon, 0, "the client kept to the interval");

    let person = forge.person(&token).await.unwrap();
    assert_eq!((person.username.as_str(), person.id), ("alice", 1001));
    for (repo, want) in [
        ("acme/app", Access::Maintain),
        ("acme/lib", Access::Read),
        ("acme/ops", Access::Admin),
        ("acme/web", Access::Write),
        ("acme/docs", Access::Triage),
        ("acme/secret", Access::None),
        ("nobody/anything", Access::None),
    ] {
        assert_eq!(forge.access(&token, repo).await.unwrap(), want, "{repo}");
    }
    assert!(
        github
            .requests()
            .contains(&"GET /api/v3/repos/acme/app".to_string())
    );

    // An organization enforcing SAML single sign-on the token is not
    // authorized for hides the repository: no access, not an error.
    github.sso_protect("acme/ops");
    assert_eq!(
        forge.access(&token, "acme/ops").await.unwrap(),
        Access::None
    );
    // Over the rate limit is "try again later", not "no access".
    github.rate_limit(true);
    let error = forge.access(&token, "acme/app").await.unwrap_err();
    assert!(matches!(error, ForgeError::Unreachable(_)), "{error:?}");
    github.rate_limit(false);

    // Access lost on the forge shows at the next question.
    github.set_access("alice", "acme/app", "none");
    assert_eq!(
        forge.access(&token, "acme/app").await.unwrap(),
        Access::None
    );
    // A revoked token is a login refused, and says nothing of the token.
    github.revoke_tokens("alice");
    let error = forge.person(&token).await.unwrap_err();
    assert!(matches!(error, ForgeError::Denied), "{error:?}");
    assert!(!error.to_string().contains(&token.0));
}

#[tokio::test]
async fn gitlab_approve_maps_project_and_nested_group_access() {
    let gitlab = FakeGitlab::start().await;
    gitlab
        .user("bob", 2002)
        .user("eve", 2003)
        .project("acme/tools/app")
        .project("labs/x/proj")
        .project("other/thing")
        .set_access("bob", "acme/site", "maintainer")
        .set_access("bob", "acme/blog", "owner")
        .set_access("bob", "acme/wiki", "planner")
        .set_group_access("bob", "acme", "developer")
        .set_group_access("bob", "labs/x", "reporter")
        .set_group_access("eve", "other", "owner")
        .next_login(Script::Approve {
            user: "bob",
            after_polls: 1,
        });
    let forge = forge_of(&gitlab.settings_toml());
    assert_eq!(forge.provider, Provider::Gitlab);
    let device = forge.start().await.unwrap();
    assert_eq!(
        device.verification_uri_complete.as_deref(),
        Some(
            format!(
                "{}/oauth/device?user_code={}",
                gitlab.url(),
                device.user_code
            )
            .as_str()
        )
    );
    let token = forge.wait_for_token(&device).await.unwrap();
    assert_eq!(gitlab.stats().scopes, ["read_api"]);
    assert_eq!(gitlab.stats().too_soon, 0);
    let person = forge.person(&token).await.unwrap();
    assert_eq!((person.username.as_str(), person.id), ("bob", 2002));
    for (repo, want) in [
        // project_access 40, group_access (acme) 30: the higher
        ("acme/site", Access::Maintain),
        // nested, no membership of the project or of acme/tools: both
        // levels null, the developer role inherited from acme comes from
        // members/all
        ("acme/tools/app", Access::Write),
        // group_access of the project's own (nested) group
        ("labs/x/proj", Access::Read),
        ("acme/blog", Access::Admin),
        // project planner (15), group acme 30: the higher
        ("acme/wiki", Access::Write),
        // eve's group, not bob's
        ("other/thing", Access::None),
        ("acme/missing/deep/project", Access::None),
    ] {
        assert_eq!(forge.access(&token, repo).await.unwrap(), want, "{repo}");
    }
    let requests = gitlab.requests();
    for path in [
        "GET /api/v4/projects/acme%2Ftools%2Fapp",
        "GET /api/v4/projects/acme%2Ftools%2Fapp/members/all/2002",
    ] {
        assert!(requests.contains(&path.to_string()), "{path}: {requests:?}");
    }
    gitlab.rate_limit(true);
    let error = forge.access(&token, "acme/site").await.unwrap_err();
    assert!(matches!(error, ForgeError::Unreachable(_)), "{error:?}");
    gitlab.rate_limit(false);
    // Leaving the group: only the direct memberships remain.
    gitlab.set_group_access("bob", "acme", "none");
    for (repo, want) in [
        ("acme/wiki", Access::Guest),
        ("acme/site", Access::Maintain),
        ("acme/tools/app", Access::None),
    ] {
        assert_eq!(forge.access(&token, repo).await.unwrap(), want, "{repo}");
    }
}

#[tokio::test]
async fn denied_login_is_denied() {
    let github = FakeGithub::start().await;
    github.next_login(Script::Deny { after_polls: 1 });
    let error = login(&forge_of(&github.settings_toml())).await.unwrap_err();
    assert!(matches!(error, ForgeError::Denied), "{error:?}");

    let gitlab = FakeGitlab::start().await;
    gitlab.next_login(Script::Deny { after_polls: 0 });
    let error = login(&forge_of(&gitlab.settings_toml())).await.unwrap_err();
    assert!(matches!(error, ForgeError::Denied), "{error:?}");
    assert_eq!(gitlab.stats().tokens, 0);
}

#[tokio::test]
async fn a_code_nobody_approves_expires() {
    let github = FakeGithub::start().await;
    github.expires_in(3).next_login(Script::Expire);
    let gitlab = FakeGitlab::start().await;
    gitlab.expires_in(3).next_login(Script::Expire);
    let (on_github, on_gitlab) = (
        forge_of(&github.settings_toml()),
        forge_of(&gitlab.settings_toml()),
    );
    let (a, b) = tokio::join!(login(&on_github), login(&on_gitlab));
    for error in [a.unwrap_err(), b.unwrap_err()] {
        assert!(matches!(error, ForgeError::Expired), "{error:?}");
    }
    assert_eq!(github.stats().tokens + gitlab.stats().tokens, 0);
}

#[tokio::test]
async fn slow_down_makes_the_client_poll_less_often() {
    let github = FakeGithub::start().await;
    github
        .user("carol", 3003)
        .next_login(Script::SlowDownThenApprove {
            user: "carol",
            after_polls: 1,
        });
    let gitlab = FakeGitlab::start().await;
    gitlab
        .user("carol", 3003)
        .next_login(Script::SlowDownThenApprove {
            user: "carol",
            after_polls: 0,
        });
    let (on_github, on_gitlab) = (
        forge_of(&github.settings_toml()),
        forge_of(&gitlab.settings_toml()),
    );
    let (a, b) = tokio::join!(login(&on_github), login(&on_gitlab));
    a.unwrap();
    b.unwrap();
    for stats in [github.stats(), gitlab.stats()] {
        // One scripted slow_down; had the client not waited the longer
        // interval (6 s) afterwards, the stand-in would have answered
        // slow_down again.
        assert_eq!(stats.slow_downs, 1, "{stats:?}");
        assert_eq!(stats.too_soon, 0, "{stats:?}");
        assert_eq!(stats.intervals, [6], "{stats:?}");
        assert_eq!(stats.tokens, 1);
    }
}

#[tokio::test]
async fn a_wrong_client_id_is_the_applications_fault() {
    let github = FakeGithub::start().await;
    let gitlab = FakeGitlab::start().await;
    let wrong = |toml: String, id: &str| toml.replace(id, "not-our-app");
    for toml in [
        wrong(github.settings_toml(), &github.client_id()),
        wrong(gitlab.settings_toml(), &gitlab.client_id()),
    ] {
        let error = forge_of(&toml).start().await.unwrap_err();
        assert!(matches!(error, ForgeError::Client(_)), "{error:?}");
    }

    // The token endpoint refuses it too: GitHub with status 200
    // (incorrect_client_credentials), GitLab with 401 (invalid_client).
    for (right, wrong) in [
        (
            github.settings_toml(),
            wrong(github.settings_toml(), &github.client_id()),
        ),
        (
            gitlab.settings_toml(),
            wrong(gitlab.settings_toml(), &gitlab.client_id()),
        ),
    ] {
        let device = forge_of(&right).start().await.unwrap();
        let error = forge_of(&wrong).wait_for_token(&device).await.unwrap_err();
        assert!(matches!(error, ForgeError::Client(_)), "{error:?}");
        assert!(!error.to_string().contains(&device.device_code));
    }
}

/// Names that would move the request to another API path if pasted into
/// the URL: each is refused before anything is sent.
#[tokio::test]
async fn hostile_repository_names_never_steer_the_token() {
    let github = FakeGithub::start().await;
    github
        .user("mallory", 666)
        .set_access("mallory", "acme/app", "pull")
        .next_login(Script::Approve {
            user: "mallory",
            after_polls: 0,
        });
    let gitlab = FakeGitlab::start().await;
    gitlab
        .user("mallory", 666)
        .set_access("mallory", "acme/app", "reporter")
        .next_login(Script::Approve {
            user: "mallory",
            after_polls: 0,
        });
    let hostile = [
        "acme/../../user",
        "../user",
        "acme/..",
        "./acme",
        "acme/app/../../../user",
        "acme/app?per_page=1",
        "acme/app#x",
        "acme%2F..%2F..%2Fuser",
        "acme/app%00",
        "acme/ap p",
        "acme/app\n",
        "acme\\..\\user",
        "acme//app",
        "/acme/app",
        "acme/app/",
        "acme",
        "",
        "@evil.example/app",
        "acme/app;x",
        "ácme/app",
    ];
    for (forge, requests) in [
        (
            forge_of(&github.settings_toml()),
            Box::new(|| github.requests()) as Box<dyn Fn() -> Vec<String>>,
        ),
        (
            forge_of(&gitlab.settings_toml()),
            Box::new(|| gitlab.requests()),
        ),
    ] {
        let token = login(&forge).await.unwrap();
        assert_eq!(
            forge.access(&token, "acme/app").await.unwrap(),
            Access::Read
        );
        let before = requests();
        for name in hostile {
            let error = forge.access(&token, name).await.unwrap_err();
            assert!(
                matches!(error, ForgeError::Config(_)),
                "{name:?}: {error:?}"
            );
        }
        // GitHub names have exactly two parts.
        if forge.provider == Provider::Github {
            let error = forge.access(&token, "acme/app/user").await.unwrap_err();
            assert!(matches!(error, ForgeError::Config(_)), "{error:?}");
        }
        assert_eq!(requests(), before, "a hostile name reached the forge");
    }
}

#[tokio::test]
async fn an_unreachable_forge_is_unreachable_and_the_error_holds_no_token() {
    let github = FakeGithub::start().await;
    let forge = forge_of(&github.settings_toml());
    drop(github);
    // Give the stand-in's task the moment it needs to close its listener.
    let token = ForgeToken("gho_secret0123456789".into());
    let mut error = None;
    for _ in 0..50 {
        match forge.person(&token).await {
            Err(e @ ForgeError::Unreachable(_)) => {
                error = Some(e);
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let error = error.expect("the closed stand-in is unreachable");
    assert!(!error.to_string().contains("gho_secret"), "{error}");
}
