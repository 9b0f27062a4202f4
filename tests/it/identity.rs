//! Loading identities and trust stores from real files, including keys and certificates made by
//! openssl (SEC1 EC keys, PKCS#1 RSA keys), and every loading error a user can hit.

use std::path::{Path, PathBuf};

use crate::common::*;
use quicseal::{Error, Identity, LoadProblem, NodeConfig, TrustStore};

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn problem(e: Error) -> (Option<PathBuf>, LoadProblem) {
    match e {
        Error::Load(l) => (l.path, l.problem),
        other => panic!("expected a load error, got {other:?}"),
    }
}

#[test]
fn loading_errors_name_the_file_and_the_problem() {
    let pki = Pki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let node = pki.issue(&pki.cert("node"));
    let cert = write(dir.path(), "node.crt", node.chain_pem.as_bytes());
    let key = write(dir.path(), "node.key", node.key_pem.as_bytes());
    Identity::from_pem_files(&cert, &key).unwrap();

    let missing = dir.path().join("missing.key");
    let (path, p) = problem(Identity::from_pem_files(&cert, &missing).unwrap_err());
    assert_eq!(path.as_deref(), Some(missing.as_path()));
    assert!(matches!(p, LoadProblem::Unreadable(_)), "{p:?}");

    let garbage = write(dir.path(), "garbage.crt", b"this is not PEM\n");
    let (path, p) = problem(Identity::from_pem_files(&garbage, &key).unwrap_err());
    assert_eq!(path.as_deref(), Some(garbage.as_path()));
    assert!(matches!(p, LoadProblem::NotPem(_)), "{p:?}");

    // Key and certificate swapped: each file holds the wrong PEM type.
    let (path, p) = problem(Identity::from_pem_files(&key, &cert).unwrap_err());
    assert_eq!(path.as_deref(), Some(key.as_path()));
    assert_eq!(p, LoadProblem::WrongPemType { expected: "CERTIFICATE", found: vec!["PRIVATE KEY".into()] });

    let other_key = write(dir.path(), "other.key", pki.issue(&pki.cert("other")).key_pem.as_bytes());
    let (path, p) = problem(Identity::from_pem_files(&cert, &other_key).unwrap_err());
    assert_eq!(path.as_deref(), Some(other_key.as_path()));
    assert_eq!(p, LoadProblem::KeyMismatch);

    let bad_b64 = write(dir.path(), "bad.crt", b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
    let (_, p) = problem(Identity::from_pem_files(&bad_b64, &key).unwrap_err());
    assert!(matches!(p, LoadProblem::NotPem(_)), "{p:?}");

    let not_der = write(dir.path(), "notder.crt", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    let (_, p) = problem(Identity::from_pem_files(&not_der, &key).unwrap_err());
    assert!(matches!(p, LoadProblem::Invalid(_)), "{p:?}");

    // Trust store: a key file is not a CA file, a certificate is not a CRL.
    let (path, p) = problem(TrustStore::from_ca_file(&key).unwrap_err());
    assert_eq!(path.as_deref(), Some(key.as_path()));
    assert!(matches!(p, LoadProblem::WrongPemType { expected: "CERTIFICATE", .. }), "{p:?}");
    let (_, p) = problem(TrustStore::new().add_crl_file(&cert).map(|_| ()).unwrap_err());
    assert!(matches!(p, LoadProblem::WrongPemType { expected: "X509 CRL", .. }), "{p:?}");
    let msg = Identity::from_pem_files(&cert, &other_key).unwrap_err().to_string();
    assert!(msg.contains("other.key") && msg.contains("does not match"), "{msg}");
}

/// Certificates and keys made entirely by openssl, signed by a CA that openssl made too: SEC1
/// (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`) keys work with our nodes.
#[tokio::test]
async fn openssl_made_sec1_and_pkcs1_identities_connect() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl_ca(d, "/CN=openssl CA", &[]);
    write(
        d,
        "leaf.ext",
        b"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:ec-node,DNS:rsa-node,IP:127.0.0.1\n",
    );
    // SEC1 EC key.
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ec.key"], d);
    // PKCS#1 RSA key.
    openssl(&["genrsa", "-traditional", "-out", "rsa.key", "2048"], d);
    for name in ["ec", "rsa"] {
        openssl_sign(d, name, &format!("/CN={name}-node"), "leaf.ext");
    }
    assert!(std::fs::read_to_string(d.join("ec.key")).unwrap().contains("BEGIN EC PRIVATE KEY"));
    assert!(std::fs::read_to_string(d.join("rsa.key")).unwrap().contains("BEGIN RSA PRIVATE KEY"));

    let trust = TrustStore::from_ca_file(d.join("ca.crt")).unwrap();
    let ec = Identity::from_pem_files(d.join("ec.crt"), d.join("ec.key")).unwrap();
    let rsa = Identity::from_pem_files(d.join("rsa.crt"), d.join("rsa.key")).unwrap();
    let a = bind(NodeConfig::new(ec, trust.clone()));
    let b = bind(NodeConfig::new(rsa, trust));
    let (ab, ba) = connect(&a, &b, "rsa-node").await;
    let (ab, ba) = (ab.unwrap(), ba.unwrap());
    assert_eq!(ba.peer().common_name.as_deref(), Some("ec-node"));
    ab.send(0, "from openssl").await.unwrap();
    assert_eq!(ba.recv().await.unwrap().decode::<String>().unwrap(), "from openssl");
}

/// What our `pki` writes is valid to an outside tool.
#[test]
fn openssl_verifies_our_certificates_and_crl() {
    let pki = Pki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let node = pki.issue(&pki.cert("node").uri("spiffe://example.org/node"));
    write(d, "ca.crt", pki.ca.cert_pem().as_bytes());
    write(d, "node.crt", node.chain_pem.as_bytes());
    let now = std::time::SystemTime::now();
    let crl = pki.ca.crl(&[], 1, now, now + std::time::Duration::from_secs(3600)).unwrap();
    write(d, "ca.crl", crl.as_bytes());
    openssl(&["verify", "-CAfile", "ca.crt", "-purpose", "sslclient", "node.crt"], d);
    openssl(&["verify", "-CAfile", "ca.crt", "-purpose", "sslserver", "node.crt"], d);
    openssl(&["verify", "-CAfile", "ca.crt", "-CRLfile", "ca.crl", "-crl_check", "node.crt"], d);
    openssl(&["crl", "-in", "ca.crl", "-noout", "-CAfile", "ca.crt"], d);
}

fn revoked(issued: &quicseal::pki::Issued) -> quicseal::pki::Revoked {
    quicseal::pki::Revoked { serial: issued.serial.clone(), revoked_at: std::time::SystemTime::now(), reason: None }
}

fn is_revoked(e: &Error) -> bool {
    matches!(
        e,
        Error::Tls(quicseal::TlsError::Local {
            error: quicseal::rustls::Error::InvalidCertificate(quicseal::rustls::CertificateError::Revoked),
            ..
        })
    )
}

/// All of an issuer's CRLs count: the newest (by CRL Number) is in force whatever the order
/// they were loaded in, from two files or one bundle.
#[test]
fn the_newest_crl_of_an_issuer_is_in_force_whatever_the_load_order() {
    let pki = Pki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let node = pki.issue(&pki.cert("node"));
    let chain = vec![node.cert_der.clone()];
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let older = pki.ca.crl(&[], 1, now - day, now + day).unwrap();
    let newer = pki.ca.crl(&[revoked(&node)], 2, now, now + day).unwrap();
    let (older_file, newer_file) =
        (write(dir.path(), "1.crl", older.as_bytes()), write(dir.path(), "2.crl", newer.as_bytes()));
    let bundle = write(dir.path(), "bundle.crl", format!("{older}{newer}").as_bytes());
    let mut two_files = pki.trust();
    two_files.add_crl_file(&older_file).unwrap().add_crl_file(&newer_file).unwrap();
    let mut one_bundle = pki.trust();
    one_bundle.add_crl_file(&bundle).unwrap();
    let mut reversed = pki.trust();
    reversed.add_crl_file(&newer_file).unwrap().add_crl_file(&older_file).unwrap();
    for trust in [two_files, one_bundle, reversed] {
        let e = trust.verify(&chain, None).unwrap_err();
        assert!(is_revoked(&e), "{e:?}");
    }
}

/// A CRL that no trusted CA signed is an error that names the file (accepting it would leave
/// that CRL's revocations unenforced without a word), and a node keeps its last good material.
#[tokio::test]
async fn a_crl_from_an_unknown_ca_is_refused_and_the_node_keeps_its_material() {
    let pki = Pki::new("ca");
    let stranger = Pki::new("stranger");
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let foreign = write(dir.path(), "foreign.crl", stranger.ca.crl(&[], 1, now, now + day).unwrap().as_bytes());
    let mut trust = pki.trust();
    trust.add_crl_file(&foreign).unwrap();
    let chain = vec![pki.issue(&pki.cert("node")).cert_der.clone()];
    let (path, p) = problem(trust.verify(&chain, None).unwrap_err());
    assert_eq!(path.as_deref(), Some(foreign.as_path()));
    assert!(matches!(&p, LoadProblem::Invalid(why) if why.contains("not signed by any CA")), "{p:?}");
    let node = bind(NodeConfig::new(pki.identity("node"), pki.trust()));
    assert!(node.reload_trust(trust.clone()).is_err());
    assert!(quicseal::Node::bind("127.0.0.1:0".parse().unwrap(), NodeConfig::new(pki.identity("n2"), trust)).is_err());
    // The node still runs on what it had.
    assert_eq!(node.trust().ca_count(), 1);
}

/// Revocation never goes back: a reload with an older CRL (lower CRL Number), or none, for a CA
/// still trusted is refused; a newer one is taken.
#[tokio::test]
async fn a_reload_never_rolls_back_to_an_older_crl() {
    let pki = Pki::new("ca");
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let revoked_node = pki.issue(&pki.cert("gone"));
    let with = |number: u64, list: &[quicseal::pki::Revoked]| {
        let mut t = pki.trust();
        t.add_crl_pem(pki.ca.crl(list, number, now, now + day).unwrap().as_bytes()).unwrap();
        t
    };
    let node = bind(NodeConfig::new(pki.identity("node"), with(5, &[revoked(&revoked_node)])));
    let e = node.reload_trust(with(4, &[])).unwrap_err();
    assert!(e.to_string().contains("roll back"), "{e}");
    assert!(node.reload_trust(pki.trust()).is_err(), "dropping the CRL is a rollback too");
    let chain = vec![revoked_node.cert_der.clone()];
    assert!(is_revoked(&node.trust().verify(&chain, None).unwrap_err()));
    node.reload_trust(with(6, &[revoked(&revoked_node)])).unwrap();
    node.reload_trust(with(6, &[revoked(&revoked_node)])).unwrap();
}

/// `openssl ca -gencrl` without crl_extensions writes a CRL with no CRL Number, which the TLS
/// library cannot use: a load error naming the file and the fix, not a silent failure.
#[test]
fn a_crl_without_a_crl_number_is_a_load_error_naming_the_file() {
    let pki = Pki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ca.crt", pki.ca.cert_pem().as_bytes());
    write(d, "ca.key", pki.ca.key_pem().as_bytes());
    write(d, "index.txt", b"");
    write(
        d,
        "ca.cnf",
        b"[ca]\ndefault_ca = local\n[local]\ndatabase = index.txt\ndefault_md = sha256\ndefault_crl_days = 7\n",
    );
    openssl(&["ca", "-gencrl", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.crt", "-out", "plain.crl"], d);
    let file = d.join("plain.crl");
    let (path, p) = problem(pki.trust().add_crl_file(&file).map(|_| ()).unwrap_err());
    assert_eq!(path.as_deref(), Some(file.as_path()));
    assert!(matches!(&p, LoadProblem::Invalid(why) if why.contains("CRL Number")), "{p:?}");
}

/// A trust store takes CA certificates only: a node certificate is not a trust anchor.
#[test]
fn a_node_certificate_is_refused_as_a_trust_anchor() {
    let pki = Pki::new("ca");
    let node = pki.issue(&pki.cert("node"));
    let leaf_only = node.chain_pem.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap();
    let (_, p) = problem(TrustStore::new().add_ca_pem(leaf_only.as_bytes()).map(|_| ()).unwrap_err());
    assert!(matches!(&p, LoadProblem::Invalid(why) if why.contains("not a CA certificate")), "{p:?}");
}

fn missing_eku(e: &Error) -> bool {
    matches!(
        e,
        Error::Tls(quicseal::TlsError::Local {
            error: quicseal::rustls::Error::InvalidCertificate(quicseal::rustls::CertificateError::Other(o)),
            ..
        }) if o.0.downcast_ref::<quicseal::MissingExtendedKeyUsage>().is_some()
    )
}

/// A certificate without an extended key usage extension (made by openssl from our CA) passes
/// neither role unless the trust store opts out, and the handshake refuses it too.
#[tokio::test]
async fn certificates_without_eku_are_refused_in_both_roles_unless_allowed() {
    let pki = Pki::new("ca");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ca.crt", pki.ca.cert_pem().as_bytes());
    write(d, "ca.key", pki.ca.key_pem().as_bytes());
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "n.key",
            "-subj",
            "/CN=noeku",
            "-addext",
            "subjectAltName=DNS:noeku,IP:127.0.0.1",
            "-out",
            "n.csr",
        ],
        d,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "n.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-copy_extensions",
            "copy",
            "-out",
            "n.crt",
        ],
        d,
    );
    let chain = quicseal::load_certificates(d.join("n.crt")).unwrap();
    let trust = pki.trust();
    assert!(missing_eku(&trust.verify(&chain, None).unwrap_err()));
    assert!(missing_eku(&trust.verify(&chain, Some("noeku")).unwrap_err()));
    let mut lenient = pki.trust();
    lenient.dangerous_allow_missing_eku(true);
    lenient.verify(&chain, None).unwrap();
    lenient.verify(&chain, Some("noeku")).unwrap();
    // The handshake applies the same rule: the dialler without EKU is refused by the acceptor.
    let noeku = Identity::from_pem_files(d.join("n.crt"), d.join("n.key")).unwrap();
    let server = bind(NodeConfig::new(pki.identity("server"), pki.trust()));
    let client = bind(NodeConfig::new(noeku, pki.trust()));
    let (dialled, accepted) = connect(&client, &server, "server").await;
    assert!(dialled.is_err());
    assert!(missing_eku(&accepted.unwrap_err()));
}

/// Identities and bundles from DER, as an API (the SPIFFE Workload API) hands them over: the
/// same checks as files, and the same refusals.
#[test]
fn identities_and_bundles_load_from_der_with_the_same_checks() {
    use quicseal::rustls::pki_types::pem::PemObject;
    use quicseal::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (pki, other) = (Pki::new("ca"), Pki::new("other"));
    let node = pki.issue(&pki.cert("node"));
    let chain = || CertificateDer::pem_slice_iter(node.chain_pem.as_bytes()).map(Result::unwrap).collect::<Vec<_>>();
    let key_of = |pem: &str| PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let identity = Identity::from_der(chain(), key_of(&node.key_pem)).unwrap();
    assert_eq!(identity.fingerprint(), to_identity(&node).fingerprint());
    // Another certificate's key, and no certificate at all.
    let stranger = other.issue(&other.cert("x"));
    assert_eq!(
        problem(Identity::from_der(chain(), key_of(&stranger.key_pem)).unwrap_err()).1,
        LoadProblem::KeyMismatch
    );
    assert!(matches!(Identity::from_der(Vec::new(), key_of(&node.key_pem)), Err(Error::InvalidInput(_))));

    let ca = CertificateDer::from_pem_slice(pki.ca.cert_pem().as_bytes()).unwrap();
    let mut trust = TrustStore::new();
    trust.add_bundle_der("example.org", [ca.clone()]).unwrap();
    assert_eq!(trust.bundle("example.org"), Some(&[ca.clone()][..]));
    assert_eq!(trust.bundle("other.org"), None);
    // A node certificate is no trust anchor, a trust domain is no SPIFFE ID: refused, and the
    // store is left as it was.
    assert!(matches!(trust.add_bundle_der("example.org", chain()), Err(Error::Load(_))));
    assert!(matches!(trust.add_bundle_der("spiffe://example.org", [ca.clone()]), Err(Error::InvalidInput(_))));
    assert_eq!(trust.bundle("example.org").map(<[_]>::len), Some(1));
    assert_eq!(trust.bundle_domains(), ["example.org"]);
}
