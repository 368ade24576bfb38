//! People log in through a forge, on a connection without a client
//! certificate: a [`Message::PersonLogin`] starts the OAuth device flow
//! against GitHub or GitLab ([`crate::forge`]) with the orchestrator's own
//! OAuth application; the code is relayed at once ([`Message::LoginCode`]);
//! once the person approved on the forge, the orchestrator asks the forge
//! who they are and their access to each of the team's repositories of
//! that forge, and issues a short-lived certificate for the key the asker
//! holds, granting exactly the repositories the forge lets them read (and
//! the policy's `readers` does not keep from them).
//!
//! What a login checks, in order: the protocol version; that the forge is
//! configured (`[login.github]`, `[login.gitlab]`); the proof that the asker
//! holds the key the certificate will name (ECDSA P-256 over
//! [`person_login_proof_bytes`]); the device flow (denied, expired); who
//! the token belongs to; the access to each team repository; that an
//! administrator has not revoked the identity. The identity is
//! `github:<username>` or `gitlab:<host>:<username>`, names that cannot
//! be issued by hand.
//!
//! The team's repositories of a forge are the namespaces of its host that
//! the orchestrator knows: those named in `[policy.repos]`, those granted
//! to any identity (CI jobs, hand-issued, people), and those of results
//! indexed now. A repository nobody named or used yet is not offered.
//!
//! A renewal ([`Message::Renew`]) comes on a person's authenticated
//! connection: the orchestrator asks the forge again with the token it kept
//! (who, then the access to each team repository) and issues a certificate
//! with the grants of now: fewer when access was taken away on the forge,
//! none ("log in again") when the forge no longer takes the token or names
//! another person. The forge token stays in the state database; it is
//! never logged and never sent to the executor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use quinn::{Connection, SendStream};
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::policy::{self, ForgeAccess, PolicyConfig};
use reprise_protocol::wire::{
    ErrorCode, Message, StateEvent, person_login_proof_bytes, renew_proof_bytes,
};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::forge::{Access, Forge, ForgeError, ForgeToken, Person, Provider};
use crate::pki::{self, CaPem, P256Point};
use crate::state::{Grant, LoginKind, PersonRecord, State, now_secs, rfc3339};
use reprise_frames::write_message;

/// How many people's device flows may wait at once; more are refused.
pub const MAX_SESSIONS: usize = 16;

/// The most repositories one login asks the forge about.
pub const MAX_TEAM_REPOS: usize = 1000;

/// How many access questions go to the forge at once.
const ACCESS_CONCURRENCY: usize = 8;

/// How long past the code's expiry the flow may take.
const EXPIRY_GRACE: Duration = Duration::from_secs(10);

/// The configured forges and the CA that signs people's certificates.
#[derive(Debug)]
pub struct PeopleLogin {
    pub forges: Vec<Forge>,
    /// How long a person's certificate lasts.
    pub lifetime: Duration,
    pub ca: CaPem,
}

impl PeopleLogin {
    fn forge(&self, provider: &str) -> Option<&Forge> {
        self.forges.iter().find(|f| f.provider.as_str() == provider)
    }
}

/// The identity of `person` on `forge`.
pub fn identity(forge: &Forge, person: &Person) -> String {
    match forge.provider {
        Provider::Github => policy::github_identity(&person.username),
        Provider::Gitlab => policy::gitlab_identity(&forge.host, &person.username),
    }
}

/// The forge's access as the policy speaks of it.
pub fn access_level(access: Access) -> ForgeAccess {
    match access {
        Access::None => ForgeAccess::None,
        Access::Guest => ForgeAccess::Guest,
        Access::Read => ForgeAccess::Read,
        Access::Triage => ForgeAccess::Triage,
        Access::Write => ForgeAccess::Write,
        Access::Maintain => ForgeAccess::Maintain,
        Access::Admin => ForgeAccess::Admin,
    }
}

/// The team's repositories on the forge of `host` (namespaces, sorted, at
/// most [`MAX_TEAM_REPOS`]): those of its host named in `[policy.repos]`,
/// granted to some identity, or holding an indexed result.
pub fn team_repositories(
    host: &str,
    policy: &PolicyConfig,
    granted: &BTreeSet<String>,
    indexed: &BTreeSet<String>,
) -> Vec<String> {
    let prefix = format!("{host}/");
    let all: BTreeSet<&String> = policy
        .repos
        .keys()
        .chain(granted)
        .chain(indexed)
        .filter(|ns| ns.len() > prefix.len() && ns.starts_with(&prefix))
        .collect();
    if all.len() > MAX_TEAM_REPOS {
        warn!(
            host,
            repositories = all.len(),
            "more repositories than one login asks the forge about; the first {MAX_TEAM_REPOS} are asked"
        );
    }
    all.into_iter().take(MAX_TEAM_REPOS).cloned().collect()
}

/// What a person is granted, from their forge access to each team
/// repository (by namespace) under `policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonGrant {
    pub identity: String,
    /// The repositories they may read: the forge lets them read the code
    /// (Read or more; GitLab's Guest cannot) and `readers` does not leave
    /// them out.
    pub repos: Vec<String>,
    /// Their access to each of those.
    pub access: BTreeMap<String, ForgeAccess>,
    /// Those in which their results count for CI.
    pub counts: Vec<String>,
}

/// The grant of `identity` with `access` under `policy` (sans-IO).
pub fn decide(
    identity: &str,
    access: &BTreeMap<String, ForgeAccess>,
    policy: &PolicyConfig,
) -> PersonGrant {
    let mut out = PersonGrant {
        identity: identity.to_string(),
        repos: Vec::new(),
        access: BTreeMap::new(),
        counts: Vec::new(),
    };
    for (ns, level) in access {
        let repo = policy.for_repo(ns);
        if !level.reads() || !repo.may_read(identity) {
            continue;
        }
        out.repos.push(ns.clone());
        out.access.insert(ns.clone(), *level);
        if repo.counts_for(identity, false, Some(*level)).is_some() {
            out.counts.push(ns.clone());
        }
    }
    out
}

/// Everything a session needs of the service.
#[derive(Debug)]
pub struct Context<'a> {
    pub login: &'a PeopleLogin,
    pub state: &'a Mutex<State>,
    pub policy: &'a PolicyConfig,
    /// Namespaces of the results indexed now.
    pub indexed: BTreeSet<String>,
}

fn refuse(code: ErrorCode, text: impl Into<String>) -> Message {
    Message::error(code, text)
}

/// Checks `proof` (hex) of `bytes` by `public_key` (hex, uncompressed
/// P-256): the key's point.
fn check_proof(public_key: &str, proof: &str, bytes: &[u8]) -> Result<Vec<u8>, Message> {
    let point = reprise_protocol::hex::decode(public_key)
        .filter(|p| p.len() == 65 && p[0] == 4)
        .ok_or_else(|| {
            refuse(
                ErrorCode::Malformed,
                "the public key is not an uncompressed P-256 point",
            )
        })?;
    let signature = reprise_protocol::hex::decode(proof)
        .ok_or_else(|| refuse(ErrorCode::Malformed, "the proof is not hex"))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
        .verify(bytes, &signature)
        .map_err(|_| {
            refuse(
                ErrorCode::Malformed,
                "the proof does not verify with the public key: the asker does not hold its key",
            )
        })?;
    Ok(point)
}

/// What a forge failure tells the person.
fn forge_refusal(e: &ForgeError) -> Message {
    match e {
        ForgeError::Unreachable(_) => refuse(
            ErrorCode::Unavailable,
            format!("the orchestrator could not reach the forge ({e}); try again later"),
        ),
        ForgeError::Config(_) | ForgeError::Client(_) => refuse(
            ErrorCode::Unavailable,
            format!("{e}; tell the orchestrator's administrator"),
        ),
        ForgeError::Denied | ForgeError::Expired | ForgeError::Protocol(_) => {
            refuse(ErrorCode::Other, e.to_string())
        }
    }
}

/// Answers a `PersonLogin` on `send`: the code as soon as the forge gives
/// it, then the final answer (returned, to be written by the caller).
pub async fn session(
    cx: &Context<'_>,
    conn: &Connection,
    send: &mut SendStream,
    provider: &str,
    public_key: &str,
    proof: &str,
) -> Message {
    let Some(forge) = cx.login.forge(provider) else {
        return refuse(
            ErrorCode::Unavailable,
            format!(
                "this orchestrator takes no {provider} logins: its administrator configures [login.{provider}] in orchestrator.toml (see the README)"
            ),
        );
    };
    let point = match check_proof(
        public_key,
        proof,
        &person_login_proof_bytes(provider, public_key),
    ) {
        Ok(point) => point,
        Err(refusal) => return refusal,
    };
    let device = match forge.start().await {
        Ok(device) => device,
        Err(e) => {
            warn!(provider, "cannot start a device flow: {e}");
            return forge_refusal(&e);
        }
    };
    let code = Message::LoginCode {
        user_code: device.user_code.clone(),
        verification_uri: device.verification_uri.clone(),
        verification_uri_complete: device.verification_uri_complete.clone(),
        expires_in: device.expires_in.as_secs(),
    };
    if write_message(send, &code).await.is_err() {
        return refuse(ErrorCode::Other, "the asker went away");
    }
    let waited = tokio::select! {
        waited = tokio::time::timeout(device.expires_in + EXPIRY_GRACE, forge.wait_for_token(&device)) => waited,
        _ = conn.closed() => {
            info!(provider, "the asker went away during the device flow");
            return refuse(ErrorCode::Other, "the asker went away");
        }
    };
    let token = match waited {
        Err(_) => return forge_refusal(&ForgeError::Expired),
        Ok(Err(e)) => {
            info!(provider, "device flow ended without a token: {e}");
            return forge_refusal(&e);
        }
        Ok(Ok(token)) => token,
    };
    let person = match forge.person(&token).await {
        Ok(person) => person,
        Err(e) => {
            warn!(provider, "the forge did not say who the token is: {e}");
            return forge_refusal(&e);
        }
    };
    let identity = identity(forge, &person);
    grant_and_issue(
        cx,
        forge,
        &token,
        &person,
        &identity,
        &point,
        LoginKind::Login,
    )
    .await
    .unwrap_or_else(|refusal| refusal)
}

/// Answers a `Renew` from a connection presenting the certificate
/// `current` of `grant`.
pub async fn renew(
    cx: &Context<'_>,
    grant: &Grant,
    current: &Sha256Digest,
    public_key: &str,
    proof: &str,
) -> Message {
    let name = &grant.name;
    if policy::person_username(name).is_none() {
        return refuse(
            ErrorCode::Unexpected,
            format!(
                "{name} is not a person who logged in through a forge: a CI job logs in again (reprise login --ci); hand-issued credentials are issued again by an administrator"
            ),
        );
    }
    let point = match check_proof(public_key, proof, &renew_proof_bytes(current, public_key)) {
        Ok(point) => point,
        Err(refusal) => return refusal,
    };
    let kept = cx.state.lock().expect("state lock").person(name);
    let kept = match kept {
        Ok(Some(kept)) => kept,
        Ok(None) => {
            return refuse(
                ErrorCode::Other,
                format!(
                    "the orchestrator keeps no forge login of {name}: log in again (reprise login)"
                ),
            );
        }
        Err(e) => {
            warn!("cannot read the state: {e}");
            return refuse(
                ErrorCode::Unavailable,
                "the orchestrator could not read its state",
            );
        }
    };
    let Some(forge) = cx.login.forge(&kept.provider) else {
        return refuse(
            ErrorCode::Unavailable,
            format!("this orchestrator no longer takes {} logins", kept.provider),
        );
    };
    let token = ForgeToken(kept.token.clone());
    let person = match forge.person(&token).await {
        Ok(person) if person.id == kept.forge_id && identity(forge, &person) == *name => person,
        Ok(other) => {
            warn!(identity = %name, now = %other.username, "the forge token names another person now");
            return refuse(
                ErrorCode::Other,
                "the forge account changed since the login: log in again (reprise login)",
            );
        }
        Err(e @ ForgeError::Unreachable(_)) => return forge_refusal(&e),
        Err(e) => {
            info!(identity = %name, "the forge no longer takes the login's token: {e}");
            return refuse(
                ErrorCode::Other,
                "the forge no longer accepts this login (the authorization was revoked or expired): log in again (reprise login)",
            );
        }
    };
    grant_and_issue(cx, forge, &token, &person, name, &point, LoginKind::Renewal)
        .await
        .unwrap_or_else(|refusal| refusal)
}

/// Asks the forge for the person's access to each team repository,
/// decides the grant, signs and records the certificate.
async fn grant_and_issue(
    cx: &Context<'_>,
    forge: &Forge,
    token: &ForgeToken,
    person: &Person,
    identity: &str,
    point: &[u8],
    kind: LoginKind,
) -> Result<Message, Message> {
    let candidates = {
        let state = cx.state.lock().expect("state lock");
        team_repositories(
            &forge.host,
            cx.policy,
            &state.granted_namespaces(),
            &cx.indexed,
        )
    };
    let access = access_to(forge, token, &candidates).await.map_err(|e| {
        warn!(%identity, "cannot ask the forge about access: {e}");
        forge_refusal(&e)
    })?;
    let decided = decide(identity, &access, cx.policy);
    let now = now_secs();
    let until_secs = now + cx.login.lifetime.as_secs();
    let person_record = PersonRecord {
        provider: forge.provider.as_str().to_string(),
        forge_id: person.id,
        token: token.0.clone(),
    };
    if decided.repos.is_empty() {
        // On a renewal the loss takes effect at once for the certificates
        // already out; nothing is issued.
        if kind == LoginKind::Renewal
            && let Err(e) = cx.state.lock().expect("state lock").withdraw(identity, now)
        {
            warn!("cannot record a withdrawn grant: {e}");
        }
        info!(%identity, asked = candidates.len(), "login refused: no team repository it may read");
        return Err(refuse(
            ErrorCode::Other,
            format!(
                "{identity} may read none of this team's repositories on {} ({} asked: {}); ask for access on the forge, then log in again",
                forge.host,
                candidates.len(),
                if candidates.is_empty() {
                    "none is known to the orchestrator yet".to_string()
                } else {
                    candidates.join(", ")
                }
            ),
        ));
    }
    let until =
        time::OffsetDateTime::from_unix_timestamp(until_secs as i64).expect("a near-future time");
    let (certificate, sha256) = pki::issue_for_key(
        &cx.login.ca,
        identity,
        &decided.repos,
        &P256Point(point.to_vec()),
        until,
    )
    .map_err(|e| {
        warn!("cannot sign a person's certificate: {e}");
        refuse(
            ErrorCode::Unavailable,
            "the orchestrator could not sign a certificate",
        )
    })?;
    let event = issued_event(&decided, sha256, now, until_secs);
    let recorded =
        cx.state
            .lock()
            .expect("state lock")
            .record_person_login(event, &person_record, kind);
    match recorded {
        Ok(None) => {}
        Ok(Some(at)) => {
            return Err(refuse(
                ErrorCode::Other,
                format!(
                    "{identity} was revoked at {}; an administrator lifts it with `reprise-orchestrator revoke --lift`",
                    rfc3339(at)
                ),
            ));
        }
        Err(e) => {
            warn!("cannot record a login: {e}");
            return Err(refuse(
                ErrorCode::Unavailable,
                "the orchestrator could not record the login",
            ));
        }
    }
    info!(
        %identity,
        repositories = decided.repos.len(),
        counting = decided.counts.len(),
        renewal = kind == LoginKind::Renewal,
        "person logged in"
    );
    Ok(Message::LoggedIn {
        certificate,
        identity: identity.to_string(),
        trusted: !decided.counts.is_empty(),
        counts: Some(decided.counts),
        repos: decided.repos,
        expires_at: until_secs,
    })
}

fn issued_event(decided: &PersonGrant, sha256: Sha256Digest, at: u64, until: u64) -> StateEvent {
    StateEvent::Issued {
        name: decided.identity.clone(),
        cert_sha256: sha256,
        repos: decided.repos.clone(),
        trusted: false,
        at,
        not_after: Some(until),
        access: decided.access.clone(),
    }
}

/// The person's access to each of `namespaces` (of `forge`'s host), a
/// few questions at a time.
async fn access_to(
    forge: &Forge,
    token: &ForgeToken,
    namespaces: &[String],
) -> Result<BTreeMap<String, ForgeAccess>, ForgeError> {
    let prefix = format!("{}/", forge.host);
    let mut out = BTreeMap::new();
    let mut pending = namespaces.iter();
    let mut tasks = JoinSet::new();
    loop {
        while tasks.len() < ACCESS_CONCURRENCY {
            let Some(ns) = pending.next() else { break };
            let (forge, token, ns) = (forge.clone(), token.clone(), ns.clone());
            let repository = ns[prefix.len()..].to_string();
            tasks.spawn(async move {
                let access = forge.access(&token, &repository).await;
                (ns, access)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        let (ns, access) = done.map_err(|e| ForgeError::Protocol(e.to_string()))?;
        out.insert(ns, access_level(access?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reprise_protocol::policy::OrchestratorSettings;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_team_repositories_of_a_forge_are_those_of_its_host_the_orchestrator_knows() {
        let policy = OrchestratorSettings::parse(
            "[policy.repos.\"github.com/team/policy\"]\n[policy.repos.\"gitlab.com/g/p\"]\n",
        )
        .unwrap()
        .policy;
        let granted = set(&["github.com/team/granted", "example.com/x/y", "github.com"]);
        let indexed = set(&["github.com/team/indexed", "github.com.evil/x/y"]);
        assert_eq!(
            team_repositories("github.com", &policy, &granted, &indexed),
            [
                "github.com/team/granted",
                "github.com/team/indexed",
                "github.com/team/policy"
            ]
        );
        assert_eq!(
            team_repositories("gitlab.com", &policy, &granted, &indexed),
            ["gitlab.com/g/p"]
        );
    }

    #[test]
    fn a_person_is_granted_what_the_forge_lets_them_read_and_counts_by_policy() {
        let policy = OrchestratorSettings::parse(
            "[policy.repos.\"h/o/closed\"]\nreaders = [\"bob\"]\n[policy.repos.\"h/o/loose\"]\ncount_access = \"write\"\n",
        )
        .unwrap()
        .policy;
        let access: BTreeMap<String, ForgeAccess> = [
            ("h/o/none", ForgeAccess::None),
            ("h/o/guest", ForgeAccess::Guest),
            ("h/o/read", ForgeAccess::Read),
            ("h/o/maintain", ForgeAccess::Maintain),
            ("h/o/closed", ForgeAccess::Admin),
            ("h/o/loose", ForgeAccess::Write),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let g = decide("github:alice", &access, &policy);
        assert_eq!(g.repos, ["h/o/loose", "h/o/maintain", "h/o/read"]);
        assert_eq!(g.counts, ["h/o/loose", "h/o/maintain"]);
        assert_eq!(g.access["h/o/read"], ForgeAccess::Read);
        assert!(!g.access.contains_key("h/o/guest"));
        let bob = decide("github:bob", &access, &policy);
        assert!(bob.repos.contains(&"h/o/closed".to_string()));
    }
}
