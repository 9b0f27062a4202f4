//! Dialling by SPIFFE ID: X.509-SVIDs made by openssl in the exact shape SPIRE issues them
//! (P-256 key, one URI SAN and no DNS SAN, subject `O=SPIRE`, EKU serverAuth and clientAuth),
//! and by our own `pki` module; what a dialler refuses and why.

use std::path::Path;

use crate::common::*;
use quicseal::pki::{NodeCert, Revoked};
use quicseal::{Error, Identity, NodeConfig, PeerName, TrustStore};

const B: &str = "spiffe://example.org/ns/default/sa/node-b";

/// SPIRE's key usage for an X.509-SVID.
const SPIRE_KEY_USAGE: &str = "digitalSignature,keyEncipherment,keyAgreement";

/// An openssl CA in `dir` and an SVID of SPIRE's shape for each `(file name, SPIFFE ID, key
/// usage)`.
fn openssl_svids(dir: &Path, svids: &[(&str, &str, &str)]) {
    openssl_ca(dir, "/C=US/O=SPIFFE", &["subjectAltName=URI:spiffe://example.org"]);
    for (name, id, key_usage) in svids {
        // SPIRE's X.509-SVID extensions.
        let ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,{key_usage}\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:{id}\n"
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &format!("{name}.key")], dir);
        openssl_sign(dir, name, "/C=US/O=SPIRE", &format!("{name}.ext"));
    }
}

fn openssl_identity(dir: &Path, name: &str) -> Identity {
    Identity::from_pem_files(dir.join(format!("{name}.crt")), dir.join(format!("{name}.key"))).unwrap()
}

/// The dialler's own refusal of the acceptor's certificate, as text.
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

/// SPIFFE federation: a trust store with a bundle per trust domain. A certificate whose SPIFFE
/// ID is in a domain with a bundle must chain to that bundle; no other CA of the store vouches
/// for it, on either side of the handshake.
#[tokio::test]
async fn each_trust_domain_is_vouched_for_by_its_own_bundle_only() {
    let (a, b) = (Pki::new("a.test CA"), Pki::new("b.test CA"));
    let bundle = |t: &mut TrustStore, domain: &str, pki: &Pki| {
        t.add_bundle_pem(domain, pki.ca.cert_pem().as_bytes()).unwrap();
    };
    let mut federated = TrustStore::new();
    bundle(&mut federated, "a.test", &a);
    bundle(&mut federated, "b.test", &b);
    assert_eq!(federated.bundle_domains(), ["a.test", "b.test"]);
    let mut only_a = TrustStore::new();
    bundle(&mut only_a, "a.test", &a);
    let svid = |pki: &Pki, id: &str| to_identity(&pki.issue(&NodeCert::new("n").uri(id)));
    let b_id = "spiffe://b.test/node";
    let dialler = bind(NodeConfig::new(svid(&a, "spiffe://a.test/dialler"), federated.clone()));

    // B's SVID from B's CA: accepted, and the acceptor accepted the dialler's A SVID.
    let b_node = bind(NodeConfig::new(svid(&b, b_id), federated.clone()));
    let (ab, ba) = connect(&dialler, &b_node, b_id).await;
    assert_eq!(ab.unwrap().peer().spiffe_id(), Some(b_id));
    assert_eq!(ba.unwrap().peer().spiffe_id(), Some("spiffe://a.test/dialler"));
    // A B-domain SVID from A's CA: refused, though A's CA is trusted (for a.test only).
    let forged = bind(NodeConfig::new(svid(&a, b_id), federated.clone()));
    let text = refusal(connect(&dialler, &forged, b_id).await.0.unwrap_err());
    assert!(text.contains("unknown issuer"), "{text}");
    // Where only A's bundle is trusted, B's SVID from B's CA is refused.
    let narrow = bind(NodeConfig::new(svid(&a, "spiffe://a.test/dialler"), only_a));
    let text = refusal(connect(&narrow, &b_node, b_id).await.0.unwrap_err());
    assert!(text.contains("unknown issuer"), "{text}");
    // The acceptor applies the same rule to a dialler: an a.test SVID from B's CA.
    let intruder = bind(NodeConfig::new(svid(&b, "spiffe://a.test/intruder"), federated.clone()));
    let (_, at_b) = connect(&intruder, &b_node, b_id).await;
    let text = refusal(at_b.unwrap_err());
    assert!(text.contains("unknown issuer"), "{text}");
    // SPIFFE IDs of two trust domains in one certificate: no bundle vouches for it.
    let mixed = NodeCert::new("mixed").dns("mixed").uri(b_id).uri("spiffe://a.test/also");
    let mixed = bind(NodeConfig::new(to_identity(&b.issue(&mixed)), federated));
    let text = refusal(connect(&dialler, &mixed, "mixed").await.0.unwrap_err());
    assert!(text.contains("several trust domains"), "{text}");
}

/// A CRL signed by a bundle's CA is accepted by the store, and revokes that domain's SVIDs.
#[tokio::test]
async fn a_bundle_cas_crl_revokes_its_domains_svids() {
    let b = Pki::new("b.test CA");
    let id = "spiffe://b.test/node";
    let issued = b.issue(&NodeCert::new("n").uri(id));
    let now = std::time::SystemTime::now();
    let revoked = [Revoked { serial: issued.serial.clone(), revoked_at: now, reason: None }];
    let crl = b.ca.crl(&revoked, 1, now, now + std::time::Duration::from_secs(3600)).unwrap();
    let mut trust = TrustStore::new();
    trust.add_bundle_pem("b.test", b.ca.cert_pem().as_bytes()).unwrap();
    let dialler = bind(NodeConfig::new(to_identity(&b.issue(&NodeCert::new("d").uri("spiffe://b.test/d"))), {
        let mut t = trust.clone();
        t.add_crl_pem(crl.as_bytes()).unwrap();
        t
    }));
    let node = bind(NodeConfig::new(to_identity(&issued), trust));
    let text = refusal(connect(&dialler, &node, id).await.0.unwrap_err());
    assert!(text.contains("revoked"), "{text}");
}

#[test]
fn a_bundle_needs_a_trust_domain_and_ca_certificates() {
    let pki = Pki::new("bundle");
    let mut t = TrustStore::new();
    for bad in ["", "Example.org", "example.org/path", "spiffe://example.org"] {
        let e = t.add_bundle_pem(bad, pki.ca.cert_pem().as_bytes()).unwrap_err();
        assert!(matches!(e, Error::InvalidInput(_)), "{bad:?}: {e:?}");
    }
    let leaf = pki.issue(&pki.cert("node"));
    assert!(t.add_bundle_pem("example.org", leaf.chain_pem.as_bytes()).is_err(), "a node certificate is no CA");
    assert!(t.bundle_domains().is_empty());
}

/// Rotation as spiffe-helper does it: the SVID (`svid.pem`), its key (`svid_key.pem`) and the
/// bundle (`svid_bundle.pem`) rewritten in place, one file after the other, every 2 s, while
/// messages flow. The certificate watcher picks each SVID up (new connections see it); the
/// session that is open carries on: nothing lost, no reconnection.
#[tokio::test]
async fn svids_rotated_on_disk_every_2_s_are_picked_up_without_dropping_the_session() {
    use std::time::Duration;
    let pki = Pki::new("example.org CA");
    let dir = tempfile::tempdir().unwrap();
    let (svid, key, bundle) =
        (dir.path().join("svid.pem"), dir.path().join("svid_key.pem"), dir.path().join("svid_bundle.pem"));
    let id = "spiffe://example.org/server";
    // Written as spiffe-helper writes them: in place, one file after the other.
    let write_svid = |issued: &quicseal::pki::Issued| {
        std::fs::write(&svid, &issued.chain_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        std::fs::write(&bundle, pki.ca.cert_pem()).unwrap();
    };
    let first = pki.issue(&NodeCert::new("server").uri(id));
    write_svid(&first);
    let files = quicseal::CertFiles::new(&svid, &key, &bundle).interval(Duration::from_millis(50));
    let (identity, trust) = files.load().unwrap();
    let server = bind(NodeConfig::new(identity, trust.clone()));
    let watcher = server.watch(files);
    let client = bind(NodeConfig::new(
        to_identity(&pki.issue(&NodeCert::new("client").uri("spiffe://example.org/client"))),
        trust,
    ));
    let (to_server, at_server) = connect(&client, &server, id).await;
    let (to_server, at_server) = (to_server.unwrap(), at_server.unwrap());

    // Messages flow the whole time.
    let (sender, receiver) = (trickle(&to_server, Duration::from_millis(5)), receive_in_order(&at_server));

    for round in 1..=4u64 {
        tokio::time::sleep(Duration::from_secs(2)).await; // pacing: SPIRE-like rotation cadence
        let next = pki.issue(&NodeCert::new("server").uri(id));
        write_svid(&next);
        eventually(&format!("rotation {round} is picked up"), || watcher.status().reloads >= round).await;
        // A new connection sees the new SVID.
        let fresh = connect(&client, &server, id).await.0.unwrap();
        assert_eq!(fresh.peer().fingerprint, to_identity(&next).fingerprint(), "rotation {round}");
        fresh.close();
    }
    sender.abort();
    let _ = sender.await;
    let sent = to_server.stats().messages_sent;
    to_server.delivered(0).await.unwrap();
    assert_eq!(to_server.stats().reconnects, 0, "the session was never dropped");
    assert_eq!(at_server.stats().messages_delivered, sent);
    assert!(sent > 500, "messages flowed during the rotations: {sent}");
    to_server.close();
    let received = tokio::time::timeout(Duration::from_secs(10), receiver).await.expect("the receiver ends").unwrap();
    assert_eq!(u64::from(received), sent, "each message once, in order");
}
