//! Loading identities and trust stores from real files, including keys and certificates made by
//! openssl (SEC1 EC keys, PKCS#1 RSA keys), and every loading error a user can hit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use quicseal::{Error, Identity, LoadProblem, NodeConfig, TrustStore};

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
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
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"], d);
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=openssl CA",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.crt",
        ],
        d,
    );
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
        openssl(
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={name}-node"),
                "-out",
                &format!("{name}.csr"),
            ],
            d,
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
                "leaf.ext",
                "-out",
                &format!("{name}.crt"),
            ],
            d,
        );
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
