//! Mutual TLS over real quinn connections on loopback: every way a peer can fail to prove who
//! it is, checked on both sides with the exact error kind.

use std::time::{Duration, SystemTime};

use crate::common::*;
use quicseal::pki::{Issued, KeyType, Revoked, Usage};
use quicseal::rustls::{AlertDescription, CertificateError, Error as RustlsError};
use quicseal::{DeniedKey, Error, NodeConfig, Policy, Side, TlsError, TrustStore};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Greeting {
    from: String,
    n: u32,
    tags: Vec<String>,
}

/// Both ends of a connection attempt that must fail.
async fn refused(client: NodeConfig, server: NodeConfig, name: &str) -> (Error, Error) {
    let server = bind(server);
    let client = bind(client);
    let (c, s) = connect(&client, &server, name).await;
    (c.expect_err("dialler must fail"), s.expect_err("acceptor must fail"))
}

fn local(e: &Error) -> &RustlsError {
    match e {
        Error::Tls(TlsError::Local { error, .. }) => error,
        other => panic!("expected a local TLS refusal, got {other:?}"),
    }
}

fn remote(e: &Error) -> AlertDescription {
    match e {
        Error::Tls(TlsError::Remote { alert }) => *alert,
        other => panic!("expected a remote TLS alert, got {other:?}"),
    }
}

#[tokio::test]
async fn valid_pair_exchanges_typed_messages_both_ways() {
    let pki = Pki::new("ca");
    let a_cert = pki.issue(&pki.cert("alice").uri("spiffe://example.org/node/alice"));
    let a_id = to_identity(&a_cert);
    let a = bind(NodeConfig::new(a_id.clone(), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("bob"), pki.trust()));
    let (ab, ba) = connect(&a, &b, "bob").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());

    // Typed peer identity on both sides.
    assert_eq!(ab.peer().dns_names, ["bob"]);
    assert_eq!(ab.peer().ip_addresses, [LOCALHOST]);
    assert_eq!(ba.peer().spiffe_id(), Some("spiffe://example.org/node/alice"));
    assert_eq!(ba.peer().spiffe_trust_domain(), Some("example.org"));
    assert_eq!(ba.peer().common_name.as_deref(), Some("alice"));
    assert_eq!(ba.peer().fingerprint, a_id.fingerprint());
    assert!(ba.peer().not_after > SystemTime::now() + Duration::from_secs(80 * 24 * 3600));

    for n in 0..10u32 {
        let g = Greeting { from: "alice".into(), n, tags: vec!["x".into(); n as usize] };
        assert_eq!(ab.send(3, &g).await.unwrap(), u64::from(n) + 1);
    }
    for n in 0..10u32 {
        let m = ba.recv().await.unwrap();
        assert_eq!(m.channel(), 3);
        assert_eq!(m.seq(), u64::from(n) + 1);
        assert_eq!(m.peer().common_name.as_deref(), Some("alice"));
        assert_eq!(m.decode::<Greeting>().unwrap().n, n);
    }
    ab.delivered(3).await.unwrap();

    ba.send_bytes(0, &b"raw reply"[..]).await.unwrap();
    let m = ab.recv().await.unwrap();
    assert_eq!(&m.payload()[..], b"raw reply");
    assert_eq!(m.peer().dns_names, ["bob"]);
    // A typed decode of the wrong type is a typed error, not a panic.
    assert!(matches!(m.decode::<Greeting>(), Err(Error::Encoding(_))));
    ba.delivered(0).await.unwrap();
}

#[tokio::test]
async fn delivered_waits_for_the_peer_application() {
    let pki = Pki::new("ca");
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()));
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    ab.send_bytes(1, &b"one"[..]).await.unwrap();
    // Nobody called recv on b: the receipt must not come.
    assert!(tokio::time::timeout(Duration::from_millis(300), ab.delivered(1)).await.is_err());
    ba.recv().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), ab.delivered(1)).await.unwrap().unwrap();
}

#[tokio::test]
async fn ed25519_nodes_connect() {
    let pki = Pki::new("ca");
    let id = |n: &str| to_identity(&pki.issue(&pki.cert(n).key_type(KeyType::Ed25519)));
    let a = bind(NodeConfig::new(id("a"), pki.trust()));
    let b = bind(NodeConfig::new(id("b"), pki.trust()));
    let (ab, ba) = connect(&a, &b, "b").await;
    let ab = ab.unwrap();
    ab.send(0, "hi").await.unwrap();
    let ba = ba.unwrap();
    assert_eq!(ba.recv().await.unwrap().decode::<String>().unwrap(), "hi");
    ab.delivered(0).await.unwrap();
}

#[tokio::test]
async fn dialling_by_ip_address_san() {
    let pki = Pki::new("ca");
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let b = bind(NodeConfig::new(pki.identity("b"), pki.trust()));
    let (ab, ba) = connect(&a, &b, "127.0.0.1").await;
    ab.unwrap();
    ba.unwrap();
}

#[tokio::test]
async fn dialler_without_certificate_is_refused() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let endpoint = raw_endpoint();
    let cfg = raw_client_config(&pki, None, quicseal::ALPN);
    let (client, accepted) = tokio::join!(
        async {
            // In TLS 1.3 the dialler may finish its handshake before being refused.
            match raw_connect(&endpoint, cfg, server.local_addr().unwrap(), "server").await {
                Ok(conn) => conn.closed().await,
                Err(e) => e,
            }
        },
        server.accept()
    );
    assert_eq!(alert_of(&client), Some(u8::from(AlertDescription::CertificateRequired)), "{client:?}");
    let e = accepted.unwrap_err();
    assert!(matches!(local(&e), RustlsError::NoCertificatesPresented), "{e:?}");
}

#[tokio::test]
async fn certificate_from_unknown_ca_is_refused_both_ways() {
    let pki = Pki::new("ca");
    let other = Pki::new("other ca");
    // Dialler from another CA.
    let (c, s) = refused(
        NodeConfig::new(other.identity("mallory"), pki.trust()),
        NodeConfig::new(pki.identity("server"), pki.trust()),
        "server",
    )
    .await;
    assert!(matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)), "{s:?}");
    assert_eq!(remote(&c), AlertDescription::UnknownCA);
    assert!(c.is_refusal_by_peer());
    // Dialled node from another CA.
    let (c, s) = refused(
        NodeConfig::new(pki.identity("client"), pki.trust()),
        NodeConfig::new(other.identity("server"), other.trust()),
        "server",
    )
    .await;
    assert!(matches!(local(&c), RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)), "{c:?}");
    assert_eq!(remote(&s), AlertDescription::UnknownCA);
}

#[tokio::test]
async fn self_signed_certificate_is_refused() {
    let pki = Pki::new("ca");
    let selfie = to_identity(&pki.cert("selfie").self_signed().unwrap());
    let (c, s) =
        refused(NodeConfig::new(selfie, pki.trust()), NodeConfig::new(pki.identity("server"), pki.trust()), "server")
            .await;
    assert!(matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)), "{s:?}");
    assert_eq!(remote(&c), AlertDescription::UnknownCA);
}

#[tokio::test]
async fn leaf_expired_one_second_ago_is_refused() {
    let pki = Pki::new("ca");
    let now = SystemTime::now();
    let expired = pki.cert("old").validity(now - Duration::from_secs(3600), now - Duration::from_secs(1));
    let (c, s) = refused(
        NodeConfig::new(to_identity(&pki.issue(&expired)), pki.trust()),
        NodeConfig::new(pki.identity("server"), pki.trust()),
        "server",
    )
    .await;
    assert!(matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::ExpiredContext { .. })), "{s:?}");
    assert_eq!(remote(&c), AlertDescription::CertificateExpired);
}

#[tokio::test]
async fn leaf_not_yet_valid_is_refused() {
    let pki = Pki::new("ca");
    let now = SystemTime::now();
    let future = pki.cert("early").validity(now + Duration::from_secs(3600), now + Duration::from_secs(7200));
    let (c, s) = refused(
        NodeConfig::new(pki.identity("client"), pki.trust()),
        NodeConfig::new(to_identity(&pki.issue(&future)), pki.trust()),
        "early",
    )
    .await;
    assert!(matches!(local(&c), RustlsError::InvalidCertificate(CertificateError::NotValidYetContext { .. })), "{c:?}");
    assert_eq!(remote(&s), AlertDescription::CertificateExpired);
}

#[tokio::test]
async fn dialled_name_must_match_a_san() {
    let pki = Pki::new("ca");
    let (c, s) = refused(
        NodeConfig::new(pki.identity("client"), pki.trust()),
        NodeConfig::new(pki.identity("server"), pki.trust()),
        "not-the-server",
    )
    .await;
    assert!(
        matches!(local(&c), RustlsError::InvalidCertificate(CertificateError::NotValidForNameContext { .. })),
        "{c:?}"
    );
    assert_eq!(remote(&s), AlertDescription::BadCertificate);
}

#[tokio::test]
async fn dialled_node_with_client_only_certificate_is_refused() {
    let pki = Pki::new("ca");
    let client_only = to_identity(&pki.issue(&pki.cert("server").usage(Usage::ClientOnly)));
    let (c, s) = refused(
        NodeConfig::new(pki.identity("client"), pki.trust()),
        NodeConfig::new(client_only, pki.trust()),
        "server",
    )
    .await;
    assert!(
        matches!(
            local(&c),
            RustlsError::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{c:?}"
    );
    assert!(matches!(remote(&s), AlertDescription::BadCertificate | AlertDescription::UnsupportedCertificate));
}

#[tokio::test]
async fn dialler_with_server_only_certificate_is_refused() {
    let pki = Pki::new("ca");
    let server_only = to_identity(&pki.issue(&pki.cert("client").usage(Usage::ServerOnly)));
    let (_, s) = refused(
        NodeConfig::new(server_only, pki.trust()),
        NodeConfig::new(pki.identity("server"), pki.trust()),
        "server",
    )
    .await;
    assert!(
        matches!(
            local(&s),
            RustlsError::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        ),
        "{s:?}"
    );
}

/// A certificate "revoked" of `pki`, and a trust store whose CRL lists it.
fn revoked_and_trust(pki: &Pki) -> (Issued, TrustStore) {
    let revoked = pki.issue(&pki.cert("revoked"));
    let now = SystemTime::now();
    let crl = pki
        .ca
        .crl(
            &[Revoked { serial: revoked.serial.clone(), revoked_at: now, reason: None }],
            1,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .unwrap();
    let mut trust = pki.trust();
    trust.add_crl_pem(crl.as_bytes()).unwrap();
    (revoked, trust)
}

#[tokio::test]
async fn revoked_certificate_is_refused_and_others_still_connect() {
    let pki = Pki::new("ca");
    let (revoked, trust) = revoked_and_trust(&pki);
    let server = bind(NodeConfig::new(pki.identity("server"), trust.clone()));
    let bad = bind(NodeConfig::new(to_identity(&revoked), pki.trust()));
    let (c, s) = connect(&bad, &server, "server").await;
    let (c, s) = (c.unwrap_err(), s.unwrap_err());
    assert!(matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::Revoked)), "{s:?}");
    assert_eq!(remote(&c), AlertDescription::CertificateRevoked);
    let good = bind(NodeConfig::new(pki.identity("good"), pki.trust()));
    let (c, s) = connect(&good, &server, "server").await;
    c.unwrap();
    s.unwrap();
}

/// A node reuses the TLS configuration of a finished handshake for the next one: each refusal
/// still names its own reason, on either side, and a good peer connects in between.
#[tokio::test]
async fn one_node_refuses_peers_in_turn_each_with_its_own_reason() {
    let pki = Pki::new("ca");
    let other = Pki::new("other ca");
    let (revoked, trust) = revoked_and_trust(&pki);
    // The acceptor's side: a revoked dialler, a good one, one from another CA, a good one.
    let server = bind(NodeConfig::new(pki.identity("server"), trust.clone()));
    let bad = bind(NodeConfig::new(to_identity(&revoked), pki.trust()));
    let stranger = bind(NodeConfig::new(other.identity("stranger"), pki.trust()));
    let good = bind(NodeConfig::new(pki.identity("good"), pki.trust()));
    for _ in 0..2 {
        let s = connect(&bad, &server, "server").await.1.unwrap_err();
        assert!(matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::Revoked)), "{s:?}");
        let (c, s) = connect(&good, &server, "server").await;
        c.unwrap();
        s.unwrap();
        let s = connect(&stranger, &server, "server").await.1.unwrap_err();
        assert!(matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)), "{s:?}");
    }
    // The dialler's side: a node from another CA, a good one, a name that is not the node's.
    let client = bind(NodeConfig::new(pki.identity("client"), trust));
    let foreign = bind(NodeConfig::new(other.identity("server"), other.trust()));
    let trusted = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    for _ in 0..2 {
        let c = connect(&client, &foreign, "server").await.0.unwrap_err();
        assert!(matches!(local(&c), RustlsError::InvalidCertificate(CertificateError::UnknownIssuer)), "{c:?}");
        let (c, s) = connect(&client, &trusted, "server").await;
        c.unwrap();
        s.unwrap();
        let c = connect(&client, &trusted, "elsewhere").await.0.unwrap_err();
        assert!(
            matches!(local(&c), RustlsError::InvalidCertificate(CertificateError::NotValidForNameContext { .. })),
            "{c:?}"
        );
    }
}

#[tokio::test]
async fn expired_crl_refuses_every_certificate_of_its_ca() {
    let pki = Pki::new("ca");
    let now = SystemTime::now();
    let crl = pki.ca.crl(&[], 1, now - Duration::from_secs(7200), now - Duration::from_secs(3600)).unwrap();
    let mut trust = pki.trust();
    trust.add_crl_pem(crl.as_bytes()).unwrap();
    let (c, s) = refused(
        NodeConfig::new(pki.identity("client"), pki.trust()),
        NodeConfig::new(pki.identity("server"), trust),
        "server",
    )
    .await;
    assert!(
        matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::ExpiredRevocationListContext { .. })),
        "{s:?}"
    );
    remote(&c);
}

#[tokio::test]
async fn ca_certificate_used_as_leaf_is_refused() {
    let pki = Pki::new("ca");
    let ca_as_leaf = quicseal::Identity::from_pem(pki.ca.cert_pem().as_bytes(), pki.ca.key_pem().as_bytes()).unwrap();
    let (c, s) = refused(
        NodeConfig::new(ca_as_leaf, pki.trust()),
        NodeConfig::new(pki.identity("server"), pki.trust()),
        "server",
    )
    .await;
    assert!(matches!(local(&s), RustlsError::InvalidCertificate(_)), "{s:?}");
    remote(&c);
}

#[tokio::test]
async fn flipped_bit_in_leaf_signature_is_refused() {
    let pki = Pki::new("ca");
    let issued = pki.issue(&pki.cert("client"));
    // The signature is the last field of the DER certificate: flip one bit of its last byte.
    let mut der = issued.cert_der.to_vec();
    *der.last_mut().unwrap() ^= 0x01;
    let leaf_pem = pem_of("CERTIFICATE", &der);
    let chain = format!("{leaf_pem}{}", pki.ca.cert_pem());
    let tampered = quicseal::Identity::from_pem(chain.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let (c, s) =
        refused(NodeConfig::new(tampered, pki.trust()), NodeConfig::new(pki.identity("server"), pki.trust()), "server")
            .await;
    assert!(matches!(local(&s), RustlsError::InvalidCertificate(CertificateError::BadSignature)), "{s:?}");
    assert_eq!(remote(&c), AlertDescription::DecryptError);
}

fn pem_of(label: &str, der: &[u8]) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in der.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    let lines: Vec<&str> = out.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[tokio::test]
async fn authorization_policy_refuses_a_valid_certificate_on_either_side() {
    let pki = Pki::new("ca");
    // The acceptor refuses the dialler.
    let (c, s) = refused(
        NodeConfig::new(pki.identity("client"), pki.trust()),
        NodeConfig::new(pki.identity("server"), pki.trust()).policy(Policy::allow_list().allow_name("someone-else")),
        "server",
    )
    .await;
    match &s {
        Error::Unauthorized { side: Side::Local, reason } => assert!(reason.contains("client"), "{reason}"),
        other => panic!("{other:?}"),
    }
    match &c {
        // The peer learns nothing but "unauthorized".
        Error::Unauthorized { side: Side::Remote, reason } => assert_eq!(reason, "unauthorized"),
        other => panic!("{other:?}"),
    }
    // The dialler refuses the acceptor.
    let (c, s) = refused(
        NodeConfig::new(pki.identity("client"), pki.trust())
            .policy(Policy::allow_list().allow_spiffe_trust_domain("example.org")),
        NodeConfig::new(pki.identity("server"), pki.trust()),
        "server",
    )
    .await;
    assert!(matches!(c, Error::Unauthorized { side: Side::Local, .. }), "{c:?}");
    assert!(matches!(s, Error::Unauthorized { side: Side::Remote, .. }), "{s:?}");
    // And an allowing policy lets it through.
    let server = bind(
        NodeConfig::new(pki.identity("server"), pki.trust())
            .policy(Policy::allow_list().allow_fn(|p| p.common_name.as_deref() == Some("client"))),
    );
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let (c, s) = connect(&client, &server, "server").await;
    c.unwrap();
    s.unwrap();
}

#[tokio::test]
async fn key_on_the_deny_list_is_refused() {
    let pki = Pki::new("ca");
    let client = pki.identity("client");
    let mut trust = pki.trust();
    trust.deny(client.fingerprint());
    let (c, s) =
        refused(NodeConfig::new(client.clone(), pki.trust()), NodeConfig::new(pki.identity("server"), trust), "server")
            .await;
    match local(&s) {
        RustlsError::InvalidCertificate(CertificateError::Other(o)) => {
            assert_eq!(o.0.downcast_ref::<DeniedKey>(), Some(&DeniedKey(client.fingerprint())));
        }
        other => panic!("{other:?}"),
    }
    remote(&c);
}

#[tokio::test]
async fn zero_rtt_is_never_accepted() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let issued = pki.issue(&pki.cert("client"));
    let mut cfg = raw_client_config(&pki, Some(&issued), quicseal::ALPN);
    cfg.enable_early_data = true; // a client that tries 0-RTT, with resumption on (the default)
    let quic = std::sync::Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap());
    let endpoint = raw_endpoint();
    let addr = server.local_addr().unwrap();
    for attempt in 0..2u64 {
        let connecting = endpoint.connect_with(quinn::ClientConfig::new(quic.clone()), addr, "server").unwrap();
        // The server issues no session tickets, so there is never anything to send 0-RTT with.
        let conn = match connecting.into_0rtt() {
            Ok(_) => panic!("attempt {attempt}: 0-RTT was offered"),
            Err(connecting) => connecting.await.unwrap(),
        };
        // A new logical session each time, so a new epoch.
        let _control = raw_hello_epoch(&conn, attempt + 1).await;
        let session = server.accept().await.unwrap();
        assert_eq!(session.peer().common_name.as_deref(), Some("client"));
        tokio::time::sleep(Duration::from_millis(50)).await; // let any ticket arrive
        conn.close(0u32.into(), b"");
    }
}

#[tokio::test]
async fn alpn_mismatch_is_a_clear_error_on_both_sides() {
    let pki = Pki::new("ca");
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let issued = pki.issue(&pki.cert("client"));
    let endpoint = raw_endpoint();
    let (client, accepted) = tokio::join!(
        raw_connect(&endpoint, raw_client_config(&pki, Some(&issued), b"h3"), server.local_addr().unwrap(), "server"),
        server.accept()
    );
    let client = client.unwrap_err();
    assert_eq!(alert_of(&client), Some(u8::from(AlertDescription::NoApplicationProtocol)), "{client:?}");
    assert!(matches!(accepted, Err(Error::AlpnMismatch { .. })), "{accepted:?}");

    // Our node dialling a QUIC server that speaks another protocol.
    let other = {
        use quicseal::rustls::pki_types::PrivateKeyDer;
        use quicseal::rustls::pki_types::pem::PemObject;
        let server_cert = pki.issue(&pki.cert("other"));
        let provider = std::sync::Arc::new(quicseal::rustls::crypto::ring::default_provider());
        let mut cfg = quicseal::rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&quicseal::rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![server_cert.cert_der.clone()],
                PrivateKeyDer::from_pem_slice(server_cert.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h3".to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).unwrap();
        quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(std::sync::Arc::new(quic)),
            std::net::SocketAddr::new(LOCALHOST, 0),
        )
        .unwrap()
    };
    let accept = tokio::spawn({
        let other = other.clone();
        async move {
            if let Some(incoming) = other.accept().await {
                let _ = incoming.await;
            }
        }
    });
    let client = bind(NodeConfig::new(pki.identity("client"), pki.trust()));
    let e = client.connect(other.local_addr().unwrap(), "other").await.unwrap_err();
    assert!(matches!(e, Error::AlpnMismatch { .. }), "{e:?}");
    accept.await.unwrap();
}

#[tokio::test]
async fn empty_trust_store_is_a_configuration_error() {
    let pki = Pki::new("ca");
    let e = quicseal::Node::bind("127.0.0.1:0".parse().unwrap(), NodeConfig::new(pki.identity("a"), TrustStore::new()))
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
}

#[tokio::test]
async fn ipv6_loopback() {
    let pki = Pki::new("ca");
    let v6: std::net::SocketAddr = "[::1]:0".parse().unwrap();
    let a = quicseal::Node::bind(v6, NodeConfig::new(pki.identity("a"), pki.trust())).unwrap();
    let b = quicseal::Node::bind(v6, NodeConfig::new(pki.identity("b"), pki.trust())).unwrap();
    let (ab, ba) = connect(&a, &b, "b").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    assert!(ab.remote_address().is_ipv6());
    ab.send(0, "over v6").await.unwrap();
    assert_eq!(ba.recv().await.unwrap().decode::<String>().unwrap(), "over v6");
}

/// One rule for the deny-list: no reload lifts a denial (neither `reload_trust` with a store
/// that does not deny the key, nor the watcher); only `Node::undeny` does.
#[tokio::test]
async fn a_reload_never_lifts_a_denial_only_undeny_does() {
    let pki = Pki::new("ca");
    let client = pki.identity("client");
    let mut trust = pki.trust();
    trust.deny(client.fingerprint());
    let server = bind(NodeConfig::new(pki.identity("server"), trust));
    server.reload_trust(pki.trust()).unwrap();
    assert_eq!(server.trust().denied_keys(), [client.fingerprint()]);
    let dialler = bind(NodeConfig::new(client.clone(), pki.trust()));
    let (c, s) = connect(&dialler, &server, "server").await;
    assert!(c.is_err() && s.is_err(), "still denied after the reload");
    assert!(server.undeny(client.fingerprint()).unwrap());
    assert!(!server.undeny(client.fingerprint()).unwrap(), "nothing left to lift");
    let (c, s) = connect(&dialler, &server, "server").await;
    c.unwrap();
    s.unwrap();
}

/// A node that presents its CA's own certificate is refused for what it is, and every refusal
/// reads as a sentence, not rustls' `Debug` dump.
#[tokio::test]
async fn a_ca_certificate_presented_as_a_node_certificate_is_named_as_such() {
    let pki = Pki::new("ca");
    let ca_as_node = quicseal::Identity::from_pem(pki.ca.cert_pem().as_bytes(), pki.ca.key_pem().as_bytes()).unwrap();
    let (c, s) = refused(
        NodeConfig::new(ca_as_node, pki.trust()),
        NodeConfig::new(pki.identity("server"), pki.trust()),
        "server",
    )
    .await;
    match local(&s) {
        RustlsError::InvalidCertificate(CertificateError::Other(other)) => {
            assert!(matches!(other.0.downcast_ref::<webpki::Error>(), Some(webpki::Error::CaUsedAsEndEntity)))
        }
        other => panic!("expected CaUsedAsEndEntity, got {other:?}"),
    }
    let said = s.to_string();
    assert!(said.contains("a CA certificate was presented as a node certificate"), "{said}");
    assert!(!said.contains("Other(") && !said.contains("OtherError"), "{said}");
    assert!(c.to_string().starts_with("TLS handshake failed: the peer refused the handshake with alert"), "{c}");
}
