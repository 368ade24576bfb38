//! The CI token verifier (`reprise_orchestrator::oidc`) against a real,
//! independently written OIDC issuer: the npm package `oauth2-mock-server`,
//! serving discovery and its JWKS on loopback (`fixtures/oidc-issuer/`,
//! installed under the user's cache by `scripts/install-node-tools.sh`).
//! Without Node or the package the tests fail; they never skip.

mod issuer;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reprise_orchestrator::oidc::{
    CiConfig, CiKind, DiscoveryError, Verifier, VerifierLimits, VerifyError,
};
use serde_json::{Value, json};

use issuer::TestIssuer;

const AUDIENCE: &str = "https://reprise.test";

impl TestIssuer {
    /// A token from the published RSA key with GitHub's claims and `extra`.
    fn github_token(&mut self, extra: Value) -> String {
        let mut claims = github_claims();
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        self.token_of(json!({"op": "sign", "claims": claims}))
    }

    /// How many discovery documents and key sets it served.
    fn fetches(&mut self) -> (u64, u64) {
        let stats = self.ask(json!({"op": "stats"}));
        (
            stats["discovery"].as_u64().unwrap(),
            stats["jwks"].as_u64().unwrap(),
        )
    }

    fn config(&self, kind: CiKind) -> CiConfig {
        CiConfig::from_toml(&format!(
            "[ci.{kind}]\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\nallow_http_loopback = true\n",
            self.url
        ))
        .unwrap()
    }

    fn verifier(&self, kind: CiKind, limits: VerifierLimits) -> Verifier {
        Verifier::with_limits(&self.config(kind), limits).unwrap()
    }
}

fn github_claims() -> Value {
    json!({
        "aud": AUDIENCE,
        "sub": "repo:octo-org/octo-repo:ref:refs/heads/main",
        "repository": "octo-org/octo-repo",
        "repository_owner": "octo-org",
        "ref": "refs/heads/main",
        "ref_type": "branch",
        "ref_protected": "true",
        "event_name": "push",
        "job_workflow_ref": "octo-org/octo-repo/.github/workflows/ci.yml@refs/heads/main",
        "runner_environment": "github-hosted",
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Verifies a token that must be refused; its refusal must not quote it.
async fn refused(verifier: &Verifier, token: &str) -> VerifyError {
    let e = verifier
        .verify(token)
        .await
        .expect_err("the token was accepted");
    let text = format!("{} {e:?}", chain(&e));
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(!text.contains(part), "the refusal quotes the token: {text}");
    }
    e
}

#[tokio::test]
async fn a_valid_token_gives_the_ci_identity() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    let token = issuer.github_token(json!({}));
    let id = verifier.verify(&token).await.unwrap();
    assert_eq!(id.kind, CiKind::Github);
    assert_eq!(id.repository, "octo-org/octo-repo");
    assert_eq!(id.reference, "refs/heads/main");
    assert!(id.protected);
    assert_eq!(id.event, "push");
    assert_eq!(id.subject, "repo:octo-org/octo-repo:ref:refs/heads/main");
    assert_eq!(
        id.workflow.as_deref(),
        Some("octo-org/octo-repo/.github/workflows/ci.yml@refs/heads/main")
    );
    assert!(id.expires_at > now() && id.expires_at <= now() + 300);
    assert_eq!(id.name(), "ci:github:octo-org/octo-repo@refs/heads/main");
    // Again: from the cache, nothing fetched.
    verifier.verify(&token).await.unwrap();
    assert_eq!(issuer.fetches(), (1, 1));
    // ref_protected as a JSON boolean, an audience list holding ours.
    let token = issuer.github_token(json!({"ref_protected": false, "aud": ["other", AUDIENCE]}));
    assert!(!verifier.verify(&token).await.unwrap().protected);
}

#[tokio::test]
async fn es256_and_gitlab_tokens_verify() {
    let mut issuer = TestIssuer::start();
    issuer.ask(json!({"op": "add_key", "alg": "ES256", "kid": "es256-1"}));
    let verifier = issuer.verifier(CiKind::Gitlab, VerifierLimits::default());
    let token = issuer.token_of(json!({"op": "sign", "kid": "es256-1", "claims": {
        "aud": AUDIENCE,
        "sub": "project_path:group/sub/project:ref_type:tag:ref:v1.0",
        "project_path": "group/sub/project",
        "ref": "v1.0",
        "ref_type": "tag",
        "ref_protected": "true",
        "pipeline_source": "push",
    }}));
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ES256");
    let id = verifier.verify(&token).await.unwrap();
    assert_eq!(id.name(), "ci:gitlab:group/sub/project@refs/tags/v1.0");
    assert!(id.protected);
    assert_eq!(id.event, "push");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    let t = now();
    let token = issuer.github_token(json!({"iat": t - 900, "nbf": t - 900, "exp": t - 120}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(e, VerifyError::Expired { expired_at, .. } if expired_at == t - 120),
        "{e}"
    );
    // Within the leeway it still verifies.
    let token = issuer.github_token(json!({"iat": t - 900, "nbf": t - 900, "exp": t - 30}));
    verifier.verify(&token).await.unwrap();
}

#[tokio::test]
async fn a_token_not_yet_valid_is_refused() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    let t = now();
    let token = issuer.github_token(json!({"nbf": t + 600, "exp": t + 900}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(e, VerifyError::NotYetValid { not_before, .. } if not_before == t + 600),
        "{e}"
    );
    let token = issuer.github_token(json!({"iat": t + 600, "exp": t + 900}));
    let e = refused(&verifier, &token).await;
    assert!(matches!(e, VerifyError::IssuedInFuture { .. }), "{e}");
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    let token = issuer.github_token(json!({"aud": "https://another-service.test"}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(&e, VerifyError::WrongAudience { expected } if expected == AUDIENCE),
        "{e}"
    );
    let token = issuer.github_token(json!({"aud": null}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(&e, VerifyError::MissingClaim(c) if c == "aud"),
        "{e}"
    );
}

#[tokio::test]
async fn a_token_of_another_issuer_is_refused() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    // The issuer's own key, claiming another issuer.
    let token = issuer.github_token(json!({"iss": "https://token.actions.githubusercontent.com"}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(&e, VerifyError::WrongIssuer { found } if found == "https://token.actions.githubusercontent.com"),
        "{e}"
    );
    // A real, other issuer that is not configured.
    let mut other = TestIssuer::start();
    let token = other.github_token(json!({}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(&e, VerifyError::WrongIssuer { found } if *found == other.url),
        "{e}"
    );
    assert_eq!(
        issuer.fetches(),
        (0, 0),
        "refused before any key was fetched"
    );
}

/// A GitHub verifier of `issuer` that may refresh its keys at any time,
/// after one token verified (so its key set is cached).
async fn refreshing_verifier(issuer: &mut TestIssuer) -> Verifier {
    let limits = VerifierLimits {
        refresh_interval: Duration::ZERO,
        ..Default::default()
    };
    let verifier = issuer.verifier(CiKind::Github, limits);
    verifier
        .verify(&issuer.github_token(json!({})))
        .await
        .unwrap();
    verifier
}

#[tokio::test]
async fn a_key_the_issuer_never_published_is_refused_after_one_refresh() {
    let mut issuer = TestIssuer::start();
    let verifier = refreshing_verifier(&mut issuer).await;
    assert_eq!(issuer.fetches(), (1, 1));
    let mut claims = github_claims();
    claims["iss"] = json!(issuer.url);
    let token = issuer.token_of(json!({"op": "sign_unpublished", "claims": claims}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(&e, VerifyError::UnknownKey { kid, refreshed: true, .. } if kid == "never-published"),
        "{e}"
    );
    assert_eq!(
        issuer.fetches(),
        (2, 2),
        "the key set was fetched again, once"
    );
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_a_token_names_it() {
    let mut issuer = TestIssuer::start();
    let verifier = refreshing_verifier(&mut issuer).await;
    issuer.ask(json!({"op": "add_key", "alg": "RS256", "kid": "rs256-2"}));
    let mut claims = github_claims();
    claims["ref"] = json!("refs/heads/next");
    let token = issuer.token_of(json!({"op": "sign", "kid": "rs256-2", "claims": claims}));
    let id = verifier.verify(&token).await.unwrap();
    assert_eq!(id.reference, "refs/heads/next");
    assert_eq!(issuer.fetches(), (2, 2));
}

#[tokio::test]
async fn unknown_keys_do_not_make_the_orchestrator_flood_the_issuer() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    verifier
        .verify(&issuer.github_token(json!({})))
        .await
        .unwrap();
    let mut claims = github_claims();
    claims["iss"] = json!(issuer.url);
    let token = issuer.token_of(json!({"op": "sign_unpublished", "claims": claims}));
    for _ in 0..20 {
        let e = refused(&verifier, &token).await;
        assert!(
            matches!(
                e,
                VerifyError::UnknownKey {
                    refreshed: false,
                    ..
                }
            ),
            "{e}"
        );
    }
    assert_eq!(
        issuer.fetches(),
        (1, 1),
        "no refetch within the refresh interval"
    );
}

#[tokio::test]
async fn a_tampered_signature_is_refused() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    let token = issuer.github_token(json!({}));
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[17] ^= 0x01;
    let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&bytes));
    let e = refused(&verifier, &tampered).await;
    assert!(matches!(e, VerifyError::BadSignature), "{e}");
    // Another repository's claims under the original signature.
    let other = issuer.github_token(json!({"repository": "octo-org/secrets"}));
    let (other_signed, _) = other.rsplit_once('.').unwrap();
    let e = refused(&verifier, &format!("{other_signed}.{signature}")).await;
    assert!(matches!(e, VerifyError::BadSignature), "{e}");
    verifier.verify(&token).await.unwrap();
}

#[tokio::test]
async fn alg_none_is_refused() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    let token = issuer.token_of(json!({"op": "forge_none", "claims": github_claims()}));
    assert!(token.ends_with('.'), "an unsigned token: {token}");
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(&e, VerifyError::UnsupportedAlgorithm { alg } if alg == "none"),
        "{e}"
    );
    assert_eq!(
        issuer.fetches(),
        (0, 0),
        "refused before any key was fetched"
    );
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    let mut issuer = TestIssuer::start();
    let verifier = issuer.verifier(CiKind::Github, VerifierLimits::default());
    // The key is known to the verifier first, as an attacker would wish.
    verifier
        .verify(&issuer.github_token(json!({})))
        .await
        .unwrap();
    let token = issuer.token_of(json!({"op": "forge_hs256", "claims": github_claims()}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(&e, VerifyError::UnsupportedAlgorithm { alg } if alg == "HS256"),
        "{e}"
    );
}

#[tokio::test]
async fn an_issuer_that_cannot_be_reached_or_names_another_is_refused() {
    let mut issuer = TestIssuer::start();
    // Nothing listens there: refused, and not asked again at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gone = format!("http://127.0.0.1:{port}");
    let config = CiConfig::from_toml(&format!(
        "[ci.github]\nissuer = \"{gone}\"\naudience = \"{AUDIENCE}\"\nallow_http_loopback = true\n"
    ))
    .unwrap();
    let verifier = Verifier::new(&config).unwrap();
    let token = issuer.github_token(json!({"iss": gone}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(
            &e,
            VerifyError::Discovery {
                source: DiscoveryError::Request { .. },
                ..
            }
        ),
        "{}",
        chain(&e)
    );
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(
            &e,
            VerifyError::Discovery {
                source: DiscoveryError::RetryLater { .. },
                ..
            }
        ),
        "{}",
        chain(&e)
    );
    assert!(chain(&e).contains("asked again in"), "{}", chain(&e));

    // Configured as localhost: its discovery document says 127.0.0.1.
    let localhost = issuer.url.replace("127.0.0.1", "localhost");
    let config = CiConfig::from_toml(&format!(
        "[ci.github]\nissuer = \"{localhost}\"\naudience = \"{AUDIENCE}\"\nallow_http_loopback = true\n"
    ))
    .unwrap();
    let verifier = Verifier::new(&config).unwrap();
    let token = issuer.github_token(json!({"iss": localhost}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(
            &e,
            VerifyError::Discovery {
                source: DiscoveryError::IssuerMismatch { .. },
                ..
            }
        ),
        "{}",
        chain(&e)
    );
}

#[tokio::test]
async fn a_responses_size_is_capped() {
    let mut issuer = TestIssuer::start();
    let limits = VerifierLimits {
        max_response_bytes: 64,
        ..Default::default()
    };
    let verifier = issuer.verifier(CiKind::Github, limits);
    let token = issuer.github_token(json!({}));
    let e = refused(&verifier, &token).await;
    assert!(
        matches!(
            &e,
            VerifyError::Discovery {
                source: DiscoveryError::TooLarge { limit: 64, .. },
                ..
            }
        ),
        "{}",
        chain(&e)
    );
}
