//! CI jobs log in with their OIDC ID token: a connection that presents no
//! client certificate may ask one thing, a [`Message::Login`], and gets a
//! short-lived client certificate for the key it holds, granting the one
//! repository the token names. Everything else on such a connection is
//! refused.
//!
//! What a login checks, in order: the protocol version; that this
//! orchestrator takes CI logins at all (`[ci.github]`/`[ci.gitlab]`); the
//! proof that the asker holds the key the certificate will name (an ECDSA
//! P-256 signature over [`login_proof_bytes`] of the token); the token
//! ([`crate::oidc::Verifier`]: signature, issuer, audience, lifetime,
//! claims); that an administrator has not revoked the job's identity. The
//! identity is `ci:<forge>:<owner/name>@<ref>`, its one namespace
//! `<host>/<owner/name>`, and whether its results count for CI is the
//! repository's `ci_jobs` policy applied to the ref's protection.

use std::sync::Mutex;
use std::time::Duration;

use quinn::Connection;
use reprise_protocol::policy::PolicyConfig;
use reprise_protocol::wire::{ErrorCode, Message, login_proof_bytes};
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use tracing::{info, warn};

use crate::oidc::{CiConfig, CiIdentity, Verifier, error_chain};
use crate::pki::{self, CaPem, P256Point};
use crate::state::{State, now_secs};
use reprise_frames::{read_message, write_message};
use reprise_protocol::wire::StateEvent;

/// What the service needs to answer logins: the configured issuers, their
/// verifier, and the CA that signs job certificates.
#[derive(Debug)]
pub struct CiLogin {
    pub config: CiConfig,
    pub verifier: Verifier,
    pub ca: CaPem,
}

/// What a verified job is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobGrant {
    pub name: String,
    pub namespace: String,
    pub trusted: bool,
}

/// The grant of a verified job under `policy` (`None`: its forge is not
/// configured, which a verified token cannot be).
pub fn grant(config: &CiConfig, policy: &PolicyConfig, job: &CiIdentity) -> Option<JobGrant> {
    let namespace = config.of_kind(job.kind)?.namespace(&job.repository);
    let trusted = policy.for_repo(&namespace).ci_jobs.counts(job.protected);
    Some(JobGrant {
        name: job.name(),
        namespace,
        trusted,
    })
}

/// How long a connection without a certificate has to ask.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// What answers the one request of a connection without a client
/// certificate: CI logins, people's logins, and the bound on people's
/// device flows waiting at once.
#[derive(Debug)]
pub struct Logins<'a> {
    pub ci: Option<&'a CiLogin>,
    pub people: Option<&'a crate::people::PeopleLogin>,
    pub sessions: &'a tokio::sync::Semaphore,
}

/// Answers the one request of a connection without a client certificate,
/// then closes it. Whether a certificate was issued. `permit` (a place
/// among the logins answered at once) is given back once the request is
/// read: a person's device flow then takes a place of its own.
pub async fn answer(
    conn: &Connection,
    logins: Logins<'_>,
    permit: tokio::sync::SemaphorePermit<'_>,
    state: &Mutex<State>,
    policy: &PolicyConfig,
    indexed: &(dyn Fn() -> std::collections::BTreeSet<String> + Sync),
) -> bool {
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(ASK_TIMEOUT, conn.accept_bi()).await
    else {
        info!("refused: no request from a connection without a certificate");
        conn.close(quinn::VarInt::from_u32(0), b"no login request");
        return false;
    };
    let asked = tokio::time::timeout(ASK_TIMEOUT, read_message(&mut recv)).await;
    let answer = match asked {
        Err(_) => Message::error(ErrorCode::TimedOut, "no login request in time"),
        Ok(Err(e)) => e.refusal().unwrap_or_else(|| {
            Message::error(ErrorCode::Malformed, "the login request did not arrive")
        }),
        Ok(Ok(Message::Login {
            version,
            token,
            public_key,
            proof,
        })) => match Message::check_version(version) {
            Some(refusal) => refusal,
            None => match logins.ci {
                None => Message::error(
                    ErrorCode::Unavailable,
                    "this orchestrator takes no CI logins: its administrator configures [ci.github] or [ci.gitlab] in orchestrator.toml",
                ),
                Some(login) => log_in(login, state, policy, &token.0, &public_key, &proof)
                    .await
                    .unwrap_or_else(|refusal| refusal),
            },
        },
        Ok(Ok(Message::PersonLogin {
            version,
            provider,
            public_key,
            proof,
        })) => {
            drop(permit);
            match (Message::check_version(version), logins.people) {
                (Some(refusal), _) => refusal,
                (None, None) => Message::error(
                    ErrorCode::Unavailable,
                    "this orchestrator takes no logins of people: its administrator configures [login.github] or [login.gitlab] in orchestrator.toml",
                ),
                (None, Some(people)) => match logins.sessions.try_acquire() {
                    Err(_) => Message::error(
                        ErrorCode::Limit,
                        format!(
                            "{} logins are waiting for their forge already, the most this orchestrator allows; try again in a few minutes",
                            crate::people::MAX_SESSIONS
                        ),
                    ),
                    Ok(_session) => {
                        let cx = crate::people::Context {
                            login: people,
                            state,
                            policy,
                            indexed: indexed(),
                        };
                        crate::people::session(&cx, conn, &mut send, &provider, &public_key, &proof)
                            .await
                    }
                },
            }
        }
        Ok(Ok(_)) => Message::error(
            ErrorCode::HelloFirst,
            "this connection presented no client certificate: it may only log in (reprise login); log in, or set REPRISE_CREDENTIALS",
        ),
    };
    let refused = matches!(answer, Message::Error { .. });
    if let Message::Error { message, .. } = &answer {
        info!("login refused: {message}");
    }
    let _ = write_message(&mut send, &answer).await;
    let _ = send.finish();
    // Let the answer reach the executor before the close does.
    let _ = tokio::time::timeout(ASK_TIMEOUT, send.stopped()).await;
    conn.close(quinn::VarInt::from_u32(0), b"login answered");
    !refused
}

async fn log_in(
    login: &CiLogin,
    state: &Mutex<State>,
    policy: &PolicyConfig,
    token: &str,
    public_key: &str,
    proof: &str,
) -> Result<Message, Message> {
    let refuse = |code, text: String| Message::error(code, text);
    let point = reprise_protocol::hex::decode(public_key)
        .filter(|p| p.len() == 65 && p[0] == 4)
        .ok_or_else(|| {
            refuse(
                ErrorCode::Malformed,
                "the public key is not an uncompressed P-256 point".into(),
            )
        })?;
    let signature = reprise_protocol::hex::decode(proof)
        .ok_or_else(|| refuse(ErrorCode::Malformed, "the proof is not hex".into()))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point)
        .verify(&login_proof_bytes(token), &signature)
        .map_err(|_| {
            refuse(
                ErrorCode::Malformed,
                "the proof does not verify with the public key: the asker does not hold its key"
                    .into(),
            )
        })?;
    let job = login.verifier.verify(token).await.map_err(|e| {
        refuse(
            ErrorCode::Other,
            format!("the CI token was refused: {}", error_chain(&e)),
        )
    })?;
    let grant = grant(&login.config, policy, &job).ok_or_else(|| {
        refuse(
            ErrorCode::Other,
            format!("CI logins from {} are not configured", job.kind),
        )
    })?;
    let until_secs = now_secs() + login.config.lifetime.as_secs();
    let until =
        time::OffsetDateTime::from_unix_timestamp(until_secs as i64).expect("a near-future time");
    let (certificate, sha256) = pki::issue_for_key(
        &login.ca,
        &grant.name,
        std::slice::from_ref(&grant.namespace),
        &P256Point(point),
        until,
    )
    .map_err(|e| {
        warn!("cannot sign a job certificate: {e}");
        refuse(
            ErrorCode::Unavailable,
            "the orchestrator could not sign a certificate".into(),
        )
    })?;
    let event = StateEvent::Issued {
        name: grant.name.clone(),
        cert_sha256: sha256,
        repos: vec![grant.namespace.clone()],
        trusted: grant.trusted,
        at: now_secs(),
        not_after: Some(until_secs),
        access: Default::default(),
    };
    let recorded = state.lock().expect("state lock").record_login(event);
    match recorded {
        Ok(None) => {}
        Ok(Some(at)) => {
            return Err(refuse(
                ErrorCode::Other,
                format!(
                    "{} was revoked at {}; an administrator lifts it with `reprise-orchestrator revoke --lift`",
                    grant.name,
                    crate::state::rfc3339(at)
                ),
            ));
        }
        Err(e) => {
            warn!("cannot record a login: {e}");
            return Err(refuse(
                ErrorCode::Unavailable,
                "the orchestrator could not record the login".into(),
            ));
        }
    }
    info!(
        identity = %grant.name,
        namespace = %grant.namespace,
        trusted = grant.trusted,
        protected = job.protected,
        event = %job.event,
        "CI job logged in"
    );
    Ok(Message::LoggedIn {
        certificate,
        identity: grant.name,
        counts: Some(if grant.trusted {
            vec![grant.namespace.clone()]
        } else {
            Vec::new()
        }),
        repos: vec![grant.namespace],
        trusted: grant.trusted,
        expires_at: until_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::CiKind;

    fn job(kind: CiKind, repository: &str, protected: bool) -> CiIdentity {
        CiIdentity {
            kind,
            repository: repository.into(),
            reference: "refs/heads/main".into(),
            protected,
            event: "push".into(),
            subject: "repo:o/r:ref:refs/heads/main".into(),
            workflow: None,
            expires_at: 0,
        }
    }

    #[test]
    fn a_job_is_granted_its_repository_and_counts_by_the_policy() {
        let config = CiConfig::from_toml(
            "[ci.github]\naudience = \"a\"\n[ci.gitlab]\nissuer = \"https://gitlab.example\"\naudience = \"a\"\n",
        )
        .unwrap();
        let policy = reprise_protocol::policy::OrchestratorSettings::parse(
            "[policy.repos.\"github.com/o/all\"]\nci_jobs = \"all\"\n[policy.repos.\"github.com/o/none\"]\nci_jobs = \"none\"\n",
        )
        .unwrap()
        .policy;
        let g =
            |kind, repo, protected| grant(&config, &policy, &job(kind, repo, protected)).unwrap();
        assert_eq!(
            g(CiKind::Github, "o/r", true),
            JobGrant {
                name: "ci:github:o/r@refs/heads/main".into(),
                namespace: "github.com/o/r".into(),
                trusted: true,
            }
        );
        assert!(
            !g(CiKind::Github, "o/r", false).trusted,
            "unprotected refs do not count by default"
        );
        assert!(g(CiKind::Github, "o/all", false).trusted);
        assert!(!g(CiKind::Github, "o/none", true).trusted);
        assert_eq!(
            g(CiKind::Gitlab, "g/p", true).namespace,
            "gitlab.example/g/p"
        );
        let only_github = CiConfig::from_toml("[ci.github]\naudience = \"a\"\n").unwrap();
        assert_eq!(
            grant(&only_github, &policy, &job(CiKind::Gitlab, "g/p", true)),
            None
        );
    }
}
