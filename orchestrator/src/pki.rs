//! The team's certificates: the CA, the server certificate and client
//! certificates made with rcgen, and the rustls configuration that requires
//! a client certificate chained to the CA (mTLS, TLS 1.3 only).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::wire::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Why a certificate could not be made or loaded.
#[derive(Debug, Error)]
pub enum PkiError {
    #[error("could not make a certificate")]
    Generate(#[from] rcgen::Error),
    #[error("no {0} in the PEM data")]
    Missing(&'static str),
    #[error("bad PEM data")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC TLS configuration")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A CA: its certificate (PEM) and key (PEM).
#[derive(Clone)]
pub struct CaPem {
    pub cert: String,
    pub key: String,
}

/// The certificate only: the key never reaches a log.
impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// The CA's parameters. Rebuilt the same way each time so that an issuer
/// can be made from the stored key alone (the key identifier is derived
/// from the key, the names are fixed).
fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "reprise team CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Makes a new CA (ECDSA P-256).
pub fn new_ca() -> Result<CaPem, PkiError> {
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    Ok(CaPem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A leaf certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct LeafPem {
    pub cert: String,
    pub key: String,
    /// sha256 of the certificate's DER: how the orchestrator knows it.
    pub sha256: Sha256Digest,
    /// When it expires, seconds since the Unix epoch.
    pub not_after: u64,
}

/// Which kind of leaf to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    Server,
    Client,
}

/// Signs a leaf certificate for `name` (the common name; for a server, also
/// every subject alternative name in `sans`) with a new key.
pub fn issue(
    ca: &CaPem,
    kind: LeafKind,
    name: &str,
    sans: &[String],
    validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
) -> Result<LeafPem, PkiError> {
    let key = KeyPair::generate()?;
    let (cert, sha256, not_after) = sign_leaf(ca, kind, name, sans, &[], validity, &key)?;
    Ok(LeafPem {
        sha256,
        not_after,
        cert,
        key: key.serialize_pem(),
    })
}

/// Signs a client certificate for `name` with a new key, granting `repos`
/// in the certificate itself ([`reprise_protocol::grants`]).
pub fn issue_client(
    ca: &CaPem,
    name: &str,
    repos: &[String],
    validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
) -> Result<LeafPem, PkiError> {
    let key = KeyPair::generate()?;
    let (cert, sha256, not_after) =
        sign_leaf(ca, LeafKind::Client, name, &[], repos, validity, &key)?;
    Ok(LeafPem {
        sha256,
        not_after,
        cert,
        key: key.serialize_pem(),
    })
}

/// A P-256 public key as an uncompressed point (65 bytes), the form a
/// `Login` carries: what a client certificate made by [`issue_for_key`]
/// names.
#[derive(Debug)]
pub struct P256Point(pub Vec<u8>);

impl PublicKeyData for P256Point {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Signs a client certificate for `name` naming `public_key` (whose holder
/// proved possession), valid from a minute ago until `until`. Returns the
/// certificate (PEM) and its sha256.
pub fn issue_for_key(
    ca: &CaPem,
    name: &str,
    repos: &[String],
    public_key: &P256Point,
    until: time::OffsetDateTime,
) -> Result<(String, Sha256Digest), PkiError> {
    let from = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let (cert, sha256, _) = sign_leaf(
        ca,
        LeafKind::Client,
        name,
        &[],
        repos,
        Some((from, until)),
        public_key,
    )?;
    Ok((cert, sha256))
}

/// Signs a leaf certificate naming `public_key`: (PEM, sha256, not after).
fn sign_leaf(
    ca: &CaPem,
    kind: LeafKind,
    name: &str,
    sans: &[String],
    repos: &[String],
    validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>,
    public_key: &impl PublicKeyData,
) -> Result<(String, Sha256Digest, u64), PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let mut params = CertificateParams::new(sans.to_vec())?;
    for repo in repos {
        let uri = reprise_protocol::grants::namespace_uri(repo);
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into()?));
    }
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_string());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match kind {
        LeafKind::Server => ExtendedKeyUsagePurpose::ServerAuth,
        LeafKind::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params.use_authority_key_identifier_extension = true;
    if let Some((from, until)) = validity {
        params.not_before = from;
        params.not_after = until;
    } else {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
    }
    let not_after = u64::try_from(params.not_after.unix_timestamp()).unwrap_or(0);
    let cert = params.signed_by(public_key, &issuer)?;
    Ok((cert.pem(), fingerprint(cert.der()), not_after))
}

/// sha256 of a certificate's DER encoding.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Sha256Digest {
    Sha256Digest::of(cert.as_ref())
}

/// The certificates of a PEM text.
pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(PkiError::Missing("certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM text.
pub fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    Ok(PrivateKeyDer::from_pem_slice(pem.as_bytes())?)
}

/// The QUIC server configuration: TLS 1.3 only, ALPN `reprise/1`, a client
/// certificate chained to `client_ca_pem` checked when presented (a
/// connection without one may only log in). 0-RTT is not enabled
/// (rustls's `max_early_data_size` stays 0), so no message is ever taken
/// from early data. `transport` bounds what a connection may hold.
pub fn server_config(
    client_ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(client_ca_pem)? {
        roots.add(ca)?;
    }
    // A client without a certificate is let in to ask for one (a CI job's
    // login, crate::login) and for nothing else.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    // The chain ends with the CA, so that a client that pinned the CA's
    // fingerprint (`reprise login --ca-fingerprint`) can check it.
    let mut chain = certs(cert_pem)?;
    for ca in certs(client_ca_pem)? {
        if !chain.contains(&ca) {
            chain.push(ca);
        }
    }
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key(key_pem)?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    debug_assert_eq!(tls.max_early_data_size, 0, "no 0-RTT");
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_key_never_reaches_a_debug_print() {
        let ca = new_ca().unwrap();
        assert!(ca.key.contains("PRIVATE KEY"));
        let printed = format!("{ca:?}");
        assert!(
            printed.contains("BEGIN CERTIFICATE") && !printed.contains("PRIVATE KEY"),
            "{printed}"
        );
    }

    #[test]
    fn issued_certificates_chain_to_the_ca_and_reload() {
        let ca = new_ca().unwrap();
        let leaf = issue_client(&ca, "alice", &["example.com/a/b".into()], None).unwrap();
        assert_eq!(fingerprint(&certs(&leaf.cert).unwrap()[0]), leaf.sha256);
        assert_eq!(
            reprise_protocol::grants::namespaces(&certs(&leaf.cert).unwrap()[0]).unwrap(),
            ["example.com/a/b"],
            "the grant is in the certificate"
        );
        // A second issue from the same stored CA key still chains: the
        // verifier accepts both.
        let again = issue(&ca, LeafKind::Client, "bob", &[], None).unwrap();
        assert_ne!(again.sha256, leaf.sha256);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certs(&ca.cert).unwrap().remove(0)).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let v =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for pem in [&leaf.cert, &again.cert] {
            v.verify_client_cert(&certs(pem).unwrap()[0], &[], now)
                .unwrap();
        }
        let other = new_ca().unwrap();
        let stranger = issue(&other, LeafKind::Client, "eve", &[], None).unwrap();
        assert!(
            v.verify_client_cert(&certs(&stranger.cert).unwrap()[0], &[], now)
                .is_err()
        );
    }
}
