//! The repository namespaces a client certificate grants, written into the
//! certificate itself as subject alternative names
//! `reprise-repo:<namespace>` (percent-encoded outside `A-Za-z0-9-._~/:@`).
//! An executor serves and announces only namespaces its own certificate
//! names, whatever an orchestrator's `Welcome` says: the orchestrator's
//! word alone (anyone holding its server key) cannot widen what is served.

use rustls_pki_types::CertificateDer;

use crate::seal::SealError;

/// The URI scheme of a granted namespace.
pub const SCHEME: &str = "reprise-repo:";

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~/:@".contains(&b)
}

/// The subject alternative name (URI) that grants `namespace`.
pub fn namespace_uri(namespace: &str) -> String {
    let mut out = String::from(SCHEME);
    for &b in namespace.as_bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The namespace a granting URI names (`None`: not one of ours, or badly
/// encoded).
pub fn namespace_of_uri(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix(SCHEME)?;
    let bytes = rest.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Every namespace `cert` grants (none for a certificate made before
/// grants were written into certificates).
pub fn namespaces(cert: &CertificateDer<'_>) -> Result<Vec<String>, SealError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| SealError::CertificateEncoding)?;
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => namespace_of_uri(uri),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_round_trip_through_their_uris() {
        for ns in [
            "example.com/team/app",
            "local/0123abcd",
            "gitlab.example:8443/group/sub group/ü",
            "100%/odd",
        ] {
            let uri = namespace_uri(ns);
            assert!(uri.is_ascii() && !uri.contains(' '), "{uri}");
            assert_eq!(namespace_of_uri(&uri).as_deref(), Some(ns), "{uri}");
        }
        assert_eq!(namespace_of_uri("https://example.com"), None);
        assert_eq!(namespace_of_uri("reprise-repo:a%2"), None);
        assert_eq!(namespace_of_uri("reprise-repo:a b"), None);
    }

    #[test]
    fn a_certificate_names_what_it_grants() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            rcgen::SanType::URI(namespace_uri("example.com/a b").try_into().unwrap()),
            rcgen::SanType::URI("https://not-ours.example".try_into().unwrap()),
            rcgen::SanType::DnsName("host.example".try_into().unwrap()),
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(namespaces(cert.der()).unwrap(), ["example.com/a b"]);
        let bare = rcgen::generate_simple_self_signed(vec!["h.example".into()]).unwrap();
        assert!(namespaces(bare.cert.der()).unwrap().is_empty());
    }
}
