//! Who sealed a stored result, as far as this executor can tell, and
//! whether it counts for CI, which only the orchestrator's policy can say.
//! Used before a local replay and by `reprise results show`.

use reprise_protocol::seal::{self, SignedBy};
use rustls::pki_types::UnixTime;

use super::RunLink;
use crate::store::StoredResult;
use crate::ui::Ui;

/// Who sealed a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedBy {
    /// Made without credentials: replayed on this machine only.
    Nobody,
    /// Checked against the team CA of the user's credentials (not against
    /// the revocation list: that needs the orchestrator).
    Checked(SignedBy),
    /// No credentials are configured, so the certificate's claim is all
    /// there is.
    Unchecked(SignedBy),
    /// The seal does not hold (a store changed by hand, another team's
    /// certificate): the result must not be replayed.
    Broken(String),
}

/// Whether a result counts for CI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counts {
    Yes(String),
    No(String),
    Unknown(String),
}

/// Who sealed `result`, checked with the credentials `link` is configured
/// with (loading them if needed).
pub fn sealed_by(result: &StoredResult, link: &mut RunLink, ui: &dyn Ui) -> SealedBy {
    let Some(seal) = &result.seal else {
        return SealedBy::Nobody;
    };
    match link.orchestrator(ui) {
        Some(o) => match seal::verify(
            seal,
            &result.manifest,
            std::slice::from_ref(o.credentials().ca()),
            UnixTime::now(),
            &Default::default(),
        ) {
            Ok(who) => SealedBy::Checked(who),
            Err(e) => SealedBy::Broken(e.to_string()),
        },
        None => match seal.claimed() {
            Ok(who) => SealedBy::Unchecked(who),
            Err(e) => SealedBy::Broken(e.to_string()),
        },
    }
}

/// Whether `result`, sealed as `by`, counts for CI: the orchestrator is
/// asked (connecting if needed), after the seal is checked against the
/// revocation list it sent.
pub async fn counts(
    result: &StoredResult,
    by: &SealedBy,
    link: &mut RunLink,
    ui: &dyn Ui,
) -> Counts {
    match by {
        SealedBy::Nobody => {
            return Counts::No(
                "a result without its producer's seal is never served and never counts".into(),
            );
        }
        SealedBy::Broken(_) => return Counts::No("its seal does not hold".into()),
        SealedBy::Checked(_) | SealedBy::Unchecked(_) => {}
    }
    let (Some(sealed), Some(roots)) = (
        result.sealed(),
        link.orchestrator(ui)
            .map(|o| vec![o.credentials().ca().clone()]),
    ) else {
        return Counts::Unknown(
            "only the orchestrator's policy can say, and none is configured".into(),
        );
    };
    let Some(live) = link.get(ui).await else {
        return Counts::Unknown(
            "only the orchestrator's policy can say, and it is not reachable".into(),
        );
    };
    if let Err(e) = seal::verify(
        &sealed.seal,
        &sealed.manifest,
        &roots,
        UnixTime::now(),
        live.revoked(),
    ) {
        return Counts::No(e.to_string());
    }
    match live.assess(sealed).await {
        Ok((true, why)) => Counts::Yes(why),
        Ok((false, why)) => Counts::No(why),
        Err(e) => Counts::Unknown(format!("the orchestrator did not answer ({e})")),
    }
}
