//! Links discover a path MTU above quinn's default bound where the path
//! carries it: loopback does.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    reprise_frames::discover_mtu(&mut t);
    Arc::new(t)
}

#[tokio::test]
async fn a_loopback_link_grows_its_packets_past_the_default_bound() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = quinn::ServerConfig::with_single_cert(vec![der.clone()], key).unwrap();
    server.transport_config(transport());
    let listener = reprise_frames::server_endpoint(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = tokio::spawn(async move {
        let conn = listener.accept().await.unwrap().await.unwrap();
        // Echoes each stream until the client closes.
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let got = recv.read_to_end(8 << 20).await.unwrap();
            send.write_all(&got).await.unwrap();
            send.finish().unwrap();
        }
    });

    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
    client.transport_config(transport());
    let mut endpoint = reprise_frames::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client);
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    // Enough traffic, and time, for discovery's binary search to finish.
    let payload = vec![7u8; 4 << 20];
    // Then more, at the grown size: segmented sends of large packets must
    // go through, not stall the link.
    let mut mtu = 0;
    let mut at_grown_size = 0;
    for _ in 0..50 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&payload).await.unwrap();
        send.finish().unwrap();
        let back = recv.read_to_end(8 << 20).await.unwrap();
        assert_eq!(back.len(), payload.len());
        mtu = conn.stats().path.current_mtu;
        if mtu > 1472 {
            at_grown_size += 1;
            if at_grown_size > 3 {
                break;
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if serve.is_finished() {
            break;
        }
    }
    // Above what quinn's default endpoint advertises (1,472).
    assert!(
        mtu > 1472,
        "path MTU stayed at {mtu}: discovery did not probe past quinn's default"
    );
    assert!(mtu <= reprise_frames::MTU_UPPER_BOUND);
    assert!(
        at_grown_size > 3,
        "{at_grown_size} transfers at the grown size"
    );
    conn.close(0u32.into(), b"done");
}
