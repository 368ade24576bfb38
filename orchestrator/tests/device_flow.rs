//! The forge client's device flow against a real, certified, independently
//! written authorization server: the npm package `oidc-provider`
//! (`fixtures/oidc-provider/server.mjs`, installed under the user's cache
//! by `scripts/install-node-tools.sh`) with RFC 8628 on and GitLab's
//! routes, configured as `[login.gitlab] url`. It shows the client speaks
//! standard RFC 8628, not a dialect shaped to the stand-ins: oidc-provider
//! sends no `interval` (the client falls back to RFC 8628's 5 s) and
//! answers with its own error texts. The person is played over HTTP by the
//! fixture (device page, user code, login, consent). Without Node or the
//! package these tests fail; they never skip.

#[allow(dead_code)] // its TestIssuer serves the OIDC tests, not these
mod issuer;

use std::time::Duration;

use issuer::NodeScript;
use reprise_orchestrator::forge::{Forge, ForgeError, Provider};
use serde_json::{Value, json};

/// A running oidc-provider, stopped on drop.
struct AuthorizationServer {
    node: NodeScript,
    url: String,
    client_id: String,
}

impl AuthorizationServer {
    fn start(device_code_ttl: Duration) -> AuthorizationServer {
        let node = NodeScript::start(
            "orchestrator/tests/fixtures/oidc-provider",
            "server.mjs",
            "oidc-provider",
            &[("DEVICE_CODE_TTL", device_code_ttl.as_secs().to_string())],
            true,
        );
        let url = node.hello["url"].as_str().unwrap().to_string();
        let client_id = node.hello["client_id"].as_str().unwrap().to_string();
        AuthorizationServer {
            node,
            url,
            client_id,
        }
    }

    /// One request to the fixture (blocking: call it off the runtime's
    /// threads, or while the flow runs on another task).
    fn ask(&mut self, request: Value) -> Value {
        self.node.ask(request)
    }

    fn forge(&self) -> Forge {
        self.forge_with(&self.client_id)
    }

    fn forge_with(&self, client_id: &str) -> Forge {
        let toml = format!(
            "[login.gitlab]\nclient_id = \"{client_id}\"\nurl = \"{}\"\nallow_http_loopback = true\n",
            self.url
        );
        let (forges, _) = Forge::from_toml(&toml).unwrap();
        assert_eq!(forges[0].provider, Provider::Gitlab);
        forges.into_iter().next().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_on_oidc_provider_gives_its_token() {
    let mut server = AuthorizationServer::start(Duration::from_secs(600));
    let forge = server.forge();
    let device = forge.start().await.unwrap();
    assert_eq!(device.verification_uri, format!("{}/device", server.url));
    assert_eq!(
        device.interval,
        Duration::from_secs(5),
        "no interval sent: RFC 8628's default"
    );
    let waiting = tokio::spawn({
        let forge = forge.clone();
        let device = device.clone();
        async move { forge.wait_for_token(&device).await }
    });
    let page =
        server.ask(json!({"op": "approve", "user_code": device.user_code, "login": "alice"}));
    assert_eq!(page["page"], "Sign-in Success", "{page}");
    let token = waiting.await.unwrap().unwrap();
    // The server knows the token as alice's, issued to our client with
    // the scope the client asked for.
    let known = server.ask(json!({"op": "token", "token": token.0}));
    assert_eq!(known["account"], "alice", "{known}");
    assert_eq!(known["client"], server.client_id.as_str());
    assert_eq!(known["scope"], "read_api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_at_consent_on_oidc_provider_is_denied() {
    let mut server = AuthorizationServer::start(Duration::from_secs(600));
    let forge = server.forge();
    let device = forge.start().await.unwrap();
    let waiting = tokio::spawn({
        let forge = forge.clone();
        let device = device.clone();
        async move { forge.wait_for_token(&device).await }
    });
    let page = server.ask(json!({"op": "deny", "user_code": device.user_code, "login": "alice"}));
    assert_eq!(page["aborted"], true, "{page}");
    let error = waiting.await.unwrap().unwrap_err();
    assert!(matches!(error, ForgeError::Denied), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_nobody_enters_on_oidc_provider_expires() {
    // A code that lives 3 s; the client's first poll is 5 s in.
    let server = AuthorizationServer::start(Duration::from_secs(3));
    let forge = server.forge();
    let device = forge.start().await.unwrap();
    assert_eq!(device.expires_in, Duration::from_secs(3));
    let error = forge.wait_for_token(&device).await.unwrap_err();
    assert!(matches!(error, ForgeError::Expired), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_client_on_oidc_provider_is_the_applications_fault() {
    let server = AuthorizationServer::start(Duration::from_secs(600));
    let error = server
        .forge_with("not-registered")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(error, ForgeError::Client(_)), "{error:?}");
}
