//! An executor's credentials: its client certificate and key, and the
//! team CA, from the one PEM file `reprise-orchestrator issue` writes. The
//! key seals the results of runs made here.

use std::path::Path;
use std::sync::Arc;

use reprise_protocol::digest::Sha256Digest;
use reprise_protocol::manifest::ResultManifest;
use reprise_protocol::seal::{SEAL_VERSION, Seal, SealError, SignedBy};
use reprise_protocol::wire;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::LinkError;
use crate::store::Sealer;

/// An executor's credentials: its client certificate and key, and the team
/// CA, from the one PEM file `reprise-orchestrator issue` writes.
#[derive(Debug)]
pub struct Credentials {
    cert_pem: String,
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    ca: CertificateDer<'static>,
    /// The namespaces the certificate itself grants.
    namespaces: Vec<String>,
}

impl Credentials {
    /// Reads a credentials file.
    pub fn load(path: &Path) -> Result<Credentials, LinkError> {
        let text = std::fs::read_to_string(path).map_err(|source| LinkError::CredentialsIo {
            path: path.to_path_buf(),
            source,
        })?;
        Credentials::from_pem(&text)
    }

    /// Parses credentials: the client certificate first, its PKCS#8 key, and
    /// the CA certificate last.
    pub fn from_pem(text: &str) -> Result<Credentials, LinkError> {
        let bad = |what: &str| LinkError::Credentials(what.to_string());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&format!("bad certificate PEM: {e}")))?;
        let [cert, .., ca] = certs.as_slice() else {
            return Err(bad("expected a client certificate and the CA certificate"));
        };
        let key = PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| bad(&format!("no private key: {e}")))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(bad("the private key must be PKCS#8"));
        };
        let key_pkcs8 = pkcs8.secret_pkcs8_der().to_vec();
        EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &key_pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| bad(&format!("the key is not an ECDSA P-256 key: {e}")))?;
        let cert_pem = pem_of(cert);
        let namespaces = reprise_protocol::grants::namespaces(cert)
            .map_err(|e| bad(&format!("the certificate does not parse: {e}")))?;
        Ok(Credentials {
            cert_pem,
            cert: cert.clone(),
            key_pkcs8,
            ca: ca.clone(),
            namespaces,
        })
    }

    /// When the certificate starts and ends (seconds since the epoch).
    pub fn validity(&self) -> Result<(u64, u64), LinkError> {
        reprise_protocol::seal::validity(&self.cert)
            .map_err(|e| LinkError::Credentials(e.to_string()))
    }

    /// Whether these are a person's credentials (from `reprise login`
    /// through a forge), which the orchestrator renews.
    pub fn is_person(&self) -> bool {
        self.identity()
            .is_ok_and(|me| reprise_protocol::policy::person_username(&me.name).is_some())
    }

    /// These credentials, if their certificate has not expired.
    pub fn unexpired(self) -> Result<Credentials, LinkError> {
        let not_after = self
            .identity()
            .map_err(|e| LinkError::Credentials(e.to_string()))?
            .not_after;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if not_after <= now {
            return Err(LinkError::Expired(not_after));
        }
        Ok(self)
    }

    /// The repository namespaces the certificate grants: all this
    /// executor ever serves or announces, whatever the orchestrator says.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The client certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The team CA that seals and the orchestrator are checked against.
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// Who this certificate names (its common name, fingerprint, expiry).
    pub fn identity(&self) -> Result<SignedBy, SealError> {
        reprise_protocol::seal::describe(&self.cert)
    }

    /// The QUIC client configuration: TLS 1.3, ALPN `reprise/1`, this
    /// certificate presented, the orchestrator checked against the team CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, LinkError> {
        let bad = |e: &dyn std::fmt::Display| LinkError::Credentials(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::Pkcs8(self.key_pkcs8.clone().into());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.cert.clone()], key)
            .map_err(|e| bad(&e))?;
        quic_client(tls)
    }

    /// The QUIC client configuration of a direct connection to a peer
    /// ([`Credentials::direct_client_tls`]).
    pub fn direct_client_config(
        &self,
        holder: Sha256Digest,
    ) -> Result<quinn::ClientConfig, LinkError> {
        quic_transport(self.direct_client_tls(holder)?)
    }

    /// The TLS client configuration of a direct connection to a peer, over
    /// QUIC or TCP: TLS 1.3, ALPN [`wire::DIRECT_ALPN`], this certificate
    /// presented, and the peer taken only if it presents the very
    /// certificate whose sha256 is `holder` (the orchestrator's
    /// introduction names it) and proves it holds that certificate's key.
    pub fn direct_client_tls(
        &self,
        holder: Sha256Digest,
    ) -> Result<rustls::ClientConfig, LinkError> {
        let bad = |e: &dyn std::fmt::Display| LinkError::Credentials(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pinned = Pinned {
            holder,
            algorithms: provider.signature_verification_algorithms,
        };
        let key = PrivateKeyDer::Pkcs8(self.key_pkcs8.clone().into());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(&e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(pinned))
            .with_client_auth_cert(vec![self.cert.clone()], key)
            .map_err(|e| bad(&e))?;
        tls.alpn_protocols = vec![wire::DIRECT_ALPN.to_vec()];
        Ok(tls)
    }

    /// The QUIC server configuration of this executor's direct listener
    /// ([`Credentials::direct_server_tls`]). No 0-RTT.
    pub fn direct_server_config(&self) -> Result<quinn::ServerConfig, LinkError> {
        let bad = |e: &dyn std::fmt::Display| LinkError::Credentials(e.to_string());
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(self.direct_server_tls()?)
            .map_err(|e| bad(&e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)).expect("in range"),
        ));
        // A fetch is one stream; an asker has no use for more at once.
        transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4));
        transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        reprise_frames::discover_mtu(&mut transport);
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// The TLS server configuration of this executor's direct listener,
    /// over QUIC or TCP: TLS 1.3, ALPN [`wire::DIRECT_ALPN`], this
    /// certificate presented, and a client certificate chained to the team
    /// CA required (each fetch's ticket is bound to one, [`super::direct`]).
    pub fn direct_server_tls(&self) -> Result<rustls::ServerConfig, LinkError> {
        let bad = |e: &dyn std::fmt::Display| LinkError::Credentials(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| bad(&e))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::Pkcs8(self.key_pkcs8.clone().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], key)
            .map_err(|e| bad(&e))?;
        tls.alpn_protocols = vec![wire::DIRECT_ALPN.to_vec()];
        Ok(tls)
    }

    /// The sha256 of the certificate (the orchestrator's name for it).
    pub fn fingerprint(&self) -> Sha256Digest {
        Sha256Digest::of(self.cert.as_ref())
    }
}

/// Takes a server only if it presents the one certificate pinned, and
/// checks its handshake signature with that certificate's key. Nothing
/// else of the certificate matters: the orchestrator, over the holder's
/// own authenticated connection, vouched that this is its listener's.
#[derive(Debug)]
struct Pinned {
    holder: Sha256Digest,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if Sha256Digest::of(end_entity.as_ref()) == self.holder {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl Sealer for Credentials {
    /// Signs the manifest's canonical encoding with this certificate's key.
    fn seal(&self, manifest: &ResultManifest) -> Seal {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.key_pkcs8, &rng)
            .expect("checked when loaded");
        let sig = key
            .sign(&rng, &reprise_protocol::sign::signing_bytes(manifest))
            .expect("ECDSA signing");
        Seal {
            version: SEAL_VERSION,
            signature: reprise_protocol::hex::encode(sig.as_ref()),
            producer_cert: self.cert_pem.clone(),
        }
    }
}

/// An executor's flow-control window for a stream it receives (a
/// transfer): eight chunks. quinn's default (1.25 MB, about one chunk)
/// held the relay back each time a chunk was hashed and written
/// ("peer claims to be blocked" at debug level).
const RECEIVE_WINDOW: u32 = 8 << 20;

/// A QUIC client configuration over `tls`: ALPN `reprise/1`, idle
/// timeout and keep-alive as every link to the orchestrator has them.
pub(crate) fn quic_client(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, LinkError> {
    tls.alpn_protocols = vec![wire::ALPN.to_vec()];
    quic_transport(tls)
}

/// A QUIC client configuration over `tls` (its ALPN set): idle timeout,
/// keep-alive and receive windows as every link has them.
fn quic_transport(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, LinkError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| LinkError::Credentials(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(std::time::Duration::from_secs(10)).expect("in range"),
    ));
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(3)));
    // Room for several chunks in flight towards this executor, so the
    // relay goes on sending while a chunk is hashed and written here.
    transport.stream_receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW));
    transport.receive_window(quinn::VarInt::from_u32(2 * RECEIVE_WINDOW));
    reprise_frames::discover_mtu(&mut transport);
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A certificate as PEM text.
pub(crate) fn pem_of(cert: &CertificateDer<'_>) -> String {
    use std::fmt::Write as _;
    let b64 = base64_encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).expect("ascii"));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
