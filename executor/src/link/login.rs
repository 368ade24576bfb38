//! `reprise login --ci`: a CI job proves who it is with its OIDC ID token
//! and gets a short-lived client certificate from the orchestrator, for a
//! key made here that never leaves this machine.
//!
//! 1. The token: in GitHub Actions it is asked for from
//!    `$ACTIONS_ID_TOKEN_REQUEST_URL` (with `&audience=...`) with
//!    `$ACTIONS_ID_TOKEN_REQUEST_TOKEN` as the bearer token (the job needs
//!    `permissions: id-token: write`); in GitLab CI the job's `id_tokens:`
//!    entry puts it in `$REPRISE_ID_TOKEN`.
//! 2. The orchestrator: reached without a client certificate, and checked
//!    against the team CA the user pinned (`--ca FILE` or
//!    `--ca-fingerprint SHA256`): the CA must end the chain it presents and
//!    its certificate must chain to that CA. No pin, no token sent.
//! 3. The exchange: a new P-256 key; `Login` carries the token, the public
//!    key and a signature by that key over the token's hash; `LoggedIn`
//!    carries the certificate. The credentials file (certificate, key, CA)
//!    is what `reprise-orchestrator issue` writes, so everything after the
//!    login is as with hand-issued credentials.
//!
//! The token is never logged and never written anywhere.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::wire::{
    ErrorCode, Message, PROTOCOL_VERSION, Secret, login_proof_bytes, person_login_proof_bytes,
    renew_proof_bytes,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;

use super::credentials::{pem_of, quic_client};
use super::{LinkError, dial, exchange, read_message, write_message};

/// GitHub Actions: where the job's ID token is asked for.
pub const GITHUB_REQUEST_URL_VAR: &str = "ACTIONS_ID_TOKEN_REQUEST_URL";
/// GitHub Actions: the bearer token that asks for it.
pub const GITHUB_REQUEST_TOKEN_VAR: &str = "ACTIONS_ID_TOKEN_REQUEST_TOKEN";
/// GitLab CI (or any CI): the ID token itself, from the job's `id_tokens:`.
pub const ID_TOKEN_VAR: &str = "REPRISE_ID_TOKEN";

/// How long asking the CI system for the token may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a login failed.
#[derive(Debug, Error)]
pub enum LoginError {
    #[error(
        "no CI ID token here: in GitHub Actions give the job `permissions: id-token: write`; in GitLab CI add `id_tokens: {ID_TOKEN_VAR}: aud: AUDIENCE` to the job"
    )]
    NoToken,
    #[error("asking GitHub Actions for the job's ID token failed: {0}")]
    GithubToken(String),
    #[error(
        "no team CA to check the orchestrator against: pass --ca FILE or --ca-fingerprint SHA256 (or set REPRISE_CA_FINGERPRINT){}",
        seen.map(|fp| format!("; it presents a CA whose sha256 is {fp}: pin it if your administrator confirms that is the team's")).unwrap_or_default()
    )]
    NoPin { seen: Option<Sha256Digest> },
    #[error(
        "the orchestrator does not present the pinned team CA (sha256 {want}){}; nothing was sent to it",
        seen.map(|fp| format!(": its CA's sha256 is {fp}")).unwrap_or_default()
    )]
    WrongCa {
        want: Sha256Digest,
        seen: Option<Sha256Digest>,
    },
    #[error("the CA file {0}")]
    CaFile(String),
    #[error("the orchestrator refused the login: {0}")]
    Refused(String),
    #[error(
        "the orchestrator answered a certificate that cannot be used, so nothing was stored: {0}"
    )]
    BadCertificate(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("no answer from the orchestrator within {0:?}")]
    TimedOut(Duration),
}

impl LoginError {
    /// Whether the CI system or the orchestrator refused who we are (as
    /// opposed to being unreachable).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            LoginError::Refused(_) | LoginError::NoToken | LoginError::BadCertificate(_)
        )
    }
}

/// Which team CA the orchestrator must present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaPin(pub Sha256Digest);

impl CaPin {
    /// The pin of the (first) certificate of a PEM file.
    pub fn from_pem(text: &str) -> Result<CaPin, LoginError> {
        use rustls::pki_types::pem::PemObject as _;
        let cert = CertificateDer::pem_slice_iter(text.as_bytes())
            .next()
            .ok_or_else(|| LoginError::CaFile("holds no certificate".into()))?
            .map_err(|e| LoginError::CaFile(format!("is not PEM: {e}")))?;
        Ok(CaPin(Sha256Digest::of(cert.as_ref())))
    }
}

/// The job's OIDC ID token for `audience`, from the CI system (`env` reads
/// a variable; the process environment outside tests).
pub async fn ci_token(
    audience: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, LoginError> {
    let set = |name| env(name).filter(|v: &String| !v.is_empty());
    if let (Some(url), Some(bearer)) = (set(GITHUB_REQUEST_URL_VAR), set(GITHUB_REQUEST_TOKEN_VAR))
    {
        return github_token(&url, &bearer, audience).await;
    }
    set(ID_TOKEN_VAR).map(Secret).ok_or(LoginError::NoToken)
}

/// GitHub Actions' token endpoint: `GET {url}&audience={aud}` with the
/// request token as bearer; the answer is `{"value": "<jwt>"}`.
async fn github_token(url: &str, bearer: &str, audience: &str) -> Result<Secret, LoginError> {
    let fail = |e: &dyn std::fmt::Display| LoginError::GithubToken(e.to_string());
    let mut url = reqwest::Url::parse(url).map_err(|e| fail(&e))?;
    url.query_pairs_mut().append_pair("audience", audience);
    let client = reqwest::Client::builder()
        .timeout(TOKEN_TIMEOUT)
        .user_agent(concat!("reprise/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| fail(&e))?;
    let answer = client
        .get(url)
        .bearer_auth(bearer)
        .header("Accept", "application/json; api-version=2.0")
        .send()
        .await
        .map_err(|e| fail(&e.without_url()))?;
    let status = answer.status();
    let body = answer.bytes().await.map_err(|e| fail(&e.without_url()))?;
    if !status.is_success() {
        return Err(fail(&format!(
            "HTTP {status} (does the job have `permissions: id-token: write`?)"
        )));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        value: String,
    }
    let parsed: Answer = serde_json::from_slice(&body)
        .map_err(|_| fail(&"the answer is not JSON with a `value`"))?;
    Ok(Secret(parsed.value))
}

/// What the orchestrator granted, and the credentials file's text.
#[derive(Debug)]
pub struct LoggedIn {
    /// Certificate, key (PKCS#8) and team CA, PEM: as `issue` writes them.
    pub credentials_pem: String,
    pub identity: String,
    pub repos: Vec<String>,
    pub trusted: bool,
    pub expires_at: u64,
    /// The granted repositories in which its results count for CI.
    pub counts: Vec<String>,
}

/// What the person does on the forge, as the orchestrator relayed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginCode {
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
}

/// How long the whole exchange may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Exchanges `token` at `addr` for a certificate, the orchestrator checked
/// against `pin` (`None`: connects only to say which CA it presents).
pub async fn exchange_token(
    addr: &str,
    pin: Option<CaPin>,
    token: &Secret,
) -> Result<LoggedIn, LoginError> {
    match tokio::time::timeout(LOGIN_TIMEOUT, exchange_in_time(addr, pin, token)).await {
        Ok(result) => result,
        Err(_) => Err(LoginError::TimedOut(LOGIN_TIMEOUT)),
    }
}

/// The sha256 of the team CA the orchestrator at `addr` presents (the last
/// certificate of the chain it sends), without sending it anything.
pub async fn presented_ca(addr: &str) -> Result<Option<Sha256Digest>, LoginError> {
    match tokio::time::timeout(LOGIN_TIMEOUT, connect_pinned(addr, None)).await {
        Ok(Err(LoginError::NoPin { seen })) => Ok(seen),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) => unreachable!("no pin never connects"),
        Err(_) => Err(LoginError::TimedOut(LOGIN_TIMEOUT)),
    }
}

/// A connection to `addr` without a client certificate, the orchestrator
/// checked against `pin`, and the pinned CA it presented.
async fn connect_pinned(
    addr: &str,
    pin: Option<CaPin>,
) -> Result<(quinn::Endpoint, quinn::Connection, CertificateDer<'static>), LoginError> {
    let verifier = Arc::new(PinnedCa::new(pin.map(|p| p.0)));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Credentials(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let dialled = dial(addr, quic_client(tls)?).await;
    let seen = verifier.seen();
    let Some(want) = pin else {
        return Err(LoginError::NoPin { seen });
    };
    let (endpoint, conn) = match dialled {
        Ok(pair) => pair,
        Err(_) if verifier.refused() => return Err(LoginError::WrongCa { want: want.0, seen }),
        Err(e) => return Err(e.into()),
    };
    let ca = verifier
        .ca()
        .expect("a verified handshake found the pinned CA");
    Ok((endpoint, conn, ca))
}

/// A key made for one login: it never leaves this machine.
struct NewKey {
    pkcs8: ring::pkcs8::Document,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl NewKey {
    fn make() -> Result<NewKey, LoginError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| LinkError::Credentials("cannot make a key".into()))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .expect("a key just made");
        Ok(NewKey { pkcs8, key, rng })
    }

    /// The public key, hex, as the messages carry it.
    fn public_hex(&self) -> String {
        reprise_protocol::hex::encode(self.key.public_key().as_ref())
    }

    /// A proof (hex) that this key signed `bytes`.
    fn prove(&self, bytes: &[u8]) -> Result<String, LoginError> {
        let proof = self
            .key
            .sign(&self.rng, bytes)
            .map_err(|_| LinkError::Credentials("cannot sign the proof".into()))?;
        Ok(reprise_protocol::hex::encode(proof.as_ref()))
    }

    /// The credentials of an answer: refused unless its certificate names
    /// this key and chains to the pinned `ca` (an orchestrator that answers
    /// with another key's certificate, or another CA's, is not believed).
    fn credentials(self, answer: Message, ca: &CertificateDer<'_>) -> Result<LoggedIn, LoginError> {
        match answer {
            Message::LoggedIn {
                certificate,
                identity,
                repos,
                trusted,
                expires_at: _,
                counts,
            } => {
                use rustls::pki_types::pem::PemObject as _;
                let cert =
                    CertificateDer::from_pem_slice(certificate.as_bytes()).map_err(|_| {
                        LoginError::BadCertificate("it is not a PEM certificate".into())
                    })?;
                let named = reprise_protocol::seal::check_issued(
                    &cert,
                    ca,
                    self.key.public_key().as_ref(),
                    UnixTime::now(),
                )
                .map_err(|e| LoginError::BadCertificate(e.to_string()))?;
                if named.name != identity {
                    return Err(LoginError::BadCertificate(format!(
                        "it names {} where the answer says {identity}",
                        named.name
                    )));
                }
                let key_pem = pem_block("PRIVATE KEY", self.pkcs8.as_ref());
                let counts =
                    counts.unwrap_or_else(|| if trusted { repos.clone() } else { Vec::new() });
                Ok(LoggedIn {
                    credentials_pem: format!("{}{key_pem}{}", pem_of(&cert), pem_of(ca)),
                    identity,
                    repos,
                    trusted,
                    expires_at: named.not_after,
                    counts,
                })
            }
            Message::Error { code, message } => Err(LoginError::Refused(match code {
                ErrorCode::UnsupportedVersion => format!("{message} (update reprise)"),
                _ => message,
            })),
            other => Err(LinkError::Unexpected(format!("{other:?}")).into()),
        }
    }
}

async fn exchange_in_time(
    addr: &str,
    pin: Option<CaPin>,
    token: &Secret,
) -> Result<LoggedIn, LoginError> {
    let (endpoint, conn, ca) = connect_pinned(addr, pin).await?;
    let key = NewKey::make()?;
    let request = Message::Login {
        version: PROTOCOL_VERSION,
        token: token.clone(),
        public_key: key.public_hex(),
        proof: key.prove(&login_proof_bytes(&token.0))?,
    };
    let answer = exchange(&conn, &request).await;
    conn.close(quinn::VarInt::from_u32(0), b"logged in");
    endpoint.wait_idle().await;
    key.credentials(answer?, &ca)
}

/// Whether credentials valid from `not_before` to `not_after` are due for
/// renewal at `now`: in the last quarter of their lifetime.
pub fn renewal_due(not_before: u64, not_after: u64, now: u64) -> bool {
    let lifetime = not_after.saturating_sub(not_before);
    now < not_after && now >= not_after - lifetime / 4
}

/// How long past the code's expiry the orchestrator's answer may take.
const CODE_GRACE: Duration = Duration::from_secs(60);

/// A person logs in at `addr` (checked against `pin`) through `provider`
/// (`github`, `gitlab`): the orchestrator runs the device flow against the
/// forge and relays the code, handed to `shown` as soon as it comes; the
/// certificate follows once the person approved on the forge.
pub async fn person_login(
    addr: &str,
    pin: CaPin,
    provider: &str,
    shown: &mut (dyn FnMut(&LoginCode) + Send),
) -> Result<LoggedIn, LoginError> {
    let (endpoint, conn, ca) =
        match tokio::time::timeout(LOGIN_TIMEOUT, connect_pinned(addr, Some(pin))).await {
            Ok(connected) => connected?,
            Err(_) => return Err(LoginError::TimedOut(LOGIN_TIMEOUT)),
        };
    let key = NewKey::make()?;
    let public_key = key.public_hex();
    let request = Message::PersonLogin {
        version: PROTOCOL_VERSION,
        provider: provider.to_string(),
        proof: key.prove(&person_login_proof_bytes(provider, &public_key))?,
        public_key,
    };
    let answer = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(LinkError::from)?;
        write_message(&mut send, &request)
            .await
            .map_err(LinkError::from)?;
        let _ = send.finish();
        let first = tokio::time::timeout(LOGIN_TIMEOUT, read_message(&mut recv))
            .await
            .map_err(|_| LoginError::TimedOut(LOGIN_TIMEOUT))?
            .map_err(LinkError::from)?;
        let expires_in = match first {
            Message::LoginCode {
                user_code,
                verification_uri,
                verification_uri_complete,
                expires_in,
            } => {
                shown(&LoginCode {
                    user_code,
                    verification_uri,
                    verification_uri_complete,
                    expires_in,
                });
                Duration::from_secs(expires_in.min(3600))
            }
            other => return Ok::<Message, LoginError>(other),
        };
        let wait = expires_in + CODE_GRACE;
        let last = tokio::time::timeout(wait, read_message(&mut recv))
            .await
            .map_err(|_| LoginError::TimedOut(wait))?
            .map_err(LinkError::from)?;
        Ok(last)
    }
    .await;
    conn.close(quinn::VarInt::from_u32(0), b"logged in");
    endpoint.wait_idle().await;
    key.credentials(answer?, &ca)
}

/// Asks the orchestrator on `link` (connected with `creds`, a person's)
/// for a new certificate with the grants the forge gives now.
pub async fn renew(link: &super::Link, creds: &super::Credentials) -> Result<LoggedIn, LoginError> {
    let current = creds
        .identity()
        .map_err(|e| LinkError::Credentials(e.to_string()))?
        .fingerprint;
    let key = NewKey::make()?;
    let public_key = key.public_hex();
    let request = Message::Renew {
        proof: key.prove(&renew_proof_bytes(&current, &public_key))?,
        public_key,
    };
    let answer = link.request(&request).await?;
    key.credentials(answer, creds.ca())
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Checks the orchestrator against a pinned team CA: the chain it presents
/// must end with a certificate of that sha256, and its own certificate
/// must chain to it (webpki, the host name included). Remembers the CA it
/// saw, so that a refusal can say which one it was.
#[derive(Debug)]
struct PinnedCa {
    want: Option<Sha256Digest>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    ca: Option<CertificateDer<'static>>,
    refused: bool,
}

impl PinnedCa {
    fn new(want: Option<Sha256Digest>) -> PinnedCa {
        PinnedCa {
            want,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            seen: Mutex::new(Seen::default()),
        }
    }

    fn seen(&self) -> Option<Sha256Digest> {
        let seen = self.seen.lock().expect("seen");
        seen.ca.as_ref().map(|c| Sha256Digest::of(c.as_ref()))
    }

    fn refused(&self) -> bool {
        self.seen.lock().expect("seen").refused
    }

    /// The pinned CA, once a handshake presented it.
    fn ca(&self) -> Option<CertificateDer<'static>> {
        let seen = self.seen.lock().expect("seen");
        seen.ca
            .clone()
            .filter(|c| Some(Sha256Digest::of(c.as_ref())) == self.want)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.lock().expect("seen");
        seen.ca = intermediates.last().map(|c| c.clone().into_owned());
        let pinned = intermediates
            .iter()
            .find(|c| Some(Sha256Digest::of(c.as_ref())) == self.want);
        let Some(ca) = pinned else {
            seen.refused = true;
            return Err(rustls::Error::General(
                "the orchestrator does not present the pinned team CA".into(),
            ));
        };
        seen.ca = Some(ca.clone().into_owned());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now);
        seen.refused = verified.is_err();
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_token_comes_from_the_ci_system_or_is_said_to_be_missing() {
        let none = |_: &str| None;
        assert!(matches!(
            ci_token("aud", &none).await,
            Err(LoginError::NoToken)
        ));
        let gitlab = |name: &str| (name == ID_TOKEN_VAR).then(|| "a.b.c".to_string());
        assert_eq!(ci_token("aud", &gitlab).await.unwrap().0, "a.b.c");
        let empty = |name: &str| (name == ID_TOKEN_VAR).then(String::new);
        assert!(matches!(
            ci_token("aud", &empty).await,
            Err(LoginError::NoToken)
        ));
    }

    #[test]
    fn credentials_are_renewed_in_the_last_quarter_of_their_lifetime() {
        // (not before, not after, now, due)
        for (from, until, now, due) in [
            (0, 400, 100, false),
            (0, 400, 299, false),
            (0, 400, 300, true),
            (0, 400, 399, true),
            (0, 400, 400, false),
            (1000, 1000 + 12 * 3600, 1000 + 9 * 3600, true),
        ] {
            assert_eq!(renewal_due(from, until, now), due, "{from} {until} {now}");
        }
    }

    #[test]
    fn a_pin_is_the_sha256_of_the_ca_file_certificate() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let pin = CaPin::from_pem(&ca.cert.pem()).unwrap();
        assert_eq!(pin.0, Sha256Digest::of(ca.cert.der()));
        assert!(CaPin::from_pem("not pem").is_err());
    }
}
