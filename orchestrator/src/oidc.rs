//! Verifying a CI job's OIDC ID token (GitHub Actions, GitLab CI) and
//! mapping its claims to the CI identity of one repository.
//!
//! The issuers are configured in `DIR/orchestrator.toml`:
//!
//! ```toml
//! [ci.github]
//! issuer = "https://token.actions.githubusercontent.com"   # the default
//! audience = "https://reprise.example.com"                 # required
//!
//! [ci.gitlab]
//! issuer = "https://gitlab.com"                            # the default
//! audience = "https://reprise.example.com"
//! host = "gitlab.com"               # namespaces' first part (default: the issuer's host;
//!                                   # github.com for GitHub)
//!
//! [ci]
//! certificate_lifetime = "1h"       # how long a job's certificate lasts (at most 24h)
//! ```
//!
//! A job of repository `owner/name` is granted the namespace
//! `{host}/owner/name` (what the executor derives from a clone's origin
//! URL), and nothing else.
//!
//! Every check a token passes, in order ([`Verifier::verify`]):
//!
//! 1. at most [`MAX_TOKEN_BYTES`], three base64url parts, a JSON header;
//! 2. `alg` is one of RS256/384/512, PS256/384/512, ES256/384 or EdDSA:
//!    `none` and the HMAC algorithms (`HS*`, whose "key" would be public)
//!    are refused before any key is looked at; a `crit` header is refused;
//!    keys named by the token itself (`jku`, `jwk`, `x5u`) are never used;
//! 3. the unverified `iss` picks the configured issuer (none: refused);
//! 4. `kid` names a key of that issuer's JWKS, fetched from
//!    `{issuer}/.well-known/openid-configuration` → `jwks_uri` (whose
//!    `issuer` must be the configured one), cached, refetched after
//!    [`VerifierLimits::max_key_age`], and refetched when a token names an
//!    unknown `kid` — at most once per [`VerifierLimits::refresh_interval`]
//!    per issuer, failures included, so made-up `kid`s cannot turn the
//!    orchestrator into an amplifier against the issuer;
//! 5. the key declares (or, by its type and curve, admits) the token's
//!    `alg`; RSA keys are at least 2048 bits (ring);
//! 6. the signature (jsonwebtoken, with the ring provider below);
//! 7. `iss` exactly the configured issuer, `aud` contains the configured
//!    audience;
//! 8. `exp` (required), `nbf` (if present) and `iat` (required) against the
//!    clock, with [`LEEWAY_SECS`] for clock skew between the forge and us;
//! 9. the claims of the forge ([`CiKind`]) name one repository, a ref, the
//!    event and the subject ([`identity`]).
//!
//! Steps 1–3 and 5–9 are pure ([`inspect`], [`KeySet`], [`verify_with_keys`],
//! [`identity`]) and take `now` as an argument; [`Verifier`] adds the HTTP
//! and the cache. Tokens are never logged, nor put into an error.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;
use tracing::{debug, info, warn};

/// GitHub Actions' issuer.
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";
/// GitLab.com's issuer (a self-managed GitLab is its own URL).
pub const GITLAB_ISSUER: &str = "https://gitlab.com";
/// Clock skew allowed on `exp`, `nbf` and `iat`: the forge's clock and
/// ours may differ by this much. A minute is what the JWT libraries of both
/// forges' documentation default to, and small next to the lifetime of a
/// CI token (GitHub: minutes; GitLab: the job's timeout).
pub const LEEWAY_SECS: u64 = 60;
/// The largest token read (GitHub's and GitLab's are 1–2 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The algorithms a token may be signed with: asymmetric only.
const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

// ---------------------------------------------------------------------------
// Configuration

/// Which forge's CI issued a token: it decides which claims name the
/// repository, the event and the ref.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CiKind {
    Github,
    Gitlab,
}

impl CiKind {
    /// Its name in configuration and identity names.
    pub fn as_str(self) -> &'static str {
        match self {
            CiKind::Github => "github",
            CiKind::Gitlab => "gitlab",
        }
    }

    fn default_issuer(self) -> &'static str {
        match self {
            CiKind::Github => GITHUB_ISSUER,
            CiKind::Gitlab => GITLAB_ISSUER,
        }
    }
}

impl std::fmt::Display for CiKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[ci.github]` or `[ci.gitlab]` table, as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// The issuer URL, exactly as the tokens' `iss` says it (default: the
    /// public service).
    #[serde(default)]
    pub issuer: Option<String>,
    /// What the CI job asks its token to be for (`aud`); this orchestrator's
    /// own name, so that a token minted for another service is refused.
    pub audience: String,
    /// For tests only: accept an `http://` issuer (and `jwks_uri`) on a
    /// loopback address. Never set it for a real forge.
    #[serde(default)]
    pub allow_http_loopback: bool,
    /// The forge's host as it begins the namespaces of its repositories
    /// (default: `github.com` for GitHub, the issuer's host for GitLab).
    #[serde(default)]
    pub host: Option<String>,
}

/// The `[ci]` table, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiSettings {
    #[serde(default)]
    pub github: Option<IssuerSettings>,
    #[serde(default)]
    pub gitlab: Option<IssuerSettings>,
    /// How long a job's certificate lasts (`humantime`: `1h`, `90m`).
    #[serde(default)]
    pub certificate_lifetime: Option<String>,
}

/// A job certificate's lifetime when `[ci] certificate_lifetime` is unset.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// The longest lifetime `[ci] certificate_lifetime` may ask for.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A configured issuer, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuer {
    pub kind: CiKind,
    /// Compared byte for byte with a token's `iss`.
    pub issuer: String,
    pub audience: String,
    pub allow_http_loopback: bool,
    /// The first part of the namespaces its jobs are granted.
    pub host: String,
}

impl Issuer {
    /// Checks one issuer's settings.
    pub fn new(kind: CiKind, settings: &IssuerSettings) -> Result<Issuer, ConfigError> {
        let issuer = settings
            .issuer
            .clone()
            .unwrap_or_else(|| kind.default_issuer().to_string());
        let bad = |reason: &str| ConfigError::BadIssuer {
            kind,
            issuer: issuer.clone(),
            reason: reason.to_string(),
        };
        let url = Url::parse(&issuer).map_err(|e| bad(&e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("it must not carry credentials"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("it must not have a query or fragment"));
        }
        check_scheme(&url, settings.allow_http_loopback).map_err(|reason| bad(&reason))?;
        if settings.audience.trim().is_empty() {
            return Err(ConfigError::NoAudience(kind));
        }
        let host = match (&settings.host, kind) {
            (Some(host), _) => host.clone(),
            (None, CiKind::Github) => "github.com".to_string(),
            (None, CiKind::Gitlab) => url
                .host_str()
                .ok_or_else(|| bad("it has no host"))?
                .to_string(),
        };
        if host.is_empty() || host.contains(['/', ' ']) || host.chars().any(char::is_control) {
            return Err(bad(&format!("host {host:?} is not a host name")));
        }
        Ok(Issuer {
            kind,
            issuer,
            audience: settings.audience.clone(),
            allow_http_loopback: settings.allow_http_loopback,
            host,
        })
    }

    /// The namespace a job of `repository` (`owner/name`) is granted.
    pub fn namespace(&self, repository: &str) -> String {
        format!("{}/{}", self.host, repository)
    }

    fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }
}

/// `https`, or `http` on a loopback address when allowed.
pub(crate) fn check_scheme(url: &Url, allow_http_loopback: bool) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_http_loopback && is_loopback(url) => Ok(()),
        "http" if allow_http_loopback => {
            Err("http is allowed (allow_http_loopback) on a loopback address only".to_string())
        }
        "http" => Err("it must be https (allow_http_loopback is for tests on loopback)".into()),
        other => Err(format!("scheme {other:?} is not https")),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// The configured CI issuers (none: no CI job can log in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiConfig {
    pub issuers: Vec<Issuer>,
    /// How long a job's certificate lasts.
    pub lifetime: Duration,
}

impl Default for CiConfig {
    fn default() -> CiConfig {
        CiConfig {
            issuers: Vec::new(),
            lifetime: DEFAULT_LIFETIME,
        }
    }
}

impl CiConfig {
    /// Checks the `[ci]` table.
    pub fn new(settings: &CiSettings) -> Result<CiConfig, ConfigError> {
        let mut issuers = Vec::new();
        for (kind, s) in [
            (CiKind::Github, &settings.github),
            (CiKind::Gitlab, &settings.gitlab),
        ] {
            if let Some(s) = s {
                let issuer = Issuer::new(kind, s)?;
                if let Some(other) = issuers.iter().find(|i: &&Issuer| i.issuer == issuer.issuer) {
                    return Err(ConfigError::SameIssuer {
                        issuer: issuer.issuer,
                        kinds: (other.kind, kind),
                    });
                }
                issuers.push(issuer);
            }
        }
        let lifetime = match &settings.certificate_lifetime {
            None => DEFAULT_LIFETIME,
            Some(text) => {
                let d = humantime::parse_duration(text)
                    .map_err(|e| ConfigError::BadLifetime(format!("{text:?}: {e}")))?;
                if d.is_zero() || d > MAX_LIFETIME {
                    return Err(ConfigError::BadLifetime(format!(
                        "{text:?} is not between a second and {}",
                        humantime::format_duration(MAX_LIFETIME)
                    )));
                }
                d
            }
        };
        Ok(CiConfig { issuers, lifetime })
    }

    /// The issuer of `kind`, if configured.
    pub fn of_kind(&self, kind: CiKind) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.kind == kind)
    }

    /// Reads the `[ci]` table of `orchestrator.toml`'s text; other tables
    /// are left to their readers.
    pub fn from_toml(text: &str) -> Result<CiConfig, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            ci: CiSettings,
        }
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Toml(Box::new(e)))?;
        CiConfig::new(&file.ci)
    }

    /// The issuer whose URL is `iss`, exactly.
    pub fn issuer(&self, iss: &str) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.issuer == iss)
    }
}

/// Why the `[ci]` settings were refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("the [ci] settings are not valid")]
    Toml(#[source] Box<toml::de::Error>),
    #[error("[ci.{kind}] issuer {issuer:?} is not usable: {reason}")]
    BadIssuer {
        kind: CiKind,
        issuer: String,
        reason: String,
    },
    #[error(
        "[ci.{0}] has no audience; set `audience` to this orchestrator's name and ask for it in the CI job's token"
    )]
    NoAudience(CiKind),
    #[error("[ci] certificate_lifetime {0}")]
    BadLifetime(String),
    #[error("[ci.{}] and [ci.{}] both name the issuer {issuer:?}", .kinds.0, .kinds.1)]
    SameIssuer {
        issuer: String,
        kinds: (CiKind, CiKind),
    },
}

// ---------------------------------------------------------------------------
// The identity

/// Who a verified CI token says is running: one job of one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiIdentity {
    pub kind: CiKind,
    /// `owner/name` (GitHub) or the project's full path (GitLab).
    pub repository: String,
    /// The full ref, `refs/heads/main` or `refs/tags/v1`.
    pub reference: String,
    /// The ref is protected on the forge (branch protection / protected
    /// branch or tag). A token without the claim counts as unprotected.
    pub protected: bool,
    /// What started the run: GitHub's `event_name` (`push`,
    /// `pull_request`, ...), GitLab's `pipeline_source` (`push`,
    /// `merge_request_event`, ...).
    pub event: String,
    /// The token's `sub`, as the forge wrote it.
    pub subject: String,
    /// The workflow (GitHub `job_workflow_ref`) or CI configuration (GitLab
    /// `ci_config_ref_uri`) the job runs, when the token names one.
    pub workflow: Option<String>,
    /// The token's `exp`, seconds since the epoch.
    pub expires_at: u64,
}

impl CiIdentity {
    /// `ci:github:owner/name@refs/heads/main`.
    pub fn name(&self) -> String {
        format!("ci:{}:{}@{}", self.kind, self.repository, self.reference)
    }
}

// ---------------------------------------------------------------------------
// Errors

/// Why a token was refused.
#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("the token is {len} bytes, more than the {limit} a CI token can be")]
    TooLarge { len: usize, limit: usize },
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error(
        "the token is signed with {alg:?}, which is refused: only asymmetric algorithms (RS*, PS*, ES256, ES384, EdDSA) are accepted"
    )]
    UnsupportedAlgorithm { alg: String },
    #[error("the token names no key (`kid`)")]
    MissingKeyId,
    #[error("the token's issuer {found:?} is not a configured CI issuer ([ci.*] issuer)")]
    WrongIssuer { found: String },
    #[error(
        "the token is not for this orchestrator: its audience does not include {expected:?} (ask for that audience in the CI job)"
    )]
    WrongAudience { expected: String },
    #[error("{issuer} publishes no key {kid:?} ({})", refresh_note(*.refreshed))]
    UnknownKey {
        issuer: String,
        kid: String,
        refreshed: bool,
    },
    #[error("the token is signed with {alg:?}, which its key {kid:?} is not for")]
    KeyAlgorithmMismatch { kid: String, alg: String },
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error(
        "the token expired at {expired_at} (now {now}, {LEEWAY_SECS} s leeway); the CI job must request a fresh one"
    )]
    Expired { expired_at: u64, now: u64 },
    #[error(
        "the token is not valid before {not_before} (now {now}, {LEEWAY_SECS} s leeway); is this machine's clock right?"
    )]
    NotYetValid { not_before: u64, now: u64 },
    #[error(
        "the token was issued at {issued_at}, in the future (now {now}, {LEEWAY_SECS} s leeway); is this machine's clock right?"
    )]
    IssuedInFuture { issued_at: u64, now: u64 },
    #[error("the token has no {0:?} claim")]
    MissingClaim(String),
    #[error("the token's {claim:?} claim is not valid: {reason}")]
    BadClaim { claim: &'static str, reason: String },
    #[error("the keys of {issuer} could not be fetched")]
    Discovery {
        issuer: String,
        #[source]
        source: DiscoveryError,
    },
    #[error("the token could not be verified")]
    Verification(#[source] jsonwebtoken::errors::Error),
}

fn refresh_note(refreshed: bool) -> &'static str {
    if refreshed {
        "its key set was fetched just now"
    } else {
        "its key set was fetched moments ago and is not asked for again yet"
    }
}

/// Why an issuer's key set could not be had.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error("GET {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: the answer is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("GET {url}: the answer is not the expected JSON")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the discovery document names the issuer {found:?}, not {expected:?}")]
    IssuerMismatch { found: String, expected: String },
    #[error("jwks_uri {url:?} is not usable: {reason}")]
    BadJwksUri { url: String, reason: String },
    #[error(
        "the last attempt failed ({last_error}); the issuer is asked again in {retry_in_secs} s at the earliest"
    )]
    RetryLater {
        last_error: String,
        retry_in_secs: u64,
    },
}

// ---------------------------------------------------------------------------
// The pure part: the token, the keys, the claims

/// What a token says about itself before anything is verified: enough to
/// pick the issuer and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified {
    pub alg: Algorithm,
    pub kid: String,
    pub iss: String,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

fn b64_json<T: serde::de::DeserializeOwned>(part: &str, what: &str) -> Result<T, VerifyError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| VerifyError::Malformed(format!("its {what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| VerifyError::Malformed(format!("its {what} is not a JSON object")))
}

/// Checks the token's shape and algorithm and reads its `kid` and `iss`
/// (steps 1–3, without the issuer lookup). Nothing here is trusted yet.
pub fn inspect(token: &str) -> Result<Unverified, VerifyError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(VerifyError::TooLarge {
            len: token.len(),
            limit: MAX_TOKEN_BYTES,
        });
    }
    let parts: Vec<&str> = token.split('.').collect();
    let &[header, payload, _signature] = parts.as_slice() else {
        return Err(VerifyError::Malformed(format!(
            "it has {} parts, not 3",
            parts.len()
        )));
    };
    let header: RawHeader = b64_json(header, "header")?;
    let alg = header
        .alg
        .ok_or_else(|| VerifyError::Malformed("its header names no algorithm".into()))?;
    let alg = match alg.parse::<Algorithm>() {
        Ok(a) if ALLOWED.contains(&a) => a,
        _ => return Err(VerifyError::UnsupportedAlgorithm { alg: clip(&alg) }),
    };
    if header.crit.is_some() {
        return Err(VerifyError::Malformed(
            "its header has critical extensions (`crit`), which this verifier does not know".into(),
        ));
    }
    let kid = header.kid.ok_or(VerifyError::MissingKeyId)?;
    let claims: Map<String, Value> = b64_json(payload, "payload")?;
    let iss = match claims.get("iss") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(VerifyError::BadClaim {
                claim: "iss",
                reason: "not a string".into(),
            });
        }
        None => return Err(VerifyError::MissingClaim("iss".into())),
    };
    Ok(Unverified { alg, kid, iss })
}

/// One verification key of an issuer.
#[derive(Clone)]
pub struct PublicKey {
    key: DecodingKey,
    /// The algorithms it verifies: the one it declares, else those its type
    /// and curve admit.
    algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// An issuer's verification keys by `kid`, from its JWKS.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, PublicKey>,
}

impl KeySet {
    /// Reads a JWKS document. Keys that cannot verify a token here are left
    /// out: those without a `kid`, for encryption (`use: enc`), symmetric
    /// (`oct`), on other curves, or declaring an algorithm outside
    /// [`ALLOWED`].
    pub fn from_jwks(json: &[u8]) -> Result<KeySet, serde_json::Error> {
        #[derive(Deserialize)]
        struct Jwks {
            keys: Vec<Value>,
        }
        let jwks: Jwks = serde_json::from_slice(json)?;
        let mut keys = HashMap::new();
        for value in jwks.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                debug!("a key of the JWKS is not understood; left out");
                continue;
            };
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            match public_key(&jwk) {
                Some(key) => {
                    keys.entry(kid).or_insert(key);
                }
                None => debug!(kid, "a key of the JWKS cannot verify tokens; left out"),
            }
        }
        Ok(KeySet { keys })
    }

    /// The key named `kid`.
    pub fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid)
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn public_key(jwk: &Jwk) -> Option<PublicKey> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let admitted: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        _ => return None,
    };
    let algorithms = match &jwk.common.key_algorithm {
        None => admitted,
        Some(declared) => {
            let declared: Algorithm = format!("{declared}").parse().ok()?;
            if !admitted.contains(&declared) {
                return None;
            }
            vec![declared]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(PublicKey { key, algorithms })
}

/// Verifies `token` (already [`inspect`]ed) against `issuer`'s `keys` at
/// `now` (seconds since the epoch): steps 5–9.
pub fn verify_with_keys(
    token: &str,
    unverified: &Unverified,
    issuer: &Issuer,
    keys: &KeySet,
    now: u64,
) -> Result<CiIdentity, VerifyError> {
    if unverified.iss != issuer.issuer {
        return Err(VerifyError::WrongIssuer {
            found: clip(&unverified.iss),
        });
    }
    let key = keys
        .get(&unverified.kid)
        .ok_or_else(|| VerifyError::UnknownKey {
            issuer: issuer.issuer.clone(),
            kid: clip(&unverified.kid),
            refreshed: false,
        })?;
    verify_with_key(token, unverified, issuer, key, now)
}

fn verify_with_key(
    token: &str,
    unverified: &Unverified,
    issuer: &Issuer,
    key: &PublicKey,
    now: u64,
) -> Result<CiIdentity, VerifyError> {
    if !key.algorithms.contains(&unverified.alg) {
        return Err(VerifyError::KeyAlgorithmMismatch {
            kid: clip(&unverified.kid),
            alg: format!("{:?}", unverified.alg),
        });
    }
    ring_provider::install();
    let mut validation = Validation::new(unverified.alg);
    // The clock is ours (`now`), checked below on typed claims.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.set_required_spec_claims(&["iss", "aud"]);
    validation.set_issuer(&[&issuer.issuer]);
    validation.set_audience(&[&issuer.audience]);
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation)
        .map_err(|e| from_jwt(e, issuer))?;
    let claims = Claims(&data.claims);
    let exp = claims
        .time("exp")?
        .ok_or(VerifyError::MissingClaim("exp".into()))?;
    let iat = claims
        .time("iat")?
        .ok_or(VerifyError::MissingClaim("iat".into()))?;
    if now >= exp.saturating_add(LEEWAY_SECS) {
        return Err(VerifyError::Expired {
            expired_at: exp,
            now,
        });
    }
    if let Some(nbf) = claims.time("nbf")?
        && nbf > now.saturating_add(LEEWAY_SECS)
    {
        return Err(VerifyError::NotYetValid {
            not_before: nbf,
            now,
        });
    }
    if iat > now.saturating_add(LEEWAY_SECS) {
        return Err(VerifyError::IssuedInFuture {
            issued_at: iat,
            now,
        });
    }
    identity(issuer.kind, &data.claims, exp)
}

fn from_jwt(e: jsonwebtoken::errors::Error, issuer: &Issuer) -> VerifyError {
    match e.kind() {
        JwtErrorKind::InvalidSignature => VerifyError::BadSignature,
        JwtErrorKind::InvalidIssuer => VerifyError::WrongIssuer {
            found: "(not the configured issuer)".into(),
        },
        JwtErrorKind::InvalidAudience => VerifyError::WrongAudience {
            expected: issuer.audience.clone(),
        },
        JwtErrorKind::MissingRequiredClaim(c) => VerifyError::MissingClaim(c.clone()),
        JwtErrorKind::InvalidClaimFormat(c) if c == "aud" => VerifyError::BadClaim {
            claim: "aud",
            reason: "neither a string nor a list of strings".into(),
        },
        JwtErrorKind::InvalidClaimFormat(c) if c == "iss" => VerifyError::BadClaim {
            claim: "iss",
            reason: "not a string".into(),
        },
        JwtErrorKind::Base64(_) => VerifyError::Malformed("a part is not base64url".into()),
        JwtErrorKind::Json(_) | JwtErrorKind::Utf8(_) => {
            VerifyError::Malformed("its payload is not a JSON object".into())
        }
        JwtErrorKind::InvalidAlgorithm | JwtErrorKind::UnsupportedAlgorithm => {
            VerifyError::UnsupportedAlgorithm {
                alg: "(refused by the verifier)".into(),
            }
        }
        _ => VerifyError::Verification(e),
    }
}

/// Typed reads of a claims object, refusing what is not of its type.
struct Claims<'a>(&'a Map<String, Value>);

impl Claims<'_> {
    /// A NumericDate (whole seconds; a fraction is dropped).
    fn time(&self, claim: &'static str) -> Result<Option<u64>, VerifyError> {
        match self.0.get(claim) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(v), _) => Ok(Some(v)),
                (None, Some(f)) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                    Ok(Some(f as u64))
                }
                _ => Err(VerifyError::BadClaim {
                    claim,
                    reason: "not a time in seconds since the epoch".into(),
                }),
            },
            Some(_) => Err(VerifyError::BadClaim {
                claim,
                reason: "not a number".into(),
            }),
        }
    }

    fn string(&self, claim: &'static str) -> Result<Option<&str>, VerifyError> {
        match self.0.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(VerifyError::BadClaim {
                claim,
                reason: "not a string".into(),
            }),
        }
    }

    fn required(&self, claim: &'static str) -> Result<&str, VerifyError> {
        match self.string(claim)? {
            Some(s) if !s.is_empty() => Ok(s),
            Some(_) => Err(VerifyError::BadClaim {
                claim,
                reason: "empty".into(),
            }),
            None => Err(VerifyError::MissingClaim(claim.into())),
        }
    }

    /// `true`/`false`, as a boolean or (as both forges write it) a string.
    fn flag(&self, claim: &'static str) -> Result<Option<bool>, VerifyError> {
        match self.0.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(_) => Err(VerifyError::BadClaim {
                claim,
                reason: "neither true nor false".into(),
            }),
        }
    }
}

/// Maps verified claims to the identity (step 9). `exp` is the token's.
pub fn identity(
    kind: CiKind,
    claims: &Map<String, Value>,
    exp: u64,
) -> Result<CiIdentity, VerifyError> {
    let c = Claims(claims);
    let (repository, reference, event, workflow) = match kind {
        CiKind::Github => (
            c.required("repository")?,
            c.required("ref")?.to_string(),
            c.required("event_name")?,
            c.string("job_workflow_ref")?,
        ),
        CiKind::Gitlab => {
            let reference = match c.string("ref_path")? {
                Some(path) => path.to_string(),
                None => {
                    let name = c.required("ref")?;
                    match c.required("ref_type")? {
                        "branch" => format!("refs/heads/{name}"),
                        "tag" => format!("refs/tags/{name}"),
                        other => {
                            return Err(VerifyError::BadClaim {
                                claim: "ref_type",
                                reason: format!("{other:?} is neither branch nor tag"),
                            });
                        }
                    }
                }
            };
            (
                c.required("project_path")?,
                reference,
                c.required("pipeline_source")?,
                c.string("ci_config_ref_uri")?,
            )
        }
    };
    let repository_claim = match kind {
        CiKind::Github => "repository",
        CiKind::Gitlab => "project_path",
    };
    check_repository(repository, kind).map_err(|reason| VerifyError::BadClaim {
        claim: repository_claim,
        reason,
    })?;
    check_reference(&reference).map_err(|reason| VerifyError::BadClaim {
        claim: "ref",
        reason,
    })?;
    if !event
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    {
        return Err(VerifyError::BadClaim {
            claim: if kind == CiKind::Github {
                "event_name"
            } else {
                "pipeline_source"
            },
            reason: "not a word".into(),
        });
    }
    let subject = c.required("sub")?;
    if subject.chars().any(char::is_control) {
        return Err(VerifyError::BadClaim {
            claim: "sub",
            reason: "it holds control characters".into(),
        });
    }
    Ok(CiIdentity {
        kind,
        repository: repository.to_string(),
        reference,
        protected: c.flag("ref_protected")?.unwrap_or(false),
        event: event.to_string(),
        subject: subject.to_string(),
        workflow: workflow.map(str::to_string),
        expires_at: exp,
    })
}

/// `owner/name` (GitHub: exactly two segments; GitLab: two or more), each
/// segment of letters, digits, `.`, `_` and `-`, neither `.` nor `..`.
fn check_repository(repository: &str, kind: CiKind) -> Result<(), String> {
    let segments: Vec<&str> = repository.split('/').collect();
    let count_ok = match kind {
        CiKind::Github => segments.len() == 2,
        CiKind::Gitlab => segments.len() >= 2,
    };
    if !count_ok {
        return Err(format!("{repository:?} is not a repository path"));
    }
    for s in segments {
        if s.is_empty()
            || s == "."
            || s == ".."
            || !s
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
        {
            return Err(format!("{repository:?} is not a repository path"));
        }
    }
    Ok(())
}

/// A full git ref: `refs/...`, no whitespace, control characters or `..`.
fn check_reference(reference: &str) -> Result<(), String> {
    if !reference.starts_with("refs/")
        || reference.contains("..")
        || reference
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control())
    {
        return Err(format!("{reference:?} is not a full git ref"));
    }
    Ok(())
}

/// When an issuer's keys may be fetched again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifierLimits {
    /// At least this long between two fetches of one issuer's keys, for
    /// any reason (an unknown `kid`, an old cache, a failed attempt).
    pub refresh_interval: Duration,
    /// Keys older than this are fetched again before use, so a key the
    /// issuer withdrew stops verifying.
    pub max_key_age: Duration,
    /// A whole HTTP request, and its connection.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// The largest discovery document or JWKS read.
    pub max_response_bytes: usize,
}

impl Default for VerifierLimits {
    fn default() -> Self {
        VerifierLimits {
            refresh_interval: Duration::from_secs(60),
            max_key_age: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_response_bytes: 256 * 1024,
        }
    }
}

/// What is known of one issuer's keys.
#[derive(Debug, Default)]
struct KeyCache {
    keys: Option<(KeySet, Instant)>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

/// What to do for a token naming `kid`, given the cache.
#[derive(Debug, PartialEq, Eq)]
enum KeyStep {
    /// The cache holds it.
    Use,
    /// Fetch the keys first.
    Fetch,
    /// Fresh keys without it, and too soon to fetch again.
    Unknown,
    /// No usable keys, and too soon to try again: retry in this long.
    Wait(Duration),
}

impl KeyCache {
    fn step(&self, kid: &str, now: Instant, limits: &VerifierLimits) -> KeyStep {
        let since_attempt = self.last_attempt.map(|t| now.saturating_duration_since(t));
        let may_fetch = since_attempt.is_none_or(|d| d >= limits.refresh_interval);
        match &self.keys {
            Some((keys, at)) if now.saturating_duration_since(*at) < limits.max_key_age => {
                if keys.get(kid).is_some() {
                    KeyStep::Use
                } else if may_fetch {
                    KeyStep::Fetch
                } else {
                    KeyStep::Unknown
                }
            }
            _ if may_fetch => KeyStep::Fetch,
            _ => KeyStep::Wait(
                limits
                    .refresh_interval
                    .saturating_sub(since_attempt.unwrap_or_default()),
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// The IO shell

struct IssuerState {
    issuer: Issuer,
    cache: tokio::sync::Mutex<KeyCache>,
}

/// Verifies CI tokens against the configured issuers, fetching and caching
/// their keys.
pub struct Verifier {
    issuers: Vec<IssuerState>,
    http: reqwest::Client,
    limits: VerifierLimits,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &i.issuer).collect::<Vec<_>>(),
            )
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `config`'s issuers with the default limits.
    pub fn new(config: &CiConfig) -> Result<Verifier, reqwest::Error> {
        Verifier::with_limits(config, VerifierLimits::default())
    }

    /// A verifier with the given limits.
    pub fn with_limits(
        config: &CiConfig,
        limits: VerifierLimits,
    ) -> Result<Verifier, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(limits.request_timeout)
            .connect_timeout(limits.connect_timeout)
            // A redirect could lead off https; the issuers do not redirect.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("reprise-orchestrator/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Verifier {
            issuers: config
                .issuers
                .iter()
                .map(|issuer| IssuerState {
                    issuer: issuer.clone(),
                    cache: Default::default(),
                })
                .collect(),
            http,
            limits,
        })
    }

    /// Verifies a CI job's token and returns who it is.
    pub async fn verify(&self, token: &str) -> Result<CiIdentity, VerifyError> {
        let unverified = inspect(token)?;
        let state = self
            .issuers
            .iter()
            .find(|s| s.issuer.issuer == unverified.iss)
            .ok_or_else(|| VerifyError::WrongIssuer {
                found: clip(&unverified.iss),
            })?;
        let key = self.key(state, &unverified.kid).await?;
        let identity = verify_with_key(token, &unverified, &state.issuer, &key, unix_now())?;
        debug!(identity = %identity.name(), kid = %unverified.kid, "verified a CI token");
        Ok(identity)
    }

    /// The key `kid` of an issuer, fetching its keys when the cache says so.
    async fn key(&self, state: &IssuerState, kid: &str) -> Result<PublicKey, VerifyError> {
        let issuer = &state.issuer;
        let mut cache = state.cache.lock().await;
        let mut refreshed = false;
        match cache.step(kid, Instant::now(), &self.limits) {
            KeyStep::Use | KeyStep::Unknown => {}
            KeyStep::Wait(retry_in) => {
                return Err(VerifyError::Discovery {
                    issuer: issuer.issuer.clone(),
                    source: DiscoveryError::RetryLater {
                        last_error: cache
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "the keys are too old".into()),
                        retry_in_secs: retry_in.as_secs().max(1),
                    },
                });
            }
            KeyStep::Fetch => {
                if cache.keys.is_some() {
                    debug!(issuer = %issuer.issuer, kid, "fetching the key set again");
                }
                cache.last_attempt = Some(Instant::now());
                refreshed = true;
                match self.fetch_keys(issuer).await {
                    Ok(keys) => {
                        info!(issuer = %issuer.issuer, keys = keys.len(), "fetched the CI issuer's keys");
                        cache.keys = Some((keys, Instant::now()));
                        cache.last_error = None;
                    }
                    Err(source) => {
                        let text = error_chain(&source);
                        warn!(issuer = %issuer.issuer, error = %text, "could not fetch the CI issuer's keys");
                        cache.last_error = Some(text);
                        return Err(VerifyError::Discovery {
                            issuer: issuer.issuer.clone(),
                            source,
                        });
                    }
                }
            }
        }
        cache
            .keys
            .as_ref()
            .and_then(|(keys, _)| keys.get(kid))
            .cloned()
            .ok_or_else(|| VerifyError::UnknownKey {
                issuer: issuer.issuer.clone(),
                kid: clip(kid),
                refreshed,
            })
    }

    async fn fetch_keys(&self, issuer: &Issuer) -> Result<KeySet, DiscoveryError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = issuer.discovery_url();
        let body = self.get(&url).await?;
        let doc: Discovery =
            serde_json::from_slice(&body).map_err(|source| DiscoveryError::Json { url, source })?;
        if doc.issuer != issuer.issuer {
            return Err(DiscoveryError::IssuerMismatch {
                found: doc.issuer,
                expected: issuer.issuer.clone(),
            });
        }
        let jwks_uri = Url::parse(&doc.jwks_uri).map_err(|e| DiscoveryError::BadJwksUri {
            url: doc.jwks_uri.clone(),
            reason: e.to_string(),
        })?;
        check_scheme(&jwks_uri, issuer.allow_http_loopback).map_err(|reason| {
            DiscoveryError::BadJwksUri {
                url: doc.jwks_uri.clone(),
                reason,
            }
        })?;
        let body = self.get(jwks_uri.as_str()).await?;
        KeySet::from_jwks(&body).map_err(|source| DiscoveryError::Json {
            url: doc.jwks_uri,
            source,
        })
    }

    /// GETs `url`, reading at most `max_response_bytes`.
    async fn get(&self, url: &str) -> Result<Vec<u8>, DiscoveryError> {
        let request = |source| DiscoveryError::Request {
            url: url.to_string(),
            source,
        };
        let mut response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(request)?;
        if !response.status().is_success() {
            return Err(DiscoveryError::Status {
                url: url.to_string(),
                status: response.status().as_u16(),
            });
        }
        let limit = self.limits.max_response_bytes;
        let too_large = || DiscoveryError::TooLarge {
            url: url.to_string(),
            limit,
        };
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request)? {
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// A value read from a token, short enough to quote in a message.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// An error and its causes on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// jsonwebtoken's cryptography, done by ring (the workspace's one crypto
/// provider): verification only, for the asymmetric algorithms. Installed
/// as jsonwebtoken's process default on first use; if something else
/// installed one first, that one is used.
mod ring_provider {
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{ErrorKind, new_error};
    use jsonwebtoken::signature;
    use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
    use ring::signature as sig;

    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory,
        verifier_factory,
        key_utils: KeyUtils::new_unimplemented(),
    };

    pub(super) fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = PROVIDER.install_default();
        });
    }

    fn signer_factory(
        _: &Algorithm,
        _: &EncodingKey,
    ) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
        Err(new_error(ErrorKind::Provider(
            "the orchestrator verifies tokens and signs none".into(),
        )))
    }

    fn verifier_factory(
        alg: &Algorithm,
        key: &DecodingKey,
    ) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
        let params: Params = match alg {
            Algorithm::RS256 => Params::Rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
            Algorithm::RS384 => Params::Rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
            Algorithm::RS512 => Params::Rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
            Algorithm::PS256 => Params::Rsa(&sig::RSA_PSS_2048_8192_SHA256),
            Algorithm::PS384 => Params::Rsa(&sig::RSA_PSS_2048_8192_SHA384),
            Algorithm::PS512 => Params::Rsa(&sig::RSA_PSS_2048_8192_SHA512),
            Algorithm::ES256 => Params::Other(&sig::ECDSA_P256_SHA256_FIXED),
            Algorithm::ES384 => Params::Other(&sig::ECDSA_P384_SHA384_FIXED),
            Algorithm::EdDSA => Params::Other(&sig::ED25519),
            // HMAC (HS*): a JWKS holds public keys; a shared secret is never
            // used. Nor is anything added to jsonwebtoken later.
            _ => return Err(new_error(ErrorKind::UnsupportedAlgorithm)),
        };
        if key.family() != alg.family() {
            return Err(new_error(ErrorKind::InvalidAlgorithm));
        }
        Ok(Box::new(RingVerifier {
            alg: *alg,
            params,
            key: key.clone(),
        }))
    }

    #[derive(Clone, Copy)]
    enum Params {
        Rsa(&'static sig::RsaParameters),
        Other(&'static dyn sig::VerificationAlgorithm),
    }

    struct RingVerifier {
        alg: Algorithm,
        params: Params,
        key: DecodingKey,
    }

    impl signature::Verifier<Vec<u8>> for RingVerifier {
        fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
            let ok = match (self.params, self.key.kind()) {
                (Params::Rsa(p), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                    sig::RsaPublicKeyComponents { n, e }
                        .verify(p, msg, signature)
                        .is_ok()
                }
                (Params::Rsa(p), DecodingKeyKind::SecretOrDer(der)) => {
                    sig::UnparsedPublicKey::new(p, der)
                        .verify(msg, signature)
                        .is_ok()
                }
                (Params::Other(p), DecodingKeyKind::SecretOrDer(bytes)) => {
                    sig::UnparsedPublicKey::new(p, bytes)
                        .verify(msg, signature)
                        .is_ok()
                }
                (Params::Other(_), DecodingKeyKind::RsaModulusExponent { .. }) => false,
            };
            if ok {
                Ok(())
            } else {
                Err(signature::Error::new())
            }
        }
    }

    impl JwtVerifier for RingVerifier {
        fn algorithm(&self) -> Algorithm {
            self.alg
        }
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn github() -> Issuer {
        Issuer::new(
            CiKind::Github,
            &IssuerSettings {
                issuer: None,
                audience: "https://reprise.example".into(),
                allow_http_loopback: false,
                host: None,
            },
        )
        .unwrap()
    }

    fn gitlab() -> Issuer {
        Issuer::new(
            CiKind::Gitlab,
            &IssuerSettings {
                issuer: Some("https://gitlab.example.com".into()),
                audience: "reprise".into(),
                allow_http_loopback: false,
                host: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn config_from_toml() {
        let config = CiConfig::from_toml(
            r#"
            [policy]
            require_fresh = true

            [ci.github]
            audience = "https://reprise.example"

            [ci.gitlab]
            issuer = "https://gitlab.example.com"
            audience = "reprise"
            "#,
        )
        .unwrap();
        assert_eq!(config.issuers, vec![github(), gitlab()]);
        assert_eq!(config.issuer(GITHUB_ISSUER), Some(&github()));
        assert_eq!(config.issuer("https://gitlab.example.com/"), None, "exact");
        assert_eq!(CiConfig::from_toml("").unwrap(), CiConfig::default());
        let loopback = CiConfig::from_toml(
            "[ci.gitlab]\nissuer = \"http://127.0.0.1:8080\"\naudience = \"a\"\nallow_http_loopback = true\n",
        )
        .unwrap();
        assert!(loopback.issuers[0].allow_http_loopback);
        assert_eq!(github().namespace("o/r"), "github.com/o/r");
        assert_eq!(gitlab().namespace("g/s/p"), "gitlab.example.com/g/s/p");
        assert_eq!(config.lifetime, DEFAULT_LIFETIME);
        let custom = CiConfig::from_toml(
            "[ci]\ncertificate_lifetime = \"20m\"\n[ci.github]\naudience = \"a\"\nhost = \"ghe.example\"\n",
        )
        .unwrap();
        assert_eq!(custom.lifetime, Duration::from_secs(1200));
        assert_eq!(custom.issuers[0].namespace("o/r"), "ghe.example/o/r");
    }

    #[test]
    fn config_refusals() {
        let cases: &[(&str, &str)] = &[
            ("[ci.github]\n", "audience"),
            ("[ci.github]\naudience = \" \"\n", "no audience"),
            ("[ci.github]\naudiance = \"a\"\n", "unknown field"),
            ("[ci.bitbucket]\naudience = \"a\"\n", "unknown field"),
            (
                "[ci.github]\nissuer = \"http://token.example\"\naudience = \"a\"\n",
                "must be https",
            ),
            (
                "[ci.github]\nissuer = \"http://token.example\"\naudience = \"a\"\nallow_http_loopback = true\n",
                "loopback address only",
            ),
            (
                "[ci.github]\nissuer = \"http://127.0.0.1:1\"\naudience = \"a\"\n",
                "must be https",
            ),
            (
                "[ci.gitlab]\nissuer = \"https://u:p@gitlab.example\"\naudience = \"a\"\n",
                "credentials",
            ),
            (
                "[ci.gitlab]\nissuer = \"gitlab.example\"\naudience = \"a\"\n",
                "not usable",
            ),
            (
                "[ci.github]\naudience = \"a\"\n[ci.gitlab]\nissuer = \"https://token.actions.githubusercontent.com\"\naudience = \"a\"\n",
                "both name the issuer",
            ),
            ("[ci]\ncertificate_lifetime = \"2days\"\n", "not between"),
            (
                "[ci]\ncertificate_lifetime = \"soon\"\n",
                "certificate_lifetime",
            ),
            (
                "[ci.github]\naudience = \"a\"\nhost = \"evil/x\"\n",
                "not a host name",
            ),
        ];
        for (text, expected) in cases {
            let e = CiConfig::from_toml(text).unwrap_err();
            let chain = error_chain(&e);
            assert!(chain.contains(expected), "{text:?}: {chain}");
        }
    }

    fn github_claims() -> Map<String, Value> {
        json!({
            "iss": GITHUB_ISSUER,
            "aud": "https://reprise.example",
            "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 300,
            "sub": "repo:octo-org/octo-repo:ref:refs/heads/main",
            "repository": "octo-org/octo-repo",
            "repository_owner": "octo-org",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "ref_protected": "true",
            "event_name": "push",
            "job_workflow_ref": "octo-org/octo-repo/.github/workflows/ci.yml@refs/heads/main",
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn gitlab_claims() -> Map<String, Value> {
        json!({
            "iss": "https://gitlab.example.com",
            "aud": "reprise",
            "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 300,
            "sub": "project_path:group/sub/project:ref_type:branch:ref:main",
            "namespace_path": "group/sub",
            "project_path": "group/sub/project",
            "ref": "main",
            "ref_type": "branch",
            "ref_path": "refs/heads/main",
            "ref_protected": "false",
            "pipeline_source": "merge_request_event",
            "ci_config_ref_uri": "gitlab.example.com/group/sub/project//.gitlab-ci.yml@refs/heads/main",
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn github_claims_map_to_an_identity() {
        let id = identity(CiKind::Github, &github_claims(), NOW + 300).unwrap();
        assert_eq!(
            id,
            CiIdentity {
                kind: CiKind::Github,
                repository: "octo-org/octo-repo".into(),
                reference: "refs/heads/main".into(),
                protected: true,
                event: "push".into(),
                subject: "repo:octo-org/octo-repo:ref:refs/heads/main".into(),
                workflow: Some(
                    "octo-org/octo-repo/.github/workflows/ci.yml@refs/heads/main".into()
                ),
                expires_at: NOW + 300,
            }
        );
        assert_eq!(id.name(), "ci:github:octo-org/octo-repo@refs/heads/main");
    }

    #[test]
    fn gitlab_claims_map_to_an_identity() {
        let id = identity(CiKind::Gitlab, &gitlab_claims(), NOW + 300).unwrap();
        assert_eq!(id.repository, "group/sub/project");
        assert_eq!(id.reference, "refs/heads/main");
        assert!(!id.protected);
        assert_eq!(id.event, "merge_request_event");
        assert_eq!(id.name(), "ci:gitlab:group/sub/project@refs/heads/main");
        // Without ref_path (older GitLab): from ref_type and ref.
        let mut claims = gitlab_claims();
        claims.remove("ref_path");
        claims.insert("ref_type".into(), json!("tag"));
        claims.insert("ref".into(), json!("v1.0"));
        let id = identity(CiKind::Gitlab, &claims, NOW).unwrap();
        assert_eq!(id.reference, "refs/tags/v1.0");
    }

    #[test]
    fn ref_protected_as_string_bool_or_missing() {
        for (value, expected) in [
            (Some(json!("true")), Ok(true)),
            (Some(json!("false")), Ok(false)),
            (Some(json!(true)), Ok(true)),
            (Some(json!(false)), Ok(false)),
            (None, Ok(false)),
            (Some(json!("yes")), Err(())),
            (Some(json!(1)), Err(())),
        ] {
            let mut claims = github_claims();
            match &value {
                Some(v) => claims.insert("ref_protected".into(), v.clone()),
                None => claims.remove("ref_protected"),
            };
            let got = identity(CiKind::Github, &claims, NOW)
                .map(|id| id.protected)
                .map_err(|e| {
                    assert!(
                        matches!(
                            e,
                            VerifyError::BadClaim {
                                claim: "ref_protected",
                                ..
                            }
                        ),
                        "{e}"
                    )
                });
            assert_eq!(got, expected, "{value:?}");
        }
    }

    #[test]
    fn claims_that_do_not_name_one_repository_are_refused() {
        let cases: Vec<(CiKind, &str, Value, &str)> = vec![
            (
                CiKind::Github,
                "repository",
                Value::Null,
                "no \"repository\"",
            ),
            (
                CiKind::Github,
                "repository",
                json!("octo-org"),
                "not a repository path",
            ),
            (
                CiKind::Github,
                "repository",
                json!("a/b/c"),
                "not a repository path",
            ),
            (
                CiKind::Github,
                "repository",
                json!("../x"),
                "not a repository path",
            ),
            (
                CiKind::Github,
                "repository",
                json!("a/b c"),
                "not a repository path",
            ),
            (CiKind::Github, "repository", json!(7), "not a string"),
            (CiKind::Github, "ref", json!("main"), "not a full git ref"),
            (
                CiKind::Github,
                "ref",
                json!("refs/heads/a b"),
                "not a full git ref",
            ),
            (
                CiKind::Github,
                "ref",
                json!("refs/heads/../x"),
                "not a full git ref",
            ),
            (CiKind::Github, "event_name", json!(""), "empty"),
            (
                CiKind::Github,
                "event_name",
                json!("push now"),
                "not a word",
            ),
            (CiKind::Github, "sub", Value::Null, "no \"sub\""),
            (CiKind::Github, "sub", json!("a\nb"), "control"),
            (
                CiKind::Gitlab,
                "project_path",
                json!("project"),
                "not a repository path",
            ),
            (
                CiKind::Gitlab,
                "pipeline_source",
                Value::Null,
                "no \"pipeline_source\"",
            ),
        ];
        for (kind, claim, value, expected) in cases {
            let mut claims = match kind {
                CiKind::Github => github_claims(),
                CiKind::Gitlab => gitlab_claims(),
            };
            if value.is_null() {
                claims.remove(claim);
            } else {
                claims.insert(claim.into(), value.clone());
            }
            let e = identity(kind, &claims, NOW).unwrap_err().to_string();
            assert!(e.contains(expected), "{claim}={value}: {e}");
        }
        let mut claims = gitlab_claims();
        claims.remove("ref_path");
        claims.insert("ref_type".into(), json!("commit"));
        let e = identity(CiKind::Gitlab, &claims, NOW).unwrap_err();
        assert!(
            matches!(
                e,
                VerifyError::BadClaim {
                    claim: "ref_type",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// An ES256 key made with ring, and tokens it signs.
    struct TestKey {
        pair: EcdsaKeyPair,
        kid: String,
    }

    impl TestKey {
        fn new(kid: &str) -> TestKey {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            TestKey {
                pair,
                kid: kid.into(),
            }
        }

        fn jwk(&self, alg: Option<&str>) -> Value {
            let point = self.pair.public_key().as_ref();
            let mut jwk = json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            });
            if let Some(alg) = alg {
                jwk["alg"] = json!(alg);
            }
            jwk
        }

        fn sign(&self, header: Value, claims: &Map<String, Value>) -> String {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(Value::Object(claims.clone()).to_string())
            );
            let sig = self
                .pair
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap();
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }

        fn token(&self, claims: &Map<String, Value>) -> String {
            self.sign(
                json!({"alg": "ES256", "typ": "JWT", "kid": self.kid}),
                claims,
            )
        }
    }

    fn keyset(jwks: Value) -> KeySet {
        KeySet::from_jwks(jwks.to_string().as_bytes()).unwrap()
    }

    fn check(token: &str, keys: &KeySet, now: u64) -> Result<CiIdentity, VerifyError> {
        let unverified = inspect(token)?;
        verify_with_keys(token, &unverified, &github(), keys, now)
    }

    #[test]
    fn a_signed_token_verifies_and_every_claim_check_refuses() {
        let key = TestKey::new("k1");
        let keys = keyset(json!({"keys": [key.jwk(Some("ES256"))]}));
        let good = github_claims();
        let id = check(&key.token(&good), &keys, NOW).unwrap();
        assert_eq!(id.name(), "ci:github:octo-org/octo-repo@refs/heads/main");

        let with = |name: &str, value: Value| {
            let mut c = good.clone();
            if value.is_null() {
                c.remove(name);
            } else {
                c.insert(name.into(), value);
            }
            key.token(&c)
        };
        // Leeway: a minute either side, not more.
        assert!(check(&with("exp", json!(NOW - 59)), &keys, NOW).is_ok());
        assert!(matches!(
            check(&with("exp", json!(NOW - 60)), &keys, NOW),
            Err(VerifyError::Expired { expired_at, now: NOW }) if expired_at == NOW - 60
        ));
        assert!(check(&with("nbf", json!(NOW + 60)), &keys, NOW).is_ok());
        assert!(matches!(
            check(&with("nbf", json!(NOW + 61)), &keys, NOW),
            Err(VerifyError::NotYetValid { .. })
        ));
        assert!(
            check(&with("nbf", Value::Null), &keys, NOW).is_ok(),
            "nbf is optional"
        );
        assert!(matches!(
            check(&with("iat", json!(NOW + 61)), &keys, NOW),
            Err(VerifyError::IssuedInFuture { .. })
        ));
        // The claims jsonwebtoken once let through when mistyped
        // (CVE-2026-25537): a string `nbf` or `exp` is refused, not ignored.
        for claim in ["nbf", "exp", "iat"] {
            let e = check(&with(claim, json!("99999999999")), &keys, NOW).unwrap_err();
            assert!(
                matches!(e, VerifyError::BadClaim { claim: c, .. } if c == claim),
                "{e}"
            );
        }
        for claim in ["exp", "iat"] {
            let e = check(&with(claim, Value::Null), &keys, NOW).unwrap_err();
            assert!(
                matches!(&e, VerifyError::MissingClaim(c) if c == claim),
                "{e}"
            );
        }
        assert!(matches!(
            check(&with("aud", json!("https://other.example")), &keys, NOW),
            Err(VerifyError::WrongAudience { .. })
        ));
        assert!(
            check(
                &with("aud", json!(["x", "https://reprise.example"])),
                &keys,
                NOW
            )
            .is_ok(),
            "aud contains ours"
        );
        assert!(matches!(
            check(&with("aud", Value::Null), &keys, NOW),
            Err(VerifyError::MissingClaim(c)) if c == "aud"
        ));
        assert!(matches!(
            check(&with("iss", json!("https://evil.example")), &keys, NOW),
            Err(VerifyError::WrongIssuer { found }) if found == "https://evil.example"
        ));
    }

    #[test]
    fn signatures_algorithms_and_keys() {
        let key = TestKey::new("k1");
        let other = TestKey::new("k1");
        let keys = keyset(json!({"keys": [key.jwk(None)]}));
        let claims = github_claims();
        // Signed by another key under the same kid.
        assert!(matches!(
            check(&other.token(&claims), &keys, NOW),
            Err(VerifyError::BadSignature)
        ));
        // A flipped bit in the signature.
        let token = key.token(&claims);
        let (rest, sig) = token.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig[10] ^= 1;
        let tampered = format!("{rest}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert!(matches!(
            check(&tampered, &keys, NOW),
            Err(VerifyError::BadSignature)
        ));
        // A changed payload under the original signature.
        let mut changed = claims.clone();
        changed.insert("repository".into(), json!("octo-org/other"));
        let forged = key.token(&changed);
        let mut parts: Vec<&str> = forged.split('.').collect();
        parts[2] = token.split('.').nth(2).unwrap();
        assert!(matches!(
            check(&parts.join("."), &keys, NOW),
            Err(VerifyError::BadSignature)
        ));
        // Unknown kid.
        let stranger = TestKey::new("k2");
        assert!(matches!(
            check(&stranger.token(&claims), &keys, NOW),
            Err(VerifyError::UnknownKey { kid, refreshed: false, .. }) if kid == "k2"
        ));
        // An EC key asked to verify RS256.
        let rs = key.sign(json!({"alg": "RS256", "kid": "k1"}), &claims);
        assert!(matches!(
            check(&rs, &keys, NOW),
            Err(VerifyError::KeyAlgorithmMismatch { .. })
        ));
        // Refused by name, whatever the key: none, HMAC, unknown.
        for alg in [
            "none", "None", "HS256", "HS384", "HS512", "ES512", "RSA-OAEP", "",
        ] {
            let t = key.sign(json!({"alg": alg, "kid": "k1"}), &claims);
            assert!(
                matches!(check(&t, &keys, NOW), Err(VerifyError::UnsupportedAlgorithm { alg: a }) if a == alg),
                "{alg}"
            );
        }
        let t = key.sign(json!({"alg": "ES256"}), &claims);
        assert!(matches!(
            check(&t, &keys, NOW),
            Err(VerifyError::MissingKeyId)
        ));
        let t = key.sign(
            json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
            &claims,
        );
        assert!(matches!(
            check(&t, &keys, NOW),
            Err(VerifyError::Malformed(_))
        ));
        // Malformed.
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.e30.",
            "e30.!!.",
            "bm90IGpzb24.e30.",
        ] {
            assert!(
                matches!(check(bad, &keys, NOW), Err(VerifyError::Malformed(_))),
                "{bad:?}"
            );
        }
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(
            check(&huge, &keys, NOW),
            Err(VerifyError::TooLarge { .. })
        ));
    }

    #[test]
    fn jwks_keeps_only_keys_that_verify_signatures() {
        let key = TestKey::new("ec");
        let mut enc = key.jwk(None);
        enc["use"] = json!("enc");
        enc["kid"] = json!("enc");
        let mut wrong_alg = key.jwk(Some("ES384"));
        wrong_alg["kid"] = json!("wrong-alg");
        let mut no_kid = key.jwk(None);
        no_kid.as_object_mut().unwrap().remove("kid");
        let keys = keyset(json!({"keys": [
            key.jwk(Some("ES256")),
            enc,
            wrong_alg,
            no_kid,
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"},
            {"kty": "OKP", "crv": "X25519", "kid": "x", "x": "AAAA"},
            {"kty": "weird", "kid": "weird"},
        ]}));
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(keys.get("ec").unwrap().algorithms, vec![Algorithm::ES256]);
        assert!(KeySet::from_jwks(b"{}").is_err());
        assert!(keyset(json!({"keys": []})).is_empty());
    }

    #[test]
    fn values_from_a_token_are_clipped_in_messages() {
        let key = TestKey::new(&"k".repeat(5000));
        let keys = KeySet::default();
        let e = check(&key.token(&github_claims()), &keys, NOW).unwrap_err();
        assert!(
            matches!(&e, VerifyError::UnknownKey { kid, .. } if kid.chars().count() == 101),
            "{e}"
        );
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn the_cache_fetches_once_per_interval() {
        let limits = VerifierLimits::default();
        let t0 = Instant::now();
        let secs = |s| t0 + Duration::from_secs(s);
        let key = TestKey::new("k1");
        let keys = keyset(json!({"keys": [key.jwk(None)]}));
        let fresh = KeyCache {
            keys: Some((keys.clone(), t0)),
            last_attempt: Some(t0),
            last_error: None,
        };
        let failed = KeyCache {
            keys: None,
            last_attempt: Some(t0),
            last_error: Some("refused".into()),
        };
        let empty = KeyCache::default();
        let cases: Vec<(&str, &KeyCache, &str, Instant, KeyStep)> = vec![
            ("empty: fetch", &empty, "k1", t0, KeyStep::Fetch),
            ("known kid", &fresh, "k1", secs(10), KeyStep::Use),
            (
                "unknown kid, just fetched",
                &fresh,
                "k2",
                secs(59),
                KeyStep::Unknown,
            ),
            (
                "unknown kid, a minute on",
                &fresh,
                "k2",
                secs(60),
                KeyStep::Fetch,
            ),
            (
                "known kid, keys too old",
                &fresh,
                "k1",
                secs(3600),
                KeyStep::Fetch,
            ),
            (
                "failed: wait",
                &failed,
                "k1",
                secs(15),
                KeyStep::Wait(Duration::from_secs(45)),
            ),
            (
                "failed: a minute on",
                &failed,
                "k1",
                secs(60),
                KeyStep::Fetch,
            ),
        ];
        for (what, cache, kid, now, expected) in cases {
            assert_eq!(cache.step(kid, now, &limits), expected, "{what}");
        }
        // Old keys and a recent failed attempt: no key is used.
        let stale = KeyCache {
            keys: Some((keys, t0)),
            last_attempt: Some(secs(3590)),
            last_error: Some("timeout".into()),
        };
        assert!(matches!(
            stale.step("k1", secs(3600), &limits),
            KeyStep::Wait(_)
        ));
    }
}
