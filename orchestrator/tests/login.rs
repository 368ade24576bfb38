//! CI jobs log in with their OIDC ID token (`reprise_orchestrator::login`)
//! over real QUIC on loopback, the tokens signed by a real, independently
//! written issuer (`oauth2-mock-server`, see `issuer/`): the certificate a
//! job gets, what it grants and whether it counts, and every login that
//! must be refused. People log in through the GitHub and GitLab stand-ins
//! (`forges/`, their documented endpoints with a scripted person): what
//! they are granted and what counts, denial and expiry, renewal after the
//! forge took access away, revocation, and an orchestrator that answers a
//! certificate the executor must not store.

mod forges;
mod issuer;

use std::fs;
use std::net::SocketAddr;
use std::sync::Arc;

use issuer::TestIssuer;
use reprise_executor::link::login::{self, CaPin, LoginError};
use reprise_executor::link::{Credentials, Link, LinkError, read_message, write_message};
use reprise_orchestrator::telemetry::{Refusal, Telemetry};
use reprise_orchestrator::{Folder, server};
use reprise_protocol::wire::{ErrorCode, Message, PROTOCOL_VERSION, Secret, login_proof_bytes};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;

const AUDIENCE: &str = "reprise://orchestrator.test";

/// An orchestrator on loopback whose `[ci.github]` issuer is `issuer`.
struct Service {
    _dir: TempDir,
    folder: Folder,
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), server::ServeError>>>,
}

impl Service {
    async fn start(settings: &str) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let folder = Folder::init(&dir.path().join("orch"), &[]).unwrap();
        fs::write(dir.path().join("orch/orchestrator.toml"), settings).unwrap();
        let endpoint = quinn::Endpoint::server(
            folder.server_config().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let service = folder.service().unwrap();
        let telemetry = service.telemetry.clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server::run(endpoint, service, async {
            let _ = rx.await;
        }));
        Service {
            _dir: dir,
            folder,
            addr,
            telemetry,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn pin(&self) -> CaPin {
        CaPin(self.folder.ca_fingerprint().unwrap())
    }

    async fn login(&self, token: &str) -> Result<login::LoggedIn, LoginError> {
        login::exchange_token(
            &self.addr.to_string(),
            Some(self.pin()),
            &Secret(token.to_string()),
        )
        .await
    }

    /// The identities the orchestrator recorded (logins included).
    fn identities(&self) -> Vec<reprise_orchestrator::state::Identity> {
        self.folder.state().unwrap().identities().unwrap()
    }

    fn refused(&self, why: Refusal) -> u64 {
        self.telemetry
            .snapshot()
            .refusals
            .iter()
            .find(|(r, _)| *r == why)
            .map_or(0, |(_, n)| *n)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// The orchestrator's reason for refusing a login that must be refused.
fn refusal(got: Result<login::LoggedIn, LoginError>) -> String {
    match got {
        Err(LoginError::Refused(message)) => message,
        other => panic!("a refusal, not {other:?}"),
    }
}

fn settings(issuer: &TestIssuer, extra: &str) -> String {
    format!(
        "[ci.github]\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\nallow_http_loopback = true\nhost = \"example.com\"\n{extra}",
        issuer.url
    )
}

/// A GitHub Actions token for `team/app` on `git_ref`, with `extra` claims.
fn token(issuer: &mut TestIssuer, git_ref: &str, protected: bool, extra: Value) -> String {
    let mut claims = json!({
        "aud": AUDIENCE,
        "sub": format!("repo:team/app:ref:{git_ref}"),
        "repository": "team/app",
        "repository_owner": "team",
        "ref": git_ref,
        "ref_type": "branch",
        "ref_protected": if protected { "true" } else { "false" },
        "event_name": "push",
        "job_workflow_ref": format!("team/app/.github/workflows/ci.yml@{git_ref}"),
    });
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    issuer.token_of(json!({"op": "sign", "claims": claims}))
}

#[tokio::test]
async fn a_ci_job_gets_a_short_lived_certificate_for_its_repository_only() {
    let mut issuer = TestIssuer::start();
    let service =
        Service::start(&settings(&issuer, "[ci]\ncertificate_lifetime = \"30m\"\n")).await;

    let main = token(&mut issuer, "refs/heads/main", true, json!({}));
    let logged = service.login(&main).await.unwrap();
    assert_eq!(logged.identity, "ci:github:team/app@refs/heads/main");
    assert_eq!(logged.repos, ["example.com/team/app"]);
    assert!(logged.trusted, "a protected ref's job counts by default");
    let now = reprise_orchestrator::state::now_secs();
    assert!(
        logged.expires_at > now + 25 * 60 && logged.expires_at <= now + 31 * 60,
        "the configured lifetime: {} vs now {now}",
        logged.expires_at
    );

    // The credentials work as hand-issued ones do: the certificate names
    // the job, chains to the team CA, and the connection is welcomed with
    // exactly the job's repository.
    let creds = Arc::new(Credentials::from_pem(&logged.credentials_pem).unwrap());
    let me = creds.identity().unwrap();
    assert_eq!(me.name, logged.identity);
    assert_eq!(me.not_after, logged.expires_at);
    let link = Link::connect(&service.addr.to_string(), creds)
        .await
        .unwrap();
    assert_eq!(link.identity(), "ci:github:team/app@refs/heads/main");
    assert_eq!(link.repos(), ["example.com/team/app"]);
    assert!(link.trusted());
    link.close().await;

    // A pull request's branch is not protected: the job may read and
    // replay, its own results do not count.
    let branch = token(&mut issuer, "refs/heads/feature", false, json!({}));
    let pr = service.login(&branch).await.unwrap();
    assert!(!pr.trusted);
    assert_eq!(pr.repos, ["example.com/team/app"]);

    // The identities are recorded like hand-issued ones, with their expiry.
    let ids = service.identities();
    let main_id = ids
        .iter()
        .find(|i| i.grant.name == "ci:github:team/app@refs/heads/main")
        .unwrap();
    assert_eq!(main_id.certificates[0].not_after, Some(logged.expires_at));
    service.stop().await;
}

#[tokio::test]
async fn the_repository_policy_decides_which_jobs_count() {
    let mut issuer = TestIssuer::start();
    let policy = "[policy]\nci_jobs = \"none\"\n[policy.repos.\"example.com/team/app\"]\nci_jobs = \"all\"\n";
    let service = Service::start(&format!("{policy}{}", settings(&issuer, ""))).await;
    let branch = token(&mut issuer, "refs/heads/feature", false, json!({}));
    assert!(
        service.login(&branch).await.unwrap().trusted,
        "ci_jobs = all"
    );
    service.stop().await;

    let service = Service::start(&format!(
        "[policy]\nci_jobs = \"none\"\n{}",
        settings(&issuer, "")
    ))
    .await;
    let main = token(&mut issuer, "refs/heads/main", true, json!({}));
    assert!(
        !service.login(&main).await.unwrap().trusted,
        "ci_jobs = none"
    );
    service.stop().await;
}

#[tokio::test]
async fn logins_that_must_fail_are_refused_and_say_why() {
    let mut issuer = TestIssuer::start();
    let service = Service::start(&settings(&issuer, "")).await;
    let now = reprise_orchestrator::state::now_secs();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            token(
                &mut issuer,
                "refs/heads/main",
                true,
                json!({"exp": now - 600, "iat": now - 900, "nbf": now - 900}),
            ),
            "expired",
        ),
        (
            "another service's audience",
            token(
                &mut issuer,
                "refs/heads/main",
                true,
                json!({"aud": "https://elsewhere"}),
            ),
            "audience",
        ),
        (
            "signed by a key the issuer never published",
            issuer.token_of(json!({"op": "sign_unpublished", "claims": {"aud": AUDIENCE}})),
            "key",
        ),
        (
            "alg none",
            issuer.token_of(
                json!({"op": "forge_none", "claims": {"aud": AUDIENCE, "repository": "team/app"}}),
            ),
            "none",
        ),
        ("not a JWT", "not-a-token".to_string(), "not a JWT"),
    ];
    for (what, token, expected) in &cases {
        let message = refusal(service.login(token).await);
        assert!(
            message.to_lowercase().contains(&expected.to_lowercase()),
            "{what}: {message}"
        );
    }
    assert_eq!(service.refused(Refusal::Login), cases.len() as u64);
    let ids = service.identities();
    assert!(ids.is_empty(), "no refused login is recorded: {ids:?}");

    // An administrator revoked the job identity: later jobs stay out.
    let main = token(&mut issuer, "refs/heads/main", true, json!({}));
    service.login(&main).await.unwrap();
    service
        .folder
        .revoke("ci:github:team/app@refs/heads/main")
        .unwrap();
    let again = token(&mut issuer, "refs/heads/main", true, json!({}));
    let message = refusal(service.login(&again).await);
    assert!(
        message.contains("was revoked") && message.contains("revoke --lift"),
        "{message}"
    );
    service.stop().await;
}

#[tokio::test]
async fn the_wrong_orchestrator_never_sees_the_token() {
    let mut issuer = TestIssuer::start();
    let service = Service::start(&settings(&issuer, "")).await;
    let main = token(&mut issuer, "refs/heads/main", true, json!({}));
    let other_ca = reprise_orchestrator::pki::new_ca().unwrap();
    let wrong = CaPin::from_pem(&other_ca.cert).unwrap();
    let got = login::exchange_token(
        &service.addr.to_string(),
        Some(wrong),
        &Secret(main.clone()),
    )
    .await;
    match got {
        Err(LoginError::WrongCa { want, seen }) => {
            assert_eq!(want, wrong.0);
            assert_eq!(seen, Some(service.pin().0), "says which CA it saw");
        }
        other => panic!("{other:?}"),
    }
    // No pin at all: nothing is sent either, and the CA seen is named.
    let got = login::exchange_token(&service.addr.to_string(), None, &Secret(main)).await;
    assert!(
        matches!(got, Err(LoginError::NoPin { seen: Some(fp) }) if fp == service.pin().0),
        "{got:?}"
    );
    assert_eq!(service.refused(Refusal::Login), 0, "no login reached it");
    assert!(service.identities().is_empty());
    service.stop().await;
}

/// A connection without a client certificate, as an attacker would open.
async fn anonymous(service: &Service) -> (quinn::Endpoint, quinn::Connection) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            reprise_orchestrator::pki::certs(&service.folder.ca_pem().unwrap()).unwrap()[0].clone(),
        )
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![reprise_protocol::wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(service.addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

async fn ask(conn: &quinn::Connection, m: &Message) -> Message {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_message(&mut send, m).await.unwrap();
    send.finish().unwrap();
    read_message(&mut recv).await.unwrap()
}

#[tokio::test]
async fn a_connection_without_a_certificate_may_only_log_in_with_its_own_key() {
    let mut issuer = TestIssuer::start();
    let service = Service::start(&settings(&issuer, "")).await;

    // Hello (or any request) without a certificate is refused.
    let (_e, conn) = anonymous(&service).await;
    match ask(
        &conn,
        &Message::Hello {
            version: PROTOCOL_VERSION,
        },
    )
    .await
    {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::HelloFirst);
            assert!(message.contains("may only log in"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // A valid token with a proof made by another key than the one the
    // certificate would name: refused, nothing recorded.
    let main = token(&mut issuer, "refs/heads/main", true, json!({}));
    let rng = SystemRandom::new();
    let key_of = || {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap()
    };
    let (victim, attacker) = (key_of(), key_of());
    let proof = attacker.sign(&rng, &login_proof_bytes(&main)).unwrap();
    let (_e, conn) = anonymous(&service).await;
    let answer = ask(
        &conn,
        &Message::Login {
            version: PROTOCOL_VERSION,
            token: Secret(main.clone()),
            public_key: reprise_protocol::hex::encode(victim.public_key().as_ref()),
            proof: reprise_protocol::hex::encode(proof.as_ref()),
        },
    )
    .await;
    assert!(
        matches!(&answer, Message::Error { message, .. } if message.contains("does not verify")),
        "{answer:?}"
    );
    // A proof made for another token proves nothing for this one.
    let other = token(
        &mut issuer,
        "refs/heads/main",
        true,
        json!({"jti": "another"}),
    );
    assert_ne!(other, main);
    let proof = victim.sign(&rng, &login_proof_bytes(&other)).unwrap();
    let (_e, conn) = anonymous(&service).await;
    let answer = ask(
        &conn,
        &Message::Login {
            version: PROTOCOL_VERSION,
            token: Secret(main),
            public_key: reprise_protocol::hex::encode(victim.public_key().as_ref()),
            proof: reprise_protocol::hex::encode(proof.as_ref()),
        },
    )
    .await;
    assert!(matches!(&answer, Message::Error { .. }), "{answer:?}");
    assert!(service.identities().is_empty());
    service.stop().await;

    // An orchestrator without [ci] says it takes no CI logins.
    let plain = Service::start("").await;
    let main = token(&mut issuer, "refs/heads/main", true, json!({}));
    let message = refusal(plain.login(&main).await);
    assert!(message.contains("takes no CI logins"), "{message}");
    plain.stop().await;
}

#[tokio::test]
async fn an_expired_job_certificate_is_refused_with_a_log_in_again() {
    let mut issuer = TestIssuer::start();
    let service = Service::start(&settings(&issuer, "[ci]\ncertificate_lifetime = \"2s\"\n")).await;
    let main = token(&mut issuer, "refs/heads/main", true, json!({}));
    let logged = service.login(&main).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let creds = Credentials::from_pem(&logged.credentials_pem).unwrap();
    match creds.unexpired() {
        Err(LinkError::Expired(at)) => assert_eq!(at, logged.expires_at),
        other => panic!("{other:?}"),
    }
    service.stop().await;
}

// ---- People ----------------------------------------------------------

use forges::{FakeGithub, FakeGitlab, Script};

/// `[policy.repos]` tables naming `namespaces` (the team's repositories).
fn team(namespaces: &[&str]) -> String {
    namespaces
        .iter()
        .map(|ns| format!("[policy.repos.\"{ns}\"]\n"))
        .collect()
}

impl Service {
    async fn person(
        &self,
        provider: &str,
    ) -> (Result<login::LoggedIn, LoginError>, Vec<login::LoginCode>) {
        let mut codes = Vec::new();
        let got = login::person_login(&self.addr.to_string(), self.pin(), provider, &mut |c| {
            codes.push(c.clone())
        })
        .await;
        (got, codes)
    }
}

/// The GitHub stand-in with alice (maintain on acme/app, read on
/// acme/lib, nothing on acme/secret) and an orchestrator whose team has
/// those three repositories.
async fn github_team(extra: &str) -> (FakeGithub, Service) {
    let github = FakeGithub::start().await;
    github
        .user("alice", 1001)
        .set_access("alice", "acme/app", "maintain")
        .set_access("alice", "acme/lib", "read")
        .set_access("bob", "acme/secret", "admin");
    let settings = format!(
        "{extra}{}{}",
        team(&[
            "github.com/acme/app",
            "github.com/acme/lib",
            "github.com/acme/secret"
        ]),
        github.settings_toml()
    );
    let service = Service::start(&settings).await;
    (github, service)
}

#[tokio::test]
async fn a_person_logs_in_with_github_and_is_granted_what_the_forge_lets_them_read() {
    let (github, service) = github_team("").await;
    github.next_login(Script::Approve {
        user: "alice",
        after_polls: 1,
    });
    let (got, codes) = service.person("github").await;
    let logged = got.unwrap();
    assert_eq!(
        codes.len(),
        1,
        "the code is shown once, before the approval"
    );
    assert!(
        codes[0].verification_uri.starts_with(&github.url()),
        "{codes:?}"
    );
    assert_eq!(logged.identity, "github:alice");
    assert_eq!(logged.repos, ["github.com/acme/app", "github.com/acme/lib"]);
    assert_eq!(
        logged.counts,
        ["github.com/acme/app"],
        "maintainers count by default, readers do not"
    );
    let now = reprise_orchestrator::state::now_secs();
    assert!(
        logged.expires_at > now + 11 * 3600 && logged.expires_at <= now + 12 * 3600 + 5,
        "12 h by default"
    );
    // The certificate grants exactly those, and connects.
    let creds = Arc::new(Credentials::from_pem(&logged.credentials_pem).unwrap());
    assert_eq!(creds.namespaces(), logged.repos.as_slice());
    assert!(creds.is_person());
    let link = Link::connect(&service.addr.to_string(), creds)
        .await
        .unwrap();
    assert_eq!(link.identity(), "github:alice");
    assert_eq!(link.counts_in(), ["github.com/acme/app"]);
    link.close().await;
    // The login is recorded, the token kept where only the orchestrator
    // reads it, and asked about the secret repository too (404 to her).
    let state = service.folder.state().unwrap();
    let logins = state.logins().unwrap();
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].kind, "login");
    let kept = state.person("github:alice").unwrap().unwrap();
    assert_eq!((kept.provider.as_str(), kept.forge_id), ("github", 1001));
    assert!(
        github
            .requests()
            .iter()
            .any(|r| r == "GET /api/v3/repos/acme/secret"),
        "{:?}",
        github.requests()
    );
    // The policy check explains it.
    let policy = service.folder.settings().unwrap().policy;
    let e = reprise_orchestrator::explain::explain(
        &state,
        &policy.for_repo("github.com/acme/lib"),
        "github:alice",
        "github.com/acme/lib",
        now,
    )
    .unwrap();
    assert!(e.may_read && !e.counts, "{e:?}");
    assert!(e.reasons.iter().any(|r| r.contains("read access")), "{e:?}");
    service.stop().await;
}

#[tokio::test]
async fn a_person_logs_in_with_gitlab_where_guests_cannot_read() {
    let gitlab = FakeGitlab::start().await;
    gitlab
        .user("bob", 7)
        .set_access("bob", "group/app", "reporter")
        .set_access("bob", "group/wiki-only", "guest")
        .set_group_access("bob", "tools", "maintainer")
        .project("tools/cli");
    let settings = format!(
        "[policy]\ncount_people = [\"carol\"]\n{}{}{}",
        "[policy.owners.\"gitlab.com/group\"]\ncount_access = \"read\"\n",
        team(&[
            "gitlab.com/group/app",
            "gitlab.com/group/wiki-only",
            "gitlab.com/tools/cli"
        ]),
        gitlab.settings_toml()
    );
    let service = Service::start(&settings).await;
    gitlab.next_login(Script::SlowDownThenApprove {
        user: "bob",
        after_polls: 0,
    });
    let (got, codes) = service.person("gitlab").await;
    let logged = got.unwrap();
    assert_eq!(codes.len(), 1);
    assert_eq!(logged.identity, "gitlab:gitlab.com:bob");
    assert_eq!(
        logged.repos,
        ["gitlab.com/group/app", "gitlab.com/tools/cli"]
    );
    assert_eq!(
        logged.counts,
        ["gitlab.com/group/app", "gitlab.com/tools/cli"],
        "a Reporter counts where the group's policy says \"read\"; a Maintainer through the group counts by default"
    );
    // GitHub is not configured here: said so.
    let (got, codes) = service.person("github").await;
    assert!(codes.is_empty());
    let message = refusal(got);
    assert!(message.contains("[login.github]"), "{message}");
    service.stop().await;
}

#[tokio::test]
async fn a_denied_or_expired_device_flow_is_refused_and_records_nothing() {
    let (github, service) = github_team("").await;
    github.next_login(Script::Deny { after_polls: 1 });
    let (got, codes) = service.person("github").await;
    assert_eq!(codes.len(), 1);
    let message = refusal(got);
    assert!(message.contains("denied"), "{message}");

    github.expires_in(2).next_login(Script::Expire);
    let (got, _) = service.person("github").await;
    let message = refusal(got);
    assert!(
        message.contains("expired") && message.contains("reprise login"),
        "{message}"
    );
    // Someone the forge lets read none of the team's repositories.
    github
        .expires_in(60)
        .user("eve", 666)
        .next_login(Script::Approve {
            user: "eve",
            after_polls: 0,
        });
    let (got, _) = service.person("github").await;
    let message = refusal(got);
    assert!(message.contains("may read none"), "{message}");
    assert!(
        service.identities().is_empty(),
        "{:?}",
        service.identities()
    );
    assert!(service.refused(Refusal::Login) >= 3);
    service.stop().await;
}

#[tokio::test]
async fn renewal_asks_the_forge_again_and_drops_what_it_no_longer_grants() {
    let (github, service) = github_team("").await;
    github.next_login(Script::Approve {
        user: "alice",
        after_polls: 0,
    });
    let logged = service.person("github").await.0.unwrap();
    let creds = Credentials::from_pem(&logged.credentials_pem).unwrap();
    let old = creds.identity().unwrap().fingerprint;

    // The forge takes acme/lib away; a renewal on her connection drops it.
    github.set_access("alice", "acme/lib", "none");
    let link = Link::connect(&service.addr.to_string(), Arc::new(creds))
        .await
        .unwrap();
    let creds = Credentials::from_pem(&logged.credentials_pem).unwrap();
    let renewed = login::renew(&link, &creds).await.unwrap();
    assert_eq!(renewed.identity, "github:alice");
    assert_eq!(renewed.repos, ["github.com/acme/app"]);
    let fresh = Credentials::from_pem(&renewed.credentials_pem).unwrap();
    assert_ne!(
        fresh.identity().unwrap().fingerprint,
        old,
        "a new certificate"
    );
    assert_eq!(fresh.namespaces(), ["github.com/acme/app"]);
    // The orchestrator decides by the new grant for every certificate of
    // hers, the old one included.
    let state = service.folder.state().unwrap();
    let grant = state.grant("github:alice").unwrap();
    assert!(!grant.repos.contains("github.com/acme/lib"), "{grant:?}");
    assert_eq!(state.logins().unwrap()[1].kind, "renewal");

    // She revokes the application on the forge: the next renewal says to
    // log in again.
    github.revoke_tokens("alice");
    let message = refusal(login::renew(&link, &creds).await);
    assert!(message.contains("log in again"), "{message}");
    link.close().await;

    // A CI job's or a hand-issued certificate is not renewed.
    let hand = service
        .folder
        .issue("desk", &["github.com/acme/app".into()], true, None)
        .unwrap();
    let hand_link = Link::connect(
        &service.addr.to_string(),
        Arc::new(Credentials::from_pem(&hand).unwrap()),
    )
    .await
    .unwrap();
    let message = refusal(login::renew(&hand_link, &Credentials::from_pem(&hand).unwrap()).await);
    assert!(message.contains("not a person"), "{message}");
    hand_link.close().await;
    service.stop().await;
}

#[tokio::test]
async fn a_revoked_person_is_cut_off_and_cannot_log_in_again_until_lifted() {
    let (github, service) = github_team("").await;
    github.next_login(Script::Approve {
        user: "alice",
        after_polls: 0,
    });
    let logged = service.person("github").await.0.unwrap();
    let creds = Arc::new(Credentials::from_pem(&logged.credentials_pem).unwrap());
    let link = Link::connect(&service.addr.to_string(), creds.clone())
        .await
        .unwrap();
    service.folder.revoke("github:alice").unwrap();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        link.connection().closed(),
    )
    .await
    .expect("the sweep closes a revoked person's connection within seconds");
    assert!(closed.to_string().contains("revoked"), "{closed}");
    assert!(
        Link::connect(&service.addr.to_string(), creds)
            .await
            .is_err()
    );

    github.next_login(Script::Approve {
        user: "alice",
        after_polls: 0,
    });
    let message = refusal(service.person("github").await.0);
    assert!(
        message.contains("was revoked") && message.contains("--lift"),
        "{message}"
    );
    service.folder.lift("github:alice").unwrap();
    github.next_login(Script::Approve {
        user: "alice",
        after_polls: 0,
    });
    let again = service.person("github").await.0.unwrap();
    assert_eq!(again.identity, "github:alice");
    service.stop().await;
}

/// An orchestrator that holds the team's server key but answers every
/// login with `answer(public key asked for)`.
async fn hostile(
    folder: &Folder,
    answer: impl Fn(&str) -> Message + Send + Sync + 'static,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let endpoint = quinn::Endpoint::server(
        folder.server_config().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                continue;
            };
            let asked = read_message(&mut recv).await.unwrap();
            let key = match &asked {
                Message::Login { public_key, .. } | Message::PersonLogin { public_key, .. } => {
                    public_key.clone()
                }
                other => panic!("{other:?}"),
            };
            if matches!(asked, Message::PersonLogin { .. }) {
                let code = Message::LoginCode {
                    user_code: "ABCD-EFGH".into(),
                    verification_uri: "https://github.com/login/device".into(),
                    verification_uri_complete: None,
                    expires_in: 60,
                };
                write_message(&mut send, &code).await.unwrap();
            }
            write_message(&mut send, &answer(&key)).await.unwrap();
            send.finish().unwrap();
            let _ = send.stopped().await;
        }
    });
    (addr, task)
}

fn logged_in(certificate: String, identity: &str) -> Message {
    Message::LoggedIn {
        certificate,
        identity: identity.into(),
        repos: vec!["github.com/acme/app".into()],
        trusted: true,
        expires_at: 0,
        counts: None,
    }
}

#[tokio::test]
async fn a_certificate_for_another_key_or_from_another_ca_is_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let folder = Folder::init(&dir.path().join("orch"), &[]).unwrap();
    let pin = CaPin(folder.ca_fingerprint().unwrap());

    // A certificate of the team CA, but for a key the orchestrator made
    // (it would hold the key, and the executor would seal with a key it
    // does not hold).
    let stolen = folder
        .issue("mallory", &["github.com/acme/app".into()], true, None)
        .unwrap();
    let stolen_cert = stolen
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap()
        .to_string();
    let (addr, task) = hostile(&folder, move |_| logged_in(stolen_cert.clone(), "mallory")).await;
    let got = login::exchange_token(&addr.to_string(), Some(pin), &Secret("a.b.c".into())).await;
    assert!(
        matches!(&got, Err(LoginError::BadCertificate(m)) if m.contains("another key")),
        "{got:?}"
    );
    let got = login::person_login(&addr.to_string(), pin, "github", &mut |_| {}).await;
    assert!(
        matches!(&got, Err(LoginError::BadCertificate(m)) if m.contains("another key")),
        "{got:?}"
    );
    task.abort();

    // A certificate for our key, signed by another CA.
    let other = reprise_orchestrator::pki::new_ca().unwrap();
    let (addr, task) = hostile(&folder, move |key| {
        let point = reprise_protocol::hex::decode(key).unwrap();
        let until = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        let (cert, _) = reprise_orchestrator::pki::issue_for_key(
            &other,
            "github:alice",
            &["github.com/acme/app".to_string()],
            &reprise_orchestrator::pki::P256Point(point),
            until,
        )
        .unwrap();
        logged_in(cert, "github:alice")
    })
    .await;
    let got = login::person_login(&addr.to_string(), pin, "github", &mut |_| {}).await;
    assert!(
        matches!(&got, Err(LoginError::BadCertificate(m)) if m.contains("does not chain")),
        "{got:?}"
    );
    assert!(got.unwrap_err().is_refusal(), "exit 12, nothing stored");
    task.abort();
}

#[tokio::test]
async fn a_login_to_an_orchestrator_that_presents_another_ca_sends_nothing() {
    let (github, service) = github_team("").await;
    github.next_login(Script::Approve {
        user: "alice",
        after_polls: 0,
    });
    let wrong = CaPin::from_pem(&reprise_orchestrator::pki::new_ca().unwrap().cert).unwrap();
    let got = login::person_login(&service.addr.to_string(), wrong, "github", &mut |_| {
        panic!("no code for a login that never started")
    })
    .await;
    assert!(
        matches!(&got, Err(LoginError::WrongCa { seen: Some(fp), .. }) if *fp == service.pin().0),
        "{got:?}"
    );
    assert_eq!(
        login::presented_ca(&service.addr.to_string())
            .await
            .unwrap(),
        Some(service.pin().0)
    );
    assert_eq!(github.stats().device_codes, 0, "no device flow was started");
    service.stop().await;
}
