//! CI jobs log in with their OIDC ID token (`reprise_orchestrator::login`)
//! over real QUIC on loopback, the tokens signed by a real, independently
//! written issuer (`oauth2-mock-server`, see `issuer/`): the certificate a
//! job gets, what it grants and whether it counts, and every login that
//! must be refused.

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
        message.contains("was revoked") && message.contains("issue --replace"),
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
