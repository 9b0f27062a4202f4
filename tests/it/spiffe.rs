//! Dialling by SPIFFE ID: X.509-SVIDs made by openssl in the exact shape SPIRE issues them
//! (P-256 key, one URI SAN and no DNS SAN, subject `O=SPIRE`, EKU serverAuth and clientAuth),
//! and by our own `pki` module; what a dialler refuses and why.

use std::path::Path;

use crate::common::*;
use quicseal::pki::{NodeCert, Revoked};
use quicseal::{Error, Identity, NodeConfig, PeerName, TlsError, TrustStore};

const B: &str = "spiffe://example.org/ns/default/sa/node-b";

/// SPIRE's key usage for an X.509-SVID.
const SPIRE_KEY_USAGE: &str = "digitalSignature,keyEncipherment,keyAgreement";

/// An openssl CA in `dir` and an SVID of SPIRE's shape for each `(file name, SPIFFE ID, key
/// usage)`.
fn openssl_svids(dir: &Path, svids: &[(&str, &str, &str)]) {
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"], dir);
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/C=US/O=SPIFFE",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-addext",
            "subjectAltName=URI:spiffe://example.org",
            "-out",
            "ca.crt",
        ],
        dir,
    );
    for (name, id, key_usage) in svids {
        // SPIRE's X.509-SVID extensions.
        let ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,{key_usage}\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:{id}\n"
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &format!("{name}.key")], dir);
        openssl(
            &["req", "-new", "-key", &format!("{name}.key"), "-subj", "/C=US/O=SPIRE", "-out", &format!("{name}.csr")],
            dir,
        );
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.crt"),
            ],
            dir,
        );
    }
}

fn openssl_identity(dir: &Path, name: &str) -> Identity {
    Identity::from_pem_files(dir.join(format!("{name}.crt")), dir.join(format!("{name}.key"))).unwrap()
}

/// The dialler's own refusal of the acceptor's certificate, as text.
fn refusal(e: Error) -> String {
    match &e {
        Error::Tls(TlsError::Local { .. }) => e.to_string(),
        other => panic!("expected our own TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn spire_shaped_svids_made_by_openssl_are_dialled_by_spiffe_id_and_only_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl_svids(
        d,
        &[
            ("a", "spiffe://example.org/ns/default/sa/node-a", SPIRE_KEY_USAGE),
            ("b", B, SPIRE_KEY_USAGE),
            ("signs", B, "digitalSignature,keyCertSign"),
            ("no-signature", B, "keyEncipherment,keyAgreement"),
        ],
    );
    let trust = TrustStore::from_ca_file(d.join("ca.crt")).unwrap();
    let a = bind(NodeConfig::new(openssl_identity(d, "a"), trust.clone()));
    let b = bind(NodeConfig::new(openssl_identity(d, "b"), trust.clone()));

    let (ab, ba) = connect(&a, &b, B).await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    assert_eq!(ab.peer().spiffe_id(), Some(B));
    assert_eq!(ba.peer().spiffe_id(), Some("spiffe://example.org/ns/default/sa/node-a"));
    ab.send(0, "to node-b").await.unwrap();
    assert_eq!(ba.recv().await.unwrap().decode::<String>().unwrap(), "to node-b");

    // Another ID of the same trust domain, and the bare trust domain, are not node-b.
    for other in ["spiffe://example.org/ns/default/sa/node-c", "spiffe://example.org"] {
        let (ab, _) = connect(&a, &b, other).await;
        let text = refusal(ab.unwrap_err());
        assert!(text.contains(&format!("not an X.509-SVID for {other}")), "{text}");
        assert!(text.contains(B), "the error names what the certificate carries: {text}");
    }
    // Nor is a DNS name: an SVID has none.
    let (ab, _) = connect(&a, &b, "node-b").await;
    assert!(refusal(ab.unwrap_err()).contains("not valid for"));
    // The right ID with a key usage a leaf SVID must not have, or without the one it must.
    for (name, why) in [("signs", "allows signing certificates"), ("no-signature", "lacks digitalSignature")] {
        let b = bind(NodeConfig::new(openssl_identity(d, name), trust.clone()));
        let text = refusal(connect(&a, &b, B).await.0.unwrap_err());
        assert!(text.contains(why), "{name}: {text}");
    }
}

#[tokio::test]
async fn a_dialler_refuses_certificates_that_are_not_the_svid_it_dialled() {
    let pki = Pki::new("spiffe");
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    let dial = |cert: NodeCert, pki: &Pki, trust: TrustStore| {
        let b = bind(NodeConfig::new(to_identity(&pki.issue(&cert)), trust));
        let a = a.clone();
        async move { connect(&a, &b, B).await.0 }
    };
    // An SVID of our own pki: dialled.
    let svid = NodeCert::new("node-b").uri(B);
    assert_eq!(dial(svid.clone(), &pki, pki.trust()).await.unwrap().peer().spiffe_id(), Some(B));
    // Two URI SANs: an SVID has exactly one.
    let two = NodeCert::new("node-b").uri(B).uri("spiffe://example.org/also");
    let text = refusal(dial(two, &pki, pki.trust()).await.unwrap_err());
    assert!(text.contains("its URI SANs are"), "{text}");
    // The right ID from a CA the dialler does not trust: the chain is checked first.
    let stranger = Pki::new("stranger");
    let text = refusal(dial(svid.clone(), &stranger, stranger.trust()).await.unwrap_err());
    assert!(text.contains("unknown issuer"), "{text}");
    // A revoked SVID: revocation is checked for SPIFFE IDs too.
    let issued = pki.issue(&svid);
    let now = std::time::SystemTime::now();
    let crl = pki
        .ca
        .crl(
            &[Revoked { serial: issued.serial.clone(), revoked_at: now, reason: None }],
            1,
            now,
            now + std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let mut a_trust = pki.trust();
    a_trust.add_crl_pem(crl.as_bytes()).unwrap();
    let a2 = bind(NodeConfig::new(pki.identity("a"), a_trust));
    let b = bind(NodeConfig::new(to_identity(&issued), pki.trust()));
    let text = refusal(connect(&a2, &b, B).await.0.unwrap_err());
    assert!(text.contains("revoked"), "{text}");
}

#[tokio::test]
async fn a_name_that_is_no_peer_name_is_refused_before_any_packet() {
    let pki = Pki::new("spiffe");
    let a = bind(NodeConfig::new(pki.identity("a"), pki.trust()));
    for bad in ["spiffe://Example.org/b", "spiffe://example.org/b/", "https://example.org/b", "not a name"] {
        let e = a.connect("127.0.0.1:9".parse().unwrap(), bad).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{bad}: {e:?}");
        assert!(PeerName::parse(bad).is_err());
    }
}
