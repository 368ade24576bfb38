//! The producer's seal on a result: its ECDSA P-256 signature over the
//! manifest's canonical encoding ([`crate::sign::signing_bytes`]) and its
//! client certificate. The producer seals a result once, when its run ends;
//! the seal is stored beside the manifest and travels unchanged through
//! stores and relays, so whoever replays a result checks who *produced* it,
//! never who passed it on.
//!
//! [`verify`] is the one place a seal is checked (the receiving executor,
//! `reprise results show` and the orchestrator all call it): the
//! certificate chains to the team CA and may authenticate clients, it is
//! valid now, it is not on the revocation list, and the signature verifies
//! under it. It is pure: the time and the revocation list are arguments.

use std::collections::BTreeSet;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::digest::Sha256Digest;
use crate::manifest::ResultManifest;

/// Version of [`Seal`]'s layout.
pub const SEAL_VERSION: u32 = 1;

/// A producer's signature on a result, and its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub version: u32,
    /// ECDSA P-256 with SHA-256, ASN.1 DER, as hex.
    pub signature: String,
    /// The producer's client certificate, PEM.
    pub producer_cert: String,
}

/// Who sealed a result, from a seal that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBy {
    /// sha256 of the certificate's DER: how the orchestrator knows it.
    pub fingerprint: Sha256Digest,
    /// The certificate's common name (the identity's name).
    pub name: String,
    /// When the certificate expires, seconds since the Unix epoch.
    pub not_after: u64,
}

/// Why a seal does not hold.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("seal version {0} is not read by this reprise (it reads {SEAL_VERSION})")]
    Version(u32),
    #[error("the producer's certificate is not valid PEM or DER")]
    CertificateEncoding,
    #[error("the producer's certificate does not hold: {0}")]
    Certificate(String),
    #[error("the producer's certificate ({name}) was revoked")]
    Revoked { name: String },
    #[error("the signature does not verify under the producer's certificate")]
    Signature,
    #[error(transparent)]
    Clock(#[from] crate::clock::FromTheFuture),
}

/// The identity a certificate names, and when it expires, without checking
/// anything else.
pub fn describe(cert: &CertificateDer<'_>) -> Result<SignedBy, SealError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| SealError::CertificateEncoding)?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("(no common name)")
        .to_string();
    let not_after = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    Ok(SignedBy {
        fingerprint: Sha256Digest::of(cert.as_ref()),
        name,
        not_after,
    })
}

/// When `cert` starts and ends (seconds since the Unix epoch), unchecked.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(u64, u64), SealError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| SealError::CertificateEncoding)?;
    let v = parsed.validity();
    Ok((
        u64::try_from(v.not_before.timestamp()).unwrap_or(0),
        u64::try_from(v.not_after.timestamp()).unwrap_or(0),
    ))
}

/// Checks a client certificate an orchestrator just issued for a key held
/// here: it must name `public_key` (the subject public key's bytes, an
/// uncompressed P-256 point) and chain to the pinned team CA `ca` as a
/// client certificate valid at `now`. Who it names.
pub fn check_issued(
    cert: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
    public_key: &[u8],
    now: UnixTime,
) -> Result<SignedBy, SealError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| SealError::CertificateEncoding)?;
    if parsed.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(SealError::Certificate(
            "it names another key than the one this login made".into(),
        ));
    }
    let ee =
        webpki::EndEntityCert::try_from(cert).map_err(|e| SealError::Certificate(e.to_string()))?;
    let anchor = webpki::anchor_from_trusted_cert(ca)
        .map_err(|e| SealError::Certificate(format!("the team CA: {e}")))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| SealError::Certificate(format!("it does not chain to the pinned team CA: {e}")))?;
    describe(cert)
}

impl Seal {
    /// The producer's certificate, decoded.
    pub fn certificate(&self) -> Result<CertificateDer<'static>, SealError> {
        CertificateDer::from_pem_slice(self.producer_cert.as_bytes())
            .map_err(|_| SealError::CertificateEncoding)
    }

    /// Who the certificate names, unchecked (for showing an invalid seal).
    pub fn claimed(&self) -> Result<SignedBy, SealError> {
        describe(&self.certificate()?)
    }
}

/// Checks `seal` on `manifest` against the team CA `roots` at `now`, with
/// `revoked` the fingerprints of revoked certificates. Returns who sealed
/// it.
pub fn verify(
    seal: &Seal,
    manifest: &ResultManifest,
    roots: &[CertificateDer<'_>],
    now: UnixTime,
    revoked: &BTreeSet<Sha256Digest>,
) -> Result<SignedBy, SealError> {
    if seal.version != SEAL_VERSION {
        return Err(SealError::Version(seal.version));
    }
    let cert = seal.certificate()?;
    let who = describe(&cert)?;
    let ee = webpki::EndEntityCert::try_from(&cert)
        .map_err(|e| SealError::Certificate(e.to_string()))?;
    let anchors = roots
        .iter()
        .map(|ca| webpki::anchor_from_trusted_cert(ca).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SealError::Certificate(format!("the team CA: {e}")))?;
    let chain_at = |time: UnixTime| {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
    };
    // The producer's clock may differ from ours: a certificate that starts
    // or ends within the tolerance of now is checked at that edge instead.
    let tolerance = crate::clock::TOLERANCE.as_secs();
    let chained = match chain_at(now) {
        Err(webpki::Error::CertNotValidYet { time, not_before }) => {
            crate::clock::not_from_the_future(
                "the start of the producer's certificate",
                not_before.as_secs(),
                time.as_secs(),
            )?;
            chain_at(not_before)
        }
        Err(webpki::Error::CertExpired { time, not_after })
            if time.as_secs().saturating_sub(not_after.as_secs()) <= tolerance =>
        {
            chain_at(not_after)
        }
        other => other,
    };
    chained.map_err(|e| SealError::Certificate(e.to_string()))?;
    crate::clock::not_from_the_future(
        "the result's creation time",
        manifest.created_at,
        now.as_secs(),
    )?;
    if revoked.contains(&who.fingerprint) {
        return Err(SealError::Revoked { name: who.name });
    }
    let signature = crate::hex::decode(&seal.signature).ok_or(SealError::Signature)?;
    ee.verify_signature(
        webpki::ring::ECDSA_P256_SHA256,
        &crate::sign::signing_bytes(manifest),
        &signature,
    )
    .map_err(|_| SealError::Signature)?;
    Ok(who)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::manifest;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};

    struct Ca {
        cert: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate of `ca` named `name`, valid from `from` to
    /// `until` (seconds from now), and a seal it makes.
    fn producer(
        ca: &Ca,
        name: &str,
        eku: ExtendedKeyUsagePurpose,
        from: i64,
        until: i64,
    ) -> impl Fn(&ResultManifest) -> Seal {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![eku];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let pem = cert.pem();
        let pkcs8 = key.serialize_der();
        move |m: &ResultManifest| {
            let rng = ring::rand::SystemRandom::new();
            let signer =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng).unwrap();
            let sig = signer.sign(&rng, &crate::sign::signing_bytes(m)).unwrap();
            Seal {
                version: SEAL_VERSION,
                signature: crate::hex::encode(sig.as_ref()),
                producer_cert: pem.clone(),
            }
        }
    }

    #[test]
    fn a_seal_holds_only_for_its_manifest_its_ca_and_a_live_certificate() {
        let team = ca();
        let alice = producer(
            &team,
            "alice",
            ExtendedKeyUsagePurpose::ClientAuth,
            -60,
            3600,
        );
        let roots = [team.cert.clone()];
        let now = UnixTime::now();
        let none = BTreeSet::new();
        let m = manifest();
        let seal = alice(&m);
        let who = verify(&seal, &m, &roots, now, &none).expect("a good seal");
        assert_eq!(who.name, "alice");
        assert_eq!(
            who.fingerprint,
            Sha256Digest::of(seal.certificate().unwrap().as_ref())
        );
        assert_eq!(seal.claimed().unwrap(), who);

        // Another manifest under the same seal: the relayer cannot swap it.
        let mut other = manifest();
        other.artifacts[0].sha256 = Sha256Digest::of(b"forged");
        assert_eq!(
            verify(&seal, &other, &roots, now, &none),
            Err(SealError::Signature)
        );
        // Revoked.
        let revoked = BTreeSet::from([who.fingerprint]);
        assert!(matches!(
            verify(&seal, &m, &roots, now, &revoked),
            Err(SealError::Revoked { name }) if name == "alice"
        ));
        // Another team's CA.
        let stranger = ca();
        assert!(matches!(
            verify(&seal, &m, std::slice::from_ref(&stranger.cert), now, &none),
            Err(SealError::Certificate(_))
        ));
        let mallory = producer(
            &stranger,
            "alice",
            ExtendedKeyUsagePurpose::ClientAuth,
            -60,
            3600,
        );
        assert!(matches!(
            verify(&mallory(&m), &m, &roots, now, &none),
            Err(SealError::Certificate(_))
        ));
        // Expired, not yet valid, or not a client certificate.
        for (name, p) in [
            (
                "expired",
                producer(
                    &team,
                    "old",
                    ExtendedKeyUsagePurpose::ClientAuth,
                    -7200,
                    -3600,
                ),
            ),
            (
                "server",
                producer(&team, "srv", ExtendedKeyUsagePurpose::ServerAuth, -60, 3600),
            ),
        ] {
            assert!(
                matches!(
                    verify(&p(&m), &m, &roots, now, &none),
                    Err(SealError::Certificate(_))
                ),
                "{name}"
            );
        }
        // A certificate that starts an hour from now: a clock an hour
        // apart, named as such.
        let ahead = producer(
            &team,
            "new",
            ExtendedKeyUsagePurpose::ClientAuth,
            3600,
            7200,
        );
        match verify(&ahead(&m), &m, &roots, now, &none) {
            Err(SealError::Clock(e)) => assert!((3590..=3600).contains(&e.ahead), "{e}"),
            other => panic!("a certificate from the future: {other:?}"),
        }
        // Within the tolerance either way, it holds.
        for (from, until) in [(120, 7200), (-7200, -120)] {
            let skewed = producer(
                &team,
                "skew",
                ExtendedKeyUsagePurpose::ClientAuth,
                from,
                until,
            );
            assert!(
                verify(&skewed(&m), &m, &roots, now, &none).is_ok(),
                "valid {from}..{until} s from now"
            );
        }
        // A result made three hours from now.
        let mut later = m.clone();
        later.created_at = now.as_secs() + 3 * 3600;
        match verify(&alice(&later), &later, &roots, now, &none) {
            Err(SealError::Clock(e)) => {
                assert_eq!(e.ahead, 3 * 3600);
                assert!(e.to_string().contains("3 h 0 min ahead"), "{e}");
            }
            other => panic!("a result from the future: {other:?}"),
        }
        later.created_at = now.as_secs() + 200;
        assert!(verify(&alice(&later), &later, &roots, now, &none).is_ok());
        // Garbage in every field.
        let mut bad = seal.clone();
        bad.signature = "zz".into();
        assert_eq!(
            verify(&bad, &m, &roots, now, &none),
            Err(SealError::Signature)
        );
        bad = seal.clone();
        bad.producer_cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
        assert!(verify(&bad, &m, &roots, now, &none).is_err());
        bad = seal.clone();
        bad.version = 9;
        assert_eq!(
            verify(&bad, &m, &roots, now, &none),
            Err(SealError::Version(9))
        );
    }
}
